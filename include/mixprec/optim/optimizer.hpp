#pragma once
// Optimizer base (torch.optim.Optimizer for C++): parameter groups, per-parameter float32
// state, fp32 master weights for 16-bit parameters, and the gradient hooks GradScaler and the
// clip utilities use.
//
// Master weights: a float16/bfloat16 parameter gets a float32 copy at construction. step()
// updates the copy in float32 and stores the rounded result into the parameter, so updates far
// below half a 16-bit ulp still accumulate. If anything else writes the parameter (loading a
// checkpoint, EMA apply()/restore()), its storage version changes and the next step() takes
// the new value for every element whose value no longer equals the rounded master.
//
// Master gradients: GradScaler::unscale_ (and the Optimizer& clip utilities) write the float32
// gradient of a 16-bit parameter into a per-parameter float32 buffer; step() reads that buffer
// for as long as the parameter's .grad() is the tensor it came from, unmodified. Without it,
// step() reads the 16-bit gradient directly, converting block by block.
//
// Stochastic rounding (`stochastic_rounding = true` in the options; optim/stochastic_rounding.hpp):
// a bfloat16 parameter gets no master. step() computes its update in float32 from the bfloat16
// value and stores it back rounded stochastically, saving 4 bytes per parameter. The random bits
// are keyed by (rounding_seed, parameter number, its step count): state_dict() holds both, so a
// resumed run rounds exactly as an uninterrupted one. float16 parameters are refused (their
// exponent range leaves small updates to underflow; keep float32 masters for them). CPU only:
// CUDA's fused kernels refuse such an update.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "mixprec/autograd/engine.hpp"
#include "mixprec/optim/stochastic_rounding.hpp"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

// Update loops are element-independent (in place or disjoint): let them vectorise at -O2 too,
// where GCC's cost model otherwise refuses loops that need alias checks or a scalar tail.
#define MIXPREC_OPTIM_PRAGMA(x) _Pragma(#x)
#if defined(_OPENMP)
#define MIXPREC_OPTIM_SIMD _Pragma("omp simd")
#define MIXPREC_OPTIM_SIMD_OR(var) MIXPREC_OPTIM_PRAGMA(omp simd reduction(| : var))
#else
#define MIXPREC_OPTIM_SIMD
#define MIXPREC_OPTIM_SIMD_OR(var)
#endif

namespace mixprec::optim {

// A group option left at kDefault takes the optimizer's default (as PyTorch's param_groups).
inline constexpr double kDefault = std::numeric_limits<double>::quiet_NaN();

struct ParamGroup {
  std::vector<Tensor> params;
  double lr = kDefault;
  double weight_decay = kDefault;
  // SGD
  double momentum = kDefault;
  double dampening = kDefault;
  std::optional<bool> nesterov;
  // Adam, AdamW
  std::pair<double, double> betas{kDefault, kDefault};
  double eps = kDefault;
  std::optional<bool> amsgrad;
};

// Named float32 tensors plus named scalars: what a checkpoint writer serialises (safetensors
// keeps the tensors, the scalars go to its metadata). Keys: "state.<i>.<name>" for parameter i
// (numbered across groups in order), "param_groups.<g>.<option>".
struct StateDict {
  std::vector<std::pair<std::string, Tensor>> tensors;
  std::map<std::string, double> scalars;

