// Configuration: one YAML schema for every role (coordinator, prefill node,
// decode node) and for the local cluster `kvgate up` starts (DESIGN.md §8).
//
// The file is parsed once into the plain structs below; after that they are
// read-only (pass them by const reference; constructors take the section
// they need). The defaults are the member initializers here;
// common/config_schema.h holds the key table (path, type, range, help) that
// parses, validates and prints them, so `kvgate config --print-defaults` and
// configs/README.md come from one place.
//
// Error contract (NIXL habit): a missing key takes its default; a present but
// invalid value, an unknown key or a YAML syntax error is INVALID_ARGUMENT
// whose message names the file, line, column and key path, e.g.
//   config: local.yaml:7:17: decode.pool_bytes: "12XB" is not a byte size (use e.g. 512MiB)
// Nothing here reads any file other than the config itself, blocks on the
// network, or throws.
//
// Relative paths in a file resolve against the directory of that file.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace kvgate {

// An address "host:port" (IPv6 hosts in brackets: "[::1]:7000").
struct HostPort {
  std::string host;
  uint16_t port = 0;

  std::string to_string() const;
  bool operator==(const HostPort&) const = default;
};

enum class Role { kCoordinator, kPrefill, kDecode };
enum class EngineBackend { kCpu, kCuda };
enum class IsaChoice { kAuto, kScalar, kAvx2, kAvx512 };
// Names as engine::parse_kv_policy spells them (kv_policy_config_name).
enum class KvPolicyChoice { kDense, kWindow, kPod, kH2o, kSnapKv, kGate, kGatePod };
enum class AuthMode { kRequired, kDisabled };
enum class TransportKind { kUcx, kLoopback, kNccl };
enum class UcxOp { kAuto, kTag, kPut, kAm };
enum class LogLevel { kTrace, kDebug, kInfo, kWarn, kError };
enum class LogFormat { kText, kJson };

std::string_view role_name(Role role);
Result<Role> parse_role(std::string_view name);
// "dense", "window", "pod", "h2o", "snapkv", "gate", "gate+pod".
std::string_view kv_policy_config_name(KvPolicyChoice policy);

struct ModelConfig {
  std::string path;                // GGUF file; required by every role
  std::string served_name;         // model name in the API; "" = file name without .gguf
  int64_t max_context_tokens = 0;  // 0 = the model's own context length
  bool operator==(const ModelConfig&) const = default;
};

struct EngineConfig {
  EngineBackend backend = EngineBackend::kCpu;
  int64_t threads = 0;  // 0 = all cores
  IsaChoice isa = IsaChoice::kAuto;
  int64_t max_batch_tokens = 2048;
  bool operator==(const EngineConfig&) const = default;
};

struct KvConfig {
  KvPolicyChoice policy = KvPolicyChoice::kGatePod;
  int64_t sink_tokens = 4;
  int64_t window_tokens = 256;
  int64_t pod_group_layers = 2;
  double keep_rate = 0.3;
  int64_t budget_tokens = 0;  // 0 = keep-rate mode
  int64_t snapkv_observe_tokens = 32;
  double gate_threshold_offset = 0.0;  // gate, gate+pod: added to every calibrated threshold
  std::string gate_file;  // "" = the side file next to the model
  bool operator==(const KvConfig&) const = default;
};

struct CoordinatorConfig {
  HostPort listen{"127.0.0.1", 8000};          // HTTP API (and /metrics)
  HostPort control_listen{"127.0.0.1", 7000};  // nodes register here
  int64_t http_threads = 2;
  AuthMode auth = AuthMode::kRequired;
  std::string api_keys_file;
  int64_t max_body_bytes = 8 << 20;
  int64_t max_queued_requests = 256;
  int64_t max_active_requests = 1024;
  std::chrono::milliseconds placement_wait{5000};
  std::chrono::milliseconds request_timeout{600000};
  int64_t max_attempts = 3;
  int64_t default_max_tokens = 256;
  bool operator==(const CoordinatorConfig&) const = default;
};

// The `cluster` section: how a process finds and authenticates its peers.
struct PeerConfig {
  std::vector<HostPort> coordinators{{"127.0.0.1", 7000}};
  AuthMode auth = AuthMode::kRequired;
  std::string token;           // secret; prefer token_file
  std::string token_file;      // file whose first line is the token
  std::string node_name;       // "" = <role>-<host>-<port>
  std::string advertise_host;  // "" = the listen host
  std::chrono::milliseconds heartbeat_interval{1000};
  std::chrono::milliseconds node_deadline{5000};
  std::chrono::milliseconds connect_timeout{2000};
  int64_t max_frame_bytes = 16 << 20;
  bool operator==(const PeerConfig&) const = default;
};

struct PrefillConfig {
  HostPort listen{"127.0.0.1", 7100};
  int64_t chunk_tokens = 512;
  int64_t max_batch_jobs = 8;        // prefill jobs run together in one layer-major pass
  int64_t max_batch_tokens = 16384;  // their prompt tokens together
  int64_t max_queued_jobs = 64;
  int64_t max_queued_tokens = 1 << 20;
  bool operator==(const PrefillConfig&) const = default;
};

