// rdma_check: moves data over an RC queue pair with plain libibverbs and
// checks every byte on the side that receives it. `ibv_rc_pingpong -c`
// verifies nothing useful (its pattern is constant), so the lab and the host
// tests use this to prove that data goes through a device intact: natively
// over rxe, and through vib's libibverbs.so.1.
//
//   rdma_check [-d DEVICE] [-i IB_PORT] [-g GID_INDEX] [-p TCP_PORT]
//              [-n ITERATIONS] [-s MAX_SIZE]            (server)
//   rdma_check [same options] [-x] SERVER_HOST          (client)
//
// The two exchange their QP's address, buffer address and rkey over TCP,
// then, for every iteration (a size from 1 byte to MAX_SIZE, a pattern that
// differs per iteration and operation), the client posts a SEND with
// immediate, an RDMA WRITE, an RDMA WRITE with immediate, an RDMA READ and
// (when the device has them) a fetch-and-add and a compare-and-swap. The
// server checks what it received or had written (and that nothing was
// written past the end), the client what it read and the atomics' old
// values. Any mismatch, error status or timeout: a message saying which
// iteration, operation, size and byte, and exit status 1, on both sides.
//
// With -r N, a side whose device is lost (an operation fails and the device
// reports IBV_EVENT_DEVICE_FATAL: vib's back-end restarted, the guest was
// saved and restored) closes everything, opens the device again (waiting up
// to 60 s for it to come back), reconnects with its peer over the same TCP
// connection and redoes the interrupted iteration, at most N times; the
// peer, told over TCP, does the same. With -E M the client ends the run M
// iterations after the first such recovery (-n stays the upper bound).
#include <arpa/inet.h>
#include <endian.h>
#include <infiniband/verbs.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace std::chrono_literals;

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The peer lost its device and is reconnecting (recovery `number`).
struct PeerLost : Failure {
  explicit PeerLost(unsigned n) : Failure("the peer lost its device"), number(n) {}
  unsigned number;
};

[[noreturn]] void fail(const std::string& what) { throw Failure(what); }

__attribute__((format(printf, 1, 2))) std::string format(const char* fmt, ...) {
  std::array<char, 512> buf{};
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf.data(), buf.size(), fmt, args);
  va_end(args);
  return buf.data();
}

struct Options {
  std::string device;  // empty: the first one
  int ib_port = 1;
  int gid_index = -1;  // < 0: address by LID, no GRH
  std::string tcp_port = "18515";
  unsigned iterations = 10;
  std::size_t max_size = 64 * 1024;
  std::string server;  // empty: this is the server
  // Self-test (-x): the client flips one byte of what it writes in the last
  // iteration, so the server must report a mismatch and both exit 1.
  bool corrupt_last_write = false;
  unsigned recoveries = 0;  // -r: how often a lost device may be reopened
  unsigned end_after = 0;   // -E (client): iterations after the first recovery; 0: run to -n
};

// ---- verbs resources, each released by its owner ----

template <auto Release>
struct Releaser {
  template <typename T>
  void operator()(T* p) const noexcept {
    if (p) Release(p);
  }
};
using DeviceList = std::unique_ptr<ibv_device*, Releaser<ibv_free_device_list>>;
using Context = std::unique_ptr<ibv_context, Releaser<ibv_close_device>>;
using Pd = std::unique_ptr<ibv_pd, Releaser<ibv_dealloc_pd>>;
using Mr = std::unique_ptr<ibv_mr, Releaser<ibv_dereg_mr>>;
using Cq = std::unique_ptr<ibv_cq, Releaser<ibv_destroy_cq>>;
using Qp = std::unique_ptr<ibv_qp, Releaser<ibv_destroy_qp>>;

struct FreeAligned {
  void operator()(std::uint8_t* p) const noexcept { std::free(p); }
};
using Buffer = std::unique_ptr<std::uint8_t, FreeAligned>;

class Socket {
 public:
  explicit Socket(int fd = -1) : fd_(fd) {}
  Socket(Socket&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
  Socket& operator=(Socket&& other) noexcept {
    std::swap(fd_, other.fd_);
    return *this;
  }
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;
  ~Socket() {
    if (fd_ >= 0) ::close(fd_);
  }
  int fd() const { return fd_; }
  // Whether `n` bytes are waiting, copied into `data` and left there.
  bool peek(void* data, std::size_t n) const {
    return ::recv(fd_, data, n, MSG_PEEK | MSG_DONTWAIT) == static_cast<ssize_t>(n);
  }

  void send_all(const void* data, std::size_t n) const {
    const auto* p = static_cast<const std::uint8_t*>(data);
    while (n > 0) {
      const ssize_t r = ::send(fd_, p, n, MSG_NOSIGNAL);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) fail(std::string("TCP send to the peer: ") + std::strerror(errno));
      p += r;
      n -= static_cast<std::size_t>(r);
    }
  }
  void recv_all(void* data, std::size_t n) const {
    auto* p = static_cast<std::uint8_t*>(data);
    while (n > 0) {
      const ssize_t r = ::recv(fd_, p, n, 0);
      if (r < 0 && errno == EINTR) continue;
      if (r == 0) fail("the peer closed the TCP connection (it failed: see its output)");
      if (r < 0) fail(std::string("TCP receive from the peer: ") + std::strerror(errno));
      p += r;
      n -= static_cast<std::size_t>(r);
    }
  }

