#pragma once
// MpiProcessGroup: ProcessGroup over MPI (Open MPI from Debian's libopenmpi-dev) for CPU tensors.
// Link mixprec::mpi; run with `mpirun -np N program`.
//
//   auto pg = std::make_shared<distributed::MpiProcessGroup>();   // MPI_COMM_WORLD
//   pg->all_reduce(t, distributed::ReduceOp::Sum)->wait();
//
// One communication thread makes every MPI call of the group, in the order the caller issued
// them, so a collective proceeds while the caller keeps computing (MPI only progresses inside
// MPI calls). That thread polls a nonblocking collective with MPI_Test and sleeps between polls
// instead of spinning in a blocking call: a spinning waiter would take a core from backward.
// MPI is initialized (thread level MULTIPLE, at least SERIALIZED) by the first group unless the
// program did it, and finalized when the last group is destroyed if a group initialized it.
#if !__has_include(<mpi.h>)
#error "mixprec/distributed/mpi.hpp needs MPI: install libopenmpi-dev and link mixprec::mpi"
#endif
#include <mpi.h>

#include <chrono>
#include <climits>
#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <mutex>
#include <thread>

#include "mixprec/distributed/process_group.hpp"
#include "mixprec/ops/tensor_ops.hpp"

namespace mixprec::distributed {

namespace detail {

inline void mpi_check(int code, const char* what) {
  if (code == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, msg, &len);
  fail("mpi ", what, " failed: ", std::string(msg, static_cast<std::size_t>(len)));
}

// Owns MPI_Init/MPI_Finalize for every group of the process.
class MpiRuntime {
 public:
  static std::shared_ptr<MpiRuntime> get() {
    static std::mutex mu;
    static std::weak_ptr<MpiRuntime> current;
    std::lock_guard<std::mutex> lk(mu);
    auto rt = current.lock();
    if (!rt) {
      rt = std::shared_ptr<MpiRuntime>(new MpiRuntime());
      current = rt;
    }
    return rt;
  }
  ~MpiRuntime() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (owns_ && !finalized) MPI_Finalize();
  }
  int thread_level() const { return level_; }

 private:
  MpiRuntime() {
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    MIXPREC_CHECK(!finalized, "MpiProcessGroup: MPI has already been finalized in this process");
    if (!initialized) {
      mpi_check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &level_), "MPI_Init_thread");
      owns_ = true;
    } else {
      mpi_check(MPI_Query_thread(&level_), "MPI_Query_thread");
    }
    MIXPREC_CHECK(level_ >= MPI_THREAD_SERIALIZED, "MpiProcessGroup: MPI provides thread level ", level_,
                  "; the communication thread needs MPI_THREAD_SERIALIZED (", MPI_THREAD_SERIALIZED,
                  ") or more (initialize MPI with MPI_Init_thread, or let MpiProcessGroup do it)");
  }
  bool owns_ = false;
  int level_ = 0;
};

inline MPI_Datatype mpi_type(DType d) {
  switch (d) {
    case DType::Float32: return MPI_FLOAT;
    case DType::Float64: return MPI_DOUBLE;
    case DType::Float16:
    case DType::BFloat16: return MPI_UINT16_T;  // bit copies only: reductions widen to float32
    case DType::Int32: return MPI_INT32_T;
    case DType::Int64: return MPI_INT64_T;
    case DType::UInt8: return MPI_UINT8_T;
    case DType::Bool: return MPI_C_BOOL;
    case DType::Float8E4M3FN:
    case DType::Float8E5M2: break;  // not sent: a sum of their bytes as uint8 would be silently wrong
  }
  fail("mpi: unsupported dtype ", d);
}

inline int mpi_count(const char* op, const Tensor& t) {
  MIXPREC_CHECK(t.numel() <= INT_MAX, "mpi ", op, ": tensor of shape ", t.sizes(), " has more than INT_MAX elements");
  return static_cast<int>(t.numel());
}

}  // namespace detail

