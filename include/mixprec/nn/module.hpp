#pragma once
// nn::Module: torch.nn.Module for C++. A module owns named parameters, buffers and child
// modules, in registration order; names nest with dots ("layer1.0.conv1.weight").
//
// Registration binds a *slot*: `register_parameter("weight", weight)` with a member Tensor makes
// the registry read that member, so reassigning it later (`head->weight = emb->weight` to tie
// weights, `model->fc = make_shared<Linear>(512, 10)` to replace a head) is what the registry
// sees, as attribute assignment does in PyTorch. Passing an rvalue instead
// (`register_parameter("w", randn({3}))`) stores the tensor in the module and returns it.
// Modules are neither copyable nor movable (slots point into them); hold them in shared_ptr.
//
// Parameters that are the same tensor (tied weights) are listed once by parameters() and
// named_parameters(), under the first name met, and counted once; state_dict() lists every
// name, as PyTorch does.
#include <array>
#include <concepts>
#include <cstdio>
#include <deque>
#include <functional>
#include <memory>
#include <ostream>
#include <sstream>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "mixprec/autograd/engine.hpp"
#include "mixprec/core/capabilities.hpp"

namespace mixprec::nn {

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

// What a non-strict load_state_dict could not match.
struct LoadResult {
  std::vector<std::string> missing_keys;     // in the module, not in the state dict
  std::vector<std::string> unexpected_keys;  // in the state dict, not in the module
  bool ok() const { return missing_keys.empty() && unexpected_keys.empty(); }
};

namespace detail {
// Python's repr of a float: 1e-05, 0.1, 1.0.
inline std::string py_float(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  std::string s = buf;
  if (s.find_first_of(".eni") == std::string::npos) s += ".0";
  return s;
}
inline const char* py_bool(bool b) { return b ? "True" : "False"; }

// Every line after the first indented by two spaces (PyTorch's _addindent).
inline std::string add_indent(const std::string& s) {
  std::string out;
  for (char c : s) {
    out += c;
    if (c == '\n') out += "  ";
  }
  return out;
}

// Re-stores t in dtype d (or on device dev) inside its own TensorImpl, so every handle to it,
// an optimizer's included, sees the change. The new storage's version moves past the old one so
// version-keyed caches (autocast's weight casts, optimizers' master weights) notice.
inline void restore_in_place(const Tensor& t, Tensor fresh) {
  TensorImpl* impl = t.impl();
  fresh.storage()->version = t.version() + 1;
  impl->storage = fresh.storage();
  impl->offset = fresh.storage_offset();
  impl->strides = fresh.strides();
  impl->dtype = fresh.dtype();
}
inline void retype_in_place(const Tensor& t, DType d) {
  if (!t.is_floating_point() || t.dtype() == d) return;
  Tensor fresh = empty(t.sizes(), d, t.device());
  mixprec::detail::copy_kernel(fresh, t);
  restore_in_place(t, fresh);
  const Tensor g = t.grad();
  if (g.defined()) t.set_grad(mixprec::detail::as_dtype_raw(g, d));
}
}  // namespace detail

// A 2-D size (kernel, stride, padding): `3` means (3, 3), `{3, 5}` means (3, 5).
struct Size2 {
  int64_t h = 0, w = 0;
  Size2(int64_t v) : h(v), w(v) {}  // NOLINT: implicit, as PyTorch accepts an int for a pair
  Size2(int64_t h_, int64_t w_) : h(h_), w(w_) {}
  std::array<int64_t, 2> arr() const { return {h, w}; }
  bool operator==(const Size2&) const = default;
  std::string tuple() const { return "(" + std::to_string(h) + ", " + std::to_string(w) + ")"; }
  // Square sizes print as one int, as PyTorch's pooling layers print an int argument.
  std::string repr() const { return h == w ? std::to_string(h) : tuple(); }
};

class Module {
 public:
  explicit Module(std::string type_name = "Module") : type_name_(std::move(type_name)) {}
  virtual ~Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  // The single-tensor interface Sequential uses. Modules with other inputs add overloads.
  virtual Tensor forward(const Tensor& /*input*/) {
    fail(type_name_, ": this module has no single-tensor forward(); call its own forward overload");
  }
  Tensor operator()(const Tensor& input) { return forward(input); }

