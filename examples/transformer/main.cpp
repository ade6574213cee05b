// Trains the GPT-style byte-level decoder on the fortunes corpus (Debian: fortunes) in fp32,
// bf16 autocast, or fp16 autocast with the GradScaler; prints validation loss, bits per byte
// and a short generated sample. With --distributed, under `mpirun -np N`, trains data-parallel:
// every rank draws the same global batch and trains on its slice of it; rank 0 reports.
// --device cuda trains on the GPU in the build nvcc compiles (mixprec_transformer_cuda).
#include <cmath>
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

double validation_loss(nn::models::GPT& model, const data::TextDataset& text, Precision precision, Device device, int64_t seq_len,
                       int64_t batch_size, int64_t max_batches) {
  model.eval();
  no_grad ng;
  const int64_t windows = text.num_eval_windows(data::Split::Validation, seq_len);
  double total = 0;
  int64_t count = 0;
  for (int64_t w = 0, b = 0; w < windows && (max_batches <= 0 || b < max_batches); w += batch_size, ++b) {
    auto [x, y] = text.eval_batch(data::Split::Validation, w, batch_size, seq_len);
    Tensor loss;
    {
      examples::ForwardScope scope(precision, device);
      loss = model.loss(x.to(device), y.to(device));
    }
    total += loss.item<double>() * static_cast<double>(x.numel());
    count += x.numel();
  }
  model.train();
  return count ? total / static_cast<double>(count) : 0.0;
}

int run(int argc, char** argv) {
  examples::Cli cli(argc, argv,
                    {{"precision", "bf16"}, {"epochs", "1"}, {"steps-per-epoch", "300"}, {"batch-size", "16"}, {"seq-len", "128"},
                     {"lr", "0.001"}, {"limit-batches", "0"}, {"seed", "0"}, {"csv", ""}, {"checkpoint", ""}, {"resume", ""},
                     {"corpus", data::kFortunesDir}, {"layers", "4"}, {"d-model", "256"}, {"heads", "4"}, {"sample-len", "200"},
                     {"eval-batches", "20"}, {"device", "cpu"}},
                    {"synthetic", "distributed"});
  if (cli.help()) {
    cli.usage(std::cout, "mixprec_transformer");
    return 0;
  }
  const Precision precision = examples::parse_precision(cli.str("precision"));
  const Device device = examples::parse_device(cli.str("device"));
  const int64_t epochs = cli.i64("epochs"), batch_size = cli.i64("batch-size"), seq_len = cli.i64("seq-len");
  const int64_t limit = cli.i64("limit-batches");
  const int64_t steps_per_epoch = limit > 0 ? std::min(limit, cli.i64("steps-per-epoch")) : cli.i64("steps-per-epoch");
  const uint64_t seed = static_cast<uint64_t>(cli.i64("seed"));
  MIXPREC_CHECK(epochs >= 1 && batch_size >= 1 && seq_len >= 2 && steps_per_epoch >= 1, "bad epochs/batch-size/seq-len/steps");
  manual_seed(seed);
  examples::Distributed dist(cli.flag("distributed"));

  const data::TextDataset text = cli.flag("synthetic")
                                     ? data::TextDataset::from_text([] {
                                         std::string s;
                                         for (int i = 0; i < 2000; ++i) s += "The quick brown fox jumps over the lazy dog. ";
                                         return s;
                                       }())
                                     : data::TextDataset(cli.str("corpus"));
  nn::models::GPTConfig cfg;
  cfg.block_size = seq_len;
  cfg.n_layer = cli.i64("layers");
  cfg.d_model = cli.i64("d-model");
  cfg.n_head = cli.i64("heads");
  cfg.mlp_hidden = 4 * cfg.d_model;
  Generator init_gen(seed), batch_gen(seed + 1), sample_gen(seed + 2);
  nn::models::GPT model(cfg, init_gen);
  model.to(device);
  optim::AdamW opt(model.parameters(), cli.f64("lr"), {0.9, 0.95}, 1e-8, 0.1);
  amp::GradScaler scaler(65536.0, 2.0, 0.5, 2000, /*enabled=*/precision == Precision::FP16);
  dist.wrap(model, scaler);
  optim::lr_scheduler::CosineAnnealingWarmupLR sched(opt, std::max<int64_t>(1, epochs * steps_per_epoch / 20), epochs * steps_per_epoch,
                                                     cli.f64("lr") * 0.1);
  examples::TrainingRun training(cli, dist, {&model, &opt, &scaler, &sched, {&default_generator(), &batch_gen}}, precision,
                                 device);
  if (training.resume() && dist.is_main())
    std::printf("resumed from %s at epoch %lld\n", cli.str("resume").c_str(), static_cast<long long>(training.state().epoch));
  training.open_csv();
  if (dist.is_main())
    std::printf("GPT %lld layers d_model %lld on %s (%lld train / %lld validation bytes), %s on %s, %lld parameters, %d processes\n",
                static_cast<long long>(cfg.n_layer), static_cast<long long>(cfg.d_model),
                cli.flag("synthetic") ? "synthetic text" : cli.str("corpus").c_str(),
                static_cast<long long>(text.size(data::Split::Train)), static_cast<long long>(text.size(data::Split::Validation)),
                cli.str("precision").c_str(), cli.str("device").c_str(), static_cast<long long>(model.num_parameters()), dist.world());
  const int64_t tokens_per_step = batch_size * seq_len * dist.world();
  training.start();
  for (int64_t epoch = training.state().epoch; epoch < epochs; ++epoch) {
    training.begin_epoch(epoch, steps_per_epoch, tokens_per_step);
    for (int64_t i = 1; i <= steps_per_epoch; ++i) {
      // One generator state on every rank (so a checkpoint resumes every rank): all draw the
      // global batch, each keeps its rows. --batch-size is per rank.
      auto [gx, gy] = text.get_batch(data::Split::Train, batch_size * dist.world(), seq_len, batch_gen);
      const Tensor x = gx.narrow(0, dist.rank() * batch_size, batch_size).contiguous();
      const Tensor y = gy.narrow(0, dist.rank() * batch_size, batch_size).contiguous();
      Tensor loss;
      {
        examples::ForwardScope scope(precision, device);
        loss = model.loss(x.to(device), y.to(device));
      }
      opt.zero_grad();
      scaler.scale(loss).backward();
      scaler.unscale_(opt);
      optim::clip_grad_norm_(opt, 1.0);
      scaler.step(opt);
      scaler.update();
      sched.step();
      training.end_step(epoch, i, loss);
    }
    training.end_epoch(epoch);
  }
  training.finish();
  // The weights are identical on every rank: rank 0 alone evaluates and samples.
  if (!dist.is_main()) return 0;
  std::printf("global throughput: %.0f tokens/s (%d processes x batch %lld x %lld tokens, %lld steps in %.1f s)\n",
              training.throughput(tokens_per_step), dist.world(), static_cast<long long>(batch_size), static_cast<long long>(seq_len),
              static_cast<long long>(training.steps_run()), training.seconds());
  const double vl = validation_loss(model, text, precision, device, seq_len, batch_size, cli.i64("eval-batches"));
  std::printf("validation loss: %.4f nats/byte, %.4f bits per byte\n", vl, vl / std::log(2.0));
  training.print_peak_memory();
  const Tensor prompt = data::TextDataset::encode("The ").reshape({1, -1});
  const Tensor out = model.generate(prompt, cli.i64("sample-len"), 0.8, 40, sample_gen);
  std::printf("sample:\n%s\n", data::TextDataset::decode(out.reshape({-1})).c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return examples::run_main(run, argc, argv, examples::Distributed::abort_job); }
