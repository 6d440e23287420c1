// The scale run: N guest domains, each a process of this program
// (vib-bench --scale-guest) opening M contexts with a CQ, an MR and an RC QP
// connected to the QP of its neighbour context, all on one vibd. Reports
// what vibd costs for them (threads, resident memory per context, CPU time
// while all of them sit idle), how long a context takes from open to a
// connected QP, and the aggregate 8-byte message rate of P pairs busy at
// once against the same P pairs direct on the soft HCA.
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <thread>

#include "bench_sections.hpp"
#include "bench_workload.hpp"

namespace vib::bench {

namespace {

constexpr std::size_t kScaleBuffer = 64 * 1024;  // per context: small, 1024 of them
constexpr platform::DomId kFirstGuest = 10;

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

void sleep_until_ns(std::int64_t t) {
  std::this_thread::sleep_until(Clock::time_point(std::chrono::nanoseconds(t)));
}

// One pair's part of the aggregate rate: warms up, waits for the common
// start, streams `count` 8-byte writes; returns when it finished (ns).
template <class Ep>
std::int64_t timed_rate(Ep& a, Ep& b, long count, std::int64_t start_ns) {
  stream_writes(a, b, kRateSize, kRateDepth, std::max(100L, count / 10));
  sleep_until_ns(start_ns);
  stream_writes(a, b, kRateSize, kRateDepth, count);
  return now_ns();
}

// A guest process, driven by lines on a pipe pair.
struct Guest {
  pid_t pid = -1;
  std::FILE* to = nullptr;
  std::FILE* from = nullptr;

  std::string line() {
    char buf[256];
    if (!std::fgets(buf, sizeof buf, from)) fail("scale guest " + std::to_string(pid) + " went away");
    std::string s(buf);
    if (!s.empty() && s.back() == '\n') s.pop_back();
    if (s.rfind("error ", 0) == 0) fail("scale guest: " + s.substr(6));
    return s;
  }
  void say(const std::string& s) {
    std::fprintf(to, "%s\n", s.c_str());
    std::fflush(to);
  }
  ~Guest() {
    if (to) std::fclose(to);
    if (from) std::fclose(from);
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }
};

std::unique_ptr<Guest> spawn_guest(const std::string& dir, platform::DomId domid, int contexts) {
  int down[2], up[2];
  if (::pipe2(down, O_CLOEXEC) != 0 || ::pipe2(up, O_CLOEXEC) != 0) fail("pipe");
  const std::string dom = std::to_string(domid), ctx = std::to_string(contexts);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) fail("fork");
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(1);
    if (::dup2(down[0], 0) < 0 || ::dup2(up[1], 1) < 0) ::_exit(126);
    ::execl("/proc/self/exe", "vib-bench", "--scale-guest", dir.c_str(), dom.c_str(), ctx.c_str(),
            static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ::close(down[0]);
  ::close(up[1]);
  auto g = std::make_unique<Guest>();
  g->pid = pid;
  g->to = ::fdopen(down[1], "w");
  g->from = ::fdopen(up[0], "r");
  if (!g->to || !g->from) fail("fdopen");
  return g;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return percentile(v, 50);
}

}  // namespace

int scale_guest_main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: vib-bench --scale-guest DIR DOMID CONTEXTS\n");
    return 2;
  }
  try {
    const auto xen = platform::XenTarget::local(argv[2], static_cast<platform::DomId>(std::atoi(argv[3])));
    const int contexts = std::atoi(argv[4]);
    std::vector<std::unique_ptr<VibEndpoint>> eps;
    for (int i = 0; i + 1 < contexts; i += 2) {
      const auto t0 = Clock::now();
      auto a = std::make_unique<VibEndpoint>(xen, kScaleBuffer);
      auto b = std::make_unique<VibEndpoint>(xen, kScaleBuffer);
      a->connect(*b);
      b->connect(*a);
      const double us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / 2;
      std::printf("open %.1f\nopen %.1f\n", us, us);
      eps.push_back(std::move(a));
      eps.push_back(std::move(b));
    }
    std::printf("ready\n");
    std::fflush(stdout);
    char buf[256];
    while (std::fgets(buf, sizeof buf, stdin)) {
      long count = 0;
      long long start = 0;
      if (std::sscanf(buf, "rate %ld %lld", &count, &start) == 2) {
        const std::int64_t end = timed_rate(*eps[0], *eps[1], count, start);
        std::printf("done %lld\n", static_cast<long long>(end));
        std::fflush(stdout);
      } else {
        break;  // "quit", or the parent went away
      }
    }
    eps.clear();
    std::printf("closed\n");
    std::fflush(stdout);
    return 0;
  } catch (const std::exception& e) {
    std::printf("error %s\n", e.what());
    std::fflush(stdout);
    return 1;
  }
}

