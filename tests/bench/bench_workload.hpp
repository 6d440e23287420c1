// The RC workload of vib-bench, written once for both kinds of endpoint:
// DirectEndpoint (the soft HCA in this process, platform::Hca) and
// VibEndpoint (a guest context through libvibfront and vibd). Used by the RC
// section (vib_bench.cpp) and by the scale run's busy pairs.
#pragma once

#include <poll.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "bench_support.hpp"
#include "rc_connect.hpp"
#include "vib/front/verbs.hpp"
#include "vib/platform/hca.hpp"

namespace vib::bench {

using namespace std::chrono_literals;

constexpr int kAccess = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;
constexpr std::size_t kBufferSize = 1u << 20;  // 16 slots of 64 KiB (the default buffer)
constexpr std::uint32_t kBwSize = 64u * 1024u;
constexpr int kBwDepth = 16;
constexpr std::uint32_t kRateSize = 8;
constexpr int kRateDepth = 64;
constexpr int kCqSize = 256;
constexpr auto kStallLimit = 10s;  // no progress for this long: an error

// A page-aligned anonymous buffer (vib remaps the pages under a registered
// buffer; an mmap'ed one keeps that away from the malloc heap).
struct Buffer {
  char* data = nullptr;
  std::size_t size = 0;
  explicit Buffer(std::size_t bytes) : size(bytes) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) fail("mmap failed");
    data = static_cast<char*>(p);
    std::memset(data, 0x5a, size);
  }
  ~Buffer() { ::munmap(data, size); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

inline ibv_qp_cap queue_caps() {
  ibv_qp_cap cap{};
  cap.max_send_wr = 128;
  cap.max_recv_wr = 16;
  cap.max_send_sge = 1;
  cap.max_recv_sge = 1;
  cap.max_inline_data = 0;
  return cap;
}

// RESET -> INIT -> RTR -> RTS towards (peer_lid, peer_qpn), for either QP type.
template <class Qp>
void connect_qp(Qp& qp, std::uint16_t peer_lid, std::uint32_t peer_qpn) {
  for (auto& step : vib::test::rc_connect_steps(peer_lid, peer_qpn, kAccess, IBV_MTU_4096, /*min_rnr_timer=*/1))
    if (qp.modify(step.attr, step.mask) != 0) fail("modify to state " + std::to_string(step.attr.qp_state));
}

// ---- adapters: what the workload needs from an endpoint ---------------------

// One endpoint on the platform Hca (the soft HCA, in this process).
struct DirectEndpoint {
  std::unique_ptr<vib::platform::ProtectionDomain> pd;
  std::unique_ptr<vib::platform::CompletionQueue> cq;
  std::unique_ptr<vib::platform::QueuePair> qp;
  vib::platform::Hca& hca;
  Buffer buffer;
  std::unique_ptr<vib::platform::MemoryRegion> mr;
  std::uint16_t lid = 0;

  // Each endpoint has an HCA of its own (the soft HCAs of one process share
  // one fabric), so that its completion events are its own.
  explicit DirectEndpoint(vib::platform::Hca& hca_, std::size_t buffer_size = kBufferSize)
      : hca(hca_), buffer(buffer_size) {
    pd = hca.alloc_pd();
    cq = hca.create_cq(kCqSize);
    vib::platform::QueuePairInit init;
    init.send_cq = init.recv_cq = cq.get();
    init.cap = queue_caps();
    qp = hca.create_qp(*pd, init);
    mr = hca.reg_mr(*pd, buffer.data, buffer.size, reinterpret_cast<std::uintptr_t>(buffer.data), kAccess);
    ibv_port_attr port{};
    hca.query_port(1, port);
    lid = port.lid;
  }
  void connect(const DirectEndpoint& peer) { connect_qp(*qp, peer.lid, peer.qp->qp_num()); }

  char* buf() const { return buffer.data; }
  std::uint32_t lkey() const { return mr->lkey(); }
  std::uint32_t rkey() const { return mr->rkey(); }
  int post_send(const ibv_send_wr& wr) {
    const ibv_send_wr* bad = nullptr;
    return qp->post_send(&wr, &bad);
  }
  int post_recv(const ibv_recv_wr& wr) {
    const ibv_recv_wr* bad = nullptr;
    return qp->post_recv(&wr, &bad);
  }
  int poll(std::span<ibv_wc> out) { return cq->poll(out); }
  void arm() { cq->request_notify(false); }
  // Sleeps until a completion event (or `timeout`); true if one came.
  bool wait_event(std::chrono::milliseconds timeout) {
    pollfd p{hca.completion_fd(), POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(timeout.count())) <= 0) return false;
    while (hca.next_completion_event()) {
    }
    return true;
  }
};

