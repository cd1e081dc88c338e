// Payload codecs of the control-plane messages (common/control_protocol.h).
//
// Each message lists its fields once, in `fields(io, message)`; three "IO"
// walkers run that list: Encoder in counting mode (payload size), Encoder in
// writing mode, and Decoder, which checks every length against the bytes
// left and names the field it was reading when something is wrong. Because
// all three walk the same list, the encodings cannot drift apart.
#include <algorithm>
#include <bit>
#include <cassert>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

#include "common/control_protocol.h"

namespace kvgate::control {
namespace {

// ------------------------------------------------------------ field lists
// The order of fields is the wire order: change it only with the version.

template <typename T, typename U>
concept Is = std::same_as<std::remove_const_t<T>, U>;

template <typename IO, Is<Hello> M>
void fields(IO& io, M& m) {
  io.field("role", m.role);
  io.field("node_id", m.node_id);
  io.field("node_name", m.node_name);
  io.field("cluster_token", m.cluster_token);
  io.field("protocol_version", m.protocol_version);
  io.field("model_name", m.model_name);
  io.field("control_address", m.control_address);
  io.field("transport_name", m.transport_name);
  io.field("transport_address", m.transport_address);
}

template <typename IO, Is<HelloAck> M>
void fields(IO& io, M& m) {
  io.field("node_id", m.node_id);
  io.field("protocol_version", m.protocol_version);
  io.field("heartbeat_interval", m.heartbeat_interval);
}

template <typename IO, Is<HelloReject> M>
void fields(IO& io, M& m) {
  io.field("code", m.code);
  io.require(m.code != StatusCode::kOk, "code", "a rejection cannot be OK");
  io.field("reason", m.reason);
}

template <typename IO, Is<Heartbeat> M>
void fields(IO& io, M& m) {
  io.field("node_id", m.node_id);
  io.field("sequence", m.sequence);
  io.field("pool_free_bytes", m.pool_free_bytes);
  io.field("pool_reserved_bytes", m.pool_reserved_bytes);
  io.field("pool_used_bytes", m.pool_used_bytes);
  io.field("queue_length", m.queue_length);
  io.field("queued_tokens", m.queued_tokens);
  io.field("in_flight_requests", m.in_flight_requests);
}

template <typename IO, Is<Reserve> M>
void fields(IO& io, M& m) {
  io.field("request_id", m.request_id);
  io.field("size_bytes", m.size_bytes);
  io.field("lease_ttl", m.lease_ttl);
}

template <typename IO, Is<ReserveGrant> M>
void fields(IO& io, M& m) {
  io.field("request_id", m.request_id);
  io.field("lease_id", m.lease_id);
  io.field("granted_bytes", m.granted_bytes);
  io.field("expires_in", m.expires_in);
  io.field("pool_descriptor", m.pool_descriptor);
}

template <typename IO, Is<ReserveDeny> M>
void fields(IO& io, M& m) {
  io.field("request_id", m.request_id);
  io.field("code", m.code);
  io.require(m.code != StatusCode::kOk, "code", "a denial cannot be OK");
  io.field("reason", m.reason);
  io.field("available_bytes", m.available_bytes);
}

template <typename IO, Is<Extend> M>
void fields(IO& io, M& m) {
  io.field("request_id", m.request_id);
  io.field("lease_id", m.lease_id);
  io.field("extra_bytes", m.extra_bytes);
}

template <typename IO, Is<ExtendResult> M>
void fields(IO& io, M& m) {
  io.field("request_id", m.request_id);
  io.field("lease_id", m.lease_id);
  io.field("code", m.code);
  io.field("message", m.message);
  io.field("granted_bytes", m.granted_bytes);
  io.field("expires_in", m.expires_in);
  io.field("pool_descriptor", m.pool_descriptor);
}

template <typename IO, Is<Commit> M>
void fields(IO& io, M& m) {
  io.field("request_id", m.request_id);
  io.field("lease_id", m.lease_id);
  io.field("committed_bytes", m.committed_bytes);
  io.field("keep_rate", m.keep_rate);
}

template <typename IO, Is<Release> M>
void fields(IO& io, M& m) {
  io.field("request_id", m.request_id);
  io.field("lease_id", m.lease_id);
  io.field("reason", m.reason);
}

template <typename IO, Is<SamplingParams> M>
void fields(IO& io, M& m) {
  io.field("temperature", m.temperature);
  io.field("top_k", m.top_k);
  io.field("top_p", m.top_p);
  io.field("min_p", m.min_p);
  io.field("repetition_penalty", m.repetition_penalty);
  io.field("repetition_window", m.repetition_window);
  io.field("seed", m.seed);
}

template <typename IO, Is<GenerationParams> M>
void fields(IO& io, M& m) {
  io.field("sampling", m.sampling);
  io.field("max_new_tokens", m.max_new_tokens);
  io.list("stop_strings", m.stop_strings, kMaxStopStrings);
  io.field("ignore_eos", m.ignore_eos);
}

template <typename IO, Is<KvPolicyParam> M>
void fields(IO& io, M& m) {
  io.field("key", m.key);
  io.field("value", m.value);
}

template <typename IO, Is<KvPolicySpec> M>
void fields(IO& io, M& m) {
  io.field("name", m.name);
  io.list("params", m.params, kMaxKvPolicyParams);
}

template <typename IO, Is<PrefillJob> M>
void fields(IO& io, M& m) {
  io.field("request_id", m.request_id);
  io.field("prompt_token_ids", m.prompt_token_ids);
  io.field("generation", m.generation);
  io.field("kv_policy", m.kv_policy);
  io.field("decode_node", m.decode_node);
  io.field("decode_transport_address", m.decode_transport_address);
  io.field("decode_control_address", m.decode_control_address);
  io.field("lease_id", m.lease_id);
  io.field("granted_bytes", m.granted_bytes);
  io.field("pool_descriptor", m.pool_descriptor);
  io.field("deadline_in", m.deadline_in);
}

template <typename IO, Is<TransferSegment> M>
void fields(IO& io, M& m) {
  io.field("offset_bytes", m.offset_bytes);
  io.field("length_bytes", m.length_bytes);
  io.require(m.length_bytes <= std::numeric_limits<uint64_t>::max() - m.offset_bytes,
             "length_bytes", "offset + length overflows 64 bits");
  io.field("crc32c", m.crc32c);
}

template <typename IO, Is<TransferManifest> M>
void fields(IO& io, M& m) {
  io.field("request_id", m.request_id);
  io.field("lease_id", m.lease_id);
  io.field("layout_version", m.layout_version);
  io.field("layout_descriptor", m.layout_descriptor);
  io.field("segments", m.segments);
  io.field("actual_bytes", m.actual_bytes);
  io.field("dense_bytes", m.dense_bytes);
  io.field("keep_rate", m.keep_rate);
  io.field("prompt_tokens", m.prompt_tokens);
  io.field("first_token_id", m.first_token_id);
  io.field("generation", m.generation);
  io.field("kv_policy", m.kv_policy);
  io.field("prompt_tail_token_ids", m.prompt_tail_token_ids);
}

template <typename IO, Is<TransferResult> M>
void fields(IO& io, M& m) {
  io.field("request_id", m.request_id);
  io.field("lease_id", m.lease_id);
  io.field("code", m.code);
  io.field("message", m.message);
}

template <typename IO, Is<Usage> M>
void fields(IO& io, M& m) {
  io.field("prompt_tokens", m.prompt_tokens);
  io.field("completion_tokens", m.completion_tokens);
}

template <typename IO, Is<TokenChunk> M>
void fields(IO& io, M& m) {
  io.field("request_id", m.request_id);
  io.field("first_token_index", m.first_token_index);
  io.field("token_ids", m.token_ids);
  io.field("text", m.text);
  io.field("finish_reason", m.finish_reason);
  io.field("usage", m.usage);
}

template <typename IO, Is<Cancel> M>
void fields(IO& io, M& m) {
  io.field("request_id", m.request_id);
  io.field("reason", m.reason);
}

template <typename IO, Is<Error> M>
void fields(IO& io, M& m) {
  io.field("request_id", m.request_id);
  io.field("code", m.code);
  io.require(m.code != StatusCode::kOk, "code", "an error cannot be OK");
  io.field("message", m.message);
}

template <typename IO>
void tp_group_field(IO& io, auto& group) {
  io.field("group", group);
  io.check(!group.empty(), "group", [] { return std::string("empty"); });
  io.check(group.size() <= kMaxTpGroupNameBytes, "group", [&] {
    return std::to_string(group.size()) + " bytes, at most " +
           std::to_string(kMaxTpGroupNameBytes);
  });
}

template <typename IO>
void tp_world_field(IO& io, auto& world) {
  io.field("world", world);
  io.check(world >= 1 && world <= kMaxTpWorld, "world", [&] {
    return std::to_string(world) + " is not in 1.." + std::to_string(kMaxTpWorld);
  });
}

template <typename IO, Is<TpJoin> M>
void fields(IO& io, M& m) {
  tp_group_field(io, m.group);
  io.field("rank", m.rank);
  tp_world_field(io, m.world);
  io.check(m.rank < m.world, "rank", [&] {
    return std::to_string(m.rank) + " >= world " + std::to_string(m.world);
  });
  io.field("unique_id", m.unique_id);
  io.check(m.rank != 0 || m.unique_id.size() == kTpUniqueIdBytes, "unique_id", [&] {
    return std::to_string(m.unique_id.size()) + " bytes from rank 0, need " +
           std::to_string(kTpUniqueIdBytes);
  });
  io.check(m.rank == 0 || m.unique_id.empty(), "unique_id", [&] {
    return std::to_string(m.unique_id.size()) + " bytes from rank " + std::to_string(m.rank) +
           ", only rank 0 sends one";
  });
}

template <typename IO, Is<TpMember> M>
void fields(IO& io, M& m) {
  io.field("node_id", m.node_id);
  io.field("node_name", m.node_name);
}

template <typename IO, Is<TpReady> M>
void fields(IO& io, M& m) {
  tp_group_field(io, m.group);
  tp_world_field(io, m.world);
  io.field("unique_id", m.unique_id);
  io.check(m.unique_id.size() == kTpUniqueIdBytes, "unique_id", [&] {
    return std::to_string(m.unique_id.size()) + " bytes, need " +
           std::to_string(kTpUniqueIdBytes);
  });
  io.list("members", m.members, kMaxTpWorld);
  io.check(m.members.size() == m.world, "members", [&] {
    return std::to_string(m.members.size()) + " members for world " + std::to_string(m.world);
  });
}

// ------------------------------------------------------------ wire types

// The wire's status code numbers are StatusCode's values: pin them, so that
// reordering the enum breaks the build instead of the protocol.
static_assert(static_cast<int>(StatusCode::kOk) == 0);
static_assert(static_cast<int>(StatusCode::kInProgress) == 1);
static_assert(static_cast<int>(StatusCode::kInvalidArgument) == 2);
static_assert(static_cast<int>(StatusCode::kNotFound) == 3);
static_assert(static_cast<int>(StatusCode::kOutOfRange) == 4);
static_assert(static_cast<int>(StatusCode::kDataLoss) == 5);
static_assert(static_cast<int>(StatusCode::kUnimplemented) == 6);
static_assert(static_cast<int>(StatusCode::kResourceExhausted) == 7);
static_assert(static_cast<int>(StatusCode::kUnavailable) == 8);
static_assert(static_cast<int>(StatusCode::kDeadlineExceeded) == 9);
static_assert(static_cast<int>(StatusCode::kCancelled) == 10);
static_assert(static_cast<int>(StatusCode::kPermissionDenied) == 11);
static_assert(static_cast<int>(StatusCode::kFailedPrecondition) == 12);
static_assert(static_cast<int>(StatusCode::kInternal) == 13);

// Enum -> width on the wire and the values a peer may send.
template <typename E>
struct WireEnum;
template <>
struct WireEnum<StatusCode> {
  using Rep = uint16_t;
  static bool valid(Rep v) { return v <= static_cast<Rep>(StatusCode::kInternal); }
};
template <>
struct WireEnum<NodeRole> {
  using Rep = uint8_t;
  static bool valid(Rep v) { return v >= 1 && v <= 3; }
};
template <>
struct WireEnum<FinishReason> {
  using Rep = uint8_t;
  static bool valid(Rep v) { return v <= static_cast<Rep>(FinishReason::kError); }
};

template <typename T>
struct IsStrongId : std::false_type {};
template <typename Tag>
struct IsStrongId<StrongId<Tag>> : std::true_type {};

template <typename T>
struct IsVector : std::false_type {};
template <typename U>
struct IsVector<std::vector<U>> : std::true_type {};

using Millis = std::chrono::milliseconds;

template <typename T>
constexpr bool kIsScalar = std::is_arithmetic_v<T> || std::is_enum_v<T> || IsStrongId<T>::value ||
                           std::is_same_v<T, Millis>;

// Fixed wire width of a scalar field.
template <typename T>
constexpr size_t scalar_bytes() {
  if constexpr (std::is_same_v<T, bool>)
    return 1;
  else if constexpr (std::is_enum_v<T>)
    return sizeof(typename WireEnum<T>::Rep);
  else if constexpr (IsStrongId<T>::value)
    return 8;
  else if constexpr (std::is_same_v<T, Millis>)
    return 4;
  else
    return sizeof(T);
}

// ---------------------------------------------------------------- Encoder

// Walks a field list, writing to `out` (sized by a counting pass first), or
// only counting bytes when `out` is null.
class Encoder {
 public:
  explicit Encoder(std::byte* out) : out_(out) {}
  size_t size() const { return n_; }

