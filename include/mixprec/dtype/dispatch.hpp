#pragma once
// The single place a run-time DType becomes a C++ type. Kernels are template lambdas:
//   dispatch_floating(t.dtype(), "relu", [&]<class T>() { ... });
#include "mixprec/core/error.hpp"
#include "mixprec/dtype/dtype.hpp"

namespace mixprec {

namespace detail {
// float8 tensors hold values but are not computed in (PyTorch's rule too): every arithmetic
// kernel reaches this instead of instantiating itself for an 8-bit type.
[[noreturn]] inline void fail_float8(const char* op, DType d) {
  fail(op, ": ", d, " tensors support only casts (to), copies, fills, item and printing (as PyTorch's float8 "
       "types); cast to float32, float16 or bfloat16 first, or compute through amp::fp8_autocast");
}
}  // namespace detail

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
    case DType::Float8E4M3FN:
    case DType::Float8E5M2: detail::fail_float8(op, d);
  }
  fail(op, ": unknown dtype");
}

// dispatch_all plus the float8 types: only for kernels that move or convert values (copy_, fill_,
// item, printing), never for arithmetic.
template <class F>
decltype(auto) dispatch_all_with_fp8(DType d, const char* op, F&& f) {
  switch (d) {
    case DType::Float8E4M3FN: return f.template operator()<float8_e4m3fn>();
    case DType::Float8E5M2: return f.template operator()<float8_e5m2>();
    default: return dispatch_all(d, op, std::forward<F>(f));
  }
}

template <class F>
decltype(auto) dispatch_floating(DType d, const char* op, F&& f) {
  switch (d) {
    case DType::Float32: return f.template operator()<float>();
    case DType::Float64: return f.template operator()<double>();
    case DType::Float16: return f.template operator()<half>();
    case DType::BFloat16: return f.template operator()<bfloat16>();
    case DType::Float8E4M3FN:
    case DType::Float8E5M2: detail::fail_float8(op, d);
    default: break;
  }
  fail(op, ": expected a floating-point tensor, got ", d);
}

}  // namespace mixprec
