#include "engine/gguf.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace kvgate::engine {
namespace {

using VT = GgufValueType;

// Little-endian byte sink for hand-made GGUF files.
class Bytes {
 public:
  template <typename T>
  Bytes& put(T v) {
    uint8_t b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));
    data_.insert(data_.end(), b, b + sizeof(T));
    return *this;
  }
  Bytes& type(VT t) { return put<uint32_t>(static_cast<uint32_t>(t)); }
  Bytes& str(std::string_view s) {
    put<uint64_t>(s.size());
    data_.insert(data_.end(), s.begin(), s.end());
    return *this;
  }
  Bytes& append(const Bytes& other) {
    data_.insert(data_.end(), other.data_.begin(), other.data_.end());
    return *this;
  }
  void pad_to(uint64_t alignment) {
    while (data_.size() % alignment != 0) data_.push_back(0);
  }
  size_t size() const { return data_.size(); }
  const std::vector<uint8_t>& data() const { return data_; }

 private:
  std::vector<uint8_t> data_;
};

// Builds a GGUF file in memory. Defaults make a valid v3 file; the setters
// let a test break exactly one thing.
class GgufBuilder {
 public:
  GgufBuilder& magic(std::string m) {
    magic_ = std::move(m);
    return *this;
  }
  GgufBuilder& version(uint32_t v) {
    version_ = v;
    return *this;
  }
  GgufBuilder& tensor_count(uint64_t n) {
    tensor_count_ = n;
    return *this;
  }
  GgufBuilder& kv_count(uint64_t n) {
    kv_count_ = n;
    return *this;
  }
  // Writes general.alignment (u32) and lays the file out with it.
  GgufBuilder& alignment(uint32_t a) {
    layout_alignment_ = a;
    return scalar<uint32_t>("general.alignment", VT::kU32, a);
  }

  template <typename T>
  GgufBuilder& scalar(std::string_view key, VT t, T v) {
    Bytes b;
    b.str(key).type(t).put<T>(v);
    return raw_kv(b);
  }
  GgufBuilder& string(std::string_view key, std::string_view v) {
    Bytes b;
    b.str(key).type(VT::kString).str(v);
    return raw_kv(b);
  }
  template <typename T>
  GgufBuilder& array(std::string_view key, VT elem, const std::vector<T>& v) {
    Bytes b;
    b.str(key).type(VT::kArray).type(elem).put<uint64_t>(v.size());
    for (const T& x : v) b.put<T>(x);
    return raw_kv(b);
  }
  GgufBuilder& string_array(std::string_view key, const std::vector<std::string>& v) {
    Bytes b;
    b.str(key).type(VT::kArray).type(VT::kString).put<uint64_t>(v.size());
    for (const std::string& s : v) b.str(s);
    return raw_kv(b);
  }
  GgufBuilder& raw_kv(const Bytes& b) {
    kvs_.push_back(b);
    return *this;
  }

  GgufBuilder& tensor(std::string name, std::vector<uint64_t> dims, GgmlType type,
                      std::optional<uint64_t> offset = std::nullopt) {
    return tensor_raw(std::move(name), std::move(dims), static_cast<uint32_t>(type), offset);
  }
  GgufBuilder& tensor_raw(std::string name, std::vector<uint64_t> dims, uint32_t type,
                          std::optional<uint64_t> offset = std::nullopt) {
    tensors_.push_back({std::move(name), std::move(dims), type, offset});
    return *this;
  }

  std::vector<uint8_t> build() const {
    Bytes b;
    for (char ch : magic_) b.put<char>(ch);
    b.put<uint32_t>(version_);
    b.put<uint64_t>(tensor_count_.value_or(tensors_.size()));
    b.put<uint64_t>(kv_count_.value_or(kvs_.size()));
    for (const Bytes& kv : kvs_) b.append(kv);

    struct Placed {
      uint64_t offset;
      uint64_t size;
    };
    std::vector<Placed> placed;
    uint64_t next = 0;
    for (const Tensor& t : tensors_) {
      uint64_t size = tensor_bytes(t);
      next = (next + layout_alignment_ - 1) / layout_alignment_ * layout_alignment_;
      uint64_t offset = t.offset.value_or(next);
      if (!t.offset) next += size;
      placed.push_back({offset, size});
      b.str(t.name).put<uint32_t>(static_cast<uint32_t>(t.dims.size()));
      for (uint64_t d : t.dims) b.put<uint64_t>(d);
      b.put<uint32_t>(t.type).put<uint64_t>(offset);
    }
    if (!tensors_.empty()) b.pad_to(layout_alignment_);
    std::vector<uint8_t> out = b.data();
    const size_t data_start = out.size();
    // Each tensor's bytes are its index + 1, so tests can tell them apart.
    // Regions far past any sane size are left out (hostile offsets).
    constexpr uint64_t kMaxData = 1 << 20;
    for (size_t i = 0; i < placed.size(); ++i) {
      const Placed& p = placed[i];
      if (p.offset > kMaxData || p.size > kMaxData) continue;
      if (out.size() < data_start + p.offset + p.size) out.resize(data_start + p.offset + p.size);
      std::memset(out.data() + data_start + p.offset, static_cast<int>(i + 1), p.size);
    }
    return out;
  }