  template <typename T>
  void field(const char* /*name*/, const T& v) {
    if constexpr (kIsScalar<T>) {
      put_scalar(v);
    } else if constexpr (std::is_same_v<T, std::string>) {
      put_length(v.size());
      put_raw(v.data(), v.size());
    } else if constexpr (std::is_same_v<T, Bytes>) {
      put_length(v.size());
      put_raw(v.data(), v.size());
    } else if constexpr (IsVector<T>::value) {
      list(nullptr, v, std::numeric_limits<size_t>::max());
    } else {
      fields(*this, v);
    }
  }

  template <typename U>
  void list(const char* /*name*/, const std::vector<U>& v, size_t max_items) {
    assert(v.size() <= max_items && "encoding more list items than a peer accepts");
    put_length(v.size());
    for (const U& x : v) field(nullptr, x);
  }

  void require(bool, const char*, const char*) {}  // the decoder's checks
  template <typename F>
  void check(bool, const char*, F&&) {}

 private:
  template <typename T>
  void put_scalar(const T& v) {
    if constexpr (std::is_same_v<T, bool>) {
      put_uint(v ? 1 : 0, 1);
    } else if constexpr (std::is_enum_v<T>) {
      put_uint(static_cast<typename WireEnum<T>::Rep>(v), scalar_bytes<T>());
    } else if constexpr (IsStrongId<T>::value) {
      put_uint(v.value(), 8);
    } else if constexpr (std::is_same_v<T, Millis>) {
      // Clamped: a deadline already past is 0, one beyond 49 days is 49 days.
      const int64_t ms = std::clamp<int64_t>(v.count(), 0, std::numeric_limits<uint32_t>::max());
      put_uint(static_cast<uint64_t>(ms), 4);
    } else if constexpr (std::is_same_v<T, float>) {
      assert(std::isfinite(v) && "control: a peer rejects non-finite floats");
      put_uint(std::bit_cast<uint32_t>(v), 4);
    } else if constexpr (std::is_same_v<T, double>) {
      assert(std::isfinite(v) && "control: a peer rejects non-finite floats");
      put_uint(std::bit_cast<uint64_t>(v), 8);
    } else {
      put_uint(static_cast<uint64_t>(static_cast<std::make_unsigned_t<T>>(v)), sizeof(T));
    }
  }
  void put_length(size_t n) {
    assert(n <= std::numeric_limits<uint32_t>::max() && "field too long for the wire");
    put_uint(n, 4);
  }
  void put_uint(uint64_t v, size_t width) {
    if (out_ != nullptr) {
      for (size_t i = 0; i < width; ++i) out_[n_ + i] = static_cast<std::byte>(v >> (8 * i));
    }
    n_ += width;
  }
  void put_raw(const void* p, size_t n) {
    if (out_ != nullptr && n != 0) std::memcpy(out_ + n_, p, n);
    n_ += n;
  }

