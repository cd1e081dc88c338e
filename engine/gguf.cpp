#include "engine/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <iterator>
#include <limits>
#include <system_error>
#include <type_traits>
#include <utility>

namespace kvgate::engine {

static_assert(std::endian::native == std::endian::little,
              "the GGUF reader loads little-endian fields with memcpy");

namespace {

constexpr uint32_t kMaxValueType = static_cast<uint32_t>(GgufValueType::kF64);
constexpr uint64_t kMaxKeyBytes = 65535;  // GGUF spec: keys are at most 2^16-1 bytes
// Nested arrays are legal but unused by any model; a bound keeps a hostile
// file from recursing the parser off the stack.
constexpr int kMaxArrayDepth = 8;
// Smallest encodings of repeated records. A count is checked against
// remaining / smallest-record before anything is reserved for it, so no
// allocation is ever sized by an unchecked field.
constexpr uint64_t kStringHeaderBytes = 8;                    // u64 length
constexpr uint64_t kArrayHeaderBytes = 4 + 8;                 // element type, count
constexpr uint64_t kMinKvBytes = kStringHeaderBytes + 4 + 1;  // key, type, 1-byte value
constexpr uint64_t kMinTensorInfoBytes = kStringHeaderBytes + 4 + 8 + 4 + 8;  // one dim

// Concatenates strings and numbers into an error message.
template <typename... Args>
std::string cat(const Args&... args) {
  std::string out;
  auto append = [&out](const auto& a) {
    using T = std::decay_t<decltype(a)>;
    if constexpr (std::is_same_v<T, char>) {
      out += a;
    } else if constexpr (std::is_arithmetic_v<T>) {
      out += std::to_string(a);
    } else {
      out += std::string_view(a);
    }
  };
  (append(args), ...);
  return out;
}

// Quotes a name read from the file for an error message: non-printable bytes
// are escaped and long names cut, so a hostile file cannot garble the log.
std::string quoted(std::string_view s) {
  constexpr size_t kMaxShown = 96;
  std::string out = "'";
  for (size_t i = 0; i < s.size() && i < kMaxShown; ++i) {
    unsigned char ch = static_cast<unsigned char>(s[i]);
    if (ch >= 0x20 && ch < 0x7f && ch != '\\' && ch != '\'') {
      out += static_cast<char>(ch);
    } else {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[ch >> 4];
      out += kHex[ch & 15];
    }
  }
  if (s.size() > kMaxShown) out += cat("...(", s.size(), " bytes)");
  out += "'";
  return out;
}

Status prefixed(const Status& s, std::string_view prefix) {
  return Status(s.code(), cat(prefix, s.message()));
}

// Per value type, indexed by its number: name and bytes of a fixed-size
// value (0 for string and array).
struct ValueTypeInfo {
  std::string_view name;
  uint64_t size;
};
constexpr ValueTypeInfo kValueTypes[] = {
    {"u8", 1},   {"i8", 1},     {"u16", 2},   {"i16", 2}, {"u32", 4}, {"i32", 4}, {"f32", 4},
    {"bool", 1}, {"string", 0}, {"array", 0}, {"u64", 8}, {"i64", 8}, {"f64", 8},
};
static_assert(std::size(kValueTypes) == kMaxValueType + 1);

uint64_t scalar_size(GgufValueType t) {
  const auto i = static_cast<uint32_t>(t);
  return i <= kMaxValueType ? kValueTypes[i].size : 0;
}

bool is_integer(GgufValueType t) {
  switch (t) {
    case GgufValueType::kU8:
    case GgufValueType::kI8:
    case GgufValueType::kU16:
    case GgufValueType::kI16:
    case GgufValueType::kU32:
    case GgufValueType::kI32:
    case GgufValueType::kU64:
    case GgufValueType::kI64:
      return true;
    default:
      return false;
  }
}

bool is_float(GgufValueType t) {
  return t == GgufValueType::kF32 || t == GgufValueType::kF64;
}

template <typename T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// An integer of any GGUF width, kept exact: signed types in `s`, unsigned in `u`.
struct Integer {
  bool is_signed;
  int64_t s;
  uint64_t u;
};

Integer load_integer(GgufValueType t, const uint8_t* p) {
  switch (t) {
    case GgufValueType::kU8:
      return {false, 0, load<uint8_t>(p)};
    case GgufValueType::kI8:
      return {true, load<int8_t>(p), 0};
    case GgufValueType::kU16:
      return {false, 0, load<uint16_t>(p)};
    case GgufValueType::kI16:
      return {true, load<int16_t>(p), 0};
    case GgufValueType::kU32:
      return {false, 0, load<uint32_t>(p)};
    case GgufValueType::kI32:
      return {true, load<int32_t>(p), 0};
    case GgufValueType::kU64:
      return {false, 0, load<uint64_t>(p)};
    case GgufValueType::kI64:
      return {true, load<int64_t>(p), 0};
    default:
      return {false, 0, 0};  // callers check is_integer first
  }
}

double load_number(GgufValueType t, const uint8_t* p) {
  if (t == GgufValueType::kF32) return load<float>(p);
  if (t == GgufValueType::kF64) return load<double>(p);
  Integer v = load_integer(t, p);
  return v.is_signed ? static_cast<double>(v.s) : static_cast<double>(v.u);
}

}  // namespace

// Reads fields front to back, refusing any read past the end of the buffer.
// Every failure is DATA_LOSS naming the field, its offset and what is left.
class GgufCursor {
 public:
  GgufCursor(const uint8_t* base, uint64_t size, uint64_t pos = 0)
      : base_(base), size_(size), pos_(pos) {}

  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }

  Status need(uint64_t n, std::string_view what) const {
    if (n <= remaining()) return Status();
    return data_loss(cat(what, " at offset ", pos_, " needs ", n, " bytes but only ", remaining(),
                         " remain (file size ", size_, ")"));
  }

  template <typename T>
  Result<T> read(std::string_view what) {
    static_assert(std::is_trivially_copyable_v<T>);
    KVGATE_RETURN_IF_ERROR(need(sizeof(T), what));
    T v = load<T>(base_ + pos_);
    pos_ += sizeof(T);
    return v;
  }

  Status skip(uint64_t n, std::string_view what) {
    KVGATE_RETURN_IF_ERROR(need(n, what));
    pos_ += n;
    return Status();
  }

  // A GGUF string: u64 byte length, then the bytes (not NUL-terminated).
  Result<std::string_view> read_string(std::string_view what) {
    KVGATE_ASSIGN_OR_RETURN(uint64_t len, read<uint64_t>(what));
    if (len > remaining()) {
      return data_loss(cat(what, " of ", len, " bytes at offset ", pos_, " runs past end of file (",
                           remaining(), " bytes left, file size ", size_, ")"));
    }
    std::string_view s(reinterpret_cast<const char*>(base_ + pos_), len);
    pos_ += len;
    return s;
  }

 private:
  const uint8_t* base_;
  uint64_t size_;
  uint64_t pos_;
};