  const Tensor* tensor(const std::string& key) const {
    for (const auto& [k, t] : tensors)
      if (k == key) return &t;
    return nullptr;
  }
  std::optional<double> scalar(const std::string& key) const {
    auto it = scalars.find(key);
    return it == scalars.end() ? std::nullopt : std::optional<double>(it->second);
  }
};

struct ParamState {
  int64_t step = 0;                       // updates applied to this parameter (see step_known)
  std::map<std::string, Tensor> buffers;  // float32, contiguous, the parameter's shape
  Tensor master;                          // float32 master weights of a 16-bit parameter
  // The counts live with the parameter (DeviceParamUpdate::counters), where the kernel knows
  // whether a device flag (GradScaler) skipped the step. `step` is a copy that Optimizer::state()
  // and state_dict() refresh (a read, from the device for a device parameter) when step_known is false.
  Tensor counters;
  bool step_known = true;
};

namespace detail {

inline constexpr int64_t kOptimBlock = 2048;       // fp32 scratch per thread, on the stack
inline constexpr int64_t kOptimGrain = 1 << 16;    // updates are memory-bound: split big tensors only
inline constexpr double kMaxRoundingSeed = 9007199254740992.0;  // 2^53: a state-dict scalar holds it exactly

using ::mixprec::detail::copy_kernel;

inline std::vector<ParamGroup> single_group(std::vector<Tensor> params) {
  std::vector<ParamGroup> g(1);
  g[0].params = std::move(params);
  return g;
}

// dst = sqrt(src), correctly rounded. std::sqrt's errno path keeps compilers from vectorising
// it, and Eigen's fast-math packet sqrt is approximate: SSE2 is exact and always there on x86-64.
inline void sqrt_block(const float* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__SSE2__)
  for (; i + 4 <= n; i += 4) _mm_storeu_ps(dst + i, _mm_sqrt_ps(_mm_loadu_ps(src + i)));
#endif
  for (; i < n; ++i) dst[i] = std::sqrt(src[i]);
}

// torch.lerp's formula: exact at both ends.
inline float lerp(float a, float b, float w) { return std::abs(w) < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w); }
// torch.maximum: NaN wins.
inline float nan_max(float a, float b) { return ((a > b) | (a != a)) ? a : b; }  // `|`: one select, vectorises

inline bool is_16bit(DType d) { return d == DType::Float16 || d == DType::BFloat16; }

// dst[0, n) = float(src[off, off + n)) for any floating dtype.
inline void load_float(const void* src, DType dt, int64_t off, float* dst, int64_t n) {
  dispatch_floating(dt, "optimizer", [&]<class G>() { convert(static_cast<const G*>(src) + off, dst, n); });
}
// dst[off, off + n) = round(src[0, n)).
inline void store_float(const float* src, void* dst, DType dt, int64_t off, int64_t n) {
  dispatch_floating(dt, "optimizer", [&]<class G>() { convert(src, static_cast<G*>(dst) + off, n); });
}

template <class G>  // ParamGroup or const ParamGroup
void visit_options(G& g, auto&& num, auto&& flag) {
  num("lr", g.lr);
  num("weight_decay", g.weight_decay);
  num("momentum", g.momentum);
  num("dampening", g.dampening);
  flag("nesterov", g.nesterov);
  num("beta1", g.betas.first);
  num("beta2", g.betas.second);
  num("eps", g.eps);
  flag("amsgrad", g.amsgrad);
}

