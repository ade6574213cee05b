#pragma once
// Fused AMP kernels: unscale + inf check, the scale update, Adam(W)/SGD, the gradient norm and
// clipping. Each runs over a list of tensors with few launches: the tensors' pointers travel in
// the kernel's arguments (a SlotBatch of up to ~4 KB, as PyTorch's multi_tensor_apply), never
// through a table uploaded from host memory, so a launch is one driver call and can be captured
// in a CUDA graph. The loss scale, found-inf flag, step counters and gradient norm are read and
// written in device memory: GradScaler, the optimizers and clip_grad_norm_ keep a whole
// iteration off the host -- the kernels take the flag and skip on the device. What a block does
// with its chunk is multi_tensor.hpp's host/device code (host-tested); the arithmetic is the
// CPU's own (amp::detail::update_scale, optim::detail::AdamScalars / SgdScalars,
// amp::detail::nonfinite), so the CPU tests cover the formulas.
//   defines: unscale_and_check, update_scale, fused_adam, fused_sgd, grad_norm, clip_grads, and
//            the kernel-table entries adam_updates, sgd_updates, unscale_grads, update_scale_on
#include <vector>

#include "mixprec/amp/grad_scaler.hpp"
#include "mixprec/backends/cuda/common.cuh"
#include "mixprec/backends/cuda/multi_tensor.hpp"
#include "mixprec/optim/adam.hpp"
#include "mixprec/optim/sgd.hpp"

