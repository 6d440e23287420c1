// The limiter that bounds what a guest can make vibd log (docs/security.md).
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "log.hpp"

using vib::backend::LogLevel;
using vib::backend::LogLimiter;
using namespace std::chrono_literals;

namespace {

// Runs `body` with stderr going to a file; returns what was written.
template <typename Body>
std::string captured_stderr(Body body) {
  char path[] = "/tmp/vib-log-limiter-XXXXXX";
  const int fd = ::mkstemp(path);
  EXPECT_GE(fd, 0);
  std::fflush(stderr);
  const int saved = ::dup(2);
  ::dup2(fd, 2);
  body();
  std::fflush(stderr);
  ::dup2(saved, 2);
  ::close(saved);
  ::close(fd);
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  ::unlink(path);
  return ss.str();
}

std::size_t count(const std::string& text, const std::string& needle) {
  std::size_t n = 0;
  for (auto at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

}  // namespace

TEST(LogLimiter, AFloodIsABurstAndACount) {
  const auto out = captured_stderr([] {
    LogLimiter limiter("dom5/vib0/ctx1", 3, 1h);
    for (int i = 0; i < 1000; ++i) limiter.log(LogLevel::warning, "malformed WQE");
    EXPECT_EQ(limiter.suppressed_total(), 997u);
  });
  EXPECT_EQ(count(out, "malformed WQE"), 3u) << out;
  EXPECT_EQ(count(out, "997 more guest-caused lines suppressed"), 1u) << "said when the limiter goes\n" << out;
}

TEST(LogLimiter, TheNextWindowSaysWhatWasLeftOut) {
  // Explicit times: how fast this machine runs the calls decides nothing.
  const auto t0 = LogLimiter::Clock::now();
  const auto out = captured_stderr([&] {
    LogLimiter limiter("dom5/vib0", 2, 10s);
    for (int i = 0; i < 5; ++i) limiter.log_at(t0 + i * 1ms, LogLevel::warning, "dom5/vib0/ctx9", "refused");
    limiter.log_at(t0 + 11s, LogLevel::warning, "dom5/vib0/ctx9", "refused");
  });
  EXPECT_EQ(count(out, "refused"), 3u) << out;
  const auto summary = out.find("3 more guest-caused lines suppressed (at most 2 per 10 s)");
  ASSERT_NE(summary, std::string::npos) << out;
  EXPECT_LT(summary, out.rfind("refused")) << "the count comes before the next line let through";
  EXPECT_NE(out.find("dom5/vib0: 3 more"), std::string::npos) << "under the holder's subject\n" << out;
}
