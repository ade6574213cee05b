// The bad-input catalogue: every public entry point driven with wrong shapes, wrong dtypes, tensors
// on a device without kernels, empty and zero-size tensors, non-contiguous views, NaN/inf,
// out-of-range indices and labels, and misuse of the scaler and of autograd. Whatever is refused
// is refused with mixprec::Error naming the op and the offending values; whatever is valid (a
// zero-size batch, a strided view, a NaN in the data) gives the right answer; nothing crashes.
#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <typeinfo>

using namespace mixprec;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// Runs f: it must throw mixprec::Error whose message contains every string in `mentions`.
void refused(const std::string& what, const std::function<void()>& f, std::initializer_list<std::string> mentions) {
  try {
    f();
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const std::string& m : mentions)
      EXPECT_NE(msg.find(m), std::string::npos) << what << ": the message does not mention '" << m << "':\n  " << msg;
    return;
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": threw " << typeid(e).name() << " instead of mixprec::Error: " << e.what();
    return;
  }
  ADD_FAILURE() << what << ": was accepted";
}

Tensor rn(const Shape& s, DType d = kFloat32) { return randn(s, kFloat32).to(d); }
Tensor labels(std::vector<int64_t> v) { return tensor(v); }

// Host memory posing as a tensor on the CUDA device: what a kernel must refuse rather than
// dereference (this machine has no GPU, so real CUDA tensors cannot be made here).
Tensor fake_cuda(const Shape& shape, DType d = kFloat32) {
  static std::vector<double> backing(1 << 12, 1.0);
  return from_blob(backing.data(), shape, d, {}, Device::CUDA);
}

