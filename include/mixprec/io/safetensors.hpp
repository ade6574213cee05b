#pragma once
// safetensors files (https://huggingface.co/docs/safetensors): an 8-byte little-endian header
// length N, N bytes of JSON describing each tensor (padded with spaces to 8-byte alignment),
// then the raw little-endian data, tensors back to back.
//
// defines: save_safetensors (atomic), load_safetensors (strictly validated), SafetensorsFile,
//          json::Value / json::parse / json::write_string (the small strict JSON they use)
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "mixprec/autograd/engine.hpp"
#include "mixprec/ops/tensor_ops.hpp"

namespace mixprec::io {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; this reader copies bytes as they are");

// ---------------------------------------------------------------------------------------------
// JSON (RFC 8259), strict: no trailing commas, comments, NaN, leading zeros, lone surrogates,
// invalid UTF-8 or duplicate object keys.
namespace json {

struct Value {
  enum class Kind { Null, Bool, Number, String, Array, Object };
  Kind kind = Kind::Null;
  bool boolean = false;
  std::string text;  // a string's decoded value, or a number's literal
  std::vector<Value> array;
  std::vector<std::pair<std::string, Value>> object;  // in document order

  // Declared here, defined below where Value is complete: clang (libstdc++) rejects the implicit
  // ones, which need std::pair<std::string, Value> complete inside the class.
  Value();
  ~Value();
  Value(const Value&);
  Value(Value&&) noexcept;
  Value& operator=(const Value&);
  Value& operator=(Value&&) noexcept;

  const Value* find(std::string_view key) const {
    for (const auto& [k, v] : object)
      if (k == key) return &v;
    return nullptr;
  }
};
inline Value::Value() = default;
inline Value::~Value() = default;
inline Value::Value(const Value&) = default;
inline Value::Value(Value&&) noexcept = default;
inline Value& Value::operator=(const Value&) = default;
inline Value& Value::operator=(Value&&) noexcept = default;

inline const char* kind_name(Value::Kind k) {
  switch (k) {
    case Value::Kind::Null: return "null";
    case Value::Kind::Bool: return "a boolean";
    case Value::Kind::Number: return "a number";
    case Value::Kind::String: return "a string";
    case Value::Kind::Array: return "an array";
    case Value::Kind::Object: return "an object";
  }
  return "?";
}

// Length of the valid UTF-8 sequence at s[i], or 0 if it is invalid (overlong, surrogate, > U+10FFFF).
inline std::size_t utf8_sequence_length(std::string_view s, std::size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) return 1;
  auto cont = [&](std::size_t k) { return i + k < s.size() && (static_cast<unsigned char>(s[i + k]) & 0xC0) == 0x80; };
  auto byte = [&](std::size_t k) { return static_cast<unsigned char>(s[i + k]); };
  if (c >= 0xC2 && c <= 0xDF) return cont(1) ? 2 : 0;
  if (c >= 0xE0 && c <= 0xEF) {
    if (!cont(1) || !cont(2)) return 0;
    if (c == 0xE0 && byte(1) < 0xA0) return 0;   // overlong
    if (c == 0xED && byte(1) >= 0xA0) return 0;  // UTF-16 surrogate
    return 3;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    if (!cont(1) || !cont(2) || !cont(3)) return 0;
    if (c == 0xF0 && byte(1) < 0x90) return 0;  // overlong
    if (c == 0xF4 && byte(1) >= 0x90) return 0;  // > U+10FFFF
    return 4;
  }
  return 0;
}
// Byte offset of the first invalid UTF-8 sequence, or npos.
inline std::size_t find_invalid_utf8(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t n = utf8_sequence_length(s, i);
    if (n == 0) return i;
    i += n;
  }
  return std::string_view::npos;
}

class Parser {
 public:
  // Errors read "<context>: invalid JSON at byte K: <why>".
  Parser(std::string_view text, std::string context) : s_(text), context_(std::move(context)) {}

  Value parse_document() {
    const std::size_t bad = find_invalid_utf8(s_);
    if (bad != std::string_view::npos) error_at(bad, "invalid UTF-8");
    skip_ws();
    Value v = parse_value(0);
    skip_ws();
    if (i_ != s_.size()) error("unexpected content after the top-level value");
    return v;
  }

 private:
  static constexpr int kMaxDepth = 64;

