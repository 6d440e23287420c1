// A malicious guest's request-ring flood (issue 11), shared by the hostile
// suite and vib-bench's fairness figure.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <thread>

#include "raw_guest.hpp"

namespace vib::test {

// Keeps a context's request ring from ever running dry: every slot is
// refilled the moment vibd's response lands in it, before vibd even moves
// rsp_prod, so a back-end that serves "until the ring is empty" never stops.
class RingFlooder {
 public:
  explicit RingFlooder(RawGuest& guest) : guest_(guest), thread_([this] { run(); }) {}
  ~RingFlooder() {
    stop_.store(true);
    thread_.join();
  }
  std::uint64_t responses() const { return responses_.load(); }

 private:
  // A QUERY_DEVICE request with a body of 0xA5: the response (zeroed, then
  // filled) writes the firmware name over it.
  static constexpr std::size_t kMarker = offsetof(vibif_response, u.query_device.fw_ver);
  void fill(vibif_request* slot, std::uint64_t id) {
    vibif_request req;
    std::memset(&req, 0xA5, sizeof(req));
    req.hdr.id = id;
    req.hdr.op = VIBIF_OP_QUERY_DEVICE;
    req.hdr.reserved0 = 0;
    req.hdr.reserved1 = 0;
    std::memcpy(slot, &req, sizeof(req));
  }
  void run() {
    auto& s = guest_.sring();
    const unsigned size = guest_.ring_size();
    RING_IDX prod = 0;
    std::uint64_t id = 1;
    for (; prod < size; ++prod) fill(&s.ring[prod % size].req, id++);
    __atomic_store_n(&s.req_prod, prod, __ATOMIC_RELEASE);
    guest_.kick();
    RING_IDX oldest = 0;
    auto last_kick = std::chrono::steady_clock::now();
    while (!stop_.load(std::memory_order_relaxed)) {
      auto* slot = reinterpret_cast<volatile unsigned char*>(&s.ring[oldest % size]);
      if (slot[kMarker] == 0xA5) {
        // Nothing answered yet: kick now and then (vibd may be asleep).
        if (std::chrono::steady_clock::now() - last_kick > std::chrono::milliseconds(1)) {
          guest_.kick();
          last_kick = std::chrono::steady_clock::now();
        }
        continue;
      }
      responses_.fetch_add(1, std::memory_order_relaxed);
      fill(&s.ring[oldest % size].req, id++);
      ++oldest;
      __atomic_store_n(&s.req_prod, ++prod, __ATOMIC_RELEASE);
    }
  }

  RawGuest& guest_;
  std::atomic<bool> stop_{false};
  std::atomic<std::uint64_t> responses_{0};
  std::thread thread_;  // last: runs on everything above
};

}  // namespace vib::test
