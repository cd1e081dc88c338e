// The YAML parser and printer of common/config.h, over the key table of
// common/config_schema.h. Parsing walks the YAML tree and looks each key up
// in the table; printing walks the table. yaml-cpp stays inside this file
// and its exceptions are turned into Status at the calls below.
#include "common/config.h"

#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <sstream>

#include "common/config_schema.h"

namespace kvgate {
namespace {

using namespace config_internal;  // NOLINT: this file is the table's only user

// ---------------------------------------------------------------- parser

class Parser {
 public:
  explicit Parser(const ParseOptions& options) : opt_(options) {}

  Result<ClusterConfig> run(std::string_view yaml) {
    const std::string text(yaml);
    KVGATE_RETURN_IF_ERROR(check_one_document(text));
    ClusterConfig out;
    const YAML::Node root = YAML::Load(text);
    if (root.IsNull()) return out;
    if (!root.IsMap()) {
      return error_at(root.Mark(), "",
                      "the top level must be a mapping of sections (" +
                          join(node_sections(), ", ") + ", local)");
    }
    KVGATE_RETURN_IF_ERROR(apply_sections(root, out.base, "", nullptr));
    KVGATE_RETURN_IF_ERROR(check_consistency(out.base, ""));
    for (auto it = root.begin(); it != root.end(); ++it) {
      if (it->first.Scalar() == "local") KVGATE_RETURN_IF_ERROR(parse_local(it->second, out));
    }
    return out;
  }

 private:
  // Records where each document starts.
  struct DocumentStarts : YAML::EventHandler {
    std::vector<YAML::Mark> starts;
    void OnDocumentStart(const YAML::Mark& m) override { starts.push_back(m); }
    void OnDocumentEnd() override {}
    void OnNull(const YAML::Mark&, YAML::anchor_t) override {}
    void OnAlias(const YAML::Mark&, YAML::anchor_t) override {}
    void OnScalar(const YAML::Mark&, const std::string&, YAML::anchor_t,
                  const std::string&) override {}
    void OnSequenceStart(const YAML::Mark&, const std::string&, YAML::anchor_t,
                         YAML::EmitterStyle::value) override {}
    void OnSequenceEnd() override {}
    void OnMapStart(const YAML::Mark&, const std::string&, YAML::anchor_t,
                    YAML::EmitterStyle::value) override {}
    void OnMapEnd() override {}
  };

  // A config file is one YAML document. Counting them with a bounded loop
  // also avoids a yaml-cpp 0.7 bug: a stray ',' at the root of a document
  // is never consumed, so every further document starts at the same place
  // and YAML::LoadAll loops until memory runs out (jbeder/yaml-cpp#1040).
  Status check_one_document(const std::string& text) {
    std::istringstream in(text);
    YAML::Parser parser(in);
    DocumentStarts docs;
    while (docs.starts.size() < 3 && parser.HandleNextDocument(docs)) {
      const auto& s = docs.starts;
      if (s.size() >= 2 && s[s.size() - 1].pos == s[s.size() - 2].pos) {
        return invalid_argument("config: " + where(s.back()) +
                                ": YAML syntax error: unexpected character");
      }
    }
    if (docs.starts.size() > 1) {
      return error_at(docs.starts[1], "", "holds more than one YAML document; expected one");
    }
    return Status();
  }

  std::string where(const YAML::Mark& m) const {
    if (m.line < 0) return opt_.source_name;
    return opt_.source_name + ":" + std::to_string(m.line + 1) + ":" + std::to_string(m.column + 1);
  }

  Status error_at(const YAML::Mark& m, const std::string& path, const std::string& what) const {
    return invalid_argument("config: " + where(m) + ": " + (path.empty() ? "" : path + ": ") +
                            what);
  }

