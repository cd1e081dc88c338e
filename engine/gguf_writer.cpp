#include "engine/gguf_writer.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <limits>
#include <system_error>
#include <type_traits>

namespace kvgate::engine {

static_assert(std::endian::native == std::endian::little,
              "the GGUF writer stores little-endian fields with memcpy");

namespace {

constexpr size_t kMaxKeyBytes = 65535;  // GGUF spec
constexpr size_t kMaxNameBytes = 63;    // GGML_MAX_NAME - 1: llama.cpp refuses longer names
constexpr size_t kMaxDims = 4;

template <typename T>
void put(std::vector<uint8_t>& out, T v) {
  static_assert(std::is_trivially_copyable_v<T>);
  uint8_t b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  out.insert(out.end(), b, b + sizeof(T));
}

void put_string(std::vector<uint8_t>& out, std::string_view s) {
  put<uint64_t>(out, s.size());
  out.insert(out.end(), s.begin(), s.end());
}

void put_type(std::vector<uint8_t>& out, GgufValueType t) {
  put<uint32_t>(out, static_cast<uint32_t>(t));
}

template <typename T>
std::vector<uint8_t> scalar(T v) {
  std::vector<uint8_t> out;
  put<T>(out, v);
  return out;
}

template <typename T>
std::vector<uint8_t> array(GgufValueType elem, std::span<const T> v) {
  std::vector<uint8_t> out;
  out.reserve(4 + 8 + v.size() * sizeof(T));
  put_type(out, elem);
  put<uint64_t>(out, v.size());
  for (const T& x : v) put<T>(out, x);
  return out;
}

void pad_to(std::vector<uint8_t>& out, uint64_t alignment) {
  out.resize((out.size() + alignment - 1) / alignment * alignment, 0);
}

std::string errno_text(int err) {
  return std::generic_category().message(err);
}

Status io_error(std::string_view what, const std::string& path, int err) {
  std::string msg =
      "gguf writer: cannot " + std::string(what) + " " + path + ": " + errno_text(err);
  switch (err) {
    case ENOENT:
      return not_found(std::move(msg));
    case EACCES:
    case EPERM:
    case EROFS:
      return Status(StatusCode::kPermissionDenied, std::move(msg));
    case ENOSPC:
    case EDQUOT:
      return resource_exhausted(std::move(msg));
    default:
      return invalid_argument(std::move(msg));
  }
}

}  // namespace

// ---------------------------------------------------------------- metadata

void GgufWriter::set(std::string_view key, GgufValueType type, std::vector<uint8_t> payload) {
  for (Kv& kv : kvs_) {
    if (kv.key == key) {
      kv.type = type;
      kv.payload = std::move(payload);
      return;
    }
  }
  kvs_.push_back(Kv{std::string(key), type, std::move(payload)});
}

void GgufWriter::set_uint8(std::string_view key, uint8_t v) {
  set(key, GgufValueType::kU8, scalar(v));
}
void GgufWriter::set_int32(std::string_view key, int32_t v) {
  set(key, GgufValueType::kI32, scalar(v));
}
void GgufWriter::set_uint32(std::string_view key, uint32_t v) {
  set(key, GgufValueType::kU32, scalar(v));
}
void GgufWriter::set_int64(std::string_view key, int64_t v) {
  set(key, GgufValueType::kI64, scalar(v));
}
void GgufWriter::set_uint64(std::string_view key, uint64_t v) {
  set(key, GgufValueType::kU64, scalar(v));
}
void GgufWriter::set_float32(std::string_view key, float v) {
  set(key, GgufValueType::kF32, scalar(v));
}
void GgufWriter::set_float64(std::string_view key, double v) {
  set(key, GgufValueType::kF64, scalar(v));
}
void GgufWriter::set_bool(std::string_view key, bool v) {
  set(key, GgufValueType::kBool, scalar<uint8_t>(v ? 1 : 0));
}

void GgufWriter::set_string(std::string_view key, std::string_view v) {
  std::vector<uint8_t> payload;
  put_string(payload, v);
  set(key, GgufValueType::kString, std::move(payload));
}

void GgufWriter::set_string_array(std::string_view key, std::span<const std::string> v) {
  std::vector<uint8_t> payload;
  put_type(payload, GgufValueType::kString);
  put<uint64_t>(payload, v.size());
  for (const std::string& s : v) put_string(payload, s);
  set(key, GgufValueType::kArray, std::move(payload));
}

void GgufWriter::set_int32_array(std::string_view key, std::span<const int32_t> v) {
  set(key, GgufValueType::kArray, array(GgufValueType::kI32, v));
}
void GgufWriter::set_int64_array(std::string_view key, std::span<const int64_t> v) {
  set(key, GgufValueType::kArray, array(GgufValueType::kI64, v));
}
void GgufWriter::set_float32_array(std::string_view key, std::span<const float> v) {
  set(key, GgufValueType::kArray, array(GgufValueType::kF32, v));
}

bool GgufWriter::remove(std::string_view key) {
  auto it = std::find_if(kvs_.begin(), kvs_.end(), [&](const Kv& kv) { return kv.key == key; });
  if (it == kvs_.end()) return false;
  kvs_.erase(it);
  return true;
}

bool GgufWriter::has(std::string_view key) const {
  return std::any_of(kvs_.begin(), kvs_.end(), [&](const Kv& kv) { return kv.key == key; });
}

std::vector<std::string> GgufWriter::keys() const {
  std::vector<std::string> out;
  out.reserve(kvs_.size());
  for (const Kv& kv : kvs_) out.push_back(kv.key);
  return out;
}

// ----------------------------------------------------------------- tensors

Status GgufWriter::add_tensor_raw(std::string_view name, std::span<const int64_t> ne, GgmlType type,
                                  std::span<const uint8_t> bytes) {
  const std::string where = "gguf writer: tensor '" + std::string(name) + "'";
  if (name.empty() || name.size() > kMaxNameBytes) {
    return invalid_argument(where + ": name must be 1 to " + std::to_string(kMaxNameBytes) +
                            " bytes");
  }
  for (const Tensor& t : tensors_) {
    if (t.name == name) return invalid_argument(where + " added twice");
  }
  if (ne.empty() || ne.size() > kMaxDims) {
    return invalid_argument(where + " has " + std::to_string(ne.size()) + " dims (must be 1 to " +
                            std::to_string(kMaxDims) + ")");
  }
  uint64_t rows = 1;
  for (size_t d = 0; d < ne.size(); ++d) {
    if (ne[d] < 1) {
      return invalid_argument(where + " dim " + std::to_string(d) + " is " + std::to_string(ne[d]) +
                              " (must be >= 1)");
    }
    if (d > 0 && __builtin_mul_overflow(rows, static_cast<uint64_t>(ne[d]), &rows)) {
      return invalid_argument(where + " is too large");
    }
  }
  const auto traits = ggml_type_traits(static_cast<uint32_t>(type));
  if (!traits) {
    return invalid_argument(where + " has unknown type " +
                            std::to_string(static_cast<uint32_t>(type)));
  }
  const auto row_bytes = ggml_row_bytes(type, static_cast<uint64_t>(ne[0]));
  if (!row_bytes) {
    return invalid_argument(where + ": row length " + std::to_string(ne[0]) +
                            " is not a multiple of the " + std::string(traits->name) +
                            " block size " + std::to_string(traits->block_elems));
  }
  uint64_t size = 0;
  if (__builtin_mul_overflow(*row_bytes, rows, &size) || size != bytes.size()) {
    return invalid_argument(where + " needs " + std::to_string(size) + " bytes, got " +
                            std::to_string(bytes.size()));
  }
  tensors_.push_back(Tensor{std::string(name), std::vector<int64_t>(ne.begin(), ne.end()), type,
                            std::vector<uint8_t>(bytes.begin(), bytes.end())});
  return Status();
}

Status GgufWriter::add_tensor_f32(std::string_view name, std::span<const int64_t> ne,
                                  std::span<const float> data) {
  return add_tensor_raw(
      name, ne, GgmlType::kF32,
      std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(data.data()), data.size_bytes()));
}

