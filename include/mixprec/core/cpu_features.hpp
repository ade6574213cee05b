#pragma once
// Run-time CPU feature detection. Kernels pick their SIMD path from this, never from compile
// flags: the binary that CI builds may run on a CPU with more or fewer features.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDA_ARCH__)
#define MIXPREC_X86_CPUID 1
#include <cpuid.h>
#endif

namespace mixprec {

// A flag is true only when the CPU has the instructions AND the OS saves the register state
// they need (XCR0); either alone would fault or corrupt registers on a context switch.
struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512_bf16 = false;
  bool avx512_fp16 = false;
  // CPU + XCR0 support only: Linux also wants arch_prctl(ARCH_REQ_XCOMP_PERM) before first use.
  bool amx_tile = false;
  bool amx_bf16 = false;
};

namespace detail {

// Set and not "0": lets tests and users force the portable code paths.
inline bool simd_disabled_by_env() {
  const char* v = std::getenv("MIXPREC_DISABLE_SIMD");
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

#if defined(MIXPREC_X86_CPUID)
inline uint64_t read_xcr0() {
  uint32_t eax = 0, edx = 0;
  // Raw opcode use avoids needing -mxsave for _xgetbv.
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}
#endif

// Uncached: re-reads cpuid and the environment each call (tests use it after setenv).
inline CpuFeatures detect_cpu_features() {
  CpuFeatures f;
  if (simd_disabled_by_env()) return f;
#if defined(MIXPREC_X86_CPUID)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return f;
  const unsigned max_leaf = a;
  if (max_leaf < 1) return f;
  __get_cpuid_count(1, 0, &a, &b, &c, &d);
  const unsigned ecx1 = c;
  const bool osxsave = (ecx1 >> 27) & 1u;
  if (!osxsave) return f;  // xgetbv would #UD; no AVX state without it anyway
  const uint64_t xcr0 = read_xcr0();
  const bool os_avx = (xcr0 & 0x6u) == 0x6u;                  // XMM | YMM
  const bool os_avx512 = os_avx && (xcr0 & 0xe0u) == 0xe0u;   // opmask | ZMM_Hi256 | Hi16_ZMM
  const bool os_amx = (xcr0 & 0x60000u) == 0x60000u;          // XTILECFG | XTILEDATA
  const bool avx = os_avx && ((ecx1 >> 28) & 1u);
  f.fma = avx && ((ecx1 >> 12) & 1u);
  f.f16c = avx && ((ecx1 >> 29) & 1u);
  if (max_leaf >= 7) {
    __get_cpuid_count(7, 0, &a, &b, &c, &d);
    const unsigned ebx7 = b, edx7 = d, max_sub7 = a;
    f.avx2 = avx && ((ebx7 >> 5) & 1u);
    f.avx512f = os_avx512 && ((ebx7 >> 16) & 1u);
    f.avx512bw = f.avx512f && ((ebx7 >> 30) & 1u);
    f.avx512vl = f.avx512f && ((ebx7 >> 31) & 1u);
    f.avx512_fp16 = f.avx512f && ((edx7 >> 23) & 1u);
    f.amx_tile = os_amx && ((edx7 >> 24) & 1u);
    f.amx_bf16 = f.amx_tile && ((edx7 >> 22) & 1u);
    if (max_sub7 >= 1) {
      __get_cpuid_count(7, 1, &a, &b, &c, &d);
      f.avx512_bf16 = f.avx512f && ((a >> 5) & 1u);
    }
  }
#endif
  return f;
}

}  // namespace detail

// Detected once; the environment is read on the first call only.
inline const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detail::detect_cpu_features();
  return f;
}

// Names as Linux spells them in /proc/cpuinfo, so logs can be grepped against it.
inline std::string cpu_features_string(const CpuFeatures& f) {
  std::string s;
  auto add = [&](bool on, const char* name) {
    if (!on) return;
    if (!s.empty()) s += ' ';
    s += name;
  };
  add(f.avx2, "avx2");
  add(f.fma, "fma");
  add(f.f16c, "f16c");
  add(f.avx512f, "avx512f");
  add(f.avx512bw, "avx512bw");
  add(f.avx512vl, "avx512vl");
  add(f.avx512_bf16, "avx512_bf16");
  add(f.avx512_fp16, "avx512_fp16");
  add(f.amx_tile, "amx_tile");
  add(f.amx_bf16, "amx_bf16");
  return s.empty() ? std::string("none") : s;
}

inline std::string cpu_features_string() { return cpu_features_string(cpu_features()); }

}  // namespace mixprec
