// Trains a ResNet on Fashion-MNIST (Debian: dataset-fashion-mnist) in fp32, bf16 autocast, or fp16
// autocast with the GradScaler; prints test accuracy and peak tensor memory. With --distributed,
// under `mpirun -np N`, trains data-parallel: each rank a shard of every epoch, rank 0 reports.
// --device cuda trains on the GPU in the build nvcc compiles (mixprec_resnet_cuda).
// --checkpoint/--checkpoint-every/--resume continue an interrupted run bit-exactly (common/run.hpp).
// Batches go in channels-last (MemoryFormat::ChannelsLast): the network then stays in that
// layout, where the CPU's convolutions run on oneDNN when mixprec::onednn is linked.
#include <cstdio>
#include <string>

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
  examples::RunFlags f;
  f.batch_size = 128;
  f.lr = 0.004;
  std::string model_name = "resnet20", data_dir = data::kFashionMnistDir;
  double weight_decay = 0.05;
  CLI::App app("Trains a ResNet on Fashion-MNIST in fp32, bf16 autocast or fp16 autocast with the GradScaler (AdamW, "
               "one-cycle LR schedule from lr/25 up to --lr and down); prints test accuracy and peak tensor memory.",
               "mixprec_resnet");
  f.add_to(app);
  app.add_option("--model", model_name, "network")
      ->check(CLI::IsMember({"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18", "resnet34", "resnet50",
                             "resnet101", "resnet152"}))
      ->capture_default_str();
  app.add_option("--data-dir", data_dir, "Fashion-MNIST's IDX files (Debian: dataset-fashion-mnist)")->capture_default_str();
  app.add_option("--weight-decay", weight_decay, "AdamW's decoupled weight decay")->check(CLI::NonNegativeNumber)->capture_default_str();
  if (auto code = examples::parse_flags(app, argc, argv)) return *code;

  const Precision precision = examples::parse_precision(f.precision);
  const Device device = examples::parse_device(f.device);
  const int64_t epochs = f.epochs, batch_size = f.batch_size, limit = f.limit_batches;
  const uint64_t seed = f.seed;
  manual_seed(seed);
  examples::Distributed dist(f.distributed, device);

  data::FashionMnist train, test;
  if (f.synthetic) {
    train = data::synthetic_fashion_mnist(limit > 0 ? limit * batch_size * dist.world() : 6000, seed);
    test = data::synthetic_fashion_mnist(1000, seed + 1);
  } else {
    train = data::load_fashion_mnist(data_dir, true);
    test = data::load_fashion_mnist(data_dir, false);
  }

  Generator init_gen(seed);
  auto model = nn::models::make_resnet(model_name, 10, 1, false, init_gen);
  model->to(device);
  optim::AdamW opt(model->parameters(), f.lr, {0.9, 0.999}, 1e-8, weight_decay);
  amp::GradScaler scaler(f.init_scale, 2.0, 0.5, 2000, /*enabled=*/precision == Precision::FP16);
  dist.wrap(*model, scaler);
  // --batch-size is per rank: the global batch is world times larger.
  data::DataLoader loader(data::TensorDataset(train.images, train.labels), batch_size, /*shuffle=*/true, seed,
                          /*drop_last=*/true, /*prefetch=*/true);
  loader.set_shard(dist.rank(), dist.world(), /*equal_sizes=*/true);
  const int64_t steps_per_epoch = limit > 0 ? std::min<int64_t>(limit, loader.size()) : loader.size();
  // Built for the whole run; --resume restores its position (and refuses another --epochs).
  optim::lr_scheduler::OneCycleLR sched(opt, f.lr, epochs * steps_per_epoch);

  examples::TrainingRun training(f, dist, {model.get(), &opt, &scaler, &sched, {&default_generator()}}, steps_per_epoch,
                                 batch_size * dist.world());
  if (training.resume() && dist.is_main()) examples::print_resumed(training, f.resume);
  training.open_csv();
  if (dist.is_main())
    std::printf("%s on %s, %s on %s, %lld parameters, batch %lld, %lld steps/epoch, threads %d, processes %d\n",
                model_name.c_str(), f.synthetic ? "synthetic data" : "Fashion-MNIST", f.precision.c_str(), f.device.c_str(),
                static_cast<long long>(model->num_parameters()), static_cast<long long>(batch_size * dist.world()),
                static_cast<long long>(steps_per_epoch), cpu::num_threads(), dist.world());
  training.start();

  for (int64_t epoch = training.state().epoch; epoch < epochs && !training.stopped(); ++epoch) {
    loader.set_epoch(epoch);
    const int64_t done = training.begin_epoch(epoch);
    int64_t i = 0;
    for (auto& b : loader) {
      if (i >= steps_per_epoch || training.stopped()) break;
      if (i++ < done) continue;  // trained before the resume
      training.begin_step();
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
      training.end_step(loss);
    }
    training.end_epoch();
  }
  training.finish();
  const double acc = evaluate(*model, test, precision, device, 500, limit > 0 ? 2 : 0, dist);
  if (!dist.is_main()) return 0;
  if (training.steps_run() > 0)
    std::printf("global throughput: %.1f images/s (%d processes x batch %lld, %lld steps in %.1f s)\n", training.throughput(),
                dist.world(), static_cast<long long>(batch_size), static_cast<long long>(training.steps_run()), training.seconds());
  if (training.stopped() && !training.finished())
    std::printf("stopped at step %lld (--stop-at-step)\n", static_cast<long long>(training.state().step));
  std::printf("test accuracy: %.2f%%\n", 100.0 * acc);
  training.print_steps();
  if (training.steps_run() > 0) training.print_peak_memory();
  training.print_state_crc32();
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return examples::run_main(run, argc, argv, examples::Distributed::abort_job); }
