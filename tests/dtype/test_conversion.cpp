// Exhaustive float <-> half / bfloat16 conversion tests. Every 16-bit pattern is decoded and every
// one of the 2^32 float patterns is encoded, by the scalar functions and by each bulk SIMD path
// this CPU supports, against references that do not share code with the library: the hardware
// instructions where present, and software algorithms written here otherwise.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <unistd.h>
#endif

#include "mixprec/core/cpu_features.hpp"
#include "mixprec/dtype/convert.hpp"
#include "dtype/float_sweep.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TEST_X86_HW 1
#include <immintrin.h>
#endif

namespace {

using mixprec::bfloat16;
using mixprec::half;
using mixprec::SimdPath;

uint32_t fbits(float f) { return std::bit_cast<uint32_t>(f); }
float from_fbits(uint32_t u) { return std::bit_cast<float>(u); }

// ---------------------------------------------------------------------------------------------
// Independent software references (used when the hardware instruction is absent, and themselves
// checked against the hardware where it is present).

// Round-half-even of a non-negative double holding at most 24 significant bits, exact in double,
// with the tie spelled out rather than left to the FPU rounding mode.
uint32_t round_half_even(double q) {
  const double fl = std::floor(q);
  const double diff = q - fl;
  auto r = static_cast<uint32_t>(fl);
  if (diff > 0.5 || (diff == 0.5 && (r & 1u))) ++r;
  return r;
}

double pow2(int k) { return std::bit_cast<double>(static_cast<uint64_t>(1023 + k) << 52); }  // exact, |k| < 1023

// Value-based: scale into the 11-bit significand grid in double and round there.
uint16_t ref_float_to_half_sw(uint32_t x) {
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const float f = from_fbits(x);
  if (std::isnan(f)) return static_cast<uint16_t>(sign | 0x7e00u | ((x >> 13) & 0x3ffu));  // documented rule
  const double d = std::fabs(static_cast<double>(f));
  if (std::isinf(d) || d >= 65520.0) return static_cast<uint16_t>(sign | 0x7c00u);
  if (d < 0x1p-14) return static_cast<uint16_t>(sign | round_half_even(d * pow2(24)));  // may give 0x400: fine
  int k = static_cast<int>((x >> 23) & 0xffu) - 127;  // d is a normal float in [2^k, 2^(k+1))
  uint32_t r = round_half_even(d * pow2(10 - k));
  if (r == 2048) {
    r = 1024;
    ++k;
  }
  return static_cast<uint16_t>(sign | static_cast<uint32_t>(k + 15) << 10 | (r - 1024));
}

// Truncate-then-compare, unlike the library's add-a-bias form.
uint16_t ref_float_to_bf16_sw(uint32_t x) {
  if ((x & 0x7f800000u) == 0x7f800000u && (x & 0x7fffffu) != 0) return static_cast<uint16_t>((x >> 16) | 0x40u);
  uint32_t hi = x >> 16;
  const uint32_t lo = x & 0xffffu;
  if (lo > 0x8000u || (lo == 0x8000u && (hi & 1u))) ++hi;
  return static_cast<uint16_t>(hi);
}

uint32_t ref_half_to_float_sw(uint16_t h) {
  const bool neg = h & 0x8000u;
  const int e = (h >> 10) & 0x1f;
  const int m = h & 0x3ff;
  if (e == 31) {
    if (m == 0) return neg ? 0xff800000u : 0x7f800000u;
    return (neg ? 0x80000000u : 0u) | 0x7fc00000u | (static_cast<uint32_t>(m) << 13);  // documented rule
  }
  const double v = e == 0 ? std::ldexp(m, -24) : std::ldexp(1024 + m, e - 25);
  const float f = static_cast<float>(v);
  return fbits(neg ? -f : f);
}

// ---------------------------------------------------------------------------------------------
// Hardware references.

bool hw_f16c() { return mixprec::cpu_features().f16c; }
bool hw_bf16() { return mixprec::cpu_features().avx512_bf16; }

#if defined(TEST_X86_HW)
__attribute__((target("avx,f16c"))) void hw_f32_to_f16(const float* s, uint16_t* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
  if (i == n) return;
  float in[8] = {};
  uint16_t out[8];
  std::memcpy(in, s + i, (n - i) * sizeof(float));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_cvtps_ph(_mm256_loadu_ps(in), _MM_FROUND_TO_NEAREST_INT));
  std::memcpy(d + i, out, (n - i) * sizeof(uint16_t));
}
__attribute__((target("avx,f16c"))) void hw_f16_to_f32(const uint16_t* s, float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  if (i == n) return;
  uint16_t in[8] = {};
  float out[8];
  std::memcpy(in, s + i, (n - i) * sizeof(uint16_t));
  _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in))));
  std::memcpy(d + i, out, (n - i) * sizeof(float));
}
// vcvtneps2bf16 always rounds to nearest-even, ignores MXCSR, and flushes float subnormal
// inputs to (signed) zero -- the library keeps them, so callers must exempt subnormal inputs.
__attribute__((target("avx512f,avx512bf16"))) void hw_f32_to_bf16(const float* s, uint16_t* d, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256bh r = _mm512_cvtneps_pbh(_mm512_loadu_ps(s + i));
    std::memcpy(d + i, &r, sizeof(r));
  }
  if (i == n) return;
  float in[16] = {};
  std::memcpy(in, s + i, (n - i) * sizeof(float));
  const __m256bh r = _mm512_cvtneps_pbh(_mm512_loadu_ps(in));
  std::memcpy(d + i, &r, (n - i) * sizeof(uint16_t));
}
#else
void hw_f32_to_f16(const float*, uint16_t*, int64_t) { std::abort(); }
void hw_f16_to_f32(const uint16_t*, float*, int64_t) { std::abort(); }
void hw_f32_to_bf16(const float*, uint16_t*, int64_t) { std::abort(); }
#endif

