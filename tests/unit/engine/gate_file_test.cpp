// The gate side file (engine/gate_file.h), the GGUF writer under it and the
// GateModel checks (engine/gate.h). Everything but the last tests runs on
// small synthetic gates; those skip when the model file is absent.
#include "engine/gate_file.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "common/crc32c.h"
#include "engine/gate.h"
#include "engine/gguf.h"
#include "engine/gguf_writer.h"
#include "tests/unit/engine/test_model.h"
#include "tests/unit/temp_dir.h"

namespace kvgate::engine {
namespace {

namespace fs = std::filesystem;

// Whether `text` contains `part`, with both in the failure message.
::testing::AssertionResult contains(const std::string& text, const std::string& part) {
  if (text.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "\"" << text << "\"\n  does not contain \"" << part << "\"";
}

// A scratch directory per test, removed afterwards.
struct TempDir : kvgate::testing::TempDir {
  TempDir() : kvgate::testing::TempDir("kvgate_gate_file_test") {}
};

ModelFingerprint small_model() {
  ModelFingerprint m;
  m.architecture = "llama";
  m.n_layers = 6;
  m.n_embd = 32;
  m.n_heads = 4;
  m.n_kv_heads = 3;
  m.head_dim = 8;
  m.n_vocab = 100;
  m.token_embd_crc32c = 0xdeadbeef;
  return m;
}

// Ragged: 2, 3 and 1 blocks for the three heads, 6 slots.
constexpr const char* kRaggedMap = "h0: 0-2,3-5\nh1: 0,1-4,5\nh2: 0-5\n";

std::vector<float> random_values(std::mt19937& rng, size_t n) {
  std::normal_distribution<float> dist(0.0f, 0.5f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// A valid gate of `kind` for small_model() with random weights.
GateModel make_gate(GateKind kind, const ModelFingerprint& m = small_model(),
                    const std::string& map = kRaggedMap, uint32_t seed = 1) {
  GateModel g;
  g.model = m;
  auto blocks = kvstore::BlockMap::parse(map, m.n_layers);
  EXPECT_TRUE(blocks.ok()) << blocks.status().to_string();
  g.blocks = *blocks;
  g.kind = kind;
  g.n_embd = m.n_embd;
  g.n_gate_heads = kind == GateKind::kAttention ? 2 : 0;
  g.gate_head_dim = kind == GateKind::kAttention ? 3 : 0;
  g.n_sink_tokens = 4;
  g.n_window_tokens = 64;
  g.target_keep_rate = 0.3;
  g.similarity_threshold = 0.875;
  g.calibration_note = "unit test; seed " + std::to_string(seed);
  std::mt19937 rng(seed);
  const auto proj = static_cast<size_t>(g.gate_dim() * g.n_embd);
  for (int64_t s = 0; s < g.blocks.n_slots(); ++s) {
    GateSlot slot;
    if (kind == GateKind::kAttention) {
      slot.wq = random_values(rng, proj);
      slot.wk = random_values(rng, proj);
      slot.wv = random_values(rng, proj);
      slot.wo = random_values(rng, static_cast<size_t>(g.gate_dim()));
    } else {
      slot.wo = random_values(rng, static_cast<size_t>(g.n_embd));
    }
    slot.bias = random_values(rng, 1)[0];
    slot.threshold = random_values(rng, 1)[0];
    g.slots.push_back(std::move(slot));
  }
  EXPECT_TRUE(g.validate().ok()) << g.validate().to_string();
  return g;
}

// Every field but the weights, compared exactly.
void expect_same_header(const GateModel& a, const GateModel& b) {
  EXPECT_EQ(a.model, b.model);
  EXPECT_EQ(a.blocks, b.blocks);
  EXPECT_EQ(a.kind, b.kind);
  EXPECT_EQ(a.context, b.context);
  EXPECT_EQ(a.n_embd, b.n_embd);
  EXPECT_EQ(a.n_gate_heads, b.n_gate_heads);
  EXPECT_EQ(a.gate_head_dim, b.gate_head_dim);
  EXPECT_EQ(a.n_sink_tokens, b.n_sink_tokens);
  EXPECT_EQ(a.n_window_tokens, b.n_window_tokens);
  EXPECT_EQ(a.target_keep_rate, b.target_keep_rate);
  EXPECT_EQ(a.similarity_threshold, b.similarity_threshold);
  EXPECT_EQ(a.calibration_note, b.calibration_note);
  ASSERT_EQ(a.slots.size(), b.slots.size());
  for (size_t s = 0; s < a.slots.size(); ++s) {
    EXPECT_EQ(a.slots[s].bias, b.slots[s].bias) << "slot " << s;  // always F32
    EXPECT_EQ(a.slots[s].threshold, b.slots[s].threshold) << "slot " << s;
  }
}

// `rounded` maps a saved weight to what the file holds.
void expect_same_weights(const GateModel& a, const GateModel& b,
                         const std::function<float(float)>& rounded) {
  ASSERT_EQ(a.slots.size(), b.slots.size());
  for (size_t s = 0; s < a.slots.size(); ++s) {
    const GateSlot& x = a.slots[s];
    const GateSlot& y = b.slots[s];
    const std::pair<const std::vector<float>*, const std::vector<float>*> fields[] = {
        {&x.wq, &y.wq}, {&x.wk, &y.wk}, {&x.wv, &y.wv}, {&x.wo, &y.wo}};
    for (const auto& [p, q] : fields) {
      ASSERT_EQ(p->size(), q->size()) << "slot " << s;
      for (size_t i = 0; i < p->size(); ++i) {
        ASSERT_EQ(rounded((*p)[i]), (*q)[i]) << "slot " << s << " element " << i;
      }
    }
  }
}

float identity(float x) {
  return x;
}
float via_fp16(float x) {
  return fp16_to_fp32(fp32_to_fp16(x));
}

std::vector<uint8_t> serialize(const GgufWriter& w) {
  auto bytes = w.serialize();
  EXPECT_TRUE(bytes.ok()) << bytes.status().to_string();
  return bytes.ok() ? *bytes : std::vector<uint8_t>{};
}

// Parses `bytes` as a gate file named "mem.gguf".
Result<GateModel> decode(const std::vector<uint8_t>& bytes) {
  KVGATE_ASSIGN_OR_RETURN(GgufFile file, GgufFile::from_memory(bytes.data(), bytes.size()));
  return gate_from_gguf(file, "mem.gguf");
}

GgufWriter gate_writer(const GateModel& g, GateWeightType type = GateWeightType::kF32) {
  auto w = gate_to_gguf(g, type);
  EXPECT_TRUE(w.ok()) << w.status().to_string();
  return std::move(*w);
}

// ------------------------------------------------------------ GGUF writer

TEST(GgufWriterTest, OutputReadsBackWithEveryValue) {
  GgufWriter w;
  w.set_string("general.architecture", "test");
  w.set_uint8("t.u8", 200);
  w.set_int32("t.i32", -123456);
  w.set_uint32("t.u32", 4000000000u);
  w.set_int64("t.i64", -(int64_t{1} << 40));
  w.set_uint64("t.u64", uint64_t{1} << 62);
  w.set_float32("t.f32", 0.15625f);
  w.set_float64("t.f64", 0.1);
  w.set_bool("t.bool", true);
  w.set_string("t.empty", "");
  const std::vector<std::string> strings = {"a", "", "héllo", std::string(300, 'x')};
  w.set_string_array("t.strings", strings);
  const std::vector<int32_t> i32s = {1, -2, 3};
  w.set_int32_array("t.i32s", i32s);
  const std::vector<int64_t> i64s = {int64_t{1} << 50, -7};
  w.set_int64_array("t.i64s", i64s);
  const std::vector<float> f32s = {0.5f, -1.25f};
  w.set_float32_array("t.f32s", f32s);

  std::mt19937 rng(7);
  const std::vector<float> matrix = random_values(rng, 5 * 3);  // [3][5]
  const std::vector<float> vec = random_values(rng, 7);
  const int64_t matrix_ne[] = {5, 3};
  const int64_t vec_ne[] = {7};
  ASSERT_TRUE(w.add_tensor_f32("m", matrix_ne, matrix).ok());
  ASSERT_TRUE(w.add_tensor_f16("v", vec_ne, vec).ok());
  std::vector<uint8_t> q8(34 * 2, 0x11);  // two Q8_0 blocks, one row of 64
  const int64_t q8_ne[] = {64};
  ASSERT_TRUE(w.add_tensor_raw("q", q8_ne, GgmlType::kQ8_0, q8).ok());

  const std::vector<uint8_t> bytes = serialize(w);
  ASSERT_EQ(std::string(bytes.begin(), bytes.begin() + 4), "GGUF");
  EXPECT_EQ(bytes.size() % 32, 0u);
  auto f = GgufFile::from_memory(bytes.data(), bytes.size());
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(f->alignment(), 32u);
  EXPECT_EQ(f->data_offset() % 32, 0u);
  EXPECT_EQ(*f->get_uint("general.alignment"), 32u);
  EXPECT_EQ(*f->type_of("general.alignment"), GgufValueType::kU32);

  std::vector<std::string> keys = {"general.alignment"};
  for (const std::string& k : w.keys()) keys.push_back(k);
  EXPECT_EQ(f->keys(), keys);

  EXPECT_EQ(*f->get_string("general.architecture"), "test");
  EXPECT_EQ(*f->type_of("t.u8"), GgufValueType::kU8);
  EXPECT_EQ(*f->get_uint("t.u8"), 200u);
  EXPECT_EQ(*f->type_of("t.i32"), GgufValueType::kI32);
  EXPECT_EQ(*f->get_int("t.i32"), -123456);
  EXPECT_EQ(*f->type_of("t.u32"), GgufValueType::kU32);
  EXPECT_EQ(*f->get_uint("t.u32"), 4000000000u);
  EXPECT_EQ(*f->type_of("t.i64"), GgufValueType::kI64);
  EXPECT_EQ(*f->get_int("t.i64"), -(int64_t{1} << 40));
  EXPECT_EQ(*f->type_of("t.u64"), GgufValueType::kU64);
  EXPECT_EQ(*f->get_uint("t.u64"), uint64_t{1} << 62);
  EXPECT_EQ(*f->type_of("t.f32"), GgufValueType::kF32);
  EXPECT_EQ(*f->get_float("t.f32"), 0.15625);
  EXPECT_EQ(*f->type_of("t.f64"), GgufValueType::kF64);
  EXPECT_EQ(*f->get_float("t.f64"), 0.1);
  EXPECT_EQ(*f->get_bool("t.bool"), true);
  EXPECT_EQ(*f->get_string("t.empty"), "");
  auto got_strings = f->get_string_array("t.strings");
  ASSERT_TRUE(got_strings.ok());
  ASSERT_EQ(got_strings->size(), strings.size());
  for (size_t i = 0; i < strings.size(); ++i) EXPECT_EQ((*got_strings)[i], strings[i]);
  EXPECT_EQ(*f->array_type("t.i32s"), GgufValueType::kI32);
  EXPECT_EQ(*f->get_int_array("t.i32s"), std::vector<int64_t>({1, -2, 3}));
  EXPECT_EQ(*f->array_type("t.i64s"), GgufValueType::kI64);
  EXPECT_EQ(*f->get_int_array("t.i64s"), i64s);
  EXPECT_EQ(*f->array_type("t.f32s"), GgufValueType::kF32);
  EXPECT_EQ(*f->get_float_array("t.f32s"), std::vector<double>({0.5, -1.25}));

  ASSERT_EQ(f->tensors().size(), 3u);
  const GgufTensorInfo* m = f->find_tensor("m");
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(m->dims, std::vector<int64_t>({5, 3}));
  EXPECT_EQ(m->type, GgmlType::kF32);
  EXPECT_EQ(m->offset % 32, 0u);
  EXPECT_EQ(std::memcmp(m->data, matrix.data(), matrix.size() * sizeof(float)), 0);
  const GgufTensorInfo* v = f->find_tensor("v");
  ASSERT_NE(v, nullptr);
  EXPECT_EQ(v->dims, std::vector<int64_t>({7}));
  EXPECT_EQ(v->type, GgmlType::kF16);
  EXPECT_EQ(v->offset % 32, 0u);
  for (size_t i = 0; i < vec.size(); ++i) {
    fp16_t h;
    std::memcpy(&h, v->data + 2 * i, 2);
    EXPECT_EQ(h, fp32_to_fp16(vec[i]));
  }
  const GgufTensorInfo* q = f->find_tensor("q");
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(q->type, GgmlType::kQ8_0);
  EXPECT_EQ(q->size_bytes, q8.size());
  EXPECT_EQ(std::memcmp(q->data, q8.data(), q8.size()), 0);
}

TEST(GgufWriterTest, SetAgainKeepsPositionRemoveDrops) {
  GgufWriter w;
  w.set_uint32("a", 1);
  w.set_uint32("b", 2);
  w.set_string("a", "now a string");
  EXPECT_EQ(w.keys(), std::vector<std::string>({"a", "b"}));
  EXPECT_TRUE(w.remove("b"));
  EXPECT_FALSE(w.remove("b"));
  EXPECT_FALSE(w.has("b"));
  const std::vector<uint8_t> bytes = serialize(w);
  auto f = GgufFile::from_memory(bytes.data(), bytes.size());
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  EXPECT_EQ(*f->get_string("a"), "now a string");
  EXPECT_FALSE(f->has("b"));
}

TEST(GgufWriterTest, RejectsBadTensorsAndKeys) {
  GgufWriter w;
  const std::vector<float> six(6, 1.0f);
  const int64_t ok_ne[] = {3, 2};
  ASSERT_TRUE(w.add_tensor_f32("t", ok_ne, six).ok());
  EXPECT_TRUE(contains(w.add_tensor_f32("t", ok_ne, six).message(), "added twice"));
  const int64_t wrong_count[] = {4, 2};
  EXPECT_TRUE(contains(w.add_tensor_f32("u", wrong_count, six).message(), "needs 32 bytes"));
  const int64_t zero_dim[] = {6, 0};
  EXPECT_TRUE(contains(w.add_tensor_f32("u", zero_dim, six).message(), "dim 1 is 0"));
  const int64_t five_dims[] = {6, 1, 1, 1, 1};
  EXPECT_TRUE(contains(w.add_tensor_f32("u", five_dims, six).message(), "5 dims"));
  EXPECT_TRUE(contains(w.add_tensor_f32(std::string(64, 'n'), ok_ne, six).message(),
                       "name must be 1 to 63 bytes"));
  const int64_t not_block[] = {6};
  EXPECT_TRUE(contains(
      w.add_tensor_raw("u", not_block, GgmlType::kQ8_0, std::vector<uint8_t>(34)).message(),
      "not a multiple of the Q8_0 block size"));
  EXPECT_EQ(w.n_tensors(), 1u);

  GgufWriter empty_key;
  empty_key.set_uint32("", 1);
  EXPECT_EQ(empty_key.serialize().status().code(), StatusCode::kInvalidArgument);
  GgufWriter alignment_key;
  alignment_key.set_uint32("general.alignment", 64);
  EXPECT_TRUE(contains(alignment_key.serialize().status().message(), "general.alignment"));
  EXPECT_EQ(GgufWriter(24).serialize().status().code(), StatusCode::kInvalidArgument);
}

TEST(GgufWriterTest, WriteFileIsAtomicAndReportsErrno) {
  TempDir dir;
  const std::string path = dir.file("w.gguf");
  GgufWriter w;
  w.set_string("general.architecture", "first");
  ASSERT_TRUE(w.write_file(path).ok());
  w.set_string("general.architecture", "second");
  ASSERT_TRUE(w.write_file(path).ok());  // replaces the old file
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  auto f = GgufFile::open(path);
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  EXPECT_EQ(*f->get_string("general.architecture"), "second");

  const std::string missing_dir = dir.file("no/such/dir/w.gguf");
  Status s = w.write_file(missing_dir);
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_TRUE(contains(s.message(), missing_dir + ".tmp"));
  EXPECT_TRUE(contains(s.message(), "No such file or directory"));
}

// ----------------------------------------------------------- round trips

TEST(GateFileTest, AttentionRoundTripF32IsExact) {
  TempDir dir;
  for (GateContext context : {GateContext::kCache, GateContext::kWindow}) {
    GateModel g = make_gate(GateKind::kAttention);
    g.context = context;
    const std::string path = dir.file(std::string("gate-") + gate_context_name(context) + ".gguf");
    ASSERT_TRUE(save_gate_file(path, g, GateWeightType::kF32).ok());
    EXPECT_FALSE(fs::exists(path + ".tmp"));
    auto back = load_gate_file(path);
    ASSERT_TRUE(back.ok()) << back.status().to_string();
    EXPECT_EQ(back->context, context);
    EXPECT_EQ(back->state_retained(), context == GateContext::kCache);
    expect_same_header(g, *back);
    expect_same_weights(g, *back, identity);
  }
}

TEST(GateFileTest, AttentionRoundTripF16RoundsOnce) {
  TempDir dir;
  const GateModel g = make_gate(GateKind::kAttention, small_model(), kRaggedMap, 2);
  const std::string path = dir.file("gate.gguf");
  ASSERT_TRUE(save_gate_file(path, g).ok());  // F16 is the default
  auto back = load_gate_file(path);
  ASSERT_TRUE(back.ok()) << back.status().to_string();
  expect_same_header(g, *back);
  expect_same_weights(g, *back, via_fp16);
  // And that rounding is within half an fp16 ulp (relative 2^-11).
  for (size_t i = 0; i < g.slots[0].wq.size(); ++i) {
    const float x = g.slots[0].wq[i], y = back->slots[0].wq[i];
    EXPECT_LE(std::fabs(x - y), std::fabs(x) * 0x1p-11f + 0x1p-25f);
  }
  // Half the bytes of the F32 file, give or take the header.
  ASSERT_TRUE(save_gate_file(dir.file("f32.gguf"), g, GateWeightType::kF32).ok());
  EXPECT_LT(fs::file_size(path), fs::file_size(dir.file("f32.gguf")) * 6 / 10);
}

TEST(GateFileTest, LinearRoundTrip) {
  const GateModel g =
      make_gate(GateKind::kLinear, small_model(), "h0: 0-5\nh1: 0-1,2-5\nh2: 0,1,2,3,4,5\n");
  EXPECT_EQ(g.slots.size(), 9u);
  for (GateWeightType type : {GateWeightType::kF32, GateWeightType::kF16}) {
    GgufWriter w = gate_writer(g, type);
    // Linear gates store only wo per slot, plus bias and threshold.
    EXPECT_EQ(w.n_tensors(), g.slots.size() + 2);
    auto back = decode(serialize(w));
    ASSERT_TRUE(back.ok()) << back.status().to_string();
    expect_same_header(g, *back);
    expect_same_weights(g, *back, type == GateWeightType::kF32 ? identity : via_fp16);
    EXPECT_EQ(back->state_bytes_per_token(), 0);
  }
}

TEST(GateFileTest, FileUsesTheDocumentedKeysAndTensors) {
  const GateModel g = make_gate(GateKind::kAttention);
  const std::vector<uint8_t> bytes = serialize(gate_writer(g, GateWeightType::kF16));
  auto f = GgufFile::from_memory(bytes.data(), bytes.size());
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  EXPECT_EQ(*f->get_string("general.architecture"), "kvgate-gate");
  EXPECT_EQ(*f->get_uint("kvgate.gate.version"), kGateFileVersion);
  EXPECT_EQ(*f->get_string("kvgate.gate.kind"), "attention");
  EXPECT_EQ(*f->get_string("kvgate.gate.context"), "cache");  // make_gate's default
  EXPECT_EQ(*f->get_string("kvgate.gate.block_map"), g.blocks.to_string());
  EXPECT_EQ(*f->get_uint("kvgate.model.token_embd_crc32c"), 0xdeadbeefu);
  const GgufTensorInfo* wq = f->find_tensor("gate.4.wq");
  ASSERT_NE(wq, nullptr);
  EXPECT_EQ(wq->dims, std::vector<int64_t>({32, 6}));  // {n_embd, D}: row-major [D][n_embd]
  EXPECT_EQ(wq->type, GgmlType::kF16);
  // Row 1 of slot 4's wq starts n_embd elements in.
  fp16_t h;
  std::memcpy(&h, wq->data + 32 * 2, 2);
  EXPECT_EQ(h, fp32_to_fp16(g.slots[4].wq[32]));
  const GgufTensorInfo* bias = f->find_tensor("gate.bias");
  ASSERT_NE(bias, nullptr);
  EXPECT_EQ(bias->dims, std::vector<int64_t>({6}));
  EXPECT_EQ(bias->type, GgmlType::kF32);
  EXPECT_EQ(f->tensors().size(), 6u * 4 + 2);
}

// ------------------------------------------------------- rejected files

TEST(GateFileTest, OtherVersionIsFailedPrecondition) {
  EXPECT_EQ(kGateFileVersion, 2u);
  for (uint32_t v : {0u, 3u}) {
    GgufWriter w = gate_writer(make_gate(GateKind::kAttention));
    w.set_uint32("kvgate.gate.version", v);
    auto r = decode(serialize(w));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition);
    EXPECT_EQ(r.status().message(), "gate file mem.gguf has format version " + std::to_string(v) +
                                        "; this kvgate reads versions 1 to 2");
  }
}

// Every file written before the context key (version 1, no key) reads as
// context "cache"; a version-1 file with the key (hand-made) is read as
// it says; from version 2 the key is required.
TEST(GateFileTest, VersionOneFilesReadAsCacheContext) {
  GateModel g = make_gate(GateKind::kAttention);
  g.context = GateContext::kWindow;
  {
    GgufWriter w = gate_writer(g);
    w.set_uint32("kvgate.gate.version", 1);
    ASSERT_TRUE(w.remove("kvgate.gate.context"));
    auto r = decode(serialize(w));
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    EXPECT_EQ(r->context, GateContext::kCache);
    EXPECT_TRUE(r->state_retained());
    g.context = GateContext::kCache;
    expect_same_header(g, *r);
    expect_same_weights(g, *r, identity);
    g.context = GateContext::kWindow;
  }
  {
    GgufWriter w = gate_writer(g);
    w.set_uint32("kvgate.gate.version", 1);
    auto r = decode(serialize(w));
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    EXPECT_EQ(r->context, GateContext::kWindow);
  }
  {
    GgufWriter w = gate_writer(g);  // version 2
    ASSERT_TRUE(w.remove("kvgate.gate.context"));
    auto r = decode(serialize(w));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    EXPECT_TRUE(contains(r.status().message(), "missing key 'kvgate.gate.context'"));
  }
}

TEST(GateFileTest, OtherArchitectureIsNotAGateFile) {
  GgufWriter w = gate_writer(make_gate(GateKind::kAttention));
  w.set_string("general.architecture", "llama");
  auto r = decode(serialize(w));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(r.status().message(), "general.architecture is 'llama'"));
  EXPECT_TRUE(contains(r.status().message(), "not a kvgate gate side file"));
}

TEST(GateFileTest, EachMissingKeyIsNamed) {
  const GateModel g = make_gate(GateKind::kAttention);
  const std::vector<std::string> keys = gate_writer(g).keys();
  EXPECT_EQ(keys.size(), 21u);  // the list in gate_file.h, less general.alignment
  for (const std::string& key : keys) {
    GgufWriter w = gate_writer(g);
    ASSERT_TRUE(w.remove(key));
    auto r = decode(serialize(w));
    ASSERT_FALSE(r.ok()) << key;
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << key;
    EXPECT_TRUE(contains(r.status().message(), "missing key '" + key + "'"));
  }
  // general.alignment is optional in GGUF (32 by default).
}

TEST(GateFileTest, KeyOfWrongTypeIsNamed) {
  const GateModel g = make_gate(GateKind::kAttention);
  {
    GgufWriter w = gate_writer(g);
    w.set_uint64("kvgate.gate.n_embd", 32);
    auto r = decode(serialize(w));
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(
        contains(r.status().message(), "key 'kvgate.gate.n_embd' has type u64, expected u32"));
  }
  {
    GgufWriter w = gate_writer(g);
    w.set_float32("kvgate.gate.target_keep_rate", 0.3f);
    auto r = decode(serialize(w));
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(contains(r.status().message(),
                         "key 'kvgate.gate.target_keep_rate' has type f32, expected f64"));
  }
  {
    GgufWriter w = gate_writer(g);
    w.set_string("kvgate.gate.kind", "mlp");
    auto r = decode(serialize(w));
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(contains(r.status().message(), "unknown gate kind 'mlp'"));
  }
  for (uint32_t version : {1u, 2u}) {
    GgufWriter w = gate_writer(g);
    w.set_uint32("kvgate.gate.version", version);
    w.set_string("kvgate.gate.context", "everything");
    auto r = decode(serialize(w));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    EXPECT_TRUE(contains(r.status().message(),
                         "key 'kvgate.gate.context': unknown gate context 'everything' "
                         "(known: cache, window)"));
  }
  {
    GgufWriter w = gate_writer(g);
    w.set_uint32("kvgate.gate.context", 1);
    auto r = decode(serialize(w));
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(contains(r.status().message(),
                         "key 'kvgate.gate.context' has type u32, expected string"));
  }
  {
    GgufWriter w = gate_writer(g);
    w.set_string("kvgate.gate.block_map", "h0: 0-2,4-5\nh1: 0-5\nh2: 0-5\n");  // gap at 3
    auto r = decode(serialize(w));
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(contains(r.status().message(), "kvgate.gate.block_map"));
  }
  {
    GgufWriter w = gate_writer(g);
    w.set_string("kvgate.gate.block_map", "h0: 0-5\nh1: 0-5\n");  // 2 heads, model has 3
    auto r = decode(serialize(w));
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(contains(r.status().message(), "has 2 kv heads"));
  }
  {
    GgufWriter w = gate_writer(g);
    w.set_uint32("kvgate.gate.n_gate_heads", 0);
    auto r = decode(serialize(w));
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(contains(r.status().message(), "kvgate.gate.n_gate_heads 0"));
  }
}

TEST(GateFileTest, WrongTensorShapeTypeOrSetIsNamed) {
  const GateModel g = make_gate(GateKind::kAttention);
  auto expect_error = [&](const std::function<void(GgufWriter&)>& edit, const std::string& what) {
    GgufWriter w = gate_writer(g);
    edit(w);
    auto r = decode(serialize(w));
    ASSERT_FALSE(r.ok()) << what;
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    EXPECT_TRUE(contains(r.status().message(), what));
  };
  const std::vector<float> big(7 * 32, 0.0f);
  expect_error(
      [&](GgufWriter& w) {
        w.remove_tensor("gate.2.wq");
        const int64_t ne[] = {32, 7};
        ASSERT_TRUE(w.add_tensor_f32("gate.2.wq", ne, big).ok());
      },
      "tensor 'gate.2.wq' has shape {32, 7}, expected {32, 6}");
  expect_error(
      [&](GgufWriter& w) {  // transposed
        w.remove_tensor("gate.0.wk");
        const int64_t ne[] = {6, 32};
        ASSERT_TRUE(w.add_tensor_f32("gate.0.wk", ne, g.slots[0].wk).ok());
      },
      "tensor 'gate.0.wk' has shape {6, 32}, expected {32, 6}");
  expect_error(
      [&](GgufWriter& w) {
        w.remove_tensor("gate.threshold");
        const int64_t ne[] = {5};
        ASSERT_TRUE(w.add_tensor_f32("gate.threshold", ne, std::vector<float>(5)).ok());
      },
      "tensor 'gate.threshold' has shape {5}, expected {6}");
  expect_error(
      [&](GgufWriter& w) {
        w.remove_tensor("gate.bias");
        const int64_t ne[] = {6};
        ASSERT_TRUE(w.add_tensor_f16("gate.bias", ne, std::vector<float>(6)).ok());
      },
      "tensor 'gate.bias' has type F16, expected F32");
  expect_error(
      [&](GgufWriter& w) {
        w.remove_tensor("gate.1.wv");
        const int64_t ne[] = {32, 6};
        ASSERT_TRUE(
            w.add_tensor_raw("gate.1.wv", ne, GgmlType::kQ8_0, std::vector<uint8_t>(34 * 6)).ok());
      },
      "tensor 'gate.1.wv' has type Q8_0, expected F32 or F16");
  expect_error([&](GgufWriter& w) { w.remove_tensor("gate.5.wo"); }, "missing tensor 'gate.5.wo'");
  expect_error(
      [&](GgufWriter& w) {
        const int64_t ne[] = {6};
        ASSERT_TRUE(w.add_tensor_f32("gate.6.wo", ne, std::vector<float>(6)).ok());
      },
      "unexpected tensor 'gate.6.wo'");
  // Weights that are not finite are the validator's business.
  expect_error(
      [&](GgufWriter& w) {
        w.remove_tensor("gate.3.wo");
        std::vector<float> wo = g.slots[3].wo;
        wo[1] = std::nanf("");
        const int64_t ne[] = {6};
        ASSERT_TRUE(w.add_tensor_f32("gate.3.wo", ne, wo).ok());
      },
      "gate slot 3 (kv head 1, layers 1-4): wo[1] is nan");
}

TEST(GateFileTest, TruncatedFileIsAnErrorNeverACrash) {
  const GateModel g = make_gate(GateKind::kAttention);
  const std::vector<uint8_t> bytes = serialize(gate_writer(g, GateWeightType::kF16));
  auto whole = GgufFile::from_memory(bytes.data(), bytes.size());
  ASSERT_TRUE(whole.ok());
  // The file may end anywhere in the padding after the last tensor's data.
  uint64_t data_end = whole->data_offset();
  for (const GgufTensorInfo& t : whole->tensors()) {
    data_end = std::max(data_end, whole->data_offset() + t.offset + t.size_bytes);
  }
  const size_t header_end = whole->data_offset();
  int checked = 0;
  for (size_t n = 0; n < bytes.size(); n += n < header_end ? 1 : 13) {
    // An exact-size copy so a read past the end is a sanitizer error.
    const std::vector<uint8_t> prefix(bytes.begin(), bytes.begin() + n);
    auto r = decode(prefix);
    if (n < data_end) {
      ASSERT_FALSE(r.ok()) << "truncated to " << n << " of " << bytes.size() << " bytes";
      ++checked;
    } else {
      ASSERT_TRUE(r.ok()) << r.status().to_string();
    }
  }
  EXPECT_GT(checked, 1000);

  // The same through a real file.
  TempDir dir;
  const std::string path = dir.file("cut.gguf");
  {
    FILE* f = std::fopen(path.c_str(), "wb");
    ASSERT_NE(f, nullptr);
    ASSERT_EQ(std::fwrite(bytes.data(), 1, bytes.size() / 2, f), bytes.size() / 2);
    std::fclose(f);
  }
  auto r = load_gate_file(path);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kDataLoss);
  EXPECT_TRUE(contains(r.status().message(), "gate file " + path + ": "));
}

TEST(GateFileTest, CorruptBytesAreAnErrorOrAValidGate) {
  const std::vector<uint8_t> bytes =
      serialize(gate_writer(make_gate(GateKind::kAttention), GateWeightType::kF16));
  std::mt19937 rng(3);
  std::uniform_int_distribution<size_t> pos(0, bytes.size() - 1);
  std::uniform_int_distribution<int> val(0, 255);
  for (int i = 0; i < 3000; ++i) {
    std::vector<uint8_t> copy = bytes;
    const size_t at = i < 1500 ? i % 1500 : pos(rng);  // every header byte, then anywhere
    copy[at] = static_cast<uint8_t>(val(rng));
    auto r = decode(copy);
    if (r.ok()) {
      EXPECT_TRUE(r->validate().ok());
    }
  }
}

TEST(GateFileTest, MissingFileNamesThePath) {
  auto r = load_gate_file("/nonexistent/kvgate/gate.gguf");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(contains(r.status().message(), "gate file /nonexistent/kvgate/gate.gguf"));
}

// -------------------------------------------------------------- save side

TEST(GateFileTest, SaveRefusesAnInvalidGateAndFp16Overflow) {
  TempDir dir;
  GateModel g = make_gate(GateKind::kAttention);
  g.slots[2].threshold = INFINITY;
  const std::string path = dir.file("bad.gguf");
  Status s = save_gate_file(path, g);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(s.message(), "cannot save gate file " + path));
  EXPECT_TRUE(contains(s.message(), "threshold"));
  EXPECT_FALSE(fs::exists(path));

