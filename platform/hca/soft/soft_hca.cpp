// The software HCA: one process-wide fabric in which every QP of this
// process can reach every other, with the checks and completion statuses of
// an InfiniBand HCA.
//
// Progress model: a work request executes synchronously inside post_send,
// against the responder's memory, when the responder can take it. A SEND or
// RDMA_WRITE_WITH_IMM finding no receive posted either fails at once with
// RNR_RETRY_EXC_ERR (rnr_retry < 7: the soft HCA does not wait out RNR
// timers) or, with rnr_retry == 7, waits in
// the requester's pending queue; every later request of that QP queues behind
// it to keep send order, and post_recv on any QP/SRQ drains pending queues.
//
// An RC request whose responder is unreachable (no such QP, not yet in RTR,
// not connected back, another partition) waits the way a real requester
// retransmits: for (retry_cnt + 1) local ACK timeouts of 4.096 us * 2^timeout
// (timeout 0: for ever, as IBA defines it), and is delivered if the responder
// becomes reachable meanwhile. Only then does it complete RETRY_EXC_ERR. A
// peer that is merely slow to reach RTR, or a final message to a peer that
// has already torn down its QP after the last reply it needed, therefore
// behaves as on a fabric. One timer thread, started on first need, sleeps
// until the earliest such deadline.
//
// Locking, so that independent pairs never wait for each other (vibd's
// workers copy guest memory inside post_send, with system calls on the
// host-local Xen): the fabric's reader-writer lock guards which objects
// exist and their attributes. Creating, destroying, modifying and
// registering take it exclusively; posting takes it shared, and with it the
// posting QP's send lock, then the responder's receive lock (or its SRQ's)
// while a message lands in a receive, then the CQ's lock while a completion
// is pushed, then the HCA's event lock. Never two locks of one level, never
// upwards. A QP's state may change while the fabric is only shared (it
// enters ERR on a failed request), so it is atomic; the rest of its
// attributes change only under the exclusive lock. The exclusive lock also
// waits for every post in flight, so a deregistered MR's memory is never
// touched afterwards. A consumer polling its CQ (a vibd worker, a
// busy-polling program) takes only the CQ's lock, and none when it is
// empty. Event fds are eventfds in semaphore mode: one count per queued
// event.
#include "soft_hca.hpp"

#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <shared_mutex>
#include <system_error>
#include <thread>

#include "vib/platform/process.hpp"
#include "vib/platform/unique_fd.hpp"

namespace vib::platform::soft {
namespace {

constexpr std::uint16_t kLid = 1;
constexpr std::uint64_t kNodeGuid = 0x0002c9fffe000001ULL;
constexpr std::uint32_t kMaxMessage = 1U << 31;
constexpr std::uint32_t kUdMtu = 4096;
constexpr std::uint32_t kGrhBytes = 40;
constexpr int kMaxQpWr = 16384;
constexpr int kMaxSge = 32;
constexpr int kMaxCqe = 65535;
constexpr std::uint32_t kMaxInline = 256;
constexpr int kPkeyCount = 4;
constexpr std::uint16_t kPkeys[kPkeyCount] = {0xffff, 0x7fff, 0x8001, 0x8002};
// MR keys: the low byte is the key variant (as hardware leaves it), the 24
// bits above it the index.
constexpr std::uint32_t kKeyStep = 0x100;
constexpr std::uint32_t kKeyIndices = 1U << 24;

// Two P_Keys let packets pass when they name the same partition (the low
// 15 bits) and at least one end is a full member (bit 15): two limited
// members never talk to each other (IBA 10.9.3).
bool same_partition(std::uint16_t a, std::uint16_t b) {
  return (a & 0x7fff) == (b & 0x7fff) && ((a | b) & 0x8000) != 0;
}

class SoftHca;
class SoftPd;
class SoftCq;
class SoftSrq;
class SoftQp;

struct MrEntry {
  SoftPd* pd;
  MemoryAccess* memory;  // the SoftMr's
  std::size_t base;      // offset of iova in memory
  std::uint64_t iova;
  std::size_t length;
  int access;
};

using Clock = std::chrono::steady_clock;

void drain_all_pending(bool look_at_every_qp = false);

// A reader-writer lock that prefers writers: a control operation must not
// wait behind an endless stream of posts, as glibc's default (readers
// first) would let it. Not recursive: a holder never takes it again.
class FabricLock {
 public:
  FabricLock() {
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&lock_, &attr);
    pthread_rwlockattr_destroy(&attr);
  }
  ~FabricLock() { pthread_rwlock_destroy(&lock_); }
  FabricLock(const FabricLock&) = delete;
  FabricLock& operator=(const FabricLock&) = delete;
  void lock() { pthread_rwlock_wrlock(&lock_); }
  void unlock() { pthread_rwlock_unlock(&lock_); }
  void lock_shared() { pthread_rwlock_rdlock(&lock_); }
  void unlock_shared() { pthread_rwlock_unlock(&lock_); }

 private:
  pthread_rwlock_t lock_;
};

struct Fabric {
  FabricLock mu;
  std::uint32_t next_qpn = 0x100;
  std::uint32_t next_key = 0x1000;
  std::map<std::uint32_t, SoftQp*> qps;
  std::map<std::uint32_t, MrEntry> mrs;  // lkey == rkey
  std::map<const ibv_ah*, ibv_ah_attr> ahs;
  std::mutex atomics_mu;  // around every atomic's read-modify-write; taken last, alone
  // Counts post_recv calls on QPs and SRQs: a requester whose SEND found no
  // receive checks it after queueing (SoftQp::post_send).
  std::atomic<std::uint64_t> receives_posted{0};

  // The retry timer starts with the fabric, not at the first retry: a
  // thread that appears when some guest's request first waits for a peer
  // would change vibd's thread count at an unforeseeable moment, and the
  // count is what administrators and the hostile suite watch for leaks.
  Fabric() {
    retry_timer = std::thread([this] {
      platform::name_this_thread("vib-soft-retry");
      run_retry_timer();
    });
  }

  // Transport retries (see the top of this file).
  void retry_at(Clock::time_point deadline) {
    std::lock_guard lock(retry_mu);
    if (!next_retry || deadline < *next_retry) {
      next_retry = deadline;
      retry_wake.notify_one();
    }
  }

  ~Fabric() {
    {
      std::lock_guard lock(retry_mu);
      stopping = true;
      retry_wake.notify_one();
    }
    if (retry_timer.joinable()) retry_timer.join();
  }

 private:
  void run_retry_timer() {
    std::unique_lock lock(retry_mu);
    while (!stopping) {
      if (!next_retry) {
        retry_wake.wait(lock);
      } else if (Clock::now() < *next_retry) {
        retry_wake.wait_until(lock, *next_retry);
      } else {
        // Requests still waiting ask again for their own deadlines.
        next_retry.reset();
        lock.unlock();
        {
          // Every QP, not only those already flagged: a request that set
          // this deadline may not be queued yet (its post_send still runs,
          // and this waits for its send lock).
          std::shared_lock objects(mu);
          drain_all_pending(true);
        }
        lock.lock();
      }
    }
  }

  std::mutex retry_mu;  // the fields below; taken last, alone
  std::optional<Clock::time_point> next_retry;
  bool stopping = false;
  std::condition_variable retry_wake;
  std::thread retry_timer;
};

Fabric& fabric() {
  static Fabric instance;
  return instance;
}

// After a QP or SRQ queued receives (fabric lock shared, no QP lock): counts
// them for a requester that has just found none (SoftQp::post_send), then
// runs the requests waiting for one.
void receives_arrived() {
  ++fabric().receives_posted;
  drain_all_pending();
}

// How long an RC requester retransmits before RETRY_EXC_ERR; nullopt: for ever.
std::optional<Clock::duration> transport_retry_window(const ibv_qp_attr& attr) {
  if (attr.timeout == 0) return std::nullopt;
  const std::chrono::nanoseconds ack_timeout(std::int64_t{4096} << attr.timeout);
  return ack_timeout * (attr.retry_cnt + 1);
}

std::system_error error(int code, const std::string& what) {
  return std::system_error(code, std::generic_category(), std::string(kSoftHcaName) + ": " + what);
}

UniqueFd make_event_fd() {
  UniqueFd fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK | EFD_SEMAPHORE));
  if (!fd) throw error(errno, "eventfd");
  return fd;
}

