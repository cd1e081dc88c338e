#include "tools/synthetic_gguf.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string_view>
#include <vector>

#include "engine/ggml_types.h"
#include "engine/gguf.h"

namespace kvgate::tools {
namespace {

using engine::GgmlType;
using engine::GgufValueType;

constexpr uint32_t kAlignment = 32;  // GGUF's default; stated in general.alignment too

struct TensorPlan {
  std::string name;
  std::vector<int64_t> ne;  // ggml order: ne[0] is the row length
  GgmlType type;
  float bound;  // values ~ U(-bound, bound); 0: all ones (norms)
  uint64_t offset = 0;

  uint64_t n_elements() const {
    uint64_t n = 1;
    for (int64_t d : ne) n *= static_cast<uint64_t>(d);
    return n;
  }
  uint64_t n_bytes() const { return n_elements() * (type == GgmlType::kF32 ? 4 : 2); }
};

uint64_t align_up(uint64_t x) { return (x + kAlignment - 1) / kAlignment * kAlignment; }

// Little-endian encoder of the header (GGUF v3; engine/gguf_writer.h has the
// layout). The tensor data is not held here: it is generated while writing.
class Header {
 public:
  void u32(uint32_t v) { raw(&v, 4); }
  void u64(uint64_t v) { raw(&v, 8); }
  void f32(float v) { raw(&v, 4); }
  void str(std::string_view s) {
    u64(s.size());
    raw(s.data(), s.size());
  }
  void kv_u32(std::string_view k, uint32_t v) {
    str(k);
    u32(static_cast<uint32_t>(GgufValueType::kU32));
    u32(v);
    ++n_kv;
  }
  void kv_f32(std::string_view k, float v) {
    str(k);
    u32(static_cast<uint32_t>(GgufValueType::kF32));
    f32(v);
    ++n_kv;
  }
  void kv_str(std::string_view k, std::string_view v) {
    str(k);
    u32(static_cast<uint32_t>(GgufValueType::kString));
    str(v);
    ++n_kv;
  }
  void raw(const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    bytes.insert(bytes.end(), b, b + n);
  }
  std::vector<uint8_t> bytes;
  uint64_t n_kv = 0;
};

std::vector<TensorPlan> plan_tensors(const SyntheticShape& s) {
  const int64_t q_dim = s.n_heads * s.head_dim();
  const int64_t kv_dim = s.n_kv_heads * s.head_dim();
  auto bound = [](int64_t cols) { return std::sqrt(3.0f / static_cast<float>(cols)); };
  std::vector<TensorPlan> t;
  t.push_back({"token_embd.weight", {s.n_embd, s.n_vocab}, GgmlType::kF16, 1.0f});
  for (int64_t l = 0; l < s.n_layers; ++l) {
    const std::string b = "blk." + std::to_string(l) + ".";
    t.push_back({b + "attn_norm.weight", {s.n_embd}, GgmlType::kF32, 0.0f});
    t.push_back({b + "attn_q.weight", {s.n_embd, q_dim}, GgmlType::kF16, bound(s.n_embd)});
    t.push_back({b + "attn_k.weight", {s.n_embd, kv_dim}, GgmlType::kF16, bound(s.n_embd)});
    t.push_back({b + "attn_v.weight", {s.n_embd, kv_dim}, GgmlType::kF16, bound(s.n_embd)});
    t.push_back({b + "attn_output.weight", {q_dim, s.n_embd}, GgmlType::kF16, bound(q_dim)});
    t.push_back({b + "ffn_norm.weight", {s.n_embd}, GgmlType::kF32, 0.0f});
    t.push_back({b + "ffn_gate.weight", {s.n_embd, s.n_ff}, GgmlType::kF16, bound(s.n_embd)});
    t.push_back({b + "ffn_up.weight", {s.n_embd, s.n_ff}, GgmlType::kF16, bound(s.n_embd)});
    t.push_back({b + "ffn_down.weight", {s.n_ff, s.n_embd}, GgmlType::kF16, bound(s.n_ff)});
  }
  t.push_back({"output_norm.weight", {s.n_embd}, GgmlType::kF32, 0.0f});
  t.push_back({"output.weight", {s.n_embd, s.n_vocab}, GgmlType::kF16, bound(s.n_embd)});
  uint64_t off = 0;
  for (TensorPlan& p : t) {
    p.offset = off;
    off = align_up(off + p.n_bytes());
  }
  return t;
}

Header make_header(const SyntheticShape& s, const std::vector<TensorPlan>& tensors) {
  Header kv;
  kv.kv_u32("general.alignment", kAlignment);
  kv.kv_str("general.architecture", "llama");
  kv.kv_str("general.name", "synthetic-" + s.name + " (random weights, benchmarks only)");
  kv.kv_u32("general.file_type", 1);  // LLAMA_FTYPE_MOSTLY_F16
  kv.kv_u32("llama.block_count", static_cast<uint32_t>(s.n_layers));
  kv.kv_u32("llama.context_length", static_cast<uint32_t>(s.n_ctx_train));
  kv.kv_u32("llama.embedding_length", static_cast<uint32_t>(s.n_embd));
  kv.kv_u32("llama.feed_forward_length", static_cast<uint32_t>(s.n_ff));
  kv.kv_u32("llama.attention.head_count", static_cast<uint32_t>(s.n_heads));
  kv.kv_u32("llama.attention.head_count_kv", static_cast<uint32_t>(s.n_kv_heads));
  kv.kv_f32("llama.rope.freq_base", s.rope_freq_base);
  kv.kv_f32("llama.attention.layer_norm_rms_epsilon", s.rms_eps);
  kv.kv_u32("llama.rope.dimension_count", static_cast<uint32_t>(s.head_dim()));
  kv.kv_u32("llama.vocab_size", static_cast<uint32_t>(s.n_vocab));
  kv.kv_str("tokenizer.ggml.model", "none");

  Header h;
  h.raw("GGUF", 4);
  h.u32(3);
  h.u64(tensors.size());
  h.u64(kv.n_kv);
  h.raw(kv.bytes.data(), kv.bytes.size());
  for (const TensorPlan& t : tensors) {
    h.str(t.name);
    h.u32(static_cast<uint32_t>(t.ne.size()));
    for (int64_t d : t.ne) h.u64(static_cast<uint64_t>(d));
    h.u32(static_cast<uint32_t>(t.type));
    h.u64(t.offset);
  }
  h.bytes.resize(align_up(h.bytes.size()), 0);
  return h;
}

Status io_error(const std::string& what, const std::string& path, int err) {
  std::string m = what + " " + path + ": " + std::strerror(err);
  return err == ENOSPC ? resource_exhausted(m) : internal_error(m);
}

}  // namespace

int64_t SyntheticShape::n_params() const {
  const int64_t q_dim = n_heads * head_dim(), kv_dim = n_kv_heads * head_dim();
  const int64_t layer = 2 * n_embd + 2 * q_dim * n_embd + 2 * kv_dim * n_embd + 3 * n_ff * n_embd;
  return n_layers * layer + 2 * n_vocab * n_embd + n_embd;
}

Status SyntheticShape::validate() const {
  auto in = [](int64_t v, int64_t lo, int64_t hi) { return v >= lo && v <= hi; };
  if (!in(n_layers, 1, 1024)) return invalid_argument("n_layers must be in [1, 1024]");
  if (!in(n_embd, 2, 1 << 16)) return invalid_argument("n_embd must be in [2, 65536]");
  if (!in(n_ff, 1, 1 << 20)) return invalid_argument("n_ff must be in [1, 2^20]");
  if (!in(n_heads, 1, n_embd) || n_embd % n_heads != 0) {
    return invalid_argument("n_heads must divide n_embd");
  }
  if (head_dim() % 2 != 0) return invalid_argument("head dim (n_embd / n_heads) must be even");
  if (!in(n_kv_heads, 1, n_heads) || n_heads % n_kv_heads != 0) {
    return invalid_argument("n_kv_heads must divide n_heads");
  }
  if (!in(n_vocab, 1, 1 << 24)) return invalid_argument("n_vocab must be in [1, 2^24]");
  if (!in(n_ctx_train, 1, 1 << 24)) return invalid_argument("n_ctx_train must be in [1, 2^24]");
  if (!(rope_freq_base > 1.0f) || !(rms_eps > 0.0f && rms_eps < 1.0f)) {
    return invalid_argument("rope_freq_base must be > 1 and rms_eps in (0, 1)");
  }
  return Status();
}

Result<SyntheticShape> synthetic_preset(const std::string& name) {
  SyntheticShape s;  // defaults: Llama-3-8B
  if (name == "llama3-8b") return s;
  if (name == "tiny") {
    s.name = "tiny";
    s.n_layers = 2;
    s.n_embd = 256;
    s.n_ff = 512;
    s.n_heads = 8;
    s.n_kv_heads = 2;
    s.n_vocab = 1024;
    s.n_ctx_train = 4096;
    return s;
  }
  return not_found("unknown shape '" + name + "' (llama3-8b, tiny)");
}

Status write_synthetic_llama(const SyntheticShape& shape, const std::string& path, uint64_t seed,
                             const std::function<void(uint64_t, uint64_t)>& progress) {
  KVGATE_RETURN_IF_ERROR(shape.validate());
  const std::vector<TensorPlan> tensors = plan_tensors(shape);
  const Header header = make_header(shape, tensors);
  const uint64_t total = header.bytes.size() + tensors.back().offset + tensors.back().n_bytes();

  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) return io_error("cannot create", tmp, errno);
  auto fail = [&](const char* what) {
    const int err = errno;
    std::fclose(f);
    std::remove(tmp.c_str());
    return io_error(what, tmp, err);
  };
  uint64_t written = 0;
  auto put = [&](const void* p, size_t n) {
    if (n != 0 && std::fwrite(p, 1, n, f) != n) return false;
    written += n;
    return true;
  };
  if (!put(header.bytes.data(), header.bytes.size())) return fail("cannot write");

