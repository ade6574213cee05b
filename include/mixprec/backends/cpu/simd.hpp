#pragma once
// Run-time instruction-set dispatch for the CPU kernels' loops. The library is compiled without
// -march (consumers' binaries run on other CPUs), so a plain loop is SSE2 code. cpu::simd(f) runs
// f -- a lambda marked MIXPREC_SIMD_BODY, i.e. always inlined, so that its loops are compiled
// inside the targeted function -- in one of three copies: AVX-512, AVX2 or portable, picked once
// per process from the CPU (MIXPREC_DISABLE_SIMD=1 forces portable). The copies are compiled with
// fp-contract=off: a*b+c is never fused into an FMA, so every copy gives the same bits and a
// result does not depend on the machine (the portable one has no FMA to fuse with).
#include "mixprec/dtype/convert.hpp"

#if defined(MIXPREC_X86_SIMD)
#define MIXPREC_TARGET_SIMD512 __attribute__((target("avx512f,avx512bw,avx512vl,f16c"), optimize("fp-contract=off")))
#define MIXPREC_TARGET_SIMD256 __attribute__((target("avx2,f16c"), optimize("fp-contract=off")))
#endif
#if defined(__GNUC__) || defined(__clang__)
#define MIXPREC_SIMD_BODY __attribute__((always_inline))
#else
#define MIXPREC_SIMD_BODY
#endif

namespace mixprec::cpu {

namespace detail {
template <class F>
void simd_portable(const F& f) {
  f();
}
#if defined(MIXPREC_X86_SIMD)
template <class F>
MIXPREC_TARGET_SIMD512 void simd_avx512(const F& f) {
  f();
}
template <class F>
MIXPREC_TARGET_SIMD256 void simd_avx2(const F& f) {
  f();
}
#endif

// The instruction set of this process's loops (fixed at first use, as convert_path()).
inline SimdPath simd_path() {
  static const SimdPath p = [] {
#if defined(MIXPREC_X86_SIMD)
    if (mixprec::detail::simd_path_supported(SimdPath::AVX512)) return SimdPath::AVX512;
    if (mixprec::detail::simd_path_supported(SimdPath::AVX2)) return SimdPath::AVX2;
#endif
    return SimdPath::Scalar;
  }();
  return p;
}
}  // namespace detail

// Runs f, a MIXPREC_SIMD_BODY lambda, with its loops compiled for this CPU's best instruction set.
template <class F>
void simd(const F& f) {
#if defined(MIXPREC_X86_SIMD)
  switch (detail::simd_path()) {
    case SimdPath::AVX512: return detail::simd_avx512(f);
    case SimdPath::AVX2: return detail::simd_avx2(f);
    case SimdPath::Scalar: break;
  }
#endif
  detail::simd_portable(f);
}

}  // namespace mixprec::cpu
