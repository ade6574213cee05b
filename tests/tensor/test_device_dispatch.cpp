// The device kernel table (backends/device.hpp) exercised without a GPU: host memory is
// labelled as the CUDA device and a table of CPU kernels stands in for the CUDA one. What is
// checked is everything around the kernels, which is the same for the real CUDA table:
// routing, autograd through device tensors, autocast on the device, .to(), and the refusals.
// The host cannot read or write this "device" memory outside a table entry, as with a GPU.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <mixprec/backends/captured_step.hpp>
#include <mixprec/mixprec.hpp>

#include "ops/op_test_util.hpp"

using namespace mixprec;
using mixprec::testing::error_of;
using mixprec::testing::rel_error;

namespace device_dispatch_test {  // the test executables are unity builds: keep these names apart

// The same memory as another tensor, labelled with device `d`; keeps the source storage alive.
Tensor relabel(const Tensor& t, Device d) {
  const Tensor whole = from_blob(t.storage()->data, {t.storage()->nbytes / static_cast<int64_t>(t.element_size())}, t.dtype(),
                                 [keep = t.storage()](void*) {}, d);
  return detail::make_view(whole, t.sizes(), t.strides(), t.storage_offset());
}
Tensor host(const Tensor& t) { return t.defined() ? relabel(t, Device::CPU) : t; }
Tensor host_copy(const Tensor& t) {  // a fresh contiguous CPU copy (what a device transfer makes)
  Tensor out = empty(t.sizes(), t.dtype());
  detail::copy_kernel(out, t);
  return out;
}

// Device memory the host cannot touch, as on a GPU: its pages are PROT_NONE except while a table
// entry (the stand-in for a kernel) runs, so host code that dereferences a device tensor's data
// outside the kernel table crashes here instead of passing.
class HostAsDeviceAllocator final : public Allocator {
 public:
  void* allocate(int64_t nbytes) override {
    const auto page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    const std::size_t len = (std::max<std::size_t>(static_cast<std::size_t>(nbytes), 1) + page - 1) / page * page;
    void* p = mmap(nullptr, len, open_ ? PROT_READ | PROT_WRITE : PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    MIXPREC_CHECK(p != MAP_FAILED, "host-as-device allocator: mmap of ", len, " bytes failed");
    live_[p] = len;
    counters_.on_alloc(nbytes, nbytes);
    return p;
  }
  void deallocate(void* p, int64_t nbytes) noexcept override {
    counters_.on_free(nbytes, nbytes);
    const auto it = live_.find(p);
    if (it == live_.end()) return;
    munmap(p, it->second);
    live_.erase(it);
  }
  Device device() const override { return Device::CUDA; }
  MemoryStats stats() const override { return counters_.snapshot(); }
  void reset_peak() override { counters_.reset_peak(); }
  void set_open(bool open) {
    for (const auto& [p, len] : live_) mprotect(p, len, open ? PROT_READ | PROT_WRITE : PROT_NONE);
    open_ = open;
  }

 private:
  detail::StatCounters counters_;
  std::map<void*, std::size_t> live_;
  bool open_ = false;
};

HostAsDeviceAllocator*& active_allocator() {
  static HostAsDeviceAllocator* a = nullptr;
  return a;
}
std::map<std::string, int>& calls() {
  static std::map<std::string, int> c;
  return c;
}

// One table entry running: counted, with host access to device memory for its duration.
class Kernel {
 public:
  explicit Kernel(const char* name) {
    ++calls()[name];
    if (depth()++ == 0 && active_allocator()) active_allocator()->set_open(true);
  }
  ~Kernel() {
    if (--depth() == 0 && active_allocator()) active_allocator()->set_open(false);
  }
  Kernel(const Kernel&) = delete;
  Kernel& operator=(const Kernel&) = delete;

