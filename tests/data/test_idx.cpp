#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>
#include <mixprec/data/idx.hpp>

#include <unistd.h>
#include <zlib.h>

#include <array>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

using namespace mixprec;
namespace fs = std::filesystem;

namespace {

struct IdxTmpDir {
  fs::path path;
  IdxTmpDir() {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() / ("mixprec_idx_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~IdxTmpDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

// An independent IDX encoder: big-endian header, then the payload.
std::string idx_encode(const std::vector<uint32_t>& dims, const std::string& payload, unsigned char type = 0x08,
                       int rank_override = -1) {
  std::string s;
  s += '\0';
  s += '\0';
  s += static_cast<char>(type);
  s += static_cast<char>(rank_override >= 0 ? rank_override : static_cast<int>(dims.size()));
  for (uint32_t d : dims)
    for (int k = 3; k >= 0; --k) s += static_cast<char>((d >> (8 * k)) & 0xFF);
  return s + payload;
}

void idx_write(const std::string& path, const std::string& bytes, bool gzip) {
  if (gzip) {
    gzFile f = gzopen(path.c_str(), "wb");
    ASSERT_NE(f, nullptr);
    if (!bytes.empty()) {
      ASSERT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())), static_cast<int>(bytes.size()));
    }
    ASSERT_EQ(gzclose(f), Z_OK);
  } else {
    std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
}

std::string idx_payload(std::size_t n, uint32_t seed) {
  std::string p(n, '\0');
  for (std::size_t i = 0; i < n; ++i) {
    seed = seed * 1664525u + 1013904223u;
    p[i] = static_cast<char>(seed >> 24);
  }
  return p;
}

// Runs f, requiring a mixprec::Error whose message contains every fragment.
void idx_expect_error(const std::function<void()>& f, const std::vector<std::string>& fragments) {
  try {
    f();
    ADD_FAILURE() << "expected mixprec::Error containing '" << fragments.front() << "'";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const auto& frag : fragments) EXPECT_NE(msg.find(frag), std::string::npos) << "'" << frag << "' not in: " << msg;
  }
}

}  // namespace

TEST(Idx, RoundTripPlainAndGzip) {
  IdxTmpDir dir;
  const std::vector<std::vector<uint32_t>> shapes = {{7}, {5, 28, 28}, {3, 4}, {2, 3, 4, 5}, {0, 28, 28}, {1}};
  int k = 0;
  for (const auto& dims : shapes) {
    std::size_t n = 1;
    for (auto d : dims) n *= d;
    const std::string payload = idx_payload(n, 17u + static_cast<uint32_t>(k));
    for (bool gz : {false, true}) {
      const std::string path = dir.file("f" + std::to_string(k++) + (gz ? ".gz" : ""));
      idx_write(path, idx_encode(dims, payload), gz);
      const Tensor t = data::read_idx(path);
      EXPECT_EQ(t.dtype(), DType::UInt8);
      ASSERT_EQ(t.dim(), static_cast<int64_t>(dims.size()));
      for (std::size_t d = 0; d < dims.size(); ++d) EXPECT_EQ(t.size(static_cast<int64_t>(d)), dims[d]);
      ASSERT_EQ(t.numel(), static_cast<int64_t>(n));
      EXPECT_EQ(std::string(static_cast<const char*>(t.data_ptr()), n), payload) << path;
    }
  }
}

