#pragma once
// ResNets: torchvision's ImageNet models (resnet18/34/50/101/152; BasicBlock and Bottleneck
// v1.5, stride on the 3x3 conv) and He et al.'s CIFAR models (resnet20/32/44/56/110: 3 stages
// of n BasicBlocks, 16/32/64 channels, conv3x3 stem, no max-pool). Shortcuts that change shape
// use a 1x1 conv + BN projection (option B) in both families. Parameter names match
// torchvision's ("layer1.0.conv1.weight", "layer2.0.downsample.0.weight", "fc.bias").
#include <string>
#include <vector>

#include "mixprec/nn/activation.hpp"
#include "mixprec/nn/container.hpp"
#include "mixprec/nn/conv.hpp"
#include "mixprec/nn/linear.hpp"
#include "mixprec/nn/norm.hpp"
#include "mixprec/nn/pooling.hpp"

namespace mixprec::nn::models {

class BasicBlock : public Module {
 public:
  static constexpr int64_t expansion = 1;
  BasicBlock(int64_t inplanes, int64_t planes, int64_t stride = 1, std::shared_ptr<Module> downsample = nullptr,
             Generator& gen = default_generator())
      : Module("BasicBlock"), downsample(std::move(downsample)) {
    conv1 = std::make_shared<Conv2d>(inplanes, planes, 3, stride, 1, 1, 1, false, gen);
    bn1 = std::make_shared<BatchNorm2d>(planes);
    relu = std::make_shared<ReLU>();
    conv2 = std::make_shared<Conv2d>(planes, planes, 3, 1, 1, 1, 1, false, gen);
    bn2 = std::make_shared<BatchNorm2d>(planes);
    register_module("conv1", conv1);
    register_module("bn1", bn1);
    register_module("relu", relu);
    register_module("conv2", conv2);
    register_module("bn2", bn2);
    register_module("downsample", this->downsample);
  }
  Tensor forward(const Tensor& x) override {
    Tensor out = bn1->forward_relu(conv1->forward(x));
    out = bn2->forward(conv2->forward(out));
    return relu->forward(mixprec::add(out, downsample ? downsample->forward(x) : x));
  }
  // The BN whose gamma zero_init_residual sets to 0, so the block starts as the identity.
  const std::shared_ptr<BatchNorm2d>& last_bn() const { return bn2; }

  std::shared_ptr<Conv2d> conv1, conv2;
  std::shared_ptr<BatchNorm2d> bn1, bn2;
  std::shared_ptr<ReLU> relu;
  std::shared_ptr<Module> downsample;
};

class Bottleneck : public Module {
 public:
  static constexpr int64_t expansion = 4;
  Bottleneck(int64_t inplanes, int64_t planes, int64_t stride = 1, std::shared_ptr<Module> downsample = nullptr,
             Generator& gen = default_generator())
      : Module("Bottleneck"), downsample(std::move(downsample)) {
    conv1 = std::make_shared<Conv2d>(inplanes, planes, 1, 1, 0, 1, 1, false, gen);
    bn1 = std::make_shared<BatchNorm2d>(planes);
    conv2 = std::make_shared<Conv2d>(planes, planes, 3, stride, 1, 1, 1, false, gen);
    bn2 = std::make_shared<BatchNorm2d>(planes);
    conv3 = std::make_shared<Conv2d>(planes, planes * expansion, 1, 1, 0, 1, 1, false, gen);
    bn3 = std::make_shared<BatchNorm2d>(planes * expansion);
    relu = std::make_shared<ReLU>();
    register_module("conv1", conv1);
    register_module("bn1", bn1);
    register_module("conv2", conv2);
    register_module("bn2", bn2);
    register_module("conv3", conv3);
    register_module("bn3", bn3);
    register_module("relu", relu);
    register_module("downsample", this->downsample);
  }
  Tensor forward(const Tensor& x) override {
    Tensor out = bn1->forward_relu(conv1->forward(x));
    out = bn2->forward_relu(conv2->forward(out));
    out = bn3->forward(conv3->forward(out));
    return relu->forward(mixprec::add(out, downsample ? downsample->forward(x) : x));
  }
  const std::shared_ptr<BatchNorm2d>& last_bn() const { return bn3; }

