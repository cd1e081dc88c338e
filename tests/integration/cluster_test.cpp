// The disaggregated cluster as users run it: a coordinator, a prefill node
// and a decode node, each a real `kvgate` process, talking over TCP control
// connections and UCX (TCP transport) on 127.0.0.1.
//
// What is checked against an independent path: the completion served
// through the cluster equals `kvgate generate` of the same prompt and policy
// in one process (greedy), for dense and for a compressing policy — so the
// KV that crossed UCX, the wire image and the decode node's batching lose
// nothing. Faults: a decode node killed with SIGKILL is marked down
// (/health 503, requests 503) and a new one restores service.
//
// No sleeps: every wait is on a condition with a deadline.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <nlohmann/json.hpp>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "tests/unit/coordinator/http_test_client.h"

namespace {

using Clock = std::chrono::steady_clock;
using kvgate::coordinator::testing::http_call;
using kvgate::coordinator::testing::sse_payloads;
using nlohmann::json;

bool have_model() { return std::filesystem::exists(KVGATE_TEST_MODEL); }
std::string gate_file() {
  std::string m = KVGATE_TEST_MODEL;
  return m.substr(0, m.size() - 5) + ".gate.gguf";
}

// A free TCP port on 127.0.0.1 (bound then released; the cluster binds it
// moments later).
uint16_t free_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

struct Proc {
  pid_t pid = -1;
  int out_fd = -1;
  int err_fd = -1;
  std::string out, err;  // what was read so far
};

// Runs `program` (found on PATH) with `args`, stdout and stderr piped.
Proc spawn_program(const std::string& program, const std::vector<std::string>& args) {
  int out[2], err[2];
  if (pipe(out) != 0 || pipe(err) != 0) return {};
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(out[1], 1);
    dup2(err[1], 2);
    close(out[0]);
    close(err[0]);
    std::vector<std::string> copy = args;
    std::string prog = program;
    std::vector<char*> argv{prog.data()};
    for (auto& a : copy) argv.push_back(a.data());
    argv.push_back(nullptr);
    execvp(prog.c_str(), argv.data());
    _exit(127);
  }
  close(out[1]);
  close(err[1]);
  return {pid, out[0], err[0]};
}

Proc spawn(const std::vector<std::string>& args) { return spawn_program(KVGATE_BIN, args); }

// Reads the process's stdout and stderr until `pattern` matches `which`
// (stdout if true) or the deadline passes.
bool read_until(Proc& p, bool from_stdout, const std::regex& pattern,
                std::chrono::seconds timeout) {
  const auto deadline = Clock::now() + timeout;
  std::string& target = from_stdout ? p.out : p.err;
  while (!std::regex_search(target, pattern)) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) return false;
    pollfd fds[2] = {{p.out_fd, POLLIN, 0}, {p.err_fd, POLLIN, 0}};
    if (poll(fds, 2, static_cast<int>(left)) <= 0) return false;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].revents == 0) continue;
      char buf[4096];
      const ssize_t n = read(fds[i].fd, buf, sizeof buf);
      if (n > 0) (i == 0 ? p.out : p.err).append(buf, static_cast<size_t>(n));
      if (n == 0 && i == (from_stdout ? 0 : 1)) return std::regex_search(target, pattern);
    }
  }
  return true;
}