void signal_fd(int fd) {
  std::uint64_t one = 1;
  [[maybe_unused]] auto written = ::write(fd, &one, sizeof one);
}

void consume_fd(int fd) {
  std::uint64_t value = 0;
  [[maybe_unused]] auto got = ::read(fd, &value, sizeof value);
}

class SoftHca final : public Hca {
 public:
  using Hca::reg_mr;
  SoftHca() : name_(kSoftHcaName), completion_fd_(make_event_fd()), async_fd_(make_event_fd()) {}

  const std::string& name() const override { return name_; }
  void query_device(ibv_device_attr& attr) override;
  void query_port(std::uint8_t port, ibv_port_attr& attr) override;
  void query_gid(std::uint8_t port, int index, ibv_gid& gid) override;
  void query_pkey(std::uint8_t port, int index, std::uint16_t& pkey) override;
  std::unique_ptr<ProtectionDomain> alloc_pd() override;
  int dealloc_pd(std::unique_ptr<ProtectionDomain>& pd) override;
  std::unique_ptr<MemoryRegion> reg_mr(ProtectionDomain& pd, void* addr, std::size_t length,
                                       std::uint64_t iova, int access) override;
  std::unique_ptr<MemoryRegion> reg_mr(ProtectionDomain& pd, std::unique_ptr<MemoryAccess> memory,
                                       std::size_t offset, std::size_t length, std::uint64_t iova,
                                       int access) override;
  std::unique_ptr<CompletionQueue> create_cq(int cqe) override;
  std::unique_ptr<QueuePair> create_qp(ProtectionDomain& pd, const QueuePairInit& init) override;
  std::unique_ptr<SharedReceiveQueue> create_srq(ProtectionDomain& pd,
                                                 const ibv_srq_init_attr& init) override;
  std::unique_ptr<AddressHandle> create_ah(ProtectionDomain& pd, const ibv_ah_attr& attr) override;

  int completion_fd() override { return completion_fd_.get(); }
  CompletionQueue* next_completion_event() override {
    std::lock_guard lock(events_mu_);
    if (completion_events_.empty()) return nullptr;
    auto* cq = completion_events_.front();
    completion_events_.pop_front();
    consume_fd(completion_fd_.get());
    return cq;
  }
  int async_fd() override { return async_fd_.get(); }
  std::optional<AsyncEvent> next_async_event() override {
    std::lock_guard lock(events_mu_);
    if (async_events_.empty()) return std::nullopt;
    auto event = async_events_.front();
    async_events_.pop_front();
    consume_fd(async_fd_.get());
    return event;
  }

  void push_completion_event(CompletionQueue* cq) {
    std::lock_guard lock(events_mu_);
    completion_events_.push_back(cq);
    signal_fd(completion_fd_.get());
  }
  void push_async_event(const AsyncEvent& event) {
    std::lock_guard lock(events_mu_);
    async_events_.push_back(event);
    signal_fd(async_fd_.get());
  }
  // Drops queued events naming a dying object; the fds' counts are rebuilt
  // so POLLIN keeps meaning "an event is queued".
  void forget(const void* object) {
    std::lock_guard lock(events_mu_);
    std::erase_if(completion_events_, [&](CompletionQueue* cq) { return cq == object; });
    std::erase_if(async_events_, [&](const AsyncEvent& e) {
      return e.cq == object || e.qp == object || e.srq == object;
    });
    drain_and_refill(completion_fd_.get(), completion_events_.size());
    drain_and_refill(async_fd_.get(), async_events_.size());
  }

 private:
  static void drain_and_refill(int fd, std::size_t count) {
    std::uint64_t value = 0;
    while (::read(fd, &value, sizeof value) > 0) {
    }
    for (std::size_t i = 0; i < count; ++i) signal_fd(fd);
  }

  std::string name_;
  UniqueFd completion_fd_;
  UniqueFd async_fd_;
  std::mutex events_mu_;  // the lists below; taken last, alone
  std::deque<CompletionQueue*> completion_events_;
  std::deque<AsyncEvent> async_events_;
};

class SoftPd final : public ProtectionDomain {
 public:
  explicit SoftPd(SoftHca& hca) : hca_(hca) {}
  SoftHca& hca_;
  int users_ = 0;  // fabric lock, exclusive
};

SoftPd& soft(ProtectionDomain& pd) { return dynamic_cast<SoftPd&>(pd); }

class SoftMr final : public MemoryRegion {
 public:
  SoftMr(SoftPd& pd, std::uint32_t key, std::unique_ptr<MemoryAccess> memory)
      : pd_(pd), key_(key), memory_(std::move(memory)) {}
  ~SoftMr() override {
    std::lock_guard lock(fabric().mu);
    fabric().mrs.erase(key_);
    --pd_.users_;
  }
  std::uint32_t lkey() const override { return key_; }
  std::uint32_t rkey() const override { return key_; }

 private:
  SoftPd& pd_;
  std::uint32_t key_;
  std::unique_ptr<MemoryAccess> memory_;
};

class SoftAh final : public AddressHandle {
 public:
  SoftAh(SoftPd& pd, const ibv_ah_attr& attr) : pd_(pd) {
    fabric().ahs[&native_] = attr;
    ++pd_.users_;
  }
  ~SoftAh() override {
    std::lock_guard lock(fabric().mu);
    fabric().ahs.erase(&native_);
    --pd_.users_;
  }
  ibv_ah* native() override { return &native_; }

 private:
  SoftPd& pd_;
  ibv_ah native_{};
};

class SoftCq final : public CompletionQueue {
 public:
  SoftCq(SoftHca& hca, std::uint32_t capacity) : hca_(hca), capacity_(capacity) {}
  ~SoftCq() override {
    std::lock_guard lock(fabric().mu);
    hca_.forget(this);
  }
  int poll(std::span<ibv_wc> out) override {
    if (queued_.load(std::memory_order_acquire) == 0) return 0;
    std::lock_guard lock(mu_);
    std::size_t n = 0;
    while (n < out.size() && !entries_.empty()) {
      out[n++] = entries_.front();
      entries_.pop_front();
    }
    queued_.store(entries_.size(), std::memory_order_release);
    return static_cast<int>(n);
  }
  void request_notify(bool solicited_only) override {
    std::lock_guard lock(mu_);
    armed_ = solicited_only ? Armed::solicited : Armed::any;
  }
  std::uint32_t capacity() const override {
    std::lock_guard lock(mu_);
    return capacity_;
  }
  void resize(std::uint32_t cqe) override {
    std::lock_guard lock(mu_);
    if (cqe == 0 || cqe > static_cast<std::uint32_t>(kMaxCqe) || cqe < entries_.size())
      throw error(EINVAL, "resize_cq");
    capacity_ = cqe;
  }

  void push(const ibv_wc& wc, bool solicited) {
    bool notify = false, broken = false;
    {
      std::lock_guard lock(mu_);
      if (overrun_) return;
      if (entries_.size() >= capacity_) {
        // Hardware stops writing and reports the CQ broken; never overwrite.
        overrun_ = broken = true;
      } else {
        entries_.push_back(wc);
        queued_.store(entries_.size(), std::memory_order_release);
        if (armed_ == Armed::any || (armed_ == Armed::solicited && (solicited || wc.status != IBV_WC_SUCCESS))) {
          armed_ = Armed::none;
          notify = true;
        }
      }
    }
    if (broken) hca_.push_async_event({IBV_EVENT_CQ_ERR, nullptr, this, nullptr});
    if (notify) hca_.push_completion_event(this);
  }