  // fn(name, path, key node, value node) for each entry of `map`; rejects
  // non-scalar and repeated keys.
  template <class Fn>
  Status for_each_entry(const YAML::Node& map, const std::string& prefix, Fn fn) {
    std::set<std::string> seen;
    for (auto it = map.begin(); it != map.end(); ++it) {
      const YAML::Node key = it->first;
      if (!key.IsScalar()) return error_at(key.Mark(), prefix, "keys must be plain names");
      const std::string path = prefix + key.Scalar();
      if (!seen.insert(key.Scalar()).second) return error_at(key.Mark(), path, "appears twice");
      KVGATE_RETURN_IF_ERROR(fn(key.Scalar(), path, key, it->second));
    }
    return Status();
  }

  // Applies the sections of `map` to `c`. With `node` set, `map` is an item
  // of local.nodes and its name and role go there; otherwise `local` is
  // skipped (parsed after the sections).
  Status apply_sections(const YAML::Node& map, NodeConfig& c, const std::string& prefix,
                        LocalNode* node) {
    static const std::vector<std::string> kSections = node_sections();
    return for_each_entry(
        map, prefix,
        [&](const std::string& name, const std::string& path, const YAML::Node& k,
            const YAML::Node& v) -> Status {
          if (node && (name == "name" || name == "role")) {
            if (!v.IsScalar()) return error_at(k.Mark(), path, "must be a plain string");
            if (name == "role") {
              auto role = parse_role(v.Scalar());
              if (!role.ok()) return error_at(v.Mark(), path, role.status().message());
              node->role = *role;
            } else {
              if (v.Scalar().empty() || v.Scalar().size() > 64 || !valid_chars(v.Scalar(), false)) {
                return error_at(v.Mark(), path,
                                quote(v.Scalar()) + " is not a node name (1-64 of [A-Za-z0-9._-])");
              }
              node->name = v.Scalar();
            }
            return Status();
          }
          if (!node && name == "local") return Status();
          if (std::find(kSections.begin(), kSections.end(), name) == kSections.end()) {
            std::vector<std::string> candidates = kSections;
            if (node) candidates.insert(candidates.end(), {"name", "role"});
            if (!node) candidates.push_back("local");
            return error_at(k.Mark(), path, "unknown key" + suggest(name, candidates));
          }
          if (v.IsNull()) return Status();
          if (!v.IsMap()) return error_at(v.Mark(), path, "must be a mapping of keys");
          return for_each_entry(v, path + ".",
                                [&](const std::string& leaf, const std::string& kpath,
                                    const YAML::Node& kk, const YAML::Node& kv) {
                                  const std::string table_path = name + "." + leaf;
                                  const Key<NodeConfig>* key = node_table().find(table_path);
                                  if (!key)
                                    return unknown_key(kk.Mark(), kpath, table_path, node_table());
                                  return apply_key(*key, kk, kv, c, kpath);
                                });
        });
  }

  template <class T>
  Status unknown_key(const YAML::Mark& m, const std::string& path, const std::string& table_path,
                     const Table<T>& table) {
    // The same name in another section, or the nearest name in this one.
    const std::string leaf = leaf_of(table_path), section = section_of(table_path);
    std::vector<std::string> same_section;
    for (const auto& k : node_table().keys) {
      if (leaf_of(k.path) == leaf)
        return error_at(m, path, "unknown key (did you mean " + k.path + "?)");
    }
    for (const auto& k : table.keys) {
      if (section_of(k.path) == section) same_section.push_back(leaf_of(k.path));
    }
    if (section == "local") same_section.push_back("nodes");
    return error_at(m, path, "unknown key" + suggest(leaf, same_section, section + "."));
  }