// ---------------------------------------------------------------------------------------------
// Paths under test.

template <class S, class D>
struct Path {
  std::string name;
  mixprec::detail::ConvertFn<S, D> fn;
};

template <class S, class D>
std::vector<Path<S, D>> available(mixprec::detail::ConvertFn<S, D> scalar, mixprec::detail::ConvertFn<S, D> avx2,
                                  mixprec::detail::ConvertFn<S, D> avx512) {
  std::vector<Path<S, D>> v{{"scalar", scalar}};
  if (mixprec::detail::simd_path_supported(SimdPath::AVX2)) v.push_back({"avx2", avx2});
  if (mixprec::detail::simd_path_supported(SimdPath::AVX512)) v.push_back({"avx512", avx512});
  return v;
}

auto f32_to_f16_paths() {
  using namespace mixprec::detail;
  return available<float, half>(convert_f32_to_f16_scalar, convert_f32_to_f16_avx2, convert_f32_to_f16_avx512);
}
auto f16_to_f32_paths() {
  using namespace mixprec::detail;
  return available<half, float>(convert_f16_to_f32_scalar, convert_f16_to_f32_avx2, convert_f16_to_f32_avx512);
}
auto f32_to_bf16_paths() {
  using namespace mixprec::detail;
  return available<float, bfloat16>(convert_f32_to_bf16_scalar, convert_f32_to_bf16_avx2, convert_f32_to_bf16_avx512);
}
auto bf16_to_f32_paths() {
  using namespace mixprec::detail;
  return available<bfloat16, float>(convert_bf16_to_f32_scalar, convert_bf16_to_f32_avx2, convert_bf16_to_f32_avx512);
}

// Thread-safe mismatch log: a count plus the first few patterns, for the failure message.
class Mismatches {
 public:
  void add(const std::string& path, uint32_t in, uint32_t got, uint32_t want) {
    count_.fetch_add(1, std::memory_order_relaxed);
    note(path, in, got, want);
  }
  // For hot loops: count locally, bump() once, note() only the first few.
  void bump(uint64_t k) { count_.fetch_add(k, std::memory_order_relaxed); }
  void note(const std::string& path, uint32_t in, uint32_t got, uint32_t want) {
    if (full_.load(std::memory_order_relaxed)) return;  // keeps a badly broken path from serialising on the lock
    std::lock_guard<std::mutex> lock(mu_);
    if (kept_ >= 8) {
      full_ = true;
      return;
    }
    char buf[160];
    std::snprintf(buf, sizeof buf, "  [%s] in=0x%08x got=0x%08x want=0x%08x\n", path.c_str(), in, got, want);
    examples_ += buf;
    ++kept_;
  }
  uint64_t count() const { return count_.load(); }
  std::string report() const { return std::to_string(count()) + " mismatches, first:\n" + examples_; }

 private:
  std::atomic<uint64_t> count_{0};
  std::atomic<bool> full_{false};
  std::mutex mu_;
  std::string examples_;
  int kept_ = 0;
};

using float_sweep::chunk_selected;
using float_sweep::kChunk;
using float_sweep::kNumChunks;

// Runs body(first_pattern, thread_slot) for every 2^20-pattern chunk of the 2^32 floats, on all
// cores; returns how many chunks ran.
int64_t sweep_all_floats(const std::function<void(uint32_t, int)>& body) {
  const int threads = static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 64u));
  const int64_t stride = float_sweep::chunk_stride();
  std::atomic<int64_t> next{0}, ran{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (int64_t c; (c = next.fetch_add(1)) < kNumChunks;) {
        if (!chunk_selected(c, stride)) continue;
        body(static_cast<uint32_t>(c * kChunk), t);
        ++ran;
      }
    });
  }
  for (auto& th : pool) th.join();
  if (stride > 1)
    std::printf("  MIXPREC_TEST_FLOAT_STRIDE=%lld: %lld of %lld chunks of 2^20 floats (every %lld-th + exponents 0, 255)\n",
                static_cast<long long>(stride), static_cast<long long>(ran.load()), static_cast<long long>(kNumChunks),
                static_cast<long long>(stride));
  return ran.load();
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

bool is_float_subnormal(uint32_t x) { return (x & 0x7f800000u) == 0 && (x & 0x7fffffu) != 0; }

// ---------------------------------------------------------------------------------------------
// Decoding: all 65,536 patterns.

