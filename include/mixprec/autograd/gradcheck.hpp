#pragma once
// gradcheck: analytic gradients against float64 central differences, as torch.autograd.gradcheck,
// but through a random projection: it compares v^T J (one backward) with the directional
// finite differences of <v, f(x)> for every input element, which checks the whole Jacobian
// product the optimizer sees without building J.
#include <sstream>

#include "mixprec/autograd/engine.hpp"

namespace mixprec {

struct GradcheckOptions {
  double eps = 1e-6;
  double atol = 1e-5;
  double rtol = 1e-3;
  uint64_t seed = 1234;
};

struct GradcheckResult {
  bool ok = true;
  std::string message;  // the first mismatches, with input index and element
  explicit operator bool() const { return ok; }
};

// f maps the inputs to one tensor (any shape). Floating inputs must be float64 and require grad;
// others (indices, masks) pass through unchanged.
inline GradcheckResult gradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& f, const std::vector<Tensor>& inputs,
                                 const GradcheckOptions& opt = {}) {
  GradcheckResult result;
  std::ostringstream msg;
  for (std::size_t i = 0; i < inputs.size(); ++i)
    if (inputs[i].defined() && inputs[i].requires_grad())
      MIXPREC_CHECK(inputs[i].dtype() == DType::Float64, "gradcheck: input ", i, " has dtype ", inputs[i].dtype(),
                    "; gradcheck needs float64 inputs");
  Generator g(opt.seed);
  Tensor out = f(inputs);
  MIXPREC_CHECK(out.dtype() == DType::Float64, "gradcheck: the function returned ", out.dtype(), ", expected float64");
  const Tensor v = randn(out.sizes(), DType::Float64, g);
  for (const Tensor& t : inputs)
    if (t.defined() && t.requires_grad()) t.set_grad(Tensor());
  if (out.requires_grad()) out.backward(v);

  auto project = [&](const std::vector<Tensor>& in) {
    no_grad ng;
    const Tensor y = f(in).contiguous();
    const double* py = y.data<double>();
    const double* pv = v.data<double>();
    double s = 0;
    for (int64_t k = 0; k < y.numel(); ++k) s += py[k] * pv[k];
    return s;
  };
  int reported = 0;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& x = inputs[i];
    if (!x.defined() || !x.requires_grad()) continue;
    const Tensor analytic = x.grad().defined() ? x.grad().contiguous() : zeros(x.sizes(), DType::Float64);
    // Perturb a private copy with x's own strides, so f sees the same layout (non-contiguous
    // inputs stay non-contiguous).
    std::vector<Tensor> in = inputs;
    Tensor buf = zeros({x.storage()->nbytes / static_cast<int64_t>(x.element_size())}, DType::Float64);
    Tensor probe = detail::make_view(buf, x.sizes(), x.strides(), x.storage_offset());
    detail::copy_kernel(probe, x.detach());
    in[i] = probe;
    double* p = nullptr;
    Shape idx(x.dim(), 0);
    for (int64_t k = 0; k < x.numel(); ++k) {
      int64_t off = 0;
      for (int64_t d = 0; d < x.dim(); ++d) off += idx[d] * probe.stride(d);
      p = static_cast<double*>(probe.storage()->data) + probe.storage_offset() + off;
      const double orig = *p;
      *p = orig + opt.eps;
      const double fp = project(in);
      *p = orig - opt.eps;
      const double fm = project(in);
      *p = orig;
      const double numeric = (fp - fm) / (2 * opt.eps);
      const double a = analytic.data<double>()[k];
      if (!(std::fabs(a - numeric) <= opt.atol + opt.rtol * std::fabs(numeric))) {
        result.ok = false;
        if (reported++ < 5)
          msg << "input " << i << " element " << k << ": analytic " << a << " vs numeric " << numeric << '\n';
      }
      for (int64_t d = x.dim() - 1; d >= 0 && ++idx[d] == x.size(d); --d) idx[d] = 0;
    }
  }
  result.message = msg.str();
  return result;
}

}  // namespace mixprec
