// Replays the fuzz seed corpora and every committed regression input (fuzz/corpus/<target>/,
// fuzz/regressions/<target>/) through the harness the libFuzzer targets use, so the normal and
// sanitizer test runs re-check every input that ever found a bug, without clang or libFuzzer.
#include <gtest/gtest.h>

#include "harness.hpp"

#include <filesystem>
#include <fstream>
#include <iterator>

namespace {
int fz_replay(const std::string& target, void (*one)(const uint8_t*, size_t)) {
  int n = 0;
  for (const char* kind : {"corpus", "regressions"}) {
    const std::filesystem::path dir = std::filesystem::path(MIXPREC_FUZZ_DIR) / kind / target;
    if (!std::filesystem::is_directory(dir)) continue;
    for (const auto& e : std::filesystem::directory_iterator(dir)) {
      std::ifstream in(e.path(), std::ios::binary);
      const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      SCOPED_TRACE(e.path().string());
      one(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());  // aborts on a finding
      ++n;
    }
  }
  return n;
}
}  // namespace

TEST(FuzzCorpus, SafetensorsAndCheckpointInputs) { EXPECT_GT(fz_replay("safetensors", mixprec_fuzz::safetensors_one), 0); }
TEST(FuzzCorpus, IdxInputs) { EXPECT_GT(fz_replay("idx", mixprec_fuzz::idx_one), 0); }
TEST(FuzzCorpus, TextInputs) { EXPECT_GT(fz_replay("text", mixprec_fuzz::text_one), 0); }