Status GgufWriter::add_tensor_f16(std::string_view name, std::span<const int64_t> ne,
                                  std::span<const float> data) {
  std::vector<uint8_t> bytes(data.size() * sizeof(fp16_t));
  for (size_t i = 0; i < data.size(); ++i) {
    const fp16_t h = fp32_to_fp16(data[i]);
    std::memcpy(bytes.data() + i * sizeof(fp16_t), &h, sizeof(fp16_t));
  }
  return add_tensor_raw(name, ne, GgmlType::kF16, bytes);
}

bool GgufWriter::remove_tensor(std::string_view name) {
  auto it = std::find_if(tensors_.begin(), tensors_.end(),
                         [&](const Tensor& t) { return t.name == name; });
  if (it == tensors_.end()) return false;
  tensors_.erase(it);
  return true;
}

// ------------------------------------------------------------------ output

Result<std::vector<uint8_t>> GgufWriter::serialize() const {
  if (alignment_ == 0 || !std::has_single_bit(alignment_)) {
    return invalid_argument("gguf writer: alignment " + std::to_string(alignment_) +
                            " is not a nonzero power of two");
  }
  for (const Kv& kv : kvs_) {
    if (kv.key.empty() || kv.key.size() > kMaxKeyBytes) {
      return invalid_argument("gguf writer: metadata key of " + std::to_string(kv.key.size()) +
                              " bytes (must be 1 to " + std::to_string(kMaxKeyBytes) + ")");
    }
    if (kv.key == "general.alignment") {
      return invalid_argument(
          "gguf writer: general.alignment is written from the constructor's alignment, not "
          "set as a key");
    }
  }

  std::vector<uint8_t> out;
  out.insert(out.end(), {'G', 'G', 'U', 'F'});
  put<uint32_t>(out, kVersion);
  put<uint64_t>(out, tensors_.size());
  put<uint64_t>(out, kvs_.size() + 1);

  put_string(out, "general.alignment");
  put_type(out, GgufValueType::kU32);
  put<uint32_t>(out, alignment_);
  for (const Kv& kv : kvs_) {
    put_string(out, kv.key);
    put_type(out, kv.type);
    out.insert(out.end(), kv.payload.begin(), kv.payload.end());
  }

  uint64_t offset = 0;  // relative to the data section
  for (const Tensor& t : tensors_) {
    put_string(out, t.name);
    put<uint32_t>(out, static_cast<uint32_t>(t.ne.size()));
    for (int64_t d : t.ne) put<uint64_t>(out, static_cast<uint64_t>(d));
    put<uint32_t>(out, static_cast<uint32_t>(t.type));
    put<uint64_t>(out, offset);
    offset += (t.bytes.size() + alignment_ - 1) / alignment_ * alignment_;
  }

  pad_to(out, alignment_);
  out.reserve(out.size() + offset);
  for (const Tensor& t : tensors_) {
    out.insert(out.end(), t.bytes.begin(), t.bytes.end());
    pad_to(out, alignment_);
  }
  return out;
}

Status GgufWriter::write_file(const std::string& path) const {
  KVGATE_ASSIGN_OR_RETURN(const std::vector<uint8_t> bytes, serialize());
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return io_error("create", tmp, errno);

  auto fail = [&](std::string_view what, int err) {
    ::close(fd);
    ::unlink(tmp.c_str());
    return io_error(what, tmp, err);
  };
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail("write", errno);
    }
    done += static_cast<size_t>(n);
  }
  // Without the fsync a crash after the rename could leave an empty file
  // under the final name.
  if (::fsync(fd) != 0) return fail("sync", errno);
  if (::close(fd) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return io_error("close", tmp, err);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return io_error("rename " + tmp + " to", path, err);
  }
  return Status();
}

}  // namespace kvgate::engine