namespace mixprec::gpu {

namespace detail {
inline uint8_t storage_code(DType d, const char* op) {
  MIXPREC_CHECK(d == DType::Float32 || d == DType::Float16 || d == DType::BFloat16, op, ": expected float32/float16/bfloat16, got ", d);
  return static_cast<uint8_t>(d);
}
__device__ __forceinline__ bool skipped(const float* found_inf) { return found_inf && *found_inf != 0.0f; }
}  // namespace detail

// ---------- unscale + non-finite check ----------

template <int = 0>  // a template, so that several units including this header link
__global__ void unscale_kernel(const __grid_constant__ detail::BatchOf<UnscaleSlot> b, const float* scale, float* found_inf) {
  const detail::ChunkRange c = detail::chunk_of(b, blockIdx.x);
  // As the CPU: the inverse in double, rounded once to float32.
  const float inv = static_cast<float>(1.0 / static_cast<double>(*scale));
  const bool bad = detail::unscale_chunk(b.slot[c.slot], inv, c.begin, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
  if (__syncthreads_or(bad) && threadIdx.x == 0) *found_inf = 1.0f;
}

// Multiplies every gradient by 1 / *scale and sets *found_inf = 1 if any value is inf/NaN
// (it is never cleared here: zero it once per iteration). scale and found_inf are device floats.
inline void unscale_and_check(const std::vector<UnscaleSlot>& slots, const float* scale, float* found_inf) {
  const char* op = "gpu::unscale_and_check";
  for (const UnscaleSlot& s : slots) detail::storage_code(static_cast<DType>(s.dtype), op);
  detail::for_batches(slots, [&](const auto& b, unsigned blocks, int64_t) {
    unscale_kernel<<<blocks, kThreads, 0, current_stream()>>>(b, scale, found_inf);
    check_launch(op);
  });
}

// ---------- the scale update ----------

// The found-inf flags of the optimizers stepped this iteration (GradScaler keeps one per optimizer).
struct FoundInfList {
  static constexpr int kMax = 64;
  const float* flag[kMax];
  int count;
};

template <int = 0>  // a template, so that several units including this header link
__global__ void update_scale_kernel(float* scale, int64_t* growth_tracker, FoundInfList flags, double growth, double backoff,
                                    int64_t interval, int64_t* skipped) {
  bool found = false;
  for (int i = 0; i < flags.count; ++i) found |= *flags.flag[i] != 0.0f;
  amp::detail::update_scale(*scale, *growth_tracker, found, growth, backoff, interval);
  if (skipped && found) ++*skipped;
}

// GradScaler::update() on device values: no host sync. `skipped` (optional) counts backed-off steps.
inline void update_scale(float* scale, int64_t* growth_tracker, const std::vector<const float*>& found_infs, double growth_factor,
                         double backoff_factor, int64_t growth_interval, int64_t* skipped = nullptr) {
  const char* op = "gpu::update_scale";
  MIXPREC_CHECK(static_cast<int>(found_infs.size()) <= FoundInfList::kMax, op, ": at most ", FoundInfList::kMax,
                " optimizers per GradScaler on CUDA, got ", found_infs.size());
  FoundInfList l{};
  for (const float* f : found_infs) l.flag[l.count++] = f;
  update_scale_kernel<<<1, 1, 0, current_stream()>>>(scale, growth_tracker, l, growth_factor, backoff_factor, growth_interval, skipped);
  check_launch(op);
}
inline void update_scale(float* scale, int64_t* growth_tracker, const float* found_inf, double growth_factor, double backoff_factor,
                         int64_t growth_interval) {
  update_scale(scale, growth_tracker, std::vector<const float*>{found_inf}, growth_factor, backoff_factor, growth_interval);
}

// ---------- fused optimizers ----------

template <int = 0>  // a template, so that several units including this header link
__global__ void adam_kernel(const __grid_constant__ detail::BatchOf<AdamSlot> b, optim::detail::AdamHyper h, const float* found_inf) {
  if (detail::skipped(found_inf)) return;  // GradScaler skips the step, decided on device
  const detail::ChunkRange c = detail::chunk_of(b, blockIdx.x);
  const AdamSlot& s = b.slot[c.slot];
  // Bias corrections from the device step counter (two pow per thread: noise next to 32K elements).
  detail::adam_chunk(s, optim::detail::adam_scalars(h, *s.step + 1), c.begin, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
}

template <int = 0>  // a template, so that several units including this header link
__global__ void sgd_kernel(const __grid_constant__ detail::BatchOf<SgdSlot> b, optim::detail::SgdScalars sc, const float* found_inf) {
  if (detail::skipped(found_inf)) return;
  const detail::ChunkRange c = detail::chunk_of(b, blockIdx.x);
  const SgdSlot& s = b.slot[c.slot];
  const bool first = *(s.buffer_steps ? s.buffer_steps : s.step) == 0;
  detail::sgd_chunk(s, sc, first, c.begin, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
}

// After the update (stream order): every counter + 1, unless the step was skipped.
template <class Batch>
__global__ void bump_steps_kernel(const __grid_constant__ Batch b, const float* found_inf) {
  if (detail::skipped(found_inf)) return;
  const int i = static_cast<int>(threadIdx.x);
  if (i >= b.count) return;
  ++*b.slot[i].step;
  if (b.slot[i].buffer_steps) ++*b.slot[i].buffer_steps;
}

namespace detail {
template <class Slot>
void check_slots(const std::vector<Slot>& slots, const char* op) {
  for (const Slot& s : slots) {
    MIXPREC_CHECK(s.master && s.grad && s.step && s.n >= 0, op, ": a slot lacks master weights, gradient or step counter");
    storage_code(static_cast<DType>(s.model_dtype), op);
    storage_code(static_cast<DType>(s.grad_dtype), op);
  }
}
}  // namespace detail

// AdamW (h.decoupled) or Adam over all slots; skipped on device when *found_inf.
// Momenta must start at zero with *step == 0, as torch.optim's lazy state.
inline void fused_adam(const std::vector<AdamSlot>& slots, const optim::detail::AdamHyper& h, const float* found_inf = nullptr) {
  const char* op = "gpu::fused_adam";
  detail::check_slots(slots, op);
  for (const AdamSlot& s : slots)
    MIXPREC_CHECK(s.exp_avg && s.exp_avg_sq && (!h.amsgrad || s.max_exp_avg_sq), op, ": a slot lacks its moment buffers");
  detail::for_batches(slots, [&](const auto& b, unsigned blocks, int64_t) {
    adam_kernel<<<blocks, kThreads, 0, current_stream()>>>(b, h, found_inf);
    bump_steps_kernel<<<1, detail::kSlotsPerLaunch<AdamSlot>, 0, current_stream()>>>(b, found_inf);
    check_launch(op);
  });
}

inline void fused_sgd(const std::vector<SgdSlot>& slots, const optim::detail::SgdScalars& sc, const float* found_inf = nullptr) {
  const char* op = "gpu::fused_sgd";
  detail::check_slots(slots, op);
  for (const SgdSlot& s : slots) MIXPREC_CHECK(!sc.use_mom || s.momentum_buffer, op, ": momentum needs a momentum buffer per slot");
  detail::for_batches(slots, [&](const auto& b, unsigned blocks, int64_t) {
    sgd_kernel<<<blocks, kThreads, 0, current_stream()>>>(b, sc, found_inf);
    bump_steps_kernel<<<1, detail::kSlotsPerLaunch<SgdSlot>, 0, current_stream()>>>(b, found_inf);
    check_launch(op);
  });
}

// ---------- gradient norm and clipping ----------

// partial[first + block] = the block's sum of squares (float32 values squared and summed in double).
template <int = 0>  // a template, so that several units including this header link
__global__ void sum_squares_kernel(const __grid_constant__ detail::BatchOf<NormSlot> b, double* partial, int64_t first) {
  __shared__ double red[kThreads];
  const detail::ChunkRange c = detail::chunk_of(b, blockIdx.x);
  red[threadIdx.x] = detail::sum_squares_chunk(b.slot[c.slot], c.begin, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (static_cast<int>(threadIdx.x) < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[first + blockIdx.x] = red[0];
}

// *norm = sqrt(sum of partial[0, n)), summed in a fixed order (the same result on every run).
template <int = 0>  // a template, so that several units including this header link
__global__ void finish_norm_kernel(const double* partial, int64_t n, float* norm) {
  __shared__ double red[kThreads];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (static_cast<int>(threadIdx.x) < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) *norm = static_cast<float>(::sqrt(red[0]));
}

// clip_grad_norm_'s factor max_norm / (norm + 1e-6) in double, as the CPU; applied (rounded to
// float32) only below 1 or when NaN, as the CPU's `coef >= 1` early return.
template <int = 0>  // a template, so that several units including this header link
__global__ void clip_kernel(const __grid_constant__ detail::BatchOf<ScaleSlot> b, const float* norm, double max_norm) {
  const double coef = max_norm / (static_cast<double>(*norm) + 1e-6);
  if (coef >= 1.0) return;
  const detail::ChunkRange c = detail::chunk_of(b, blockIdx.x);
  detail::scale_chunk(b.slot[c.slot], static_cast<float>(coef), c.begin, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
}

// The 2-norm of all `grads` as one vector: a float32 [] CUDA tensor, nothing read back.
inline Tensor grad_norm(const std::vector<Tensor>& grads) {
  const char* op = "clip_grad_norm_";
  std::vector<NormSlot> slots;
  for (const Tensor& g : grads) {
    require_cuda_tensor(op, g);
    MIXPREC_CHECK(g.is_contiguous(), op, ": gradient of shape ", g.sizes(), " is not contiguous");
    slots.push_back({g.data_ptr(), g.numel(), detail::storage_code(g.dtype(), op)});
  }
  const int64_t chunks = detail::total_chunks(slots);
  Tensor partial = empty({std::max<int64_t>(chunks, 1)}, DType::Float64, Device::CUDA);
  Tensor norm = empty({}, DType::Float32, Device::CUDA);
  detail::for_batches(slots, [&](const auto& b, unsigned blocks, int64_t first) {
    sum_squares_kernel<<<blocks, kThreads, 0, current_stream()>>>(b, partial.data<double>(), first);
    check_launch(op);
  });
  finish_norm_kernel<<<1, kThreads, 0, current_stream()>>>(partial.data<double>(), chunks, norm.data<float>());
  check_launch(op);
  return norm;
}

inline void clip_grads(const std::vector<Tensor>& grads, const Tensor& norm, double max_norm) {
  const char* op = "clip_grad_norm_";
  require_cuda_tensor(op, norm);
  MIXPREC_CHECK(norm.dtype() == DType::Float32 && norm.numel() == 1, op, ": the norm must be one float32 value");
  std::vector<ScaleSlot> slots;
  for (const Tensor& g : grads) {
    require_cuda_tensor(op, g);
    MIXPREC_CHECK(g.is_contiguous(), op, ": gradient of shape ", g.sizes(), " is not contiguous");
    slots.push_back({g.data_ptr(), g.numel(), detail::storage_code(g.dtype(), op)});
  }
  detail::for_batches(slots, [&](const auto& b, unsigned blocks, int64_t) {
    clip_kernel<<<blocks, kThreads, 0, current_stream()>>>(b, norm.data<float>(), max_norm);
    check_launch(op);
  });
}

// ---------- the device kernel table's entries (backends/device.hpp) ----------

namespace detail {
inline float* f32(const Tensor& t) { return t.defined() ? t.data<float>() : nullptr; }
inline uint8_t model_code(const DeviceParamUpdate& p, const char* op) {
  return storage_code(p.model.defined() ? p.model.dtype() : DType::Float32, op);
}
inline const float* flag_ptr(const Tensor& found_inf, const char* op) {
  if (!found_inf.defined()) return nullptr;
  require_cuda_tensor(op, found_inf);
  MIXPREC_CHECK(found_inf.dtype() == DType::Float32 && found_inf.numel() == 1, op, ": found_inf must be one float32 value");
  return found_inf.data<float>();
}
// counters: int64 [2] on the device (DeviceParamUpdate::counters).
inline int64_t* counter(const DeviceParamUpdate& p, int k, const char* op) {
  MIXPREC_CHECK(p.counters.defined() && p.counters.device() == Device::CUDA && p.counters.dtype() == DType::Int64 &&
                    p.counters.numel() == 2 && p.counters.is_contiguous(),
                op, ": each update needs its int64 [2] step counters on cuda");
  return p.counters.data<int64_t>() + k;
}
// Stochastic rounding (no float32 master) is the CPU kernel's only: refused before any launch.
inline void refuse_stochastic_rounding(const std::vector<DeviceParamUpdate>& ps, const char* op) {
  for (const DeviceParamUpdate& p : ps)
    MIXPREC_CHECK(!p.stochastic_rounding, op, ": stochastic_rounding (bfloat16 weights of shape ", p.weights.sizes(),
                  " without a float32 master) is not implemented by CUDA's fused optimizers; build the optimizer without "
                  "stochastic_rounding (float32 masters), or step it on the CPU");
}
}  // namespace detail

inline void adam_updates(const std::vector<DeviceParamUpdate>& ps, const optim::detail::AdamHyper& h, const Tensor& found_inf) {
  const char* op = "gpu::adam_updates";
  detail::refuse_stochastic_rounding(ps, op);
  std::vector<AdamSlot> slots;
  for (const DeviceParamUpdate& p : ps)
    slots.push_back({detail::f32(p.weights), p.model.defined() ? p.model.data_ptr() : nullptr, p.grad.data_ptr(), detail::f32(p.state[0]),
                     detail::f32(p.state[1]), detail::f32(p.state[2]), detail::counter(p, 0, op), p.weights.numel(),
                     detail::model_code(p, op), detail::storage_code(p.grad.dtype(), op), detail::counter(p, 1, op)});
  fused_adam(slots, h, detail::flag_ptr(found_inf, op));
}

inline void sgd_updates(const std::vector<DeviceParamUpdate>& ps, const optim::detail::SgdScalars& sc, const Tensor& found_inf) {
  const char* op = "gpu::sgd_updates";
  detail::refuse_stochastic_rounding(ps, op);
  std::vector<SgdSlot> slots;
  for (const DeviceParamUpdate& p : ps)
    slots.push_back({detail::f32(p.weights), p.model.defined() ? p.model.data_ptr() : nullptr, p.grad.data_ptr(), detail::f32(p.state[0]),
                     detail::counter(p, 0, op), p.weights.numel(), detail::model_code(p, op), detail::storage_code(p.grad.dtype(), op),
                     detail::counter(p, 1, op)});
  fused_sgd(slots, sc, detail::flag_ptr(found_inf, op));
}

inline void unscale_grads(const std::vector<Tensor>& grads, const std::vector<Tensor>& masters, const Tensor& scale, const Tensor& found_inf) {
  const char* op = "gpu::unscale_grads";
  require_cuda_tensor(op, scale);
  MIXPREC_CHECK(scale.dtype() == DType::Float32 && scale.numel() == 1, op, ": the scale must be one float32 value");
  std::vector<UnscaleSlot> slots;
  for (std::size_t i = 0; i < grads.size(); ++i)
    slots.push_back({grads[i].data_ptr(), detail::f32(masters[i]), grads[i].numel(), detail::storage_code(grads[i].dtype(), op)});
  float* found = const_cast<float*>(detail::flag_ptr(found_inf, op));
  MIXPREC_CHECK(found != nullptr, op, ": needs a found_inf flag");
  unscale_and_check(slots, scale.data<float>(), found);
}

inline void update_scale_on(const Tensor& scale, const Tensor& tracker, const std::vector<Tensor>& found_infs, double growth,
                            double backoff, int64_t interval, const Tensor& skipped) {
  const char* op = "GradScaler.update";
  for (const Tensor* t : {&scale, &tracker, &skipped}) require_cuda_tensor(op, *t);
  MIXPREC_CHECK(scale.dtype() == DType::Float32 && tracker.dtype() == DType::Int64 && skipped.dtype() == DType::Int64, op,
                ": expected a float32 scale and int64 counters");
  std::vector<const float*> flags;
  for (const Tensor& f : found_infs) {
    MIXPREC_CHECK(f.defined(), op, ": an undefined found_inf flag");
    flags.push_back(detail::flag_ptr(f, op));
  }
  update_scale(scale.data<float>(), tracker.data<int64_t>(), flags, growth, backoff, interval, skipped.data<int64_t>());
}

}  // namespace mixprec::gpu
