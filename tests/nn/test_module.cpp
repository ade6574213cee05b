// nn::Module: registration and names, traversal, modes, to(dtype)/to(device), state_dict and
// load_state_dict, gradients, printing.
#include <gtest/gtest.h>

#include <sstream>

#include <mixprec/mixprec.hpp>

#include "ops/op_test_util.hpp"

using namespace mixprec;

namespace {

// conv -> bn -> relu -> flatten -> seq(Linear, ReLU, Linear), plus one owned parameter and a
// non-persistent buffer, to exercise every registration path.
class NmNet : public nn::Module {
 public:
  explicit NmNet(Generator& gen) : nn::Module("NmNet") {
    conv = std::make_shared<nn::Conv2d>(2, 4, 3, 1, 1, 1, 1, true, gen);
    bn = std::make_shared<nn::BatchNorm2d>(4);
    head = std::make_shared<nn::Sequential>(std::initializer_list<std::shared_ptr<nn::Module>>{
        std::make_shared<nn::Linear>(4 * 5 * 5, 8, true, gen), std::make_shared<nn::ReLU>(), std::make_shared<nn::Linear>(8, 3, true, gen)});
    register_module("conv", conv);
    register_module("bn", bn);
    register_module("head", head);
    scale = register_parameter("scale", ones({1}));
    register_buffer("scratch", zeros({2}), /*persistent=*/false);
  }
  Tensor forward(const Tensor& x) override {
    Tensor y = relu(bn->forward(conv->forward(x)));
    return mul(head->forward(y.flatten(1)), scale);
  }
  std::shared_ptr<nn::Conv2d> conv;
  std::shared_ptr<nn::BatchNorm2d> bn;
  std::shared_ptr<nn::Sequential> head;
  Tensor scale;
};

std::vector<std::string> nm_names(const nn::NamedTensors& v) {
  std::vector<std::string> out;
  for (const auto& [n, t] : v) out.push_back(n);
  return out;
}

bool nm_equal(const Tensor& a, const Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  const Tensor x = a.detach().to(kFloat64).contiguous(), y = b.detach().to(kFloat64).contiguous();
  for (int64_t i = 0; i < x.numel(); ++i)
    if (x.data<double>()[i] != y.data<double>()[i]) return false;
  return true;
}

double nm_rel(const Tensor& a, const Tensor& b) {
  const Tensor x = a.detach().to(kFloat64).contiguous(), y = b.detach().to(kFloat64).contiguous();
  double num = 0, den = 0;
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double d = x.data<double>()[i] - y.data<double>()[i];
    num += d * d;
    den += y.data<double>()[i] * y.data<double>()[i];
  }
  return std::sqrt(num / den);
}

}  // namespace

TEST(NnModule, LinearParameterCountAndNames) {
  nn::Linear lin(784, 256);
  EXPECT_EQ(lin.num_parameters(), 200960);
  EXPECT_EQ(nm_names(lin.named_parameters()), (std::vector<std::string>{"weight", "bias"}));
  EXPECT_EQ(lin.weight.sizes(), (Shape{256, 784}));
  EXPECT_EQ(lin.bias.sizes(), (Shape{256}));
  EXPECT_TRUE(lin.weight.requires_grad());
  EXPECT_TRUE(lin.bias.requires_grad());
  nn::Linear nobias(10, 5, false);
  EXPECT_EQ(nobias.num_parameters(), 50);
  EXPECT_EQ(nm_names(nobias.named_parameters()), (std::vector<std::string>{"weight"}));
  EXPECT_EQ(nobias.state_dict().size(), 1u);
}