  [[noreturn]] void error_at(std::size_t pos, const std::string& why) const {
    fail(context_, ": invalid JSON at byte ", pos, ": ", why);
  }
  [[noreturn]] void error(const std::string& why) const { error_at(i_, why); }

  void skip_ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  char peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
  void expect(char c) {
    if (i_ >= s_.size()) error(std::string("expected '") + c + "' but the text ended");
    if (s_[i_] != c) error(std::string("expected '") + c + "'");
    ++i_;
  }
  void literal(std::string_view word) {
    if (s_.substr(i_, word.size()) != word) error("unexpected character");
    i_ += word.size();
  }

  Value parse_value(int depth) {
    if (depth > kMaxDepth) error("nested deeper than 64 levels");
    if (i_ >= s_.size()) error("expected a value but the text ended");
    Value v;
    switch (s_[i_]) {
      case '{': v.kind = Value::Kind::Object; parse_object(v, depth); break;
      case '[': v.kind = Value::Kind::Array; parse_array(v, depth); break;
      case '"': v.kind = Value::Kind::String; v.text = parse_string(); break;
      case 't': literal("true"); v.kind = Value::Kind::Bool; v.boolean = true; break;
      case 'f': literal("false"); v.kind = Value::Kind::Bool; break;
      case 'n': literal("null"); break;
      default:
        if (s_[i_] == '-' || (s_[i_] >= '0' && s_[i_] <= '9')) {
          v.kind = Value::Kind::Number;
          v.text = parse_number();
        } else {
          error("unexpected character");
        }
    }
    return v;
  }

  void parse_object(Value& v, int depth) {
    ++i_;
    skip_ws();
    if (peek() == '}') {
      ++i_;
      return;
    }
    std::set<std::string> seen;
    for (;;) {
      skip_ws();
      if (peek() != '"') error("expected a string key");
      const std::size_t key_pos = i_;
      std::string key = parse_string();
      if (!seen.insert(key).second) error_at(key_pos, "duplicate key \"" + key + "\"");
      skip_ws();
      expect(':');
      skip_ws();
      Value item = parse_value(depth + 1);
      v.object.emplace_back(std::move(key), std::move(item));
      skip_ws();
      if (peek() == ',') {
        ++i_;
        continue;
      }
      expect('}');
      return;
    }
  }

  void parse_array(Value& v, int depth) {
    ++i_;
    skip_ws();
    if (peek() == ']') {
      ++i_;
      return;
    }
    for (;;) {
      skip_ws();
      v.array.push_back(parse_value(depth + 1));
      skip_ws();
      if (peek() == ',') {
        ++i_;
        continue;
      }
      expect(']');
      return;
    }
  }

  std::string parse_number() {
    const std::size_t start = i_;
    auto digits = [&] {
      const std::size_t d = i_;
      while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') ++i_;
      return i_ - d;
    };
    if (peek() == '-') ++i_;
    if (peek() == '0') {
      ++i_;
      if (peek() >= '0' && peek() <= '9') error("leading zeros are not allowed");
    } else if (digits() == 0) {
      error("expected a digit");
    }
    if (peek() == '.') {
      ++i_;
      if (digits() == 0) error("expected a digit after the decimal point");
    }
    if (peek() == 'e' || peek() == 'E') {
      ++i_;
      if (peek() == '+' || peek() == '-') ++i_;
      if (digits() == 0) error("expected a digit in the exponent");
    }
    return std::string(s_.substr(start, i_ - start));
  }

  unsigned hex4() {
    if (i_ + 4 > s_.size()) error("truncated \\u escape");
    unsigned v = 0;
    for (int k = 0; k < 4; ++k) {
      const char c = s_[i_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= static_cast<unsigned>(c - '0');
      else if (c >= 'a' && c <= 'f') v |= static_cast<unsigned>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= static_cast<unsigned>(c - 'A' + 10);
      else error_at(i_ - 1, "bad hex digit in \\u escape");
    }
    return v;
  }

  static void append_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  std::string parse_string() {
    ++i_;  // opening quote
    std::string out;
    for (;;) {
      if (i_ >= s_.size()) error("unterminated string");
      const auto c = static_cast<unsigned char>(s_[i_]);
      if (c == '"') {
        ++i_;
        return out;
      }
      if (c < 0x20) error("unescaped control character in a string");
      if (c != '\\') {
        out += static_cast<char>(c);
        ++i_;
        continue;
      }
      if (++i_ >= s_.size()) error("unterminated escape");
      const char e = s_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xDC00 && cp <= 0xDFFF) error("lone low surrogate in \\u escape");
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (s_.substr(i_, 2) != "\\u") error("high surrogate not followed by a \\u low surrogate");
            i_ += 2;
            const unsigned lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) error("high surrogate not followed by a low surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default: error_at(i_ - 1, "invalid escape character");
      }
    }
  }

  std::string_view s_;
  std::string context_;
  std::size_t i_ = 0;
};

