// The declarative key table of the kvgate config (common/config.h) and the
// rules each role needs. Internal to common/config.cpp: one row per key
// with its dotted path, type, allowed range, help text and a setter/getter
// bound to the struct field. The parser in config.cpp looks keys up here and
// the printers walk it, so --print-defaults, the README reference and the
// parser cannot disagree. Nothing here knows YAML.
//
// Adding a key: a field with its default in a struct of config.h, one row in
// node_table() below, then regenerate configs/README.md's reference (as the
// README says). config_test checks that every row round-trips and sets only
// its own field.
#pragma once

#include <algorithm>
#include <cctype>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/config.h"

namespace kvgate::config_internal {

namespace fs = std::filesystem;
using std::chrono::milliseconds;

// ---------------------------------------------------------------- values

inline std::string quote(std::string_view s) {
  std::string out = "\"";
  for (unsigned char ch : s) {
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += static_cast<char>(ch);
    } else if (ch == '\n') {
      out += "\\n";
    } else if (ch == '\t') {
      out += "\\t";
    } else if (ch < 0x20 || ch == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", ch);
      out += buf;
    } else {
      out += static_cast<char>(ch);
    }
  }
  return out + "\"";
}

inline std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

inline bool is_digit(char c) {
  return c >= '0' && c <= '9';
}

inline std::optional<int64_t> to_int(std::string_view s) {
  int64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || p != s.data() + s.size()) return std::nullopt;
  return v;
}

inline std::optional<double> to_double(std::string_view s) {
  double v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || p != s.data() + s.size() || !std::isfinite(v)) {
    return std::nullopt;
  }
  return v;
}

inline std::string double_text(double v) {
  char buf[64];
  auto [p, ec] = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, p);
}

inline Result<int64_t> parse_integer(std::string_view s) {
  if (auto v = to_int(s)) return *v;
  return invalid_argument(quote(s) + " is not an integer");
}

inline Result<double> parse_number(std::string_view s) {
  if (auto v = to_double(s)) return *v;
  return invalid_argument(quote(s) + " is not a number");
}

inline std::string int_text(int64_t v) {
  return std::to_string(v);
}

inline size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

// " (did you mean X?)" for the closest candidate, or "".
// " (did you mean <prefix><closest candidate>?)", or "" when none is close.
inline std::string suggest(std::string_view name, const std::vector<std::string>& candidates,
                           const std::string& prefix = "") {
  std::string best;
  size_t best_d = std::max<size_t>(1, name.size() / 3) + 1;
  for (const auto& c : candidates) {
    size_t d = edit_distance(name, c);
    if (d < best_d) best_d = d, best = c;
  }
  return best.empty() ? "" : " (did you mean " + prefix + best + "?)";
}

inline std::string join(const std::vector<std::string>& items, std::string_view sep) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? std::string(sep) : "") + items[i];
  return out;
}

// Names [A-Za-z0-9._-]; hosts also ':' and '%' (IPv6, zone ids).
inline bool valid_chars(std::string_view s, bool host) {
  return std::all_of(s.begin(), s.end(), [&](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '_' ||
           (host && (c == ':' || c == '%'));
  });
}

inline const std::vector<std::string> kRoleNames = {"coordinator", "prefill", "decode"};
inline const std::vector<std::string> kBackendNames = {"cpu", "cuda"};
inline const std::vector<std::string> kIsaNames = {"auto", "scalar", "avx2", "avx512"};
inline const std::vector<std::string> kPolicyNames = {"dense",  "window", "pod",     "h2o",
                                                      "snapkv", "gate",   "gate+pod"};
inline const std::vector<std::string> kAuthNames = {"required", "disabled"};
inline const std::vector<std::string> kTransportNames = {"ucx", "loopback", "nccl"};
inline const std::vector<std::string> kUcxOpNames = {"auto", "tag", "put", "am"};
inline const std::vector<std::string> kLogLevelNames = {"trace", "debug", "info", "warn", "error"};
inline const std::vector<std::string> kLogFormatNames = {"text", "json"};

// ---------------------------------------------------------------- key table

struct Value {
  std::string scalar;
  std::vector<std::string> items;  // list-typed keys
};

template <class T>
struct Key {
  std::string path;  // "decode.pool_bytes"
  std::string type;
  std::string allowed;
  std::string help;
  bool is_list = false;
  bool secret = false;
  // Returns "" or what is wrong with the value.
  std::function<std::string(T&, const Value&, const std::string& base_dir)> set;
  std::function<std::string(const T&)> get;  // YAML text
};

