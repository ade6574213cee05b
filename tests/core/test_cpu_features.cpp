// cpu_features() against two independent views of the same CPU: the kernel's /proc/cpuinfo
// flags (which the kernel also clears when it does not enable the register state) and the
// compiler runtime's __builtin_cpu_supports.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "mixprec/core/cpu_features.hpp"

namespace {

using mixprec::CpuFeatures;

std::vector<std::pair<std::string, bool>> named(const CpuFeatures& f) {
  return {{"avx2", f.avx2},
          {"fma", f.fma},
          {"f16c", f.f16c},
          {"avx512f", f.avx512f},
          {"avx512bw", f.avx512bw},
          {"avx512vl", f.avx512vl},
          {"avx512_bf16", f.avx512_bf16},
          {"avx512_fp16", f.avx512_fp16},
          {"amx_tile", f.amx_tile},
          {"amx_bf16", f.amx_bf16}};
}

bool any(const CpuFeatures& f) {
  for (const auto& [name, on] : named(f))
    if (on) return true;
  return false;
}

bool same(const CpuFeatures& a, const CpuFeatures& b) { return named(a) == named(b); }

// Flags of the first processor; empty when unreadable (non-Linux, sandboxes).
std::set<std::string> cpuinfo_flags() {
  std::set<std::string> flags;
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("flags", 0) != 0) continue;
    const auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::istringstream words(line.substr(colon + 1));
    for (std::string w; words >> w;) flags.insert(w);
    break;
  }
  return flags;
}

// Restores MIXPREC_DISABLE_SIMD on scope exit so test order does not matter.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value) setenv(name, value, 1);
    else unsetenv(name);
  }
  ~ScopedEnv() {
    if (old_) setenv(name_, old_->c_str(), 1);
    else unsetenv(name_);
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

TEST(CpuFeatures, MatchesProcCpuinfo) {
  const auto flags = cpuinfo_flags();
  if (flags.empty()) GTEST_SKIP() << "/proc/cpuinfo flags not readable";
  const CpuFeatures& f = mixprec::cpu_features();
  std::printf("  detected: %s\n", mixprec::cpu_features_string().c_str());
  if (mixprec::detail::simd_disabled_by_env()) {
    EXPECT_FALSE(any(f)) << "MIXPREC_DISABLE_SIMD is set";
    return;
  }
  // Kernels older than ~5.11 (avx512_fp16) / 5.16 (amx) do not print these names even when the
  // CPU has them, so only "listed => detected" is required for them.
  const std::set<std::string> newer_names = {"avx512_fp16", "amx_tile", "amx_bf16"};
  for (const auto& [name, on] : named(f)) {
    const bool listed = flags.count(name) > 0;
    EXPECT_TRUE(!listed || on) << name << " is in /proc/cpuinfo but not detected";
    EXPECT_TRUE(!on || listed || newer_names.count(name)) << name << " detected but not in /proc/cpuinfo";
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
TEST(CpuFeatures, MatchesCompilerRuntime) {
  if (mixprec::detail::simd_disabled_by_env()) GTEST_SKIP() << "MIXPREC_DISABLE_SIMD is set";
  __builtin_cpu_init();
  const CpuFeatures& f = mixprec::cpu_features();
  EXPECT_EQ(f.avx2, !!__builtin_cpu_supports("avx2"));
  EXPECT_EQ(f.fma, !!__builtin_cpu_supports("fma"));
  EXPECT_EQ(f.avx512f, !!__builtin_cpu_supports("avx512f"));
  EXPECT_EQ(f.avx512bw, !!__builtin_cpu_supports("avx512bw"));
  EXPECT_EQ(f.avx512vl, !!__builtin_cpu_supports("avx512vl"));
  EXPECT_EQ(f.avx512_bf16, !!__builtin_cpu_supports("avx512bf16"));
#if !defined(__clang__)  // clang 14 does not know these names
  EXPECT_EQ(f.f16c, !!__builtin_cpu_supports("f16c"));
  EXPECT_EQ(f.avx512_fp16, !!__builtin_cpu_supports("avx512fp16"));
#endif
}
#endif

TEST(CpuFeatures, Implications) {
  const CpuFeatures& f = mixprec::cpu_features();
  EXPECT_TRUE(f.avx512f || !(f.avx512bw || f.avx512vl || f.avx512_bf16 || f.avx512_fp16));
  EXPECT_TRUE(f.amx_tile || !f.amx_bf16);
#if !defined(__x86_64__)
  EXPECT_FALSE(any(f));
#endif
}

TEST(CpuFeatures, StringListsExactlyTheSetFlags) {
  const CpuFeatures& f = mixprec::cpu_features();
  const std::string s = mixprec::cpu_features_string();
  std::set<std::string> words;
  std::istringstream in(s);
  for (std::string w; in >> w;) words.insert(w);
  if (!any(f)) {
    EXPECT_EQ(s, "none");
    return;
  }
  for (const auto& [name, on] : named(f)) EXPECT_EQ(words.count(name) > 0, on) << name << " in \"" << s << "\"";
  CpuFeatures none;
  EXPECT_EQ(mixprec::cpu_features_string(none), "none");
  CpuFeatures two;
  two.avx2 = two.avx512f = true;
  EXPECT_EQ(mixprec::cpu_features_string(two), "avx2 avx512f");
}

TEST(CpuFeatures, EnvVarDisablesEverything) {
  {
    ScopedEnv env("MIXPREC_DISABLE_SIMD", "1");
    const CpuFeatures f = mixprec::detail::detect_cpu_features();
    EXPECT_FALSE(any(f)) << mixprec::cpu_features_string(f);
    EXPECT_EQ(mixprec::cpu_features_string(f), "none");
  }
  {
    ScopedEnv env("MIXPREC_DISABLE_SIMD", "yes");  // any value but "0" / empty counts
    EXPECT_FALSE(any(mixprec::detail::detect_cpu_features()));
  }
  CpuFeatures unset;
  {
    ScopedEnv env("MIXPREC_DISABLE_SIMD", nullptr);
    unset = mixprec::detail::detect_cpu_features();
  }
  for (const char* off : {"0", ""}) {
    ScopedEnv env("MIXPREC_DISABLE_SIMD", off);
    EXPECT_TRUE(same(mixprec::detail::detect_cpu_features(), unset)) << "value \"" << off << "\"";
  }
}

TEST(CpuFeatures, CachedIsStableAndThreadSafe) {
  const CpuFeatures* first = &mixprec::cpu_features();
  std::vector<const CpuFeatures*> seen(8);
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) threads.emplace_back([&, t] { seen[t] = &mixprec::cpu_features(); });
  for (auto& th : threads) th.join();
  for (const auto* p : seen) EXPECT_EQ(p, first);
  // The cache was filled under this process's environment, so a fresh detection agrees.
  EXPECT_TRUE(same(*first, mixprec::detail::detect_cpu_features()));
}

}  // namespace
