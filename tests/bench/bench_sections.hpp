// vib-bench's sections besides the RC workload of vib_bench.cpp, each in its
// own file: the shared-memory floor, the QP lifecycle, memory registration,
// fairness under a flood and the scale run.
#pragma once

#include <string>
#include <vector>

#include "bench_support.hpp"

namespace vib::bench {

// Sorted samples: the value at `pct` percent.
inline double percentile(const std::vector<double>& sorted, int pct) {
  if (sorted.empty()) return 0;
  return sorted[std::min(sorted.size() - 1, sorted.size() * static_cast<std::size_t>(pct) / 100)];
}

// floor_bench.cpp
struct FloorResults {
  double spin_median_us = 0, spin_p99_us = 0;    // both processes busy-poll the page
  double woken_median_us = 0, woken_p99_us = 0;  // each sleeps on an eventfd
  double event_channel_median_us = 0;            // host-local Xen event channel, notify to wake
};
FloorResults run_floor(int iterations);

// qp_bench.cpp: create + INIT/RTR/RTS + destroy of one RC QP, µs per QP.
struct QpLifecycle {
  double direct_us = 0, via_us = 0;
};
QpLifecycle run_qp_lifecycle(int iterations, const std::string& vibd_log);

// reg_bench.cpp: ibv_reg_mr and ibv_dereg_mr per size, µs (medians).
struct RegCost {
  double reg_us = 0, dereg_us = 0;
};
struct RegSize {
  std::size_t bytes;
  RegCost direct, via;
};
std::vector<RegSize> run_registration(const std::vector<std::size_t>& sizes, int iterations,
                                      const std::string& vibd_log);

// flood_bench.cpp: a pair's ping-pong (completion events), alone and beside a
// guest flooding its request ring; half round trips in µs.
struct FloodRun {
  std::string attack, unit;  // what the attacker did, and what it counts
  double median_us = 0, p99_us = 0;
  double attacker_per_s = 0;  // what vibd served the attacker meanwhile
};
struct FloodResults {
  double alone_median_us = 0, alone_p99_us = 0;
  std::vector<FloodRun> runs;
};
FloodResults run_flood(int iterations, const std::string& vibd_log);

// scale_bench.cpp
struct ScaleOptions {
  int guests = 64;
  int contexts_per_guest = 16;
  int busy_pairs = 8;
  int idle_seconds = 5;
  long messages_per_pair = 200000;
  std::string vibd_log;
};
void run_scale(Report& report, const ScaleOptions& options);
// The child side of the scale run (vib-bench --scale-guest ...).
int scale_guest_main(int argc, char** argv);

}  // namespace vib::bench
