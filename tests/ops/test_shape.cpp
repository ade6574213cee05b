#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

#include "ops/op_test_util.hpp"

#include <cmath>
#include <vector>

using namespace mixprec;

namespace {

// Values of any tensor as doubles, row-major.
Tensor shp_leaf(Tensor t) {
  t.requires_grad_();
  return t;
}
// A non-contiguous float64 leaf of `shape`: the transpose of a [shape[1], shape[0]] tensor.
Tensor shp_transposed_leaf(int64_t r, int64_t c, uint64_t seed) {
  Generator g(seed);
  Tensor t = randn({c, r}, kFloat64, g).transpose(0, 1);
  EXPECT_FALSE(t.is_contiguous());
  t.requires_grad_();
  return t;
}
Tensor shp_randn64(const Shape& s, uint64_t seed) {
  Generator g(seed);
  return shp_leaf(randn(s, kFloat64, g));
}
Tensor shp_idx(std::vector<int64_t> v, Shape s = {}) { return tensor(v, std::move(s)); }

// Runs f on 16-bit copies of the float32 inputs and compares with f on the float32 inputs.
template <class F>
void shp_check_low_precision(const std::vector<Tensor>& inputs32, F f, double bf16_tol, double fp16_tol) {
  const Tensor ref = f(inputs32);
  for (auto [dt, tol] : {std::pair{kBFloat16, bf16_tol}, std::pair{kFloat16, fp16_tol}}) {
    std::vector<Tensor> low;
    for (const Tensor& t : inputs32) low.push_back(t.is_floating_point() ? t.to(dt) : t);
    const Tensor out = f(low);
    EXPECT_EQ(out.dtype(), dt);
    EXPECT_LT(mixprec::testing::rel_error(out, ref), tol) << name(dt);
  }
}

}  // namespace

// ---------------- cat ----------------
TEST(ShapeCat, ForwardMatchesLoops) {
  Generator g(1);
  Tensor a = randn({2, 3, 4}, kFloat32, g), b = randn({2, 5, 4}, kFloat32, g), c = randn({2, 1, 4}, kFloat32, g);
  Tensor out = cat({a, b, c}, 1);
  ASSERT_EQ(out.sizes(), (Shape{2, 9, 4}));
  auto o = out.accessor<float, 3>();
  for (int64_t i = 0; i < 2; ++i)
    for (int64_t j = 0; j < 9; ++j)
      for (int64_t k = 0; k < 4; ++k) {
        const float want = j < 3 ? a.accessor<float, 3>()[i][j][k]
                           : j < 8 ? b.accessor<float, 3>()[i][j - 3][k]
                                   : c.accessor<float, 3>()[i][j - 8][k];
        ASSERT_EQ(o[i][j][k], want);
      }
  // Negative dim, and a non-contiguous input.
  Tensor bt = randn({4, 2, 5}, kFloat32, g).permute({1, 2, 0});
  EXPECT_LT(mixprec::testing::rel_error(cat({a, bt}, -2), cat({a, bt.contiguous()}, 1)), 1e-7);
  // Last dim.
  Tensor d = cat({a, a}, 2);
  EXPECT_EQ(d.sizes(), (Shape{2, 3, 8}));
  EXPECT_EQ((d.accessor<float, 3>()[1][2][6]), (a.accessor<float, 3>()[1][2][2]));
}

TEST(ShapeCat, Gradcheck) {
  Tensor a = shp_randn64({2, 3}, 1), b = shp_transposed_leaf(4, 3, 2), c = shp_randn64({1, 3}, 3);
  auto r = gradcheck([](const std::vector<Tensor>& in) { return cat(in, 0); }, {a, b, c});
  EXPECT_TRUE(r.ok) << r.message;
  Tensor x = shp_randn64({3, 2}, 4), y = shp_transposed_leaf(3, 5, 5);
  auto r2 = gradcheck([](const std::vector<Tensor>& in) { return mul(cat(in, 1), cat({in[1], in[0]}, -1)); }, {x, y});
  EXPECT_TRUE(r2.ok) << r2.message;
}

