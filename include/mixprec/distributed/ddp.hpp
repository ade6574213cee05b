#pragma once
// DistributedDataParallel: torch.nn.parallel.DistributedDataParallel for CPU and device (CUDA) modules.
//
//   auto pg = std::make_shared<distributed::MpiProcessGroup>();
//   distributed::DistributedDataParallel ddp(*model, pg);      // rank 0's weights everywhere
//   distributed::all_reduce_found_inf(scaler, pg);             // fp16: one loss scale everywhere
//   loader.set_shard(pg->rank(), pg->size(), /*equal_sizes=*/true);
//   for (...) {
//     loss = cross_entropy(ddp.forward(x), y);
//     scaler.scale(loss).backward();                           // gradients averaged over ranks
//     scaler.step(opt); scaler.update();
//   }
//
// Gradients are reduced in buckets of about 25 MB (PyTorch's default), filled in reverse
// parameter order (roughly the order backward produces them). A post-accumulate-grad hook copies
// each gradient into its bucket; a full bucket is all-reduced at once, on the process group's
// communication thread, while backward computes the rest. At the end of backward every bucket is
// waited for and the average is written into .grad().
//
// Buckets are float32 whatever the gradient dtype: 16-bit gradients are widened, summed and
// averaged in float32, and rounded once into the 16-bit .grad().
//
// Device modules (CUDA, with NcclProcessGroup): the buckets are device memory, filled by device
// copies; a full bucket's all-reduce is enqueued on a communication stream of the device
// (DeviceStream) after an event recorded on the compute stream, so it overlaps the rest of
// backward, and at the end of backward the compute stream waits for the communication stream's
// event before averaging (one division and one rounding per gradient, on the device). Neither
// the hooks nor the end of backward wait on the host; nor does forward's buffer broadcast, nor
// the found-inf all-reduce that all_reduce_found_inf installs (on the device flag the fused
// optimizer reads). The one exception: find_unused_parameters reads which parameters got a
// gradient on some rank back to the host.
//
// Gradient accumulation: backward under `auto guard = ddp.no_sync();` only accumulates locally;
// the next backward outside it reduces the accumulated gradients.
#include <algorithm>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "mixprec/amp/grad_scaler.hpp"
#include "mixprec/autograd/engine.hpp"
#include "mixprec/backends/device.hpp"
#include "mixprec/distributed/process_group.hpp"
#include "mixprec/nn/module.hpp"

namespace mixprec::distributed {

struct DDPOptions {
  double bucket_cap_mb = 25.0;          // float32 megabytes (10^6 bytes) per bucket
  bool broadcast_buffers = true;        // forward() first copies rank 0's buffers (BatchNorm statistics)
  bool find_unused_parameters = false;  // allow parameters that get no gradient in a backward
};

class DistributedDataParallel {
 public:
  DistributedDataParallel(nn::Module& module, std::shared_ptr<ProcessGroup> pg, DDPOptions options = {})
      : module_(module), pg_(std::move(pg)), options_(options) {
    MIXPREC_CHECK(pg_ != nullptr, "DistributedDataParallel: null process group");
    MIXPREC_CHECK(options_.bucket_cap_mb > 0, "DistributedDataParallel: bucket_cap_mb must be positive, got ",
                  options_.bucket_cap_mb);
    for (auto& [name, p] : module_.named_parameters()) {
      if (!p.requires_grad()) continue;
      if (params_.empty()) device_ = p.device();
      MIXPREC_CHECK(p.device() == device_ && p.is_contiguous(), "DistributedDataParallel: parameter '", name, "' of shape ",
                    p.sizes(), " on ", p.device(), " must be a contiguous tensor on ", device_,
                    " (the device of the first trainable parameter)");
      names_.push_back(name);
      params_.push_back(p);
    }
    if (device_ != Device::CPU) {
      const DeviceKernels* k = device_kernels(device_);
      MIXPREC_CHECK(k && k->make_stream && k->make_event, "DistributedDataParallel: parameters on ", device_, ", whose backend ",
                    k ? "has no streams and events" : "is not compiled into this program");
      stream_ = k->make_stream();
      comm_done_ = k->make_event();
      buffers_ready_ = k->make_event();
      buffers_done_ = k->make_event();
    }
    check_same_model();
    broadcast_from_rank0(module_.parameters());
    broadcast_from_rank0(module_.buffers());
    build_buckets();
    hooks_.reserve(params_.size());
    for (std::size_t i = 0; i < params_.size(); ++i)
      hooks_.push_back(autograd::register_post_accumulate_grad_hook(params_[i], [this, i](const Tensor&) { on_grad_ready(i); }));
  }
  ~DistributedDataParallel() {
    for (std::size_t i = 0; i < hooks_.size(); ++i) autograd::remove_post_accumulate_grad_hook(params_[i], hooks_[i]);
    wait_all_quietly();
    for (auto& w : buffer_works_) {
      try {
        w->wait();
      } catch (const Error&) {  // reported nowhere else, but a destructor must not throw
      }
    }
  }
  DistributedDataParallel(const DistributedDataParallel&) = delete;
  DistributedDataParallel& operator=(const DistributedDataParallel&) = delete;