  g = make_gate(GateKind::kAttention);
  g.slots[1].wk[3] = 1e6f;  // finite as float, inf as fp16
  s = save_gate_file(path, g, GateWeightType::kF16);
  EXPECT_TRUE(contains(s.message(), "gate.1.wk[3]"));
  EXPECT_TRUE(contains(s.message(), "fp16 range"));
  EXPECT_FALSE(fs::exists(path));
  ASSERT_TRUE(save_gate_file(path, g, GateWeightType::kF32).ok());
  auto back = load_gate_file(path);
  ASSERT_TRUE(back.ok()) << back.status().to_string();
  EXPECT_EQ(back->slots[1].wk[3], 1e6f);

  g = make_gate(GateKind::kAttention);
  g.model.n_vocab = int64_t{1} << 33;
  EXPECT_TRUE(contains(save_gate_file(path, g).message(), "kvgate.model.n_vocab"));
}

// ------------------------------------------------------------- GateModel

TEST(GateModelTest, ParseGateKind) {
  EXPECT_EQ(*parse_gate_kind("attention"), GateKind::kAttention);
  EXPECT_EQ(*parse_gate_kind("linear"), GateKind::kLinear);
  EXPECT_STREQ(gate_kind_name(GateKind::kAttention), "attention");
  EXPECT_STREQ(gate_kind_name(GateKind::kLinear), "linear");
  auto r = parse_gate_kind("Attention");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(r.status().message(), "known: attention, linear"));
}