// Drains output and waits for the exit status (-1 after the deadline, then
// SIGKILL).
int wait_exit(Proc& p, std::chrono::seconds timeout) {
  const auto deadline = Clock::now() + timeout;
  while (true) {
    int status = 0;
    if (waitpid(p.pid, &status, WNOHANG) == p.pid) {
      read_until(p, true, std::regex("$^x"), std::chrono::seconds(0));
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    if (Clock::now() > deadline) {
      kill(p.pid, SIGKILL);
      waitpid(p.pid, nullptr, 0);
      return -1;
    }
    // Reading with a short poll keeps the pipes from filling up.
    pollfd fds[2] = {{p.out_fd, POLLIN, 0}, {p.err_fd, POLLIN, 0}};
    if (poll(fds, 2, 50) > 0) {
      for (int i = 0; i < 2; ++i) {
        if (fds[i].revents == 0) continue;
        char buf[4096];
        const ssize_t n = read(fds[i].fd, buf, sizeof buf);
        if (n > 0) (i == 0 ? p.out : p.err).append(buf, static_cast<size_t>(n));
      }
    }
  }
}

void close_fds(Proc& p) {
  if (p.out_fd >= 0) close(p.out_fd);
  if (p.err_fd >= 0) close(p.err_fd);
  p.out_fd = p.err_fd = -1;
}

// Ports and files of one test cluster.
struct ClusterFiles {
  uint16_t http = free_port(), control = free_port(), prefill = free_port(),
           decode = free_port(), prefill_metrics = free_port(), decode_metrics = free_port();
  std::string dir, config, keys;
  const std::string key = "sk-cluster-test-key";
};

ClusterFiles write_config(const std::string& policy, const std::string& name,
                          int window_tokens = 256) {
  ClusterFiles f;
  f.dir = testing::TempDir() + "kvgate_cluster_" + name + "_" + std::to_string(getpid());
  std::filesystem::create_directories(f.dir);
  f.keys = f.dir + "/api_keys";
  std::ofstream(f.keys) << "# test keys\n" << f.key << "\n";
  f.config = f.dir + "/cluster.yaml";
  std::ofstream y(f.config);
  y << "model:\n  path: " << KVGATE_TEST_MODEL << "\n  served_name: smol\n"
    << "engine:\n  threads: 1\n"
    << "kv:\n  policy: " << policy << "\n  window_tokens: " << window_tokens << "\n"
    << "coordinator:\n  listen: \"127.0.0.1:" << f.http << "\"\n"
    << "  control_listen: \"127.0.0.1:" << f.control << "\"\n"
    << "  api_keys_file: " << f.keys << "\n  placement_wait: 2s\n"
    << "cluster:\n  coordinators: [\"127.0.0.1:" << f.control << "\"]\n"
    << "  token: \"cluster-test-token\"\n  heartbeat_interval: 100ms\n  node_deadline: 1s\n"
    << "decode:\n  pool_bytes: 128MiB\n"
    << "transport:\n  kind: ucx\n  ucx_tls: [tcp]\n"
    << "local:\n  startup_timeout: 120s\n  nodes:\n"
    << "    - name: coordinator\n      role: coordinator\n"
    << "    - name: prefill-0\n      role: prefill\n"
    << "      prefill: {listen: \"127.0.0.1:" << f.prefill << "\"}\n"
    << "      metrics: {listen: \"127.0.0.1:" << f.prefill_metrics << "\"}\n"
    << "    - name: decode-0\n      role: decode\n"
    << "      decode: {listen: \"127.0.0.1:" << f.decode << "\"}\n"
    << "      metrics: {listen: \"127.0.0.1:" << f.decode_metrics << "\"}\n";
  return f;
}

bool wait_health(uint16_t port, int want, std::chrono::seconds timeout) {
  const auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    auto h = http_call(port, "GET", "/health");
    if (h && h->status == want) return true;
    // Poll interval for a remote condition (not a synchronisation sleep).
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return false;
}

std::vector<std::pair<std::string, std::string>> auth(const ClusterFiles& f) {
  return {{"Authorization", "Bearer " + f.key}};
}

const char* kPrompt = "Name three colours of the rainbow.";

// A prompt long enough that compressing policies evict (with a 64-token
// window): forty numbered facts and a question about one of them.
std::string long_prompt() {
  static const char* kColours[] = {"red", "green", "blue", "yellow", "violet", "orange", "white"};
  std::string s = "Here is a list of boxes and the colour of the ball in each.\n";
  for (int i = 1; i <= 40; ++i) {
    s += "Box " + std::to_string(i) + " holds a " + kColours[(i * 3) % 7] + " ball.\n";
  }
  return s + "Which colour is the ball in box 17?";
}

std::string chat_body(const std::string& prompt, int max_tokens, bool stream) {
  json b = {{"model", "smol"},
            {"messages", json::array({{{"role", "user"}, {"content", prompt}}})},
            {"max_tokens", max_tokens},
            {"temperature", 0}};
  if (stream) {
    b["stream"] = true;
    b["stream_options"] = {{"include_usage", true}};
  }
  return b.dump();
}

// `kvgate generate` of the same chat prompt in one process (no shell: the
// prompt is passed as one argument).
std::string local_generate(const std::string& prompt, const std::string& policy, int max_tokens,
                           int window_tokens, bool chat = true) {
  std::vector<std::string> args = {"generate", "--model", KVGATE_TEST_MODEL, "--prompt", prompt,
                                   "--max-tokens", std::to_string(max_tokens), "--threads", "1",
                                   "--json", "--policy", policy, "--n-window",
                                   std::to_string(window_tokens)};
  if (chat) args.push_back("--chat");
  Proc p = spawn(args);
  const int rc = wait_exit(p, std::chrono::seconds(300));
  close_fds(p);
  EXPECT_EQ(rc, 0) << p.err;
  auto j = json::parse(p.out, nullptr, false);
  if (j.is_discarded()) return "<bad json: " + p.out + ">";
  return j.value("text", "<no text>");
}

class ClusterProcesses {
 public:
  explicit ClusterProcesses(std::string config) : config_(std::move(config)) {}
  ~ClusterProcesses() {
    for (auto& [name, p] : procs_) {
      if (p.pid > 0) {
        kill(p.pid, SIGKILL);
        waitpid(p.pid, nullptr, 0);
      }
      close_fds(p);
    }
  }
  void start(const std::string& role, const std::string& node) {
    procs_[node] = spawn({role, "--config", config_, "--node", node});
  }
  Proc& proc(const std::string& node) { return procs_[node]; }
  int stop(const std::string& node) {
    Proc& p = procs_[node];
    kill(p.pid, SIGTERM);
    const int rc = wait_exit(p, std::chrono::seconds(30));
    close_fds(p);
    p.pid = -1;
    return rc;
  }
  void kill9(const std::string& node) {
    Proc& p = procs_[node];
    kill(p.pid, SIGKILL);
    waitpid(p.pid, nullptr, 0);
    close_fds(p);
    p.pid = -1;
  }
  std::string logs() {
    std::string all;
    for (auto& [name, p] : procs_) all += "--- " + name + " stderr:\n" + p.err + "\n";
    return all;
  }

 private:
  std::string config_;
  std::map<std::string, Proc> procs_;
};

// The official openai Python client (scripts/fetch-test-deps.sh installs it
// into .pydeps/) against the cluster: completions and chat, streaming and
// not, compared with `kvgate generate` (tests/integration/openai_client.py).
void expect_openai_client_works(const ClusterFiles& f) {
  const std::string deps = std::string(KVGATE_SOURCE_DIR) + "/.pydeps";
  if (!std::filesystem::exists(deps + "/openai")) {
    ADD_FAILURE() << "the openai client is not installed: run scripts/fetch-test-deps.sh";
    return;
  }
  json expected = {{"chat", local_generate("Name three colours of the rainbow.", "dense", 12, 256)},
                   {"completion", local_generate("The capital of France is", "dense", 12, 256,
                                                 /*chat=*/false)}};
  setenv("PYTHONPATH", deps.c_str(), 1);
  Proc py = spawn_program("python3", {std::string(KVGATE_SOURCE_DIR) +
                                          "/tests/integration/openai_client.py",
                                      "http://127.0.0.1:" + std::to_string(f.http) + "/v1", f.key,
                                      "smol", expected.dump()});
  const int rc = wait_exit(py, std::chrono::seconds(300));
  close_fds(py);
  EXPECT_EQ(rc, 0) << py.out << py.err;
  EXPECT_NE(py.out.find("every check passed"), std::string::npos) << py.out << py.err;
}

// Serves a chat completion through the cluster and compares it with the
// single-process engine, non-streaming and streaming.
void expect_cluster_equals_local(const std::string& policy, const std::string& prompt,
                                 int window_tokens) {
  ClusterFiles f =
      write_config(policy, policy == "gate+pod" ? "gatepod" : policy, window_tokens);
  ClusterProcesses c(f.config);
  c.start("coordinator", "coordinator");
  c.start("prefill", "prefill-0");
  c.start("decode", "decode-0");
  ASSERT_TRUE(wait_health(f.http, 200, std::chrono::seconds(120))) << c.logs();

  const int max_tokens = 24;
  const std::string expected = local_generate(prompt, policy, max_tokens, window_tokens);

  auto no_key = http_call(f.http, "POST", "/v1/chat/completions", chat_body(prompt, max_tokens, false));
  ASSERT_TRUE(no_key);
  EXPECT_EQ(no_key->status, 401);

  auto r = http_call(f.http, "POST", "/v1/chat/completions", chat_body(prompt, max_tokens, false), auth(f));
  ASSERT_TRUE(r) << c.logs();
  ASSERT_EQ(r->status, 200) << r->body << c.logs();
  auto j = json::parse(r->body);
  EXPECT_EQ(j["choices"][0]["message"]["content"].get<std::string>(), expected) << policy;
  EXPECT_GT(j["usage"]["prompt_tokens"].get<int>(), 10);
  EXPECT_LE(j["usage"]["completion_tokens"].get<int>(), max_tokens);

  auto s = http_call(f.http, "POST", "/v1/chat/completions", chat_body(prompt, max_tokens, true), auth(f));
  ASSERT_TRUE(s);
  ASSERT_EQ(s->status, 200) << s->body;
  const auto events = sse_payloads(s->body);
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back(), "[DONE]");
  std::string streamed;
  bool saw_usage = false;
  for (const auto& e : events) {
    if (e == "[DONE]") continue;
    auto ev = json::parse(e);
    if (!ev["choices"].empty()) {
      streamed += ev["choices"][0]["delta"].value("content", "");
    }
    if (ev.contains("usage") && !ev["usage"].is_null()) saw_usage = true;
  }
  EXPECT_EQ(streamed, expected);
  EXPECT_TRUE(saw_usage);

  // Every role exposes its metrics; the decode node's pool is back to free.
  auto cm = http_call(f.http, "GET", "/metrics");
  ASSERT_TRUE(cm);
  EXPECT_NE(cm->body.find("kvgate_coordinator_"), std::string::npos);
  auto dm = http_call(f.decode_metrics, "GET", "/metrics");
  ASSERT_TRUE(dm);
  EXPECT_NE(dm->body.find("kvgate_decode_"), std::string::npos);
  auto pm = http_call(f.prefill_metrics, "GET", "/metrics");
  ASSERT_TRUE(pm);
  EXPECT_NE(pm->body.find("kvgate_prefill_"), std::string::npos);

  // Sampling with a seed and a repetition penalty: the decode node continues
  // the prefill node's random stream and sees the prompt's tail, so the text
  // is the single-process engine's too.
  if (policy == "dense") {
    json b = {{"model", "smol"},
              {"messages", json::array({{{"role", "user"}, {"content", prompt}}})},
              {"max_tokens", max_tokens},
              {"temperature", 0.9},
              {"top_k", 40},
              {"seed", 7},
              {"repetition_penalty", 1.3}};
    auto sampled = http_call(f.http, "POST", "/v1/chat/completions", b.dump(), auth(f));
    ASSERT_TRUE(sampled);
    ASSERT_EQ(sampled->status, 200) << sampled->body;
    Proc g = spawn({"generate", "--model", KVGATE_TEST_MODEL, "--chat", "--prompt", prompt,
                    "--max-tokens", std::to_string(max_tokens), "--threads", "1", "--json",
                    "--policy", "dense", "--temperature", "0.9", "--top-k", "40", "--seed", "7",
                    "--repeat-penalty", "1.3"});
    ASSERT_EQ(wait_exit(g, std::chrono::seconds(300)), 0) << g.err;
    close_fds(g);
    EXPECT_EQ(json::parse(sampled->body)["choices"][0]["message"]["content"].get<std::string>(),
              json::parse(g.out).value("text", "<none>"));
  }

  // The operator's dashboard and alerts (deploy/) query only metrics the
  // cluster really exports.
  for (const char* file : {"/deploy/grafana/kvgate-cluster.json", "/deploy/prometheus/kvgate-alerts.yml"}) {
    std::ifstream in(std::string(KVGATE_SOURCE_DIR) + file);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    ASSERT_FALSE(text.empty()) << file;
    const std::regex name_re("kvgate_[a-z_]+");
    int names = 0;
    for (std::sregex_iterator it(text.begin(), text.end(), name_re), end; it != end; ++it) {
      std::string name = it->str();
      for (const char* suffix : {"_bucket", "_sum", "_count"}) {
        const std::string sfx = suffix;
        if (name.size() > sfx.size() && name.compare(name.size() - sfx.size(), sfx.size(), sfx) == 0) {
          name.resize(name.size() - sfx.size());
        }
      }
      ++names;
      const std::string line = "# TYPE " + name + " ";
      EXPECT_TRUE(cm->body.find(line) != std::string::npos || dm->body.find(line) != std::string::npos ||
                  pm->body.find(line) != std::string::npos)
          << file << " queries " << name << ", which no role exports";
    }
    EXPECT_GT(names, 5) << file;
  }

  if (policy == "dense") expect_openai_client_works(f);

  EXPECT_EQ(c.stop("coordinator"), 0) << c.logs();
  EXPECT_EQ(c.stop("prefill-0"), 0) << c.logs();
  EXPECT_EQ(c.stop("decode-0"), 0) << c.logs();
}