class MpiProcessGroup final : public ProcessGroup {
 public:
  // Collectives over a duplicate of `comm`, so they never match the program's own messages.
  explicit MpiProcessGroup(MPI_Comm comm = MPI_COMM_WORLD) : runtime_(detail::MpiRuntime::get()) {
    detail::mpi_check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);  // errors become mixprec::Error, not an abort
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    worker_ = std::thread([this] { loop(); });
  }
  ~MpiProcessGroup() override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    worker_.join();
    MPI_Comm_free(&comm_);
  }
  MpiProcessGroup(const MpiProcessGroup&) = delete;
  MpiProcessGroup& operator=(const MpiProcessGroup&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "mpi"; }

  std::shared_ptr<Work> broadcast(const Tensor& tensor, int root) override {
    detail::check_collective_tensor(*this, "broadcast", tensor, Device::CPU);
    detail::check_root(*this, root);
    const int n = detail::mpi_count("broadcast", tensor);
    return enqueue([this, tensor, root, n] {
      MPI_Request req;
      detail::mpi_check(MPI_Ibcast(tensor.data_ptr(), n, detail::mpi_type(tensor.dtype()), root, comm_, &req), "broadcast");
      wait_request(req, "broadcast");
      tensor.bump_version();
    });
  }

  std::shared_ptr<Work> all_reduce(const Tensor& tensor, ReduceOp op = ReduceOp::Sum) override {
    detail::check_collective_tensor(*this, "all_reduce", tensor, Device::CPU);
    MIXPREC_CHECK(tensor.dtype() != DType::Bool, "mpi all_reduce: bool tensors are not reduced; use uint8 (shape ",
                  tensor.sizes(), ")");
    const int n = detail::mpi_count("all_reduce", tensor);
    return enqueue([this, tensor, op, n] {
      const bool widen = tensor.dtype() == DType::Float16 || tensor.dtype() == DType::BFloat16;
      const Tensor buf = widen ? mixprec::detail::contiguous_raw(tensor, DType::Float32) : tensor;
      MPI_Request req;
      detail::mpi_check(MPI_Iallreduce(MPI_IN_PLACE, buf.data_ptr(), n, detail::mpi_type(buf.dtype()),
                                       op == ReduceOp::Sum ? MPI_SUM : MPI_MAX, comm_, &req),
                        "all_reduce");
      wait_request(req, "all_reduce");
      if (widen) mixprec::detail::copy_kernel(tensor, buf);
      tensor.bump_version();
    });
  }

  std::shared_ptr<Work> all_gather(const Tensor& output, const Tensor& input) override {
    detail::check_all_gather(*this, output, input, Device::CPU);
    const int n = detail::mpi_count("all_gather", input);
    detail::mpi_count("all_gather", output);
    return enqueue([this, output, input, n] {
      const MPI_Datatype t = detail::mpi_type(input.dtype());
      MPI_Request req;
      detail::mpi_check(MPI_Iallgather(input.data_ptr(), n, t, output.data_ptr(), n, t, comm_, &req), "all_gather");
      wait_request(req, "all_gather");
      output.bump_version();
    });
  }

  std::shared_ptr<Work> barrier() override {
    return enqueue([this] {
      MPI_Request req;
      detail::mpi_check(MPI_Ibarrier(comm_, &req), "barrier");
      wait_request(req, "barrier");
    });
  }

  // Ends every process of the job (after an error on one rank, the others would wait forever).
  [[noreturn]] void abort(int code = 1) { MPI_Abort(comm_, code); std::abort(); }

 private:
  class MpiWork final : public Work {
   public:
    explicit MpiWork(std::shared_future<void> f) : f_(std::move(f)) {}
    void wait() override { f_.get(); }

   private:
    std::shared_future<void> f_;
  };

  std::shared_ptr<Work> enqueue(std::function<void()> fn) {
    std::packaged_task<void()> task(std::move(fn));
    auto work = std::make_shared<MpiWork>(task.get_future().share());
    {
      std::lock_guard<std::mutex> lk(mu_);
      queue_.push_back(std::move(task));
    }
    cv_.notify_one();
    return work;
  }

  void loop() {
    for (;;) {
      std::packaged_task<void()> task;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stop_, and everything issued has run
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      task();  // exceptions land in the Work
    }
  }

  static void wait_request(MPI_Request& req, const char* op) {
    for (int polls = 0;; ++polls) {
      int done = 0;
      detail::mpi_check(MPI_Test(&req, &done, MPI_STATUS_IGNORE), op);
      if (done) return;
      if (polls < 64) std::this_thread::yield();
      else std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  std::shared_ptr<detail::MpiRuntime> runtime_;  // first member: MPI outlives the communicator
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::packaged_task<void()>> queue_;
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace mixprec::distributed