  const std::string& type_name() const { return type_name_; }
  // One line (or several) of configuration shown by operator<<, as PyTorch's extra_repr.
  virtual std::string extra_repr() const { return {}; }

  // ---------- registration ----------
  // Binds a member tensor. An undefined slot is an absent parameter (PyTorch's None), skipped.
  Tensor& register_parameter(const std::string& name, Tensor& slot, bool requires_grad = true) {
    check_new_name(name, "register_parameter");
    if (slot.defined() && slot.is_floating_point() && requires_grad) slot.requires_grad_(true);
    params_.push_back({name, &slot, true});
    return slot;
  }
  Tensor& register_parameter(const std::string& name, Tensor&& value, bool requires_grad = true) {
    check_new_name(name, "register_parameter");
    owned_tensors_.push_back(std::move(value));
    return register_parameter(name, owned_tensors_.back(), requires_grad);
  }
  // Buffers are state that is not trained (running statistics). Non-persistent buffers are not
  // part of state_dict().
  Tensor& register_buffer(const std::string& name, Tensor& slot, bool persistent = true) {
    check_new_name(name, "register_buffer");
    buffers_.push_back({name, &slot, persistent});
    return slot;
  }
  Tensor& register_buffer(const std::string& name, Tensor&& value, bool persistent = true) {
    check_new_name(name, "register_buffer");
    owned_tensors_.push_back(std::move(value));
    return register_buffer(name, owned_tensors_.back(), persistent);
  }
  // Binds a member module pointer; a null slot is an absent child, skipped.
  template <class M>
    requires std::derived_from<M, Module>
  std::shared_ptr<M>& register_module(const std::string& name, std::shared_ptr<M>& slot) {
    check_new_name(name, "register_module");
    MIXPREC_CHECK(static_cast<Module*>(slot.get()) != this, "register_module: module '", name, "' cannot be its own child");
    children_.push_back({name, [&slot]() -> std::shared_ptr<Module> { return slot; }});
    return slot;
  }
  template <class M>
    requires std::derived_from<M, Module>
  std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M>&& module) {
    check_new_name(name, "register_module");
    owned_modules_.push_back(module);
    return std::static_pointer_cast<M>(register_module(name, owned_modules_.back()));
  }

  // ---------- traversal ----------
  std::vector<Tensor> parameters(bool recurse = true) const {
    std::vector<Tensor> out;
    for (auto& [n, t] : named_parameters(recurse)) out.push_back(t);
    return out;
  }
  NamedTensors named_parameters(bool recurse = true) const { return collect(&Module::params_, recurse); }
  std::vector<Tensor> buffers(bool recurse = true) const {
    std::vector<Tensor> out;
    for (auto& [n, t] : named_buffers(recurse)) out.push_back(t);
    return out;
  }
  NamedTensors named_buffers(bool recurse = true) const { return collect(&Module::buffers_, recurse); }

  std::vector<std::pair<std::string, std::shared_ptr<Module>>> named_children() const {
    std::vector<std::pair<std::string, std::shared_ptr<Module>>> out;
    for (const auto& c : children_)
      if (auto m = c.get()) out.emplace_back(c.name, std::move(m));
    return out;
  }
  std::vector<std::shared_ptr<Module>> children() const {
    std::vector<std::shared_ptr<Module>> out;
    for (auto& [n, m] : named_children()) out.push_back(std::move(m));
    return out;
  }
  // This module ("") and every descendant, pre-order. Non-owning: valid while this module lives.
  std::vector<std::pair<std::string, Module*>> named_modules() {
    std::vector<std::pair<std::string, Module*>> out;
    visit("", [&](const std::string& prefix, const Module& m) {
      out.emplace_back(prefix.empty() ? prefix : prefix.substr(0, prefix.size() - 1), const_cast<Module*>(&m));
    });
    return out;
  }
  // fn on every descendant, then on this module (PyTorch's order), e.g. for custom init.
  Module& apply(const std::function<void(Module&)>& fn) {
    for (auto& c : children()) c->apply(fn);
    fn(*this);
    return *this;
  }

  // ---------- modes ----------
  virtual Module& train(bool on = true) {
    training_ = on;
    for (auto& c : children()) c->train(on);
    return *this;
  }
  Module& eval() { return train(false); }
  bool is_training() const { return training_; }

