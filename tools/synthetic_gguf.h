// A llama-architecture GGUF with random F16 weights, for benchmarks only:
// the same file is loaded by kvgate (LlamaModel) and by llama.cpp
// (llama-bench), so both engines run the same shapes and tensor types.
//
// The file has what convert_hf_to_gguf.py writes for a Llama-3 model in F16
// (general.file_type 1, F32 norms, F16 matrices, an untied output.weight,
// rope freq base 500000) and a "none" tokenizer: tokenizer.ggml.model =
// "none" plus llama.vocab_size, which llama.cpp accepts (llama-vocab.cpp:
// LLAMA_VOCAB_TYPE_NONE, vocab_size dummy tokens) and LlamaConfig reads.
// It cannot tokenize text; benchmarks feed token ids.
//
// Weights ~ U(-a, a), a = sqrt(3 / cols) (unit-variance matrix outputs for
// unit-variance inputs; the embedding a = 1), norms 1: activations stay finite
// through any number of layers. Deterministic for a seed.
//
// The data is streamed to disk in chunks (Llama-3-8B in F16 is 16 GB), to
// PATH.tmp and then renamed over PATH.
//
// Threads: free functions, no shared state. write_synthetic_llama blocks on
// the file system for as long as the write takes.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "common/status.h"

namespace kvgate::tools {

struct SyntheticShape {
  std::string name = "llama3-8b";
  int64_t n_layers = 32;
  int64_t n_embd = 4096;
  int64_t n_ff = 14336;
  int64_t n_heads = 32;
  int64_t n_kv_heads = 8;
  int64_t n_vocab = 128256;
  int64_t n_ctx_train = 8192;
  float rope_freq_base = 500000.0f;
  float rms_eps = 1e-5f;

  int64_t head_dim() const { return n_embd / n_heads; }
  // Parameters of the file (all tensors).
  int64_t n_params() const;
  // INVALID_ARGUMENT naming the first bad field.
  Status validate() const;
};

// Presets: "llama3-8b" (Llama-3-8B: 32 layers, 4096 embd, 14336 ff, 32/8
// heads of 128, vocab 128256) and "tiny" (2 layers, 256 embd, 512 ff, 8/2
// heads of 32, vocab 1024; a few MB, for tests). NOT_FOUND for another name.
Result<SyntheticShape> synthetic_preset(const std::string& name);

// Writes the GGUF. `progress` (may be empty) is called with bytes written
// so far and the total after each chunk. Errors name the path.
Status write_synthetic_llama(const SyntheticShape& shape, const std::string& path,
                             uint64_t seed = 1,
                             const std::function<void(uint64_t, uint64_t)>& progress = {});

}  // namespace kvgate::tools
