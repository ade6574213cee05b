#pragma once
// One parallel-for for all CPU kernels (OpenMP when the build has it, serial otherwise).
#include <algorithm>
#include <cstdint>

#include "mixprec/core/config.hpp"

namespace mixprec::cpu {

inline int num_threads() {
#if defined(_OPENMP)
  return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
  return 1;
#endif
}

// f(begin, end) over [begin, end), split into contiguous chunks of at least `grain` items.
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, F&& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
#if defined(_OPENMP)
  const int nt = static_cast<int>(std::min<int64_t>(num_threads(), (n + grain - 1) / std::max<int64_t>(grain, 1)));
  if (nt > 1) {
#pragma omp parallel num_threads(nt)
    {
      const int t = omp_get_thread_num();
      const int64_t chunk = (n + nt - 1) / nt;
      const int64_t b = begin + t * chunk;
      const int64_t e = std::min(end, b + chunk);
      if (b < e) f(b, e);
    }
    return;
  }
#endif
  f(begin, end);
}

}  // namespace mixprec::cpu
