#pragma once
// GradScaler: dynamic loss scaling with torch.amp.GradScaler's semantics (see AMP_REFERENCE.md).
//
//   amp::GradScaler scaler;                    // init_scale 2^16, growth 2, backoff 0.5, interval 2000
//   scaler.scale(loss).backward();
//   scaler.unscale_(opt);                       // optional: to clip or inspect gradients
//   optim::clip_grad_norm_(opt, 1.0);
//   scaler.step(opt);                           // skipped when a gradient was inf/NaN
//   scaler.update();
//
// Unscaling is one fused pass over all of an optimizer's gradients that multiplies by
// inv_scale = float(1 / double(scale)) and checks for inf/NaN in the same loop, without
// allocating per tensor: the gradients' device's unscale kernel (the CPU's in
// backends/cpu/training.hpp), as update() runs the device's update_scale kernel on the scale. Float32 gradients are unscaled in place. Gradients of any other dtype
// (float16/bfloat16 gradients of 16-bit parameters) are unscaled into the optimizer's float32
// master-gradient buffer, which step() then uses: a small gradient that would underflow once
// unscaled in float16 keeps its value in float32. The rounded unscaled value is also stored
// back into the 16-bit .grad(), so code that reads .grad() after unscale_ sees unscaled values
// as in PyTorch. (PyTorch refuses float16 gradients here -- "Attempting to unscale FP16
// gradients." -- because it would unscale them in float16; the float32 buffer removes that
// reason, so mixprec accepts them.)
//
// On a device (CUDA) nothing in scale/unscale_/step/update waits for the device, as PyTorch's
// fused optimizers: the scale and growth tracker are device tensors (created at the first scale()
// of a device tensor, or the first unscale_ of device gradients), unscale_ writes a device
// found-inf flag, step() hands it to the optimizer, whose fused kernel skips the whole update
// (state and step counts too) when it is set, and update() runs the scale rule in a kernel. So
// the iteration can be captured in a CUDA graph (CapturedStep) and stays valid on replay. What
// the host cannot know without waiting is read when asked for, and only then: step()'s result
// (StepResult converts to bool by reading the flag), found_inf(), get_scale(),
// get_growth_tracker(), skipped_steps(), state_dict(). A found-inf reducer (data parallel) is a
// host function, so with one installed unscale_ reads the flag once.
//
// On the CPU the same kernels run through the CPU's table, on a flag and a scale in host memory:
// reading them costs nothing, so there step() decides on the host and does not call the
// optimizer for a skipped step (its state is left untouched, none created), and the scale,
// growth tracker and skip count are plain members that update()'s kernel writes in place.
//
// Telemetry and limits (beyond torch.amp; docs/numerics.md "What the GradScaler did"):
// steps_taken(), skipped_steps() and history() -- a bounded ring of {iteration, skipped, scale
// after update(), the parameters whose gradients held inf/NaN} -- tell what happened; name them
// with set_parameter_names(model.named_parameters()). Which parameters overflowed is looked up
// only on a step whose found-inf flag is set, so clean steps cost nothing more. Opt-in limits,
// with DeepSpeed's / Megatron's DynamicLossScaler semantics: min_scale (the scale is clamped to
// it, and an overflow when it is already there is an Error naming the parameters -- DeepSpeed's
// "Current loss scale already at minimum"), max_scale (growth capped) and hysteresis N (a step
// that overflows is always skipped, but the scale backs off only at the N-th overflow since the
// scale last grew -- or since the last clean step with consecutive_hysteresis). The defaults are
// PyTorch's rule, bit for bit. On a device the history is read from the device flags when asked
// for; the limits and the parameter report need the flag on the host, so with a limit set (or
// host_overflow_check) unscale_ reads it: one wait per step.
#include <bit>
#include <deque>
#include <functional>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <unordered_map>

#include "mixprec/amp/trace.hpp"
#include "mixprec/optim/optimizer.hpp"

namespace mixprec::amp {

// GradScaler::step's result: whether the optimizer stepped. On the CPU that is known at once; on
// a device the step was decided there, and converting to bool reads the flag (waits for the
// device) -- so code that ignores the result never waits.
class StepResult {
 public:
  StepResult(bool stepped) : stepped_(stepped) {}  // NOLINT: a bool is a known result
  explicit StepResult(Tensor found_inf) : found_inf_(std::move(found_inf)) {}
  operator bool() const { return stepped(); }  // NOLINT: `if (scaler.step(opt))` as before
  bool stepped() const { return found_inf_.defined() ? found_inf_.item<float>() == 0.0f : stepped_; }
  bool known_on_host() const { return !found_inf_.defined(); }
  // The device flag (float32 [], non-zero: skipped); undefined on the CPU.
  const Tensor& found_inf() const { return found_inf_; }

