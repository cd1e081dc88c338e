// gguf_fuzz_smoke: runs the fuzz entry point (gguf_fuzz.cpp) over a fixed,
// seeded set of mutations of a few valid synthetic GGUF files, so that every
// build (gcc included, no libFuzzer) exercises the reader's error paths.
//
//   gguf_fuzz_smoke [--iterations N] [--seed S] [DIR_OR_FILE...]
//   gguf_fuzz_smoke --write-corpus DIR    # write the synthetic seeds and exit
//
// Extra seeds are read from the files or directories given (the checked-in
// corpus in tests/data/gguf_corpus). Exit status 0 unless a check aborts.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "engine/gguf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

using kvgate::engine::GgmlType;
using kvgate::engine::GgufValueType;

// A seed file plus the offsets of its length/count/type fields, which the
// mutator targets with extreme values.
struct Seed {
  std::string name;
  std::vector<uint8_t> bytes;
  std::vector<size_t> u64_fields;
  std::vector<size_t> u32_fields;
};

class SeedWriter {
 public:
  template <typename T>
  void put(T v) {
    uint8_t b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));
    seed_.bytes.insert(seed_.bytes.end(), b, b + sizeof(T));
  }
  void u32_field(uint32_t v) {
    seed_.u32_fields.push_back(seed_.bytes.size());
    put<uint32_t>(v);
  }
  void u64_field(uint64_t v) {
    seed_.u64_fields.push_back(seed_.bytes.size());
    put<uint64_t>(v);
  }
  void type(GgufValueType t) { u32_field(static_cast<uint32_t>(t)); }
  void str(std::string_view s) {
    u64_field(s.size());
    seed_.bytes.insert(seed_.bytes.end(), s.begin(), s.end());
  }
  void header(uint32_t version, uint64_t n_tensors, uint64_t n_kv) {
    for (char c : std::string_view("GGUF")) put<char>(c);
    u32_field(version);
    u64_field(n_tensors);
    u64_field(n_kv);
  }
  template <typename T>
  void kv(std::string_view key, GgufValueType t, T v) {
    str(key);
    type(t);
    put<T>(v);
  }
  void kv_string(std::string_view key, std::string_view v) {
    str(key);
    type(GgufValueType::kString);
    str(v);
  }
  template <typename T>
  void kv_array(std::string_view key, GgufValueType elem, const std::vector<T>& v) {
    str(key);
    type(GgufValueType::kArray);
    type(elem);
    u64_field(v.size());
    for (const T& x : v) put<T>(x);
  }
  void kv_strings(std::string_view key, const std::vector<std::string>& v) {
    str(key);
    type(GgufValueType::kArray);
    type(GgufValueType::kString);
    u64_field(v.size());
    for (const std::string& s : v) str(s);
  }
  // Tensor info; returns its data size so the caller can lay out the data.
  uint64_t tensor(std::string_view name, std::vector<uint64_t> dims, GgmlType t, uint64_t off) {
    str(name);
    u32_field(static_cast<uint32_t>(dims.size()));
    uint64_t n = 1;
    for (uint64_t d : dims) {
      u64_field(d);
      n *= d;
    }
    u32_field(static_cast<uint32_t>(t));
    u64_field(off);
    return *kvgate::engine::ggml_row_bytes(t, dims[0]) * (n / dims[0]);
  }
  void pad_to(size_t alignment) {
    while (seed_.bytes.size() % alignment != 0) seed_.bytes.push_back(0);
  }
  void data(size_t n, uint8_t fill) { seed_.bytes.insert(seed_.bytes.end(), n, fill); }
  Seed take(std::string name) {
    seed_.name = std::move(name);
    return std::move(seed_);
  }

 private:
  Seed seed_;
};