// "state.12.exp_avg" -> (12, "exp_avg"); nullopt when the key has another form.
inline std::optional<std::pair<std::size_t, std::string>> split_key(const std::string& key, const std::string& prefix) {
  if (key.rfind(prefix, 0) != 0) return std::nullopt;
  const std::size_t dot = key.find('.', prefix.size());
  if (dot == std::string::npos || dot == prefix.size()) return std::nullopt;
  std::size_t idx = 0;
  for (std::size_t i = prefix.size(); i < dot; ++i) {
    if (key[i] < '0' || key[i] > '9') return std::nullopt;
    idx = idx * 10 + static_cast<std::size_t>(key[i] - '0');
  }
  return std::make_pair(idx, key.substr(dot + 1));
}

}  // namespace detail

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  Optimizer(const Optimizer&) = delete;  // state is per parameter, and GradScaler keys by address
  Optimizer& operator=(const Optimizer&) = delete;

  virtual const char* name() const = 0;

  // One update of every parameter that has a gradient, under no_grad, by the kernel of the
  // parameters' device (the CPU's in backends/cpu/training.hpp, CUDA's fused one), one call per
  // group and device. Every gradient is checked before anything changes; if an update throws, the
  // groups updated before it keep their update and their step count, the others are untouched.
  //
  // found_inf (GradScaler::step on a device): a float32 [] on the parameters' device; where it is
  // non-zero the kernels skip the whole update, state and step counts included, decided on the
  // device without a read-back. Every parameter with a gradient must then be on that device.
  MIXPREC_OUTLINE void step(const Tensor& found_inf = Tensor());

  // set_to_none=true drops the gradients (the default, as PyTorch 2.x); false zeroes them in place.
  void zero_grad(bool set_to_none = true) {
    no_grad guard;
    for (Slot& s : slots_) {
      s.master_grad_source.reset();
      Tensor g = s.param.grad();
      if (!g.defined()) continue;
      if (set_to_none) s.param.set_grad(Tensor());
      else g.zero_();
    }
  }

  std::vector<ParamGroup>& param_groups() { return groups_; }
  const std::vector<ParamGroup>& param_groups() const { return groups_; }

  MIXPREC_OUTLINE void add_param_group(ParamGroup group);

  std::size_t num_params() const { return slots_.size(); }
  // Parameter `index` in the state-dict numbering (groups in order, then position).
  const Tensor& param(std::size_t index) const { return slots_.at(index).param; }
  // The step count is read from the parameter's counters here (from the device for a device parameter).
  const ParamState& state(std::size_t index) const {
    refresh_step(const_cast<ParamState&>(state_.at(index)));
    return state_.at(index);
  }
  // The float32 master weights of a 16-bit parameter; undefined for a float32 parameter, and for
  // a bfloat16 one under stochastic rounding.
  const Tensor& master_weight(std::size_t index) const { return state_.at(index).master; }

  bool stochastic_rounding() const { return stochastic_rounding_; }
  uint64_t rounding_seed() const { return rounding_seed_; }

  // Live references to the state tensors (as PyTorch's state_dict); clone to snapshot.
  StateDict state_dict() const {
    StateDict sd;
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      const std::string pre = "param_groups." + std::to_string(g) + ".";
      detail::visit_options(
          groups_[g], [&](const char* k, const double& v) { if (!std::isnan(v)) sd.scalars[pre + k] = v; },
          [&](const char* k, const std::optional<bool>& v) { if (v) sd.scalars[pre + k] = *v ? 1.0 : 0.0; });
      sd.scalars[pre + "num_params"] = static_cast<double>(groups_[g].params.size());
    }
    if (stochastic_rounding_) sd.scalars["rounding_seed"] = static_cast<double>(rounding_seed_);
    for (std::size_t i = 0; i < state_.size(); ++i) {
      const std::string pre = "state." + std::to_string(i) + ".";
      const ParamState& st = state(i);
      if (st.step > 0) sd.scalars[pre + "step"] = static_cast<double>(st.step);
      for (const auto& [k, t] : st.buffers) sd.tensors.emplace_back(pre + k, t);
      if (st.master.defined()) sd.tensors.emplace_back(pre + "master_weight", st.master);
    }
    return sd;
  }

  // Deep-copies the state in (as PyTorch); the groups must match in number and size.
  void load_state_dict(const StateDict& sd) {
    std::size_t ngroups = 0;
    for (const auto& [k, v] : sd.scalars)
      if (auto p = detail::split_key(k, "param_groups.")) ngroups = std::max(ngroups, p->first + 1);
    MIXPREC_CHECK(ngroups == groups_.size(), name(), ".load_state_dict: loaded state dict has ", ngroups,
                  " parameter groups, the optimizer has ", groups_.size());
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      auto n = sd.scalar("param_groups." + std::to_string(g) + ".num_params");
      MIXPREC_CHECK(n && *n >= 0 && *n < 9.0e18 && static_cast<std::size_t>(*n) == groups_[g].params.size(), name(),
                    ".load_state_dict: loaded state dict contains a parameter group that doesn't match the size of "
                    "optimizer's group ", g, " (", n ? *n : -1.0, " vs ", groups_[g].params.size(), ")");
    }
    // Validate everything before changing anything.
    for (const auto& [k, v] : sd.scalars) {
      if (auto p = detail::split_key(k, "param_groups.")) {
        bool known = p->second == "num_params";
        detail::visit_options(groups_[p->first], [&](const char* o, double&) { known |= p->second == o; },
                              [&](const char* o, std::optional<bool>&) { known |= p->second == o; });
        MIXPREC_CHECK(known, name(), ".load_state_dict: unknown key '", k, "'");
      } else if (auto q = detail::split_key(k, "state.")) {
        MIXPREC_CHECK(q->first < slots_.size() && q->second == "step" && v >= 0 && v < 9.0e18, name(),
                      ".load_state_dict: unexpected scalar '", k, "' = ", v);
      } else if (k == "rounding_seed") {
        MIXPREC_CHECK(stochastic_rounding_, name(), ".load_state_dict: the state dict is from an optimizer with "
                      "stochastic_rounding (it has 'rounding_seed'), this one keeps float32 masters");
        MIXPREC_CHECK(v >= 0 && v < detail::kMaxRoundingSeed && v == std::floor(v), name(),
                      ".load_state_dict: 'rounding_seed' = ", v, " is not an integer in [0, 2^53)");
      } else {
        fail(name(), ".load_state_dict: unknown key '", k, "'");
      }
    }
    for (const auto& [k, t] : sd.tensors) {
      auto q = detail::split_key(k, "state.");
      MIXPREC_CHECK(q && q->first < slots_.size(), name(), ".load_state_dict: unknown key '", k, "'");
      MIXPREC_CHECK(q->second == "master_weight" || is_state_name(q->second), name(), ".load_state_dict: '", k,
                    "' is not state of ", name());
      MIXPREC_CHECK(t.defined() && t.is_floating_point() && t.sizes() == slots_[q->first].param.sizes(), name(),
                    ".load_state_dict: '", k, "' has shape ", t.defined() ? t.sizes() : Shape{}, ", parameter ", q->first,
                    " has shape ", slots_[q->first].param.sizes());
    }
    no_grad guard;
    for (const auto& kv : sd.scalars)
      if (auto p = detail::split_key(kv.first, "param_groups.")) {
        const double v = kv.second;  // not a structured binding: lambdas capture it (clang < 16)
        detail::visit_options(
            groups_[p->first], [&](const char* o, double& x) { if (p->second == o) x = v; },
            [&](const char* o, std::optional<bool>& x) { if (p->second == o) x = v != 0.0; });
      }
    for (ParamState& st : state_) {
      st.step = 0;
      st.buffers.clear();
      st.counters = Tensor();  // made again from `step` at the next device update
      st.step_known = true;
    }
    for (const auto& [k, v] : sd.scalars)
      if (auto q = detail::split_key(k, "state.")) state_[q->first].step = static_cast<int64_t>(v);
    if (auto seed = sd.scalar("rounding_seed")) rounding_seed_ = static_cast<uint64_t>(*seed);
    for (const auto& [k, t] : sd.tensors) {
      auto q = detail::split_key(k, "state.");
      ParamState& st = state_[q->first];
      if (q->second == "master_weight") {
        // A float32 parameter keeps no master: its own values are the weights.
        if (!st.master.defined()) continue;
        detail::copy_kernel(st.master, t);
        slots_[q->first].synced_version = slots_[q->first].param.version();
      } else {
        Tensor b = empty(t.sizes(), DType::Float32, slots_[q->first].param.device());
        detail::copy_kernel(b, t);
        st.buffers[q->second] = b;
      }
    }
    for (Slot& s : slots_) s.master_grad_source.reset();
  }

  // ---- Gradient hooks (GradScaler, clip_grad_*) ----

  struct GradSlot {
    std::size_t index;  // parameter number (state-dict numbering)
    Tensor param;
    Tensor grad;         // param.grad(), contiguous
    Tensor master_grad;  // float32 buffer of the param's shape when grad is not float32, else undefined
  };

  // Every parameter with a gradient. Master-gradient buffers are allocated on first need and
  // reused; a non-contiguous gradient is replaced by a contiguous copy.
  std::vector<GradSlot> grad_slots() {
    std::vector<GradSlot> out;
    out.reserve(slots_.size());
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      Slot& s = slots_[i];
      Tensor g = s.param.grad();
      if (!g.defined()) continue;
      MIXPREC_CHECK(g.is_floating_point() && g.device() == s.param.device(), name(), ": gradient of parameter ", i, " has dtype ",
                    g.dtype(), " on ", g.device(), "; expected a floating-point tensor on ", s.param.device());
      if (!g.is_contiguous()) {
        no_grad guard;
        g = g.contiguous();
        s.param.set_grad(g);
      }
      if (g.dtype() != DType::Float32 && (!s.master_grad.defined() || s.master_grad.sizes() != s.param.sizes() ||
                                          s.master_grad.device() != s.param.device()))
        s.master_grad = empty(s.param.sizes(), DType::Float32, s.param.device());
      out.push_back({i, s.param, g, g.dtype() != DType::Float32 ? s.master_grad : Tensor()});
    }
    return out;
  }

  // From now until param(index).grad() changes, step() uses the master-gradient buffer.
  void mark_master_grad_current(std::size_t index) {
    Slot& s = slots_.at(index);
    const Tensor g = s.param.grad();
    MIXPREC_CHECK(g.defined() && s.master_grad.defined(), name(), ".mark_master_grad_current: parameter ", index,
                  " has no gradient or no master-gradient buffer");
    s.master_grad_source = g.impl_ptr();
    s.master_grad_version = g.version();
  }
  bool master_grad_current(std::size_t index) const {
    const Slot& s = slots_.at(index);
    if (!s.master_grad.defined()) return false;
    const auto src = s.master_grad_source.lock();
    const Tensor g = s.param.grad();
    return src && g.defined() && src.get() == g.impl() && g.version() == s.master_grad_version;
  }

  // (param, gradient) pairs where the gradient is the float32 tensor step() will read: the
  // param's own float32 gradient, or its master-gradient buffer (filled from the 16-bit
  // gradient unless it already holds it). Modify them in place, then call
  // write_back_master_grads() so the 16-bit .grad() reflects the change.
  std::vector<std::pair<Tensor, Tensor>> fp32_grads() {
    std::vector<std::pair<Tensor, Tensor>> out;
    for (GradSlot& s : grad_slots()) {
      if (!s.master_grad.defined()) {
        out.emplace_back(s.param, s.grad);
        continue;
      }
      if (!master_grad_current(s.index)) {
        detail::copy_kernel(s.master_grad, s.grad);
        mark_master_grad_current(s.index);
      }
      out.emplace_back(s.param, s.master_grad);
    }
    return out;
  }
  // Rounds each current master gradient into its 16-bit .grad(); step() keeps using the buffer.
  void write_back_master_grads() {
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      if (!master_grad_current(i)) continue;
      const Tensor g = slots_[i].param.grad();
      detail::copy_kernel(g, slots_[i].master_grad);
      g.bump_version();
      mark_master_grad_current(i);
    }
  }
  // fn(const Tensor& param, Tensor& fp32_grad) for every parameter with a gradient.
  template <class F>
  void for_each_grad(F&& fn) {
    for (auto& [p, g] : fp32_grads()) fn(static_cast<const Tensor&>(p), g);
    write_back_master_grads();
  }

 protected:
  explicit Optimizer(ParamGroup defaults) : defaults_(std::move(defaults)) {}
  Optimizer(Optimizer&&) = default;

  // Derived constructors call this (before init) when their options ask for stochastic rounding.
  void set_stochastic_rounding(bool on, uint64_t seed) {
    MIXPREC_CHECK(static_cast<double>(seed) < detail::kMaxRoundingSeed, name(), ": rounding_seed ", seed,
                  " must be below 2^53 (state_dict() stores it as a double)");
    stochastic_rounding_ = on;
    rounding_seed_ = seed;
  }

  // Derived constructors call this once their defaults are set.
  void init(std::vector<ParamGroup> groups) {
    MIXPREC_CHECK(!groups.empty(), name(), ": optimizer got an empty parameter list");
    for (ParamGroup& g : groups) add_param_group(std::move(g));
  }

  // One parameter's update: step() has filled weights, model, grad and counters; update() adds
  // the state (creating it on the parameter's device) and calls the device's kernel, which counts
  // the step in the counters unless found_inf skips it.
  struct PendingUpdate {
    ParamState* state;
    std::size_t index;  // the parameter's number
    DeviceParamUpdate u;
    bool restart = false;  // update() restarted the state: this is step 1
  };

  // Sets both counters of `u` (or only the second) to `value`: a fill, nothing read back.
  static void set_counters(const DeviceParamUpdate& u, int64_t value, bool both = true) {
    Tensor c = both ? u.counters : u.counters.select(0, 1);
    c.fill_(static_cast<double>(value));
  }

  // The state buffer `key` of `st` if it fits `like` (shape and device), else undefined. New
  // buffers go into `st` only after the kernel ran, so a refused step leaves the state as it was.
  static Tensor state_buffer(const ParamState& st, const char* key, const Tensor& like) {
    const auto it = st.buffers.find(key);
    const bool fits = it != st.buffers.end() && it->second.sizes() == like.sizes() && it->second.device() == like.device();
    return fits ? it->second : Tensor();
  }

  virtual void validate(const ParamGroup& g) const = 0;
  // The updates of group g's parameters on one device, through that device's kernel.
  virtual void update(const ParamGroup& g, std::vector<PendingUpdate>& ups, const Tensor& found_inf) = 0;
  virtual bool is_state_name(const std::string& key) const = 0;

  ParamGroup defaults_;

 private:
  struct Slot {
    Tensor param;
    std::size_t group = 0;
    uint64_t synced_version = 0;  // param's storage version when master and param last agreed
    Tensor master_grad;
    std::weak_ptr<TensorImpl> master_grad_source;  // the .grad() master_grad holds, and its version
    uint64_t master_grad_version = 0;
  };

  void fill_defaults(ParamGroup& g) const {
    ParamGroup d = defaults_;
    std::vector<double*> dn;
    std::vector<std::optional<bool>*> df;
    detail::visit_options(d, [&](const char*, double& v) { dn.push_back(&v); },
                          [&](const char*, std::optional<bool>& v) { df.push_back(&v); });
    std::size_t i = 0, j = 0;
    detail::visit_options(g, [&](const char*, double& v) { if (std::isnan(v)) v = *dn[i]; ++i; },
                          [&](const char*, std::optional<bool>& v) { if (!v) v = *df[j]; ++j; });
  }

  // Slots and state are positional: the groups' parameter lists must stay as registered.
  void check_groups_unchanged() const {
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      MIXPREC_CHECK(groups_[g].params.size() == group_sizes_[g], name(), ": param_groups()[", g,
                    "].params changed size; use add_param_group to add parameters");
    }
    std::size_t i = 0;
    for (const ParamGroup& g : groups_)
      for (const Tensor& p : g.params) {
        MIXPREC_CHECK(p.is_same(slots_[i].param), name(), ": param_groups() parameter ", i,
                      " was replaced; build a new optimizer or use add_param_group");
        ++i;
      }
  }

  // Another writer changed the 16-bit parameter: adopt its value wherever it no longer equals
  // the rounded master (elements that still agree keep their extra float32 bits). A master on a
  // device adopts the whole parameter (no per-element compare there).
  void sync_master(std::size_t i) {
    Slot& s = slots_[i];
    Tensor& m = state_[i].master;
    if (!m.defined() || s.param.version() == s.synced_version) return;
    if (m.device() != Device::CPU) detail::copy_kernel(m, s.param);
    else adopt_changed(m, s.param.device() == Device::CPU ? s.param : s.param.cpu());
    s.synced_version = s.param.version();
  }
  // master (float32, CPU) takes p16's value wherever the two no longer agree.
  // By the table's `param_op` (nothing to adopt for a float32 or float64 p16).
  static void adopt_changed(Tensor& master, const Tensor& p16) {
    ::mixprec::detail::device_kernel("optimizer", master, &DeviceKernels::param_op)(DeviceParamOp::AdoptChanged, master, p16, 0.0);
  }

  static void refresh_step(ParamState& st) {
    if (st.step_known || !st.counters.defined()) return;
    st.step = st.counters.select(0, 0).item<int64_t>();
    st.step_known = true;
  }

  // The counters of `st` on p's device, made from the host's count when missing (after a
  // load_state_dict, or the first update) with fills: nothing is uploaded.
  static void ensure_counters(ParamState& st, const Tensor& p) {
    if (st.counters.defined() && st.counters.device() == p.device()) return;
    refresh_step(st);
    Tensor c = empty({2}, DType::Int64, p.device());
    c.select(0, 0).fill_(static_cast<double>(st.step));
    c.select(0, 1).fill_(st.buffers.empty() ? 0.0 : static_cast<double>(std::max<int64_t>(st.step, 1)));
    st.counters = c;
  }

  // Master weights and state follow the parameter to its device (a model moved after its
  // optimizer was built). A CPU master is synced on the CPU first, element by element, so the
  // move keeps its extra float32 bits.
  void place_state(std::size_t i) {
    const Device d = slots_[i].param.device();
    ParamState& st = state_[i];
    if (st.counters.defined() && st.counters.device() != d) {
      refresh_step(st);
      st.counters = Tensor();
    }
    if (st.master.defined() && st.master.device() != d) {
      if (st.master.device() == Device::CPU) sync_master(i);
      st.master = st.master.to(d);
    }
    for (auto& [k, t] : st.buffers)
      if (t.device() != d) t = t.to(d);
  }

  std::vector<ParamGroup> groups_;
  std::vector<std::size_t> group_sizes_;
  std::vector<Slot> slots_;
  std::vector<ParamState> state_;
  bool stochastic_rounding_ = false;
  uint64_t rounding_seed_ = 0;
};

