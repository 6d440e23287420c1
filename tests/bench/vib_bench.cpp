// vib-bench: every figure of vib's fast path, in one run, as ratios against
// a baseline measured in the same run (docs/performance.md explains each).
// Sections, each in its own file:
//   rc     - RC latency (busy polling and completion events), bandwidth and
//            message rate, measured twice with the same workload code:
//            direct  - both endpoints on the soft HCA in this process;
//            via vib - two guest contexts (domains 5 and 6 of a host-local
//                      Xen) using libvibfront, served by a spawned vibd
//                      whose HCA is the soft one;
//   floor  - the same ping-pong as raw shared memory between two processes
//            (floor_bench.cpp): what no host-local path can beat;
//   qp     - create + INIT/RTR/RTS + destroy of a QP (qp_bench.cpp);
//   reg    - ibv_reg_mr / ibv_dereg_mr per size, 4 KiB to 1 GiB
//            (reg_bench.cpp);
//   scale  - many guests and contexts on one vibd (scale_bench.cpp).
// Benchmarks never assert timings: this exits non-zero only on errors.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <set>
#include <sstream>
#include <string>

#include "bench_sections.hpp"
#include "bench_workload.hpp"
#include "vib/platform/hca.hpp"

namespace {

using namespace vib::bench;

struct Results {
  double latency_median_us = 0, latency_p99_us = 0;
  double event_latency_median_us = 0, event_latency_p99_us = 0;  // completion events
  double bandwidth_mbps = 0;  // MB/s, 10^6 bytes
  double rate_mmps = 0;       // million messages per second
};

template <class Ep>
Results run_workload(Ep& a, Ep& b, int iterations) {
  Results r;
  const auto lat = ping_pong(a, b, iterations);
  r.latency_median_us = percentile(lat, 50);
  r.latency_p99_us = percentile(lat, 99);
  const auto event_lat = ping_pong(a, b, iterations, /*events=*/true);
  r.event_latency_median_us = percentile(event_lat, 50);
  r.event_latency_p99_us = percentile(event_lat, 99);

  const long bw_count = static_cast<long>(iterations) * 5;
  stream_writes(a, b, kBwSize, kBwDepth, std::max(10L, bw_count / 10));  // warm up
  const double bw_s = stream_writes(a, b, kBwSize, kBwDepth, bw_count);
  r.bandwidth_mbps = static_cast<double>(bw_count) * kBwSize / bw_s / 1e6;

  const long rate_count = static_cast<long>(iterations) * 100;
  stream_writes(a, b, kRateSize, kRateDepth, std::max(100L, rate_count / 10));
  const double rate_s = stream_writes(a, b, kRateSize, kRateDepth, rate_count);
  r.rate_mmps = static_cast<double>(rate_count) / rate_s / 1e6;
  return r;
}

// ---- the two setups ----------------------------------------------------------

Results run_direct(int iterations) {
  auto hca_a = vib::platform::open_hca("soft");
  auto hca_b = vib::platform::open_hca("soft");
  DirectEndpoint a(*hca_a), b(*hca_b);
  a.connect(b);
  b.connect(a);
  return run_workload(a, b, iterations);
}

Results run_via_vib(int iterations, const std::string& log) {
  VibHost host({5, 6}, log, vibd_args());
  VibEndpoint a(host.as(5)), b(host.as(6));
  a.connect(b);
  b.connect(a);
  return run_workload(a, b, iterations);
}

void usage(FILE* out) {
  std::fprintf(out,
               "usage: vib-bench [options]\n"
               "Every figure of vib's fast path: soft HCA direct vs through vib (vibd), as ratios.\n"
               "  --iterations N    ping-pongs per latency run; 5*N 64 KiB writes and 100*N 8-byte\n"
               "                    writes; QP lifecycles N/10 (default 1000)\n"
               "  --quick           a smoke run: 300 iterations, a 2 x 4 scale run idle for 1 s\n"
               "  --sections LIST   comma-separated, of rc,floor,qp,reg,flood,scale (default: all)\n"
               "  --guests N        scale run: guest domains (default 64)\n"
               "  --contexts M      scale run: contexts per guest, each with a CQ and a connected QP\n"
               "                    (default 16)\n"
               "  --pairs P         scale run: busy pairs for the aggregate message rate (default 8)\n"
               "  --idle-seconds S  scale run: how long vibd's idle CPU time is measured (default 5)\n"
               "  --vibd-arg ARG    pass ARG to every vibd the benchmark starts (repeatable)\n"
               "  --vibd-log FILE   keep vibd's log there (default: removed with the local Xen)\n"
               "  --json            print the figures as one JSON object instead of a table\n");
}

bool parse_count(const char* text, long min, long max, long& out) {
  char* end = nullptr;
  const long n = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || n < min || n > max) return false;
  out = n;
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--scale-guest") return scale_guest_main(argc, argv);
  int iterations = 1000;
  bool json = false;
  std::string vibd_log;
  std::set<std::string> sections{"rc", "floor", "qp", "reg", "flood", "scale"};
  std::size_t largest_registration = std::size_t{1} << 30;
  ScaleOptions scale;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const bool has_value = i + 1 < argc;
    long n = 0;
    auto number = [&](long min, long max) {
      if (!has_value || !parse_count(argv[++i], min, max, n)) {
        std::fprintf(stderr, "vib-bench: %s wants a number in %ld..%ld\n", arg.c_str(), min, max);
        std::exit(2);
      }
      return n;
    };
    if (arg == "--help" || arg == "-h") {
      usage(stdout);
      return 0;
    } else if (arg == "--quick") {
      iterations = 300;
      scale.guests = 2;
      scale.contexts_per_guest = 4;
      scale.busy_pairs = 2;
      scale.idle_seconds = 1;
      scale.messages_per_pair = 5000;
      largest_registration = std::size_t{16} << 20;
    } else if (arg == "--json") {
      json = true;
    } else if (arg == "--vibd-log" && has_value) {
      vibd_log = argv[++i];
    } else if (arg == "--vibd-arg" && has_value) {
      vibd_args().push_back(argv[++i]);
    } else if (arg == "--sections" && has_value) {
      sections.clear();
      std::stringstream list(argv[++i]);
      for (std::string s; std::getline(list, s, ',');) {
        if (s != "rc" && s != "floor" && s != "qp" && s != "reg" && s != "flood" && s != "scale") {
          std::fprintf(stderr, "vib-bench: unknown section '%s'\n", s.c_str());
          return 2;
        }
        sections.insert(s);
      }
    } else if (arg == "--iterations") {
      iterations = static_cast<int>(number(10, 100000000));
    } else if (arg == "--guests") {
      scale.guests = static_cast<int>(number(1, 1000));
    } else if (arg == "--contexts") {
      scale.contexts_per_guest = static_cast<int>(number(2, 256));
    } else if (arg == "--pairs") {
      scale.busy_pairs = static_cast<int>(number(1, 64));
    } else if (arg == "--idle-seconds") {
      scale.idle_seconds = static_cast<int>(number(1, 600));
    } else {
      std::fprintf(stderr, "vib-bench: unknown argument '%s'\n", arg.c_str());
      usage(stderr);
      return 2;
    }
  }
  if (scale.contexts_per_guest % 2) {
    std::fprintf(stderr, "vib-bench: --contexts wants an even number (contexts are connected in pairs)\n");
    return 2;
  }
  scale.busy_pairs = std::min(scale.busy_pairs, scale.guests);
  scale.vibd_log = vibd_log;
  try {
    const long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
    const double load_before = load_average();
    if (!json) {
      std::printf("vib-bench: RC, %d iterations, %ld CPUs online, load average %.2f\n", iterations, cpus,
                  load_before);
      std::fflush(stdout);
    }
    Report report;
    if (sections.count("rc")) {
      const Results direct = run_direct(iterations);
      const Results via = run_via_vib(iterations, vibd_log);
      std::optional<FloorResults> floor;
      if (sections.count("floor")) floor = run_floor(iterations);
      auto f = [&](double FloorResults::*field) { return floor ? std::optional<double>((*floor).*field) : std::nullopt; };
      report.add({"rc", "latency p50, busy polling", "us, half RTT", direct.latency_median_us, via.latency_median_us,
                  f(&FloorResults::spin_median_us), "<= 2x"});
      report.add({"rc", "latency p99, busy polling", "us, half RTT", direct.latency_p99_us, via.latency_p99_us,
                  f(&FloorResults::spin_p99_us), "<= 3x"});
      report.add({"rc", "latency p50, completion events", "us, half RTT", direct.event_latency_median_us,
                  via.event_latency_median_us, f(&FloorResults::woken_median_us), "<= 1.5x"});
      report.add({"rc", "latency p99, completion events", "us, half RTT", direct.event_latency_p99_us,
                  via.event_latency_p99_us, f(&FloorResults::woken_p99_us), ""});
      report.add({"rc", "bandwidth, 64 KiB RDMA WRITE x16", "MB/s", direct.bandwidth_mbps, via.bandwidth_mbps,
                  std::nullopt, ">= 0.95x"});
      report.add({"rc", "message rate, 8 B RDMA WRITE x64", "M msgs/s", direct.rate_mmps, via.rate_mmps,
                  std::nullopt, ">= 0.8x"});
      if (floor)
        report.add({"floor", "host-local event channel ping-pong p50", "us, half RTT", std::nullopt,
                    floor->event_channel_median_us, std::nullopt, ""});
    } else if (sections.count("floor")) {
      const FloorResults floor = run_floor(iterations);
      report.add({"floor", "shared-memory ping-pong p50, spinning", "us, half RTT", std::nullopt,
                  floor.spin_median_us, std::nullopt, ""});
      report.add({"floor", "shared-memory ping-pong p50, eventfd", "us, half RTT", std::nullopt,
                  floor.woken_median_us, std::nullopt, ""});
      report.add({"floor", "host-local event channel ping-pong p50", "us, half RTT", std::nullopt,
                  floor.event_channel_median_us, std::nullopt, ""});
    }
    if (sections.count("qp")) {
      const QpLifecycle qp = run_qp_lifecycle(std::max(20, iterations / 10), vibd_log);
      report.add({"qp", "QP create + RTS + destroy", "us per QP", qp.direct_us, qp.via_us, std::nullopt, "<= 2x"});
    }
    if (sections.count("reg")) {
      std::vector<std::size_t> sizes;
      for (std::size_t bytes = 4096; bytes <= largest_registration; bytes *= 16) sizes.push_back(bytes);
      if (sizes.back() != largest_registration) sizes.push_back(largest_registration);
      for (const RegSize& r : run_registration(sizes, iterations, vibd_log)) {
        const std::string size = r.bytes >= (1u << 20) ? std::to_string(r.bytes >> 20) + " MiB"
                                                        : std::to_string(r.bytes >> 10) + " KiB";
        const char* target = r.bytes == 4096 ? "<= 50 us" : r.bytes >= (1u << 20) ? "<= 0.25 s/GiB" : "";
        report.add({"reg", "ibv_reg_mr, " + size, "us", r.direct.reg_us, r.via.reg_us, std::nullopt, target});
        report.add({"reg", "ibv_dereg_mr, " + size, "us", r.direct.dereg_us, r.via.dereg_us, std::nullopt, target});
      }
    }
    if (sections.count("flood")) {
      // The "direct" column holds the same pair with no flood: the baseline.
      const FloodResults f = run_flood(iterations, vibd_log);
      for (const auto& run : f.runs) {
        report.add({"flood", "pair p50 beside " + run.attack, "us, half RTT", f.alone_median_us,
                    run.median_us, std::nullopt, "bounded"});
        report.add({"flood", "pair p99 beside " + run.attack, "us, half RTT", f.alone_p99_us, run.p99_us,
                    std::nullopt, "bounded"});
        report.add({"flood", "  attacker's " + run.unit + " served meanwhile", "per s", std::nullopt,
                    run.attacker_per_s, std::nullopt, ""});
      }
      report.note("flood: a pair of guests ping-pongs with completion events; the direct column is the same pair with no attacker (domain 5) at all");
    }
    if (sections.count("scale")) run_scale(report, scale);
    const double load_after = load_average();
    if (json) {
      std::ostringstream header;
      header << "\"iterations\":" << iterations << ",\"cpus\":" << cpus << ",\"load_before\":" << load_before
             << ",\"load_after\":" << load_after << ",";
      report.print_json(stdout, header.str());
    } else {
      report.print_table(stdout);
      std::printf("load average after the run: %.2f\n", load_after);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vib-bench: error: %s\n", e.what());
    return 1;
  }
}
