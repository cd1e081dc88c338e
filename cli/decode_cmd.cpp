// kvgate decode: a decode node (decode/decode_node.h) until SIGINT or
// SIGTERM, then a drain: no new work, in-flight requests failed with a clear
// Error to their coordinator, connections closed, exit 0.
#include <csignal>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/node_command.h"
#include "common/config.h"
#include "common/log.h"
#include "decode/decode_node.h"

namespace kvgate::cli {

int run_decode(const std::vector<std::string>& args) {
  ArgParser p("kvgate decode",
              "Runs a decode node: registers with the coordinators of the config's cluster\n"
              "section, reserves KV pool leases for them, receives compressed KV from prefill\n"
              "nodes (decode.listen, transport) and streams tokens back, until SIGINT or\n"
              "SIGTERM.\n"
              "  kvgate decode --config FILE [--node NAME]");
  p.add_option("config", "FILE", "config file (model, engine, kv, cluster, decode, transport, metrics)");
  p.add_option("node", "NAME", "the local node of the config to run (its role must be decode)");
  if (Status s = p.parse(args); !s.ok()) {
    print_error(s.message());
    return 2;
  }
  if (p.help_requested()) {
    std::fputs(p.help().c_str(), stdout);
    return 0;
  }
  auto config = node_config_from_args(p, Role::kDecode);
  if (!config.ok()) {
    print_error(config.status().message());
    return 2;
  }
  log::configure(config->logging, "decode", config->cluster.node_name);

  ShutdownSignals signals;  // before any thread starts

  auto node = decode::DecodeNode::start(*config);
  if (!node.ok()) {
    print_error(node.status().message());
    return 1;
  }
  // The node's name is chosen at start when cluster.node_name is empty.
  log::configure(config->logging, "decode", (*node)->node_name());
  std::printf("kvgate: decode node %s listening on %s (transport %s)\n",
              (*node)->node_name().c_str(), (*node)->control_address().to_string().c_str(),
              (*node)->engine().transport_name().c_str());
  std::fflush(stdout);

  log::info("shutting down", {{"signal", signals.wait()}});
  (*node)->stop();
  node->reset();
  return 0;
}

}  // namespace kvgate::cli