namespace {

struct ArrayHeader {
  GgufValueType elem_type;
  uint64_t count;
  uint64_t payload_offset;  // first element
};

Result<GgufValueType> read_value_type(GgufCursor& c, std::string_view what) {
  KVGATE_ASSIGN_OR_RETURN(uint32_t raw, c.read<uint32_t>(what));
  if (raw > kMaxValueType) {
    return data_loss(cat("unknown ", what, " ", raw, " at offset ", c.pos() - 4));
  }
  return static_cast<GgufValueType>(raw);
}

// Reads an array header and walks its elements, checking each against the
// bytes left; leaves the cursor after the array.
Result<ArrayHeader> read_array(GgufCursor& c, int depth) {
  if (depth >= kMaxArrayDepth) {
    return data_loss(cat("arrays nested more than ", kMaxArrayDepth, " deep at offset ", c.pos()));
  }
  KVGATE_ASSIGN_OR_RETURN(GgufValueType elem, read_value_type(c, "array element type"));
  KVGATE_ASSIGN_OR_RETURN(uint64_t count, c.read<uint64_t>("array length"));
  ArrayHeader h{elem, count, c.pos()};
  if (uint64_t elem_bytes = scalar_size(elem)) {
    if (count > c.remaining() / elem_bytes) {
      return data_loss(cat("array of ", count, " ", gguf_value_type_name(elem), " (", elem_bytes,
                           " bytes each) at offset ", c.pos(), " runs past end of file (",
                           c.remaining(), " bytes left)"));
    }
    KVGATE_RETURN_IF_ERROR(c.skip(count * elem_bytes, "array data"));
    return h;
  }
  const uint64_t min_elem_bytes =
      elem == GgufValueType::kString ? kStringHeaderBytes : kArrayHeaderBytes;
  if (count > c.remaining() / min_elem_bytes) {
    return data_loss(cat("array of ", count, " ", gguf_value_type_name(elem), " at offset ",
                         c.pos(), " cannot fit in the ", c.remaining(),
                         " bytes left (each element needs at least ", min_elem_bytes, ")"));
  }
  for (uint64_t i = 0; i < count; ++i) {
    Status s = elem == GgufValueType::kString ? c.read_string("string").status()
                                              : read_array(c, depth + 1).status();
    if (!s.ok()) return prefixed(s, cat("array element ", i, ": "));
  }
  return h;
}

}  // namespace

std::string_view gguf_value_type_name(GgufValueType type) {
  const auto i = static_cast<uint32_t>(type);
  return i <= kMaxValueType ? kValueTypes[i].name : "unknown";
}

// ---------------------------------------------------------------- lifecycle

