#pragma once
// An emulated CUDA device for the data-parallel tests: host memory labelled Device::CUDA, every
// kernel-table entry the CPU's own (inputs relabelled to the CPU, results back to the device),
// and a real asynchronous communication stream -- a worker thread that runs its queue in order --
// with events that order it against the compute stream (the calling thread: the CPU entries run
// synchronously, so compute work is complete when enqueued). EmulatedGroup's collectives are real
// MPI collectives over that host memory, run by the stream's thread when enqueued on the stream.
//
// Unlike tests/tensor/test_device_dispatch.cpp's device, whose pages are PROT_NONE outside a
// kernel, this memory stays readable: the stream's thread reads it while the host computes. Host
// round trips are caught instead by counting the to_host / to_device entries (calls()).
#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "distributed/dist_test_util.hpp"

namespace mixprec::testing::emulated {

// The same memory as `t`, labelled with device `d`; keeps the source storage alive.
inline Tensor relabel(const Tensor& t, Device d) {
  if (!t.defined() || t.device() == d) return t;
  const Tensor whole = from_blob(t.storage()->data, {t.storage()->nbytes / static_cast<int64_t>(t.element_size())}, t.dtype(),
                                 [keep = t.storage()](void*) {}, d);
  return mixprec::detail::make_view(whole, t.sizes(), t.strides(), t.storage_offset());
}
inline Tensor host(const Tensor& t) { return relabel(t, Device::CPU); }

// What the tests read: entry calls by name, and the order of stream/event/collective operations.
struct Trace {
  std::mutex mu;
  std::map<std::string, int> calls;
  std::vector<std::string> log;  // only while `logging`
  bool logging = false;
  void add(const std::string& what) {
    std::lock_guard<std::mutex> lk(mu);
    ++calls[what];
    if (logging) log.push_back(what);
  }
  int count(const std::string& what) {
    std::lock_guard<std::mutex> lk(mu);
    return calls[what];
  }
};
inline Trace& trace() {
  static Trace t;
  return t;
}

class HostAllocator final : public Allocator {
 public:
  void* allocate(int64_t nbytes) override {
    counters_.on_alloc(nbytes, nbytes);
    return ::operator new(static_cast<std::size_t>(std::max<int64_t>(nbytes, 1)), std::align_val_t{64});
  }
  void deallocate(void* p, int64_t nbytes) noexcept override {
    counters_.on_free(nbytes, nbytes);
    ::operator delete(p, std::align_val_t{64});
  }
  Device device() const override { return Device::CUDA; }
  MemoryStats stats() const override { return counters_.snapshot(); }
  void reset_peak() override { counters_.reset_peak(); }

 private:
  mixprec::detail::StatCounters counters_;
};

// ---- the kernel table: every CPU entry, wrapped ----
template <class T>
const T& to_cpu(const T& v) {
  return v;
}
inline Tensor to_cpu(const Tensor& t) { return host(t); }
inline std::vector<Tensor> to_cpu(const std::vector<Tensor>& ts) {
  std::vector<Tensor> out;
  for (const Tensor& t : ts) out.push_back(host(t));
  return out;
}
inline std::vector<DeviceParamUpdate> to_cpu(const std::vector<DeviceParamUpdate>& ps) {
  std::vector<DeviceParamUpdate> out = ps;
  for (DeviceParamUpdate& p : out) {
    p.weights = host(p.weights), p.model = host(p.model), p.grad = host(p.grad), p.counters = host(p.counters);
    for (Tensor& s : p.state) s = host(s);
  }
  return out;
}
inline Tensor to_dev(const Tensor& t) { return relabel(t, Device::CUDA); }
template <std::size_t N>
std::array<Tensor, N> to_dev(const std::array<Tensor, N>& ts) {
  std::array<Tensor, N> out;
  for (std::size_t i = 0; i < N; ++i) out[i] = to_dev(ts[i]);
  return out;
}

template <class Fn, auto Entry>
struct Wrap;
template <class R, class... A, auto Entry>
struct Wrap<R (*)(A...), Entry> {
  static R call(A... a) {
    trace().add(name);
    const auto fn = device_kernels(Device::CPU)->*Entry;
    if constexpr (std::is_void_v<R>) fn(to_cpu(a)...);
    else return to_dev(fn(to_cpu(a)...));
  }
  static inline const char* name = "";
};

class EmulatedStream final : public DeviceStream {
 public:
  EmulatedStream() : worker_([this] { loop(); }) {}
  ~EmulatedStream() override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    worker_.join();
  }
  void* native_handle() const override { return const_cast<EmulatedStream*>(this); }
  // Runs fn on the stream after everything enqueued before; the future is set when it has run.
  std::shared_future<void> enqueue(std::function<void()> fn) {
    std::packaged_task<void()> task(std::move(fn));
    auto f = task.get_future().share();
    {
      std::lock_guard<std::mutex> lk(mu_);
      queue_.push_back(std::move(task));
    }
    cv_.notify_one();
    return f;
  }

