// mixprec_patterns <pattern> [flags]: the seed patterns of mixed-precision training.
#include <cstdio>
#include <cstring>

#include "patterns/patterns.hpp"

int main(int argc, char** argv) {
  struct Entry {
    const char* name;
    int (*run)(int, char**);
    const char* what;
  };
  const Entry entries[] = {
      {"quickstart", patterns::quickstart, "ResNet-50 on random data: the float32 loop and its AMP version (3 changed lines)"},
      {"memory", patterns::memory, "ResNet-50 forward+backward peak memory: fp32 batch B, AMP batch B, AMP batch 2B"},
      {"accumulation", patterns::accumulation, "gradient accumulation over micro-batches with the GradScaler and clipping"},
      {"fp32-head", patterns::fp32_head, "forcing a range-sensitive head to float32 inside autocast"},
  };
  const char* name = argc > 1 ? argv[1] : "";
  for (const Entry& e : entries) {
    if (std::strcmp(name, e.name) == 0) return examples::run_main(e.run, argc - 1, argv + 1);
  }
  std::fprintf(stderr, "usage: mixprec_patterns <pattern> [--help | flags]\n");
  for (const Entry& e : entries) std::fprintf(stderr, "  %-13s %s\n", e.name, e.what);
  return 2;
}
