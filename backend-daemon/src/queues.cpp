// Control operations on queues: CQs, QPs and SRQs, whose buffers are guest
// pages and whose indices live in the context's doorbell page. Every request
// is a copy; every size is checked against the page list the guest gave
// before anything is mapped.
#include <algorithm>
#include <cstring>
#include <system_error>

#include "control.hpp"
#include "log.hpp"

namespace vib::backend {

namespace {

bool is_pow2(std::uint32_t v) { return v != 0 && (v & (v - 1)) == 0; }

void reset_slot(vibif_db_slot& s) {
  __atomic_store_n(&s.producer, 0u, __ATOMIC_RELAXED);
  __atomic_store_n(&s.consumer, 0u, __ATOMIC_RELAXED);
  __atomic_store_n(&s.arm_sequence, 0u, __ATOMIC_RELAXED);
  __atomic_store_n(&s.armed_ack, 0u, __ATOMIC_RELEASE);
}

// Attribute bits a guest may use in MODIFY_QP. Alternate paths, capability
// changes and rate limits are not offered.
constexpr int kAllowedQpAttrs = IBV_QP_STATE | IBV_QP_CUR_STATE | IBV_QP_EN_SQD_ASYNC_NOTIFY |
                                IBV_QP_ACCESS_FLAGS | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_QKEY |
                                IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT |
                                IBV_QP_RNR_RETRY | IBV_QP_RQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC |
                                IBV_QP_MIN_RNR_TIMER | IBV_QP_SQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC |
                                IBV_QP_PATH_MIG_STATE | IBV_QP_DEST_QPN;

}  // namespace

std::optional<std::uint16_t> ControlPath::alloc_slot() {
  for (std::uint16_t i = 0; i < VIBIF_DB_SLOTS; ++i)
    if (!slots_used_.test(i)) {
      slots_used_.set(i);
      reset_slot(slot(i));
      return i;
    }
  return std::nullopt;
}

void ControlPath::free_slot(std::uint16_t index) {
  slots_used_.reset(index);
  reset_slot(slot(index));
}

int ControlPath::map_queue_pages(const vibif_page_list& list, std::uint64_t pages, bool writable,
                                 std::unique_ptr<platform::GrantMapping>& out) {
  if (list.nr_pages != pages) return VIBIF_EINVAL;
  if (!quota_.reserve(Quota::pinned_pages, pinned_pages_ + pages)) return VIBIF_EDQUOT;
  std::vector<platform::GrantRef> refs;
  if (int err = resolve_page_list(memory_, list, config_.max_pinned_pages, refs)) return err;
  try {
    out = memory_.map(refs, writable);
  } catch (const std::system_error&) {
    return VIBIF_EACCES;
  }
  return VIBIF_OK;
}

int ControlPath::to_hca_ah_attr(const vibif_ah_attr& in, ibv_ah_attr& out) {
  // 0 is how many programs leave the port of an address vector unset.
  if (in.port_num != 1 && in.port_num != 0) return VIBIF_EINVAL;
  out = ibv_ah_attr{};
  out.dlid = in.dlid;
  out.sl = in.sl & 0xf;
  out.src_path_bits = in.src_path_bits & 0x7f;
  out.static_rate = in.static_rate;
  out.port_num = config_.port;  // the guest's port 1 is the device's port
  if (in.is_global) {
    // The guest's GID table is the device's allowed indices, in order.
    if (in.sgid_index >= config_.gid_indices.size()) return VIBIF_EPERM;
    out.is_global = 1;
    std::memcpy(out.grh.dgid.raw, in.dgid, sizeof(out.grh.dgid.raw));
    out.grh.flow_label = in.flow_label & 0xfffff;
    out.grh.sgid_index = static_cast<std::uint8_t>(config_.gid_indices[in.sgid_index]);
    out.grh.hop_limit = in.hop_limit;
    out.grh.traffic_class = in.traffic_class;
  }
  return VIBIF_OK;
}

bool guest_ah_attr(const ibv_ah_attr& in, const std::vector<std::uint32_t>& gid_indices, vibif_ah_attr& out) {
  out = vibif_ah_attr{};
  out.dlid = in.dlid;
  out.sl = in.sl;
  out.src_path_bits = in.src_path_bits;
  out.static_rate = in.static_rate;
  out.port_num = 1;
  out.is_global = in.is_global;
  if (!in.is_global) return true;
  std::memcpy(out.dgid, in.grh.dgid.raw, sizeof(out.dgid));
  out.flow_label = in.grh.flow_label;
  out.hop_limit = in.grh.hop_limit;
  out.traffic_class = in.grh.traffic_class;
  auto it = std::find(gid_indices.begin(), gid_indices.end(), in.grh.sgid_index);
  if (it == gid_indices.end()) return false;
  out.sgid_index = static_cast<std::uint8_t>(it - gid_indices.begin());
  return true;
}

void ControlPath::from_hca_ah_attr(const ibv_ah_attr& in, vibif_ah_attr& out) {
  // A QP the guest moved itself has a source GID of its table.
  guest_ah_attr(in, config_.gid_indices, out);
}

const std::vector<std::uint16_t>& ControlPath::hca_pkeys() {
  if (!hca_pkeys_) {
    std::vector<std::uint16_t> table;
    ibv_port_attr port;
    hca_.query_port(config_.port, port);
    for (int i = 0; i < port.pkey_tbl_len; ++i) {
      std::uint16_t pkey = 0;
      hca_.query_pkey(config_.port, i, pkey);  // network byte order
      table.push_back(static_cast<std::uint16_t>((pkey >> 8) | (pkey << 8)));
    }
    hca_pkeys_ = std::move(table);
  }
  return *hca_pkeys_;
}

std::optional<std::uint16_t> ControlPath::hca_pkey_index(std::uint16_t guest_index) {
  if (guest_index >= config_.pkeys.size()) return std::nullopt;
  const auto& table = hca_pkeys();
  const auto it = std::find(table.begin(), table.end(), config_.pkeys[guest_index]);
  if (it == table.end()) return std::nullopt;
  return static_cast<std::uint16_t>(it - table.begin());
}

std::optional<std::uint16_t> ControlPath::guest_pkey_index(std::uint16_t hca_index) {
  const auto& table = hca_pkeys();
  if (hca_index >= table.size()) return std::nullopt;
  const auto it = std::find(config_.pkeys.begin(), config_.pkeys.end(), table[hca_index]);
  if (it == config_.pkeys.end()) return std::nullopt;
  return static_cast<std::uint16_t>(it - config_.pkeys.begin());
}

// A CQ or SRQ: EBUSY while a QP still uses it, else freed with its slot and pages.
template <typename Queue>
void ControlPath::destroy_unused_queue(HandleTable<Queue>& table, vibif_handle_t h, vibif_response& rsp) {
  auto* owner = table.owner(h);
  if (!owner) {
    rsp.hdr.status = VIBIF_ENOENT;
    return;
  }
  Queue& queue = **owner;
  if (queue.users) {
    rsp.hdr.status = VIBIF_EBUSY;
    return;
  }
  announce(queue.hca_object(), false);
  free_slot(queue.slot);
  pinned_pages_ -= queue.pages;
  owner->reset();
  table.release(h);
}

// ---- CQ ---------------------------------------------------------------------

void ControlPath::create_cq(const vibif_request& req, vibif_response& rsp) {
  const auto& r = req.u.create_cq;
  auto& status = rsp.hdr.status;
  if (!is_pow2(r.cqe) || r.cqe > VIBIF_MAX_CQE) {
    status = VIBIF_EINVAL;
    return;
  }
  if (!quota_.reserve(Quota::cqs, cqs_.size() + 1)) {
    status = VIBIF_EDQUOT;
    return;
  }
  const std::uint64_t pages = vibif_pages_for(std::uint64_t{r.cqe} * sizeof(vibif_cqe));
  auto cq = std::make_unique<GuestCq>();
  if ((status = map_queue_pages(r.pages, pages, /*writable=*/true, cq->ring)) != VIBIF_OK) return;
  auto slot_index = alloc_slot();
  if (!slot_index) {
    status = VIBIF_ENOSPC;
    return;
  }
  try {
    cq->cq = hca_.create_cq(static_cast<int>(r.cqe));
  } catch (...) {
    free_slot(*slot_index);
    throw;
  }
  cq->entries = r.cqe;
  cq->slot = *slot_index;
  cq->pages = pages;
  const void* hca_object = cq->cq.get();
  GuestCq* raw = cq.get();
  const vibif_handle_t h = cqs_.insert(std::move(cq));
  if (h == VIBIF_HANDLE_NONE) {
    free_slot(*slot_index);
    status = VIBIF_EDQUOT;
    return;
  }
  raw->handle = h;
  pinned_pages_ += pages;
  announce(hca_object, true);
  rsp.u.create_cq.cq = h;
  rsp.u.create_cq.cqe = r.cqe;
  rsp.u.create_cq.doorbell_slot = *slot_index;
  log_line(LogLevel::debug, subject_, "CQ " + std::to_string(h) + ": " + std::to_string(r.cqe) + " entries");
}

void ControlPath::resize_cq(const vibif_request& req, vibif_response& rsp) {
  const auto& r = req.u.resize_cq;
  auto& status = rsp.hdr.status;
  GuestCq* cq = cqs_.find(r.cq);
  if (!cq) {
    status = VIBIF_ENOENT;
    return;
  }
  if (!is_pow2(r.cqe) || r.cqe > VIBIF_MAX_CQE) {
    status = VIBIF_EINVAL;
    return;
  }
  // Entries the guest has not consumed move to the new buffer; they must fit.
  const std::uint32_t consumer = __atomic_load_n(&slot(cq->slot).consumer, __ATOMIC_ACQUIRE);
  const std::uint32_t pending = cq->producer - consumer;
  if (pending > cq->entries || pending > r.cqe) {
    status = VIBIF_EINVAL;
    return;
  }
  const std::uint64_t pages = vibif_pages_for(std::uint64_t{r.cqe} * sizeof(vibif_cqe));
  std::unique_ptr<platform::GrantMapping> ring;
  pinned_pages_ -= cq->pages;  // the old buffer is released on success
  status = map_queue_pages(r.pages, pages, /*writable=*/true, ring);
  if (status == VIBIF_OK) {
    try {
      cq->cq->resize(r.cqe);
    } catch (...) {
      pinned_pages_ += cq->pages;
      throw;
    }
  }
  if (status != VIBIF_OK) {
    pinned_pages_ += cq->pages;
    return;
  }
  auto* from = reinterpret_cast<const vibif_cqe*>(cq->ring->bytes().data());
  auto* to = reinterpret_cast<vibif_cqe*>(ring->bytes().data());
  for (std::uint32_t i = 0; i < pending; ++i) {
    vibif_cqe e = from[(consumer + i) & (cq->entries - 1)];
    e.owner = vibif_cqe_owner(i, r.cqe);
    to[i] = e;
  }
  cq->ring = std::move(ring);
  cq->entries = r.cqe;
  cq->pages = pages;
  cq->producer = pending;
  pinned_pages_ += pages;
  __atomic_store_n(&slot(cq->slot).consumer, 0u, __ATOMIC_RELAXED);
  __atomic_store_n(&slot(cq->slot).producer, pending, __ATOMIC_RELEASE);
  rsp.u.create_cq.cq = r.cq;
  rsp.u.create_cq.cqe = r.cqe;
  rsp.u.create_cq.doorbell_slot = cq->slot;
}

void ControlPath::destroy_cq(const vibif_request& req, vibif_response& rsp) {
  destroy_unused_queue(cqs_, req.u.handle.handle, rsp);
}

// ---- SRQ --------------------------------------------------------------------

void ControlPath::create_srq(const vibif_request& req, vibif_response& rsp) {
  const auto& r = req.u.create_srq;
  auto& status = rsp.hdr.status;
  platform::ProtectionDomain* pd = pds_.find(r.pd);
  if (!pd) {
    status = VIBIF_ENOENT;
    return;
  }
  if (!is_pow2(r.max_wr) || r.max_wr > VIBIF_MAX_QUEUE_WR || r.max_sge == 0 || r.max_sge > VIBIF_MAX_SGE ||
      r.srq_limit > r.max_wr) {
    status = VIBIF_EINVAL;
    return;
  }
  if (!quota_.reserve(Quota::srqs, srqs_.size() + 1)) {
    status = VIBIF_EDQUOT;
    return;
  }
  auto srq = std::make_unique<GuestSrq>();
  srq->entries = r.max_wr;
  srq->max_sge = r.max_sge;
  srq->stride = vibif_recv_wqe_stride(r.max_sge);
  srq->pages = vibif_pages_for(std::uint64_t{r.max_wr} * srq->stride);
  srq->wr_ids.resize(r.max_wr);
  for (std::uint32_t i = r.max_wr; i > 0; --i) srq->free_slots.push_back(i - 1);
  if ((status = map_queue_pages(r.pages, srq->pages, /*writable=*/false, srq->ring)) != VIBIF_OK) return;
  auto slot_index = alloc_slot();
  if (!slot_index) {
    status = VIBIF_ENOSPC;
    return;
  }
  ibv_srq_init_attr init{};
  init.attr.max_wr = r.max_wr;
  init.attr.max_sge = r.max_sge;
  init.attr.srq_limit = r.srq_limit;
  try {
    srq->srq = hca_.create_srq(*pd, init);
  } catch (...) {
    free_slot(*slot_index);
    throw;
  }
  srq->slot = *slot_index;
  const void* hca_object = srq->srq.get();
  const std::uint64_t pages = srq->pages;
  const vibif_handle_t h = srqs_.insert(std::move(srq));
  if (h == VIBIF_HANDLE_NONE) {
    free_slot(*slot_index);
    status = VIBIF_EDQUOT;
    return;
  }
  pinned_pages_ += pages;
  announce(hca_object, true);
  rsp.u.create_srq.srq = h;
  rsp.u.create_srq.max_wr = r.max_wr;
  rsp.u.create_srq.max_sge = r.max_sge;
  rsp.u.create_srq.wqe_stride = vibif_recv_wqe_stride(r.max_sge);
  rsp.u.create_srq.doorbell_slot = *slot_index;
}

void ControlPath::modify_srq(const vibif_request& req, vibif_response& rsp) {
  const auto& r = req.u.modify_srq;
  GuestSrq* srq = srqs_.find(r.srq);
  if (!srq) {
    rsp.hdr.status = VIBIF_ENOENT;
    return;
  }
  // The buffer's geometry is fixed at creation: only the limit may change.
  if (r.attr_mask != IBV_SRQ_LIMIT || r.srq_limit > srq->entries) {
    rsp.hdr.status = VIBIF_EINVAL;
    return;
  }
  ibv_srq_attr attr{};
  attr.srq_limit = r.srq_limit;
  rsp.hdr.status = -srq->srq->modify(attr, IBV_SRQ_LIMIT);
}

void ControlPath::query_srq(const vibif_request& req, vibif_response& rsp) {
  GuestSrq* srq = srqs_.find(req.u.handle.handle);
  if (!srq) {
    rsp.hdr.status = VIBIF_ENOENT;
    return;
  }
  ibv_srq_attr attr{};
  if (int err = srq->srq->query(attr)) {
    rsp.hdr.status = -err;
    return;
  }
  rsp.u.query_srq.max_wr = srq->entries;
  rsp.u.query_srq.max_sge = srq->max_sge;
  rsp.u.query_srq.srq_limit = attr.srq_limit;
}

void ControlPath::destroy_srq(const vibif_request& req, vibif_response& rsp) {
  destroy_unused_queue(srqs_, req.u.handle.handle, rsp);
}

// ---- QP ---------------------------------------------------------------------

void ControlPath::create_qp(const vibif_request& req, vibif_response& rsp) {
  const auto& r = req.u.create_qp;
  auto& status = rsp.hdr.status;
  platform::ProtectionDomain* pd = pds_.find(r.pd);
  GuestCq* send_cq = cqs_.find(r.send_cq);
  GuestCq* recv_cq = cqs_.find(r.recv_cq);
  GuestSrq* srq = r.srq == VIBIF_HANDLE_NONE ? nullptr : srqs_.find(r.srq);
  if (!pd || !send_cq || !recv_cq || (r.srq != VIBIF_HANDLE_NONE && !srq)) {
    status = VIBIF_ENOENT;
    return;
  }
  // RC, UC and UD only: QP0/QP1 and raw packet QPs stay the host's.
  if (r.qp_type != VIBIF_QPT_RC && r.qp_type != VIBIF_QPT_UC && r.qp_type != VIBIF_QPT_UD) {
    status = VIBIF_EPERM;
    return;
  }
  const auto& cap = r.cap;
  const bool has_rq = srq == nullptr;
  if (!is_pow2(cap.max_send_wr) || cap.max_send_wr > VIBIF_MAX_QUEUE_WR || cap.max_send_sge > VIBIF_MAX_SGE ||
      cap.max_inline_data > VIBIF_MAX_INLINE ||
      (has_rq ? (!is_pow2(cap.max_recv_wr) || cap.max_recv_wr > VIBIF_MAX_QUEUE_WR || cap.max_recv_sge == 0 ||
                 cap.max_recv_sge > VIBIF_MAX_SGE)
              : (cap.max_recv_wr != 0 || cap.max_recv_sge != 0))) {
    status = VIBIF_EINVAL;
    return;
  }
  if (!quota_.reserve(Quota::qps, qps_.size() + 1)) {
    status = VIBIF_EDQUOT;
    return;
  }
  auto qp = std::make_unique<GuestQp>();
  qp->cap = cap;
  qp->send_stride = vibif_send_wqe_stride(cap.max_send_sge, cap.max_inline_data);
  qp->recv_stride = has_rq ? vibif_recv_wqe_stride(cap.max_recv_sge) : 0;
  qp->recv_offset = vibif_qp_recv_offset(cap.max_send_wr, qp->send_stride);
  qp->pages = vibif_qp_buffer_pages(cap.max_send_wr, qp->send_stride, cap.max_recv_wr, qp->recv_stride);
  qp->sq_wr_ids.resize(cap.max_send_wr);
  qp->rq_wr_ids.resize(cap.max_recv_wr);
  if ((status = map_queue_pages(r.pages, qp->pages, /*writable=*/false, qp->buffer)) != VIBIF_OK) return;
  auto sq_slot = alloc_slot();
  auto rq_slot = has_rq ? alloc_slot() : std::optional<std::uint16_t>(0);
  if (!sq_slot || !rq_slot) {
    if (sq_slot) free_slot(*sq_slot);
    status = VIBIF_ENOSPC;
    return;
  }
  platform::QueuePairInit init;
  init.send_cq = send_cq->cq.get();
  init.recv_cq = recv_cq->cq.get();
  init.srq = srq ? srq->srq.get() : nullptr;
  init.cap.max_send_wr = cap.max_send_wr;
  init.cap.max_recv_wr = cap.max_recv_wr;
  init.cap.max_send_sge = std::max<std::uint32_t>(cap.max_send_sge, 1);
  init.cap.max_recv_sge = cap.max_recv_sge;
  init.cap.max_inline_data = cap.max_inline_data;
  init.qp_type = static_cast<ibv_qp_type>(r.qp_type);
  init.sq_sig_all = r.sq_sig_all != 0;
  try {
    qp->qp = hca_.create_qp(*pd, init);
  } catch (...) {
    free_slot(*sq_slot);
    if (has_rq) free_slot(*rq_slot);
    throw;
  }
  qp->pd = pd;
  qp->send_cq = send_cq;
  qp->recv_cq = recv_cq;
  qp->srq = srq;
  qp->qp_type = r.qp_type;
  qp->sq_sig_all = r.sq_sig_all != 0;
  qp->sq_slot = *sq_slot;
  qp->rq_slot = *rq_slot;
  const void* hca_object = qp->qp.get();
  const std::uint32_t qp_num = qp->qp->qp_num();
  GuestQp& made = *qp;
  const vibif_handle_t h = qps_.insert(std::move(qp));
  if (h == VIBIF_HANDLE_NONE) {
    free_slot(*sq_slot);
    if (has_rq) free_slot(*rq_slot);
    status = VIBIF_EDQUOT;
    return;
  }
  ++send_cq->users;
  ++recv_cq->users;
  if (srq) ++srq->users;
  qps_by_num_[qp_num] = &made;
  pinned_pages_ += made.pages;
  announce(hca_object, true);
  auto& out = rsp.u.create_qp;
  out.qp = h;
  out.qp_num = qp_num;
  out.cap = cap;
  out.send_wqe_stride = made.send_stride;
  out.recv_wqe_stride = made.recv_stride;
  out.recv_queue_offset = static_cast<std::uint32_t>(made.recv_offset);
  out.sq_doorbell_slot = made.sq_slot;
  out.rq_doorbell_slot = has_rq ? made.rq_slot : 0;
  log_line(LogLevel::debug, subject_, "QP " + std::to_string(h) + ": number " + std::to_string(qp_num));
}

void ControlPath::modify_qp(const vibif_request& req, vibif_response& rsp) {
  const auto& r = req.u.modify_qp;
  auto& status = rsp.hdr.status;
  GuestQp* qp = qps_.find(r.qp);
  if (!qp) {
    status = VIBIF_ENOENT;
    return;
  }
  const int mask = static_cast<int>(r.attr_mask);
  if (r.attr_mask > 0x7fffffffu || (mask & ~kAllowedQpAttrs) || mask == 0) {
    status = VIBIF_EINVAL;
    return;
  }
  const auto& a = r.attr;
  ibv_qp_attr attr{};
  attr.qp_state = static_cast<ibv_qp_state>(a.qp_state);
  attr.cur_qp_state = static_cast<ibv_qp_state>(a.cur_qp_state);
  if (((mask & IBV_QP_STATE) && a.qp_state > IBV_QPS_ERR) ||
      ((mask & IBV_QP_CUR_STATE) && a.cur_qp_state > IBV_QPS_ERR) ||
      ((mask & IBV_QP_PATH_MTU) && (a.path_mtu < IBV_MTU_256 || a.path_mtu > IBV_MTU_4096)) ||
      ((mask & IBV_QP_PATH_MIG_STATE) && a.path_mig_state > IBV_MIG_ARMED) ||
      ((mask & IBV_QP_ACCESS_FLAGS) &&
       (a.qp_access_flags & ~static_cast<std::uint32_t>(VIBIF_ACCESS_ALL))) ||
      ((mask & IBV_QP_PORT) && a.port_num != 1) ||
      ((mask & IBV_QP_DEST_QPN) && (a.dest_qp_num <= 1 || a.dest_qp_num > 0xffffff))) {
    status = VIBIF_EINVAL;
    return;
  }
  attr.path_mtu = static_cast<ibv_mtu>(a.path_mtu);
  attr.path_mig_state = static_cast<ibv_mig_state>(a.path_mig_state);
  attr.qkey = a.qkey;
  attr.rq_psn = a.rq_psn & 0xffffff;
  attr.sq_psn = a.sq_psn & 0xffffff;
  attr.dest_qp_num = a.dest_qp_num;
  attr.qp_access_flags = a.qp_access_flags;
  attr.en_sqd_async_notify = a.en_sqd_async_notify;
  attr.max_rd_atomic = a.max_rd_atomic;
  attr.max_dest_rd_atomic = a.max_dest_rd_atomic;
  attr.min_rnr_timer = a.min_rnr_timer;
  attr.timeout = a.timeout;
  attr.retry_cnt = a.retry_cnt;
  attr.rnr_retry = a.rnr_retry;
  attr.port_num = config_.port;
  if (mask & IBV_QP_PKEY_INDEX) {
    auto index = hca_pkey_index(a.pkey_index);
    if (!index) {
      status = VIBIF_EPERM;
      return;
    }
    attr.pkey_index = *index;
  }
  if (mask & IBV_QP_AV) {
    if ((status = to_hca_ah_attr(a.ah_attr, attr.ah_attr)) != VIBIF_OK) return;
  }
  if (int err = qp->qp->modify(attr, mask)) {
    status = -err;
    return;
  }
}

void ControlPath::query_qp(const vibif_request& req, vibif_response& rsp) {
  GuestQp* qp = qps_.find(req.u.handle.handle);
  if (!qp) {
    rsp.hdr.status = VIBIF_ENOENT;
    return;
  }
  ibv_qp_attr a{};
  ibv_qp_init_attr init{};
  if (int err = qp->qp->query(a, init)) {
    rsp.hdr.status = -err;
    return;
  }
  auto& out = rsp.u.query_qp;
  out.attr.qp_state = a.qp_state;
  out.attr.cur_qp_state = a.cur_qp_state;
  out.attr.path_mtu = a.path_mtu;
  out.attr.path_mig_state = a.path_mig_state;
  out.attr.qkey = a.qkey;
  out.attr.rq_psn = a.rq_psn;
  out.attr.sq_psn = a.sq_psn;
  out.attr.dest_qp_num = a.dest_qp_num;
  out.attr.qp_access_flags = static_cast<std::uint32_t>(a.qp_access_flags);
  out.attr.cap = qp->cap;
  from_hca_ah_attr(a.ah_attr, out.attr.ah_attr);
  out.attr.pkey_index = guest_pkey_index(a.pkey_index).value_or(0);
  out.attr.en_sqd_async_notify = a.en_sqd_async_notify;
  out.attr.sq_draining = a.sq_draining;
  out.attr.max_rd_atomic = a.max_rd_atomic;
  out.attr.max_dest_rd_atomic = a.max_dest_rd_atomic;
  out.attr.min_rnr_timer = a.min_rnr_timer;
  out.attr.port_num = 1;
  out.attr.timeout = a.timeout;
  out.attr.retry_cnt = a.retry_cnt;
  out.attr.rnr_retry = a.rnr_retry;
  out.init_cap = qp->cap;
  out.qp_type = qp->qp_type;
  out.sq_sig_all = qp->sq_sig_all ? 1 : 0;
}

void ControlPath::destroy_qp(const vibif_request& req, vibif_response& rsp) {
  const vibif_handle_t h = req.u.handle.handle;
  auto* owner = qps_.owner(h);
  if (!owner) {
    rsp.hdr.status = VIBIF_ENOENT;
    return;
  }
  GuestQp& qp = **owner;
  announce(qp.qp.get(), false);
  qps_by_num_.erase(qp.qp->qp_num());
  --qp.send_cq->users;
  --qp.recv_cq->users;
  if (qp.srq) --qp.srq->users;
  free_slot(qp.sq_slot);
  if (!qp.srq) free_slot(qp.rq_slot);
  pinned_pages_ -= qp.pages;
  owner->reset();
  qps_.release(h);
}

}  // namespace vib::backend
