#pragma once
// CapturedStep: a whole training step -- forward, backward, GradScaler and optimizer -- recorded
// once into a device graph (a CUDA graph) and replayed, so a step costs one launch of host work
// instead of hundreds; what makes small models fast. (mixprec::gpu::CapturedStep is this class.)
//
//   CapturedStep step([&](const std::vector<Tensor>& in) {
//     opt.zero_grad();
//     Tensor loss;
//     { autocast ac(Device::CUDA, DType::BFloat16); loss = cross_entropy(model.forward(in[0]), in[1]); }
//     scaler.scale(loss).backward();
//     scaler.step(opt);
//     scaler.update();
//     return loss;
//   });
//   for (auto& [x, y] : loader) { const Tensor loss = step({x, y}); if (log) print(loss.item<float>()); }
//
// The first `warmup` calls run the function eagerly (lazy state: optimizer moments, cuBLAS/cuDNN
// plans, the scaler's device tensors); the next one records it and replays it; later calls only
// replay. Each call first copies its inputs (CPU or device tensors of the first call's shapes and
// dtypes) into static device buffers the graph reads. The loss is a static device tensor the
// graph rewrites: read it only when you log. Nothing in the step may wait for the host: a host
// read (item(), cpu()) or an upload while recording is refused with an Error; GradScaler's skip
// and scale changes, the optimizer's step counts and dropout's seeds live on the device, so they
// stay right on every replay. What the host does once at capture stays as it was then: the
// learning rate and other hyper-parameters (a new value needs a new CapturedStep), the Generator
// (advanced once: replays draw new dropout masks from the replay number instead), and the
// host-side bookkeeping (GradScaler::found_inf and step counts read the device when asked).
// Tensors the step reads must outlive it -- parameters, optimizer state and the static buffers do.
#include <functional>
#include <memory>
#include <vector>

#include "mixprec/autograd/grad_mode.hpp"
#include "mixprec/ops/tensor_ops.hpp"

namespace mixprec {

class CapturedStep {
 public:
  using StepFn = std::function<Tensor(const std::vector<Tensor>& inputs)>;

  explicit CapturedStep(StepFn step, Device device = Device::CUDA, int warmup = 1)
      : fn_(std::move(step)), device_(device), warmup_(warmup) {
    MIXPREC_CHECK(fn_ != nullptr, "CapturedStep: no step function");
    MIXPREC_CHECK(device != Device::CPU, "CapturedStep: graphs record device work; got device ", device);
    MIXPREC_CHECK(warmup >= 0, "CapturedStep: warmup must be >= 0, got ", warmup);
  }
  CapturedStep(const CapturedStep&) = delete;
  CapturedStep& operator=(const CapturedStep&) = delete;

  // One step on `inputs`; returns the loss on the device (the static output once captured).
  Tensor operator()(const std::vector<Tensor>& inputs) {
    check_inputs(inputs);  // before anything changes: a refused call leaves every buffer as it was
    copy_in(inputs);
    if (calls_++ < warmup_) return loss_ = run_eagerly();
    if (!graph_) capture();
    replay();
    return loss_;
  }

  bool captured() const { return graph_ != nullptr; }
  int64_t replays() const { return replays_; }
  int64_t calls() const { return calls_; }
  const std::vector<Tensor>& static_inputs() const { return static_; }
  // The last step's loss (a device tensor; the graph's static output once captured).
  const Tensor& loss() const { return loss_; }

 private:
  void check_inputs(const std::vector<Tensor>& inputs) const {
    for (std::size_t i = 0; i < inputs.size(); ++i)
      MIXPREC_CHECK(inputs[i].defined() && (inputs[i].device() == Device::CPU || inputs[i].device() == device_),
                    "CapturedStep: input ", i, " must be a defined tensor on the CPU or ", device_);
    if (static_.empty()) return;
    MIXPREC_CHECK(inputs.size() == static_.size(), "CapturedStep: got ", inputs.size(), " inputs, the step was set up with ",
                  static_.size());
    for (std::size_t i = 0; i < inputs.size(); ++i)
      MIXPREC_CHECK(inputs[i].sizes() == static_[i].sizes() && inputs[i].dtype() == static_[i].dtype(), "CapturedStep: input ", i,
                    " has shape ", inputs[i].sizes(), " and dtype ", inputs[i].dtype(), "; the step's static buffer is ",
                    static_[i].sizes(), " ", static_[i].dtype(), " (another shape needs another CapturedStep)");
  }

  void copy_in(const std::vector<Tensor>& inputs) {
    no_grad guard;
    if (static_.empty())
      for (const Tensor& t : inputs) static_.push_back(empty(t.sizes(), t.dtype(), device_));
    for (std::size_t i = 0; i < inputs.size(); ++i) static_[i].copy_(inputs[i]);
  }

  Tensor run_eagerly() {
    Tensor loss = fn_(static_);
    check_loss(loss);
    return loss;
  }
  void check_loss(const Tensor& loss) const {
    MIXPREC_CHECK(loss.defined() && loss.device() == device_, "CapturedStep: the step must return its loss as a tensor on ", device_,
                  ", got ", loss.defined() ? std::string(name(loss.device())) : std::string("an undefined tensor"));
  }

  void capture() {
    auto& cs = detail::capture_state();
    MIXPREC_CHECK(cs.depth == 0, "CapturedStep: cannot capture inside another capture");
    const DeviceKernels* k = device_kernels(device_);
    MIXPREC_CHECK(k && k->make_graph, "CapturedStep: no ", device_, " graphs in this program (include <mixprec/cuda.hpp> in a unit nvcc "
                  "compiles)");
    detail::report_device_checks();  // the warm-up's pending errors, before anything is recorded
    std::unique_ptr<DeviceGraph> graph = k->make_graph();
    std::vector<detail::DeviceCheck> outside;
    outside.swap(detail::device_checks());
    graph->begin_capture();
    ++cs.depth;
    cs.replay_counter = graph->replay_counter();
    Tensor loss;
    try {
      loss = fn_(static_);
      check_loss(loss);
    } catch (...) {
      --cs.depth;
      cs.replay_counter = Tensor();
      try {
        graph->end_capture();  // invalidated by the failure: reported by the first error, not this one
      } catch (...) {
      }
      detail::device_checks().swap(outside);
      throw;
    }
    --cs.depth;
    cs.replay_counter = Tensor();
    try {
      graph->end_capture();
    } catch (...) {
      detail::device_checks().swap(outside);
      throw;
    }
    checks_.swap(detail::device_checks());  // the counts the graph rewrites on every replay
    detail::device_checks().swap(outside);
    loss_ = loss;
    graph_ = std::move(graph);
  }

  void replay() {
    graph_->replay();
    ++replays_;
    for (const detail::DeviceCheck& c : checks_) detail::add_device_check(c.count, c.what, /*copy=*/true);
  }

  StepFn fn_;
  Device device_;
  int warmup_;
  int64_t calls_ = 0, replays_ = 0;
  std::vector<Tensor> static_;
  Tensor loss_;
  std::vector<detail::DeviceCheck> checks_;
  std::unique_ptr<DeviceGraph> graph_;  // last: destroyed first, before the tensors it writes
};

}  // namespace mixprec