template <class T>
class Table {
 public:
  std::vector<Key<T>> keys;

  const Key<T>* find(std::string_view path) const {
    for (const auto& k : keys) {
      if (k.path == path) return &k;
    }
    return nullptr;
  }

  // Integers, numbers, byte sizes and durations: parsed by `parse`, printed
  // by `show`, checked against [lo, hi].
  template <class S, class V>
  void ranged(const char* path, const char* type, S T::*sec, V S::*f, V lo, V hi,
              Result<V> (*parse)(std::string_view), std::string (*show)(V), const char* help) {
    add(
        path, type, show(lo) + ".." + show(hi), help,
        [=](T& t, const Value& v, const std::string&) -> std::string {
          Result<V> x = parse(v.scalar);
          if (!x.ok()) return x.status().message();
          if (*x < lo || *x > hi) {
            return quote(v.scalar) + " is out of range " + show(lo) + ".." + show(hi);
          }
          (t.*sec).*f = *x;
          return "";
        },
        [=](const T& t) { return show((t.*sec).*f); });
  }
  template <class S>
  void integer(const char* path, S T::*sec, int64_t S::*f, int64_t lo, int64_t hi,
               const char* help) {
    ranged<S, int64_t>(path, "integer", sec, f, lo, hi, parse_integer, int_text, help);
  }
  template <class S>
  void bytes(const char* path, S T::*sec, int64_t S::*f, int64_t lo, int64_t hi, const char* help) {
    ranged<S, int64_t>(path, "byte size", sec, f, lo, hi, parse_byte_size, format_byte_size, help);
  }
  template <class S>
  void duration(const char* path, S T::*sec, milliseconds S::*f, milliseconds lo, milliseconds hi,
                const char* help) {
    ranged<S, milliseconds>(path, "duration", sec, f, lo, hi, parse_duration, format_duration,
                            help);
  }
  template <class S>
  void real(const char* path, S T::*sec, double S::*f, double lo, double hi, const char* help) {
    ranged<S, double>(path, "number", sec, f, lo, hi, parse_number, double_text, help);
  }

  template <class S>
  void boolean(const char* path, S T::*sec, bool S::*f, const char* help) {
    add(
        path, "boolean", "true|false", help,
        [=](T& t, const Value& v, const std::string&) -> std::string {
          if (v.scalar == "true" || v.scalar == "True" || v.scalar == "TRUE") {
            (t.*sec).*f = true;
          } else if (v.scalar == "false" || v.scalar == "False" || v.scalar == "FALSE") {
            (t.*sec).*f = false;
          } else {
            return quote(v.scalar) + " is not a boolean (use true or false)";
          }
          return "";
        },
        [=](const T& t) { return std::string((t.*sec).*f ? "true" : "false"); });
  }

  template <class S, class E>
  void choice(const char* path, S T::*sec, E S::*f, const std::vector<std::string>& names,
              const char* help) {
    add(
        path, "enum", join(names, "|"), help,
        [=](T& t, const Value& v, const std::string&) -> std::string {
          for (size_t i = 0; i < names.size(); ++i) {
            if (names[i] == v.scalar) {
              (t.*sec).*f = static_cast<E>(i);
              return "";
            }
          }
          return quote(v.scalar) + " is not one of " + join(names, "|") + suggest(v.scalar, names);
        },
        [=](const T& t) { return names[static_cast<size_t>((t.*sec).*f)]; });
  }

  enum class Text { kAny, kName, kHost, kPath, kSecret };

  template <class S>
  void text(const char* path, S T::*sec, std::string S::*f, Text kind, const char* help) {
    const char* type = kind == Text::kPath ? "path" : "string";
    const char* allowed = kind == Text::kName ? "[A-Za-z0-9._-]" : "";
    add(
        path, type, allowed, help,
        [=](T& t, const Value& v, const std::string& base_dir) -> std::string {
          std::string s = v.scalar;
          if ((kind == Text::kName || kind == Text::kHost) &&
              !valid_chars(s, kind == Text::kHost)) {
            return quote(s) + " may hold only letters, digits, '.', '-' and '_'";
          }
          if (kind == Text::kSecret && s.find('\n') != std::string::npos) {
            return "must be one line";
          }
          if (kind == Text::kPath && !s.empty() && !base_dir.empty() && fs::path(s).is_relative()) {
            s = (fs::path(base_dir) / s).lexically_normal().string();
          }
          (t.*sec).*f = std::move(s);
          return "";
        },
        [=](const T& t) { return quote((t.*sec).*f); });
    keys.back().secret = kind == Text::kSecret;
  }