 private:
  int fd_;
};

Socket tcp_listen_and_accept(const std::string& port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* found = nullptr;
  if (::getaddrinfo(nullptr, port.c_str(), &hints, &found) != 0) fail("cannot resolve TCP port " + port);
  std::unique_ptr<addrinfo, Releaser<freeaddrinfo>> addresses(found);
  // IPv6 first, taking IPv4 too; IPv4 alone where a kernel has no IPv6.
  for (const int family : {AF_INET6, AF_INET}) {
    for (const addrinfo* a = found; a; a = a->ai_next) {
      if (a->ai_family != family) continue;
      Socket listener(::socket(a->ai_family, a->ai_socktype, 0));
      if (listener.fd() < 0) continue;
      const int off = 0, on = 1;
      if (family == AF_INET6) ::setsockopt(listener.fd(), IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
      ::setsockopt(listener.fd(), SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
      if (::bind(listener.fd(), a->ai_addr, a->ai_addrlen) != 0 || ::listen(listener.fd(), 1) != 0) continue;
      Socket peer(::accept(listener.fd(), nullptr, nullptr));
      if (peer.fd() < 0) fail(std::string("accept: ") + std::strerror(errno));
      return peer;
    }
  }
  fail("cannot listen on TCP port " + port + ": " + std::strerror(errno));
}

// The server may not listen yet: retries for 30 s.
Socket tcp_connect(const std::string& host, const std::string& port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  for (;;) {
    addrinfo* found = nullptr;
    if (::getaddrinfo(host.c_str(), port.c_str(), &hints, &found) != 0) fail("cannot resolve " + host);
    std::unique_ptr<addrinfo, Releaser<freeaddrinfo>> addresses(found);
    for (const addrinfo* a = found; a; a = a->ai_next) {
      Socket s(::socket(a->ai_family, a->ai_socktype, 0));
      if (s.fd() >= 0 && ::connect(s.fd(), a->ai_addr, a->ai_addrlen) == 0) return s;
    }
    if (std::chrono::steady_clock::now() > deadline) fail("cannot connect to " + host + " port " + port);
    std::this_thread::sleep_for(100ms);
  }
}

// ---- what the two sides exchange (integers in network byte order) ----

struct Endpoint {
  std::uint32_t qpn, psn;
  std::uint16_t lid, pad;
  std::array<std::uint8_t, 16> gid;
  std::uint64_t buffer_addr;
  std::uint32_t rkey;
  std::uint32_t atomics;  // 1: the device does atomics
};

// One step of the handshake. Every message is a Message; an EndpointFollows
// one is followed by an Endpoint. Reconnect carries the recovery's number.
enum class Step : std::uint32_t { Ready = 1, ClientDone, Verified, Mismatch, Begin, Stop, EndpointFollows, Reconnect };
struct Message {
  std::uint32_t step, iteration;
};

void send_step(const Socket& s, Step step, unsigned iteration) {
  const Message m{htonl(static_cast<std::uint32_t>(step)), htonl(iteration)};
  s.send_all(&m, sizeof m);
}
// The next message; a Reconnect is thrown as PeerLost, a Mismatch as the
// peer's failure.
Message next_message(const Socket& s, unsigned iteration) {
  Message m{};
  s.recv_all(&m, sizeof m);
  m.step = ntohl(m.step);
  m.iteration = ntohl(m.iteration);
  if (static_cast<Step>(m.step) == Step::Reconnect) throw PeerLost(m.iteration);
  if (static_cast<Step>(m.step) == Step::Mismatch)
    fail(format("iteration %u: the peer found a mismatch or an error (see its output)", iteration));
  return m;
}
void check_step(const Message& m, Step step, unsigned iteration) {
  if (static_cast<Step>(m.step) != step || m.iteration != iteration)
    fail(format("iteration %u: out of step with the peer (got step %u of iteration %u)", iteration, m.step,
                m.iteration));
}
void expect_step(const Socket& s, Step step, unsigned iteration) {
  check_step(next_message(s, iteration), step, iteration);
}

// ---- the data: one buffer per side, in fixed regions of max_size bytes ----

enum Region : std::size_t {
  kSendSource, kWriteSource, kWriteImmSource, kReadTarget,  // client's
  kReceive, kWriteTarget, kWriteImmTarget, kReadSource,     // server's
  kAtomicWords,                                              // 8-byte words
  kRegions
};

enum class Op : std::uint8_t { Send = 1, Write, WriteImm, Read };
const char* name(Op op) {
  switch (op) {
    case Op::Send: return "SEND with immediate";
    case Op::Write: return "RDMA WRITE";
    case Op::WriteImm: return "RDMA WRITE with immediate";
    case Op::Read: return "RDMA READ";
  }
  return "?";
}

// Byte `offset` of what `op` carries in `iteration`: a hash, so that every
// iteration, operation and offset differ and a stale or shifted byte shows.
std::uint8_t pattern(unsigned iteration, Op op, std::size_t offset) {
  std::uint32_t h = (iteration + 1) * 0x9E3779B1u ^ static_cast<std::uint32_t>(op) * 0x85EBCA77u;
  h ^= static_cast<std::uint32_t>(offset) * 0xC2B2AE3Du;
  h ^= h >> 15;
  h *= 0x27D4EB2Fu;
  h ^= h >> 13;
  return static_cast<std::uint8_t>(h);
}
constexpr std::uint8_t kPoison = 0xE5;  // what a target holds before it is written

void fill(std::span<std::uint8_t> bytes, unsigned iteration, Op op) {
  for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = pattern(iteration, op, i);
}

// Every byte of `bytes` against the pattern; the byte after it (`guard`,
// if any) must still be poison: nothing was written past the end.
void verify(std::span<const std::uint8_t> bytes, const std::uint8_t* guard, unsigned iteration, Op op) {
  std::size_t wrong = 0, first = 0;
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    if (bytes[i] != pattern(iteration, op, i) && wrong++ == 0) first = i;
  }
  if (wrong > 0)
    fail(format("iteration %u, %s of %zu bytes: %zu bytes differ, the first at offset %zu (0x%02x, expected 0x%02x)",
                iteration, name(op), bytes.size(), wrong, first, bytes[first], pattern(iteration, op, first)));
  if (guard && *guard != kPoison)
    fail(format("iteration %u, %s of %zu bytes: the byte after the end was overwritten (0x%02x)", iteration,
                name(op), bytes.size(), *guard));
}

// 1, 2, 3 ... sizes that cross no boundary and sizes that cross pages, up
// to max_size in the last iterations.
std::size_t size_of(unsigned iteration, std::size_t max_size) {
  static constexpr std::array<std::size_t, 8> kSizes{1, 63, 4096, 4097, 12345, 32768, 65535, 65536};
  const std::size_t s = kSizes[iteration % kSizes.size()];
  return s < max_size ? s : max_size;
}
std::uint32_t immediate(unsigned iteration, Op op) { return (iteration << 8) ^ static_cast<std::uint32_t>(op) ^ 0x5A000000u; }
std::uint64_t atomic_start(unsigned iteration) { return 0x0123456789ABCDEFull ^ iteration; }
std::uint64_t atomic_add(unsigned iteration) { return 1000u + iteration; }
std::uint64_t atomic_swap(unsigned iteration) { return ~static_cast<std::uint64_t>(iteration) << 3; }

// ---- one side: device, QP, buffer ----

class Side {
 public:
  // `peer`: watched while waiting for completions, for a Reconnect.
  Side(const Options& o, const Socket& peer) : options_(o), peer_(peer) {
    int n = 0;
    DeviceList list(ibv_get_device_list(&n));
    if (!list || n == 0) fail("no RDMA device");
    ibv_device* device = nullptr;
    for (int i = 0; i < n; ++i)
      if (o.device.empty() || o.device == ibv_get_device_name(list.get()[i])) { device = list.get()[i]; break; }
    if (!device) fail("no RDMA device " + o.device);
    device_name_ = ibv_get_device_name(device);
    context_.reset(ibv_open_device(device));
    if (!context_) fail("cannot open " + device_name_);
    ibv_device_attr dev{};
    if (ibv_query_device(context_.get(), &dev) != 0) fail("ibv_query_device failed on " + device_name_);
    atomics_ = dev.atomic_cap != IBV_ATOMIC_NONE;
    if (ibv_query_port(context_.get(), static_cast<std::uint8_t>(o.ib_port), &port_) != 0)
      fail(format("cannot query port %d of %s", o.ib_port, device_name_.c_str()));
    if (port_.state != IBV_PORT_ACTIVE) fail(format("port %d of %s is not active", o.ib_port, device_name_.c_str()));

    region_ = (o.max_size + 4095) / 4096 * 4096;
    buffer_size_ = region_ * kRegions;
    buffer_.reset(static_cast<std::uint8_t*>(std::aligned_alloc(4096, buffer_size_)));
    if (!buffer_) fail("out of memory");
    std::memset(buffer_.get(), kPoison, buffer_size_);

    pd_.reset(ibv_alloc_pd(context_.get()));
    if (!pd_) fail("ibv_alloc_pd failed");
    mr_.reset(ibv_reg_mr(pd_.get(), buffer_.get(), buffer_size_,
                         IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ |
                             (atomics_ ? IBV_ACCESS_REMOTE_ATOMIC : 0)));
    if (!mr_) fail(format("ibv_reg_mr of %zu bytes failed: %s", buffer_size_, std::strerror(errno)));
    send_cq_.reset(ibv_create_cq(context_.get(), 16, nullptr, nullptr, 0));
    recv_cq_.reset(ibv_create_cq(context_.get(), 16, nullptr, nullptr, 0));
    if (!send_cq_ || !recv_cq_) fail("ibv_create_cq failed");
    ibv_qp_init_attr init{};
    init.send_cq = send_cq_.get();
    init.recv_cq = recv_cq_.get();
    init.qp_type = IBV_QPT_RC;
    init.cap.max_send_wr = 8;
    init.cap.max_recv_wr = 8;
    init.cap.max_send_sge = 1;
    init.cap.max_recv_sge = 1;
    qp_.reset(ibv_create_qp(pd_.get(), &init));
    if (!qp_) fail(format("ibv_create_qp failed: %s", std::strerror(errno)));
    ibv_qp_attr attr{};
    attr.qp_state = IBV_QPS_INIT;
    attr.pkey_index = 0;
    attr.port_num = static_cast<std::uint8_t>(o.ib_port);
    attr.qp_access_flags = IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ | (atomics_ ? IBV_ACCESS_REMOTE_ATOMIC : 0);
    if (ibv_modify_qp(qp_.get(), &attr, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS) != 0)
      fail("cannot move the QP to INIT");
  }

  Endpoint local_endpoint() const {
    Endpoint e{};
    e.qpn = htonl(qp_->qp_num);
    e.psn = htonl(qp_->qp_num * 7919u & 0xFFFFFFu);
    e.lid = htons(port_.lid);
    if (options_.gid_index >= 0) {
      ibv_gid gid{};
      if (ibv_query_gid(context_.get(), static_cast<std::uint8_t>(options_.ib_port), options_.gid_index, &gid) != 0)
        fail(format("cannot read GID %d", options_.gid_index));
      // RoCE fills GID entries in from the netdev's addresses, asynchronously.
      if (std::all_of(std::begin(gid.raw), std::end(gid.raw), [](std::uint8_t b) { return b == 0; }))
        fail(format("GID %d is empty (on RoCE: the interface has no such address yet)", options_.gid_index));
      std::memcpy(e.gid.data(), gid.raw, 16);
    }
    e.buffer_addr = htobe64(reinterpret_cast<std::uintptr_t>(buffer_.get()));
    e.rkey = htonl(mr_->rkey);
    e.atomics = htonl(atomics_ ? 1 : 0);
    return e;
  }

  // INIT -> RTR -> RTS towards `peer`.
  void connect(const Endpoint& peer) {
    peer_addr_ = be64toh(peer.buffer_addr);
    peer_rkey_ = ntohl(peer.rkey);
    peer_atomics_ = ntohl(peer.atomics) == 1;
    ibv_qp_attr attr{};
    attr.qp_state = IBV_QPS_RTR;
    attr.path_mtu = port_.active_mtu;
    attr.dest_qp_num = ntohl(peer.qpn);
    attr.rq_psn = ntohl(peer.psn);
    attr.max_dest_rd_atomic = 1;
    attr.min_rnr_timer = 12;
    attr.ah_attr.dlid = ntohs(peer.lid);
    attr.ah_attr.port_num = static_cast<std::uint8_t>(options_.ib_port);
    if (options_.gid_index >= 0) {
      attr.ah_attr.is_global = 1;
      std::memcpy(attr.ah_attr.grh.dgid.raw, peer.gid.data(), 16);
      attr.ah_attr.grh.sgid_index = static_cast<std::uint8_t>(options_.gid_index);
      attr.ah_attr.grh.hop_limit = 1;
    }
    if (ibv_modify_qp(qp_.get(), &attr,
                      IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                          IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER) != 0)
      fail("cannot move the QP to RTR");
    attr = {};
    attr.qp_state = IBV_QPS_RTS;
    attr.sq_psn = ntohl(local_endpoint().psn);
    attr.timeout = 14;
    attr.retry_cnt = 7;
    attr.rnr_retry = 7;
    attr.max_rd_atomic = 1;
    if (ibv_modify_qp(qp_.get(), &attr,
                      IBV_QP_STATE | IBV_QP_SQ_PSN | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
                          IBV_QP_MAX_QP_RD_ATOMIC) != 0)
      fail("cannot move the QP to RTS");
  }

  std::span<std::uint8_t> region(Region r, std::size_t size) { return {buffer_.get() + r * region_, size}; }
  std::uint8_t* after(Region r, std::size_t size) { return size < region_ ? buffer_.get() + r * region_ + size : nullptr; }
  void poison(Region r) { std::memset(buffer_.get() + r * region_, kPoison, region_); }
  std::uint64_t& atomic_word(std::size_t i) { return reinterpret_cast<std::uint64_t*>(region(kAtomicWords, 0).data())[i]; }

  bool atomics() const { return atomics_ && peer_atomics_; }
  const std::string& device_name() const { return device_name_; }

  void post_receive(Region r) {
    ibv_sge sge{reinterpret_cast<std::uintptr_t>(region(r, 0).data()), static_cast<std::uint32_t>(region_), mr_->lkey};
    ibv_recv_wr wr{};
    wr.wr_id = r;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    ibv_recv_wr* bad = nullptr;
    if (ibv_post_recv(qp_.get(), &wr, &bad) != 0) fail("ibv_post_recv failed");
  }

  // Posts one signalled work request from local `source` (length `size`)
  // to the peer's `target` region (or a word of it) and waits for it.
  ibv_wc post_and_wait(ibv_wr_opcode opcode, std::uint8_t* source, std::size_t size, std::uint64_t remote,
                       const char* what, unsigned iteration, std::uint32_t imm = 0, std::uint64_t compare_add = 0,
                       std::uint64_t swap = 0) {
    ibv_sge sge{reinterpret_cast<std::uintptr_t>(source), static_cast<std::uint32_t>(size), mr_->lkey};
    ibv_send_wr wr{};
    wr.wr_id = iteration;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = opcode;
    wr.send_flags = IBV_SEND_SIGNALED;
    wr.imm_data = htonl(imm);
    if (opcode == IBV_WR_ATOMIC_FETCH_AND_ADD || opcode == IBV_WR_ATOMIC_CMP_AND_SWP) {
      wr.wr.atomic.remote_addr = remote;
      wr.wr.atomic.rkey = peer_rkey_;
      wr.wr.atomic.compare_add = compare_add;
      wr.wr.atomic.swap = swap;
    } else {
      wr.wr.rdma.remote_addr = remote;
      wr.wr.rdma.rkey = peer_rkey_;
    }
    ibv_send_wr* bad = nullptr;
    if (ibv_post_send(qp_.get(), &wr, &bad) != 0)
      fail(format("iteration %u: posting %s of %zu bytes failed: %s", iteration, what, size, std::strerror(errno)));
    return wait(send_cq_.get(), what, iteration);
  }
  ibv_wc wait_receive(const char* what, unsigned iteration) { return wait(recv_cq_.get(), what, iteration); }

  std::uint64_t peer_region(Region r) const { return peer_addr_ + r * region_; }

  // Whether the device reports IBV_EVENT_DEVICE_FATAL within `limit`
  // (other async events are acknowledged and passed over).
  bool device_lost(std::chrono::milliseconds limit) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    for (;;) {
      const auto left =
          std::chrono::ceil<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      pollfd p{context_->async_fd, POLLIN, 0};
      if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) <= 0) return false;
      ibv_async_event event{};
      if (ibv_get_async_event(context_.get(), &event) != 0) return false;
      const ibv_event_type type = event.event_type;
      ibv_ack_async_event(&event);
      if (type == IBV_EVENT_DEVICE_FATAL) return true;
    }
  }

 private:
  // One completion from `cq` within 30 s, successful. Polls with a growing
  // pause: the lab's guests have one virtual CPU for both processes. A peer
  // that lost its device meanwhile says so (PeerLost): this QP's partner is
  // gone, so no completion may come.
  ibv_wc wait(ibv_cq* cq, const char* what, unsigned iteration) const {
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    auto pause = 1us;
    ibv_wc wc{};
    for (unsigned polls = 0;; ++polls) {
      const int n = ibv_poll_cq(cq, 1, &wc);
      if (n < 0) fail(format("iteration %u, %s: ibv_poll_cq failed", iteration, what));
      if (n == 1) break;
      if (std::chrono::steady_clock::now() > deadline)
        fail(format("iteration %u, %s: no completion within 30 s", iteration, what));
      Message m{};
      if (polls % 64 == 63 && peer_.peek(&m, sizeof m) && static_cast<Step>(ntohl(m.step)) == Step::Reconnect)
        next_message(peer_, iteration);  // throws PeerLost
      std::this_thread::sleep_for(pause);
      if (pause < 1ms) pause *= 2;
    }
    if (wc.status != IBV_WC_SUCCESS)
      fail(format("iteration %u, %s: completion status %s (%d), vendor error 0x%x", iteration, what,
                  ibv_wc_status_str(wc.status), wc.status, wc.vendor_err));
    return wc;
  }

  const Options& options_;
  const Socket& peer_;
  std::string device_name_;
  bool atomics_ = false, peer_atomics_ = false;
  ibv_port_attr port_{};
  std::size_t region_ = 0, buffer_size_ = 0;
  std::uint64_t peer_addr_ = 0;
  std::uint32_t peer_rkey_ = 0;
  // Members in teardown order, reversed: the QP goes before its CQs, the MR
  // before its buffer and PD, everything before the context.
  Context context_;
  Buffer buffer_;
  Pd pd_;
  Mr mr_;
  Cq send_cq_, recv_cq_;
  Qp qp_;
};