GgufFile::GgufFile(GgufFile&& other) noexcept
    : base_(std::exchange(other.base_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      mapped_(std::exchange(other.mapped_, false)),
      version_(other.version_),
      alignment_(other.alignment_),
      data_offset_(other.data_offset_),
      kvs_(std::move(other.kvs_)),
      kv_index_(std::move(other.kv_index_)),
      tensors_(std::move(other.tensors_)),
      tensor_index_(std::move(other.tensor_index_)) {}

GgufFile& GgufFile::operator=(GgufFile&& other) noexcept {
  if (this != &other) {
    release();
    base_ = std::exchange(other.base_, nullptr);
    size_ = std::exchange(other.size_, 0);
    mapped_ = std::exchange(other.mapped_, false);
    version_ = other.version_;
    alignment_ = other.alignment_;
    data_offset_ = other.data_offset_;
    kvs_ = std::move(other.kvs_);
    kv_index_ = std::move(other.kv_index_);
    tensors_ = std::move(other.tensors_);
    tensor_index_ = std::move(other.tensor_index_);
  }
  return *this;
}

GgufFile::~GgufFile() {
  release();
}

void GgufFile::release() {
  if (mapped_ && base_ != nullptr) {
    ::munmap(const_cast<uint8_t*>(base_), size_);
  }
  base_ = nullptr;
  size_ = 0;
  mapped_ = false;
}

Result<GgufFile> GgufFile::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    std::string msg =
        cat("gguf: cannot open ", quoted(path), ": ", std::generic_category().message(err));
    if (err == ENOENT) return not_found(std::move(msg));
    if (err == EACCES) return Status(StatusCode::kPermissionDenied, std::move(msg));
    return invalid_argument(std::move(msg));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return invalid_argument(
        cat("gguf: cannot stat ", quoted(path), ": ", std::generic_category().message(err)));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return invalid_argument(cat("gguf: ", quoted(path), " is not a regular file"));
  }
  if (st.st_size == 0) {
    ::close(fd);
    return data_loss(cat("gguf: ", quoted(path), " is empty"));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  void* addr = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  ::close(fd);  // the mapping keeps the file referenced
  if (addr == MAP_FAILED) {
    std::string msg =
        cat("gguf: cannot map ", quoted(path), ": ", std::generic_category().message(map_err));
    if (map_err == ENOMEM) return resource_exhausted(std::move(msg));
    return invalid_argument(std::move(msg));
  }
  GgufFile file;
  file.base_ = static_cast<const uint8_t*>(addr);
  file.size_ = size;
  file.mapped_ = true;
  Status s = file.parse();
  if (!s.ok()) return Status(s.code(), cat(s.message(), " (file ", quoted(path), ")"));
  return Result<GgufFile>(std::move(file));
}

Result<GgufFile> GgufFile::from_memory(const uint8_t* data, size_t size) {
  if (data == nullptr && size != 0) return invalid_argument("gguf: null buffer of nonzero size");
  GgufFile file;
  file.base_ = data;
  file.size_ = size;
  KVGATE_RETURN_IF_ERROR(file.parse());
  return Result<GgufFile>(std::move(file));
}

// ------------------------------------------------------------------ parsing

Status GgufFile::parse() {
  // Every error below is wrapped once here so that all start with "gguf: ".
  auto fail = [](Status s) { return s.ok() ? s : prefixed(s, "gguf: "); };
  GgufCursor c(base_, size_);

  KVGATE_RETURN_IF_ERROR(fail(c.need(4, "magic")));
  if (std::memcmp(base_, "GGUF", 4) != 0) {
    std::string_view magic(reinterpret_cast<const char*>(base_), 4);
    return fail(
        invalid_argument(cat("bad magic ", quoted(magic), " (expected 'GGUF'): not a GGUF file")));
  }
  KVGATE_RETURN_IF_ERROR(c.skip(4, "magic"));

  auto version = c.read<uint32_t>("version");
  if (!version.ok()) return fail(version.status());
  version_ = *version;
  if (version_ < kMinVersion || version_ > kMaxVersion) {
    const uint32_t swapped = __builtin_bswap32(version_);
    if (swapped >= 1 && swapped <= kMaxVersion) {
      return fail(unimplemented(cat("big-endian GGUF (version ", swapped, ") is not supported")));
    }
    return fail(unimplemented(cat("GGUF version ", version_,
                                  " is not supported (this reader handles versions ", kMinVersion,
                                  " and ", kMaxVersion, ")")));
  }

  auto tensor_count = c.read<uint64_t>("tensor count");
  if (!tensor_count.ok()) return fail(tensor_count.status());
  auto kv_count = c.read<uint64_t>("metadata entry count");
  if (!kv_count.ok()) return fail(kv_count.status());

  if (*kv_count > c.remaining() / kMinKvBytes) {
    return fail(
        data_loss(cat("metadata entry count ", *kv_count, " cannot fit in the ", c.remaining(),
                      " bytes left (each entry needs at least ", kMinKvBytes, ")")));
  }
  kvs_.reserve(*kv_count);
  kv_index_.reserve(*kv_count);
  for (uint64_t i = 0; i < *kv_count; ++i) {
    KVGATE_RETURN_IF_ERROR(fail(parse_kv(c, i)));
  }

  // A missing alignment takes the default; a present but bad one is an error.
  if (has("general.alignment")) {
    auto a = get_uint("general.alignment");
    if (!a.ok()) return fail(a.status());
    if (*a == 0 || !std::has_single_bit(*a)) {
      return fail(data_loss(cat("general.alignment is ", *a, ", must be a nonzero power of two")));
    }
    alignment_ = *a;
  }

  if (*tensor_count > c.remaining() / kMinTensorInfoBytes) {
    return fail(
        data_loss(cat("tensor count ", *tensor_count, " cannot fit in the ", c.remaining(),
                      " bytes left (each tensor info needs at least ", kMinTensorInfoBytes, ")")));
  }
  tensors_.reserve(*tensor_count);
  tensor_index_.reserve(*tensor_count);
  for (uint64_t i = 0; i < *tensor_count; ++i) {
    KVGATE_RETURN_IF_ERROR(fail(parse_tensor_info(c, i)));
  }

  // The data section starts at the next multiple of the alignment. With no
  // tensors the file may end before that point, which is fine.
  const uint64_t pad = (alignment_ - c.pos() % alignment_) % alignment_;
  if (pad > std::numeric_limits<uint64_t>::max() - c.pos()) {
    return fail(data_loss(cat("data section offset overflows (alignment ", alignment_, ")")));
  }
  data_offset_ = c.pos() + pad;
  return fail(check_tensor_layout());
}

Status GgufFile::parse_kv(GgufCursor& c, uint64_t index) {
  const uint64_t entry_offset = c.pos();
  auto key_or = c.read_string("key");
  if (!key_or.ok()) return prefixed(key_or.status(), cat("metadata entry #", index, ": "));
  const std::string_view key = *key_or;
  if (key.empty()) {
    return data_loss(
        cat("metadata entry #", index, " at offset ", entry_offset, " has an empty key"));
  }
  if (key.size() > kMaxKeyBytes) {
    return data_loss(cat("metadata key ", quoted(key), " is ", key.size(), " bytes long (limit ",
                         kMaxKeyBytes, ")"));
  }

  Kv kv{key, GgufValueType::kU8, GgufValueType::kU8, 0, 0, 0};
  auto read_value = [&]() -> Status {
    KVGATE_ASSIGN_OR_RETURN(kv.type, read_value_type(c, "value type"));
    if (uint64_t n = scalar_size(kv.type)) {
      kv.offset = c.pos();
      kv.length = n;
      return c.skip(n, "value");
    }
    if (kv.type == GgufValueType::kString) {
      KVGATE_ASSIGN_OR_RETURN(std::string_view s, c.read_string("string value"));
      kv.offset = c.pos() - s.size();
      kv.length = s.size();
      return Status();
    }
    KVGATE_ASSIGN_OR_RETURN(ArrayHeader h, read_array(c, 0));
    kv.elem_type = h.elem_type;
    kv.count = h.count;
    kv.offset = h.payload_offset;
    kv.length = c.pos() - h.payload_offset;
    return Status();
  };
  Status s = read_value();
  if (!s.ok()) return prefixed(s, cat("metadata key ", quoted(key), ": "));

  auto [it, inserted] = kv_index_.emplace(key, kvs_.size());
  if (!inserted) {
    return data_loss(cat("duplicate metadata key ", quoted(key), " (entries #", it->second,
                         " and #", index, ")"));
  }
  kvs_.push_back(kv);
  return Status();
}

Status GgufFile::parse_tensor_info(GgufCursor& c, uint64_t index) {
  auto name_or = c.read_string("tensor name");
  if (!name_or.ok()) return prefixed(name_or.status(), cat("tensor #", index, ": "));
  const std::string_view name = *name_or;
  if (name.empty()) return data_loss(cat("tensor #", index, " has an empty name"));
  auto where = [&]() { return cat("tensor ", quoted(name)); };
  auto in_tensor = [&](const Status& s) { return prefixed(s, cat(where(), ": ")); };

  auto n_dims = c.read<uint32_t>("dimension count");
  if (!n_dims.ok()) return in_tensor(n_dims.status());
  if (*n_dims == 0 || *n_dims > kMaxDims) {
    return data_loss(cat(where(), " has ", *n_dims, " dimensions (must be 1 to ", kMaxDims, ")"));
  }
  std::vector<int64_t> dims;
  dims.reserve(*n_dims);
  int64_t n_elements = 1;
  bool overflow = false;
  for (uint32_t d = 0; d < *n_dims; ++d) {
    auto dim = c.read<uint64_t>("dimension");
    if (!dim.ok()) return in_tensor(dim.status());
    if (*dim == 0 || *dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return data_loss(
          cat(where(), " dimension ", d, " is ", *dim, " (must be between 1 and 2^63-1)"));
    }
    dims.push_back(static_cast<int64_t>(*dim));
    overflow = overflow || __builtin_mul_overflow(n_elements, dims.back(), &n_elements);
  }
  if (overflow) {
    std::string shape;
    for (int64_t d : dims) shape += cat(shape.empty() ? "" : ", ", d);
    return data_loss(
        cat(where(), " dims {", shape, "} have an element count that overflows int64"));
  }

  auto type = c.read<uint32_t>("type");
  if (!type.ok()) return in_tensor(type.status());
  const auto traits = ggml_type_traits(*type);
  if (!traits) return unimplemented(cat(where(), " has unknown type ", *type));
  if (dims[0] % traits->block_elems != 0) {
    return data_loss(cat(where(), " of type ", traits->name, " has row length ", dims[0],
                         ", not a multiple of its block size ", traits->block_elems));
  }
  const uint64_t blocks_per_row = static_cast<uint64_t>(dims[0]) / traits->block_elems;
  const uint64_t rows = static_cast<uint64_t>(n_elements / dims[0]);
  uint64_t row_bytes = 0;
  uint64_t size_bytes = 0;
  if (__builtin_mul_overflow(blocks_per_row, uint64_t{traits->block_bytes}, &row_bytes) ||
      __builtin_mul_overflow(row_bytes, rows, &size_bytes)) {
    return data_loss(cat(where(), " of type ", traits->name, " has a byte size that overflows"));
  }

  auto offset = c.read<uint64_t>("data offset");
  if (!offset.ok()) return in_tensor(offset.status());
  if (*offset % alignment_ != 0) {
    return data_loss(
        cat(where(), " offset ", *offset, " is not a multiple of the alignment ", alignment_));
  }

  auto [it, inserted] = tensor_index_.emplace(name, tensors_.size());
  if (!inserted) {
    return data_loss(cat("duplicate tensor name ", quoted(name), " (tensors #", it->second,
                         " and #", index, ")"));
  }
  tensors_.push_back(GgufTensorInfo{std::string(name), std::move(dims),
                                    static_cast<GgmlType>(*type), *offset, size_bytes, nullptr});
  return Status();
}

Status GgufFile::check_tensor_layout() {
  if (tensors_.empty()) return Status();
  const uint64_t avail = data_offset_ <= size_ ? size_ - data_offset_ : 0;
  for (GgufTensorInfo& t : tensors_) {
    if (t.offset > avail || t.size_bytes > avail - t.offset) {
      return data_loss(cat("tensor ", quoted(t.name), " data [offset ", t.offset, ", ",
                           t.size_bytes, " bytes] runs past end of file (size ", size_,
                           ", data section at ", data_offset_, ")"));
    }
    t.data = base_ + data_offset_ + t.offset;
  }
  // Tensors may appear in any order in the file; sort by offset to find
  // overlaps in one pass.
  std::vector<const GgufTensorInfo*> by_offset;
  by_offset.reserve(tensors_.size());
  for (const GgufTensorInfo& t : tensors_) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const GgufTensorInfo* a, const GgufTensorInfo* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const GgufTensorInfo& a = *by_offset[i - 1];
    const GgufTensorInfo& b = *by_offset[i];
    if (a.offset + a.size_bytes > b.offset) {
      return data_loss(cat("tensors ", quoted(a.name), " [offset ", a.offset, ", ", a.size_bytes,
                           " bytes] and ", quoted(b.name), " [offset ", b.offset, ", ",
                           b.size_bytes, " bytes] overlap"));
    }
  }
  return Status();
}