 private:
  struct Tensor {
    std::string name;
    std::vector<uint64_t> dims;
    uint32_t type;
    std::optional<uint64_t> offset;
  };

  static uint64_t tensor_bytes(const Tensor& t) {
    auto traits = ggml_type_traits(t.type);
    if (!traits || t.dims.empty() || t.dims[0] % traits->block_elems != 0) return 0;
    uint64_t n = 1;
    for (uint64_t d : t.dims) n *= d;  // wraps for hostile dims; never used then
    return n / traits->block_elems * traits->block_bytes;
  }

  std::string magic_ = "GGUF";
  uint32_t version_ = 3;
  std::optional<uint64_t> tensor_count_;
  std::optional<uint64_t> kv_count_;
  uint64_t layout_alignment_ = 32;
  std::vector<Bytes> kvs_;
  std::vector<Tensor> tensors_;
};

Result<GgufFile> parse(const std::vector<uint8_t>& bytes) {
  return GgufFile::from_memory(bytes.data(), bytes.size());
}

// Checks the code and that the message names every `needles` entry.
template <typename T>
void expect_error(const Result<T>& r, StatusCode code, std::vector<std::string> needles) {
  ASSERT_FALSE(r.ok()) << "expected " << status_code_name(code);
  EXPECT_EQ(r.status().code(), code) << r.status().to_string();
  for (const std::string& n : needles) {
    EXPECT_NE(r.status().message().find(n), std::string::npos)
        << "message lacks '" << n << "': " << r.status().to_string();
  }
}

// A small valid file exercising every value type, arrays and tensors.
GgufBuilder full_builder() {
  GgufBuilder b;
  b.string("general.architecture", "llama")
      .scalar<uint8_t>("t.u8", VT::kU8, 200)
      .scalar<int8_t>("t.i8", VT::kI8, -100)
      .scalar<uint16_t>("t.u16", VT::kU16, 60000)
      .scalar<int16_t>("t.i16", VT::kI16, -30000)
      .scalar<uint32_t>("t.u32", VT::kU32, 4000000000u)
      .scalar<int32_t>("t.i32", VT::kI32, -2000000000)
      .scalar<float>("t.f32", VT::kF32, 1.5f)
      .scalar<uint8_t>("t.bool", VT::kBool, 1)
      .scalar<uint64_t>("t.u64", VT::kU64, 0xfedcba9876543210ull)
      .scalar<int64_t>("t.i64", VT::kI64, -1234567890123ll)
      .scalar<double>("t.f64", VT::kF64, -2.25)
      .array<int32_t>("t.arr_i32", VT::kI32, {1, -2, 3})
      .array<float>("t.arr_f32", VT::kF32, {0.5f, -1.0f})
      .string_array("t.arr_str", {"a", "", "<|im_start|>"})
      .tensor("w0", {64, 2}, GgmlType::kQ4_1)
      .tensor("w1", {32}, GgmlType::kF32);
  return b;
}

// ------------------------------------------------------------ round trips