inline Value parse(std::string_view text, std::string context = "json") {
  return Parser(text, std::move(context)).parse_document();
}

// Appends s as a JSON string literal; s must be valid UTF-8.
inline void write_string(std::string& out, std::string_view s) {
  static constexpr char kHex[] = "0123456789abcdef";
  out += '"';
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out += kHex[c >> 4];
          out += kHex[c & 0xF];
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

// A non-negative integer literal that fits in int64, else nullopt.
inline std::optional<int64_t> as_index(const Value& v) {
  if (v.kind != Value::Kind::Number || v.text.empty() || v.text.size() > 19) return std::nullopt;
  uint64_t x = 0;
  for (const char c : v.text) {
    if (c < '0' || c > '9') return std::nullopt;
    x = x * 10 + static_cast<uint64_t>(c - '0');
  }
  if (x > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
  return static_cast<int64_t>(x);
}

}  // namespace json

// ---------------------------------------------------------------------------------------------

struct SafetensorsFile {
  std::vector<std::pair<std::string, Tensor>> tensors;  // in file (data offset) order
  std::map<std::string, std::string> metadata;

  const Tensor* find(const std::string& name) const {
    for (const auto& [k, t] : tensors)
      if (k == name) return &t;
    return nullptr;
  }
  const Tensor& at(const std::string& name) const {
    const Tensor* t = find(name);
    MIXPREC_CHECK(t != nullptr, "SafetensorsFile: no tensor named '", name, "'");
    return *t;
  }
};

namespace detail {

// Far above any real header; refusing bigger ones keeps a corrupt length from driving a huge read.
inline constexpr uint64_t kMaxSafetensorsHeader = 100'000'000;

inline const char* safetensors_dtype(DType d) {
  switch (d) {
    case DType::Float32: return "F32";
    case DType::Float64: return "F64";
    case DType::Float16: return "F16";
    case DType::BFloat16: return "BF16";
    case DType::Int32: return "I32";
    case DType::Int64: return "I64";
    case DType::UInt8: return "U8";
    case DType::Bool: return "BOOL";
    case DType::Float8E4M3FN: return "F8_E4M3";  // the safetensors spec's names for the OCP formats
    case DType::Float8E5M2: return "F8_E5M2";
  }
  fail("save_safetensors: unhandled dtype ", d);
}
inline std::optional<DType> dtype_from_safetensors(std::string_view s) {
  for (int i = 0; i < kNumDTypes; ++i) {
    const auto d = static_cast<DType>(i);
    if (s == safetensors_dtype(d)) return d;
  }
  return std::nullopt;
}

inline std::string errno_text(int err) { return std::strerror(err); }

// Owns a POSIX descriptor.
struct Fd {
  int fd = -1;
  Fd() = default;
  explicit Fd(int f) : fd(f) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  int release() {
    const int f = fd;
    fd = -1;
    return f;
  }
};

inline void write_all(int fd, const void* data, std::size_t n, const std::string& path) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, std::min<std::size_t>(n, std::size_t{1} << 30));
    if (w < 0) {
      if (errno == EINTR) continue;
      fail("save_safetensors: writing '", path, "' failed: ", errno_text(errno));
    }
    p += w;
    n -= static_cast<std::size_t>(w);
  }
}

inline void read_all(int fd, void* data, std::size_t n, const std::string& path, const char* what) {
  auto* p = static_cast<char*>(data);
  while (n > 0) {
    const ssize_t r = ::read(fd, p, std::min<std::size_t>(n, std::size_t{1} << 30));
    if (r < 0) {
      if (errno == EINTR) continue;
      fail("load_safetensors: '", path, "': reading ", what, " failed: ", errno_text(errno));
    }
    if (r == 0) fail("load_safetensors: '", path, "': file ended while reading ", what, " (truncated, or changed while reading?)");
    p += r;
    n -= static_cast<std::size_t>(r);
  }
}

