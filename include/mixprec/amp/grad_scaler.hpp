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
#include <bit>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <unordered_map>

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

}  // namespace detail

// Named arguments: `GradScaler({.init_scale = 1024, .growth_interval = 100})`; torch.amp.GradScaler's defaults.
struct GradScalerOptions {
  double init_scale = 65536.0, growth_factor = 2.0, backoff_factor = 0.5;
  int64_t growth_interval = 2000;
  bool enabled = true;
};

class GradScaler {
 public:
  enum class OptState { READY, UNSCALED, STEPPED };

  explicit GradScaler(const GradScalerOptions& o)
      : GradScaler(o.init_scale, o.growth_factor, o.backoff_factor, o.growth_interval, o.enabled) {}

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
    if (slots.empty()) {
      // Nothing to unscale, but a reducer is a collective (data parallel): this rank still joins it.
      if (found_inf_reducer_) st.found_inf = found_inf_reducer_(false);
      if (found_inf_flag_reducer_) {
        const Tensor none = zeros({}, DType::Float32, device_);
        found_inf_flag_reducer_(none);
        if (device_ == Device::CPU) st.found_inf = *none.data<float>() != 0.0f;
      }
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
      if (found_inf_flag_reducer_) found_inf_flag_reducer_(st.flag);  // stays on the device
      if (found_inf_reducer_) {  // a host function: the one read-back this makes on a device
        const bool found = found_inf_reducer_(st.flag.item<float>() != 0.0f);
        st.flag.fill_(found ? 1.0 : 0.0);
      }
      if (dev == Device::CPU) st.found_inf = *st.flag.data<float>() != 0.0f;  // host memory: known at once
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
  // clean step and grows the scale after growth_interval of them (never to inf).
  void update() {
    if (!enabled_) return;
    check_scale_growth_tracker("update");
    bool any_recorded = false;
    for (const auto& [opt, st] : states_) any_recorded |= st.recorded;
    MIXPREC_CHECK(any_recorded, "No inf checks were recorded prior to update.");
    // Every optimizer's flag on the scale's device (a flag on the CPU is copied as a fill).
    std::vector<Tensor> flags;
    for (const auto& [opt, st] : states_) {
      if (!st.recorded) continue;
      flags.push_back(st.flag.device() == device_ ? st.flag : full({}, st.found_inf ? 1.0 : 0.0, DType::Float32, device_));
    }
    const char* op = "GradScaler.update";
    if (device_ == Device::CPU) {  // the members themselves, viewed as tensors for the CPU's kernel
      const Tensor scale = from_blob(&scale_, {}, DType::Float32), tracker = from_blob(&growth_tracker_, {}, DType::Int64),
                   skipped = from_blob(&skipped_, {}, DType::Int64);
      ::mixprec::detail::device_kernel(op, scale, &DeviceKernels::update_scale)(scale, tracker, flags, growth_factor_, backoff_factor_,
                                                                               growth_interval_, skipped);
    } else {
      ::mixprec::detail::device_kernel(op, scale_dev_, &DeviceKernels::update_scale)(
          scale_dev_, tracker_dev_, flags, growth_factor_, backoff_factor_, growth_interval_, skipped_dev_);
    }
    states_.clear();
  }
  // Sets the scale (stored as float32) and starts a new iteration.
  void update(double new_scale) {
    if (!enabled_) return;
    check_scale_growth_tracker("update");
    scale_ = static_cast<float>(new_scale);
    if (device_ != Device::CPU) fill_device(scale_dev_, scale_);
    states_.clear();
  }

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
  // Iterations whose update() backed off because a gradient was inf/NaN (their steps were skipped).
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

  // Keys: scale, growth_factor, backoff_factor, growth_interval, _growth_tracker; empty when disabled.
  std::map<std::string, double> state_dict() const {
    if (!enabled_) return {};
    return {{"scale", get_scale()},
            {"growth_factor", growth_factor_},
            {"backoff_factor", backoff_factor_},
            {"growth_interval", static_cast<double>(growth_interval_)},
            {"_growth_tracker", static_cast<double>(get_growth_tracker())}};
  }
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
    bool found_inf = false;  // the flag's value, where it is on the CPU (read at once: host memory)
    Tensor flag;             // float32 [] on the gradients' device, set by their unscale kernel
    bool recorded = false;   // unscale_ saw at least one gradient
  };

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
};

}  // namespace mixprec::amp