 private:
  bool stepped_ = true;
  Tensor found_inf_;
};

namespace detail {

MIXPREC_HOST_DEVICE bool nonfinite(float v) { return (std::bit_cast<uint32_t>(v) & 0x7f800000u) == 0x7f800000u; }

// update()'s arithmetic, shared with the on-device update (backends/cuda/amp.cuh): back off on
// inf/NaN; after `interval` clean steps grow, but never past float32's range to inf.
MIXPREC_HOST_DEVICE void update_scale(float& scale, int64_t& growth_tracker, bool found_inf, double growth_factor,
                                      double backoff_factor, int64_t growth_interval) {
  if (found_inf) {
    scale = static_cast<float>(static_cast<double>(scale) * backoff_factor);
    growth_tracker = 0;
    return;
  }
  const int64_t successful = growth_tracker + 1;
  if (successful == growth_interval) {
    const float grown = static_cast<float>(static_cast<double>(scale) * growth_factor);
    if (!nonfinite(grown)) scale = grown;
    growth_tracker = 0;
  } else {
    growth_tracker = successful;
  }
}

// The opt-in limits (GradScalerOptions); these defaults make update_scale_limited update_scale.
struct ScaleLimits {
  double min_scale = 0.0;  // 0: none
  double max_scale = std::numeric_limits<double>::infinity();
  int64_t hysteresis = 1;  // overflows that back the scale off: 1 is every one (PyTorch)
  bool consecutive_hysteresis = false;
  bool active() const { return min_scale > 0.0 || max_scale < std::numeric_limits<double>::infinity() || hysteresis > 1; }
};
enum class ScaleChange : uint8_t { None, Grew, BackedOff, HeldByHysteresis, AtMinimum };

// update_scale with limits, as DeepSpeed's DynamicLossScaler.update_scale (Megatron's
// DynamicGradScaler.update agrees): an overflow resets the growth count and uses up one unit of
// hysteresis; with none left (hysteresis_left == 1) the scale backs off, clamped to min_scale --
// unless it is already there (AtMinimum: nothing changes, the caller raises). A clean step
// refills the hysteresis when consecutive_hysteresis, else only when the scale grows.
MIXPREC_HOST_DEVICE ScaleChange update_scale_limited(float& scale, int64_t& growth_tracker, int64_t& hysteresis_left, bool found_inf,
                                                     double growth_factor, double backoff_factor, int64_t growth_interval,
                                                     const ScaleLimits& lim) {
  if (found_inf) {
    growth_tracker = 0;
    if (hysteresis_left > 1) {
      --hysteresis_left;
      return ScaleChange::HeldByHysteresis;
    }
    const float lo = static_cast<float>(lim.min_scale);
    if (lim.min_scale > 0.0 && scale <= lo) return ScaleChange::AtMinimum;
    const float next = static_cast<float>(static_cast<double>(scale) * backoff_factor);
    scale = lim.min_scale > 0.0 && next < lo ? lo : next;
    return ScaleChange::BackedOff;
  }
  if (lim.consecutive_hysteresis) hysteresis_left = lim.hysteresis;
  const int64_t successful = growth_tracker + 1;
  if (successful != growth_interval) {
    growth_tracker = successful;
    return ScaleChange::None;
  }
  growth_tracker = 0;
  hysteresis_left = lim.hysteresis;
  float grown = static_cast<float>(static_cast<double>(scale) * growth_factor);
  if (static_cast<double>(grown) > lim.max_scale) grown = static_cast<float>(lim.max_scale);
  if (nonfinite(grown) || grown == scale) return ScaleChange::None;
  scale = grown;
  return ScaleChange::Grew;
}

}  // namespace detail

// One update() in GradScaler::history().
struct ScalerRecord {
  int64_t iteration = 0;  // update() calls before this one (restored with the state dict)
  bool skipped = false;   // a gradient held inf/NaN: no optimizer stepped
  double scale = 0.0;     // the scale update() left
  // Skipped steps: the parameters whose gradients held inf/NaN, by name where set_parameter_names
  // gave one, else "parameter <index> <shape>" (the optimizer's numbering). Empty when the flag was
  // never read on the host (a device without limits or host_overflow_check), or when only another
  // rank's gradients overflowed (data parallel).
  std::vector<std::string> overflowing;
};

// Named arguments: `GradScaler({.init_scale = 1024, .growth_interval = 100})`; torch.amp.GradScaler's defaults.
// The fields after `enabled` are mixprec's telemetry and opt-in limits (off by default).
struct GradScalerOptions {
  double init_scale = 65536.0, growth_factor = 2.0, backoff_factor = 0.5;
  int64_t growth_interval = 2000;
  bool enabled = true;
  double min_scale = 0.0;                                          // 0: none. Else the floor; an overflow there is an Error
  double max_scale = std::numeric_limits<double>::infinity();     // growth never passes it
  int64_t hysteresis = 1;                                          // back off at the N-th overflow (DeepSpeed/Megatron)
  bool consecutive_hysteresis = false;                             // a clean step refills the hysteresis (DeepSpeed's flag)
  int64_t history_length = 1000;                                   // records kept by history(); 0: none
  bool host_overflow_check = false;                                // device: read the flag each step, to name overflows
};

class GradScaler {
 public:
  enum class OptState { READY, UNSCALED, STEPPED };

