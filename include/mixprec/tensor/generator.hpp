#pragma once
// Seedable random numbers with a small, serialisable state (checkpoints save it), and
// distributions written out here so results do not depend on the standard library's.
#include <array>
#include <cmath>
#include <cstdint>
#include <numbers>

namespace mixprec {

class Generator {
 public:
  explicit Generator(uint64_t seed = 0x5eed) { manual_seed(seed); }

  void manual_seed(uint64_t seed) {
    uint64_t z = seed;
    for (auto& w : s_) w = splitmix64(z);
  }
  // xoshiro256**
  uint64_t next_u64() {
    const uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }
  // [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }
  // Box-Muller; uses two uniforms per call so the state advances predictably.
  double normal() {
    const double u1 = 1.0 - uniform();  // (0, 1]
    const double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
  }
  // Uniform integer in [0, n) without modulo bias.
  uint64_t below(uint64_t n) {
    const uint64_t limit = ~uint64_t{0} - (~uint64_t{0} % n);
    uint64_t r;
    do r = next_u64(); while (r >= limit);
    return r % n;
  }

  using State = std::array<uint64_t, 4>;
  State get_state() const { return s_; }
  void set_state(const State& s) { s_ = s; }

 private:
  static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  static uint64_t splitmix64(uint64_t& z) {
    uint64_t r = (z += 0x9e3779b97f4a7c15ull);
    r = (r ^ (r >> 30)) * 0xbf58476d1ce4e5b9ull;
    r = (r ^ (r >> 27)) * 0x94d049bb133111ebull;
    return r ^ (r >> 31);
  }
  State s_{};
};

// The process-wide default generator, as torch.manual_seed seeds.
inline Generator& default_generator() {
  static Generator g;
  return g;
}
inline void manual_seed(uint64_t seed) { default_generator().manual_seed(seed); }

}  // namespace mixprec
