// One fuzz input for vibd's connection manager (the CM_* requests,
// cm_broker.cpp): three contexts of one broker, two on the device with the
// address 192.0.2.1 and one on 192.0.2.2, taking turns. Shared by the
// libFuzzer target and the replay test that runs in every build.
#pragma once

#include <cstddef>
#include <cstdint>

namespace vib::test {

// `data` is a run of steps. Each step: a byte naming the context (low two
// bits; 0xe0 set: that context closes, as a crashing process's would, and
// a new one takes its place), a byte choosing the CM op, a length byte and
// that many bytes of the request body. Ids below 16 in a body name the
// context's own ids in creation order; an address whose family has bit 15
// set names one of a few steered addresses (the two devices', loopback,
// the wildcard, nobody's). Aborts on a broken invariant: a response that
// does not echo its request, a status or event the protocol does not
// define, an event with more private data than it may carry, more events
// queued than the bound. Returns the rdma_cm events the contexts fetched,
// as a bit mask (bit n: event n).
std::uint32_t run_cm_input(const std::uint8_t* data, std::size_t size);

}  // namespace vib::test
