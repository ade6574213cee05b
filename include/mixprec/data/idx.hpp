#pragma once
// IDX files (the MNIST / Fashion-MNIST format), plain or gzip-compressed, and Fashion-MNIST
// loading. Needs zlib: link ZLIB::ZLIB (-lz).
//
// defines: read_idx, FashionMnist, load_fashion_mnist, synthetic_fashion_mnist,
//          kFashionMnistDir, kFashionMnistMean, kFashionMnistStd
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <vector>
#include <string>
#include <system_error>

#include "mixprec/autograd/engine.hpp"
#include "mixprec/backends/cpu/parallel.hpp"
#include "mixprec/ops/tensor_ops.hpp"
#include "mixprec/tensor/generator.hpp"

namespace mixprec::data {

// Where the Debian package dataset-fashion-mnist installs the IDX files.
inline constexpr const char* kFashionMnistDir = "/usr/share/datasets/fashion-mnist";
// Training-set pixel statistics after scaling to [0, 1].
inline constexpr float kFashionMnistMean = 0.2860f;
inline constexpr float kFashionMnistStd = 0.3530f;

namespace detail {

// Closes the gzFile on every path out, including throws.
class GzReader {
 public:
  explicit GzReader(const std::string& path) : path_(path) {
    // gzopen reads plain files transparently, so one reader serves both .gz and raw IDX files.
    f_ = gzopen(path.c_str(), "rb");
    if (!f_) {
      const int err = errno;
      fail("read_idx: cannot open '", path, "': ", err ? std::strerror(err) : "zlib could not allocate its state");
    }
    gzbuffer(f_, 1 << 18);
  }
  GzReader(const GzReader&) = delete;
  GzReader& operator=(const GzReader&) = delete;
  ~GzReader() {
    if (f_) gzclose_r(f_);
  }
  bool direct() { return gzdirect(f_) != 0; }

  // Reads up to n bytes; returns how many were read (fewer only at end of data).
  int64_t read(void* dst, int64_t n) {
    auto* p = static_cast<char*>(dst);
    int64_t got = 0;
    while (got < n) {
      const auto want = static_cast<unsigned>(std::min<int64_t>(n - got, 1 << 30));
      const int r = gzread(f_, p + got, want);
      if (r < 0) {
        int code = 0;
        const char* msg = gzerror(f_, &code);
        fail("read_idx: '", path_, "': corrupt or unreadable data (",
             code == Z_ERRNO ? std::strerror(errno) : (msg ? msg : "zlib error"), ")");
      }
      if (r == 0) break;
      got += r;
    }
    return got;
  }