TEST(GgufRoundTrip, EveryScalarType) {
  auto bytes = full_builder().build();
  auto f = parse(bytes);
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(f->size_bytes(), bytes.size());

  EXPECT_EQ(*f->get_uint("t.u8"), 200u);
  EXPECT_EQ(*f->get_int("t.i8"), -100);
  EXPECT_EQ(*f->get_uint("t.u16"), 60000u);
  EXPECT_EQ(*f->get_int("t.i16"), -30000);
  EXPECT_EQ(*f->get_uint("t.u32"), 4000000000u);
  EXPECT_EQ(*f->get_int("t.u32"), 4000000000ll);
  EXPECT_EQ(*f->get_int("t.i32"), -2000000000);
  EXPECT_EQ(*f->get_float("t.f32"), 1.5);
  EXPECT_EQ(*f->get_bool("t.bool"), true);
  EXPECT_EQ(*f->get_uint("t.u64"), 0xfedcba9876543210ull);
  EXPECT_EQ(*f->get_int("t.i64"), -1234567890123ll);
  EXPECT_EQ(*f->get_float("t.f64"), -2.25);
  EXPECT_EQ(*f->get_float("t.i32"), -2000000000.0);  // integers read as floats
  EXPECT_EQ(*f->get_string("general.architecture"), "llama");

  const std::pair<const char*, VT> types[] = {{"t.u8", VT::kU8},
                                              {"t.i8", VT::kI8},
                                              {"t.u16", VT::kU16},
                                              {"t.i16", VT::kI16},
                                              {"t.u32", VT::kU32},
                                              {"t.i32", VT::kI32},
                                              {"t.f32", VT::kF32},
                                              {"t.bool", VT::kBool},
                                              {"t.u64", VT::kU64},
                                              {"t.i64", VT::kI64},
                                              {"t.f64", VT::kF64},
                                              {"t.arr_i32", VT::kArray},
                                              {"general.architecture", VT::kString}};
  for (const auto& [key, type] : types) {
    auto t = f->type_of(key);
    ASSERT_TRUE(t.ok()) << key;
    EXPECT_EQ(*t, type) << key;
  }

  auto keys = f->keys();
  ASSERT_EQ(keys.size(), 15u);
  EXPECT_EQ(keys.front(), "general.architecture");  // file order
  EXPECT_EQ(keys.back(), "t.arr_str");
  EXPECT_TRUE(f->has("t.u8"));
  EXPECT_FALSE(f->has("t.nope"));
}

TEST(GgufRoundTrip, AccessorErrors) {
  auto bytes = full_builder().build();
  auto f = parse(bytes);
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  expect_error(f->get_uint("llama.block_count"), StatusCode::kNotFound,
               {"metadata key 'llama.block_count' missing"});
  expect_error(f->type_of("nope"), StatusCode::kNotFound, {"'nope'"});
  expect_error(f->get_uint("general.architecture"), StatusCode::kInvalidArgument,
               {"metadata key 'general.architecture' has type string, expected integer"});
  expect_error(f->get_uint("t.i8"), StatusCode::kInvalidArgument, {"'t.i8'", "negative", "-100"});
  expect_error(f->get_int("t.u64"), StatusCode::kOutOfRange, {"'t.u64'", "int64"});
  expect_error(f->get_string("t.u8"), StatusCode::kInvalidArgument, {"type u8, expected string"});
  expect_error(f->get_bool("t.u8"), StatusCode::kInvalidArgument, {"'t.u8'", "bool"});
  expect_error(f->get_float("t.bool"), StatusCode::kInvalidArgument, {"'t.bool'"});
  expect_error(f->get_int("t.arr_i32"), StatusCode::kInvalidArgument, {"array of i32"});
  expect_error(f->get_string_array("t.arr_i32"), StatusCode::kInvalidArgument,
               {"'t.arr_i32' has type array of i32, expected array of string"});
  expect_error(f->get_int_array("t.arr_str"), StatusCode::kInvalidArgument,
               {"array of string", "array of integer"});
  expect_error(f->get_float_array("t.arr_str"), StatusCode::kInvalidArgument, {"'t.arr_str'"});
  expect_error(f->get_int_array("t.u32"), StatusCode::kInvalidArgument, {"type u32"});
  expect_error(f->array_size("t.u32"), StatusCode::kInvalidArgument, {"'t.u32'"});
}