  std::shared_ptr<Conv2d> conv1, conv2, conv3;
  std::shared_ptr<BatchNorm2d> bn1, bn2, bn3;
  std::shared_ptr<ReLU> relu;
  std::shared_ptr<Module> downsample;
};

enum class BlockKind { Basic, Bottleneck };
// ImageNet: conv7x7/2 + max-pool stem, stage widths 64, 128, 256, 512.
// Cifar: conv3x3/1 stem, stage widths 16, 32, 64.
enum class ResNetStem { ImageNet, Cifar };

class ResNet : public Module {
 public:
  // layers[i] blocks in stage i (stage i > 0 starts with stride 2). Convs get torchvision's
  // kaiming_normal(fan_out, relu); zero_init_residual zeroes each block's last BN gamma.
  ResNet(BlockKind block, const std::vector<int64_t>& layers, int64_t num_classes, int64_t in_channels = 3,
         ResNetStem stem = ResNetStem::ImageNet, bool zero_init_residual = false, Generator& gen = default_generator())
      : Module("ResNet"), block(block), stem(stem) {
    MIXPREC_CHECK(!layers.empty(), "ResNet: at least one stage is needed");
    for (int64_t n : layers) MIXPREC_CHECK(n > 0, "ResNet: every stage needs at least one block, got ", layers);
    MIXPREC_CHECK(num_classes > 0 && in_channels > 0, "ResNet: num_classes and in_channels must be positive, got ", num_classes, " and ",
                  in_channels);
    const int64_t base = stem == ResNetStem::ImageNet ? 64 : 16;
    if (stem == ResNetStem::ImageNet) conv1 = std::make_shared<Conv2d>(in_channels, base, 7, 2, 3, 1, 1, false, gen);
    else conv1 = std::make_shared<Conv2d>(in_channels, base, 3, 1, 1, 1, 1, false, gen);
    bn1 = std::make_shared<BatchNorm2d>(base);
    relu = std::make_shared<ReLU>();
    if (stem == ResNetStem::ImageNet) maxpool = std::make_shared<MaxPool2d>(3, 2, 1);
    register_module("conv1", conv1);
    register_module("bn1", bn1);
    register_module("relu", relu);
    register_module("maxpool", maxpool);

    const int64_t expansion = block == BlockKind::Basic ? BasicBlock::expansion : Bottleneck::expansion;
    int64_t inplanes = base;
    for (std::size_t i = 0; i < layers.size(); ++i) {
      const int64_t planes = base << i, stride = i == 0 ? 1 : 2;
      auto stage = std::make_shared<Sequential>();
      for (int64_t b = 0; b < layers[i]; ++b) {
        const int64_t s = b == 0 ? stride : 1;
        std::shared_ptr<Module> down;
        if (s != 1 || inplanes != planes * expansion)
          down = std::make_shared<Sequential>(std::initializer_list<std::shared_ptr<Module>>{
              std::make_shared<Conv2d>(inplanes, planes * expansion, 1, s, 0, 1, 1, false, gen),
              std::make_shared<BatchNorm2d>(planes * expansion)});
        if (block == BlockKind::Basic) stage->push_back(std::make_shared<BasicBlock>(inplanes, planes, s, down, gen));
        else stage->push_back(std::make_shared<Bottleneck>(inplanes, planes, s, down, gen));
        inplanes = planes * expansion;
      }
      stages.push_back(register_module("layer" + std::to_string(i + 1), std::move(stage)));
    }
    avgpool = std::make_shared<AdaptiveAvgPool2d>(1);
    fc = std::make_shared<Linear>(inplanes, num_classes, true, gen);
    register_module("avgpool", avgpool);
    register_module("fc", fc);

    for (auto& [name, m] : named_modules()) {
      if (auto* c = dynamic_cast<Conv2d*>(m)) init::kaiming_normal_(c->weight, 0.0, "fan_out", "relu", gen);
      if (!zero_init_residual) continue;
      if (auto* bb = dynamic_cast<BasicBlock*>(m)) init::zeros_(bb->last_bn()->weight);
      if (auto* bt = dynamic_cast<Bottleneck*>(m)) init::zeros_(bt->last_bn()->weight);
    }
  }

  Tensor forward(const Tensor& x) override {
    Tensor y = bn1->forward_relu(conv1->forward(x));
    if (maxpool) y = maxpool->forward(y);
    for (const auto& s : stages) y = s->forward(y);
    return fc->forward(avgpool->forward(y).flatten(1));
  }

