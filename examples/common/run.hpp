#pragma once
// What the training examples do around their steps, in one place: --resume, the --csv log
// (step,epoch,loss,lr,scale), the progress bar, --checkpoint after every epoch, and the clock and
// peak-memory figures of the run. Rank 0 alone shows progress and writes files.
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

class TrainingRun {
 public:
  // `parts` names what --resume and --checkpoint load and save; its scaler and scheduler are
  // also what the CSV log reports.
  TrainingRun(const Cli& cli, const Distributed& dist, mixprec::io::CheckpointParts parts, Precision precision,
              mixprec::Device device = mixprec::Device::CPU)
      : cli_(cli), dist_(dist), parts_(std::move(parts)), precision_(precision), device_(device) {
    MIXPREC_CHECK(parts_.scaler && parts_.scheduler, "TrainingRun: the checkpoint parts need a scaler and a scheduler");
  }

  // --resume: loads the checkpoint on every rank (they stay identical). False without the flag.
  bool resume() {
    if (cli_.str("resume").empty()) return false;
    state_ = mixprec::io::load_checkpoint(cli_.str("resume"), parts_);
    return true;
  }
  // --csv on rank 0: appended to after a resume, else a new file with its header.
  void open_csv() {
    if (cli_.str("csv").empty() || !dist_.is_main()) return;
    csv_.open(cli_.str("csv"), state_.step > 0 ? std::ios::app : std::ios::trunc);
    MIXPREC_CHECK(csv_.good(), "cannot open --csv file ", cli_.str("csv"));
    if (state_.step == 0) csv_ << "step,epoch,loss,lr,scale\n";
  }
  const mixprec::io::TrainingState& state() const { return state_; }

  // Just before the first step: starts the clock and the peak-memory count.
  void start() {
    mixprec::reset_peak_memory_stats(device_);
    start_ = std::chrono::steady_clock::now();
  }
  void begin_epoch(int64_t epoch, int64_t steps_per_epoch, int64_t items_per_step) {
    progress_.emplace("epoch " + std::to_string(epoch + 1), steps_per_epoch, items_per_step);
  }
  // After step `i` (from 1) of `epoch`: the global batch's loss (the mean over the ranks) to the
  // progress bar and the CSV log.
  void end_step(int64_t epoch, int64_t i, const mixprec::Tensor& loss) {
    ++state_.step;
    ++steps_run_;
    // The loss is read (on a GPU: the host waits for the step) only when it is shown or logged;
    // the decision is the same on every rank, since reading it is a collective.
    if (cli_.str("csv").empty() && !progress_->wants(i)) return;
    const double l = dist_.mean(loss.item<double>());
    const mixprec::amp::GradScaler& scaler = *parts_.scaler;
    if (dist_.is_main()) progress_->update(i, l, precision_ == Precision::FP16 ? scaler.get_scale() : 0.0);
    if (csv_.is_open())
      csv_ << state_.step << ',' << epoch << ',' << l << ',' << parts_.scheduler->get_last_lr()[0] << ',' << scaler.get_scale() << '\n';
  }
  // --checkpoint on rank 0, after every epoch. True when it saved one.
  bool end_epoch(int64_t epoch) {
    state_.epoch = epoch + 1;
    if (cli_.str("checkpoint").empty() || !dist_.is_main()) return false;
    mixprec::io::save_checkpoint(cli_.str("checkpoint"), parts_, state_);
    return true;
  }
  // After the last step: stops the clock and reads the peak memory of training.
  void finish() {
    seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    memory_ = mixprec::memory_stats(device_);
  }

  // Steps taken since start() (not counting those before a resume) and the seconds they took.
  int64_t steps_run() const { return steps_run_; }
  double seconds() const { return seconds_; }
  // Items per second over the run, `items_per_step` counted over all ranks.
  double throughput(int64_t items_per_step) const {
    return seconds_ > 0 ? static_cast<double>(steps_run_ * items_per_step) / seconds_ : 0.0;
  }
  void print_peak_memory() const {
    std::printf("peak tensor memory (training%s): %.1f MiB\n", device_ == mixprec::Device::CPU ? "" : ", cuda",
                static_cast<double>(memory_.peak_allocated_bytes) / (1 << 20));
  }

 private:
  const Cli& cli_;
  const Distributed& dist_;
  mixprec::io::CheckpointParts parts_;
  Precision precision_;
  mixprec::Device device_;
  mixprec::io::TrainingState state_;
  std::ofstream csv_;
  std::optional<Progress> progress_;
  std::chrono::steady_clock::time_point start_;
  int64_t steps_run_ = 0;
  double seconds_ = 0;
  mixprec::MemoryStats memory_;
};

}  // namespace examples