TEST(Idx, CorruptFilesThrowNamingFileAndProblem) {
  IdxTmpDir dir;
  const std::string good = idx_payload(2 * 3 * 4, 5);
  int k = 0;
  auto check = [&](const std::string& bytes, bool gz, const std::vector<std::string>& frags) {
    const std::string path = dir.file("bad" + std::to_string(k++) + (gz ? ".gz" : ""));
    idx_write(path, bytes, gz);
    std::vector<std::string> all = frags;
    all.push_back(path);
    idx_expect_error([&] { data::read_idx(path); }, all);
  };
  for (bool gz : {false, true}) {
    std::string bad_magic = idx_encode({2, 3, 4}, good);
    bad_magic[0] = 0x1F;
    check(bad_magic, gz, {"bad magic number 0x1F000803"});
    check(idx_encode({2, 3, 4}, good, 0x0D), gz, {"element type code 0x0D", "float32"});
    check(idx_encode({}, "", 0x08), gz, {"rank 0"});
    check(idx_encode({1, 1, 1, 1, 1, 1, 1, 1, 1}, "x"), gz, {"rank 9"});
    check(idx_encode({2, 3, 4}, good.substr(0, 23)), gz, {"truncated", "[2, 3, 4]"});
    check(idx_encode({2, 3, 4}, good + "xyz"), gz, {"trailing bytes"});
    check(idx_encode({2, 3, 4}, "").substr(0, 9), gz, {"truncated inside its header"});
    check(std::string("\0\0", 2), gz, {"shorter than the 4-byte IDX magic"});
    check(idx_encode({0xFFFFFFFFu, 2}, good), gz, {"dimension 0 is 4294967295"});
    check(idx_encode({2000000000u, 2000000000u}, good), gz, {"more than 2^40 bytes"});
    // Zero dims are legal, but huge companions still are not.
    check(idx_encode({0, 2000000000u, 2000000000u}, ""), gz, {"more than 2^40 bytes"});
  }
  // A small gzip file cannot hold 100 GB: refused before any allocation.
  check(idx_encode({100000, 1000, 1000}, good), true, {"more than a", "gzip file can hold"});
  // The same header uncompressed is refused by the file size.
  check(idx_encode({100000, 1000, 1000}, good), false, {"truncated", "need 100000000016 bytes"});

  idx_expect_error([&] { data::read_idx(dir.file("missing")); }, {"does not exist", dir.file("missing")});
  idx_expect_error([&] { data::read_idx(dir.path.string()); }, {"not a regular file"});
}