TEST(DecodeExhaustive, SoftwareReferenceMatchesHardwareVcvtph2ps) {
  if (!hw_f16c()) GTEST_SKIP() << "no F16C";
  std::vector<uint16_t> in(65536);
  for (uint32_t i = 0; i < 65536; ++i) in[i] = static_cast<uint16_t>(i);
  std::vector<float> hw(65536);
  hw_f16_to_f32(in.data(), hw.data(), 65536);
  int bad = 0;
  for (uint32_t i = 0; i < 65536; ++i)
    if (fbits(hw[i]) != ref_half_to_float_sw(static_cast<uint16_t>(i)) && bad++ < 8)
      ADD_FAILURE() << std::hex << "h=0x" << i << " hw=0x" << fbits(hw[i]) << " sw=0x" << ref_half_to_float_sw(static_cast<uint16_t>(i));
  EXPECT_EQ(bad, 0);
}

TEST(DecodeExhaustive, HalfToFloatAllPatterns) {
  std::vector<uint16_t> in(65536);
  for (uint32_t i = 0; i < 65536; ++i) in[i] = static_cast<uint16_t>(i);
  std::vector<float> ref(65536);
  if (hw_f16c()) {
    hw_f16_to_f32(in.data(), ref.data(), 65536);
  } else {
    for (uint32_t i = 0; i < 65536; ++i) ref[i] = from_fbits(ref_half_to_float_sw(static_cast<uint16_t>(i)));
  }
  Mismatches mm;
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint32_t got = fbits(mixprec::detail::half_bits_to_float(static_cast<uint16_t>(i)));
    if (got != fbits(ref[i])) mm.add("half_bits_to_float", i, got, fbits(ref[i]));
    const uint32_t via_type = fbits(static_cast<float>(half::from_bits(static_cast<uint16_t>(i))));
    if (via_type != fbits(ref[i])) mm.add("half->float", i, via_type, fbits(ref[i]));
  }
  const auto* src = reinterpret_cast<const half*>(in.data());
  std::vector<float> out(65536);
  for (const auto& p : f16_to_f32_paths()) {
    std::fill(out.begin(), out.end(), 0.0f);
    p.fn(src, out.data(), 65536);
    for (uint32_t i = 0; i < 65536; ++i)
      if (fbits(out[i]) != fbits(ref[i])) mm.add(p.name, i, fbits(out[i]), fbits(ref[i]));
  }
  EXPECT_EQ(mm.count(), 0u) << mm.report();
}

TEST(DecodeExhaustive, Bfloat16ToFloatAllPatterns) {
  std::vector<uint16_t> in(65536);
  for (uint32_t i = 0; i < 65536; ++i) in[i] = static_cast<uint16_t>(i);
  Mismatches mm;
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint32_t got = fbits(static_cast<float>(bfloat16::from_bits(static_cast<uint16_t>(i))));
    if (got != i << 16) mm.add("bfloat16->float", i, got, i << 16);
  }
  const auto* src = reinterpret_cast<const bfloat16*>(in.data());
  std::vector<float> out(65536);
  for (const auto& p : bf16_to_f32_paths()) {
    std::fill(out.begin(), out.end(), 0.0f);
    p.fn(src, out.data(), 65536);
    for (uint32_t i = 0; i < 65536; ++i)
      if (fbits(out[i]) != i << 16) mm.add(p.name, i, fbits(out[i]), i << 16);
  }
  EXPECT_EQ(mm.count(), 0u) << mm.report();
}

// ---------------------------------------------------------------------------------------------
// Encoding: all 2^32 float patterns.

// The software references stand in for hardware on other CPUs, so check them where both exist:
// a stride over all floats plus every tie/near-tie pattern of both formats.
TEST(EncodeReference, SoftwareReferencesMatchHardware) {
  if (!hw_f16c() && !hw_bf16()) GTEST_SKIP() << "no F16C / AVX512_BF16 to check against";
  std::vector<uint32_t> xs;
  for (uint64_t x = 0; x < (uint64_t{1} << 32); x += 997) xs.push_back(static_cast<uint32_t>(x));
  for (uint32_t hi = 0; hi < (1u << 19); ++hi)
    for (uint32_t lo : {0x0u, 0x1u, 0xfffu, 0x1000u, 0x1001u, 0x1fffu}) xs.push_back(hi << 13 | lo);
  for (uint32_t hi = 0; hi < (1u << 16); ++hi)
    for (uint32_t lo : {0x7fffu, 0x8000u, 0x8001u, 0xffffu}) xs.push_back(hi << 16 | lo);
  std::vector<float> f(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) f[i] = from_fbits(xs[i]);
  std::vector<uint16_t> hw(xs.size());
  const auto n = static_cast<int64_t>(xs.size());
  if (hw_f16c()) {
    hw_f32_to_f16(f.data(), hw.data(), n);
    Mismatches mm;
    for (size_t i = 0; i < xs.size(); ++i)
      if (hw[i] != ref_float_to_half_sw(xs[i])) mm.add("half sw ref", xs[i], ref_float_to_half_sw(xs[i]), hw[i]);
    EXPECT_EQ(mm.count(), 0u) << mm.report();
  }
  if (hw_bf16()) {
    hw_f32_to_bf16(f.data(), hw.data(), n);
    Mismatches mm;
    for (size_t i = 0; i < xs.size(); ++i)
      if (!is_float_subnormal(xs[i]) && hw[i] != ref_float_to_bf16_sw(xs[i]))
        mm.add("bf16 sw ref", xs[i], ref_float_to_bf16_sw(xs[i]), hw[i]);
    EXPECT_EQ(mm.count(), 0u) << mm.report();
  }
}