void expect_receive(const ibv_wc& wc, ibv_wc_opcode opcode, std::size_t size, std::uint32_t imm, Op op, unsigned iteration) {
  if (wc.opcode != opcode)
    fail(format("iteration %u, %s: receive completion with opcode %d, expected %d", iteration, name(op), wc.opcode, opcode));
  if (opcode == IBV_WC_RECV && wc.byte_len != size)
    fail(format("iteration %u, %s: %u bytes arrived, %zu were sent", iteration, name(op), wc.byte_len, size));
  if (!(wc.wc_flags & IBV_WC_WITH_IMM) || ntohl(wc.imm_data) != imm)
    fail(format("iteration %u, %s: immediate 0x%08x (flags 0x%x), expected 0x%08x", iteration, name(op),
                ntohl(wc.imm_data), wc.wc_flags, imm));
}

// The passive side: receives and checks.
void serve_iteration(Side& side, const Socket& peer, unsigned it, std::size_t size) {
  for (Region r : {kReceive, kWriteTarget, kWriteImmTarget}) side.poison(r);
  fill(side.region(kReadSource, size), it, Op::Read);
  side.atomic_word(0) = atomic_start(it);
  side.post_receive(kReceive);  // SEND
  side.post_receive(kReceive);  // WRITE with immediate (consumes one, places nothing)
  send_step(peer, Step::Ready, it);

  const ibv_wc send_wc = side.wait_receive(name(Op::Send), it);
  expect_receive(send_wc, IBV_WC_RECV, size, immediate(it, Op::Send), Op::Send, it);
  verify(side.region(kReceive, size), side.after(kReceive, size), it, Op::Send);
  const ibv_wc imm_wc = side.wait_receive(name(Op::WriteImm), it);
  expect_receive(imm_wc, IBV_WC_RECV_RDMA_WITH_IMM, size, immediate(it, Op::WriteImm), Op::WriteImm, it);
  verify(side.region(kWriteImmTarget, size), side.after(kWriteImmTarget, size), it, Op::WriteImm);

  expect_step(peer, Step::ClientDone, it);
  verify(side.region(kWriteTarget, size), side.after(kWriteTarget, size), it, Op::Write);
  if (side.atomics()) {
    const std::uint64_t expected = atomic_swap(it);
    if (side.atomic_word(0) != expected)
      fail(format("iteration %u: the atomic word is 0x%016llx after fetch-and-add and compare-and-swap, expected 0x%016llx",
                  it, static_cast<unsigned long long>(side.atomic_word(0)), static_cast<unsigned long long>(expected)));
  }
  send_step(peer, Step::Verified, it);
}