 private:
  enum class Armed { none, any, solicited };
  SoftHca& hca_;
  mutable std::mutex mu_;  // the fields below
  std::uint32_t capacity_;
  std::deque<ibv_wc> entries_;
  std::atomic<std::size_t> queued_{0};  // entries_.size(), for an unlocked look
  Armed armed_ = Armed::none;
  bool overrun_ = false;
};

struct RecvRequest {
  std::uint64_t wr_id;
  std::vector<ibv_sge> sg;
};

int check_recv_list(const ibv_recv_wr* wr, const ibv_recv_wr** bad_wr, std::size_t room,
                    int max_sge, std::vector<RecvRequest>& out) {
  for (; wr != nullptr; wr = wr->next) {
    if (wr->num_sge < 0 || wr->num_sge > max_sge || (wr->num_sge > 0 && wr->sg_list == nullptr)) {
      *bad_wr = wr;
      return EINVAL;
    }
    if (out.size() >= room) {
      *bad_wr = wr;
      return ENOMEM;
    }
    out.push_back({wr->wr_id, std::vector<ibv_sge>(wr->sg_list, wr->sg_list + wr->num_sge)});
  }
  return 0;
}

class SoftSrq final : public SharedReceiveQueue {
 public:
  SoftSrq(SoftPd& pd, const ibv_srq_init_attr& init) : pd_(pd), attr_(init.attr) {
    ++pd_.users_;
  }
  ~SoftSrq() override {
    std::lock_guard lock(fabric().mu);
    pd_.hca_.forget(this);
    --pd_.users_;
  }
  int post_recv(const ibv_recv_wr* wr, const ibv_recv_wr** bad_wr) override {
    std::shared_lock objects(fabric().mu);
    int rc = 0;
    {
      std::lock_guard lock(mu);
      std::vector<RecvRequest> accepted;
      rc = check_recv_list(wr, bad_wr, attr_.max_wr - queue_.size(), static_cast<int>(attr_.max_sge),
                           accepted);
      for (auto& r : accepted) queue_.push_back(std::move(r));
    }
    receives_arrived();
    return rc;
  }
  int modify(const ibv_srq_attr& attr, int attr_mask) override {
    std::shared_lock objects(fabric().mu);
    std::lock_guard lock(mu);
    if ((attr_mask & IBV_SRQ_MAX_WR) != 0) return EINVAL;  // resize unsupported
    if ((attr_mask & IBV_SRQ_LIMIT) != 0) {
      if (attr.srq_limit > attr_.max_wr) return EINVAL;
      attr_.srq_limit = attr.srq_limit;
    }
    return 0;
  }
  int query(ibv_srq_attr& attr) override {
    std::shared_lock objects(fabric().mu);
    std::lock_guard lock(mu);
    attr = attr_;
    return 0;
  }

  // A receive lock: the responder's QPs take it while a message lands in
  // one of its receives. It guards the fields below.
  std::mutex mu;
  // mu held for these.
  bool empty() const { return queue_.empty(); }
  std::optional<RecvRequest> take() {
    if (queue_.empty()) return std::nullopt;
    auto request = std::move(queue_.front());
    queue_.pop_front();
    if (attr_.srq_limit > 0 && queue_.size() < attr_.srq_limit) {
      attr_.srq_limit = 0;  // the limit event disarms itself
      pd_.hca_.push_async_event({IBV_EVENT_SRQ_LIMIT_REACHED, nullptr, nullptr, this});
    }
    return request;
  }
  SoftPd& pd_;

 private:
  ibv_srq_attr attr_;
  std::deque<RecvRequest> queue_;
};

struct SendRequest {
  std::uint64_t wr_id;
  ibv_wr_opcode opcode;
  unsigned int flags;
  std::vector<ibv_sge> sg;
  std::vector<std::uint8_t> inline_data;
  std::uint32_t imm_data;
  std::uint64_t remote_addr;
  std::uint32_t rkey;
  std::uint64_t compare_add;
  std::uint64_t swap;
  std::uint32_t remote_qpn;
  std::uint32_t remote_qkey;
  std::optional<ibv_global_route> grh;  // UD through a global AH: the receiver gets a GRH
  std::optional<Clock::time_point> retry_deadline;  // RC, responder unreachable since then
  std::uint64_t total_length() const {
    if (!inline_data.empty()) return inline_data.size();
    std::uint64_t total = 0;
    for (auto& s : sg) total += s.length;
    return total;
  }
};

// Where a checked SGE or remote range lives: bytes of an MR's memory.
struct Place {
  MemoryAccess* memory;
  std::size_t offset;
};
struct Span {
  Place at;
  std::size_t length;
};

// Fabric lock held (shared or exclusive). Resolves [addr, addr+length) of
// key in pd needing access.
std::optional<Place> resolve(std::uint32_t key, const SoftPd& pd, std::uint64_t addr,
                                     std::uint64_t length, int needed_access) {
  auto it = fabric().mrs.find(key);
  if (it == fabric().mrs.end()) return std::nullopt;
  const MrEntry& mr = it->second;
  if (mr.pd != &pd) return std::nullopt;
  if ((mr.access & needed_access) != needed_access) return std::nullopt;
  if (addr < mr.iova || length > mr.length || addr - mr.iova > mr.length - length)
    return std::nullopt;
  return Place{mr.memory, mr.base + (addr - mr.iova)};
}

std::optional<std::vector<Span>> resolve_sges(const std::vector<ibv_sge>& sg, const SoftPd& pd,
                                              int needed_access) {
  std::vector<Span> spans;
  for (const auto& s : sg) {
    if (s.length == 0) continue;
    auto host = resolve(s.lkey, pd, s.addr, s.length, needed_access);
    if (!host) return std::nullopt;
    spans.push_back({*host, s.length});
  }
  return spans;
}

// The spans' bytes, or none when an MR's memory could not be reached.
std::optional<std::vector<std::uint8_t>> gather(const std::vector<Span>& spans) {
  std::vector<std::uint8_t> data;
  for (const auto& s : spans) {
    const std::size_t at = data.size();
    data.resize(at + s.length);
    if (!s.at.memory->read(s.at.offset, std::as_writable_bytes(std::span(data).subspan(at))))
      return std::nullopt;
  }
  return data;
}

// False when an MR's memory could not be reached.
bool scatter(const std::vector<Span>& spans, const std::uint8_t* data, std::size_t length,
             std::size_t skip = 0) {
  // A zero-length message lands nothing (its data may be no pointer at all).
  if (length == 0) return true;
  for (const auto& s : spans) {
    if (skip >= s.length) {
      skip -= s.length;
      continue;
    }
    std::size_t n = std::min(s.length - skip, length);
    if (!s.at.memory->write(s.at.offset + skip, std::as_bytes(std::span(data, n)))) return false;
    data += n;
    length -= n;
    skip = 0;
    if (length == 0) break;
  }
  return true;
}

ibv_wc_opcode completion_opcode(ibv_wr_opcode op) {
  switch (op) {
    case IBV_WR_RDMA_WRITE:
    case IBV_WR_RDMA_WRITE_WITH_IMM: return IBV_WC_RDMA_WRITE;
    case IBV_WR_RDMA_READ: return IBV_WC_RDMA_READ;
    case IBV_WR_ATOMIC_CMP_AND_SWP: return IBV_WC_COMP_SWAP;
    case IBV_WR_ATOMIC_FETCH_AND_ADD: return IBV_WC_FETCH_ADD;
    default: return IBV_WC_SEND;
  }
}