double rel_err(const Tensor& got, const Tensor& want) {
  const Tensor g = got.to(kFloat64).contiguous(), w = want.to(kFloat64).contiguous();
  EXPECT_EQ(g.sizes(), w.sizes());
  double num = 0, den = 0;
  for (int64_t i = 0; i < g.numel(); ++i) {
    const double d = g.data<double>()[i] - w.data<double>()[i];
    if (std::isnan(d)) return kInf;
    num += d * d;
    den += w.data<double>()[i] * w.data<double>()[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

bool has_nan(const Tensor& t) {
  const Tensor c = t.to(kFloat64).contiguous();
  for (int64_t i = 0; i < c.numel(); ++i)
    if (std::isnan(c.data<double>()[i])) return true;
  return false;
}

}  // namespace

TEST(BadInputs, WrongShapes) {
  refused("add", [] { add(rn({2, 3}), rn({4})); }, {"add", "[2, 3]", "[4]"});
  refused("mul", [] { mul(rn({2, 3}), rn({3, 2})); }, {"mul", "[2, 3]", "[3, 2]"});
  refused("matmul", [] { matmul(rn({2, 3}), rn({4, 5})); }, {"matmul", "[2, 3]", "[4, 5]"});
  refused("mm 1-D", [] { mm(rn({3}), rn({3, 2})); }, {"mm", "[3]"});
  refused("bmm", [] { bmm(rn({2, 3, 4}), rn({3, 4, 5})); }, {"bmm", "[2, 3, 4]", "[3, 4, 5]"});
  refused("linear", [] { linear(rn({2, 3}), rn({4, 5})); }, {"linear", "[2, 3]", "[4, 5]"});
  refused("addmm", [] { addmm(rn({5}), rn({2, 3}), rn({3, 4})); }, {"addmm", "[5]", "[2, 4]"});
  refused("addmm grows the product", [] { addmm(rn({3, 2, 4}), rn({2, 3}), rn({3, 4})); }, {"addmm", "[3, 2, 4]"});
  refused("conv2d channels", [] { conv2d(rn({1, 3, 8, 8}), rn({4, 2, 3, 3})); }, {"conv2d", "[1, 3, 8, 8]", "[4, 2, 3, 3]"});
  refused("conv2d kernel > input", [] { conv2d(rn({1, 1, 2, 2}), rn({1, 1, 3, 3})); }, {"conv2d", "[1, 1, 2, 2]"});
  refused("conv_transpose2d", [] { conv_transpose2d(rn({1, 3, 4, 4}), rn({2, 2, 3, 3})); }, {"conv_transpose2d", "[2, 2, 3, 3]"});
  refused("max_pool2d", [] { max_pool2d(rn({1, 1, 2, 2}), {3, 3}); }, {"max_pool2d", "[1, 1, 2, 2]"});
  refused("avg_pool2d 2-D", [] { avg_pool2d(rn({4, 4}), {2, 2}); }, {"avg_pool2d", "[4, 4]"});
  refused("batch_norm", [] { batch_norm(rn({2, 3, 4}), zeros({4}), ones({4})); }, {"batch_norm", "[4]", "3"});
  refused("layer_norm", [] { layer_norm(rn({2, 3}), {4}); }, {"layer_norm", "[4]", "[2, 3]"});
  refused("group_norm", [] { group_norm(rn({2, 6, 4}), 4); }, {"group_norm", "6", "4"});
  refused("cross_entropy", [] { cross_entropy(rn({4, 10}), labels({1, 2, 3})); }, {"cross_entropy", "[4, 10]", "[3]"});
  refused("nll_loss", [] { nll_loss(rn({4, 10}), zeros({4, 2}, kInt64)); }, {"nll_loss", "[4, 2]"});
  refused("mse_loss", [] { mse_loss(rn({3}), rn({4})); }, {"mse_loss", "[3]", "[4]"});
  refused("bce_with_logits", [] { binary_cross_entropy_with_logits(rn({3}), rn({4})); },
          {"binary_cross_entropy_with_logits", "[3]", "[4]"});
  refused("sdpa head dims", [] { scaled_dot_product_attention(rn({1, 2, 4, 8}), rn({1, 2, 4, 6}), rn({1, 2, 4, 6})); },
          {"scaled_dot_product_attention", "[1, 2, 4, 8]", "[1, 2, 4, 6]"});
  refused("prelu", [] { prelu(rn({2, 3}), rn({2})); }, {"prelu", "[2]"});
  refused("where", [] { where(ones({2}, kBool), rn({3}), rn({3})); }, {"where", "[2]", "[3]"});
  refused("cat", [] { cat({rn({2, 3}), rn({2, 4})}, 0); }, {"cat", "[2, 3]", "[2, 4]"});
  refused("stack", [] { stack({rn({2}), rn({3})}); }, {"stack", "[2]", "[3]"});
  refused("gather rank", [] { gather(rn({2, 3}), 1, zeros({2, 3, 1}, kInt64)); }, {"gather", "[2, 3, 1]"});
  refused("view", [] { rn({2, 3}).view({4}); }, {"view", "[4]", "[2, 3]"});
  refused("reshape two -1", [] { rn({2, 3}).reshape({-1, -1}); }, {"reshape", "[-1, -1]"});
  refused("permute", [] { rn({2, 3}).permute({0, 0}); }, {"permute", "[0, 0]"});
  refused("expand", [] { rn({2, 3}).expand({4, 3}); }, {"expand", "[2, 3]", "[4, 3]"});
  refused("transpose", [] { rn({2, 3}).transpose(0, 3); }, {"transpose", "3", "[2, 3]"});
  refused("squeeze", [] { rn({2, 3}).squeeze(5); }, {"squeeze", "5"});
  refused("narrow", [] { rn({2, 3}).narrow(0, 1, 5); }, {"narrow", "[1, 6)", "[2, 3]"});
  refused("softmax dim", [] { softmax(rn({2, 3}), 2); }, {"softmax", "2", "[2, 3]"});
  refused("sum dim", [] { sum(rn({2, 3}), {5}); }, {"sum", "5", "[2, 3]"});
  refused("cumsum dim", [] { cumsum(rn({2, 3}), 4); }, {"cumsum", "4"});
  refused("split 0", [] { split(rn({4}), 0); }, {"split", "0"});
  refused("split sizes", [] { split(rn({4}), std::vector<int64_t>{1, 2}, 0); }, {"split", "[1, 2]", "4"});
  refused("chunk 0", [] { chunk(rn({4}), 0); }, {"chunk", "0"});
  refused("tril 1-D", [] { tril(rn({4})); }, {"tril", "[4]"});
  refused("embedding 1-D weight", [] { embedding(rn({5}), labels({1})); }, {"embedding", "[5]"});
  refused("copy_", [] { Tensor a = rn({2, 3}); a.copy_(rn({4})); }, {"copy_", "[4]", "[2, 3]"});
  refused("set_grad", [] { Tensor a = rn({2}); a.requires_grad_(); a.set_grad(rn({3})); }, {"set_grad", "[3]", "[2]"});
  refused("tensor()", [] { tensor({1.0f, 2.0f, 3.0f}, {2, 2}); }, {"tensor", "3", "[2, 2]"});
  refused("empty negative", [] { empty({2, -1}); }, {"empty", "[2, -1]"});
  refused("backward non-scalar", [] { Tensor a = rn({2}); a.requires_grad_(); mul(a, 2.0).backward(); }, {"backward", "[2]"});
  refused("backward grad shape", [] { Tensor a = rn({2}); a.requires_grad_(); mul(a, 2.0).backward(rn({3})); }, {"backward", "[3]", "[2]"});
  refused("nn::Linear", [] { nn::Linear l(4, 3); l.forward(rn({2, 5})); }, {"[2, 5]"});
  refused("nn::Conv2d", [] { nn::Conv2d c(3, 4, 3); c.forward(rn({1, 2, 8, 8})); }, {"conv2d", "[1, 2, 8, 8]"});
  refused("TensorDataset", [] { data::TensorDataset(rn({4, 2}), labels({1, 2, 3})); }, {"TensorDataset", "4", "3"});
}

TEST(BadInputs, WrongDtypes) {
  refused("matmul int", [] { matmul(ones({2, 2}, kInt64), ones({2, 2}, kInt64)); }, {"matmul", "int64"});
  refused("conv2d int", [] { conv2d(ones({1, 1, 4, 4}, kInt32), ones({1, 1, 3, 3}, kInt32)); }, {"conv2d", "int32"});
  refused("softmax int", [] { softmax(ones({2, 3}, kInt64), 1); }, {"softmax", "int64"});
  refused("layer_norm int", [] { layer_norm(ones({2, 3}, kInt64), {3}); }, {"layer_norm", "int64"});
  refused("cross_entropy float target", [] { cross_entropy(rn({4, 10}), rn({4})); }, {"cross_entropy", "float32"});
  refused("nll_loss int input", [] { nll_loss(ones({4, 10}, kInt64), labels({1, 2, 3, 4})); }, {"nll_loss", "int64"});
  refused("mse_loss int", [] { mse_loss(ones({3}, kInt64), ones({3}, kInt64)); }, {"mse_loss", "int64"});
  refused("embedding float idx", [] { embedding(rn({5, 3}), rn({2})); }, {"embedding", "float32"});
  refused("index_select float idx", [] { index_select(rn({5, 3}), 0, rn({2})); }, {"index_select", "float32"});
  refused("gather float idx", [] { gather(rn({5, 3}), 1, rn({5, 3})); }, {"gather", "float32"});
  refused("masked_fill float mask", [] { masked_fill(rn({3}), rn({3}), 0.0); }, {"masked_fill", "float32"});
  refused("where float cond", [] { where(rn({3}), rn({3}), rn({3})); }, {"where", "float32"});
  refused("dropout int", [] { dropout(ones({3}, kInt64), 0.5, true); }, {"dropout", "int64"});
  refused("requires_grad_ int", [] { Tensor t = ones({3}, kInt64); t.requires_grad_(); }, {"requires_grad_", "int64"});
  refused("data<float>", [] { (void)ones({3}, kInt64).data<float>(); }, {"data<float32>", "int64"});
  refused("autocast float32", [] { autocast ac{Device::CPU, kFloat32}; }, {"autocast", "float32"});
  refused("PrecisionTrace float32", [] { amp::PrecisionTrace t{kFloat32}; }, {"PrecisionTrace", "float32"});
  refused("bce under float16 autocast", [] {
    autocast ac{Device::CPU, kFloat16};
    binary_cross_entropy(sigmoid(rn({4})), rand({4}));
  }, {"binary_cross_entropy", "binary_cross_entropy_with_logits"});
  refused("SGD int param", [] { optim::SGD opt({ones({3}, kInt64)}, 0.1); }, {"SGD", "int64"});
}

TEST(BadInputs, TensorsOnADeviceWithoutKernels) {
  const Tensor c = fake_cuda({2, 3});
  const Tensor a = rn({2, 3});
  refused("empty on cuda", [] { empty({2}, kFloat32, Device::CUDA); }, {"cuda"});
  refused("to(cuda)", [&] { (void)a.to(Device::CUDA); }, {"to(cuda)", "[2, 3]"});
  refused("add", [&] { add(c, a); }, {"add", "cuda"});
  refused("add cuda+cuda", [&] { add(c, c); }, {"add", "cuda"});
  refused("mul", [&] { mul(a, c); }, {"mul", "cuda"});
  refused("exp", [&] { exp(c); }, {"exp", "cuda"});
  refused("relu", [&] { relu(c); }, {"relu", "cuda"});
  refused("matmul", [&] { matmul(c, fake_cuda({3, 2})); }, {"matmul", "cuda"});
  refused("linear", [&] { linear(c, fake_cuda({4, 3})); }, {"linear", "cuda"});
  refused("sum", [&] { sum(c); }, {"sum", "cuda"});
  refused("mean", [&] { mean(c, {1}); }, {"mean", "cuda"});
  refused("max", [&] { max(c, 1); }, {"max", "cuda"});
  refused("softmax", [&] { softmax(c, 1); }, {"softmax", "cuda"});
  refused("layer_norm", [&] { layer_norm(c, {3}); }, {"layer_norm", "cuda"});
  refused("cross_entropy", [&] { cross_entropy(c, labels({0, 1})); }, {"cross_entropy", "cuda"});
  refused("conv2d", [&] { conv2d(fake_cuda({1, 1, 4, 4}), fake_cuda({1, 1, 3, 3})); }, {"conv2d", "cuda"});
  refused("max_pool2d", [&] { max_pool2d(fake_cuda({1, 1, 4, 4}), {2, 2}); }, {"max_pool2d", "cuda"});
  refused("embedding", [&] { embedding(c, labels({0})); }, {"embedding", "cuda"});
  refused("cat", [&] { cat({c, a}); }, {"cat", "cuda"});
  refused("clone", [&] { (void)c.clone(); }, {"cuda"});
  refused("to(float16)", [&] { (void)c.to(kFloat16); }, {"cuda"});
  refused("fill_", [&] { Tensor t = c; t.fill_(1.0); }, {"fill_", "cuda"});
  refused("item", [&] { (void)fake_cuda({1}).item<float>(); }, {"item", "cuda"});
  refused("save_safetensors", [&] {
    io::save_safetensors((std::filesystem::temp_directory_path() / "mixprec_bad_cuda.safetensors").string(), {{"c", c}});
  }, {"cuda"});
  refused("autocast on cuda", [&] {
    autocast ac{Device::CUDA, kFloat16};
    matmul(c, fake_cuda({3, 2}));
  }, {"cuda"});
}

TEST(BadInputs, EmptyAndZeroSizeTensors) {
  // Valid: a zero-size batch flows through every layer with the right shapes.
  EXPECT_EQ(sum(rn({0, 3})).item<float>(), 0.0f);
  EXPECT_EQ(matmul(rn({0, 3}), rn({3, 4})).sizes(), (Shape{0, 4}));
  const Tensor k0 = matmul(rn({2, 0}), rn({0, 3}));
  EXPECT_EQ(k0.sizes(), (Shape{2, 3}));
  EXPECT_EQ(sum(abs(k0)).item<float>(), 0.0f) << "an empty inner dimension must give zeros";
  EXPECT_EQ(linear(rn({0, 3}), rn({4, 3}), rn({4})).sizes(), (Shape{0, 4}));
  EXPECT_EQ(relu(rn({0})).sizes(), (Shape{0}));
  EXPECT_EQ(softmax(rn({0, 5}), 1).sizes(), (Shape{0, 5}));
  EXPECT_EQ(layer_norm(rn({0, 4}), {4}).sizes(), (Shape{0, 4}));
  EXPECT_EQ(conv2d(rn({0, 3, 8, 8}), rn({4, 3, 3, 3})).sizes(), (Shape{0, 4, 6, 6}));
  EXPECT_EQ(max_pool2d(rn({0, 1, 4, 4}), {2, 2}).sizes(), (Shape{0, 1, 2, 2}));
  EXPECT_EQ(cat({rn({0, 3}), rn({2, 3})}).sizes(), (Shape{2, 3}));
  EXPECT_EQ(embedding(rn({5, 3}), zeros({0}, kInt64)).sizes(), (Shape{0, 3}));
  EXPECT_EQ(cross_entropy(rn({0, 10}), zeros({0}, kInt64), Reduction::Sum).item<float>(), 0.0f);
  EXPECT_EQ(rn({3, 0}).t().contiguous().sizes(), (Shape{0, 3}));
  {
    Tensor w = rn({3, 4});
    w.requires_grad_();
    sum(matmul(rn({0, 3}), w)).backward();
    ASSERT_TRUE(w.grad().defined());
    EXPECT_EQ(sum(abs(w.grad())).item<float>(), 0.0f);
  }
  // Refused: there is no answer.
  refused("max of empty", [] { max(rn({0})); }, {"max", "[0]"});
  refused("min of empty", [] { min(rn({0, 3}), 0); }, {"min", "[0, 3]"});
  refused("argmax of empty", [] { argmax(rn({0})); }, {"argmax", "[0]"});
  refused("cat of nothing", [] { cat({}); }, {"cat"});
  refused("stack of nothing", [] { stack({}); }, {"stack"});
  refused("undefined tensor", [] { relu(Tensor()); }, {"undefined"});
  refused("item of empty", [] { (void)rn({0}).item<float>(); }, {"item", "[0]"});
  refused("randint empty range", [] { randint(5, 5, {2}); }, {"randint", "[5, 5)"});
  refused("arange step 0", [] { arange(0.0, 1.0, 0.0); }, {"arange", "step"});
  refused("get_batch too short", [] {
    Generator g(1);
    data::TextDataset::from_text("ab").get_batch(data::Split::Train, 1, 4, g);
  }, {"TextDataset::get_batch", "4"});
  refused("DataLoader batch 0", [] { data::DataLoader(data::TensorDataset(rn({4, 2}), labels({0, 1, 0, 1})), 0); },
          {"DataLoader", "0"});
  refused("optimizer without params", [] { optim::SGD opt(std::vector<Tensor>{}, 0.1); }, {"SGD", "empty parameter list"});
}

// Strided inputs are valid everywhere and must give the same values as their contiguous copies.
TEST(BadInputs, NonContiguousViewsGiveTheContiguousAnswer) {
  const Tensor x = rn({6, 4}).t();             // [4, 6], strides [1, 4]
  const Tensor xc = x.contiguous();
  const Tensor s = rn({4, 12}).slice(1, 0, 12, 2);  // [4, 6], step 2
  const Tensor sc = s.contiguous();
  const Tensor w = rn({6, 5});
  const Tensor lab = labels({0, 5, 2, 3});
  struct Op {
    const char* name;
    std::function<Tensor(const Tensor&)> f;
  };
  const std::vector<Op> ops = {
      {"add", [](const Tensor& t) { return add(t, 1.5); }},
      {"mul", [&](const Tensor& t) { return mul(t, xc); }},
      {"exp", [](const Tensor& t) { return exp(t); }},
      {"gelu", [](const Tensor& t) { return gelu(t); }},
      {"clamp", [](const Tensor& t) { return clamp(t, -0.5, 0.5); }},
      {"matmul", [&](const Tensor& t) { return matmul(t, w); }},
      {"matmul rhs", [&](const Tensor& t) { return matmul(w.t().narrow(0, 0, 3).narrow(1, 0, 4), t); }},
      {"softmax", [](const Tensor& t) { return softmax(t, 1); }},
      {"log_softmax", [](const Tensor& t) { return log_softmax(t, 0); }},
      {"sum", [](const Tensor& t) { return sum(t, {1}); }},
      {"var", [](const Tensor& t) { return var(t, {0}); }},
      {"cumsum", [](const Tensor& t) { return cumsum(t, 1); }},
      {"layer_norm", [](const Tensor& t) { return layer_norm(t, {6}); }},
      {"cross_entropy", [&](const Tensor& t) { return cross_entropy(t, lab, Reduction::None); }},
      {"masked_fill", [](const Tensor& t) { return masked_fill(t, gt(t, 0.0), -1.0); }},
      {"index_select", [](const Tensor& t) { return index_select(t, 1, labels({5, 0, 3})); }},
      {"gather", [](const Tensor& t) { return gather(t, 1, zeros({4, 2}, kInt64)); }},
      {"cat", [](const Tensor& t) { return cat({t, t}, 1); }},
      {"to(bfloat16)", [](const Tensor& t) { return t.to(kBFloat16); }},
      {"max_pool2d", [](const Tensor& t) { return max_pool2d(t.reshape({1, 1, 4, 6}), {2, 2}); }},
      {"conv2d", [](const Tensor& t) { return conv2d(t.reshape({1, 1, 4, 6}), ones({2, 1, 3, 3})); }},
  };
  for (const auto& op : ops)
    for (const auto& [v, c, kind] : {std::tuple{x, xc, "transposed"}, std::tuple{s, sc, "step-2 slice"}}) {
      Tensor got, want;
      try {
        got = op.f(v);
        want = op.f(c);
      } catch (const Error& e) {
        ADD_FAILURE() << op.name << " on a " << kind << " view threw: " << e.what();
        continue;
      }
      EXPECT_LT(rel_err(got, want), 1e-6) << op.name << " on a " << kind << " view";
    }
  // view() cannot reinterpret these strides: refused with the way out named.
  refused("view of transposed", [&] { x.view({24}); }, {"view", "reshape"});
  EXPECT_EQ(x.reshape({24}).sizes(), (Shape{24}));
  // sdpa with q as a transposed view of a [B, T, H, D] layout (how attention splits heads).
  const Tensor q = rn({1, 5, 2, 8}).transpose(1, 2), k = rn({1, 2, 5, 8}), v = rn({1, 2, 5, 8});
  EXPECT_LT(rel_err(scaled_dot_product_attention(q, k, v), scaled_dot_product_attention(q.contiguous(), k, v)), 1e-6);
}

TEST(BadInputs, NaNAndInf) {
  // Refused: hyperparameters that are NaN, inf or out of range.
  Tensor p = rn({3});
  p.requires_grad_();
  refused("SGD lr NaN", [&] { optim::SGD opt({p}, kNaN); }, {"SGD", "learning rate", "nan"});
  refused("Adam lr -1", [&] { optim::Adam opt({p}, -1.0); }, {"Adam", "learning rate", "-1"});
  refused("Adam beta 1.5", [&] { optim::Adam opt({p}, 1e-3, {1.5, 0.9}); }, {"Adam", "beta", "1.5"});
  refused("AdamW eps NaN", [&] { optim::AdamW opt({p}, 1e-3, {0.9, 0.999}, kNaN); }, {"AdamW", "epsilon", "nan"});
  refused("dropout p NaN", [] { dropout(rn({3}), kNaN, true); }, {"dropout", "nan"});
  refused("dropout p 1.5", [] { dropout(rn({3}), 1.5, true); }, {"dropout", "1.5"});
  refused("label_smoothing NaN", [] { cross_entropy(rn({2, 3}), labels({0, 1}), Reduction::Mean, -100, kNaN); },
          {"cross_entropy", "label_smoothing", "nan"});
  refused("GradScaler growth NaN", [] { amp::GradScaler s(65536.0, kNaN); }, {"growth factor", "nan"});
  refused("clip_grad_norm_ norm_type NaN", [&] { optim::clip_grad_norm_(std::vector<Tensor>{p}, 1.0, kNaN); },
          {"clip_grad_norm_", "NaN"});
  refused("clip_grad_norm_ error_if_nonfinite", [&] {
    Tensor q = rn({2});
    q.requires_grad_();
    q.set_grad(full({2}, kInf));
    optim::clip_grad_norm_(std::vector<Tensor>{q}, 1.0, 2.0, true);
  }, {"clip_grad_norm_", "non-finite (inf)"});
  refused("scheduler last_epoch NaN", [&] {
    optim::SGD opt({p}, 0.1);
    optim::lr_scheduler::StepLR sched(opt, 2);
    optim::StateDict sd = sched.state_dict();
    sd.scalars["last_epoch"] = kNaN;
    sched.load_state_dict(sd);
  }, {"LRScheduler.load_state_dict", "last_epoch", "nan"});
  refused("optimizer step 1e300", [&] {
    optim::SGD opt({p}, 0.1);
    optim::StateDict sd = opt.state_dict();
    sd.scalars["state.0.step"] = 1e300;
    opt.load_state_dict(sd);
  }, {"load_state_dict", "state.0.step", "1e+300"});
  refused("int tensor filled with NaN", [] { full({2}, kNaN, kInt64); }, {"fill_", "nan", "int64"});
  refused("uint8 tensor filled with 300", [] { full({2}, 300.0, kUInt8); }, {"fill_", "300", "uint8"});
  refused("masked_fill int with inf", [] { masked_fill(ones({2}, kInt32), ones({2}, kBool), kInf); },
          {"masked_fill", "inf", "int32"});
  refused("NaN cast to int64", [] { (void)tensor({1.0f, std::nanf("")}).to(kInt64); }, {"nan", "int64"});
  refused("1e30 cast to int32", [] { (void)tensor({1e30f}).to(kInt32); }, {"1e+30", "int32"});
  refused("val_fraction NaN", [] { data::TextDataset::from_text("abc", kNaN); }, {"val_fraction", "nan"});
  refused("synthetic std 0", [] { data::synthetic_fashion_mnist(4, 1, 0.5f, 0.0f); }, {"synthetic_fashion_mnist", "std"});

  // Valid: NaN/inf in the data propagates (as IEEE and PyTorch do) and never crashes; detecting
  // it is the GradScaler's job (tests/optim) and anomaly mode's (test_anomaly.cpp).
  const Tensor bad = tensor({1.0f, std::nanf(""), 2.0f, static_cast<float>(kInf)}, {2, 2});
  EXPECT_TRUE(has_nan(add(bad, 1.0)));
  EXPECT_TRUE(has_nan(matmul(bad, ones({2, 2}))));
  EXPECT_TRUE(has_nan(softmax(bad, 1)));
  EXPECT_TRUE(has_nan(sum(bad)));
  EXPECT_TRUE(has_nan(layer_norm(bad, {2})));
  EXPECT_TRUE(has_nan(cross_entropy(bad, labels({0, 1}))));
  EXPECT_TRUE(has_nan(max(bad)));
  EXPECT_TRUE(has_nan(bad.to(kFloat16)));
  EXPECT_TRUE(std::isinf(bad.to(kBFloat16).to(kFloat32).data<float>()[3]));
}

TEST(BadInputs, OutOfRangeIndicesAndLabels) {
  refused("cross_entropy label 10", [] { cross_entropy(rn({4, 10}), labels({1, 10, 2, 3})); }, {"cross_entropy", "10"});
  refused("cross_entropy label -1", [] { cross_entropy(rn({2, 10}), labels({-1, 2})); }, {"cross_entropy", "-1"});
  refused("nll_loss label 10", [] { nll_loss(rn({2, 10}), labels({10, 0})); }, {"nll_loss", "10"});
  refused("embedding 7 of 5", [] { embedding(rn({5, 3}), labels({1, 7})); }, {"embedding", "7", "5"});
  refused("embedding -1", [] { embedding(rn({5, 3}), labels({-1})); }, {"embedding", "-1"});
  refused("embedding padding_idx", [] { embedding(rn({5, 3}), labels({1}), 9); }, {"embedding", "9"});
  refused("index_select 3 of 2", [] { index_select(rn({2, 3}), 0, labels({0, 3})); }, {"index_select", "3"});
  refused("gather 5", [] { gather(rn({2, 3}), 1, labels({0, 5}).reshape({2, 1})); }, {"gather", "5"});
  refused("select 5", [] { rn({2, 3}).select(0, 5); }, {"select", "5"});
  refused("size(5)", [] { (void)rn({2, 3}).size(5); }, {"size", "5"});
  refused("slice dim", [] { rn({2, 3}).slice(2, 0, 1); }, {"slice", "2"});
  refused("decode 300", [] { data::TextDataset::decode(labels({65, 300})); }, {"decode", "300"});
  refused("eval_batch window", [] {
    data::TextDataset::from_text(std::string(100, 'a'), 0.0).eval_batch(data::Split::Train, 50, 1, 4);
  }, {"eval_batch", "50"});
  refused("nn::Embedding", [] { nn::Embedding e(5, 3); e.forward(labels({5})); }, {"embedding", "5"});
}

TEST(BadInputs, ScalerMisuse) {
  auto setup = [] {
    Tensor w = rn({3});
    w.requires_grad_();
    return w;
  };
  refused("step without scale", [&] {
    Tensor w = setup();
    optim::SGD opt({w}, 0.1);
    amp::GradScaler s;
    s.step(opt);
  }, {"step", "_scale is None"});
  refused("unscale_ twice", [&] {
    Tensor w = setup();
    optim::SGD opt({w}, 0.1);
    amp::GradScaler s;
    s.scale(sum(w)).backward();
    s.unscale_(opt);
    s.unscale_(opt);
  }, {"unscale_()", "already been called"});
  refused("update before step", [&] {
    Tensor w = setup();
    optim::SGD opt({w}, 0.1);
    amp::GradScaler s;
    s.scale(sum(w)).backward();
    s.update();
  }, {"update", "No inf checks"});
  refused("step twice", [&] {
    Tensor w = setup();
    optim::SGD opt({w}, 0.1);
    amp::GradScaler s;
    s.scale(sum(w)).backward();
    s.step(opt);
    s.step(opt);
  }, {"step()", "already been called"});
  refused("unscale_ after step", [&] {
    Tensor w = setup();
    optim::SGD opt({w}, 0.1);
    amp::GradScaler s;
    s.scale(sum(w)).backward();
    s.step(opt);
    s.unscale_(opt);
  }, {"unscale_()", "after step()"});
  refused("load empty state", [] { amp::GradScaler s; s.load_state_dict({}); }, {"state dict is empty"});
  refused("load NaN scale", [] {
    amp::GradScaler s;
    s.load_state_dict({{"scale", kNaN}, {"growth_factor", 2}, {"backoff_factor", 0.5}, {"growth_interval", 10}, {"_growth_tracker", 0}});
  }, {"GradScaler.load_state_dict", "scale", "nan"});
  // A misuse refused mid-iteration leaves the scaler usable: the next iteration works.
  Tensor w = setup();
  optim::SGD opt({w}, 0.1);
  amp::GradScaler s(8.0);
  s.scale(sum(w)).backward();
  s.unscale_(opt);
  EXPECT_THROW(s.unscale_(opt), Error);
  EXPECT_TRUE(s.step(opt));
  s.update();
  EXPECT_EQ(s.get_scale(), 8.0);
}

TEST(BadInputs, AutogradMisuse) {
  refused("backward twice", [] {
    Tensor a = rn({2});
    a.requires_grad_();
    Tensor l = sum(exp(a));
    l.backward();
    l.backward();
  }, {"second time", "retain_graph"});
  refused("backward without grad", [] { sum(rn({2})).backward(); }, {"backward", "does not require grad"});
  refused("in-place on a leaf", [] {
    Tensor a = rn({2});
    a.requires_grad_();
    a.fill_(1.0);
  }, {"fill_", "in-place", "[2]"});
  refused("saved tensor modified", [] {
    Tensor a = rn({2});
    a.requires_grad_();
    Tensor b = mul(a, 2.0);
    Tensor c = exp(b);  // saves its output
    {
      no_grad ng;
      c.fill_(0.0);
    }
    sum(c).backward();
  }, {"exp", "modified by an in-place operation"});
  refused("retain_grad", [] { rn({2}).retain_grad(); }, {"retain_grad", "[2]"});
  refused("requires_grad_ on non-leaf", [] {
    Tensor a = rn({2});
    a.requires_grad_();
    mul(a, 2.0).requires_grad_(false);
  }, {"requires_grad_", "leaf"});
}
