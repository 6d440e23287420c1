#include "log.hpp"

#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>

namespace vib::backend {

namespace {
std::mutex log_lock;
bool journald_prefixes = false;
LogLevel threshold_level = LogLevel::info;

const char* level_name(LogLevel l) {
  switch (l) {
    case LogLevel::debug: return "debug";
    case LogLevel::info: return "info";
    case LogLevel::warning: return "warning";
    case LogLevel::error: return "error";
  }
  return "?";
}

// sd-daemon(3) priorities: journald reads them from the line's start.
int syslog_priority(LogLevel l) {
  switch (l) {
    case LogLevel::debug: return 7;
    case LogLevel::info: return 6;
    case LogLevel::warning: return 4;
    case LogLevel::error: return 3;
  }
  return 6;
}
}  // namespace

void set_log_style(bool systemd_prefixes, LogLevel threshold) {
  std::lock_guard lock(log_lock);
  journald_prefixes = systemd_prefixes;
  threshold_level = threshold;
}

void log_line(LogLevel level, std::string_view subject, std::string_view message) {
  std::lock_guard lock(log_lock);
  if (level < threshold_level) return;
  if (journald_prefixes) {
    std::fprintf(stderr, "<%d>%.*s: %.*s\n", syslog_priority(level), static_cast<int>(subject.size()),
                 subject.data(), static_cast<int>(message.size()), message.data());
  } else {
    const auto now = std::chrono::system_clock::now();
    const std::time_t t = std::chrono::system_clock::to_time_t(now);
    std::tm tm;
    gmtime_r(&t, &tm);
    char stamp[32];
    std::strftime(stamp, sizeof(stamp), "%H:%M:%S", &tm);
    std::fprintf(stderr, "%s vibd %s %.*s: %.*s\n", stamp, level_name(level), static_cast<int>(subject.size()),
                 subject.data(), static_cast<int>(message.size()), message.data());
  }
  std::fflush(stderr);
}

LogLimiter::LogLimiter(std::string subject, unsigned burst, Clock::duration period)
    : subject_(std::move(subject)), burst_(burst), period_(period) {}

LogLimiter::~LogLimiter() {
  std::lock_guard lock(mu_);
  report_suppressed();
}

void LogLimiter::report_suppressed() {
  if (suppressed_ == 0) return;
  log_line(LogLevel::warning, subject_,
           std::to_string(suppressed_) + " more guest-caused lines suppressed (at most " + std::to_string(burst_) +
               " per " + std::to_string(std::chrono::duration_cast<std::chrono::seconds>(period_).count()) + " s)");
  suppressed_ = 0;
}

void LogLimiter::log_at(Clock::time_point now, LogLevel level, std::string_view subject, std::string_view message) {
  std::lock_guard lock(mu_);
  if (level < threshold_level) return;  // never shown: it takes no one's place
  if (now - window_start_ >= period_) {
    window_start_ = now;
    in_window_ = 0;
  }
  if (in_window_ >= burst_) {
    ++suppressed_;
    ++suppressed_total_;
    return;
  }
  ++in_window_;
  report_suppressed();
  log_line(level, subject, message);
}

std::uint64_t LogLimiter::suppressed_total() const {
  std::lock_guard lock(mu_);
  return suppressed_total_;
}

std::string device_subject(unsigned domid, unsigned devid) {
  return "dom" + std::to_string(domid) + "/vib" + std::to_string(devid);
}

std::string context_subject(unsigned domid, unsigned devid, unsigned ctxid) {
  return device_subject(domid, devid) + "/ctx" + std::to_string(ctxid);
}

}  // namespace vib::backend
