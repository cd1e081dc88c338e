// kvgate prefill: a prefill node (prefill/prefill_node.h) until SIGINT or
// SIGTERM: registers with the config's coordinators, prefills the jobs they
// send and ships the KV to the decode nodes.
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
#include "prefill/prefill_node.h"

namespace kvgate::cli {

int run_prefill(const std::vector<std::string>& args) {
  ArgParser p("kvgate prefill",
              "Runs a prefill node until SIGINT or SIGTERM: it registers with every\n"
              "cluster.coordinators entry, prefills the jobs they send (full attention, then\n"
              "the job's KV policy) and ships the compressed KV to the decode node that\n"
              "reserved it (docs/cluster.md).\n"
              "  kvgate prefill --config FILE [--node NAME]");
  p.add_option("config", "FILE", "config file (model, engine, kv, cluster, prefill, decode, "
                                 "transport, metrics, logging sections)");
  p.add_option("node", "NAME", "the local node of --config whose config to use (role prefill)");
  if (Status s = p.parse(args); !s.ok()) {
    print_error(s.message());
    return 2;
  }
  if (p.help_requested()) {
    std::fputs(p.help().c_str(), stdout);
    return 0;
  }
  auto config = node_config_from_args(p, Role::kPrefill);
  if (!config.ok()) {
    print_error(config.status().message());
    return 2;
  }
  const std::string early_name =
      !config->cluster.node_name.empty()
          ? config->cluster.node_name
          : "prefill-" + config->prefill.listen.host + "-" +
                std::to_string(config->prefill.listen.port);
  log::configure(config->logging, "prefill", early_name);

  ShutdownSignals signals;  // before any thread starts

  auto node = prefill::PrefillNode::start(*config);
  if (!node.ok()) {
    print_error(node.status().message());
    return 1;
  }
  log::configure(config->logging, "prefill", (*node)->node_name());
  std::string metrics = "off";
  if (auto m = (*node)->metrics_address()) metrics = "http://" + m->to_string() + "/metrics";
  std::printf("kvgate: prefill node %s listening on %s (metrics %s)\n",
              (*node)->node_name().c_str(), (*node)->listen_address().to_string().c_str(),
              metrics.c_str());
  std::fflush(stdout);

  std::fprintf(stderr, "kvgate: %s, shutting down\n", signals.wait());
  (*node)->stop();
  node->reset();
  return 0;
}

}  // namespace kvgate::cli