class SoftQp final : public QueuePair {
 public:
  SoftQp(SoftPd& pd, const QueuePairInit& init, std::uint32_t qpn)
      : pd_(pd),
        send_cq_(dynamic_cast<SoftCq*>(init.send_cq)),
        recv_cq_(dynamic_cast<SoftCq*>(init.recv_cq)),
        srq_(dynamic_cast<SoftSrq*>(init.srq)),
        type_(init.qp_type),
        cap_(init.cap),
        sq_sig_all_(init.sq_sig_all),
        qpn_(qpn) {
    attr_.qp_state = IBV_QPS_RESET;
    fabric().qps[qpn_] = this;
    ++pd_.users_;
  }
  ~SoftQp() override {
    std::lock_guard lock(fabric().mu);
    fabric().qps.erase(qpn_);
    pd_.hca_.forget(this);
    --pd_.users_;
  }
  std::uint32_t qp_num() const override { return qpn_; }
  int modify(const ibv_qp_attr& attr, int attr_mask) override;
  int query(ibv_qp_attr& attr, ibv_qp_init_attr& init) override {
    std::shared_lock objects(fabric().mu);
    attr = attr_;
    attr.qp_state = state();
    attr.cap = cap_;
    init = {};
    init.send_cq = nullptr;
    init.cap = cap_;
    init.qp_type = type_;
    init.sq_sig_all = sq_sig_all_ ? 1 : 0;
    return 0;
  }
  int post_send(const ibv_send_wr* wr, const ibv_send_wr** bad_wr) override;
  int post_recv(const ibv_recv_wr* wr, const ibv_recv_wr** bad_wr) override {
    std::shared_lock objects(fabric().mu);
    int rc = 0;
    {
      std::lock_guard lock(recv_mu_);
      // Read under the receive lock: a QP entering ERR meanwhile flushes
      // what this posts once it gets the lock.
      const auto now = state();
      if (srq_ != nullptr || now == IBV_QPS_RESET) {
        *bad_wr = wr;
        return EINVAL;
      }
      std::vector<RecvRequest> accepted;
      rc = check_recv_list(wr, bad_wr, cap_.max_recv_wr - recv_queue_.size(),
                           static_cast<int>(cap_.max_recv_sge), accepted);
      for (auto& r : accepted) recv_queue_.push_back(std::move(r));
      if (now == IBV_QPS_ERR) flush_receives();
    }
    receives_arrived();
    return rc;
  }

  // Runs what waits in the send queue, or flushes it once the QP is in ERR.
  // Fabric lock held (shared or exclusive), no lock of any QP.
  void drain_pending(bool even_if_unflagged = false) {
    if (!even_if_unflagged && !has_pending_.load()) return;
    SoftQp* broken = nullptr;
    {
      std::lock_guard lock(send_mu_);
      if (state() == IBV_QPS_ERR) flush_sends();
      while (!pending_.empty() && state() == IBV_QPS_RTS) {
        // Taken out first: a request that fails moves the QP to ERR, which
        // flushes (and empties) the queue it came from.
        SendRequest r = std::move(pending_.front());
        pending_.pop_front();
        if (!execute(r, broken)) {
          pending_.push_front(std::move(r));
          break;
        }
      }
      has_pending_.store(!pending_.empty());
    }
    if (broken != nullptr) broken->drain_pending();
  }

 private:
  ibv_qp_state state() const { return state_.load(std::memory_order_acquire); }
  bool signaled(const SendRequest& r) const {
    return sq_sig_all_ || (r.flags & IBV_SEND_SIGNALED) != 0;
  }
  void complete_send(const SendRequest& r, ibv_wc_status status, std::uint32_t byte_len) {
    if (status == IBV_WC_SUCCESS && !signaled(r)) return;
    ibv_wc wc{};
    wc.wr_id = r.wr_id;
    wc.status = status;
    wc.opcode = completion_opcode(r.opcode);
    wc.byte_len = byte_len;
    wc.qp_num = qpn_;
    send_cq_->push(wc, false);
  }
  // The error completion itself is reported by the caller; this moves the QP
  // to ERR and flushes whatever else is outstanding. Send lock held, no
  // receive lock.
  void enter_error() {
    if (state_.exchange(IBV_QPS_ERR, std::memory_order_acq_rel) == IBV_QPS_ERR) return;
    flush_sends();
    std::lock_guard lock(recv_mu_);
    flush_receives();
  }
  // A requester's error that is the responder's too (IBA: the responder
  // QP goes to ERR): dest's receives are flushed now; its sends by
  // dest.drain_pending(), which the caller runs once it has let go of its
  // own send lock (`broken` names dest then). Send lock held, no receive
  // lock.
  void break_responder(SoftQp& dest, SoftQp*& broken) {
    if (&dest == this) {
      enter_error();
      return;
    }
    if (dest.state_.exchange(IBV_QPS_ERR, std::memory_order_acq_rel) == IBV_QPS_ERR) return;
    {
      std::lock_guard lock(dest.recv_mu_);
      dest.flush_receives();
    }
    broken = &dest;
  }
  // Send lock held.
  void flush_sends() {
    for (auto& r : pending_) complete_flushed(r);
    pending_.clear();
    has_pending_.store(false, std::memory_order_release);
  }
  // Receive lock held.
  void flush_receives() {
    for (auto& r : recv_queue_) {
      ibv_wc wc{};
      wc.wr_id = r.wr_id;
      wc.status = IBV_WC_WR_FLUSH_ERR;
      wc.opcode = IBV_WC_RECV;
      wc.qp_num = qpn_;
      recv_cq_->push(wc, false);
    }
    recv_queue_.clear();
  }
  void complete_flushed(const SendRequest& r) {
    ibv_wc wc{};
    wc.wr_id = r.wr_id;
    wc.status = IBV_WC_WR_FLUSH_ERR;
    wc.opcode = completion_opcode(r.opcode);
    wc.qp_num = qpn_;
    send_cq_->push(wc, false);
  }
  // The lock of where this QP's receives wait: its own queue or its SRQ.
  std::unique_lock<std::mutex> lock_receives() { return std::unique_lock(srq_ != nullptr ? srq_->mu : recv_mu_); }
  // Receive lock held for these two.
  std::optional<RecvRequest> take_recv() {
    if (srq_ != nullptr) return srq_->take();
    if (recv_queue_.empty()) return std::nullopt;
    auto r = std::move(recv_queue_.front());
    recv_queue_.pop_front();
    return r;
  }
  bool has_receive() const {
    return srq_ != nullptr ? !srq_->empty() : !recv_queue_.empty();
  }
  bool can_receive() const {
    const auto now = state();
    return now == IBV_QPS_RTR || now == IBV_QPS_RTS || now == IBV_QPS_SQD;
  }
  SoftPd& receive_pd() { return srq_ != nullptr ? srq_->pd_ : pd_; }
  void responder_access_error(SoftQp& dest, SoftQp*& broken) {
    pd_.hca_.push_async_event({IBV_EVENT_QP_ACCESS_ERR, &dest, nullptr, nullptr});
    break_responder(dest, broken);
  }

  // Send lock held. Returns false when the request must wait: for a
  // receive (RNR, retry for ever) or for its responder to become reachable
  // (transport retry). A responder it put in ERR goes to `broken`.
  bool execute(SendRequest& r, SoftQp*& broken);
  // dest's receive lock held.
  bool deliver_message(const SendRequest& r, SoftQp& dest, const std::vector<std::uint8_t>& data,
                       bool write_imm, ibv_wc_status& requester_status, bool& responder_broken);
  int post_send_locked(const ibv_send_wr* wr, const ibv_send_wr** bad_wr, SoftQp*& broken);

  SoftPd& pd_;
  SoftCq* send_cq_;
  SoftCq* recv_cq_;
  SoftSrq* srq_;
  ibv_qp_type type_;
  ibv_qp_cap cap_;
  bool sq_sig_all_;
  std::uint32_t qpn_;
  ibv_qp_attr attr_{};  // but its qp_state: the fabric lock, exclusive
  std::atomic<ibv_qp_state> state_{IBV_QPS_RESET};
  std::mutex send_mu_;  // pending_
  std::deque<SendRequest> pending_;
  // !pending_.empty(), for an unlocked look. Sequentially consistent with
  // Fabric::receives_posted (see SoftQp::post_send).
  std::atomic<bool> has_pending_{false};
  std::mutex recv_mu_;  // recv_queue_
  std::deque<RecvRequest> recv_queue_;
};

