// A flood run by the attacker on a thread of its own, shared by the hostile
// suite's fairness cases and vib-bench's fairness figure.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <thread>

namespace vib::test {

// Runs `body` until destroyed; the body counts in `done` what vibd served it
// and returns once `stop` is set.
class Attack {
 public:
  explicit Attack(std::function<void(const std::atomic<bool>& stop, std::atomic<std::uint64_t>& done)> body)
      : thread_([this, body = std::move(body)] { body(stop_, done_); }) {}
  ~Attack() {
    stop_ = true;
    thread_.join();
  }
  Attack(const Attack&) = delete;
  Attack& operator=(const Attack&) = delete;
  std::uint64_t done() const { return done_.load(); }

 private:
  std::atomic<bool> stop_{false};
  std::atomic<std::uint64_t> done_{0};
  std::thread thread_;  // last: runs on everything above
};

}  // namespace vib::test
