#pragma once
// The fused multi-tensor passes -- Adam(W), SGD, GradScaler's unscale + inf check,
// clip_grad_norm_'s sum of squares and scaling: the slots one launch carries, how blocks map to
// chunks, and each thread's share of a chunk. Plain C++ with MIXPREC_HOST_DEVICE bodies:
// amp.cuh's kernels call them with (threadIdx.x, blockDim.x), and the host tests
// (tests/cuda/test_multi_tensor.cpp) run every thread of every block of the same code over host
// memory, so the chunking, the vector/tail split and the dtype dispatch are checked without a GPU.
//
// Why this shape (H200, 2026-12-04): AdamW ran at a third of the copy rate and clip's norm +
// scale at a sixth. Each thread walked a 64K-element chunk with one 4-byte load per array in
// flight and a dtype switch per element, and a 2-layer GPT had under two blocks per SM. Now one
// dtype dispatch per block, kVec elements per array per access (16 bytes of float32, 8 of a 16-bit
// type) where the slot's pointers are aligned for it, and 32K-element chunks (twice the blocks).
// The per-element arithmetic is unchanged (the CPU's: optim::detail::AdamScalars / SgdScalars,
// amp::detail::nonfinite), so results are the same bits as before.
#include <cstdint>
#include <type_traits>
#include <vector>

#include "mixprec/amp/grad_scaler.hpp"
#include "mixprec/backends/cuda/loop_plan.hpp"
#include "mixprec/dtype/bfloat16.hpp"
#include "mixprec/dtype/half.hpp"
#include "mixprec/optim/adam.hpp"
#include "mixprec/optim/sgd.hpp"

namespace mixprec::gpu {

// ---------- the slots: one tensor (or parameter) each ----------

// A gradient to unscale: read from grad (any floating dtype), written back unscaled in its dtype
// and, when given, to master (a float32 buffer of the same length), as the CPU's unscale_.
struct UnscaleSlot {
  void* grad = nullptr;
  float* master = nullptr;
  int64_t n = 0;
  uint8_t dtype = static_cast<uint8_t>(DType::Float32);
};

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
  int64_t* buffer_steps = nullptr;  // optional: updates applied to these moments, advanced with step
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
  // Updates applied to momentum_buffer (0: the next one writes it whole, as torch's first step);
  // null: *step is used.
  int64_t* buffer_steps = nullptr;
};

struct NormSlot {
  const void* data = nullptr;
  int64_t n = 0;
  uint8_t dtype = static_cast<uint8_t>(DType::Float32);
};
struct ScaleSlot {
  void* data = nullptr;
  int64_t n = 0;
  uint8_t dtype = static_cast<uint8_t>(DType::Float32);
};

