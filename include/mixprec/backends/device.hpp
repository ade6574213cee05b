#pragma once
// Kernels, one table per device, filled by that device's backend: the CPU's in
// backends/cpu/kernels.hpp (registered by mixprec/mixprec.hpp), CUDA's in backends/cuda/kernels.cuh
// (registered when a translation unit compiled by nvcc includes mixprec/cuda.hpp). Ops call through
// it at their kernel level, below autograd and autocast, so the graph, the dtype policies and the
// argument checks are the same on every device. An op with no entry for the device throws, naming
// itself and the device.
#include <array>
#include <initializer_list>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "mixprec/tensor/tensor.hpp"

namespace mixprec {

namespace detail {
struct ConvGeom;  // ops/conv.hpp
}  // namespace detail
namespace optim::detail {
struct AdamHyper;   // optim/adam.hpp
struct SgdScalars;  // optim/sgd.hpp
}  // namespace optim::detail

enum class DeviceUnary : uint8_t { Relu, Gelu, GeluTanh, Silu, Sigmoid, Tanh, Exp, Log };
enum class DeviceBinary : uint8_t { Add, Mul, Div };

// ---- poolnorm: the pooling and loss families' kernels (DeviceKernels::pool2d, loss_terms) ----
namespace detail {
struct PoolGeom;  // ops/pool.hpp
}  // namespace detail
enum class DevicePool : uint8_t { Max, Avg, AdaptiveAvg };
// Per-element loss terms (a, b, w): Mse (input, target, -) (a - b)^2; BceWithLogits (logits,
// target, pos_weight or undefined); Bce (probabilities, target, -) with logs clamped at -100.
enum class DeviceLoss : uint8_t { Mse, BceWithLogits, Bce };

// One parameter's optimizer update; every tensor on the device, state float32 of its shape.
struct DeviceParamUpdate {
  Tensor weights;  // float32, updated in place: the master copy, or the parameter itself
  Tensor model;    // the 16-bit parameter that receives the rounded weights; undefined for float32
  Tensor grad;     // contiguous, any floating dtype
  std::array<Tensor, 3> state;  // Adam: exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad); SGD: momentum_buffer
  // int64 [2] on the device: updates applied to the parameter (Adam's bias correction uses it + 1)
  // and updates applied to the current state buffers (SGD's first step when 0). The kernel adds 1
  // to both after the update, unless found_inf skipped it: the count lives where the skip is known.
  Tensor counters;
  // Stochastic rounding (optim/stochastic_rounding.hpp): `weights` is then the bfloat16 parameter
  // itself (no master, `model` undefined), updated in float32 and stored back with random bits
  // keyed by (rounding_key, counters[0], element index). A kernel without it refuses such an update.
  bool stochastic_rounding = false;
  uint64_t rounding_key = 0;
};

// A recorded sequence of device work replayed without the host (CUDA graphs; CapturedStep in
// backends/captured_step.hpp). Between begin_capture and end_capture the calling thread's device
// work is recorded, not run, and its allocations come from a pool that lives as long as the graph.
class DeviceGraph {
 public:
  virtual ~DeviceGraph() = default;
  virtual void begin_capture() = 0;
  virtual void end_capture() = 0;
  virtual void replay() = 0;
  // Replays so far: a device int64 [] that each replay adds 1 to first, so that random numbers
  // drawn inside the graph (dropout) differ between replays.
  virtual Tensor replay_counter() const = 0;
};

// ---- streams: device work beside the compute stream (data-parallel communication) ----
// Every entry of the table runs on the device's compute stream (CUDA: gpu::current_stream()). A
// DeviceStream is a second queue (DistributedDataParallel all-reduces gradient buckets there
// while backward keeps computing), and DeviceEvents order the two without the host waiting.
class DeviceStream {
 public:
  virtual ~DeviceStream() = default;
  // The backend's handle (cudaStream_t on CUDA), for libraries that enqueue on it (NCCL).
  virtual void* native_handle() const = 0;
};
class DeviceEvent {
 public:
  virtual ~DeviceEvent() = default;
  // Marks the work enqueued so far on `stream` (nullptr: the compute stream).
  virtual void record(DeviceStream* stream) = 0;
  // Work enqueued on `stream` (nullptr: the compute stream) from now on starts after the marked
  // work; the host does not wait.
  virtual void block(DeviceStream* stream) = 0;
  // The host waits for the marked work.
  virtual void synchronize() = 0;
};

// ---- reduceshape ----
// Kernel families shared by several ops: the reduce, compare, pointwise and index entries.
enum class DeviceReduce : uint8_t { Mean, Var, Norm, Max, Min };
enum class DeviceCompare : uint8_t { Eq, Ne, Lt, Le, Gt, Ge };
// Element-wise ops with no arithmetic entry of their own, and (*Grad) their backward formulas.
enum class DevicePointwise : uint8_t {
  Neg, Sign, Sqrt, Rsqrt, Abs, PowScalar, PowScalarGrad, Clamp, ClampGrad,  // unary
  SqrtGrad, RsqrtGrad, AbsGrad,                                             // grad * f'(saved)
  Pow, PowGradBase, PowGradExp, Maximum, Minimum, MaximumGrad, MinimumGrad, NormGrad,  // binary
  Where, MaskedFill,
  Prelu, PreluGradInput, PreluGradWeight  // prelu: x (a) with its broadcast weight view (b)
};
enum class DeviceIndex : uint8_t { Select, SelectAdd, Gather, ScatterAdd, Scatter };
enum class DeviceParamOp : uint8_t { NormAccumulate, ClampValue, EmaLerp, AdoptChanged };

struct DeviceKernels {
  // Whole tensors between this device and the CPU (same dtype; results contiguous).
  Tensor (*to_device)(const Tensor& cpu) = nullptr;
  Tensor (*to_host)(const Tensor& dev) = nullptr;
  // dst = src on this device: src broadcast to dst's shape, converted to dst's dtype; any strides.
  // Every copy and cast of the library goes through it (detail::copy_kernel: clone, contiguous,
  // to(dtype), copy_).
  void (*copy)(const Tensor& dst, const Tensor& src) = nullptr;
  void (*fill)(const Tensor& t, double value) = nullptr;
  // a + alpha b, a * b, a / b over the broadcast shape, in promote_types(a, b); a and b floating
  // (of one dtype or two: a kernel widens as it reads, saving a cast pass). CPU: operands of
  // every dtype (integers and bool too, as binary_kernel: both brought to the promoted dtype,
  // computed in its acc_t), float64 in double.
  Tensor (*binary)(DeviceBinary op, const Tensor& a, const Tensor& b, double alpha) = nullptr;
  // a + alpha s, a * s, a / s (reversed: s + alpha a, s * a, s / a) with a host scalar s passed
  // to the kernel by value and rounded to a's floating dtype first, as a 0-dim operand would be:
  // no upload from pageable memory (a sync, and a dangling pointer in a captured graph). CPU:
  // float64 in double; a strided a is read in place.
  Tensor (*binary_scalar)(DeviceBinary op, const Tensor& a, double s, double alpha, bool reversed) = nullptr;
  // CPU (unary and unary_backward): float64 in double; any strides (a broadcast grad too).
  Tensor (*unary)(DeviceUnary op, const Tensor& x) = nullptr;
  // grad * f'(x, y); all of x's dtype and shape.
  Tensor (*unary_backward)(DeviceUnary op, const Tensor& grad, const Tensor& x, const Tensor& y) = nullptr;
  // Sum over `dims` (none: all), which are removed; accumulated in float32, returned in x's dtype.
  // CPU: accumulated in double; integer and bool x also, summed and returned in int64.
  Tensor (*sum)(const Tensor& x, const Shape& dims) = nullptr;
  // a[..., M, K] @ b[..., K, N] with broadcast batch dims, accumulated in float32, written in a's
  // dtype; bias [N] (optional) added in the epilogue. The op has checked the shapes, that the
  // batch dims broadcast, and one floating dtype. CPU: also float64 (accumulated in float64).
  Tensor (*matmul)(const Tensor& a, const Tensor& b, const Tensor& bias) = nullptr;
  // softmax or log_softmax along dim (wrapped), and its gradient from the output y and grad (y's
  // dtype and shape). CPU: float64 in double; any strides.
  Tensor (*softmax)(const Tensor& x, int64_t dim, bool log) = nullptr;
  Tensor (*softmax_backward)(const Tensor& y, const Tensor& grad, int64_t dim, bool log) = nullptr;
  // Whether this backend's conv_* and batch_norm* entries also take channels-last activations
  // (MemoryFormat::ChannelsLast): then x and gy come as they are, in either layout, and y and gx
  // are returned in the layout of the activation they came from; else everything is NCHW-contiguous.
  bool channels_last = false;
  // NCHW convolution; x, w, gy of one dtype, w contiguous; b (optional) [O]. The weight gradient
  // is returned contiguous, in x's dtype or wider (the op rounds it).
  Tensor (*conv_forward)(const detail::ConvGeom& g, const Tensor& x, const Tensor& w, const Tensor& b) = nullptr;
  Tensor (*conv_backward_input)(const detail::ConvGeom& g, const Tensor& gy, const Tensor& w) = nullptr;
  Tensor (*conv_backward_weight)(const detail::ConvGeom& g, const Tensor& x, const Tensor& gy) = nullptr;
  // Batch norm of contiguous x [N, C, H, W] with float32 [C] weight, bias and running statistics.
  // training: batch statistics, running ones updated in place, returns {y, saved mean, saved
  // 1/std}; eval: running statistics, returns {y, {}, {}}. The op bumps the running statistics'
  // versions. CPU: also x [N, C, *] of any floating dtype (float64 x takes float64 parameters),
  // running statistics of any floating dtype and stride, and eval mode's statistics returned too
  // (for batch_norm_backward_eval); the saved statistics are float64 [C].
  std::array<Tensor, 3> (*batch_norm)(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& running_mean,
                                      const Tensor& running_var, bool training, double momentum, double eps) = nullptr;
  // Training mode's {dx, dweight, dbias} from the forward's saved statistics. CPU: dweight and
  // dbias float64 (summed in double; the op rounds them once into the parameters' dtypes).
  std::array<Tensor, 3> (*batch_norm_backward)(const Tensor& x, const Tensor& grad, const Tensor& weight, const Tensor& save_mean,
                                               const Tensor& save_invstd, double eps) = nullptr;
  // Eval mode's {dx, dweight, dbias}: the running statistics (batch_norm's eval-mode mean and
  // 1/std) are constants, so dx = grad weight / std. CPU only so far: without it the op refuses
  // backward in eval mode on the device.
  std::array<Tensor, 3> (*batch_norm_backward_eval)(const Tensor& x, const Tensor& grad, const Tensor& weight, const Tensor& mean,
                                                    const Tensor& invstd) = nullptr;
  // Optional: batch_norm with ReLU applied to y in the same pass (conv-BN-ReLU saves a pass over the
  // activation forward and one backward); as batch_norm, with y = max(y, 0). Where null, the
  // batch_norm_relu op composes batch_norm and relu.
  std::array<Tensor, 3> (*batch_norm_relu)(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& running_mean,
                                           const Tensor& running_var, bool training, double momentum, double eps) = nullptr;
  // Its training-mode gradient: batch_norm_backward's, of grad zeroed where y (the forward's output,
  // x's dtype and layout) is not positive -- the mask applied as the kernel reads grad.
  std::array<Tensor, 3> (*batch_norm_relu_backward)(const Tensor& x, const Tensor& grad, const Tensor& y, const Tensor& weight,
                                                    const Tensor& save_mean, const Tensor& save_invstd, double eps) = nullptr;
  // Layer norm of contiguous x [M, D] over D, with float32 [D] weight and bias (either may be
  // undefined) and statistics: returns {y, mean [M], 1/std [M]}, the statistics float32.
  // CPU: also float64 x (with float64 parameters, rows in double); statistics float64.
  std::array<Tensor, 3> (*layer_norm)(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps) = nullptr;
  // {dx, dweight, dbias} from the forward's statistics; dweight and dbias float32 [D]. CPU:
  // dweight and dbias float64 (summed in double; the op rounds them once).
  std::array<Tensor, 3> (*layer_norm_backward)(const Tensor& x, const Tensor& grad, const Tensor& weight, const Tensor& mean,
                                               const Tensor& rstd) = nullptr;
  // As layer_norm, but y written in `out` whatever x's dtype (autocast: no cast copies around the
  // norm). A backend with this entry takes a layer_norm_backward grad in y's dtype, dx in x's.
  // The op uses it under autocast on devices other than the CPU (layer_norm_fuses_cast), where
  // the CPU keeps PyTorch's float32 policy; the CPU's entry is there for direct callers.
  std::array<Tensor, 3> (*layer_norm_to)(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps, DType out) = nullptr;
  // A training MLP's two GEMMs with the GELU (act: Gelu or GeluTanh) in their epilogues (mlp_gelu,
  // ops/linalg.hpp): linear_gelu: x [M, K], w1 [H, K], b1 [H] -> {gelu(x w1^T + b1), its input pre};
  // linear_dgelu: g [M, D], w2 [D, H], pre -> {(g w2) * gelu'(pre), that summed over rows (b1's
  // gradient)}. One dtype; both results undefined where the backend has no fused kernel for the
  // operands or the activation. CUDA: cuBLASLt's epilogues, tanh only. CPU: both GELUs, float32
  // and 16-bit, on AVX-512 (the GEMM's tile hook), bit-identical to linear, gelu, linear.
  std::array<Tensor, 2> (*linear_gelu)(const Tensor& x, const Tensor& w1, const Tensor& b1, DeviceUnary act) = nullptr;
  std::array<Tensor, 2> (*linear_dgelu)(const Tensor& g, const Tensor& w2, const Tensor& pre, DeviceUnary act) = nullptr;
  // Rows of contiguous weight [V, D] at int64 indices [N] (on the device, already range-checked):
  // [N, D] in weight's dtype. CPU: a weight of any dtype.
  Tensor (*embedding)(const Tensor& weight, const Tensor& indices) = nullptr;
  // The weight's gradient: grad [N, D] (float32, contiguous) added into row indices[i] of a float32
  // [V, D] of zeros; the row `padding_idx` (-1: none) gets none. CPU: also a float64 grad, summed
  // into float64 (the embedding op's choice for float64 weights on the CPU).
  Tensor (*embedding_backward)(const Tensor& grad, const Tensor& indices, int64_t num_weights, int64_t padding_idx) = nullptr;
  // x * (keep ? scale : 0), computed in float32 and rounded once; keep is bool of x's shape,
  // contiguous. Dropout's forward and backward. CPU: float64 in double; any strides (the CPU's
  // dropout kernel applies it to a strided input's mask).
  Tensor (*masked_scale)(const Tensor& x, const Tensor& keep, double scale) = nullptr;
  // Fused attention, softmax(q k^T * scale) v without the [L, S] scores (no attn_mask; the op keeps
  // its composed path for masks): q [batch..., L, E], k and v [batch..., S, E] on one batch shape
  // (broadcast dims expanded, stride 0), one dtype, unit stride along E, and E a multiple of 8 up
  // to 128 (detail::sdpa_fused_supported). causal keeps key j for query i when j <= i; dropout_p
  // > 0 drops where !detail::sdpa_dropout_keep(seed, (b L + i) S + j, p), b the flattened batch
  // index, and scales the rest by 1 / (1 - p). Returns {out [batch..., L, E] in q's dtype,
  // logsumexp float32 [batch..., L]}, +inf where a row has no key. CPU: also any E and Ev (v's own
  // head dim), float64 (logsumexp float64 then), and every row stride (heads of a packed
  // projection read in place).
  std::array<Tensor, 2> (*sdpa_forward)(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale,
                                        double dropout_p, uint64_t seed) = nullptr;
  // Its gradients from grad (out's shape and dtype), out and logsumexp, with the forward's own
  // arguments: {dq, dk, dv} in q's dtype and the expanded shapes (broadcasts not yet summed). CPU:
  // also grad in any floating dtype (read as q is: float16 widened, not rounded to float16 first),
  // and the gradients in logsumexp's dtype where a batch dim of q, k or v is broadcast (stride 0,
  // size > 1), so the op's sum over it rounds once.
  std::array<Tensor, 3> (*sdpa_backward)(const Tensor& grad, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                                         const Tensor& lse, bool causal, double scale, double dropout_p, uint64_t seed) = nullptr;
  // A backend's general attention (the CPU's; CUDA has none, and takes sdpa_forward or the
  // composed path): as sdpa_forward with any head dims and dtypes, plus attn_mask (undefined,
  // bool = keep, or floating and added to the scaled scores; broadcastable to [batch..., L, S],
  // not expanded; a row with no key left gives 0), the result written into `out` ([batch..., L,
  // Ev] in q's dtype, unit stride along Ev, any other strides: heads merged in place) and the
  // logsumexp returned (float32; float64 for float64).
  Tensor (*sdpa_forward_into)(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, bool causal, double scale,
                              double dropout_p, uint64_t seed, const Tensor& out) = nullptr;
  // Its gradients written into dq, dk, dv (the expanded shapes, unit stride along the last dim,
  // one dtype: q's, or logsumexp's where the op still sums broadcast dims) and, when defined, the
  // float mask's into dmask (zeros of [batch..., L, S] in logsumexp's dtype, contiguous).
  void (*sdpa_backward_into)(const Tensor& grad, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask,
                             const Tensor& out, const Tensor& lse, bool causal, double scale, double dropout_p, uint64_t seed,
                             const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dmask) = nullptr;
  // One optimizer group's updates, all parameters in one launch, with the CPU's arithmetic; the
  // whole update (counters included) is skipped on the device when found_inf (float32 [], may be
  // undefined) is non-zero.
  void (*adam)(const std::vector<DeviceParamUpdate>& params, const optim::detail::AdamHyper& h, const Tensor& found_inf) = nullptr;
  void (*sgd)(const std::vector<DeviceParamUpdate>& params, const optim::detail::SgdScalars& s, const Tensor& found_inf) = nullptr;
  // GradScaler's unscale: every gradient times float(1 / double(*scale)) (scale float32 [] on the
  // device), in one launch; found_inf (float32 []) is set to 1 if any value was inf/NaN and is
  // never cleared here. Where masters[i] is defined (float32, grads[i]'s shape) the unscaled
  // value goes there and, rounded, back into grads[i]. Nothing is read back to the host.
  void (*unscale)(const std::vector<Tensor>& grads, const std::vector<Tensor>& masters, const Tensor& scale,
                  const Tensor& found_inf) = nullptr;
  // GradScaler::update() on the device (amp::detail::update_scale): found if any of found_infs is
  // non-zero; scale float32 [], growth_tracker and skipped (steps skipped so far) int64 [].
  void (*update_scale)(const Tensor& scale, const Tensor& growth_tracker, const std::vector<Tensor>& found_infs, double growth_factor,
                       double backoff_factor, int64_t growth_interval, const Tensor& skipped) = nullptr;
  // clip_grad_norm_: the 2-norm of all grads as one vector (float32 [] on the device, summed in a
  // fixed order), and every grad times max_norm / (norm + 1e-6) where that is below 1 (or NaN),
  // the factor computed on the device from `norm`.
  Tensor (*grad_norm)(const std::vector<Tensor>& grads) = nullptr;
  void (*clip_grads)(const std::vector<Tensor>& grads, const Tensor& norm, double max_norm) = nullptr;
  // Dropout's forward and backward: x * (keep(i) ? scale : 0) with keep(i) = detail::dropout_keep(
  // seed, i, p) over x's elements in order (x contiguous); when replay_counter (int64 []) is
  // defined, the seed is first mixed with its value (detail::dropout_seed), read on the device.
  // CPU: also float64 x, and x of any strides (element i in x's row-major order), read in place.
  Tensor (*dropout)(const Tensor& x, uint64_t seed, double p, double scale, const Tensor& replay_counter) = nullptr;
  // cross_entropy's fused kernel (the CPU's; CUDA has none, and composes log_softmax with
  // class_weights): logits x [N, C, S] contiguous, int64 targets [R] (rows r = n * S + s)
  // contiguous with every value in [0, C) or ignore_index (the op checks them on the host first,
  // an Error at once) -> {per-row losses (0 where ignored), row logsumexp}, both [R] in float32
  // (float64 for float64 logits); ls is the label smoothing.
  std::array<Tensor, 2> (*cross_entropy)(const Tensor& x, const Tensor& target, int64_t N, int64_t C, int64_t S, int64_t ignore_index,
                                         double ls) = nullptr;
  // Its gradient (x's shape and dtype) from that logsumexp: row r gets (softmax - smoothed
  // one-hot) times grad_rows[r] (the upstream gradient per row, [R] in lse's dtype) or, where
  // grad_rows is undefined, times grad_scale; ignored rows get zeros.
  Tensor (*cross_entropy_backward)(const Tensor& x, const Tensor& target, const Tensor& lse, const Tensor& grad_rows, double grad_scale,
                                   int64_t N, int64_t C, int64_t S, int64_t ignore_index, double ls) = nullptr;
  // cross_entropy's row weights from int64 targets [R] (rows r = n * S + s): w [N, C, S] in
  // `dtype` with ls / C per class plus 1 - ls at the target, zero rows where the target is
  // ignore_index; count (float32 []) = rows not ignored. A target outside [0, C) makes its row NaN
  // and adds 1 to bad (float32 []), which the next host read reports (detail::DeviceChecks). CPU:
  // dtype float32 or float64; cross_entropy takes this path there only without the fused kernel.
  std::array<Tensor, 2> (*class_weights)(const Tensor& target, int64_t N, int64_t C, int64_t S, int64_t ignore_index, double ls,
                                         DType dtype, const Tensor& bad) = nullptr;
  // Embedding indices (int64 [N], contiguous) checked on the device: each outside [0, V) adds 1 to
  // bad (float32 []) and is replaced by 0, so the gathers stay in bounds until the next host read
  // reports the error. CPU: the same, for a caller that did not check the indices on the host.
  void (*clamp_indices)(const Tensor& indices, int64_t V, const Tensor& bad) = nullptr;
  // ---- reduceshape ----
  // Reductions; floating x for Mean, Var, Norm (the op checked), the reduced dims (wrapped; none:
  // all) removed, results in x's dtype accumulated in double. Mean: {mean, {}}. Var (arg = the
  // correction): {var, the mean as float64}, NaN where R - correction <= 0. Norm (arg = p > 0, or
  // inf): {norm, {}}. Max, Min along the one dim in `dims` (x non-empty, every dtype): {values,
  // int64 indices of the first winner}, a NaN winning. CPU: any strides.
  std::array<Tensor, 2> (*reduce)(DeviceReduce op, const Tensor& x, const Shape& dims, double arg) = nullptr;
  // a <op> b over the broadcast shape, compared in promote_types(a, b), as bool; both operands on
  // this device (the op checked). CPU: every dtype, any strides.
  Tensor (*compare)(DeviceCompare op, const Tensor& a, const Tensor& b) = nullptr;
  // Element-wise, in acc_t of the computing dtype (float for 16-bit), rounded once. Unary kinds
  // read a and return a's dtype and layout: Neg, Sign, Clamp (s0 = lo, s1 = hi; NaN stays),
  // ClampGrad (1 inside [s0, s1], else 0) take every dtype; Sqrt, Rsqrt, Abs, PowScalar (a^s0),
  // PowScalarGrad (s0 a^(s0-1)) floating a. SqrtGrad, RsqrtGrad (b = the saved output) and AbsGrad
  // (b = the saved input): a (the gradient, b's dtype, broadcast to b's shape) * f'(b), contiguous.
  // Binary kinds broadcast a and b and compute in promote_types(a, b): Pow (a^b), PowGradBase
  // (b a^(b-1)), PowGradExp (a = the saved x^e, b = x: a log b, 0 where b == 0), Maximum, Minimum
  // (NaN propagates), MaximumGrad, MinimumGrad (a's share of the gradient: 1 where a wins, 0.5 on
  // ties), NormGrad (a = x, b = the norm, s0 = p < inf: a |a|^(p-2) / b^(p-1), 0 where b == 0).
  // Where: bool a broadcast with b and c, b or c in promote_types(b, c). MaskedFill: a where bool b
  // (broadcast to a's shape) is false, else s0 (checked to fit a's dtype). Prelu: a > 0 ? a : b a
  // (b the weight viewed to broadcast). PreluGradInput: a = grad, b = x, c = the weight expanded,
  // all of one floating dtype and x's shape -> a where b > 0, else a c; PreluGradWeight: a = grad,
  // b = x -> 0 where b > 0, else a b (summed to the weight's shape by the op). CPU: every dtype of
  // the kind's domain above, any strides.
  Tensor (*pointwise)(DevicePointwise op, const Tensor& a, const Tensor& b, const Tensor& c, double s0, double s1) = nullptr;
  // ts (non-empty, one rank, their sizes those of `shape` but along dim; any dtypes, converted to
  // `dtype`) joined along dim into a new contiguous tensor of `shape`; the op checked the shapes
  // and dropped cat's legacy empty 1-D inputs. CPU: any strides (stack passes stride-0 views).
  Tensor (*cat)(const std::vector<Tensor>& ts, int64_t dim, DType dtype, const Shape& shape) = nullptr;
  // Indexing along dim with int64 `index` (contiguous, on this device, values already checked to
  // be in range). Select: src's slices at index [K] (index_select), src's dtype. Gather: index of
  // src's rank (a 0-dim src read as [1]), out[..] = src[.., index[..], ..], index's shape.
  // Backward kinds return zeros of out_sizes in src's dtype with src added (SelectAdd, the
  // inverse of Select; ScatterAdd, of Gather; float32 or float64 src) or written (Scatter, as
  // ScatterAdd but each target written once: max/min's backward; any floating src); src is
  // contiguous of the forward's output shape. CPU: Select and Gather take any src dtype and strides.
  Tensor (*index)(DeviceIndex op, const Tensor& src, int64_t dim, const Tensor& index, const Shape& out_sizes) = nullptr;
  // Running sum of x along dim (wrapped, x at least 1-D), from the end when reverse; floating x
  // accumulates in double and keeps its dtype, integers and bool give int64. CPU: any strides.
  Tensor (*cumsum)(const Tensor& x, int64_t dim, bool reverse) = nullptr;
  // In-place passes of optim/ outside Optimizer::step, all on the device. NormAccumulate: |src|'s
  // elements (a gradient, any floating dtype) into the p-norm accumulator dst (float64 [], the
  // running optim::detail::NormAcc::acc; s = p, not 2: grad_norm has that). ClampValue: dst (a
  // contiguous floating gradient) clamped to [-s, s] in acc_t, NaN kept. EmaLerp: dst (float32,
  // contiguous) = lerp(dst, src, float(s)), src floating of dst's shape, contiguous. AdoptChanged:
  // dst (a float32 master) takes 16-bit src's value wherever round(dst) != src (nothing for 32/64-bit src).
  void (*param_op)(DeviceParamOp op, const Tensor& dst, const Tensor& src, double s) = nullptr;
  // ---- poolnorm ----
  // 2-D pooling of contiguous x [..., H, W] (g.P planes of H x W; the op has checked x floating and
  // 3-D or 4-D, and built g with make_pool_geom, or P, H, W, OH, OW alone for AdaptiveAvg) ->
  // {y [..., OH, OW] contiguous in x's dtype, int64 indices of y's shape (Max: the flat h * W + w of
  // each maximum in its plane, NaN wins; else undefined)}. Avg divides as g.count_include_pad says;
  // AdaptiveAvg averages PyTorch's adaptive windows. 16-bit values summed / compared in float.
  std::array<Tensor, 2> (*pool2d)(DevicePool kind, const detail::PoolGeom& g, const Tensor& x) = nullptr;
  // Its gradient: gy [..., OH, OW] contiguous in the input's dtype (and, for Max, the forward's
  // indices) -> gx [..., H, W] contiguous in that dtype; overlapping windows accumulate in float.
  Tensor (*pool2d_backward)(DevicePool kind, const detail::PoolGeom& g, const Tensor& gy, const Tensor& indices) = nullptr;
  // Group norm of contiguous x [N, C, *] over groups of C / G channels: weight and bias [C] (the op
  // checked them; either may be undefined) -> {y in x's dtype, mean [N G], 1/std [N G]}. CPU:
  // weight and bias of any floating dtype and stride; statistics float64, rows summed in double.
  std::array<Tensor, 3> (*group_norm)(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t G, double eps) = nullptr;
  // Its {dx (x's dtype), dweight, dbias} from the forward's statistics; grad contiguous in x's
  // dtype and shape. CPU: dweight and dbias float64 [C] (summed in double; the op rounds them once).
  std::array<Tensor, 3> (*group_norm_backward)(const Tensor& x, const Tensor& grad, const Tensor& weight, const Tensor& mean,
                                               const Tensor& rstd, int64_t G) = nullptr;
  // Per-element loss terms (DeviceLoss) of a, b (and w) already in the loss's compute dtype
  // (float32; float64 for float64), any strides: Mse broadcasts a and b (result in the layout of
  // an operand of the full shape), the others take b of a's shape and w broadcast to it. Bce throws
  // an Error naming binary_cross_entropy when an input lies outside [0, 1].
  Tensor (*loss_terms)(DeviceLoss kind, const Tensor& a, const Tensor& b, const Tensor& w) = nullptr;
  // Their gradients {d/da, d/db (when need_b), d/dw (when need_w)} in the compute dtype and the
  // terms' shape (undefined where not needed), already multiplied by the upstream gradient: grad
  // (the terms' shape, contiguous, compute dtype) or, where grad is undefined, the host scalar
  // grad_scale. Mse's gradient of b is minus that of a; Bce has none for w.
  std::array<Tensor, 3> (*loss_terms_backward)(DeviceLoss kind, const Tensor& a, const Tensor& b, const Tensor& w, const Tensor& grad,
                                               double grad_scale, bool need_b, bool need_w) = nullptr;
  // Sum of dense float32 / float64 terms (in memory order; accumulated in double, in fixed chunks)
  // divided by divisor: a 0-dim tensor of dtype out (a loss's Sum or Mean reduction).
  Tensor (*loss_sum)(const Tensor& terms, double divisor, DType out) = nullptr;
  // nll_loss: x [C] or [N, C, d...] as the op has it (any strides; rows r = n S + s over the d...)
  // and int64 targets of the rows' shape, contiguous, each in [0, C) or ignore_index (checked by
  // the op) -> -x[n, target, s] per row in the compute dtype, 0 where ignored, of target's shape.
  Tensor (*nll_loss)(const Tensor& x, const Tensor& target, int64_t N, int64_t C, int64_t S, int64_t ignore_index) = nullptr;
  // Its gradient: zeros of `sizes` in `dtype` with -grad_rows[r] (compute dtype, [N S], or, where
  // undefined, -grad_scale) at each row's target.
  Tensor (*nll_loss_backward)(const Tensor& target, const Tensor& grad_rows, double grad_scale, const Shape& sizes, DType dtype, int64_t N,
                              int64_t C, int64_t S, int64_t ignore_index) = nullptr;
  // A new, empty graph of this device (CapturedStep).
  std::unique_ptr<DeviceGraph> (*make_graph)() = nullptr;
  // A new stream and event of this device (DeviceStream, DeviceEvent above).
  std::unique_ptr<DeviceStream> (*make_stream)() = nullptr;
  std::unique_ptr<DeviceEvent> (*make_event)() = nullptr;
};

namespace detail {
inline std::array<const DeviceKernels*, kNumDevices>& device_kernel_registry() {
  static std::array<const DeviceKernels*, kNumDevices> reg{};
  return reg;
}
}  // namespace detail

// A backend registers its table once; a test may swap in its own and restore the previous one.
inline const DeviceKernels* set_device_kernels(Device d, const DeviceKernels* k) {
  return std::exchange(detail::device_kernel_registry()[static_cast<int>(d)], k);
}
inline const DeviceKernels* device_kernels(Device d) { return detail::device_kernel_registry()[static_cast<int>(d)]; }

namespace detail {
// t's device's kernel for `entry`, or an Error naming op, the tensor and what is missing.
template <class Fn>
Fn device_kernel(const char* op, const Tensor& t, Fn DeviceKernels::*entry) {
  const Device d = t.device();
  const DeviceKernels* k = device_kernels(d);
  MIXPREC_CHECK(k != nullptr, op, ": tensor of shape ", t.sizes(), " is on ", d, ", but no ", d,
                d == Device::CPU ? " kernels are registered (include <mixprec/mixprec.hpp>, which registers the CPU backend)"
                                 : " kernels are compiled into this program (include <mixprec/cuda.hpp> in a translation unit "
                                   "compiled by nvcc and link mixprec::cuda)");
  MIXPREC_CHECK(k->*entry != nullptr, op, ": tensor of shape ", t.sizes(), " is on ", d, ", and ", op, " has no ", d,
                d == Device::CPU ? " kernel in the table registered for the CPU" : " kernel yet; move it to the CPU with .cpu()");
  return k->*entry;
}

// All defined tensors on one device, which is returned (CPU when none is defined).
inline Device common_device(const char* op, std::initializer_list<const Tensor*> ts) {
  const Tensor* first = nullptr;
  for (const Tensor* t : ts) {
    if (!t->defined()) continue;
    if (!first) first = t;
    MIXPREC_CHECK(t->device() == first->device(), op, ": expected all tensors on one device, got ", first->device(), " (shape ",
                  first->sizes(), ") and ", t->device(), " (shape ", t->sizes(), ")");
  }
  return first ? first->device() : Device::CPU;
}

// ---- Capture state and lazily reported device errors (CapturedStep, cross_entropy) ----

// Set by CapturedStep while a graph records on this thread. Host reads and uploads are refused
// then: recorded once, they would not run again on replay, and on CUDA they would break the capture.
struct CaptureState {
  int depth = 0;
  Tensor replay_counter;  // the graph's (DeviceGraph::replay_counter): dropout mixes it into its seed
};
inline CaptureState& capture_state() {
  thread_local CaptureState s;
  return s;
}
inline bool capturing() { return capture_state().depth > 0; }
inline void refuse_during_capture(const std::string& op, const Tensor& t, const char* what) {
  MIXPREC_CHECK(!capturing(), op, ": ", what, " a tensor of shape ", t.sizes(), " on ", t.device(),
                " while a CapturedStep is being captured; a captured step must stay on the device (read values "
                "after the step, e.g. its loss(); give inputs to the step, which copies them into its static buffers)");
}

// An error found by a kernel (a cross_entropy target out of range) is counted on the device in a
// float32 [] and reported as a mixprec::Error naming the op at the next host read of any device
// tensor -- as CUDA reports a kernel's fault at the next synchronising call, but recoverable, and
// without the read-back per call that checking on the host would cost.
struct DeviceCheck {
  Tensor count;
  std::string what;
};
inline std::vector<DeviceCheck>& device_checks() {
  thread_local std::vector<DeviceCheck> v;
  return v;
}
// `count` is read at the next report; with `copy` (a graph's buffer, rewritten by the next
// replay) its value now is kept instead. Counts of the same error add up on the device.
inline void add_device_check(const Tensor& count, std::string what, bool copy = false) {
  const DeviceKernels* k = device_kernels(count.device());
  MIXPREC_CHECK(k && k->copy && k->binary, what, ": no ", count.device(), " kernels to count device errors with");
  for (DeviceCheck& c : device_checks())
    if (c.what == what && c.count.device() == count.device()) {
      c.count = k->binary(DeviceBinary::Add, c.count, count, 1.0);
      return;
    }
  Tensor mine = count;
  if (copy) {
    mine = empty(count.sizes(), count.dtype(), count.device());
    k->copy(mine, count);
  }
  device_checks().push_back({mine, std::move(what)});
}
// Reads the pending counts (one small read each) and throws for the first that is non-zero.
inline void report_device_checks() {
  if (device_checks().empty() || capturing()) return;
  std::vector<DeviceCheck> pending;
  pending.swap(device_checks());
  for (const DeviceCheck& c : pending) {
    const Tensor h = device_kernels(c.count.device())->to_host(c.count);
    const float n = *static_cast<const float*>(h.data_ptr());
    MIXPREC_CHECK(n == 0.0f, c.what, " (counted on ", c.count.device(), ": ", n, " since the last host read)");
  }
}
}  // namespace detail

}  // namespace mixprec
