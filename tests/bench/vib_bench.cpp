// vib-bench: RC latency, bandwidth and message rate between two endpoints,
// measured twice with the same workload code:
//   direct  - both endpoints on the soft HCA in this process (platform::Hca);
//   via vib - two guest contexts (domains 5 and 6 of a host-local Xen) using
//             libvibfront, served by a spawned vibd whose HCA is the soft one.
// The ratio via-vib/direct is vib's overhead over a very cheap baseline (the
// soft HCA is an in-process memcpy fabric); see docs/frontend.md, Benchmark.
// Benchmarks never assert timings: this exits non-zero only on errors.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "local_xen.hpp"
#include "rc_connect.hpp"
#include "vib/front/verbs.hpp"
#include "vib/platform/hca.hpp"
#include "vib/platform/xenstore.hpp"
#include "vibd_process.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr int kAccess = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;
constexpr std::size_t kBufferSize = 1u << 20;  // 16 slots of 64 KiB
constexpr std::uint32_t kBwSize = 64u * 1024u;
constexpr int kBwDepth = 16;
constexpr std::uint32_t kRateSize = 8;
constexpr int kRateDepth = 64;
constexpr int kCqSize = 256;
constexpr auto kStallLimit = 10s;  // no progress for this long: an error

[[noreturn]] void fail(const std::string& what) { throw std::runtime_error(what); }