  // ---------- dtype / device ----------
  // Casts floating parameters, their gradients and floating buffers in place (the same Tensor
  // handles, new storage), as model.to(dtype) in PyTorch, which converts buffers too: BatchNorm's
  // running statistics follow the model's dtype. Integer buffers (num_batches_tracked) stay.
  // Create optimizers after converting: they size their state from the parameters' dtypes.
  Module& to(DType dtype) {
    MIXPREC_CHECK(is_floating_point(dtype), type_name_, ".to: only floating-point dtypes are accepted, got ", dtype);
    no_grad guard;
    for_each_unique_tensor([&](const Tensor& t) { detail::retype_in_place(t, dtype); });
    return *this;
  }
  Module& to(Device device) {
    no_grad guard;
    for_each_unique_tensor([&](const Tensor& t) {
      if (t.device() == device) return;
      const Tensor g = t.grad();
      detail::restore_in_place(t, t.to(device));  // Tensor::to throws cleanly without a kernel for the pair
      if (g.defined()) t.set_grad(g.to(device));
    });
    return *this;
  }

  // ---------- gradients and counts ----------
  void zero_grad(bool set_to_none = true) {
    no_grad guard;
    for (const Tensor& p : parameters()) {
      Tensor g = p.grad();
      if (!g.defined()) continue;
      if (set_to_none) p.set_grad(Tensor());
      else g.zero_();
    }
  }
  int64_t num_parameters(bool only_trainable = false) const {
    int64_t n = 0;
    for (const Tensor& p : parameters())
      if (!only_trainable || p.requires_grad()) n += p.numel();
    return n;
  }

  // ---------- state dict ----------
  // Parameters then persistent buffers of each module, pre-order; every name of a tied tensor.
  // Entries are detached handles sharing the module's storage (as PyTorch): clone them to keep a
  // snapshot that later training does not change.
  NamedTensors state_dict() const {
    NamedTensors out;
    visit("", [&](const std::string& prefix, const Module& m) {
      for (const auto* list : {&m.params_, &m.buffers_})
        for (const Slot& s : *list)
          if (s.slot->defined() && s.persistent) out.emplace_back(prefix + s.name, s.slot->detach());
    });
    return out;
  }

  // Copies each entry into the tensor of the same name, converting dtype. Shape mismatches and
  // duplicate or undefined entries always fail; with strict, missing and unexpected keys fail
  // too. Everything is checked before anything is copied, so a failed load changes nothing.
  LoadResult load_state_dict(const NamedTensors& state, bool strict = true) {
    const NamedTensors own = state_dict();
    std::vector<const Tensor*> source(own.size(), nullptr);
    LoadResult r;
    std::vector<std::string> errors;
    std::unordered_set<std::string> given;
    for (const auto& [key, t] : state) {
      if (!given.insert(key).second) {
        errors.push_back("duplicate key \"" + key + "\" in state_dict");
        continue;
      }
      std::size_t i = 0;
      while (i < own.size() && own[i].first != key) ++i;
      if (i == own.size()) {
        r.unexpected_keys.push_back(key);
        continue;
      }
      if (!t.defined()) {
        errors.push_back("entry \"" + key + "\" is an undefined tensor");
        continue;
      }
      if (t.sizes() != own[i].second.sizes()) {
        std::ostringstream os;
        os << "size mismatch for " << key << ": copying a tensor with shape " << shape_str(t.sizes())
           << " from checkpoint, the shape in current model is " << shape_str(own[i].second.sizes());
        errors.push_back(os.str());
        continue;
      }
      source[i] = &t;
    }
    for (std::size_t i = 0; i < own.size(); ++i)
      if (!given.count(own[i].first)) r.missing_keys.push_back(own[i].first);
    if (strict) {
      if (!r.unexpected_keys.empty()) errors.insert(errors.begin(), "unexpected key(s) in state_dict: " + quoted(r.unexpected_keys));
      if (!r.missing_keys.empty()) errors.insert(errors.begin(), "missing key(s) in state_dict: " + quoted(r.missing_keys));
    }
    if (!errors.empty()) {
      std::string msg = "load_state_dict: error(s) in loading state_dict for " + type_name_ + ":";
      for (const auto& e : errors) msg += "\n\t" + e;
      throw Error(msg);
    }
    no_grad guard;
    for (std::size_t i = 0; i < own.size(); ++i) {
      if (!source[i]) continue;
      Tensor dst = own[i].second;
      dst.copy_(*source[i]);
    }
    return r;
  }

