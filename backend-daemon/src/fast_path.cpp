// The fast path of one context: WQEs from guest queues to the HCA, and the
// HCA's completions into guest CQs (vibif.h, FAST PATH). Guest memory is
// read once per entry into a private copy; only the copy is validated and
// used. A guest that writes nonsense into its queues or doorbell slots gets
// error completions or a QP in the error state, nothing else.
#include <array>
#include <cstring>

#include "control.hpp"
#include "log.hpp"

namespace vib::backend {

namespace {

constexpr std::uint32_t kSendFlags = VIBIF_SEND_FENCE | VIBIF_SEND_SIGNALED | VIBIF_SEND_SOLICITED | VIBIF_SEND_INLINE;
// The largest WQE: a send header with VIBIF_MAX_INLINE bytes, rounded up.
constexpr std::size_t kMaxStride = 1024;
static_assert(sizeof(vibif_send_wqe) + VIBIF_MAX_INLINE <= kMaxStride);
static_assert(sizeof(vibif_send_wqe) + VIBIF_MAX_SGE * sizeof(vibif_sge) <= kMaxStride);
// Completions moved per CQ per pass: bounds the time one busy CQ holds the worker.
constexpr std::size_t kPollBatch = 32;

// The wr_id vibd gives the HCA for a guest WQE: the guest queue kind in the
// top byte, then for send and receive queues the WQE's free-running index,
// for an SRQ the SRQ's handle and the slot of its wr_id table. The guest's
// own wr_id waits in that queue's table (vibif.h, "Queue accounting").
constexpr int kKindShift = 56;
std::uint64_t hca_wr_id(std::uint8_t wq, std::uint32_t index) {
  return (std::uint64_t{wq} << kKindShift) | index;
}
std::uint64_t hca_srq_wr_id(vibif_handle_t srq, std::uint32_t slot) {
  return (std::uint64_t{VIBIF_WQ_SRQ} << kKindShift) | (std::uint64_t{srq} << 16) | slot;
}

std::uint32_t load_guest(const std::uint32_t& field) { return __atomic_load_n(&field, __ATOMIC_ACQUIRE); }
void publish(std::uint32_t& field, std::uint32_t value) { __atomic_store_n(&field, value, __ATOMIC_RELEASE); }

ibv_wc_opcode send_completion_opcode(std::uint8_t wr_opcode) {
  switch (wr_opcode) {
    case VIBIF_WR_RDMA_WRITE:
    case VIBIF_WR_RDMA_WRITE_WITH_IMM: return IBV_WC_RDMA_WRITE;
    case VIBIF_WR_RDMA_READ: return IBV_WC_RDMA_READ;
    case VIBIF_WR_ATOMIC_CMP_AND_SWP: return IBV_WC_COMP_SWAP;
    case VIBIF_WR_ATOMIC_FETCH_AND_ADD: return IBV_WC_FETCH_ADD;
    default: return IBV_WC_SEND;
  }
}

bool opcode_allowed(std::uint8_t qp_type, std::uint8_t opcode) {
  switch (qp_type) {
    case VIBIF_QPT_UD: return opcode == VIBIF_WR_SEND || opcode == VIBIF_WR_SEND_WITH_IMM;
    case VIBIF_QPT_UC: return opcode <= VIBIF_WR_SEND_WITH_IMM;
    default: return opcode <= VIBIF_WR_ATOMIC_FETCH_AND_ADD;
  }
}

}  // namespace

bool ControlPath::write_cqe(GuestCq& cq, const ibv_wc& wc, std::uint8_t wq, std::uint32_t wqe_counter) {
  const std::uint32_t consumer = load_guest(slot(cq.slot).consumer);
  if (cq.producer - consumer >= cq.entries) return false;
  auto* entry = reinterpret_cast<vibif_cqe*>(cq.ring->bytes().data()) + (cq.producer & (cq.entries - 1));
  vibif_cqe e{};
  e.wr_id = wc.wr_id;
  e.status = wc.status;
  e.opcode = wc.opcode;
  e.vendor_err = wc.vendor_err;
  e.byte_len = wc.byte_len;
  e.imm_data = wc.imm_data;
  e.qp_num = wc.qp_num;
  e.src_qp = wc.src_qp;
  e.wc_flags = wc.wc_flags;
  e.pkey_index = guest_pkey_index(wc.pkey_index).value_or(0);
  e.slid = wc.slid;
  e.sl = wc.sl;
  e.dlid_path_bits = wc.dlid_path_bits;
  e.wq = wq;
  e.wqe_counter = wqe_counter;
  // Everything but the owner byte first; the owner byte makes it valid.
  std::memcpy(entry, &e, offsetof(vibif_cqe, owner));
  __atomic_store_n(&entry->owner, vibif_cqe_owner(cq.producer, cq.entries), __ATOMIC_RELEASE);
  ++cq.producer;
  stats_.completion_delivered(wc.status == IBV_WC_SUCCESS);
  return true;
}

bool ControlPath::to_guest_completion(ibv_wc& wc, std::uint8_t& wq, std::uint32_t& wqe_counter) {
  wq = static_cast<std::uint8_t>(wc.wr_id >> kKindShift);
  if (wq == VIBIF_WQ_SRQ) {
    // An SRQ completion frees its table slot even if its QP has gone.
    GuestSrq* srq = srqs_.find(static_cast<vibif_handle_t>(wc.wr_id >> 16));
    const auto slot = static_cast<std::uint32_t>(wc.wr_id & 0xffff);
    if (!srq || slot >= srq->wr_ids.size()) return false;
    wc.wr_id = srq->wr_ids[slot];
    srq->free_slots.push_back(slot);
    wqe_counter = 0;
    return qps_by_num_.count(wc.qp_num) != 0;
  }
  auto it = qps_by_num_.find(wc.qp_num);
  if (it == qps_by_num_.end()) return false;  // the QP was destroyed meanwhile
  GuestQp& qp = *it->second;
  const auto index = static_cast<std::uint32_t>(wc.wr_id);
  const auto& table = wq == VIBIF_WQ_SEND ? qp.sq_wr_ids : qp.rq_wr_ids;
  if ((wq != VIBIF_WQ_SEND && wq != VIBIF_WQ_RECV) || table.empty()) return false;
  wc.wr_id = table[index & (table.size() - 1)];
  wqe_counter = index + 1;
  return true;
}

void ControlPath::fail_wqe(GuestCq& cq, std::uint64_t wr_id, ibv_wc_opcode opcode, std::uint32_t qp_num,
                           std::uint8_t wq, std::uint32_t wqe_counter) {
  ibv_wc wc{};
  wc.wr_id = wr_id;
  wc.status = IBV_WC_LOC_QP_OP_ERR;
  wc.opcode = opcode;
  wc.qp_num = qp_num;
  if (!write_cqe(cq, wc, wq, wqe_counter)) guest_log_.log(LogLevel::warning, "CQ " + std::to_string(cq.handle) + " full: error completion lost");
  publish(slot(cq.slot).producer, cq.producer);
}

void ControlPath::break_qp(GuestQp& qp, const char* why) {
  if (!qp.broken)
    guest_log_.log(LogLevel::warning, "QP " + std::to_string(qp.qp->qp_num()) + ": " + why + ": moved to the error state");
  qp.broken = true;
  ibv_qp_attr attr{};
  attr.qp_state = IBV_QPS_ERR;
  qp.qp->modify(attr, IBV_QP_STATE);
}

bool ControlPath::service_send_queue(GuestQp& qp) {
  auto& s = slot(qp.sq_slot);
  const std::uint32_t producer = load_guest(s.producer);
  const std::uint32_t queued = producer - qp.sq_consumer;
  if (queued == 0) return false;
  if (queued > qp.cap.max_send_wr) {
    // Hardware would have lost WQEs here: the queue is broken, as the QP.
    break_qp(qp, "send queue overrun");
    qp.sq_consumer = producer;
    publish(s.consumer, qp.sq_consumer);
    return true;
  }
  const std::uint32_t mask = qp.cap.max_send_wr - 1;
  const std::uint32_t qp_num = qp.qp->qp_num();
  std::array<std::byte, kMaxStride> copy;
  bool progressed = false;
  while (qp.sq_consumer != producer) {
    std::memcpy(copy.data(), qp.buffer->bytes().data() + std::size_t{qp.sq_consumer & mask} * qp.send_stride,
                qp.send_stride);
    vibif_send_wqe w;
    std::memcpy(&w, copy.data(), sizeof(w));
    const bool is_inline = (w.send_flags & VIBIF_SEND_INLINE) != 0;
    std::array<ibv_sge, VIBIF_MAX_SGE> sges{};
    ibv_send_wr wr{};
    bool valid = opcode_allowed(qp.qp_type, w.opcode) && (w.send_flags & ~kSendFlags) == 0;
    if (valid && is_inline) {
      valid = w.inline_length <= qp.cap.max_inline_data;
      sges[0].addr = reinterpret_cast<std::uintptr_t>(copy.data() + sizeof(vibif_send_wqe));
      sges[0].length = w.inline_length;
      wr.num_sge = w.inline_length ? 1 : 0;
    } else if (valid) {
      valid = w.num_sge <= qp.cap.max_send_sge;
      for (std::uint32_t i = 0; valid && i < w.num_sge; ++i) {
        vibif_sge g;
        std::memcpy(&g, copy.data() + sizeof(vibif_send_wqe) + i * sizeof(vibif_sge), sizeof(g));
        sges[i] = ibv_sge{g.addr, g.length, g.lkey};
      }
      wr.num_sge = w.num_sge;
    }
    wr.wr_id = hca_wr_id(VIBIF_WQ_SEND, qp.sq_consumer);
    qp.sq_wr_ids[qp.sq_consumer & mask] = w.wr_id;
    wr.sg_list = sges.data();
    wr.opcode = static_cast<ibv_wr_opcode>(w.opcode);
    wr.send_flags = w.send_flags;
    wr.imm_data = w.imm_data;
    if (w.opcode == VIBIF_WR_ATOMIC_CMP_AND_SWP || w.opcode == VIBIF_WR_ATOMIC_FETCH_AND_ADD) {
      wr.wr.atomic.remote_addr = w.remote_addr;
      wr.wr.atomic.rkey = w.rkey;
      wr.wr.atomic.compare_add = w.compare_add;
      wr.wr.atomic.swap = w.swap;
    } else if (qp.qp_type == VIBIF_QPT_UD) {
      // Never QP0/QP1: management traffic is the host's.
      platform::AddressHandle* ah = ahs_.find(w.ud_ah);
      valid = valid && ah && w.ud_remote_qpn > 1 && w.ud_remote_qpn <= 0xffffff;
      wr.wr.ud.ah = ah ? ah->native() : nullptr;
      wr.wr.ud.remote_qpn = w.ud_remote_qpn;
      wr.wr.ud.remote_qkey = w.ud_remote_qkey;
    } else {
      wr.wr.rdma.remote_addr = w.remote_addr;
      wr.wr.rdma.rkey = w.rkey;
    }
    int err = valid ? 0 : EINVAL;
    if (valid) {
      const ibv_send_wr* bad = nullptr;
      err = qp.qp->post_send(&wr, &bad);
      if (err == ENOMEM) {
        qp.sq_hca_full = true;  // the HCA's queue is full: retried after completions
        break;
      }
    }
    ++qp.sq_consumer;
    ContextStats::bump(stats_.wqes);
    progressed = true;
    if (err) {
      fail_wqe(*qp.send_cq, w.wr_id, send_completion_opcode(w.opcode), qp_num, VIBIF_WQ_SEND, qp.sq_consumer);
      break_qp(qp, "invalid send WQE");
    }
  }
  publish(s.consumer, qp.sq_consumer);
  return progressed;
}

namespace {

// Reads a receive WQE from a guest queue into `wr`; false if it is malformed.
bool read_recv_wqe(const std::byte* entry, std::uint32_t stride, std::uint32_t max_sge,
                   std::array<std::byte, kMaxStride>& copy, std::array<ibv_sge, VIBIF_MAX_SGE>& sges,
                   ibv_recv_wr& wr) {
  std::memcpy(copy.data(), entry, stride);
  vibif_recv_wqe w;
  std::memcpy(&w, copy.data(), sizeof(w));
  wr = ibv_recv_wr{};
  wr.wr_id = w.wr_id;
  wr.sg_list = sges.data();
  if (w.num_sge > max_sge) return false;
  for (std::uint32_t i = 0; i < w.num_sge; ++i) {
    vibif_sge g;
    std::memcpy(&g, copy.data() + sizeof(vibif_recv_wqe) + i * sizeof(vibif_sge), sizeof(g));
    sges[i] = ibv_sge{g.addr, g.length, g.lkey};
  }
  wr.num_sge = static_cast<int>(w.num_sge);
  return true;
}

}  // namespace

bool ControlPath::service_recv_queue(GuestQp& qp) {
  if (qp.srq) return false;
  auto& s = slot(qp.rq_slot);
  const std::uint32_t producer = load_guest(s.producer);
  const std::uint32_t queued = producer - qp.rq_consumer;
  if (queued == 0) return false;
  if (queued > qp.cap.max_recv_wr) {
    break_qp(qp, "receive queue overrun");
    qp.rq_consumer = producer;
    publish(s.consumer, qp.rq_consumer);
    return true;
  }
  const std::uint32_t mask = qp.cap.max_recv_wr - 1;
  std::array<std::byte, kMaxStride> copy;
  std::array<ibv_sge, VIBIF_MAX_SGE> sges{};
  bool progressed = false;
  while (qp.rq_consumer != producer) {
    ibv_recv_wr wr;
    const std::byte* entry =
        qp.buffer->bytes().data() + qp.recv_offset + std::size_t{qp.rq_consumer & mask} * qp.recv_stride;
    int err = read_recv_wqe(entry, qp.recv_stride, qp.cap.max_recv_sge, copy, sges, wr) ? 0 : EINVAL;
    const std::uint64_t guest_wr_id = wr.wr_id;
    if (!err) {
      qp.rq_wr_ids[qp.rq_consumer & mask] = guest_wr_id;
      wr.wr_id = hca_wr_id(VIBIF_WQ_RECV, qp.rq_consumer);
      const ibv_recv_wr* bad = nullptr;
      err = qp.qp->post_recv(&wr, &bad);
      if (err == ENOMEM) {
        qp.rq_hca_full = true;
        break;
      }
    }
    ++qp.rq_consumer;
    ContextStats::bump(stats_.wqes);
    progressed = true;
    if (err) {
      fail_wqe(*qp.recv_cq, guest_wr_id, IBV_WC_RECV, qp.qp->qp_num(), VIBIF_WQ_RECV, qp.rq_consumer);
      break_qp(qp, "invalid receive WQE");
    }
  }
  publish(s.consumer, qp.rq_consumer);
  return progressed;
}

bool ControlPath::service_srq(vibif_handle_t handle, GuestSrq& srq) {
  auto& s = slot(srq.slot);
  const std::uint32_t producer = load_guest(s.producer);
  const std::uint32_t queued = producer - srq.consumer;
  if (queued == 0) return false;
  const std::uint32_t mask = srq.entries - 1;
  if (queued > srq.entries) {
    // No QP to blame: the overrun WQEs are dropped and the guest told.
    guest_log_.log(LogLevel::warning, "SRQ overrun: queued receives dropped");
    srq.consumer = producer;
    publish(s.consumer, srq.consumer);
    push_event(VIBIF_EVENT_ASYNC, IBV_EVENT_SRQ_ERR, handle);
    return true;
  }
  std::array<std::byte, kMaxStride> copy;
  std::array<ibv_sge, VIBIF_MAX_SGE> sges{};
  bool progressed = false;
  while (srq.consumer != producer) {
    ibv_recv_wr wr;
    const std::byte* entry = srq.ring->bytes().data() + std::size_t{srq.consumer & mask} * srq.stride;
    if (read_recv_wqe(entry, srq.stride, srq.max_sge, copy, sges, wr)) {
      if (srq.free_slots.empty()) {
        srq.hca_full = true;  // every slot is at the HCA: wait for completions
        break;
      }
      const std::uint32_t table_slot = srq.free_slots.back();
      srq.wr_ids[table_slot] = wr.wr_id;
      wr.wr_id = hca_srq_wr_id(handle, table_slot);
      const ibv_recv_wr* bad = nullptr;
      const int err = srq.srq->post_recv(&wr, &bad);
      if (err == ENOMEM) {
        srq.hca_full = true;
        break;
      }
      if (!err) srq.free_slots.pop_back();
      if (err) guest_log_.log(LogLevel::warning, "SRQ receive refused by the HCA: dropped");
    } else {
      guest_log_.log(LogLevel::warning, "malformed SRQ receive WQE: dropped");
    }
    ++srq.consumer;
    ContextStats::bump(stats_.wqes);
    progressed = true;
  }
  publish(s.consumer, srq.consumer);
  return progressed;
}

bool ControlPath::drain_completions(GuestCq& cq) {
  auto& s = slot(cq.slot);
  const std::uint32_t consumer = load_guest(s.consumer);
  const std::uint32_t used = cq.producer - consumer;
  // A consumer beyond what we wrote is nonsense: the CQ counts as full.
  const std::uint32_t room = used > cq.entries ? 0 : cq.entries - used;
  if (room == 0) return false;
  std::array<ibv_wc, kPollBatch> wcs;
  const int n = cq.cq->poll(std::span<ibv_wc>(wcs.data(), std::min<std::size_t>(room, kPollBatch)));
  if (n <= 0) return false;
  for (int i = 0; i < n; ++i) {
    ibv_wc& wc = wcs[static_cast<std::size_t>(i)];
    std::uint8_t wq = VIBIF_WQ_NONE;
    std::uint32_t wqe_counter = 0;
    if (to_guest_completion(wc, wq, wqe_counter)) write_cqe(cq, wc, wq, wqe_counter);
  }
  // The guest arms, then polls again; we publish, then look at the arm: one
  // of the two sees the other's store. That store-then-load order is carried
  // by the two accesses themselves (seq_cst, in one total order with the
  // guest's fence between its arm and its poll) rather than by a fence
  // between them: the same instructions, and ThreadSanitizer understands
  // them, where it cannot model a standalone fence.
  __atomic_store_n(&s.producer, cq.producer, __ATOMIC_SEQ_CST);
  const std::uint32_t arm = __atomic_load_n(&s.arm_sequence, __ATOMIC_SEQ_CST);
  if (arm != cq.armed_ack) {
    cq.armed_ack = arm;
    publish(s.armed_ack, arm);
    push_event(VIBIF_EVENT_COMPLETION, 0, cq.handle);
  }
  return true;
}

void ControlPath::push_event(std::uint16_t type, std::uint16_t event, vibif_handle_t handle) {
  const std::uint32_t consumer = load_guest(doorbell_.event_consumer);
  if (event_producer_ - consumer >= VIBIF_EVENT_QUEUE_LEN) {
    if (events_dropped_++ % 1000 == 0)
      guest_log_.log(LogLevel::warning, "event queue full: event dropped (the guest does not read it)");
    return;
  }
  vibif_event& e = doorbell_.events[event_producer_ % VIBIF_EVENT_QUEUE_LEN];
  e.type = type;
  e.event = event;
  e.handle = handle;
  ++event_producer_;
  publish(doorbell_.event_producer, event_producer_);
  notify_guest_ = true;
}

bool ControlPath::service_queues() {
  bool did = false;
  qps_.for_each([&](vibif_handle_t, GuestQp& qp) {
    did |= service_send_queue(qp);
    did |= service_recv_queue(qp);
  });
  srqs_.for_each([&](vibif_handle_t h, GuestSrq& srq) { did |= service_srq(h, srq); });
  bool completed = false;
  cqs_.for_each([&](vibif_handle_t, GuestCq& cq) { completed |= drain_completions(cq); });
  if (completed) {
    // Completions free HCA queue space: queues that found it full retry.
    qps_.for_each([](vibif_handle_t, GuestQp& qp) { qp.sq_hca_full = qp.rq_hca_full = false; });
    srqs_.for_each([](vibif_handle_t, GuestSrq& srq) { srq.hca_full = false; });
  }
  if (did || completed) stats_.touch();
  return did || completed;
}

bool ControlPath::queues_pending() const {
  bool pending = false;
  qps_.for_each([&](vibif_handle_t, const GuestQp& qp) {
    const auto& sq = doorbell_.slots[qp.sq_slot];
    if (!qp.sq_hca_full && __atomic_load_n(&sq.producer, __ATOMIC_ACQUIRE) != qp.sq_consumer) pending = true;
    if (!qp.srq && !qp.rq_hca_full &&
        __atomic_load_n(&doorbell_.slots[qp.rq_slot].producer, __ATOMIC_ACQUIRE) != qp.rq_consumer)
      pending = true;
  });
  srqs_.for_each([&](vibif_handle_t, const GuestSrq& srq) {
    if (!srq.hca_full && __atomic_load_n(&doorbell_.slots[srq.slot].producer, __ATOMIC_ACQUIRE) != srq.consumer)
      pending = true;
  });
  return pending;
}

void ControlPath::arm_hca_cqs() {
  cqs_.for_each([](vibif_handle_t, GuestCq& cq) { cq.cq->request_notify(false); });
}

void ControlPath::deliver_async_event(const platform::AsyncEvent& event) {
  if (!event.qp && !event.cq && !event.srq) {
    hca_pkeys_.reset();  // a port event: the table is read again when next needed
    return;
  }
  vibif_handle_t handle = VIBIF_HANDLE_NONE;
  qps_.for_each([&](vibif_handle_t h, GuestQp& qp) {
    if (event.qp && event.qp == qp.qp.get()) handle = h;
  });
  cqs_.for_each([&](vibif_handle_t h, GuestCq& cq) {
    if (event.cq && event.cq == cq.cq.get()) handle = h;
  });
  srqs_.for_each([&](vibif_handle_t h, GuestSrq& srq) {
    if (event.srq && event.srq == srq.srq.get()) handle = h;
  });
  if (handle == VIBIF_HANDLE_NONE) return;  // the object went meanwhile
  log_line(LogLevel::info, subject_, std::string("asynchronous event ") + ibv_event_type_str(event.type) +
                                         " for handle " + std::to_string(handle));
  push_event(VIBIF_EVENT_ASYNC, static_cast<std::uint16_t>(event.type), handle);
}

}  // namespace vib::backend
