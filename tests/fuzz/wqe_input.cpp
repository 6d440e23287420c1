#include "wqe_input.hpp"

#include <infiniband/verbs.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "control.hpp"
#include "fake_guest_memory.hpp"
#include "vib/platform/hca.hpp"

namespace vib::test {

namespace {

void check(bool invariant) {
  if (!invariant) std::abort();
}

// Guest pages: each object's buffer at its own pages, the MR's data last.
constexpr std::uint32_t kCqPage = 0, kSrqPage = 1, kRcPage = 2, kUdPage = 6, kMrPage = 8, kMrPages = 4;
constexpr std::uint32_t kPages = kMrPage + kMrPages;
constexpr std::uint64_t kMrIova = 0x7f0000000000;

class Context {
 public:
  explicit Context(platform::Hca& hca, FakeGuestMemory& memory)
      : memory_(memory), config_(config()), control_(config_, hca, memory, doorbell_, "fuzz-wqe") {
    pd_ = ok(call(VIBIF_OP_ALLOC_PD, [](vibif_request&) {})).u.handle.handle;
    const auto cq = ok(call(VIBIF_OP_CREATE_CQ, [](vibif_request& r) {
      r.u.create_cq.cqe = 16;
      pages(r.u.create_cq.pages, kCqPage, vibif_pages_for(16 * sizeof(vibif_cqe)));
    }));
    cq_ = cq.u.create_cq.cq;
    cq_slot_ = cq.u.create_cq.doorbell_slot;
    const auto srq = ok(call(VIBIF_OP_CREATE_SRQ, [&](vibif_request& r) {
      r.u.create_srq.pd = pd_;
      r.u.create_srq.max_wr = 8;
      r.u.create_srq.max_sge = 4;
      pages(r.u.create_srq.pages, kSrqPage, vibif_pages_for(8 * vibif_recv_wqe_stride(4)));
    }));
    srq_handle_ = srq.u.create_srq.srq;
    srq_ = {srq.u.create_srq.doorbell_slot, 8, srq.u.create_srq.wqe_stride, kSrqPage, 0};
    rc_ = create_qp(VIBIF_QPT_RC, kRcPage, rc_sq_, &rc_rq_);
    ud_ = create_qp(VIBIF_QPT_UD, kUdPage, ud_sq_, nullptr);
    const auto mr = ok(call(VIBIF_OP_REG_MR, [&](vibif_request& r) {
      r.u.reg_mr.pd = pd_;
      r.u.reg_mr.access = VIBIF_ACCESS_ALL;
      r.u.reg_mr.iova = kMrIova;
      r.u.reg_mr.length = kMrPages * VIBIF_PAGE_SIZE;
      pages(r.u.reg_mr.pages, kMrPage, kMrPages);
    }));
    lkey_ = mr.u.reg_mr.lkey;
    rkey_ = mr.u.reg_mr.rkey;
    ah_ = ok(call(VIBIF_OP_CREATE_AH, [&](vibif_request& r) {
      r.u.create_ah.pd = pd_;
      r.u.create_ah.attr.dlid = 1;
      r.u.create_ah.attr.port_num = 1;
    })).u.handle.handle;
    connect(rc_qp_num_);
  }

  // One step of the input; returns the bytes it used.
  std::size_t step(const std::uint8_t* data, std::size_t size) {
    if (size < 2) return size;
    const std::uint8_t what = data[0];
    const std::uint32_t count = data[1] % 8;
    Ring& ring = what % 4 == 0 ? rc_sq_ : what % 4 == 1 ? rc_rq_ : what % 4 == 2 ? ud_sq_ : srq_;
    std::size_t used = 2;
    for (std::uint32_t i = 0; i < count && used < size; ++i) {
      const std::size_t n = std::min<std::size_t>(ring.stride, size - used);
      std::byte* entry = memory_.page(ring.page) + ring.offset + std::size_t{ring.producer % ring.entries} * ring.stride;
      std::memset(entry, 0, ring.stride);
      std::memcpy(entry, data + used, n);
      steer(ring, entry);
      used += n;
      ++ring.producer;
    }
    // The producer as the guest says it: true, or a lie (jumps, goes back).
    std::uint32_t producer = ring.producer;
    if (what & 0x10) producer += data[1];
    if (what & 0x20) producer -= data[1];
    __atomic_store_n(&doorbell_.slots[ring.slot].producer, producer, __ATOMIC_RELEASE);
    control_.service_queues();
    control_.queues_pending();
    check_invariants(ring, producer);
    // A well-behaved guest polls its CQ; a hostile one (0x40) leaves it full.
    if (!(what & 0x40)) {
      auto& cq = doorbell_.slots[cq_slot_];
      const std::uint32_t produced = __atomic_load_n(&cq.producer, __ATOMIC_ACQUIRE);
      for (std::uint32_t i = cq.consumer; i != produced; ++i) {
        vibif_cqe cqe;
        std::memcpy(&cqe, memory_.page(kCqPage) + std::size_t{i % 16} * sizeof cqe, sizeof cqe);
        if (cqe.status == IBV_WC_SUCCESS) ++successes_;
      }
      __atomic_store_n(&cq.consumer, produced, __ATOMIC_RELEASE);
    }
    if (what & 0x80) doorbell_.slots[cq_slot_].arm_sequence += 1;
    return used;
  }

