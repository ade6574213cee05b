// Trains a ResNet on Fashion-MNIST (Debian: dataset-fashion-mnist) in fp32, bf16 autocast, or fp16
// autocast with the GradScaler; prints test accuracy and peak tensor memory. With --distributed,
// under `mpirun -np N`, trains data-parallel: each rank a shard of every epoch, rank 0 reports.
// --device cuda trains on the GPU in the build nvcc compiles (mixprec_resnet_cuda).
// Batches go in channels-last (MemoryFormat::ChannelsLast): the network then stays in that
// layout, where the CPU's convolutions run on oneDNN when mixprec::onednn is linked.
#include <cstdio>
#include <iostream>

#include <mixprec/mixprec.hpp>

#include "common/cli.hpp"
#include "common/distributed.hpp"
#include "common/precision.hpp"
#include "common/run.hpp"

using namespace mixprec;
using examples::Precision;

namespace {

// Each rank evaluates its shard of the test set with rank 0's BatchNorm statistics.
double evaluate(nn::Module& model, const data::FashionMnist& test, Precision precision, Device device, int64_t batch_size,
                int64_t limit, examples::Distributed& dist) {
  model.eval();
  no_grad ng;
  dist.sync_buffers();
  data::DataLoader loader(data::TensorDataset(test.images, test.labels), batch_size);
  loader.set_shard(dist.rank(), dist.world());
  int64_t correct = 0, seen = 0, batches = 0;
  for (auto& b : loader) {
    if (limit > 0 && batches++ >= limit) break;
    Tensor logits;
    {
      examples::ForwardScope scope(precision, device);
      logits = model.forward(b.inputs.to(device).contiguous(MemoryFormat::ChannelsLast));
    }
    const Tensor pred = argmax(logits.cpu(), 1);
    correct += sum(eq(pred, b.targets)).item<int64_t>();
    seen += b.targets.numel();
  }
  model.train();
  const double all_correct = dist.sum(static_cast<double>(correct)), all_seen = dist.sum(static_cast<double>(seen));
  return all_seen > 0 ? all_correct / all_seen : 0.0;
}

int run(int argc, char** argv) {
  examples::Cli cli(argc, argv,
                    {{"precision", "bf16"}, {"model", "resnet20"}, {"epochs", "1"}, {"batch-size", "128"}, {"lr", "0.004"},
                     {"limit-batches", "0"}, {"seed", "0"}, {"csv", ""}, {"checkpoint", ""}, {"resume", ""},
                     {"data-dir", data::kFashionMnistDir}, {"weight-decay", "0.05"}, {"device", "cpu"}},
                    {"synthetic", "distributed"});
  if (cli.help()) {
    cli.usage(std::cout, "mixprec_resnet");
    return 0;
  }
  const Precision precision = examples::parse_precision(cli.str("precision"));
  const Device device = examples::parse_device(cli.str("device"));
  const int64_t epochs = cli.i64("epochs"), batch_size = cli.i64("batch-size"), limit = cli.i64("limit-batches");
  const uint64_t seed = static_cast<uint64_t>(cli.i64("seed"));
  MIXPREC_CHECK(epochs >= 1 && batch_size >= 1 && limit >= 0, "epochs and batch-size must be >= 1, limit-batches >= 0");
  manual_seed(seed);
  examples::Distributed dist(cli.flag("distributed"));

  data::FashionMnist train, test;
  if (cli.flag("synthetic")) {
    train = data::synthetic_fashion_mnist(limit > 0 ? limit * batch_size : 6000, seed);
    test = data::synthetic_fashion_mnist(1000, seed + 1);
  } else {
    train = data::load_fashion_mnist(cli.str("data-dir"), true);
    test = data::load_fashion_mnist(cli.str("data-dir"), false);
  }

  Generator init_gen(seed);
  auto model = nn::models::make_resnet(cli.str("model"), 10, 1, false, init_gen);
  model->to(device);
  optim::AdamW opt(model->parameters(), cli.f64("lr"), {0.9, 0.999}, 1e-8, cli.f64("weight-decay"));
  amp::GradScaler scaler(65536.0, 2.0, 0.5, 2000, /*enabled=*/precision == Precision::FP16);
  dist.wrap(*model, scaler);
  // --batch-size is per rank: the global batch is world times larger.
  data::DataLoader loader(data::TensorDataset(train.images, train.labels), batch_size, /*shuffle=*/true, seed,
                          /*drop_last=*/true, /*prefetch=*/true);
  loader.set_shard(dist.rank(), dist.world(), /*equal_sizes=*/true);
  const int64_t steps_per_epoch = limit > 0 ? std::min<int64_t>(limit, loader.size()) : loader.size();
  optim::lr_scheduler::OneCycleLR sched(opt, cli.f64("lr"), epochs * steps_per_epoch);

  examples::TrainingRun training(cli, dist, {model.get(), &opt, &scaler, &sched, {&default_generator()}}, precision, device);
  if (training.resume() && dist.is_main())
    std::printf("resumed from %s at epoch %lld, step %lld\n", cli.str("resume").c_str(),
                static_cast<long long>(training.state().epoch), static_cast<long long>(training.state().step));
  training.open_csv();
  if (dist.is_main())
    std::printf("%s on %s, %s on %s, %lld parameters, batch %lld, %lld steps/epoch, threads %d, processes %d\n",
                cli.str("model").c_str(), cli.flag("synthetic") ? "synthetic data" : "Fashion-MNIST",
                cli.str("precision").c_str(), cli.str("device").c_str(), static_cast<long long>(model->num_parameters()),
                static_cast<long long>(batch_size * dist.world()), static_cast<long long>(steps_per_epoch),
                cpu::num_threads(), dist.world());
  training.start();

  for (int64_t epoch = training.state().epoch; epoch < epochs; ++epoch) {
    loader.set_epoch(epoch);
    training.begin_epoch(epoch, steps_per_epoch, batch_size * dist.world());
    int64_t i = 0;
    for (auto& b : loader) {
      if (i >= steps_per_epoch) break;
      Tensor loss;
      {
        examples::ForwardScope scope(precision, device);
        dist.sync_buffers();
        loss = cross_entropy(model->forward(b.inputs.to(device).contiguous(MemoryFormat::ChannelsLast)), b.targets.to(device));
      }
      opt.zero_grad();
      scaler.scale(loss).backward();
      scaler.step(opt);
      scaler.update();
      sched.step();
      training.end_step(epoch, ++i, loss);
    }
    if (training.end_epoch(epoch)) std::printf("saved checkpoint %s\n", cli.str("checkpoint").c_str());
  }
  training.finish();
  const double acc = evaluate(*model, test, precision, device, 500, limit > 0 ? 2 : 0, dist);
  if (!dist.is_main()) return 0;
  std::printf("global throughput: %.1f images/s (%d processes x batch %lld, %lld steps in %.1f s)\n",
              training.throughput(batch_size * dist.world()), dist.world(), static_cast<long long>(batch_size),
              static_cast<long long>(training.steps_run()), training.seconds());
  std::printf("test accuracy: %.2f%%\n", 100.0 * acc);
  training.print_peak_memory();
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return examples::run_main(run, argc, argv, examples::Distributed::abort_job); }