// Fabric lock held (shared or exclusive), no lock of any QP.
void drain_all_pending(bool look_at_every_qp) {
  for (auto& [qpn, qp] : fabric().qps) qp->drain_pending(look_at_every_qp);
}

// Delivers SEND data (or the immediate of RDMA_WRITE_WITH_IMM) into a receive
// of dest. Returns false for RNR (no receive posted). An error that is the
// responder's sets responder_broken; the caller puts dest in ERR once it has
// let go of dest's receive lock.
bool SoftQp::deliver_message(const SendRequest& r, SoftQp& dest,
                             const std::vector<std::uint8_t>& data, bool write_imm,
                             ibv_wc_status& requester_status, bool& responder_broken) {
  auto recv = dest.take_recv();
  if (!recv) return false;
  ibv_wc wc{};
  wc.wr_id = recv->wr_id;
  wc.qp_num = dest.qpn_;
  wc.src_qp = qpn_;
  wc.slid = kLid;
  wc.opcode = write_imm ? IBV_WC_RECV_RDMA_WITH_IMM : IBV_WC_RECV;
  bool with_imm = r.opcode == IBV_WR_SEND_WITH_IMM || write_imm;
  if (with_imm) {
    wc.wc_flags |= IBV_WC_WITH_IMM;
    wc.imm_data = r.imm_data;
  }
  bool solicited = (r.flags & IBV_SEND_SOLICITED) != 0;
  if (write_imm) {
    wc.byte_len = static_cast<std::uint32_t>(data.size());
    wc.status = IBV_WC_SUCCESS;
    dest.recv_cq_->push(wc, solicited);
    return true;
  }
  std::size_t grh = type_ == IBV_QPT_UD ? kGrhBytes : 0;
  auto spans = resolve_sges(recv->sg, dest.receive_pd(), IBV_ACCESS_LOCAL_WRITE);
  std::uint64_t room = 0;
  for (auto& s : recv->sg) room += s.length;
  // Also when the receive buffer's memory proves unreachable only now (its
  // owner unmapped it).
  auto fail_protection = [&] {
    wc.status = IBV_WC_LOC_PROT_ERR;
    dest.recv_cq_->push(wc, false);
    if (type_ != IBV_QPT_UD) {
      responder_broken = true;
      requester_status = IBV_WC_REM_OP_ERR;
    }
    return true;
  };
  if (!spans) return fail_protection();
  if (room < data.size() + grh) {
    wc.status = IBV_WC_LOC_LEN_ERR;
    dest.recv_cq_->push(wc, false);
    if (type_ != IBV_QPT_UD) {
      responder_broken = true;
      requester_status = IBV_WC_REM_INV_REQ_ERR;
    }
    return true;
  }
  if (!scatter(*spans, data.data(), data.size(), grh)) return fail_protection();
  if (grh != 0 && r.grh) {
    // The first 40 bytes of a UD receive hold the GRH, when the packet had
    // one (IBA 11.4.1.2): only a global AH's packets do.
    std::uint8_t header[kGrhBytes] = {};
    const std::uint32_t version_class_flow =
        htobe32((6u << 28) | (std::uint32_t{r.grh->traffic_class} << 20) | (r.grh->flow_label & 0xfffff));
    std::memcpy(header, &version_class_flow, 4);
    const std::uint16_t payload = htobe16(static_cast<std::uint16_t>(data.size()));
    std::memcpy(header + 4, &payload, 2);
    header[6] = 0x1b;  // next header: IBA transport
    header[7] = r.grh->hop_limit;
    const std::uint64_t prefix = htobe64(0xfe80000000000000ULL), guid = htobe64(kNodeGuid);
    std::memcpy(header + 8, &prefix, 8);
    std::memcpy(header + 16, &guid, 8);
    std::memcpy(header + 24, r.grh->dgid.raw, 16);
    if (!scatter(*spans, header, kGrhBytes)) return fail_protection();
    wc.wc_flags |= IBV_WC_GRH;
  }
  wc.byte_len = static_cast<std::uint32_t>(data.size() + grh);
  wc.status = IBV_WC_SUCCESS;
  dest.recv_cq_->push(wc, solicited);
  return true;
}

bool SoftQp::execute(SendRequest& r, SoftQp*& broken) {
  // Local side first: the HCA reads or (for READ/atomics) writes these.
  bool local_writes = r.opcode == IBV_WR_RDMA_READ || r.opcode == IBV_WR_ATOMIC_CMP_AND_SWP ||
                      r.opcode == IBV_WR_ATOMIC_FETCH_AND_ADD;
  std::vector<Span> local;
  if (r.inline_data.empty()) {
    auto spans = resolve_sges(r.sg, pd_, local_writes ? IBV_ACCESS_LOCAL_WRITE : 0);
    if (!spans) {
      complete_send(r, IBV_WC_LOC_PROT_ERR, 0);
      enter_error();
      return true;
    }
    local = std::move(*spans);
  }
  std::uint64_t length = r.total_length();
  std::uint64_t limit = type_ == IBV_QPT_UD ? kUdMtu : kMaxMessage;
  bool atomic = r.opcode == IBV_WR_ATOMIC_CMP_AND_SWP || r.opcode == IBV_WR_ATOMIC_FETCH_AND_ADD;
  if (length > limit || (atomic && length != sizeof(std::uint64_t))) {
    complete_send(r, IBV_WC_LOC_LEN_ERR, 0);
    enter_error();
    return true;
  }

  // Find the responder.
  SoftQp* dest = nullptr;
  std::uint32_t dest_qpn = type_ == IBV_QPT_UD ? r.remote_qpn : attr_.dest_qp_num;
  if (auto it = fabric().qps.find(dest_qpn); it != fabric().qps.end()) dest = it->second;
  bool reachable = dest != nullptr && dest->type_ == type_ && dest->can_receive() &&
                   (type_ == IBV_QPT_UD || dest->attr_.dest_qp_num == qpn_) &&
                   same_partition(kPkeys[attr_.pkey_index], kPkeys[dest->attr_.pkey_index]);
  if (type_ == IBV_QPT_UD && reachable) {
    std::uint32_t qkey = (r.remote_qkey & 0x80000000U) != 0 ? attr_.qkey : r.remote_qkey;
    reachable = qkey == dest->attr_.qkey;
  }
  if (!reachable) {
    if (type_ == IBV_QPT_RC) {
      const auto window = transport_retry_window(attr_);
      if (!window) return false;
      const auto now = Clock::now();
      if (!r.retry_deadline) r.retry_deadline = now + *window;
      if (now < *r.retry_deadline) {
        fabric().retry_at(*r.retry_deadline);
        return false;
      }
      complete_send(r, IBV_WC_RETRY_EXC_ERR, 0);
      enter_error();
    } else {
      complete_send(r, IBV_WC_SUCCESS, 0);  // unreliable: silently dropped
    }
    return true;
  }

  std::optional<std::vector<std::uint8_t>> gathered = r.inline_data.empty() ? gather(local) : r.inline_data;
  if (!gathered) {
    complete_send(r, IBV_WC_LOC_PROT_ERR, 0);
    enter_error();
    return true;
  }
  const std::vector<std::uint8_t>& data = *gathered;
  auto len32 = static_cast<std::uint32_t>(length);
  ibv_wc_status status = IBV_WC_SUCCESS;

  auto remote_range = [&](int access) -> std::optional<Place> {
    auto place = resolve(r.rkey, dest->pd_, r.remote_addr, length, access);
    if (!place || (static_cast<int>(dest->attr_.qp_access_flags) & access) != access) return std::nullopt;
    return place;
  };
  bool responder_broken = false;
  bool delivered = false;

  switch (r.opcode) {
    case IBV_WR_SEND:
    case IBV_WR_SEND_WITH_IMM:
      {
        auto receives = dest->lock_receives();
        delivered = deliver_message(r, *dest, data, false, status, responder_broken);
      }
      if (!delivered) {
        if (type_ != IBV_QPT_RC) {
          complete_send(r, IBV_WC_SUCCESS, len32);
          return true;
        }
        if (attr_.rnr_retry == 7) return false;
        complete_send(r, IBV_WC_RNR_RETRY_EXC_ERR, 0);
        enter_error();
        return true;
      }
      break;
    case IBV_WR_RDMA_WRITE:
    case IBV_WR_RDMA_WRITE_WITH_IMM: {
      bool with_imm = r.opcode == IBV_WR_RDMA_WRITE_WITH_IMM;
      // With immediate, a receive is consumed: the responder's receive lock
      // from the check that one is there until its completion is pushed.
      std::unique_lock<std::mutex> receives;
      if (with_imm) {
        receives = dest->lock_receives();
        if (!dest->has_receive()) {
          receives.unlock();
          if (type_ != IBV_QPT_RC) break;
          if (attr_.rnr_retry == 7) return false;
          complete_send(r, IBV_WC_RNR_RETRY_EXC_ERR, 0);
          enter_error();
          return true;
        }
      }
      auto target = length == 0 ? std::nullopt : remote_range(IBV_ACCESS_REMOTE_WRITE);
      if (length != 0 && (!target || !target->memory->write(target->offset, std::as_bytes(std::span(data))))) {
        if (receives.owns_lock()) receives.unlock();
        if (type_ == IBV_QPT_RC) {
          responder_access_error(*dest, broken);
          status = IBV_WC_REM_ACCESS_ERR;
        }
        break;
      }
      if (with_imm) deliver_message(r, *dest, data, true, status, responder_broken);  // a receive is there
      break;
    }
    case IBV_WR_RDMA_READ: {
      if (length == 0) break;
      auto source = remote_range(IBV_ACCESS_REMOTE_READ);
      std::vector<std::uint8_t> bytes(length);
      if (!source || !source->memory->read(source->offset, std::as_writable_bytes(std::span(bytes)))) {
        responder_access_error(*dest, broken);
        status = IBV_WC_REM_ACCESS_ERR;
        break;
      }
      if (!scatter(local, bytes.data(), length)) status = IBV_WC_LOC_PROT_ERR;
      break;
    }
    case IBV_WR_ATOMIC_CMP_AND_SWP:
    case IBV_WR_ATOMIC_FETCH_AND_ADD: {
      if (r.remote_addr % sizeof(std::uint64_t) != 0) {
        status = IBV_WC_REM_INV_REQ_ERR;
        break_responder(*dest, broken);
        break;
      }
      auto target = remote_range(IBV_ACCESS_REMOTE_ATOMIC);
      std::optional<std::uint64_t> original;
      if (target) {
        // Atomic against every other atomic of the HCA, as IBV_ATOMIC_HCA
        // promises: a guest's memory is read and written with two calls.
        std::lock_guard atomics(fabric().atomics_mu);
        original = r.opcode == IBV_WR_ATOMIC_FETCH_AND_ADD
                       ? target->memory->fetch_add(target->offset, r.compare_add)
                       : target->memory->compare_swap(target->offset, r.compare_add, r.swap);
      }
      if (!original) {
        responder_access_error(*dest, broken);
        status = IBV_WC_REM_ACCESS_ERR;
        break;
      }
      if (!scatter(local, reinterpret_cast<const std::uint8_t*>(&*original), sizeof *original))
        status = IBV_WC_LOC_PROT_ERR;
      break;
    }
    default:
      status = IBV_WC_LOC_QP_OP_ERR;
      break;
  }
  if (responder_broken) break_responder(*dest, broken);
  complete_send(r, status, status == IBV_WC_SUCCESS ? len32 : 0);
  if (status != IBV_WC_SUCCESS) enter_error();
  return true;
}

