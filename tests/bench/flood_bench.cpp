// Fairness under attack (issue 11): a well-behaved pair of guests' ping-pong
// with completion events, alone and while a third guest keeps its request
// ring from ever running dry (the hostile suite's RingFlooder). vibd's
// workers give a flooded ring one bounded pass at a time, so the pair's
// latency should move by the flood's share of the CPUs, not by the flood's
// length. On the host-local Xen the attacker's own spinning thread is one
// more runnable thread on this machine's CPUs: on Xen it would spin on its
// own vCPU, not dom0's.
#include "bench_sections.hpp"
#include "bench_workload.hpp"
#include "ring_flooder.hpp"
#include "vib/platform/xenstore.hpp"
#include "vibd_process.hpp"

namespace vib::bench {

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

  // The attacker: device 0 of domain 5, connected by hand.
  auto store = platform::open_xenstore(host.as(5));
  const auto be_state = platform::wait_for_node(
      *store, test::backend_path(5) + "/state", [](const std::optional<std::string>& v) { return v == "2"; },
      std::chrono::seconds(10));
  if (be_state != "2") fail("flood: the attacker's device never reached InitWait");
  store->write(platform::kNoTransaction, test::frontend_path(5) + "/state", "4");
  test::RawGuest attacker(host.as(5), 5, 7);
  test::RingFlooder flood(attacker);
  const auto started = Clock::now();
  while (flood.responses() < 1000) {
    if (Clock::now() - started > std::chrono::seconds(10)) fail("flood: vibd never served the flood");
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  const auto served_before = flood.responses();
  const auto t0 = Clock::now();
  auto flooded = ping_pong(a, b, iterations, /*events=*/true);
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  r.flooded_median_us = percentile(flooded, 50);
  r.flooded_p99_us = percentile(flooded, 99);
  r.flood_requests_per_s = static_cast<double>(flood.responses() - served_before) / seconds;
  return r;
}

}  // namespace vib::bench