TEST(EncodeExhaustive, FloatToHalfAllPatterns) {
  const auto t0 = std::chrono::steady_clock::now();
  const auto paths = f32_to_f16_paths();
  const bool use_hw = hw_f16c();
  const int threads = static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 64u));
  struct Buffers {
    std::vector<float> in = std::vector<float>(kChunk);
    std::vector<uint16_t> want = std::vector<uint16_t>(kChunk);
    std::vector<half> got = std::vector<half>(kChunk);
  };
  std::vector<Buffers> bufs(threads);
  Mismatches mm;
  const int64_t chunks = sweep_all_floats([&](uint32_t first, int t) {
    Buffers& b = bufs[t];
    for (int64_t i = 0; i < kChunk; ++i) b.in[i] = from_fbits(first + static_cast<uint32_t>(i));
    if (use_hw) {
      hw_f32_to_f16(b.in.data(), b.want.data(), kChunk);
    } else {
      for (int64_t i = 0; i < kChunk; ++i) b.want[i] = ref_float_to_half_sw(first + static_cast<uint32_t>(i));
    }
    for (const auto& p : paths) {
      p.fn(b.in.data(), b.got.data(), kChunk);
      if (std::memcmp(b.got.data(), b.want.data(), kChunk * sizeof(uint16_t)) == 0) continue;
      uint64_t bad = 0;
      for (int64_t i = 0; i < kChunk; ++i)
        if (b.got[i].x != b.want[i] && bad++ < 8) mm.note(p.name, first + static_cast<uint32_t>(i), b.got[i].x, b.want[i]);
      mm.bump(bad);
    }
  });
  EXPECT_EQ(mm.count(), 0u) << mm.report();
  std::string names;
  for (const auto& p : paths) names += p.name + " ";
  std::printf("  float->half: %lld inputs x {%s} vs %s reference, %d threads, %.1f s\n", static_cast<long long>(chunks * kChunk), names.c_str(),
              use_hw ? "vcvtps2ph" : "software", threads, seconds_since(t0));
}

TEST(EncodeExhaustive, FloatToBfloat16AllPatterns) {
  const auto t0 = std::chrono::steady_clock::now();
  const auto paths = f32_to_bf16_paths();
  const bool use_hw = hw_bf16();
  const int threads = static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 64u));
  struct Buffers {
    std::vector<float> in = std::vector<float>(kChunk);
    std::vector<uint16_t> want = std::vector<uint16_t>(kChunk);
    std::vector<bfloat16> got = std::vector<bfloat16>(kChunk);
  };
  std::vector<Buffers> bufs(threads);
  Mismatches mm;
  std::atomic<uint64_t> hw_flushed{0};  // subnormal inputs where the instruction differs (expected)
  const int64_t chunks = sweep_all_floats([&](uint32_t first, int t) {
    Buffers& b = bufs[t];
    for (int64_t i = 0; i < kChunk; ++i) b.in[i] = from_fbits(first + static_cast<uint32_t>(i));
    if (use_hw) {
      hw_f32_to_bf16(b.in.data(), b.want.data(), kChunk);
      // Chunks are 2^20-aligned, so the subnormals (exponent field 0) fill whole chunks.
      const uint32_t x0 = first;
      if ((x0 & 0x7f800000u) == 0) {
        uint64_t flushed = 0;
        for (int64_t i = 0; i < kChunk; ++i) {
          const uint32_t x = first + static_cast<uint32_t>(i);
          const uint16_t sw = ref_float_to_bf16_sw(x);
          if (is_float_subnormal(x) && b.want[i] != sw) ++flushed;
          b.want[i] = sw;
        }
        hw_flushed += flushed;
      }
    } else {
      for (int64_t i = 0; i < kChunk; ++i) b.want[i] = ref_float_to_bf16_sw(first + static_cast<uint32_t>(i));
    }
    for (const auto& p : paths) {
      p.fn(b.in.data(), b.got.data(), kChunk);
      if (std::memcmp(b.got.data(), b.want.data(), kChunk * sizeof(uint16_t)) == 0) continue;
      uint64_t bad = 0;
      for (int64_t i = 0; i < kChunk; ++i)
        if (b.got[i].x != b.want[i] && bad++ < 8) mm.note(p.name, first + static_cast<uint32_t>(i), b.got[i].x, b.want[i]);
      mm.bump(bad);
    }
  });
  EXPECT_EQ(mm.count(), 0u) << mm.report();
  std::string names;
  for (const auto& p : paths) names += p.name + " ";
  std::printf("  float->bfloat16: %lld inputs x {%s} vs %s reference, %d threads, %.1f s\n", static_cast<long long>(chunks * kChunk), names.c_str(),
              use_hw ? "vcvtneps2bf16 (subnormal inputs: software)" : "software", threads, seconds_since(t0));
  if (use_hw)
    std::printf("  vcvtneps2bf16 differed from round-to-nearest-even on %llu of %llu subnormal inputs (flush to zero)\n",
                static_cast<unsigned long long>(hw_flushed.load()), 2ull * ((1ull << 23) - 1));
}