  explicit GradScaler(const GradScalerOptions& o)
      : GradScaler(o.init_scale, o.growth_factor, o.backoff_factor, o.growth_interval, o.enabled) {
    limits_ = {o.min_scale, o.max_scale, o.hysteresis, o.consecutive_hysteresis};
    hysteresis_left_ = o.hysteresis;
    history_length_ = o.history_length;
    host_overflow_check_ = o.host_overflow_check;
    MIXPREC_CHECK(o.hysteresis >= 1 && o.history_length >= 0, "GradScaler: need hysteresis >= 1 and history_length >= 0, got ",
                  o.hysteresis, " and ", o.history_length);
    MIXPREC_CHECK(std::isfinite(o.min_scale) && o.min_scale >= 0.0 && o.max_scale > 0.0 && o.min_scale <= o.max_scale &&
                      (o.min_scale == 0.0 || o.min_scale <= o.init_scale),
                  "GradScaler: need 0 <= min_scale <= init_scale and min_scale <= max_scale, got min_scale ", o.min_scale,
                  ", max_scale ", o.max_scale, ", init_scale ", o.init_scale);
  }

  explicit GradScaler(double init_scale = 65536.0, double growth_factor = 2.0, double backoff_factor = 0.5,
                      int64_t growth_interval = 2000, bool enabled = true)
      : enabled_(enabled),
        init_scale_(init_scale),
        growth_factor_(growth_factor),
        backoff_factor_(backoff_factor),
        growth_interval_(growth_interval) {
    if (enabled_) {
      MIXPREC_CHECK(growth_factor > 1.0, "GradScaler: The growth factor must be > 1.0. (got ", growth_factor, ")");
      MIXPREC_CHECK(backoff_factor < 1.0, "GradScaler: The backoff factor must be < 1.0. (got ", backoff_factor, ")");
    }
  }

  // loss * scale (float32 scale; a 16-bit loss gives a float32 result). Returned as is when disabled.
  Tensor scale(const Tensor& outputs) {
    if (!enabled_) return outputs;
    lazy_init();
    return mul(outputs, scale_on(outputs.device()));
  }
  std::vector<Tensor> scale(const std::vector<Tensor>& outputs) {
    if (!enabled_) return outputs;
    std::vector<Tensor> out;
    out.reserve(outputs.size());
    for (const Tensor& t : outputs) out.push_back(scale(t));
    return out;
  }

  // Divides the optimizer's gradients by the scale and records whether any was inf/NaN.
  void unscale_(optim::Optimizer& optimizer) {
    if (!enabled_) return;
    check_scale_growth_tracker("unscale_");
    PerOptimizer& st = states_[&optimizer];
    MIXPREC_CHECK(st.stage != OptState::UNSCALED, "unscale_() has already been called on this optimizer since the last update().");
    MIXPREC_CHECK(st.stage != OptState::STEPPED, "unscale_() is being called after step().");
    no_grad guard;
    std::vector<optim::Optimizer::GradSlot> slots = optimizer.grad_slots();
    const Device dev = slots.empty() ? Device::CPU : slots.front().grad.device();
    for (const auto& s : slots)
      MIXPREC_CHECK(s.grad.device() == dev, "GradScaler.unscale_: the optimizer's gradients are on ", dev, " and ", s.grad.device(),
                    "; unscale them with one GradScaler call per device's optimizer");
    st.flag = Tensor();
    st.found_inf = false;
    st.overflowing.clear();
    if (slots.empty()) {
      // Nothing to unscale, but a reducer is a collective (data parallel): this rank still joins it.
      if (found_inf_reducer_) st.found_inf = found_inf_reducer_(false);
      if (found_inf_flag_reducer_) {
        const Tensor none = zeros({}, DType::Float32, device_);
        found_inf_flag_reducer_(none);
        if (device_ == Device::CPU) st.found_inf = *none.data<float>() != 0.0f;
      }
      st.known = true;
    } else {  // one fused call over all gradients; on a device the flag stays there
      std::vector<Tensor> grads, masters;
      for (const auto& s : slots) {
        grads.push_back(s.grad);
        masters.push_back(s.master_grad);
      }
      const char* op = "GradScaler.unscale_";
      const auto kernel = ::mixprec::detail::device_kernel(op, grads.front(), &DeviceKernels::unscale);
      const Tensor scale = scale_on(dev);
      st.flag = zeros({}, DType::Float32, dev);
      kernel(grads, masters, scale, st.flag);
      if (found_inf_flag_reducer_) found_inf_flag_reducer_(st.flag);  // all ranks' flags, on the device
      // The flag is read here on the CPU (host memory), and on a device only where the host must
      // decide: a reducer, a limit or host_overflow_check. Its value alone is waited for.
      const bool read = dev == Device::CPU || found_inf_reducer_ || host_check();
      const bool local = read && (dev == Device::CPU ? *st.flag.data<float>() != 0.0f : st.flag.item<float>() != 0.0f);
      st.found_inf = local;
      if (found_inf_reducer_) {  // a host function: the one read-back this makes on a device
        st.found_inf = found_inf_reducer_(local);
        st.flag.fill_(st.found_inf ? 1.0 : 0.0);
      }
      st.known = read;
      if (local) st.overflowing = overflowing_parameters(slots);  // only on a skipped step
    }
    for (const auto& s : slots) {
      s.grad.bump_version();
      if (s.master_grad.defined()) optimizer.mark_master_grad_current(s.index);
    }
    st.recorded = !slots.empty();
    st.stage = OptState::UNSCALED;
  }

