#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

#include <limits>
#include <sstream>
#include <thread>

using namespace mixprec;

TEST(DType, SizesNamesAndFloatingFlags) {
  EXPECT_EQ(itemsize(DType::Float32), 4u);
  EXPECT_EQ(itemsize(DType::Float64), 8u);
  EXPECT_EQ(itemsize(DType::Float16), 2u);
  EXPECT_EQ(itemsize(DType::BFloat16), 2u);
  EXPECT_EQ(itemsize(DType::Int32), 4u);
  EXPECT_EQ(itemsize(DType::Int64), 8u);
  EXPECT_EQ(itemsize(DType::UInt8), 1u);
  EXPECT_EQ(itemsize(DType::Bool), 1u);
  EXPECT_EQ(name(DType::BFloat16), "bfloat16");
  EXPECT_TRUE(is_floating_point(DType::Float16));
  EXPECT_FALSE(is_floating_point(DType::Int64));
}

TEST(DType, PromotionFollowsPyTorchLattice) {
  EXPECT_EQ(promote_types(kFloat16, kFloat32), kFloat32);
  EXPECT_EQ(promote_types(kBFloat16, kFloat16), kFloat32);  // no exact common 16-bit type
  EXPECT_EQ(promote_types(kBFloat16, kBFloat16), kBFloat16);
  EXPECT_EQ(promote_types(kInt64, kFloat16), kFloat16);
  EXPECT_EQ(promote_types(kFloat32, kFloat64), kFloat64);
  EXPECT_EQ(promote_types(kBool, kUInt8), kUInt8);
  EXPECT_EQ(promote_types(kUInt8, kInt32), kInt32);
  EXPECT_EQ(promote_types(kInt32, kInt64), kInt64);
  // Symmetric for every pair.
  for (int a = 0; a < kNumDTypes; ++a)
    for (int b = 0; b < kNumDTypes; ++b)
      EXPECT_EQ(promote_types(DType(a), DType(b)), promote_types(DType(b), DType(a)));
}

TEST(Tensor, FactoriesShapesAndContents) {
  Tensor z = zeros({2, 3});
  EXPECT_EQ(z.sizes(), (Shape{2, 3}));
  EXPECT_EQ(z.strides(), (Shape{3, 1}));
  EXPECT_EQ(z.numel(), 6);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(z.data<float>()[i], 0.0f);
  Tensor o = ones({4}, kBFloat16);
  EXPECT_EQ(o.dtype(), kBFloat16);
  EXPECT_EQ(float(o.data<bfloat16>()[3]), 1.0f);
  Tensor f = full({2, 2}, 2.5, kFloat16);
  EXPECT_EQ(float(f.data<half>()[3]), 2.5f);
  EXPECT_THROW(f.item<float>(), Error);  // 4 elements
  EXPECT_EQ(full({}, 7.0).item<float>(), 7.0f);
  Tensor r = arange(0.0, 5.0, 1.0, kInt64);
  for (int64_t i = 0; i < 5; ++i) EXPECT_EQ(r.data<int64_t>()[i], i);
  Tensor v = tensor(std::vector<float>{1, 2, 3, 4, 5, 6}, {2, 3});
  EXPECT_EQ((v.accessor<float, 2>()[1][2]), 6.0f);
  EXPECT_THROW(tensor(std::vector<float>{1, 2, 3}, {2, 2}), Error);
  EXPECT_THROW(empty({2, -1}), Error);
}

TEST(Tensor, RandomFactoriesAreSeededAndInRange) {
  Generator g1(42), g2(42);
  Tensor a = randn({1000}, kFloat32, g1), b = randn({1000}, kFloat32, g2);
  EXPECT_EQ(std::memcmp(a.data_ptr(), b.data_ptr(), 4000), 0);
  const double m = mean(a).item<double>(), sd = std::sqrt(var(a).item<double>());
  EXPECT_NEAR(m, 0.0, 0.1);
  EXPECT_NEAR(sd, 1.0, 0.1);
  Tensor u = rand({1000}, kFloat64, g1);
  EXPECT_GE(min(u).item<double>(), 0.0);
  EXPECT_LT(max(u).item<double>(), 1.0);
  Tensor ri = randint(-3, 4, {1000}, kInt64, g1);
  EXPECT_EQ(min(ri).item<int64_t>(), -3);
  EXPECT_EQ(max(ri).item<int64_t>(), 3);
  manual_seed(7);
  Tensor c = rand({5});
  manual_seed(7);
  Tensor d = rand({5});
  EXPECT_EQ(std::memcmp(c.data_ptr(), d.data_ptr(), 20), 0);
}

