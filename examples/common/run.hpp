#pragma once
// What the training examples do around their steps, in one place: the flags they share, --resume
// (mid-epoch included), the --csv log, the progress bar, checkpoints every --checkpoint-every steps
// and at each epoch's end, the count of skipped fp16 steps, the clock and peak-memory figures of
// the run, and a checksum of the final state (so two runs can be compared bit for bit).
// Rank 0 alone shows progress and writes files.
#include <zlib.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <optional>
#include <string>

#include <mixprec/mixprec.hpp>

#include "common/cli.hpp"
#include "common/distributed.hpp"
#include "common/precision.hpp"
#include "common/progress.hpp"

namespace examples {

// The flags both training examples take; each example sets its own defaults before add_to().
struct RunFlags {
  std::string precision = "bf16";
  std::string device = "cpu";
  int64_t epochs = 1;
  int64_t batch_size = 1;
  double lr = 1e-3;
  int64_t limit_batches = 0;
  uint64_t seed = 0;
  std::string csv, checkpoint, resume;
  int64_t checkpoint_every = 0;
  int64_t stop_at_step = 0;
  double init_scale = 65536.0;
  bool synthetic = false;
  bool distributed = false;

  void add_to(CLI::App& app) {
    app.add_option("--precision", precision,
                   "fp32: no autocast; bf16: bfloat16 autocast; fp16: float16 autocast with the GradScaler, which "
                   "skips the steps whose gradients overflow (counted in the summary and the CSV)")
        ->check(CLI::IsMember({"fp32", "bf16", "fp16"}))
        ->capture_default_str();
    app.add_option("--device", device, "where to train; cuda needs the build nvcc compiles (mixprec_*_cuda)")
        ->check(CLI::IsMember({"cpu", "cuda"}))
        ->capture_default_str();
    app.add_option("--epochs", epochs,
                   "epochs to train. The LR schedule is built for all of them, so --resume needs the value the checkpoint "
                   "was saved with (it refuses another: a longer run is a new run, not a jump in the LR)")
        ->check(CLI::PositiveNumber)
        ->capture_default_str();
    app.add_option("--batch-size", batch_size, "samples per step and process")->check(CLI::PositiveNumber)->capture_default_str();
    app.add_option("--lr", lr, "peak learning rate of the schedule")->check(CLI::PositiveNumber)->capture_default_str();
    app.add_option("--limit-batches", limit_batches, "train at most this many batches an epoch and evaluate briefly (0: all)")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    app.add_option("--seed", seed, "seed of the weights, the data order and every random draw")->capture_default_str();
    app.add_option("--csv", csv,
                   "log every step to this file: step,epoch,loss,lr,scale,skipped,elapsed_s -- lr is the one the step "
                   "used, scale the fp16 loss scale, skipped the fp16 steps skipped so far, elapsed_s training seconds "
                   "(continued over resumes); after --resume, cut back to the checkpoint's step and appended to");
    app.add_option("--checkpoint", checkpoint,
                   "save the run here (atomically) at the end of every epoch and every --checkpoint-every steps: model, "
                   "optimizer, loss scaler, LR schedule, random generators, data position and step counters");
    app.add_option("--checkpoint-every", checkpoint_every, "also save --checkpoint every N steps (0: at epoch ends only)")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str()
        ->needs("--checkpoint");
    app.add_option("--resume", resume,
                   "continue the run saved in this checkpoint, mid-epoch too; it ends bit-identical to the run that was "
                   "never interrupted. Give the flags it was saved with (--epochs, --batch-size, --limit-batches, model "
                   "shape); a finished run is said to be one and evaluated, not trained further")
        ->check(CLI::ExistingFile);
    app.add_option("--stop-at-step", stop_at_step,
                   "stop after this global step as an interrupted job would: no checkpoint of its own, so pair it with "
                   "--checkpoint-every (0: run to the end)")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    app.add_option("--init-scale", init_scale,
                   "fp16: the GradScaler's first loss scale (halved at each overflowing step, which is skipped; doubled "
                   "after 2000 clean steps)")
        ->check(CLI::PositiveNumber)
        ->capture_default_str();
    app.add_flag("--synthetic", synthetic, "random data in place of the data set (no files needed)");
    app.add_flag("--distributed", distributed, "data-parallel over MPI, under mpirun -np N (rank 0 reports)");
  }
};

// The lines of the CSV log `path` up to the row of step `last_step`: its header, then its rows in
// step order until one comes after the checkpoint (or is cut short, by a kill mid-write); empty
// when the file does not exist yet.
inline std::string csv_rows_up_to(const std::string& path, int64_t last_step) {
  std::ifstream in(path);
  std::string kept, line;
  if (!std::getline(in, line) || line.rfind("step,", 0) != 0) return kept;
  kept = line + '\n';
  while (std::getline(in, line)) {
    int64_t step = 0;
    const auto r = std::from_chars(line.data(), line.data() + line.size(), step);
    const bool row = r.ec == std::errc() && r.ptr != line.data() + line.size() && *r.ptr == ',' &&
                     std::count(line.begin(), line.end(), ',') == 6;
    if (!row || step > last_step) break;
    kept += line;
    kept += '\n';
  }
  return kept;
}

// Shortest text that reads back as the same double (the CSV's numbers compare exactly).
inline std::string exact(double v) {
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

inline std::string seconds_text(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3f", s);
  return buf;
}

// CRC-32 over the model's state (weights and buffers, as float32 on the host) and the optimizer's
// state tensors: equal sums mean the runs ended in the same state, bit for bit.
inline uint32_t state_crc32(const mixprec::nn::Module& model, const mixprec::optim::Optimizer& opt) {
  uLong crc = crc32(0L, Z_NULL, 0);
  auto feed = [&](const std::string& name, const mixprec::Tensor& t) {
    crc = crc32(crc, reinterpret_cast<const Bytef*>(name.data()), static_cast<uInt>(name.size()));
    const mixprec::Tensor c = t.cpu().contiguous();
    crc = crc32(crc, static_cast<const Bytef*>(c.data_ptr()), static_cast<uInt>(c.nbytes()));
  };
  for (const auto& [k, t] : model.state_dict()) feed(k, t);
  for (const auto& [k, t] : opt.state_dict().tensors) feed(k, t);
  return static_cast<uint32_t>(crc);
}

class TrainingRun {
 public:
  // A run of flags.epochs x `steps_per_epoch` steps of `items_per_step` items (over all ranks).
  // `parts` names what --resume and --checkpoint load and save; its scaler and scheduler are also
  // what the CSV log reports.
  TrainingRun(const RunFlags& flags, const Distributed& dist, mixprec::io::CheckpointParts parts, int64_t steps_per_epoch,
              int64_t items_per_step)
      : flags_(flags),
        dist_(dist),
        parts_(std::move(parts)),
        steps_per_epoch_(steps_per_epoch),
        items_per_step_(items_per_step),
        device_(parse_device(flags.device)) {
    MIXPREC_CHECK(parts_.scaler && parts_.scheduler, "TrainingRun: the checkpoint parts need a scaler and a scheduler");
    MIXPREC_CHECK(steps_per_epoch_ >= 1, "an epoch needs at least one step");
    if (parts_.model) parts_.scaler->set_parameter_names(parts_.model->named_parameters());  // for the summary
  }

  // --resume: loads the checkpoint on every rank (they stay identical). False without the flag.
  // Refuses a checkpoint of a differently shaped run: its schedule and data position would not fit.
  bool resume() {
    if (flags_.resume.empty()) return false;
    const std::string& path = flags_.resume;
    state_ = mixprec::io::load_checkpoint(path, parts_);
    auto saved = [&](const char* key) -> std::optional<int64_t> {
      auto it = state_.extra.find(key);  // absent in checkpoints written before it was recorded
      return it == state_.extra.end() ? std::nullopt : std::optional<int64_t>(static_cast<int64_t>(it->second));
    };
    if (auto e = saved("epochs"); e && *e != flags_.epochs)
      mixprec::fail("--resume ", path, ": that run was saved with --epochs ", *e, " and its LR schedule spans ", *e, " x ",
                    steps_per_epoch_, " steps; --epochs ", flags_.epochs, " would restart the schedule and the LR would jump. "
                    "Resume with --epochs ", *e, ", or start a new run for a longer one");
    if (auto s = saved("steps_per_epoch"); s && *s != steps_per_epoch_)
      mixprec::fail("--resume ", path, ": that run has ", *s, " steps an epoch, this one ", steps_per_epoch_,
                    ": resume with the flags it was saved with (--limit-batches, --batch-size, steps, data)");
    if (auto b = saved("items_per_step"); b && *b != items_per_step_)
      mixprec::fail("--resume ", path, ": that run took ", *b, " items a step, this one ", items_per_step_,
                    ": resume with the --batch-size (and processes) it was saved with");
    const int64_t in_epoch = state_.step - state_.epoch * steps_per_epoch_;
    MIXPREC_CHECK(state_.epoch >= 0 && in_epoch >= 0 && in_epoch < steps_per_epoch_,
                  "--resume ", path, ": step ", state_.step, " is not in epoch ", state_.epoch, " of ", steps_per_epoch_,
                  " steps: resume with the flags it was saved with");
    // A checkpoint with the scaler's counters (counters_state_dict) restored its skip count already.
    skipped_before_ = static_cast<int64_t>(state_.extra["skipped_steps"]) - parts_.scaler->skipped_steps();
    elapsed_before_ = state_.extra["elapsed_s"];
    return true;
  }
  const mixprec::io::TrainingState& state() const { return state_; }
  int64_t total_steps() const { return flags_.epochs * steps_per_epoch_; }
  int64_t steps_per_epoch() const { return steps_per_epoch_; }
  // Every step of the run is done (a resumed finished run, or the end of this one).
  bool finished() const { return state_.step >= total_steps(); }
  // --stop-at-step was reached: the loop ends as if the process were killed there.
  bool stopped() const { return flags_.stop_at_step > 0 && state_.step >= flags_.stop_at_step; }

  // --csv on rank 0: a new file with its header; after a resume, the file cut back to its rows up to
  // the checkpoint's step (a run killed after its last checkpoint had logged steps that it now takes
  // again: each step stays in the file once), then appended to.
  void open_csv() {
    if (flags_.csv.empty() || !dist_.is_main()) return;
    static const char* const kHeader = "step,epoch,loss,lr,scale,skipped,elapsed_s";
    std::string kept;
    if (state_.step > 0) kept = csv_rows_up_to(flags_.csv, state_.step);
    csv_.open(flags_.csv, std::ios::trunc);
    MIXPREC_CHECK(csv_.good(), "cannot open --csv file ", flags_.csv);
    if (kept.rfind(kHeader, 0) != 0) csv_ << kHeader << '\n';
    csv_ << kept << std::flush;
  }

  // Just before the first step: starts the clock and the peak-memory count.
  void start() {
    mixprec::reset_peak_memory_stats(device_);
    start_ = std::chrono::steady_clock::now();
  }
  // Returns the batches of `epoch` trained before a resume: the loop passes over them (the data
  // order is a function of the seed and the epoch, so the next batch is the one the run would take).
  int64_t begin_epoch(int64_t epoch) {
    const int64_t done = epoch == state_.epoch ? state_.step - epoch * steps_per_epoch_ : 0;
    state_.epoch = epoch;
    batch_ = done;
    progress_.emplace("epoch " + std::to_string(epoch + 1), steps_per_epoch_, items_per_step_, done);
    return done;
  }
  // Before the step's forward pass: the LR it will use (the scheduler moves on after it).
  void begin_step() { lr_ = parts_.scheduler->get_last_lr()[0]; }
  // After the step (and sched.step()): the global batch's loss (the mean over the ranks) to the
  // progress bar and the CSV log; the checkpoint when --checkpoint-every falls on this step.
  void end_step(const mixprec::Tensor& loss) {
    ++state_.step;
    ++steps_run_;
    ++batch_;
    // The loss is read (on a GPU: the host waits for the step) only when it is shown or logged;
    // the decision is the same on every rank, since reading it is a collective.
    if (!flags_.csv.empty() || progress_->wants(batch_)) {
      const double l = dist_.mean(loss.item<double>());
      const double scale = parts_.scaler->get_scale();
      if (dist_.is_main()) progress_->update(batch_, l, flags_.precision == "fp16" ? scale : 0.0);
      if (csv_.is_open())
        csv_ << state_.step << ',' << state_.epoch << ',' << exact(l) << ',' << exact(lr_) << ',' << exact(scale) << ','
             << skipped_steps() << ',' << seconds_text(elapsed()) << '\n';
    }
    // At an epoch's last step end_epoch() saves (the one checkpoint then says "epoch done").
    if (flags_.checkpoint_every > 0 && state_.step % flags_.checkpoint_every == 0 && batch_ < steps_per_epoch_) save();
  }
  // After the epoch's loop: on its last step, marks it done and saves --checkpoint. True when it saved.
  bool end_epoch() {
    if (batch_ < steps_per_epoch_) return false;  // stopped within the epoch
    state_.epoch += 1;
    return save();
  }
  // After the last step: stops the clock and reads the peak memory of training.
  void finish() {
    seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    memory_ = mixprec::memory_stats(device_);
    if (csv_.is_open()) csv_.flush();
  }

  // Steps taken since start() (not counting those before a resume) and the seconds they took.
  int64_t steps_run() const { return steps_run_; }
  double seconds() const { return seconds_; }
  // Items per second over this process's steps.
  double throughput() const { return seconds_ > 0 ? static_cast<double>(steps_run_ * items_per_step_) / seconds_ : 0.0; }
  // Steps the GradScaler skipped (inf/NaN gradients) over the whole run, resumes included.
  int64_t skipped_steps() const { return skipped_before_ + parts_.scaler->skipped_steps(); }

  // The summary's lines after the throughput: steps and skipped steps, then peak memory.
  void print_steps() const {
    std::printf("steps: %lld of %lld (%lld in this process), skipped: %lld", static_cast<long long>(state_.step),
                static_cast<long long>(total_steps()), static_cast<long long>(steps_run_),
                static_cast<long long>(skipped_steps()));
    if (flags_.precision == "fp16") std::printf(" (inf/NaN gradients), loss scale %g", parts_.scaler->get_scale());
    std::printf("\n");
    // Where the GradScaler located them (on the CPU: always; on a GPU: with host_overflow_check).
    const auto& bad = parts_.scaler->last_overflowing();
    if (!bad.empty()) {
      std::printf("last skipped step's inf/NaN gradients: %s", bad[0].c_str());
      for (std::size_t i = 1; i < std::min<std::size_t>(bad.size(), 4); ++i) std::printf(", %s", bad[i].c_str());
      if (bad.size() > 4) std::printf(", ... (%zu parameters)", bad.size());
      std::printf("\n");
    }
  }
  void print_peak_memory() const {
    std::printf("peak tensor memory (training%s): %.1f MiB\n", device_ == mixprec::Device::CPU ? "" : ", cuda",
                static_cast<double>(memory_.peak_allocated_bytes) / (1 << 20));
  }
  void print_state_crc32() const {
    std::printf("final state crc32: %08x (weights, buffers, optimizer state)\n", state_crc32(*parts_.model, *parts_.optimizer));
  }

 private:
  double elapsed() const {
    return elapsed_before_ + std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }
  // --checkpoint on rank 0, with the run's shape (checked by resume()) and its counters.
  bool save() {
    if (flags_.checkpoint.empty() || !dist_.is_main()) return false;
    state_.extra = {{"epochs", static_cast<double>(flags_.epochs)},
                    {"steps_per_epoch", static_cast<double>(steps_per_epoch_)},
                    {"items_per_step", static_cast<double>(items_per_step_)},
                    {"skipped_steps", static_cast<double>(skipped_steps())},
                    {"elapsed_s", elapsed()}};
    mixprec::io::save_checkpoint(flags_.checkpoint, parts_, state_);
    if (batch_ < steps_per_epoch_)
      std::printf("saved checkpoint %s (step %lld, epoch %lld at batch %lld)\n", flags_.checkpoint.c_str(),
                  static_cast<long long>(state_.step), static_cast<long long>(state_.epoch + 1), static_cast<long long>(batch_));
    else
      std::printf("saved checkpoint %s (step %lld, end of epoch %lld)\n", flags_.checkpoint.c_str(),
                  static_cast<long long>(state_.step), static_cast<long long>(state_.epoch));
    std::fflush(stdout);
    return true;
  }

  const RunFlags& flags_;
  const Distributed& dist_;
  mixprec::io::CheckpointParts parts_;
  int64_t steps_per_epoch_, items_per_step_;
  mixprec::Device device_;
  mixprec::io::TrainingState state_;
  int64_t batch_ = 0;  // steps done in the current epoch
  double lr_ = 0;
  int64_t skipped_before_ = 0;
  double elapsed_before_ = 0;
  std::ofstream csv_;
  std::optional<Progress> progress_;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  int64_t steps_run_ = 0;
  double seconds_ = 0;
  mixprec::MemoryStats memory_;
};

// After a --resume: where the run continues, or that it has nothing left to do.
inline void print_resumed(const TrainingRun& run, const std::string& path) {
  const auto& st = run.state();
  if (run.finished())
    std::printf("resumed from %s: a finished run (all %lld steps done), nothing left to train; evaluating its weights\n",
                path.c_str(), static_cast<long long>(run.total_steps()));
  else
    std::printf("resumed from %s at step %lld of %lld (epoch %lld, after batch %lld of %lld)\n", path.c_str(),
                static_cast<long long>(st.step), static_cast<long long>(run.total_steps()), static_cast<long long>(st.epoch + 1),
                static_cast<long long>(st.step - st.epoch * run.steps_per_epoch()), static_cast<long long>(run.steps_per_epoch()));
}

}  // namespace examples
