#pragma once
// The single place a run-time DType becomes a C++ type. Kernels are template lambdas:
//   dispatch_floating(t.dtype(), "relu", [&]<class T>() { ... });
#include "mixprec/core/error.hpp"
#include "mixprec/dtype/dtype.hpp"

namespace mixprec {

template <class F>
decltype(auto) dispatch_all(DType d, const char* op, F&& f) {
  switch (d) {
    case DType::Float32: return f.template operator()<float>();
    case DType::Float64: return f.template operator()<double>();
    case DType::Float16: return f.template operator()<half>();
    case DType::BFloat16: return f.template operator()<bfloat16>();
    case DType::Int32: return f.template operator()<int32_t>();
    case DType::Int64: return f.template operator()<int64_t>();
    case DType::UInt8: return f.template operator()<uint8_t>();
    case DType::Bool: return f.template operator()<bool>();
  }
  fail(op, ": unknown dtype");
}

template <class F>
decltype(auto) dispatch_floating(DType d, const char* op, F&& f) {
  switch (d) {
    case DType::Float32: return f.template operator()<float>();
    case DType::Float64: return f.template operator()<double>();
    case DType::Float16: return f.template operator()<half>();
    case DType::BFloat16: return f.template operator()<bfloat16>();
    default: break;
  }
  fail(op, ": expected a floating-point tensor, got ", d);
}

}  // namespace mixprec