// ---------------------------------------------------------------------------------------------
// Tails, alignment, dispatch.

TEST(BulkPaths, AllLengthsAndOffsets) {
  std::mt19937 rng(12345);
  std::vector<float> f(300);
  for (auto& v : f) v = from_fbits(rng());
  std::vector<uint16_t> h16(300), b16(300);
  for (auto& v : h16) v = static_cast<uint16_t>(rng());
  for (auto& v : b16) v = static_cast<uint16_t>(rng());
  const auto* hs = reinterpret_cast<const half*>(h16.data());
  const auto* bs = reinterpret_cast<const bfloat16*>(b16.data());
  constexpr uint16_t kGuard = 0xdead;
  for (int off = 0; off < 5; ++off) {
    for (int n = 0; n <= 70; ++n) {
      for (const auto& p : f32_to_f16_paths()) {
        std::vector<half> out(80, half::from_bits(kGuard));
        p.fn(f.data() + off, out.data() + off, n);
        for (int i = 0; i < 80; ++i) {
          const uint16_t want = (i >= off && i < off + n) ? mixprec::detail::float_to_half_bits(f[i]) : kGuard;
          ASSERT_EQ(out[i].x, want) << p.name << " f32->f16 off=" << off << " n=" << n << " i=" << i;
        }
      }
      for (const auto& p : f32_to_bf16_paths()) {
        std::vector<bfloat16> out(80, bfloat16::from_bits(kGuard));
        p.fn(f.data() + off, out.data() + off, n);
        for (int i = 0; i < 80; ++i) {
          const uint16_t want = (i >= off && i < off + n) ? mixprec::detail::float_to_bfloat16_bits(f[i]) : kGuard;
          ASSERT_EQ(out[i].x, want) << p.name << " f32->bf16 off=" << off << " n=" << n << " i=" << i;
        }
      }
      for (const auto& p : f16_to_f32_paths()) {
        std::vector<float> out(80, from_fbits(0xdeadbeef));
        p.fn(hs + off, out.data() + off, n);
        for (int i = 0; i < 80; ++i) {
          const uint32_t want = (i >= off && i < off + n) ? fbits(mixprec::detail::half_bits_to_float(h16[i])) : 0xdeadbeef;
          ASSERT_EQ(fbits(out[i]), want) << p.name << " f16->f32 off=" << off << " n=" << n << " i=" << i;
        }
      }
      for (const auto& p : bf16_to_f32_paths()) {
        std::vector<float> out(80, from_fbits(0xdeadbeef));
        p.fn(bs + off, out.data() + off, n);
        for (int i = 0; i < 80; ++i) {
          const uint32_t want = (i >= off && i < off + n) ? uint32_t{b16[i]} << 16 : 0xdeadbeef;
          ASSERT_EQ(fbits(out[i]), want) << p.name << " bf16->f32 off=" << off << " n=" << n << " i=" << i;
        }
      }
    }
  }
}

// Above the OpenMP threshold and not a multiple of any vector width or chunk.
TEST(ConvertDispatch, LargeArraysMatchScalar) {
  const int64_t n = (int64_t{1} << 20) * 3 + 12345;
  std::mt19937 rng(7);
  std::vector<float> f(n);
  for (auto& v : f) v = from_fbits(rng());
  std::vector<half> h(n);
  std::vector<bfloat16> b(n);
  mixprec::convert(f.data(), h.data(), n);
  mixprec::convert(f.data(), b.data(), n);
  std::vector<float> fh(n), fb(n);
  mixprec::convert(h.data(), fh.data(), n);
  mixprec::convert(b.data(), fb.data(), n);
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(h[i].x, mixprec::detail::float_to_half_bits(f[i])) << i;
    ASSERT_EQ(b[i].x, mixprec::detail::float_to_bfloat16_bits(f[i])) << i;
    ASSERT_EQ(fbits(fh[i]), fbits(mixprec::detail::half_bits_to_float(h[i].x))) << i;
    ASSERT_EQ(fbits(fb[i]), uint32_t{b[i].x} << 16) << i;
  }
}

TEST(ConvertDispatch, PathFollowsCpuFeatures) {
  EXPECT_EQ(mixprec::convert_path(), mixprec::detail::select_convert_path(mixprec::cpu_features()));
  std::printf("  convert path: %s (cpu: %s)\n", mixprec::to_string(mixprec::convert_path()),
              mixprec::cpu_features_string().c_str());
  mixprec::CpuFeatures none;
  EXPECT_EQ(mixprec::detail::select_convert_path(none), SimdPath::Scalar);
  mixprec::CpuFeatures avx2;
  avx2.avx2 = avx2.f16c = avx2.fma = true;
  EXPECT_EQ(mixprec::detail::select_convert_path(avx2), SimdPath::AVX2);
  mixprec::CpuFeatures avx512 = avx2;
  avx512.avx512f = avx512.avx512bw = avx512.avx512vl = true;
  EXPECT_EQ(mixprec::detail::select_convert_path(avx512), SimdPath::AVX512);
  avx512.avx512bw = false;  // the masked 16-bit loads/stores need BW+VL
  EXPECT_EQ(mixprec::detail::select_convert_path(avx512), SimdPath::AVX2);
}