  std::size_t successes() const { return successes_; }

 private:
  struct Ring {
    std::uint16_t slot;
    std::uint32_t entries, stride, page;
    std::uint64_t offset;
    std::uint32_t producer = 0;
  };

  static backend::DeviceConfig config() {
    backend::DeviceConfig c;
    c.hca = "soft";
    c.max_pinned_pages = kPages;
    return c;
  }

  static void pages(vibif_page_list& list, std::uint32_t first, std::uint64_t n) {
    list.nr_pages = static_cast<std::uint32_t>(n);
    list.nr_refs = static_cast<std::uint8_t>(n);
    for (std::uint32_t i = 0; i < n; ++i) list.refs[i] = first + i;
  }

  template <typename Fill>
  vibif_response call(std::uint16_t op, Fill fill) {
    vibif_request req{};
    req.hdr.op = op;
    req.hdr.id = ++id_;
    fill(req);
    return control_.execute(req);
  }
  static const vibif_response& ok(const vibif_response& rsp) {
    if (rsp.hdr.status != VIBIF_OK) {  // the set-up itself must be valid
      std::fprintf(stderr, "wqe fuzz set-up: op %u answered %d\n", rsp.hdr.op, rsp.hdr.status);
      std::abort();
    }
    return rsp;
  }

  vibif_handle_t create_qp(std::uint8_t type, std::uint32_t page, Ring& sq, Ring* rq) {
    const auto rsp = ok(call(VIBIF_OP_CREATE_QP, [&](vibif_request& r) {
      auto& q = r.u.create_qp;
      q.pd = pd_;
      q.send_cq = q.recv_cq = cq_;
      q.srq = rq ? VIBIF_HANDLE_NONE : srq_handle();
      q.qp_type = type;
      q.cap = {8, rq ? 8u : 0u, 4, rq ? 4u : 0u, 64};
      const std::uint32_t send_stride = vibif_send_wqe_stride(4, 64);
      pages(q.pages, page, vibif_qp_buffer_pages(8, send_stride, rq ? 8 : 0, rq ? vibif_recv_wqe_stride(4) : 0));
    }));
    const auto& q = rsp.u.create_qp;
    sq = {q.sq_doorbell_slot, 8, q.send_wqe_stride, page, 0};
    if (rq) *rq = {q.rq_doorbell_slot, 8, q.recv_wqe_stride, page, q.recv_queue_offset};
    (type == VIBIF_QPT_RC ? rc_qp_num_ : ud_qp_num_) = q.qp_num;
    modify(q.qp, type, IBV_QPS_INIT);
    if (type == VIBIF_QPT_UD) {
      modify(q.qp, type, IBV_QPS_RTR);
      modify(q.qp, type, IBV_QPS_RTS);
    }
    return q.qp;
  }
  vibif_handle_t srq_handle() const { return srq_handle_ ? srq_handle_ : VIBIF_HANDLE_NONE; }

  // The RC QP talks to itself (loopback), so sends and RDMA reach an MR.
  void connect(std::uint32_t qp_num) {
    modify(rc_, VIBIF_QPT_RC, IBV_QPS_RTR, qp_num);
    modify(rc_, VIBIF_QPT_RC, IBV_QPS_RTS);
  }

