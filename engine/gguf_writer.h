// GGUF v3 writer: collects metadata and tensors in memory, then lays them
// out as the GGUF specification (and llama.cpp's gguf-py) does:
//
//   "GGUF" | u32 version 3 | u64 tensor count | u64 kv count
//   | kvs (key string, u32 value type, value) in insertion order
//   | tensor infos (name, u32 n_dims, u64 dims innermost first, u32 type,
//     u64 offset relative to the data section)
//   | zero padding to the alignment | tensor data, each tensor padded with
//   zeros to the alignment.
//
// Strings are u64 length + bytes; arrays are u32 element type + u64 count +
// elements. The writer always emits general.alignment (u32) as its first
// key, so readers that ignore the default still agree on the layout.
//
// Meant for small files (the gate side file, test fixtures): everything is
// held in memory and serialized at once.
//
// Threads: a GgufWriter is an ordinary value; one thread at a time.
// write_file() blocks on the file system.
//
// Error contract: the set_* calls cannot fail (a key set twice keeps its
// first position and takes the new value); key problems (empty, longer than
// 65535 bytes, general.alignment set by hand) are reported by serialize().
// add_tensor_* return INVALID_ARGUMENT for a bad name, shape or byte count.
// write_file() returns the errno text with the path (INVALID_ARGUMENT,
// NOT_FOUND, PERMISSION_DENIED or RESOURCE_EXHAUSTED for ENOSPC).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "engine/ggml_types.h"
#include "engine/gguf.h"

namespace kvgate::engine {

class GgufWriter {
 public:
  static constexpr uint32_t kVersion = 3;

  // `alignment` must be a nonzero power of two (checked by serialize()).
  explicit GgufWriter(uint32_t alignment = 32) : alignment_(alignment) {}

  // ---- metadata; a key set again keeps its position, takes the new value ----
  void set_uint8(std::string_view key, uint8_t v);
  void set_int32(std::string_view key, int32_t v);
  void set_uint32(std::string_view key, uint32_t v);
  void set_int64(std::string_view key, int64_t v);
  void set_uint64(std::string_view key, uint64_t v);
  void set_float32(std::string_view key, float v);
  void set_float64(std::string_view key, double v);
  void set_bool(std::string_view key, bool v);
  void set_string(std::string_view key, std::string_view v);
  void set_string_array(std::string_view key, std::span<const std::string> v);
  void set_int32_array(std::string_view key, std::span<const int32_t> v);
  void set_int64_array(std::string_view key, std::span<const int64_t> v);
  void set_float32_array(std::string_view key, std::span<const float> v);
  // Removes a key; false if it was not set.
  bool remove(std::string_view key);
  bool has(std::string_view key) const;
  // Keys in the order they will be written (general.alignment not included).
  std::vector<std::string> keys() const;

  // ---- tensors; `ne` is in ggml order: ne[0] is the innermost (row
  // length), so a row-major [rows][cols] matrix is {cols, rows}. 1 to 4
  // dims, each >= 1. Names must be unique, 1 to 63 bytes (ggml's limit). ----
  Status add_tensor_f32(std::string_view name, std::span<const int64_t> ne,
                        std::span<const float> data);
  // Rounds to fp16 (nearest even); values beyond the fp16 range become inf.
  Status add_tensor_f16(std::string_view name, std::span<const int64_t> ne,
                        std::span<const float> data);
  // Bytes already encoded in `type`; their count must be the tensor's size
  // (ggml_row_bytes(type, ne[0]) times the other dims).
  Status add_tensor_raw(std::string_view name, std::span<const int64_t> ne, GgmlType type,
                        std::span<const uint8_t> bytes);
  bool remove_tensor(std::string_view name);
  size_t n_tensors() const { return tensors_.size(); }

  // The whole file.
  Result<std::vector<uint8_t>> serialize() const;
  // serialize(), then write PATH.tmp, fsync it and rename it over PATH, so a
  // reader sees the old file or the new one, never half of one. PATH.tmp is
  // removed on failure.
  Status write_file(const std::string& path) const;

 private:
  struct Kv {
    std::string key;
    GgufValueType type;
    std::vector<uint8_t> payload;  // encoded value (arrays: elem type, count, elements)
  };
  struct Tensor {
    std::string name;
    std::vector<int64_t> ne;
    GgmlType type;
    std::vector<uint8_t> bytes;
  };

  void set(std::string_view key, GgufValueType type, std::vector<uint8_t> payload);

  uint32_t alignment_;
  std::vector<Kv> kvs_;
  std::vector<Tensor> tensors_;
};

}  // namespace kvgate::engine
