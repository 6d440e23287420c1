// The physical floor of any host-local path: two processes ping-ponging an
// 8-byte message through a shared page, nothing else in between. Busy
// polling (both processes spin on the page) and woken (each waits on an
// eventfd the other writes, as a completion-event program sleeps in the
// kernel) — the two ways a program waits for vib's completions.
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <poll.h>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstring>
#include <thread>

#include "bench_sections.hpp"
#include "vib/platform/event_channels.hpp"

namespace vib::bench {

namespace {

struct alignas(64) Line {
  std::atomic<std::uint64_t> seq{0};
  char pad[64 - sizeof(std::atomic<std::uint64_t>)];
};

struct SharedPage {
  Line ping, pong;
  std::uint64_t message[8];
};

// Blocks until `fd` has a count (an eventfd write by the peer), consuming it.
void wait_fd(int fd) {
  std::uint64_t v;
  while (::read(fd, &v, sizeof v) != static_cast<ssize_t>(sizeof v))
    if (errno != EINTR) fail(std::string("eventfd read: ") + std::strerror(errno));
}
void kick_fd(int fd) {
  const std::uint64_t one = 1;
  if (::write(fd, &one, sizeof one) != static_cast<ssize_t>(sizeof one)) fail("eventfd write");
}

// Half round trips in µs, sorted. `woken`: each side sleeps on its eventfd
// until the other writes it; otherwise both spin on the page.
std::vector<double> shm_ping_pong(int iterations, bool woken) {
  const int warmup = std::max(10, iterations / 10);
  const int total = warmup + iterations;
  void* p = ::mmap(nullptr, sizeof(SharedPage), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) fail("mmap");
  auto* page = new (p) SharedPage;
  const int to_b = ::eventfd(0, EFD_CLOEXEC), to_a = ::eventfd(0, EFD_CLOEXEC);
  if (to_b < 0 || to_a < 0) fail("eventfd");
  const pid_t parent = ::getpid();
  const pid_t child = ::fork();
  if (child < 0) fail("fork");
  if (child == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(1);
    for (std::uint64_t i = 1; i <= static_cast<std::uint64_t>(total); ++i) {
      if (woken) wait_fd(to_b);
      while (page->ping.seq.load(std::memory_order_acquire) != i) {
      }
      page->message[1] = page->message[0];
      page->pong.seq.store(i, std::memory_order_release);
      if (woken) kick_fd(to_a);
    }
    ::_exit(0);
  }
  std::vector<double> half_rtt;
  half_rtt.reserve(static_cast<std::size_t>(iterations));
  for (std::uint64_t i = 1; i <= static_cast<std::uint64_t>(total); ++i) {
    const auto t0 = Clock::now();
    page->message[0] = i;
    page->ping.seq.store(i, std::memory_order_release);
    if (woken) {
      kick_fd(to_b);
      wait_fd(to_a);
    }
    while (page->pong.seq.load(std::memory_order_acquire) != i) {
    }
    const auto t1 = Clock::now();
    if (i > static_cast<std::uint64_t>(warmup))
      half_rtt.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count() / 2);
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  ::close(to_a);
  ::close(to_b);
  ::munmap(p, sizeof(SharedPage));
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) fail("shared-memory ping-pong peer failed");
  std::sort(half_rtt.begin(), half_rtt.end());
  return half_rtt;
}

// The host-local Xen's event channel between a guest (domain 5) and dom0,
// each end on its own thread: notify, wait for the port, unmask, answer.
// What one kick costs vib on this machine. Half round trips in µs, sorted.
std::vector<double> event_channel_ping_pong(int iterations) {
  const int warmup = std::max(10, iterations / 10);
  const int total = warmup + iterations;
  VibHost host({5}, "", {"--no-provision"});
  auto guest = platform::open_event_channels(host.as(5));
  auto dom0 = platform::open_event_channels(host.as(0));
  const auto guest_port = guest->bind_unbound(0);
  const auto dom0_port = dom0->bind_interdomain(5, guest_port);
  auto wait = [](platform::EventChannels& ev) {
    for (;;) {
      if (auto port = ev.pending()) {
        ev.unmask(*port);
        return;
      }
      pollfd p{ev.fd(), POLLIN, 0};
      if (::poll(&p, 1, 10000) <= 0) fail("event channel ping-pong: no event for 10 s");
    }
  };
  std::exception_ptr error;
  std::thread answer([&] {
    try {
      for (int i = 0; i < total; ++i) {
        wait(*dom0);
        dom0->notify(dom0_port);
      }
    } catch (...) {
      error = std::current_exception();
    }
  });
  std::vector<double> half_rtt;
  for (int i = 0; i < total && !error; ++i) {
    const auto t0 = Clock::now();
    guest->notify(guest_port);
    wait(*guest);
    if (i >= warmup) half_rtt.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / 2);
  }
  answer.join();
  if (error) std::rethrow_exception(error);
  std::sort(half_rtt.begin(), half_rtt.end());
  return half_rtt;
}

}  // namespace

FloorResults run_floor(int iterations) {
  FloorResults r;
  const auto spin = shm_ping_pong(iterations, /*woken=*/false);
  r.spin_median_us = percentile(spin, 50);
  r.spin_p99_us = percentile(spin, 99);
  const auto woken = shm_ping_pong(iterations, /*woken=*/true);
  r.woken_median_us = percentile(woken, 50);
  r.woken_p99_us = percentile(woken, 99);
  const auto evtchn = event_channel_ping_pong(iterations);
  r.event_channel_median_us = percentile(evtchn, 50);
  return r;
}

}  // namespace vib::bench
