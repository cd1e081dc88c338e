// Pieces the benchmarks share: their prompt text and policy names.
#pragma once

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "common/config.h"
#include "common/status.h"

namespace kvgate::cli {

// The text files of `dir` in name order, concatenated until `min_chars`
// (the whole directory if it has less); empty when there are none.
inline std::string read_text_files(const std::string& dir, size_t min_chars) {
  std::error_code ec;
  std::vector<std::filesystem::path> files;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    if (e.is_regular_file()) files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());
  std::string text;
  for (const auto& f : files) {
    std::ifstream in(f);
    std::stringstream ss;
    ss << in.rdbuf();
    text += ss.str();
    if (text.size() >= min_chars) break;
  }
  return text;
}

// A policy as the config spells it (kv.policy).
inline Result<KvPolicyChoice> policy_choice_by_name(const std::string& name) {
  for (KvPolicyChoice c :
       {KvPolicyChoice::kDense, KvPolicyChoice::kWindow, KvPolicyChoice::kPod, KvPolicyChoice::kH2o,
        KvPolicyChoice::kSnapKv, KvPolicyChoice::kGate, KvPolicyChoice::kGatePod}) {
    if (name == kv_policy_config_name(c)) return c;
  }
  return invalid_argument("unknown policy '" + name +
                          "' (dense, window, pod, h2o, snapkv, gate, gate+pod)");
}

}  // namespace kvgate::cli
