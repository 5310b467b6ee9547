// A tiny test harness, so the C++ tests need nothing beyond the compiler: FASTREG_TEST
// registers a function, FASTREG_CHECK / FASTREG_CHECK_EQ record a failure with file and line and go on.
#pragma once

#include <cstdint>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

namespace fastreg_test {

struct TestCase {
  std::string name;
  std::function<void()> body;
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

inline int& failures() {
  static int count = 0;
  return count;
}

struct Registrar {
  Registrar(const char* name, void (*body)()) { registry().push_back({name, body}); }
};

inline void fail(const char* file, int line, const std::string& what) {
  ++failures();
  std::cerr << file << ":" << line << ": check failed: " << what << "\n";
}

inline std::string hex(uint64_t v) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  do {
    s.insert(s.begin(), digits[v & 0xF]);
    v >>= 4;
  } while (v);
  return "0x" + s;
}

}  // namespace fastreg_test

#define FASTREG_TEST(name)                                                      \
  static void name();                                                           \
  static const fastreg_test::Registrar name##_registrar(#name, &name);          \
  static void name()

#define FASTREG_CHECK(cond)                                                             \
  do {                                                                          \
    if (!(cond)) fastreg_test::fail(__FILE__, __LINE__, #cond);                 \
  } while (0)

// (Not CHECK: c10 headers may define that.) For integers: prints both sides in hex and decimal when they differ.
#define FASTREG_CHECK_EQ(actual, expected)                                                                            \
  do {                                                                                                        \
    const auto a_ = (actual);                                                                                 \
    const auto e_ = (expected);                                                                               \
    if (!(a_ == e_)) {                                                                                        \
      fastreg_test::fail(__FILE__, __LINE__,                                                                  \
                         std::string(#actual " == " #expected ": got ") + std::to_string(a_) + " (" +         \
                             fastreg_test::hex(static_cast<uint64_t>(a_)) + "), expected " + std::to_string(e_) + \
                             " (" + fastreg_test::hex(static_cast<uint64_t>(e_)) + ")");                      \
    }                                                                                                         \
  } while (0)