// Damaging the compressed stream must end in an error (or, rarely, equal data), never a crash.
TEST(Idx, DamagedGzipStreamThrows) {
  IdxTmpDir dir;
  const std::string path = dir.file("good.gz");
  const std::string payload = idx_payload(4 * 28 * 28, 3);
  idx_write(path, idx_encode({4, 28, 28}, payload), true);
  std::ifstream in(path, std::ios::binary);
  const std::string gz((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  int errors = 0, flips = 0;
  // Skip the 10-byte gzip header: damage there can turn the file into "plain" data, covered above.
  for (std::size_t pos = 10; pos < gz.size(); pos += 7) {
    std::string bad = gz;
    bad[pos] = static_cast<char>(bad[pos] ^ (1 << (pos % 8)));
    const std::string p = dir.file("flip.gz");
    idx_write(p, bad, false);
    ++flips;
    try {
      const Tensor t = data::read_idx(p);
      EXPECT_EQ(std::string(static_cast<const char*>(t.data_ptr()), payload.size()), payload) << "silently wrong data";
    } catch (const Error& e) {
      ++errors;
      EXPECT_NE(std::string(e.what()).find(p), std::string::npos);
    }
  }
  EXPECT_GT(errors, flips * 9 / 10) << "the CRC check should reject nearly every damaged stream";
}

// A compressible gzip file whose header claims more than it holds takes the bounded read path:
// memory grows with the inflated data, and the shortfall is reported.
TEST(Idx, LargeClaimOnCompressibleGzipIsReportedAsTruncated) {
  IdxTmpDir dir;
  // gzip members concatenate, so one compressed block of zeros repeated makes a big stream cheaply.
  const std::string zeros_gz = dir.file("zeros.gz");
  idx_write(zeros_gz, std::string(16 << 20, '\0'), true);
  std::ifstream zin(zeros_gz, std::ios::binary);
  const std::string zeros_member((std::istreambuf_iterator<char>(zin)), std::istreambuf_iterator<char>());
  const std::string head_gz = dir.file("head.gz");
  // Incompressible bytes raise the payload a file of this size could plausibly hold.
  idx_write(head_gz, idx_encode({300, 1000, 1000}, idx_payload(1 << 20, 9)), true);
  std::ifstream hin(head_gz, std::ios::binary);
  std::string file((std::istreambuf_iterator<char>(hin)), std::istreambuf_iterator<char>());
  for (int i = 0; i < 17; ++i) file += zeros_member;
  const std::string path = dir.file("big.gz");
  idx_write(path, file, false);
  const int64_t expect_got = (1 << 20) + 17 * (16 << 20);  // < 300000000 claimed, > the direct-read limit
  idx_expect_error([&] { data::read_idx(path); }, {"truncated", "need 300000000 data bytes but only " + std::to_string(expect_got)});
}

TEST(FashionMnist, LoadsFromDirectoryAndNormalises) {
  IdxTmpDir dir;
  const int n = 6;
  const std::string pixels = idx_payload(n * 28 * 28, 11);
  std::string labels;
  for (int i = 0; i < n; ++i) labels += static_cast<char>(i % 10);
  for (bool train : {true, false}) {
    const std::string prefix = train ? "train" : "t10k";
    // Images plain, labels gzipped: both spellings are found.
    idx_write(dir.file(prefix + "-images-idx3-ubyte"), idx_encode({n, 28, 28}, pixels), false);
    idx_write(dir.file(prefix + "-labels-idx1-ubyte.gz"), idx_encode({n}, labels), true);
  }
  const auto ds = data::load_fashion_mnist(dir.path.string(), false, 0.5f, 0.25f);
  ASSERT_EQ(ds.images.sizes(), (Shape{n, 1, 28, 28}));
  ASSERT_EQ(ds.images.dtype(), DType::Float32);
  ASSERT_EQ(ds.labels.sizes(), (Shape{n}));
  ASSERT_EQ(ds.labels.dtype(), DType::Int64);
  const float* img = ds.images.data<float>();
  for (int i = 0; i < n * 28 * 28; ++i) {
    const float want = (static_cast<float>(static_cast<unsigned char>(pixels[i])) / 255.0f - 0.5f) / 0.25f;
    ASSERT_NEAR(img[i], want, 1e-5f) << i;
  }
  for (int i = 0; i < n; ++i) EXPECT_EQ(ds.labels.data<int64_t>()[i], i % 10);

  // Validation of what was found.
  idx_write(dir.file("train-labels-idx1-ubyte.gz"), idx_encode({n}, std::string(n - 1, '\1') + '\12'), true);
  idx_expect_error([&] { data::load_fashion_mnist(dir.path.string(), true); }, {"label 10 at index 5", "outside 0..9"});
  idx_write(dir.file("train-labels-idx1-ubyte.gz"), idx_encode({n - 1}, std::string(n - 1, '\1')), true);
  idx_expect_error([&] { data::load_fashion_mnist(dir.path.string(), true); }, {"6 images", "5 labels"});
  idx_write(dir.file("train-images-idx3-ubyte"), idx_encode({n, 27, 28}, pixels.substr(0, n * 27 * 28)), false);
  idx_expect_error([&] { data::load_fashion_mnist(dir.path.string(), true); }, {"[6, 27, 28]", "[N, 28, 28]"});
  idx_expect_error([&] { data::load_fashion_mnist(dir.path.string(), true, 0.3f, 0.0f); }, {"positive finite std"});
}

TEST(FashionMnist, MissingDataNamesTheDebianPackage) {
  IdxTmpDir dir;
  const std::string missing = dir.file("nowhere");
  idx_expect_error([&] { data::load_fashion_mnist(missing, true); },
                   {"dataset-fashion-mnist", "apt-get install dataset-fashion-mnist", missing, "does not exist"});
  idx_expect_error([&] { data::load_fashion_mnist(dir.path.string(), false); },
                   {"t10k-images-idx3-ubyte", "apt-get install dataset-fashion-mnist", dir.path.string()});
}

TEST(FashionMnist, RealDatasetWhenInstalled) {
  if (!fs::is_directory(data::kFashionMnistDir))
    GTEST_SKIP() << data::kFashionMnistDir << " is absent: install the Debian package dataset-fashion-mnist to run this test";
  const auto train = data::load_fashion_mnist(data::kFashionMnistDir, true);
  const auto test = data::load_fashion_mnist(data::kFashionMnistDir, false);
  ASSERT_EQ(train.images.sizes(), (Shape{60000, 1, 28, 28}));
  ASSERT_EQ(train.labels.sizes(), (Shape{60000}));
  ASSERT_EQ(test.images.sizes(), (Shape{10000, 1, 28, 28}));
  ASSERT_EQ(test.labels.sizes(), (Shape{10000}));
  // Fashion-MNIST is balanced: 6000 / 1000 of each class.
  for (const auto* ds : {&train, &test}) {
    std::array<int64_t, 10> counts{};
    const int64_t* l = ds->labels.data<int64_t>();
    for (int64_t i = 0; i < ds->labels.numel(); ++i) {
      ASSERT_TRUE(l[i] >= 0 && l[i] <= 9);
      ++counts[l[i]];
    }
    for (int64_t c : counts) EXPECT_EQ(c, ds->labels.numel() / 10);
  }
  const std::vector<int64_t> first = {9, 0, 0, 3, 0, 2, 7, 2, 5, 5, 0, 9};
  for (std::size_t i = 0; i < first.size(); ++i) EXPECT_EQ(train.labels.data<int64_t>()[i], first[i]);
  // The default statistics are the training set's: normalised pixels have mean ~0, std ~1.
  const float* p = train.images.data<float>();
  double sum = 0, sq = 0, first_raw = 0;
  const int64_t n = train.images.numel();
  for (int64_t i = 0; i < n; ++i) {
    sum += p[i];
    sq += double(p[i]) * p[i];
  }
  for (int i = 0; i < 784; ++i) first_raw += std::round((p[i] * data::kFashionMnistStd + data::kFashionMnistMean) * 255.0);
  const double mean = sum / n, sd = std::sqrt(sq / n - mean * mean);
  EXPECT_NEAR(mean, 0.0, 0.01);
  EXPECT_NEAR(sd, 1.0, 0.01);
  EXPECT_EQ(first_raw, 76247.0);  // pixel sum of the first training image
}

TEST(FashionMnist, SyntheticIsDeterministicBalancedAndLearnable) {
  const auto a = data::synthetic_fashion_mnist(2000, 1);
  const auto b = data::synthetic_fashion_mnist(2000, 1);
  const auto c = data::synthetic_fashion_mnist(1000, 2);
  ASSERT_EQ(a.images.sizes(), (Shape{2000, 1, 28, 28}));
  ASSERT_EQ(a.images.dtype(), DType::Float32);
  ASSERT_EQ(a.labels.dtype(), DType::Int64);
  EXPECT_EQ(std::memcmp(a.images.data_ptr(), b.images.data_ptr(), a.images.nbytes()), 0);
  EXPECT_EQ(std::memcmp(a.labels.data_ptr(), b.labels.data_ptr(), a.labels.nbytes()), 0);
  EXPECT_NE(std::memcmp(a.images.data_ptr(), c.images.data_ptr(), c.images.nbytes()), 0);

  // Nearest class centroid, fitted on seed 1 and scored on seed 2: learnable means well above
  // chance (10%); the noise and jitter keep it from being exactly separable by a lookup.
  std::vector<std::vector<double>> centroid(10, std::vector<double>(784, 0.0));
  std::array<int, 10> count{};
  for (int64_t i = 0; i < 2000; ++i) {
    const int64_t y = a.labels.data<int64_t>()[i];
    ASSERT_TRUE(y >= 0 && y < 10);
    ++count[y];
    for (int j = 0; j < 784; ++j) centroid[y][j] += a.images.data<float>()[i * 784 + j];
  }
  for (int k = 0; k < 10; ++k) {
    EXPECT_GT(count[k], 120) << "class " << k << " underrepresented";
    for (auto& v : centroid[k]) v /= count[k];
  }
  int correct = 0;
  for (int64_t i = 0; i < 1000; ++i) {
    int best = -1;
    double best_d = 1e300;
    for (int k = 0; k < 10; ++k) {
      double d = 0;
      for (int j = 0; j < 784; ++j) {
        const double diff = c.images.data<float>()[i * 784 + j] - centroid[k][j];
        d += diff * diff;
      }
      if (d < best_d) best_d = d, best = k;
    }
    correct += best == c.labels.data<int64_t>()[i];
  }
  EXPECT_GT(correct, 800) << "synthetic classes should be learnable";
  EXPECT_THROW(data::synthetic_fashion_mnist(-1, 0), Error);
}