  std::byte* out_;
  size_t n_ = 0;
};

// Smallest encoding of a T (empty strings and lists): the bytes each list
// item must at least take, checked before a list is allocated.
template <typename T>
size_t min_encoded_bytes() {
  static const size_t n = [] {
    Encoder e(nullptr);
    e.field(nullptr, T{});
    return e.size();
  }();
  return n;
}

// ---------------------------------------------------------------- Decoder

// Walks a field list over a payload. The first problem is kept (later
// fields are skipped) and reported with the path of the field.
class Decoder {
 public:
  Decoder(std::span<const std::byte> in, std::string_view message_name)
      : in_(in), message_name_(message_name) {}

  template <typename T>
  void field(const char* name, T& out) {
    if (failed_) return;
    if constexpr (kIsScalar<T>) {
      const std::byte* p = take(name, scalar_bytes<T>());
      if (p != nullptr) get_scalar(name, p, out);
    } else if constexpr (std::is_same_v<T, std::string> || std::is_same_v<T, Bytes>) {
      uint32_t n = 0;
      if (!length(name, n)) return;
      const std::byte* p = take(name, n);
      if (p == nullptr) return;
      out.resize(n);  // n bytes are in the payload: bounded by the frame
      if (n != 0) std::memcpy(out.data(), p, n);
    } else if constexpr (IsVector<T>::value) {
      list(name, out, std::numeric_limits<size_t>::max());
    } else {
      const bool named = name != nullptr && *name != '\0';  // list items are named by index
      if (named) push(name, -1);
      fields(*this, out);
      if (named) pop();
    }
  }

