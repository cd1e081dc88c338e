// kvgate serve: the OpenAI-compatible HTTP API with the CPU engine in this
// process (coordinator/local_backend.h), until SIGINT or SIGTERM.
#include <csignal>
#include <cstdio>
#include <memory>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/node_command.h"
#include "common/config.h"
#include "coordinator/http_server.h"
#include "coordinator/local_backend.h"

namespace kvgate::cli {

namespace {

// The config `serve` runs with: the coordinator section of --config (or of
// its local node --node), or the defaults with --model; options override.
Result<NodeConfig> serve_config(const ArgParser& p) {
  NodeConfig c;
  if (p.has("config")) {
    auto file = load_config_file(p.get("config"));
    if (!file.ok()) return file.status();
    auto node = select_node(*file, Role::kCoordinator, p.get("node"));
    if (!node.ok()) return node.status();
    c = std::move(*node);
    if (p.has("model")) c.model.path = p.get("model");
  } else {
    if (p.has("node")) return invalid_argument("option '--node' needs '--config'");
    c.model.path = p.get("model");
    // Quick use: the calibrated compression when the model has a gate file
    // (resolved by the local backend), dense otherwise.
    c.kv.policy = KvPolicyChoice::kDense;
  }
  if (p.has("policy")) {
    static const std::pair<const char*, KvPolicyChoice> kNames[] = {
        {"dense", KvPolicyChoice::kDense},     {"window", KvPolicyChoice::kWindow},
        {"pod", KvPolicyChoice::kPod},         {"h2o", KvPolicyChoice::kH2o},
        {"snapkv", KvPolicyChoice::kSnapKv},   {"gate", KvPolicyChoice::kGate},
        {"gate+pod", KvPolicyChoice::kGatePod}};
    bool found = false;
    for (const auto& [name, choice] : kNames) {
      if (p.get("policy") == name) {
        c.kv.policy = choice;
        found = true;
      }
    }
    if (!found) {
      return invalid_argument(
          "option '--policy' must be dense, window, pod, h2o, snapkv, gate or "
          "gate+pod, got '" +
          p.get("policy") + "'");
    }
  }
  if (p.has("host")) c.coordinator.listen.host = p.get("host");
  if (p.has("port")) {
    auto port = p.get_int("port", 0, 65535);
    if (!port.ok()) return port.status();
    c.coordinator.listen.port = static_cast<uint16_t>(*port);
  }
  if (p.has("threads")) {
    auto t = p.get_int("threads", 0, 1024);
    if (!t.ok()) return t.status();
    c.engine.threads = *t;
  }
  if (p.has("http-threads")) {
    auto t = p.get_int("http-threads", 1, 256);
    if (!t.ok()) return t.status();
    c.coordinator.http_threads = *t;
  }
  if (p.has("api-keys")) c.coordinator.api_keys_file = p.get("api-keys");
  if (p.has("auth")) {
    if (p.get("auth") == "disabled") {
      c.coordinator.auth = AuthMode::kDisabled;
    } else if (p.get("auth") == "required") {
      c.coordinator.auth = AuthMode::kRequired;
    } else {
      return invalid_argument("option '--auth' must be required or disabled, got '" +
                              p.get("auth") + "'");
    }
  }
  if (c.coordinator.auth == AuthMode::kRequired && c.coordinator.api_keys_file.empty()) {
    return invalid_argument(
        "API keys are required: give '--api-keys FILE' (coordinator.api_keys_file), or "
        "'--auth disabled' to serve without keys");
  }
  return c;
}

}  // namespace

int run_serve(const std::vector<std::string>& args) {
  ArgParser p("kvgate serve",
              "Serves the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,\n"
              "/v1/models, /health, /metrics) with the CPU engine in this process, until\n"
              "SIGINT or SIGTERM. Prints the URL once it listens.\n"
              "  kvgate serve --config FILE [--node NAME]\n"
              "  kvgate serve --model PATH --port N --auth disabled");
  p.add_option("config", "FILE", "config file: its model, engine, kv and coordinator sections");
  p.add_option("node", "NAME", "with --config: the local node whose config to use");
  p.add_option("model", "PATH", "GGUF model file (overrides model.path)", kDefaultModel);
  p.add_option("host", "HOST", "listen host (coordinator.listen; default 127.0.0.1)");
  p.add_option("port", "N", "listen port; 0 = any free port (default 8000)");
  p.add_option("auth", "MODE", "required (API keys from --api-keys) or disabled");
  p.add_option("api-keys", "FILE", "file with one API key per line (coordinator.api_keys_file)");
  p.add_option("policy", "P",
               "KV policy: dense, window, pod, h2o, snapkv, gate, gate+pod (default: kv.policy "
               "of --config, else dense)");
  p.add_option("threads", "N", "engine CPU threads; 0 = all cores");
  p.add_option("http-threads", "N", "HTTP I/O threads");
  if (Status s = p.parse(args); !s.ok()) {
    print_error(s.message());
    return 2;
  }
  if (p.help_requested()) {
    std::fputs(p.help().c_str(), stdout);
    return 0;
  }
  auto config = serve_config(p);
  if (!config.ok()) {
    print_error(config.status().message());
    return 2;
  }

  ShutdownSignals signals;  // before any thread starts

  auto backend = coordinator::LocalBackend::from_config(*config);
  if (!backend.ok()) {
    print_error(backend.status().message());
    return 1;
  }
  coordinator::HttpServerOptions options;
  options.config = config->coordinator;
  options.models.push_back((*backend)->served_model());
  auto server = coordinator::HttpServer::start(std::move(options), **backend);
  if (!server.ok()) {
    print_error(server.status().message());
    return 1;
  }
  std::printf("kvgate: serving %s at %s/v1 (auth %s)\n", (*backend)->served_model().name.c_str(),
              (*server)->url().c_str(),
              config->coordinator.auth == AuthMode::kDisabled ? "disabled" : "required");
  std::fflush(stdout);

  std::fprintf(stderr, "kvgate: %s, shutting down\n", signals.wait());
  (*server)->stop();       // no new requests; connections dropped
  (*backend)->shutdown();  // running and queued requests cancelled
  server->reset();
  return 0;
}

}  // namespace kvgate::cli
