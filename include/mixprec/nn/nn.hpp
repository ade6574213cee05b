#pragma once
// mixprec::nn: modules, layers, initialisers and reference models.
//
// module.hpp      Module (parameters, buffers, state_dict, to(dtype), printing), Size2
// init.hpp        nn::init: kaiming/xavier/normal/uniform/constant initialisers
// linear.hpp      Identity, Linear, Flatten, Embedding
// conv.hpp        Conv2d
// norm.hpp        BatchNorm2d, LayerNorm, GroupNorm
// activation.hpp  ReLU, GELU, SiLU, Tanh, Sigmoid, Dropout
// pooling.hpp     MaxPool2d, AvgPool2d, AdaptiveAvgPool2d
// container.hpp   Sequential, ModuleList
// attention.hpp   MultiheadAttention, TransformerBlock
// models/         resnet.hpp (torchvision and CIFAR ResNets, make_resnet), gpt.hpp (GPT, GPTConfig)
#include "mixprec/nn/module.hpp"
#include "mixprec/nn/init.hpp"
#include "mixprec/nn/linear.hpp"
#include "mixprec/nn/conv.hpp"
#include "mixprec/nn/norm.hpp"
#include "mixprec/nn/activation.hpp"
#include "mixprec/nn/pooling.hpp"
#include "mixprec/nn/container.hpp"
#include "mixprec/nn/attention.hpp"
#include "mixprec/nn/models/resnet.hpp"
#include "mixprec/nn/models/gpt.hpp"
