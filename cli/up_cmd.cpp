// kvgate up FILE: starts the local cluster the config's `local.nodes`
// describes — each node its own process (this binary with `coordinator`,
// `prefill` or `decode`) — waits until the coordinator's /health answers
// 200, prints the URL, and on SIGINT/SIGTERM stops every process (SIGTERM,
// then SIGKILL after local.shutdown_timeout).
//
// The children run in their own process group, so a terminal's Ctrl-C
// reaches only this process, which then stops them in order (coordinator
// first, so no new request is placed on a node that is going away). Each
// child also gets SIGTERM if this process dies (PR_SET_PDEATHSIG). A child
// that exits on its own ends the cluster: the others are stopped and the
// exit code is 1, naming the node.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/http_client.h"
#include "common/config.h"

namespace kvgate::cli {

namespace {

using Clock = std::chrono::steady_clock;

struct Child {
  std::string name;
  Role role = Role::kCoordinator;
  pid_t pid = -1;
  bool exited = false;
  int status = 0;
};

std::string self_exe() {
  std::vector<char> buf(4096);
  const ssize_t n = readlink("/proc/self/exe", buf.data(), buf.size() - 1);
  if (n <= 0) return "kvgate";
  return std::string(buf.data(), static_cast<size_t>(n));
}

std::string describe_exit(int status) {
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return std::string("was killed by ") + strsignal(WTERMSIG(status));
  return "ended";
}

// Starts `exe <role> --config FILE --node NAME` in a new process group.
Result<pid_t> spawn(const std::string& exe, const std::string& config_path, const LocalNode& node,
                    const sigset_t& original_mask) {
  std::vector<std::string> argv_s = {exe, std::string(role_name(node.role)), "--config",
                                     config_path, "--node", node.name};
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) return internal_error(std::string("fork: ") + std::strerror(errno));
  if (pid == 0) {
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(1);  // the parent died before prctl
    sigprocmask(SIG_SETMASK, &original_mask, nullptr);
    std::vector<char*> argv;
    for (auto& a : argv_s) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(exe.c_str(), argv.data());
    std::fprintf(stderr, "kvgate up: exec %s: %s\n", exe.c_str(), std::strerror(errno));
    _exit(127);
  }
  setpgid(pid, pid);  // also from the parent: no race with the first signal
  return pid;
}

// The first API key of the coordinator's key file ("" with auth disabled).
Result<std::string> first_api_key(const CoordinatorConfig& c) {
  if (c.auth == AuthMode::kDisabled) return std::string();
  std::ifstream in(c.api_keys_file);
  if (!in) return not_found("coordinator.api_keys_file: cannot read " + c.api_keys_file);
  std::string line;
  while (std::getline(in, line)) {
    const size_t a = line.find_first_not_of(" \t\r");
    if (a == std::string::npos || line[a] == '#') continue;
    const size_t b = line.find_last_not_of(" \t\r");
    return line.substr(a, b - a + 1);
  }
  return not_found("coordinator.api_keys_file: no key in " + c.api_keys_file);
}

}  // namespace