// The active side: sends, writes, reads and checks what it read.
void drive_iteration(Side& side, const Socket& peer, unsigned it, std::size_t size, bool corrupt) {
  side.poison(kReadTarget);
  fill(side.region(kSendSource, size), it, Op::Send);
  fill(side.region(kWriteSource, size), it, Op::Write);
  fill(side.region(kWriteImmSource, size), it, Op::WriteImm);
  if (corrupt) side.region(kWriteSource, size)[size / 2] ^= 0x01;
  expect_step(peer, Step::Ready, it);

  side.post_and_wait(IBV_WR_SEND_WITH_IMM, side.region(kSendSource, 0).data(), size, 0, name(Op::Send), it,
                     immediate(it, Op::Send));
  side.post_and_wait(IBV_WR_RDMA_WRITE, side.region(kWriteSource, 0).data(), size, side.peer_region(kWriteTarget),
                     name(Op::Write), it);
  side.post_and_wait(IBV_WR_RDMA_WRITE_WITH_IMM, side.region(kWriteImmSource, 0).data(), size,
                     side.peer_region(kWriteImmTarget), name(Op::WriteImm), it, immediate(it, Op::WriteImm));
  side.post_and_wait(IBV_WR_RDMA_READ, side.region(kReadTarget, 0).data(), size, side.peer_region(kReadSource),
                     name(Op::Read), it);
  verify(side.region(kReadTarget, size), side.after(kReadTarget, size), it, Op::Read);

  if (side.atomics()) {
    auto* result = reinterpret_cast<std::uint8_t*>(&side.atomic_word(1));
    const std::uint64_t start = atomic_start(it), added = start + atomic_add(it);
    side.atomic_word(1) = 0;
    side.post_and_wait(IBV_WR_ATOMIC_FETCH_AND_ADD, result, 8, side.peer_region(kAtomicWords), "fetch-and-add", it, 0,
                       atomic_add(it));
    if (side.atomic_word(1) != start)
      fail(format("iteration %u: fetch-and-add returned 0x%016llx, expected 0x%016llx", it,
                  static_cast<unsigned long long>(side.atomic_word(1)), static_cast<unsigned long long>(start)));
    side.atomic_word(1) = 0;
    side.post_and_wait(IBV_WR_ATOMIC_CMP_AND_SWP, result, 8, side.peer_region(kAtomicWords), "compare-and-swap", it,
                       0, added, atomic_swap(it));
    if (side.atomic_word(1) != added)
      fail(format("iteration %u: compare-and-swap returned 0x%016llx, expected 0x%016llx", it,
                  static_cast<unsigned long long>(side.atomic_word(1)), static_cast<unsigned long long>(added)));
  }
  send_step(peer, Step::ClientDone, it);
  expect_step(peer, Step::Verified, it);
}

