// kvgate config: prints the configuration schema (common/config.h) or checks
// a config file.
#include <cstdio>

#include "cli/args.h"
#include "cli/commands.h"
#include "common/config.h"

namespace kvgate::cli {

int run_config(const std::vector<std::string>& args) {
  ArgParser p("kvgate config",
              "Prints the configuration schema or checks a config file:\n"
              "  kvgate config --print-defaults   every key with its default and help, as YAML\n"
              "  kvgate config --markdown         the schema as Markdown tables\n"
              "  kvgate config check FILE         the config FILE gives (secrets redacted),\n"
              "                                   or its first error");
  p.add_positional("ACTION", "'check'", /*required=*/false);
  p.add_positional("FILE", "the config file to check", /*required=*/false);
  p.add_flag("print-defaults", "print every key with its default and help text, as YAML");
  p.add_flag("markdown", "print the schema reference as Markdown (configs/README.md)");
  p.add_option("node", "NAME", "with check: print the whole config of this local node");
  if (Status s = p.parse(args); !s.ok()) {
    print_error(s.message());
    return 2;
  }
  if (p.help_requested()) {
    std::fputs(p.help().c_str(), stdout);
    return 0;
  }
  const auto& pos = p.positionals();
  const bool check = pos.size() == 2 && pos[0] == "check";
  if (p.flag("print-defaults") + p.flag("markdown") + check != 1 || (!check && !pos.empty()) ||
      (p.has("node") && !check)) {
    print_error(
        "expected one of --print-defaults, --markdown or check FILE [--node NAME] (see "
        "'kvgate config --help')");
    return 2;
  }
  if (p.flag("print-defaults")) {
    std::fputs(format_defaults().c_str(), stdout);
    return 0;
  }
  if (p.flag("markdown")) {
    std::fputs(format_reference_markdown().c_str(), stdout);
    return 0;
  }
  auto config = load_config_file(pos[1]);
  if (!config.ok()) {
    print_error(config.status().message());
    return 1;
  }
  const FormatOptions shown{.comments = false, .redact_secrets = true};
  if (!p.has("node")) {
    std::fputs(format_config(*config, shown).c_str(), stdout);
    std::fprintf(stderr, "kvgate: %s: ok, %zu local node(s)\n", pos[1].c_str(),
                 config->local.nodes.size());
    return 0;
  }
  const std::string name = p.get("node");
  Role role = Role::kCoordinator;
  for (const LocalNode& n : config->local.nodes) {
    if (n.name == name) role = n.role;
  }
  auto node = select_node(*config, role, name);
  if (!node.ok()) {
    print_error(node.status().message());
    return 1;
  }
  ClusterConfig single;
  single.base = *node;
  std::fputs(format_config(single, shown).c_str(), stdout);
  std::fprintf(stderr, "kvgate: %s: node %s (%s) ok\n", pos[1].c_str(), name.c_str(),
               std::string(role_name(role)).c_str());
  return 0;
}

}  // namespace kvgate::cli