  template <class T>
  Status apply_key(const Key<T>& key, const YAML::Node& k, const YAML::Node& v, T& target,
                   const std::string& path) {
    if (v.IsNull()) {
      return error_at(k.Mark(), path,
                      "has no value (remove the key to take the default, or write \"\")");
    }
    Value value;
    if (key.is_list && v.IsSequence()) {
      for (const auto& item : v) {
        if (!item.IsScalar()) return error_at(item.Mark(), path, "list items must be plain values");
        value.items.push_back(item.Scalar());
      }
    } else if (!v.IsScalar()) {
      return error_at(v.Mark(), path,
                      "expected a " + key.type + ", got a " + (v.IsMap() ? "mapping" : "list"));
    } else {
      value.scalar = v.Scalar();
      if (key.is_list) {  // "posix,sysv" as UCX writes lists
        std::string_view rest = value.scalar;
        while (!trim(rest).empty()) {
          size_t comma = rest.find(',');
          value.items.emplace_back(trim(rest.substr(0, comma)));
          rest = comma == std::string_view::npos ? "" : rest.substr(comma + 1);
        }
      }
    }
    marks_[path] = v.Mark();
    std::string problem = key.set(target, value, opt_.base_dir);
    if (!problem.empty()) return error_at(v.Mark(), path, problem);
    return Status();
  }

  YAML::Mark mark_of(const std::string& prefix, std::initializer_list<std::string> paths) const {
    for (const std::string& p : {prefix, std::string()}) {
      for (const auto& path : paths) {
        if (auto it = marks_.find(p + path); it != marks_.end()) return it->second;
      }
    }
    return YAML::Mark::null_mark();
  }

  // Rules between keys that hold for any config, whatever its role.
  Status check_consistency(const NodeConfig& c, const std::string& prefix) {
    auto fail = [&](const std::string& path, const std::string& other, const std::string& what) {
      return error_at(mark_of(prefix, {path, other}), prefix + path, what);
    };
    if (c.cluster.node_deadline <= c.cluster.heartbeat_interval) {
      return fail("cluster.node_deadline", "cluster.heartbeat_interval",
                  format_duration(c.cluster.node_deadline) +
                      " must be longer than cluster.heartbeat_interval (" +
                      format_duration(c.cluster.heartbeat_interval) + ")");
    }
    if (!c.cluster.token.empty() && !c.cluster.token_file.empty()) {
      return fail("cluster.token", "cluster.token_file",
                  "set cluster.token or cluster.token_file, not both");
    }
    if (c.kv.budget_tokens > 0 &&
        (c.kv.policy == KvPolicyChoice::kDense || c.kv.policy == KvPolicyChoice::kWindow ||
         c.kv.policy == KvPolicyChoice::kPod)) {
      return fail("kv.budget_tokens", "kv.policy",
                  "has no effect with kv.policy " +
                      std::string(kv_policy_config_name(c.kv.policy)) +
                      " (it applies to h2o, snapkv, gate and gate+pod)");
    }
    if (c.prefill.chunk_tokens > c.engine.max_batch_tokens) {
      return fail("prefill.chunk_tokens", "engine.max_batch_tokens",
                  std::to_string(c.prefill.chunk_tokens) +
                      " is more than engine.max_batch_tokens (" +
                      std::to_string(c.engine.max_batch_tokens) + ")");
    }
    return Status();
  }

  Status parse_local(const YAML::Node& v, ClusterConfig& out) {
    if (v.IsNull()) return Status();
    if (!v.IsMap()) return error_at(v.Mark(), "local", "must be a mapping of keys");
    std::optional<YAML::Node> nodes;
    KVGATE_RETURN_IF_ERROR(
        for_each_entry(v, "local.",
                       [&](const std::string& name, const std::string& path, const YAML::Node& k,
                           const YAML::Node& val) -> Status {
                         if (name == "nodes") {
                           nodes = val;
                           return Status();
                         }
                         const Key<ClusterConfig>* key = local_table().find(path);
                         if (!key) return unknown_key(k.Mark(), path, path, local_table());
                         return apply_key(*key, k, val, out, path);
                       }));
    if (!nodes || nodes->IsNull()) return Status();
    if (!nodes->IsSequence()) {
      return error_at(nodes->Mark(), "local.nodes", "must be a list of nodes");
    }
    std::vector<YAML::Mark> item_marks;
    size_t i = 0;
    for (auto it = nodes->begin(); it != nodes->end(); ++it, ++i) {
      const YAML::Node item = *it;
      const std::string prefix = "local.nodes[" + std::to_string(i) + "].";
      if (!item.IsMap())
        return error_at(item.Mark(), prefix.substr(0, prefix.size() - 1),
                        "must be a mapping with name, role and overrides");
      LocalNode node;
      node.role = static_cast<Role>(-1);
      node.config = out.base;
      KVGATE_RETURN_IF_ERROR(apply_sections(item, node.config, prefix, &node));
      if (node.name.empty()) return error_at(item.Mark(), prefix + "name", "required");
      if (static_cast<int>(node.role) == -1)
        return error_at(item.Mark(), prefix + "role", "required");
      if (auto it = marks_.find(prefix + "cluster.node_name"); it != marks_.end()) {
        return error_at(it->second, prefix + "cluster.node_name",
                        "a local node's name is its node_name; remove this key");
      }
      node.config.cluster.node_name = node.name;
      KVGATE_RETURN_IF_ERROR(check_consistency(node.config, prefix));
      item_marks.push_back(item.Mark());
      out.local.nodes.push_back(std::move(node));
    }
    return check_local(out.local, item_marks);
  }