 private:
  std::string path_;
  gzFile f_ = nullptr;
};

inline const char* idx_type_name(unsigned code) {
  switch (code) {
    case 0x08: return "unsigned byte";
    case 0x09: return "signed byte";
    case 0x0B: return "int16";
    case 0x0C: return "int32";
    case 0x0D: return "float32";
    case 0x0E: return "float64";
    default: return "not an IDX type";
  }
}

// Deflate cannot expand data by more than about 1032:1, so a gzip file of M bytes cannot hold
// more than this; anything claiming more is corrupt and must not drive an allocation.
inline int64_t max_gzip_payload(int64_t compressed_bytes) { return compressed_bytes * 1100 + (1 << 20); }
// Compressed payloads up to this size are inflated straight into the tensor.
inline constexpr int64_t kIdxDirectReadBytes = int64_t{1} << 28;

}  // namespace detail

// Reads an IDX file of unsigned bytes (magic 0x00000801 for rank 1, 0x00000803 for rank 3, ...;
// big-endian header) into a uint8 tensor of the file's shape. Plain and gzip files both work.
inline Tensor read_idx(const std::string& path) {
  std::error_code ec;
  const auto st = std::filesystem::status(path, ec);
  MIXPREC_CHECK(std::filesystem::exists(st), "read_idx: '", path, "' does not exist");
  MIXPREC_CHECK(std::filesystem::is_regular_file(st), "read_idx: '", path, "' is not a regular file");
  const auto file_bytes = static_cast<int64_t>(std::filesystem::file_size(path, ec));
  MIXPREC_CHECK(!ec, "read_idx: cannot get the size of '", path, "': ", ec.message());

  detail::GzReader in(path);
  std::array<unsigned char, 4> magic{};
  const int64_t got_magic = in.read(magic.data(), 4);
  MIXPREC_CHECK(got_magic == 4, "read_idx: '", path, "' is truncated: ", got_magic,
                " bytes, shorter than the 4-byte IDX magic number");
  const uint32_t magic_value = (uint32_t{magic[0]} << 24) | (uint32_t{magic[1]} << 16) | (uint32_t{magic[2]} << 8) | magic[3];
  auto hex = [](uint32_t v) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%08X", v);
    return std::string(buf);
  };
  MIXPREC_CHECK(magic[0] == 0 && magic[1] == 0, "read_idx: '", path, "' has bad magic number ", hex(magic_value),
                "; an IDX file starts with two zero bytes, a type code and the rank (e.g. 0x00000803 for images)");
  MIXPREC_CHECK(magic[2] == 0x08, "read_idx: '", path, "' has element type code 0x", hex(magic[2]).substr(8), " (",
                detail::idx_type_name(magic[2]), "); only 0x08 (unsigned byte) is supported");
  const int ndim = magic[3];
  MIXPREC_CHECK(ndim >= 1 && ndim <= 8, "read_idx: '", path, "' claims rank ", ndim, " (magic ", hex(magic_value),
                "); expected 1 to 8 dimensions");

  std::array<unsigned char, 32> dim_bytes{};
  const int64_t header_bytes = 4 + 4 * int64_t{ndim};
  const int64_t got_dims = in.read(dim_bytes.data(), 4 * ndim);
  MIXPREC_CHECK(got_dims == 4 * ndim, "read_idx: '", path, "' is truncated inside its header: rank ", ndim, " needs ",
                header_bytes, " header bytes");
  Shape shape(ndim);
  // Cap at 2^40 bytes: beyond that the dims are garbage, not a data set.
  constexpr int64_t kMaxBytes = int64_t{1} << 40;
  // Zero dims are legal, but the other dims must still multiply out sanely (strides use them).
  int64_t nonzero_product = 1;
  bool any_zero = false;
  for (int d = 0; d < ndim; ++d) {
    const unsigned char* b = dim_bytes.data() + 4 * d;
    const uint32_t v = (uint32_t{b[0]} << 24) | (uint32_t{b[1]} << 16) | (uint32_t{b[2]} << 8) | b[3];
    MIXPREC_CHECK(v <= static_cast<uint32_t>(INT32_MAX), "read_idx: '", path, "': dimension ", d, " is ", v,
                  ", not a plausible size (corrupt header?)");
    shape[d] = v;
    if (v == 0) any_zero = true;
    else if (nonzero_product > kMaxBytes / static_cast<int64_t>(v)) nonzero_product = kMaxBytes + 1;
    else nonzero_product *= v;
  }
  MIXPREC_CHECK(nonzero_product <= kMaxBytes, "read_idx: '", path, "': dimensions ", shape,
                " describe more than 2^40 bytes (corrupt header?)");
  const int64_t count = any_zero ? 0 : nonzero_product;

  const bool plain = in.direct();
  if (plain) {
    MIXPREC_CHECK(file_bytes >= header_bytes + count, "read_idx: '", path, "' is truncated: dimensions ", shape, " need ",
                  header_bytes + count, " bytes but the file has ", file_bytes);
    MIXPREC_CHECK(file_bytes == header_bytes + count, "read_idx: '", path, "' has ", file_bytes - header_bytes - count,
                  " trailing bytes after the ", count, " data bytes of dimensions ", shape);
  } else {
    MIXPREC_CHECK(count <= detail::max_gzip_payload(file_bytes), "read_idx: '", path, "': dimensions ", shape, " need ",
                  count, " bytes, more than a ", file_bytes, "-byte gzip file can hold (corrupt header?)");
  }