  template <class S>
  void list(const char* path, S T::*sec, std::vector<std::string> S::*f, const char* help) {
    add(
        path, "list of strings", "", help,
        [=](T& t, const Value& v, const std::string&) -> std::string {
          for (const auto& item : v.items) {
            if (item.empty() || !valid_chars(item, true)) {
              return quote(item) +
                     " is not a valid list item (letters, digits, '.', '-', '_', ':')";
            }
          }
          (t.*sec).*f = v.items;
          return "";
        },
        [=](const T& t) { return flow_list((t.*sec).*f, [](const std::string& s) { return s; }); });
    keys.back().is_list = true;
  }

  template <class S>
  void address(const char* path, S T::*sec, HostPort S::*f, const char* help) {
    add(
        path, "host:port", "port 0 = any free port", help,
        [=](T& t, const Value& v, const std::string&) -> std::string {
          auto hp = parse_host_port(v.scalar);
          if (!hp.ok()) return hp.status().message();
          (t.*sec).*f = *hp;
          return "";
        },
        [=](const T& t) { return quote(((t.*sec).*f).to_string()); });
  }

  template <class S>
  void addresses(const char* path, S T::*sec, std::vector<HostPort> S::*f, const char* help) {
    add(
        path, "list of host:port", "port 1..65535", help,
        [=](T& t, const Value& v, const std::string&) -> std::string {
          std::vector<HostPort> out;
          for (const auto& item : v.items) {
            auto hp = parse_host_port(item);
            if (!hp.ok()) return hp.status().message();
            if (hp->port == 0) return quote(item) + ": a peer's port cannot be 0";
            out.push_back(*hp);
          }
          (t.*sec).*f = std::move(out);
          return "";
        },
        [=](const T& t) {
          return flow_list((t.*sec).*f, [](const HostPort& hp) { return hp.to_string(); });
        });
    keys.back().is_list = true;
  }

 private:
  template <class Item, class Fn>
  static std::string flow_list(const std::vector<Item>& items, Fn to_text) {
    std::vector<std::string> quoted;
    for (const auto& item : items) quoted.push_back(quote(to_text(item)));
    return "[" + join(quoted, ", ") + "]";
  }

  void add(const char* path, std::string type, std::string allowed, const char* help,
           std::function<std::string(T&, const Value&, const std::string&)> set,
           std::function<std::string(const T&)> get) {
    keys.push_back(Key<T>{path, std::move(type), std::move(allowed), help, false, false,
                          std::move(set), std::move(get)});
  }
};

using N = NodeConfig;
using Txt = Table<N>::Text;

