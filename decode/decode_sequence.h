// Per-request state of the decode engine (decode_engine.h): a request from
// its Reserve to its last token. Engine thread only; internal to decode/.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "decode/decode_engine.h"
#include "decode/device_pages.h"
#include "engine/policy_cache.h"
#include "engine/sampler.h"
#include "engine/tokenizer.h"
#include "kvstore/compressed_cache.h"
#include "kvstore/lease_manager.h"

namespace kvgate::decode {

// An admitted sequence. Destruction order matters: the cache returns its
// pages to `pages` (the lease), so `pages` is declared first (destroyed last)
// and the lease is released only after the whole Sequence is gone.
struct DecodeEngine::Sequence {
  Sequence(const engine::Tokenizer& tokenizer, const engine::SamplingParams& sampling,
           std::vector<std::string> stop_strings)
      : sampler(sampling), decoder(tokenizer), stops(std::move(stop_strings)) {}

  std::shared_ptr<const engine::PolicyPlan> plan;
  std::unique_ptr<kvstore::LeasePages> pages;  // stable address: the cache's page source
  // With a DecodeDevice: the device cache's page source (charged to the
  // same lease); declared after `pages`, before `cache`.
  std::unique_ptr<LeaseChargedPages> device_pages;
  std::optional<kvstore::CompressedKvCache> cache;
  engine::Sampler sampler;
  engine::StreamDecoder decoder;
  engine::StopMatcher stops;
  std::vector<int32_t> history;  // the prompt's tail (manifest), then the completion tokens
  int32_t next_token = 0;        // fed at the next step
  uint32_t prompt_tokens = 0;
  uint32_t completion_tokens = 0;
  uint32_t max_new_tokens = 0;
  bool ignore_eos = false;  // GenerationParams.ignore_eos: EOG tokens do not finish
  Clock::time_point last_token_at{};
};

struct DecodeEngine::Request {
  RequestId id;
  LeaseId lease;                         // none once expired
  control::ConnectionPtr coordinator;    // Reserve came on it: grants, commits, tokens
  control::ConnectionPtr prefill;        // manifest / Extend came on it: results
  transport::TransferId transfer;        // the posted receive (none when not posted)
  Clock::time_point deadline{};          // the lease's and the receive's
  bool received = false;                 // the receive verified
  uint64_t received_bytes = 0;
  Clock::duration transfer_elapsed{};
  std::optional<control::TransferManifest> manifest;
  std::unique_ptr<Sequence> seq;         // once admitted
};

}  // namespace kvgate::decode