  // The module's forward, after sync_buffers() when broadcast_buffers is set.
  Tensor forward(const Tensor& input) {
    if (options_.broadcast_buffers) sync_buffers();
    return module_.forward(input);
  }
  Tensor operator()(const Tensor& input) { return forward(input); }
  // Every rank takes rank 0's buffers. Call it before a forward that does not go through forward().
  void sync_buffers() { broadcast_from_rank0(module_.buffers()); }

  nn::Module& module() { return module_; }
  ProcessGroup& process_group() { return *pg_; }
  std::size_t num_buckets() const { return buckets_.size(); }
  // Parameter indices (into the module's trainable parameters) of bucket b, in fill order.
  const std::vector<std::size_t>& bucket_params(std::size_t b) const { return buckets_.at(b).params; }
  // Buckets whose all-reduce started while backward was still running, in the last reduction.
  std::size_t buckets_started_during_backward() const { return started_in_backward_; }
  // Where parameters, gradients and buckets live; the communication stream on a device (null on the CPU).
  Device device() const { return device_; }
  DeviceStream* comm_stream() const { return stream_.get(); }
  // Float32 bytes all-reduced per synchronised step (the buckets' sizes): each rank sends and
  // receives about 2 (p - 1) / p times this in a ring all-reduce.
  int64_t bytes_per_step() const {
    int64_t n = 0;
    for (const Bucket& b : buckets_) n += b.buffer.numel() * static_cast<int64_t>(sizeof(float));
    return n;
  }

  // While alive, backward accumulates gradients without reducing them (non-final micro-steps).
  class NoSync {
   public:
    explicit NoSync(DistributedDataParallel& d) : d_(&d), prev_(d.require_sync_) { d.require_sync_ = false; }
    ~NoSync() {
      if (d_) d_->require_sync_ = prev_;
    }
    NoSync(NoSync&& o) noexcept : d_(std::exchange(o.d_, nullptr)), prev_(o.prev_) {}
    NoSync(const NoSync&) = delete;
    NoSync& operator=(const NoSync&) = delete;
    NoSync& operator=(NoSync&&) = delete;

   private:
    DistributedDataParallel* d_;
    bool prev_;
  };
  [[nodiscard]] NoSync no_sync() { return NoSync(*this); }

 private:
  struct Bucket {
    std::vector<std::size_t> params;
    Tensor buffer;                 // float32
    std::size_t pending = 0;       // gradients not yet copied in this backward
    std::shared_ptr<Work> work;
    std::unique_ptr<DeviceEvent> filled;  // device: recorded on the compute stream when full
  };

  // Ranks holding different models would exchange meaningless bytes: compare them first.
  void check_same_model() {
    int64_t numel = 0;
    uint64_t h = 1469598103934665603ull;
    auto mix = [&](uint64_t v) { h = (h ^ v) * 1099511628211ull; };
    for (const Tensor& p : params_) {
      numel += p.numel();
      mix(static_cast<uint64_t>(p.dtype()));
      for (int64_t d : p.sizes()) mix(static_cast<uint64_t>(d));
    }
    const int64_t mine[3] = {static_cast<int64_t>(params_.size()), numel, static_cast<int64_t>(h >> 1)};
    Tensor in = empty({3}, DType::Int64);
    std::memcpy(in.data_ptr(), mine, sizeof mine);
    // A device group gathers device tensors (once, at construction: the host may wait here).
    Tensor all_dev = empty({pg_->size(), 3}, DType::Int64, device_);
    pg_->all_gather(all_dev, in.to(device_))->wait();
    const Tensor all = all_dev.cpu();
    const int64_t* a = all.data<int64_t>();
    for (int r = 0; r < pg_->size(); ++r)
      MIXPREC_CHECK(a[3 * r] == mine[0] && a[3 * r + 1] == mine[1] && a[3 * r + 2] == mine[2],
                    "DistributedDataParallel: rank ", r, " has ", a[3 * r], " trainable parameters with ", a[3 * r + 1],
                    " elements, rank ", pg_->rank(), " has ", mine[0], " with ", mine[1],
                    " (or their shapes/dtypes differ): every rank must build the same model");
  }

