// GGUF reader: maps a model file read-only and indexes its metadata and
// tensors without copying them.
//
// Ownership: a GgufFile owns its mapping (open) or borrows the caller's memory
// (from_memory, which must outlive the GgufFile). Every string_view and
// tensor data pointer handed out points into that memory and stays valid for
// the life of the GgufFile, across moves.
//
// Threads: immutable once built; any number of threads may call the const
// accessors concurrently. open() blocks on the file system.
//
// Error contract: parsing validates every length, count, type, dimension and
// offset against the bytes actually present before using or reserving for
// it, so a truncated or hostile file yields a Status, never a crash.
//   INVALID_ARGUMENT  not a GGUF file (bad magic); an accessor asked for the
//                     wrong type
//   UNIMPLEMENTED     a GGUF version or tensor type this build does not read
//   DATA_LOSS         truncated or internally inconsistent file
//   NOT_FOUND         missing file or metadata key
//   OUT_OF_RANGE      a value that does not fit the requested C++ type
// Parse errors start with "gguf: " and name the key or tensor concerned.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "engine/ggml_types.h"

namespace kvgate::engine {

class GgufCursor;  // bounds-checked reader, defined in gguf.cpp

// Metadata value types, numbered as in the GGUF specification.
enum class GgufValueType : uint32_t {
  kU8 = 0,
  kI8 = 1,
  kU16 = 2,
  kI16 = 3,
  kU32 = 4,
  kI32 = 5,
  kF32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kU64 = 10,
  kI64 = 11,
  kF64 = 12,
};

// "u8", "string", "array", ...; "unknown" for numbers outside the enum.
std::string_view gguf_value_type_name(GgufValueType type);

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> dims;  // ggml order: dims[0] is the innermost (row length)
  GgmlType type;
  uint64_t offset;      // relative to the data section
  uint64_t size_bytes;  // bytes of the tensor's data
  const uint8_t* data;  // points into the mapping

  // Product of dims; the parser guarantees it fits in int64 and is >= 1.
  int64_t n_elements() const {
    int64_t n = 1;
    for (int64_t d : dims) n *= d;
    return n;
  }
};

class GgufFile {
 public:
  // Versions this reader accepts (v2 and v3 share the little-endian layout).
  static constexpr uint32_t kMinVersion = 2;
  static constexpr uint32_t kMaxVersion = 3;
  static constexpr uint64_t kDefaultAlignment = 32;
  static constexpr uint32_t kMaxDims = 4;

  // Maps `path` read-only and parses it. Blocks on the file system. The file
  // must not be truncated by anyone while mapped (that would raise SIGBUS).
  static Result<GgufFile> open(const std::string& path);
  // Parses `size` bytes at `data` without copying; the caller keeps the
  // memory alive and unchanged for the life of the returned GgufFile.
  static Result<GgufFile> from_memory(const uint8_t* data, size_t size);

  GgufFile(GgufFile&& other) noexcept;
  GgufFile& operator=(GgufFile&& other) noexcept;
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;
  ~GgufFile();

  uint32_t version() const { return version_; }
  size_t size_bytes() const { return size_; }
  // First byte of the mapped (or borrowed) file.
  const uint8_t* base() const { return base_; }
  // general.alignment, or 32 when absent.
  uint64_t alignment() const { return alignment_; }
  // File offset of the data section (tensor offsets are relative to it).
  uint64_t data_offset() const { return data_offset_; }

  // ---- metadata ----
  bool has(std::string_view key) const;
  Result<GgufValueType> type_of(std::string_view key) const;
  // Element type and length of an array value; INVALID_ARGUMENT if the value
  // is not an array.
  Result<GgufValueType> array_type(std::string_view key) const;
  Result<uint64_t> array_size(std::string_view key) const;

  // Any integer type; INVALID_ARGUMENT if the value is negative.
  Result<uint64_t> get_uint(std::string_view key) const;
  // Any integer type; OUT_OF_RANGE for a u64 above INT64_MAX.
  Result<int64_t> get_int(std::string_view key) const;
  // f32, f64 or any integer type.
  Result<double> get_float(std::string_view key) const;
  Result<bool> get_bool(std::string_view key) const;
  // Views into the mapping.
  Result<std::string_view> get_string(std::string_view key) const;
  Result<std::vector<std::string_view>> get_string_array(std::string_view key) const;
  // Arrays of any integer element type.
  Result<std::vector<int64_t>> get_int_array(std::string_view key) const;
  // Arrays of f32, f64 or any integer element type.
  Result<std::vector<double>> get_float_array(std::string_view key) const;
  // All keys in file order.
  std::vector<std::string> keys() const;

  // ---- tensors ----
  const GgufTensorInfo* find_tensor(std::string_view name) const;  // nullptr if absent
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }

 private:
  // One metadata entry, located in the mapping rather than copied.
  struct Kv {
    std::string_view key;
    GgufValueType type;
    GgufValueType elem_type;  // arrays only
    uint64_t count;           // arrays only: number of elements
    uint64_t offset;          // file offset of the payload: scalar bytes, string bytes
                              // (after the length) or the first array element
    uint64_t length;          // payload bytes
  };

  GgufFile() = default;
  Status parse();
  Status parse_kv(GgufCursor& cursor, uint64_t index);
  Status parse_tensor_info(GgufCursor& cursor, uint64_t index);
  Status check_tensor_layout();
  void release();

  Result<const Kv*> lookup(std::string_view key) const;
  // The entry if it is an array, else INVALID_ARGUMENT naming `expected`.
  Result<const Kv*> lookup_array(std::string_view key, std::string_view expected) const;

  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
  bool mapped_ = false;  // true when base_ is our mmap and must be unmapped
  uint32_t version_ = 0;
  uint64_t alignment_ = kDefaultAlignment;
  uint64_t data_offset_ = 0;
  std::vector<Kv> kvs_;
  std::unordered_map<std::string_view, size_t> kv_index_;  // keys view the mapping
  std::vector<GgufTensorInfo> tensors_;
  std::unordered_map<std::string_view, size_t> tensor_index_;  // names view the mapping
};

}  // namespace kvgate::engine