#if MIXPREC_HEADER_DEFINITIONS  // out of line in the compiled mode (core/config.hpp)
MIXPREC_OUTLINE void Optimizer::step(const Tensor& found_inf) {
  no_grad guard;
  if (found_inf.defined())
    for (std::size_t i = 0; i < slots_.size(); ++i)
      MIXPREC_CHECK(!slots_[i].param.grad().defined() || slots_[i].param.device() == found_inf.device(), name(),
                    ".step: a found_inf flag on ", found_inf.device(), " skips updates there, but parameter ", i, " (shape ",
                    slots_[i].param.sizes(), ") is on ", slots_[i].param.device());
  MIXPREC_CHECK(!found_inf.defined() || (found_inf.dtype() == DType::Float32 && found_inf.numel() == 1), name(),
                ".step: found_inf must be one float32 value, got ", found_inf.dtype(), " of shape ", found_inf.sizes());
  check_groups_unchanged();
  for (const ParamGroup& g : groups_) validate(g);  // the user may have edited the groups since
  for (std::size_t i = 0; i < slots_.size(); ++i) {
    const Tensor grad = slots_[i].param.grad();
    if (!grad.defined()) continue;
    const Tensor& p = slots_[i].param;
    MIXPREC_CHECK(grad.is_floating_point() && grad.sizes() == p.sizes() && grad.device() == p.device(), name(),
                  ".step: gradient of parameter ", i, " has dtype ", grad.dtype(), ", shape ", grad.sizes(), " and is on ",
                  grad.device(), "; expected a floating-point gradient of shape ", p.sizes(), " on ", p.device());
  }
  // Whatever was written is marked, also when a later update throws. After all writes:
  // parameters may share one storage, whose version each write bumps.
  struct MarkWritten {
    Optimizer& o;
    std::vector<std::size_t> stepped;
    ~MarkWritten() {
      for (std::size_t i : stepped) o.slots_[i].param.bump_version();
      for (std::size_t i : stepped) o.slots_[i].synced_version = o.slots_[i].param.version();
    }
  } written{*this, {}};
  // Per group, the parameters of each device (a group normally lives on one).
  std::vector<std::vector<PendingUpdate>> pending(groups_.size());
  for (std::size_t i = 0; i < slots_.size(); ++i) {
    Slot& s = slots_[i];
    const Tensor g = s.param.grad();
    if (!g.defined()) continue;
    ParamState& st = state_[i];
    place_state(i);
    sync_master(i);
    DeviceParamUpdate d;
    d.weights = st.master.defined() ? st.master : s.param;
    if (st.master.defined()) d.model = s.param;
    if (stochastic_rounding_ && s.param.dtype() == DType::BFloat16) {
      d.stochastic_rounding = true;
      d.rounding_key = detail::rounding_key(rounding_seed_, i);
    }
    d.grad = master_grad_current(i) ? s.master_grad : g.is_contiguous() ? g : g.contiguous();
    ensure_counters(st, s.param);
    d.counters = st.counters;
    pending[s.group].push_back({&st, i, std::move(d)});
  }
  for (std::size_t g = 0; g < groups_.size(); ++g) {
    std::vector<PendingUpdate>& ups = pending[g];
    while (!ups.empty()) {
      // One kernel call per device: the first parameter's device, then any others.
      const Device dev = ups.front().u.weights.device();
      std::vector<PendingUpdate> here, rest;
      for (PendingUpdate& d : ups) (d.u.weights.device() == dev ? here : rest).push_back(std::move(d));
      update(groups_[g], here, found_inf);  // commits its new state only once the kernel ran
      for (const PendingUpdate& d : here) {
        written.stepped.push_back(d.index);
        // The counters are the count: the kernel advances them unless found_inf skipped the
        // step, and a captured step's replays advance them with no host code running.
        d.state->step_known = false;
      }
      ups = std::move(rest);
    }
  }
}