TEST(GgufRoundTrip, EveryArrayType) {
  GgufBuilder b;
  b.array<uint8_t>("a.u8", VT::kU8, {0, 255})
      .array<int8_t>("a.i8", VT::kI8, {-128, 127})
      .array<uint16_t>("a.u16", VT::kU16, {1, 65535})
      .array<int16_t>("a.i16", VT::kI16, {-32768, 5})
      .array<uint32_t>("a.u32", VT::kU32, {7, 4294967295u})
      .array<int32_t>("a.i32", VT::kI32, {-7, 8})
      .array<uint64_t>("a.u64", VT::kU64, {9, 1ull << 62})
      .array<uint64_t>("a.u64_big", VT::kU64, {1, 1ull << 63})
      .array<int64_t>("a.i64", VT::kI64, {-(1ll << 62), 10})
      .array<float>("a.f32", VT::kF32, {0.25f, -8.0f})
      .array<double>("a.f64", VT::kF64, {1e300, -0.5})
      .array<uint8_t>("a.bool", VT::kBool, {1, 0, 1})
      .array<uint32_t>("a.empty", VT::kU32, {})
      .string_array("a.str", {"x", "", "\xc4\xa0hello", std::string("nul\0in", 6)})
      .string_array("a.str_empty", {});
  // Array of two arrays: [[1, 2], ["s"]].
  Bytes nested;
  nested.str("a.nested").type(VT::kArray).type(VT::kArray).put<uint64_t>(2);
  nested.type(VT::kU32).put<uint64_t>(2).put<uint32_t>(1).put<uint32_t>(2);
  nested.type(VT::kString).put<uint64_t>(1).str("s");
  b.raw_kv(nested).scalar<uint32_t>("after.nested", VT::kU32, 77);

  auto bytes = b.build();
  auto f = parse(bytes);
  ASSERT_TRUE(f.ok()) << f.status().to_string();

  EXPECT_EQ(*f->get_int_array("a.u8"), (std::vector<int64_t>{0, 255}));
  EXPECT_EQ(*f->get_int_array("a.i8"), (std::vector<int64_t>{-128, 127}));
  EXPECT_EQ(*f->get_int_array("a.u16"), (std::vector<int64_t>{1, 65535}));
  EXPECT_EQ(*f->get_int_array("a.i16"), (std::vector<int64_t>{-32768, 5}));
  EXPECT_EQ(*f->get_int_array("a.u32"), (std::vector<int64_t>{7, 4294967295ll}));
  EXPECT_EQ(*f->get_int_array("a.i32"), (std::vector<int64_t>{-7, 8}));
  EXPECT_EQ(*f->get_int_array("a.u64"), (std::vector<int64_t>{9, 1ll << 62}));
  expect_error(f->get_int_array("a.u64_big"), StatusCode::kOutOfRange, {"'a.u64_big' element 1"});
  EXPECT_EQ(*f->get_int_array("a.i64"), (std::vector<int64_t>{-(1ll << 62), 10}));
  EXPECT_EQ(*f->get_float_array("a.f32"), (std::vector<double>{0.25, -8.0}));
  EXPECT_EQ(*f->get_float_array("a.f64"), (std::vector<double>{1e300, -0.5}));
  EXPECT_EQ(*f->get_float_array("a.i32"), (std::vector<double>{-7.0, 8.0}));
  EXPECT_EQ(*f->array_type("a.bool"), VT::kBool);
  EXPECT_EQ(*f->array_size("a.bool"), 3u);
  EXPECT_TRUE(f->get_int_array("a.empty")->empty());
  EXPECT_TRUE(f->get_string_array("a.str_empty")->empty());

  auto strs = f->get_string_array("a.str");
  ASSERT_TRUE(strs.ok()) << strs.status().to_string();
  ASSERT_EQ(strs->size(), 4u);
  EXPECT_EQ((*strs)[0], "x");
  EXPECT_EQ((*strs)[1], "");
  EXPECT_EQ((*strs)[2], "\xc4\xa0hello");
  EXPECT_EQ((*strs)[3], std::string_view("nul\0in", 6));
  // Views point into the caller's buffer, not copies.
  const char* lo = reinterpret_cast<const char*>(bytes.data());
  EXPECT_GE((*strs)[0].data(), lo);
  EXPECT_LT((*strs)[0].data(), lo + bytes.size());

  // Nested arrays are parsed and bounded but not decoded.
  EXPECT_EQ(*f->array_type("a.nested"), VT::kArray);
  EXPECT_EQ(*f->array_size("a.nested"), 2u);
  expect_error(f->get_int_array("a.nested"), StatusCode::kInvalidArgument, {"array of array"});
  EXPECT_EQ(*f->get_uint("after.nested"), 77u);  // parsing resumed after it
}

TEST(GgufRoundTrip, TensorsDataAndAlignment) {
  auto bytes = full_builder().build();
  auto f = parse(bytes);
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  EXPECT_EQ(f->alignment(), 32u);
  EXPECT_EQ(f->data_offset() % 32, 0u);
  ASSERT_EQ(f->tensors().size(), 2u);

  const GgufTensorInfo* w0 = f->find_tensor("w0");
  ASSERT_NE(w0, nullptr);
  EXPECT_EQ(w0->name, "w0");
  EXPECT_EQ(w0->type, GgmlType::kQ4_1);
  EXPECT_EQ(w0->dims, (std::vector<int64_t>{64, 2}));
  EXPECT_EQ(w0->n_elements(), 128);
  EXPECT_EQ(w0->size_bytes, 4u * 20u);  // 4 blocks of 20 bytes
  EXPECT_EQ(w0->offset, 0u);
  EXPECT_EQ(w0->data, bytes.data() + f->data_offset());
  EXPECT_EQ(w0->data[0], 1);
  EXPECT_EQ(w0->data[w0->size_bytes - 1], 1);

  const GgufTensorInfo* w1 = f->find_tensor("w1");
  ASSERT_NE(w1, nullptr);
  EXPECT_EQ(w1->type, GgmlType::kF32);
  EXPECT_EQ(w1->size_bytes, 128u);
  EXPECT_EQ(w1->offset, 96u);  // 80 rounded up to 32
  EXPECT_EQ(w1->data[0], 2);
  EXPECT_EQ(w1->data + w1->size_bytes, bytes.data() + bytes.size());
  EXPECT_EQ(f->find_tensor("w2"), nullptr);
  EXPECT_EQ(f->find_tensor(""), nullptr);
}