int SoftQp::post_send(const ibv_send_wr* wr, const ibv_send_wr** bad_wr) {
  std::shared_lock objects(fabric().mu);
  SoftQp* broken = nullptr;
  int rc = 0;
  bool waiting = false;
  const auto receives_before = fabric().receives_posted.load();
  {
    std::lock_guard lock(send_mu_);
    rc = post_send_locked(wr, bad_wr, broken);
    waiting = !pending_.empty();
  }
  if (broken != nullptr) broken->drain_pending();
  // A receive posted after a request found none, and whose post_recv looked
  // for waiting requests before this one was queued: run it now. (Either
  // that post_recv saw has_pending_, or the counter has moved since.)
  if (waiting && fabric().receives_posted.load() != receives_before) drain_pending();
  return rc;
}

int SoftQp::post_send_locked(const ibv_send_wr* wr, const ibv_send_wr** bad_wr, SoftQp*& broken) {
  const auto state = this->state();
  // Entered ERR through a responder's error: what waits completes first.
  if (state == IBV_QPS_ERR) flush_sends();
  for (; wr != nullptr; wr = wr->next) {
    *bad_wr = wr;
    if (state != IBV_QPS_RTS && state != IBV_QPS_ERR && state != IBV_QPS_SQE) return EINVAL;
    if (wr->num_sge < 0 || wr->num_sge > static_cast<int>(cap_.max_send_sge) ||
        (wr->num_sge > 0 && wr->sg_list == nullptr))
      return EINVAL;
    if (pending_.size() >= cap_.max_send_wr) return ENOMEM;
    bool allowed = false;
    switch (wr->opcode) {
      case IBV_WR_SEND:
      case IBV_WR_SEND_WITH_IMM: allowed = true; break;
      case IBV_WR_RDMA_WRITE:
      case IBV_WR_RDMA_WRITE_WITH_IMM: allowed = type_ != IBV_QPT_UD; break;
      case IBV_WR_RDMA_READ:
      case IBV_WR_ATOMIC_CMP_AND_SWP:
      case IBV_WR_ATOMIC_FETCH_AND_ADD: allowed = type_ == IBV_QPT_RC; break;
      default: break;
    }
    if (!allowed) return EINVAL;
    SendRequest r{};
    r.wr_id = wr->wr_id;
    r.opcode = wr->opcode;
    r.flags = wr->send_flags;
    r.imm_data = wr->imm_data;
    if ((wr->send_flags & IBV_SEND_INLINE) != 0) {
      if (wr->opcode == IBV_WR_RDMA_READ || wr->opcode == IBV_WR_ATOMIC_CMP_AND_SWP ||
          wr->opcode == IBV_WR_ATOMIC_FETCH_AND_ADD)
        return EINVAL;
      std::uint64_t total = 0;
      for (int i = 0; i < wr->num_sge; ++i) total += wr->sg_list[i].length;
      if (total > cap_.max_inline_data) return EINVAL;
      for (int i = 0; i < wr->num_sge; ++i) {
        // Inline SGEs name this process's memory directly, no key.
        const auto* bytes =
            reinterpret_cast<const std::uint8_t*>(static_cast<std::uintptr_t>(wr->sg_list[i].addr));
        r.inline_data.insert(r.inline_data.end(), bytes, bytes + wr->sg_list[i].length);
      }
    } else {
      r.sg.assign(wr->sg_list, wr->sg_list + wr->num_sge);
    }
    if (type_ == IBV_QPT_UD) {
      auto ah = fabric().ahs.find(wr->wr.ud.ah);
      if (ah == fabric().ahs.end()) return EINVAL;
      r.remote_qpn = wr->wr.ud.remote_qpn;
      r.remote_qkey = wr->wr.ud.remote_qkey;
      if (ah->second.is_global) r.grh = ah->second.grh;
    } else if (wr->opcode == IBV_WR_ATOMIC_CMP_AND_SWP ||
               wr->opcode == IBV_WR_ATOMIC_FETCH_AND_ADD) {
      r.remote_addr = wr->wr.atomic.remote_addr;
      r.rkey = wr->wr.atomic.rkey;
      r.compare_add = wr->wr.atomic.compare_add;
      r.swap = wr->wr.atomic.swap;
    } else {
      r.remote_addr = wr->wr.rdma.remote_addr;
      r.rkey = wr->wr.rdma.rkey;
    }
    if (const auto now = this->state(); now != IBV_QPS_RTS) {
      if (now == IBV_QPS_ERR) flush_sends();  // in send order
      complete_flushed(r);
    } else if (!pending_.empty() || !execute(r, broken)) {
      pending_.push_back(std::move(r));
      has_pending_.store(true);
    }
  }
  *bad_wr = nullptr;
  return 0;
}

