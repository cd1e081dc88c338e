// What the long-running subcommands (serve, coordinator, prefill, decode)
// share: the config of a role from --config/--node, and the SIGINT/SIGTERM
// that ends them.
#pragma once

#include <pthread.h>

#include <csignal>
#include <string>

#include "cli/args.h"
#include "common/config.h"
#include "common/status.h"

namespace kvgate::cli {

// The config `role` runs with: --config FILE (required) and its local node
// --node NAME (or the top-level sections). Errors name the option or key.
inline Result<NodeConfig> node_config_from_args(const ArgParser& p, Role role) {
  if (!p.has("config")) return invalid_argument("option '--config FILE' is required");
  auto file = load_config_file(p.get("config"));
  if (!file.ok()) return file.status();
  return select_node(*file, role, p.get("node"));
}

// Blocks SIGINT and SIGTERM in the constructing thread. Construct it before
// any other thread starts, so every thread inherits the mask and wait() is
// the only place those signals arrive.
class ShutdownSignals {
 public:
  ShutdownSignals() {
    sigemptyset(&set_);
    sigaddset(&set_, SIGINT);
    sigaddset(&set_, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set_, nullptr);
  }
  ShutdownSignals(const ShutdownSignals&) = delete;
  ShutdownSignals& operator=(const ShutdownSignals&) = delete;

  // Blocks until one arrives; returns "SIGINT" or "SIGTERM".
  const char* wait() {
    int sig = 0;
    sigwait(&set_, &sig);
    return sig == SIGINT ? "SIGINT" : "SIGTERM";
  }

 private:
  sigset_t set_;
};

}  // namespace kvgate::cli