TEST(GateModelTest, ParseGateContext) {
  EXPECT_EQ(*parse_gate_context("cache"), GateContext::kCache);
  EXPECT_EQ(*parse_gate_context("window"), GateContext::kWindow);
  EXPECT_STREQ(gate_context_name(GateContext::kCache), "cache");
  EXPECT_STREQ(gate_context_name(GateContext::kWindow), "window");
  auto r = parse_gate_context("Window");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(r.status().message(), "known: cache, window"));
  EXPECT_EQ(GateModel().context, GateContext::kCache);  // what a version-1 file means
}

TEST(GateModelTest, ValidateRejectsEachBadField) {
  struct Case {
    const char* what;
    GateKind kind;
    std::function<void(GateModel&)> edit;
  };
  const auto A = GateKind::kAttention;
  const auto L = GateKind::kLinear;
  const Case cases[] = {
      {"n_embd 31 differs from the model's n_embd 32", A, [](GateModel& g) { g.n_embd = 31; }},
      {"block map has 6 layers; the model has n_layers 7", A,
       [](GateModel& g) { g.model.n_layers = 7; }},
      {"block map has 3 kv heads; the model has n_kv_heads 4", A,
       [](GateModel& g) { g.model.n_kv_heads = 4; }},
      {"has 5 slots; the block map has 6", A, [](GateModel& g) { g.slots.pop_back(); }},
      {"gate slot 2 (kv head 1, layers 0-0): wq has 191 values, expected 192", A,
       [](GateModel& g) { g.slots[2].wq.pop_back(); }},
      {"gate slot 0 (kv head 0, layers 0-2): wv has 0 values", A,
       [](GateModel& g) { g.slots[0].wv.clear(); }},
      {"gate slot 5 (kv head 2, layers 0-5): wo has 7 values, expected 6", A,
       [](GateModel& g) { g.slots[5].wo.push_back(0); }},
      {"gate slot 1 (kv head 0, layers 3-5): wk[5] is nan", A,
       [](GateModel& g) { g.slots[1].wk[5] = std::nanf(""); }},
      {"gate slot 4 (kv head 1, layers 5-5): bias is inf", A,
       [](GateModel& g) { g.slots[4].bias = INFINITY; }},
      {"gate slot 3 (kv head 1, layers 1-4): threshold is nan", A,
       [](GateModel& g) { g.slots[3].threshold = NAN; }},
      {"n_gate_heads is 0, must be in [1, 64]", A, [](GateModel& g) { g.n_gate_heads = 0; }},
      {"gate_head_dim is 65, must be in [1, 64]", A, [](GateModel& g) { g.gate_head_dim = 65; }},
      {"n_gate_heads is 2, must be 0 for the linear kind", L,
       [](GateModel& g) { g.n_gate_heads = 2; }},
      {"gate_head_dim is 1, must be 0 for the linear kind", L,
       [](GateModel& g) { g.gate_head_dim = 1; }},
      {"gate slot 0 (kv head 0, layers 0-2): wq has 32 values, expected 0", L,
       [](GateModel& g) { g.slots[0].wq.assign(32, 0.0f); }},
      {"gate slot 1 (kv head 0, layers 3-5): wo has 6 values, expected 32 (n_embd)", L,
       [](GateModel& g) { g.slots[1].wo.resize(6); }},
      {"target_keep_rate is 1.5", A, [](GateModel& g) { g.target_keep_rate = 1.5; }},
      {"target_keep_rate is -0.1", A, [](GateModel& g) { g.target_keep_rate = -0.1; }},
      {"target_keep_rate is nan", L, [](GateModel& g) { g.target_keep_rate = NAN; }},
      {"n_window_tokens is 0, must be >= 1", A, [](GateModel& g) { g.n_window_tokens = 0; }},
      {"n_sink_tokens is -1, must be >= 0", A, [](GateModel& g) { g.n_sink_tokens = -1; }},
      {"similarity_threshold is inf", A, [](GateModel& g) { g.similarity_threshold = INFINITY; }},
      {"block map is empty", A, [](GateModel& g) { g.blocks = kvstore::BlockMap(); }},
  };
  for (const Case& c : cases) {
    GateModel g = make_gate(c.kind);
    ASSERT_TRUE(g.validate().ok());
    c.edit(g);
    Status s = g.validate();
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << c.what;
    EXPECT_TRUE(contains(s.message(), c.what));
  }
  // Edge values that are fine.
  GateModel g = make_gate(GateKind::kAttention);
  g.target_keep_rate = 0.0;
  g.n_sink_tokens = 0;
  g.n_window_tokens = 1;
  EXPECT_TRUE(g.validate().ok());
  g.target_keep_rate = 1.0;
  EXPECT_TRUE(g.validate().ok());
}

