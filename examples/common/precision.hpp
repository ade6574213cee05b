#pragma once
// The three precisions of the examples and the one place the training step differs between them:
// fp32 as is; bf16 under autocast; fp16 under autocast with the GradScaler.
#include <optional>

#include <mixprec/mixprec.hpp>

namespace examples {

enum class Precision { FP32, BF16, FP16 };

inline Precision parse_precision(const std::string& s) {
  if (s == "fp32") return Precision::FP32;
  if (s == "bf16") return Precision::BF16;
  if (s == "fp16") return Precision::FP16;
  mixprec::fail("--precision must be fp32, bf16 or fp16, got '", s, "'");
}

// --device: cpu, or cuda in the programs nvcc compiled with <mixprec/cuda.hpp> (elsewhere the
// first tensor moved there says why it cannot be).
inline mixprec::Device parse_device(const std::string& s) {
  if (s == "cpu") return mixprec::Device::CPU;
  if (s == "cuda") return mixprec::Device::CUDA;
  mixprec::fail("--device must be cpu or cuda, got '", s, "'");
}

// The autocast scope of the forward pass on `device`: none for fp32.
class ForwardScope {
 public:
  explicit ForwardScope(Precision p, mixprec::Device device = mixprec::Device::CPU) {
    if (p == Precision::BF16) ac_.emplace(device, mixprec::DType::BFloat16);
    if (p == Precision::FP16) ac_.emplace(device, mixprec::DType::Float16);
  }

 private:
  std::optional<mixprec::autocast> ac_;
};

}  // namespace examples