TEST(ShapeCat, MixedDtypesPromoteAndGradientsKeepInputDtypes) {
  Tensor a = ones({2, 2}, kBFloat16), b = full({1, 2}, 2.0, kFloat32), i = full({1, 2}, 3.0, kInt64);
  a.requires_grad_();
  b.requires_grad_();
  Tensor out = cat({a, b, i});
  EXPECT_EQ(out.dtype(), kFloat32);
  EXPECT_EQ(mixprec::testing::to_doubles(out), (std::vector<double>{1, 1, 1, 1, 2, 2, 3, 3}));
  sum(mul(out, arange(0.0, 8.0, 1.0, kFloat32).reshape({4, 2}))).backward();
  EXPECT_EQ(a.grad().dtype(), kBFloat16);
  EXPECT_EQ(b.grad().dtype(), kFloat32);
  EXPECT_EQ(mixprec::testing::to_doubles(a.grad()), (std::vector<double>{0, 1, 2, 3}));
  EXPECT_EQ(mixprec::testing::to_doubles(b.grad()), (std::vector<double>{4, 5}));
  // Integer-only cat stays integer.
  EXPECT_EQ(cat({i, i}).dtype(), kInt64);
}

TEST(ShapeCat, UnderAutocastPromotesAndSkipsLegacyEmpty) {
  Tensor a = ones({2, 3}, kBFloat16), b = ones({1, 3}, kFloat32);
  {
    autocast ac(Device::CPU, kBFloat16);
    EXPECT_EQ(cat({a, b}).dtype(), kFloat32);  // Promote: the widest input wins
    EXPECT_EQ(cat({a, a}).dtype(), kBFloat16);
  }
  // A 1-D empty tensor is skipped whatever the others' rank (PyTorch's legacy rule).
  Tensor e = empty({0}, kFloat32);
  Tensor out = cat({e, b, e, b});
  EXPECT_EQ(out.sizes(), (Shape{2, 3}));
  EXPECT_EQ(cat({e, e}).sizes(), (Shape{0}));
}

TEST(ShapeCat, LowPrecisionIsExactCopy) {
  Generator g(3);
  shp_check_low_precision({randn({3, 4}, kFloat32, g), randn({2, 4}, kFloat32, g)},
                          [](const std::vector<Tensor>& in) { return cat(in, 0); }, 1e-2, 2e-3);
}

TEST(ShapeCat, Errors) {
  EXPECT_THROW(cat({}), Error);
  EXPECT_THROW(cat({ones({2, 3}), ones({2, 4})}, 0), Error);
  EXPECT_THROW(cat({ones({2, 3}), ones({2, 3, 1})}, 0), Error);
  EXPECT_THROW(cat({ones({2, 3}), ones({2, 3})}, 2), Error);
  EXPECT_THROW(cat({scalar_tensor(1.0), scalar_tensor(2.0)}), Error);
  EXPECT_THROW(cat({ones({2}), Tensor()}), Error);
  try {
    cat({ones({2, 3}), ones({5, 4})}, 0);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cat"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("[5, 4]"), std::string::npos) << e.what();
  }
}