Options parse(int argc, char** argv) {
  Options o;
  int c;
  while ((c = ::getopt(argc, argv, "d:i:g:p:n:s:xr:E:")) != -1) {
    switch (c) {
      case 'd': o.device = optarg; break;
      case 'i': o.ib_port = std::atoi(optarg); break;
      case 'g': o.gid_index = std::atoi(optarg); break;
      case 'p': o.tcp_port = optarg; break;
      case 'n': o.iterations = static_cast<unsigned>(std::strtoul(optarg, nullptr, 10)); break;
      case 's': o.max_size = std::strtoul(optarg, nullptr, 10); break;
      case 'x': o.corrupt_last_write = true; break;
      case 'r': o.recoveries = static_cast<unsigned>(std::strtoul(optarg, nullptr, 10)); break;
      case 'E': o.end_after = static_cast<unsigned>(std::strtoul(optarg, nullptr, 10)); break;
      default:
        std::fprintf(stderr, "usage: %s [-d device] [-i ib_port] [-g gid_index] [-p tcp_port] [-n iterations] "
                             "[-s max_size] [-x] [-r recoveries] [-E iterations_after_recovery] [server_host]\n",
                     argv[0]);
        std::exit(2);
    }
  }
  if (optind < argc) o.server = argv[optind];
  if (o.max_size == 0 || o.max_size > (1u << 30) || o.iterations == 0 || o.ib_port < 1 || o.ib_port > 255) {
    std::fprintf(stderr, "%s: bad -s, -n or -i\n", argv[0]);
    std::exit(2);
  }
  return o;
}

