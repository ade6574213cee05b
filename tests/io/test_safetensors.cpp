#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>
#include <mixprec/io/safetensors.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <string>
#include <vector>

using namespace mixprec;
namespace fs = std::filesystem;

namespace {

struct StTmpDir {
  fs::path path;
  StTmpDir() {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() / ("mixprec_st_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~StTmpDir() {
    std::error_code ec;
    fs::permissions(path, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

std::string st_read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}
void st_write(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}
std::string st_u64le(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return s;
}
// An independent writer: a header given verbatim, an optional padding, the data bytes.
std::string st_file(const std::string& header, const std::string& data, bool pad = true) {
  std::string h = header;
  if (pad) h.append((8 - h.size() % 8) % 8, ' ');
  return st_u64le(h.size()) + h + data;
}
template <class T>
std::string st_bytes(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}
std::string st_tensor_bytes(const Tensor& t) {
  const Tensor c = t.contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()), static_cast<std::size_t>(c.nbytes()));
}
Tensor st_from_bits(const std::vector<uint16_t>& bits, DType d) {
  Tensor t = empty({static_cast<int64_t>(bits.size())}, d);
  std::memcpy(t.data_ptr(), bits.data(), bits.size() * 2);
  return t;
}

void st_expect_error(const std::function<void()>& f, const std::vector<std::string>& fragments) {
  try {
    f();
    ADD_FAILURE() << "expected mixprec::Error containing '" << fragments.front() << "'";
  } catch (const Error& e) {
    for (const auto& frag : fragments)
      EXPECT_NE(std::string(e.what()).find(frag), std::string::npos) << "'" << frag << "' not in: " << e.what();
  }
}

// Every dtype, odd shapes, special values, and a non-contiguous tensor.
std::vector<std::pair<std::string, Tensor>> st_sample_tensors() {
  Generator g(7);
  std::vector<std::pair<std::string, Tensor>> ts;
  ts.emplace_back("weight.f32", randn({3, 5}, DType::Float32, g));
  ts.emplace_back("f64", tensor(std::vector<double>{1.0, -0.0, std::numeric_limits<double>::infinity(),
                                                    std::numeric_limits<double>::denorm_min(), 1e300}));
  // Every class of 16-bit pattern: zeros, subnormals, normals, infinities, NaNs with payloads.
  ts.emplace_back("f16", st_from_bits({0x0000, 0x8000, 0x0001, 0x03FF, 0x3C00, 0x7BFF, 0x7C00, 0xFC00, 0x7E01, 0xFD55}, DType::Float16));
  ts.emplace_back("bf16", st_from_bits({0x0000, 0x8000, 0x0001, 0x3F80, 0x7F7F, 0x7F80, 0xFF80, 0x7FC1, 0xFFAA, 0x4049}, DType::BFloat16));
  ts.emplace_back("i32", tensor(std::vector<int32_t>{std::numeric_limits<int32_t>::min(), -1, 0, 1, std::numeric_limits<int32_t>::max()}));
  ts.emplace_back("i64", tensor(std::vector<int64_t>{std::numeric_limits<int64_t>::min(), -7, std::numeric_limits<int64_t>::max()}, {3, 1}));
  ts.emplace_back("u8", tensor(std::vector<uint8_t>{0, 1, 127, 128, 255}));
  Tensor flags = empty({2, 2}, DType::Bool);
  const bool fv[] = {true, false, false, true};
  std::memcpy(flags.data_ptr(), fv, 4);
  ts.emplace_back("bool", flags);
  ts.emplace_back("scalar", scalar_tensor(2.5, DType::Float32));
  ts.emplace_back("empty", zeros({0, 3}, DType::Float32));
  ts.emplace_back("transposed", randn({4, 6}, DType::Float64, g).t());
  ts.emplace_back("name with \"quotes\", \\ and \n é ✓", ones({1}, DType::Int32));
  return ts;
}

}  // namespace

TEST(Json, ParsesStrictRfc8259) {
  const auto v = io::json::parse(" {\"a\" : [1, -2.5e+10, 0, true, false, null, \"x\\u00e9\\ud83d\\ude00\\n\"], \"b\":{}}\n ");
  ASSERT_EQ(v.kind, io::json::Value::Kind::Object);
  const auto* a = v.find("a");
  ASSERT_NE(a, nullptr);
  ASSERT_EQ(a->array.size(), 7u);
  EXPECT_EQ(a->array[1].text, "-2.5e+10");
  EXPECT_TRUE(a->array[3].boolean);
  EXPECT_EQ(a->array[5].kind, io::json::Value::Kind::Null);
  EXPECT_EQ(a->array[6].text, "x\xC3\xA9\xF0\x9F\x98\x80\n");
  EXPECT_EQ(io::json::as_index(a->array[2]), 0);
  EXPECT_FALSE(io::json::as_index(a->array[1]).has_value());

  const std::vector<std::string> bad = {
      "", "{", "{\"a\":1,}", "[1,]", "[1 2]", "01", "1.", ".5", "-", "1e", "+1", "NaN", "'a'", "{a:1}", "tru", "nul",
      "\"\x01\"", "\"\\u12\"", "\"\\ud800\"", "\"\\udc00\"", "\"\\ud800\\u0041\"", "\"\\x\"", "{\"a\":1,\"a\":2}",
      "\"\xC0\x80\"", "\"\xED\xA0\x80\"", "\"\xF4\x90\x80\x80\"", "\"\xFF\"", "\"abc", "[] []", "{\"a\" 1}",
      std::string(100, '[') + std::string(100, ']'), std::string("\"a\0\"", 4)};
  for (const auto& s : bad) EXPECT_THROW(io::json::parse(s), Error) << "accepted: " << s;
  EXPECT_NO_THROW(io::json::parse(std::string(60, '[') + std::string(60, ']')));

  for (const char* s : {"-1", "1.0", "1e3", "99999999999999999999", "9223372036854775808"})
    EXPECT_FALSE(io::json::as_index(io::json::parse(s)).has_value()) << s;
  EXPECT_EQ(io::json::as_index(io::json::parse("9223372036854775807")), std::numeric_limits<int64_t>::max());
}

TEST(Json, WriterEscapesEverythingTheParserNeeds) {
  std::string all;
  for (int c = 1; c < 128; ++c) all += static_cast<char>(c);
  all += "é✓😀";
  std::string lit;
  io::json::write_string(lit, all);
  for (char c : lit) EXPECT_GE(static_cast<unsigned char>(c), 0x20) << "raw control character in output";
  EXPECT_EQ(io::json::parse(lit).text, all);
  lit.clear();
  io::json::write_string(lit, "a\"b\\c\n\x01");
  EXPECT_EQ(lit, "\"a\\\"b\\\\c\\n\\u0001\"");
}

TEST(Safetensors, RoundTripsEveryDtypeBitExactly) {
  StTmpDir dir;
  const auto ts = st_sample_tensors();
  const std::map<std::string, std::string> meta = {
      {"format", "pt"}, {"quote\"back\\slash", "line\nbreak\ttab\x01"}, {"unicode", "héllo ✓ 😀"}, {"empty", ""}};
  const std::string path = dir.file("model.safetensors");
  io::save_safetensors(path, ts, meta);
  const auto f = io::load_safetensors(path);
  EXPECT_EQ(f.metadata, meta);
  ASSERT_EQ(f.tensors.size(), ts.size());
  for (std::size_t i = 0; i < ts.size(); ++i) {
    const auto& [name, want] = ts[i];
    EXPECT_EQ(f.tensors[i].first, name) << "file order is save order";
    const Tensor& got = f.at(name);
    EXPECT_EQ(got.dtype(), want.dtype()) << name;
    EXPECT_EQ(got.sizes(), want.sizes()) << name;
    EXPECT_TRUE(got.is_contiguous());
    EXPECT_EQ(st_tensor_bytes(got), st_tensor_bytes(want)) << name << " is not bit-exact";
  }
  EXPECT_EQ(f.find("nope"), nullptr);
  EXPECT_THROW(f.at("nope"), Error);
  // No metadata: no __metadata__ entry, and an empty map back.
  io::save_safetensors(path, {{"x", ones({2})}});
  EXPECT_EQ(st_read(path).find("__metadata__"), std::string::npos);
  EXPECT_TRUE(io::load_safetensors(path).metadata.empty());
  io::save_safetensors(path, {});
  EXPECT_TRUE(io::load_safetensors(path).tensors.empty());
}

TEST(Safetensors, LayoutMatchesTheSpecByteForByte) {
  StTmpDir dir;
  const auto ts = st_sample_tensors();
  const std::string path = dir.file("layout.safetensors");
  io::save_safetensors(path, ts, {{"k", "v"}});
  const std::string bytes = st_read(path);
  ASSERT_GE(bytes.size(), 8u);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  EXPECT_EQ(n % 8, 0u) << "data must start 8-byte aligned";
  ASSERT_LE(8 + n, bytes.size());
  const std::string header = bytes.substr(8, n);
  const std::size_t last = header.find_last_not_of(' ');
  EXPECT_EQ(header[last], '}');
  EXPECT_LT(header.size() - last - 1, 8u) << "padding is fewer than 8 spaces";
  const auto root = io::json::parse(header);
  ASSERT_EQ(root.object.size(), ts.size() + 1);
  EXPECT_EQ(root.object[0].first, "__metadata__");
  EXPECT_EQ(root.object[0].second.find("k")->text, "v");
  int64_t offset = 0;
  for (std::size_t i = 0; i < ts.size(); ++i) {
    const auto& [key, info] = root.object[i + 1];
    const Tensor& t = ts[i].second;
    EXPECT_EQ(key, ts[i].first);
    ASSERT_EQ(info.object.size(), 3u);
    EXPECT_EQ(info.find("dtype")->text, (std::vector<std::string>{"F32", "F64", "F16", "BF16", "I32", "I64", "U8", "BOOL",
                                                                  "F32", "F32", "F64", "I32"}[i]));
    const auto& shape = info.find("shape")->array;
    ASSERT_EQ(static_cast<int64_t>(shape.size()), t.dim());
    for (int64_t d = 0; d < t.dim(); ++d) EXPECT_EQ(io::json::as_index(shape[d]), t.size(d));
    const auto& off = info.find("data_offsets")->array;
    EXPECT_EQ(io::json::as_index(off[0]), offset) << "no gaps";
    EXPECT_EQ(io::json::as_index(off[1]), offset + t.nbytes());
    EXPECT_EQ(bytes.substr(8 + n + offset, t.nbytes()), st_tensor_bytes(t)) << ts[i].first;
    offset += t.nbytes();
  }
  EXPECT_EQ(8 + n + offset, bytes.size()) << "nothing after the last tensor";
}

TEST(Safetensors, ReadsAHandWrittenFile) {
  StTmpDir dir;
  const std::string path = dir.file("hand.safetensors");
  // Whitespace, reordered fields and keys, metadata last, escapes, no padding.
  const std::string header =
      "{ \"b\" : {\"data_offsets\": [8, 24], \"shape\": [2], \"dtype\": \"I64\"},\n"
      "  \"a\\u00e9\": {\"dtype\":\"F32\",\"shape\":[2,1],\"data_offsets\":[0,8]},"
      "  \"z\": {\"dtype\":\"BF16\",\"shape\":[0],\"data_offsets\":[24,24]},"
      "  \"__metadata__\": {\"format\": \"pt\"} }";
  st_write(path, st_file(header, st_bytes(std::vector<float>{1.5f, -2.0f}) + st_bytes(std::vector<int64_t>{-3, 1LL << 40}), false));
  const auto f = io::load_safetensors(path);
  ASSERT_EQ(f.tensors.size(), 3u);
  EXPECT_EQ(f.tensors[0].first, "a\xC3\xA9") << "tensors come back in data order";
  EXPECT_EQ(f.tensors[1].first, "b");
  EXPECT_EQ(f.tensors[2].first, "z");
  const Tensor& a = f.at("a\xC3\xA9");
  EXPECT_EQ(a.sizes(), (Shape{2, 1}));
  EXPECT_EQ(a.data<float>()[0], 1.5f);
  EXPECT_EQ(a.data<float>()[1], -2.0f);
  EXPECT_EQ(f.at("b").data<int64_t>()[1], 1LL << 40);
  EXPECT_EQ(f.at("z").numel(), 0);
  EXPECT_EQ(f.metadata.at("format"), "pt");
}

// Cross-check with an independent implementation: Python's struct and json modules.
TEST(Safetensors, InteroperatesWithPythonStructAndJson) {
  if (std::system("python3 -c 'import json, struct' > /dev/null 2>&1") != 0)
    GTEST_SKIP() << "python3 is not available for the cross-check";
  StTmpDir dir;
  const std::string ours = dir.file("ours.safetensors"), theirs = dir.file("theirs.safetensors");
  io::save_safetensors(ours, {{"w", tensor(std::vector<float>{0.5f, -1.25f, 3.0f, 1e-3f}, {2, 2})},
                              {"ids", tensor(std::vector<int64_t>{-1, 2, 1LL << 50})},
                              {"h", st_from_bits({0x3C00, 0xC000}, DType::Float16)}},
                        {{"note", "héllo \"x\""}});
  const std::string script = dir.file("check.py");
  st_write(script, R"PY(
import json, struct, sys
ours, theirs = sys.argv[1], sys.argv[2]
b = open(ours, 'rb').read()
n = struct.unpack('<Q', b[:8])[0]
assert n % 8 == 0, n
h = json.loads(b[8:8 + n].decode('utf-8'))
assert h['__metadata__'] == {'note': 'h\u00e9llo "x"'}, h['__metadata__']
data = b[8 + n:]
def get(name, fmt):
    t = h[name]
    s, e = t['data_offsets']
    return t['dtype'], t['shape'], list(struct.unpack('<' + fmt * ((e - s) // struct.calcsize(fmt)), data[s:e]))
assert get('w', 'f') == ('F32', [2, 2], [0.5, -1.25, 3.0, struct.unpack('<f', struct.pack('<f', 1e-3))[0]]), get('w', 'f')
assert get('ids', 'q') == ('I64', [3], [-1, 2, 1 << 50]), get('ids', 'q')
assert get('h', 'e') == ('F16', [2], [1.0, -2.0]), get('h', 'e')
assert max(t['data_offsets'][1] for k, t in h.items() if k != '__metadata__') == len(data)
# Write a file the way a third-party writer might: json.dumps defaults, \u escapes, emoji.
payload = struct.pack('<3d', 1.0, -2.5, 1e-300) + struct.pack('<2i', 7, -8)
header = {'__metadata__': {'who': 'python \U0001F600'},
          'x': {'dtype': 'F64', 'shape': [3], 'data_offsets': [0, 24]},
          'y': {'dtype': 'I32', 'shape': [1, 2], 'data_offsets': [24, 32]}}
hb = json.dumps(header).encode('utf-8')
hb += b' ' * ((8 - len(hb) % 8) % 8)
open(theirs, 'wb').write(struct.pack('<Q', len(hb)) + hb + payload)
print('python ok')
)PY");
  const std::string cmd = "python3 '" + script + "' '" + ours + "' '" + theirs + "'";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << "python rejected our file: " << cmd;
  const auto f = io::load_safetensors(theirs);
  EXPECT_EQ(f.metadata.at("who"), "python \xF0\x9F\x98\x80");
  const Tensor& x = f.at("x");
  EXPECT_EQ(x.dtype(), DType::Float64);
  EXPECT_EQ(x.data<double>()[1], -2.5);
  EXPECT_EQ(x.data<double>()[2], 1e-300);
  const Tensor& y = f.at("y");
  EXPECT_EQ(y.sizes(), (Shape{1, 2}));
  EXPECT_EQ(y.data<int32_t>()[1], -8);
}

TEST(Safetensors, MalformedFilesThrowNamingTheProblem) {
  StTmpDir dir;
  const std::string path = dir.file("bad.safetensors");
  const std::string f32x2 = st_bytes(std::vector<float>{1, 2});
  auto expect = [&](const std::string& bytes, const std::vector<std::string>& frags) {
    st_write(path, bytes);
    std::vector<std::string> all = frags;
    all.push_back(path);
    st_expect_error([&] { io::load_safetensors(path); }, all);
  };
  auto one = [](const std::string& info) { return "{\"a\":" + info + "}"; };
  expect("", {"shorter than the 8-byte header length"});
  expect("1234567", {"shorter than the 8-byte header length"});
  expect(st_u64le(200'000'000) + "{}", {"exceeds the 100 MB limit"});
  expect(st_u64le(16) + "{}      ", {"runs past the end"});
  expect(st_u64le(0), {"too short"});
  expect(st_file("[]", ""), {"does not start with '{'"});
  expect(st_file("{\"a\":1,}", ""), {"invalid JSON at byte 7"});
  expect(st_file("{\"a\":1} x", ""), {"unexpected content"});
  expect(st_file(one("{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}") + std::string("\0", 1), f32x2, false),
         {"invalid JSON"});
  expect(st_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"a\":{}}", f32x2), {"duplicate key \"a\""});
  expect(st_file(one("{\"dtype\":\"I8\",\"shape\":[8],\"data_offsets\":[0,8]}"), f32x2), {"unsupported dtype 'I8'"});
  expect(st_file(one("{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}"), f32x2),
         {"shape [3] of float32 needs 12 bytes but data_offsets [0, 8] hold 8"});
  expect(st_file(one("{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}"), f32x2 + "xx"),
         {"cover 8 bytes but the data section has 10"});
  expect(st_file(one("{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}"), f32x2.substr(0, 6)),
         {"run past the 6-byte data section"});
  expect(st_file(one("{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}"), f32x2), {"gap of 4 bytes before tensor 'a'"});
  expect(st_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                 "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", f32x2),
         {"tensor 'b' data_offsets [4, 8] overlap tensor 'a'"});
  expect(st_file(one("{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}"), f32x2), {"end before they begin"});
  expect(st_file(one("{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8.0]}"), f32x2), {"non-negative integers"});
  expect(st_file(one("{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,-8]}"), f32x2), {"non-negative integers"});
  expect(st_file(one("{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]}"), f32x2), {"[begin, end]"});
  expect(st_file(one("{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}"), f32x2), {"shape entries must be non-negative integers"});
  expect(st_file(one("{\"dtype\":\"F32\",\"shape\":2,\"data_offsets\":[0,8]}"), f32x2), {"shape is a number"});
  expect(st_file(one("{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,8]}"), f32x2),
         {"more than 2^62"});
  expect(st_file(one("{\"dtype\":\"F32\",\"shape\":[2]}"), f32x2), {"missing data_offsets"});
  expect(st_file(one("{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"extra\":1}"), f32x2), {"unexpected field 'extra'"});
  expect(st_file(one("[1]"), f32x2), {"tensor 'a' is described by an array"});
  expect(st_file("{\"__metadata__\":{\"k\":1}}", ""), {"metadata value for 'k' is a number"});
  expect(st_file("{\"__metadata__\":[]}", ""), {"__metadata__ is an array"});
  expect(st_file(one("{\"dtype\":\"BOOL\",\"shape\":[2],\"data_offsets\":[0,2]}"), std::string("\1\2", 2)),
         {"holds byte 2 at element 1"});
  expect(st_file("{\"\xFF\":1}", ""), {"invalid UTF-8"});
  st_expect_error([&] { io::load_safetensors(dir.file("missing")); }, {"cannot open", dir.file("missing")});
  st_expect_error([&] { io::load_safetensors(dir.path.string()); }, {"not a regular file"});
}

// Every truncation, every bit flip in the length and the header: an Error or a consistent load,
// never a crash, another exception type, or an allocation the file cannot back.
TEST(Safetensors, DamagedFilesNeverCrash) {
  StTmpDir dir;
  const std::string path = dir.file("good.safetensors");
  io::save_safetensors(path, {{"w", tensor(std::vector<float>{1, 2, 3, 4, 5, 6}, {2, 3})},
                              {"b", tensor(std::vector<int64_t>{7, 8})},
                              {"m", st_from_bits({0x3F80}, DType::BFloat16)}},
                       {{"epoch", "3"}});
  const std::string good = st_read(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(good[i]);
  const std::string bad = dir.file("bad.safetensors");

  for (std::size_t cut = 0; cut < good.size(); ++cut) {
    st_write(bad, good.substr(0, cut));
    EXPECT_THROW(io::load_safetensors(bad), Error) << "truncated to " << cut << " bytes";
  }
  // Any other length, shorter or longer, cannot describe this file.
  for (int bit = 0; bit < 64; ++bit) {
    std::string b = good;
    b[bit / 8] = static_cast<char>(b[bit / 8] ^ (1 << (bit % 8)));
    st_write(bad, b);
    EXPECT_THROW(io::load_safetensors(bad), Error) << "length bit " << bit;
  }
  for (int64_t delta : {-8, 8, -1, 1}) {
    st_write(bad, st_u64le(n + delta) + good.substr(8));
    EXPECT_THROW(io::load_safetensors(bad), Error) << "length off by " << delta;
  }
  int errors = 0, loads = 0;
  for (std::size_t pos = 8; pos < 8 + n; ++pos) {
    for (int bit : {0, 2, 5, 7}) {  // digits, letters and case, structure, UTF-8 lead bits
      std::string b = good;
      b[pos] = static_cast<char>(b[pos] ^ (1 << bit));
      st_write(bad, b);
      try {
        const auto f = io::load_safetensors(bad);
        ++loads;
        int64_t total = 0;
        for (const auto& [k, t] : f.tensors) total += t.nbytes();
        EXPECT_EQ(total, 24 + 16 + 2) << "a damaged header loaded inconsistently (byte " << pos << ")";
      } catch (const Error&) {
        ++errors;
      } catch (const std::exception& e) {
        ADD_FAILURE() << "byte " << pos << " bit " << bit << ": non-mixprec exception " << e.what();
      }
    }
  }
  EXPECT_GT(errors, loads) << "most header damage must be detected";
  // A wrong shape for the same bytes.
  std::string header = good.substr(8, n);
  const std::size_t at = header.find("[2,3]");
  ASSERT_NE(at, std::string::npos);
  header.replace(at, 5, "[3,3]");
  st_write(bad, good.substr(0, 8) + header + good.substr(8 + n));
  st_expect_error([&] { io::load_safetensors(bad); }, {"tensor 'w'", "shape [3, 3] of float32 needs 36 bytes"});
}

TEST(Safetensors, SaveValidatesItsInputs) {
  StTmpDir dir;
  const std::string path = dir.file("v.safetensors");
  st_expect_error([&] { io::save_safetensors(path, {{"a", Tensor()}}); }, {"tensor 'a' is undefined"});
  st_expect_error([&] { io::save_safetensors(path, {{"a", ones({1})}, {"a", ones({2})}}); }, {"duplicate tensor name 'a'"});
  st_expect_error([&] { io::save_safetensors(path, {{"__metadata__", ones({1})}}); }, {"reserved"});
  st_expect_error([&] { io::save_safetensors(path, {{"", ones({1})}}); }, {"empty name"});
  st_expect_error([&] { io::save_safetensors(path, {{"bad\xFF", ones({1})}}); }, {"not valid UTF-8"});
  st_expect_error([&] { io::save_safetensors(path, {{"a", ones({1})}}, {{"k", "\xC0\x80"}}); }, {"metadata value"});
  EXPECT_FALSE(fs::exists(path)) << "nothing is written when validation fails";
  EXPECT_TRUE(fs::is_empty(dir.path));
}

TEST(Safetensors, FailedSaveLeavesThePreviousFileIntact) {
  StTmpDir dir;
  const std::string path = dir.file("ckpt.safetensors");
  const std::vector<std::pair<std::string, Tensor>> v1 = {{"w", tensor(std::vector<float>{1, 2, 3})}};
  const std::vector<std::pair<std::string, Tensor>> v2 = {{"w", tensor(std::vector<float>{4, 5, 6, 7})}};
  io::save_safetensors(path, v1, {{"version", "1"}});
  const std::string v1_bytes = st_read(path);
  auto leftovers = [&] {
    int n = 0;
    for (const auto& e : fs::directory_iterator(dir.path))
      if (e.path().filename().string().find(".tmp.") != std::string::npos && !e.is_directory()) ++n;
    return n;
  };

  // The temporary path is taken (by a directory): creating it fails, nothing else changes.
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  fs::create_directory(tmp);
  st_expect_error([&] { io::save_safetensors(path, v2, {{"version", "2"}}); }, {"cannot create temporary file", tmp});
  EXPECT_EQ(st_read(path), v1_bytes);
  EXPECT_TRUE(fs::is_directory(tmp)) << "must not delete what it did not create";
  fs::remove(tmp);

  // The rename fails after the data were written (the target is a non-empty directory): the
  // temporary file is removed again.
  const std::string dir_target = dir.file("occupied");
  fs::create_directories(fs::path(dir_target) / "child");
  st_expect_error([&] { io::save_safetensors(dir_target, v2); }, {"cannot rename", dir_target});
  EXPECT_TRUE(fs::is_directory(fs::path(dir_target) / "child"));
  EXPECT_EQ(leftovers(), 0);

  // A read-only directory (meaningless for root, who may write anyway).
  if (::geteuid() != 0) {
    fs::permissions(dir.path, fs::perms::owner_write | fs::perms::group_write | fs::perms::others_write,
                    fs::perm_options::remove);
    st_expect_error([&] { io::save_safetensors(path, v2); }, {"cannot create temporary file"});
    fs::permissions(dir.path, fs::perms::owner_write, fs::perm_options::add);
    EXPECT_EQ(st_read(path), v1_bytes);
  }

  // A successful save replaces the file completely and leaves nothing behind.
  io::save_safetensors(path, v2, {{"version", "2"}});
  const auto f = io::load_safetensors(path);
  EXPECT_EQ(f.metadata.at("version"), "2");
  EXPECT_EQ(f.at("w").numel(), 4);
  EXPECT_EQ(leftovers(), 0);
  // A relative path (no directory part) works too.
  const auto cwd = fs::current_path();
  fs::current_path(dir.path);
  io::save_safetensors("rel.safetensors", v1);
  fs::current_path(cwd);
  EXPECT_EQ(io::load_safetensors(dir.file("rel.safetensors")).at("w").numel(), 3);
}
