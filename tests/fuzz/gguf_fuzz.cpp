// Fuzz target for the GGUF reader: parse arbitrary bytes, then call every
// accessor on every key and tensor and check the invariants the parser
// promises. Built as a libFuzzer binary (gguf_fuzz, clang, KVGATE_FUZZ=ON)
// and, with any compiler, linked into the deterministic gguf_fuzz_smoke
// driver.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "engine/gguf.h"

namespace {

using kvgate::engine::GgufFile;
using kvgate::engine::GgufTensorInfo;
using kvgate::engine::GgufValueType;

// Aborts so that both libFuzzer and the smoke driver report the input.
#define FUZZ_CHECK(cond)                                                                        \
  do {                                                                                          \
    if (!(cond)) {                                                                              \
      std::fprintf(stderr, "gguf_fuzz: check failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
      std::abort();                                                                             \
    }                                                                                           \
  } while (0)

volatile uint8_t g_sink;

// Reads the first and last byte of a region the parser handed out, after
// checking it lies inside the input; ASan flags any read outside.
void touch(const void* p, size_t n, const uint8_t* lo, size_t size) {
  if (n == 0) return;
  const auto addr = reinterpret_cast<uintptr_t>(p);
  const auto begin = reinterpret_cast<uintptr_t>(lo);
  FUZZ_CHECK(addr >= begin && n <= size && addr - begin <= size - n);
  const auto* b = static_cast<const uint8_t*>(p);
  g_sink = static_cast<uint8_t>(b[0] ^ b[n - 1]);
}

void check_key(const GgufFile& f, const std::string& key, const uint8_t* data, size_t size) {
  FUZZ_CHECK(f.has(key));
  auto type = f.type_of(key);
  FUZZ_CHECK(type.ok());
  const bool is_array = *type == GgufValueType::kArray;

  if (auto v = f.get_uint(key); v.ok()) g_sink = static_cast<uint8_t>(*v);
  if (auto v = f.get_int(key); v.ok()) g_sink = static_cast<uint8_t>(*v);
  if (auto v = f.get_float(key); v.ok()) g_sink = static_cast<uint8_t>(*v == 0.0);
  if (auto v = f.get_bool(key); v.ok()) g_sink = *v;
  auto s = f.get_string(key);
  FUZZ_CHECK(s.ok() == (*type == GgufValueType::kString));
  if (s.ok()) touch(s->data(), s->size(), data, size);

  auto elem = f.array_type(key);
  auto count = f.array_size(key);
  FUZZ_CHECK(elem.ok() == is_array && count.ok() == is_array);
  if (auto v = f.get_string_array(key); v.ok()) {
    FUZZ_CHECK(is_array && v->size() == *count);
    for (std::string_view e : *v) touch(e.data(), e.size(), data, size);
  }
  if (auto v = f.get_int_array(key); v.ok()) FUZZ_CHECK(is_array && v->size() == *count);
  if (auto v = f.get_float_array(key); v.ok()) FUZZ_CHECK(is_array && v->size() == *count);
}

void check_tensor(const GgufFile& f, const GgufTensorInfo& t, const uint8_t* data, size_t size) {
  FUZZ_CHECK(f.find_tensor(t.name) == &t);
  FUZZ_CHECK(!t.dims.empty() && t.dims.size() <= GgufFile::kMaxDims);
  for (int64_t d : t.dims) FUZZ_CHECK(d >= 1);
  FUZZ_CHECK(t.n_elements() >= 1);
  auto row = kvgate::engine::ggml_row_bytes(t.type, static_cast<uint64_t>(t.dims[0]));
  FUZZ_CHECK(row.has_value());
  FUZZ_CHECK(*row * static_cast<uint64_t>(t.n_elements() / t.dims[0]) == t.size_bytes);
  FUZZ_CHECK(t.offset % f.alignment() == 0);
  FUZZ_CHECK(t.data == f.base() + f.data_offset() + t.offset);
  touch(t.data, t.size_bytes, data, size);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto r = GgufFile::from_memory(data, size);
  if (!r.ok()) {
    // Every failure explains itself.
    FUZZ_CHECK(r.status().message().rfind("gguf: ", 0) == 0);
    return 0;
  }
  const GgufFile& f = *r;
  FUZZ_CHECK(f.size_bytes() == size);
  FUZZ_CHECK(f.version() >= GgufFile::kMinVersion && f.version() <= GgufFile::kMaxVersion);
  FUZZ_CHECK(f.alignment() != 0 && (f.alignment() & (f.alignment() - 1)) == 0);
  FUZZ_CHECK(f.data_offset() % f.alignment() == 0);
  const auto keys = f.keys();
  for (const std::string& key : keys) check_key(f, key, data, size);
  FUZZ_CHECK(!f.has("") && f.find_tensor("") == nullptr);
  for (const GgufTensorInfo& t : f.tensors()) check_tensor(f, t, data, size);
  return 0;
}