  void broadcast_from_rank0(const std::vector<Tensor>& tensors) {
    if (pg_->size() == 1 || tensors.empty()) return;
    if (device_ != Device::CPU) {  // on the communication stream, between the compute stream's events
      buffers_ready_->record(nullptr);
      buffers_ready_->block(stream_.get());
      buffer_works_.clear();
      for (const Tensor& t : tensors) buffer_works_.push_back(pg_->broadcast_on(t, 0, stream_.get()));
      buffers_done_->record(stream_.get());
      buffers_done_->block(nullptr);
      return;
    }
    std::vector<std::shared_ptr<Work>> works;
    for (const Tensor& t : tensors) works.push_back(pg_->broadcast(t, 0));
    for (auto& w : works) w->wait();
  }

  void build_buckets() {
    const int64_t cap = std::max<int64_t>(1, static_cast<int64_t>(options_.bucket_cap_mb * 1e6 / sizeof(float)));
    bucket_of_.assign(params_.size(), 0);
    offset_of_.assign(params_.size(), 0);
    Bucket cur;
    int64_t n = 0;
    auto close = [&] {
      if (cur.params.empty()) return;
      cur.buffer = empty({n}, DType::Float32, device_);
      if (device_ != Device::CPU) cur.filled = device_kernels(device_)->make_event();
      buckets_.push_back(std::move(cur));
      cur = Bucket();
      n = 0;
    };
    for (std::size_t k = params_.size(); k-- > 0;) {
      bucket_of_[k] = buckets_.size();
      offset_of_[k] = n;
      cur.params.push_back(k);
      n += params_[k].numel();
      if (n >= cap) close();
    }
    close();
    ready_.assign(params_.size(), false);
  }

  // The float32 slice of param i's bucket, in the parameter's shape.
  Tensor slot(std::size_t i) const {
    const Shape& s = params_[i].sizes();
    return mixprec::detail::make_view(buckets_[bucket_of_[i]].buffer, s, contiguous_strides(s), offset_of_[i]);
  }

  void on_grad_ready(std::size_t i) {
    if (!require_sync_) return;  // one process reduces too (as PyTorch): its steps run the same path
    const uint64_t id = autograd::backward_id();
    if (armed_id_ != id) begin_reduction(id);
    if (ready_[i]) return;
    fill_slot(i);
    if (--buckets_[bucket_of_[i]].pending == 0) launch_ready_buckets(true);
  }

  void begin_reduction(uint64_t id) {
    if (armed_id_ != 0) wait_all_quietly();  // a backward that threw left these behind
    for (Bucket& b : buckets_) {
      b.pending = b.params.size();
      b.work.reset();
    }
    std::fill(ready_.begin(), ready_.end(), false);
    next_launch_ = 0;
    started_in_backward_ = 0;
    armed_id_ = id;
    autograd::queue_callback([this] { finish_reduction(); });
  }

  void fill_slot(std::size_t i) {
    ready_[i] = true;
    const Tensor g = params_[i].grad();
    if (g.defined()) mixprec::detail::copy_kernel(slot(i), g);
    else slot(i).zero_();
  }

  // Buckets start in index order on every rank, so all ranks issue the same collectives in the
  // same order even if their backwards finish parameters in different orders.
  void launch_ready_buckets(bool in_backward) {
    while (next_launch_ < buckets_.size() && buckets_[next_launch_].pending == 0) {
      Bucket& b = buckets_[next_launch_];
      if (device_ != Device::CPU) {  // the copies into it are on the compute stream: order after them
        b.filled->record(nullptr);
        b.filled->block(stream_.get());
        b.work = pg_->all_reduce_on(b.buffer, ReduceOp::Sum, stream_.get());
      } else {
        b.work = pg_->all_reduce(b.buffer, ReduceOp::Sum);
      }
      if (in_backward) ++started_in_backward_;
      ++next_launch_;
    }
  }