  Tensor out;
  int64_t got = 0;
  if (plain || count <= detail::kIdxDirectReadBytes) {
    out = empty(shape, DType::UInt8);
    got = in.read(out.data_ptr(), count);
  } else {
    // A compressed size cannot bound the payload tightly, so grow with the data actually
    // inflated instead of trusting the header with one large allocation.
    std::vector<unsigned char> buf;
    while (got < count) {
      const int64_t step = std::min<int64_t>(count - got, detail::kIdxDirectReadBytes);
      buf.resize(static_cast<std::size_t>(got + step));
      const int64_t r = in.read(buf.data() + got, step);
      got += r;
      if (r < step) break;
    }
    if (got == count) {
      out = empty(shape, DType::UInt8);
      std::memcpy(out.data_ptr(), buf.data(), static_cast<std::size_t>(count));
    }
  }
  MIXPREC_CHECK(got == count, "read_idx: '", path, "' is truncated: dimensions ", shape, " need ", count,
                " data bytes but only ", got, " follow the header");
  unsigned char extra = 0;
  MIXPREC_CHECK(in.read(&extra, 1) == 0, "read_idx: '", path, "' has trailing bytes after the ", count,
                " data bytes of dimensions ", shape);
  return out;
}

struct FashionMnist {
  Tensor images;  // float32 [N, 1, 28, 28], (pixel / 255 - mean) / std
  Tensor labels;  // int64 [N], classes 0..9
};

namespace detail {

inline std::string fashion_mnist_install_hint(const std::string& dir) {
  return "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), which puts the IDX "
         "files in " + std::string(kFashionMnistDir) + " (searched: '" + dir + "')";
}

inline std::string find_idx_file(const std::string& dir, const std::string& stem) {
  for (const char* ext : {"", ".gz"}) {
    const std::filesystem::path p = std::filesystem::path(dir) / (stem + ext);
    std::error_code ec;
    if (std::filesystem::is_regular_file(p, ec)) return p.string();
  }
  fail("load_fashion_mnist: neither ", stem, " nor ", stem, ".gz found; ", fashion_mnist_install_hint(dir));
}

// uint8 [N, 28, 28] -> float32 [N, 1, 28, 28], normalised.
inline Tensor normalise_images(const Tensor& raw, float mean, float std) {
  const int64_t n = raw.size(0);
  Tensor out = empty({n, 1, raw.size(1), raw.size(2)}, DType::Float32);
  const uint8_t* src = raw.data<uint8_t>();
  float* dst = out.data<float>();
  const float scale = 1.0f / (255.0f * std);
  const float shift = -mean / std;
  cpu::parallel_for(0, out.numel(), 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) dst[i] = static_cast<float>(src[i]) * scale + shift;
  });
  return out;
}

}  // namespace detail

// Loads the training (60000) or test (10000) split from `dir`, which holds
// {train,t10k}-{images-idx3,labels-idx1}-ubyte, each optionally gzipped.
inline FashionMnist load_fashion_mnist(const std::string& dir = kFashionMnistDir, bool train = true,
                                       float mean = kFashionMnistMean, float std = kFashionMnistStd) {
  MIXPREC_CHECK(std > 0 && std::isfinite(std) && std::isfinite(mean), "load_fashion_mnist: need a positive finite std "
                "and a finite mean, got mean ", mean, ", std ", std);
  std::error_code ec;
  MIXPREC_CHECK(std::filesystem::is_directory(dir, ec), "load_fashion_mnist: directory '", dir, "' does not exist; ",
                detail::fashion_mnist_install_hint(dir));
  const std::string prefix = train ? "train" : "t10k";
  const std::string images_path = detail::find_idx_file(dir, prefix + "-images-idx3-ubyte");
  const std::string labels_path = detail::find_idx_file(dir, prefix + "-labels-idx1-ubyte");

  const Tensor images = read_idx(images_path);
  const Tensor labels = read_idx(labels_path);
  MIXPREC_CHECK(images.dim() == 3 && images.size(1) == 28 && images.size(2) == 28, "load_fashion_mnist: '",
                images_path, "' has shape ", images.sizes(), "; expected [N, 28, 28] images");
  MIXPREC_CHECK(labels.dim() == 1, "load_fashion_mnist: '", labels_path, "' has shape ", labels.sizes(),
                "; expected [N] labels");
  MIXPREC_CHECK(images.size(0) == labels.size(0), "load_fashion_mnist: ", images.size(0), " images in '", images_path,
                "' but ", labels.size(0), " labels in '", labels_path, "'");

  FashionMnist out;
  out.images = detail::normalise_images(images, mean, std);
  out.labels = empty({labels.size(0)}, DType::Int64);
  const uint8_t* l = labels.data<uint8_t>();
  int64_t* dst = out.labels.data<int64_t>();
  for (int64_t i = 0; i < labels.size(0); ++i) {
    MIXPREC_CHECK(l[i] <= 9, "load_fashion_mnist: '", labels_path, "': label ", int{l[i]}, " at index ", i,
                  " is outside 0..9");
    dst[i] = l[i];
  }
  return out;
}