// ---------------------------------------------------------------- metadata

namespace {

std::string describe(GgufValueType type, GgufValueType elem_type) {
  if (type == GgufValueType::kArray) return cat("array of ", gguf_value_type_name(elem_type));
  return std::string(gguf_value_type_name(type));
}

}  // namespace

bool GgufFile::has(std::string_view key) const {
  return kv_index_.count(key) != 0;
}

Result<const GgufFile::Kv*> GgufFile::lookup(std::string_view key) const {
  auto it = kv_index_.find(key);
  if (it == kv_index_.end()) return not_found(cat("metadata key ", quoted(key), " missing"));
  return &kvs_[it->second];
}

Result<const GgufFile::Kv*> GgufFile::lookup_array(std::string_view key,
                                                   std::string_view expected) const {
  KVGATE_ASSIGN_OR_RETURN(const Kv* kv, lookup(key));
  if (kv->type != GgufValueType::kArray) {
    return invalid_argument(cat("metadata key ", quoted(key), " has type ",
                                describe(kv->type, kv->elem_type), ", expected ", expected));
  }
  return kv;
}

namespace {

Status type_mismatch(std::string_view key, GgufValueType type, GgufValueType elem_type,
                     std::string_view expected) {
  return invalid_argument(cat("metadata key ", quoted(key), " has type ", describe(type, elem_type),
                              ", expected ", expected));
}

// `element` names the array element for the message; -1 for a scalar. The
// message is built only on failure so that array loops stay cheap.
std::string value_name(std::string_view key, int64_t element) {
  std::string out = cat("metadata key ", quoted(key));
  if (element >= 0) out += cat(" element ", element);
  return out;
}

Result<uint64_t> integer_to_uint(const Integer& v, std::string_view key, int64_t element) {
  if (!v.is_signed) return v.u;
  if (v.s < 0) {
    return invalid_argument(cat(value_name(key, element), " has negative value ", v.s,
                                ", expected an unsigned integer"));
  }
  return static_cast<uint64_t>(v.s);
}

Result<int64_t> integer_to_int(const Integer& v, std::string_view key, int64_t element) {
  if (v.is_signed) return v.s;
  if (v.u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return out_of_range(cat(value_name(key, element), " value ", v.u, " does not fit in int64"));
  }
  return static_cast<int64_t>(v.u);
}

}  // namespace

