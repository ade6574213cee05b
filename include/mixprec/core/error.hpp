#pragma once
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace mixprec {

// The one exception type users catch: messages name the op and the shapes/dtypes involved.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
inline void stream_all(std::ostringstream&) {}
template <class T, class... Rest>
void stream_all(std::ostringstream& os, const T& v, const Rest&... rest) {
  if constexpr (requires { v.begin(); v.end(); } && !std::is_convertible_v<const T&, std::string_view>) {
    os << '[';
    bool first = true;
    for (const auto& e : v) {
      if (!first) os << ", ";
      os << e;
      first = false;
    }
    os << ']';
  } else {
    os << v;
  }
  stream_all(os, rest...);
}
}  // namespace detail

template <class... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream os;
  detail::stream_all(os, args...);
  throw Error(os.str());
}

}  // namespace mixprec

// MIXPREC_CHECK(cond, "op: message ", value, ...) throws mixprec::Error with the streamed message.
#define MIXPREC_CHECK(cond, ...)                   \
  do {                                             \
    if (!(cond)) [[unlikely]] ::mixprec::fail(__VA_ARGS__); \
  } while (0)