// A stand-in with Fashion-MNIST's shapes and normalisation for examples and tests that must run
// without the data set: each class is a fixed arrangement of bright rectangles, jittered per
// sample (shift, contrast, noise), so a model can learn it but not trivially memorise it.
inline FashionMnist synthetic_fashion_mnist(int64_t n, uint64_t seed, float mean = kFashionMnistMean,
                                            float std = kFashionMnistStd) {
  MIXPREC_CHECK(n >= 0, "synthetic_fashion_mnist: negative sample count ", n);
  MIXPREC_CHECK(std > 0 && std::isfinite(std), "synthetic_fashion_mnist: need a positive finite std, got ", std);
  constexpr int kSide = 28;
  constexpr int kClasses = 10;
  // Templates depend only on the class, never on `seed`: train and test sets share them.
  std::array<std::array<float, kSide * kSide>, kClasses> templates{};
  for (int c = 0; c < kClasses; ++c) {
    Generator tg(0xFA5410ull + static_cast<uint64_t>(c) * 7919u);
    for (int r = 0; r < 3; ++r) {
      const int y0 = 3 + static_cast<int>(tg.below(18)), x0 = 3 + static_cast<int>(tg.below(18));
      const int h = 3 + static_cast<int>(tg.below(std::max(1, 25 - y0 - 2)));
      const int w = 3 + static_cast<int>(tg.below(std::max(1, 25 - x0 - 2)));
      const float v = 0.5f + 0.5f * static_cast<float>(tg.uniform());
      for (int y = y0; y < std::min(kSide - 2, y0 + h); ++y)
        for (int x = x0; x < std::min(kSide - 2, x0 + w); ++x) templates[c][y * kSide + x] = std::max(templates[c][y * kSide + x], v);
    }
  }
  FashionMnist out;
  out.images = empty({n, 1, kSide, kSide}, DType::Float32);
  out.labels = empty({n}, DType::Int64);
  float* img = out.images.data<float>();
  int64_t* lab = out.labels.data<int64_t>();
  Generator g(seed);
  for (int64_t i = 0; i < n; ++i) {
    const int c = static_cast<int>(g.below(kClasses));
    lab[i] = c;
    const int dy = static_cast<int>(g.below(5)) - 2, dx = static_cast<int>(g.below(5)) - 2;
    const float contrast = 0.7f + 0.6f * static_cast<float>(g.uniform());
    float* p = img + i * kSide * kSide;
    for (int y = 0; y < kSide; ++y)
      for (int x = 0; x < kSide; ++x) {
        const int sy = y - dy, sx = x - dx;
        const float t = (sy >= 0 && sy < kSide && sx >= 0 && sx < kSide) ? templates[c][sy * kSide + sx] : 0.0f;
        const float v = std::clamp(t * contrast + 0.15f * static_cast<float>(g.normal()), 0.0f, 1.0f);
        p[y * kSide + x] = (v - mean) / std;
      }
  }
  return out;
}

}  // namespace mixprec::data