  Status check_local(const LocalClusterConfig& local, const std::vector<YAML::Mark>& marks) {
    const auto& nodes = local.nodes;
    if (nodes.empty()) return Status();
    int count[3] = {0, 0, 0};
    for (const auto& n : nodes) ++count[static_cast<int>(n.role)];
    if (count[0] != 1 || count[1] < 1 || count[2] < 1) {
      return error_at(marks[0], "local.nodes",
                      "needs exactly one coordinator and at least one prefill and one decode "
                      "node (has " +
                          std::to_string(count[0]) + ", " + std::to_string(count[1]) + ", " +
                          std::to_string(count[2]) + ")");
    }
    const LocalNode* coord = nullptr;
    for (const auto& n : nodes) {
      if (n.role == Role::kCoordinator) coord = &n;
    }
    // Ports must differ among the nodes of one machine. A node that
    // advertises its own host (cluster.advertise_host, e.g. a Kubernetes
    // pod's DNS name) runs elsewhere; nodes without one share this machine.
    std::map<std::pair<std::string, uint16_t>, std::string> used;  // (host, port) -> who
    for (size_t i = 0; i < nodes.size(); ++i) {
      const LocalNode& n = nodes[i];
      const std::string who = "local.nodes[" + std::to_string(i) + "] (" + n.name + ")";
      auto fail = [&](const std::string& what) { return error_at(marks[i], who, what); };
      for (size_t j = 0; j < i; ++j) {
        if (nodes[j].name == n.name)
          return fail("name is also local.nodes[" + std::to_string(j) + "]");
      }
      if (std::string p = role_problem(n.config, n.role); !p.empty()) return fail(p);
      if (n.role != Role::kCoordinator) {
        if (n.config.transport.kind == TransportKind::kLoopback) {
          return fail(
              "transport.kind: loopback works only inside one process; local nodes are "
              "separate processes (use ucx)");
        }
        const HostPort& target = coord->config.coordinator.control_listen;
        const auto& cs = n.config.cluster.coordinators;
        if (target.port == 0 || std::none_of(cs.begin(), cs.end(), [&](const HostPort& hp) {
              return hp.port == target.port;
            })) {
          return fail("cluster.coordinators does not include the coordinator's control_listen " +
                      target.to_string() + " (a fixed port is needed across processes)");
        }
      }
      for (const BoundPort& bp : bound_ports(n.config, n.role)) {
        if (bp.port == 0) continue;
        auto [it, fresh] =
            used.emplace(std::make_pair(n.config.cluster.advertise_host, bp.port), who + " " + bp.path);
        if (!fresh) {
          return fail(bp.path + ": port " + std::to_string(bp.port) + " is also used by " +
                      it->second);
        }
      }
    }
    return Status();
  }

