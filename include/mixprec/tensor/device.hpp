#pragma once
#include <ostream>
#include <string_view>

namespace mixprec {

// A device is a run-time value. One CUDA device per process for now (index 0).
enum class Device : uint8_t { CPU, CUDA };
inline constexpr int kNumDevices = 2;

constexpr std::string_view name(Device d) { return d == Device::CPU ? "cpu" : "cuda"; }
inline std::ostream& operator<<(std::ostream& os, Device d) { return os << name(d); }

}  // namespace mixprec
