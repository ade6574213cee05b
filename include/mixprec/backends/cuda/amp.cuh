#pragma once
// Fused AMP kernels. Each runs over a list of tensors in ONE launch (a chunk table maps blocks
// to (tensor, range)), and reads/writes the loss scale, found-inf flag and step counters in
// device memory, so a caller can keep an iteration off the host: the kernels take the flag and
// skip on the device. The arithmetic is the CPU's own (amp::detail::update_scale,
// optim::detail::AdamScalars / SgdScalars, amp::detail::nonfinite), so the CPU tests cover the
// formulas. The kernel-table entries at the end (what Optimizer::step and GradScaler use) still
// read the flag back once per unscale_ and upload the step counters, as GradScaler's CPU
// semantics (found_inf on the host, a step skipped by not calling step()) require.
#include <vector>

#include "mixprec/amp/grad_scaler.hpp"
#include "mixprec/backends/cuda/common.cuh"
#include "mixprec/optim/adam.hpp"
#include "mixprec/optim/sgd.hpp"

namespace mixprec::gpu {

namespace detail {
inline constexpr int64_t kChunk = 64 * 1024;  // elements per block: big enough to amortise, small enough to balance

struct Chunk {
  int32_t slot;
  int64_t begin, end;
};

template <class T>
__device__ __forceinline__ float load_as_float(const void* p, int64_t i) {
  return static_cast<float>(static_cast<const T*>(p)[i]);
}
__device__ __forceinline__ float load_any(const void* p, uint8_t dtype, int64_t i) {
  switch (static_cast<DType>(dtype)) {
    case DType::Float16: return load_as_float<half>(p, i);
    case DType::BFloat16: return load_as_float<bfloat16>(p, i);
    default: return load_as_float<float>(p, i);
  }
}
__device__ __forceinline__ void store_any(void* p, uint8_t dtype, int64_t i, float v) {
  switch (static_cast<DType>(dtype)) {
    case DType::Float16: static_cast<half*>(p)[i] = half(v); break;
    case DType::BFloat16: static_cast<bfloat16*>(p)[i] = bfloat16(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

inline uint8_t storage_code(DType d, const char* op) {
  MIXPREC_CHECK(d == DType::Float32 || d == DType::Float16 || d == DType::BFloat16, op, ": expected float32/float16/bfloat16, got ", d);
  return static_cast<uint8_t>(d);
}

// Uploads slots and their chunk table in one buffer (on the current stream; the pageable source
// is staged before cudaMemcpyAsync returns). Returns the buffer, device pointers and chunk count.
template <class Slot>
struct Packed {
  Tensor buffer;
  const Slot* slots = nullptr;
  const Chunk* chunks = nullptr;
  unsigned count = 0;
};
template <class Slot>
Packed<Slot> pack(const std::vector<Slot>& slots, const char* op) {
  std::vector<Chunk> chunks;
  for (std::size_t i = 0; i < slots.size(); ++i)
    for (int64_t b = 0; b < slots[i].n; b += kChunk) chunks.push_back({static_cast<int32_t>(i), b, std::min(slots[i].n, b + kChunk)});
  Packed<Slot> p;
  p.count = static_cast<unsigned>(chunks.size());
  if (chunks.empty()) return p;
  MIXPREC_CHECK(chunks.size() < 0x7fffffffu, op, ": too many chunks");
  const std::size_t slot_bytes = (slots.size() * sizeof(Slot) + 15) / 16 * 16;
  std::vector<unsigned char> host(slot_bytes + chunks.size() * sizeof(Chunk));
  std::memcpy(host.data(), slots.data(), slots.size() * sizeof(Slot));
  std::memcpy(host.data() + slot_bytes, chunks.data(), chunks.size() * sizeof(Chunk));
  p.buffer = empty({static_cast<int64_t>(host.size())}, DType::UInt8, Device::CUDA);
  check(cudaMemcpyAsync(p.buffer.data_ptr(), host.data(), host.size(), cudaMemcpyHostToDevice, current_stream()), op);
  p.slots = static_cast<const Slot*>(p.buffer.data_ptr());
  p.chunks = reinterpret_cast<const Chunk*>(static_cast<const unsigned char*>(p.buffer.data_ptr()) + slot_bytes);
  return p;
}
}  // namespace detail

// ---------- unscale + non-finite check ----------

// A gradient to unscale: read from grad (any floating dtype), written back unscaled in its dtype
// and, when given, to master (a float32 buffer of the same length), as the CPU's unscale_.
struct UnscaleSlot {
  void* grad = nullptr;
  float* master = nullptr;
  int64_t n = 0;
  uint8_t dtype = static_cast<uint8_t>(DType::Float32);
};

__global__ void unscale_kernel(const UnscaleSlot* slots, const detail::Chunk* chunks, const float* scale, float* found_inf) {
  const detail::Chunk c = chunks[blockIdx.x];
  const UnscaleSlot s = slots[c.slot];
  // As the CPU: the inverse in double, rounded once to float32.
  const float inv = static_cast<float>(1.0 / static_cast<double>(*scale));
  int bad = 0;
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += blockDim.x) {
    const float v = detail::load_any(s.grad, s.dtype, i);
    bad |= amp::detail::nonfinite(v);
    if (s.master) s.master[i] = v * inv;
    detail::store_any(s.grad, s.dtype, i, v * inv);
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) *found_inf = 1.0f;
}

// Multiplies every gradient by 1 / *scale and sets *found_inf = 1 if any value is inf/NaN
// (it is never cleared here: zero it once per iteration). scale and found_inf are device floats.
inline void unscale_and_check(const std::vector<UnscaleSlot>& slots, const float* scale, float* found_inf) {
  const char* op = "gpu::unscale_and_check";
  const auto p = detail::pack(slots, op);
  if (p.count == 0) return;
  unscale_kernel<<<p.count, kThreads, 0, current_stream()>>>(p.slots, p.chunks, scale, found_inf);
  check_launch(op);
}

// ---------- the scale update ----------

__global__ void update_scale_kernel(float* scale, int64_t* growth_tracker, const float* found_inf, double growth, double backoff,
                                    int64_t interval) {
  amp::detail::update_scale(*scale, *growth_tracker, *found_inf != 0.0f, growth, backoff, interval);
}

// GradScaler::update() on device values: no host sync.
inline void update_scale(float* scale, int64_t* growth_tracker, const float* found_inf, double growth_factor, double backoff_factor,
                         int64_t growth_interval) {
  update_scale_kernel<<<1, 1, 0, current_stream()>>>(scale, growth_tracker, found_inf, growth_factor, backoff_factor, growth_interval);
  check_launch("gpu::update_scale");
}

// ---------- fused optimizers ----------

// One parameter: float32 master weights (updated in place), an optional 16-bit (or float32)
// model copy written in the same pass, the gradient in any floating dtype, float32 state, and a
// device step counter (updates applied so far; incremented unless the step is skipped).
struct AdamSlot {
  float* master = nullptr;
  void* model = nullptr;
  const void* grad = nullptr;
  float* exp_avg = nullptr;
  float* exp_avg_sq = nullptr;
  float* max_exp_avg_sq = nullptr;  // amsgrad only
  int64_t* step = nullptr;
  int64_t n = 0;
  uint8_t model_dtype = static_cast<uint8_t>(DType::Float32);
  uint8_t grad_dtype = static_cast<uint8_t>(DType::Float32);
};

struct SgdSlot {
  float* master = nullptr;
  void* model = nullptr;
  const void* grad = nullptr;
  float* momentum_buffer = nullptr;  // when momentum != 0
  int64_t* step = nullptr;
  int64_t n = 0;
  uint8_t model_dtype = static_cast<uint8_t>(DType::Float32);
  uint8_t grad_dtype = static_cast<uint8_t>(DType::Float32);
};

__global__ void adam_kernel(const AdamSlot* slots, const detail::Chunk* chunks, optim::detail::AdamHyper h, const float* found_inf) {
  if (found_inf && *found_inf != 0.0f) return;  // GradScaler skips the step, decided on device
  const detail::Chunk c = chunks[blockIdx.x];
  const AdamSlot s = slots[c.slot];
  // Bias corrections from the device step counter (two pow per thread: noise next to 64K elements).
  const optim::detail::AdamScalars sc = optim::detail::adam_scalars(h, *s.step + 1);
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += blockDim.x) {
    float w = s.master[i];
    sc.step(w, detail::load_any(s.grad, s.grad_dtype, i), s.exp_avg[i], s.exp_avg_sq[i], s.max_exp_avg_sq ? s.max_exp_avg_sq + i : nullptr);
    s.master[i] = w;
    if (s.model) detail::store_any(s.model, s.model_dtype, i, w);
  }
}

__global__ void sgd_kernel(const SgdSlot* slots, const detail::Chunk* chunks, optim::detail::SgdScalars sc, const float* found_inf) {
  if (found_inf && *found_inf != 0.0f) return;
  const detail::Chunk c = chunks[blockIdx.x];
  const SgdSlot s = slots[c.slot];
  const bool first = *s.step == 0;
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += blockDim.x) {
    float w = s.master[i];
    sc.step(w, detail::load_any(s.grad, s.grad_dtype, i), s.momentum_buffer ? s.momentum_buffer + i : nullptr, first);
    s.master[i] = w;
    if (s.model) detail::store_any(s.model, s.model_dtype, i, w);
  }
}

// After the update (stream order): every counter + 1, unless the step was skipped.
template <class Slot>
__global__ void bump_steps_kernel(const Slot* slots, int n, const float* found_inf) {
  if (found_inf && *found_inf != 0.0f) return;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) ++*slots[i].step;
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

// AdamW (h.decoupled) or Adam over all slots in one launch; skipped on device when *found_inf.
// Momenta must start at zero with *step == 0, as torch.optim's lazy state.
inline void fused_adam(const std::vector<AdamSlot>& slots, const optim::detail::AdamHyper& h, const float* found_inf = nullptr) {
  const char* op = "gpu::fused_adam";
  detail::check_slots(slots, op);
  for (const AdamSlot& s : slots)
    MIXPREC_CHECK(s.exp_avg && s.exp_avg_sq && (!h.amsgrad || s.max_exp_avg_sq), op, ": a slot lacks its moment buffers");
  const auto p = detail::pack(slots, op);
  if (p.count == 0) return;
  adam_kernel<<<p.count, kThreads, 0, current_stream()>>>(p.slots, p.chunks, h, found_inf);
  bump_steps_kernel<<<grid_for(static_cast<int64_t>(slots.size())), kThreads, 0, current_stream()>>>(p.slots, static_cast<int>(slots.size()),
                                                                                                       found_inf);
  check_launch(op);
}

inline void fused_sgd(const std::vector<SgdSlot>& slots, const optim::detail::SgdScalars& sc, const float* found_inf = nullptr) {
  const char* op = "gpu::fused_sgd";
  detail::check_slots(slots, op);
  for (const SgdSlot& s : slots) MIXPREC_CHECK(!sc.use_mom || s.momentum_buffer, op, ": momentum needs a momentum buffer per slot");
  const auto p = detail::pack(slots, op);
  if (p.count == 0) return;
  sgd_kernel<<<p.count, kThreads, 0, current_stream()>>>(p.slots, p.chunks, sc, found_inf);
  bump_steps_kernel<<<grid_for(static_cast<int64_t>(slots.size())), kThreads, 0, current_stream()>>>(p.slots, static_cast<int>(slots.size()),
                                                                                                     found_inf);
  check_launch(op);
}

// ---------- the device kernel table's optimizer entries (backends/device.hpp) ----------

namespace detail {
// Each update's counter of steps already applied (its step - 1), as the kernels count.
inline Tensor step_counters(const std::vector<DeviceParamUpdate>& ps) {
  std::vector<int64_t> c;
  for (const DeviceParamUpdate& p : ps) c.push_back(p.step - 1);
  return to_device(tensor(c));
}
inline float* f32(const Tensor& t) { return t.defined() ? t.data<float>() : nullptr; }
inline uint8_t model_code(const DeviceParamUpdate& p, const char* op) {
  return storage_code(p.model.defined() ? p.model.dtype() : DType::Float32, op);
}
}  // namespace detail

inline void adam_updates(const std::vector<DeviceParamUpdate>& ps, const optim::detail::AdamHyper& h) {
  const char* op = "gpu::adam_updates";
  const Tensor steps = detail::step_counters(ps);  // freed after the launch: stream-ordered reuse only
  std::vector<AdamSlot> slots;
  for (std::size_t i = 0; i < ps.size(); ++i) {
    const DeviceParamUpdate& p = ps[i];
    slots.push_back({detail::f32(p.weights), p.model.defined() ? p.model.data_ptr() : nullptr, p.grad.data_ptr(), detail::f32(p.state[0]),
                     detail::f32(p.state[1]), detail::f32(p.state[2]), steps.data<int64_t>() + i, p.weights.numel(),
                     detail::model_code(p, op), detail::storage_code(p.grad.dtype(), op)});
  }
  fused_adam(slots, h);
}

inline void sgd_updates(const std::vector<DeviceParamUpdate>& ps, const optim::detail::SgdScalars& sc) {
  const char* op = "gpu::sgd_updates";
  const Tensor steps = detail::step_counters(ps);
  std::vector<SgdSlot> slots;
  for (std::size_t i = 0; i < ps.size(); ++i) {
    const DeviceParamUpdate& p = ps[i];
    slots.push_back({detail::f32(p.weights), p.model.defined() ? p.model.data_ptr() : nullptr, p.grad.data_ptr(), detail::f32(p.state[0]),
                     steps.data<int64_t>() + i, p.weights.numel(), detail::model_code(p, op), detail::storage_code(p.grad.dtype(), op)});
  }
  fused_sgd(slots, sc);
}

inline bool unscale_grads(const std::vector<Tensor>& grads, const std::vector<Tensor>& masters, double scale) {
  const char* op = "gpu::unscale_grads";
  std::vector<UnscaleSlot> slots;
  for (std::size_t i = 0; i < grads.size(); ++i)
    slots.push_back({grads[i].data_ptr(), detail::f32(masters[i]), grads[i].numel(), detail::storage_code(grads[i].dtype(), op)});
  const Tensor s = to_device(full({}, scale, DType::Float32)), found = to_device(zeros({}));
  unscale_and_check(slots, s.data<float>(), found.data<float>());
  return to_host(found).item<float>() != 0.0f;
}

}  // namespace mixprec::gpu
