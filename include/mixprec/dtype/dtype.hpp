#pragma once
// DType is a run-time value (autocast picks dtypes while the program runs); DTypeOf<T> and
// CType<D> link it to C++ types for the templated kernels.
#include <array>
#include <cstddef>
#include <cstdint>
#include <ostream>
#include <string_view>
#include <type_traits>

#include "mixprec/dtype/bfloat16.hpp"
#include "mixprec/dtype/float8.hpp"
#include "mixprec/dtype/half.hpp"

namespace mixprec {

// The fp8 types come last so the older values keep their numbers (traces, files, tests index by them).
enum class DType : uint8_t { Float32, Float64, Float16, BFloat16, Int32, Int64, UInt8, Bool, Float8E4M3FN, Float8E5M2 };
inline constexpr int kNumDTypes = 10;

// Short aliases, as torch.float16 etc.
inline constexpr DType kFloat32 = DType::Float32;
inline constexpr DType kFloat64 = DType::Float64;
inline constexpr DType kFloat16 = DType::Float16;
inline constexpr DType kBFloat16 = DType::BFloat16;
inline constexpr DType kInt32 = DType::Int32;
inline constexpr DType kInt64 = DType::Int64;
inline constexpr DType kUInt8 = DType::UInt8;
inline constexpr DType kBool = DType::Bool;
inline constexpr DType kFloat8E4M3FN = DType::Float8E4M3FN;
inline constexpr DType kFloat8E5M2 = DType::Float8E5M2;

namespace detail {
struct DTypeInfo {
  std::string_view name;
  std::size_t size;
  bool floating;
  int rank;  // position in the promotion lattice below
};
inline constexpr std::array<DTypeInfo, kNumDTypes> kDTypeInfo{{
    {"float32", 4, true, 5},
    {"float64", 8, true, 6},
    {"float16", 2, true, 4},
    {"bfloat16", 2, true, 4},
    {"int32", 4, false, 2},
    {"int64", 8, false, 3},
    {"uint8", 1, false, 1},
    {"bool", 1, false, 0},
    {"float8_e4m3fn", 1, true, 4},
    {"float8_e5m2", 1, true, 4},
}};
constexpr const DTypeInfo& info(DType d) { return kDTypeInfo[static_cast<int>(d)]; }
}  // namespace detail

constexpr std::string_view name(DType d) { return detail::info(d).name; }
constexpr std::size_t itemsize(DType d) { return detail::info(d).size; }
constexpr bool is_floating_point(DType d) { return detail::info(d).floating; }
constexpr bool is_low_precision(DType d) { return d == DType::Float16 || d == DType::BFloat16; }  // the 16-bit compute types
// Storage-only 8-bit floats: casts, copies, fills and printing take them; arithmetic ops refuse
// them at dispatch (dtype/dispatch.hpp), as PyTorch's do; the fp8 autocast (amp/fp8.hpp) reads them.
constexpr bool is_float8(DType d) { return d == DType::Float8E4M3FN || d == DType::Float8E5M2; }

// PyTorch's lattice: bool < uint8 < int32 < int64 < {float16, bfloat16} < float32 < float64.
// float16 with bfloat16 has no exact common type; like PyTorch we promote to float32.
//
// PyTorch refuses to promote float8 with anything else; promote_types is total here (constexpr,
// and tables iterate every pair), so a float8 mixed with another dtype goes to float32 (or
// float64) -- the same way out as float16 with bfloat16 -- and an op on float8 alone is refused
// at dispatch.
constexpr DType promote_types(DType a, DType b) {
  if (a == b) return a;
  if (is_float8(a) || is_float8(b)) return a == DType::Float64 || b == DType::Float64 ? DType::Float64 : DType::Float32;
  if (is_low_precision(a) && is_low_precision(b)) return DType::Float32;
  if ((a == DType::UInt8 && b == DType::Int32) || (a == DType::Int32 && b == DType::UInt8)) return DType::Int32;
  return detail::info(a).rank >= detail::info(b).rank ? a : b;
}

inline std::ostream& operator<<(std::ostream& os, DType d) { return os << name(d); }

template <class T> struct DTypeOf;
template <> struct DTypeOf<float> { static constexpr DType value = DType::Float32; };
template <> struct DTypeOf<double> { static constexpr DType value = DType::Float64; };
template <> struct DTypeOf<half> { static constexpr DType value = DType::Float16; };
template <> struct DTypeOf<bfloat16> { static constexpr DType value = DType::BFloat16; };
template <> struct DTypeOf<int32_t> { static constexpr DType value = DType::Int32; };
template <> struct DTypeOf<int64_t> { static constexpr DType value = DType::Int64; };
template <> struct DTypeOf<uint8_t> { static constexpr DType value = DType::UInt8; };
template <> struct DTypeOf<bool> { static constexpr DType value = DType::Bool; };
template <> struct DTypeOf<float8_e4m3fn> { static constexpr DType value = DType::Float8E4M3FN; };
template <> struct DTypeOf<float8_e5m2> { static constexpr DType value = DType::Float8E5M2; };
template <class T> inline constexpr DType dtype_of = DTypeOf<T>::value;

// Compute type: 16-bit floats load into float and round once on store; double stays double.
template <class T> struct AccType { using type = T; };
template <> struct AccType<half> { using type = float; };
template <> struct AccType<bfloat16> { using type = float; };
template <> struct AccType<float8_e4m3fn> { using type = float; };
template <> struct AccType<float8_e5m2> { using type = float; };
template <> struct AccType<bool> { using type = int64_t; };
template <> struct AccType<uint8_t> { using type = int64_t; };
template <> struct AccType<int32_t> { using type = int64_t; };
template <class T> using acc_t = typename AccType<T>::type;

template <class T>
inline constexpr bool is_floating_v = std::is_floating_point_v<T> || std::is_same_v<T, half> || std::is_same_v<T, bfloat16> ||
                                      std::is_same_v<T, float8_e4m3fn> || std::is_same_v<T, float8_e5m2>;

}  // namespace mixprec
