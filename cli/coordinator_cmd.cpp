// kvgate coordinator: the OpenAI-compatible HTTP API in front of the cluster
// (coordinator/cluster_backend.h) until SIGINT or SIGTERM. Prefill and decode
// nodes register on coordinator.control_listen; each request is placed on a
// decode node (reservation) and a prefill node (job), and its tokens are
// relayed back (docs/cluster.md).
#include <chrono>
#include <csignal>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <prometheus/registry.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/node_command.h"
#include "cli/model_loading.h"
#include "common/config.h"
#include "common/log.h"
#include "coordinator/cluster_backend.h"
#include "coordinator/http_server.h"
#include "engine/chat_template.h"

namespace kvgate::cli {

namespace {

Status apply_port(const ArgParser& p, const char* option, HostPort& address) {
  if (!p.has(option)) return Status();
  auto port = p.get_int(option, 0, 65535);
  if (!port.ok()) return port.status();
  address.port = static_cast<uint16_t>(*port);
  return Status();
}

}  // namespace

int run_coordinator(const std::vector<std::string>& args) {
  ArgParser p("kvgate coordinator",
              "Runs the coordinator until SIGINT or SIGTERM: the OpenAI-compatible HTTP API\n"
              "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics) on\n"
              "coordinator.listen, and the control plane on coordinator.control_listen where\n"
              "prefill and decode nodes register. Each request is placed on a decode node by\n"
              "its predicted compressed KV bytes and on the prefill node with the shortest\n"
              "queue (docs/cluster.md). Prints both addresses once it listens.\n"
              "  kvgate coordinator --config FILE [--node NAME]");
  p.add_option("config", "FILE",
               "config file (model, kv, coordinator, cluster, decode, transport, logging)");
  p.add_option("node", "NAME", "the local node of --config whose config to use (role coordinator)");
  p.add_option("port", "N", "HTTP port (coordinator.listen); 0 = any free port");
  p.add_option("control-port", "N",
               "control-plane port (coordinator.control_listen); 0 = any free port");
  if (Status s = p.parse(args); !s.ok()) {
    print_error(s.message());
    return 2;
  }
  if (p.help_requested()) {
    std::fputs(p.help().c_str(), stdout);
    return 0;
  }
  auto config = node_config_from_args(p, Role::kCoordinator);
  if (!config.ok()) {
    print_error(config.status().message());
    return 2;
  }
  for (auto [option, address] : {std::pair{"port", &config->coordinator.listen},
                                 std::pair{"control-port", &config->coordinator.control_listen}}) {
    if (Status s = apply_port(p, option, *address); !s.ok()) {
      print_error(s.message());
      return 2;
    }
  }
  const std::string node_name = !config->cluster.node_name.empty()
                                    ? config->cluster.node_name
                                    : "coordinator-" + config->coordinator.listen.host + "-" +
                                          std::to_string(config->coordinator.listen.port);
  log::configure(config->logging, "coordinator", node_name);

  ShutdownSignals signals;  // before any thread starts

  // The model is mapped, not computed with: its tokenizer and chat template
  // count tokens at admission, its shapes (and gate file) size the KV.
  auto loaded = load_model_and_tokenizer(config->model.path);
  if (!loaded.ok()) {
    print_error(loaded.status().message());
    return 1;
  }
  auto registry = std::make_shared<prometheus::Registry>();
  auto backend = coordinator::ClusterBackend::from_config(*config, *loaded->model, registry);
  if (!backend.ok()) {
    print_error(backend.status().message());
    return 1;
  }

  coordinator::ServedModel served;
  served.name = served_model_name(config->model);
  served.context_tokens = (*backend)->models().at(0).context_tokens;
  served.tokenizer = std::shared_ptr<const engine::Tokenizer>(std::move(loaded->tokenizer));
  if (!served.tokenizer->chat_template().empty()) {
    auto t = engine::ChatTemplate::parse(served.tokenizer->chat_template());
    if (t.ok()) served.chat_template = std::make_shared<const engine::ChatTemplate>(std::move(*t));
  }
  served.created_unix = std::chrono::duration_cast<std::chrono::seconds>(
                            std::chrono::system_clock::now().time_since_epoch())
                            .count();
  coordinator::HttpServerOptions options;
  options.config = config->coordinator;
  options.models.push_back(std::move(served));
  auto server = coordinator::HttpServer::start(std::move(options), **backend, registry);
  if (!server.ok()) {
    print_error(server.status().message());
    return 1;
  }
  std::printf("kvgate: coordinator serving %s at %s/v1 (auth %s), control plane on %s\n",
              served_model_name(config->model).c_str(), (*server)->url().c_str(),
              config->coordinator.auth == AuthMode::kDisabled ? "disabled" : "required",
              (*backend)->control_address().to_string().c_str());
  std::fflush(stdout);

  std::fprintf(stderr, "kvgate: %s, shutting down\n", signals.wait());
  (*server)->stop();       // no new requests; connections dropped
  (*backend)->shutdown();  // running requests cancelled on their nodes
  server->reset();
  backend->reset();
  return 0;
}

}  // namespace kvgate::cli
