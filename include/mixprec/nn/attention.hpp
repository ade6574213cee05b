#pragma once
// MultiheadAttention (batch-first) and a pre-norm TransformerBlock.
#include <cmath>
#include <limits>
#include <string>

#include "mixprec/nn/activation.hpp"
#include "mixprec/nn/container.hpp"
#include "mixprec/nn/linear.hpp"
#include "mixprec/nn/norm.hpp"
#include "mixprec/ops/attention.hpp"

namespace mixprec::nn {

namespace detail {
// PyTorch MHA masks are bool (true = may NOT attend) or additive float; the attention op wants
// additive float or bool-true-attends, so bool masks become 0 / -inf.
inline Tensor mha_additive_mask(const Tensor& m) {
  if (m.dtype() != DType::Bool) return m;
  const Tensor c = m.contiguous();
  Tensor out = empty(m.sizes(), DType::Float32);
  const bool* src = c.data<bool>();
  float* dst = out.data<float>();
  for (int64_t i = 0, n = m.numel(); i < n; ++i) dst[i] = src[i] ? -std::numeric_limits<float>::infinity() : 0.0f;
  return out;
}
// Additive mask keeping key j for query i when j <= i (the attention op's causal alignment).
inline Tensor mha_causal_mask(int64_t L, int64_t S) {
  Tensor out = empty({L, S}, DType::Float32);
  float* p = out.data<float>();
  for (int64_t i = 0; i < L; ++i)
    for (int64_t j = 0; j < S; ++j) p[i * S + j] = j <= i ? 0.0f : -std::numeric_limits<float>::infinity();
  return out;
}
}  // namespace detail

// torch.nn.MultiheadAttention with batch_first=True: query [B, L, E], key / value [B, S, E] ->
// [B, L, E] (attention weights are not returned). q, k, v come from one packed projection
// in_proj_weight [3E, E] (xavier_uniform) and in_proj_bias [3E] (zeros); out_proj is a Linear
// whose bias starts at zero. Masks follow PyTorch's MHA: attn_mask [L, S] or [B * heads, L, S],
// key_padding_mask [B, S], each bool (true = ignore that key) or float (added to the scores);
// is_causal adds a causal mask (key j visible to query i when j <= i). Attention dropout runs in
// training mode and draws from the default generator (the attention op's).
class MultiheadAttention : public Module {
 public:
  MultiheadAttention(int64_t embed_dim, int64_t num_heads, double dropout = 0.0, bool bias = true,
                     Generator& gen = default_generator())
      : Module("MultiheadAttention"), embed_dim(embed_dim), num_heads(num_heads), head_dim(num_heads > 0 ? embed_dim / num_heads : 0),
        dropout(dropout) {
    MIXPREC_CHECK(embed_dim > 0 && num_heads > 0 && embed_dim % num_heads == 0, "MultiheadAttention: embed_dim (", embed_dim,
                  ") must be a positive multiple of num_heads (", num_heads, ")");
    MIXPREC_CHECK(dropout >= 0 && dropout <= 1, "MultiheadAttention: dropout must be in [0, 1], got ", dropout);
    in_proj_weight = empty({3 * embed_dim, embed_dim});
    init::xavier_uniform_(in_proj_weight, 1.0, gen);
    register_parameter("in_proj_weight", in_proj_weight);
    if (bias) in_proj_bias = zeros({3 * embed_dim});
    register_parameter("in_proj_bias", in_proj_bias);
    out_proj = std::make_shared<Linear>(embed_dim, embed_dim, bias, gen);
    if (bias) init::zeros_(out_proj->bias);
    register_module("out_proj", out_proj);
  }

  // Self-attention without masks: forward(x, x, x).
  Tensor forward(const Tensor& x) override { return forward(x, x, x); }

