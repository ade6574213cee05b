#pragma once
// DistributedDataParallel: torch.nn.parallel.DistributedDataParallel for CPU modules.
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
// Gradient accumulation: backward under `auto guard = ddp.no_sync();` only accumulates locally;
// the next backward outside it reduces the accumulated gradients.
#include <algorithm>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "mixprec/amp/grad_scaler.hpp"
#include "mixprec/autograd/engine.hpp"
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
      MIXPREC_CHECK(p.device() == Device::CPU && p.is_contiguous(), "DistributedDataParallel: parameter '", name, "' of shape ",
                    p.sizes(), " on ", p.device(), " must be a contiguous CPU tensor");
      names_.push_back(name);
      params_.push_back(p);
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
    Tensor all = empty({pg_->size(), 3}, DType::Int64);
    Tensor in = empty({3}, DType::Int64);
    std::memcpy(in.data_ptr(), mine, sizeof mine);
    pg_->all_gather(all, in)->wait();
    const int64_t* a = all.data<int64_t>();
    for (int r = 0; r < pg_->size(); ++r)
      MIXPREC_CHECK(a[3 * r] == mine[0] && a[3 * r + 1] == mine[1] && a[3 * r + 2] == mine[2],
                    "DistributedDataParallel: rank ", r, " has ", a[3 * r], " trainable parameters with ", a[3 * r + 1],
                    " elements, rank ", pg_->rank(), " has ", mine[0], " with ", mine[1],
                    " (or their shapes/dtypes differ): every rank must build the same model");
  }

  void broadcast_from_rank0(const std::vector<Tensor>& tensors) {
    if (pg_->size() == 1) return;
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
      cur.buffer = empty({n}, DType::Float32);
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
    if (!require_sync_ || pg_->size() == 1) return;
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
      buckets_[next_launch_].work = pg_->all_reduce(buckets_[next_launch_].buffer, ReduceOp::Sum);
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
      used_work = pg_->all_reduce(used, ReduceOp::Max);
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
// same steps and keeps the same loss scale even when only one rank saw an inf/NaN.
inline void all_reduce_found_inf(amp::GradScaler& scaler, std::shared_ptr<ProcessGroup> pg) {
  MIXPREC_CHECK(pg != nullptr, "all_reduce_found_inf: null process group");
  scaler.set_found_inf_reducer([pg](bool found) {
    Tensor flag = empty({1}, DType::UInt8);
    flag.data<uint8_t>()[0] = found ? 1 : 0;
    pg->all_reduce(flag, ReduceOp::Max)->wait();
    return flag.data<uint8_t>()[0] != 0;
  });
}

}  // namespace mixprec::distributed