TEST(Tensor, TypedAccessChecksDType) {
  Tensor t = zeros({3}, kFloat16);
  EXPECT_NO_THROW(t.data<half>());
  EXPECT_THROW(t.data<float>(), Error);
  EXPECT_THROW((t.accessor<half, 2>()), Error);
  try {
    t.data<float>();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("float16"), std::string::npos) << e.what();
  }
  TensorView<half> tv(t);
  EXPECT_EQ(tv.numel(), 3);
}

TEST(Tensor, ViewsShareStorageAndComputeStrides) {
  Tensor x = arange(0.0, 24.0, 1.0, kFloat32).reshape({2, 3, 4});
  Tensor t = x.transpose(0, 2);
  EXPECT_EQ(t.sizes(), (Shape{4, 3, 2}));
  EXPECT_EQ(t.strides(), (Shape{1, 4, 12}));
  EXPECT_FALSE(t.is_contiguous());
  EXPECT_TRUE(empty({0, 3}).t().is_contiguous());  // no elements: contiguous whatever the strides, as PyTorch
  EXPECT_EQ((t.accessor<float, 3>()[3][2][1]), (x.accessor<float, 3>()[1][2][3]));
  Tensor s = x.slice(2, 1, 4, 2);  // columns 1 and 3
  EXPECT_EQ(s.sizes(), (Shape{2, 3, 2}));
  EXPECT_EQ((s.accessor<float, 3>()[1][2][1]), 23.0f);
  Tensor n = x.narrow(1, 1, 2);
  EXPECT_EQ(n.storage_offset(), 4);
  Tensor e = tensor(std::vector<float>{1, 2, 3}, {3, 1}).expand({3, 4});
  EXPECT_EQ(e.strides(), (Shape{1, 0}));
  EXPECT_EQ((e.accessor<float, 2>()[2][3]), 3.0f);
  // Writing through a view is seen by the base.
  x.slice(0, 1, 2).fill_(-1.0);
  EXPECT_EQ((x.accessor<float, 3>()[1][0][0]), -1.0f);
  EXPECT_EQ((x.accessor<float, 3>()[0][0][0]), 0.0f);
  // view() refuses what needs a copy; reshape() copies.
  EXPECT_THROW(t.view({24}), Error);
  Tensor r = t.reshape({24});
  EXPECT_TRUE(r.is_contiguous());
  EXPECT_EQ(r.data<float>()[1], (x.accessor<float, 3>()[1][0][0]));
  EXPECT_EQ(x.reshape({-1, 4}).sizes(), (Shape{6, 4}));
  EXPECT_THROW(x.reshape({5, -1}), Error);
  EXPECT_THROW(x.transpose(0, 3), Error);
  Tensor c = t.contiguous();
  EXPECT_TRUE(c.is_contiguous());
  EXPECT_EQ((c.accessor<float, 3>()[3][2][1]), -1.0f);  // x[1] was filled through a view above
  EXPECT_EQ((c.accessor<float, 3>()[3][2][0]), 11.0f);
  EXPECT_EQ(x.permute({2, 0, 1}).sizes(), (Shape{4, 2, 3}));
  EXPECT_THROW(x.permute({0, 0, 1}), Error);
  EXPECT_EQ(x.unsqueeze(1).sizes(), (Shape{2, 1, 3, 4}));
  EXPECT_EQ(x.unsqueeze(1).squeeze(1).sizes(), x.sizes());
  EXPECT_EQ(x.select(1, 2).sizes(), (Shape{2, 4}));
  EXPECT_EQ(x.flatten(1).sizes(), (Shape{2, 12}));
}