TEST(GgufRoundTrip, CustomAlignmentAndTensorOrder) {
  GgufBuilder b;
  b.alignment(64)
      .tensor("late", {16}, GgmlType::kF16, 128)     // listed first, stored second
      .tensor("early", {32, 3}, GgmlType::kQ8_0, 0)  // 102 bytes
      .tensor("k", {256}, GgmlType::kQ4_K, 192);
  auto bytes = b.build();
  auto f = parse(bytes);
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  EXPECT_EQ(f->alignment(), 64u);
  EXPECT_EQ(f->data_offset() % 64, 0u);
  EXPECT_EQ(f->tensors()[0].name, "late");  // file order kept
  EXPECT_EQ(f->find_tensor("early")->size_bytes, 3u * 34u);
  EXPECT_EQ(f->find_tensor("late")->data[0], 1);
  EXPECT_EQ(f->find_tensor("early")->data[0], 2);
  EXPECT_EQ(f->find_tensor("k")->size_bytes, 144u);
}

TEST(GgufRoundTrip, VersionTwoAcceptedNoTensorsNoPadding) {
  auto bytes = GgufBuilder().version(2).string("k", "v").build();
  auto f = parse(bytes);
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  EXPECT_EQ(f->version(), 2u);
  EXPECT_TRUE(f->tensors().empty());
}

TEST(GgufRoundTrip, MoveKeepsViewsValid) {
  auto bytes = full_builder().build();
  auto f = parse(bytes);
  ASSERT_TRUE(f.ok());
  GgufFile a = std::move(f).value();
  std::string_view arch = *a.get_string("general.architecture");
  GgufFile b = std::move(a);
  EXPECT_EQ(*b.get_string("general.architecture"), arch);
  EXPECT_EQ(b.find_tensor("w1")->data[0], 2);
  const auto other_bytes = GgufBuilder().build();
  auto other = parse(other_bytes);
  ASSERT_TRUE(other.ok());
  GgufFile c = std::move(other).value();
  c = std::move(b);
  EXPECT_EQ(c.tensors().size(), 2u);
  EXPECT_EQ(*c.get_string("general.architecture"), "llama");
}

// --------------------------------------------------------------- hostile

TEST(GgufHostile, BadMagicAndVersions) {
  expect_error(parse(GgufBuilder().magic("GGML").build()), StatusCode::kInvalidArgument,
               {"bad magic", "GGML", "not a GGUF file"});
  expect_error(parse(GgufBuilder().version(1).build()), StatusCode::kUnimplemented, {"version 1"});
  expect_error(parse(GgufBuilder().version(4).build()), StatusCode::kUnimplemented, {"version 4"});
  expect_error(parse(GgufBuilder().version(0x03000000).build()), StatusCode::kUnimplemented,
               {"big-endian"});
  expect_error(parse({}), StatusCode::kDataLoss, {"magic"});
  expect_error(parse({'G', 'G', 'U', 'F', 3}), StatusCode::kDataLoss, {"version"});
}

TEST(GgufHostile, HugeCounts) {
  expect_error(parse(GgufBuilder().kv_count(1ull << 60).build()), StatusCode::kDataLoss,
               {"metadata entry count 1152921504606846976"});
  expect_error(parse(GgufBuilder().string("k", "v").tensor_count(~0ull).build()),
               StatusCode::kDataLoss, {"tensor count 18446744073709551615"});
  // A count that fits the bytes but with entries missing.
  expect_error(parse(GgufBuilder().string("k", std::string(40, 'v')).kv_count(2).build()),
               StatusCode::kDataLoss, {"metadata entry #1"});
}