// IB spec QP state transition table (RC/UC/UD only): required and optional
// attribute masks per transition.
struct Transition {
  int required;
  int optional;
};

std::optional<Transition> transition(ibv_qp_state from, ibv_qp_state to, ibv_qp_type type) {
  const bool ud = type == IBV_QPT_UD;
  const bool rc = type == IBV_QPT_RC;
  const int qkey = ud ? IBV_QP_QKEY : 0;
  const int access = ud ? 0 : IBV_QP_ACCESS_FLAGS;
  if (to == IBV_QPS_RESET || to == IBV_QPS_ERR) return Transition{IBV_QP_STATE, 0};
  switch (from) {
    case IBV_QPS_RESET:
      if (to == IBV_QPS_INIT)
        return Transition{IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | qkey | access, 0};
      break;
    case IBV_QPS_INIT:
      if (to == IBV_QPS_INIT)
        return Transition{IBV_QP_STATE, IBV_QP_PKEY_INDEX | IBV_QP_PORT | qkey | access};
      if (to == IBV_QPS_RTR) {
        if (ud) return Transition{IBV_QP_STATE, IBV_QP_PKEY_INDEX | IBV_QP_QKEY};
        int required = IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN;
        if (rc) required |= IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER;
        return Transition{required, IBV_QP_ALT_PATH | IBV_QP_ACCESS_FLAGS | IBV_QP_PKEY_INDEX};
      }
      break;
    case IBV_QPS_RTR:
      if (to == IBV_QPS_RTS) {
        int required = IBV_QP_STATE | IBV_QP_SQ_PSN;
        if (rc) required |= IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
                            IBV_QP_MAX_QP_RD_ATOMIC;
        int optional = IBV_QP_CUR_STATE | qkey | access | IBV_QP_PATH_MIG_STATE |
                       (ud ? 0 : IBV_QP_ALT_PATH) | (rc ? IBV_QP_MIN_RNR_TIMER : 0);
        return Transition{required, optional};
      }
      break;
    case IBV_QPS_RTS:
      if (to == IBV_QPS_RTS)
        return Transition{IBV_QP_STATE, IBV_QP_CUR_STATE | qkey | access | IBV_QP_PATH_MIG_STATE |
                                            (ud ? 0 : IBV_QP_ALT_PATH) |
                                            (rc ? IBV_QP_MIN_RNR_TIMER : 0)};
      if (to == IBV_QPS_SQD) return Transition{IBV_QP_STATE, IBV_QP_EN_SQD_ASYNC_NOTIFY};
      break;
    case IBV_QPS_SQD:
      if (to == IBV_QPS_RTS || to == IBV_QPS_SQD)
        return Transition{IBV_QP_STATE, IBV_QP_CUR_STATE | qkey | access | IBV_QP_PATH_MIG_STATE |
                                            (ud ? 0 : IBV_QP_ALT_PATH)};
      break;
    case IBV_QPS_SQE:
      if (to == IBV_QPS_RTS) return Transition{IBV_QP_STATE, IBV_QP_CUR_STATE | qkey | access};
      break;
    default: break;
  }
  return std::nullopt;
}

int SoftQp::modify(const ibv_qp_attr& attr, int attr_mask) {
  std::lock_guard lock(fabric().mu);
  auto from = state();
  if ((attr_mask & IBV_QP_CUR_STATE) != 0 && attr.cur_qp_state != from) return EINVAL;
  auto to = (attr_mask & IBV_QP_STATE) != 0 ? attr.qp_state : from;
  auto rule = transition(from, to, type_);
  if (!rule) return EINVAL;
  if ((attr_mask & rule->required) != rule->required) return EINVAL;
  if ((attr_mask & ~(rule->required | rule->optional)) != 0) return EINVAL;
  if ((attr_mask & IBV_QP_PORT) != 0 && attr.port_num != 1) return EINVAL;
  if ((attr_mask & IBV_QP_PKEY_INDEX) != 0 && attr.pkey_index >= kPkeyCount) return EINVAL;
  if ((attr_mask & IBV_QP_PATH_MTU) != 0 &&
      (attr.path_mtu < IBV_MTU_256 || attr.path_mtu > IBV_MTU_4096))
    return EINVAL;
  if ((attr_mask & IBV_QP_RNR_RETRY) != 0 && attr.rnr_retry > 7) return EINVAL;
  if ((attr_mask & IBV_QP_RETRY_CNT) != 0 && attr.retry_cnt > 7) return EINVAL;

  if ((attr_mask & IBV_QP_PKEY_INDEX) != 0) attr_.pkey_index = attr.pkey_index;
  if ((attr_mask & IBV_QP_PORT) != 0) attr_.port_num = attr.port_num;
  if ((attr_mask & IBV_QP_QKEY) != 0) attr_.qkey = attr.qkey;
  if ((attr_mask & IBV_QP_ACCESS_FLAGS) != 0) attr_.qp_access_flags = attr.qp_access_flags;
  if ((attr_mask & IBV_QP_AV) != 0) attr_.ah_attr = attr.ah_attr;
  if ((attr_mask & IBV_QP_PATH_MTU) != 0) attr_.path_mtu = attr.path_mtu;
  if ((attr_mask & IBV_QP_DEST_QPN) != 0) attr_.dest_qp_num = attr.dest_qp_num;
  if ((attr_mask & IBV_QP_RQ_PSN) != 0) attr_.rq_psn = attr.rq_psn;
  if ((attr_mask & IBV_QP_SQ_PSN) != 0) attr_.sq_psn = attr.sq_psn;
  if ((attr_mask & IBV_QP_MAX_DEST_RD_ATOMIC) != 0)
    attr_.max_dest_rd_atomic = attr.max_dest_rd_atomic;
  if ((attr_mask & IBV_QP_MAX_QP_RD_ATOMIC) != 0) attr_.max_rd_atomic = attr.max_rd_atomic;
  if ((attr_mask & IBV_QP_MIN_RNR_TIMER) != 0) attr_.min_rnr_timer = attr.min_rnr_timer;
  if ((attr_mask & IBV_QP_TIMEOUT) != 0) attr_.timeout = attr.timeout;
  if ((attr_mask & IBV_QP_RETRY_CNT) != 0) attr_.retry_cnt = attr.retry_cnt;
  if ((attr_mask & IBV_QP_RNR_RETRY) != 0) attr_.rnr_retry = attr.rnr_retry;

  // The fabric lock is exclusive: these locks are free, and taken so that
  // each queue is touched the one way.
  if (to == IBV_QPS_ERR) {
    std::lock_guard sends(send_mu_);
    enter_error();
  } else if (to == IBV_QPS_RESET) {
    // RESET discards queued work without completions, as hardware does.
    std::scoped_lock queues(send_mu_, recv_mu_);
    recv_queue_.clear();
    pending_.clear();
    has_pending_.store(false, std::memory_order_release);
    attr_ = {};
    attr_.qp_state = IBV_QPS_RESET;
    state_.store(IBV_QPS_RESET, std::memory_order_release);
  } else {
    state_.store(to, std::memory_order_release);
    // RTR makes this QP reachable for requesters retrying towards it.
    if (to == IBV_QPS_RTR || to == IBV_QPS_RTS) drain_all_pending();
  }
  return 0;
}