TEST(Tensor, CastsRoundTripAndRoundToNearestEven) {
  Tensor x = tensor(std::vector<float>{1.0f, 1.00390625f /*1+2^-8*/, 65504.0f, 70000.0f, 1e-8f, -2.5f});
  Tensor b = x.to(kBFloat16);
  EXPECT_EQ(b.dtype(), kBFloat16);
  EXPECT_EQ(float(b.data<bfloat16>()[1]), 1.0f);  // tie rounds to even
  Tensor h = x.to(kFloat16);
  EXPECT_EQ(float(h.data<half>()[2]), 65504.0f);
  EXPECT_TRUE(std::isinf(float(h.data<half>()[3])));
  EXPECT_EQ(float(h.data<half>()[4]), 0.0f);
  Tensor back = h.to(kFloat32);
  EXPECT_EQ(back.data<float>()[5], -2.5f);
  Tensor i = x.to(kInt64);
  EXPECT_EQ(i.data<int64_t>()[5], -2);
  Tensor bo = x.to(kBool);
  EXPECT_TRUE(bo.data<bool>()[0]);
  // Non-contiguous source converts element by element.
  Tensor m = arange(0.0, 6.0, 1.0, kFloat32).reshape({2, 3}).t().to(kFloat16);
  EXPECT_EQ((float(m.accessor<half, 2>()[2][1])), 5.0f);
}

TEST(Tensor, ToCudaFailsCleanlyWithoutDevice) {
  Tensor x = ones({2});
  if (!cuda_is_available()) {
    EXPECT_THROW(x.to(Device::CUDA), Error);
    EXPECT_THROW(empty({2}, kFloat32, Device::CUDA), Error);
  }
  EXPECT_TRUE(x.to(Device::CPU).is_same(x));
}

TEST(Tensor, PrintingShowsValuesShapeAndDType) {
  std::ostringstream os;
  os << tensor(std::vector<float>{1.5f, -2.0f}).to(kBFloat16);
  const std::string s = os.str();
  EXPECT_NE(s.find("1.5000"), std::string::npos) << s;
  EXPECT_NE(s.find("-2.0000"), std::string::npos) << s;
  EXPECT_NE(s.find("dtype=bfloat16"), std::string::npos) << s;
  EXPECT_NE(s.find("shape=[2]"), std::string::npos) << s;
  const std::string big = zeros({100}).to_string();
  EXPECT_NE(big.find("..."), std::string::npos);
  EXPECT_LT(big.size(), 200u);
  EXPECT_EQ(Tensor().to_string(), "tensor(undefined)");
}

TEST(Tensor, UndefinedTensorThrows) {
  Tensor u;
  EXPECT_FALSE(u.defined());
  EXPECT_THROW(u.sizes(), Error);
  EXPECT_THROW(u.numel(), Error);
}

TEST(Tensor, FromBlobBorrowsMemory) {
  std::vector<float> buf{1, 2, 3, 4};
  const auto before = memory_stats().allocated_bytes;
  Tensor t = from_blob(buf.data(), {2, 2}, kFloat32);
  EXPECT_EQ(memory_stats().allocated_bytes, before);  // not ours: not counted
  buf[3] = 9;
  EXPECT_EQ((t.accessor<float, 2>()[1][1]), 9.0f);
  bool deleted = false;
  { Tensor d = from_blob(buf.data(), {4}, kFloat32, [&](void*) { deleted = true; }); }
  EXPECT_TRUE(deleted);
}

TEST(MemoryStats, CountsEveryAllocationExactly) {
  const MemoryStats s0 = memory_stats(Device::CPU);
  reset_peak_memory_stats(Device::CPU);
  {
    Tensor a = empty({1000}, kFloat32);     // 4000 B
    Tensor b = empty({10, 10}, kBFloat16);  // 200 B
    const MemoryStats s1 = memory_stats();
    EXPECT_EQ(s1.allocated_bytes - s0.allocated_bytes, 4200);
    EXPECT_EQ(s1.num_allocs - s0.num_allocs, 2);
    Tensor v = a.view({10, 100});  // a view allocates nothing
    EXPECT_EQ(memory_stats().allocated_bytes, s1.allocated_bytes);
    { Tensor c = empty({250}, kFloat64); }  // 2000 B, freed at once
    const MemoryStats s2 = memory_stats();
    EXPECT_EQ(s2.allocated_bytes, s1.allocated_bytes);
    EXPECT_EQ(s2.peak_allocated_bytes - s0.allocated_bytes, 6200);
    EXPECT_EQ(s2.num_frees - s0.num_frees, 1);
  }
  const MemoryStats s3 = memory_stats();
  EXPECT_EQ(s3.allocated_bytes, s0.allocated_bytes);
  reset_peak_memory_stats();
  EXPECT_EQ(memory_stats().peak_allocated_bytes, s0.allocated_bytes);
}

