// Smoke example: build a tensor, cast it to bfloat16 and float16, print both and the round-trip
// error, and show the memory statistics and the CPU features mixprec detected.
#include <mixprec/mixprec.hpp>

#include <iostream>

int main() {
  using namespace mixprec;
  manual_seed(0);
  const Tensor x = randn({2, 5});
  std::cout << "cpu features: " << cpu_features_string() << "\n\n";
  std::cout << "float32:  " << x << "\n";
  for (DType d : {DType::BFloat16, DType::Float16}) {
    const Tensor low = x.to(d);
    const Tensor back = low.to(DType::Float32);
    const double rel = norm(sub(back, x)).item<double>() / norm(x).item<double>();
    std::cout << name(d) << ": " << low << "\n  relative round-trip error " << rel << "\n";
  }
  const MemoryStats s = memory_stats(Device::CPU);
  std::cout << "\nmemory: allocated " << s.allocated_bytes << " B, peak " << s.peak_allocated_bytes << " B, "
            << s.num_allocs << " allocations\n";
}