void SoftHca::query_device(ibv_device_attr& attr) {
  attr = {};
  std::snprintf(attr.fw_ver, sizeof attr.fw_ver, "vib-soft 1.0");
  attr.node_guid = htobe64(kNodeGuid);
  attr.sys_image_guid = htobe64(kNodeGuid);
  attr.max_mr_size = std::uint64_t{1} << 40;
  attr.page_size_cap = 4096;
  attr.vendor_id = 0;
  attr.hw_ver = 1;
  attr.max_qp = 16384;
  attr.max_qp_wr = kMaxQpWr;
  attr.device_cap_flags = IBV_DEVICE_RC_RNR_NAK_GEN | IBV_DEVICE_SRQ_RESIZE |
                          IBV_DEVICE_PORT_ACTIVE_EVENT;
  attr.max_sge = kMaxSge;
  attr.max_sge_rd = kMaxSge;
  attr.max_cq = 16384;
  attr.max_cqe = kMaxCqe;
  attr.max_mr = 65536;
  attr.max_pd = 16384;
  attr.max_qp_rd_atom = 16;
  attr.max_ee_rd_atom = 0;
  attr.max_res_rd_atom = 16 * 16384;
  attr.max_qp_init_rd_atom = 16;
  attr.atomic_cap = IBV_ATOMIC_HCA;
  attr.max_ah = 65536;
  attr.max_srq = 4096;
  attr.max_srq_wr = kMaxQpWr;
  attr.max_srq_sge = kMaxSge;
  attr.max_pkeys = kPkeyCount;
  attr.local_ca_ack_delay = 15;
  attr.phys_port_cnt = 1;
}

void SoftHca::query_port(std::uint8_t port, ibv_port_attr& attr) {
  if (port != 1) throw error(EINVAL, "no port " + std::to_string(port));
  attr = {};
  attr.state = IBV_PORT_ACTIVE;
  attr.max_mtu = IBV_MTU_4096;
  attr.active_mtu = IBV_MTU_4096;
  attr.gid_tbl_len = 1;
  attr.port_cap_flags = 0;
  attr.max_msg_sz = kMaxMessage;
  attr.pkey_tbl_len = kPkeyCount;
  attr.lid = kLid;
  attr.sm_lid = kLid;
  attr.lmc = 0;
  attr.max_vl_num = 1;
  attr.active_width = 2;   // 4x
  attr.active_speed = 32;  // EDR
  attr.phys_state = 5;     // LinkUp
  attr.link_layer = IBV_LINK_LAYER_INFINIBAND;
}

void SoftHca::query_gid(std::uint8_t port, int index, ibv_gid& gid) {
  if (port != 1 || index != 0) throw error(EINVAL, "no GID " + std::to_string(index));
  // Link-local prefix fe80::/64 with the node GUID as interface ID.
  gid.global.subnet_prefix = htobe64(0xfe80000000000000ULL);
  gid.global.interface_id = htobe64(kNodeGuid);
}

void SoftHca::query_pkey(std::uint8_t port, int index, std::uint16_t& pkey) {
  if (port != 1 || index < 0 || index >= kPkeyCount)
    throw error(EINVAL, "no P_Key index " + std::to_string(index));
  pkey = htobe16(kPkeys[index]);
}

std::unique_ptr<ProtectionDomain> SoftHca::alloc_pd() { return std::make_unique<SoftPd>(*this); }

int SoftHca::dealloc_pd(std::unique_ptr<ProtectionDomain>& pd) {
  {
    std::lock_guard lock(fabric().mu);
    if (soft(*pd).users_ != 0) return EBUSY;
  }
  pd.reset();
  return 0;
}

std::unique_ptr<MemoryRegion> SoftHca::reg_mr(ProtectionDomain& pd, void* addr,
                                              std::size_t length, std::uint64_t iova,
                                              int access) {
  if (addr == nullptr && length != 0) throw error(EINVAL, "reg_mr");
  return reg_mr(pd, std::make_unique<MappedMemory>(std::span(static_cast<std::byte*>(addr), length)), 0,
                length, iova, access);
}

std::unique_ptr<MemoryRegion> SoftHca::reg_mr(ProtectionDomain& pd, std::unique_ptr<MemoryAccess> memory,
                                              std::size_t offset, std::size_t length, std::uint64_t iova,
                                              int access) {
  // Remote write/atomic without local write is invalid (IB spec, as libibverbs).
  if (((access & (IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_ATOMIC)) != 0 &&
       (access & IBV_ACCESS_LOCAL_WRITE) == 0) ||
      !memory || offset > memory->size() || length > memory->size() - offset ||
      length > (std::uint64_t{1} << 40) || iova + length < iova)
    throw error(EINVAL, "reg_mr");
  auto& softpd = soft(pd);
  std::lock_guard lock(fabric().mu);
  // Never a live key: the counter wraps after 2^24 registrations, and a
  // key it reaches again may still belong to someone.
  std::uint32_t key = 0;
  for (std::uint32_t tries = 0;; ++tries) {
    if (tries == kKeyIndices) throw error(ENOMEM, "reg_mr: no free key");
    key = fabric().next_key;
    fabric().next_key += kKeyStep;
    if (key != 0 && !fabric().mrs.count(key)) break;
  }
  fabric().mrs[key] = {&softpd, memory.get(), offset, iova, length, access};
  ++softpd.users_;
  return std::make_unique<SoftMr>(softpd, key, std::move(memory));
}

std::unique_ptr<CompletionQueue> SoftHca::create_cq(int cqe) {
  if (cqe <= 0 || cqe > kMaxCqe) throw error(EINVAL, "create_cq: " + std::to_string(cqe));
  return std::make_unique<SoftCq>(*this, static_cast<std::uint32_t>(cqe));
}

std::unique_ptr<QueuePair> SoftHca::create_qp(ProtectionDomain& pd, const QueuePairInit& init) {
  if (init.send_cq == nullptr || init.recv_cq == nullptr ||
      dynamic_cast<SoftCq*>(init.send_cq) == nullptr ||
      dynamic_cast<SoftCq*>(init.recv_cq) == nullptr ||
      (init.srq != nullptr && dynamic_cast<SoftSrq*>(init.srq) == nullptr))
    throw error(EINVAL, "create_qp: foreign or missing CQ/SRQ");
  if (init.qp_type != IBV_QPT_RC && init.qp_type != IBV_QPT_UC && init.qp_type != IBV_QPT_UD)
    throw error(EOPNOTSUPP, "create_qp: QP type");
  if (init.cap.max_send_wr > static_cast<std::uint32_t>(kMaxQpWr) ||
      init.cap.max_recv_wr > static_cast<std::uint32_t>(kMaxQpWr) ||
      init.cap.max_send_sge > static_cast<std::uint32_t>(kMaxSge) ||
      init.cap.max_recv_sge > static_cast<std::uint32_t>(kMaxSge) ||
      init.cap.max_inline_data > kMaxInline)
    throw error(EINVAL, "create_qp: capabilities");
  std::lock_guard lock(fabric().mu);
  auto qpn = fabric().next_qpn++;
  return std::make_unique<SoftQp>(soft(pd), init, qpn);
}

std::unique_ptr<SharedReceiveQueue> SoftHca::create_srq(ProtectionDomain& pd,
                                                        const ibv_srq_init_attr& init) {
  if (init.attr.max_wr == 0 || init.attr.max_wr > static_cast<std::uint32_t>(kMaxQpWr) ||
      init.attr.max_sge == 0 || init.attr.max_sge > static_cast<std::uint32_t>(kMaxSge))
    throw error(EINVAL, "create_srq");
  std::lock_guard lock(fabric().mu);
  return std::make_unique<SoftSrq>(soft(pd), init);
}

std::unique_ptr<AddressHandle> SoftHca::create_ah(ProtectionDomain& pd, const ibv_ah_attr& attr) {
  if (attr.port_num != 1 || (attr.is_global == 0 && attr.dlid == 0))
    throw error(EINVAL, "create_ah");
  std::lock_guard lock(fabric().mu);
  return std::make_unique<SoftAh>(soft(pd), attr);
}

}  // namespace

std::unique_ptr<Hca> open_soft_hca() { return std::make_unique<SoftHca>(); }

}  // namespace vib::platform::soft
