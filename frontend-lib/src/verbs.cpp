#include "vib/front/verbs.hpp"
#include "vib/front/wire.hpp"

#include <sys/mman.h>

#include <array>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <system_error>

namespace vib::front {

namespace {

constexpr std::uintptr_t kPageMask = VIBIF_PAGE_SIZE - 1;

[[noreturn]] void fail(int err, const std::string& what) {
  throw std::system_error(err, std::generic_category(), "vib: " + what);
}

vibif_request request(std::uint16_t op) {
  vibif_request req;
  std::memset(&req, 0, sizeof(req));
  req.hdr.op = op;
  return req;
}

std::uint32_t pow2_at_least(std::uint32_t v) { return vibif_pow2_at_least(v == 0 ? 1 : v); }

// The list pages of one request (Channel::take_list_page): kept for the
// next request once this one has been answered; ended if it never was (the
// back-end might still read them).
class ListPages {
 public:
  explicit ListPages(Channel& channel) : channel_(channel) {}
  ~ListPages() {
    if (!answered_) return;
    for (auto& page : pages_) channel_.give_back_list_page(std::move(page));
  }
  ListPages(const ListPages&) = delete;
  ListPages& operator=(const ListPages&) = delete;
  platform::SharedPages& take() { return *pages_.emplace_back(channel_.take_list_page()); }
  void answered() { answered_ = true; }

