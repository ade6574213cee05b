#pragma once
// Command-line flags of the example programs, parsed by CLI11 (Debian: libcli11-dev) so that
// --help gives every flag with what it does, its allowed values and its default, and a bad
// value is refused by name. Only the examples use CLI11: the library never includes this file.
// And their main(): a mixprec::Error ends the program with its message and exit status 1.
#if defined(__has_include)
#if !__has_include(<CLI/CLI.hpp>)
#error "the mixprec examples parse their flags with CLI11: install it (Debian: apt-get install libcli11-dev)"
#endif
#endif
#include <CLI/CLI.hpp>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>

#include <mixprec/core/error.hpp>

namespace examples {

// Parses argv into `app`'s options. Returns the exit status when the program should stop at
// once: 0 after --help (printed), CLI11's non-zero status after a bad flag (its message and a
// pointer to --help on stderr); nullopt when the program should go on.
inline std::optional<int> parse_flags(CLI::App& app, int argc, char** argv) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return std::nullopt;
}

// The short form for programs that list their flags as name -> default (the seed patterns,
// benchmarks/peers): each flag is a CLI11 option showing its default; `switches` take no value.
class Cli {
 public:
  Cli(int argc, char** argv, std::map<std::string, std::string> defaults, std::set<std::string> switches = {})
      : values_(std::move(defaults)), app_(std::make_unique<CLI::App>()) {
    for (auto& [k, v] : values_) {
      CLI::Option* o = app_->add_option("--" + k, v);
      if (!v.empty()) o->default_str(v);
    }
    for (const auto& s : switches) app_->add_flag("--" + s, switched_[s], "switch");
    try {
      app_->parse(argc, argv);
    } catch (const CLI::CallForHelp&) {
      help_ = true;
    } catch (const CLI::ParseError& e) {
      mixprec::fail(e.what(), " (see --help)");
    }
    for (const auto& [s, set] : switched_)
      if (set) values_[s] = "1";
  }
  bool help() const { return help_; }
  void usage(std::ostream& os, const std::string& prog) const {
    app_->name(prog);
    os << app_->help();
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
  std::map<std::string, std::string> values_;  // the options write here: its nodes never move
  std::map<std::string, bool> switched_;
  std::unique_ptr<CLI::App> app_;
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
