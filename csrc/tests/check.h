// How every C++ test reports: fail() prints a failure and counts it (a test goes on, to show all of them), and
// finish() is main's return value.
#pragma once

#include <cstdio>
#include <string>

namespace pt_test {

inline int failures = 0;

inline void fail(const std::string& what) {
  std::fprintf(stderr, "FAILED %s\n", what.c_str());
  ++failures;
}

// 1 after any failure (their count on stderr), else 0 and "<name>: ok".
inline int finish(const char* name) {
  if (failures) {
    std::fprintf(stderr, "%d failures\n", failures);
    return 1;
  }
  std::printf("%s: ok\n", name);
  return 0;
}

}  // namespace pt_test