Result<GgufValueType> GgufFile::type_of(std::string_view key) const {
  KVGATE_ASSIGN_OR_RETURN(const Kv* kv, lookup(key));
  return kv->type;
}

Result<GgufValueType> GgufFile::array_type(std::string_view key) const {
  KVGATE_ASSIGN_OR_RETURN(const Kv* kv, lookup_array(key, "array"));
  return kv->elem_type;
}

Result<uint64_t> GgufFile::array_size(std::string_view key) const {
  KVGATE_ASSIGN_OR_RETURN(const Kv* kv, lookup_array(key, "array"));
  return kv->count;
}

Result<uint64_t> GgufFile::get_uint(std::string_view key) const {
  KVGATE_ASSIGN_OR_RETURN(const Kv* kv, lookup(key));
  if (!is_integer(kv->type)) return type_mismatch(key, kv->type, kv->elem_type, "integer");
  return integer_to_uint(load_integer(kv->type, base_ + kv->offset), key, -1);
}

Result<int64_t> GgufFile::get_int(std::string_view key) const {
  KVGATE_ASSIGN_OR_RETURN(const Kv* kv, lookup(key));
  if (!is_integer(kv->type)) return type_mismatch(key, kv->type, kv->elem_type, "integer");
  return integer_to_int(load_integer(kv->type, base_ + kv->offset), key, -1);
}

