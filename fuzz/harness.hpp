#pragma once
// One function per loader, shared by the libFuzzer targets (fuzz/fuzz_*.cpp, scripts/fuzz.sh) and
// the corpus replay test (tests/reliability/test_fuzz_corpus.cpp): bytes go in as a file, and the
// loader must either return something that keeps its promises or throw mixprec::Error. Any other
// exception, a broken promise, a crash or a sanitizer report is a finding.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <typeinfo>

// The loaders' own headers rather than the umbrella: less to compile per target, and the umbrella
// does not build with clang 14 (nn/models/gpt.hpp captures a structured binding in a lambda).
#include <mixprec/data/idx.hpp>
#include <mixprec/data/text.hpp>
#include <mixprec/io/checkpoint.hpp>
#include <mixprec/nn/linear.hpp>

namespace mixprec_fuzz {

[[noreturn]] inline void finding(const char* loader, const std::string& what) {
  std::fprintf(stderr, "FUZZ FINDING in %s: %s\n", loader, what.c_str());
  std::fflush(stderr);
  std::abort();
}
#define MIXPREC_FUZZ_REQUIRE(loader, cond) \
  do {                                     \
    if (!(cond)) ::mixprec_fuzz::finding(loader, "broken promise: " #cond); \
  } while (0)

// An in-memory file with a path (memfd): no disk traffic per input, nothing to clean up.
class MemFile {
 public:
  MemFile() : fd_(::memfd_create("mixprec_fuzz", MFD_CLOEXEC)) {
    if (fd_ < 0) finding("harness", "memfd_create failed");
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }
  ~MemFile() { ::close(fd_); }
  MemFile(const MemFile&) = delete;
  MemFile& operator=(const MemFile&) = delete;
  const std::string& write(const uint8_t* data, size_t n) {
    if (::ftruncate(fd_, 0) != 0) finding("harness", "ftruncate failed");
    for (size_t done = 0; done < n;) {
      const ssize_t w = ::pwrite(fd_, data + done, n - done, static_cast<off_t>(done));
      if (w <= 0) finding("harness", "pwrite failed");
      done += static_cast<size_t>(w);
    }
    return path_;
  }

 private:
  int fd_;
  std::string path_;
};
inline MemFile& scratch() {
  static MemFile f;
  return f;
}

// Runs body; mixprec::Error is the expected way to refuse bad bytes, anything else is a finding.
template <class F>
void expect_result_or_error(const char* loader, F&& body) {
  try {
    body();
  } catch (const mixprec::Error&) {
  } catch (const std::exception& e) {
    finding(loader, std::string("threw ") + typeid(e).name() + " instead of mixprec::Error: " + e.what());
  } catch (...) {
    finding(loader, "threw a non-std exception");
  }
}

// safetensors bytes -> load_safetensors, then the same file as a checkpoint for a small model.
inline void safetensors_one(const uint8_t* data, size_t size) {
  using namespace mixprec;
  const std::string& path = scratch().write(data, size);
  expect_result_or_error("load_safetensors", [&] {
    const io::SafetensorsFile f = io::load_safetensors(path);
    uint64_t header = 0;
    for (int i = 7; i >= 0; --i) header = header << 8 | data[i];
    int64_t bytes = 0;
    for (const auto& [name, t] : f.tensors) {
      // numel 0: Tensor::is_contiguous() says false for some zero-size shapes, e.g. [4, 0, 3]
      // (fuzz/regressions/idx/zero_size_not_contiguous); such tensors hold no bytes to misread.
      MIXPREC_FUZZ_REQUIRE("load_safetensors", t.defined() && (t.is_contiguous() || t.numel() == 0) && !name.empty());
      bytes += t.nbytes();
      if (t.dtype() == DType::Bool)
        for (int64_t i = 0; i < t.numel(); ++i) MIXPREC_FUZZ_REQUIRE("load_safetensors", t.data<bool>()[i] <= 1);
    }
    MIXPREC_FUZZ_REQUIRE("load_safetensors", static_cast<uint64_t>(bytes) == size - 8 - header);
  });
  expect_result_or_error("load_checkpoint", [&] {
    Generator g(1), rng(2);
    nn::Linear model(2, 3, true, g);
    amp::GradScaler scaler;
    io::load_checkpoint(path, {&model, nullptr, &scaler, nullptr, {&rng}});
    MIXPREC_FUZZ_REQUIRE("load_checkpoint", scaler.get_scale() > 0 && model.weight.sizes() == (Shape{3, 2}));
  });
}

// IDX bytes (plain or gzip) -> read_idx.
inline void idx_one(const uint8_t* data, size_t size) {
  using namespace mixprec;
  const std::string& path = scratch().write(data, size);
  expect_result_or_error("read_idx", [&] {
    const Tensor t = data::read_idx(path);
    MIXPREC_FUZZ_REQUIRE("read_idx", t.dtype() == DType::UInt8 && t.dim() >= 1 && t.dim() <= 8);
    MIXPREC_FUZZ_REQUIRE("read_idx", t.is_contiguous() || t.numel() == 0);  // see safetensors_one
    const bool gz = size >= 2 && data[0] == 0x1f && data[1] == 0x8b;
    if (!gz) MIXPREC_FUZZ_REQUIRE("read_idx", static_cast<size_t>(4 + 4 * t.dim() + t.numel()) == size);
  });
}

// Bytes 0-3 pick the split fraction, batch, window and seed; the rest is the corpus file.
inline void text_one(const uint8_t* data, size_t size) {
  using namespace mixprec;
  if (size < 4) return;
  const double frac = data[0] / 256.0;
  const int64_t batch = 1 + data[1] % 8, seq = 1 + data[2] % 64;
  const std::string& path = scratch().write(data + 4, size - 4);
  expect_result_or_error("TextDataset", [&] {
    const data::TextDataset d(path, frac);
    MIXPREC_FUZZ_REQUIRE("TextDataset", d.total_size() == static_cast<int64_t>(size - 4));
    MIXPREC_FUZZ_REQUIRE("TextDataset", d.size(data::Split::Train) + d.size(data::Split::Validation) == d.total_size());
    for (data::Split s : {data::Split::Train, data::Split::Validation}) {
      if (d.size(s) < seq + 1) continue;
      Generator g(data[3]);
      const auto [x, y] = d.get_batch(s, batch, seq, g);
      MIXPREC_FUZZ_REQUIRE("TextDataset", x.sizes() == (Shape{batch, seq}) && y.sizes() == x.sizes());
      const int64_t* px = x.data<int64_t>();
      const int64_t* py = y.data<int64_t>();
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t t = 0; t + 1 < seq; ++t) MIXPREC_FUZZ_REQUIRE("TextDataset", py[b * seq + t] == px[b * seq + t + 1]);
      const int64_t windows = d.num_eval_windows(s, seq);
      for (int64_t w = 0; w < windows; w += batch) {
        const auto [ex, ey] = d.eval_batch(s, w, batch, seq);
        MIXPREC_FUZZ_REQUIRE("TextDataset", ex.size(0) == std::min(batch, windows - w));
        MIXPREC_FUZZ_REQUIRE("TextDataset", data::TextDataset::decode(ex.reshape({-1})).size() == static_cast<size_t>(ex.numel()));
      }
      const std::string_view text = d.text(s);
      MIXPREC_FUZZ_REQUIRE("TextDataset", data::TextDataset::decode(data::TextDataset::encode(text)) == text);
    }
  });
}

}  // namespace mixprec_fuzz