TEST(Cluster, DenseCompletionEqualsTheSingleProcessEngine) {
  if (!have_model()) GTEST_SKIP() << "model not found";
  expect_cluster_equals_local("dense", kPrompt, 256);
}

TEST(Cluster, CompressedCompletionEqualsTheSingleProcessEngine) {
  if (!have_model()) GTEST_SKIP() << "model not found";
  // The calibrated policy when set-up made the gate file; otherwise a
  // policy that evicts without one.
  expect_cluster_equals_local(std::filesystem::exists(gate_file()) ? "gate+pod" : "h2o",
                              long_prompt(), 64);
}

TEST(Cluster, KilledDecodeNodeIsMarkedDownAndReplacementRestoresService) {
  if (!have_model()) GTEST_SKIP() << "model not found";
  ClusterFiles f = write_config("dense", "kill");
  ClusterProcesses c(f.config);
  c.start("coordinator", "coordinator");
  c.start("prefill", "prefill-0");
  c.start("decode", "decode-0");
  ASSERT_TRUE(wait_health(f.http, 200, std::chrono::seconds(120))) << c.logs();

  c.kill9("decode-0");
  ASSERT_TRUE(wait_health(f.http, 503, std::chrono::seconds(20))) << c.logs();
  auto r = http_call(f.http, "POST", "/v1/chat/completions", chat_body(kPrompt, 4, false), auth(f));
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 503) << r->body;
  EXPECT_NE(r->body.find("\"error\""), std::string::npos);

  c.start("decode", "decode-0");
  ASSERT_TRUE(wait_health(f.http, 200, std::chrono::seconds(120))) << c.logs();
  auto ok = http_call(f.http, "POST", "/v1/chat/completions", chat_body(kPrompt, 4, false), auth(f));
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200) << ok->body << c.logs();
}