inline const Table<N>& node_table() {
  static const Table<N> table = [] {
    Table<N> t;
    using ms = milliseconds;
    constexpr int64_t kMiB = int64_t{1} << 20, kGiB = int64_t{1} << 30;
    t.text("model.path", &N::model, &ModelConfig::path, Txt::kPath,
           "GGUF model file (weights and tokenizer). Required by every role.");
    t.text("model.served_name", &N::model, &ModelConfig::served_name, Txt::kAny,
           "Model name in the API (/v1/models, the request's \"model\"); \"\" = the file name "
           "without .gguf.");
    t.integer("model.max_context_tokens", &N::model, &ModelConfig::max_context_tokens, 0, 1 << 24,
              "Longest prompt + completion accepted, in tokens; 0 = the model's own context.");
    t.choice("engine.backend", &N::engine, &EngineConfig::backend, kBackendNames,
             "Compute backend of prefill and decode nodes: cpu, or cuda (a build with "
             "-DKVGATE_CUDA=ON and a GPU; not run on a GPU yet, engine/cuda/README.md); "
             "serve runs cpu only.");
    t.integer("engine.threads", &N::engine, &EngineConfig::threads, 0, 4096,
              "CPU threads of the engine; 0 = all cores.");
    t.choice("engine.isa", &N::engine, &EngineConfig::isa, kIsaNames,
             "CPU kernel instruction set; auto = the best this CPU has, scalar = reference.");
    t.integer("engine.max_batch_tokens", &N::engine, &EngineConfig::max_batch_tokens, 1, 1 << 20,
              "Most tokens one forward step processes (prefill chunks and decode batch).");
    t.choice("kv.policy", &N::kv, &KvConfig::policy, kPolicyNames,
             "KV compression policy (DESIGN.md section 4). gate and gate+pod need the "
             "calibrated gate file.");
    t.integer("kv.sink_tokens", &N::kv, &KvConfig::sink_tokens, 0, 1 << 20,
              "First tokens of a sequence always kept in every layer (attention sinks).");
    t.integer("kv.window_tokens", &N::kv, &KvConfig::window_tokens, 1, 1 << 20,
              "Most recent tokens always kept in every layer.");
    t.integer("kv.pod_group_layers", &N::kv, &KvConfig::pod_group_layers, 1, 1024,
              "Layers per block sharing keys under pod without a calibrated layer grouping.");
    t.real("kv.keep_rate", &N::kv, &KvConfig::keep_rate, 0.0, 1.0,
           "Share of distant prompt tokens h2o and snapkv keep.");
    t.integer("kv.budget_tokens", &N::kv, &KvConfig::budget_tokens, 0, int64_t{1} << 30,
              "Budget mode: keep the best-scored distant tokens up to this many per (block, "
              "head), which makes the footprint exact before prefill; 0 = keep-rate mode.");
    t.integer("kv.snapkv_observe_tokens", &N::kv, &KvConfig::snapkv_observe_tokens, 1, 1 << 16,
              "Last prompt tokens whose attention ranks tokens under snapkv.");
    t.real("kv.gate_threshold_offset", &N::kv, &KvConfig::gate_threshold_offset, -1e6, 1e6,
           "gate, gate+pod: added to every calibrated gate threshold (logit units); higher "
           "keeps fewer tokens (more KV saving, lower quality), 0 = as calibrated.");
    t.text("kv.gate_file", &N::kv, &KvConfig::gate_file, Txt::kPath,
           "Calibrated gate side file; \"\" = the one next to the model.");
    t.address("coordinator.listen", &N::coordinator, &CoordinatorConfig::listen,
              "HTTP API address (OpenAI-compatible routes, /health, /metrics).");
    t.address("coordinator.control_listen", &N::coordinator, &CoordinatorConfig::control_listen,
              "Control-plane address where prefill and decode nodes register and heartbeat.");
    t.integer("coordinator.http_threads", &N::coordinator, &CoordinatorConfig::http_threads, 1, 256,
              "I/O threads serving HTTP.");
    t.choice("coordinator.auth", &N::coordinator, &CoordinatorConfig::auth, kAuthNames,
             "API keys on the HTTP API (Authorization: Bearer). Off only when set to disabled.");
    t.text("coordinator.api_keys_file", &N::coordinator, &CoordinatorConfig::api_keys_file,
           Txt::kPath, "File with one API key per line; required while auth is required.");
    t.bytes("coordinator.max_body_bytes", &N::coordinator, &CoordinatorConfig::max_body_bytes, 1024,
            kGiB, "Largest HTTP request body; larger requests are refused.");
    t.integer("coordinator.max_queued_requests", &N::coordinator,
              &CoordinatorConfig::max_queued_requests, 1, 1 << 20,
              "Requests waiting for placement; more get 429.");
    t.integer("coordinator.max_active_requests", &N::coordinator,
              &CoordinatorConfig::max_active_requests, 1, 1 << 20,
              "Requests placed and not finished; more wait in the queue.");
    t.duration("coordinator.placement_wait", &N::coordinator, &CoordinatorConfig::placement_wait,
               ms(0), ms(600000),
               "How long a request waits for a decode node with room for its predicted "
               "footprint before it gets 503.");
    t.duration("coordinator.request_timeout", &N::coordinator, &CoordinatorConfig::request_timeout,
               ms(1000), ms(86400000), "End-to-end limit of one request.");
    t.integer("coordinator.max_attempts", &N::coordinator, &CoordinatorConfig::max_attempts, 1, 16,
              "Placements tried per request (re-placement after a node or transfer fails).");
    t.integer("coordinator.default_max_tokens", &N::coordinator,
              &CoordinatorConfig::default_max_tokens, 1, 1 << 20,
              "Completion length when a request gives no max_tokens.");
    t.addresses("cluster.coordinators", &N::cluster, &PeerConfig::coordinators,
                "Control-plane addresses (coordinator.control_listen) that nodes register with.");
    t.choice("cluster.auth", &N::cluster, &PeerConfig::auth, kAuthNames,
             "Cluster-token authentication of every node-to-node connection. Off only when set "
             "to disabled.");
    t.text("cluster.token", &N::cluster, &PeerConfig::token, Txt::kSecret,
           "Shared cluster token (secret); prefer token_file. Set one of the two.");
    t.text("cluster.token_file", &N::cluster, &PeerConfig::token_file, Txt::kPath,
           "File whose first line is the cluster token.");
    t.text("cluster.node_name", &N::cluster, &PeerConfig::node_name, Txt::kName,
           "This node's name in logs and metric labels; \"\" = <role>-<host>-<port>.");
    t.text("cluster.advertise_host", &N::cluster, &PeerConfig::advertise_host, Txt::kHost,
           "Host peers use to reach this node; \"\" = the listen host.");
    t.duration("cluster.heartbeat_interval", &N::cluster, &PeerConfig::heartbeat_interval, ms(10),
               ms(60000), "How often nodes heartbeat to the coordinators.");
    t.duration("cluster.node_deadline", &N::cluster, &PeerConfig::node_deadline, ms(50), ms(600000),
               "A node silent this long is marked down; longer than heartbeat_interval.");
    t.duration("cluster.connect_timeout", &N::cluster, &PeerConfig::connect_timeout, ms(10),
               ms(300000), "Limit on opening a control-plane connection.");
    t.bytes("cluster.max_frame_bytes", &N::cluster, &PeerConfig::max_frame_bytes, 4096, kGiB,
            "Largest control-plane message; larger frames are rejected.");
    t.address("prefill.listen", &N::prefill, &PrefillConfig::listen,
              "Control-plane address of a prefill node (jobs from the coordinator).");
    t.integer("prefill.chunk_tokens", &N::prefill, &PrefillConfig::chunk_tokens, 16, 1 << 16,
              "Prompt tokens per prefill chunk; at most engine.max_batch_tokens.");
    t.integer("prefill.max_batch_jobs", &N::prefill, &PrefillConfig::max_batch_jobs, 1, 1024,
              "Queued prefill jobs run together in one pass (each weight read once per step for "
              "all); jobs whose policy ranks by attention statistics (h2o, snapkv) run alone.");
    t.integer("prefill.max_batch_tokens", &N::prefill, &PrefillConfig::max_batch_tokens, 16,
              int64_t{1} << 24,
              "Prompt tokens of one prefill batch together; a longer prompt runs alone.");
    t.integer("prefill.max_queued_jobs", &N::prefill, &PrefillConfig::max_queued_jobs, 1, 1 << 20,
              "Prefill jobs waiting on a node; more are refused (retryable).");
    t.integer("prefill.max_queued_tokens", &N::prefill, &PrefillConfig::max_queued_tokens, 1,
              int64_t{1} << 30, "Prompt tokens waiting on a node; more are refused (retryable).");
    t.address("decode.listen", &N::decode, &DecodeConfig::listen,
              "Control-plane address of a decode node (reservations, token stream).");
    t.bytes("decode.pool_bytes", &N::decode, &DecodeConfig::pool_bytes, kMiB, kGiB << 10,
            "KV page pool of a decode node, allocated and registered with the transport at "
            "start-up.");
    t.integer("decode.page_tokens", &N::decode, &DecodeConfig::page_tokens, 1, 4096,
              "Tokens per KV page.");
    t.integer("decode.max_batch_requests", &N::decode, &DecodeConfig::max_batch_requests, 1, 4096,
              "Sequences decoded together in one step.");
    t.duration("decode.lease_ttl", &N::decode, &DecodeConfig::lease_ttl, ms(100), ms(3600000),
               "A reservation not committed (KV arrived and verified) this long expires.");
    t.choice("transport.kind", &N::transport, &TransportConfig::kind, kTransportNames,
             "KV data plane: ucx (between processes), loopback (in-process tests), nccl (GPUs).");
    t.list("transport.ucx_tls", &N::transport, &TransportConfig::ucx_tls,
           "UCX transports (UCX_TLS), e.g. [tcp] or [posix, sysv]; [] = UCX's own choice.");
    t.list("transport.ucx_net_devices", &N::transport, &TransportConfig::ucx_net_devices,
           "UCX network devices (UCX_NET_DEVICES), e.g. [mlx5_0:1]; [] = all.");
    t.choice("transport.ucx_op", &N::transport, &TransportConfig::ucx_op, kUcxOpNames,
             "How KV is sent: tag or am (rendezvous into the pages), put (one-sided RMA); "
             "auto = the measured best for the transport.");
    t.duration("transport.transfer_deadline", &N::transport, &TransportConfig::transfer_deadline,
               ms(1), ms(3600000), "Limit on one KV transfer, counted from its start.");
    t.boolean("metrics.enabled", &N::metrics, &MetricsConfig::enabled, "Serve Prometheus metrics.");
    t.address("metrics.listen", &N::metrics, &MetricsConfig::listen,
              "/metrics address of prefill and decode nodes (the coordinator serves /metrics on "
              "coordinator.listen).");
    t.choice("logging.level", &N::logging, &LoggingConfig::level, kLogLevelNames,
             "Least severe level logged.");
    t.choice("logging.format", &N::logging, &LoggingConfig::format, kLogFormatNames,
             "One line per event: text or JSON.");
    return t;
  }();
  return table;
}