// A run: the TCP connection to the peer first, then the device and its
// QP, which -r lets it open again when the device is lost.
class Session {
 public:
  Session(const Options& o, Socket peer) : options_(o), client_(!o.server.empty()), peer_(std::move(peer)) {}

  int run() {
    const Options& o = options_;
    std::size_t verified = 0, largest = 0;
    unsigned it = 0;
    const auto start = std::chrono::steady_clock::now();
    while (it < o.iterations) {
      const std::size_t size = size_of(it, o.max_size);
      try {
        if (!side_) open();
        if (client_) {
          if (end_at_ && it >= *end_at_) {
            send_step(peer_, Step::Stop, it);
            break;
          }
          send_step(peer_, Step::Begin, it);
          drive_iteration(*side_, peer_, it, size, o.corrupt_last_write && it + 1 == o.iterations);
        } else {
          const Message m = next_message(peer_, it);
          if (static_cast<Step>(m.step) == Step::Stop && m.iteration == it) break;
          check_step(m, Step::Begin, it);
          serve_iteration(*side_, peer_, it, size);
        }
      } catch (const PeerLost& lost) {
        recover(lost.number, /*peer_said_so=*/true, it);
        continue;
      } catch (const Failure& e) {
        if (recoveries_ < o.recoveries && side_ && side_->device_lost(10s)) {
          std::printf("rdma_check %s: iteration %u: %s; the device is lost (IBV_EVENT_DEVICE_FATAL)\n", role(), it,
                      e.what());
          recover(recoveries_ + 1, /*peer_said_so=*/false, it);
          continue;
        }
        // Tell the peer why it should stop (best effort), then report.
        try { send_step(peer_, Step::Mismatch, it); } catch (const Failure&) {}
        throw;
      }
      verified += client_ ? size : 3 * size;  // the client checks what it read, the server the rest
      largest = std::max(largest, size);
      ++it;
    }
    std::printf("rdma_check %s on %s: %u iterations of SEND with immediate, RDMA WRITE, RDMA WRITE with immediate, "
                "RDMA READ%s, 1 to %zu bytes: %zu bytes verified here, all correct\n",
                role(), side_->device_name().c_str(), it,
                side_->atomics() ? ", fetch-and-add and compare-and-swap" : " (no atomics: the device has none)",
                largest, verified);
    if (recoveries_ > 0)
      std::printf("rdma_check %s on %s: lost the device and reopened it %u times, %lld ms without it in all\n",
                  role(), side_->device_name().c_str(), recoveries_, static_cast<long long>(without_.count()));
    // The client's figure for comparing devices (natively over rxe, through
    // vib): every iteration waits for each operation's completion in turn.
    if (client_ && it > 0) {
      const auto us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - start);
      std::printf("rdma_check client on %s: %u iterations in %lld ms, %lld usec per iteration\n",
                  side_->device_name().c_str(), it, static_cast<long long>(us.count() / 1000),
                  static_cast<long long>(us.count() / it));
    }
    return 0;
  }

 private:
  const char* role() const { return client_ ? "client" : "server"; }

  // The device, its QP connected to the peer's. After a loss the device may
  // take a while to come back (a restarting back-end, a restored guest).
  void open() {
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    for (;;) {
      try {
        side_ = std::make_unique<Side>(options_, peer_);
        break;
      } catch (const Failure&) {
        if (recoveries_ == 0 || std::chrono::steady_clock::now() > deadline) throw;
        std::this_thread::sleep_for(200ms);
      }
    }
    const Endpoint mine = side_->local_endpoint();
    send_step(peer_, Step::EndpointFollows, recoveries_);
    peer_.send_all(&mine, sizeof mine);
    const Message m = next_message(peer_, 0);
    if (static_cast<Step>(m.step) != Step::EndpointFollows || m.iteration != recoveries_)
      fail(format("out of step with the peer while connecting (got step %u, %u)", m.step, m.iteration));
    Endpoint theirs{};
    peer_.recv_all(&theirs, sizeof theirs);
    side_->connect(theirs);
    std::printf("rdma_check %s on %s: connected to the peer's QP %u\n", role(), side_->device_name().c_str(),
                ntohl(theirs.qpn));
    if (recoveries_ > 0)
      without_ += std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - lost_since_);
  }

  // Lets go of everything the lost device held and agrees with the peer on
  // starting again: both send Reconnect; the side that noticed first waits
  // for the other's, passing over whatever the interrupted iteration left
  // in the connection.
  void recover(unsigned number, bool peer_said_so, unsigned iteration) {
    if (recoveries_ >= options_.recoveries)
      fail(format("iteration %u: the peer lost its device (see its output)", iteration));
    if (number != recoveries_ + 1) fail(format("the peer is at recovery %u, this side at %u", number, recoveries_ + 1));
    ++recoveries_;
    lost_since_ = std::chrono::steady_clock::now();
    side_.reset();
    send_step(peer_, Step::Reconnect, number);
    while (!peer_said_so) {
      Message m{};
      peer_.recv_all(&m, sizeof m);
      const auto step = static_cast<Step>(ntohl(m.step));
      if (step == Step::Reconnect && ntohl(m.iteration) == number) break;
      if (step == Step::Mismatch)
        fail(format("iteration %u: the peer failed while this side recovered (see its output)", iteration));
      if (step == Step::EndpointFollows) {
        Endpoint stale{};
        peer_.recv_all(&stale, sizeof stale);
      }
    }
    if (client_ && options_.end_after > 0 && !end_at_) end_at_ = iteration + options_.end_after;
  }

  const Options& options_;
  const bool client_;
  Socket peer_;
  std::unique_ptr<Side> side_;
  unsigned recoveries_ = 0;
  std::optional<unsigned> end_at_;  // the client stops before this iteration (-E)
  std::chrono::steady_clock::time_point lost_since_{};
  std::chrono::milliseconds without_{0};
};

int run(const Options& o) {
  const bool client = !o.server.empty();
  Socket peer = client ? tcp_connect(o.server, o.tcp_port) : tcp_listen_and_accept(o.tcp_port);
  return Session(o, std::move(peer)).run();
}

}  // namespace

int main(int argc, char** argv) {
  // Line by line: a run killed by a timeout still shows how far it got.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const Options options = parse(argc, argv);
  try {
    return run(options);
  } catch (const Failure& e) {
    std::fprintf(stderr, "rdma_check: FAIL: %s\n", e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rdma_check: FAIL: %s\n", e.what());
  }
  return 1;
}