std::vector<Seed> synthetic_seeds() {
  std::vector<Seed> seeds;
  {  // Every value type, a nested array, custom alignment, three tensors.
    SeedWriter w;
    w.header(3, 3, 16);
    w.kv_string("general.architecture", "llama");
    w.kv<uint32_t>("general.alignment", GgufValueType::kU32, 64);
    w.kv<uint8_t>("t.u8", GgufValueType::kU8, 7);
    w.kv<int8_t>("t.i8", GgufValueType::kI8, -7);
    w.kv<uint16_t>("t.u16", GgufValueType::kU16, 700);
    w.kv<int16_t>("t.i16", GgufValueType::kI16, -700);
    w.kv<int32_t>("t.i32", GgufValueType::kI32, -70000);
    w.kv<float>("t.f32", GgufValueType::kF32, 0.5f);
    w.kv<uint8_t>("t.bool", GgufValueType::kBool, 1);
    w.kv<uint64_t>("t.u64", GgufValueType::kU64, 1ull << 40);
    w.kv<int64_t>("t.i64", GgufValueType::kI64, -(1ll << 40));
    w.kv<double>("t.f64", GgufValueType::kF64, 2.5);
    w.kv_array<float>("t.af32", GgufValueType::kF32, {1.0f, 2.0f});
    w.kv_array<uint64_t>("t.au64", GgufValueType::kU64, {1, 1ull << 63});
    w.kv_strings("t.astr", {"a", "", "bc"});
    w.str("t.nested");  // [[1, 2], ["x"]]
    w.type(GgufValueType::kArray);
    w.type(GgufValueType::kArray);
    w.u64_field(2);
    w.type(GgufValueType::kU16);
    w.u64_field(2);
    w.put<uint16_t>(1);
    w.put<uint16_t>(2);
    w.type(GgufValueType::kString);
    w.u64_field(1);
    w.str("x");
    uint64_t a = w.tensor("a.weight", {32, 2}, GgmlType::kQ8_0, 0);  // 68 bytes
    uint64_t b = w.tensor("b.weight", {8}, GgmlType::kF32, 128);     // 32 bytes
    uint64_t c = w.tensor("c.weight", {256}, GgmlType::kQ4_K, 192);  // 144 bytes
    w.pad_to(64);
    w.data(a, 1);
    w.data(128 - a, 0);
    w.data(b, 2);
    w.data(192 - 128 - b, 0);
    w.data(c, 3);
    seeds.push_back(w.take("all_types.gguf"));
  }
  {  // Header only.
    SeedWriter w;
    w.header(3, 0, 0);
    seeds.push_back(w.take("empty.gguf"));
  }
  {  // Tokenizer-shaped metadata and llama-style tensors.
    SeedWriter w;
    w.header(3, 3, 7);
    w.kv_string("general.architecture", "llama");
    w.kv<uint32_t>("llama.block_count", GgufValueType::kU32, 1);
    w.kv<uint32_t>("llama.embedding_length", GgufValueType::kU32, 64);
    w.kv_string("tokenizer.ggml.model", "gpt2");
    std::vector<std::string> tokens;
    std::vector<int32_t> token_types;
    for (int i = 0; i < 40; ++i) {
      tokens.push_back(i == 1 ? "<|im_start|>" : "t" + std::to_string(i));
      token_types.push_back(i < 3 ? 3 : 1);
    }
    w.kv_strings("tokenizer.ggml.tokens", tokens);
    w.kv_array<int32_t>("tokenizer.ggml.token_type", GgufValueType::kI32, token_types);
    w.kv_strings("tokenizer.ggml.merges", {"t 1", "t 2", "\xc4\xa0 t"});
    uint64_t e = w.tensor("token_embd.weight", {64, 40}, GgmlType::kQ8_0, 0);       // 2720
    uint64_t q = w.tensor("blk.0.attn_q.weight", {64, 64}, GgmlType::kQ4_1, 2720);  // 2560
    uint64_t n = w.tensor("output_norm.weight", {64}, GgmlType::kF32, 5280);        // 256
    w.pad_to(32);
    w.data(e, 4);
    w.data(q, 5);
    w.data(n, 6);
    seeds.push_back(w.take("tokenizer_like.gguf"));
  }
  {  // Version 2, F16/BF16 tensors.
    SeedWriter w;
    w.header(2, 2, 1);
    w.kv_string("general.name", "v2");
    uint64_t h = w.tensor("h", {4, 4}, GgmlType::kF16, 0);
    uint64_t b = w.tensor("b", {16}, GgmlType::kBF16, 32);
    w.pad_to(32);
    w.data(h, 7);
    w.data(32 - h, 0);
    w.data(b, 8);
    seeds.push_back(w.take("v2.gguf"));
  }
  return seeds;
}