  BlockKind block;
  ResNetStem stem;
  std::shared_ptr<Conv2d> conv1;
  std::shared_ptr<BatchNorm2d> bn1;
  std::shared_ptr<ReLU> relu;
  std::shared_ptr<MaxPool2d> maxpool;  // null for the CIFAR stem
  std::vector<std::shared_ptr<Sequential>> stages;  // layer1, layer2, ...
  std::shared_ptr<AdaptiveAvgPool2d> avgpool;
  std::shared_ptr<Linear> fc;
};

// ImageNet family (defaults: 1000 classes, RGB).
inline std::shared_ptr<ResNet> resnet18(int64_t num_classes = 1000, int64_t in_channels = 3, bool zero_init_residual = false,
                                        Generator& gen = default_generator()) {
  return std::make_shared<ResNet>(BlockKind::Basic, std::vector<int64_t>{2, 2, 2, 2}, num_classes, in_channels, ResNetStem::ImageNet,
                                  zero_init_residual, gen);
}
inline std::shared_ptr<ResNet> resnet34(int64_t num_classes = 1000, int64_t in_channels = 3, bool zero_init_residual = false,
                                        Generator& gen = default_generator()) {
  return std::make_shared<ResNet>(BlockKind::Basic, std::vector<int64_t>{3, 4, 6, 3}, num_classes, in_channels, ResNetStem::ImageNet,
                                  zero_init_residual, gen);
}
inline std::shared_ptr<ResNet> resnet50(int64_t num_classes = 1000, int64_t in_channels = 3, bool zero_init_residual = false,
                                        Generator& gen = default_generator()) {
  return std::make_shared<ResNet>(BlockKind::Bottleneck, std::vector<int64_t>{3, 4, 6, 3}, num_classes, in_channels,
                                  ResNetStem::ImageNet, zero_init_residual, gen);
}
inline std::shared_ptr<ResNet> resnet101(int64_t num_classes = 1000, int64_t in_channels = 3, bool zero_init_residual = false,
                                         Generator& gen = default_generator()) {
  return std::make_shared<ResNet>(BlockKind::Bottleneck, std::vector<int64_t>{3, 4, 23, 3}, num_classes, in_channels,
                                  ResNetStem::ImageNet, zero_init_residual, gen);
}
inline std::shared_ptr<ResNet> resnet152(int64_t num_classes = 1000, int64_t in_channels = 3, bool zero_init_residual = false,
                                         Generator& gen = default_generator()) {
  return std::make_shared<ResNet>(BlockKind::Bottleneck, std::vector<int64_t>{3, 8, 36, 3}, num_classes, in_channels,
                                  ResNetStem::ImageNet, zero_init_residual, gen);
}

// CIFAR family, depth 6n + 2 (defaults: 10 classes, RGB).
inline std::shared_ptr<ResNet> resnet_cifar(int64_t depth, int64_t num_classes = 10, int64_t in_channels = 3,
                                            bool zero_init_residual = false, Generator& gen = default_generator()) {
  MIXPREC_CHECK(depth >= 8 && (depth - 2) % 6 == 0, "resnet_cifar: depth must be 6n + 2 (20, 32, 44, 56, 110, ...), got ", depth);
  const int64_t n = (depth - 2) / 6;
  return std::make_shared<ResNet>(BlockKind::Basic, std::vector<int64_t>{n, n, n}, num_classes, in_channels, ResNetStem::Cifar,
                                  zero_init_residual, gen);
}
inline std::shared_ptr<ResNet> resnet20(int64_t num_classes = 10, int64_t in_channels = 3, bool zero_init_residual = false,
                                        Generator& gen = default_generator()) {
  return resnet_cifar(20, num_classes, in_channels, zero_init_residual, gen);
}
inline std::shared_ptr<ResNet> resnet56(int64_t num_classes = 10, int64_t in_channels = 3, bool zero_init_residual = false,
                                        Generator& gen = default_generator()) {
  return resnet_cifar(56, num_classes, in_channels, zero_init_residual, gen);
}

// By name: resnet18, resnet34, resnet50, resnet101, resnet152 (ImageNet); resnet20, resnet32,
// resnet44, resnet56, resnet110 (CIFAR).
inline std::shared_ptr<ResNet> make_resnet(const std::string& name, int64_t num_classes, int64_t in_channels = 3,
                                           bool zero_init_residual = false, Generator& gen = default_generator()) {
  if (name == "resnet18") return resnet18(num_classes, in_channels, zero_init_residual, gen);
  if (name == "resnet34") return resnet34(num_classes, in_channels, zero_init_residual, gen);
  if (name == "resnet50") return resnet50(num_classes, in_channels, zero_init_residual, gen);
  if (name == "resnet101") return resnet101(num_classes, in_channels, zero_init_residual, gen);
  if (name == "resnet152") return resnet152(num_classes, in_channels, zero_init_residual, gen);
  for (int64_t depth : {20, 32, 44, 56, 110})
    if (name == "resnet" + std::to_string(depth)) return resnet_cifar(depth, num_classes, in_channels, zero_init_residual, gen);
  fail("make_resnet: unknown model '", name,
       "'; known: resnet18, resnet34, resnet50, resnet101, resnet152 (ImageNet), resnet20, resnet32, resnet44, resnet56, resnet110 (CIFAR)");
}

}  // namespace mixprec::nn::models