namespace detail {

// Elements per block: large enough to amortise a block's set-up (Adam's two pow), small enough
// that a model of a few million parameters still gives every SM several blocks.
inline constexpr int64_t kChunk = 32 * 1024;
// Elements per access per array (a multiple of it divides kChunk, so every chunk of an aligned
// slot starts aligned).
inline constexpr int kVec = 4;
static_assert(kChunk % kVec == 0);

// ---------- launches: slots batched into kernel arguments ----------

// Up to N tensors' slots in one launch's arguments. Block b works on chunk b - first_chunk[k] of
// slot k, where first_chunk[k] <= b < first_chunk[k + 1].
template <class Slot, int N>
struct SlotBatch {
  Slot slot[N];
  int64_t first_chunk[N + 1];
  int count;
};
// As many slots as fit the 4 KB of kernel arguments every CUDA version takes.
template <class Slot>
inline constexpr int kSlotsPerLaunch = static_cast<int>((4000 - 64) / (sizeof(Slot) + sizeof(int64_t)));
template <class Slot>
using BatchOf = SlotBatch<Slot, kSlotsPerLaunch<Slot>>;

// A block's slot and the first element of its chunk (the chunk ends kChunk later or at n).
struct ChunkRange {
  int slot;
  int64_t begin;
};
template <class Slot, int N>
MIXPREC_HOST_DEVICE ChunkRange chunk_of(const SlotBatch<Slot, N>& b, int64_t block) {
  int k = 0;
  while (k + 1 < b.count && b.first_chunk[k + 1] <= block) ++k;
  return {k, (block - b.first_chunk[k]) * kChunk};
}
MIXPREC_HOST_DEVICE int64_t chunk_end(int64_t begin, int64_t n) { return begin + kChunk < n ? begin + kChunk : n; }

// f(batch, blocks, first_block) per batch of the non-empty slots, in order.
template <class Slot, class F>
void for_batches(const std::vector<Slot>& slots, F&& launch) {
  constexpr int N = kSlotsPerLaunch<Slot>;
  static_assert(sizeof(SlotBatch<Slot, N>) <= 4000, "kernel arguments over 4 KB");
  SlotBatch<Slot, N> b{};
  int64_t blocks = 0, first = 0;
  auto flush = [&] {
    if (b.count == 0) return;
    b.first_chunk[b.count] = blocks;
    MIXPREC_CHECK(blocks < 0x7fffffff, "gpu: too many blocks for one launch");
    launch(b, static_cast<unsigned>(blocks), first);
    first += blocks;
    b = SlotBatch<Slot, N>{};
    blocks = 0;
  };
  for (const Slot& s : slots) {
    if (s.n == 0) continue;
    if (b.count == N) flush();
    b.slot[b.count] = s;
    b.first_chunk[b.count] = blocks;
    blocks += (s.n + kChunk - 1) / kChunk;
    ++b.count;
  }
  flush();
}
template <class Slot>
int64_t total_chunks(const std::vector<Slot>& slots) {
  int64_t c = 0;
  for (const Slot& s : slots) c += (s.n + kChunk - 1) / kChunk;
  return c;
}

// ---------- a thread's share of a chunk ----------

template <class T>
struct Tag {
  using type = T;
};
// f(Tag<T>{}) for the storage type a slot's dtype code names (float32 for anything else: the
// launchers refuse other dtypes before any launch). Once per block, not per element.
template <class F>
MIXPREC_HOST_DEVICE void with_storage(uint8_t code, F&& f) {
  if (code == static_cast<uint8_t>(DType::Float16)) f(Tag<half>{});
  else if (code == static_cast<uint8_t>(DType::BFloat16)) f(Tag<bfloat16>{});
  else f(Tag<float>{});
}

// f(Tag<G>{}, Tag<M>{}) for a parameter slot's gradient and model-copy types.
template <class Slot, class F>
MIXPREC_HOST_DEVICE void with_param_types(const Slot& s, F&& f) {
  with_storage(s.grad_dtype, [&](auto g) { with_storage(s.model_dtype, [&](auto m) { f(g, m); }); });
}

// V consecutive elements as float, and back in T (one access each: p + i is V-aligned).
template <int V, class T>
MIXPREC_HOST_DEVICE void load(const T* p, float (&out)[V]) {
  const Pack<T, V> k = *reinterpret_cast<const Pack<T, V>*>(p);
  for (int j = 0; j < V; ++j) out[j] = static_cast<float>(k.v[j]);
}
template <int V, class T>
MIXPREC_HOST_DEVICE void store(T* p, const float (&in)[V]) {
  Pack<T, V> k;
  for (int j = 0; j < V; ++j) k.v[j] = T(in[j]);
#if defined(__CUDA_ARCH__)
  // Through the __stwb intrinsic (a plain write-back store): one st.global.v4 / v2. A plain
  // assignment, of the pack or of a float4, came out of nvcc 13 as four scalar stores here.
  if constexpr (V == 4 && sizeof(T) == 4) {
    __stwb(reinterpret_cast<float4*>(p), make_float4(k.v[0], k.v[1], k.v[2], k.v[3]));
    return;
  } else if constexpr (V == 4 && sizeof(T) == 2) {
    __stwb(reinterpret_cast<uint2*>(p), make_uint2(k.v[0].x | static_cast<uint32_t>(k.v[1].x) << 16, k.v[2].x | static_cast<uint32_t>(k.v[3].x) << 16));
    return;
  }
#endif
  *reinterpret_cast<Pack<T, V>*>(p) = k;
}

// Whether p (of T) may be read kVec elements at a time; a null (absent) array does not matter.
template <class T>
MIXPREC_HOST_DEVICE bool vec_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kVec) == 0;
}