std::vector<Seed> read_seeds(const std::string& path) {
  std::vector<Seed> out;
  std::vector<std::filesystem::path> files;
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    for (const auto& e : std::filesystem::directory_iterator(path, ec)) {
      if (e.is_regular_file()) files.push_back(e.path());
    }
    std::sort(files.begin(), files.end());  // deterministic order
  } else {
    files.push_back(path);
  }
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)),
                               std::istreambuf_iterator<char>());
    if (in.bad() || bytes.size() > (1u << 20)) continue;  // seeds are small
    out.push_back({f.filename().string(), std::move(bytes), {}, {}});
  }
  return out;
}

// Runs the entry point on an exact-size heap copy, so a sanitizer build
// catches any read even one byte past the input.
void run_one(const std::vector<uint8_t>& bytes) {
  std::unique_ptr<uint8_t[]> copy(new uint8_t[bytes.size() + (bytes.empty() ? 1 : 0)]);
  if (!bytes.empty()) std::memcpy(copy.get(), bytes.data(), bytes.size());
  LLVMFuzzerTestOneInput(copy.get(), bytes.size());
}

class Mutator {
 public:
  explicit Mutator(uint64_t seed) : rng_(seed) {}

  uint64_t below(uint64_t n) { return n == 0 ? 0 : rng_() % n; }

  void mutate(const Seed& seed, std::vector<uint8_t>& b) {
    static constexpr uint64_t kHuge64[] = {
        ~0ull, 1ull << 63, (1ull << 63) - 1, 1ull << 62, 1ull << 32, 0xffffffff, 0, 1};
    static constexpr uint32_t kOdd32[] = {0, 1, 4, 5, 9, 12, 13, 31, 0xffffffff, 0x80000000};
    switch (below(10)) {
      case 0:  // flip a bit
        if (!b.empty()) b[below(b.size())] ^= static_cast<uint8_t>(1u << below(8));
        break;
      case 1:  // random byte
        if (!b.empty()) b[below(b.size())] = static_cast<uint8_t>(rng_());
        break;
      case 2:  // truncate
        b.resize(below(b.size() + 1));
        break;
      case 3: {  // insert random bytes
        size_t at = below(b.size() + 1);
        size_t n = 1 + below(16);
        std::vector<uint8_t> ins(n);
        for (auto& x : ins) x = static_cast<uint8_t>(rng_());
        b.insert(b.begin() + static_cast<std::ptrdiff_t>(at), ins.begin(), ins.end());
        break;
      }
      case 4: {  // delete a range
        if (b.empty()) break;
        size_t at = below(b.size());
        size_t n = 1 + below(std::min<size_t>(32, b.size() - at));
        b.erase(b.begin() + static_cast<std::ptrdiff_t>(at),
                b.begin() + static_cast<std::ptrdiff_t>(at + n));
        break;
      }
      case 5: {  // duplicate a chunk in place (repeats keys / tensor infos)
        if (b.size() < 2) break;
        size_t at = below(b.size());
        size_t n = 1 + below(std::min<size_t>(64, b.size() - at));
        std::vector<uint8_t> chunk(b.begin() + static_cast<std::ptrdiff_t>(at),
                                   b.begin() + static_cast<std::ptrdiff_t>(at + n));
        b.insert(b.begin() + static_cast<std::ptrdiff_t>(at), chunk.begin(), chunk.end());
        break;
      }
      case 6:
      case 7: {  // a count, length, dim or offset set to an extreme value
        uint64_t v = kHuge64[below(std::size(kHuge64))];
        if (below(3) == 0) v = b.size() + below(64);  // just past the end
        size_t at = seed.u64_fields.empty() ? below(b.size()) & ~size_t{7}
                                            : seed.u64_fields[below(seed.u64_fields.size())];
        if (at + 8 <= b.size()) std::memcpy(b.data() + at, &v, 8);
        break;
      }
      case 8: {  // a type, n_dims or version field set to an odd value
        uint32_t v = kOdd32[below(std::size(kOdd32))];
        size_t at = seed.u32_fields.empty() ? below(b.size()) & ~size_t{3}
                                            : seed.u32_fields[below(seed.u32_fields.size())];
        if (at + 4 <= b.size()) std::memcpy(b.data() + at, &v, 4);
        break;
      }
      default: {  // small arithmetic on a u64 field (off-by-one lengths)
        if (seed.u64_fields.empty()) break;
        size_t at = seed.u64_fields[below(seed.u64_fields.size())];
        if (at + 8 > b.size()) break;
        uint64_t v;
        std::memcpy(&v, b.data() + at, 8);
        v += below(2) ? 1 : ~0ull;  // +1 or -1
        std::memcpy(b.data() + at, &v, 8);
        break;
      }
    }
  }

