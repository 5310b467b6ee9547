// Runs the registered tests whose name starts with argv[1] (all without an argument);
// exit status 1 if any check failed or no test matched, so ctest cannot pass vacuously.
#include <cstring>

#include "check.h"

int main(int argc, char** argv) {
  const char* prefix = argc > 1 ? argv[1] : "";
  int ran = 0;
  for (const auto& test : fastreg_test::registry()) {
    if (test.name.rfind(prefix, 0) != 0) continue;
    const int before = fastreg_test::failures();
    test.body();
    ++ran;
    std::cout << (fastreg_test::failures() == before ? "PASS " : "FAIL ") << test.name << "\n";
  }
  if (ran == 0) {
    std::cerr << "no test name starts with '" << prefix << "'\n";
    return 1;
  }
  std::cout << ran << " tests, " << fastreg_test::failures() << " failed checks\n";
  return fastreg_test::failures() == 0 ? 0 : 1;
}
