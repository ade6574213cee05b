#pragma once
#include "mixprec/core/config.hpp"

namespace mixprec {

// Thread-local, as in PyTorch: one thread's no_grad does not affect another's training.
struct GradMode {
  static bool& flag() {
    thread_local bool enabled = true;
    return enabled;
  }
  static bool is_enabled() { return flag(); }
  static void set_enabled(bool on) { flag() = on; }
};

class no_grad {
 public:
  MIXPREC_GUARD no_grad() : prev_(GradMode::is_enabled()) { GradMode::set_enabled(false); }
  ~no_grad() { GradMode::set_enabled(prev_); }
  no_grad(const no_grad&) = delete;
  no_grad& operator=(const no_grad&) = delete;

 private:
  bool prev_;
};

class enable_grad {
 public:
  MIXPREC_GUARD enable_grad() : prev_(GradMode::is_enabled()) { GradMode::set_enabled(true); }
  ~enable_grad() { GradMode::set_enabled(prev_); }
  enable_grad(const enable_grad&) = delete;
  enable_grad& operator=(const enable_grad&) = delete;

 private:
  bool prev_;
};

}  // namespace mixprec