  void finish_reduction() {
    // Parameters whose hook did not run contribute what .grad() holds (zeros if none). Their
    // buckets are reduced even when that is an error here, so the other ranks do not wait forever.
    std::vector<std::string> unused;
    for (std::size_t i = 0; i < params_.size(); ++i)
      if (!ready_[i]) {
        unused.push_back(names_[i]);
        fill_slot(i);
        --buckets_[bucket_of_[i]].pending;
      }
    launch_ready_buckets(false);
    if (!unused.empty() && !options_.find_unused_parameters) {
      wait_all_quietly();
      armed_id_ = 0;
      fail("DistributedDataParallel: parameters ", unused, " of rank ", pg_->rank(),
           " received no gradient in this backward; pass DDPOptions{.find_unused_parameters = true} if some "
           "parameters do not take part in every step");
    }
    // Which parameters have a gradient on some rank: the others keep none, as without DDP.
    Tensor used;
    std::shared_ptr<Work> used_work;
    if (options_.find_unused_parameters) {
      used = empty({static_cast<int64_t>(params_.size())}, DType::UInt8);
      for (std::size_t i = 0; i < params_.size(); ++i) used.data<uint8_t>()[i] = params_[i].grad().defined() ? 1 : 0;
      if (device_ != Device::CPU) {  // reduced on the device; read back below (this option's host sync)
        const Tensor used_dev = used.to(device_);
        pg_->all_reduce_on(used_dev, ReduceOp::Max, stream_.get());
        used = used_dev;
      } else {
        used_work = pg_->all_reduce(used, ReduceOp::Max);
      }
    }
    if (device_ != Device::CPU) {
      finish_on_device(used);
      return;
    }
    const float world = static_cast<float>(pg_->size());
    for (Bucket& b : buckets_) {
      b.work->wait();
      b.work.reset();
      float* x = b.buffer.data<float>();
      cpu::parallel_for(0, b.buffer.numel(), kParallelGrain, [&](int64_t lo, int64_t hi) {
        for (int64_t k = lo; k < hi; ++k) x[k] /= world;
      });
    }
    if (used_work) used_work->wait();
    for (std::size_t i = 0; i < params_.size(); ++i) {
      if (used.defined() && used.data<uint8_t>()[i] == 0) continue;
      const Tensor& p = params_[i];
      Tensor g = p.grad();
      if (!g.defined()) {
        g = empty(p.sizes(), p.dtype());
        p.set_grad(g);
      }
      mixprec::detail::copy_kernel(g, slot(i));
      g.bump_version();
    }
    armed_id_ = 0;
  }

  // The device's end of backward: the compute stream waits for the communication stream (not the
  // host), then each bucket is divided by the world size and each gradient rounded from it once.
  void finish_on_device(Tensor used) {
    comm_done_->record(stream_.get());
    comm_done_->block(nullptr);
    if (used.defined()) used = used.cpu();
    const double world = static_cast<double>(pg_->size());
    for (Bucket& b : buckets_) {
      const Tensor avg = mixprec::detail::device_kernel("DistributedDataParallel", b.buffer, &DeviceKernels::binary_scalar)(
          DeviceBinary::Div, b.buffer, world, 1.0, false);
      for (std::size_t i : b.params) {
        if (used.defined() && used.data<uint8_t>()[i] == 0) continue;
        const Tensor& p = params_[i];
        Tensor g = p.grad();
        if (!g.defined()) {
          g = empty(p.sizes(), p.dtype(), device_);
          p.set_grad(g);
        }
        mixprec::detail::copy_kernel(g, mixprec::detail::make_view(avg, p.sizes(), contiguous_strides(p.sizes()), offset_of_[i]));
        g.bump_version();
      }
    }
    armed_id_ = 0;  // the buckets' Works are dropped at the next backward: their order is on the device
  }

  void wait_all_quietly() {
    for (Bucket& b : buckets_) {
      if (!b.work) continue;
      try {
        b.work->wait();
      } catch (const Error&) {  // already failed on its own; nothing is left to undo
      }
      b.work.reset();
    }
  }

  nn::Module& module_;
  std::shared_ptr<ProcessGroup> pg_;
  DDPOptions options_;
  Device device_ = Device::CPU;
  std::unique_ptr<DeviceStream> stream_;                       // device: the communication stream
  std::unique_ptr<DeviceEvent> comm_done_, buffers_ready_, buffers_done_;
  std::vector<std::shared_ptr<Work>> buffer_works_;
  std::vector<std::string> names_;
  std::vector<Tensor> params_;
  std::vector<uint64_t> hooks_;
  std::vector<Bucket> buckets_;
  std::vector<std::size_t> bucket_of_;
  std::vector<int64_t> offset_of_;  // in the bucket's buffer
  std::vector<bool> ready_;
  std::size_t next_launch_ = 0;
  std::size_t started_in_backward_ = 0;
  uint64_t armed_id_ = 0;  // the backward whose gradients are being reduced; 0: none
  bool require_sync_ = true;
};

// Makes `scaler` all-reduce (max) its found-inf flag in unscale_, so that every rank skips the
// same steps and keeps the same loss scale even when only one rank saw an inf/NaN. The flag is
// reduced where it lives: on a device, on the compute stream between the unscale kernel and the
// fused optimizer that reads it (no host read); on the CPU in host memory.
inline void all_reduce_found_inf(amp::GradScaler& scaler, std::shared_ptr<ProcessGroup> pg) {
  MIXPREC_CHECK(pg != nullptr, "all_reduce_found_inf: null process group");
  scaler.set_found_inf_flag_reducer([pg](const Tensor& flag) { pg->all_reduce_on(flag, ReduceOp::Max, nullptr); });
}

}  // namespace mixprec::distributed