struct DecodeConfig {
  HostPort listen{"127.0.0.1", 7200};
  int64_t pool_bytes = int64_t{1} << 30;
  int64_t page_tokens = 16;
  int64_t max_batch_requests = 64;
  std::chrono::milliseconds lease_ttl{30000};
  bool operator==(const DecodeConfig&) const = default;
};

struct TransportConfig {
  TransportKind kind = TransportKind::kUcx;
  std::vector<std::string> ucx_tls;          // empty = UCX's own choice
  std::vector<std::string> ucx_net_devices;  // empty = all
  UcxOp ucx_op = UcxOp::kAuto;
  std::chrono::milliseconds transfer_deadline{10000};
  bool operator==(const TransportConfig&) const = default;
};

struct MetricsConfig {
  bool enabled = true;
  HostPort listen{"127.0.0.1", 9100};  // prefill and decode nodes
  bool operator==(const MetricsConfig&) const = default;
};

struct LoggingConfig {
  LogLevel level = LogLevel::kInfo;
  LogFormat format = LogFormat::kText;
  bool operator==(const LoggingConfig&) const = default;
};

// Everything one process reads. Default-constructed = the documented defaults.
struct NodeConfig {
  ModelConfig model;
  EngineConfig engine;
  KvConfig kv;
  CoordinatorConfig coordinator;
  PeerConfig cluster;
  PrefillConfig prefill;
  DecodeConfig decode;
  TransportConfig transport;
  MetricsConfig metrics;
  LoggingConfig logging;
  bool operator==(const NodeConfig&) const = default;
};

// One process of the local cluster: the top-level sections with this node's
// overrides applied; config.cluster.node_name == name.
struct LocalNode {
  std::string name;
  Role role = Role::kCoordinator;
  NodeConfig config;
  bool operator==(const LocalNode&) const = default;
};

struct LocalClusterConfig {
  std::chrono::milliseconds startup_timeout{120000};
  std::chrono::milliseconds shutdown_timeout{10000};
  // Empty, or exactly one coordinator and at least one prefill and one
  // decode node, with distinct ports (checked by the parser).
  std::vector<LocalNode> nodes;
  bool operator==(const LocalClusterConfig&) const = default;
};

// The model name the API serves: model.served_name, or the file name of
// model.path without its .gguf extension.
std::string served_model_name(const ModelConfig& model);

// A whole config file.
struct ClusterConfig {
  NodeConfig base;  // the top-level sections
  LocalClusterConfig local;
  bool operator==(const ClusterConfig&) const = default;
};

struct ParseOptions {
  std::string source_name = "<config>";  // appears in error messages
  std::string base_dir;                  // relative paths resolve against it; "" = leave relative
};

// Parses one YAML document. Never throws.
Result<ClusterConfig> parse_config(std::string_view yaml, const ParseOptions& options = {});
// Reads and parses a file; relative paths resolve against its directory.
Result<ClusterConfig> load_config_file(const std::string& path);

// The config a process of `role` runs with: the local node named `node_name`
// (whose role must be `role`), or the top-level sections when `node_name` is
// empty; checked with validate_for_role.
Result<NodeConfig> select_node(const ClusterConfig& config, Role role,
                               std::string_view node_name = {});
// Keys a role cannot run without (model.path, the API key file when
// coordinator.auth is required, the cluster token when cluster.auth is
// required, ...). The error names the key.
Status validate_for_role(const NodeConfig& config, Role role);

struct FormatOptions {
  bool comments = true;         // help text as YAML comments
  bool redact_secrets = false;  // print cluster.token as "<redacted>"
};
// Valid YAML that parse_config reads back to the same config (unless
// secrets are redacted). Local nodes list only their overrides.
std::string format_config(const ClusterConfig& config, const FormatOptions& options = {});
// format_config of the defaults with help comments: `kvgate config --print-defaults`.
std::string format_defaults();
// The schema as Markdown tables (configs/README.md).
std::string format_reference_markdown();

// One row of the key table, for documentation and tools.
struct ConfigKeyInfo {
  std::string path;           // "decode.pool_bytes"
  std::string type;           // "byte size", "duration", "enum", ...
  std::string default_value;  // as written in YAML
  std::string allowed;        // "1MiB..1TiB", "dense|window|...", ""
  std::string help;
};
std::vector<ConfigKeyInfo> config_keys();
// The value of one key as YAML text ("1GiB", "\"127.0.0.1:7200\"");
// NOT_FOUND for a path not in the table.
Result<std::string> config_value(const NodeConfig& config, std::string_view path);

// Value syntax shared with command-line options.
// Byte sizes: an integer with an optional unit B, KiB, MiB, GiB, TiB (x1024)
// or kB, MB, GB, TB (x1000): "512MiB", "2GiB", "4096".
Result<int64_t> parse_byte_size(std::string_view text);
std::string format_byte_size(int64_t bytes);
// Durations: a number with a unit ms, s, m, h ("250ms", "1.5s", "30s");
// a bare "0" is zero. Whole milliseconds only.
Result<std::chrono::milliseconds> parse_duration(std::string_view text);
std::string format_duration(std::chrono::milliseconds duration);
// "host:port" or "[v6]:port"; port 0..65535.
Result<HostPort> parse_host_port(std::string_view text);

}  // namespace kvgate
