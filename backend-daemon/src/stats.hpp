// A context's counters, for `xl vib-list -l`: written by the thread that
// serves the context, read by the main thread when it publishes them.
//
// Each counter has one writer, so a bump is a relaxed load and store, not a
// locked read-modify-write: the fast path pays a plain add. Relaxed is
// enough: each number stands alone, and the reader needs only a recent one.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace vib::backend {

class ContextStats {
 public:
  using Counter = std::atomic<std::uint64_t>;

  static void bump(Counter& c, std::uint64_t n = 1) {
    c.store(c.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
  }
  static std::uint64_t get(const Counter& c) { return c.load(std::memory_order_relaxed); }

  void request_served(bool ok) {
    bump(requests);
    if (!ok) bump(request_errors);
    touch();
  }
  void completion_delivered(bool ok) {
    bump(completions);
    if (!ok) bump(completion_errors);
  }
  void touch() {
    last_activity_.store(std::chrono::steady_clock::now().time_since_epoch().count(), std::memory_order_relaxed);
  }
  // Seconds since the Unix epoch of the last request or queue work; 0 for never.
  std::int64_t last_activity_unix() const {
    const auto ticks = last_activity_.load(std::memory_order_relaxed);
    if (ticks == 0) return 0;
    const auto ago = std::chrono::steady_clock::now().time_since_epoch() - std::chrono::steady_clock::duration(ticks);
    return std::chrono::duration_cast<std::chrono::seconds>((std::chrono::system_clock::now() - ago).time_since_epoch())
        .count();
  }

  // Objects held, by kind, and guest pages pinned: set after each request.
  Counter pds{0}, cqs{0}, qps{0}, srqs{0}, mrs{0}, ahs{0}, pinned_pages{0};
  // Requests answered (and answered with an error status), work requests
  // handed to the HCA from the guest's queues, completions written to the
  // guest's CQs (and those with an error status).
  Counter requests{0}, request_errors{0}, wqes{0}, completions{0}, completion_errors{0};

 private:
  std::atomic<std::chrono::steady_clock::rep> last_activity_{0};
};

}  // namespace vib::backend