TEST(NnModule, NestedNamesBuffersChildrenAndModules) {
  Generator g(1);
  NmNet net(g);
  EXPECT_EQ(nm_names(net.named_parameters()),
            (std::vector<std::string>{"scale", "conv.weight", "conv.bias", "bn.weight", "bn.bias", "head.0.weight", "head.0.bias",
                                      "head.2.weight", "head.2.bias"}));
  EXPECT_EQ(nm_names(net.named_parameters(/*recurse=*/false)), (std::vector<std::string>{"scale"}));
  EXPECT_EQ(nm_names(net.named_buffers()),
            (std::vector<std::string>{"scratch", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}));
  // Non-persistent buffers stay out of the state dict; parameters come before buffers per module.
  EXPECT_EQ(nm_names(net.state_dict()),
            (std::vector<std::string>{"scale", "conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                                      "bn.num_batches_tracked", "head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"}));
  const auto kids = net.named_children();
  ASSERT_EQ(kids.size(), 3u);
  EXPECT_EQ(kids[0].first, "conv");
  EXPECT_EQ(kids[2].first, "head");
  EXPECT_EQ(kids[1].second.get(), net.bn.get());
  std::vector<std::string> mods;
  for (auto& [n, m] : net.named_modules()) mods.push_back(n + ":" + m->type_name());
  EXPECT_EQ(mods, (std::vector<std::string>{":NmNet", "conv:Conv2d", "bn:BatchNorm2d", "head:Sequential", "head.0:Linear", "head.1:ReLU",
                                            "head.2:Linear"}));
  const int64_t expect = 1 + (4 * 2 * 9 + 4) + 8 + (100 * 8 + 8) + (8 * 3 + 3);
  EXPECT_EQ(net.num_parameters(), expect);
  EXPECT_EQ(static_cast<int64_t>(net.parameters().size()), 9);
  EXPECT_EQ(net.head->size(), 3u);
  EXPECT_EQ(net.head->at<nn::Linear>(2)->out_features, 3);
  EXPECT_THROW(net.head->at<nn::Linear>(1), Error);
  EXPECT_THROW((*net.head)[3], Error);
}

TEST(NnModule, RegistrationErrors) {
  nn::Module m("Custom");
  m.register_parameter("w", zeros({2}));
  EXPECT_THROW(m.register_parameter("w", zeros({2})), Error);
  EXPECT_THROW(m.register_buffer("w", zeros({2})), Error);
  EXPECT_THROW(m.register_module("w", std::make_shared<nn::ReLU>()), Error);
  EXPECT_THROW(m.register_parameter("a.b", zeros({2})), Error);
  EXPECT_THROW(m.register_parameter("", zeros({2})), Error);
  EXPECT_NE(mixprec::testing::error_of([&] { m.register_parameter("w", zeros({2})); }).find("already registered"), std::string::npos);
  // A plain Module has no single-tensor forward.
  EXPECT_NE(mixprec::testing::error_of([&] { m.forward(zeros({1})); }).find("Custom"), std::string::npos);
  nn::ModuleList list{std::make_shared<nn::ReLU>()};
  EXPECT_THROW(list.forward(zeros({1})), Error);
}

TEST(NnModule, RebindingASlotTiesOrReplaces) {
  Generator g(2);
  nn::Sequential seq{std::make_shared<nn::Linear>(4, 4, true, g), std::make_shared<nn::Linear>(4, 4, true, g)};
  auto a = seq.at<nn::Linear>(0), b = seq.at<nn::Linear>(1);
  EXPECT_EQ(seq.num_parameters(), 40);
  b->weight = a->weight;  // tie: the registry reads the member
  EXPECT_EQ(seq.num_parameters(), 24);
  EXPECT_EQ(nm_names(seq.named_parameters()), (std::vector<std::string>{"0.weight", "0.bias", "1.bias"}));
  const auto sd = seq.state_dict();
  ASSERT_EQ(sd.size(), 4u);  // every name, as PyTorch
  EXPECT_EQ(sd[2].first, "1.weight");
  EXPECT_EQ(sd[2].second.storage(), sd[0].second.storage());

  // Replacing a child through its member is what traversal sees (fine-tuning a new head).
  class NmHolder : public nn::Module {
   public:
    NmHolder() : nn::Module("NmHolder") {
      fc = std::make_shared<nn::Linear>(3, 2);
      register_module("fc", fc);
    }
    std::shared_ptr<nn::Linear> fc;
  } h;
  h.fc = std::make_shared<nn::Linear>(3, 7);
  EXPECT_EQ(h.num_parameters(), 3 * 7 + 7);
  h.fc = nullptr;  // an absent child, skipped
  EXPECT_EQ(h.num_parameters(), 0);
  EXPECT_TRUE(h.children().empty());
}

TEST(NnModule, TrainEvalPropagates) {
  Generator g(3);
  NmNet net(g);
  EXPECT_TRUE(net.is_training());
  net.eval();
  for (auto& [n, m] : net.named_modules()) EXPECT_FALSE(m->is_training()) << n;
  net.train();
  for (auto& [n, m] : net.named_modules()) EXPECT_TRUE(m->is_training()) << n;
  net.head->train(false);
  EXPECT_TRUE(net.is_training());
  EXPECT_FALSE(net.head->at<nn::Linear>(0)->is_training());
}

TEST(NnModule, ToBFloat16KeepsHandlesAndConvertsBuffers) {
  Generator g(4);
  NmNet net(g);
  const Tensor x = randn({2, 2, 5, 5}, kFloat32, g);
  sum(net.forward(x)).backward();  // gradients exist and BN stats move
  const std::vector<Tensor> handles = net.parameters();
  std::vector<Tensor> before;
  std::vector<uint64_t> versions;
  for (const Tensor& p : handles) before.push_back(p.detach().clone()), versions.push_back(p.version());
  const Tensor rm_before = net.bn->running_mean.clone();

  net.to(kBFloat16);
  const std::vector<Tensor> after = net.parameters();
  ASSERT_EQ(after.size(), handles.size());
  for (std::size_t i = 0; i < handles.size(); ++i) {
    EXPECT_TRUE(after[i].is_same(handles[i])) << i;  // the same TensorImpl: optimizers keep working handles
    EXPECT_EQ(handles[i].dtype(), kBFloat16) << i;
    EXPECT_TRUE(handles[i].requires_grad()) << i;
    EXPECT_TRUE(handles[i].is_leaf()) << i;
    EXPECT_GT(handles[i].version(), versions[i]) << i;
    EXPECT_TRUE(nm_equal(handles[i], before[i].to(kBFloat16))) << i;  // values rounded once
    ASSERT_TRUE(handles[i].grad().defined()) << i;
    EXPECT_EQ(handles[i].grad().dtype(), kBFloat16) << i;
  }
  EXPECT_TRUE(net.conv->weight.is_same(handles[1]));
  // Buffers follow, as PyTorch's model.to(dtype); the integer counter stays int64.
  EXPECT_EQ(net.bn->running_mean.dtype(), kBFloat16);
  EXPECT_EQ(net.bn->running_var.dtype(), kBFloat16);
  EXPECT_EQ(net.bn->num_batches_tracked.dtype(), kInt64);
  EXPECT_EQ(net.bn->num_batches_tracked.item<int64_t>(), 1);
  EXPECT_TRUE(nm_equal(net.bn->running_mean, rm_before.to(kBFloat16)));

  // The converted model runs in bfloat16 end to end, training mode included.
  net.zero_grad();
  const Tensor y = net.forward(x.to(kBFloat16));
  EXPECT_EQ(y.dtype(), kBFloat16);
  sum(y.to(kFloat32)).backward();
  EXPECT_EQ(net.conv->weight.grad().dtype(), kBFloat16);

  net.to(kFloat32);
  for (const Tensor& p : handles) EXPECT_EQ(p.dtype(), kFloat32);
  EXPECT_THROW(net.to(kInt64), Error);
}

TEST(NnModule, HandlesSeeInPlaceChangesAfterConversion) {
  nn::Linear lin(3, 2);
  const Tensor w = lin.parameters()[0];
  lin.to(kFloat64);
  {
    no_grad ng;
    Tensor(w).fill_(0.5);
    Tensor(lin.bias).fill_(0.0);
  }
  const Tensor y = lin.forward(ones({1, 3}, kFloat64));
  EXPECT_EQ(y.dtype(), kFloat64);
  EXPECT_DOUBLE_EQ(y.select(0, 0).select(0, 1).item<double>(), 1.5);
}

TEST(NnModule, ToDevice) {
  Generator g(5);
  NmNet net(g);
  net.to(Device::CPU);  // already there: a no-op
  EXPECT_EQ(net.conv->weight.device(), Device::CPU);
  if (!cuda_is_available()) {
    const std::string msg = mixprec::testing::error_of([&] { net.to(Device::CUDA); });
    EXPECT_NE(msg.find("cuda"), std::string::npos) << msg;
    for (const Tensor& p : net.parameters()) EXPECT_EQ(p.device(), Device::CPU);
    EXPECT_EQ(net.forward(randn({1, 2, 5, 5})).sizes(), (Shape{1, 3}));
  }
}

TEST(NnModule, StateDictRoundTrip) {
  Generator g(6);
  NmNet net(g);
  net.forward(randn({4, 2, 5, 5}, kFloat32, g));  // move the BN statistics off their defaults
  const nn::NamedTensors live = net.state_dict();
  for (const auto& [k, t] : live) EXPECT_FALSE(t.requires_grad()) << k;
  EXPECT_EQ(live[1].second.storage(), net.conv->weight.storage());  // detached, shared storage (as PyTorch)
  nn::NamedTensors saved;
  for (const auto& [k, t] : live) saved.emplace_back(k, t.clone());

  {
    no_grad ng;
    for (const auto& [k, t] : live) Tensor(t).fill_(7.0);
  }
  EXPECT_FALSE(nm_equal(net.conv->weight, saved[1].second));
  const nn::LoadResult r = net.load_state_dict(saved);
  EXPECT_TRUE(r.ok());
  const nn::NamedTensors back = net.state_dict();
  ASSERT_EQ(back.size(), saved.size());
  for (std::size_t i = 0; i < back.size(); ++i) {
    EXPECT_EQ(back[i].first, saved[i].first);
    EXPECT_TRUE(nm_equal(back[i].second, saved[i].second)) << back[i].first;
  }
  EXPECT_EQ(net.bn->num_batches_tracked.item<int64_t>(), 1);

  // Loading converts dtypes: a float64 model takes the float32 checkpoint exactly.
  Generator g2(60);
  NmNet wide(g2);
  wide.to(kFloat64);
  wide.load_state_dict(saved);
  EXPECT_EQ(wide.conv->weight.dtype(), kFloat64);
  EXPECT_TRUE(nm_equal(wide.conv->weight, saved[1].second));
  wide.eval();
  net.eval();
  const Tensor x = randn({3, 2, 5, 5}, kFloat32, g);
  EXPECT_LT(nm_rel(wide.forward(x.to(kFloat64)), net.forward(x)), 1e-5);
}

TEST(NnModule, LoadStateDictErrors) {
  Generator g(7);
  NmNet net(g);
  nn::NamedTensors sd;
  for (const auto& [k, t] : net.state_dict()) sd.emplace_back(k, t.clone());
  const Tensor w0 = net.head->at<nn::Linear>(2)->weight.detach().clone();

  nn::NamedTensors missing(sd.begin() + 1, sd.end());  // drops "scale"
  std::string msg = mixprec::testing::error_of([&] { net.load_state_dict(missing); });
  EXPECT_NE(msg.find("missing key(s)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("\"scale\""), std::string::npos) << msg;
  EXPECT_NE(msg.find("NmNet"), std::string::npos) << msg;

  nn::NamedTensors extra = sd;
  extra.emplace_back("head.3.weight", zeros({2}));
  msg = mixprec::testing::error_of([&] { net.load_state_dict(extra); });
  EXPECT_NE(msg.find("unexpected key(s)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("head.3.weight"), std::string::npos) << msg;

  nn::NamedTensors wrong = sd;
  wrong.back().second = zeros({4});  // head.2.bias is [3]
  wrong[wrong.size() - 2].second = zeros({5, 8});  // head.2.weight is [3, 8]
  msg = mixprec::testing::error_of([&] { net.load_state_dict(wrong); });
  EXPECT_NE(msg.find("size mismatch for head.2.weight: copying a tensor with shape [5, 8] from checkpoint, the shape in current "
                     "model is [3, 8]"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("size mismatch for head.2.bias"), std::string::npos) << msg;
  // Shape errors fail even when not strict, and a failed load changes nothing.
  {
    no_grad ng;
    Tensor(wrong[1].second).fill_(3.0);
  }
  EXPECT_THROW(net.load_state_dict(wrong, /*strict=*/false), Error);
  EXPECT_FALSE(nm_equal(net.conv->weight, wrong[1].second));
  EXPECT_TRUE(nm_equal(net.head->at<nn::Linear>(2)->weight, w0));

  nn::NamedTensors dup = sd;
  dup.push_back(sd[0]);
  EXPECT_NE(mixprec::testing::error_of([&] { net.load_state_dict(dup); }).find("duplicate key \"scale\""), std::string::npos);
  nn::NamedTensors undef = sd;
  undef[0].second = Tensor();
  EXPECT_THROW(net.load_state_dict(undef), Error);

  // Non-strict: report what did not match and load the rest.
  nn::NamedTensors partial(sd.begin() + 1, sd.end());
  partial.emplace_back("extra", zeros({1}));
  {
    no_grad ng;
    Tensor(partial[0].second).fill_(0.25);  // conv.weight
  }
  const nn::LoadResult r = net.load_state_dict(partial, /*strict=*/false);
  EXPECT_EQ(r.missing_keys, (std::vector<std::string>{"scale"}));
  EXPECT_EQ(r.unexpected_keys, (std::vector<std::string>{"extra"}));
  EXPECT_FALSE(r.ok());
  EXPECT_TRUE(nm_equal(net.conv->weight, partial[0].second));
}

TEST(NnModule, ZeroGradAndApply) {
  Generator g(8);
  NmNet net(g);
  sum(net.forward(randn({2, 2, 5, 5}, kFloat32, g))).backward();
  for (const auto& [n, p] : net.named_parameters()) EXPECT_TRUE(p.grad().defined()) << n;
  net.zero_grad(/*set_to_none=*/false);
  for (const auto& [n, p] : net.named_parameters()) {
    ASSERT_TRUE(p.grad().defined()) << n;
    EXPECT_EQ(max(abs(p.grad())).item<double>(), 0.0) << n;
  }
  net.zero_grad();
  for (const auto& [n, p] : net.named_parameters()) EXPECT_FALSE(p.grad().defined()) << n;

  int linears = 0;
  std::vector<std::string> order;
  net.apply([&](nn::Module& m) {
    order.push_back(m.type_name());
    if (auto* l = dynamic_cast<nn::Linear*>(&m)) {
      nn::init::zeros_(l->weight);
      ++linears;
    }
  });
  EXPECT_EQ(linears, 2);
  EXPECT_EQ(order.back(), "NmNet");  // children first, as PyTorch
  EXPECT_EQ(max(abs(net.head->at<nn::Linear>(0)->weight)).item<double>(), 0.0);
  EXPECT_EQ(net.num_parameters(/*only_trainable=*/true), net.num_parameters());
  Tensor(net.scale).requires_grad_(false);
  EXPECT_EQ(net.num_parameters(true), net.num_parameters() - 1);
}

TEST(NnModule, PrintsLikePyTorch) {
  nn::Sequential seq{std::make_shared<nn::Linear>(4, 3), std::make_shared<nn::ReLU>(), std::make_shared<nn::Dropout>(0.5),
                     std::make_shared<nn::BatchNorm2d>(3, 1e-5, std::nullopt)};
  const std::string expect =
      "Sequential(\n"
      "  (0): Linear(in_features=4, out_features=3, bias=True)\n"
      "  (1): ReLU()\n"
      "  (2): Dropout(p=0.5)\n"
      "  (3): BatchNorm2d(3, eps=1e-05, momentum=None, affine=True, track_running_stats=True)\n"
      ")";
  std::ostringstream os;
  os << seq;
  EXPECT_EQ(os.str(), expect);
  std::ostringstream os2;
  os2 << std::make_shared<nn::Conv2d>(3, 64, 7, 2, 3, 1, 1, false);
  EXPECT_EQ(os2.str(), "Conv2d(3, 64, kernel_size=(7, 7), stride=(2, 2), padding=(3, 3), bias=False)");
  Generator g(9);
  NmNet net(g);
  const std::string s = net.repr();
  EXPECT_EQ(s.rfind("NmNet(\n  (conv): Conv2d(", 0), 0u) << s;
  EXPECT_NE(s.find("  (head): Sequential(\n    (0): Linear(in_features=100, out_features=8, bias=True)\n"), std::string::npos) << s;
  EXPECT_EQ(nn::ReLU().repr(), "ReLU()");
}