 private:
  static int& depth() {
    static int d = 0;
    return d;
  }
};

// A kernel's result in fresh device memory (called inside an entry).
Tensor dev(const Tensor& t) {
  Tensor out = empty(t.sizes(), t.dtype(), Device::CUDA);
  detail::copy_kernel(host(out), t);
  return out;
}

// CPU kernels behind the table; every entry counts its calls so the tests see the routing.
const DeviceKernels& host_kernels() {
  static const DeviceKernels k = [] {
    DeviceKernels t;
    t.to_device = [](const Tensor& c) { const Kernel k("to_device"); return dev(c); };
    t.to_host = [](const Tensor& d) { const Kernel k("to_host"); return host_copy(host(d)); };
    t.copy = [](const Tensor& dst, const Tensor& src) { const Kernel k("copy"); detail::copy_kernel(host(dst), host(src)); };
    t.fill = [](const Tensor& x, double v) { const Kernel k("fill"); Tensor h = host(x); h.fill_(v); };
    t.binary = [](DeviceBinary op, const Tensor& a, const Tensor& b, double alpha) {
      const Kernel k("binary");
      no_grad ng;
      const Tensor ha = host(a), hb = host(b);
      return dev(op == DeviceBinary::Add ? add(ha, hb, alpha) : op == DeviceBinary::Mul ? mul(ha, hb) : div(ha, hb));
    };
    t.binary_scalar = [](DeviceBinary op, const Tensor& a, double sv, double alpha, bool reversed) {
      const Kernel k("binary_scalar");
      no_grad ng;
      const Tensor ha = host(a), hs = scalar_tensor(sv, a.dtype());
      const Tensor& x = reversed ? hs : ha;
      const Tensor& y = reversed ? ha : hs;
      return dev(op == DeviceBinary::Add ? add(x, y, alpha) : op == DeviceBinary::Mul ? mul(x, y) : div(x, y));
    };
    t.unary = [](DeviceUnary op, const Tensor& x) {
      const Kernel k("unary");
      no_grad ng;
      const Tensor h = host(x);
      switch (op) {
        case DeviceUnary::Relu: return dev(relu(h));
        case DeviceUnary::Gelu: return dev(gelu(h));
        case DeviceUnary::GeluTanh: return dev(gelu(h, "tanh"));
        case DeviceUnary::Silu: return dev(silu(h));
        case DeviceUnary::Sigmoid: return dev(sigmoid(h));
        case DeviceUnary::Tanh: return dev(mixprec::tanh(h));
        case DeviceUnary::Exp: return dev(exp(h));
        case DeviceUnary::Log: return dev(log(h));
      }
      return Tensor();
    };
    t.unary_backward = [](DeviceUnary op, const Tensor& g, const Tensor& x, const Tensor& y) {
      const Kernel k("unary_backward");
      const Tensor hx = host_copy(host(x).to(DType::Float32)), hy = host_copy(host(y).to(DType::Float32)),
                   hg = host_copy(host(g).to(DType::Float32));
      const float *xp = hx.data<float>(), *yp = hy.data<float>(), *gp = hg.data<float>();
      Tensor out = empty(x.sizes(), DType::Float32);
      for (int64_t i = 0; i < out.numel(); ++i) {
        const float d = op == DeviceUnary::Relu       ? fn::relu_grad(xp[i])
                        : op == DeviceUnary::Gelu     ? fn::gelu_grad(xp[i])
                        : op == DeviceUnary::GeluTanh ? fn::gelu_tanh_grad(xp[i])
                        : op == DeviceUnary::Silu     ? fn::silu_grad(xp[i])
                        : op == DeviceUnary::Sigmoid  ? fn::sigmoid_grad_y(yp[i])
                        : op == DeviceUnary::Tanh     ? fn::tanh_grad_y(yp[i])
                        : op == DeviceUnary::Exp      ? yp[i]
                                                      : 1.0f / xp[i];
        out.data<float>()[i] = gp[i] * d;
      }
      return dev(out.to(x.dtype()));
    };
    t.sum = [](const Tensor& x, const Shape& dims) {
      const Kernel k("sum");
      no_grad ng;
      return dev(sum(host(x), dims));
    };
    t.matmul = [](const Tensor& a, const Tensor& b, const Tensor& bias) {
      const Kernel k("matmul");
      return dev(device_kernels(Device::CPU)->matmul(host(a), host(b), host(bias)));
    };
    t.softmax = [](const Tensor& x, int64_t dim, bool log) {
      const Kernel k("softmax");
      no_grad ng;
      return dev(log ? log_softmax(host(x), dim) : softmax(host(x), dim));
    };
    t.softmax_backward = [](const Tensor& y, const Tensor& g, int64_t dim, bool log) {
      const Kernel k("softmax_backward");
      no_grad ng;
      const Tensor hy = host(y), hg = host(g);
      return dev(log ? sub(hg, mul(exp(hy), sum(hg, {dim}, true))) : mul(hy, sub(hg, sum(mul(hg, hy), {dim}, true))));
    };
    t.conv_forward = [](const detail::ConvGeom& g, const Tensor& x, const Tensor& w, const Tensor& b) {
      const Kernel k("conv_forward");
      return dev(detail::conv_forward(g, host(x), host(w), host(b)));
    };
    t.conv_backward_input = [](const detail::ConvGeom& g, const Tensor& gy, const Tensor& w) {
      const Kernel k("conv_backward_input");
      return dev(detail::conv_backward_input(g, host(gy), host(w)));
    };
    t.conv_backward_weight = [](const detail::ConvGeom& g, const Tensor& x, const Tensor& gy) {
      const Kernel k("conv_backward_weight");
      return dev(detail::conv_backward_weight(g, host(x), host(gy), x.dtype()));
    };
    t.batch_norm = [](const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& rm, const Tensor& rv, bool training, double momentum,
                      double eps) -> std::array<Tensor, 3> {
      const Kernel k("batch_norm");
      EXPECT_EQ(w.dtype(), DType::Float32);
      no_grad ng;
      const Tensor hx = host(x);
      const Tensor y = batch_norm(hx, host(rm), host(rv), host(w), host(b), training, momentum, eps);
      if (!training) return {dev(y), Tensor(), Tensor()};
      const Tensor xf = hx.to(DType::Float32);
      return {dev(y), dev(mean(xf, {0, 2, 3})), dev(rsqrt(add(var(xf, {0, 2, 3}, 0), eps)))};
    };
    t.batch_norm_backward = [](const Tensor& x, const Tensor& g, const Tensor& w, const Tensor& m, const Tensor& invstd,
                               double) -> std::array<Tensor, 3> {
      const Kernel k("batch_norm_backward");
      no_grad ng;
      const Tensor hx = host(x).to(DType::Float32), hg = host(g).to(DType::Float32);
      const Shape c{1, -1, 1, 1};
      const Tensor xhat = mul(sub(hx, host(m).reshape(c)), host(invstd).reshape(c));
      const Tensor db = sum(hg, {0, 2, 3}), dw = sum(mul(hg, xhat), {0, 2, 3});
      const double M = static_cast<double>(hx.numel() / hx.size(1));
      const Tensor dx = mul(mul(host(w), host(invstd)).reshape(c),
                            sub(sub(hg, div(db, M).reshape(c)), mul(xhat, div(dw, M).reshape(c))));
      return {dev(dx.to(x.dtype())), dev(dw), dev(db)};
    };
    t.layer_norm = [](const Tensor& x, const Tensor& w, const Tensor& b, double eps) -> std::array<Tensor, 3> {
      const Kernel k("layer_norm");
      EXPECT_TRUE(!w.defined() || w.dtype() == DType::Float32);
      no_grad ng;
      const Tensor hx = host(x), xf = hx.to(DType::Float32);
      return {dev(layer_norm(hx, {x.size(1)}, host(w), host(b), eps)), dev(mean(xf, {1})), dev(rsqrt(add(var(xf, {1}, 0), eps)))};
    };
    t.layer_norm_backward = [](const Tensor& x, const Tensor& g, const Tensor& w, const Tensor& m,
                               const Tensor& rstd) -> std::array<Tensor, 3> {
      const Kernel k("layer_norm_backward");
      no_grad ng;
      const Tensor hx = host(x).to(DType::Float32), hg = host(g).to(DType::Float32), rs = host(rstd).reshape({-1, 1});
      const Tensor xhat = mul(sub(hx, host(m).reshape({-1, 1})), rs);
      const Tensor gw = w.defined() ? mul(hg, host(w)) : hg;
      const double D = static_cast<double>(x.size(1));
      const Tensor dx = mul(rs, sub(sub(gw, div(sum(gw, {1}, true), D)), mul(xhat, div(sum(mul(gw, xhat), {1}, true), D))));
      return {dev(dx.to(x.dtype())), dev(sum(mul(hg, xhat), {0})), dev(sum(hg, {0}))};
    };
    t.embedding = [](const Tensor& w, const Tensor& idx) {
      const Kernel k("embedding");
      EXPECT_EQ(idx.dtype(), DType::Int64);
      no_grad ng;
      return dev(embedding(host(w), host(idx)));
    };
    t.embedding_backward = [](const Tensor& g, const Tensor& idx, int64_t V, int64_t pad) {
      const Kernel k("embedding_backward");
      EXPECT_EQ(g.dtype(), DType::Float32);
      const Tensor hg = host(g);
      const int64_t* ip = host(idx).data<int64_t>();
      const int64_t D = g.size(1);
      Tensor acc = zeros({V, D});
      for (int64_t i = 0; i < idx.numel(); ++i)
        if (ip[i] != pad)
          for (int64_t d = 0; d < D; ++d) acc.data<float>()[ip[i] * D + d] += hg.data<float>()[i * D + d];
      return dev(acc);
    };
    t.masked_scale = [](const Tensor& x, const Tensor& keep, double scale) {
      const Kernel k("masked_scale");
      EXPECT_EQ(keep.dtype(), DType::Bool);
      no_grad ng;
      return dev(mul(mul(host(x).to(DType::Float32), host(keep).to(DType::Float32)), scale).to(x.dtype()));
    };
    // Fused attention through the CPU's own entries, with the entries' contract checked.
    t.sdpa_forward = [](const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale, double p,
                        uint64_t seed) -> std::array<Tensor, 2> {
      const Kernel kn("sdpa_forward");
      const Shape batch(q.sizes().begin(), q.sizes().end() - 2);
      EXPECT_EQ(Shape(k.sizes().begin(), k.sizes().end() - 2), batch);
      EXPECT_EQ(Shape(v.sizes().begin(), v.sizes().end() - 2), batch);
      EXPECT_TRUE(q.size(-1) % 8 == 0 && q.size(-1) <= 128 && v.size(-1) == q.size(-1)) << "E " << q.size(-1) << ", Ev " << v.size(-1);
      const auto [out, lse] = device_kernels(Device::CPU)->sdpa_forward(host(q), host(k), host(v), causal, scale, p, seed);
      EXPECT_EQ(lse.dtype(), DType::Float32);
      return {dev(out), dev(lse)};
    };
    t.sdpa_backward = [](const Tensor& g, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
                         bool causal, double scale, double p, uint64_t seed) -> std::array<Tensor, 3> {
      const Kernel kn("sdpa_backward");
      EXPECT_EQ(g.dtype(), q.dtype());
      EXPECT_EQ(g.sizes(), o.sizes());
      const auto [dq, dk, dv] =
          device_kernels(Device::CPU)->sdpa_backward(host(g), host(q), host(k), host(v), host(o), host(lse), causal, scale, p, seed);
      return {dev(dq.to(q.dtype())), dev(dk.to(q.dtype())), dev(dv.to(q.dtype()))};
    };
    // The optimizers' and GradScaler's entries, element by element with the CPU's own scalars
    // (optim::detail::AdamScalars / SgdScalars), as the fused CUDA kernels do; the skip flag and
    // the step counters are read and written in device memory, as there.
    t.adam = [](const std::vector<DeviceParamUpdate>& ps, const optim::detail::AdamHyper& h, const Tensor& found_inf) {
      const Kernel k("adam");
      if (found_inf.defined() && *host(found_inf).data<float>() != 0.0f) return;
      for (const DeviceParamUpdate& p : ps) {
        int64_t* c = host(p.counters).data<int64_t>();
        const optim::detail::AdamScalars sc = optim::detail::adam_scalars(h, c[0] + 1);
        const Tensor g = host(p.grad).to(DType::Float32).contiguous();
        float* w = host(p.weights).data<float>();
        float* m = host(p.state[0]).data<float>();
        float* v = host(p.state[1]).data<float>();
        float* vmax = p.state[2].defined() ? host(p.state[2]).data<float>() : nullptr;
        for (int64_t i = 0; i < p.weights.numel(); ++i) sc.step(w[i], g.data<float>()[i], m[i], v[i], vmax ? vmax + i : nullptr);
        if (p.model.defined()) detail::copy_kernel(host(p.model), host(p.weights));
        ++c[0];
        ++c[1];
      }
    };
    t.sgd = [](const std::vector<DeviceParamUpdate>& ps, const optim::detail::SgdScalars& sc, const Tensor& found_inf) {
      const Kernel k("sgd");
      if (found_inf.defined() && *host(found_inf).data<float>() != 0.0f) return;
      for (const DeviceParamUpdate& p : ps) {
        int64_t* c = host(p.counters).data<int64_t>();
        const Tensor g = host(p.grad).to(DType::Float32).contiguous();
        float* w = host(p.weights).data<float>();
        float* b = p.state[0].defined() ? host(p.state[0]).data<float>() : nullptr;
        for (int64_t i = 0; i < p.weights.numel(); ++i) sc.step(w[i], g.data<float>()[i], b ? b + i : nullptr, c[1] == 0);
        if (p.model.defined()) detail::copy_kernel(host(p.model), host(p.weights));
        ++c[0];
        ++c[1];
      }
    };
    t.unscale = [](const std::vector<Tensor>& grads, const std::vector<Tensor>& masters, const Tensor& scale, const Tensor& found_inf) {
      const Kernel k("unscale");
      const float inv = static_cast<float>(1.0 / static_cast<double>(*host(scale).data<float>()));
      bool bad = false;
      for (std::size_t i = 0; i < grads.size(); ++i) {
        const Tensor h = host(grads[i]), f = host_copy(h.to(DType::Float32));
        float* v = f.data<float>();
        for (int64_t j = 0; j < f.numel(); ++j) {
          bad |= amp::detail::nonfinite(v[j]);
          v[j] *= inv;
        }
        if (masters[i].defined()) detail::copy_kernel(host(masters[i]), f);
        detail::copy_kernel(h, f);
      }
      if (bad) *host(found_inf).data<float>() = 1.0f;
    };
    t.update_scale = [](const Tensor& scale, const Tensor& tracker, const std::vector<Tensor>& flags, double growth, double backoff,
                        int64_t interval, const Tensor& skipped) {
      const Kernel k("update_scale");
      bool found = false;
      for (const Tensor& f : flags) found |= *host(f).data<float>() != 0.0f;
      amp::detail::update_scale(*host(scale).data<float>(), *host(tracker).data<int64_t>(), found, growth, backoff, interval);
      *host(skipped).data<int64_t>() += found;
    };
    t.grad_norm = [](const std::vector<Tensor>& grads) {
      const Kernel k("grad_norm");
      double sq = 0;
      for (const Tensor& g : grads) {
        const Tensor f = host_copy(host(g).to(DType::Float32));
        for (int64_t i = 0; i < f.numel(); ++i) sq += static_cast<double>(f.data<float>()[i]) * f.data<float>()[i];
      }
      return dev(scalar_tensor(std::sqrt(sq), DType::Float32));
    };
    t.clip_grads = [](const std::vector<Tensor>& grads, const Tensor& norm, double max_norm) {
      const Kernel k("clip_grads");
      const double coef = max_norm / (static_cast<double>(*host(norm).data<float>()) + 1e-6);
      if (coef >= 1.0) return;
      no_grad ng;
      for (const Tensor& g : grads) detail::copy_kernel(host(g), mul(host(g).to(DType::Float32), static_cast<double>(static_cast<float>(coef))));
    };
    t.dropout = [](const Tensor& x, uint64_t seed, double p, double scale, const Tensor& replay) {
      const Kernel k("dropout");
      EXPECT_TRUE(x.is_contiguous());
      if (replay.defined()) seed = detail::dropout_seed(seed, *host(replay).data<int64_t>());
      const Tensor f = host_copy(host(x).to(DType::Float32));
      float* v = f.data<float>();
      for (int64_t i = 0; i < f.numel(); ++i)
        v[i] = v[i] * (detail::dropout_keep(seed, static_cast<uint64_t>(i), p) ? static_cast<float>(scale) : 0.0f);
      return dev(f.to(x.dtype()));
    };
    t.clamp_indices = [](const Tensor& idx, int64_t V, const Tensor& bad) {
      const Kernel k("clamp_indices");
      int64_t* ip = host(idx).data<int64_t>();
      for (int64_t i = 0; i < idx.numel(); ++i)
        if (ip[i] < 0 || ip[i] >= V) {
          ip[i] = 0;
          *host(bad).data<float>() += 1.0f;
        }
    };
    t.class_weights = [](const Tensor& target, int64_t N, int64_t C, int64_t S, int64_t ignore, double ls, DType dtype,
                         const Tensor& bad) -> std::array<Tensor, 2> {
      const Kernel k("class_weights");
      const Tensor tc = host_copy(host(target));
      const int64_t* tp = tc.data<int64_t>();
      Tensor w = zeros({N, C, S}, DType::Float64);
      double* wp = w.data<double>();
      double count = 0;
      for (int64_t r = 0; r < N * S; ++r) {
        if (tp[r] == ignore) continue;
        double* row = wp + (r / S) * C * S + r % S;
        const bool ok = tp[r] >= 0 && tp[r] < C;
        for (int64_t c = 0; c < C; ++c) row[c * S] = ok ? ls / static_cast<double>(C) : std::numeric_limits<double>::quiet_NaN();
        if (ok) row[tp[r] * S] += 1.0 - ls;
        else *host(bad).data<float>() += 1.0f;
        count += 1;
      }
      return {dev(w.to(dtype)), dev(scalar_tensor(count, DType::Float32))};
    };
    return t;
  }();
  return k;
}

class DeviceDispatch : public ::testing::Test {
 protected:
  void SetUp() override {
    prev_alloc_ = std::exchange(detail::allocator_registry()[static_cast<int>(Device::CUDA)], &alloc_);
    active_allocator() = &alloc_;
    prev_kernels_ = set_device_kernels(Device::CUDA, &host_kernels());
    calls().clear();
  }
  void TearDown() override {
    detail::device_checks().clear();  // counts in this test's device memory
    detail::allocator_registry()[static_cast<int>(Device::CUDA)] = prev_alloc_;
    active_allocator() = nullptr;
    set_device_kernels(Device::CUDA, prev_kernels_);
  }
  HostAsDeviceAllocator alloc_;
  Allocator* prev_alloc_ = nullptr;
  const DeviceKernels* prev_kernels_ = nullptr;
};

// conv -> batch norm -> relu -> spatial mean -> linear -> log_softmax -> picked-class loss.
// (No conv bias: in front of batch norm its gradient is zero up to rounding.)
struct SmallNet {
  Tensor conv_w, bn_w, bn_b, rm, rv, fc_w, fc_b;
  explicit SmallNet(Generator& g) {
    conv_w = mul(randn({4, 3, 3, 3}, DType::Float32, g), 0.3);
    bn_w = add(mul(randn({4}, DType::Float32, g), 0.1), 1.0);
    bn_b = mul(randn({4}, DType::Float32, g), 0.1);
    rm = zeros({4});
    rv = ones({4});
    fc_w = mul(randn({5, 4}, DType::Float32, g), 0.5);
    fc_b = zeros({5});
  }
  std::vector<Tensor*> params() { return {&conv_w, &bn_w, &bn_b, &fc_w, &fc_b}; }
  SmallNet to(Device d) const {
    SmallNet n = *this;
    for (Tensor* p : n.params()) *p = p->to(d).requires_grad_();
    n.rm = rm.to(d);
    n.rv = rv.to(d);
    return n;
  }
  Tensor loss(const Tensor& x, const Tensor& onehot) {
    Tensor h = conv2d(x, conv_w, Tensor(), {1, 1}, {1, 1});
    h = relu(batch_norm(h, rm, rv, bn_w, bn_b, true));
    h = mean(h, {2, 3});
    const Tensor logp = log_softmax(linear(h, fc_w, fc_b), 1);
    return mul(sum(mul(logp, onehot)), -1.0 / static_cast<double>(x.size(0)));
  }
};

TEST_F(DeviceDispatch, ToMovesBothWaysAndIsDifferentiable) {
  const Tensor x = randn({3, 4}).requires_grad_();
  const Tensor d = x.to(Device::CUDA);
  EXPECT_EQ(d.device(), Device::CUDA);
  EXPECT_EQ(calls()["to_device"], 1);
  EXPECT_EQ(rel_error(d.cpu(), x.detach()), 0.0);
  EXPECT_NE(d.to_string().find("device=cuda"), std::string::npos);
  EXPECT_FLOAT_EQ(d.select(0, 1).select(0, 2).item<float>(), x.select(0, 1).select(0, 2).item<float>());
  // The gradient of a device copy comes back to the CPU leaf.
  sum(mul(d, 3.0)).backward();
  ASSERT_TRUE(x.grad().defined());
  EXPECT_EQ(x.grad().device(), Device::CPU);
  EXPECT_EQ(rel_error(x.grad(), full({3, 4}, 3.0)), 0.0);
  // copy_ across devices, and a cast on the device.
  Tensor y = zeros({3, 4}, DType::Float32, Device::CUDA);
  y.copy_(x.detach());
  EXPECT_EQ(rel_error(y.cpu(), x.detach()), 0.0);
  const Tensor h = y.to(DType::Float16);
  EXPECT_EQ(h.device(), Device::CUDA);
  EXPECT_EQ(h.dtype(), DType::Float16);
  EXPECT_LT(rel_error(h.cpu(), x.detach()), 1e-3);
  EXPECT_EQ(rel_error(y.t().contiguous().cpu(), x.detach().t()), 0.0);
}

TEST_F(DeviceDispatch, TrainingStepOnTheDeviceMatchesTheCpu) {
  Generator g(11);
  SmallNet cpu(g);
  SmallNet gpu = cpu.to(Device::CUDA);
  for (Tensor* p : cpu.params()) p->requires_grad_();
  const Tensor x = randn({6, 3, 5, 5}, DType::Float32, g).requires_grad_();
  const Tensor xd = x.detach().to(Device::CUDA).requires_grad_();
  Tensor onehot = zeros({6, 5});
  for (int64_t i = 0; i < 6; ++i) onehot.select(0, i).select(0, (i * 2) % 5).fill_(1.0);

  const Tensor lc = cpu.loss(x, onehot);
  const Tensor lg = gpu.loss(xd, onehot.to(Device::CUDA));
  EXPECT_EQ(lg.device(), Device::CUDA);
  EXPECT_LT(rel_error(lg.cpu(), lc), 1e-6);
  lc.backward();
  lg.backward();
  EXPECT_EQ(calls()["to_host"], 1);  // the loss comparison above: nothing in the step left the device
  const auto pc = cpu.params(), pg = gpu.params();
  for (std::size_t i = 0; i < pc.size(); ++i) {
    ASSERT_TRUE(pg[i]->grad().defined()) << "parameter " << i;
    EXPECT_EQ(pg[i]->grad().device(), Device::CUDA) << "parameter " << i;
    EXPECT_LT(rel_error(pg[i]->grad().cpu(), pc[i]->grad()), 1e-5) << "parameter " << i;
  }
  EXPECT_LT(rel_error(xd.grad().cpu(), x.grad()), 1e-5);
  EXPECT_LT(rel_error(gpu.rm.cpu(), cpu.rm), 1e-6);
  EXPECT_LT(rel_error(gpu.rv.cpu(), cpu.rv), 1e-6);
  for (const char* k : {"conv_forward", "conv_backward_input", "conv_backward_weight", "batch_norm", "batch_norm_backward", "unary",
                        "unary_backward", "matmul", "softmax", "softmax_backward", "sum", "binary"})
    EXPECT_GT(calls()[k], 0) << k << " was never routed to the device table";
}

// add(t, 2.0) and friends on a device pass the scalar to the kernel: nothing is uploaded, the
// result equals the CPU's (scalar rounded to the tensor's dtype first), and gradients flow.
TEST_F(DeviceDispatch, HostScalarsGoToTheKernelByValue) {
  for (DType d : {DType::Float32, DType::BFloat16}) {
    const Tensor x = add(mixprec::abs(randn({5, 7})), 0.5).to(d);
    Tensor xd = x.to(Device::CUDA);
    xd.requires_grad_();
    calls().clear();
    const Tensor two = scalar_tensor(2.0, d), third = scalar_tensor(1.0 / 3.0, d);
    const std::vector<std::pair<Tensor, Tensor>> cases = {
        {add(xd, 0.3), add(x, 0.3)},       {sub(xd, 0.3), sub(x, 0.3)},       {mul(xd, 1.0 / 3.0), mul(x, 1.0 / 3.0)},
        {div(xd, 3.0), div(x, 3.0)},       {add(two, xd), add(two, x)},       {div(third, xd), div(third, x)},
        {mul(two, xd), mul(two, x)},       {sub(two, xd), sub(two, x)}};
    EXPECT_EQ(calls()["to_device"], 0) << d;
    EXPECT_EQ(calls()["binary"], 0) << d;
    EXPECT_EQ(calls()["binary_scalar"], static_cast<int>(cases.size())) << d;
    for (const auto& [got, want] : cases) {
      EXPECT_EQ(got.dtype(), d);
      EXPECT_EQ(rel_error(got.cpu(), want), 0.0) << d;
    }
    sum(mul(xd, 0.5)).backward();
    EXPECT_EQ(rel_error(xd.grad().cpu(), full({5, 7}, 0.5, d)), 0.0) << d;
  }
}

// A 16-bit branch added to a float32 stream: one binary call widens while it reads (no cast
// pass), the result is float32 and equals the CPU's, and each side gets its gradient in its dtype.
TEST_F(DeviceDispatch, MixedDtypeBinaryOpsWidenInTheKernel) {
  const Tensor x = randn({6, 10}), y = randn({10}).to(DType::BFloat16);
  Tensor xd = x.to(Device::CUDA), yd = y.to(Device::CUDA);
  xd.requires_grad_();
  yd.requires_grad_();
  calls().clear();
  const Tensor s = add(xd, yd), p = mul(yd, xd);
  EXPECT_EQ(calls()["copy"], 0);
  EXPECT_EQ(calls()["binary"], 2);
  EXPECT_EQ(s.dtype(), DType::Float32);
  EXPECT_EQ(rel_error(s.cpu(), add(x, y)), 0.0);
  EXPECT_EQ(rel_error(p.cpu(), mul(y, x)), 0.0);
  sum(add(s, p)).backward();
  EXPECT_EQ(yd.grad().dtype(), DType::BFloat16);
  EXPECT_EQ(xd.grad().dtype(), DType::Float32);
  EXPECT_LT(rel_error(xd.grad().cpu(), add(ones({6, 10}), y.to(DType::Float32).expand({6, 10}))), 1e-6);
}

TEST_F(DeviceDispatch, ResNet20StepWithCrossEntropyMatchesTheCpu) {
  Generator g1(21), g2(21);
  auto cpu = nn::models::resnet20(10, 3, false, g1);
  auto gpu = nn::models::resnet20(10, 3, false, g2);
  gpu->to(Device::CUDA);
  for (const Tensor& p : gpu->parameters()) ASSERT_EQ(p.device(), Device::CUDA);
  Generator gd(5);
  const Tensor x = randn({4, 3, 8, 8}, DType::Float32, gd);
  const Tensor y = tensor(std::vector<int64_t>{3, 0, 9, 3});
  const Tensor lc = cross_entropy(cpu->forward(x), y, Reduction::Mean, -100, 0.1);
  const Tensor lg = cross_entropy(gpu->forward(x.to(Device::CUDA)), y.to(Device::CUDA), Reduction::Mean, -100, 0.1);
  EXPECT_EQ(lg.device(), Device::CUDA);
  EXPECT_LT(rel_error(lg.cpu(), lc), 1e-5);
  lc.backward();
  lg.backward();
  const auto pc = cpu->parameters(), pg = gpu->parameters();
  ASSERT_EQ(pc.size(), pg.size());
  for (std::size_t i = 0; i < pc.size(); ++i) EXPECT_LT(rel_error(pg[i].grad().cpu(), pc[i].grad()), 1e-4) << "parameter " << i;
  // Moving the trained model back brings its buffers (running statistics) with it.
  gpu->to(Device::CPU);
  const auto sc = cpu->state_dict(), sg = gpu->state_dict();
  for (std::size_t i = 0; i < sc.size(); ++i) EXPECT_LT(rel_error(sg[i].second, sc[i].second), 1e-5) << sc[i].first;
}

// GPT-mini: embeddings, layer norms, causal attention with dropout, GELU, dropout, a tied head
// and cross entropy, then an AdamW step. The same seed gives the device the CPU's dropout draws.
TEST_F(DeviceDispatch, GptStepWithDropoutOnTheDeviceMatchesTheCpu) {
  nn::models::GPTConfig cfg;
  cfg.vocab = 17, cfg.block_size = 8, cfg.n_layer = 2, cfg.n_head = 2, cfg.d_model = 16, cfg.mlp_hidden = 32, cfg.dropout = 0.1;
  Generator g1(31), g2(31);
  nn::models::GPT cpu(cfg, g1), gpu(cfg, g2);
  gpu.to(Device::CUDA);
  Generator gd(6);
  const Tensor idx = randint(0, cfg.vocab, {3, 8}, DType::Int64, gd), tgt = randint(0, cfg.vocab, {3, 8}, DType::Int64, gd);
  manual_seed(77);
  const Tensor lc = cpu.loss(idx, tgt);
  manual_seed(77);
  const Tensor lg = gpu.loss(idx.to(Device::CUDA), tgt.to(Device::CUDA));
  EXPECT_EQ(lg.device(), Device::CUDA);
  EXPECT_LT(rel_error(lg.cpu(), lc), 1e-5);
  for (const char* k : {"embedding", "layer_norm", "dropout", "softmax", "matmul"}) EXPECT_GT(calls()[k], 0) << k;
  lc.backward();
  lg.backward();
  for (const char* k : {"embedding_backward", "layer_norm_backward", "unary_backward"}) EXPECT_GT(calls()[k], 0) << k;
  const auto pc = cpu.named_parameters(), pg = gpu.named_parameters();
  ASSERT_EQ(pc.size(), pg.size());
  for (std::size_t i = 0; i < pc.size(); ++i) {
    ASSERT_EQ(pg[i].second.grad().device(), Device::CUDA) << pc[i].first;
    EXPECT_LT(rel_error(pg[i].second.grad().cpu(), pc[i].second.grad()), 1e-4) << pc[i].first;
  }
  // The update on the same gradients (Adam's first step is about lr * sign(g), so gradients that
  // are zero up to rounding would make any two runs differ).
  for (std::size_t i = 0; i < pc.size(); ++i) pg[i].second.grad().copy_(pc[i].second.grad());
  optim::AdamW oc(cpu.parameters(), 1e-2), og(gpu.parameters(), 1e-2);
  oc.step();
  og.step();
  for (std::size_t i = 0; i < pc.size(); ++i) EXPECT_LT(rel_error(pg[i].second.cpu(), pc[i].second), 1e-6) << pc[i].first;
}

TEST_F(DeviceDispatch, GptUnderBFloat16AutocastOnTheDeviceStaysCloseToTheCpu) {
  nn::models::GPTConfig cfg;
  cfg.vocab = 17, cfg.block_size = 8, cfg.n_layer = 2, cfg.n_head = 2, cfg.d_model = 16, cfg.mlp_hidden = 32;
  Generator g1(32), g2(32);
  nn::models::GPT cpu(cfg, g1), gpu(cfg, g2);
  gpu.to(Device::CUDA);
  Generator gd(7);
  const Tensor idx = randint(0, cfg.vocab, {2, 8}, DType::Int64, gd), tgt = randint(0, cfg.vocab, {2, 8}, DType::Int64, gd);
  Tensor lc, lg;
  {
    autocast ac{Device::CPU, DType::BFloat16};
    lc = cpu.loss(idx, tgt);
  }
  {
    autocast ac{Device::CUDA, DType::BFloat16};
    lg = gpu.loss(idx.to(Device::CUDA), tgt.to(Device::CUDA));
  }
  EXPECT_EQ(lg.dtype(), DType::Float32);
  // The device rounds q k^T to bfloat16 before the softmax (the CPU's fused kernel keeps it in
  // float32): within bfloat16's 1e-2.
  EXPECT_LT(rel_error(lg.cpu(), lc), 1e-2);
  lc.backward();
  lg.backward();
  const auto pc = cpu.named_parameters(), pg = gpu.named_parameters();
  for (std::size_t i = 0; i < pc.size(); ++i) {
    EXPECT_EQ(pg[i].second.grad().dtype(), DType::Float32) << pc[i].first;
    EXPECT_LT(rel_error(pg[i].second.grad().cpu(), pc[i].second.grad()), 5e-2) << pc[i].first;
  }
}

TEST_F(DeviceDispatch, AttentionOnTheDeviceKeepsTheCpuRules) {
  Generator g(8);
  const Tensor q = randn({2, 3, 4, 5}, DType::Float32, g), k = randn({2, 3, 6, 5}, DType::Float32, g),
               v = randn({2, 3, 6, 4}, DType::Float32, g);
  Tensor bmask = gt(rand({2, 1, 4, 6}, DType::Float32, g), 0.3);
  bmask.select(0, 1).select(1, 2).fill_(0.0);  // a row with no key: 0 and no gradient
  const Tensor fmask = mul(randn({4, 6}, DType::Float32, g), 0.5);
  struct Case {
    const char* name;
    Tensor mask;
    double p;
    bool causal;
  };
  for (const Case& c : {Case{"causal", Tensor(), 0.0, true}, Case{"bool mask, empty row", bmask, 0.0, false},
                        Case{"float mask with grad", fmask, 0.0, false}, Case{"dropout, causal", Tensor(), 0.3, true},
                        Case{"dropout, empty row", bmask, 0.25, false}}) {
    SCOPED_TRACE(c.name);
    const Tensor qc = q.detach().requires_grad_(), kc = k.detach().requires_grad_(), vc = v.detach().requires_grad_();
    const Tensor qd = q.to(Device::CUDA).requires_grad_(), kd = k.to(Device::CUDA).requires_grad_(),
                 vd = v.to(Device::CUDA).requires_grad_();
    const bool mg = c.mask.defined() && c.mask.is_floating_point();
    const Tensor mc = mg ? c.mask.detach().requires_grad_() : c.mask, md = mg ? c.mask.detach().requires_grad_() : c.mask;
    manual_seed(3);
    const Tensor oc = scaled_dot_product_attention(qc, kc, vc, mc, c.p, c.causal);
    manual_seed(3);
    const Tensor od = scaled_dot_product_attention(qd, kd, vd, md, c.p, c.causal);
    ASSERT_EQ(od.device(), Device::CUDA);
    EXPECT_LT(rel_error(od.cpu(), oc), 1e-5);
    const Tensor w = randn(oc.sizes(), DType::Float32, g);
    sum(mul(oc, w)).backward();
    sum(mul(od, w.to(Device::CUDA))).backward();
    EXPECT_LT(rel_error(qd.grad().cpu(), qc.grad()), 1e-5);
    EXPECT_LT(rel_error(kd.grad().cpu(), kc.grad()), 1e-5);
    EXPECT_LT(rel_error(vd.grad().cpu(), vc.grad()), 1e-5);
    if (mg) {
      EXPECT_LT(rel_error(md.grad(), mc.grad()), 1e-5);
    }
  }
  // A float mask with its gradient may not empty a row on the device: refused, by name.
  Tensor dead = zeros({4, 6});
  dead.select(0, 1).fill_(-std::numeric_limits<double>::infinity());
  const Tensor qd = q.to(Device::CUDA);
  const std::string msg = error_of([&] {
    scaled_dot_product_attention(qd, k.to(Device::CUDA), v.to(Device::CUDA), dead.requires_grad_());
  });
  EXPECT_NE(msg.find("scaled_dot_product_attention"), std::string::npos) << msg;
  EXPECT_NE(msg.find("bool mask"), std::string::npos) << msg;
  const Tensor o = scaled_dot_product_attention(qd, k.to(Device::CUDA), v.to(Device::CUDA), dead.detach());
  EXPECT_EQ(rel_error(o.cpu().select(2, 1), zeros({2, 3, 4})), 0.0);
  // Refused calls with dropout leave the generator where it was.
  for (const auto& f : std::vector<std::function<void()>>{
           [&] { scaled_dot_product_attention(qd, k, v.to(Device::CUDA), Tensor(), 0.5); },  // key on the CPU
           [&] { scaled_dot_product_attention(qd, k.to(Device::CUDA), v.to(Device::CUDA), dead.requires_grad_(), 0.5); }}) {
    manual_seed(12);
    EXPECT_FALSE(error_of(f).empty());
    const uint64_t after = default_generator().next_u64();
    manual_seed(12);
    EXPECT_EQ(after, default_generator().next_u64());
  }
}

// Calls the fused entries take: one forward and one backward kernel, no composed ops, the CPU's
// values and dropout draws (the emulated entries are the CPU's kernels, so float32 agrees to
// rounding), broadcast batch dims summed back, the generator consumed as on the CPU.
TEST_F(DeviceDispatch, FusedAttentionTakesSupportedCallsWithOneNodeAndTheCpuValues) {
  Generator g(18);
  struct Case {
    const char* name;
    Shape q, kv;
    double p;
    bool causal;
    DType dtype;
  };
  for (const Case& c : {Case{"plain", {2, 3, 5, 8}, {2, 3, 7, 8}, 0.0, false, DType::Float32},
                        Case{"causal, L > S", {2, 3, 9, 16}, {2, 3, 6, 16}, 0.0, true, DType::Float32},
                        Case{"dropout, causal", {2, 2, 7, 8}, {2, 2, 7, 8}, 0.2, true, DType::Float32},
                        Case{"dropout, broadcast k/v", {2, 3, 5, 24}, {1, 3, 6, 24}, 0.3, false, DType::Float32},
                        Case{"bfloat16, causal", {2, 2, 6, 32}, {2, 2, 6, 32}, 0.1, true, DType::BFloat16},
                        Case{"no keys", {2, 3, 5, 8}, {2, 3, 0, 8}, 0.0, false, DType::Float32},
                        Case{"no queries", {2, 3, 0, 8}, {2, 3, 4, 8}, 0.0, true, DType::Float32}}) {
    SCOPED_TRACE(c.name);
    calls().clear();
    const Tensor q = randn(c.q, DType::Float32, g).to(c.dtype), k = randn(c.kv, DType::Float32, g).to(c.dtype),
                 v = randn(c.kv, DType::Float32, g).to(c.dtype);
    const Tensor qc = q.detach().requires_grad_(), kc = k.detach().requires_grad_(), vc = v.detach().requires_grad_();
    const Tensor qd = q.to(Device::CUDA).requires_grad_(), kd = k.to(Device::CUDA).requires_grad_(),
                 vd = v.to(Device::CUDA).requires_grad_();
    manual_seed(4);
    const Tensor oc = scaled_dot_product_attention(qc, kc, vc, Tensor(), c.p, c.causal);
    const uint64_t next_cpu = default_generator().next_u64();
    manual_seed(4);
    const Tensor od = scaled_dot_product_attention(qd, kd, vd, Tensor(), c.p, c.causal);
    EXPECT_EQ(default_generator().next_u64(), next_cpu);  // one draw, as on the CPU
    ASSERT_EQ(od.device(), Device::CUDA);
    EXPECT_EQ(od.dtype(), c.dtype);
    EXPECT_EQ(calls()["sdpa_forward"], 1);
    for (const char* composed : {"matmul", "softmax", "binary"}) EXPECT_EQ(calls()[composed], 0) << composed;
    EXPECT_LT(rel_error(od.cpu(), oc), 1e-6);
    const Tensor w = randn(oc.sizes(), DType::Float32, g).to(c.dtype);
    sum(mul(oc, w)).backward();
    sum(mul(od, w.to(Device::CUDA))).backward();
    EXPECT_EQ(calls()["sdpa_backward"], 1);
    EXPECT_EQ(calls()["softmax_backward"], 0);
    const double tol = c.dtype == DType::Float32 ? 1e-5 : 1e-2;
    for (const auto& [name, gd, gc] : {std::tuple{"q", qd, qc}, std::tuple{"k", kd, kc}, std::tuple{"v", vd, vc}}) {
      ASSERT_TRUE(gd.grad().defined()) << name;
      EXPECT_EQ(gd.grad().device(), Device::CUDA) << name;
      EXPECT_EQ(gd.grad().sizes(), gc.grad().sizes()) << name;
      EXPECT_EQ(gd.grad().dtype(), c.dtype) << name;
      EXPECT_LT(rel_error(gd.grad().cpu(), gc.grad()), tol) << name;
    }
  }
}

// What the fused entries do not take keeps the composed path: masks, head dims that are not a
// multiple of 8 or above 128, E != Ev.
TEST_F(DeviceDispatch, AttentionOutsideTheFusedContractIsComposed) {
  Generator g(19);
  struct Case {
    const char* name;
    Shape q, k, v;
    bool mask;
  };
  for (const Case& c : {Case{"bool mask", {2, 4, 8}, {2, 5, 8}, {2, 5, 8}, true}, Case{"E 12", {2, 4, 12}, {2, 5, 12}, {2, 5, 12}, false},
                        Case{"E 136", {1, 3, 136}, {1, 4, 136}, {1, 4, 136}, false},
                        Case{"E 8, Ev 16", {2, 4, 8}, {2, 5, 8}, {2, 5, 16}, false}}) {
    SCOPED_TRACE(c.name);
    calls().clear();
    const Tensor q = randn(c.q, DType::Float32, g), k = randn(c.k, DType::Float32, g), v = randn(c.v, DType::Float32, g);
    const Tensor mask = c.mask ? gt(rand({4, 5}, DType::Float32, g), 0.2) : Tensor();
    const Tensor qc = q.detach().requires_grad_(), qd = q.to(Device::CUDA).requires_grad_();
    const Tensor oc = scaled_dot_product_attention(qc, k, v, mask);
    const Tensor od = scaled_dot_product_attention(qd, k.to(Device::CUDA), v.to(Device::CUDA), mask);
    EXPECT_EQ(calls()["sdpa_forward"], 0);
    EXPECT_GT(calls()["softmax"], 0);
    EXPECT_LT(rel_error(od.cpu(), oc), 1e-5);
    sum(oc).backward();
    sum(od).backward();
    EXPECT_EQ(calls()["sdpa_backward"], 0);
    EXPECT_LT(rel_error(qd.grad().cpu(), qc.grad()), 1e-5);
  }
}

TEST_F(DeviceDispatch, LayerNormEmbeddingDropoutAndExpLogOnTheDevice) {
  Generator g(9);
  // layer_norm with 16-bit parameters: widened for the kernel, gradients rounded back.
  for (DType dt : {DType::Float32, DType::BFloat16}) {
    SCOPED_TRACE(name(dt));
    const Tensor x = randn({3, 2, 8}, DType::Float32, g).to(dt), w = randn({2, 8}, DType::Float32, g).to(dt),
                 b = randn({2, 8}, DType::Float32, g).to(dt);
    const Tensor xc = x.detach().requires_grad_(), wc = w.detach().requires_grad_(), bc = b.detach().requires_grad_();
    const Tensor xd = x.to(Device::CUDA).requires_grad_(), wd = w.to(Device::CUDA).requires_grad_(),
                 bd = b.to(Device::CUDA).requires_grad_();
    const Tensor yc = layer_norm(xc, {2, 8}, wc, bc), yd = layer_norm(xd, {2, 8}, wd, bd);
    EXPECT_EQ(yd.dtype(), dt);
    const double tol = dt == DType::Float32 ? 1e-6 : 1e-2;
    EXPECT_LT(rel_error(yd.cpu(), yc), tol);
    const Tensor gy = randn({3, 2, 8}, DType::Float32, g).to(dt);
    sum(mul(yc, gy)).backward();
    sum(mul(yd, gy.to(Device::CUDA))).backward();
    EXPECT_EQ(wd.grad().dtype(), dt);
    for (const auto& [a, c] : {std::pair{xd, xc}, std::pair{wd, wc}, std::pair{bd, bc}}) EXPECT_LT(rel_error(a.grad().cpu(), c.grad()), tol);
  }
  // embedding: repeated indices accumulate, padding_idx gets nothing, int32 indices on the device.
  const Tensor w = randn({6, 4}, DType::Float32, g).requires_grad_();
  const Tensor wd = w.detach().to(Device::CUDA).requires_grad_();
  const Tensor idx = tensor(std::vector<int64_t>{1, 5, 1, 0, 5, 5}, {2, 3});
  const Tensor ec = embedding(w, idx, 5), ed = embedding(wd, idx.to(DType::Int32).to(Device::CUDA), 5);
  EXPECT_EQ(ed.sizes(), (Shape{2, 3, 4}));
  EXPECT_EQ(rel_error(ed.cpu(), ec), 0.0);
  const Tensor ge = randn({2, 3, 4}, DType::Float32, g);
  sum(mul(ec, ge)).backward();
  sum(mul(ed, ge.to(Device::CUDA))).backward();
  EXPECT_LT(rel_error(wd.grad().cpu(), w.grad()), 1e-6);
  const int before = calls()["embedding"];
  const std::string msg = error_of([&] { embedding(wd, tensor(std::vector<int64_t>{2, 6})); });
  EXPECT_NE(msg.find("index 6 (at position 1) is out of range"), std::string::npos) << msg;
  EXPECT_EQ(calls()["embedding"], before);  // CPU indices: checked before any kernel ran
  // Device indices are checked on the device: the next host read reports it, naming the op.
  const int reads = calls()["to_host"];
  const Tensor oob = embedding(wd, tensor(std::vector<int64_t>{2, 6}).to(Device::CUDA));
  EXPECT_EQ(calls()["to_host"], reads);
  const std::string lazy = error_of([&] { (void)oob.cpu(); });
  EXPECT_NE(lazy.find("embedding: an index is out of range for num_embeddings V = 6"), std::string::npos) << lazy;
  // dropout: the CPU's mask for the same generator state, in every floating dtype the device takes.
  for (DType dt : {DType::Float32, DType::Float16, DType::BFloat16}) {
    const Tensor x = randn({5, 7}, DType::Float32, g).to(dt);
    const Tensor xc = x.detach().requires_grad_(), xd = x.to(Device::CUDA).requires_grad_();
    Generator a(4), b(4);
    const Tensor yc = dropout(xc, 0.3, true, a), yd = dropout(xd, 0.3, true, b);
    EXPECT_EQ(rel_error(yd.cpu(), yc), 0.0);
    sum(yc).backward();
    sum(yd).backward();
    EXPECT_EQ(rel_error(xd.grad().cpu(), xc.grad()), 0.0);
  }
  {  // float64 is refused on the device before the mask is drawn
    Generator a(4), b(4);
    EXPECT_NE(error_of([&] { dropout(randn({3}, DType::Float64).to(Device::CUDA), 0.5, true, a); }).find("float64"), std::string::npos);
    EXPECT_EQ(a.next_u64(), b.next_u64());
  }
  // exp and log, and their gradients.
  const Tensor x = add(rand({3, 4}, DType::Float32, g), 0.5).requires_grad_();
  const Tensor xd = x.detach().to(Device::CUDA).requires_grad_();
  const Tensor yc = add(exp(x), log(x)), yd = add(exp(xd), log(xd));
  EXPECT_LT(rel_error(yd.cpu(), yc), 1e-6);
  sum(yc).backward();
  sum(yd).backward();
  EXPECT_LT(rel_error(xd.grad().cpu(), x.grad()), 1e-6);
}

TEST_F(DeviceDispatch, HostCodeCannotTouchDeviceMemory) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");  // OpenMP threads are running
  const Tensor d = randn({4}).to(Device::CUDA);
  EXPECT_DEATH(d.data<float>()[0] = 1.0f, "");
  EXPECT_FLOAT_EQ(d.cpu().data<float>()[0], d.select(0, 0).item<float>());  // through the table: fine
}

// AdamW and SGD (Nesterov) with GradScaler and clip_grad_norm_ on device parameters: the same
// parameters, state, scale and skipped step as on the CPU; state stays on the device, and each
// step is one fused launch per group.
TEST_F(DeviceDispatch, OptimizersAndGradScalerStepOnTheDevice) {
  Generator gx(12);
  const Tensor x = randn({6, 3, 5, 5}, DType::Float32, gx);
  Tensor onehot = zeros({6, 5});
  for (int64_t i = 0; i < 6; ++i) onehot.select(0, i).select(0, (i * 3) % 5).fill_(1.0);
  for (bool sgd : {false, true}) {
    SCOPED_TRACE(sgd ? "SGD" : "AdamW");
    Generator g(13);
    SmallNet cpu(g);
    SmallNet dev = cpu.to(Device::CUDA);
    for (Tensor* p : cpu.params()) p->requires_grad_();
    auto make = [&](SmallNet& n) -> std::unique_ptr<optim::Optimizer> {
      std::vector<Tensor> ps;
      for (Tensor* p : n.params()) ps.push_back(*p);
      if (sgd) return std::make_unique<optim::SGD>(ps, 0.05, 0.9, 0.0, 1e-3, true);
      return std::make_unique<optim::AdamW>(ps, 1e-2);
    };
    auto oc = make(cpu), od = make(dev);
    amp::GradScaler sc(1024.0, 2.0, 0.5, 2), sd(1024.0, 2.0, 0.5, 2);
    calls().clear();
    for (int it = 0; it < 4; ++it) {
      double norms[2];
      int k = 0;
      for (auto [net, opt, scaler, xin, oh] : {std::tuple{&cpu, oc.get(), &sc, x, onehot},
                                               std::tuple{&dev, od.get(), &sd, x.to(Device::CUDA), onehot.to(Device::CUDA)}}) {
        opt->zero_grad();
        scaler->scale(net->loss(xin, oh)).backward();
        if (it == 1) {  // an overflow: this step is skipped and the scale backs off
          Tensor bad = net->fc_b.grad().cpu();
          bad.data<float>()[2] = std::numeric_limits<float>::infinity();
          net->fc_b.grad().copy_(bad);
        }
        scaler->unscale_(*opt);
        if (it != 1) norms[k] = optim::clip_grad_norm_(*opt, 0.05);
        EXPECT_EQ(scaler->step(*opt), it != 1);
        scaler->update();
        ++k;
      }
      if (it != 1) EXPECT_NEAR(norms[1], norms[0], 1e-5 * norms[0]) << "iteration " << it;
      EXPECT_EQ(sd.get_scale(), sc.get_scale()) << "iteration " << it;
    }
    EXPECT_EQ(sd.get_scale(), 1024.0);  // halved at the overflow, doubled after two clean steps
    EXPECT_EQ(calls()[sgd ? "sgd" : "adam"], 4);  // the overflow's kernel skips on the device flag
    EXPECT_EQ(calls()["unscale"], 4);
    const auto pc = cpu.params(), pd = dev.params();
    for (std::size_t i = 0; i < pc.size(); ++i) {
      EXPECT_EQ(pd[i]->device(), Device::CUDA);
      EXPECT_LT(rel_error(pd[i]->cpu(), pc[i]->detach()), 1e-5) << "parameter " << i;
      const char* key = sgd ? "momentum_buffer" : "exp_avg";
      const Tensor& sdv = od->state(i).buffers.at(key);
      EXPECT_EQ(sdv.device(), Device::CUDA) << key;
      EXPECT_LT(rel_error(sdv.cpu(), oc->state(i).buffers.at(key)), 1e-4) << key << " of parameter " << i;
      EXPECT_EQ(od->state(i).step, oc->state(i).step);
    }
  }
}

// A bfloat16 parameter on the device: float32 masters there, the rounded copy written by the same
// update, as on the CPU; a model moved after its optimizer was built takes its state along.
TEST_F(DeviceDispatch, SixteenBitParametersKeepFloat32MastersOnTheDevice) {
  const Tensor init = randn({300}).to(DType::BFloat16);
  Tensor pc = init.clone().requires_grad_(), pd = init.to(Device::CUDA).requires_grad_();
  optim::AdamW oc({pc}, 1e-3), od({pd}, 1e-3);
  EXPECT_EQ(od.master_weight(0).device(), Device::CUDA);
  for (int it = 0; it < 3; ++it) {
    const Tensor g = randn({300}).to(DType::BFloat16);
    pc.set_grad(g);
    pd.set_grad(g.to(Device::CUDA));
    oc.step();
    od.step();
  }
  EXPECT_EQ(rel_error(od.master_weight(0).cpu(), oc.master_weight(0)), 0.0);
  EXPECT_EQ(rel_error(pd.cpu().to(DType::Float32), pc.detach().to(DType::Float32)), 0.0);

  // GradScaler with bfloat16 gradients: unscaled into float32 master gradients on the device.
  amp::GradScaler sc(256.0), sd(256.0);
  const Tensor g16 = mul(randn({300}), 1e-3).to(DType::BFloat16);
  for (auto [p, o, s] : {std::tuple{&pc, &oc, &sc}, std::tuple{&pd, &od, &sd}}) {
    s->scale(zeros({}));  // the scale comes to life at the first scale()
    p->set_grad(mul(p->device() == Device::CPU ? g16 : g16.to(Device::CUDA), 256.0));
    EXPECT_TRUE(s->step(*o));
    s->update();
  }
  EXPECT_EQ(rel_error(od.master_weight(0).cpu(), oc.master_weight(0)), 0.0);
  EXPECT_EQ(rel_error(pd.grad().cpu().to(DType::Float32), pc.grad().to(DType::Float32)), 0.0);  // .grad() unscaled too

  // A bfloat16 parameter moved to the device after a CPU step keeps its master's extra bits.
  Tensor r = init.clone().requires_grad_(), rref = init.clone().requires_grad_();
  optim::AdamW om({r}, 1e-3), om_ref({rref}, 1e-3);
  const Tensor h1 = randn({300}).to(DType::BFloat16), h2 = randn({300}).to(DType::BFloat16);
  r.set_grad(h1);
  rref.set_grad(h1);
  om.step();
  om_ref.step();
  nn::detail::restore_in_place(r, r.detach().to(Device::CUDA));  // what Module::to(Device) does
  r.set_grad(h2.to(Device::CUDA));
  rref.set_grad(h2);
  om.step();
  om_ref.step();
  EXPECT_EQ(om.master_weight(0).device(), Device::CUDA);
  EXPECT_EQ(rel_error(om.master_weight(0).cpu(), om_ref.master_weight(0)), 0.0);

  // Built on the CPU, then the parameter moves: masters and moments follow it to the device.
  Tensor q = randn({50}).requires_grad_();
  Tensor qref = q.detach().clone().requires_grad_();
  optim::SGD os({q}, 0.1, 0.9), oref({qref}, 0.1, 0.9);
  const Tensor g1 = randn({50}), g2 = randn({50});
  q.set_grad(g1);
  qref.set_grad(g1);
  os.step();
  oref.step();
  nn::detail::restore_in_place(q, q.detach().to(Device::CUDA));  // what Module::to(Device) does
  q.set_grad(g2.to(Device::CUDA));
  qref.set_grad(g2);
  os.step();
  oref.step();
  EXPECT_EQ(os.state(0).buffers.at("momentum_buffer").device(), Device::CUDA);
  EXPECT_EQ(rel_error(q.cpu(), qref.detach()), 0.0);
}

TEST_F(DeviceDispatch, AnOptimizerWithoutADeviceKernelRefusesAndChangesNothing) {
  DeviceKernels no_adam = host_kernels();
  no_adam.adam = nullptr;
  set_device_kernels(Device::CUDA, &no_adam);
  const Tensor init = randn({8});
  Tensor p = init.to(Device::CUDA).requires_grad_();
  optim::AdamW opt({p});
  p.set_grad(randn({8}).to(Device::CUDA));
  const std::string msg = error_of([&] { opt.step(); });
  EXPECT_NE(msg.find("AdamW"), std::string::npos) << msg;
  EXPECT_NE(msg.find("cuda"), std::string::npos) << msg;
  EXPECT_EQ(opt.state(0).step, 0);
  EXPECT_TRUE(opt.state(0).buffers.empty());
  EXPECT_EQ(rel_error(p.cpu(), init), 0.0);
  set_device_kernels(Device::CUDA, &host_kernels());
  opt.step();  // with the kernel back, the first step is step 1
  EXPECT_EQ(opt.state(0).step, 1);
  EXPECT_GT(rel_error(p.cpu(), init), 0.0);

  // SGD with dampening: a refused step must not leave a momentum buffer behind, or the next
  // step would not be the buffer's first (buf = g, not (1 - dampening) g).
  no_adam = host_kernels();
  no_adam.sgd = nullptr;
  set_device_kernels(Device::CUDA, &no_adam);
  Tensor q = init.to(Device::CUDA).requires_grad_();
  Tensor qc = init.clone().requires_grad_();
  optim::SGD os({q}, 0.1, 0.9, 0.5), oc({qc}, 0.1, 0.9, 0.5);
  const Tensor g = randn({8});
  q.set_grad(g.to(Device::CUDA));
  qc.set_grad(g);
  EXPECT_NE(error_of([&] { os.step(); }).find("SGD"), std::string::npos);
  EXPECT_TRUE(os.state(0).buffers.empty());
  EXPECT_EQ(os.state(0).step, 0);
  set_device_kernels(Device::CUDA, &host_kernels());
  for (int it = 0; it < 2; ++it) {
    os.step();
    oc.step();
  }
  EXPECT_EQ(rel_error(q.cpu(), qc.detach()), 0.0);
}

// A model trained on the device saves and resumes: the checkpoint's checksum reads device
// tensors on the host, and the loaded state goes back to the device.
TEST_F(DeviceDispatch, CheckpointsOfADeviceModelRoundTrip) {
  Generator g(31);
  SmallNet net = SmallNet(g).to(Device::CUDA);
  std::vector<Tensor> ps;
  for (Tensor* p : net.params()) ps.push_back(*p);
  optim::AdamW opt(ps, 1e-2);
  amp::GradScaler scaler(1024.0);
  const Tensor x = randn({4, 3, 5, 5}).to(Device::CUDA);
  Tensor onehot = zeros({4, 5});
  for (int64_t i = 0; i < 4; ++i) onehot.select(0, i).select(0, i).fill_(1.0);
  const Tensor oh = onehot.to(Device::CUDA);
  scaler.scale(net.loss(x, oh)).backward();
  scaler.step(opt);
  scaler.update();
  nn::Module holder("holder");
  for (std::size_t i = 0; i < ps.size(); ++i) holder.register_parameter("p" + std::to_string(i), ps[i]);
  const std::string path = ::testing::TempDir() + "device_dispatch_ckpt.safetensors";
  io::save_checkpoint(path, {&holder, &opt, &scaler, nullptr, {}}, {1, 1});
  // Fresh device parameters and optimizer, loaded from the file.
  std::vector<Tensor> qs;
  nn::Module holder2("holder");
  for (const Tensor& p : ps) qs.push_back(zeros(p.sizes(), DType::Float32, Device::CUDA).requires_grad_());
  for (std::size_t i = 0; i < qs.size(); ++i) holder2.register_parameter("p" + std::to_string(i), qs[i]);  // slots: after the last push
  optim::AdamW opt2(qs, 1e-2);
  amp::GradScaler scaler2(1.0);
  io::load_checkpoint(path, {&holder2, &opt2, &scaler2, nullptr, {}});
  for (std::size_t i = 0; i < ps.size(); ++i) {
    EXPECT_EQ(qs[i].device(), Device::CUDA);
    EXPECT_EQ(rel_error(qs[i].cpu(), ps[i].cpu()), 0.0) << "parameter " << i;
    const Tensor& m2 = opt2.state(i).buffers.at("exp_avg");
    EXPECT_EQ(m2.device(), Device::CUDA);
    EXPECT_EQ(rel_error(m2.cpu(), opt.state(i).buffers.at("exp_avg").cpu()), 0.0);
  }
  EXPECT_EQ(scaler2.get_scale(), scaler.get_scale());
  std::remove(path.c_str());
}

TEST_F(DeviceDispatch, CrossEntropyOnTheDeviceKeepsItsSemantics) {
  const Tensor x = randn({5, 4, 3}).requires_grad_();  // spatial: [N, C, d]
  const Tensor t = tensor(std::vector<int64_t>{0, 3, -100, 1, 2, 2, 3, 0, -100, 1, 1, 0, 2, 3, 3}, {5, 3});
  for (Reduction r : {Reduction::Mean, Reduction::Sum, Reduction::None}) {
    const Tensor xd = x.detach().to(Device::CUDA).requires_grad_();
    const Tensor lc = cross_entropy(x, t, r, -100, 0.2), lg = cross_entropy(xd, t, r, -100, 0.2);
    EXPECT_EQ(lg.sizes(), lc.sizes());
    EXPECT_LT(rel_error(lg.cpu(), lc), 1e-6);
    sum(lc).backward();
    sum(lg).backward();
    EXPECT_LT(rel_error(xd.grad().cpu(), x.grad()), 1e-6);
    x.set_grad(Tensor());
  }
  const Tensor h = randn({3, 4}).to(DType::BFloat16).to(Device::CUDA);
  EXPECT_EQ(cross_entropy(h, tensor(std::vector<int64_t>{1, 2, 3})).dtype(), DType::BFloat16);
  const std::string msg = error_of([&] { cross_entropy(randn({2, 4}).to(Device::CUDA), tensor(std::vector<int64_t>{1, 4})); });
  EXPECT_NE(msg.find("target value 4 is out of range"), std::string::npos) << msg;
}

TEST_F(DeviceDispatch, AutocastOnTheDeviceFollowsThePolicyTable) {
  const Tensor x = randn({4, 8}).to(Device::CUDA);
  const Tensor w = randn({3, 8}).to(Device::CUDA).requires_grad_();
  autocast ac{Device::CUDA};  // float16 by default on CUDA, as torch.autocast
  const Tensor y = linear(x, w);
  EXPECT_EQ(y.dtype(), DType::Float16);
  const Tensor p = softmax(y, 1);
  EXPECT_EQ(p.dtype(), DType::Float32);
  EXPECT_EQ(p.device(), Device::CUDA);
  sum(p).backward();
  EXPECT_EQ(w.grad().dtype(), DType::Float32);
  EXPECT_EQ(w.grad().device(), Device::CUDA);
  {
    autocast cpu_only{Device::CPU, DType::BFloat16};  // the CPU scope does not touch CUDA tensors
    autocast off{Device::CUDA, false};
    EXPECT_EQ(linear(x, w).dtype(), DType::Float32);
  }
}

TEST_F(DeviceDispatch, OpsWithoutADeviceKernelNameThemselves) {
  const Tensor d = randn({2, 3, 4, 4}).to(Device::CUDA);
  for (const auto& [what, f, words] : std::vector<std::tuple<std::string, std::function<void()>, std::vector<std::string>>>{
           {"group_norm", [&] { group_norm(d, 1); }, {"group_norm", "cuda", "CPU kernel"}},
           {"max_pool2d", [&] { max_pool2d(d, {2, 2}); }, {"max_pool2d", "cuda"}},
           {"sqrt", [&] { mixprec::sqrt(d); }, {"sqrt", "cuda", ".cpu()"}},
           {"mixed devices", [&] { add(d, randn({2, 3, 4, 4})); }, {"add", "one device", "cpu", "cuda"}},
           {"matmul mixed", [&] { matmul(d, randn({4, 2})); }, {"matmul", "one device"}},
           {"integer add", [&] { add(zeros({2}, DType::Int64, Device::CUDA), zeros({2}, DType::Int64, Device::CUDA)); },
            {"add", "floating-point", "int64"}},
       }) {
    const std::string msg = error_of(f);
    for (const std::string& w : words) EXPECT_NE(msg.find(w), std::string::npos) << what << ": " << msg;
  }
  // A CPU scalar with a device tensor is fine, as in PyTorch.
  EXPECT_EQ(mul(d, 2.0).device(), Device::CUDA);
}

TEST_F(DeviceDispatch, WithoutABackendDeviceTensorsAreRefusedWithTheFix) {
  const Tensor d = randn({2, 3}).to(Device::CUDA);
  set_device_kernels(Device::CUDA, nullptr);
  const std::string msg = error_of([&] { relu(d); });
  EXPECT_NE(msg.find("relu"), std::string::npos) << msg;
  EXPECT_NE(msg.find("mixprec/cuda.hpp"), std::string::npos) << msg;
  const std::string up = error_of([] { (void)randn({2}).to(Device::CUDA); });
  EXPECT_NE(up.find("to(cuda)"), std::string::npos) << up;
  EXPECT_NE(d.to_string().find("..."), std::string::npos);  // printing never throws
}

TEST(DeviceCapabilities, BFloat16AutocastNeedsAmpereOnCuda) {
  auto& probe = detail::cuda_probe();
  const detail::CudaProbe saved = probe;
  probe.available = true;
  probe.devices = 1;
  probe.major = 7;
  probe.minor = 5;
  EXPECT_FALSE(is_bf16_supported(Device::CUDA));
  const std::string msg = error_of([] { autocast ac{Device::CUDA, DType::BFloat16}; });
  EXPECT_NE(msg.find("compute capability 8.0"), std::string::npos) << msg;
  EXPECT_NE(msg.find("7.5"), std::string::npos) << msg;
  EXPECT_NO_THROW(autocast(Device::CUDA, DType::Float16));
  EXPECT_NO_THROW(autocast(Device::CUDA, DType::BFloat16, false));
  EXPECT_FALSE(autocast::is_enabled(Device::CUDA));  // the refused scope left no state behind
  probe.major = 8;
  probe.minor = 0;
  EXPECT_TRUE(is_bf16_supported(Device::CUDA));
  EXPECT_NO_THROW(autocast(Device::CUDA, DType::BFloat16));
  probe = saved;
}

// ---- A training step without host syncs, and its capture (issue 17, parts 4 and 6) ----

// Host reads of device memory (to_host) made while f runs.
int64_t reads_during(const std::function<void()>& f) {
  const int before = calls()["to_host"];
  f();
  return calls()["to_host"] - before;
}

// GradScaler on device gradients: scale, unscale_, step and update read nothing back; an
// overflow skips the whole update on the device (moments and step counts too) and backs the scale
// off there; what the host asks for afterwards (step's result, found_inf, the scale, the step
// counts, the skipped steps) is read then, and agrees with the CPU.
TEST_F(DeviceDispatch, GradScalerAndOptimizersStepWithoutReadingTheDevice) {
  Generator gx(21);
  const Tensor x = randn({4, 3, 5, 5}, DType::Float32, gx);
  Tensor onehot = zeros({4, 5});
  for (int64_t i = 0; i < 4; ++i) onehot.select(0, i).select(0, (i * 2) % 5).fill_(1.0);
  for (bool sgd : {false, true}) {
    SCOPED_TRACE(sgd ? "SGD" : "AdamW");
    Generator g(22);
    SmallNet cpu(g);
    SmallNet dev = cpu.to(Device::CUDA);
    for (Tensor* p : cpu.params()) p->requires_grad_();
    auto make = [&](SmallNet& n) -> std::unique_ptr<optim::Optimizer> {
      std::vector<Tensor> ps;
      for (Tensor* p : n.params()) ps.push_back(*p);
      if (sgd) return std::make_unique<optim::SGD>(ps, 0.05, 0.9, 0.5);  // dampening: the first step differs
      return std::make_unique<optim::AdamW>(ps, 1e-2);
    };
    auto oc = make(cpu), od = make(dev);
    amp::GradScaler sc(1024.0, 2.0, 0.5, 2), sd(1024.0, 2.0, 0.5, 2);
    const Tensor xd = x.to(Device::CUDA), ohd = onehot.to(Device::CUDA);
    for (int it = 0; it < 5; ++it) {
      // it 0: the very first step overflows (SGD's momentum buffer must still start fresh after it).
      const bool overflow = it == 0 || it == 2;
      oc->zero_grad();
      sc.scale(cpu.loss(x, onehot)).backward();
      if (overflow) cpu.fc_b.grad().data<float>()[1] = std::numeric_limits<float>::quiet_NaN();
      const bool stepped_cpu = sc.step(*oc);
      sc.update();
      amp::StepResult r = true;
      od->zero_grad();
      sd.scale(dev.loss(xd, ohd)).backward();
      if (overflow) {
        Tensor bad = dev.fc_b.grad().cpu();
        bad.data<float>()[1] = std::numeric_limits<float>::quiet_NaN();
        dev.fc_b.grad().copy_(bad);
      }
      const int64_t reads = reads_during([&] {
        r = sd.step(*od);
        sd.update();
      });
      EXPECT_EQ(reads, 0) << "iteration " << it;
      EXPECT_FALSE(r.known_on_host());
      EXPECT_EQ(static_cast<bool>(r), stepped_cpu) << "iteration " << it;  // read now, on request
      EXPECT_EQ(sd.get_scale(), sc.get_scale()) << "iteration " << it;
      EXPECT_EQ(sd.get_growth_tracker(), sc.get_growth_tracker()) << "iteration " << it;
    }
    EXPECT_EQ(sd.skipped_steps(), 2);
    EXPECT_EQ(sc.skipped_steps(), 2);
    EXPECT_EQ(sd.device(), Device::CUDA);
    const auto pc = cpu.params(), pd = dev.params();
    for (std::size_t i = 0; i < pc.size(); ++i) {
      EXPECT_LT(rel_error(pd[i]->cpu(), pc[i]->detach()), 1e-5) << "parameter " << i;
      EXPECT_EQ(od->state(i).step, 3) << "parameter " << i;  // read from the device counters
      EXPECT_EQ(od->state(i).step, oc->state(i).step);
    }
    const optim::StateDict sdc = oc->state_dict(), sdd = od->state_dict();
    EXPECT_EQ(sdd.scalars, sdc.scalars);
  }
}

// A skipped step leaves a fresh parameter's state unborn in effect: the next applied update is
// step 1, with Adam's first-step bias correction, exactly as if the skipped one never happened.
TEST_F(DeviceDispatch, ASkippedFirstStepIsNotCounted) {
  const Tensor init = randn({40}), g1 = randn({40});
  Tensor pc = init.clone().requires_grad_(), pd = init.to(Device::CUDA).requires_grad_();
  optim::Adam oc({pc}, 1e-2), od({pd}, 1e-2);
  const Tensor skip = full({}, 1.0, DType::Float32, Device::CUDA), go = zeros({}, DType::Float32, Device::CUDA);
  pd.set_grad(randn({40}).to(Device::CUDA));
  od.step(skip);
  EXPECT_EQ(od.state(0).step, 0);
  EXPECT_EQ(rel_error(pd.cpu(), init), 0.0);
  pc.set_grad(g1);
  pd.set_grad(g1.to(Device::CUDA));
  oc.step();
  od.step(go);
  EXPECT_EQ(od.state(0).step, 1);
  EXPECT_EQ(rel_error(pd.cpu(), pc.detach()), 0.0);
  // A flag on the device cannot skip CPU parameters: refused before anything changes.
  const std::string msg = error_of([&] { oc.step(skip); });
  EXPECT_NE(msg.find("found_inf"), std::string::npos) << msg;
  EXPECT_EQ(oc.state(0).step, 1);
  // Nor is a flag of the wrong kind taken.
  EXPECT_NE(error_of([&] { od.step(zeros({2}, DType::Float32, Device::CUDA)); }).find("one float32 value"), std::string::npos);
  EXPECT_EQ(od.state(0).step, 1);
  // A loaded state dict takes its step count to the device again.
  optim::StateDict sd = od.state_dict();
  sd.scalars["state.0.step"] = 7;
  od.load_state_dict(sd);
  pd.set_grad(g1.to(Device::CUDA));
  od.step(go);
  EXPECT_EQ(od.state(0).step, 8);
}

// clip_grad_norm_ on device gradients: the norm stays a device tensor (read when converted), the
// gradients are scaled by a factor computed there, and the result is the CPU's.
TEST_F(DeviceDispatch, ClipGradNormKeepsTheNormOnTheDevice) {
  const Tensor a = mul(randn({30}), 3.0), b = mul(randn({4, 5}), 3.0);
  Tensor pa = zeros({30}).requires_grad_(), pb = zeros({4, 5}).requires_grad_();
  Tensor qa = zeros({30}, DType::Float32, Device::CUDA).requires_grad_(), qb = zeros({4, 5}, DType::Float32, Device::CUDA).requires_grad_();
  pa.set_grad(a.clone());
  pb.set_grad(b.clone());
  qa.set_grad(a.to(Device::CUDA));
  qb.set_grad(b.to(Device::CUDA));
  const double nc = optim::clip_grad_norm_({pa, pb}, 1.0);
  optim::GradNorm nd = 0.0;
  EXPECT_EQ(reads_during([&] { nd = optim::clip_grad_norm_({qa, qb}, 1.0); }), 0);
  ASSERT_TRUE(nd.tensor().defined());
  EXPECT_EQ(nd.tensor().device(), Device::CUDA);
  EXPECT_NEAR(static_cast<double>(nd), nc, 1e-6 * nc);
  EXPECT_LT(rel_error(qa.grad().cpu(), pa.grad()), 1e-6);
  EXPECT_LT(rel_error(qb.grad().cpu(), pb.grad()), 1e-6);
  // Below max_norm nothing changes.
  const Tensor before = qa.grad().cpu();
  (void)optim::clip_grad_norm_({qa, qb}, 1e6);
  EXPECT_EQ(rel_error(qa.grad().cpu(), before), 0.0);
}

// Device targets are not read back: an out-of-range one makes its row NaN, and the next host
// read reports it as an Error naming cross_entropy, once; CPU targets are still refused at once.
TEST_F(DeviceDispatch, CrossEntropyChecksDeviceTargetsLazily) {
  const Tensor x = randn({3, 4});
  const Tensor t = tensor(std::vector<int64_t>{1, -100, 3});
  const Tensor xd = x.to(Device::CUDA), td = t.to(Device::CUDA);
  Tensor lg;
  EXPECT_EQ(reads_during([&] { lg = cross_entropy(xd, td, Reduction::Mean, -100, 0.1); }), 0);
  EXPECT_LT(rel_error(lg.cpu(), cross_entropy(x, t, Reduction::Mean, -100, 0.1)), 1e-6);
  const Tensor bad = tensor(std::vector<int64_t>{1, 7, 3}).to(Device::CUDA);
  Tensor lb;
  EXPECT_EQ(reads_during([&] { lb = cross_entropy(xd, bad, Reduction::None); }), 0);
  const std::string msg = error_of([&] { (void)lb.cpu(); });
  EXPECT_NE(msg.find("cross_entropy"), std::string::npos) << msg;
  EXPECT_NE(msg.find("out of range [0, 4)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("cuda: 1 since the last host read"), std::string::npos) << msg;
  const Tensor rows = lb.cpu();  // reported once
  EXPECT_TRUE(std::isnan(rows.data<float>()[1]));
  EXPECT_FALSE(std::isnan(rows.data<float>()[0]));
  EXPECT_NE(error_of([&] { cross_entropy(xd, tensor(std::vector<int64_t>{1, 4, 0})); }).find("target value 4 is out of range"),
            std::string::npos);
}

// The CPU and the device drop the same elements: keep(i) = dropout_keep(one draw, i, p).
TEST_F(DeviceDispatch, DropoutDrawsItsMaskFromOneSeedOnEitherSide) {
  const Tensor x = ones({1000});
  Generator a(8), b(8), c(8);
  const Tensor yc = dropout(x, 0.3, true, a);
  Tensor yd;
  EXPECT_EQ(reads_during([&] { yd = dropout(x.to(Device::CUDA), 0.3, true, b); }), 0);
  EXPECT_EQ(calls()["to_device"], 1);  // x only: no mask travels
  const uint64_t seed = c.next_u64();
  const float* v = yc.data<float>();
  for (int64_t i = 0; i < 1000; ++i) EXPECT_EQ(v[i] != 0.0f, detail::dropout_keep(seed, static_cast<uint64_t>(i), 0.3)) << i;
  EXPECT_EQ(rel_error(yd.cpu(), yc), 0.0);
  EXPECT_EQ(a.next_u64(), b.next_u64());  // one draw each
}

// A DeviceGraph for the emulated device: it counts what CapturedStep asks of it. Its "kernels"
// are host code that runs at once, so it cannot record; the replays of a real CUDA graph are
// tested on the GPU (tests/cuda/test_cuda_step.cu). What is tested here is CapturedStep's own
// bookkeeping.
struct EmulatedGraph final : DeviceGraph {
  static inline int begun = 0, ended = 0, replayed = 0;
  Tensor counter = zeros({}, DType::Int64, Device::CUDA);
  void begin_capture() override { ++begun; }
  void end_capture() override { ++ended; }
  void replay() override {
    ++replayed;
    const Kernel k("replay");
    ++*host(counter).data<int64_t>();
  }
  Tensor replay_counter() const override { return counter; }
};

TEST_F(DeviceDispatch, CapturedStepKeepsStaticBuffersAndRefusesHostWorkWhileCapturing) {
  DeviceKernels with_graphs = host_kernels();
  with_graphs.make_graph = []() -> std::unique_ptr<DeviceGraph> { return std::make_unique<EmulatedGraph>(); };
  set_device_kernels(Device::CUDA, &with_graphs);
  EmulatedGraph::begun = EmulatedGraph::ended = EmulatedGraph::replayed = 0;
  Tensor w = randn({3}).to(Device::CUDA).requires_grad_();
  std::vector<int> depth;
  std::vector<bool> counter_set;
  std::function<void()> inside = [] {};
  CapturedStep step(
      [&](const std::vector<Tensor>& in) {
        depth.push_back(detail::capture_state().depth);
        counter_set.push_back(detail::capture_state().replay_counter.defined());
        inside();
        return sum(mul(mul(in[0], w), 2.0));  // a CPU scalar operand goes over as a fill argument
      },
      Device::CUDA, 1);
  const Tensor x1 = randn({3}), x2 = randn({3});
  Tensor l1 = step({x1});  // warm-up: eager
  EXPECT_FALSE(step.captured());
  const void* buffer = step.static_inputs()[0].data_ptr();
  EXPECT_EQ(rel_error(step.static_inputs()[0].cpu(), x1), 0.0);
  EXPECT_LT(rel_error(l1.cpu(), sum(mul(mul(x1, w.detach().cpu()), 2.0))), 1e-6);
  Tensor l2 = step({x2});  // captured, then replayed
  EXPECT_TRUE(step.captured());
  EXPECT_EQ(EmulatedGraph::begun, 1);
  EXPECT_EQ(EmulatedGraph::ended, 1);
  EXPECT_EQ(EmulatedGraph::replayed, 1);
  EXPECT_EQ(depth, (std::vector<int>{0, 1}));
  EXPECT_EQ(counter_set, (std::vector<bool>{false, true}));
  Tensor l3 = step({x1.to(Device::CUDA)});  // replay only: the function does not run again
  EXPECT_EQ(depth.size(), 2u);
  EXPECT_EQ(EmulatedGraph::replayed, 2);
  EXPECT_EQ(step.replays(), 2);
  EXPECT_TRUE(l3.is_same(l2));  // the static output
  EXPECT_EQ(step.static_inputs()[0].data_ptr(), buffer);
  EXPECT_EQ(rel_error(step.static_inputs()[0].cpu(), x1), 0.0);
  // Inputs of another shape, dtype or number are refused before the buffers change.
  for (const auto& bad : std::vector<std::vector<Tensor>>{{randn({4})}, {randn({3}).to(DType::BFloat16)}, {x1, x2}}) {
    const std::string msg = error_of([&] { step(bad); });
    EXPECT_NE(msg.find("CapturedStep"), std::string::npos) << msg;
  }
  EXPECT_EQ(rel_error(step.static_inputs()[0].cpu(), x1), 0.0);
  EXPECT_EQ(EmulatedGraph::replayed, 2);

  // While capturing, a host read or an upload is refused by name, and the capture is closed.
  for (const auto& [what, f] : std::vector<std::pair<std::string, std::function<void()>>>{
           {"reads back", [&] { (void)sum(w.detach()).item<float>(); }},
           {"uploads", [&] { (void)randn({4}).to(Device::CUDA); }}}) {
    SCOPED_TRACE(what);
    CapturedStep s2([&](const std::vector<Tensor>& in) { inside(); return sum(mul(in[0], w)); }, Device::CUDA, 0);
    inside = f;
    const int ended = EmulatedGraph::ended;
    const std::string msg = error_of([&] { s2({x1}); });
    EXPECT_NE(msg.find(what), std::string::npos) << msg;
    EXPECT_NE(msg.find("CapturedStep is being captured"), std::string::npos) << msg;
    EXPECT_EQ(EmulatedGraph::ended, ended + 1);
    EXPECT_FALSE(s2.captured());
    EXPECT_EQ(detail::capture_state().depth, 0);
    EXPECT_FALSE(detail::capture_state().replay_counter.defined());
    inside = [] {};
    EXPECT_NO_THROW(s2({x1}));  // the next call captures again
    EXPECT_TRUE(s2.captured());
  }
  set_device_kernels(Device::CUDA, &host_kernels());
}

// Errors counted inside a captured step (cross_entropy targets) are reported after a replay too,
// and dropout inside the graph mixes the replay counter into its seed.
TEST_F(DeviceDispatch, CapturedStepReportsDeviceErrorsAfterReplays) {
  DeviceKernels with_graphs = host_kernels();
  with_graphs.make_graph = []() -> std::unique_ptr<DeviceGraph> { return std::make_unique<EmulatedGraph>(); };
  set_device_kernels(Device::CUDA, &with_graphs);
  const Tensor x = randn({2, 3}).to(Device::CUDA);
  std::vector<bool> replay_seen;
  CapturedStep step(
      [&](const std::vector<Tensor>& in) {
        const Tensor d = dropout(x, 0.5, true);
        replay_seen.push_back(detail::capture_state().replay_counter.defined());
        return add(cross_entropy(x, in[0]), mul(sum(d), 0.0));
      },
      Device::CUDA, 0);
  const Tensor ok = tensor(std::vector<int64_t>{0, 2});
  (void)step({ok});  // captured and replayed: the emulated kernels ran at capture, with good targets
  EXPECT_EQ(replay_seen, std::vector<bool>{true});
  EXPECT_NO_THROW((void)step.loss().cpu());
  (void)step({ok});
  EXPECT_NO_THROW((void)step.loss().cpu());
  EXPECT_TRUE(detail::device_checks().empty());
  set_device_kernels(Device::CUDA, &host_kernels());
}

}  // namespace device_dispatch_test
