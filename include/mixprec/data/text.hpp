#pragma once
// Byte-level language-modelling data (vocabulary 256: a token is a byte), from one file or a
// directory of plain-text files such as the Debian `fortunes` package.
//
// defines: Split, TextDataset, kFortunesDir
#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "mixprec/autograd/engine.hpp"
#include "mixprec/ops/tensor_ops.hpp"
#include "mixprec/tensor/generator.hpp"

namespace mixprec::data {

// Where the Debian package `fortunes` installs its text files.
inline constexpr const char* kFortunesDir = "/usr/share/games/fortunes";

enum class Split { Train, Validation };

inline const char* split_name(Split s) { return s == Split::Train ? "train" : "validation"; }

class TextDataset {
 public:
  static constexpr int64_t kVocabSize = 256;

  // `path` is a file, or a directory whose regular files are concatenated in sorted path order
  // (skipping fortune's .dat indexes, symlinks — fortunes ships *.u8 links to the same texts —
  // and anything containing NUL bytes). The last `val_fraction` of the bytes is the validation split.
  explicit TextDataset(const std::string& path = kFortunesDir, double val_fraction = 0.1) {
    check_fraction(val_fraction);
    std::error_code ec;
    const auto st = std::filesystem::status(path, ec);
    MIXPREC_CHECK(std::filesystem::exists(st), "TextDataset: corpus '", path, "' does not exist; for the default corpus ",
                  "install the Debian package fortunes (apt-get install fortunes), which puts its texts in ", kFortunesDir);
    if (std::filesystem::is_directory(st)) {
      std::vector<std::filesystem::path> paths;
      try {
        for (const auto& e : std::filesystem::directory_iterator(path)) {
          if (!e.is_regular_file(ec) || e.is_symlink(ec) || e.path().extension() == ".dat") continue;
          paths.push_back(e.path());
        }
      } catch (const std::filesystem::filesystem_error& e) {
        fail("TextDataset: cannot list directory '", path, "': ", e.code().message());
      }
      std::sort(paths.begin(), paths.end());
      for (const auto& p : paths) {
        std::string content = read_file(p.string());
        if (content.find('\0') != std::string::npos) continue;  // binary, not text
        bytes_ += content;
        files_.push_back(p.string());
      }
      MIXPREC_CHECK(!files_.empty(), "TextDataset: no plain-text files in directory '", path,
                    "' (for the default corpus install the Debian package fortunes: apt-get install fortunes)");
    } else {
      MIXPREC_CHECK(std::filesystem::is_regular_file(st), "TextDataset: '", path, "' is neither a file nor a directory");
      bytes_ = read_file(path);
      files_.push_back(path);
    }
    split_at(val_fraction);
  }

  // From text in memory.
  static TextDataset from_text(std::string text, double val_fraction = 0.1) {
    check_fraction(val_fraction);
    TextDataset d(FromText{}, std::move(text));
    d.split_at(val_fraction);
    return d;
  }

  int64_t vocab_size() const { return kVocabSize; }
  int64_t size(Split s) const { return s == Split::Train ? train_end_ : total_size() - train_end_; }
  int64_t total_size() const { return static_cast<int64_t>(bytes_.size()); }
  std::string_view text(Split s) const {
    return s == Split::Train ? std::string_view(bytes_).substr(0, static_cast<std::size_t>(train_end_))
                             : std::string_view(bytes_).substr(static_cast<std::size_t>(train_end_));
  }
  const std::vector<std::string>& files() const { return files_; }

  // batch_size windows of seq_len bytes at uniformly random offsets: int64 inputs [B, T] and
  // targets [B, T] where targets[b][t] is the byte after inputs[b][t].
  std::pair<Tensor, Tensor> get_batch(Split split, int64_t batch_size, int64_t seq_len, Generator& gen) const {
    check_window(split, batch_size, seq_len, "get_batch");
    const auto starts = static_cast<uint64_t>(size(split) - seq_len);  // valid starts: [0, size - T)
    std::vector<int64_t> offsets(static_cast<std::size_t>(batch_size));
    for (auto& o : offsets) o = static_cast<int64_t>(gen.below(starts));
    return windows(split, offsets, seq_len);
  }