inline const Table<ClusterConfig>& local_table() {
  static const Table<ClusterConfig> table = [] {
    Table<ClusterConfig> t;
    using C = ClusterConfig;
    using L = LocalClusterConfig;
    t.duration("local.startup_timeout", &C::local, &L::startup_timeout, milliseconds(1000),
               milliseconds(3600000), "kvgate up: how long to wait for /health to return 200.");
    t.duration("local.shutdown_timeout", &C::local, &L::shutdown_timeout, milliseconds(100),
               milliseconds(300000),
               "kvgate up: how long processes get to exit after SIGTERM before SIGKILL.");
    return t;
  }();
  return table;
}

inline constexpr const char* kNodesHelp =
    "Processes kvgate up starts: each has a name, a role (coordinator|prefill|decode) and any "
    "top-level sections as overrides, e.g. decode: {listen: \"127.0.0.1:7201\"}. Ports must "
    "differ among nodes on one machine; a node with its own cluster.advertise_host runs "
    "elsewhere (`kvgate <role> --node NAME` on that host).";

inline std::vector<std::string> node_sections() {
  std::vector<std::string> out;
  for (const auto& k : node_table().keys) {
    std::string s = k.path.substr(0, k.path.find('.'));
    if (out.empty() || out.back() != s) out.push_back(s);
  }
  return out;
}

