// libFuzzer entry point (clang, -DVIB_FUZZ=ON).
#include "control_input.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  vib::test::run_control_input(data, size);
  return 0;
}