// ---------------- stack ----------------
TEST(ShapeStack, ForwardAndGradcheck) {
  Generator g(4);
  Tensor a = randn({2, 3}, kFloat32, g), b = randn({2, 3}, kFloat32, g);
  for (int64_t d : {0, 1, 2, -1}) {
    Tensor s = stack({a, b}, d);
    const int64_t w = d < 0 ? d + 3 : d;
    Shape want{2, 3};
    want.insert(want.begin() + w, 2);
    ASSERT_EQ(s.sizes(), want);
    for (int64_t i = 0; i < 2; ++i)
      for (int64_t j = 0; j < 3; ++j) {
        EXPECT_EQ((s.select(w, 0).accessor<float, 2>()[i][j]), (a.accessor<float, 2>()[i][j]));
        EXPECT_EQ((s.select(w, 1).accessor<float, 2>()[i][j]), (b.accessor<float, 2>()[i][j]));
      }
  }
  Tensor x = shp_randn64({2, 3}, 6), y = shp_transposed_leaf(2, 3, 7), z = shp_randn64({2, 3}, 8);
  auto r = gradcheck([](const std::vector<Tensor>& in) { return stack(in, 1); }, {x, y, z});
  EXPECT_TRUE(r.ok) << r.message;
  shp_check_low_precision({a, b}, [](const std::vector<Tensor>& in) { return stack(in, 2); }, 1e-2, 2e-3);
  EXPECT_EQ(stack({ones({2}, kBFloat16), ones({2}, kFloat64)}).dtype(), kFloat64);
}

TEST(ShapeStack, Errors) {
  EXPECT_THROW(stack({}), Error);
  EXPECT_THROW(stack({ones({2, 3}), ones({3, 2})}), Error);
  EXPECT_THROW(stack({ones({2, 3}), ones({2, 3})}, 3), Error);
  EXPECT_THROW(stack({ones({2, 3}), ones({2, 3})}, -4), Error);
}

// ---------------- split / chunk ----------------
TEST(ShapeSplit, PiecesAreViewsWithGradients) {
  Tensor x = arange(0.0, 10.0, 1.0, kFloat32).reshape({2, 5});
  auto parts = split(x, 2, 1);
  ASSERT_EQ(parts.size(), 3u);
  EXPECT_EQ(parts[0].sizes(), (Shape{2, 2}));
  EXPECT_EQ(parts[2].sizes(), (Shape{2, 1}));
  EXPECT_EQ(mixprec::testing::to_doubles(parts[1]), (std::vector<double>{2, 3, 7, 8}));
  EXPECT_EQ(parts[1].storage(), x.storage());  // a view, not a copy
  auto bysize = split(x, std::vector<int64_t>{1, 0, 4}, -1);
  ASSERT_EQ(bysize.size(), 3u);
  EXPECT_EQ(bysize[1].sizes(), (Shape{2, 0}));
  EXPECT_EQ(mixprec::testing::to_doubles(bysize[2]), (std::vector<double>{1, 2, 3, 4, 6, 7, 8, 9}));
  auto ch = chunk(x, 3, 1);  // ceil(5/3) = 2: pieces 2, 2, 1
  ASSERT_EQ(ch.size(), 3u);
  EXPECT_EQ(ch[2].sizes(), (Shape{2, 1}));
  EXPECT_EQ(chunk(arange(6, kInt64), 4).size(), 3u);  // ceil(6/4) = 2: fewer pieces than asked, as PyTorch
  EXPECT_EQ(chunk(empty({0, 2}), 3).size(), 3u);

  Tensor w = shp_transposed_leaf(6, 3, 9);
  auto r = gradcheck([](const std::vector<Tensor>& in) {
    auto p = split(in[0], 2, 0);
    auto q = chunk(in[0], 2, 1);
    return add(mul(p[0], p[2]), sum(mul(q[0], q[0])));
  }, {w});
  EXPECT_TRUE(r.ok) << r.message;
}

TEST(ShapeSplit, Errors) {
  Tensor x = ones({4, 3});
  EXPECT_THROW(split(x, 0, 0), Error);
  EXPECT_THROW(split(x, -1, 0), Error);
  EXPECT_THROW(split(x, std::vector<int64_t>{1, 2}, 0), Error);
  EXPECT_THROW(split(x, std::vector<int64_t>{5, -1}, 0), Error);
  EXPECT_THROW(split(x, 2, 2), Error);
  EXPECT_THROW(split(scalar_tensor(1.0), 1, 0), Error);
  EXPECT_THROW(chunk(x, 0, 0), Error);
}