 private:
  Channel& channel_;
  std::vector<std::unique_ptr<platform::SharedPages>> pages_;
  bool answered_ = false;
};

// Fills `list` for `refs`: inline, or through list pages of refs.
void encode_page_list(std::span<const platform::GrantRef> refs, vibif_page_list& list, ListPages& pages) {
  list = vibif_page_list{};
  list.nr_pages = static_cast<std::uint32_t>(refs.size());
  auto put_refs_in_pages = [&](std::span<const platform::GrantRef> data) {
    constexpr std::size_t kRefsPerPage = VIBIF_PAGE_SIZE / sizeof(platform::GrantRef);
    std::vector<platform::GrantRef> page_refs;
    for (std::size_t done = 0; done < data.size(); done += kRefsPerPage) {
      const auto chunk = data.subspan(done, std::min(kRefsPerPage, data.size() - done));
      auto& page = pages.take();
      const auto bytes = page.bytes();
      std::memcpy(bytes.data(), chunk.data(), chunk.size_bytes());
      std::memset(bytes.data() + chunk.size_bytes(), 0, bytes.size() - chunk.size_bytes());
      page_refs.push_back(page.refs()[0]);
    }
    return page_refs;
  };
  std::vector<platform::GrantRef> top(refs.begin(), refs.end());
  while (top.size() > VIBIF_PAGE_LIST_INLINE) {
    if (list.levels == VIBIF_PAGE_LIST_MAX_LEVELS) fail(E2BIG, "region too large for a page list");
    top = put_refs_in_pages(top);
    ++list.levels;
  }
  list.nr_refs = static_cast<std::uint8_t>(top.size());
  std::copy(top.begin(), top.end(), list.refs);
}

std::uint32_t load_acquire(const std::uint32_t& v) { return __atomic_load_n(&v, __ATOMIC_ACQUIRE); }
void store_release(std::uint32_t& v, std::uint32_t value) { __atomic_store_n(&v, value, __ATOMIC_RELEASE); }

// Publishes a queue's producer and kicks the back-end only if it sleeps.
void ring_doorbell(Channel& channel, GuestQueue& q) {
  auto& db = channel.doorbell();
  store_release(db.slots[q.slot].producer, q.producer);
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  if (__atomic_load_n(&db.backend_polling, __ATOMIC_SEQ_CST) == 0) {
    __atomic_fetch_add(&db.guest_kicks, 1u, __ATOMIC_RELAXED);
    channel.kick();
  }
}

// Full while the back-end has not consumed a slot's WQE (its memory is still
// needed) or, with completion retires, while the application has `entries`
// WQEs whose completions it has not polled: max_*_wr as on an HCA.
bool queue_full(Channel& channel, const GuestQueue& q) {
  if (q.producer - load_acquire(channel.doorbell().slots[q.slot].consumer) >= q.entries) return true;
  return q.retired && q.producer - q.retired->load(std::memory_order_acquire) >= q.entries;
}

// Moves a retired counter forward to `to` (free-running: never backwards).
void advance(std::atomic<std::uint32_t>& retired, std::uint32_t to) {
  std::uint32_t now = retired.load(std::memory_order_relaxed);
  while (static_cast<std::int32_t>(to - now) > 0 &&
         !retired.compare_exchange_weak(now, to, std::memory_order_release, std::memory_order_relaxed)) {
  }
}

}  // namespace

// ---- Device -----------------------------------------------------------------

Device::Device(std::unique_ptr<Channel> channel) : channel_(std::move(channel)) {}
Device::~Device() = default;

std::unique_ptr<Device> Device::open(const ChannelOptions& options) {
  auto device = std::unique_ptr<Device>(new Device(Channel::open(options)));
  device->completion_retires_ = device->channel_->backend_feature(VIBIF_XS_FEATURE_RETIRES);
  return device;
}

vibif_response Device::call(const vibif_request& req, const char* what) {
  vibif_response rsp;
  {
    std::lock_guard lock(mu_);
    rsp = channel_->call(req);
  }
  if (rsp.hdr.status != VIBIF_OK) fail(-rsp.hdr.status, what);
  return rsp;
}

int Device::call_errno(const vibif_request& req, vibif_response& rsp) {
  try {
    std::lock_guard lock(mu_);
    rsp = channel_->call(req);
  } catch (const std::system_error& e) {
    return e.code().value();  // the back-end did not answer
  }
  return -rsp.hdr.status;
}

int Device::destroy(std::uint16_t op, vibif_handle_t& handle) noexcept {
  if (handle == 0) return 0;  // destroyed already
  auto req = request(op);
  req.u.handle.handle = handle;
  vibif_response rsp;
  int err = call_errno(req, rsp);
  // ENODEV: the back-end closed this context, and every object of it went
  // with it; refusing the destroy would leave the application an object it
  // can never free (rdma-core's destroys succeed on a disassociated HCA).
  if (err == ENODEV) err = 0;
  if (err == 0) handle = 0;
  return err;
}

void Device::release(std::uint16_t op, vibif_handle_t handle) noexcept { destroy(op, handle); }

void Device::query_device(ibv_device_attr& attr) {
  const auto d = call(request(VIBIF_OP_QUERY_DEVICE), "query device").u.query_device;
  attr = ibv_device_attr{};
  std::memcpy(attr.fw_ver, d.fw_ver, sizeof(attr.fw_ver));
  attr.node_guid = d.node_guid;
  attr.sys_image_guid = d.sys_image_guid;
  attr.max_mr_size = d.max_mr_size;
  attr.page_size_cap = d.page_size_cap;
  attr.vendor_id = d.vendor_id;
  attr.vendor_part_id = d.vendor_part_id;
  attr.hw_ver = d.hw_ver;
  attr.max_qp = static_cast<int>(d.max_qp);
  attr.max_qp_wr = static_cast<int>(d.max_qp_wr);
  attr.device_cap_flags = d.device_cap_flags;
  attr.max_sge = static_cast<int>(d.max_sge);
  attr.max_cq = static_cast<int>(d.max_cq);
  attr.max_cqe = static_cast<int>(d.max_cqe);
  attr.max_mr = static_cast<int>(d.max_mr);
  attr.max_pd = static_cast<int>(d.max_pd);
  attr.max_qp_rd_atom = static_cast<int>(d.max_qp_rd_atom);
  attr.max_qp_init_rd_atom = static_cast<int>(d.max_qp_init_rd_atom);
  attr.atomic_cap = static_cast<ibv_atomic_cap>(d.atomic_cap);
  attr.max_ah = static_cast<int>(d.max_ah);
  attr.max_srq = static_cast<int>(d.max_srq);
  attr.max_srq_wr = static_cast<int>(d.max_srq_wr);
  attr.max_srq_sge = static_cast<int>(d.max_srq_sge);
  attr.max_pkeys = static_cast<std::uint16_t>(d.max_pkeys);
  attr.phys_port_cnt = d.phys_port_cnt;
  attr.local_ca_ack_delay = d.local_ca_ack_delay;
  attr.max_sge_rd = static_cast<int>(d.max_sge_rd);
  attr.max_res_rd_atom = static_cast<int>(d.max_res_rd_atom);
}

void Device::query_port(std::uint8_t port, ibv_port_attr& attr) {
  auto req = request(VIBIF_OP_QUERY_PORT);
  req.u.query_port.port = port;
  const auto p = call(req, "query port").u.query_port;
  attr = ibv_port_attr{};
  attr.state = static_cast<ibv_port_state>(p.state);
  attr.max_mtu = static_cast<ibv_mtu>(p.max_mtu);
  attr.active_mtu = static_cast<ibv_mtu>(p.active_mtu);
  attr.gid_tbl_len = static_cast<int>(p.gid_tbl_len);
  attr.port_cap_flags = p.port_cap_flags;
  attr.max_msg_sz = p.max_msg_sz;
  attr.bad_pkey_cntr = p.bad_pkey_cntr;
  attr.qkey_viol_cntr = p.qkey_viol_cntr;
  attr.pkey_tbl_len = p.pkey_tbl_len;
  attr.lid = p.lid;
  attr.sm_lid = p.sm_lid;
  attr.lmc = p.lmc;
  attr.max_vl_num = p.max_vl_num;
  attr.sm_sl = p.sm_sl;
  attr.subnet_timeout = p.subnet_timeout;
  attr.init_type_reply = p.init_type_reply;
  attr.active_width = p.active_width;
  attr.active_speed = p.active_speed;
  attr.phys_state = p.phys_state;
  attr.link_layer = p.link_layer;
  attr.flags = p.flags;
}

void Device::query_gid(std::uint8_t port, int index, ibv_gid& gid, int* type) {
  auto req = request(VIBIF_OP_QUERY_GID);
  req.u.query_gid.port = port;
  req.u.query_gid.index = static_cast<std::uint32_t>(index);
  const auto rsp = call(req, "query GID");
  std::memcpy(gid.raw, rsp.u.query_gid.gid, sizeof(gid.raw));
  if (type) *type = rsp.u.query_gid.gid_type <= VIBIF_GID_TYPE_ROCE_V2 ? rsp.u.query_gid.gid_type : VIBIF_GID_TYPE_IB;
}

void Device::query_pkey(std::uint8_t port, int index, std::uint16_t& pkey) {
  auto req = request(VIBIF_OP_QUERY_PKEY);
  req.u.query_pkey.port = port;
  req.u.query_pkey.index = static_cast<std::uint32_t>(index);
  const std::uint16_t host = call(req, "query P_Key").u.query_pkey.pkey;
  pkey = static_cast<std::uint16_t>((host >> 8) | (host << 8));
}

std::unique_ptr<Pd> Device::alloc_pd() {
  const auto rsp = call(request(VIBIF_OP_ALLOC_PD), "allocate PD");
  return std::unique_ptr<Pd>(new Pd(*this, rsp.u.handle.handle));
}

std::optional<vibif_event> Device::pop_event_locked() {
  auto& db = channel_->doorbell();
  if (load_acquire(db.event_producer) == event_consumer_) return std::nullopt;
  const vibif_event e = db.events[event_consumer_ % VIBIF_EVENT_QUEUE_LEN];
  ++event_consumer_;
  store_release(db.event_consumer, event_consumer_);
  return e;
}

std::optional<bool> Device::backend_gone() {
  std::unique_lock lock(mu_, std::try_to_lock);
  if (!lock.owns_lock()) return std::nullopt;
  bool closed = true;  // xenstore no longer answers this domain about it
  try {
    closed = channel_->backend_closed();
  } catch (const std::system_error&) {
  }
  if (closed) gone_.store(true, std::memory_order_release);
  return closed;
}

std::optional<vibif_event> Device::next_event() {
  std::lock_guard lock(mu_);
  return pop_event_locked();
}

std::vector<vibif_event> Device::take_events() {
  std::lock_guard lock(mu_);
  channel_->consume_notifications();
  std::vector<vibif_event> events;
  while (auto e = pop_event_locked()) events.push_back(*e);
  return events;
}

// ---- PD, MR, AH ---------------------------------------------------------------

Pd::~Pd() { device_.release(VIBIF_OP_DEALLOC_PD, handle_); }

std::unique_ptr<Mr> Pd::reg_mr(void* addr, std::size_t length, int access) {
  if (length == 0 || !addr) fail(EINVAL, "register memory: empty region");
  const auto first = reinterpret_cast<std::uintptr_t>(addr);
  const std::uintptr_t start = first & ~kPageMask;
  const std::uintptr_t end = (first + length + kPageMask) & ~kPageMask;
  const std::size_t pages = (end - start) / VIBIF_PAGE_SIZE;
  auto mr = std::unique_ptr<Mr>(new Mr());
  mr->device_ = &device_;
  // The pages stay where they are and the application's: granting them in
  // place leaves no moment in which another thread's write could be lost.
  const bool hca_writes = access & (IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_ATOMIC);
  auto& channel = device_.channel();
  try {
    // Memory the application may write is granted writable even when the
    // HCA only reads it: an rdma-core HCA behind a dom0 older than Linux 6.2
    // can register only memory it maps writable (as rdma-core itself pins
    // every MR for write on such a kernel); the MR's access flags still
    // bound what the HCA does. Memory the application may only read is
    // granted read-only (pinning it for write fails with EFAULT).
    try {
      mr->granted_ = channel.sharer().grant_range(channel.backend_domid(), reinterpret_cast<std::byte*>(start),
                                                  pages, /*writable=*/true);
    } catch (const std::system_error& e) {
      if (hca_writes || e.code().value() != EFAULT) throw;
      mr->granted_ = channel.sharer().grant_range(channel.backend_domid(), reinterpret_cast<std::byte*>(start),
                                                  pages, /*writable=*/false);
    }
  } catch (const std::system_error& e) {
    // ENODEV: real Xen's guest has no vibgrant module (nothing else answers
    // it). Copying the pages into granted ones instead would lose the
    // writes other threads make meanwhile: refused, with the remedy.
    if (e.code().value() != ENODEV) throw;
    fail(EOPNOTSUPP,
         "register memory: this guest cannot grant its memory in place: the vibgrant guest kernel module is not "
         "loaded (" + std::string(e.what()) + "); install vib's vibgrant-dkms package or build frontend-lib/kernel "
         "and load vibgrant.ko (docs/frontend.md)");
  }
  const auto refs = mr->granted_->refs();
  auto req = request(VIBIF_OP_REG_MR);
  auto& r = req.u.reg_mr;
  r.pd = handle_;
  r.access = static_cast<std::uint32_t>(access);
  r.iova = first;
  r.length = length;
  r.first_offset = static_cast<std::uint32_t>(first & kPageMask);
  ListPages list_pages(device_.channel());
  encode_page_list(refs, r.pages, list_pages);
  const auto rsp = device_.call(req, "register memory");
  list_pages.answered();
  mr->handle_ = rsp.u.reg_mr.mr;
  mr->lkey_ = rsp.u.reg_mr.lkey;
  mr->rkey_ = rsp.u.reg_mr.rkey;
  mr->addr_ = addr;
  mr->length_ = length;
  return mr;
}

Mr::~Mr() { device_->release(VIBIF_OP_DEREG_MR, handle_); }

std::unique_ptr<Ah> Pd::create_ah(const ibv_ah_attr& attr) {
  auto req = request(VIBIF_OP_CREATE_AH);
  req.u.create_ah.pd = handle_;
  to_wire(attr, req.u.create_ah.attr);
  auto ah = std::make_unique<Ah>();
  ah->handle = device_.call(req, "create AH").u.handle.handle;
  ah->pd = this;
  return ah;
}

void Pd::destroy_ah(std::unique_ptr<Ah> ah) {
  auto req = request(VIBIF_OP_DESTROY_AH);
  req.u.handle.handle = ah->handle;
  device_.call(req, "destroy AH");
}

// ---- CQ ---------------------------------------------------------------------

std::unique_ptr<Cq> Device::create_cq(int cqe) {
  if (cqe <= 0 || static_cast<std::uint32_t>(cqe) > VIBIF_MAX_CQE) fail(EINVAL, "create CQ: bad size");
  const std::uint32_t entries = pow2_at_least(static_cast<std::uint32_t>(cqe));
  auto pages = channel_->sharer().share(channel_->backend_domid(),
                                        vibif_pages_for(std::uint64_t{entries} * sizeof(vibif_cqe)), true);
  auto req = request(VIBIF_OP_CREATE_CQ);
  req.u.create_cq.cqe = entries;
  ListPages list_pages(*channel_);
  encode_page_list(pages->refs(), req.u.create_cq.pages, list_pages);
  const auto rsp = call(req, "create CQ");
  list_pages.answered();
  auto cq = std::unique_ptr<Cq>(new Cq(*this));
  cq->attach(rsp.u.create_cq, std::move(pages), entries);
  return cq;
}

void Cq::attach(const vibif_create_cq_resp& rsp, std::unique_ptr<platform::SharedPages> pages,
                std::uint32_t entries) {
  pages_ = std::move(pages);
  handle_ = rsp.cq;
  entries_ = entries;
  slot_ = rsp.doorbell_slot;
}

Cq::~Cq() { device_.release(VIBIF_OP_DESTROY_CQ, handle_); }

int Cq::poll(std::span<ibv_wc> out) {
  std::lock_guard lock(mu_);
  auto* ring = reinterpret_cast<const vibif_cqe*>(pages_->bytes().data());
  int n = 0;
  for (auto& wc : out) {
    const vibif_cqe& e = ring[consumer_ & (entries_ - 1)];
    if (__atomic_load_n(&e.owner, __ATOMIC_ACQUIRE) != vibif_cqe_owner(consumer_, entries_)) break;
    wc = ibv_wc{};
    wc.wr_id = e.wr_id;
    wc.status = static_cast<ibv_wc_status>(e.status);
    wc.opcode = static_cast<ibv_wc_opcode>(e.opcode);
    wc.vendor_err = e.vendor_err;
    wc.byte_len = e.byte_len;
    wc.imm_data = e.imm_data;
    wc.qp_num = e.qp_num;
    wc.src_qp = e.src_qp;
    wc.wc_flags = e.wc_flags;
    wc.pkey_index = e.pkey_index;
    wc.slid = e.slid;
    wc.sl = e.sl;
    wc.dlid_path_bits = e.dlid_path_bits;
    if (e.wq != VIBIF_WQ_NONE) retire(e);
    ++consumer_;
    ++n;
  }
  if (n) store_release(device_.channel().doorbell().slots[slot_].consumer, consumer_);
  // Only once the ring is empty: what the back-end completed comes first.
  // Without completion retires the queues cannot tell what is outstanding.
  if (n < static_cast<int>(out.size()) && device_.gone() && device_.completion_retires())
    n += flush(out.subspan(static_cast<std::size_t>(n)));
  return n;
}

int Cq::flush(std::span<ibv_wc> out) {
  std::size_t n = 0;
  // The WQEs are this process's own memory; wr_id is the first field of
  // both kinds.
  auto drain = [&](Qp& qp, GuestQueue& q, std::atomic<std::uint32_t>& retired) {
    for (std::uint32_t at = retired.load(std::memory_order_acquire); n < out.size() && at != q.producer; ++at) {
      const std::byte* wqe = q.base + std::size_t{at & (q.entries - 1)} * q.stride;
      ibv_wc& wc = out[n++];
      wc = ibv_wc{};
      std::memcpy(&wc.wr_id, wqe, sizeof wc.wr_id);
      wc.status = IBV_WC_WR_FLUSH_ERR;
      wc.qp_num = qp.qp_num_;
      retired.store(at + 1, std::memory_order_release);
    }
  };
  for (auto& [qpn, qp] : qps_) {
    if (qp->send_cq_ == this) {
      std::lock_guard lock(qp->send_mu_);
      drain(*qp, qp->sq_, qp->sq_retired_);
    }
    if (qp->recv_cq_ == this && qp->has_rq_ && !qp->srq_) {
      std::lock_guard lock(qp->recv_mu_);
      drain(*qp, qp->rq_, qp->rq_retired_);
    }
  }
  return static_cast<int>(n);
}

void Cq::retire(const vibif_cqe& e) {
  auto it = qps_.find(e.qp_num);
  if (it == qps_.end()) return;
  Qp& qp = *it->second;
  switch (e.wq) {
    case VIBIF_WQ_SEND: advance(qp.sq_retired_, e.wqe_counter); break;
    case VIBIF_WQ_RECV: advance(qp.rq_retired_, e.wqe_counter); break;
    case VIBIF_WQ_SRQ:
      if (qp.srq_) qp.srq_->retired_.fetch_add(1, std::memory_order_release);
      break;
    default: break;
  }
}

void Cq::request_notify(bool solicited_only) {
  std::lock_guard lock(mu_);
  arm_sequence_ = (arm_sequence_ + 1) & 0x7fffffffu;
  const std::uint32_t value = arm_sequence_ | (solicited_only ? 0x80000000u : 0u);
  __atomic_store_n(&device_.channel().doorbell().slots[slot_].arm_sequence, value, __ATOMIC_SEQ_CST);
}

void Cq::resize(int cqe) {
  std::lock_guard lock(mu_);
  if (cqe <= 0 || static_cast<std::uint32_t>(cqe) > VIBIF_MAX_CQE) fail(EINVAL, "resize CQ: bad size");
  const std::uint32_t entries = pow2_at_least(static_cast<std::uint32_t>(cqe));
  auto pages = device_.channel().sharer().share(device_.channel().backend_domid(),
                                                vibif_pages_for(std::uint64_t{entries} * sizeof(vibif_cqe)), true);
  auto req = request(VIBIF_OP_RESIZE_CQ);
  req.u.resize_cq.cq = handle_;
  req.u.resize_cq.cqe = entries;
  ListPages list_pages(device_.channel());
  encode_page_list(pages->refs(), req.u.resize_cq.pages, list_pages);
  device_.call(req, "resize CQ");
  list_pages.answered();
  // The back-end moved what we had not polled to the start of the new buffer.
  pages_ = std::move(pages);
  entries_ = entries;
  consumer_ = 0;
}

// ---- SRQ --------------------------------------------------------------------

std::unique_ptr<Srq> Pd::create_srq(const ibv_srq_init_attr& init) {
  const std::uint32_t max_wr = pow2_at_least(init.attr.max_wr);
  const std::uint32_t max_sge = std::max<std::uint32_t>(init.attr.max_sge, 1);
  const std::uint32_t stride = vibif_recv_wqe_stride(max_sge);
  auto& channel = device_.channel();
  auto pages = channel.sharer().share(channel.backend_domid(), vibif_pages_for(std::uint64_t{max_wr} * stride), false);
  auto req = request(VIBIF_OP_CREATE_SRQ);
  auto& r = req.u.create_srq;
  r.pd = handle_;
  r.max_wr = max_wr;
  r.max_sge = max_sge;
  r.srq_limit = init.attr.srq_limit;
  ListPages list_pages(channel);
  encode_page_list(pages->refs(), r.pages, list_pages);
  const auto rsp = device_.call(req, "create SRQ").u.create_srq;
  list_pages.answered();
  auto srq = std::unique_ptr<Srq>(new Srq(device_));
  srq->pages_ = std::move(pages);
  srq->handle_ = rsp.srq;
  srq->rq_ = GuestQueue{srq->pages_->bytes().data(), max_wr, rsp.wqe_stride, rsp.doorbell_slot, 0,
                        device_.completion_retires() ? &srq->retired_ : nullptr};
  srq->max_sge_ = max_sge;
  return srq;
}

Srq::~Srq() { device_.release(VIBIF_OP_DESTROY_SRQ, handle_); }

namespace {

// Writes receive WQEs into `q`; 0 or an errno with *bad_wr set.
int write_recv_wqes(Channel& channel, GuestQueue& q, std::uint32_t max_sge, const ibv_recv_wr* wr,
                    ibv_recv_wr** bad_wr) {
  int err = 0;
  bool posted = false;
  for (; wr; wr = wr->next) {
    if (wr->num_sge < 0 || static_cast<std::uint32_t>(wr->num_sge) > max_sge) {
      err = EINVAL;
      break;
    }
    if (queue_full(channel, q)) {
      err = ENOMEM;
      break;
    }
    // Straight into the queue slot, as Qp::post_send does.
    std::byte* wqe = q.base + std::size_t{q.producer & (q.entries - 1)} * q.stride;
    const vibif_recv_wqe h{wr->wr_id, static_cast<std::uint32_t>(wr->num_sge), 0};
    std::memcpy(wqe, &h, sizeof(h));
    for (int i = 0; i < wr->num_sge; ++i) {
      const vibif_sge g{wr->sg_list[i].addr, wr->sg_list[i].length, wr->sg_list[i].lkey};
      std::memcpy(wqe + sizeof(h) + static_cast<std::size_t>(i) * sizeof(g), &g, sizeof(g));
    }
    ++q.producer;
    posted = true;
  }
  if (err && bad_wr) *bad_wr = const_cast<ibv_recv_wr*>(wr);
  if (posted) ring_doorbell(channel, q);
  return err;
}

}  // namespace

int Srq::post_recv(const ibv_recv_wr* wr, ibv_recv_wr** bad_wr) {
  std::lock_guard lock(mu_);
  return write_recv_wqes(device_.channel(), rq_, max_sge_, wr, bad_wr);
}

int Srq::modify(const ibv_srq_attr& attr, int attr_mask) {
  auto req = request(VIBIF_OP_MODIFY_SRQ);
  req.u.modify_srq.srq = handle_;
  req.u.modify_srq.attr_mask = static_cast<std::uint32_t>(attr_mask);
  req.u.modify_srq.max_wr = attr.max_wr;
  req.u.modify_srq.srq_limit = attr.srq_limit;
  vibif_response rsp;
  return device_.call_errno(req, rsp);
}

int Srq::query(ibv_srq_attr& attr) {
  auto req = request(VIBIF_OP_QUERY_SRQ);
  req.u.handle.handle = handle_;
  vibif_response rsp;
  if (int err = device_.call_errno(req, rsp)) return err;
  const auto& q = rsp.u.query_srq;
  attr = ibv_srq_attr{q.max_wr, q.max_sge, q.srq_limit};
  return 0;
}

// ---- QP ---------------------------------------------------------------------

std::unique_ptr<Qp> Pd::create_qp(const QpInit& init) {
  if (!init.send_cq || !init.recv_cq) fail(EINVAL, "create QP: no CQ");
  const bool has_rq = init.srq == nullptr;
  vibif_qp_cap cap{};
  cap.max_send_wr = pow2_at_least(init.cap.max_send_wr);
  cap.max_send_sge = std::max<std::uint32_t>(init.cap.max_send_sge, 1);
  cap.max_inline_data = init.cap.max_inline_data;
  if (has_rq) {
    cap.max_recv_wr = pow2_at_least(init.cap.max_recv_wr);
    cap.max_recv_sge = std::max<std::uint32_t>(init.cap.max_recv_sge, 1);
  }
  const std::uint32_t send_stride = vibif_send_wqe_stride(cap.max_send_sge, cap.max_inline_data);
  const std::uint32_t recv_stride = has_rq ? vibif_recv_wqe_stride(cap.max_recv_sge) : 0;
  auto& channel = device_.channel();
  auto pages = channel.sharer().share(
      channel.backend_domid(), vibif_qp_buffer_pages(cap.max_send_wr, send_stride, cap.max_recv_wr, recv_stride), false);
  auto req = request(VIBIF_OP_CREATE_QP);
  auto& r = req.u.create_qp;
  r.pd = handle_;
  r.send_cq = init.send_cq->handle();
  r.recv_cq = init.recv_cq->handle();
  r.srq = init.srq ? init.srq->handle() : VIBIF_HANDLE_NONE;
  r.qp_type = static_cast<std::uint8_t>(init.qp_type);
  r.sq_sig_all = init.sq_sig_all ? 1 : 0;
  r.cap = cap;
  ListPages list_pages(channel);
  encode_page_list(pages->refs(), r.pages, list_pages);
  const auto rsp = device_.call(req, "create QP").u.create_qp;
  list_pages.answered();
  auto qp = std::unique_ptr<Qp>(new Qp(device_));
  qp->pages_ = std::move(pages);
  std::byte* base = qp->pages_->bytes().data();
  qp->handle_ = rsp.qp;
  qp->qp_num_ = rsp.qp_num;
  qp->type_ = init.qp_type;
  qp->cap_ = from_wire(rsp.cap);
  qp->has_rq_ = has_rq;
  const bool retires = device_.completion_retires();
  qp->sq_ = GuestQueue{base, cap.max_send_wr, rsp.send_wqe_stride, rsp.sq_doorbell_slot, 0,
                       retires ? &qp->sq_retired_ : nullptr};
  if (has_rq)
    qp->rq_ = GuestQueue{base + rsp.recv_queue_offset, cap.max_recv_wr, rsp.recv_wqe_stride, rsp.rq_doorbell_slot, 0,
                         retires ? &qp->rq_retired_ : nullptr};
  qp->send_cq_ = init.send_cq;
  qp->recv_cq_ = init.recv_cq;
  qp->srq_ = init.srq;
  for (Cq* cq : {init.send_cq, init.recv_cq}) {
    std::lock_guard lock(cq->mu_);
    cq->qps_[qp->qp_num_] = qp.get();
  }
  return qp;
}

Qp::~Qp() {
  device_.release(VIBIF_OP_DESTROY_QP, handle_);
  for (Cq* cq : {send_cq_, recv_cq_}) {
    if (!cq) continue;
    std::lock_guard lock(cq->mu_);
    if (auto it = cq->qps_.find(qp_num_); it != cq->qps_.end() && it->second == this) cq->qps_.erase(it);
  }
}

int Qp::modify(const ibv_qp_attr& a, int mask) {
  auto req = request(VIBIF_OP_MODIFY_QP);
  auto& r = req.u.modify_qp;
  r.qp = handle_;
  r.attr_mask = static_cast<std::uint32_t>(mask);
  to_wire(a, r.attr);
  vibif_response rsp;
  if (int err = device_.call_errno(req, rsp)) return err;
  if (mask & IBV_QP_STATE) state_ = a.qp_state;
  if ((mask & IBV_QP_STATE) && a.qp_state == IBV_QPS_RESET) {
    // RESET discards the queues' WQEs without completions: all slots are free.
    {
      std::lock_guard lock(send_mu_);
      advance(sq_retired_, sq_.producer);
    }
    std::lock_guard lock(recv_mu_);
    advance(rq_retired_, rq_.producer);
  }
  return 0;
}

int Qp::query(ibv_qp_attr& a, int, ibv_qp_init_attr& init) {
  auto req = request(VIBIF_OP_QUERY_QP);
  req.u.handle.handle = handle_;
  vibif_response rsp;
  if (int err = device_.call_errno(req, rsp)) return err;
  const auto& q = rsp.u.query_qp;
  const auto& w = q.attr;
  from_wire(w, a);
  init = ibv_qp_init_attr{};
  init.cap = from_wire(q.init_cap);
  init.qp_type = static_cast<ibv_qp_type>(q.qp_type);
  init.sq_sig_all = q.sq_sig_all;
  state_ = a.qp_state;
  return 0;
}

int Qp::post_send(const ibv_send_wr* wr, ibv_send_wr** bad_wr) {
  std::lock_guard lock(send_mu_);
  auto& channel = device_.channel();
  // As a hardware provider does: a QP that cannot send refuses at once.
  if (state_ == IBV_QPS_RESET || state_ == IBV_QPS_INIT || state_ == IBV_QPS_RTR) {
    if (bad_wr) *bad_wr = const_cast<ibv_send_wr*>(wr);
    return EINVAL;
  }
  int err = 0;
  bool posted = false;
  for (; wr; wr = wr->next) {
    const bool is_inline = (wr->send_flags & IBV_SEND_INLINE) != 0;
    if (wr->num_sge < 0 || (!is_inline && static_cast<std::uint32_t>(wr->num_sge) > cap_.max_send_sge) ||
        (type_ == IBV_QPT_UD && !wr->wr.ud.ah)) {
      err = EINVAL;
      break;
    }
    if (queue_full(channel, sq_)) {
      err = ENOMEM;
      break;
    }
    // Written straight into the queue slot (ours until the producer index
    // moves): no staging copy, and the bytes past what vibd reads stay as
    // they were.
    std::byte* wqe = sq_.base + std::size_t{sq_.producer & (sq_.entries - 1)} * sq_.stride;
    vibif_send_wqe h{};
    h.wr_id = wr->wr_id;
    h.opcode = static_cast<std::uint8_t>(wr->opcode);
    h.send_flags = wr->send_flags;
    h.imm_data = wr->imm_data;
    if (wr->opcode == IBV_WR_ATOMIC_CMP_AND_SWP || wr->opcode == IBV_WR_ATOMIC_FETCH_AND_ADD) {
      h.remote_addr = wr->wr.atomic.remote_addr;
      h.rkey = wr->wr.atomic.rkey;
      h.compare_add = wr->wr.atomic.compare_add;
      h.swap = wr->wr.atomic.swap;
    } else if (type_ == IBV_QPT_UD) {
      h.ud_ah = reinterpret_cast<const Ah*>(wr->wr.ud.ah)->handle;
      h.ud_remote_qpn = wr->wr.ud.remote_qpn;
      h.ud_remote_qkey = wr->wr.ud.remote_qkey;
    } else {
      h.remote_addr = wr->wr.rdma.remote_addr;
      h.rkey = wr->wr.rdma.rkey;
    }
    if (is_inline) {
      // The data goes into the WQE now: the caller may reuse its buffers.
      std::size_t total = 0;
      for (int i = 0; i < wr->num_sge; ++i) total += wr->sg_list[i].length;
      if (total > cap_.max_inline_data) {
        err = EINVAL;
        break;
      }
      std::size_t at = sizeof(h);
      for (int i = 0; i < wr->num_sge; ++i) {
        std::memcpy(wqe + at, reinterpret_cast<const void*>(wr->sg_list[i].addr), wr->sg_list[i].length);
        at += wr->sg_list[i].length;
      }
      h.inline_length = static_cast<std::uint32_t>(total);
    } else {
      h.num_sge = static_cast<std::uint8_t>(wr->num_sge);
      for (int i = 0; i < wr->num_sge; ++i) {
        const vibif_sge g{wr->sg_list[i].addr, wr->sg_list[i].length, wr->sg_list[i].lkey};
        std::memcpy(wqe + sizeof(h) + static_cast<std::size_t>(i) * sizeof(g), &g, sizeof(g));
      }
    }
    std::memcpy(wqe, &h, sizeof(h));
    ++sq_.producer;
    posted = true;
  }
  if (err && bad_wr) *bad_wr = const_cast<ibv_send_wr*>(wr);
  if (posted) ring_doorbell(channel, sq_);
  return err;
}

int Qp::post_recv(const ibv_recv_wr* wr, ibv_recv_wr** bad_wr) {
  std::lock_guard lock(recv_mu_);
  if (!has_rq_ || state_ == IBV_QPS_RESET) {
    if (bad_wr) *bad_wr = const_cast<ibv_recv_wr*>(wr);
    return EINVAL;
  }
  return write_recv_wqes(device_.channel(), rq_, cap_.max_recv_sge, wr, bad_wr);
}

}  // namespace vib::front