inline void check_utf8(const std::string& s, const char* what) {
  MIXPREC_CHECK(json::find_invalid_utf8(s) == std::string_view::npos, "save_safetensors: ", what,
                " is not valid UTF-8 (JSON requires it)");
}

// The JSON header, space-padded so the data section starts 8-byte aligned.
inline std::string safetensors_header(const std::vector<std::pair<std::string, Tensor>>& tensors,
                                      const std::map<std::string, std::string>& metadata) {
  std::string h = "{";
  bool first = true;
  if (!metadata.empty()) {
    h += "\"__metadata__\":{";
    for (const auto& [k, v] : metadata) {
      if (!first) h += ',';
      first = false;
      json::write_string(h, k);
      h += ':';
      json::write_string(h, v);
    }
    h += '}';
    first = false;
  }
  int64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (!first) h += ',';
    first = false;
    json::write_string(h, name);
    h += ":{\"dtype\":\"";
    h += safetensors_dtype(t.dtype());
    h += "\",\"shape\":[";
    for (int64_t d = 0; d < t.dim(); ++d) {
      if (d) h += ',';
      h += std::to_string(t.size(d));
    }
    const int64_t end = offset + t.nbytes();
    h += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(end) + "]}";
    offset = end;
  }
  h += '}';
  h.append((8 - h.size() % 8) % 8, ' ');
  return h;
}

}  // namespace detail

// Writes the tensors (in the given order) and string metadata to `path` atomically: the data go
// to path + ".tmp.<pid>", which is flushed to disk and then renamed over `path`, so a crash or
// error mid-save leaves any previous file intact. Non-contiguous tensors are saved contiguous.
inline void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                             const std::map<std::string, std::string>& metadata = {}) {
  std::vector<std::pair<std::string, Tensor>> flat;
  flat.reserve(tensors.size());
  std::set<std::string> names;
  for (const auto& [name, t] : tensors) {
    MIXPREC_CHECK(t.defined(), "save_safetensors: tensor '", name, "' is undefined");
    MIXPREC_CHECK(!name.empty(), "save_safetensors: a tensor of shape ", t.sizes(), " has an empty name");
    MIXPREC_CHECK(name != "__metadata__", "save_safetensors: '__metadata__' is reserved and cannot name a tensor");
    MIXPREC_CHECK(names.insert(name).second, "save_safetensors: duplicate tensor name '", name, "'");
    detail::check_utf8(name, "a tensor name");
    Tensor c = t.detach();
    if (c.device() != Device::CPU) c = c.cpu();
    flat.emplace_back(name, c.contiguous());
  }
  for (const auto& [k, v] : metadata) {
    detail::check_utf8(k, "a metadata key");
    detail::check_utf8(v, "a metadata value");
  }
  const std::string header = detail::safetensors_header(flat, metadata);
  MIXPREC_CHECK(header.size() <= detail::kMaxSafetensorsHeader, "save_safetensors: header of ", header.size(),
                " bytes exceeds the 100 MB limit readers enforce");

  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  detail::Fd out(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  MIXPREC_CHECK(out.fd >= 0, "save_safetensors: cannot create temporary file '", tmp, "' for '", path, "': ",
                detail::errno_text(errno));
  // From here on the temporary file is ours: remove it on any failure.
  try {
    const uint64_t n = header.size();
    unsigned char len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));
    detail::write_all(out.fd, len, 8, tmp);
    detail::write_all(out.fd, header.data(), header.size(), tmp);
    for (const auto& [name, t] : flat)
      if (t.nbytes() > 0) detail::write_all(out.fd, t.data_ptr(), static_cast<std::size_t>(t.nbytes()), tmp);
    MIXPREC_CHECK(::fsync(out.fd) == 0, "save_safetensors: fsync of '", tmp, "' failed: ", detail::errno_text(errno));
    MIXPREC_CHECK(::close(out.release()) == 0, "save_safetensors: closing '", tmp, "' failed: ",
                  detail::errno_text(errno));
    MIXPREC_CHECK(::rename(tmp.c_str(), path.c_str()) == 0, "save_safetensors: cannot rename '", tmp, "' to '", path,
                  "': ", detail::errno_text(errno));
  } catch (...) {
    if (out.fd >= 0) ::close(out.release());
    ::unlink(tmp.c_str());
    throw;
  }
  // Make the rename itself durable.
  std::string dir = std::filesystem::path(path).parent_path().string();
  if (dir.empty()) dir = ".";
  detail::Fd d(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  MIXPREC_CHECK(d.fd >= 0, "save_safetensors: wrote '", path, "' but cannot open its directory to sync it: ",
                detail::errno_text(errno));
  MIXPREC_CHECK(::fsync(d.fd) == 0 || errno == EINVAL, "save_safetensors: wrote '", path,
                "' but syncing its directory failed: ", detail::errno_text(errno));
}