// ---------------- index_select ----------------
TEST(ShapeIndexSelect, ForwardMatchesLoops) {
  Generator g(10);
  Tensor x = randn({3, 5, 4}, kFloat32, g);
  for (DType idt : {kInt64, kInt32}) {
    Tensor idx = shp_idx({4, 0, 4, 2}).to(idt);
    Tensor out = index_select(x, 1, idx);
    ASSERT_EQ(out.sizes(), (Shape{3, 4, 4}));
    const int64_t want[] = {4, 0, 4, 2};
    for (int64_t i = 0; i < 3; ++i)
      for (int64_t k = 0; k < 4; ++k)
        for (int64_t j = 0; j < 4; ++j) ASSERT_EQ((out.accessor<float, 3>()[i][k][j]), (x.accessor<float, 3>()[i][want[k]][j]));
  }
  // Integer tensors, dims 0 and -1, an empty index.
  Tensor xi = arange(12, kInt64).reshape({3, 4});
  EXPECT_EQ(mixprec::testing::to_doubles(index_select(xi, 0, shp_idx({2, 2}))), (std::vector<double>{8, 9, 10, 11, 8, 9, 10, 11}));
  EXPECT_EQ(mixprec::testing::to_doubles(index_select(xi, -1, shp_idx({3, 0}))), (std::vector<double>{3, 0, 7, 4, 11, 8}));
  EXPECT_EQ(index_select(xi, 0, empty({0}, kInt64)).sizes(), (Shape{0, 4}));
}

TEST(ShapeIndexSelect, GradcheckRepeatedIndices) {
  Tensor x = shp_randn64({5, 3}, 11);
  Tensor idx = shp_idx({0, 2, 2, 4, 0, 0});
  auto r = gradcheck([&](const std::vector<Tensor>& in) { return index_select(in[0], 0, idx); }, {x});
  EXPECT_TRUE(r.ok) << r.message;
  Tensor xt = shp_transposed_leaf(3, 6, 12);
  auto r2 = gradcheck([&](const std::vector<Tensor>& in) { return index_select(in[0], 1, shp_idx({5, 1, 1}).to(kInt32)); }, {xt});
  EXPECT_TRUE(r2.ok) << r2.message;
  // The summed gradient for a repeated row, explicitly.
  Tensor w = shp_leaf(ones({3, 2}, kFloat32));
  sum(index_select(w, 0, shp_idx({1, 1, 1, 2}))).backward();
  EXPECT_EQ(mixprec::testing::to_doubles(w.grad()), (std::vector<double>{0, 0, 3, 3, 1, 1}));
}

TEST(ShapeIndexSelect, LowPrecisionForwardAndBackward) {
  Generator g(13);
  Tensor x = randn({6, 8}, kFloat32, g);
  Tensor idx = randint(0, 6, {40}, kInt64, g);
  shp_check_low_precision({x}, [&](const std::vector<Tensor>& in) { return index_select(in[0], 0, idx); }, 1e-2, 2e-3);
  // Many repeats: the 16-bit gradient accumulates in float32 and rounds once.
  Tensor gy = randn({40, 8}, kFloat32, g);
  auto grad_of = [&](DType dt) {
    Tensor w = shp_leaf(x.to(dt).detach());
    index_select(w, 0, idx).backward(gy.to(dt));
    EXPECT_EQ(w.grad().dtype(), dt);
    return w.grad();
  };
  const Tensor ref = grad_of(kFloat32);
  EXPECT_LT(mixprec::testing::rel_error(grad_of(kBFloat16), ref), 1e-2);
  EXPECT_LT(mixprec::testing::rel_error(grad_of(kFloat16), ref), 2e-3);
}

