#pragma once
#include "mixprec/core/config.hpp"

#include <initializer_list>
#include <ostream>
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
// One argument of an error message, type-erased: every MIXPREC_CHECK builds its message through
// one non-template function, so a call site costs an array of (pointer, printer) pairs and each
// argument *type* one small printer -- not an ostringstream instantiated and optimised for every
// combination of argument types (a hundred per program: issue 19, compile time).
template <class T>
void print_message_arg(std::ostream& os, const void* p) {
  const T& v = *static_cast<const T*>(p);
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
}

struct MessageArg {
  const void* value;
  void (*print)(std::ostream&, const void*);
  template <class T>
  MessageArg(const T& v) : value(&v), print(&print_message_arg<T>) {}  // NOLINT: implicit by design
  MessageArg(const char* s) : value(s), print(&print_c_string) {}    // string literals of any length
  static void print_c_string(std::ostream& os, const void* p) { os << static_cast<const char*>(p); }
};

MIXPREC_OUTLINE std::string format_message(std::initializer_list<MessageArg> args);
[[noreturn]] MIXPREC_OUTLINE void throw_error(std::initializer_list<MessageArg> args);

#if MIXPREC_HEADER_DEFINITIONS
MIXPREC_OUTLINE std::string format_message(std::initializer_list<MessageArg> args) {
  std::ostringstream os;
  for (const MessageArg& a : args) a.print(os, a.value);
  return os.str();
}
MIXPREC_OUTLINE void throw_error(std::initializer_list<MessageArg> args) { throw Error(format_message(args)); }
#endif

// Streams each value as fail() does (ranges as [a, b, c]).
template <class... Args>
void stream_all(std::ostringstream& os, const Args&... args) {
  (print_message_arg<Args>(os, &args), ...);
}
}  // namespace detail

template <class... Args>
[[noreturn]] void fail(const Args&... args) {
  detail::throw_error({detail::MessageArg(args)...});
}

}  // namespace mixprec

// MIXPREC_CHECK(cond, "op: message ", value, ...) throws mixprec::Error with the streamed message.
#define MIXPREC_CHECK(cond, ...)                   \
  do {                                             \
    if (!(cond)) [[unlikely]] ::mixprec::fail(__VA_ARGS__); \
  } while (0)