void run_scale(Report& report, const ScaleOptions& o) {
  const int total = o.guests * o.contexts_per_guest;
  const std::string what = std::to_string(o.guests) + " guests x " + std::to_string(o.contexts_per_guest) +
                           " contexts";
  // Direct: the same objects on the soft HCA in this process, for the
  // open-to-connected baseline.
  std::vector<double> direct_open;
  {
    auto hca = platform::open_hca("soft");
    for (int i = 0; i < std::min(total, 256); i += 2) {
      const auto t0 = Clock::now();
      DirectEndpoint a(*hca, kScaleBuffer), b(*hca, kScaleBuffer);
      a.connect(b);
      b.connect(a);
      direct_open.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / 2);
    }
  }

  std::vector<platform::DomId> domains;
  for (int g = 0; g < o.guests; ++g) domains.push_back(static_cast<platform::DomId>(kFirstGuest + g));
  VibHost host(domains, o.vibd_log, vibd_args());
  const ProcessReading before = read_process(host.vibd_pid());

  std::vector<std::unique_ptr<Guest>> guests;
  std::vector<double> open_us;
  const auto t0 = Clock::now();
  for (auto d : domains) guests.push_back(spawn_guest(host.dir(), d, o.contexts_per_guest));
  for (auto& g : guests) {
    for (std::string l = g->line(); l != "ready"; l = g->line())
      if (l.rfind("open ", 0) == 0) open_us.push_back(std::atof(l.c_str() + 5));
  }
  const double all_open_s = std::chrono::duration<double>(Clock::now() - t0).count();

  std::this_thread::sleep_for(1s);  // whatever vibd does after the last request settles
  const ProcessReading open = read_process(host.vibd_pid());
  std::this_thread::sleep_for(std::chrono::seconds(o.idle_seconds));
  const ProcessReading idle = read_process(host.vibd_pid());

  // P pairs busy at once, one pair per guest, against the same P pairs direct.
  const long count = o.messages_per_pair;
  std::int64_t start = now_ns() + 500'000'000;
  for (int p = 0; p < o.busy_pairs; ++p) guests[static_cast<std::size_t>(p)]->say("rate " + std::to_string(count) + " " + std::to_string(start));
  std::int64_t via_end = start;
  for (int p = 0; p < o.busy_pairs; ++p) {
    const std::string l = guests[static_cast<std::size_t>(p)]->line();
    long long end = 0;
    if (std::sscanf(l.c_str(), "done %lld", &end) != 1) fail("scale guest: unexpected '" + l + "'");
    via_end = std::max<std::int64_t>(via_end, end);
  }
  const double via_rate = static_cast<double>(count) * o.busy_pairs / (static_cast<double>(via_end - start) / 1e9) / 1e6;
  const ProcessReading busy = read_process(host.vibd_pid());

  for (auto& g : guests) g->say("quit");
  for (auto& g : guests) g->line();  // "closed"
  guests.clear();

  double direct_rate = 0;
  {
    std::vector<std::unique_ptr<platform::Hca>> hcas;
    std::vector<std::unique_ptr<DirectEndpoint>> eps;
    for (int p = 0; p < 2 * o.busy_pairs; ++p) {
      hcas.push_back(platform::open_hca("soft"));
      eps.push_back(std::make_unique<DirectEndpoint>(*hcas.back(), kScaleBuffer));
    }
    for (int p = 0; p < o.busy_pairs; ++p) {
      eps[2 * p]->connect(*eps[2 * p + 1]);
      eps[2 * p + 1]->connect(*eps[2 * p]);
    }
    start = now_ns() + 200'000'000;
    std::vector<std::int64_t> ends(static_cast<std::size_t>(o.busy_pairs));
    std::vector<std::exception_ptr> errors(static_cast<std::size_t>(o.busy_pairs));
    std::vector<std::thread> threads;
    for (int p = 0; p < o.busy_pairs; ++p)
      threads.emplace_back([&, p] {
        try {
          ends[static_cast<std::size_t>(p)] = timed_rate(*eps[2 * p], *eps[2 * p + 1], count, start);
        } catch (...) {
          errors[static_cast<std::size_t>(p)] = std::current_exception();
        }
      });
    for (auto& t : threads) t.join();
    for (auto& e : errors)
      if (e) std::rethrow_exception(e);
    const std::int64_t end = *std::max_element(ends.begin(), ends.end());
    direct_rate = static_cast<double>(count) * o.busy_pairs / (static_cast<double>(end - start) / 1e9) / 1e6;
  }

  const long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
  const std::string section = "scale: " + what + " (" + std::to_string(total) + " contexts)";
  report.add({section, "vibd threads, all contexts open", "threads", std::nullopt, static_cast<double>(open.threads),
              std::nullopt, "<= " + std::to_string(2 * cpus + 8)});
  report.add({section, "vibd RSS per context", "KiB",
              std::nullopt, static_cast<double>(open.rss_kib - before.rss_kib) / total, std::nullopt, "<= 256"});
  report.add({section, "vibd open files per context", "fds", std::nullopt,
              static_cast<double>(open.open_files - before.open_files) / total, std::nullopt, ""});
  report.add({section, "open to connected QP, per context, median", "us", median(direct_open), median(open_us),
              std::nullopt, ""});
  report.add({section, "all contexts open and connected", "s, wall", std::nullopt, all_open_s, std::nullopt, ""});
  report.add({section, "vibd CPU while idle, " + std::to_string(o.idle_seconds) + " s", "ticks", std::nullopt,
              static_cast<double>(idle.cpu_ticks - open.cpu_ticks), std::nullopt, "0"});
  report.add({section, std::to_string(o.busy_pairs) + " busy pairs, aggregate 8 B rate", "M msgs/s", direct_rate,
              via_rate, std::nullopt, ">= 0.7x"});
  report.add({section, "vibd involuntary switches, busy pairs", "switches", std::nullopt,
              static_cast<double>(busy.involuntary_switches - idle.involuntary_switches), std::nullopt, ""});
}

}  // namespace vib::bench
