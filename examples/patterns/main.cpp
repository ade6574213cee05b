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
  // --help: the list on stdout, exit 0; no pattern or an unknown one: the same on stderr, exit 2.
  const bool help = std::strcmp(name, "--help") == 0 || std::strcmp(name, "-h") == 0;
  std::FILE* out = help ? stdout : stderr;
  if (!help && *name) std::fprintf(out, "mixprec_patterns: unknown pattern '%s'\n", name);
  std::fprintf(out, "usage: mixprec_patterns <pattern> [flags]\npatterns:\n");
  for (const Entry& e : entries) std::fprintf(out, "  %-13s %s\n", e.name, e.what);
  std::fprintf(out, "mixprec_patterns <pattern> --help lists the pattern's flags: what each does, its allowed values, its default.\n");
  return help ? 0 : 2;
}