Result<double> GgufFile::get_float(std::string_view key) const {
  KVGATE_ASSIGN_OR_RETURN(const Kv* kv, lookup(key));
  if (!is_float(kv->type) && !is_integer(kv->type)) {
    return type_mismatch(key, kv->type, kv->elem_type, "float");
  }
  return load_number(kv->type, base_ + kv->offset);
}

Result<bool> GgufFile::get_bool(std::string_view key) const {
  KVGATE_ASSIGN_OR_RETURN(const Kv* kv, lookup(key));
  if (kv->type != GgufValueType::kBool) return type_mismatch(key, kv->type, kv->elem_type, "bool");
  const uint8_t b = base_[kv->offset];
  if (b > 1) return data_loss(cat("metadata key ", quoted(key), " has invalid bool byte ", b));
  return b == 1;
}

Result<std::string_view> GgufFile::get_string(std::string_view key) const {
  KVGATE_ASSIGN_OR_RETURN(const Kv* kv, lookup(key));
  if (kv->type != GgufValueType::kString) {
    return type_mismatch(key, kv->type, kv->elem_type, "string");
  }
  return std::string_view(reinterpret_cast<const char*>(base_ + kv->offset), kv->length);
}

Result<std::vector<std::string_view>> GgufFile::get_string_array(std::string_view key) const {
  KVGATE_ASSIGN_OR_RETURN(const Kv* kv, lookup_array(key, "array of string"));
  if (kv->elem_type != GgufValueType::kString) {
    return type_mismatch(key, kv->type, kv->elem_type, "array of string");
  }
  // Parsing already walked these strings; a cursor again costs little and
  // keeps this safe even if that invariant were ever broken.
  GgufCursor c(base_, kv->offset + kv->length, kv->offset);
  std::vector<std::string_view> out;
  out.reserve(kv->count);  // bounded by the parse: count <= bytes / 8
  for (uint64_t i = 0; i < kv->count; ++i) {
    auto s = c.read_string("string");
    if (!s.ok())
      return internal_error(cat("metadata key ", quoted(key), ": ", s.status().message()));
    out.push_back(*s);
  }
  return out;
}