// A page-aligned anonymous buffer (vib remaps the pages under a registered
// buffer; an mmap'ed one keeps that away from the malloc heap).
struct Buffer {
  char* data = nullptr;
  Buffer() {
    void* p = ::mmap(nullptr, kBufferSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) fail("mmap failed");
    data = static_cast<char*>(p);
    std::memset(data, 0x5a, kBufferSize);
  }
  ~Buffer() { ::munmap(data, kBufferSize); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

ibv_qp_cap queue_caps() {
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
  Buffer buffer;
  std::unique_ptr<vib::platform::MemoryRegion> mr;
  std::uint16_t lid = 0;

  explicit DirectEndpoint(vib::platform::Hca& hca) {
    pd = hca.alloc_pd();
    cq = hca.create_cq(kCqSize);
    vib::platform::QueuePairInit init;
    init.send_cq = init.recv_cq = cq.get();
    init.cap = queue_caps();
    qp = hca.create_qp(*pd, init);
    mr = hca.reg_mr(*pd, buffer.data, kBufferSize, reinterpret_cast<std::uintptr_t>(buffer.data), kAccess);
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

  explicit VibEndpoint(vib::platform::XenTarget xen) {
    vib::front::ChannelOptions options;
    options.xen = xen;
    device = vib::front::Device::open(options);
    pd = device->alloc_pd();
    cq = device->create_cq(kCqSize);
    vib::front::QpInit init;
    init.send_cq = init.recv_cq = cq.get();
    init.cap = queue_caps();
    qp = pd->create_qp(init);
    mr = pd->reg_mr(buffer.data, kBufferSize, kAccess);
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
};

// ---- the workload, written once ---------------------------------------------

struct Results {
  double latency_median_us = 0, latency_p99_us = 0;
  double bandwidth_mbps = 0;  // MB/s, 10^6 bytes
  double rate_mmps = 0;       // million messages per second
};

void check(const ibv_wc& wc) {
  if (wc.status != IBV_WC_SUCCESS)
    fail(std::string("completion error: ") + ibv_wc_status_str(wc.status) + " (wr_id " + std::to_string(wc.wr_id) +
         ")");
}

// Polls `ep` until a receive completion arrives (send completions are
// reaped on the way). `stop` ends the wait early (the peer failed).
template <class Ep>
void wait_recv(Ep& ep, const std::atomic<bool>& stop) {
  ibv_wc wcs[16];
  auto last = Clock::now();
  for (std::uint32_t spins = 0;; ++spins) {
    const int n = ep.poll(std::span<ibv_wc>(wcs, 16));
    if (n < 0) fail("poll_cq failed");
    bool got = false;
    for (int i = 0; i < n; ++i) {
      check(wcs[i]);
      if (wcs[i].opcode == IBV_WC_RECV) got = true;
    }
    if (got) return;
    if ((spins & 0xfff) == 0) {
      if (stop.load(std::memory_order_relaxed)) fail("peer stopped");
      if (n > 0) last = Clock::now();
      else if (Clock::now() - last > kStallLimit) fail("no completion for 10 s (ping-pong)");
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
// busy-polling its CQ. Returns the half round trips in µs, sorted.
template <class Ep>
std::vector<double> ping_pong(Ep& a, Ep& b, int iterations) {
  const int warmup = std::max(10, iterations / 10);
  const int total = warmup + iterations;
  std::atomic<bool> stop{false};
  std::exception_ptr b_error;
  post_recv8(a);
  post_recv8(b);
  std::thread responder([&] {
    try {
      for (int i = 0; i < total; ++i) {
        wait_recv(b, stop);
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
      wait_recv(a, stop);
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
  const std::size_t slots = kBufferSize / size;
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

template <class Ep>
Results run_workload(Ep& a, Ep& b, int iterations) {
  Results r;
  const auto lat = ping_pong(a, b, iterations);
  r.latency_median_us = lat[lat.size() / 2];
  r.latency_p99_us = lat[std::min(lat.size() - 1, lat.size() * 99 / 100)];

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
  auto hca = vib::platform::open_hca("soft");
  Results r;
  {
    DirectEndpoint a(*hca), b(*hca);
    a.connect(b);
    b.connect(a);
    r = run_workload(a, b, iterations);
  }
  return r;
}

// Stops vibd however the run ends.
struct Vibd {
  pid_t pid = -1;
  Vibd(const char* path, const std::string& dir, const std::string& log) : pid(vib::test::spawn_vibd(path, dir, log)) {}
  ~Vibd() { vib::test::stop_vibd(pid); }
  Vibd(const Vibd&) = delete;
  Vibd& operator=(const Vibd&) = delete;
};

Results run_via_vib(int iterations, const std::string& log) {
  vib::test::LocalXen xen;
  xen.create_domain(5);
  xen.create_domain(6);
  auto store = vib::platform::open_xenstore(xen.as(0));
  for (vib::platform::DomId d : {vib::platform::DomId{5}, vib::platform::DomId{6}})
    vib::platform::with_transaction(
        *store, [&](vib::platform::TransactionId tx) { vib::test::provision_device(*store, tx, d, "soft"); });
  Vibd vibd(VIBD, xen.dir(), log.empty() ? xen.dir() + "/vibd.log" : log);
  for (vib::platform::DomId d : {vib::platform::DomId{5}, vib::platform::DomId{6}}) {
    const auto path = vib::test::backend_path(d) + "/state";
    const auto deadline = Clock::now() + 10s;
    while (store->read(vib::platform::kNoTransaction, path) != std::optional<std::string>("2")) {
      if (Clock::now() > deadline) fail("vibd did not bring up the device of domain " + std::to_string(d));
      std::this_thread::sleep_for(10ms);
    }
  }
  Results r;
  {
    VibEndpoint a(xen.as(5)), b(xen.as(6));
    a.connect(b);
    b.connect(a);
    r = run_workload(a, b, iterations);
  }
  return r;
}

void usage(FILE* out) {
  std::fprintf(out,
               "usage: vib-bench [--iterations N] [--quick] [--vibd-log FILE] [--help]\n"
               "RC latency / bandwidth / message rate, soft HCA direct vs through vib (vibd).\n"
               "  --iterations N  ping-pongs per latency run; 5*N 64 KiB writes and 100*N 8-byte\n"
               "                  writes (default 1000)\n"
               "  --quick         300 iterations (a smoke run)\n"
               "  --vibd-log FILE keep vibd's log there (default: removed with the local Xen)\n");
}

}  // namespace

int main(int argc, char** argv) {
  int iterations = 1000;
  std::string vibd_log;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      usage(stdout);
      return 0;
    } else if (arg == "--quick") {
      iterations = 300;
    } else if (arg == "--vibd-log" && i + 1 < argc) {
      vibd_log = argv[++i];
    } else if (arg == "--iterations" && i + 1 < argc) {
      char* end = nullptr;
      const long n = std::strtol(argv[++i], &end, 10);
      if (end == argv[i] || *end != '\0' || n < 10 || n > 100000000) {
        std::fprintf(stderr, "vib-bench: --iterations wants a number >= 10, got '%s'\n", argv[i]);
        return 2;
      }
      iterations = static_cast<int>(n);
    } else {
      std::fprintf(stderr, "vib-bench: unknown argument '%s'\n", arg.c_str());
      usage(stderr);
      return 2;
    }
  }
  try {
    const unsigned cpus = std::thread::hardware_concurrency();
    std::printf("vib-bench: RC, %d iterations, %u CPUs (hardware_concurrency)\n", iterations, cpus);
    std::fflush(stdout);
    const Results direct = run_direct(iterations);
    const Results via = run_via_vib(iterations, vibd_log);
    std::printf("\n%-34s %12s %12s %12s\n", "metric", "direct", "via vib", "vib/direct");
    auto row = [](const char* name, double d, double v) {
      std::printf("%-34s %12.2f %12.2f %12.2f\n", name, d, v, d > 0 ? v / d : 0.0);
    };
    row("latency median (us, half RTT)", direct.latency_median_us, via.latency_median_us);
    row("latency p99 (us, half RTT)", direct.latency_p99_us, via.latency_p99_us);
    row("bandwidth 64 KiB x16 (MB/s)", direct.bandwidth_mbps, via.bandwidth_mbps);
    row("msg rate 8 B x64 (M msgs/s)", direct.rate_mmps, via.rate_mmps);
    if (cpus <= 2)
      std::printf("\nnote: %u CPUs for 4 busy-polling threads (2 guest threads + vibd's 2 context workers);\n"
                  "      via-vib latency is dominated by CPU sharing on this machine.\n",
                  cpus);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vib-bench: error: %s\n", e.what());
    return 1;
  }
}
