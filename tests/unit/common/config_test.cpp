#include "common/config.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

namespace kvgate {
namespace {

using std::chrono::milliseconds;

const std::string kLocalYaml = std::string(KVGATE_SOURCE_DIR) + "/configs/local.yaml";

Result<ClusterConfig> parse(const std::string& yaml) {
  return parse_config(yaml);
}

// The error message of parsing `yaml`, or "" (and a test failure) if it parsed.
std::string error_of(const std::string& yaml) {
  auto r = parse(yaml);
  EXPECT_FALSE(r.ok()) << "parsed unexpectedly:\n" << yaml;
  if (r.ok()) return "";
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  return r.status().message();
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

#define EXPECT_HAS(text, needle) EXPECT_TRUE(contains(text, needle)) << "in: " << (text)

TEST(Config, DefaultsFromEmptyDocument) {
  for (const char* doc : {"", "\n", "# only a comment\n", "---\n", "{}"}) {
    auto r = parse(doc);
    ASSERT_TRUE(r.ok()) << doc << ": " << r.status().message();
    EXPECT_EQ(*r, ClusterConfig{}) << doc;
  }
  // Empty sections take their defaults too.
  auto r = parse("decode:\nkv: {}\n");
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(*r, ClusterConfig{});
}

TEST(Config, PrintedDefaultsParseBack) {
  const std::string text = format_defaults();
  EXPECT_HAS(text, "# KV page pool of a decode node");
  EXPECT_HAS(text, "  pool_bytes: 1GiB\n");
  auto r = parse(text);
  ASSERT_TRUE(r.ok()) << r.status().message() << "\n" << text;
  EXPECT_EQ(*r, ClusterConfig{});
  auto bare = parse(format_config(ClusterConfig{}, {.comments = false}));
  ASSERT_TRUE(bare.ok()) << bare.status().message();
  EXPECT_EQ(*bare, ClusterConfig{});
}

// A valid value different from the default, as written in YAML and as the
// table prints it back.
struct Alternative {
  std::string yaml, printed;
};

Alternative alternative_for(const ConfigKeyInfo& key) {
  const std::string& d = key.default_value;
  auto bounds = [&]() {
    size_t dots = key.allowed.find("..");
    return std::pair(key.allowed.substr(0, dots), key.allowed.substr(dots + 2));
  };
  if (key.type == "integer") {
    int64_t v = std::stoll(d), hi = std::stoll(bounds().second);
    std::string s = std::to_string(v + 1 <= hi ? v + 1 : v - 1);
    return {s, s};
  }
  if (key.type == "byte size") {
    int64_t v = *parse_byte_size(d), hi = *parse_byte_size(bounds().second);
    std::string s = format_byte_size(v + 1024 <= hi ? v + 1024 : v - 1024);
    return {s, s};
  }
  if (key.type == "duration") {
    milliseconds v = *parse_duration(d), hi = *parse_duration(bounds().second);
    std::string s =
        format_duration(v + milliseconds(1) <= hi ? v + milliseconds(1) : v - milliseconds(1));
    return {s, s};
  }
  if (key.type == "number") return {d == "0.5" ? "0.25" : "0.5", d == "0.5" ? "0.25" : "0.5"};
  if (key.type == "boolean")
    return {d == "true" ? "false" : "true", d == "true" ? "false" : "true"};
  if (key.type == "enum") {
    std::string rest = key.allowed + "|";
    for (size_t start = 0, bar; (bar = rest.find('|', start)) != std::string::npos;
         start = bar + 1) {
      std::string name = rest.substr(start, bar - start);
      if (name != d) return {name, name};
    }
  }
  if (key.type == "string") return {"test-name", "\"test-name\""};
  if (key.type == "path") return {"/tmp/kvgate-test/file", "\"/tmp/kvgate-test/file\""};
  if (key.type == "list of strings") return {"[tcp, \"posix\"]", "[\"tcp\", \"posix\"]"};
  if (key.type == "host:port") return {"10.1.2.3:4567", "\"10.1.2.3:4567\""};
  if (key.type == "list of host:port") {
    return {"[\"10.0.0.1:7000\", \"[::1]:7001\"]", "[\"10.0.0.1:7000\", \"[::1]:7001\"]"};
  }
  ADD_FAILURE() << "no alternative for " << key.path << " of type " << key.type;
  return {};
}

TEST(Config, EveryKeyRoundTrips) {
  const NodeConfig defaults;
  const auto keys = config_keys();
  ASSERT_GT(keys.size(), 50u);
  for (const ConfigKeyInfo& key : keys) {
    SCOPED_TRACE(key.path);
    EXPECT_FALSE(key.help.empty());
    EXPECT_FALSE(key.type.empty());
    if (key.path == "local.nodes") continue;  // covered by the local cluster tests
    const Alternative alt = alternative_for(key);
    ASSERT_NE(alt.printed, key.default_value);
    const size_t dot = key.path.find('.');
    const std::string yaml =
        key.path.substr(0, dot) + ":\n  " + key.path.substr(dot + 1) + ": " + alt.yaml + "\n";
    auto r = parse(yaml);
    ASSERT_TRUE(r.ok()) << r.status().message() << "\n" << yaml;
    EXPECT_NE(*r, ClusterConfig{});
    if (key.path.rfind("local.", 0) != 0) {
      // The key sets its own field and no other.
      for (const ConfigKeyInfo& other : keys) {
        if (other.path.rfind("local.", 0) == 0) continue;
        auto value = config_value(r->base, other.path);
        ASSERT_TRUE(value.ok());
        EXPECT_EQ(*value, other.path == key.path ? alt.printed : other.default_value) << other.path;
      }
    }
    auto again = parse(format_config(*r));
    ASSERT_TRUE(again.ok()) << again.status().message();
    EXPECT_EQ(*again, *r);
  }
}

TEST(Config, LocalYamlDescribesThreeProcesses) {
  auto r = load_config_file(kLocalYaml);
  ASSERT_TRUE(r.ok()) << r.status().message();
  const auto& nodes = r->local.nodes;
  ASSERT_EQ(nodes.size(), 3u);
  auto count = [&](Role role) {
    return std::count_if(nodes.begin(), nodes.end(),
                         [&](const LocalNode& n) { return n.role == role; });
  };
  EXPECT_EQ(count(Role::kCoordinator), 1);
  EXPECT_EQ(count(Role::kPrefill), 1);
  EXPECT_EQ(count(Role::kDecode), 1);
  const std::string model =
      std::string(KVGATE_SOURCE_DIR) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
  for (const LocalNode& n : nodes) {
    SCOPED_TRACE(n.name);
    EXPECT_EQ(n.config.model.path, model);  // resolved against configs/
    EXPECT_EQ(n.config.cluster.node_name, n.name);
    EXPECT_EQ(n.config.coordinator.auth, AuthMode::kDisabled);
    EXPECT_TRUE(validate_for_role(n.config, n.role).ok());
    auto selected = select_node(*r, n.role, n.name);
    ASSERT_TRUE(selected.ok()) << selected.status().message();
    EXPECT_EQ(*selected, n.config);
  }
  EXPECT_EQ(served_model_name(r->base.model), "SmolLM2-135M-Instruct");
  // Printing lists only each node's overrides and reads back the same.
  auto again = parse(format_config(*r));
  ASSERT_TRUE(again.ok()) << again.status().message();
  EXPECT_EQ(*again, *r);

  auto wrong_role = select_node(*r, Role::kDecode, "prefill-0");
  ASSERT_FALSE(wrong_role.ok());
  EXPECT_HAS(wrong_role.status().message(), "is a prefill node");
  auto missing = select_node(*r, Role::kDecode, "decode-7");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_HAS(missing.status().message(), "decode-0");
}

TEST(Config, MissingFileIsNotFound) {
  auto r = load_config_file("/nonexistent/kvgate.yaml");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_HAS(r.status().message(), "/nonexistent/kvgate.yaml");
}

TEST(Config, UnknownKeysAreNamed) {
  std::string e = error_of("decod:\n  pool_bytes: 1GiB\n");
  EXPECT_HAS(e, "<config>:1:1: decod: unknown key (did you mean decode?)");
  e = error_of("decode:\n  pool_byte: 1GiB\n");
  EXPECT_HAS(e, "<config>:2:3: decode.pool_byte: unknown key (did you mean decode.pool_bytes?)");
  e = error_of("prefill:\n  pool_bytes: 1GiB\n");
  EXPECT_HAS(e, "prefill.pool_bytes: unknown key (did you mean decode.pool_bytes?)");
  e = error_of("decode:\n  frobnicate: 3\n");
  EXPECT_HAS(e, "decode.frobnicate: unknown key");
  EXPECT_FALSE(contains(e, "did you mean"));
  e = error_of("local:\n  startup_timout: 5s\n");
  EXPECT_HAS(e, "local.startup_timout: unknown key (did you mean local.startup_timeout?)");
  e = error_of(
      "local:\n  nodes:\n    - name: a\n      role: prefill\n      decode:\n        bogus: 1\n");
  EXPECT_HAS(e, "local.nodes[0].decode.bogus: unknown key");
}

TEST(Config, WrongTypes) {
  EXPECT_HAS(error_of("decode:\n  max_batch_requests: lots\n"),
             "decode.max_batch_requests: \"lots\" is not an integer");
  EXPECT_HAS(error_of("decode: [1, 2]\n"), "decode: must be a mapping of keys");
  EXPECT_HAS(error_of("decode:\n  listen: [a]\n"),
             "decode.listen: expected a host:port, got a list");
  EXPECT_HAS(error_of("model:\n  path: {a: 1}\n"), "model.path: expected a path, got a mapping");
  EXPECT_HAS(error_of("metrics:\n  enabled: yes\n"),
             "metrics.enabled: \"yes\" is not a boolean (use true or false)");
  EXPECT_HAS(error_of("kv:\n  keep_rate: lots\n"), "kv.keep_rate: \"lots\" is not a number");
  EXPECT_HAS(error_of("decode:\n  listen: localhost\n"), "is not host:port");
  EXPECT_HAS(error_of("cluster:\n  coordinators: [\"127.0.0.1:0\"]\n"),
             "a peer's port cannot be 0");
  EXPECT_HAS(error_of("- 1\n- 2\n"), "the top level must be a mapping");
  EXPECT_HAS(error_of("decode:\n  pool_bytes:\n"), "decode.pool_bytes: has no value");
  EXPECT_HAS(error_of("decode:\n  page_tokens: 8\n  page_tokens: 9\n"),
             "<config>:3:3: decode.page_tokens: appears twice");
  EXPECT_HAS(error_of("a: 1\n---\nb: 2\n"), "<config>:2:1: holds more than one YAML document");
  EXPECT_HAS(error_of("cluster:\n  node_name: \"has space\"\n"),
             "cluster.node_name: \"has space\" may hold only");
}

TEST(Config, OutOfRange) {
  EXPECT_HAS(error_of("decode:\n  page_tokens: 0\n"),
             "decode.page_tokens: \"0\" is out of range 1..4096");
  EXPECT_HAS(error_of("kv:\n  keep_rate: 1.5\n"), "kv.keep_rate: \"1.5\" is out of range 0..1");
  EXPECT_HAS(error_of("decode:\n  pool_bytes: 4KiB\n"), "is out of range 1MiB..1TiB");
  EXPECT_HAS(error_of("decode:\n  listen: 127.0.0.1:70000\n"),
             "port 70000 is out of range 0..65535");
  EXPECT_HAS(error_of("cluster:\n  heartbeat_interval: 2h\n"), "is out of range 10ms..1m");
}

TEST(Config, BadByteSize) {
  EXPECT_HAS(
      error_of("decode:\n  pool_bytes: 12XB\n"),
      "config: <config>:2:15: decode.pool_bytes: \"12XB\" is not a byte size (use e.g. 512MiB)");
  EXPECT_HAS(error_of("decode:\n  pool_bytes: -1GiB\n"), "is not a byte size");
  EXPECT_HAS(error_of("decode:\n  pool_bytes: 99999999999TiB\n"), "is too large");
}

TEST(Config, BadDuration) {
  EXPECT_HAS(error_of("decode:\n  lease_ttl: 30\n"),
             "decode.lease_ttl: \"30\" is not a duration (use e.g. 250ms, 30s, 5m)");
  EXPECT_HAS(error_of("decode:\n  lease_ttl: 5 parsecs\n"), "is not a duration");
  EXPECT_HAS(error_of("decode:\n  lease_ttl: 0.5ms\n"), "is not a whole number of milliseconds");
}

TEST(Config, BadEnum) {
  EXPECT_HAS(error_of("kv:\n  policy: gate_pod\n"),
             "kv.policy: \"gate_pod\" is not one of dense|window|pod|h2o|snapkv|gate|gate+pod "
             "(did you mean gate+pod?)");
  EXPECT_HAS(error_of("transport:\n  kind: rdma\n"),
             "transport.kind: \"rdma\" is not one of ucx|loopback|nccl");
}

TEST(Config, SyntaxErrorGivesLine) {
  std::string e = error_of("model:\n  path: a.gguf\ndecode:\n  pool_bytes: [1GiB\n");
  EXPECT_HAS(e, "YAML syntax error");
  EXPECT_HAS(e, "<config>:5:");
  // A stray ',' at the root made yaml-cpp 0.7's LoadAll loop until memory ran out.
  EXPECT_HAS(error_of(","), "<config>:1:1: YAML syntax error");
  EXPECT_HAS(error_of("- a\n,b\n"), "<config>:2:1: YAML syntax error");
  EXPECT_HAS(error_of("a: 1\n...\n,\n"), "<config>:3:1: YAML syntax error");
  auto r = parse_config("kv:\n  policy: \"dense\n", {.source_name = "my.yaml", .base_dir = ""});
  ASSERT_FALSE(r.ok());
  EXPECT_HAS(r.status().message(), "config: my.yaml:");
}

TEST(Config, RulesBetweenKeys) {
  EXPECT_HAS(error_of("cluster:\n  heartbeat_interval: 5s\n  node_deadline: 2s\n"),
             "cluster.node_deadline: 2s must be longer than cluster.heartbeat_interval (5s)");
  EXPECT_HAS(error_of("cluster:\n  token: a\n  token_file: b\n"), "not both");
  EXPECT_HAS(error_of("kv:\n  policy: dense\n  budget_tokens: 100\n"),
             "kv.budget_tokens: has no effect with kv.policy dense");
  EXPECT_HAS(error_of("prefill:\n  chunk_tokens: 4096\n"), "is more than engine.max_batch_tokens");
}

TEST(Config, RelativePathsResolveAgainstBaseDir) {
  auto r = parse_config("model:\n  path: ../models/m.gguf\nkv:\n  gate_file: /abs/g.bin\n",
                        {.base_dir = "/etc/kvgate"});
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->base.model.path, "/etc/models/m.gguf");
  EXPECT_EQ(r->base.kv.gate_file, "/abs/g.bin");
  EXPECT_EQ(served_model_name(r->base.model), "m");
}

TEST(Config, RolesNeedTheirKeys) {
  NodeConfig c;
  EXPECT_HAS(validate_for_role(c, Role::kDecode).message(), "model.path: required");
  c.model.path = "/m.gguf";
  EXPECT_HAS(validate_for_role(c, Role::kCoordinator).message(),
             "coordinator.api_keys_file: required");
  c.coordinator.api_keys_file = "/keys";
  EXPECT_HAS(validate_for_role(c, Role::kCoordinator).message(), "cluster.token");
  c.cluster.token = "t";
  EXPECT_TRUE(validate_for_role(c, Role::kCoordinator).ok());
  EXPECT_TRUE(validate_for_role(c, Role::kPrefill).ok());
  c.metrics.listen.port = c.decode.listen.port;
  EXPECT_HAS(validate_for_role(c, Role::kDecode).message(), "is also decode.listen");
  c.metrics.enabled = false;
  EXPECT_TRUE(validate_for_role(c, Role::kDecode).ok());
  c.transport.kind = TransportKind::kNccl;
  EXPECT_HAS(validate_for_role(c, Role::kDecode).message(), "nccl needs engine.backend: cuda");
}

// A valid local cluster with `extra` appended to the last node (decode-0).
std::string local_cluster(const std::string& extra = "", const std::string& top = "") {
  return "model: {path: /m.gguf}\ncoordinator: {auth: disabled}\ncluster: {token: t}\n" + top +
         "local:\n  nodes:\n"
         "    - {name: coord, role: coordinator}\n"
         "    - name: prefill-0\n      role: prefill\n      metrics: {listen: \"127.0.0.1:9101\"}\n"
         "    - name: decode-0\n      role: decode\n      metrics: {listen: \"127.0.0.1:9201\"}\n" +
         extra;
}

TEST(Config, LocalClusterChecks) {
  auto ok = parse(local_cluster());
  ASSERT_TRUE(ok.ok()) << ok.status().message();
  EXPECT_EQ(ok->local.nodes[2].config.metrics.listen.port, 9201);
  EXPECT_EQ(ok->base.metrics.listen.port, 9100);

  EXPECT_HAS(error_of(local_cluster("      decode: {listen: \"127.0.0.1:7100\"}\n")),
             "local.nodes[2] (decode-0): decode.listen: port 7100 is also used by local.nodes[1] "
             "(prefill-0) prefill.listen");
  EXPECT_HAS(error_of(local_cluster("      decode: {listen: \"127.0.0.1:8000\"}\n")),
             "decode.listen: port 8000 is also used by local.nodes[0] (coord) coordinator.listen");
  // A node that advertises its own host runs on another machine: the same
  // port is fine there (e.g. Kubernetes pods, deploy/kubernetes/), while
  // two nodes advertising the same host still collide.
  EXPECT_TRUE(parse(local_cluster("      decode: {listen: \"0.0.0.0:7100\"}\n"
                                  "      cluster: {advertise_host: decode-0.kvgate-decode}\n"))
                  .ok());
  EXPECT_HAS(error_of(local_cluster(
                 "      decode: {listen: \"0.0.0.0:7300\"}\n"
                 "      cluster: {advertise_host: h1}\n"
                 "    - name: decode-1\n      role: decode\n"
                 "      decode: {listen: \"0.0.0.0:7300\"}\n"
                 "      metrics: {listen: \"127.0.0.1:9301\"}\n"
                 "      cluster: {advertise_host: h1}\n")),
             "decode.listen: port 7300 is also used by local.nodes[2] (decode-0) decode.listen");
  EXPECT_HAS(error_of(local_cluster("    - {name: decode-0, role: decode}\n")),
             "local.nodes[3] (decode-0): name is also local.nodes[2]");
  EXPECT_HAS(error_of(local_cluster("    - {name: c2, role: coordinator}\n")),
             "needs exactly one coordinator");
  EXPECT_HAS(error_of(local_cluster("    - {name: x}\n")), "local.nodes[3].role: required");
  EXPECT_HAS(error_of(local_cluster("    - {name: x, role: router}\n")),
             "\"router\" is not one of coordinator|prefill|decode");
  EXPECT_HAS(error_of(local_cluster("      transport: {kind: loopback}\n")),
             "loopback works only inside one process");
  EXPECT_HAS(error_of(local_cluster("      cluster: {coordinators: [\"127.0.0.1:7999\"]}\n")),
             "does not include the coordinator's control_listen 127.0.0.1:7000");
  EXPECT_HAS(error_of(local_cluster("      cluster: {node_name: other}\n")),
             "local.nodes[2].cluster.node_name: a local node's name is its node_name");
  EXPECT_HAS(error_of(local_cluster("      cluster: {heartbeat_interval: 9s}\n")),
             "local.nodes[2].cluster.node_deadline: 5s must be longer");
  EXPECT_HAS(error_of(local_cluster("", "coordinator: {auth: required}\n")), "appears twice");
  std::string keyless = local_cluster();
  keyless.replace(keyless.find("coordinator: {auth: disabled}\n"), 30, "");
  EXPECT_HAS(error_of(keyless), "local.nodes[0] (coord): coordinator.api_keys_file: required");
  EXPECT_HAS(error_of(local_cluster("      local: {}\n")), "local.nodes[2].local: unknown key");
}

TEST(ValueSyntax, ByteSizes) {
  EXPECT_EQ(*parse_byte_size("512MiB"), int64_t{512} << 20);
  EXPECT_EQ(*parse_byte_size("2GiB"), int64_t{2} << 30);
  EXPECT_EQ(*parse_byte_size("4096"), 4096);
  EXPECT_EQ(*parse_byte_size("10B"), 10);
  EXPECT_EQ(*parse_byte_size("3 KiB"), 3072);
  EXPECT_EQ(*parse_byte_size("1MB"), 1000000);
  EXPECT_EQ(*parse_byte_size("8TiB"), int64_t{8} << 40);
  for (const char* bad : {"", "MiB", "1.5GiB", "1 gib", "1M", "0x10", "-1", "1e9", " 5"}) {
    EXPECT_FALSE(parse_byte_size(bad).ok()) << bad;
  }
  EXPECT_EQ(format_byte_size(int64_t{1} << 30), "1GiB");
  EXPECT_EQ(format_byte_size(1536), "1536");
  EXPECT_EQ(format_byte_size(3 << 10), "3KiB");
  EXPECT_EQ(format_byte_size(0), "0");
}

TEST(ValueSyntax, Durations) {
  EXPECT_EQ(*parse_duration("250ms"), milliseconds(250));
  EXPECT_EQ(*parse_duration("30s"), milliseconds(30000));
  EXPECT_EQ(*parse_duration("1.5s"), milliseconds(1500));
  EXPECT_EQ(*parse_duration("5m"), milliseconds(300000));
  EXPECT_EQ(*parse_duration("2h"), milliseconds(7200000));
  EXPECT_EQ(*parse_duration("0"), milliseconds(0));
  for (const char* bad : {"", "30", "s", "1.s", "-1s", "1d", "1.2.3s", "0.0001s", "1 sec"}) {
    EXPECT_FALSE(parse_duration(bad).ok()) << bad;
  }
  EXPECT_EQ(format_duration(milliseconds(1500)), "1500ms");
  EXPECT_EQ(format_duration(milliseconds(120000)), "2m");
  EXPECT_EQ(format_duration(milliseconds(0)), "0s");
}

TEST(ValueSyntax, HostPorts) {
  auto a = parse_host_port("127.0.0.1:7000");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->host, "127.0.0.1");
  EXPECT_EQ(a->port, 7000);
  auto v6 = parse_host_port("[::1]:0");
  ASSERT_TRUE(v6.ok());
  EXPECT_EQ(v6->host, "::1");
  EXPECT_EQ(v6->to_string(), "[::1]:0");
  EXPECT_EQ(parse_host_port("node-3.cluster:65535")->port, 65535);
  for (const char* bad :
       {"", ":7000", "host", "host:", "::1:7000", "[::1]7000", "a b:1", "h:-1", "h:65536"}) {
    EXPECT_FALSE(parse_host_port(bad).ok()) << bad;
  }
}

TEST(Config, ReferenceAndSecrets) {
  const std::string md = format_reference_markdown();
  EXPECT_HAS(md, "| `decode.pool_bytes` | byte size | `1GiB` |");
  ClusterConfig c;
  c.base.cluster.token = "s3cret";
  const std::string shown = format_config(c, {.redact_secrets = true});
  EXPECT_FALSE(contains(shown, "s3cret"));
  EXPECT_HAS(shown, "token: \"<redacted>\"");
}

TEST(Config, ReadmeReferenceIsCurrent) {
  std::ifstream in(std::string(KVGATE_SOURCE_DIR) + "/configs/README.md");
  const std::string readme((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string begin = "<!-- BEGIN kvgate config --markdown -->\n";
  const size_t from = readme.find(begin);
  ASSERT_NE(from, std::string::npos);
  const size_t start = from + begin.size();
  const size_t end = readme.find("\n<!-- END kvgate config --markdown -->", start);
  ASSERT_NE(end, std::string::npos);
  EXPECT_EQ(readme.substr(start, end + 1 - start), format_reference_markdown())
      << "configs/README.md is stale: regenerate its reference as it says";
}

// Mutated documents never throw; each gives a config or an error message, and
// every config that parses prints back to itself.
TEST(Config, FuzzMutatedDocuments) {
  std::vector<std::string> seeds = {format_defaults(), local_cluster(),
                                    "decode: {pool_bytes: 2GiB, listen: \"[::1]:7200\"}\n",
                                    "transport:\n  ucx_tls: posix,sysv\n"};
  {
    std::ifstream in(kLocalYaml);
    seeds.emplace_back(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  const std::vector<std::string> tokens = {": ",
                                           "- ",
                                           "[",
                                           "]",
                                           "{",
                                           "}",
                                           "&a ",
                                           "*a",
                                           "!!str ",
                                           "'",
                                           "\"",
                                           "#",
                                           "\n",
                                           "  ",
                                           "\t",
                                           "~",
                                           "null",
                                           "0x1F",
                                           "-1",
                                           "1e308",
                                           "GiB",
                                           "...",
                                           "---",
                                           ",",
                                           "? ",
                                           "|\n  ",
                                           ">\n  ",
                                           "\\",
                                           "%YAML 1.2\n",
                                           "<<: *a\n",
                                           "\xff",
                                           "\x00",
                                           "99999999999999999999",
                                           "local:\n  nodes:\n    - {name: x, role: decode}\n"};
  std::mt19937_64 rng(20240601);
  const int iterations = 4000;
  auto pick = [&](size_t n) { return n == 0 ? size_t{0} : static_cast<size_t>(rng() % n); };
  int parsed = 0, rejected = 0;
  for (int iter = 0; iter < iterations; ++iter) {
    std::string doc = seeds[pick(seeds.size())];
    for (int m = 0, n = 1 + static_cast<int>(pick(4)); m < n; ++m) {
      const size_t at = pick(doc.size() + 1);
      switch (pick(5)) {
        case 0:
          if (at < doc.size()) doc[at] = static_cast<char>(rng());
          break;
        case 1:
          doc.insert(at, tokens[pick(tokens.size())]);
          break;
        case 2:
          doc.erase(at, pick(40));
          break;
        case 3: {  // duplicate a line
          size_t begin = doc.rfind('\n', at == 0 ? 0 : at - 1);
          begin = begin == std::string::npos ? 0 : begin + 1;
          size_t end = doc.find('\n', begin);
          end = end == std::string::npos ? doc.size() : end + 1;
          doc.insert(begin, doc.substr(begin, end - begin));
          break;
        }
        default: {  // swap the halves around a newline
          size_t nl = doc.find('\n', at);
          if (nl != std::string::npos) doc = doc.substr(nl + 1) + doc.substr(0, nl + 1);
        }
      }
    }
    try {
      auto r = parse(doc);
      if (!r.ok()) {
        ++rejected;
        EXPECT_EQ(r.status().message().rfind("config: ", 0), 0u) << r.status().message();
        continue;
      }
      ++parsed;
      auto again = parse(format_config(*r));
      ASSERT_TRUE(again.ok()) << again.status().message() << "\nfrom:\n" << doc;
      EXPECT_EQ(*again, *r) << doc;
    } catch (...) {
      ADD_FAILURE() << "exception escaped for:\n" << doc;
    }
  }
  EXPECT_GT(parsed, 100);
  EXPECT_GT(rejected, 100);
}

}  // namespace
}  // namespace kvgate