TEST(Cluster, UpStartsEveryProcessAnswersAndStopsCleanly) {
  if (!have_model()) GTEST_SKIP() << "model not found";
  ClusterFiles f = write_config("dense", "up");
  Proc up = spawn({"up", f.config, "--request", kPrompt, "--max-tokens", "8", "--once"});
  ASSERT_GT(up.pid, 0);
  const int rc = wait_exit(up, std::chrono::seconds(180));
  close_fds(up);
  EXPECT_EQ(rc, 0) << up.out << up.err;
  EXPECT_NE(up.out.find("cluster up at http://127.0.0.1:" + std::to_string(f.http)),
            std::string::npos)
      << up.out;
  EXPECT_NE(up.out.find("assistant: "), std::string::npos) << up.out;
  EXPECT_NE(up.err.find("every process stopped cleanly"), std::string::npos) << up.err;
}

// ------------------------------------------------- faults mid-request

// A cluster of one coordinator, two prefill and two decode nodes.
struct MultiFiles {
  uint16_t http = free_port(), control = free_port();
  uint16_t prefill[2] = {free_port(), free_port()}, prefill_metrics[2] = {free_port(), free_port()};
  uint16_t decode[2] = {free_port(), free_port()}, decode_metrics[2] = {free_port(), free_port()};
  std::string dir, config, key = "sk-multi";
};

