// The fuzz target's body on deterministic pseudo-random inputs, in every
// build: malformed requests never crash vibd's control path or break quotas.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "control_input.hpp"
#include "vib/vibif.h"

TEST(ControlFuzzReplay, RandomRequestStreamsAreHandled) {
  std::mt19937_64 rng(20261123);
  for (int round = 0; round < 20000; ++round) {
    std::vector<std::uint8_t> input(sizeof(vibif_request) * (1 + rng() % 12));
    for (auto& b : input) b = static_cast<std::uint8_t>(rng());
    // Steer most requests to real operations so the handlers are exercised.
    for (std::size_t off = 0; off + sizeof(vibif_request) <= input.size(); off += sizeof(vibif_request)) {
      auto* req = reinterpret_cast<vibif_request*>(input.data() + off);
      if (rng() % 4) req->hdr.op = static_cast<std::uint16_t>(1 + rng() % (VIBIF_OP_MAX + 1));
      if (rng() % 2) req->u.handle.handle = static_cast<vibif_handle_t>(rng() % 16);
    }
    vib::test::run_control_input(input.data(), input.size());
  }
  SUCCEED();
}
