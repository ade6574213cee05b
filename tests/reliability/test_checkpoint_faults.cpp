// Checkpoint faults: damaged files are refused with an error naming the file and the damage, and
// leave the training state untouched; a process SIGKILLed at random points while saving always
// leaves the previous checkpoint loadable.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <mixprec/mixprec.hpp>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

using namespace mixprec;
namespace fs = std::filesystem;

// Named, not anonymous: the fixture below holds a CfRun, and gtest fixtures have external linkage.
namespace checkpoint_faults {

struct CfRun {
  std::shared_ptr<nn::Sequential> model;
  std::unique_ptr<optim::AdamW> opt;
  amp::GradScaler scaler{1024.0, 2.0, 0.5, 4};

  explicit CfRun(uint64_t seed) {
    Generator g(seed);
    model = std::make_shared<nn::Sequential>();
    model->push_back(std::make_shared<nn::Linear>(6, 12, true, g));
    model->push_back(std::make_shared<nn::ReLU>());
    model->push_back(std::make_shared<nn::Linear>(12, 3, true, g));
    opt = std::make_unique<optim::AdamW>(model->parameters(), 1e-2);
  }
  io::CheckpointParts parts() { return {model.get(), opt.get(), &scaler, nullptr}; }
  void step(Generator& g) {
    const Tensor x = randn({8, 6}, kFloat32, g);
    const Tensor y = randint(0, 3, {8}, kInt64, g);
    opt->zero_grad();
    Tensor loss;
    {
      autocast ac{Device::CPU, kFloat16};
      loss = cross_entropy(model->forward(x), y);
    }
    scaler.scale(loss).backward();
    scaler.step(*opt);
    scaler.update();
  }
};

std::vector<char> cf_read(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
void cf_write(const std::string& p, const std::vector<char>& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Every byte of the model's state and the scaler's, to prove a refused load changed nothing.
std::vector<char> cf_snapshot(CfRun& r) {
  std::vector<char> out;
  for (const auto& [k, t] : r.model->state_dict()) {
    const Tensor c = t.contiguous();
    const auto* p = static_cast<const char*>(c.data_ptr());
    out.insert(out.end(), p, p + c.nbytes());
  }
  for (const auto& [k, v] : r.scaler.state_dict()) {
    const auto* p = reinterpret_cast<const char*>(&v);
    out.insert(out.end(), p, p + sizeof v);
  }
  return out;
}

std::string cf_load_error(const std::string& path, CfRun& r) {
  try {
    io::load_checkpoint(path, r.parts());
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace checkpoint_faults
using namespace checkpoint_faults;

class CheckpointFaults : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("mixprec_cf_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
    path_ = (dir_ / "ck.safetensors").string();
    Generator g(3);
    for (int i = 0; i < 3; ++i) saved_.step(g);
    io::save_checkpoint(path_, saved_.parts(), {3, 0});
    good_ = cf_read(path_);
    ASSERT_GT(good_.size(), 64u);
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = n << 8 | static_cast<unsigned char>(good_[static_cast<std::size_t>(i)]);
    header_end_ = 8 + n;
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Loads `bytes` as a checkpoint into a differently initialised run: must be refused, leave
  // that run as it was, and name the file and the `expect`ed problem.
  void expect_refused(const std::vector<char>& bytes, const std::string& expect, const std::string& what) {
    const std::string bad = (dir_ / "bad.safetensors").string();
    cf_write(bad, bytes);
    CfRun target(99);
    Generator g(4);
    target.step(g);
    const std::vector<char> before = cf_snapshot(target);
    const std::string msg = cf_load_error(bad, target);
    ASSERT_FALSE(msg.empty()) << what << ": the damaged checkpoint loaded";
    EXPECT_NE(msg.find(bad), std::string::npos) << what << ": message does not name the file: " << msg;
    EXPECT_NE(msg.find(expect), std::string::npos) << what << ": expected '" << expect << "' in: " << msg;
    EXPECT_TRUE(cf_snapshot(target) == before) << what << ": a refused load changed the training state";
  }

  fs::path dir_;
  std::string path_;
  CfRun saved_{7};
  std::vector<char> good_;
  std::size_t header_end_ = 0;
};

TEST_F(CheckpointFaults, IntactCheckpointLoads) {
  CfRun r(99);
  EXPECT_EQ(io::load_checkpoint(path_, r.parts()).step, 3);
  EXPECT_TRUE(cf_snapshot(r) == cf_snapshot(saved_));
}

TEST_F(CheckpointFaults, TruncatedAtEveryRegionIsRefused) {
  const std::size_t cuts[] = {0, 3, 8, 9, header_end_ / 2, header_end_ - 1, header_end_, header_end_ + 1,
                              (header_end_ + good_.size()) / 2, good_.size() - 1};
  for (const std::size_t cut : cuts) {
    const std::vector<char> t(good_.begin(), good_.begin() + static_cast<std::ptrdiff_t>(cut));
    // Which check fires depends on where the cut falls; each names the size problem.
    const std::string expect = cut < 8 ? "shorter than the 8-byte header" : cut < header_end_ ? "runs past the end" : "data section";
    expect_refused(t, expect, "truncated to " + std::to_string(cut) + " bytes");
  }
}

// Every single-bit flip is caught: in the header by the strict parser or the checksum, in the
// data by the checksum (safetensors itself has none).
TEST_F(CheckpointFaults, BitFlipsAnywhereAreRefused) {
  std::mt19937_64 rng(11);
  int flips = 0;
  for (std::size_t pos = 0; pos < good_.size(); pos += 1 + rng() % 13) {
    std::vector<char> b = good_;
    b[pos] = static_cast<char>(b[pos] ^ (1 << (rng() % 8)));
    // A flip in the 8-byte length field or in the header's padding/JSON gives a format error;
    // anything that still parses must fail the checksum.
    const std::string bad = (dir_ / "flip.safetensors").string();
    cf_write(bad, b);
    CfRun target(99);
    const std::vector<char> before = cf_snapshot(target);
    const std::string msg = cf_load_error(bad, target);
    ASSERT_FALSE(msg.empty()) << "a flipped bit at byte " << pos << " of " << good_.size() << " loaded silently";
    EXPECT_NE(msg.find(bad), std::string::npos) << msg;
    EXPECT_TRUE(cf_snapshot(target) == before) << "flip at byte " << pos << " changed the state: " << msg;
    ++flips;
  }
  EXPECT_GT(flips, 100);
  // A flip in the tensor data is reported as a checksum mismatch.
  std::vector<char> b = good_;
  b[good_.size() - 2] ^= 0x10;
  expect_refused(b, "checksum", "data bit flip");
}

TEST_F(CheckpointFaults, WrongHeaderIsRefused) {
  auto with_header = [&](std::string h) {
    h.append((8 - h.size() % 8) % 8, ' ');
    std::vector<char> b(8 + h.size());  // sized, not insert(): GCC 12 warns falsely (-Wstringop-overread) on that
    for (int i = 0; i < 8; ++i) b[static_cast<std::size_t>(i)] = static_cast<char>((h.size() >> (8 * i)) & 0xff);
    std::copy(h.begin(), h.end(), b.begin() + 8);
    return b;
  };
  expect_refused(with_header("[1,2,3]"), "does not start with '{'", "array header");
  expect_refused(with_header("{\"a\":1}   "), "expected an object with dtype, shape and data_offsets", "scalar entry");
  expect_refused(with_header("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}"), "invalid JSON", "unterminated JSON");
  expect_refused(with_header("{}"), "not a mixprec checkpoint", "no format metadata");
  expect_refused(with_header("{\"__metadata__\":{\"format\":\"pytorch\"}}"), "'pytorch'", "foreign format");
  std::vector<char> b = good_;
  b[7] = 0x7f;  // header length in the exabytes
  expect_refused(b, "exceeds the 100 MB limit", "huge header length");
  // A header that still parses but disagrees with itself about sizes.
  std::string h(good_.begin() + 8, good_.begin() + static_cast<std::ptrdiff_t>(header_end_));
  const std::size_t at = h.find("\"shape\":[");
  ASSERT_NE(at, std::string::npos);
  h.insert(at + 9, "1");  // e.g. [12,6] -> [112,6]
  std::vector<char> resized = with_header(h);
  resized.insert(resized.end(), good_.begin() + static_cast<std::ptrdiff_t>(header_end_), good_.end());
  expect_refused(resized, "bytes but data_offsets", "shape disagrees with data_offsets");
}

TEST_F(CheckpointFaults, WrongShapeForTheModelIsRefused) {
  CfRun wide(5);
  Generator g(1);
  wide.model = std::make_shared<nn::Sequential>();
  wide.model->push_back(std::make_shared<nn::Linear>(6, 16, true, g));  // 16 hidden units, not 12
  wide.model->push_back(std::make_shared<nn::ReLU>());
  wide.model->push_back(std::make_shared<nn::Linear>(16, 3, true, g));
  wide.opt = std::make_unique<optim::AdamW>(wide.model->parameters(), 1e-2);
  const std::vector<char> before = cf_snapshot(wide);
  const std::string msg = cf_load_error(path_, wide);
  ASSERT_FALSE(msg.empty());
  EXPECT_NE(msg.find("[12, 6]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[16, 6]"), std::string::npos) << msg;
  EXPECT_TRUE(cf_snapshot(wide) == before) << msg;
}

TEST_F(CheckpointFaults, BadMetadataValuesAreRefusedAsErrors) {
  // Rewrites one metadata value in place, keeping the header length (same-length substitute).
  auto with_meta = [&](const std::string& key, const std::string& value) {
    std::vector<char> b = good_;
    std::string h(b.begin() + 8, b.begin() + static_cast<std::ptrdiff_t>(header_end_));
    const std::size_t k = h.find("\"" + key + "\":\"");
    EXPECT_NE(k, std::string::npos) << key;
    const std::size_t v = k + key.size() + 4, e = h.find('"', v);
    std::string padded = value;
    h.replace(v, e - v, padded);
    h.erase(h.find_last_not_of(' ') + 1);
    h.append((8 - h.size() % 8) % 8, ' ');
    std::vector<char> out(8 + h.size());  // as in WrongHeaderIsRefused
    for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<char>((h.size() >> (8 * i)) & 0xff);
    std::copy(h.begin(), h.end(), out.begin() + 8);
    out.insert(out.end(), good_.begin() + static_cast<std::ptrdiff_t>(header_end_), good_.end());
    return out;
  };
  // Each edit also breaks the checksum; these go through a checksum-free (format 1) file so the
  // value checks themselves are exercised.
  auto v1 = [&](std::vector<char> b) {
    std::string s(b.begin(), b.end());
    const std::size_t f = s.find(io::kCheckpointFormat);
    s.replace(f, std::strlen(io::kCheckpointFormat), io::kCheckpointFormatV1);
    return std::vector<char>(s.begin(), s.end());
  };
  expect_refused(v1(with_meta("rng.0", std::string(64, 'z'))), "64 lowercase hex digits", "non-hex generator state");
  expect_refused(v1(with_meta("step", "1e300")), "'step' is not an integer", "step out of range");
  expect_refused(v1(with_meta("scaler.scale", "nan")), "scale must be positive and finite", "NaN scale");
  expect_refused(v1(with_meta("scaler.growth_interval", "1e300")), "growth_interval", "huge growth interval");
  expect_refused(v1(with_meta("scaler.backoff_factor", "2")), "backoff_factor", "backoff above 1");
  expect_refused(with_meta("step", "4"), "checksum", "edited step");
}

// A child saves checkpoints of a changing model in a tight loop and is SIGKILLed at a random
// moment; the file at `path` must then always load, and hold a state the child had saved.
TEST_F(CheckpointFaults, SigkillDuringSaveAlwaysLeavesALoadableCheckpoint) {
  constexpr int kKills = 40;
  std::mt19937_64 rng(2024);
  int mid_save = 0, newer = 0;
  int64_t last_step = 3;
  {
    // The starting checkpoint follows the children's convention: every weight equals the step.
    CfRun r(7);
    no_grad ng;
    for (Tensor p : r.model->parameters()) p.fill_(3.0);
    io::save_checkpoint(path_, r.parts(), {3, 0});
  }
  for (int kill = 0; kill < kKills; ++kill) {
    int fds[2];
    ASSERT_EQ(::pipe(fds), 0);
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      // Child: only this thread exists; keep to serial code (small tensors) and never return.
      ::close(fds[0]);
      CfRun r(7);
      no_grad ng;
      for (int64_t step = last_step + 1;; ++step) {
        for (Tensor p : r.model->parameters()) p.fill_(static_cast<double>(step));
        io::save_checkpoint(path_, r.parts(), {step, 0});
        if (::write(fds[1], &step, sizeof step) != sizeof step) ::_exit(3);
      }
    }
    ::close(fds[1]);
    // Wait for the child's first finished save, so that the kill lands at a random point of the
    // saves after it (never before the child has written anything).
    int64_t first = 0;
    ASSERT_EQ(::read(fds[0], &first, sizeof first), static_cast<ssize_t>(sizeof first)) << "child died before saving";
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 20000));
    ::kill(pid, SIGKILL);
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << "child exited on its own, status " << status;
    int64_t reported = first, s = 0;
    while (::read(fds[0], &s, sizeof s) == sizeof s) reported = s;
    ::close(fds[0]);
    const fs::path tmp = path_ + ".tmp." + std::to_string(pid);
    if (fs::exists(tmp)) {
      ++mid_save;
      fs::remove(tmp);  // what a crashed save leaves behind: never the checkpoint itself
    }

    CfRun r(99);
    io::TrainingState st;
    ASSERT_NO_THROW(st = io::load_checkpoint(path_, r.parts())) << "kill " << kill << " left an unloadable checkpoint";
    // The last save the child finished, or the one whose rename landed just before the kill.
    ASSERT_TRUE(st.step == reported || st.step == reported + 1) << "loaded step " << st.step << ", child reported " << reported;
    newer += st.step > first;
    for (const Tensor& p : r.model->parameters()) {
      const Tensor c = p.contiguous();
      for (int64_t i = 0; i < c.numel(); ++i)
        ASSERT_EQ(c.data<float>()[i], static_cast<float>(st.step)) << "weights do not belong to step " << st.step;
    }
    last_step = st.step;
  }
  std::printf("  %d SIGKILLs after a child's first save: %d landed mid-save, %d after further saves; every one left a "
              "loadable checkpoint holding a state the child had saved\n", kKills, mid_save, newer);
  EXPECT_GT(mid_save, 0) << "no kill interrupted a save: the test did not exercise what it is for";
}