TEST(ShapeIndexSelect, Errors) {
  Tensor x = ones({3, 4});
  EXPECT_THROW(index_select(x, 0, shp_idx({3})), Error);
  EXPECT_THROW(index_select(x, 0, shp_idx({-1})), Error);
  EXPECT_THROW(index_select(x, 0, tensor({1.0f})), Error);
  EXPECT_THROW(index_select(x, 0, shp_idx({0, 1}, {1, 2})), Error);
  EXPECT_THROW(index_select(x, 2, shp_idx({0})), Error);
  EXPECT_THROW(index_select(scalar_tensor(1.0), 0, shp_idx({0})), Error);
  try {
    index_select(x, 1, shp_idx({0, 9}));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("index_select"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("9"), std::string::npos) << e.what();
  }
}

// ---------------- gather ----------------
TEST(ShapeGather, ForwardMatchesLoops) {
  Generator g(14);
  Tensor x = randn({3, 5, 4}, kFloat32, g);
  // index smaller than x outside dim, as PyTorch allows.
  Tensor idx = randint(0, 5, {2, 7, 3}, kInt64, g);
  Tensor out = gather(x, 1, idx);
  ASSERT_EQ(out.sizes(), (Shape{2, 7, 3}));
  auto xa = x.accessor<float, 3>();
  auto ia = idx.accessor<int64_t, 3>();
  for (int64_t i = 0; i < 2; ++i)
    for (int64_t j = 0; j < 7; ++j)
      for (int64_t k = 0; k < 3; ++k) ASSERT_EQ((out.accessor<float, 3>()[i][j][k]), xa[i][ia[i][j][k]][k]);
  Tensor idx0 = randint(0, 3, {4, 5, 4}, kInt32, g);
  Tensor out0 = gather(x, 0, idx0);
  auto i0 = idx0.accessor<int32_t, 3>();
  for (int64_t i = 0; i < 4; ++i)
    for (int64_t j = 0; j < 5; ++j)
      for (int64_t k = 0; k < 4; ++k) ASSERT_EQ((out0.accessor<float, 3>()[i][j][k]), xa[i0[i][j][k]][j][k]);
  // Non-contiguous input and index.
  Tensor xt = x.transpose(0, 2);  // [4, 5, 3]
  Tensor it = randint(0, 3, {4, 3, 2}, kInt64, g).transpose(1, 2);  // [4, 2, 3]
  EXPECT_LT(mixprec::testing::rel_error(gather(xt, -1, it), gather(xt.contiguous(), 2, it.contiguous())), 1e-7);
  // Scalars.
  EXPECT_EQ(gather(scalar_tensor(5.0), 0, full({}, 0.0, kInt64)).item<float>(), 5.0f);
}

TEST(ShapeGather, Gradcheck) {
  Tensor x = shp_randn64({3, 4}, 15);
  Tensor idx = shp_idx({0, 0, 3, 1, 2, 2, 2, 0, 3, 3, 1, 1}, {3, 4});  // repeats within rows
  auto r = gradcheck([&](const std::vector<Tensor>& in) { return gather(in[0], 1, idx); }, {x});
  EXPECT_TRUE(r.ok) << r.message;
  Tensor xt = shp_transposed_leaf(4, 3, 16);
  Tensor idx0 = shp_idx({3, 0, 1, 3, 3, 3}, {2, 3});
  auto r2 = gradcheck([&](const std::vector<Tensor>& in) { return gather(in[0], 0, idx0); }, {xt});
  EXPECT_TRUE(r2.ok) << r2.message;
}

TEST(ShapeGather, LowPrecision) {
  Generator g(17);
  Tensor x = randn({8, 16}, kFloat32, g);
  Tensor idx = randint(0, 16, {8, 40}, kInt64, g);
  shp_check_low_precision({x}, [&](const std::vector<Tensor>& in) { return gather(in[0], 1, idx); }, 1e-2, 2e-3);
  Tensor gy = randn({8, 40}, kFloat32, g);
  auto grad_of = [&](DType dt) {
    Tensor w = shp_leaf(x.to(dt).detach());
    gather(w, 1, idx).backward(gy.to(dt));
    EXPECT_EQ(w.grad().dtype(), dt);
    return w.grad();
  };
  const Tensor ref = grad_of(kFloat32);
  EXPECT_LT(mixprec::testing::rel_error(grad_of(kBFloat16), ref), 1e-2);
  EXPECT_LT(mixprec::testing::rel_error(grad_of(kFloat16), ref), 2e-3);
}