  // xorshift64 per tensor (seeded by seed and tensor index), top 24 bits to
  // a uniform in [0, 1): cheap enough that the disk is the bottleneck.
  constexpr size_t kChunk = size_t{1} << 22;  // elements per write
  std::vector<uint16_t> f16(kChunk);
  std::vector<float> f32;
  const std::vector<uint8_t> zeros(kAlignment, 0);
  const uint64_t data_start = header.bytes.size();
  for (size_t ti = 0; ti < tensors.size(); ++ti) {
    const TensorPlan& t = tensors[ti];
    if (written != data_start + t.offset) {
      if (!put(zeros.data(), data_start + t.offset - written)) return fail("cannot write");
    }
    const uint64_t n = t.n_elements();
    if (t.type == GgmlType::kF32) {
      f32.assign(n, 1.0f);  // norms: small vectors
      if (!put(f32.data(), n * 4)) return fail("cannot write");
      continue;
    }
    uint64_t x = (seed + 1) * 0x9E3779B97F4A7C15ull ^ (ti + 1) * 0xD1B54A32D192ED03ull;
    if (x == 0) x = 1;
    for (uint64_t done = 0; done < n;) {
      const size_t m = static_cast<size_t>(std::min<uint64_t>(kChunk, n - done));
      for (size_t i = 0; i < m; ++i) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        const float u = static_cast<float>(x >> 40) * (1.0f / 16777216.0f);
        f16[i] = engine::fp32_to_fp16((2.0f * u - 1.0f) * t.bound);
      }
      if (!put(f16.data(), m * 2)) return fail("cannot write");
      done += m;
      if (progress) progress(written, total);
    }
  }
  if (std::fflush(f) != 0) return fail("cannot write");
  if (std::fclose(f) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    return io_error("cannot close", tmp, err);
  }
  if (written != total) {
    std::remove(tmp.c_str());
    return internal_error("wrote " + std::to_string(written) + " bytes, planned " +
                          std::to_string(total));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    return io_error("cannot rename over", path, err);
  }
  return Status();
}

}  // namespace kvgate::tools