// Reads a whole safetensors file. Anything malformed — truncation, bad lengths, invalid JSON,
// unknown dtypes, sizes that disagree with offsets, gaps or overlaps, duplicate names — throws
// mixprec::Error naming the file and the problem; nothing is allocated beyond the file's size.
inline SafetensorsFile load_safetensors(const std::string& path) {
  detail::Fd in(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  MIXPREC_CHECK(in.fd >= 0, "load_safetensors: cannot open '", path, "': ", detail::errno_text(errno));
  struct stat st {};
  MIXPREC_CHECK(::fstat(in.fd, &st) == 0, "load_safetensors: cannot stat '", path, "': ", detail::errno_text(errno));
  MIXPREC_CHECK(S_ISREG(st.st_mode), "load_safetensors: '", path, "' is not a regular file");
  const auto file_size = static_cast<uint64_t>(st.st_size);
  const std::string where = "load_safetensors: '" + path + "'";
  MIXPREC_CHECK(file_size >= 8, where, ": file is ", file_size, " bytes, shorter than the 8-byte header length");

  unsigned char len[8];
  detail::read_all(in.fd, len, 8, path, "the header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len[i];
  MIXPREC_CHECK(n <= detail::kMaxSafetensorsHeader, where, ": header length ", n, " exceeds the 100 MB limit (corrupt file?)");
  MIXPREC_CHECK(n <= file_size - 8, where, ": header length ", n, " runs past the end of the ", file_size, "-byte file");
  MIXPREC_CHECK(n >= 2, where, ": header length ", n, " is too short for a JSON object");
  std::string header(static_cast<std::size_t>(n), '\0');
  detail::read_all(in.fd, header.data(), header.size(), path, "the header");
  MIXPREC_CHECK(header[0] == '{', where, ": header does not start with '{'");

  const json::Value root = json::parse(header, where + ": header");
  MIXPREC_CHECK(root.kind == json::Value::Kind::Object, where, ": header is ", json::kind_name(root.kind),
                ", not a JSON object");

  struct Entry {
    std::string name;
    DType dtype;
    Shape shape;
    int64_t begin, end;
  };
  const uint64_t data_size = file_size - 8 - n;
  SafetensorsFile out;
  std::vector<Entry> entries;
  for (const auto& [key, v] : root.object) {
    if (key == "__metadata__") {
      MIXPREC_CHECK(v.kind == json::Value::Kind::Object, where, ": __metadata__ is ", json::kind_name(v.kind),
                    ", expected an object of strings");
      for (const auto& [mk, mv] : v.object) {
        MIXPREC_CHECK(mv.kind == json::Value::Kind::String, where, ": metadata value for '", mk, "' is ",
                      json::kind_name(mv.kind), ", expected a string");
        out.metadata[mk] = mv.text;
      }
      continue;
    }
    const std::string t = where + ": tensor '" + key + "'";
    MIXPREC_CHECK(v.kind == json::Value::Kind::Object, t, " is described by ", json::kind_name(v.kind),
                  ", expected an object with dtype, shape and data_offsets");
    for (const auto& [field, fv] : v.object) {
      (void)fv;
      MIXPREC_CHECK(field == "dtype" || field == "shape" || field == "data_offsets", t, ": unexpected field '", field, "'");
    }
    const json::Value* dt = v.find("dtype");
    const json::Value* sh = v.find("shape");
    const json::Value* off = v.find("data_offsets");
    MIXPREC_CHECK(dt && sh && off, t, ": missing ", !dt ? "dtype" : !sh ? "shape" : "data_offsets");
    MIXPREC_CHECK(dt->kind == json::Value::Kind::String, t, ": dtype is ", json::kind_name(dt->kind), ", expected a string");
    const auto dtype = detail::dtype_from_safetensors(dt->text);
    MIXPREC_CHECK(dtype.has_value(), t, ": unsupported dtype '", dt->text,
                  "' (mixprec reads F32, F64, F16, BF16, I32, I64, U8, BOOL, F8_E4M3, F8_E5M2)");
    MIXPREC_CHECK(sh->kind == json::Value::Kind::Array, t, ": shape is ", json::kind_name(sh->kind), ", expected an array");
    Entry e{key, *dtype, {}, 0, 0};
    // Counted in bytes, capped at the data section: beyond it the entry is wrong anyway.
    // Zero dims make the tensor empty, but the other dims still feed stride arithmetic: cap them.
    uint64_t bytes = itemsize(*dtype);
    bool too_big = false, any_zero = false;
    for (const auto& d : sh->array) {
      const auto x = json::as_index(d);
      MIXPREC_CHECK(x.has_value(), t, ": shape entries must be non-negative integers, got ",
                    d.kind == json::Value::Kind::Number ? d.text : json::kind_name(d.kind));
      e.shape.push_back(*x);
      if (*x == 0) any_zero = true;
      else if (bytes > (uint64_t{1} << 62) / static_cast<uint64_t>(*x)) too_big = true;
      else bytes *= static_cast<uint64_t>(*x);
    }
    if (any_zero && !too_big) bytes = 0;
    MIXPREC_CHECK(off->kind == json::Value::Kind::Array && off->array.size() == 2, t,
                  ": data_offsets must be an array [begin, end]");
    const auto b = json::as_index(off->array[0]);
    const auto en = json::as_index(off->array[1]);
    MIXPREC_CHECK(b && en, t, ": data_offsets must be non-negative integers");
    e.begin = *b;
    e.end = *en;
    MIXPREC_CHECK(e.begin <= e.end, t, ": data_offsets [", e.begin, ", ", e.end, "] end before they begin");
    MIXPREC_CHECK(static_cast<uint64_t>(e.end) <= data_size, t, ": data_offsets [", e.begin, ", ", e.end,
                  "] run past the ", data_size, "-byte data section");
    MIXPREC_CHECK(!too_big && bytes == static_cast<uint64_t>(e.end - e.begin), t, ": shape ", e.shape, " of ",
                  std::string(mixprec::name(*dtype)), " needs ", too_big ? std::string("more than 2^62") : std::to_string(bytes),
                  " bytes but data_offsets [", e.begin, ", ", e.end, "] hold ", e.end - e.begin);
    entries.push_back(std::move(e));
  }

  std::stable_sort(entries.begin(), entries.end(),
                   [](const Entry& a, const Entry& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
  int64_t cursor = 0;
  const Entry* prev = nullptr;
  for (const auto& e : entries) {
    MIXPREC_CHECK(e.begin >= cursor, where, ": tensor '", e.name, "' data_offsets [", e.begin, ", ", e.end,
                  "] overlap tensor '", prev ? prev->name : "", "' [", prev ? prev->begin : 0, ", ", cursor, "]");
    MIXPREC_CHECK(e.begin == cursor, where, ": gap of ", e.begin - cursor, " bytes before tensor '", e.name,
                  "' (data_offsets [", e.begin, ", ", e.end, "]); tensors must be packed back to back");
    cursor = e.end;
    prev = &e;
  }
  MIXPREC_CHECK(static_cast<uint64_t>(cursor) == data_size, where, ": the tensors cover ", cursor,
                " bytes but the data section has ", data_size, " (truncated file or trailing bytes)");

  for (const auto& e : entries) {
    Tensor t = empty(e.shape, e.dtype);
    if (t.nbytes() > 0) detail::read_all(in.fd, t.data_ptr(), static_cast<std::size_t>(t.nbytes()), path, "tensor data");
    if (e.dtype == DType::Bool) {
      const auto* p = static_cast<const unsigned char*>(t.data_ptr());
      for (int64_t i = 0; i < t.numel(); ++i)
        MIXPREC_CHECK(p[i] <= 1, where, ": BOOL tensor '", e.name, "' holds byte ", int{p[i]}, " at element ", i,
                      " (must be 0 or 1)");
    }
    out.tensors.emplace_back(e.name, std::move(t));
  }
  return out;
}

}  // namespace mixprec::io