  void modify(vibif_handle_t qp, std::uint8_t type, ibv_qp_state state, std::uint32_t dest = 0) {
    ok(call(VIBIF_OP_MODIFY_QP, [&](vibif_request& r) {
      auto& m = r.u.modify_qp;
      m.qp = qp;
      m.attr.qp_state = state;
      std::uint32_t mask = IBV_QP_STATE;
      if (state == IBV_QPS_INIT) {
        m.attr.port_num = 1;
        m.attr.qp_access_flags = IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_ATOMIC;
        m.attr.qkey = 0x11111111;
        mask |= IBV_QP_PKEY_INDEX | IBV_QP_PORT | (type == VIBIF_QPT_UD ? IBV_QP_QKEY : IBV_QP_ACCESS_FLAGS);
      } else if (state == IBV_QPS_RTR && type == VIBIF_QPT_RC) {
        m.attr.path_mtu = IBV_MTU_1024;
        m.attr.dest_qp_num = dest;
        m.attr.max_dest_rd_atomic = 1;
        m.attr.min_rnr_timer = 12;
        m.attr.ah_attr.dlid = 1;
        m.attr.ah_attr.port_num = 1;
        mask |= IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC |
                IBV_QP_MIN_RNR_TIMER;
      } else if (state == IBV_QPS_RTS) {
        mask |= IBV_QP_SQ_PSN;
        if (type == VIBIF_QPT_RC) {
          m.attr.timeout = 14;
          m.attr.retry_cnt = 7;
          m.attr.rnr_retry = 0;  // no receive: an error at once, never a wait
          m.attr.max_rd_atomic = 1;
          mask |= IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_MAX_QP_RD_ATOMIC;
        }
      }
      m.attr_mask = mask;
    }));
  }

  // Small values in key and handle fields become this context's real ones,
  // so that valid WQEs (not only rejected ones) are among the inputs.
  void steer(const Ring& ring, std::byte* entry) {
    const bool send = &ring == &rc_sq_ || &ring == &ud_sq_;
    const std::size_t header = send ? sizeof(vibif_send_wqe) : sizeof(vibif_recv_wqe);
    for (std::size_t at = header; at + sizeof(vibif_sge) <= ring.stride; at += sizeof(vibif_sge)) {
      vibif_sge g;
      std::memcpy(&g, entry + at, sizeof g);
      if (g.lkey == 1) g.lkey = lkey_;
      if (g.addr < kMrPages * VIBIF_PAGE_SIZE) g.addr += kMrIova;
      std::memcpy(entry + at, &g, sizeof g);
    }
    if (!send) return;
    vibif_send_wqe w;
    std::memcpy(&w, entry, sizeof w);
    if (w.rkey == 1) w.rkey = rkey_;
    if (w.remote_addr < kMrPages * VIBIF_PAGE_SIZE) w.remote_addr += kMrIova;
    if (w.ud_ah == 1) w.ud_ah = ah_;
    if (w.ud_remote_qpn == 1) w.ud_remote_qpn = ud_qp_num_;
    std::memcpy(entry, &w, sizeof w);
  }

  void check_invariants(const Ring& ring, std::uint32_t producer) {
    // vibd never takes more than the guest produced: whatever the producer
    // said (a lie counts as an overrun, taken whole), what is left is at most
    // a queue's worth.
    const std::uint32_t consumer = __atomic_load_n(&doorbell_.slots[ring.slot].consumer, __ATOMIC_ACQUIRE);
    check(producer - consumer <= ring.entries);
    // It never writes more CQEs than the guest has room for.
    const auto& cq = doorbell_.slots[cq_slot_];
    check(cq.producer - cq.consumer <= 16);
    check(control_.pinned_pages() <= kPages);
  }

  FakeGuestMemory& memory_;
  const backend::DeviceConfig config_;  // the control path keeps a reference
  vibif_doorbell_page doorbell_{};
  backend::ControlPath control_;
  std::uint64_t id_ = 0;
  std::size_t successes_ = 0;  // successful completions the guest polled
  vibif_handle_t pd_ = 0, cq_ = 0, rc_ = 0, ud_ = 0, ah_ = 0, srq_handle_ = 0;
  std::uint16_t cq_slot_ = 0;
  Ring srq_{}, rc_sq_{}, rc_rq_{}, ud_sq_{};
  std::uint32_t rc_qp_num_ = 0, ud_qp_num_ = 0, lkey_ = 0, rkey_ = 0;
};

}  // namespace

std::size_t run_wqe_input(const std::uint8_t* data, std::size_t size) {
  static std::unique_ptr<platform::Hca> hca = platform::open_hca("soft");
  static FakeGuestMemory memory(kPages);
  Context context(*hca, memory);
  for (std::size_t at = 0; at < size;) at += context.step(data + at, size - at);
  return context.successes();
}

}  // namespace vib::test
