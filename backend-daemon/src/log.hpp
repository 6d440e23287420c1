// vibd's log: one line per event, always naming the object it concerns
// (domain, device, context, verbs object), so an administrator can follow one
// guest's story with grep.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>

namespace vib::backend {

enum class LogLevel { debug, info, warning, error };

// Where log lines go: stderr with a timestamp (foreground), or stderr with
// sd-daemon priority prefixes "<N>" that journald understands (systemd).
void set_log_style(bool systemd_prefixes, LogLevel threshold);
void log_line(LogLevel level, std::string_view subject, std::string_view message);

// Lines a guest can cause as often as it likes (malformed WQEs, CQ
// overflow, refused contexts, failing requests) go through the limiter of
// the context or device they concern: at most `burst` lines per `period`;
// the rest are counted, and the next line let through, or the limiter's
// end, says how many were suppressed. Any thread.
class LogLimiter {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr unsigned kBurst = 10;
  static constexpr std::chrono::seconds kPeriod{10};
  explicit LogLimiter(std::string subject, unsigned burst = kBurst, Clock::duration period = kPeriod);
  ~LogLimiter();
  LogLimiter(const LogLimiter&) = delete;
  LogLimiter& operator=(const LogLimiter&) = delete;

  void log(LogLevel level, std::string_view message) { log(level, subject_, message); }
  // For a line about a part of the holder (a device's context).
  void log(LogLevel level, std::string_view subject, std::string_view message) {
    log_at(Clock::now(), level, subject, message);
  }
  // The same, as if at `now`: tests step through windows without sleeping.
  void log_at(Clock::time_point now, LogLevel level, std::string_view subject, std::string_view message);
  std::uint64_t suppressed_total() const;

 private:
  void report_suppressed();  // mu_ held

  const std::string subject_;
  const unsigned burst_;
  const Clock::duration period_;
  mutable std::mutex mu_;
  Clock::time_point window_start_{};
  unsigned in_window_ = 0;
  std::uint64_t suppressed_ = 0, suppressed_total_ = 0;
};

// Subjects are built the same way everywhere: "dom5/vib0", "dom5/vib0/ctx3".
std::string device_subject(unsigned domid, unsigned devid);
std::string context_subject(unsigned domid, unsigned devid, unsigned ctxid);

}  // namespace vib::backend
