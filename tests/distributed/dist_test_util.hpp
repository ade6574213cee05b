#pragma once
// Shared by the data-parallel tests: the process group every test uses (made by mpi_main.cpp),
// and collective checks. Tests must issue the same collectives on every rank whatever their
// results, so they use EXPECT_*, not ASSERT_*, around collectives.
#include <cstring>
#include <memory>
#include <vector>

#include <mixprec/distributed/ddp.hpp>
#include <mixprec/distributed/mpi.hpp>
#include <mixprec/mixprec.hpp>

#include "ops/op_test_util.hpp"

namespace mixprec::testing {

distributed::MpiProcessGroup& world();
std::shared_ptr<distributed::ProcessGroup> world_ptr();

// Every rank's copy of `t` (any dtype), gathered: row r is rank r's bytes.
inline Tensor gather_all(const Tensor& t) {
  const Tensor c = t.detach().contiguous();
  Shape s = c.sizes();
  s.insert(s.begin(), world().size());
  Tensor out = empty(s, c.dtype());
  world().all_gather(out, c)->wait();
  return out;
}

// Whether every rank holds exactly the same bits in `t`.
inline bool same_bits_on_all_ranks(const Tensor& t) {
  const Tensor all = gather_all(t);
  const std::size_t n = static_cast<std::size_t>(t.nbytes());
  const char* p = static_cast<const char*>(all.data_ptr());
  for (int r = 1; r < world().size(); ++r)
    if (std::memcmp(p, p + n * static_cast<std::size_t>(r), n) != 0) return false;
  return true;
}

// All of a module's parameters, flattened into one float32 vector (for comparisons).
inline Tensor flat_params(nn::Module& m) {
  std::vector<Tensor> flat;
  for (const Tensor& p : m.parameters()) flat.push_back(p.detach().to(DType::Float32).reshape({-1}));
  return cat(flat, 0);
}

}  // namespace mixprec::testing
