// libFuzzer entry point (clang, -DVIB_FUZZ=ON): xenstore-value parsers.
#include "xenstore_values_input.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  vib::test::run_xenstore_values_input(data, size);
  return 0;
}