// The generic template (explicit template arguments, non-const pointers, int lengths) and the
// non-fast pairs keep their element-wise semantics.
TEST(ConvertDispatch, GenericTemplateStillWorks) {
  float f[5] = {1.0f, -2.5f, 65520.0f, 1e-8f, std::numeric_limits<float>::quiet_NaN()};
  half h[5];
  mixprec::convert<half, float>(f, h, 5);
  bfloat16 b[5];
  mixprec::convert(f, b, 5);
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(h[i].x, mixprec::detail::float_to_half_bits(f[i]));
    EXPECT_EQ(b[i].x, mixprec::detail::float_to_bfloat16_bits(f[i]));
  }
  double d[3];
  mixprec::convert(h, d, 3);
  EXPECT_EQ(d[0], 1.0);
  EXPECT_EQ(d[1], -2.5);
  EXPECT_TRUE(std::isinf(d[2]));
  bool z[3];
  const float zf[3] = {0.0f, -0.0f, 3.0f};
  mixprec::convert(zf, z, 3);
  EXPECT_FALSE(z[0]);
  EXPECT_FALSE(z[1]);
  EXPECT_TRUE(z[2]);
}

// MIXPREC_DISABLE_SIMD=1 must be honoured before the first dispatch; the cached path can't change
// inside this process, so the check re-runs this binary with the variable set.
TEST(ConvertDispatch, DisableSimdEnvForcesScalar) {
  if (mixprec::detail::simd_disabled_by_env()) {
    EXPECT_EQ(mixprec::convert_path(), SimdPath::Scalar);
    EXPECT_EQ(mixprec::cpu_features_string(), "none");
    float f[37];
    for (int i = 0; i < 37; ++i) f[i] = 1.0f + static_cast<float>(i) * 0x1p-11f;
    half h[37];
    bfloat16 b[37];
    mixprec::convert(f, h, 37);
    mixprec::convert(f, b, 37);
    for (int i = 0; i < 37; ++i) {
      EXPECT_EQ(h[i].x, mixprec::detail::float_to_half_bits(f[i]));
      EXPECT_EQ(b[i].x, mixprec::detail::float_to_bfloat16_bits(f[i]));
    }
    return;
  }
  // The pure part needs no child process.
  const char* old = std::getenv("MIXPREC_DISABLE_SIMD");
  const std::string saved = old ? old : "";
  setenv("MIXPREC_DISABLE_SIMD", "1", 1);
  const auto forced = mixprec::detail::detect_cpu_features();
  if (old) setenv("MIXPREC_DISABLE_SIMD", saved.c_str(), 1);
  else unsetenv("MIXPREC_DISABLE_SIMD");
  EXPECT_EQ(mixprec::detail::select_convert_path(forced), SimdPath::Scalar);
  EXPECT_EQ(mixprec::cpu_features_string(forced), "none");
#if defined(__linux__)
  char exe[4096] = {};
  const ssize_t len = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (len <= 0) GTEST_SKIP() << "cannot find own executable";
  const std::string cmd = std::string("MIXPREC_DISABLE_SIMD=1 '") + exe +
                          "' --gtest_filter=ConvertDispatch.DisableSimdEnvForcesScalar >/dev/null 2>&1";
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
#else
  GTEST_SKIP() << "child-process check is Linux-only";
#endif
}

