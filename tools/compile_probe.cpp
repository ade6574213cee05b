// The compile-time probe of issue 19 (README, "Compiled mode"; benchmarks/NOTES.md): a 30-line training program.
//   header-only: g++ -std=c++20 -O2 -fopenmp -Iinclude -I/usr/include/eigen3 -c tools/compile_probe.cpp
//   compiled:    the same with -DMIXPREC_COMPILED_LIB, linked with libmixprec.a (mixprec::compiled)
//   -DPROBE_WHOLE_LIBRARY: include <mixprec/mixprec.hpp> instead of the three area headers it needs
#if defined(PROBE_WHOLE_LIBRARY)
#include <mixprec/mixprec.hpp>
#else
#include <mixprec/amp.hpp>
#include <mixprec/nn.hpp>
#include <mixprec/optim.hpp>
#endif
#include <cstdio>
using namespace mixprec;
struct Net : nn::Module {
  std::shared_ptr<nn::Linear> fc1, fc2;
  Net() : nn::Module("Net") {
    fc1 = std::make_shared<nn::Linear>(64, 128);
    fc2 = std::make_shared<nn::Linear>(128, 10);
    register_module("fc1", fc1);
    register_module("fc2", fc2);
  }
  Tensor forward(const Tensor& x) override { return fc2->forward(relu(fc1->forward(x))); }
};
int main() {
  auto net = std::make_shared<Net>();
  optim::AdamW opt(net->parameters(), 1e-3);
  amp::GradScaler scaler;
  Tensor loss;
  for (int step = 0; step < 3; ++step) {
    Tensor x = randn({32, 64});
    Tensor y = randint(0, 10, {32});
    {
      autocast ac(Device::CPU, DType::Float16);
      loss = cross_entropy(net->forward(x), y);
    }
    opt.zero_grad();
    scaler.scale(loss).backward();
    scaler.unscale_(opt);
    optim::clip_grad_norm_(net->parameters(), 1.0);
    scaler.step(opt);
    scaler.update();
  }
  std::printf("loss %.4f after 3 steps, scale %g\n", loss.item<double>(), scaler.get_scale());
}