  template <typename U>
  void list(const char* name, std::vector<U>& out, size_t max_items) {
    if (failed_) return;
    uint32_t count = 0;
    if (!length(name, count)) return;
    if (count > max_items) {
      fail(StatusCode::kInvalidArgument, name,
           std::to_string(count) + " items, at most " + std::to_string(max_items));
      return;
    }
    size_t min_item;
    if constexpr (kIsScalar<U>) {
      min_item = scalar_bytes<U>();
    } else {
      min_item = min_encoded_bytes<U>();
    }
    if (uint64_t{count} * min_item > remaining()) {
      fail(StatusCode::kDataLoss, name,
           "count " + std::to_string(count) + " needs at least " +
               std::to_string(uint64_t{count} * min_item) + " bytes, " +
               std::to_string(remaining()) + " left");
      return;
    }
    out.clear();
    out.reserve(count);
    for (uint32_t i = 0; i < count && !failed_; ++i) {
      push(name, i);
      out.emplace_back();
      field("", out.back());
      pop();
    }
  }

  void require(bool ok, const char* name, const char* what) {
    if (!ok && !failed_) fail(StatusCode::kInvalidArgument, name, what);
  }

  // require() with a message built only on failure (it names values).
  template <typename F>
  void check(bool ok, const char* name, F&& what) {
    if (!ok && !failed_) fail(StatusCode::kInvalidArgument, name, what());
  }