TEST(GateModelTest, CheckGateMatchesNamesTheFirstDifference) {
  const GateModel g = make_gate(GateKind::kAttention);
  EXPECT_TRUE(check_gate_matches(g, small_model()).ok());

  ModelFingerprint m = small_model();
  m.n_layers = 30;
  Status s = check_gate_matches(g, m);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.message(), "gate file was calibrated for a model with n_layers 6; this model has 30");

  m = small_model();
  m.n_vocab = 49152;
  m.n_embd = 576;  // n_embd comes first
  EXPECT_EQ(check_gate_matches(g, m).message(),
            "gate file was calibrated for a model with n_embd 32; this model has 576");

  m = small_model();
  m.architecture = "qwen2";
  EXPECT_TRUE(
      contains(check_gate_matches(g, m).message(), "architecture 'llama'; this model has 'qwen2'"));

  m = small_model();
  m.token_embd_crc32c = 0x0badf00d;
  s = check_gate_matches(g, m);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(contains(s.message(), "different model's weights"));
  EXPECT_TRUE(contains(s.message(), "0xdeadbeef"));
  EXPECT_TRUE(contains(s.message(), "0x0badf00d"));
}

// ------------------------------------------------------- with the model

TEST(GateFileModelTest, FingerprintIsStableAndTracksTheEmbeddingBytes) {
  KVGATE_REQUIRE_MODEL();
  auto a = fingerprint_model(*L->model);
  ASSERT_TRUE(a.ok()) << a.status().to_string();
  const LlamaConfig& c = L->model->config();
  EXPECT_EQ(a->architecture, "llama");
  EXPECT_EQ(a->n_layers, c.n_layers);
  EXPECT_EQ(a->n_embd, c.n_embd);
  EXPECT_EQ(a->n_heads, c.n_heads);
  EXPECT_EQ(a->n_kv_heads, c.n_kv_heads);
  EXPECT_EQ(a->head_dim, c.head_dim);
  EXPECT_EQ(a->n_vocab, c.n_vocab);

  auto second = LlamaModel::load(KVGATE_TEST_MODEL);
  ASSERT_TRUE(second.ok()) << second.status().to_string();
  auto b = fingerprint_model(**second);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(*a, *b);

  // The crc covers exactly the stored bytes: all rows, in the file's type.
  const GgufTensorInfo* t = L->model->gguf().find_tensor("token_embd.weight");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->data, L->model->token_embd().data);
  EXPECT_EQ(t->size_bytes, *ggml_row_bytes(t->type, static_cast<uint64_t>(c.n_embd)) *
                               static_cast<uint64_t>(c.n_vocab));
  std::vector<uint8_t> bytes(t->data, t->data + t->size_bytes);
  EXPECT_EQ(crc32c(bytes.data(), bytes.size()), a->token_embd_crc32c);
  bytes[bytes.size() / 2] ^= 0x01;
  EXPECT_NE(crc32c(bytes.data(), bytes.size()), a->token_embd_crc32c);
}