MultiFiles write_multi_config(const std::string& name) {
  MultiFiles f;
  f.dir = testing::TempDir() + "kvgate_cluster_" + name + "_" + std::to_string(getpid());
  std::filesystem::create_directories(f.dir);
  std::ofstream(f.dir + "/keys") << f.key << "\n";
  f.config = f.dir + "/cluster.yaml";
  std::ofstream y(f.config);
  y << "model:\n  path: " << KVGATE_TEST_MODEL << "\n  served_name: smol\n"
    << "engine:\n  threads: 1\n"
    << "kv:\n  policy: dense\n"
    << "coordinator:\n  listen: \"127.0.0.1:" << f.http << "\"\n"
    << "  control_listen: \"127.0.0.1:" << f.control << "\"\n"
    << "  api_keys_file: " << f.dir << "/keys\n  placement_wait: 5s\n  max_attempts: 3\n"
    << "cluster:\n  coordinators: [\"127.0.0.1:" << f.control << "\"]\n"
    << "  token: \"cluster-test-token\"\n  heartbeat_interval: 100ms\n  node_deadline: 1s\n"
    << "decode:\n  pool_bytes: 256MiB\n"
    << "transport:\n  kind: ucx\n  ucx_tls: [tcp]\n"
    << "local:\n  nodes:\n    - name: coordinator\n      role: coordinator\n";
  for (int i = 0; i < 2; ++i) {
    y << "    - name: prefill-" << i << "\n      role: prefill\n"
      << "      prefill: {listen: \"127.0.0.1:" << f.prefill[i] << "\"}\n"
      << "      metrics: {listen: \"127.0.0.1:" << f.prefill_metrics[i] << "\"}\n"
      << "    - name: decode-" << i << "\n      role: decode\n"
      << "      decode: {listen: \"127.0.0.1:" << f.decode[i] << "\"}\n"
      << "      metrics: {listen: \"127.0.0.1:" << f.decode_metrics[i] << "\"}\n";
  }
  return f;
}

