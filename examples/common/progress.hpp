#pragma once
// A progress bar on a terminal (items/s, loss, loss scale, ETA); plain log lines otherwise, so
// CI logs and redirected output stay readable.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>

namespace examples {

class Progress {
 public:
  // `first_step`: the steps done before (a resumed epoch); rates count the steps after it.
  Progress(std::string label, int64_t total_steps, int64_t items_per_step, int64_t first_step = 0)
      : label_(std::move(label)), total_(total_steps), items_(items_per_step), first_(first_step),
        tty_(isatty(fileno(stdout)) != 0), start_(std::chrono::steady_clock::now()) {}

  // Whether update(step, ...) may show anything (the logged steps, and on a terminal the bar's
  // hundred updates an epoch): the caller reads the loss, a device sync on a GPU, only then.
  // It depends on the step alone, so it is the same on every rank.
  bool wants(int64_t step) const {
    return step == total_ || step % log_every() == 0 || step % std::max<int64_t>(1, total_ / 100) == 0;
  }
  // Call after each step; `scale` <= 0 hides the loss-scale column (bf16/fp32 runs).
  void update(int64_t step, double loss, double scale = 0) {
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    const int64_t done = step - first_;
    const double ips = secs > 0 ? static_cast<double>(done * items_) / secs : 0;
    const double eta = done > 0 ? secs / static_cast<double>(done) * static_cast<double>(total_ - step) : 0;
    char extra[64] = "";
    if (scale > 0) std::snprintf(extra, sizeof extra, " scale %.0f", scale);
    if (tty_) {
      const int width = 30;
      const int filled = total_ > 0 ? static_cast<int>(width * step / total_) : 0;
      std::string bar(static_cast<std::size_t>(filled), '#');
      bar.resize(width, '.');
      std::printf("\r%s [%s] %lld/%lld  %.0f items/s  loss %.4f%s  ETA %.0fs   ", label_.c_str(), bar.c_str(),
                  static_cast<long long>(step), static_cast<long long>(total_), ips, loss, extra, eta);
      if (step == total_) std::printf("\n");
      std::fflush(stdout);
    } else if (step == total_ || step % log_every() == 0) {
      std::printf("%s step %lld/%lld  %.0f items/s  loss %.4f%s  ETA %.0fs\n", label_.c_str(), static_cast<long long>(step),
                  static_cast<long long>(total_), ips, loss, extra, eta);
      std::fflush(stdout);
    }
  }

 private:
  int64_t log_every() const { return total_ >= 20 ? total_ / 10 : 1; }
  std::string label_;
  int64_t total_, items_, first_;
  bool tty_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace examples
