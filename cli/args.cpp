#include "cli/args.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>

namespace kvgate::cli {

ArgParser::ArgParser(std::string command, std::string summary)
    : command_(std::move(command)), summary_(std::move(summary)) {}

void ArgParser::add_option(const std::string& name, const std::string& value_name,
                           const std::string& help, const std::string& def) {
  order_.push_back(name);
  specs_[name] = Spec{value_name, help, def, false};
}

void ArgParser::add_flag(const std::string& name, const std::string& help) {
  order_.push_back(name);
  specs_[name] = Spec{"", help, "", true};
}

void ArgParser::add_positional(const std::string& name, const std::string& help, bool required) {
  positional_specs_.emplace_back(name, help);
  if (required) required_positionals_ = positional_specs_.size();
}

Status ArgParser::parse(const std::vector<std::string>& args) {
  const std::string see = " (see '" + command_ + " --help')";
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      help_ = true;
      return Status();
    }
    if (a.rfind("--", 0) == 0 && a.size() > 2) {
      std::string name = a.substr(2);
      std::optional<std::string> inline_value;
      if (auto eq = name.find('='); eq != std::string::npos) {
        inline_value = name.substr(eq + 1);
        name = name.substr(0, eq);
      }
      auto it = specs_.find(name);
      if (it == specs_.end()) return invalid_argument("unknown option '--" + name + "'" + see);
      if (it->second.is_flag) {
        if (inline_value) return invalid_argument("option '--" + name + "' takes no value" + see);
        values_[name] = "1";
        continue;
      }
      if (inline_value) {
        values_[name] = *inline_value;
      } else {
        if (i + 1 >= args.size()) {
          return invalid_argument("option '--" + name + "' needs a value " + it->second.value_name + see);
        }
        values_[name] = args[++i];
      }
      continue;
    }
    if (positional_values_.size() >= positional_specs_.size()) {
      return invalid_argument("unexpected argument '" + a + "'" + see);
    }
    positional_values_.push_back(a);
  }
  if (positional_values_.size() < required_positionals_) {
    return invalid_argument("missing argument " + positional_specs_[positional_values_.size()].first + see);
  }
  return Status();
}

std::string ArgParser::help() const {
  std::string out = "usage: " + command_ + " [options]";
  for (const auto& [name, help] : positional_specs_) out += " " + name;
  out += "\n\n" + summary_ + "\n";
  if (!positional_specs_.empty()) {
    out += "\narguments:\n";
    for (const auto& [name, help] : positional_specs_) out += "  " + name + "\n      " + help + "\n";
  }
  out += "\noptions:\n";
  for (const auto& name : order_) {
    const Spec& s = specs_.at(name);
    out += "  --" + name + (s.is_flag ? "" : " " + s.value_name) + "\n      " + s.help;
    if (!s.def.empty()) out += " (default: " + s.def + ")";
    out += "\n";
  }
  out += "  --help\n      show this help and exit\n";
  return out;
}

bool ArgParser::has(const std::string& name) const { return values_.count(name) != 0; }
bool ArgParser::flag(const std::string& name) const { return values_.count(name) != 0; }

std::string ArgParser::get(const std::string& name) const {
  if (auto it = values_.find(name); it != values_.end()) return it->second;
  if (auto it = specs_.find(name); it != specs_.end()) return it->second.def;
  return {};
}

Result<int64_t> ArgParser::get_int(const std::string& name, int64_t min, int64_t max) const {
  const std::string v = get(name);
  errno = 0;
  char* end = nullptr;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || errno == ERANGE || x < min || x > max) {
    return invalid_argument("option '--" + name + "' must be an integer in [" + std::to_string(min) +
                            ", " + std::to_string(max) + "], got '" + v + "'");
  }
  return static_cast<int64_t>(x);
}

Result<double> ArgParser::get_double(const std::string& name, double min, double max) const {
  const std::string v = get(name);
  errno = 0;
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0' || errno == ERANGE || !std::isfinite(x) || x < min || x > max) {
    return invalid_argument("option '--" + name + "' must be a number in [" + std::to_string(min) +
                            ", " + std::to_string(max) + "], got '" + v + "'");
  }
  return x;
}

}  // namespace kvgate::cli