  // Unscales (unless unscale_ was called) and runs optimizer.step() unless a gradient was
  // inf/NaN. Returns whether the optimizer stepped; with device gradients the optimizer's kernels
  // skip on the device flag, and the result reads it only when converted to bool (StepResult).
  StepResult step(optim::Optimizer& optimizer) {
    if (!enabled_) {
      optimizer.step();
      return true;
    }
    check_scale_growth_tracker("step");
    PerOptimizer& st = states_[&optimizer];
    MIXPREC_CHECK(st.stage != OptState::STEPPED, "step() has already been called since the last update().");
    if (st.stage == OptState::READY) unscale_(optimizer);
    MIXPREC_CHECK(st.recorded, "No inf checks were recorded for this optimizer.");
    st.stage = OptState::STEPPED;
    if (st.flag.defined() && st.flag.device() != Device::CPU) {
      optimizer.step(st.flag);
      return StepResult(st.flag);
    }
    // The CPU's flag is read here (host memory): a skipped step does not call the optimizer.
    const bool stepped = !st.found_inf;
    if (stepped) optimizer.step();
    return stepped;
  }

  // Backs the scale off if any optimizer saw inf/NaN since the last update, else counts a
  // clean step and grows the scale after growth_interval of them (never to inf). With limits,
  // GradScalerOptions' rule instead; an overflow with the scale already at min_scale throws
  // (after recording the step and ending the iteration). Either way the iteration is recorded in
  // history(), and a PrecisionTrace with auto-pin on this thread is advanced one step.
  MIXPREC_OUTLINE void update();
  // Sets the scale (stored as float32) and starts a new iteration. A manual override: not counted
  // in steps_taken()/skipped_steps() nor recorded in history().
  void update(double new_scale) {
    advance_trace();
    if (!enabled_) return;
    check_scale_growth_tracker("update");
    scale_ = static_cast<float>(new_scale);
    if (device_ != Device::CPU) fill_device(scale_dev_, scale_);
    states_.clear();
  }