template <int V>
using Width = std::integral_constant<int, V>;
// f(i, Width<V>) over this thread's share of [begin, end): groups of kVec elements, thread tid
// taking groups tid, tid + nthreads, ... (neighbouring threads touch neighbouring memory), then
// the last end - begin mod kVec elements one by one; with vector false, every element one by one.
template <class F>
MIXPREC_HOST_DEVICE void for_thread(int64_t begin, int64_t end, bool vector, int tid, int nthreads, F&& f) {
  int64_t i = begin;
  if (vector) {
    const int64_t groups = (end - begin) / kVec;
    for (int64_t g = tid; g < groups; g += nthreads) f(begin + g * kVec, Width<kVec>{});
    i = begin + groups * kVec;
  }
  for (int64_t j = i + tid; j < end; j += nthreads) f(j, Width<1>{});
}

// ---------- the bodies: one block's chunk, as thread tid of nthreads ----------

template <class G, class M>
MIXPREC_HOST_DEVICE bool vector_ok(const AdamSlot& s) {
  return vec_aligned(s.master) && vec_aligned(static_cast<const G*>(s.grad)) && vec_aligned(s.exp_avg) &&
         vec_aligned(s.exp_avg_sq) && vec_aligned(s.max_exp_avg_sq) && vec_aligned(static_cast<const M*>(s.model));
}
template <class G, class M>
MIXPREC_HOST_DEVICE bool vector_ok(const SgdSlot& s) {
  return vec_aligned(s.master) && vec_aligned(static_cast<const G*>(s.grad)) && vec_aligned(s.momentum_buffer) &&
         vec_aligned(static_cast<const M*>(s.model));
}
// Whether every array of a parameter slot may be accessed kVec elements at a time.
template <class Slot>
  requires(std::is_same_v<Slot, AdamSlot> || std::is_same_v<Slot, SgdSlot>)
MIXPREC_HOST_DEVICE bool vector_ok(const Slot& s) {
  bool ok = false;
  with_param_types(s, [&](auto g, auto m) { ok = vector_ok<typename decltype(g)::type, typename decltype(m)::type>(s); });
  return ok;
}

// f(i, Width<V>{}, grad, model) over this thread's share of a parameter slot's chunk, with the
// gradient and the model copy as pointers of their storage types (model null without a copy).
template <class Slot, class F>
MIXPREC_HOST_DEVICE void for_param_chunk(const Slot& s, int64_t begin, int tid, int nthreads, F&& f) {
  with_param_types(s, [&](auto gt, auto mt) {
    using G = typename decltype(gt)::type;
    using M = typename decltype(mt)::type;
    const G* grad = static_cast<const G*>(s.grad);
    M* model = static_cast<M*>(s.model);
    for_thread(begin, chunk_end(begin, s.n), vector_ok<G, M>(s), tid, nthreads, [&](int64_t i, auto width) { f(i, width, grad, model); });
  });
}

MIXPREC_HOST_DEVICE void adam_chunk(const AdamSlot& s, const optim::detail::AdamScalars& sc, int64_t begin, int tid, int nthreads) {
  for_param_chunk(s, begin, tid, nthreads, [&](int64_t i, auto width, auto grad, auto model) {
    constexpr int V = decltype(width)::value;
    float w[V], g[V], m[V], v[V], vmax[V] = {};
    load<V>(s.master + i, w);
    load<V>(grad + i, g);
    load<V>(s.exp_avg + i, m);
    load<V>(s.exp_avg_sq + i, v);
    if (s.max_exp_avg_sq) load<V>(s.max_exp_avg_sq + i, vmax);
    for (int j = 0; j < V; ++j) sc.step(w[j], g[j], m[j], v[j], s.max_exp_avg_sq ? &vmax[j] : nullptr);
    store<V>(s.master + i, w);
    store<V>(s.exp_avg + i, m);
    store<V>(s.exp_avg_sq + i, v);
    if (s.max_exp_avg_sq) store<V>(s.max_exp_avg_sq + i, vmax);
    if (model) store<V>(model + i, w);
  });
}

