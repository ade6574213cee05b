#pragma once
// Minimal --flag value / --flag=value parsing for the examples; unknown flags are errors. And
// their main(): a mixprec::Error ends the program with its message and exit status 1.
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <set>
#include <string>

#include <mixprec/core/error.hpp>

namespace examples {

class Cli {
 public:
  Cli(int argc, char** argv, std::map<std::string, std::string> defaults, std::set<std::string> switches = {})
      : values_(std::move(defaults)), switches_(std::move(switches)) {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      if (a == "--help" || a == "-h") {
        help_ = true;
        continue;
      }
      MIXPREC_CHECK(a.rfind("--", 0) == 0, "unexpected argument '", a, "' (flags look like --name value)");
      a = a.substr(2);
      std::string v;
      if (auto eq = a.find('='); eq != std::string::npos) {
        v = a.substr(eq + 1);
        a = a.substr(0, eq);
      } else if (switches_.count(a)) {
        v = "1";
      } else {
        MIXPREC_CHECK(i + 1 < argc, "flag --", a, " needs a value");
        v = argv[++i];
      }
      MIXPREC_CHECK(values_.count(a) || switches_.count(a), "unknown flag --", a, " (see --help)");
      values_[a] = v;
    }
  }
  bool help() const { return help_; }
  void usage(std::ostream& os, const std::string& prog) const {
    os << "usage: " << prog << " [flags]\n";
    for (const auto& [k, v] : values_) os << "  --" << k << " (default: " << (v.empty() ? "none" : v) << ")\n";
    for (const auto& s : switches_) os << "  --" << s << " (switch)\n";
  }
  std::string str(const std::string& k) const { return values_.count(k) ? values_.at(k) : ""; }
  bool flag(const std::string& k) const { return values_.count(k) && values_.at(k) == "1"; }
  int64_t i64(const std::string& k) const {
    const std::string s = str(k);
    char* end = nullptr;
    const long long v = std::strtoll(s.c_str(), &end, 10);
    MIXPREC_CHECK(!s.empty() && *end == 0, "flag --", k, " expects an integer, got '", s, "'");
    return v;
  }
  double f64(const std::string& k) const {
    const std::string s = str(k);
    char* end = nullptr;
    const double v = std::strtod(s.c_str(), &end);
    MIXPREC_CHECK(!s.empty() && *end == 0, "flag --", k, " expects a number, got '", s, "'");
    return v;
  }

 private:
  std::map<std::string, std::string> values_;
  std::set<std::string> switches_;
  bool help_ = false;
};

// main() of the example programs: returns run(argc, argv), or after a mixprec::Error prints it
// to stderr, calls `on_error(1)` if given (Distributed::abort_job: end every rank) and returns 1.
inline int run_main(int (*run)(int, char**), int argc, char** argv, void (*on_error)(int) = nullptr) {
  try {
    return run(argc, argv);
  } catch (const mixprec::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    if (on_error) on_error(1);
    return 1;
  }
}

}  // namespace examples
