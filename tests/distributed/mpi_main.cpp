// gtest main for tests run under mpirun: every rank runs every test; rank 0 prints the usual
// report and the other ranks only their failures; the exit code is 1 if any rank failed.
#include <gtest/gtest.h>

#include <cstdio>
#include <string>

#include "distributed/dist_test_util.hpp"

namespace mixprec::testing {
namespace {
std::shared_ptr<distributed::MpiProcessGroup> g_world;

class FailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int rank) : rank_(rank) {}
  // The test's name is taken here: gtest holds its lock while reporting a part result.
  void OnTestStart(const ::testing::TestInfo& info) override {
    test_ = std::string(info.test_suite_name()) + "." + info.name();
  }
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s failed at %s:%d\n%s\n", rank_, test_.c_str(), r.file_name() ? r.file_name() : "?",
                 r.line_number(), r.summary());
  }

 private:
  int rank_;
  std::string test_;
};
}  // namespace

distributed::MpiProcessGroup& world() { return *g_world; }
std::shared_ptr<distributed::ProcessGroup> world_ptr() { return g_world; }

}  // namespace mixprec::testing

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  using mixprec::testing::g_world;
  g_world = std::make_shared<mixprec::distributed::MpiProcessGroup>();
  if (g_world->rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new mixprec::testing::FailurePrinter(g_world->rank()));
  }
  const int rc = RUN_ALL_TESTS();
  mixprec::Tensor failed = mixprec::full({1}, rc != 0 ? 1.0 : 0.0, mixprec::DType::Int32);
  g_world->all_reduce(failed, mixprec::distributed::ReduceOp::Max)->wait();
  const bool any = failed.data<int32_t>()[0] != 0;
  g_world.reset();  // finalizes MPI
  if (any) std::fprintf(stderr, "data-parallel tests failed on at least one rank\n");
  return any ? 1 : 0;
}