inline std::string section_of(const std::string& path) {
  return path.substr(0, path.find('.'));
}
inline std::string leaf_of(const std::string& path) {
  return path.substr(path.find('.') + 1);
}

// ---------------------------------------------------------------- role checks

struct BoundPort {
  std::string path;
  uint16_t port;
};

inline std::vector<BoundPort> bound_ports(const NodeConfig& c, Role role) {
  std::vector<BoundPort> out;
  if (role == Role::kCoordinator) {
    out.push_back({"coordinator.listen", c.coordinator.listen.port});
    out.push_back({"coordinator.control_listen", c.coordinator.control_listen.port});
  } else {
    if (role == Role::kPrefill) out.push_back({"prefill.listen", c.prefill.listen.port});
    if (role == Role::kDecode) out.push_back({"decode.listen", c.decode.listen.port});
    if (c.metrics.enabled) out.push_back({"metrics.listen", c.metrics.listen.port});
  }
  return out;
}

// "" or "<path>: <what is wrong>".
inline std::string role_problem(const NodeConfig& c, Role role) {
  const std::string r(role_name(role));
  if (c.model.path.empty()) {
    return "model.path: required by the " + r + " role (the GGUF model file)";
  }
  if (role == Role::kCoordinator && c.coordinator.auth == AuthMode::kRequired &&
      c.coordinator.api_keys_file.empty()) {
    return "coordinator.api_keys_file: required while coordinator.auth is required (or set "
           "coordinator.auth: disabled explicitly)";
  }
  if (c.cluster.auth == AuthMode::kRequired && c.cluster.token.empty() &&
      c.cluster.token_file.empty()) {
    return "cluster.token: a cluster.token or cluster.token_file is required while cluster.auth "
           "is required (or set cluster.auth: disabled explicitly)";
  }
  if (role != Role::kCoordinator) {
    if (c.cluster.coordinators.empty()) {
      return "cluster.coordinators: a " + r + " node needs a coordinator to register with";
    }
    if (c.transport.kind == TransportKind::kNccl && c.engine.backend != EngineBackend::kCuda) {
      return "transport.kind: nccl needs engine.backend: cuda";
    }
  }
  auto ports = bound_ports(c, role);
  for (size_t i = 0; i < ports.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (ports[i].port != 0 && ports[i].port == ports[j].port) {
        return ports[i].path + ": port " + std::to_string(ports[i].port) + " is also " +
               ports[j].path;
      }
    }
  }
  return "";
}

}  // namespace kvgate::config_internal