// Under -ffast-math (FTZ/DAZ set in MXCSR) the SIMD paths must still match the integer scalar code.
#if defined(TEST_X86_HW)
TEST(BulkPaths, IndependentOfFtzDaz) {
  std::vector<uint16_t> all(65536);
  for (uint32_t i = 0; i < 65536; ++i) all[i] = static_cast<uint16_t>(i);
  std::vector<float> f;
  for (uint32_t x : {0x00000001u, 0x807fffffu, 0x007fffffu, 0x33000001u, 0x387fc000u, 0x38800000u, 0x00400000u,
                     0x80000001u, 0x00018000u})
    f.push_back(from_fbits(x));
  const auto dec = f16_to_f32_paths();
  const auto ench = f32_to_f16_paths();
  const auto encb = f32_to_bf16_paths();
  std::vector<std::vector<float>> dec_out(dec.size(), std::vector<float>(65536));
  std::vector<std::vector<half>> ench_out(ench.size(), std::vector<half>(f.size()));
  std::vector<std::vector<bfloat16>> encb_out(encb.size(), std::vector<bfloat16>(f.size()));
  const auto n = static_cast<int64_t>(f.size());
  const unsigned saved = _mm_getcsr();
  _mm_setcsr(saved | 0x8040u);  // FTZ | DAZ; only the conversions run in this mode
  for (size_t p = 0; p < dec.size(); ++p) dec[p].fn(reinterpret_cast<const half*>(all.data()), dec_out[p].data(), 65536);
  for (size_t p = 0; p < ench.size(); ++p) ench[p].fn(f.data(), ench_out[p].data(), n);
  for (size_t p = 0; p < encb.size(); ++p) encb[p].fn(f.data(), encb_out[p].data(), n);
  _mm_setcsr(saved);
  for (size_t p = 0; p < dec.size(); ++p)
    for (uint32_t i = 0; i < 65536; ++i)
      ASSERT_EQ(fbits(dec_out[p][i]), ref_half_to_float_sw(static_cast<uint16_t>(i))) << dec[p].name << std::hex << " h=0x" << i;
  for (size_t p = 0; p < ench.size(); ++p)
    for (size_t i = 0; i < f.size(); ++i)
      EXPECT_EQ(ench_out[p][i].x, ref_float_to_half_sw(fbits(f[i]))) << ench[p].name << std::hex << " x=0x" << fbits(f[i]);
  for (size_t p = 0; p < encb.size(); ++p)
    for (size_t i = 0; i < f.size(); ++i)
      EXPECT_EQ(encb_out[p][i].x, ref_float_to_bf16_sw(fbits(f[i]))) << encb[p].name << std::hex << " x=0x" << fbits(f[i]);
}
#endif

// ---------------------------------------------------------------------------------------------
// Spot checks that read as documentation.

uint16_t h_of(float f) { return half(f).x; }
uint16_t b_of(float f) { return bfloat16(f).x; }

TEST(HalfSpot, NumericLimits) {
  using L = std::numeric_limits<half>;
  EXPECT_EQ(float(L::max()), 65504.0f);
  EXPECT_EQ(float(L::lowest()), -65504.0f);
  EXPECT_EQ(float(L::min()), 0x1p-14f);
  EXPECT_EQ(float(L::denorm_min()), 0x1p-24f);
  EXPECT_EQ(float(L::epsilon()), 0x1p-10f);
  EXPECT_EQ(float(L::round_error()), 0.5f);
  EXPECT_TRUE(std::isinf(float(L::infinity())) && float(L::infinity()) > 0);
  EXPECT_TRUE(std::isnan(float(L::quiet_NaN())));
  EXPECT_TRUE(std::isnan(float(L::signaling_NaN())));
  // Round trip: each limit is exactly representable.
  for (half v : {L::max(), L::lowest(), L::min(), L::denorm_min(), L::epsilon(), L::infinity()})
    EXPECT_EQ(h_of(float(v)), v.x);
  EXPECT_EQ(h_of(float(L::quiet_NaN())), L::quiet_NaN().x);
  EXPECT_EQ(float(half(1.0f) + L::epsilon()), 1.0f + 0x1p-10f);
}

TEST(HalfSpot, RoundToNearestEven) {
  EXPECT_EQ(h_of(1.0f + 0x1p-11f), 0x3c00);              // tie, even below
  EXPECT_EQ(h_of(1.0f + 3 * 0x1p-11f), 0x3c02);          // tie, even above
  EXPECT_EQ(h_of(std::nextafter(1.0f + 0x1p-11f, 2.0f)), 0x3c01);  // just past the tie
  EXPECT_EQ(h_of(std::nextafter(1.0f + 0x1p-11f, 0.0f)), 0x3c00);
  EXPECT_EQ(h_of(2049.0f), 0x6800);  // 2048: ulp is 2 here
  EXPECT_EQ(h_of(2051.0f), 0x6802);  // 2052
  EXPECT_EQ(h_of(-(1.0f + 3 * 0x1p-11f)), 0xbc02);
}