TEST(GgufHostile, StringsAndArraysPastEnd) {
  {
    Bytes kv;
    kv.str("my.key").type(VT::kString).put<uint64_t>(1000).put<uint32_t>(0);
    expect_error(parse(GgufBuilder().raw_kv(kv).build()), StatusCode::kDataLoss,
                 {"'my.key'", "1000 bytes", "past end"});
  }
  {
    Bytes kv;
    kv.put<uint64_t>(~0ull).put<uint64_t>(0).put<uint64_t>(0);  // key length, then junk
    expect_error(parse(GgufBuilder().raw_kv(kv).build()), StatusCode::kDataLoss,
                 {"metadata entry #0", "key"});
  }
  {  // 2^62 u32 elements need 2^64 bytes: the check must not overflow.
    Bytes kv;
    kv.str("big.u32").type(VT::kArray).type(VT::kU32).put<uint64_t>(1ull << 62).put<uint64_t>(0);
    expect_error(parse(GgufBuilder().raw_kv(kv).build()), StatusCode::kDataLoss,
                 {"'big.u32'", "4611686018427387904 u32"});
  }
  {  // An array of N u32 needs 4N bytes: 3 elements, 11 bytes present.
    Bytes kv;
    kv.str("short.u32").type(VT::kArray).type(VT::kU32).put<uint64_t>(3);
    kv.put<uint32_t>(1).put<uint32_t>(2).put<uint16_t>(3).put<uint8_t>(0);
    expect_error(parse(GgufBuilder().raw_kv(kv).build()), StatusCode::kDataLoss,
                 {"'short.u32'", "array of 3 u32"});
  }
  {
    Bytes kv;
    kv.str("big.str").type(VT::kArray).type(VT::kString).put<uint64_t>(1ull << 40);
    kv.str("a");
    expect_error(parse(GgufBuilder().raw_kv(kv).build()), StatusCode::kDataLoss,
                 {"'big.str'", "1099511627776"});
  }
  {  // Second string of the array runs past the end.
    Bytes kv;
    kv.str("tok").type(VT::kArray).type(VT::kString).put<uint64_t>(2).str("ok");
    kv.put<uint64_t>(500).put<uint64_t>(0);
    expect_error(parse(GgufBuilder().raw_kv(kv).build()), StatusCode::kDataLoss,
                 {"'tok'", "array element 1"});
  }
  {
    Bytes kv;
    kv.str("nest").type(VT::kArray).type(VT::kArray).put<uint64_t>(1ull << 50);
    kv.put<uint64_t>(0).put<uint64_t>(0);
    expect_error(parse(GgufBuilder().raw_kv(kv).build()), StatusCode::kDataLoss, {"'nest'"});
  }
  {  // Deep nesting is refused rather than recursed into.
    Bytes kv;
    kv.str("deep").type(VT::kArray);
    for (int i = 0; i < 100; ++i) kv.type(VT::kArray).put<uint64_t>(1);
    kv.type(VT::kU8).put<uint64_t>(0);
    expect_error(parse(GgufBuilder().raw_kv(kv).build()), StatusCode::kDataLoss,
                 {"'deep'", "nested"});
  }
}

TEST(GgufHostile, BadValueTypesKeysAndDuplicates) {
  {
    Bytes kv;
    kv.str("odd.type").put<uint32_t>(13).put<uint32_t>(0);
    expect_error(parse(GgufBuilder().raw_kv(kv).build()), StatusCode::kDataLoss,
                 {"'odd.type'", "unknown value type 13"});
  }
  {
    Bytes kv;
    kv.str("odd.elem").type(VT::kArray).put<uint32_t>(99).put<uint64_t>(0);
    expect_error(parse(GgufBuilder().raw_kv(kv).build()), StatusCode::kDataLoss,
                 {"'odd.elem'", "99"});
  }
  expect_error(parse(GgufBuilder().string("", "v").build()), StatusCode::kDataLoss, {"empty key"});
  expect_error(parse(GgufBuilder()
                         .scalar<uint32_t>("dup.key", VT::kU32, 1)
                         .string("other", "x")
                         .string("dup.key", "y")
                         .build()),
               StatusCode::kDataLoss, {"duplicate metadata key 'dup.key'"});
  // Binary garbage in a name is escaped in the message.
  auto r = parse(GgufBuilder().string("a\x01", "1").string("a\x01", "2").build());
  expect_error(r, StatusCode::kDataLoss, {"'a\\x01'"});

  const auto bool_bytes = GgufBuilder().scalar<uint8_t>("b", VT::kBool, 7).build();
  auto bad_bool = parse(bool_bytes);
  ASSERT_TRUE(bad_bool.ok());
  expect_error(bad_bool->get_bool("b"), StatusCode::kDataLoss, {"'b'", "bool byte 7"});
}

TEST(GgufHostile, Alignment) {
  expect_error(parse(GgufBuilder().scalar<uint32_t>("general.alignment", VT::kU32, 0).build()),
               StatusCode::kDataLoss, {"general.alignment", "power of two"});
  expect_error(parse(GgufBuilder().scalar<uint32_t>("general.alignment", VT::kU32, 48).build()),
               StatusCode::kDataLoss, {"general.alignment is 48"});
  expect_error(parse(GgufBuilder().string("general.alignment", "32").build()),
               StatusCode::kInvalidArgument, {"general.alignment", "expected integer"});
  expect_error(parse(GgufBuilder().tensor("t.misaligned", {8}, GgmlType::kF32, 16).build()),
               StatusCode::kDataLoss, {"'t.misaligned'", "offset 16", "alignment 32"});
}