 private:
  std::mt19937_64 rng_;  // output is fixed by the standard: runs are reproducible
};

int write_corpus(const std::string& dir) {
  std::filesystem::create_directories(dir);
  for (const Seed& s : synthetic_seeds()) {
    std::ofstream out(std::filesystem::path(dir) / s.name, std::ios::binary);
    out.write(reinterpret_cast<const char*>(s.bytes.data()),
              static_cast<std::streamsize>(s.bytes.size()));
    if (!out) {
      std::fprintf(stderr, "cannot write %s/%s\n", dir.c_str(), s.name.c_str());
      return 1;
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  uint64_t iterations = 30000;
  uint64_t prng_seed = 0x6767756600000001ull;
  std::vector<Seed> seeds = synthetic_seeds();
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg == "--iterations" && i + 1 < argc) {
      iterations = std::strtoull(argv[++i], nullptr, 10);
    } else if (arg == "--seed" && i + 1 < argc) {
      prng_seed = std::strtoull(argv[++i], nullptr, 10);
    } else if (arg == "--write-corpus" && i + 1 < argc) {
      return write_corpus(argv[++i]);
    } else {
      for (Seed& s : read_seeds(std::string(arg))) seeds.push_back(std::move(s));
    }
  }

  const auto start = std::chrono::steady_clock::now();
  uint64_t runs = 0;
  // Every seed must parse (checked invariants included), and every prefix
  // of a synthetic seed must fail cleanly.
  for (const Seed& s : seeds) {
    auto f = kvgate::engine::GgufFile::from_memory(s.bytes.data(), s.bytes.size());
    if (!s.u64_fields.empty() && !f.ok()) {
      std::fprintf(stderr, "seed %s does not parse: %s\n", s.name.c_str(),
                   f.status().to_string().c_str());
      return 1;
    }
    run_one(s.bytes);
    ++runs;
    if (s.u64_fields.empty()) continue;
    for (size_t n = 0; n < s.bytes.size(); ++n) {
      std::vector<uint8_t> prefix(s.bytes.begin(),
                                  s.bytes.begin() + static_cast<std::ptrdiff_t>(n));
      run_one(prefix);
      ++runs;
    }
  }

  Mutator m(prng_seed);
  uint64_t parsed = 0;
  for (uint64_t i = 0; i < iterations; ++i) {
    const Seed& seed = seeds[m.below(seeds.size())];
    std::vector<uint8_t> bytes = seed.bytes;
    const uint64_t n_mutations = 1 + m.below(4);
    for (uint64_t k = 0; k < n_mutations; ++k) m.mutate(seed, bytes);
    run_one(bytes);
    if (kvgate::engine::GgufFile::from_memory(bytes.data(), bytes.size()).ok()) ++parsed;
    ++runs;
  }
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  std::printf(
      "gguf_fuzz_smoke: %llu seeds, %llu runs (%llu mutants, %llu of them parsed) in %.0f ms\n",
      static_cast<unsigned long long>(seeds.size()), static_cast<unsigned long long>(runs),
      static_cast<unsigned long long>(iterations), static_cast<unsigned long long>(parsed), ms);
  return 0;
}
