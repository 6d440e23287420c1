// Fairness under attack (issue 11): a well-behaved pair of guests' ping-pong
// with completion events, alone and beside each of the floods a guest can
// make vibd serve: a request ring that never runs dry (the hostile suite's
// RingFlooder), a stream of work requests, contexts opened and closed as
// fast as they go, and writes under its own xenstore directory. vibd gives
// each a bounded share (one ring pass at a time, contexts spread over the
// workers, the main thread's refresh bounded by the guest's own nodes), so
// the pair's latency should move by the attacker's share of the CPUs, not
// by the flood's length. On the host-local Xen the attacker's threads are
// more runnable threads on this machine's CPUs: on Xen they would run on the
// attacker's own vCPUs, not dom0's.
#include <atomic>
#include <functional>
#include <thread>

#include "bench_sections.hpp"
#include "bench_workload.hpp"
#include "attack.hpp"
#include "ring_flooder.hpp"
#include "vib/platform/xenstore.hpp"
#include "vibd_process.hpp"

namespace vib::bench {

using test::Attack;

FloodResults run_flood(int iterations, const std::string& vibd_log) {
  VibHost host({5, 6, 7}, vibd_log, vibd_args());
  VibEndpoint a(host.as(6)), b(host.as(7));
  a.connect(b);
  b.connect(a);
  FloodResults r;
  ping_pong(a, b, std::max(10, iterations / 10), /*events=*/true);  // warm up
  auto alone = ping_pong(a, b, iterations, /*events=*/true);
  r.alone_median_us = percentile(alone, 50);
  r.alone_p99_us = percentile(alone, 99);

  // The pair's ping-pong beside one attack, which first shows it is running;
  // `done` counts what vibd has served the attacker.
  auto beside = [&](const std::string& what, const std::string& unit, const std::function<std::uint64_t()>& done) {
    const auto started = Clock::now();
    while (done() < 100) {
      if (Clock::now() - started > std::chrono::seconds(20)) fail("flood: the attack (" + what + ") never got going");
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    const auto done_before = done();
    const auto t0 = Clock::now();
    auto flooded = ping_pong(a, b, iterations, /*events=*/true);
    const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    r.runs.push_back({what, unit, percentile(flooded, 50), percentile(flooded, 99),
                      static_cast<double>(done() - done_before) / seconds});
  };

  // The attacker is domain 5. A stream of 8-byte RDMA WRITEs between two of
  // its contexts, 64 outstanding, as fast as vibd serves them (this also
  // connects its device).
  {
    VibEndpoint x(host.as(5)), y(host.as(5));
    x.connect(y);
    y.connect(x);
    Attack wqes([&](const std::atomic<bool>& stop, std::atomic<std::uint64_t>& done) {
      while (!stop) {
        stream_writes(x, y, 8, 64, 1000);
        done += 1000;
      }
    });
    beside("8 B write stream", "WQEs", [&] { return wqes.done(); });
  }
  auto store = platform::open_xenstore(host.as(5));
  {
    test::RawGuest attacker(host.as(5), 5, 7);
    test::RingFlooder flood(attacker);  // its own thread
    beside("full request ring", "requests", [&] { return flood.responses(); });
  }
  {
    // Opened, one request, closed: ids cycle, and one vibd has not let go
    // of yet is refused (and counts for nothing).
    Attack contexts([&](const std::atomic<bool>& stop, std::atomic<std::uint64_t>& done) {
      for (unsigned id = 100; !stop; id = 100 + (id + 1) % 32) {
        try {
          test::RawGuest guest(host.as(5), 5, id);
          vibif_request req{};
          req.hdr.op = VIBIF_OP_ALLOC_PD;
          if (guest.call(req)) ++done;
        } catch (const std::exception&) {
        }
      }
    });
    beside("context churn", "contexts", [&] { return contexts.done(); });
  }
  {
    Attack writes([&](const std::atomic<bool>& stop, std::atomic<std::uint64_t>& done) {
      for (std::uint64_t i = 0; !stop; ++i, ++done)
        store->write(platform::kNoTransaction, test::frontend_path(5) + "/ctx/999/junk", std::to_string(i));
    });
    beside("xenstore writes", "writes", [&] { return writes.done(); });
  }
  return r;
}

}  // namespace vib::bench