TEST(MemoryStats, ThreadSafeCounters) {
  const auto before = memory_stats().allocated_bytes;
  auto work = [] {
    for (int i = 0; i < 2000; ++i) Tensor t = empty({64});
  };
  std::thread t1(work), t2(work);
  t1.join();
  t2.join();
  EXPECT_EQ(memory_stats().allocated_bytes, before);
}

TEST(Capabilities, QueriesAnswerWithoutADevice) {
  const CpuFeatures& f = cpu_features();
  if (f.avx512_bf16) EXPECT_TRUE(f.avx512f);
  EXPECT_TRUE(is_bf16_supported(Device::CPU));
  if (!cuda_is_available()) EXPECT_FALSE(is_bf16_supported(Device::CUDA));
}

TEST(HalfTypes, ArithmeticGoesThroughFloatAndLimitsAreRight) {
  EXPECT_EQ(float(half(1.5f) + half(2.25f)), 3.75f);
  EXPECT_EQ(float(bfloat16(3.0f) * bfloat16(0.5f)), 1.5f);
  EXPECT_EQ(float(std::numeric_limits<half>::max()), 65504.0f);
  EXPECT_EQ(float(std::numeric_limits<half>::epsilon()), 0.0009765625f);
  EXPECT_EQ(float(std::numeric_limits<bfloat16>::epsilon()), 0.0078125f);
  EXPECT_EQ(float(std::numeric_limits<bfloat16>::max()), 3.3895313892515355e38f);
  EXPECT_TRUE(std::isnan(float(std::numeric_limits<half>::quiet_NaN())));
  EXPECT_TRUE(std::isnan(float(bfloat16(std::numeric_limits<float>::quiet_NaN()))));
  static_assert(sizeof(half) == 2 && sizeof(bfloat16) == 2);
}


TEST(MemoryStats, LargeBlocksAreCachedAndReusedWithoutChangingAllocatedBytes) {
  empty_cache();
  const MemoryStats s0 = memory_stats();
  void* first = nullptr;
  {
    Tensor big = empty({1 << 20}, kFloat32);  // 4 MiB
    first = big.data_ptr();
    EXPECT_EQ(memory_stats().allocated_bytes - s0.allocated_bytes, 4 << 20);
  }
  const MemoryStats s1 = memory_stats();
  EXPECT_EQ(s1.allocated_bytes, s0.allocated_bytes);
  EXPECT_EQ(s1.reserved_bytes - s0.reserved_bytes, 4 << 20);  // kept for the next step
  {
    Tensor again = empty({1 << 20}, kFloat32);
    EXPECT_EQ(again.data_ptr(), first);  // reused, no fresh pages
    EXPECT_EQ(memory_stats().reserved_bytes, s1.reserved_bytes);
  }
  empty_cache();
  EXPECT_EQ(memory_stats().reserved_bytes, s0.reserved_bytes);
}

// Among cached blocks of one size the most recently freed is reused first: it is the one still
// in the CPU's caches.
TEST(MemoryStats, TheMostRecentlyFreedBlockIsReusedFirst) {
  empty_cache();
  void* pa = nullptr;
  void* pb = nullptr;
  void* pc = nullptr;
  {
    Tensor a = empty({1 << 18}, kFloat32), b = empty({1 << 18}, kFloat32), c = empty({1 << 18}, kFloat32);
    pa = a.data_ptr(), pb = b.data_ptr(), pc = c.data_ptr();
    a = Tensor();  // freed first
    c = Tensor();
    b = Tensor();  // freed last
  }
  Tensor x = empty({1 << 18}, kFloat32), y = empty({1 << 18}, kFloat32), z = empty({1 << 18}, kFloat32);
  EXPECT_EQ(x.data_ptr(), pb);
  EXPECT_EQ(y.data_ptr(), pc);
  EXPECT_EQ(z.data_ptr(), pa);
  x = y = z = Tensor();
  empty_cache();
}