Result<std::vector<int64_t>> GgufFile::get_int_array(std::string_view key) const {
  KVGATE_ASSIGN_OR_RETURN(const Kv* kv, lookup_array(key, "array of integer"));
  if (!is_integer(kv->elem_type)) {
    return type_mismatch(key, kv->type, kv->elem_type, "array of integer");
  }
  const uint64_t stride = scalar_size(kv->elem_type);
  std::vector<int64_t> out;
  out.reserve(kv->count);  // bounded by the parse: count * stride bytes exist
  for (uint64_t i = 0; i < kv->count; ++i) {
    Integer v = load_integer(kv->elem_type, base_ + kv->offset + i * stride);
    KVGATE_ASSIGN_OR_RETURN(int64_t x, integer_to_int(v, key, static_cast<int64_t>(i)));
    out.push_back(x);
  }
  return out;
}

Result<std::vector<double>> GgufFile::get_float_array(std::string_view key) const {
  KVGATE_ASSIGN_OR_RETURN(const Kv* kv, lookup_array(key, "array of float"));
  if (!is_float(kv->elem_type) && !is_integer(kv->elem_type)) {
    return type_mismatch(key, kv->type, kv->elem_type, "array of float");
  }
  const uint64_t stride = scalar_size(kv->elem_type);
  std::vector<double> out;
  out.reserve(kv->count);
  for (uint64_t i = 0; i < kv->count; ++i) {
    out.push_back(load_number(kv->elem_type, base_ + kv->offset + i * stride));
  }
  return out;
}

std::vector<std::string> GgufFile::keys() const {
  std::vector<std::string> out;
  out.reserve(kvs_.size());
  for (const Kv& kv : kvs_) out.emplace_back(kv.key);
  return out;
}

const GgufTensorInfo* GgufFile::find_tensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

}  // namespace kvgate::engine