TEST(HalfSpot, Overflow) {
  EXPECT_EQ(h_of(65504.0f), 0x7bff);
  EXPECT_EQ(h_of(std::nextafter(65520.0f, 0.0f)), 0x7bff);
  EXPECT_EQ(h_of(65520.0f), 0x7c00);  // tie between 65504 and 2^16: even is 2^16 = inf
  EXPECT_EQ(h_of(-65520.0f), 0xfc00);
  EXPECT_EQ(h_of(1e10f), 0x7c00);
  EXPECT_EQ(h_of(std::numeric_limits<float>::max()), 0x7c00);
  EXPECT_EQ(h_of(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(h_of(-std::numeric_limits<float>::infinity()), 0xfc00);
}

TEST(HalfSpot, Subnormals) {
  EXPECT_EQ(h_of(0x1p-24f), 0x0001);
  EXPECT_EQ(h_of(0x1p-25f), 0x0000);                           // tie to even (zero)
  EXPECT_EQ(h_of(std::nextafter(0x1p-25f, 1.0f)), 0x0001);
  EXPECT_EQ(h_of(3 * 0x1p-25f), 0x0002);                       // 1.5 ulp: tie to even (2)
  EXPECT_EQ(h_of(5 * 0x1p-25f), 0x0002);                       // 2.5 ulp: tie to even (2)
  EXPECT_EQ(h_of(0x1p-14f - 0x1p-25f), 0x0400);                // rounds up into the normals
  EXPECT_EQ(h_of(0x1p-14f - 0x1p-24f), 0x03ff);
  EXPECT_EQ(h_of(-0x1p-24f), 0x8001);
  EXPECT_EQ(h_of(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(float(half::from_bits(0x03ff)), 1023 * 0x1p-24f);
  EXPECT_EQ(float(half::from_bits(0x0001)), 0x1p-24f);
  EXPECT_EQ(float(half::from_bits(0x8200)), -0x1p-15f);
}

TEST(HalfSpot, NaNStaysNaN) {
  for (uint32_t x : {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff800001u, 0x7fbfffffu, 0x7fffffffu, 0x7f802000u}) {
    const uint16_t h = h_of(from_fbits(x));
    EXPECT_EQ(h & 0x7c00, 0x7c00) << std::hex << x;
    EXPECT_NE(h & 0x3ff, 0) << std::hex << x;    // not turned into inf
    EXPECT_NE(h & 0x200, 0) << std::hex << x;    // quiet
    EXPECT_EQ(h >> 15, x >> 31) << std::hex << x;  // sign kept
    EXPECT_TRUE(std::isnan(float(half::from_bits(h))));
  }
  EXPECT_EQ(h_of(from_fbits(0x7f802000u)), 0x7e01);  // top payload bits kept
  for (uint16_t h : {0x7c01, 0x7d00, 0x7e00, 0x7fff, 0xfc01, 0xffff}) {
    const float f = float(half::from_bits(h));
    EXPECT_TRUE(std::isnan(f)) << std::hex << h;
    EXPECT_NE(fbits(f) & 0x400000u, 0u) << std::hex << h;  // quiet
    EXPECT_EQ(fbits(f) >> 31, static_cast<uint32_t>(h >> 15));
  }
}

TEST(HalfSpot, SignedZero) {
  EXPECT_EQ(h_of(0.0f), 0x0000);
  EXPECT_EQ(h_of(-0.0f), 0x8000);
  EXPECT_EQ(h_of(-1e-30f), 0x8000);  // underflow keeps the sign
  EXPECT_TRUE(std::signbit(float(half::from_bits(0x8000))));
  EXPECT_FALSE(std::signbit(float(half::from_bits(0x0000))));
}

TEST(Bfloat16Spot, NumericLimits) {
  using L = std::numeric_limits<bfloat16>;
  EXPECT_EQ(float(L::max()), from_fbits(0x7f7f0000u));
  EXPECT_EQ(float(L::lowest()), -from_fbits(0x7f7f0000u));
  EXPECT_EQ(float(L::min()), std::numeric_limits<float>::min());
  EXPECT_EQ(float(L::denorm_min()), 0x1p-133f);
  EXPECT_EQ(float(L::epsilon()), 0x1p-7f);
  EXPECT_TRUE(std::isinf(float(L::infinity())));
  EXPECT_TRUE(std::isnan(float(L::quiet_NaN())));
  for (bfloat16 v : {L::max(), L::lowest(), L::min(), L::denorm_min(), L::epsilon(), L::infinity()})
    EXPECT_EQ(b_of(float(v)), v.x);
}

TEST(Bfloat16Spot, RoundingOverflowSubnormalsNaNZero) {
  EXPECT_EQ(b_of(1.0f + 0x1p-8f), 0x3f80);      // tie, even below
  EXPECT_EQ(b_of(1.0f + 3 * 0x1p-8f), 0x3f82);  // tie, even above
  EXPECT_EQ(b_of(std::nextafter(1.0f + 0x1p-8f, 2.0f)), 0x3f81);
  EXPECT_EQ(b_of(std::numeric_limits<float>::max()), 0x7f80);  // past max + half ulp: inf
  EXPECT_EQ(b_of(from_fbits(0x7f7f7fffu)), 0x7f7f);
  EXPECT_EQ(b_of(from_fbits(0x7f7f8000u)), 0x7f80);             // tie to even -> inf
  EXPECT_EQ(b_of(-std::numeric_limits<float>::infinity()), 0xff80);
  // Float subnormals are rounded, not flushed (unlike vcvtneps2bf16).
  EXPECT_EQ(b_of(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(b_of(from_fbits(0x00010000u)), 0x0001);
  EXPECT_EQ(b_of(from_fbits(0x00018000u)), 0x0002);
  EXPECT_EQ(b_of(from_fbits(0x007fffffu)), 0x0080);              // rounds up into the normals
  EXPECT_EQ(b_of(from_fbits(0x807f0000u)), 0x807f);
  EXPECT_EQ(b_of(from_fbits(0x7f800001u)), 0x7fc0);              // signalling -> quiet
  EXPECT_EQ(b_of(from_fbits(0xffbfffffu)), 0xffff);
  EXPECT_EQ(b_of(from_fbits(0x7fffffffu)), 0x7fff);              // no rounding carry into the sign
  EXPECT_EQ(b_of(-0.0f), 0x8000);
  EXPECT_TRUE(std::signbit(float(bfloat16::from_bits(0x8000))));
  EXPECT_TRUE(std::isnan(float(bfloat16::from_bits(0x7f81))));
}

}  // namespace
