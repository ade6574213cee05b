// Checkpoints: everything a run needs round-trips, and resuming from step k reproduces the
// uninterrupted run bit-exactly at step n.
#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>

#include <filesystem>
#include <fstream>

using namespace mixprec;

namespace {
struct CkRun {
  std::shared_ptr<nn::Sequential> model;
  std::unique_ptr<optim::AdamW> opt;
  std::unique_ptr<amp::GradScaler> scaler;
  std::unique_ptr<optim::lr_scheduler::CosineAnnealingWarmupLR> sched;
  Generator data_gen{77};

  explicit CkRun(DType dtype) {
    Generator g(5);
    model = std::make_shared<nn::Sequential>();
    model->push_back(std::make_shared<nn::Linear>(6, 16, true, g));
    model->push_back(std::make_shared<nn::ReLU>());
    model->push_back(std::make_shared<nn::Dropout>(0.1));
    model->push_back(std::make_shared<nn::Linear>(16, 3, true, g));
    model->to(dtype);
    opt = std::make_unique<optim::AdamW>(model->parameters(), 1e-2);
    scaler = std::make_unique<amp::GradScaler>(1024.0, 2.0, 0.5, 3);
    sched = std::make_unique<optim::lr_scheduler::CosineAnnealingWarmupLR>(*opt, 2, 20);
  }
  io::CheckpointParts parts() { return {model.get(), opt.get(), scaler.get(), sched.get(), {&default_generator(), &data_gen}}; }

  void step() {
    const Tensor x = randn({8, 6}, kFloat32, data_gen);
    const Tensor y = randint(0, 3, {8}, kInt64, data_gen);
    Tensor loss;
    {
      autocast ac{Device::CPU, kFloat16};
      loss = cross_entropy(model->forward(x), y);  // dropout draws from the default generator
    }
    opt->zero_grad();
    scaler->scale(loss).backward();
    scaler->step(*opt);
    scaler->update();
    sched->step();
  }
};

std::string ck_tmp(const char* name) { return (std::filesystem::temp_directory_path() / name).string(); }

bool ck_same_bits(nn::Module& a, nn::Module& b) {
  auto sa = a.state_dict(), sb = b.state_dict();
  if (sa.size() != sb.size()) return false;
  for (std::size_t i = 0; i < sa.size(); ++i) {
    const Tensor x = sa[i].second.contiguous(), y = sb[i].second.contiguous();
    if (x.dtype() != y.dtype() || x.sizes() != y.sizes() || std::memcmp(x.data_ptr(), y.data_ptr(), x.nbytes()) != 0) return false;
  }
  return true;
}
}  // namespace

TEST(Checkpoint, ResumeReproducesUninterruptedRunBitExactly) {
  for (DType dtype : {kFloat32, kBFloat16}) {
    const std::string path = ck_tmp("mixprec_ck_resume.safetensors");
    manual_seed(1);
    CkRun full(dtype);
    for (int i = 0; i < 12; ++i) full.step();

    manual_seed(1);
    CkRun first(dtype);
    for (int i = 0; i < 5; ++i) first.step();
    io::save_checkpoint(path, first.parts(), {5, 0, {{"best_loss", 0.125}}});
    for (int i = 0; i < 3; ++i) first.step();  // state diverges after the save; resume must not care

    manual_seed(999);  // a fresh process: different default generator state
    CkRun resumed(dtype);
    const io::TrainingState st = io::load_checkpoint(path, resumed.parts());
    EXPECT_EQ(st.step, 5);
    EXPECT_EQ(st.extra.at("best_loss"), 0.125);
    for (int i = 5; i < 12; ++i) resumed.step();
    EXPECT_TRUE(ck_same_bits(*full.model, *resumed.model)) << "dtype " << dtype;
    EXPECT_EQ(full.scaler->get_scale(), resumed.scaler->get_scale());
    EXPECT_EQ(full.sched->get_last_lr(), resumed.sched->get_last_lr());
    std::filesystem::remove(path);
  }
}

TEST(Checkpoint, WeightsAreStoredAsFloat32AndRejectedWhenTheyDoNotFit) {
  const std::string path = ck_tmp("mixprec_ck_f32.safetensors");
  CkRun run(kBFloat16);
  io::save_checkpoint(path, {run.model.get(), nullptr, nullptr, nullptr, {}});
  const io::SafetensorsFile f = io::load_safetensors(path);
  for (const auto& [k, t] : f.tensors)
    if (k.rfind("model.", 0) == 0) EXPECT_EQ(t.dtype(), kFloat32) << k;
  // A model of another shape refuses the file and keeps its weights.
  Generator g(1);
  auto other = std::make_shared<nn::Sequential>();
  other->push_back(std::make_shared<nn::Linear>(6, 8, true, g));
  const Tensor before = other->state_dict()[0].second.clone();
  EXPECT_THROW(io::load_checkpoint(path, {other.get(), nullptr, nullptr, nullptr, {}}), Error);
  EXPECT_EQ(std::memcmp(before.data_ptr(), other->state_dict()[0].second.data_ptr(), before.nbytes()), 0);
  // Not a checkpoint at all.
  io::save_safetensors(path, {{"x", ones({2})}});
  EXPECT_THROW(io::load_checkpoint(path, {run.model.get(), nullptr, nullptr, nullptr, {}}), Error);
  std::filesystem::remove(path);
}

// A file that is no checkpoint at all (here text) is refused in one line that names it, not by
// the "header length" its first eight bytes spell as a number.
TEST(Checkpoint, ANonCheckpointFileIsNamedInOneLine) {
  const std::string path = ck_tmp("mixprec_ck_notes.txt");
  {
    std::ofstream out(path);
    out << "step,epoch,loss\n1,0,2.30\n";
  }
  CkRun run(kFloat32);
  try {
    io::load_checkpoint(path, run.parts());
    ADD_FAILURE() << "a text file loaded as a checkpoint";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path + " is not a mixprec checkpoint"), std::string::npos) << msg;
    EXPECT_EQ(msg.find("header length"), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
  std::filesystem::remove(path);
}