TEST(GgufHostile, TensorShapes) {
  expect_error(parse(GgufBuilder().tensor("t.5d", {1, 1, 1, 1, 1}, GgmlType::kF32).build()),
               StatusCode::kDataLoss, {"'t.5d'", "5 dimensions"});
  expect_error(parse(GgufBuilder().tensor("t.0d", {}, GgmlType::kF32).build()),
               StatusCode::kDataLoss, {"'t.0d'", "0 dimensions"});
  expect_error(parse(GgufBuilder().tensor("t.zero", {4, 0}, GgmlType::kF32).build()),
               StatusCode::kDataLoss, {"'t.zero'", "dimension 1 is 0"});
  expect_error(parse(GgufBuilder().tensor("t.neg", {~0ull}, GgmlType::kF32).build()),
               StatusCode::kDataLoss, {"'t.neg'", "dimension 0"});
  expect_error(
      parse(GgufBuilder().tensor("t.overflow", {1ull << 32, 1ull << 32}, GgmlType::kF32).build()),
      StatusCode::kDataLoss, {"'t.overflow'", "overflows"});
  // Element count fits int64 but bytes (x8) do not fit uint64.
  expect_error(parse(GgufBuilder().tensor("t.bytes", {1ull << 62}, GgmlType::kF64).build()),
               StatusCode::kDataLoss, {"'t.bytes'", "overflows"});
  expect_error(parse(GgufBuilder().tensor_raw("t.type", {32}, 4).build()),
               StatusCode::kUnimplemented, {"'t.type'", "unknown type 4"});
  expect_error(parse(GgufBuilder().tensor_raw("t.type", {32}, 1000).build()),
               StatusCode::kUnimplemented, {"unknown type 1000"});
  expect_error(parse(GgufBuilder().tensor("t.row", {33, 2}, GgmlType::kQ4_1).build()),
               StatusCode::kDataLoss, {"'t.row'", "Q4_1", "row length 33", "block size 32"});
  expect_error(parse(GgufBuilder().tensor("", {8}, GgmlType::kF32).build()), StatusCode::kDataLoss,
               {"empty name"});
}

TEST(GgufHostile, TensorPlacement) {
  expect_error(parse(GgufBuilder()
                         .tensor("blk.0.attn_q.weight", {8}, GgmlType::kF32)
                         .tensor("blk.0.attn_q.weight", {8}, GgmlType::kF32)
                         .build()),
               StatusCode::kDataLoss, {"duplicate tensor name 'blk.0.attn_q.weight'"});
  expect_error(parse(GgufBuilder()
                         .tensor("a", {16}, GgmlType::kF32, 0)
                         .tensor("b", {8}, GgmlType::kF32, 32)
                         .build()),
               StatusCode::kDataLoss, {"'a'", "'b'", "overlap"});
  expect_error(parse(GgufBuilder().tensor("far", {8}, GgmlType::kF32, 1ull << 40).build()),
               StatusCode::kDataLoss,
               {"tensor 'far' data [offset 1099511627776, 32 bytes] runs past end of file"});
  expect_error(parse(GgufBuilder().tensor("wrap", {8}, GgmlType::kF32, ~0ull - 31).build()),
               StatusCode::kDataLoss, {"'wrap'", "past end"});
  // Cut the last tensor short by one byte.
  auto bytes = full_builder().build();
  bytes.pop_back();
  expect_error(parse(bytes), StatusCode::kDataLoss,
               {"tensor 'w1'", "runs past end of file (size " + std::to_string(bytes.size())});
}

// Every proper prefix of a valid file is an error, never a crash (the last
// tensor ends at the last byte, so no prefix is complete).
TEST(GgufHostile, TruncationAtEveryByte) {
  const auto bytes = full_builder().build();
  ASSERT_TRUE(parse(bytes).ok());
  for (size_t n = 0; n < bytes.size(); ++n) {
    // A fresh exact-size copy so that ASan catches any read past `n`.
    std::vector<uint8_t> prefix(bytes.begin(), bytes.begin() + n);
    auto f = GgufFile::from_memory(prefix.data(), prefix.size());
    ASSERT_FALSE(f.ok()) << "prefix of " << n << " bytes parsed";
    // Missing bytes are always DATA_LOSS: every field read whole is intact.
    EXPECT_EQ(f.status().code(), StatusCode::kDataLoss) << f.status().to_string();
    EXPECT_EQ(f.status().message().rfind("gguf: ", 0), 0u) << f.status().message();
  }
}