  // ---------- printing ----------
  std::string repr() const {
    std::vector<std::string> lines;
    const std::string extra = extra_repr();
    std::size_t extra_lines = 0;
    if (!extra.empty()) {
      std::istringstream is(extra);
      for (std::string l; std::getline(is, l);) lines.push_back(l), ++extra_lines;
    }
    const auto kids = named_children();
    for (const auto& [n, m] : kids) lines.push_back("(" + n + "): " + detail::add_indent(m->repr()));
    std::string s = type_name_ + "(";
    if (!lines.empty()) {
      if (extra_lines == 1 && kids.empty()) {
        s += lines[0];
      } else {
        s += "\n  ";
        for (std::size_t i = 0; i < lines.size(); ++i) s += (i ? "\n  " : "") + lines[i];
        s += "\n";
      }
    }
    return s + ")";
  }

 protected:
  // Derived modules whose forward depends on the mode read this.
  bool training_ = true;

 private:
  struct Slot {
    std::string name;
    Tensor* slot;
    bool persistent;
  };
  struct Child {
    std::string name;
    std::function<std::shared_ptr<Module>()> get;
  };

  void check_new_name(const std::string& name, const char* what) const {
    MIXPREC_CHECK(!name.empty() && name.find('.') == std::string::npos, type_name_, ".", what, ": invalid name \"", name,
                  "\" (names must be non-empty and contain no '.')");
    auto taken = [&](const auto& list) {
      for (const auto& e : list)
        if (e.name == name) return true;
      return false;
    };
    MIXPREC_CHECK(!taken(params_) && !taken(buffers_) && !taken(children_), type_name_, ".", what, ": the name \"", name,
                  "\" is already registered");
  }

  // f(prefix, module) for this module and its descendants, pre-order; prefix ends with '.'.
  template <class F>
  void visit(const std::string& prefix, F&& f, bool recurse = true) const {
    f(prefix, *this);
    if (!recurse) return;
    for (const auto& c : children_)
      if (auto m = c.get()) m->visit(prefix + c.name + ".", f, true);
  }

  // Defined tensors of each module's `list`, each tensor once (tied weights) under its first name.
  NamedTensors collect(std::vector<Slot> Module::*list, bool recurse) const {
    NamedTensors out;
    std::unordered_set<const TensorImpl*> seen;
    visit("", [&](const std::string& prefix, const Module& m) {
      for (const Slot& s : m.*list) {
        const Tensor& t = *s.slot;
        if (!t.defined() || !seen.insert(t.impl()).second) continue;
        out.emplace_back(prefix + s.name, t);
      }
    }, recurse);
    return out;
  }

  template <class F>
  void for_each_unique_tensor(F&& f) {
    std::unordered_set<const TensorImpl*> seen;
    visit("", [&](const std::string&, const Module& m) {
      for (const auto* list : {&m.params_, &m.buffers_})
        for (const Slot& s : *list)
          if (s.slot->defined() && seen.insert(s.slot->impl()).second) f(*s.slot);
    });
  }

  static std::string shape_str(const Shape& s) {
    std::string out = "[";
    for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + "]";
  }
  static std::string quoted(const std::vector<std::string>& keys) {
    std::string out;
    for (std::size_t i = 0; i < keys.size(); ++i) out += (i ? ", \"" : "\"") + keys[i] + "\"";
    return out;
  }

  std::string type_name_;
  std::vector<Slot> params_;
  std::vector<Slot> buffers_;
  std::vector<Child> children_;
  std::deque<Tensor> owned_tensors_;  // deque: registered addresses stay valid as it grows
  std::deque<std::shared_ptr<Module>> owned_modules_;
};

inline std::ostream& operator<<(std::ostream& os, const Module& m) { return os << m.repr(); }
// Chosen over the standard shared_ptr printer (which prints the address) as more specialised.
template <class M>
  requires std::derived_from<M, Module>
std::ostream& operator<<(std::ostream& os, const std::shared_ptr<M>& m) {
  return m ? os << m->repr() : os << "None";
}

}  // namespace mixprec::nn
