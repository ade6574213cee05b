#pragma once
// Datasets and the DataLoader: IDX (MNIST, Fashion-MNIST), in-memory and text datasets; see core.hpp.
#include "mixprec/core.hpp"
#include "mixprec/data/idx.hpp"
#include "mixprec/data/dataset.hpp"
#include "mixprec/data/text.hpp"