MIXPREC_OUTLINE void Optimizer::add_param_group(ParamGroup group) {
  MIXPREC_CHECK(!group.params.empty(), name(), ": optimizer got an empty parameter list");
  fill_defaults(group);
  validate(group);
  for (std::size_t k = 0; k < group.params.size(); ++k) {
    const Tensor& p = group.params[k];
    MIXPREC_CHECK(p.defined(), name(), ": parameter ", k, " of group ", groups_.size(), " is an undefined tensor");
    MIXPREC_CHECK(p.dtype() == DType::Float32 || detail::is_16bit(p.dtype()), name(), ": parameter ", k, " of group ",
                  groups_.size(), " has dtype ", p.dtype(), "; optimizers update float32, float16 and bfloat16 parameters");
    MIXPREC_CHECK(p.is_contiguous(), name(), ": parameter of shape ", p.sizes(), " with strides ", p.strides(),
                  " is not contiguous");
    MIXPREC_CHECK(p.is_leaf(), name(), ": can't optimize a non-leaf Tensor (shape ", p.sizes(), ")");
    MIXPREC_CHECK(!stochastic_rounding_ || p.dtype() != DType::Float16, name(), ": stochastic_rounding applies to bfloat16 "
                  "parameters; parameter ", k, " of group ", groups_.size(), " (shape ", p.sizes(), ") is float16: give it "
                  "an optimizer without stochastic_rounding (float32 masters)");
    for (const Slot& s : slots_)
      MIXPREC_CHECK(!s.param.is_same(p), name(), ": some parameters appear in more than one parameter group");
    for (std::size_t j = 0; j < k; ++j)
      MIXPREC_CHECK(!group.params[j].is_same(p), name(), ": a parameter appears twice in one parameter group");
  }
  for (const Tensor& p : group.params) {
    Slot s;
    s.param = p;
    s.group = groups_.size();
    s.synced_version = p.version();
    slots_.push_back(std::move(s));
    ParamState st;
    if (detail::is_16bit(p.dtype()) && !stochastic_rounding_) {
      st.master = empty(p.sizes(), DType::Float32, p.device());
      detail::copy_kernel(st.master, p);
    }
    state_.push_back(std::move(st));
  }
  group_sizes_.push_back(group.params.size());
  groups_.push_back(std::move(group));
}
#endif  // MIXPREC_HEADER_DEFINITIONS

}  // namespace mixprec::optim
