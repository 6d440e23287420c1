// libFuzzer entry point (clang, -DVIB_FUZZ=ON): vibd's connection manager.
#include "cm_input.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  vib::test::run_cm_input(data, size);
  return 0;
}