// `first`: the momentum buffer's first update (it is written whole, as torch's first step).
MIXPREC_HOST_DEVICE void sgd_chunk(const SgdSlot& s, const optim::detail::SgdScalars& sc, bool first, int64_t begin, int tid, int nthreads) {
  for_param_chunk(s, begin, tid, nthreads, [&](int64_t i, auto width, auto grad, auto model) {
    constexpr int V = decltype(width)::value;
    float w[V], g[V], buf[V] = {};
    load<V>(s.master + i, w);
    load<V>(grad + i, g);
    if (s.momentum_buffer) load<V>(s.momentum_buffer + i, buf);
    for (int j = 0; j < V; ++j) sc.step(w[j], g[j], s.momentum_buffer ? &buf[j] : nullptr, first);
    store<V>(s.master + i, w);
    if (s.momentum_buffer) store<V>(s.momentum_buffer + i, buf);
    if (model) store<V>(model + i, w);
  });
}

template <class T>
MIXPREC_HOST_DEVICE bool vector_ok(const UnscaleSlot& s) {
  return vec_aligned(static_cast<const T*>(s.grad)) && vec_aligned(s.master);
}
MIXPREC_HOST_DEVICE bool vector_ok(const UnscaleSlot& s) {
  bool ok = false;
  with_storage(s.dtype, [&](auto t) { ok = vector_ok<typename decltype(t)::type>(s); });
  return ok;
}

// grad (and master, when given) = grad * inv; true if this thread saw an inf or NaN.
MIXPREC_HOST_DEVICE bool unscale_chunk(const UnscaleSlot& s, float inv, int64_t begin, int tid, int nthreads) {
  bool bad = false;
  with_storage(s.dtype, [&](auto tt) {
    using T = typename decltype(tt)::type;
    T* grad = static_cast<T*>(s.grad);
    for_thread(begin, chunk_end(begin, s.n), vector_ok<T>(s), tid, nthreads, [&](int64_t i, auto width) {
      constexpr int V = decltype(width)::value;
      float v[V];
      load<V>(grad + i, v);
      for (int j = 0; j < V; ++j) {
        bad |= amp::detail::nonfinite(v[j]);
        v[j] *= inv;
      }
      if (s.master) store<V>(s.master + i, v);
      store<V>(grad + i, v);
    });
  });
  return bad;
}

template <class Slot>
MIXPREC_HOST_DEVICE bool data_vector_ok(const Slot& s) {
  bool ok = false;
  with_storage(s.dtype, [&](auto t) { ok = vec_aligned(static_cast<const typename decltype(t)::type*>(s.data)); });
  return ok;
}

// This thread's sum of squares (float32 values squared and summed in double).
MIXPREC_HOST_DEVICE double sum_squares_chunk(const NormSlot& s, int64_t begin, int tid, int nthreads) {
  double acc = 0;
  with_storage(s.dtype, [&](auto tt) {
    using T = typename decltype(tt)::type;
    const T* data = static_cast<const T*>(s.data);
    for_thread(begin, chunk_end(begin, s.n), data_vector_ok(s), tid, nthreads, [&](int64_t i, auto width) {
      constexpr int V = decltype(width)::value;
      float v[V];
      load<V>(data + i, v);
      for (int j = 0; j < V; ++j) acc += static_cast<double>(v[j]) * v[j];
    });
  });
  return acc;
}

// data = data * f, rounded to its dtype.
MIXPREC_HOST_DEVICE void scale_chunk(const ScaleSlot& s, float f, int64_t begin, int tid, int nthreads) {
  with_storage(s.dtype, [&](auto tt) {
    using T = typename decltype(tt)::type;
    T* data = static_cast<T*>(s.data);
    for_thread(begin, chunk_end(begin, s.n), data_vector_ok(s), tid, nthreads, [&](int64_t i, auto width) {
      constexpr int V = decltype(width)::value;
      float v[V];
      load<V>(data + i, v);
      for (int j = 0; j < V; ++j) v[j] *= f;
      store<V>(data + i, v);
    });
  });
}

}  // namespace detail
}  // namespace mixprec::gpu