int run_up(const std::vector<std::string>& args) {
  ArgParser p("kvgate up",
              "Starts the local cluster of a config file (its local.nodes: one coordinator,\n"
              "prefill and decode nodes), each node its own process; waits until /health\n"
              "answers 200, prints the URL, serves until SIGINT or SIGTERM, then stops them all.\n"
              "  kvgate up configs/local.yaml");
  p.add_positional("config", "the cluster's config file (e.g. configs/local.yaml)");
  p.add_option("request", "TEXT",
               "once the cluster is up, send this chat message through the API and print the "
               "answer");
  p.add_option("max-tokens", "N", "with --request: completion length", "64");
  p.add_flag("once", "stop the cluster after start-up (and --request) instead of serving");
  if (Status s = p.parse(args); !s.ok()) {
    print_error(s.message());
    return 2;
  }
  if (p.help_requested()) {
    std::fputs(p.help().c_str(), stdout);
    return 0;
  }
  const std::string config_path = p.positionals().at(0);
  auto file = load_config_file(config_path);
  if (!file.ok()) {
    print_error(file.status().message());
    return 2;
  }
  const LocalClusterConfig& local = file->local;
  if (local.nodes.empty()) {
    print_error("local.nodes: " + config_path +
                " lists no processes to start (see configs/local.yaml)");
    return 2;
  }
  // Every node's config is checked here, so a bad key fails before any start.
  const LocalNode* coordinator = nullptr;
  for (const auto& node : local.nodes) {
    auto checked = select_node(*file, node.role, node.name);
    if (!checked.ok()) {
      print_error(checked.status().message());
      return 2;
    }
    if (node.role == Role::kCoordinator) coordinator = &node;
  }
  auto max_tokens = p.get_int("max-tokens", 1, 1 << 20);
  if (!max_tokens.ok()) {
    print_error(max_tokens.status().message());
    return 2;
  }

  // Signals arrive only through sigtimedwait below; children get the
  // original mask back before exec.
  sigset_t wanted, original;
  sigemptyset(&wanted);
  sigaddset(&wanted, SIGINT);
  sigaddset(&wanted, SIGTERM);
  sigaddset(&wanted, SIGCHLD);
  sigprocmask(SIG_BLOCK, &wanted, &original);

  const std::string exe = self_exe();
  std::vector<Child> children;
  // Coordinator first: nodes register with it as they come up.
  std::vector<const LocalNode*> order;
  for (const auto& n : local.nodes) {
    if (n.role == Role::kCoordinator) order.push_back(&n);
  }
  for (const auto& n : local.nodes) {
    if (n.role != Role::kCoordinator) order.push_back(&n);
  }

  auto reap = [&]() -> const Child* {
    const Child* died = nullptr;
    for (auto& c : children) {
      if (c.exited) continue;
      int status = 0;
      if (waitpid(c.pid, &status, WNOHANG) == c.pid) {
        c.exited = true;
        c.status = status;
        if (died == nullptr) died = &c;
      }
    }
    return died;
  };
  auto stop_all = [&]() -> bool {
    // Coordinator first, then the nodes.
    for (auto& c : children) {
      if (!c.exited) kill(c.pid, SIGTERM);
    }
    const auto deadline = Clock::now() + local.shutdown_timeout;
    while (Clock::now() < deadline) {
      reap();
      bool all = true;
      for (const auto& c : children) all = all && c.exited;
      if (all) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    bool clean = true;
    for (auto& c : children) {
      if (!c.exited) {
        std::fprintf(stderr, "kvgate up: %s did not stop within %s; killing it\n", c.name.c_str(),
                     format_duration(local.shutdown_timeout).c_str());
        kill(c.pid, SIGKILL);
        waitpid(c.pid, &c.status, 0);
        c.exited = true;
        clean = false;
      } else if (!(WIFEXITED(c.status) && WEXITSTATUS(c.status) == 0)) {
        std::fprintf(stderr, "kvgate up: %s %s\n", c.name.c_str(), describe_exit(c.status).c_str());
        clean = false;
      }
    }
    return clean;
  };

  for (const LocalNode* n : order) {
    auto pid = spawn(exe, config_path, *n, original);
    if (!pid.ok()) {
      print_error(pid.status().message());
      stop_all();
      return 1;
    }
    children.push_back({n->name, n->role, *pid});
    std::fprintf(stderr, "kvgate up: started %s (%s, pid %d)\n", n->name.c_str(),
                 std::string(role_name(n->role)).c_str(), static_cast<int>(*pid));
  }

  const HostPort api{reachable_host(coordinator->config.coordinator.listen.host),
                     coordinator->config.coordinator.listen.port};
  const std::string url = "http://" + api.to_string();
  const auto startup_deadline = Clock::now() + local.startup_timeout;
  std::string last_health = "no answer yet";
  bool healthy = false;
  while (!healthy) {
    if (const Child* died = reap()) {
      print_error(died->name + " " + describe_exit(died->status) +
                  " during start-up (its log is above)");
      stop_all();
      return 1;
    }
    timespec tick{0, 200 * 1000 * 1000};
    const int sig = sigtimedwait(&wanted, nullptr, &tick);
    if (sig == SIGINT || sig == SIGTERM) {
      std::fprintf(stderr, "kvgate up: interrupted during start-up; stopping\n");
      stop_all();
      return 1;
    }
    auto r = http_exchange(api, http_request("GET", api, "/health"),
                           std::chrono::milliseconds(1000));
    if (r.ok() && r->status == 200) {
      healthy = true;
      break;
    }
    last_health = r.ok() ? "HTTP " + std::to_string(r->status) + " " + r->body
                         : r.status().message();
    if (Clock::now() > startup_deadline) {
      print_error("the cluster was not healthy within local.startup_timeout (" +
                  format_duration(local.startup_timeout) + "): /health: " + last_health);
      stop_all();
      return 1;
    }
  }
  std::printf("kvgate: cluster up at %s (OpenAI API: %s/v1, metrics: %s/metrics); Ctrl-C stops it\n",
              url.c_str(), url.c_str(), url.c_str());
  std::fflush(stdout);

  int rc = 0;
  if (p.has("request")) {
    auto key = first_api_key(coordinator->config.coordinator);
    if (!key.ok()) {
      print_error(key.status().message());
      stop_all();
      return 1;
    }
    nlohmann::json body = {
        {"model", served_model_name(coordinator->config.model)},
        {"messages", nlohmann::json::array({{{"role", "user"}, {"content", p.get("request")}}})},
        {"max_tokens", *max_tokens},
        {"temperature", 0}};
    const std::string payload = body.dump();
    const std::string req = http_request("POST", api, "/v1/chat/completions", *key, payload);
    const auto t0 = Clock::now();
    auto r = http_exchange(api, req, std::chrono::milliseconds(600000));
    const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    if (!r.ok()) {
      print_error("request: " + r.status().message());
      rc = 1;
    } else if (r->status != 200) {
      print_error("request: HTTP " + std::to_string(r->status) + ": " + r->body);
      rc = 1;
    } else {
      auto j = nlohmann::json::parse(r->body, nullptr, false);
      if (j.is_discarded() || !j.contains("choices") || j["choices"].empty()) {
        print_error("request: unexpected response: " + r->body);
        rc = 1;
      } else {
        std::printf("user: %s\nassistant: %s\n", p.get("request").c_str(),
                    j["choices"][0]["message"].value("content", "").c_str());
        if (j.contains("usage")) {
          std::printf("(%lld prompt + %lld completion tokens in %.2f s through %s)\n",
                      static_cast<long long>(j["usage"].value("prompt_tokens", 0)),
                      static_cast<long long>(j["usage"].value("completion_tokens", 0)), seconds,
                      url.c_str());
        }
      }
    }
    std::fflush(stdout);
  }

  if (!p.flag("once")) {
    while (true) {
      const int sig = sigwaitinfo(&wanted, nullptr);
      if (sig == SIGINT || sig == SIGTERM) {
        std::fprintf(stderr, "kvgate up: stopping the cluster\n");
        break;
      }
      if (const Child* died = reap()) {
        print_error(died->name + " " + describe_exit(died->status) + "; stopping the cluster");
        rc = 1;
        break;
      }
    }
  }
  if (!stop_all()) rc = 1;
  if (rc == 0) std::fprintf(stderr, "kvgate up: every process stopped cleanly\n");
  return rc;
}

}  // namespace kvgate::cli
