#pragma once
// A GPT-style decoder: token + learned position embeddings, n_layer pre-norm causal
// TransformerBlocks, a final LayerNorm and a linear head, optionally tied to the token
// embedding (one tensor, listed once by parameters(), under "tok_emb.weight").
//
// Initialisation is GPT-2's rather than the layers' defaults (a tied head would otherwise start
// with logits of standard deviation sqrt(d_model)): weights N(0, 0.02), biases 0, the residual
// projections (attn.out_proj, mlp.2) N(0, 0.02 / sqrt(2 n_layer)), LayerNorms 1 / 0.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "mixprec/autograd/checkpoint.hpp"
#include "mixprec/nn/attention.hpp"
#include "mixprec/ops/loss.hpp"

namespace mixprec::nn::models {

struct GPTConfig {
  int64_t vocab = 256;
  int64_t block_size = 128;  // longest context
  int64_t n_layer = 4;
  int64_t n_head = 4;
  int64_t d_model = 256;
  int64_t mlp_hidden = 1024;
  double dropout = 0.0;
  bool tie_weights = true;
  // The MLP's GELU: "none" (erf, as PyTorch's nn.GELU) or "tanh" (GPT-2's). Either runs inside the
  // MLP's GEMMs on the CPU; on CUDA the tanh one does (cuBLASLt's epilogues; mlp_gelu).
  std::string gelu_approximate = "none";
  // Activation checkpointing (autograd/checkpoint.hpp): each block keeps only its input, and its
  // forward runs again during backward. Less memory, one more forward's compute; same gradients.
  bool checkpoint_blocks = false;
};

class GPT : public Module {
 public:
  explicit GPT(const GPTConfig& config = {}, Generator& gen = default_generator()) : Module("GPT"), config(config), gen_(&gen) {
    MIXPREC_CHECK(config.vocab > 0 && config.block_size > 0 && config.n_layer >= 0 && config.d_model > 0 && config.mlp_hidden > 0,
                  "GPT: vocab, block_size, d_model and mlp_hidden must be positive and n_layer non-negative");
    tok_emb = std::make_shared<Embedding>(config.vocab, config.d_model, std::nullopt, gen);
    pos_emb = std::make_shared<Embedding>(config.block_size, config.d_model, std::nullopt, gen);
    drop = std::make_shared<Dropout>(config.dropout);
    blocks = std::make_shared<Sequential>();
    for (int64_t i = 0; i < config.n_layer; ++i)
      blocks->push_back(std::make_shared<TransformerBlock>(config.d_model, config.n_head, config.mlp_hidden, config.dropout, true, gen,
                                                           config.gelu_approximate));
    ln_f = std::make_shared<LayerNorm>(config.d_model);
    head = std::make_shared<Linear>(config.d_model, config.vocab, false, gen);
    register_module("tok_emb", tok_emb);
    register_module("pos_emb", pos_emb);
    register_module("drop", drop);
    register_module("blocks", blocks);
    register_module("ln_f", ln_f);
    register_module("head", head);

    const double resid_std = 0.02 / std::sqrt(2.0 * static_cast<double>(std::max<int64_t>(config.n_layer, 1)));
    for (auto& [name, p] : named_parameters()) {
      const std::string& n = name;  // lambdas may not capture a structured binding before C++20 in clang < 16
      auto ends_with = [&n](const std::string& suffix) {
        return n.size() >= suffix.size() && n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0;
      };
      if (ends_with("attn.out_proj.weight") || ends_with("mlp.2.weight")) init::normal_(p, 0.0, resid_std, gen);
      else if (p.dim() >= 2) init::normal_(p, 0.0, 0.02, gen);
      else if (ends_with("bias")) init::zeros_(p);
    }
    if (config.tie_weights) head->weight = tok_emb->weight;  // after init: the head shares the embedding's values
  }

  // idx: int64 (or int32) token ids [B, T] with T <= block_size -> logits [B, T, vocab].
  Tensor forward(const Tensor& idx) override {
    MIXPREC_CHECK(idx.defined() && idx.dim() == 2 && (idx.dtype() == DType::Int64 || idx.dtype() == DType::Int32),
                  "GPT: expected token ids of shape [batch, time] and dtype int64, got ", idx.defined() ? idx.sizes() : Shape{}, " ",
                  idx.defined() ? name(idx.dtype()) : "undefined");
    const int64_t T = idx.size(1);
    MIXPREC_CHECK(T >= 1 && T <= config.block_size, "GPT: sequence length ", T, " must be in [1, block_size = ", config.block_size,
                  "]");
    Tensor x = mixprec::add(tok_emb->forward(idx), pos_emb->forward(positions(T, pos_emb->weight.device())));
    x = drop->forward(x);
    if (config.checkpoint_blocks && GradMode::is_enabled()) {
      for (const auto& b : *blocks)  // attention dropout draws from gen_, the blocks' Dropouts from the default generator
        x = autograd::checkpoint({.generators = {gen_}}, [b](const Tensor& h) { return b->forward(h); }, x);
    } else {
      x = blocks->forward(x);
    }
    return head->forward(ln_f->forward(x));
  }

  // Mean next-token cross entropy of forward(idx) against targets [B, T].
  Tensor loss(const Tensor& idx, const Tensor& targets, int64_t ignore_index = -100) {
    const Tensor logits = forward(idx);
    MIXPREC_CHECK(targets.defined() && targets.sizes() == idx.sizes(), "GPT::loss: targets of shape ",
                  targets.defined() ? targets.sizes() : Shape{}, " do not match idx of shape ", idx.sizes());
    return mixprec::cross_entropy(logits.reshape({-1, config.vocab}), targets.reshape({-1}), Reduction::Mean, ignore_index);
  }