  Tensor forward(const Tensor& query, const Tensor& key, const Tensor& value, const Tensor& attn_mask = Tensor(),
                 bool is_causal = false, const Tensor& key_padding_mask = Tensor()) {
    for (const Tensor* t : {&query, &key, &value})
      MIXPREC_CHECK(t->defined() && t->dim() == 3 && t->size(2) == embed_dim, "MultiheadAttention: expected query, key and value of "
                    "shape [batch, seq, ", embed_dim, "], got ", t->defined() ? t->sizes() : Shape{});
    const int64_t B = query.size(0), L = query.size(1), S = key.size(1), E = embed_dim, H = num_heads, D = head_dim;
    MIXPREC_CHECK(key.size(0) == B && value.size(0) == B && value.size(1) == S, "MultiheadAttention: query ", query.sizes(), ", key ",
                  key.sizes(), " and value ", value.sizes(), " disagree on batch or sequence length");

    Tensor mask;  // broadcastable to [B, H, L, S]
    if (attn_mask.defined()) {
      const bool per_head = attn_mask.dim() == 3 && attn_mask.size(0) == B * H && attn_mask.size(1) == L && attn_mask.size(2) == S;
      MIXPREC_CHECK((attn_mask.dim() == 2 && attn_mask.size(0) == L && attn_mask.size(1) == S) || per_head,
                    "MultiheadAttention: attn_mask must have shape [", L, ", ", S, "] or [", B * H, ", ", L, ", ", S, "], got ",
                    attn_mask.sizes());
      mask = detail::mha_additive_mask(attn_mask);
      if (per_head) mask = mask.reshape({B, H, L, S});
    }
    if (key_padding_mask.defined()) {
      MIXPREC_CHECK(key_padding_mask.dim() == 2 && key_padding_mask.size(0) == B && key_padding_mask.size(1) == S,
                    "MultiheadAttention: key_padding_mask must have shape [", B, ", ", S, "], got ", key_padding_mask.sizes());
      const Tensor kp = detail::mha_additive_mask(key_padding_mask).reshape({B, 1, 1, S});
      mask = mask.defined() ? mixprec::add(mask, kp) : kp;
    }
    bool causal = is_causal;
    if (causal && mask.defined()) {  // the attention op takes a mask or the causal flag, not both
      mask = mixprec::add(mask, detail::mha_causal_mask(L, S));
      causal = false;
    }
    const double p = is_training() ? dropout : 0.0;
    Tensor o;  // [B, L, E], heads merged
    if (query.is_same(key) && key.is_same(value)) {
      // Self-attention: one GEMM for all three projections, whose output the attention reads by
      // strides and whose gradient it writes in one piece (no head split or merge copies).
      o = mixprec::scaled_dot_product_attention_packed(mixprec::linear(query, in_proj_weight, in_proj_bias), H, mask, p, causal);
    } else {
      auto proj = [&](const Tensor& x, int64_t i) {
        return mixprec::linear(x, in_proj_weight.narrow(0, i * E, E), in_proj_bias.defined() ? in_proj_bias.narrow(0, i * E, E) : Tensor());
      };
      auto heads = [&](const Tensor& t, int64_t n) { return t.reshape({B, n, H, D}).transpose(1, 2); };  // [B, H, n, D] views
      o = mixprec::scaled_dot_product_attention(heads(proj(query, 0), L), heads(proj(key, 1), S), heads(proj(value, 2), S), mask, p, causal)
              .transpose(1, 2)
              .reshape({B, L, E});
    }
    return out_proj->forward(o);
  }

  std::string extra_repr() const override {
    return "embed_dim=" + std::to_string(embed_dim) + ", num_heads=" + std::to_string(num_heads) +
           ", dropout=" + detail::py_float(dropout) + ", batch_first=True";
  }

  int64_t embed_dim, num_heads, head_dim;
  double dropout;
  Tensor in_proj_weight, in_proj_bias;
  std::shared_ptr<Linear> out_proj;
};

// Pre-norm transformer block: x = x + drop(attn(ln1(x))); x = x + mlp(ln2(x)), with
// mlp = Linear(d, hidden) - GELU(gelu_approximate) - Linear(hidden, d) - Dropout. mlp_hidden 0
// means 4 * d_model. The three run as mlp_gelu: the GELU inside the GEMMs where the device fuses it.
class TransformerBlock : public Module {
 public:
  TransformerBlock(int64_t d_model, int64_t n_head, int64_t mlp_hidden = 0, double dropout = 0.0, bool causal = false,
                   Generator& gen = default_generator(), const std::string& gelu_approximate = "none")
      : Module("TransformerBlock"), causal(causal) {
    MIXPREC_CHECK(mlp_hidden >= 0, "TransformerBlock: mlp_hidden must be non-negative, got ", mlp_hidden);
    const int64_t hidden = mlp_hidden == 0 ? 4 * d_model : mlp_hidden;
    ln1 = std::make_shared<LayerNorm>(d_model);
    attn = std::make_shared<MultiheadAttention>(d_model, n_head, dropout, true, gen);
    drop = std::make_shared<Dropout>(dropout);
    ln2 = std::make_shared<LayerNorm>(d_model);
    fc1 = std::make_shared<Linear>(d_model, hidden, true, gen);
    act = std::make_shared<GELU>(gelu_approximate);
    fc2 = std::make_shared<Linear>(hidden, d_model, true, gen);
    mlp_drop = std::make_shared<Dropout>(dropout);
    mlp = std::make_shared<Sequential>(std::initializer_list<std::shared_ptr<Module>>{fc1, act, fc2, mlp_drop});
    register_module("ln1", ln1);
    register_module("attn", attn);
    register_module("drop", drop);
    register_module("ln2", ln2);
    register_module("mlp", mlp);
  }

  Tensor forward(const Tensor& x) override { return forward(x, Tensor()); }
  // attn_mask as MultiheadAttention's; the block's causal flag applies as well.
  Tensor forward(const Tensor& x, const Tensor& attn_mask) {
    const Tensor h = ln1->forward(x);
    const Tensor a = mixprec::add(x, drop->forward(attn->forward(h, h, h, attn_mask, causal)));
    const Tensor n = ln2->forward(a);
    return mixprec::add(a, mlp_drop->forward(mixprec::mlp_gelu(n, fc1->weight, fc1->bias, fc2->weight, fc2->bias, act->approximate)));
  }
  std::string extra_repr() const override { return std::string("causal=") + detail::py_bool(causal); }

  bool causal;
  std::shared_ptr<LayerNorm> ln1, ln2;
  std::shared_ptr<MultiheadAttention> attn;
  std::shared_ptr<Dropout> drop;
  std::shared_ptr<Sequential> mlp;  // fc1, act, fc2, mlp_drop (the names state dicts use: mlp.0 ... mlp.3)
  std::shared_ptr<Linear> fc1, fc2;
  std::shared_ptr<GELU> act;
  std::shared_ptr<Dropout> mlp_drop;
};

}  // namespace mixprec::nn
