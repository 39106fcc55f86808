// Every invalid input raises flashattn::Error naming the argument, what was expected and what
// came, so a user (or the Python binding, which converts it) can see the mistake at once.
#pragma once

#include <stdexcept>
#include <string>

namespace flashattn {

class Error : public std::invalid_argument {
 public:
  Error(std::string argument, std::string expected, std::string got)
      : std::invalid_argument(format(argument, expected, got)),
        argument_(std::move(argument)),
        expected_(std::move(expected)),
        got_(std::move(got)) {}

  const std::string& argument() const { return argument_; }
  const std::string& expected() const { return expected_; }
  const std::string& got() const { return got_; }

 private:
  static std::string format(const std::string& arg, const std::string& expected,
                            const std::string& got) {
    return "flashattn: invalid argument '" + arg + "': expected " + expected + ", got " + got;
  }
  std::string argument_, expected_, got_;
};

// A valid request that this build or this machine cannot serve (no CUDA, an old GPU, ...).
class Unsupported : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace flashattn
