// One fuzz input for vibd's control path: a run of guest requests against
// one context on the software HCA. Shared by the libFuzzer target and the
// deterministic replay test that runs in every build.
#pragma once

#include <cstddef>
#include <cstdint>

namespace vib::test {

// Executes the requests in `data` (256 bytes each, the tail zero-padded).
// Handles the guest got back can be replayed: a request whose handle field is
// below 16 uses the n-th handle returned so far. Aborts on any broken
// invariant, so a fuzzer reports it.
void run_control_input(const std::uint8_t* data, std::size_t size);

}  // namespace vib::test
