#pragma once
// Which chunks of the 2^32 float32 patterns an exhaustive test visits (test_conversion.cpp,
// test_float8.cpp). MIXPREC_TEST_FLOAT_STRIDE=N (the asan test preset sets it: sanitized code is
// ~10x slower) keeps every N-th chunk of 2^20 patterns plus every chunk of exponent 0 or 255
// (zeros, subnormals, inf, NaN), where the special cases live. Unset or 1: all 2^32 patterns.
#include <cstdint>
#include <cstdlib>

namespace float_sweep {
inline constexpr int64_t kChunk = int64_t{1} << 20;
inline constexpr int64_t kNumChunks = (int64_t{1} << 32) / kChunk;

inline int64_t chunk_stride() {
  const char* s = std::getenv("MIXPREC_TEST_FLOAT_STRIDE");
  return s && std::atoll(s) > 1 ? std::atoll(s) : 1;
}
inline bool chunk_selected(int64_t c, int64_t stride) {
  const uint32_t exponent = static_cast<uint32_t>(c * kChunk) & 0x7f800000u;
  return c % stride == 0 || exponent == 0 || exponent == 0x7f800000u;
}
}  // namespace float_sweep
