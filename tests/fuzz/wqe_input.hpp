// One fuzz input for vibd's fast-path decoders: what a guest writes into its
// shared send, receive and SRQ rings and their doorbell slots, against one
// context on the software HCA with an RC QP (own receive queue), a UD QP on
// an SRQ, a CQ and a registered MR. Shared by the libFuzzer target and the
// replay test that runs in every build.
#pragma once

#include <cstddef>
#include <cstdint>

namespace vib::test {

// `data` is a run of steps. Each step: a byte naming the queue (send/receive
// of the RC QP, send of the UD QP, the SRQ) and what to do with its producer,
// a byte counting the entries, then each entry's bytes as they land in the
// ring (its stride's worth). vibd then serves the queues. Aborts on any
// broken invariant (a CQ written beyond what the guest has room for, a
// consumer that passes the producer, a quota exceeded). Returns how many
// successful completions the guest polled.
std::size_t run_wqe_input(const std::uint8_t* data, std::size_t size);

}  // namespace vib::test