  // Appends max_new_tokens sampled tokens to idx [B, T] (int64), under no_grad, feeding at most
  // block_size tokens back each step. Logits are divided by temperature (0 = greedy argmax) and,
  // when top_k > 0, restricted to the top_k largest. The caller chooses train/eval mode (dropout),
  // as in PyTorch.
  Tensor generate(const Tensor& idx, int64_t max_new_tokens, double temperature = 1.0, int64_t top_k = 0,
                  Generator& gen = default_generator()) {
    MIXPREC_CHECK(idx.defined() && idx.dim() == 2 && idx.size(0) > 0 && idx.size(1) > 0 &&
                      (idx.dtype() == DType::Int64 || idx.dtype() == DType::Int32),
                  "GPT::generate: expected non-empty int64 token ids [batch, time], got ", idx.defined() ? idx.sizes() : Shape{});
    MIXPREC_CHECK(max_new_tokens >= 0 && temperature >= 0 && top_k >= 0, "GPT::generate: max_new_tokens (", max_new_tokens,
                  "), temperature (", temperature, ") and top_k (", top_k, ") must be non-negative");
    no_grad guard;
    const int64_t B = idx.size(0), V = config.vocab;
    const Device dev = tok_emb->weight.device();  // sampled on the host from the model's logits
    std::vector<std::vector<int64_t>> seqs(static_cast<std::size_t>(B));
    {
      const Tensor c = idx.cpu().to(DType::Int64).contiguous();
      const int64_t* p = c.data<int64_t>();
      for (int64_t b = 0; b < B; ++b) seqs[b].assign(p + b * idx.size(1), p + (b + 1) * idx.size(1));
    }
    std::vector<double> probs(static_cast<std::size_t>(V));
    for (int64_t step = 0; step < max_new_tokens; ++step) {
      const int64_t T = static_cast<int64_t>(seqs[0].size()), t = std::min(T, config.block_size);
      std::vector<int64_t> ctx;
      ctx.reserve(static_cast<std::size_t>(B * t));
      for (const auto& s : seqs) ctx.insert(ctx.end(), s.end() - t, s.end());
      const Tensor logits = forward(tensor(ctx, {B, t}).to(dev)).select(1, -1).cpu().to(DType::Float64).contiguous();  // [B, V]
      const double* lp = logits.data<double>();
      for (int64_t b = 0; b < B; ++b) seqs[b].push_back(sample(lp + b * V, temperature, top_k, gen, probs));
    }
    std::vector<int64_t> flat;
    for (const auto& s : seqs) flat.insert(flat.end(), s.begin(), s.end());
    return tensor(flat, {B, static_cast<int64_t>(seqs[0].size())}).to(idx.device());
  }

  GPTConfig config;
  std::shared_ptr<Embedding> tok_emb, pos_emb;
  std::shared_ptr<Dropout> drop;
  std::shared_ptr<Sequential> blocks;
  std::shared_ptr<LayerNorm> ln_f;
  std::shared_ptr<Linear> head;

 private:
  // 0..T-1 on `device`, made once per (T, device) and kept: a step on a GPU then uploads nothing
  // (a CapturedStep may not), and the positions are not a buffer (no checkpoint entry).
  const Tensor& positions(int64_t T, Device device) {
    if (!positions_.defined() || positions_.size(0) != T || positions_.device() != device) positions_ = arange(T).to(device);
    return positions_;
  }

  Tensor positions_;
  Generator* gen_;  // the one the blocks' attention dropout draws from: checkpoint_blocks replays it
  int64_t sample(const double* logits, double temperature, int64_t top_k, Generator& gen, std::vector<double>& probs) const {
    const int64_t V = config.vocab;
    if (temperature == 0.0) return std::max_element(logits, logits + V) - logits;
    double cutoff = -std::numeric_limits<double>::infinity();
    if (top_k > 0 && top_k < V) {
      std::vector<double> sorted(logits, logits + V);
      std::nth_element(sorted.begin(), sorted.begin() + (top_k - 1), sorted.end(), std::greater<>());
      cutoff = sorted[static_cast<std::size_t>(top_k - 1)];
    }
    const double mx = *std::max_element(logits, logits + V);
    double total = 0;
    for (int64_t v = 0; v < V; ++v) {
      probs[v] = logits[v] >= cutoff ? std::exp((logits[v] - mx) / temperature) : 0.0;
      total += probs[v];
    }
    double u = gen.uniform() * total;
    for (int64_t v = 0; v < V; ++v) {
      if (probs[v] == 0.0) continue;
      if (u < probs[v]) return v;
      u -= probs[v];
    }
    for (int64_t v = V - 1; v >= 0; --v)  // rounding left u just above the last bucket
      if (probs[v] > 0.0) return v;
    return 0;
  }
};

// Models are owned through std::shared_ptr, as every module is (LibTorch's convention, and what
// register_module and the optimizers' parameter lists expect): the factories of this namespace
// (resnet20(), make_resnet(), gpt()) all return one.
inline std::shared_ptr<GPT> gpt(const GPTConfig& config = {}, Generator& gen = default_generator()) {
  return std::make_shared<GPT>(config, gen);
}

}  // namespace mixprec::nn::models