TEST(ShapeGather, Errors) {
  Tensor x = ones({3, 4});
  EXPECT_THROW(gather(x, 1, shp_idx({0, 1})), Error);                  // rank differs
  EXPECT_THROW(gather(x, 1, shp_idx({0, 4}, {1, 2})), Error);          // out of range
  EXPECT_THROW(gather(x, 1, shp_idx({0, -1}, {1, 2})), Error);
  EXPECT_THROW(gather(x, 1, zeros({4, 1}, kInt64)), Error);             // larger outside dim
  EXPECT_THROW(gather(x, 2, zeros({1, 1}, kInt64)), Error);
  EXPECT_THROW(gather(x, 0, zeros({1, 1}, kFloat32)), Error);
}

// ---------------- embedding ----------------
TEST(ShapeEmbedding, ForwardMatchesLoops) {
  Generator g(18);
  Tensor w = randn({7, 5}, kFloat32, g);
  for (DType idt : {kInt64, kInt32}) {
    Tensor idx = randint(0, 7, {3, 4}, idt, g);
    Tensor out = embedding(w, idx);
    ASSERT_EQ(out.sizes(), (Shape{3, 4, 5}));
    const Tensor i64 = idx.to(kInt64);
    for (int64_t a = 0; a < 3; ++a)
      for (int64_t b = 0; b < 4; ++b)
        for (int64_t d = 0; d < 5; ++d)
          ASSERT_EQ((out.accessor<float, 3>()[a][b][d]), (w.accessor<float, 2>()[i64.accessor<int64_t, 2>()[a][b]][d]));
  }
  // Scalar index, non-contiguous weight and indices, padding row is still looked up in forward.
  EXPECT_EQ(embedding(w, full({}, 3.0, kInt64)).sizes(), (Shape{5}));
  Tensor wt = randn({5, 7}, kFloat32, g).t();
  Tensor it = randint(0, 7, {4, 3}, kInt64, g).t();
  EXPECT_LT(mixprec::testing::rel_error(embedding(wt, it), embedding(wt.contiguous(), it.contiguous())), 1e-7);
  EXPECT_LT(mixprec::testing::rel_error(embedding(w, shp_idx({2}), 2), w.select(0, 2).unsqueeze(0)), 1e-7);
}

TEST(ShapeEmbedding, GradcheckRepeatedIndices) {
  Tensor w = shp_randn64({6, 3}, 19);
  Tensor idx = shp_idx({1, 4, 1, 0, 5, 1, 4, 4}, {2, 4});
  auto r = gradcheck([&](const std::vector<Tensor>& in) { return embedding(in[0], idx); }, {w});
  EXPECT_TRUE(r.ok) << r.message;
  Tensor wt = shp_transposed_leaf(6, 4, 20);
  auto r2 = gradcheck([&](const std::vector<Tensor>& in) { return embedding(in[0], idx.to(kInt32), 2); }, {wt});  // 2 is unused
  EXPECT_TRUE(r2.ok) << r2.message;
}

TEST(ShapeEmbedding, PaddingIdxGetsNoGradient) {
  Tensor idx = shp_idx({0, 2, 2, 1, 2, 3, 0}, {7});
  for (int64_t pad : {2, -2}) {  // -2 is row 2 of 4
    Tensor w = shp_leaf(ones({4, 2}, kFloat64));
    Tensor gy = arange(0.0, 14.0, 1.0, kFloat64).reshape({7, 2});
    embedding(w, idx, pad).backward(gy);
    // Row r gets the sum of gy over the positions that look it up; row 2 gets nothing.
    EXPECT_EQ(mixprec::testing::to_doubles(w.grad()), (std::vector<double>{0 + 12, 1 + 13, 6, 7, 0, 0, 10, 11}));
  }
}

