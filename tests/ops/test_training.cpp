// Issue-level check: a two-layer MLP and a small CNN, written with the functional ops and plain
// SGD, learn a synthetic task in float32 and with bfloat16 tensors.
#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

using namespace mixprec;

namespace {
struct TrainData {
  Tensor x, y;
};
// Class k's samples are noise around a fixed random prototype: learnable in a few steps.
TrainData tr_make_data(const Shape& sample_shape, int64_t n, int64_t classes, uint64_t seed) {
  Generator g(seed);
  Shape proto_shape{classes};
  proto_shape.insert(proto_shape.end(), sample_shape.begin(), sample_shape.end());
  const Tensor protos = randn(proto_shape, kFloat32, g);
  const Tensor y = randint(0, classes, {n}, kInt64, g);
  Shape xs{n};
  xs.insert(xs.end(), sample_shape.begin(), sample_shape.end());
  const Tensor x = add(index_select(protos, 0, y), mul(randn(xs, kFloat32, g), 0.5));
  return {x, y};
}

Tensor tr_param(const Shape& s, double scale, Generator& g, DType d) {
  Tensor t = mul(randn(s, kFloat32, g), scale).to(d);
  t.requires_grad_();
  return t;
}

void tr_sgd(std::vector<Tensor>& params, double lr) {
  no_grad ng;
  for (Tensor& p : params) {
    p.copy_(sub(p, mul(p.grad(), lr)));
    p.set_grad(Tensor());
  }
}

double tr_run(const std::function<Tensor(const Tensor&)>& model, std::vector<Tensor>& params, const TrainData& d, DType dtype,
              int steps, double lr, double* first_loss) {
  double last = 0;
  const Tensor x = d.x.to(dtype);
  for (int s = 0; s < steps; ++s) {
    Tensor loss = cross_entropy(model(x), d.y);
    EXPECT_EQ(loss.dtype(), dtype);  // computed in float32, rounded once to the input dtype
    const double l = loss.to(kFloat32).item<double>();
    if (s == 0) *first_loss = l;
    last = l;
    loss.backward();
    tr_sgd(params, lr);
  }
  return last;
}
}  // namespace

TEST(Training, TwoLayerMlpLossFalls) {
  const TrainData d = tr_make_data({20}, 256, 4, 1);
  for (DType dtype : {kFloat32, kBFloat16}) {
    Generator g(2);
    std::vector<Tensor> p{tr_param({32, 20}, 0.2, g, dtype), tr_param({32}, 0.0, g, dtype), tr_param({4, 32}, 0.2, g, dtype),
                          tr_param({4}, 0.0, g, dtype)};
    auto model = [&](const Tensor& x) { return linear(relu(linear(x, p[0], p[1])), p[2], p[3]); };
    double first = 0;
    const double last = tr_run(model, p, d, dtype, 60, 0.2, &first);
    EXPECT_LT(last, 0.3 * first) << "dtype " << dtype << ": loss " << first << " -> " << last;
    EXPECT_EQ(p[0].grad().defined(), false);
    EXPECT_EQ(p[0].dtype(), dtype);
  }
}

TEST(Training, SmallCnnLossFalls) {
  const TrainData d = tr_make_data({1, 12, 12}, 128, 3, 3);
  for (DType dtype : {kFloat32, kBFloat16}) {
    Generator g(4);
    std::vector<Tensor> p{tr_param({8, 1, 3, 3}, 0.3, g, dtype), tr_param({8}, 0.0, g, dtype),
                          tr_param({3, 8 * 6 * 6}, 0.05, g, dtype), tr_param({3}, 0.0, g, dtype)};
    auto model = [&](const Tensor& x) {
      Tensor h = relu(conv2d(x, p[0], p[1], {1, 1}, {1, 1}));
      h = max_pool2d(h, {2, 2});
      return linear(h.flatten(1), p[2], p[3]);
    };
    double first = 0;
    const double last = tr_run(model, p, d, dtype, 40, 0.1, &first);
    EXPECT_LT(last, 0.3 * first) << "dtype " << dtype << ": loss " << first << " -> " << last;
  }
}