// One endpoint as a guest context through libvibfront and vibd.
struct VibEndpoint {
  std::unique_ptr<vib::front::Device> device;
  std::unique_ptr<vib::front::Pd> pd;
  std::unique_ptr<vib::front::Cq> cq;
  std::unique_ptr<vib::front::Qp> qp;
  Buffer buffer;
  std::unique_ptr<vib::front::Mr> mr;
  std::uint16_t lid = 0;

  explicit VibEndpoint(vib::platform::XenTarget xen, std::size_t buffer_size = kBufferSize) : buffer(buffer_size) {
    vib::front::ChannelOptions options;
    options.xen = xen;
    // The scale run opens a thousand contexts at once on two loaded CPUs.
    options.timeout = std::chrono::seconds(60);
    device = vib::front::Device::open(options);
    pd = device->alloc_pd();
    cq = device->create_cq(kCqSize);
    vib::front::QpInit init;
    init.send_cq = init.recv_cq = cq.get();
    init.cap = queue_caps();
    qp = pd->create_qp(init);
    mr = pd->reg_mr(buffer.data, buffer.size, kAccess);
    ibv_port_attr port{};
    device->query_port(1, port);
    lid = port.lid;
  }
  ~VibEndpoint() {
    // Objects before the context that owns them.
    mr.reset();
    qp.reset();
    cq.reset();
    pd.reset();
  }
  VibEndpoint(const VibEndpoint&) = delete;
  VibEndpoint& operator=(const VibEndpoint&) = delete;
  void connect(const VibEndpoint& peer) { connect_qp(*qp, peer.lid, peer.qp->qp_num()); }

  char* buf() const { return buffer.data; }
  std::uint32_t lkey() const { return mr->lkey(); }
  std::uint32_t rkey() const { return mr->rkey(); }
  int post_send(const ibv_send_wr& wr) {
    ibv_send_wr* bad = nullptr;
    return qp->post_send(&wr, &bad);
  }
  int post_recv(const ibv_recv_wr& wr) {
    ibv_recv_wr* bad = nullptr;
    return qp->post_recv(&wr, &bad);
  }
  int poll(std::span<ibv_wc> out) { return cq->poll(out); }
  void arm() { cq->request_notify(false); }
  bool wait_event(std::chrono::milliseconds timeout) {
    pollfd p{device->event_fd(), POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(timeout.count())) <= 0) return false;
    device->take_events();
    return true;
  }
};

// ---- the workload, written once ---------------------------------------------


inline void check(const ibv_wc& wc) {
  if (wc.status != IBV_WC_SUCCESS)
    fail(std::string("completion error: ") + ibv_wc_status_str(wc.status) + " (wr_id " + std::to_string(wc.wr_id) +
         ")");
}

// Waits until a receive completion arrives on `ep` (send completions are
// reaped on the way): busy-polling, or with `events` the way a program using
// a completion channel does (poll, arm, poll again, sleep until the event).
// `stop` ends the wait early (the peer failed).
template <class Ep>
void wait_recv(Ep& ep, const std::atomic<bool>& stop, bool events = false) {
  ibv_wc wcs[16];
  auto last = Clock::now();
  auto reap = [&] {
    const int n = ep.poll(std::span<ibv_wc>(wcs, 16));
    if (n < 0) fail("poll_cq failed");
    bool got = false;
    for (int i = 0; i < n; ++i) {
      check(wcs[i]);
      if (wcs[i].opcode == IBV_WC_RECV) got = true;
    }
    if (n > 0) last = Clock::now();
    return got;
  };
  for (std::uint32_t spins = 0;; ++spins) {
    if (reap()) return;
    if (events) {
      ep.arm();
      if (reap()) return;
      if (!ep.wait_event(100ms)) {
        if (stop.load(std::memory_order_relaxed)) fail("peer stopped");
        if (Clock::now() - last > kStallLimit) fail("no completion event for 10 s (ping-pong)");
      }
      continue;
    }
    if ((spins & 0xfff) == 0) {
      if (stop.load(std::memory_order_relaxed)) fail("peer stopped");
      if (Clock::now() - last > kStallLimit) fail("no completion for 10 s (ping-pong)");
    }
  }
}

template <class Ep>
void post_recv8(Ep& ep) {
  ibv_sge sge{reinterpret_cast<std::uintptr_t>(ep.buf() + 4096), 8, ep.lkey()};
  ibv_recv_wr wr{};
  wr.sg_list = &sge;
  wr.num_sge = 1;
  if (const int rc = ep.post_recv(wr); rc != 0) fail("post_recv: " + std::string(std::strerror(rc)));
}