  const ParseOptions& opt_;
  std::map<std::string, YAML::Mark> marks_;  // key path -> where its value is
};

// ---------------------------------------------------------------- printing

void comment(std::string& out, const std::string& indent, const std::string& text) {
  constexpr size_t kWidth = 96;
  std::istringstream words(text);
  std::string word, line;
  while (words >> word) {
    if (!line.empty() && indent.size() + 2 + line.size() + 1 + word.size() > kWidth) {
      out += indent + "# " + line + "\n";
      line.clear();
    }
    line += (line.empty() ? "" : " ") + word;
  }
  if (!line.empty()) out += indent + "# " + line + "\n";
}

template <class T>
std::string key_text(const Key<T>& key, const T& t, const FormatOptions& o) {
  std::string v = key.get(t);
  return key.secret && o.redact_secrets && v != "\"\"" ? "\"<redacted>\"" : v;
}

template <class T>
void emit_key(std::string& out, const Key<T>& key, const T& t, const FormatOptions& o) {
  if (o.comments) {
    comment(out, "  ",
            key.help + " [" + key.type + (key.allowed.empty() ? "" : ", " + key.allowed) + "]");
  }
  out += "  " + leaf_of(key.path) + ": " + key_text(key, t, o) + "\n";
}

}  // namespace

// ---------------------------------------------------------------- public API

std::string HostPort::to_string() const {
  const bool v6 = host.find(':') != std::string::npos;
  return (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

std::string_view role_name(Role role) {
  return kRoleNames[static_cast<size_t>(role)];
}

Result<Role> parse_role(std::string_view name) {
  for (size_t i = 0; i < kRoleNames.size(); ++i) {
    if (kRoleNames[i] == name) return static_cast<Role>(i);
  }
  return invalid_argument(quote(name) + " is not one of " + join(kRoleNames, "|"));
}

std::string_view kv_policy_config_name(KvPolicyChoice policy) {
  return kPolicyNames[static_cast<size_t>(policy)];
}

std::string served_model_name(const ModelConfig& model) {
  if (!model.served_name.empty()) return model.served_name;
  std::string file = fs::path(model.path).filename().string();
  if (file.size() > 5 && file.ends_with(".gguf")) file.resize(file.size() - 5);
  return file;
}

Result<int64_t> parse_byte_size(std::string_view text) {
  const std::string bad = quote(text) + " is not a byte size (use e.g. 512MiB)";
  size_t n = 0;
  while (n < text.size() && is_digit(text[n])) ++n;
  uint64_t count = 0;
  auto [p, ec] = std::from_chars(text.data(), text.data() + n, count);
  if (n == 0 || ec != std::errc()) return invalid_argument(bad);
  static const std::pair<std::string_view, uint64_t> kUnits[] = {{"", 1},
                                                                 {"B", 1},
                                                                 {"KiB", 1ull << 10},
                                                                 {"MiB", 1ull << 20},
                                                                 {"GiB", 1ull << 30},
                                                                 {"TiB", 1ull << 40},
                                                                 {"kB", 1000},
                                                                 {"KB", 1000},
                                                                 {"MB", 1000000},
                                                                 {"GB", 1000000000},
                                                                 {"TB", 1000000000000}};
  const std::string_view unit = trim(text.substr(n));
  for (const auto& [name, mult] : kUnits) {
    if (unit != name) continue;
    if (count > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / mult) {
      return invalid_argument(quote(text) + " is too large");
    }
    return static_cast<int64_t>(count * mult);
  }
  return invalid_argument(bad);
}

std::string format_byte_size(int64_t bytes) {
  static const std::pair<const char*, int64_t> kUnits[] = {
      {"TiB", int64_t{1} << 40}, {"GiB", int64_t{1} << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}};
  for (const auto& [name, mult] : kUnits) {
    if (bytes != 0 && bytes % mult == 0) return std::to_string(bytes / mult) + name;
  }
  return std::to_string(bytes);
}

Result<milliseconds> parse_duration(std::string_view text) {
  const std::string bad = quote(text) + " is not a duration (use e.g. 250ms, 30s, 5m)";
  if (trim(text) == "0") return milliseconds(0);
  size_t n = 0;
  std::string digits;
  int frac = -1;  // digits after the point, -1 = no point
  while (n < text.size() && (is_digit(text[n]) || (text[n] == '.' && frac < 0))) {
    if (text[n] == '.') {
      frac = 0;
    } else {
      digits += text[n];
      if (frac >= 0) ++frac;
    }
    ++n;
  }
  if (digits.empty() || frac == 0 || digits.size() > 15) {
    return invalid_argument(digits.size() > 15 ? quote(text) + " is too large" : bad);
  }
  static const std::pair<std::string_view, int64_t> kUnits[] = {
      {"ms", 1}, {"s", 1000}, {"m", 60000}, {"h", 3600000}};
  const std::string_view unit = trim(text.substr(n));
  for (const auto& [name, ms_per_unit] : kUnits) {
    if (unit != name) continue;
    __int128 num = static_cast<__int128>(std::stoll(digits)) * ms_per_unit;
    __int128 den = 1;
    for (int i = 0; i < std::max(frac, 0); ++i) den *= 10;
    if (num % den != 0)
      return invalid_argument(quote(text) + " is not a whole number of milliseconds");
    if (num / den > (int64_t{1} << 50)) return invalid_argument(quote(text) + " is too large");
    return milliseconds(static_cast<int64_t>(num / den));
  }
  return invalid_argument(bad);
}

std::string format_duration(milliseconds d) {
  const int64_t ms = d.count();
  if (ms == 0) return "0s";
  if (ms % 3600000 == 0) return std::to_string(ms / 3600000) + "h";
  if (ms % 60000 == 0) return std::to_string(ms / 60000) + "m";
  if (ms % 1000 == 0) return std::to_string(ms / 1000) + "s";
  return std::to_string(ms) + "ms";
}

Result<HostPort> parse_host_port(std::string_view text) {
  const std::string bad = quote(text) + " is not host:port (use e.g. 127.0.0.1:7000)";
  std::string_view host, port;
  if (!text.empty() && text.front() == '[') {
    size_t close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      return invalid_argument(bad);
    }
    host = text.substr(1, close - 1);
    port = text.substr(close + 2);
  } else {
    size_t colon = text.rfind(':');
    if (colon == std::string_view::npos) return invalid_argument(bad);
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
    if (host.find(':') != std::string_view::npos) {
      return invalid_argument(quote(text) + " is not host:port (write IPv6 hosts as [::1]:7000)");
    }
  }
  if (host.empty() || !valid_chars(host, true)) return invalid_argument(bad);
  auto n = to_int(port);
  if (!n || port.front() == '+' || port.front() == '-') return invalid_argument(bad);
  if (*n > 65535)
    return invalid_argument(quote(text) + ": port " + std::string(port) +
                            " is out of range 0..65535");
  return HostPort{std::string(host), static_cast<uint16_t>(*n)};
}

Result<ClusterConfig> parse_config(std::string_view yaml, const ParseOptions& options) {
  try {
    return Parser(options).run(yaml);
  } catch (const YAML::Exception& e) {
    std::string where = options.source_name;
    if (e.mark.line >= 0) {
      where += ":" + std::to_string(e.mark.line + 1) + ":" + std::to_string(e.mark.column + 1);
    }
    return invalid_argument("config: " + where + ": YAML syntax error: " + e.msg);
  } catch (const std::exception& e) {
    return invalid_argument("config: " + options.source_name + ": " + e.what());
  }
}

Result<ClusterConfig> load_config_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return not_found("config: cannot read '" + path + "'");
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return not_found("config: cannot read '" + path + "'");
  ParseOptions options;
  options.source_name = path;
  std::error_code ec;
  fs::path abs = fs::absolute(path, ec);
  options.base_dir = (ec ? fs::path(path) : abs).parent_path().lexically_normal().string();
  return parse_config(text.str(), options);
}

Status validate_for_role(const NodeConfig& config, Role role) {
  std::string p = role_problem(config, role);
  return p.empty() ? Status() : invalid_argument("config: " + p);
}

Result<NodeConfig> select_node(const ClusterConfig& config, Role role, std::string_view node_name) {
  if (node_name.empty()) {
    KVGATE_RETURN_IF_ERROR(validate_for_role(config.base, role));
    return config.base;
  }
  std::vector<std::string> names;
  for (const auto& n : config.local.nodes) {
    if (n.name != node_name) {
      names.push_back(n.name);
      continue;
    }
    if (n.role != role) {
      return invalid_argument("config: local node '" + n.name + "' is a " +
                              std::string(role_name(n.role)) + " node, not " +
                              std::string(role_name(role)));
    }
    KVGATE_RETURN_IF_ERROR(validate_for_role(n.config, role));
    return n.config;
  }
  return not_found("config: no local node named '" + std::string(node_name) +
                   "' (nodes: " + (names.empty() ? "none" : join(names, ", ")) + ")");
}

std::string format_config(const ClusterConfig& config, const FormatOptions& o) {
  std::string out;
  if (o.comments) {
    comment(out, "",
            "kvgate configuration (configs/README.md). A missing key takes its default; "
            "relative paths resolve against this file's directory.");
    out += "\n";
  }
  std::string section;
  for (const auto& key : node_table().keys) {
    if (section_of(key.path) != section) {
      section = section_of(key.path);
      out += (out.empty() || out.ends_with("\n\n") ? "" : "\n") + section + ":\n";
    }
    emit_key(out, key, config.base, o);
  }
  out += "\nlocal:\n";
  for (const auto& key : local_table().keys) emit_key(out, key, config, o);
  if (o.comments) comment(out, "  ", kNodesHelp);
  if (config.local.nodes.empty()) out += "  nodes: []\n";
  if (!config.local.nodes.empty()) out += "  nodes:\n";
  for (const auto& node : config.local.nodes) {
    out += "    - name: " + quote(node.name) +
           "\n      role: " + std::string(role_name(node.role)) + "\n";
    section.clear();
    for (const auto& key : node_table().keys) {
      if (key.path == "cluster.node_name" || key.get(node.config) == key.get(config.base)) continue;
      if (section_of(key.path) != section) {
        section = section_of(key.path);
        out += "      " + section + ":\n";
      }
      out += "        " + leaf_of(key.path) + ": " + key_text(key, node.config, o) + "\n";
    }
  }
  return out;
}

std::string format_defaults() {
  return format_config(ClusterConfig{});
}

std::vector<ConfigKeyInfo> config_keys() {
  std::vector<ConfigKeyInfo> out;
  const NodeConfig node;
  const ClusterConfig cluster;
  for (const auto& k : node_table().keys) {
    out.push_back({k.path, k.type, k.get(node), k.allowed, k.help});
  }
  for (const auto& k : local_table().keys) {
    out.push_back({k.path, k.type, k.get(cluster), k.allowed, k.help});
  }
  out.push_back({"local.nodes", "list of nodes", "[]", "", kNodesHelp});
  return out;
}

Result<std::string> config_value(const NodeConfig& config, std::string_view path) {
  const Key<NodeConfig>* key = node_table().find(path);
  if (!key) return not_found("config: no key " + std::string(path));
  return key->get(config);
}

std::string format_reference_markdown() {
  // '|' would end a table cell.
  auto cell = [](const std::string& text) {
    std::string out;
    for (char c : text) out += c == '|' ? std::string(", ") : std::string(1, c);
    return out;
  };
  std::string out, section;
  for (const auto& k : config_keys()) {
    if (section_of(k.path) != section) {
      out += section.empty() ? "" : "\n";
      section = section_of(k.path);
      out += "### `" + section +
             "`\n\n| key | type | default | allowed | meaning |\n"
             "|---|---|---|---|---|\n";
    }
    out += "| `" + k.path + "` | " + k.type + " | `" + k.default_value + "` | " + cell(k.allowed) +
           " | " + cell(k.help) + " |\n";
  }
  return out;
}

}  // namespace kvgate