  Status finish() {
    if (!failed_ && pos_ != in_.size()) {
      fail(StatusCode::kDataLoss, "",
           std::to_string(in_.size() - pos_) + " trailing bytes after the last field");
    }
    return failed_ ? error_ : Status();
  }

 private:
  struct PathItem {
    const char* name;
    int64_t index;  // -1: a field, not a list item
  };

  size_t remaining() const { return in_.size() - pos_; }

  const std::byte* take(const char* name, size_t n) {
    if (n > remaining()) {
      fail(StatusCode::kDataLoss, name,
           "truncated (need " + std::to_string(n) + " bytes, " + std::to_string(remaining()) +
               " left)");
      return nullptr;
    }
    const std::byte* p = in_.data() + pos_;
    pos_ += n;
    return p;
  }

  static uint64_t load_uint(const std::byte* p, size_t width) {
    uint64_t v = 0;
    for (size_t i = width; i-- > 0;) v = (v << 8) | std::to_integer<uint64_t>(p[i]);
    return v;
  }

  bool length(const char* name, uint32_t& n) {
    const std::byte* p = take(name, 4);
    if (p == nullptr) return false;
    n = static_cast<uint32_t>(load_uint(p, 4));
    return true;
  }

  template <typename T>
  void get_scalar(const char* name, const std::byte* p, T& out) {
    const uint64_t v = load_uint(p, scalar_bytes<T>());
    if constexpr (std::is_same_v<T, bool>) {
      if (v > 1) return fail(StatusCode::kInvalidArgument, name, "bool is " + std::to_string(v));
      out = v == 1;
    } else if constexpr (std::is_enum_v<T>) {
      using Rep = typename WireEnum<T>::Rep;
      if (!WireEnum<T>::valid(static_cast<Rep>(v))) {
        return fail(StatusCode::kInvalidArgument, name, "unknown value " + std::to_string(v));
      }
      out = static_cast<T>(v);
    } else if constexpr (IsStrongId<T>::value) {
      out = T(v);
    } else if constexpr (std::is_same_v<T, Millis>) {
      out = Millis(static_cast<int64_t>(v));
    } else if constexpr (std::is_floating_point_v<T>) {
      using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
      const T f = std::bit_cast<T>(static_cast<Bits>(v));
      if (!std::isfinite(f)) return fail(StatusCode::kInvalidArgument, name, "not a finite number");
      out = f;
    } else {
      out = static_cast<T>(static_cast<std::make_unsigned_t<T>>(v));
    }
  }