// The value of a Prometheus sample (its constant labels, if any, ignored), or -1.
double metric(uint16_t port, const std::string& name) {
  auto r = http_call(port, "GET", "/metrics");
  if (!r || r->status != 200) return -1;
  const std::regex re("(^|\n)" + name + "(\\{[^}]*\\})? ([0-9.e+-]+)");
  std::smatch m;
  if (!std::regex_search(r->body, m, re)) return -1;
  return std::stod(m[3]);
}

// True once every decode node's pool is entirely free (no lease leaked).
bool pools_free(const MultiFiles& f, std::initializer_list<int> nodes,
                std::chrono::seconds timeout) {
  const auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    bool all = true;
    for (int i : nodes) {
      const double cap = metric(f.decode_metrics[i], "kvgate_decode_pool_capacity_bytes");
      const double free = metric(f.decode_metrics[i], "kvgate_decode_pool_free_bytes");
      all = all && cap > 0 && free == cap;
    }
    if (all) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // poll interval
  }
  return false;
}

std::string completion_body(const std::string& prompt, int max_tokens, bool stream) {
  json b = {{"model", "smol"}, {"prompt", prompt}, {"max_tokens", max_tokens}, {"temperature", 0}};
  if (stream) {
    b["stream"] = true;
    b["ignore_eos"] = true;
  }
  return b.dump();
}

class MultiCluster : public ClusterProcesses {
 public:
  explicit MultiCluster(const MultiFiles& m) : ClusterProcesses(m.config), m_(m) {}
  void start_all() {
    start("coordinator", "coordinator");
    for (int i = 0; i < 2; ++i) {
      start("prefill", "prefill-" + std::to_string(i));
      start("decode", "decode-" + std::to_string(i));
    }
  }
  // Ready once the coordinator is healthy and every node answers /metrics
  // (health needs only one node of each role).
  bool ready(std::chrono::seconds timeout) {
    const auto deadline = Clock::now() + timeout;
    while (Clock::now() < deadline) {
      bool all = wait_health(m_.http, 200, std::chrono::seconds(1));
      for (int i = 0; i < 2 && all; ++i) {
        all = metric(m_.decode_metrics[i], "kvgate_decode_pool_capacity_bytes") > 0 &&
              metric(m_.prefill_metrics[i], "kvgate_prefill_jobs_started_total") >= 0;
      }
      if (all) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));  // poll interval
    }
    return false;
  }

 private:
  const MultiFiles& m_;
};