// ------------------------------------------------------------------ files

class TempFile {
 public:
  explicit TempFile(const std::vector<uint8_t>& bytes) {
    char tmpl[] = "/tmp/gguf_test_XXXXXX";
    int fd = ::mkstemp(tmpl);
    path_ = tmpl;
    if (fd >= 0) {
      if (!bytes.empty()) (void)!::write(fd, bytes.data(), bytes.size());
      ::close(fd);
    }
  }
  ~TempFile() { std::remove(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

TEST(GgufOpen, MapsAFile) {
  auto bytes = full_builder().build();
  TempFile file(bytes);
  auto f = GgufFile::open(file.path());
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  EXPECT_EQ(f->size_bytes(), bytes.size());
  EXPECT_EQ(*f->get_string("general.architecture"), "llama");
  EXPECT_EQ(std::memcmp(f->find_tensor("w0")->data, bytes.data() + f->data_offset(), 80), 0);
}

TEST(GgufOpen, Errors) {
  expect_error(GgufFile::open("/nonexistent/model.gguf"), StatusCode::kNotFound,
               {"/nonexistent/model.gguf"});
  expect_error(GgufFile::open("/tmp"), StatusCode::kInvalidArgument, {"not a regular file"});
  TempFile empty({});
  expect_error(GgufFile::open(empty.path()), StatusCode::kDataLoss, {"empty"});
  auto bytes = full_builder().build();
  bytes.resize(bytes.size() - 10);
  TempFile cut(bytes);
  expect_error(GgufFile::open(cut.path()), StatusCode::kDataLoss, {"'w1'", cut.path()});
}

// ------------------------------------------------------------- real model

TEST(GgufRealModel, SmolLM2) {
  const std::string path = KVGATE_TEST_MODEL;
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "model not present: " << path;
  const auto start = std::chrono::steady_clock::now();
  auto f = GgufFile::open(path);
  const auto elapsed = std::chrono::steady_clock::now() - start;
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  std::printf("parsed %s in %.2f ms\n", path.c_str(),
              std::chrono::duration<double, std::milli>(elapsed).count());

  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(f->tensors().size(), 272u);
  EXPECT_EQ(*f->get_string("general.architecture"), "llama");
  EXPECT_EQ(*f->get_uint("llama.block_count"), 30u);
  EXPECT_EQ(*f->get_uint("llama.embedding_length"), 576u);
  EXPECT_EQ(*f->get_uint("llama.attention.head_count"), 9u);
  EXPECT_EQ(*f->get_uint("llama.attention.head_count_kv"), 3u);

  auto tokens = f->get_string_array("tokenizer.ggml.tokens");
  ASSERT_TRUE(tokens.ok()) << tokens.status().to_string();
  ASSERT_EQ(tokens->size(), 49152u);
  EXPECT_EQ((*tokens)[1], "<|im_start|>");
  EXPECT_EQ(*f->array_size("tokenizer.ggml.tokens"), 49152u);
  auto merges = f->get_string_array("tokenizer.ggml.merges");
  ASSERT_TRUE(merges.ok()) << merges.status().to_string();
  EXPECT_GT(merges->size(), 40000u);

  const GgufTensorInfo* embd = f->find_tensor("token_embd.weight");
  ASSERT_NE(embd, nullptr);
  EXPECT_EQ(embd->type, GgmlType::kQ8_0);
  EXPECT_EQ(embd->dims, (std::vector<int64_t>{576, 49152}));
  EXPECT_EQ(embd->size_bytes, 576u / 32 * 34 * 49152);
  const GgufTensorInfo* q = f->find_tensor("blk.0.attn_q.weight");
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(q->type, GgmlType::kQ4_1);
  EXPECT_EQ(q->dims, (std::vector<int64_t>{576, 576}));
  EXPECT_EQ(q->size_bytes, 576u / 32 * 20 * 576);

  const uint8_t* lo = f->base();
  uint64_t total = 0;
  for (const GgufTensorInfo& t : f->tensors()) {
    EXPECT_EQ(t.offset % f->alignment(), 0u) << t.name;
    EXPECT_GE(t.data, lo + f->data_offset()) << t.name;
    EXPECT_LE(t.data + t.size_bytes, lo + f->size_bytes()) << t.name;
    EXPECT_EQ(f->find_tensor(t.name), &t);
    total += t.size_bytes;
  }
  EXPECT_LE(total, f->size_bytes());
  EXPECT_LT(elapsed, std::chrono::seconds(2));  // metadata is viewed, not copied
}

}  // namespace
}  // namespace kvgate::engine
