// Builds against the installed headers and checks a bfloat16 round trip and memory statistics.
#include <mixprec/mixprec.hpp>

#include <iostream>

int main() {
  using namespace mixprec;
  const Tensor x = arange(0.0, 8.0, 1.0, DType::Float32);
  const Tensor y = x.to(DType::BFloat16).to(DType::Float32);
  for (int64_t i = 0; i < 8; ++i)
    if (y.data<float>()[i] != static_cast<float>(i)) return 1;
  if (memory_stats(Device::CPU).allocated_bytes <= 0) return 2;
  std::cout << "consumer ok: " << y << '\n';
  return 0;
}