  void push(const char* name, int64_t index) {
    if (depth_ < kMaxDepth) path_[depth_] = {name, index};
    ++depth_;
  }
  void pop() { --depth_; }

  void fail(StatusCode code, const char* name, const std::string& what) {
    std::string path = "control: ";
    path += message_name_;
    for (int i = 0; i < std::min(depth_, kMaxDepth); ++i) {
      path += '.';
      path += path_[i].name;
      if (path_[i].index >= 0) path += "[" + std::to_string(path_[i].index) + "]";
    }
    if (name != nullptr && *name != '\0') {
      path += '.';
      path += name;
    }
    failed_ = true;
    error_ = Status(code, path + ": " + what);
  }

  static constexpr int kMaxDepth = 8;
  std::span<const std::byte> in_;
  size_t pos_ = 0;
  std::string_view message_name_;
  PathItem path_[kMaxDepth] = {};
  int depth_ = 0;
  bool failed_ = false;
  Status error_;
};

template <typename M>
Result<Message> decode_as(std::span<const std::byte> payload) {
  M m;
  Decoder d(payload, message_type_name(M::kType));
  fields(d, m);
  if (Status s = d.finish(); !s.ok()) return s;
  return Message(std::move(m));
}

template <size_t I = 0>
Result<Message> decode_dispatch(MessageType type, std::span<const std::byte> payload) {
  if constexpr (I == std::variant_size_v<Message>) {
    return unimplemented("control: unknown message type " +
                         std::to_string(static_cast<unsigned>(type)));
  } else {
    using M = std::variant_alternative_t<I, Message>;
    if (M::kType == type) return decode_as<M>(payload);
    return decode_dispatch<I + 1>(type, payload);
  }
}

template <size_t I = 0>
bool known_type(uint16_t type) {
  if constexpr (I == std::variant_size_v<Message>) {
    return false;
  } else {
    using M = std::variant_alternative_t<I, Message>;
    return static_cast<uint16_t>(M::kType) == type || known_type<I + 1>(type);
  }
}

}  // namespace

MessageType message_type(const Message& message) {
  return std::visit([](const auto& m) { return std::remove_cvref_t<decltype(m)>::kType; }, message);
}

bool is_known_message_type(uint16_t type) {
  return known_type(type);
}

size_t payload_bytes(const Message& message) {
  Encoder e(nullptr);
  std::visit([&](const auto& m) { fields(e, m); }, message);
  return e.size();
}

void write_payload(const Message& message, std::span<std::byte> out) {
  Encoder e(out.data());
  std::visit([&](const auto& m) { fields(e, m); }, message);
  assert(e.size() == out.size() && "write_payload: buffer not sized by payload_bytes");
}

Result<Message> decode_payload(MessageType type, std::span<const std::byte> payload) {
  return decode_dispatch(type, payload);
}

}  // namespace kvgate::control
