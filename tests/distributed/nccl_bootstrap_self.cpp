// The group test_nccl_single bootstraps NCCL over: this process alone, so that it runs on a GPU
// machine without Open MPI (compiled by g++; test_nccl links nccl_bootstrap.cpp instead).
#include <cstring>

#include <mixprec/distributed/process_group.hpp>

namespace mixprec::testing {
// This process alone: what a bootstrap of one rank does.
class SelfGroup final : public distributed::ProcessGroup {
  struct Done final : distributed::Work {
    void wait() override {}
  };

 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string backend() const override { return "self"; }
  std::shared_ptr<distributed::Work> broadcast(const Tensor&, int root) override {
    distributed::detail::check_root(*this, root);
    return std::make_shared<Done>();
  }
  std::shared_ptr<distributed::Work> all_reduce(const Tensor&, distributed::ReduceOp) override { return std::make_shared<Done>(); }
  std::shared_ptr<distributed::Work> all_gather(const Tensor& out, const Tensor& in) override {
    distributed::detail::check_all_gather(*this, out, in, Device::CPU);
    std::memcpy(out.data_ptr(), in.data_ptr(), static_cast<std::size_t>(in.nbytes()));
    return std::make_shared<Done>();
  }
  std::shared_ptr<distributed::Work> barrier() override { return std::make_shared<Done>(); }
};
distributed::ProcessGroup& nccl_bootstrap() {
  static SelfGroup g;
  return g;
}
}  // namespace mixprec::testing
