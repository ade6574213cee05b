#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>
#include <mixprec/data/text.hpp>

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

using namespace mixprec;
namespace fs = std::filesystem;

namespace {

struct TextTmpDir {
  fs::path path;
  TextTmpDir() {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() / ("mixprec_text_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TextTmpDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string write(const std::string& name, const std::string& bytes) const {
    const auto p = (path / name).string();
    std::ofstream(p, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    return p;
  }
};

std::string text_row(const Tensor& t, int64_t r) {
  std::string s;
  for (int64_t c = 0; c < t.size(1); ++c) s += static_cast<char>(t.data<int64_t>()[r * t.size(1) + c]);
  return s;
}

void text_expect_error(const std::function<void()>& f, const std::vector<std::string>& fragments) {
  try {
    f();
    ADD_FAILURE() << "expected mixprec::Error containing '" << fragments.front() << "'";
  } catch (const Error& e) {
    for (const auto& frag : fragments)
      EXPECT_NE(std::string(e.what()).find(frag), std::string::npos) << "'" << frag << "' not in: " << e.what();
  }
}

// 900 letters then 100 digits, so a window's split is visible in its bytes.
std::string text_corpus() {
  std::string s;
  for (int i = 0; i < 900; ++i) s += static_cast<char>('a' + (i * 7) % 26);
  for (int i = 0; i < 100; ++i) s += static_cast<char>('0' + (i * 3) % 10);
  return s;
}

}  // namespace

TEST(TextDataset, SplitSizesAndContents) {
  const std::string corpus = text_corpus();
  const auto ds = data::TextDataset::from_text(corpus, 0.1);
  EXPECT_EQ(ds.vocab_size(), 256);
  EXPECT_EQ(ds.total_size(), 1000);
  EXPECT_EQ(ds.size(data::Split::Train), 900);
  EXPECT_EQ(ds.size(data::Split::Validation), 100);
  EXPECT_EQ(ds.text(data::Split::Train), corpus.substr(0, 900));
  EXPECT_EQ(ds.text(data::Split::Validation), corpus.substr(900));
  const auto none = data::TextDataset::from_text(corpus, 0.0);
  EXPECT_EQ(none.size(data::Split::Validation), 0);
  EXPECT_EQ(data::TextDataset::from_text(std::string(10, 'x'), 0.25).size(data::Split::Validation), 2);  // floor
  EXPECT_THROW(data::TextDataset::from_text(corpus, 1.0), Error);
  EXPECT_THROW(data::TextDataset::from_text(corpus, -0.1), Error);
}

TEST(TextDataset, RandomBatchesAreNextByteWindowsInsideTheirSplit) {
  const std::string corpus = text_corpus();
  const auto ds = data::TextDataset::from_text(corpus, 0.1);
  Generator g(123);
  const auto [x, y] = ds.get_batch(data::Split::Train, 8, 16, g);
  ASSERT_EQ(x.sizes(), (Shape{8, 16}));
  ASSERT_EQ(y.sizes(), (Shape{8, 16}));
  EXPECT_EQ(x.dtype(), DType::Int64);
  EXPECT_EQ(y.dtype(), DType::Int64);
  const std::string train = corpus.substr(0, 900);
  for (int64_t b = 0; b < 8; ++b) {
    const std::string in = text_row(x, b), out = text_row(y, b);
    EXPECT_EQ(in.substr(1), out.substr(0, 15)) << "targets are inputs shifted by one";
    // The window and its target byte are a substring of the train split.
    EXPECT_NE(train.find(in + out.back()), std::string::npos);
  }
  for (int rep = 0; rep < 50; ++rep) {
    const auto [vx, vy] = ds.get_batch(data::Split::Validation, 4, 99, g);  // the largest window that fits
    for (int64_t b = 0; b < 4; ++b) {
      const std::string w = text_row(vx, b) + text_row(vy, b).back();
      EXPECT_EQ(w, corpus.substr(900)) << "only one window of 100 bytes exists";
    }
  }
  Generator g1(5), g2(5);
  const auto a = ds.get_batch(data::Split::Train, 4, 8, g1);
  const auto b = ds.get_batch(data::Split::Train, 4, 8, g2);
  EXPECT_EQ(std::memcmp(a.first.data_ptr(), b.first.data_ptr(), a.first.nbytes()), 0) << "same generator state, same batch";

  text_expect_error([&] { ds.get_batch(data::Split::Validation, 4, 100, g); }, {"validation split has 100 bytes", "window of 100"});
  EXPECT_THROW(ds.get_batch(data::Split::Train, 0, 8, g), Error);
  EXPECT_THROW(ds.get_batch(data::Split::Train, 4, 0, g), Error);
}

TEST(TextDataset, SequentialEvalWindowsTileTheSplit) {
  const std::string corpus = text_corpus();
  const auto ds = data::TextDataset::from_text(corpus, 0.1);
  const int64_t T = 7;
  const int64_t n = ds.num_eval_windows(data::Split::Validation, T);
  EXPECT_EQ(n, (100 - 1) / T);
  std::string inputs, targets;
  int64_t batches = 0;
  for (int64_t w = 0; w < n; w += 5, ++batches) {
    const auto [x, y] = ds.eval_batch(data::Split::Validation, w, 5, T);
    EXPECT_EQ(x.size(0), std::min<int64_t>(5, n - w));
    for (int64_t r = 0; r < x.size(0); ++r) {
      inputs += text_row(x, r);
      targets += text_row(y, r);
    }
  }
  EXPECT_EQ(batches, 3);
  const std::string val = corpus.substr(900);
  EXPECT_EQ(inputs, val.substr(0, n * T));
  EXPECT_EQ(targets, val.substr(1, n * T));
  EXPECT_THROW(ds.eval_batch(data::Split::Validation, n, 5, T), Error);
  EXPECT_THROW(ds.eval_batch(data::Split::Validation, -1, 5, T), Error);
  EXPECT_EQ(data::TextDataset::from_text("ab", 0.0).num_eval_windows(data::Split::Train, 1), 1);
  EXPECT_EQ(data::TextDataset::from_text("a", 0.0).num_eval_windows(data::Split::Train, 1), 0);
}

TEST(TextDataset, EncodeDecode) {
  std::string all;
  for (int c = 0; c < 256; ++c) all += static_cast<char>(c);
  const Tensor t = data::TextDataset::encode(all);
  EXPECT_EQ(t.sizes(), (Shape{256}));
  for (int c = 0; c < 256; ++c) EXPECT_EQ(t.data<int64_t>()[c], c);
  EXPECT_EQ(data::TextDataset::decode(t), all);
  EXPECT_EQ(data::TextDataset::decode(t.to(DType::Int32).view({16, 16})), all);
  EXPECT_THROW(data::TextDataset::decode(tensor(std::vector<int64_t>{65, 256})), Error);
  EXPECT_THROW(data::TextDataset::decode(tensor(std::vector<int64_t>{-1})), Error);
}

TEST(TextDataset, DirectoryReadsTextFilesInSortedOrder) {
  TextTmpDir dir;
  dir.write("b.txt", "BBB\n");
  const std::string a = dir.write("a.txt", "AAA\n");
  dir.write("c.dat", "index");                             // fortune's strfile index
  dir.write("d.bin", std::string("bin\0ary", 7));         // binary-looking
  fs::create_symlink(a, dir.path / "e.u8");                 // a second name for a.txt
  fs::create_directories(dir.path / "sub");
  dir.write("sub/zzz", "nested files are not read\n");
  const data::TextDataset ds(dir.path.string(), 0.25);
  EXPECT_EQ(ds.text(data::Split::Train), "AAA\nBB");
  EXPECT_EQ(ds.text(data::Split::Validation), "B\n");
  ASSERT_EQ(ds.files().size(), 2u);
  EXPECT_EQ(fs::path(ds.files()[0]).filename(), "a.txt");
  EXPECT_EQ(fs::path(ds.files()[1]).filename(), "b.txt");

  // A single file.
  const data::TextDataset one(a, 0.0);
  EXPECT_EQ(one.text(data::Split::Train), "AAA\n");

  TextTmpDir empty;
  empty.write("only.dat", "x");
  text_expect_error([&] { data::TextDataset(empty.path.string()); }, {"no plain-text files", "apt-get install fortunes"});
  const std::string missing = (dir.path / "missing").string();
  text_expect_error([&] { data::TextDataset(missing, 0.1); }, {missing, "does not exist", "Debian package fortunes",
                                                               "apt-get install fortunes"});
}

TEST(TextDataset, FortunesCorpusWhenInstalled) {
  if (!fs::is_directory(data::kFortunesDir))
    GTEST_SKIP() << data::kFortunesDir << " is absent: install the Debian package fortunes to run this test";
  const data::TextDataset ds;  // the default corpus
  EXPECT_GT(ds.files().size(), 10u);
  for (const auto& f : ds.files()) {
    EXPECT_NE(fs::path(f).extension(), ".dat") << f;
    EXPECT_FALSE(fs::is_symlink(f)) << f;
  }
  EXPECT_TRUE(std::is_sorted(ds.files().begin(), ds.files().end()));
  EXPECT_GT(ds.total_size(), 1'000'000);
  EXPECT_EQ(ds.text(data::Split::Train).find('\0'), std::string_view::npos);
  EXPECT_EQ(ds.size(data::Split::Validation), ds.total_size() / 10);
  EXPECT_EQ(ds.size(data::Split::Train) + ds.size(data::Split::Validation), ds.total_size());
  Generator g(0);
  const auto [x, y] = ds.get_batch(data::Split::Validation, 32, 128, g);
  EXPECT_EQ(x.sizes(), (Shape{32, 128}));
  for (int64_t b = 0; b < 32; ++b) EXPECT_EQ(text_row(x, b).substr(1), text_row(y, b).substr(0, 127));
  // Reproducible: the same files in the same order give the same bytes.
  const data::TextDataset again(data::kFortunesDir);
  EXPECT_EQ(again.text(data::Split::Validation), ds.text(data::Split::Validation));
}
