// Trains the GPT-style byte-level decoder on the fortunes corpus (Debian: fortunes) in fp32,
// bf16 autocast, or fp16 autocast with the GradScaler; prints validation loss, bits per byte
// and a short generated sample. With --distributed, under `mpirun -np N`, trains data-parallel:
// every rank draws the same global batch and trains on its slice of it; rank 0 reports.
// --device cuda trains on the GPU in the build nvcc compiles (mixprec_transformer_cuda).
// --checkpoint/--checkpoint-every/--resume continue an interrupted run bit-exactly (common/run.hpp).
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>

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
  examples::RunFlags f;
  f.batch_size = 16;
  f.lr = 0.001;
  int64_t steps = 300, seq_len = 128, layers = 4, d_model = 256, heads = 4, sample_len = 200, eval_batches = 20;
  int64_t warmup = -1;
  std::string corpus = data::kFortunesDir;
  CLI::App app("Trains a GPT-style byte-level decoder on the fortunes corpus in fp32, bf16 autocast or fp16 autocast with "
               "the GradScaler (AdamW, linear warm-up from 0 then cosine decay to lr/10, gradients clipped to norm 1); "
               "prints validation loss, bits per byte and a generated sample.",
               "mixprec_transformer");
  f.add_to(app);
  app.add_option("--steps-per-epoch", steps, "steps in an epoch (each draws a random batch of windows)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--warmup-steps", warmup, "steps of linear LR warm-up from 0 to --lr (-1: 5% of the run, at least 1)")
      ->check(CLI::Range(int64_t{-1}, std::numeric_limits<int64_t>::max()))
      ->capture_default_str();
  app.add_option("--seq-len", seq_len, "context length in bytes")->check(CLI::Range(int64_t{2}, int64_t{1} << 20))->capture_default_str();
  app.add_option("--layers", layers, "transformer blocks")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--d-model", d_model, "embedding width (a multiple of --heads)")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--heads", heads, "attention heads")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--corpus", corpus, "directory of fortune files (Debian: fortunes)")->capture_default_str();
  app.add_option("--eval-batches", eval_batches, "validation batches (0: the whole split)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--sample-len", sample_len, "bytes to generate after training")->check(CLI::NonNegativeNumber)->capture_default_str();
  if (auto code = examples::parse_flags(app, argc, argv)) return *code;

  const Precision precision = examples::parse_precision(f.precision);
  const Device device = examples::parse_device(f.device);
  const int64_t epochs = f.epochs, batch_size = f.batch_size, limit = f.limit_batches;
  const int64_t steps_per_epoch = limit > 0 ? std::min(limit, steps) : steps;
  const int64_t total_steps = epochs * steps_per_epoch;
  const int64_t warmup_steps = warmup >= 0 ? warmup : std::max<int64_t>(1, total_steps / 20);
  MIXPREC_CHECK(warmup_steps <= total_steps, "--warmup-steps ", warmup_steps, " exceeds the run's ", total_steps, " steps");
  const uint64_t seed = f.seed;
  manual_seed(seed);
  examples::Distributed dist(f.distributed, device);

  const data::TextDataset text = f.synthetic ? data::TextDataset::from_text([] {
    std::string s;
    for (int i = 0; i < 2000; ++i) s += "The quick brown fox jumps over the lazy dog. ";
    return s;
  }())
                                             : data::TextDataset(corpus);
  nn::models::GPTConfig cfg;
  cfg.block_size = seq_len;
  cfg.n_layer = layers;
  cfg.d_model = d_model;
  cfg.n_head = heads;
  cfg.mlp_hidden = 4 * cfg.d_model;
  Generator init_gen(seed), batch_gen(seed + 1), sample_gen(seed + 2);
  nn::models::GPT model(cfg, init_gen);
  model.to(device);
  optim::AdamW opt(model.parameters(), f.lr, {0.9, 0.95}, 1e-8, 0.1);
  amp::GradScaler scaler(f.init_scale, 2.0, 0.5, 2000, /*enabled=*/precision == Precision::FP16);
  dist.wrap(model, scaler);
  // Built for the whole run; --resume restores its position (and refuses another --epochs).
  optim::lr_scheduler::CosineAnnealingWarmupLR sched(opt, warmup_steps, total_steps, f.lr * 0.1);
  const int64_t tokens_per_step = batch_size * seq_len * dist.world();
  examples::TrainingRun training(f, dist, {&model, &opt, &scaler, &sched, {&default_generator(), &batch_gen}}, steps_per_epoch,
                                 tokens_per_step);
  if (training.resume() && dist.is_main()) examples::print_resumed(training, f.resume);
  training.open_csv();
  if (dist.is_main())
    std::printf("GPT %lld layers d_model %lld on %s (%lld train / %lld validation bytes), %s on %s, %lld parameters, %d processes\n",
                static_cast<long long>(cfg.n_layer), static_cast<long long>(cfg.d_model), f.synthetic ? "synthetic text" : corpus.c_str(),
                static_cast<long long>(text.size(data::Split::Train)), static_cast<long long>(text.size(data::Split::Validation)),
                f.precision.c_str(), f.device.c_str(), static_cast<long long>(model.num_parameters()), dist.world());
  training.start();
  for (int64_t epoch = training.state().epoch; epoch < epochs && !training.stopped(); ++epoch) {
    // After a resume mid-epoch the batch generator is where that step left it.
    for (int64_t i = training.begin_epoch(epoch); i < steps_per_epoch && !training.stopped(); ++i) {
      training.begin_step();
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
      training.end_step(loss);
    }
    training.end_epoch();
  }
  training.finish();
  // The weights are identical on every rank: rank 0 alone evaluates and samples.
  if (!dist.is_main()) return 0;
  if (training.steps_run() > 0)
    std::printf("global throughput: %.0f tokens/s (%d processes x batch %lld x %lld tokens, %lld steps in %.1f s)\n",
                training.throughput(), dist.world(), static_cast<long long>(batch_size), static_cast<long long>(seq_len),
                static_cast<long long>(training.steps_run()), training.seconds());
  if (training.stopped() && !training.finished())
    std::printf("stopped at step %lld (--stop-at-step)\n", static_cast<long long>(training.state().step));
  const double vl = validation_loss(model, text, precision, device, seq_len, batch_size, eval_batches);
  std::printf("validation loss: %.4f nats/byte, %.4f bits per byte\n", vl, vl / std::log(2.0));
  training.print_steps();
  if (training.steps_run() > 0) training.print_peak_memory();
  training.print_state_crc32();
  const Tensor prompt = data::TextDataset::encode("The ").reshape({1, -1});
  const Tensor out = model.generate(prompt, sample_len, 0.8, 40, sample_gen);
  std::printf("sample:\n%s\n", data::TextDataset::decode(out.reshape({-1})).c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return examples::run_main(run, argc, argv, examples::Distributed::abort_job); }
