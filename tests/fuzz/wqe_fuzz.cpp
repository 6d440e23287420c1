// libFuzzer entry point (clang, -DVIB_FUZZ=ON): the fast path's queue decoders.
#include "wqe_input.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  vib::test::run_wqe_input(data, size);
  return 0;
}
