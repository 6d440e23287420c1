// One fuzz input for the parsers of xenstore values vibd and the toolstack
// read: a device's back-end nodes, the numbers of a guest's context nodes,
// RDMA-CM address lists, vibd's published status and `vib=` specs. Shared by
// the libFuzzer target and the replay test that runs in every build.
#pragma once

#include <cstddef>
#include <cstdint>

namespace vib::test {

// `data` is node values separated by NUL bytes, given in a fixed order to
// the back-end keys (hca, port, pkeys, gid-indices, the six max-*,
// max-pinned-pages, ip, a vif's ip); the values are also parsed as numbers,
// as XenbusStates, as status text and as a vib= spec. Aborts on any broken
// invariant (a value out of its bound, a parse that does not round-trip), so
// a fuzzer reports it.
void run_xenstore_values_input(const std::uint8_t* data, std::size_t size);

}  // namespace vib::test