  // Sequential evaluation: non-overlapping windows k*T, k = 0 .. num_eval_windows - 1, which
  // together predict every byte of the split after the first (up to the last partial window).
  int64_t num_eval_windows(Split split, int64_t seq_len) const {
    MIXPREC_CHECK(seq_len > 0, "TextDataset::num_eval_windows: seq_len must be positive, got ", seq_len);
    return std::max<int64_t>(size(split) - 1, 0) / seq_len;
  }
  // Windows first_window .. first_window + batch_size - 1 (fewer at the end of the split).
  std::pair<Tensor, Tensor> eval_batch(Split split, int64_t first_window, int64_t batch_size, int64_t seq_len) const {
    check_window(split, batch_size, seq_len, "eval_batch");
    const int64_t n = num_eval_windows(split, seq_len);
    MIXPREC_CHECK(first_window >= 0 && first_window < n, "TextDataset::eval_batch: window ", first_window,
                  " out of range: the ", split_name(split), " split has ", n, " windows of ", seq_len, " bytes");
    std::vector<int64_t> offsets;
    for (int64_t k = first_window; k < std::min(n, first_window + batch_size); ++k) offsets.push_back(k * seq_len);
    return windows(split, offsets, seq_len);
  }

  // Bytes <-> int64 token tensors.
  static Tensor encode(std::string_view text) {
    Tensor t = empty({static_cast<int64_t>(text.size())}, DType::Int64);
    int64_t* p = t.data<int64_t>();
    for (std::size_t i = 0; i < text.size(); ++i) p[i] = static_cast<unsigned char>(text[i]);
    return t;
  }
  static std::string decode(const Tensor& tokens) {
    MIXPREC_CHECK(tokens.defined() && tokens.device() == Device::CPU, "TextDataset::decode: need a CPU tensor");
    const Tensor t = tokens.to(DType::Int64).contiguous();
    const int64_t* p = t.data<int64_t>();
    std::string s(static_cast<std::size_t>(t.numel()), '\0');
    for (int64_t i = 0; i < t.numel(); ++i) {
      MIXPREC_CHECK(p[i] >= 0 && p[i] < kVocabSize, "TextDataset::decode: token ", p[i], " at flat index ", i,
                    " is not a byte (0..255)");
      s[static_cast<std::size_t>(i)] = static_cast<char>(static_cast<unsigned char>(p[i]));
    }
    return s;
  }

 private:
  struct FromText {};
  TextDataset(FromText, std::string text) : bytes_(std::move(text)) {}

  static void check_fraction(double f) {
    MIXPREC_CHECK(f >= 0.0 && f < 1.0, "TextDataset: val_fraction must be in [0, 1), got ", f);
  }
  void split_at(double val_fraction) {
    const auto n = static_cast<int64_t>(bytes_.size());
    train_end_ = n - static_cast<int64_t>(static_cast<double>(n) * val_fraction);
  }
  static std::string read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    MIXPREC_CHECK(in.good(), "TextDataset: cannot open '", path, "': ", std::strerror(errno));
    std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    MIXPREC_CHECK(!in.bad(), "TextDataset: error reading '", path, "'");
    return s;
  }
  void check_window(Split split, int64_t batch_size, int64_t seq_len, const char* fn) const {
    MIXPREC_CHECK(batch_size > 0 && seq_len > 0, "TextDataset::", fn, ": batch_size and seq_len must be positive, got ",
                  batch_size, " and ", seq_len);
    MIXPREC_CHECK(size(split) >= seq_len + 1, "TextDataset::", fn, ": the ", split_name(split), " split has ", size(split),
                  " bytes, too few for a window of ", seq_len, " inputs plus one target");
  }
  std::pair<Tensor, Tensor> windows(Split split, const std::vector<int64_t>& offsets, int64_t seq_len) const {
    const auto b = static_cast<int64_t>(offsets.size());
    Tensor x = empty({b, seq_len}, DType::Int64);
    Tensor y = empty({b, seq_len}, DType::Int64);
    const auto* base = reinterpret_cast<const unsigned char*>(bytes_.data()) + (split == Split::Train ? 0 : train_end_);
    int64_t* px = x.data<int64_t>();
    int64_t* py = y.data<int64_t>();
    for (int64_t i = 0; i < b; ++i) {
      const unsigned char* w = base + offsets[static_cast<std::size_t>(i)];
      for (int64_t t = 0; t < seq_len; ++t) {
        px[i * seq_len + t] = w[t];
        py[i * seq_len + t] = w[t + 1];
      }
    }
    return {x, y};
  }

  std::string bytes_;
  std::vector<std::string> files_;
  int64_t train_end_ = 0;
};

}  // namespace mixprec::data
