// A small command-line parser for the kvgate subcommands: --name VALUE,
// --name=VALUE, boolean --flag, positional arguments; help text generated
// from the declarations; errors name the offending option.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"

namespace kvgate::cli {

class ArgParser {
 public:
  ArgParser(std::string command, std::string summary);

  // An option taking a value; `value_name` appears in help, `def` is the default ("" = none).
  void add_option(const std::string& name, const std::string& value_name, const std::string& help,
                  const std::string& def = "");
  void add_flag(const std::string& name, const std::string& help);
  void add_positional(const std::string& name, const std::string& help, bool required = true);

  // Parses args (without the program and subcommand names). --help sets help_requested().
  Status parse(const std::vector<std::string>& args);
  bool help_requested() const { return help_; }
  std::string help() const;

  bool has(const std::string& name) const;  // given on the command line
  bool flag(const std::string& name) const;
  std::string get(const std::string& name) const;  // value or default
  Result<int64_t> get_int(const std::string& name, int64_t min, int64_t max) const;
  Result<double> get_double(const std::string& name, double min, double max) const;
  const std::vector<std::string>& positionals() const { return positional_values_; }

 private:
  struct Spec {
    std::string value_name;
    std::string help;
    std::string def;
    bool is_flag = false;
  };
  std::string command_, summary_;
  std::vector<std::string> order_;
  std::map<std::string, Spec> specs_;
  std::vector<std::pair<std::string, std::string>> positional_specs_;
  size_t required_positionals_ = 0;
  std::map<std::string, std::string> values_;
  std::vector<std::string> positional_values_;
  bool help_ = false;
};

}  // namespace kvgate::cli