template <class Ep>
void post_send8(Ep& ep) {
  ibv_sge sge{reinterpret_cast<std::uintptr_t>(ep.buf()), 8, ep.lkey()};
  ibv_send_wr wr{};
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = IBV_WR_SEND;
  wr.send_flags = IBV_SEND_SIGNALED;
  if (const int rc = ep.post_send(wr); rc != 0) fail("post_send: " + std::string(std::strerror(rc)));
}

// 8-byte SEND/RECV ping-pong: a pings, b answers; each on its own thread,
// busy-polling its CQ (or sleeping on completion events). Returns the half
// round trips in µs, sorted.
template <class Ep>
std::vector<double> ping_pong(Ep& a, Ep& b, int iterations, bool events = false) {
  const int warmup = std::max(10, iterations / 10);
  const int total = warmup + iterations;
  std::atomic<bool> stop{false};
  std::exception_ptr b_error;
  post_recv8(a);
  post_recv8(b);
  std::thread responder([&] {
    try {
      for (int i = 0; i < total; ++i) {
        wait_recv(b, stop, events);
        post_recv8(b);  // before answering: the next ping has a receive
        post_send8(b);
      }
    } catch (...) {
      b_error = std::current_exception();
      stop = true;
    }
  });
  std::vector<double> half_rtt;
  half_rtt.reserve(static_cast<std::size_t>(iterations));
  std::exception_ptr a_error;
  try {
    for (int i = 0; i < total; ++i) {
      const auto t0 = Clock::now();
      post_send8(a);
      wait_recv(a, stop, events);
      const auto t1 = Clock::now();
      post_recv8(a);
      if (i >= warmup) half_rtt.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count() / 2);
    }
  } catch (...) {
    a_error = std::current_exception();
    stop = true;
  }
  responder.join();
  if (b_error) std::rethrow_exception(b_error);
  if (a_error) std::rethrow_exception(a_error);
  // Reap the last send completions so the CQs are empty for the next test.
  ibv_wc wcs[16];
  for (auto deadline = Clock::now() + 100ms; Clock::now() < deadline;) {
    a.poll(std::span<ibv_wc>(wcs, 16));
    b.poll(std::span<ibv_wc>(wcs, 16));
  }
  std::sort(half_rtt.begin(), half_rtt.end());
  return half_rtt;
}

// RDMA WRITEs of `size` bytes from a into b, up to `depth` outstanding, every
// one signalled. Returns the seconds taken for `count` messages.
template <class Ep>
double stream_writes(Ep& a, Ep& b, std::uint32_t size, int depth, long count) {
  const std::size_t slots = std::min(a.buffer.size, b.buffer.size) / size;
  ibv_wc wcs[64];
  long posted = 0, completed = 0;
  bool progress = false;
  auto last = Clock::now();
  const auto t0 = Clock::now();
  for (std::uint32_t spins = 0; completed < count; ++spins) {
    while (posted < count && posted - completed < depth) {
      const std::size_t slot = static_cast<std::size_t>(posted) % slots * size;
      ibv_sge sge{reinterpret_cast<std::uintptr_t>(a.buf() + slot), size, a.lkey()};
      ibv_send_wr wr{};
      wr.wr_id = static_cast<std::uint64_t>(posted);
      wr.sg_list = &sge;
      wr.num_sge = 1;
      wr.opcode = IBV_WR_RDMA_WRITE;
      wr.send_flags = IBV_SEND_SIGNALED;
      wr.wr.rdma.remote_addr = reinterpret_cast<std::uintptr_t>(b.buf() + slot);
      wr.wr.rdma.rkey = b.rkey();
      if (const int rc = a.post_send(wr); rc != 0) fail("post_send (RDMA WRITE): " + std::string(std::strerror(rc)));
      ++posted;
    }
    const int n = a.poll(std::span<ibv_wc>(wcs, 64));
    if (n < 0) fail("poll_cq failed");
    for (int i = 0; i < n; ++i) check(wcs[i]);
    completed += n;
    progress = progress || n > 0;
    if ((spins & 0xfff) == 0) {
      if (progress) {
        last = Clock::now();
        progress = false;
      } else if (Clock::now() - last > kStallLimit) {
        fail("no completion for 10 s (RDMA WRITE)");
      }
    }
  }
  return std::chrono::duration<double>(Clock::now() - t0).count();
}


}  // namespace vib::bench