 private:
  void loop() {
    for (;;) {
      std::packaged_task<void()> task;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      task();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::packaged_task<void()>> queue_;
  bool stop_ = false;
  std::thread worker_;
};

inline const char* stream_name(DeviceStream* s) { return s ? "comm" : "compute"; }

class EmulatedEvent final : public DeviceEvent {
 public:
  void record(DeviceStream* s) override {
    trace().add(std::string("record ") + stream_name(s));
    if (!s) {  // the compute stream's work has all run already
      std::promise<void> p;
      p.set_value();
      done_ = p.get_future().share();
    } else {
      done_ = static_cast<EmulatedStream*>(s)->enqueue([] {});
    }
  }
  void block(DeviceStream* s) override {
    trace().add(std::string("block ") + stream_name(s));
    if (!done_.valid()) return;  // never recorded: nothing to wait for (as cudaStreamWaitEvent)
    if (!s) done_.wait();        // the compute stream is this thread
    else static_cast<EmulatedStream*>(s)->enqueue([f = done_] { f.wait(); });
  }
  void synchronize() override {
    if (done_.valid()) done_.wait();
  }

 private:
  std::shared_future<void> done_;
};

inline const DeviceKernels& kernels() {
  static const DeviceKernels k = [] {
    DeviceKernels t = *device_kernels(Device::CPU);
#define MIXPREC_EMULATE(e)                                           \
  Wrap<decltype(DeviceKernels::e), &DeviceKernels::e>::name = #e; \
  t.e = t.e ? &Wrap<decltype(DeviceKernels::e), &DeviceKernels::e>::call : nullptr
    MIXPREC_EMULATE(copy); MIXPREC_EMULATE(fill); MIXPREC_EMULATE(binary); MIXPREC_EMULATE(binary_scalar);
    MIXPREC_EMULATE(unary); MIXPREC_EMULATE(unary_backward); MIXPREC_EMULATE(sum); MIXPREC_EMULATE(matmul);
    MIXPREC_EMULATE(softmax); MIXPREC_EMULATE(softmax_backward); MIXPREC_EMULATE(conv_forward);
    MIXPREC_EMULATE(conv_backward_input); MIXPREC_EMULATE(conv_backward_weight); MIXPREC_EMULATE(batch_norm);
    MIXPREC_EMULATE(batch_norm_backward); MIXPREC_EMULATE(batch_norm_backward_eval); MIXPREC_EMULATE(batch_norm_relu);
    MIXPREC_EMULATE(batch_norm_relu_backward); MIXPREC_EMULATE(layer_norm); MIXPREC_EMULATE(layer_norm_backward);
    MIXPREC_EMULATE(layer_norm_to); MIXPREC_EMULATE(linear_gelu); MIXPREC_EMULATE(linear_dgelu); MIXPREC_EMULATE(embedding);
    MIXPREC_EMULATE(embedding_backward); MIXPREC_EMULATE(masked_scale); MIXPREC_EMULATE(sdpa_forward);
    MIXPREC_EMULATE(sdpa_backward); MIXPREC_EMULATE(sdpa_forward_into); MIXPREC_EMULATE(sdpa_backward_into);
    MIXPREC_EMULATE(adam); MIXPREC_EMULATE(sgd); MIXPREC_EMULATE(unscale); MIXPREC_EMULATE(update_scale);
    MIXPREC_EMULATE(grad_norm); MIXPREC_EMULATE(clip_grads); MIXPREC_EMULATE(dropout); MIXPREC_EMULATE(cross_entropy);
    MIXPREC_EMULATE(cross_entropy_backward); MIXPREC_EMULATE(class_weights); MIXPREC_EMULATE(clamp_indices);
    MIXPREC_EMULATE(reduce); MIXPREC_EMULATE(compare); MIXPREC_EMULATE(pointwise); MIXPREC_EMULATE(cat);
    MIXPREC_EMULATE(index); MIXPREC_EMULATE(cumsum); MIXPREC_EMULATE(param_op); MIXPREC_EMULATE(pool2d);
    MIXPREC_EMULATE(pool2d_backward); MIXPREC_EMULATE(group_norm); MIXPREC_EMULATE(group_norm_backward);
    MIXPREC_EMULATE(loss_terms); MIXPREC_EMULATE(loss_terms_backward); MIXPREC_EMULATE(loss_sum); MIXPREC_EMULATE(nll_loss);
    MIXPREC_EMULATE(nll_loss_backward);
#undef MIXPREC_EMULATE
    // Transfers make fresh memory on the other side, as a GPU's do.
    t.to_device = [](const Tensor& c) {
      trace().add("to_device");
      Tensor out = empty(c.sizes(), c.dtype(), Device::CUDA);
      mixprec::detail::copy_kernel(host(out), c);
      return out;
    };
    t.to_host = [](const Tensor& d) {
      trace().add("to_host");
      Tensor out = empty(d.sizes(), d.dtype());
      mixprec::detail::copy_kernel(out, host(d));
      return out;
    };
    // As CUDA's table: no fused cross_entropy (it composes log_softmax with class_weights on the
    // device, targets checked there), no graphs.
    t.cross_entropy = nullptr;
    t.cross_entropy_backward = nullptr;
    t.make_graph = nullptr;
    t.make_stream = []() -> std::unique_ptr<DeviceStream> { return std::make_unique<EmulatedStream>(); };
    t.make_event = []() -> std::unique_ptr<DeviceEvent> { return std::make_unique<EmulatedEvent>(); };
    return t;
  }();
  return k;
}

// Installs the emulated device as Device::CUDA for its lifetime.
class Install {
 public:
  Install()
      : prev_alloc_(std::exchange(mixprec::detail::allocator_registry()[static_cast<int>(mixprec::Device::CUDA)], &alloc_)),
        prev_kernels_(set_device_kernels(mixprec::Device::CUDA, &kernels())) {}
  ~Install() {
    set_device_kernels(mixprec::Device::CUDA, prev_kernels_);
    mixprec::detail::allocator_registry()[static_cast<int>(mixprec::Device::CUDA)] = prev_alloc_;
  }
  Install(const Install&) = delete;
  Install& operator=(const Install&) = delete;

 private:
  HostAllocator alloc_;
  Allocator* prev_alloc_;
  const DeviceKernels* prev_kernels_;
};

class DoneWork final : public distributed::Work {
 public:
  explicit DoneWork(std::shared_future<void> f) : f_(std::move(f)) {}
  void wait() override { f_.get(); }

 private:
  std::shared_future<void> f_;
};

// A process group over the emulated device's memory whose collectives are MPI's: host and
// compute-stream collectives on one duplicate of MPI_COMM_WORLD, communication-stream ones on
// another (run in the stream's order by its thread, as NCCL runs them in the stream's order).
class EmulatedGroup final : public distributed::ProcessGroup {
 public:
  EmulatedGroup() : host_(std::make_unique<distributed::MpiProcessGroup>()), stream_(std::make_unique<distributed::MpiProcessGroup>()) {}
  int rank() const override { return host_->rank(); }
  int size() const override { return host_->size(); }
  std::string backend() const override { return "emulated-nccl"; }
  std::shared_ptr<distributed::Work> broadcast(const Tensor& t, int root) override {
    check(t);
    return host_->broadcast(host(t), root);
  }
  std::shared_ptr<distributed::Work> all_reduce(const Tensor& t, distributed::ReduceOp op) override {
    check(t);
    return host_->all_reduce(host(t), op);
  }
  std::shared_ptr<distributed::Work> all_gather(const Tensor& o, const Tensor& i) override {
    check(o), check(i);
    return host_->all_gather(host(o), host(i));
  }
  std::shared_ptr<distributed::Work> barrier() override { return host_->barrier(); }
  std::shared_ptr<distributed::Work> all_reduce_on(const Tensor& t, distributed::ReduceOp op, DeviceStream* s) override {
    check(t);
    trace().add(std::string("all_reduce ") + stream_name(s));
    if (!s) {
      auto w = host_->all_reduce(host(t), op);
      w->wait();
      return w;
    }
    return on_stream(s, [this, h = host(t), op] { stream_->all_reduce(h, op)->wait(); });
  }
  std::shared_ptr<distributed::Work> broadcast_on(const Tensor& t, int root, DeviceStream* s) override {
    check(t);
    trace().add(std::string("broadcast ") + stream_name(s));
    if (!s) {
      auto w = host_->broadcast(host(t), root);
      w->wait();
      return w;
    }
    return on_stream(s, [this, h = host(t), root] { stream_->broadcast(h, root)->wait(); });
  }

 private:
  static void check(const Tensor& t) {
    MIXPREC_CHECK(t.device() == mixprec::Device::CUDA, "emulated-nccl: tensor of shape ", t.sizes(), " is on ", t.device());
  }
  static std::shared_ptr<distributed::Work> on_stream(DeviceStream* s, std::function<void()> fn) {
    return std::make_shared<DoneWork>(static_cast<EmulatedStream*>(s)->enqueue(std::move(fn)));
  }
  std::unique_ptr<distributed::MpiProcessGroup> host_, stream_;
};

}  // namespace mixprec::testing::emulated