TEST(ClusterFaults, DecodeNodeKilledMidStreamFailsCleanlyAndLeavesNothingBehind) {
  if (!have_model()) GTEST_SKIP() << "model not found";
  MultiFiles f = write_multi_config("killdecode");
  MultiCluster c(f);
  c.start_all();
  ASSERT_TRUE(c.ready(std::chrono::seconds(120))) << c.logs();

  // A long streamed completion; once tokens flow, kill the decode node that
  // holds it.
  kvgate::coordinator::testing::HttpTestClient stream(f.http, std::chrono::seconds(60));
  ASSERT_TRUE(stream.connected());
  ASSERT_TRUE(stream.send_all(kvgate::coordinator::testing::HttpTestClient::request(
      "POST", "/v1/completions", completion_body("Once upon a time", 2000, true),
      {{"Authorization", "Bearer " + f.key}})));
  const std::string first = stream.read_until("\"text\"");
  ASSERT_NE(first.find("\"text\""), std::string::npos) << first << c.logs();
  // The pool gauges follow within a heartbeat interval.
  int victim = -1;
  const auto find_deadline = Clock::now() + std::chrono::seconds(10);
  while (victim < 0 && Clock::now() < find_deadline) {
    for (int i = 0; i < 2; ++i) {
      if (metric(f.decode_metrics[i], "kvgate_decode_pool_used_bytes") > 0) victim = i;
    }
    if (victim < 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));  // poll interval
  }
  ASSERT_GE(victim, 0) << "no decode node holds the request";
  c.kill9("decode-" + std::to_string(victim));

  // The stream ends with an error event naming the lost node, not with
  // [DONE] as if it had finished.
  const std::string rest = stream.read_until("data: [DONE]");
  EXPECT_TRUE(stream.wait_closed());
  EXPECT_NE(rest.find("\"error\""), std::string::npos) << rest.substr(rest.size() > 2000 ? rest.size() - 2000 : 0);

  // The coordinator stays up and serves on the surviving decode node, with
  // correct output, and that node's pool is entirely free afterwards.
  const int survivor = 1 - victim;
  auto ok = http_call(f.http, "POST", "/v1/completions",
                      completion_body("The capital of France is", 12, false),
                      {{"Authorization", "Bearer " + f.key}});
  ASSERT_TRUE(ok);
  ASSERT_EQ(ok->status, 200) << ok->body << c.logs();
  EXPECT_EQ(json::parse(ok->body)["choices"][0]["text"].get<std::string>(),
            local_generate("The capital of France is", "dense", 12, 256, /*chat=*/false));
  EXPECT_TRUE(pools_free(f, {survivor}, std::chrono::seconds(10))) << c.logs();
}

TEST(ClusterFaults, PrefillNodeKilledMidJobIsReplacedAndTheAnswerIsRight) {
  if (!have_model()) GTEST_SKIP() << "model not found";
  MultiFiles f = write_multi_config("killprefill");
  MultiCluster c(f);
  c.start_all();
  ASSERT_TRUE(c.ready(std::chrono::seconds(120))) << c.logs();

  // A prompt long enough that its prefill takes seconds on one core.
  std::string prompt = "Remember these notes.\n";
  for (int i = 0; i < 70; ++i) {
    prompt += "Note " + std::to_string(i) + ": the lantern by the gate was lit at dusk.\n";
  }
  prompt += "What was lit at dusk?";
  std::optional<kvgate::coordinator::testing::HttpResponse> answer;
  std::thread client([&] {
    kvgate::coordinator::testing::HttpTestClient cl(f.http, std::chrono::seconds(300));
    if (cl.connected() &&
        cl.send_all(kvgate::coordinator::testing::HttpTestClient::request(
            "POST", "/v1/completions", completion_body(prompt, 8, false),
            {{"Authorization", "Bearer " + f.key}}))) {
      answer = cl.read_response();
    }
  });
  // Kill the prefill node once it has started the job (and before it ends:
  // the job takes seconds, the check below a few milliseconds).
  int victim = -1;
  const auto deadline = Clock::now() + std::chrono::seconds(60);
  while (victim < 0 && Clock::now() < deadline) {
    for (int i = 0; i < 2; ++i) {
      if (metric(f.prefill_metrics[i], "kvgate_prefill_jobs_started_total") > 0 &&
          metric(f.prefill_metrics[i], "kvgate_prefill_jobs_done_total") <= 0) {
        victim = i;
      }
    }
    if (victim < 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));  // poll interval
  }
  ASSERT_GE(victim, 0) << c.logs();
  c.kill9("prefill-" + std::to_string(victim));
  client.join();

  // Re-placed on the other prefill node: the right answer, no error.
  ASSERT_TRUE(answer) << c.logs();
  ASSERT_EQ(answer->status, 200) << answer->body << c.logs();
  EXPECT_EQ(json::parse(answer->body)["choices"][0]["text"].get<std::string>(),
            local_generate(prompt, "dense", 8, 256, /*chat=*/false));
  // The lease of the failed attempt was released: every decode pool is free.
  EXPECT_TRUE(pools_free(f, {0, 1}, std::chrono::seconds(10))) << c.logs();
}

}  // namespace