  // ---- Telemetry ----
  // Names for the report of overflowing parameters, e.g. set_parameter_names(model.named_parameters()).
  // Keyed by the tensor itself: any optimizer holding it, any param group. Later calls add to them.
  void set_parameter_names(const std::vector<std::pair<std::string, Tensor>>& named) {
    for (const auto& [n, t] : named)
      if (t.defined()) names_[t.impl()] = {t.impl_ptr(), n};
  }
  // update() calls whose optimizers stepped (skipped_steps() counts the others). Reads a device's
  // skip count (waits for it).
  int64_t steps_taken() const { return enabled_ ? updates_ - skipped_steps() : 0; }
  // The last history_length update() calls, oldest first (a device's flags and scales are read now).
  std::vector<ScalerRecord> history() const {
    std::vector<ScalerRecord> out;
    out.reserve(history_.size());
    for (Pending& p : history_) {
      if (p.scale.defined()) {
        p.rec.scale = static_cast<double>(p.scale.item<float>());
        p.scale = Tensor();
      }
      for (const Tensor& f : p.flags) p.rec.skipped |= f.item<float>() != 0.0f;
      p.flags.clear();
      out.push_back(p.rec);
    }
    return out;
  }
  // The parameters whose gradients held inf/NaN at the last skipped step that named any.
  const std::vector<std::string>& last_overflowing() const { return last_overflowing_; }
  // The counters for a checkpoint (io/checkpoint.hpp saves them beside state_dict(), which keeps
  // PyTorch's keys): update() calls and skipped steps.
  std::map<std::string, double> counters_state_dict() const {
    if (!enabled_) return {};
    return {{"updates", static_cast<double>(updates_)}, {"skipped_steps", static_cast<double>(skipped_steps())}};
  }
  void load_counters_state_dict(const std::map<std::string, double>& sd) {
    if (!enabled_ || sd.empty()) return;
    MIXPREC_CHECK(sd.count("updates") && sd.count("skipped_steps"), "GradScaler.load_counters_state_dict: need keys 'updates' and 'skipped_steps'");
    const double u = sd.at("updates"), k = sd.at("skipped_steps");
    MIXPREC_CHECK(u >= 0 && u <= 1e15 && u == std::floor(u) && k >= 0 && k <= u && k == std::floor(k),
                  "GradScaler.load_counters_state_dict: need integers 0 <= skipped_steps <= updates, got ", k, " and ", u);
    updates_ = static_cast<int64_t>(u);
    skipped_ = static_cast<int64_t>(k);
    if (device_ != Device::CPU) fill_device(skipped_dev_, 0.0);
    history_.clear();
  }
  const detail::ScaleLimits& limits() const { return limits_; }
  // Overflows still allowed before the scale backs off (hysteresis, counting down to 1).
  int64_t hysteresis_left() const { return hysteresis_left_; }

  // The current scale; 1.0 when disabled. A scale on a device is read from there (waits for it).
  double get_scale() const {
    if (!enabled_) return 1.0;
    if (!initialized_) return init_scale_;
    return device_ == Device::CPU ? static_cast<double>(scale_) : static_cast<double>(scale_dev_.item<float>());
  }
  int64_t get_growth_tracker() const {
    if (!enabled_) return 0;
    if (!initialized_) return init_growth_tracker_;
    return device_ == Device::CPU ? growth_tracker_ : tracker_dev_.item<int64_t>();
  }
  // update() calls whose step was skipped because a gradient was inf/NaN (with hysteresis, not
  // every one backed the scale off).
  int64_t skipped_steps() const { return device_ == Device::CPU ? skipped_ : skipped_ + skipped_dev_.item<int64_t>(); }
  // Where the scale lives: the CPU, or the device of the first scaled or unscaled device tensor.
  Device device() const { return device_; }
  // The device scale (float32 []) and growth tracker (int64 []); undefined while on the CPU.
  const Tensor& scale_tensor() const { return scale_dev_; }
  double get_growth_factor() const { return growth_factor_; }
  void set_growth_factor(double f) { growth_factor_ = f; }
  double get_backoff_factor() const { return backoff_factor_; }
  void set_backoff_factor(double f) { backoff_factor_ = f; }
  int64_t get_growth_interval() const { return growth_interval_; }
  void set_growth_interval(int64_t n) { growth_interval_ = n; }
  bool is_enabled() const { return enabled_; }

  // unscale_ passes each optimizer's found-inf flag through `reducer` and acts on its result.
  // Data-parallel training installs an all-reduce (max) here (distributed::all_reduce_found_inf)
  // so that every rank skips the same steps and keeps the same scale.
  void set_found_inf_reducer(std::function<bool(bool)> reducer) { found_inf_reducer_ = std::move(reducer); }
  // The same on the flag itself (float32 [] on the gradients' device, or the scale's device when
  // this optimizer has no gradients), reduced in place where it lives: no host read on a device.
  void set_found_inf_flag_reducer(std::function<void(const Tensor&)> reducer) { found_inf_flag_reducer_ = std::move(reducer); }

  // Where this iteration stands for `optimizer`, and whether its gradients had inf/NaN.
  OptState stage(const optim::Optimizer& optimizer) const {
    auto it = states_.find(&optimizer);
    return it == states_.end() ? OptState::READY : it->second.stage;
  }
  // A device flag is read from the device (waits for it).
  bool found_inf(const optim::Optimizer& optimizer) const {
    auto it = states_.find(&optimizer);
    if (it == states_.end()) return false;
    const PerOptimizer& st = it->second;
    return st.flag.defined() && st.flag.device() != Device::CPU ? st.flag.item<float>() != 0.0f : st.found_inf;
  }