TEST(ShapeEmbedding, LowPrecision) {
  Generator g(21);
  Tensor w = randn({50, 16}, kFloat32, g);
  Tensor idx = randint(0, 50, {8, 64}, kInt64, g);
  shp_check_low_precision({w}, [&](const std::vector<Tensor>& in) { return embedding(in[0], idx); }, 1e-2, 2e-3);
  Tensor gy = randn({8, 64, 16}, kFloat32, g);
  auto grad_of = [&](DType dt) {
    Tensor wl = shp_leaf(w.to(dt).detach());
    embedding(wl, idx, 7).backward(gy.to(dt));
    EXPECT_EQ(wl.grad().dtype(), dt);
    return wl.grad();
  };
  const Tensor ref = grad_of(kFloat32);
  EXPECT_LT(mixprec::testing::rel_error(grad_of(kBFloat16), ref), 1e-2);
  EXPECT_LT(mixprec::testing::rel_error(grad_of(kFloat16), ref), 2e-3);
}

TEST(ShapeEmbedding, ErrorsNameTheBadIndexAndV) {
  Tensor w = ones({5, 3});
  try {
    embedding(w, shp_idx({0, 7, 1}));
    FAIL() << "no error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("embedding"), std::string::npos) << m;
    EXPECT_NE(m.find("7"), std::string::npos) << m;
    EXPECT_NE(m.find("V = 5"), std::string::npos) << m;
  }
  EXPECT_THROW(embedding(w, shp_idx({-1})), Error);
  EXPECT_THROW(embedding(w, tensor({1.0f})), Error);
  EXPECT_THROW(embedding(ones({5}), shp_idx({0})), Error);
  EXPECT_THROW(embedding(w, shp_idx({0}), 5), Error);
  EXPECT_THROW(embedding(w, shp_idx({0}), -6), Error);
}

// ---------------- cumsum ----------------
TEST(ShapeCumsum, ForwardMatchesLoops) {
  Generator g(22);
  Tensor x = randn({3, 70, 5}, kFloat32, g);
  for (int64_t d : {0, 1, 2, -1}) {
    const int64_t w = d < 0 ? d + 3 : d;
    Tensor out = cumsum(x, d);
    ASSERT_EQ(out.sizes(), x.sizes());
    Tensor ref = empty(x.sizes(), kFloat32);
    auto xa = x.accessor<float, 3>();
    auto ra = ref.accessor<float, 3>();
    for (int64_t a = 0; a < 3; ++a)
      for (int64_t b = 0; b < 70; ++b)
        for (int64_t c = 0; c < 5; ++c) {
          double s = 0;
          int64_t idx[3] = {a, b, c};
          for (int64_t k = 0; k <= idx[w]; ++k) {
            int64_t j[3] = {a, b, c};
            j[w] = k;
            s += xa[j[0]][j[1]][j[2]];
          }
          ra[a][b][c] = static_cast<float>(s);
        }
    EXPECT_LT(mixprec::testing::rel_error(out, ref), 1e-6) << "dim " << d;
  }
  // Integers accumulate in int64; a scalar is its own cumsum.
  Tensor xi = tensor(std::vector<int32_t>{1, 2, 3, 4});
  Tensor ci = cumsum(xi, 0);
  EXPECT_EQ(ci.dtype(), kInt64);
  EXPECT_EQ(mixprec::testing::to_doubles(ci), (std::vector<double>{1, 3, 6, 10}));
  EXPECT_EQ(mixprec::testing::to_doubles(cumsum(tensor(std::vector<uint8_t>{1, 1, 1}, {3}, kBool), 0)), (std::vector<double>{1, 2, 3}));
  EXPECT_EQ(cumsum(scalar_tensor(4.0), 0).item<float>(), 4.0f);
  // Non-contiguous input.
  Tensor xt = x.transpose(0, 1);
  EXPECT_LT(mixprec::testing::rel_error(cumsum(xt, 1), cumsum(xt.contiguous(), 1)), 1e-7);
}