TEST(GateFileModelTest, LoadForModelChecksTheFingerprint) {
  KVGATE_REQUIRE_MODEL();
  auto fp = fingerprint_model(*L->model);
  ASSERT_TRUE(fp.ok());
  GateModel g = make_gate(GateKind::kAttention, *fp, [&] {
    auto m = kvstore::BlockMap::uniform(fp->n_layers, fp->n_kv_heads, 4);
    return m.ok() ? m->to_string() : std::string();
  }());
  g.n_gate_heads = 1;
  g.gate_head_dim = 2;
  for (GateSlot& s : g.slots) {
    s.wq.resize(2 * g.n_embd);
    s.wk.resize(2 * g.n_embd);
    s.wv.resize(2 * g.n_embd);
    s.wo.resize(2);
  }
  ASSERT_TRUE(g.validate().ok()) << g.validate().to_string();
  TempDir dir;
  const std::string path = dir.file("smollm.gate.gguf");
  ASSERT_TRUE(save_gate_file(path, g).ok());
  auto loaded = load_gate_for_model(path, *L->model);
  ASSERT_TRUE(loaded.ok()) << loaded.status().to_string();
  EXPECT_EQ(loaded->model, *fp);

  g.model.token_embd_crc32c ^= 1;
  ASSERT_TRUE(save_gate_file(path, g).ok());
  loaded = load_gate_for_model(path, *L->model);
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(contains(loaded.status().message(),
                       "gate file " + path + " was calibrated for a different model's weights"));
}

}  // namespace
}  // namespace kvgate::engine
