#pragma once
// Sequential and ModuleList: children named "0", "1", ... in order.
#include <initializer_list>

#include "mixprec/nn/module.hpp"

namespace mixprec::nn {

// Holds modules in a list. Children are owned; index with [] (or at<T>(i) for the type).
class ModuleList : public Module {
 public:
  ModuleList() : ModuleList("ModuleList") {}
  ModuleList(std::initializer_list<std::shared_ptr<Module>> modules) : ModuleList() {
    for (const auto& m : modules) push_back(m);
  }

  void push_back(std::shared_ptr<Module> m) {
    MIXPREC_CHECK(m != nullptr, type_name(), ".push_back: null module");
    items_.push_back(register_module(std::to_string(items_.size()), std::move(m)));
  }
  std::size_t size() const { return items_.size(); }
  bool empty() const { return items_.empty(); }
  const std::shared_ptr<Module>& operator[](std::size_t i) const {
    MIXPREC_CHECK(i < items_.size(), type_name(), ": index ", i, " out of range for ", items_.size(), " modules");
    return items_[i];
  }
  template <class M>
  std::shared_ptr<M> at(std::size_t i) const {
    auto p = std::dynamic_pointer_cast<M>((*this)[i]);
    MIXPREC_CHECK(p != nullptr, type_name(), ": module ", i, " is a ", items_[i]->type_name(), ", not the type asked for");
    return p;
  }
  auto begin() const { return items_.begin(); }
  auto end() const { return items_.end(); }

 protected:
  explicit ModuleList(std::string type_name) : Module(std::move(type_name)) {}

 private:
  std::vector<std::shared_ptr<Module>> items_;
};

// Applies its modules in order, each through Module::forward(const Tensor&).
class Sequential : public ModuleList {
 public:
  Sequential() : ModuleList("Sequential") {}
  Sequential(std::initializer_list<std::shared_ptr<Module>> modules) : Sequential() {
    for (const auto& m : modules) push_back(m);
  }
  Tensor forward(const Tensor& x) override {
    Tensor y = x;
    for (const auto& m : *this) y = m->forward(y);
    return y;
  }
};

}  // namespace mixprec::nn