TEST(ShapeCumsum, Gradcheck) {
  Tensor x = shp_randn64({3, 4, 2}, 23);
  for (int64_t d : {0, 1, -1}) {
    auto r = gradcheck([&](const std::vector<Tensor>& in) { return cumsum(in[0], d); }, {x});
    EXPECT_TRUE(r.ok) << "dim " << d << ": " << r.message;
  }
  Tensor xt = shp_transposed_leaf(5, 3, 24);
  auto r = gradcheck([](const std::vector<Tensor>& in) { return cumsum(in[0], 0); }, {xt});
  EXPECT_TRUE(r.ok) << r.message;
}

TEST(ShapeCumsum, LowPrecisionAndAutocast) {
  Generator g(25);
  Tensor x = randn({4, 300}, kFloat32, g);
  shp_check_low_precision({x}, [](const std::vector<Tensor>& in) { return cumsum(in[0], 1); }, 1e-2, 2e-3);
  Tensor gy = randn({4, 300}, kFloat32, g);
  auto grad_of = [&](DType dt) {
    Tensor w = shp_leaf(x.to(dt).detach());
    cumsum(w, 1).backward(gy.to(dt));
    EXPECT_EQ(w.grad().dtype(), dt);
    return w.grad();
  };
  const Tensor ref = grad_of(kFloat32);
  EXPECT_LT(mixprec::testing::rel_error(grad_of(kBFloat16), ref), 1e-2);
  EXPECT_LT(mixprec::testing::rel_error(grad_of(kFloat16), ref), 2e-3);
  autocast ac(Device::CPU, kBFloat16);
  EXPECT_EQ(cumsum(x.to(kBFloat16), 0).dtype(), kFloat32);  // Float32 policy
}

TEST(ShapeCumsum, Errors) {
  EXPECT_THROW(cumsum(ones({2, 3}), 2), Error);
  EXPECT_THROW(cumsum(ones({2, 3}), -3), Error);
}

// ---------------- tril / triu ----------------
TEST(ShapeTriangle, MasksAndGradients) {
  Tensor x = arange(1.0, 13.0, 1.0, kFloat32).reshape({3, 4});
  EXPECT_EQ(mixprec::testing::to_doubles(tril(x)), (std::vector<double>{1, 0, 0, 0, 5, 6, 0, 0, 9, 10, 11, 0}));
  EXPECT_EQ(mixprec::testing::to_doubles(triu(x)), (std::vector<double>{1, 2, 3, 4, 0, 6, 7, 8, 0, 0, 11, 12}));
  EXPECT_EQ(mixprec::testing::to_doubles(tril(x, 1)), (std::vector<double>{1, 2, 0, 0, 5, 6, 7, 0, 9, 10, 11, 12}));
  EXPECT_EQ(mixprec::testing::to_doubles(triu(x, -1)), (std::vector<double>{1, 2, 3, 4, 5, 6, 7, 8, 0, 10, 11, 12}));
  // Batched, bool (the causal mask) and integer inputs.
  Tensor causal = tril(ones({2, 3, 3}, kBool));
  EXPECT_EQ(causal.dtype(), kBool);
  EXPECT_EQ(mixprec::testing::to_doubles(causal.select(0, 1)), (std::vector<double>{1, 0, 0, 1, 1, 0, 1, 1, 1}));
  EXPECT_EQ(mixprec::testing::to_doubles(triu(arange(4, kInt64).reshape({2, 2}), 1)), (std::vector<double>{0, 1, 0, 0}));
  Tensor w = shp_transposed_leaf(4, 3, 26);
  auto r = gradcheck([](const std::vector<Tensor>& in) { return add(tril(in[0], -1), mul(triu(in[0]), in[0])); }, {w});
  EXPECT_TRUE(r.ok) << r.message;
  EXPECT_THROW(tril(ones({3})), Error);
  EXPECT_THROW(triu(scalar_tensor(1.0)), Error);
}