  // Keys: scale, growth_factor, backoff_factor, growth_interval, _growth_tracker (PyTorch's);
  // with a limit set also min_scale, max_scale, hysteresis, consecutive_hysteresis and
  // _hysteresis_tracker. Empty when disabled. The counters have counters_state_dict().
  std::map<std::string, double> state_dict() const {
    if (!enabled_) return {};
    std::map<std::string, double> sd{{"scale", get_scale()},
                                     {"growth_factor", growth_factor_},
                                     {"backoff_factor", backoff_factor_},
                                     {"growth_interval", static_cast<double>(growth_interval_)},
                                     {"_growth_tracker", static_cast<double>(get_growth_tracker())}};
    if (limits_.active()) {
      sd["min_scale"] = limits_.min_scale;
      sd["max_scale"] = limits_.max_scale;
      sd["hysteresis"] = static_cast<double>(limits_.hysteresis);
      sd["consecutive_hysteresis"] = limits_.consecutive_hysteresis ? 1.0 : 0.0;
      sd["_hysteresis_tracker"] = static_cast<double>(hysteresis_left_);
    }
    return sd;
  }
  // A state dict without the limit keys (PyTorch's, or saved without limits) keeps this scaler's
  // limits and starts its hysteresis afresh.
  void load_state_dict(const std::map<std::string, double>& sd) {
    if (!enabled_) return;
    MIXPREC_CHECK(!sd.empty(),
                  "The source state dict is empty, possibly because it was saved from a disabled instance of GradScaler.");
    for (const char* k : {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"})
      MIXPREC_CHECK(sd.count(k), "GradScaler.load_state_dict: missing key '", k, "'");
    // A state dict read from a file is untrusted: NaN or 1e300 cast to int64 is undefined behaviour.
    const double scale = sd.at("scale"), growth = sd.at("growth_factor"), backoff = sd.at("backoff_factor");
    const double interval = sd.at("growth_interval"), tracker = sd.at("_growth_tracker");
    MIXPREC_CHECK(std::isfinite(scale) && scale > 0, "GradScaler.load_state_dict: scale must be positive and finite, got ", scale);
    MIXPREC_CHECK(std::isfinite(growth) && growth > 1.0 && backoff > 0.0 && backoff < 1.0,
                  "GradScaler.load_state_dict: need growth_factor > 1 and 0 < backoff_factor < 1, got ", growth, " and ", backoff);
    MIXPREC_CHECK(interval >= 1 && interval <= 1e15 && interval == std::floor(interval) && tracker >= 0 &&
                      tracker < interval && tracker == std::floor(tracker),
                  "GradScaler.load_state_dict: need an integer growth_interval >= 1 and 0 <= _growth_tracker < "
                  "growth_interval, got ", interval, " and ", tracker);
    detail::ScaleLimits lim = limits_;
    int64_t left = limits_.hysteresis;
    if (sd.count("hysteresis")) {
      for (const char* k : {"min_scale", "max_scale", "consecutive_hysteresis", "_hysteresis_tracker"})
        MIXPREC_CHECK(sd.count(k), "GradScaler.load_state_dict: missing key '", k, "' (saved with 'hysteresis')");
      const double h = sd.at("hysteresis"), lo = sd.at("min_scale"), hi = sd.at("max_scale"), hl = sd.at("_hysteresis_tracker");
      MIXPREC_CHECK(h >= 1 && h <= 1e15 && h == std::floor(h) && hl >= 1 && hl <= h && hl == std::floor(hl),
                    "GradScaler.load_state_dict: need integers 1 <= _hysteresis_tracker <= hysteresis, got ", hl, " and ", h);
      MIXPREC_CHECK(std::isfinite(lo) && lo >= 0 && hi > 0 && lo <= hi, "GradScaler.load_state_dict: need 0 <= min_scale <= max_scale, got ",
                    lo, " and ", hi);
      lim = {lo, hi, static_cast<int64_t>(h), sd.at("consecutive_hysteresis") != 0.0};
      left = static_cast<int64_t>(hl);
    }
    limits_ = lim;
    hysteresis_left_ = left;
    init_scale_ = sd.at("scale");
    growth_factor_ = sd.at("growth_factor");
    backoff_factor_ = sd.at("backoff_factor");
    growth_interval_ = static_cast<int64_t>(sd.at("growth_interval"));
    init_growth_tracker_ = static_cast<int64_t>(sd.at("_growth_tracker"));
    if (initialized_) {
      scale_ = static_cast<float>(init_scale_);
      growth_tracker_ = init_growth_tracker_;
      if (device_ != Device::CPU) {
        fill_device(scale_dev_, scale_);
        fill_device(tracker_dev_, static_cast<double>(growth_tracker_));
      }
    }
  }

 private:
  struct PerOptimizer {
    OptState stage = OptState::READY;
    bool found_inf = false;  // the flag's value where the host read it (known), else false
    bool known = false;      // the host read the flag: always on the CPU
    Tensor flag;             // float32 [] on the gradients' device, set by their unscale kernel
    bool recorded = false;   // unscale_ saw at least one gradient
    std::vector<std::string> overflowing;  // this optimizer's parameters with inf/NaN gradients
  };
  // A history record; on a device its flags (unread) and scale are read when history() is asked for.
  struct Pending {
    ScalerRecord rec;
    std::vector<Tensor> flags;
    Tensor scale;
  };

  bool host_check() const { return limits_.active() || host_overflow_check_; }
  void record(bool found, std::vector<std::string> overflowing, std::vector<Tensor> unread, double scale, Tensor scale_dev) {
    const int64_t iteration = updates_++;
    if (history_length_ == 0) return;
    history_.push_back({{iteration, found, scale, std::move(overflowing)}, std::move(unread), std::move(scale_dev)});
    while (static_cast<int64_t>(history_.size()) > history_length_) history_.pop_front();
  }
  static void advance_trace() {
    if (PrecisionTrace* t = detail::active_trace(); t && t->auto_pin_enabled()) t->step();
  }
  static std::string describe(const std::vector<std::string>& names) {
    if (names.empty()) return "none on this rank";
    std::string out;
    for (const std::string& n : names) out += (out.empty() ? "" : ", ") + n;
    return out;
  }
  // The parameters whose gradients (their float32 master where there is one: what the unscale
  // kernel checked) hold inf/NaN. Runs only on a step with the flag set; a device's gradients are
  // copied to the host for it.
  MIXPREC_OUTLINE std::vector<std::string> overflowing_parameters(const std::vector<optim::Optimizer::GradSlot>& slots) const;

  static void fill_device(const Tensor& t, double v) {
    ::mixprec::detail::device_kernel("GradScaler", t, &DeviceKernels::fill)(t, v);
  }
  // The scale as a float32 [] tensor on `d`. The first device asked for takes the scale there
  // (fill kernels: nothing is uploaded); a CPU caller of a device scale reads it back.
  Tensor scale_on(Device d) {
    if (device_ == Device::CPU && d != Device::CPU) {
      scale_dev_ = full({}, scale_, DType::Float32, d);
      tracker_dev_ = full({}, static_cast<double>(growth_tracker_), DType::Int64, d);
      skipped_dev_ = zeros({}, DType::Int64, d);
      device_ = d;
    }
    if (d == device_) return device_ == Device::CPU ? scalar_tensor(scale_, DType::Float32) : scale_dev_;
    MIXPREC_CHECK(d == Device::CPU, "GradScaler: the scale lives on ", device_, "; tensors on ", d,
                  " need a GradScaler of their own");
    return scalar_tensor(scale_dev_.item<float>(), DType::Float32);
  }

  // As PyTorch, the scale comes to life at the first scale() call.
  void lazy_init() {
    if (initialized_) return;
    scale_ = static_cast<float>(init_scale_);
    growth_tracker_ = init_growth_tracker_;
    initialized_ = true;
  }
  void check_scale_growth_tracker(const char* fn) const {
    MIXPREC_CHECK(initialized_, "Attempted ", fn,
                  " but _scale is None.  This may indicate your script did not use scaler.scale(loss or outputs) earlier "
                  "in the iteration.");
  }

  bool enabled_;
  double init_scale_;
  double growth_factor_;
  double backoff_factor_;
  int64_t growth_interval_;
  int64_t init_growth_tracker_ = 0;
  bool initialized_ = false;
  float scale_ = 0.0f;  // float32, as PyTorch's scale tensor
  int64_t growth_tracker_ = 0;
  int64_t skipped_ = 0;
  Device device_ = Device::CPU;
  Tensor scale_dev_, tracker_dev_, skipped_dev_;  // on device_ when that is not the CPU
  std::unordered_map<const optim::Optimizer*, PerOptimizer> states_;
  std::function<bool(bool)> found_inf_reducer_;
  std::function<void(const Tensor&)> found_inf_flag_reducer_;
  // Limits and telemetry (GradScalerOptions).
  detail::ScaleLimits limits_;
  int64_t hysteresis_left_ = 1;
  int64_t history_length_ = 1000;
  bool host_overflow_check_ = false;
  int64_t updates_ = 0;  // update() calls (not update(new_scale))
  mutable std::deque<Pending> history_;
  std::vector<std::string> last_overflowing_;
  std::unordered_map<const TensorImpl*, std::pair<std::weak_ptr<TensorImpl>, std::string>> names_;
};

#if MIXPREC_HEADER_DEFINITIONS  // out of line in the compiled mode (core/config.hpp)
MIXPREC_OUTLINE void GradScaler::update() {
  advance_trace();
  if (!enabled_) return;
  check_scale_growth_tracker("update");
  bool any_recorded = false;
  for (const auto& [opt, st] : states_) any_recorded |= st.recorded;
  MIXPREC_CHECK(any_recorded, "No inf checks were recorded prior to update.");
  // What the host knows of this iteration: every flag it read, the parameters found with them.
  bool known = true, found = false;
  std::vector<std::string> overflowing;
  std::vector<Tensor> unread;
  for (const auto& [opt, st] : states_) {
    if (!st.recorded) continue;
    known &= st.known;
    found |= st.known && st.found_inf;
    if (!st.known) unread.push_back(st.flag);
    overflowing.insert(overflowing.end(), st.overflowing.begin(), st.overflowing.end());
  }
  if (!overflowing.empty()) last_overflowing_ = overflowing;
  const char* op = "GradScaler.update";
  if (limits_.active()) {  // the host's rule: the flags were read in unscale_ (host_check)
    for (const Tensor& f : unread) found |= f.item<float>() != 0.0f;
    float scale = device_ == Device::CPU ? scale_ : scale_dev_.item<float>();
    int64_t tracker = device_ == Device::CPU ? growth_tracker_ : tracker_dev_.item<int64_t>();
    const detail::ScaleChange change = detail::update_scale_limited(scale, tracker, hysteresis_left_, found, growth_factor_,
                                                                    backoff_factor_, growth_interval_, limits_);
    if (device_ == Device::CPU) {
      scale_ = scale;
      growth_tracker_ = tracker;
    } else {
      fill_device(scale_dev_, scale);
      fill_device(tracker_dev_, static_cast<double>(tracker));
    }
    skipped_ += found;
    record(found, std::move(overflowing), {}, scale, Tensor());
    states_.clear();
    MIXPREC_CHECK(change != detail::ScaleChange::AtMinimum, "GradScaler.update: Current loss scale already at minimum (min_scale ",
                  limits_.min_scale, ") - cannot decrease scale anymore: the gradients overflowed again at iteration ",
                  updates_ - 1, ". Gradients holding inf/NaN: ", describe(last_overflowing_),
                  ". Look for the op that overflows (amp::PrecisionTrace), or run that part in float32");
    return;
  }
  // Every optimizer's flag on the scale's device (a flag on the CPU is copied as a fill).
  std::vector<Tensor> flags;
  for (const auto& [opt, st] : states_) {
    if (!st.recorded) continue;
    flags.push_back(st.flag.device() == device_ ? st.flag : full({}, st.found_inf ? 1.0 : 0.0, DType::Float32, device_));
  }
  if (device_ == Device::CPU) {  // the members themselves, viewed as tensors for the CPU's kernel
    const Tensor scale = from_blob(&scale_, {}, DType::Float32), tracker = from_blob(&growth_tracker_, {}, DType::Int64),
                 skipped = from_blob(&skipped_, {}, DType::Int64);
    ::mixprec::detail::device_kernel(op, scale, &DeviceKernels::update_scale)(scale, tracker, flags, growth_factor_, backoff_factor_,
                                                                             growth_interval_, skipped);
    record(found, std::move(overflowing), {}, scale_, Tensor());
  } else {
    ::mixprec::detail::device_kernel(op, scale_dev_, &DeviceKernels::update_scale)(
        scale_dev_, tracker_dev_, flags, growth_factor_, backoff_factor_, growth_interval_, skipped_dev_);
    // The history's scale and (unread) flags stay on the device until history() is asked for.
    if (history_length_ > 0) record(found, std::move(overflowing), std::move(unread), 0.0, scale_dev_.clone());
    else ++updates_;
  }
  states_.clear();
}

MIXPREC_OUTLINE std::vector<std::string> GradScaler::overflowing_parameters(const std::vector<optim::Optimizer::GradSlot>& slots) const {
  std::vector<std::string> out;
  for (const auto& s : slots) {
    Tensor g = s.master_grad.defined() ? s.master_grad : s.grad;
    if (g.device() != Device::CPU) g = g.cpu();
    bool bad = false;
    dispatch_floating(g.dtype(), "GradScaler.unscale_", [&]<class T>() {
      const Tensor c = g.contiguous();
      const T* p = c.data<T>();
      for (int64_t i = 0, n = c.numel(); i < n && !bad; ++i) bad = !std::isfinite(static_cast<double>(static_cast<acc_t<T>>(p[i])));
    });
    if (!bad) continue;
    auto it = names_.find(s.param.impl());
    if (it != names_.end() && !it->second.first.expired()) {
      out.push_back(it->second.second);
    } else {
      std::ostringstream os;
      ::mixprec::detail::stream_all(os, "parameter ", s.index, ' ', s.param.sizes());
      out.push_back(os.str());
    }
  }
  return out;
}
#endif  // MIXPREC_HEADER_DEFINITIONS

}  // namespace mixprec::amp
