// What every vib-bench section shares: the report (a table of ratios and its
// JSON form), a vibd serving provisioned guest domains of a host-local Xen,
// and readings of a process's threads, memory and CPU time from /proc.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "local_xen.hpp"
#include "vib/platform/types.hpp"

namespace vib::bench {

using Clock = std::chrono::steady_clock;

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error(what); }

// One figure, measured both ways where it has two ways. `ratio` is via/direct
// (or the figure alone when it has no direct counterpart); `target` says what
// the issue asks of it, for the reader.
struct Row {
  std::string section;
  std::string metric;
  std::string unit;
  std::optional<double> direct;
  double via = 0;
  std::optional<double> floor;  // the raw shared-memory figure, where one exists
  std::string target;
};

class Report {
 public:
  void add(Row row) { rows_.push_back(std::move(row)); }
  void note(std::string text) { notes_.push_back(std::move(text)); }
  void print_table(std::FILE* out) const;
  void print_json(std::FILE* out, const std::string& header_json) const;

 private:
  std::vector<Row> rows_;
  std::vector<std::string> notes_;
};

// A vib-localxen with `domains` guest domains (device 0 of each provisioned
// on the soft HCA) and a vibd serving them, stopped with this object.
class VibHost {
 public:
  VibHost(const std::vector<platform::DomId>& domains, const std::string& vibd_log,
          const std::vector<std::string>& vibd_args);
  ~VibHost();
  VibHost(const VibHost&) = delete;
  VibHost& operator=(const VibHost&) = delete;

  platform::XenTarget as(platform::DomId domid) const { return xen_.as(domid); }
  const std::string& dir() const { return xen_.dir(); }
  pid_t vibd_pid() const { return vibd_; }

 private:
  test::LocalXen xen_;
  pid_t vibd_ = -1;
};

// The vibd arguments every section passes (the command line's --vibd-arg).
std::vector<std::string>& vibd_args();

// From /proc/<pid>: thread count, resident set in KiB, user+system ticks.
struct ProcessReading {
  long threads = 0;
  long rss_kib = 0;
  long open_files = 0;  // entries of /proc/<pid>/fd
  long long cpu_ticks = 0;
  long long voluntary_switches = 0, involuntary_switches = 0;  // summed over threads
};
ProcessReading read_process(pid_t pid);

// The machine's 1-minute load average, as uptime prints it.
double load_average();

}  // namespace vib::bench
