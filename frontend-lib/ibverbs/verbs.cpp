// libibverbs over libvibfront: PDs, MRs, CQs, SRQs, QPs, AHs and the data
// path, which libvibfront already runs with rdma-core's own structs; this
// layer owns the C objects and maps exceptions to errno.
#include <arpa/inet.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "objects.hpp"
#include "received_header.hpp"

// Defined here under their exported names, which verbs.h maps to inline wrappers.
#undef ibv_reg_mr
#undef ibv_reg_mr_iova

namespace vib::ibverbs {

namespace {

[[noreturn]] void fail(int err, const char* what) {
  throw std::system_error(err, std::generic_category(), std::string("vib: ") + what);
}

void init_sync(pthread_mutex_t& mutex, pthread_cond_t& cond) {
  ::pthread_mutex_init(&mutex, nullptr);
  ::pthread_cond_init(&cond, nullptr);
}
void destroy_sync(pthread_mutex_t& mutex, pthread_cond_t& cond) {
  ::pthread_mutex_destroy(&mutex);
  ::pthread_cond_destroy(&cond);
}

// A registration refused by something only an administrator can change
// (the guest's grant table, RLIMIT_MEMLOCK, the vibgrant module missing):
// errno alone cannot name the limit or the remedy, and programs print no
// more than strerror, so the reason goes to stderr too.
void say_which_limit(const std::system_error& e) {
  const int err = e.code().value();
  if (err == ENOSPC || err == ENOMEM || err == EOPNOTSUPP)
    std::fprintf(stderr, "libvibfront: ibv_reg_mr: %s\n", e.what());
}

front::Cq& wrapper_object(Cq& cq) { return *cq.cq; }
front::Srq& wrapper_object(Srq& srq) { return *srq.srq; }
front::Qp& wrapper_object(Qp& qp) { return *qp.qp; }

// ibv_destroy_{cq,srq,qp}: the back-end object goes first, so a refusal
// (EBUSY while a QP uses a CQ or SRQ) leaves the application a working
// object, as rdma-core does. Then the object leaves the context's event
// routing (`forget` runs there too, under the same lock) and is freed.
template <typename Wrapper, typename Verbs, typename Forget>
int destroy_routed(Context& ctx, std::unordered_map<vibif_handle_t, Wrapper*>& routes, Wrapper* wrapper,
                   Verbs& verbs, Forget&& forget) {
  auto& object = wrapper_object(*wrapper);
  const vibif_handle_t handle = object.handle();
  if (const int err = or_errno([&] { return object.destroy(); })) return err;
  std::unique_ptr<Wrapper> owned(wrapper);
  {
    std::lock_guard lock(ctx.mu);
    routes.erase(handle);
    forget();
  }
  destroy_sync(verbs.mutex, verbs.cond);
  return 0;
}

// ---- data path: the context's ops ------------------------------------------------

int op_poll_cq(ibv_cq* cq, int n, ibv_wc* wc) {
  if (n <= 0) return 0;
  try {
    return to_cq(cq)->cq->poll(std::span<ibv_wc>(wc, static_cast<std::size_t>(n)));
  } catch (...) {
    return -errno_of_current_exception();
  }
}

int op_req_notify_cq(ibv_cq* cq, int solicited_only) {
  return or_errno([&] {
    to_cq(cq)->cq->request_notify(solicited_only != 0);
    return 0;
  });
}

int op_post_send(ibv_qp* qp, ibv_send_wr* wr, ibv_send_wr** bad) {
  return or_errno([&] { return to_qp(qp)->qp->post_send(wr, bad); });
}

int op_post_recv(ibv_qp* qp, ibv_recv_wr* wr, ibv_recv_wr** bad) {
  return or_errno([&] { return to_qp(qp)->qp->post_recv(wr, bad); });
}

int op_post_srq_recv(ibv_srq* srq, ibv_recv_wr* wr, ibv_recv_wr** bad) {
  return or_errno([&] { return to_srq(srq)->srq->post_recv(wr, bad); });
}

// ---- the send-ops API (ibv_wr_*) ------------------------------------------------------

ibv_send_wr& begin_wr(ibv_qp_ex* ex, ibv_wr_opcode opcode) {
  auto* qp = to_qp(ex);
  auto& wr = qp->pending.emplace_back();
  wr.wr_id = ex->wr_id;
  wr.send_flags = ex->wr_flags;
  wr.opcode = opcode;
  return wr;
}

// The WR the next wr_set_* applies to; a set_* before any wr_* is an error
// reported by wr_complete.
ibv_send_wr* current_wr(ibv_qp_ex* ex) {
  auto* qp = to_qp(ex);
  if (qp->pending.empty()) {
    qp->wr_error = EINVAL;
    return nullptr;
  }
  return &qp->pending.back();
}

void wr_start(ibv_qp_ex* ex) {
  auto* qp = to_qp(ex);
  qp->pending.clear();
  qp->sges.clear();
  qp->inline_data.clear();
  qp->wr_error = 0;
}

int wr_complete(ibv_qp_ex* ex) {
  auto* qp = to_qp(ex);
  int err = qp->wr_error;
  if (!err && !qp->pending.empty()) {
    for (std::size_t i = 0; i + 1 < qp->pending.size(); ++i) qp->pending[i].next = &qp->pending[i + 1];
    qp->pending.back().next = nullptr;
    ibv_send_wr* bad = nullptr;
    err = op_post_send(&ex->qp_base, &qp->pending.front(), &bad);
  }
  wr_start(ex);
  return err;
}

void wr_abort(ibv_qp_ex* ex) { wr_start(ex); }

void wr_send(ibv_qp_ex* ex) { begin_wr(ex, IBV_WR_SEND); }
void wr_send_imm(ibv_qp_ex* ex, __be32 imm) { begin_wr(ex, IBV_WR_SEND_WITH_IMM).imm_data = imm; }
void wr_rdma_write(ibv_qp_ex* ex, uint32_t rkey, uint64_t addr) {
  auto& wr = begin_wr(ex, IBV_WR_RDMA_WRITE);
  wr.wr.rdma.rkey = rkey;
  wr.wr.rdma.remote_addr = addr;
}
void wr_rdma_write_imm(ibv_qp_ex* ex, uint32_t rkey, uint64_t addr, __be32 imm) {
  auto& wr = begin_wr(ex, IBV_WR_RDMA_WRITE_WITH_IMM);
  wr.wr.rdma.rkey = rkey;
  wr.wr.rdma.remote_addr = addr;
  wr.imm_data = imm;
}
void wr_rdma_read(ibv_qp_ex* ex, uint32_t rkey, uint64_t addr) {
  auto& wr = begin_wr(ex, IBV_WR_RDMA_READ);
  wr.wr.rdma.rkey = rkey;
  wr.wr.rdma.remote_addr = addr;
}
void wr_atomic_cmp_swp(ibv_qp_ex* ex, uint32_t rkey, uint64_t addr, uint64_t compare, uint64_t swap) {
  auto& wr = begin_wr(ex, IBV_WR_ATOMIC_CMP_AND_SWP);
  wr.wr.atomic.rkey = rkey;
  wr.wr.atomic.remote_addr = addr;
  wr.wr.atomic.compare_add = compare;
  wr.wr.atomic.swap = swap;
}
void wr_atomic_fetch_add(ibv_qp_ex* ex, uint32_t rkey, uint64_t addr, uint64_t add) {
  auto& wr = begin_wr(ex, IBV_WR_ATOMIC_FETCH_AND_ADD);
  wr.wr.atomic.rkey = rkey;
  wr.wr.atomic.remote_addr = addr;
  wr.wr.atomic.compare_add = add;
}
// Opcodes vib does not carry: the batch fails at wr_complete.
void wr_unsupported_inv(ibv_qp_ex* ex, uint32_t) { to_qp(ex)->wr_error = EOPNOTSUPP; }
void wr_unsupported_bind(ibv_qp_ex* ex, ibv_mw*, uint32_t, const ibv_mw_bind_info*) {
  to_qp(ex)->wr_error = EOPNOTSUPP;
}
void wr_unsupported_tso(ibv_qp_ex* ex, void*, uint16_t, uint16_t) { to_qp(ex)->wr_error = EOPNOTSUPP; }
void wr_unsupported_atomic_write(ibv_qp_ex* ex, uint32_t, uint64_t, const void*) {
  to_qp(ex)->wr_error = EOPNOTSUPP;
}
void wr_unsupported_xrc(ibv_qp_ex* ex, uint32_t) { to_qp(ex)->wr_error = EOPNOTSUPP; }

void wr_set_ud_addr(ibv_qp_ex* ex, ibv_ah* ah, uint32_t qpn, uint32_t qkey) {
  if (auto* wr = current_wr(ex)) {
    wr->wr.ud.ah = ah;
    wr->wr.ud.remote_qpn = qpn;
    wr->wr.ud.remote_qkey = qkey;
  }
}
void wr_set_sge_list(ibv_qp_ex* ex, size_t n, const ibv_sge* list) {
  auto* wr = current_wr(ex);
  if (!wr) return;
  auto* qp = to_qp(ex);
  try {
    auto& sges = qp->sges.emplace_back(list, list + n);
    wr->num_sge = static_cast<int>(n);
    wr->sg_list = sges.data();
  } catch (...) {
    qp->wr_error = errno_of_current_exception();
  }
}
void wr_set_sge(ibv_qp_ex* ex, uint32_t lkey, uint64_t addr, uint32_t length) {
  const ibv_sge sge{addr, length, lkey};
  wr_set_sge_list(ex, 1, &sge);
}
void wr_set_inline_data_list(ibv_qp_ex* ex, size_t n, const ibv_data_buf* bufs) {
  auto* wr = current_wr(ex);
  if (!wr) return;
  auto* qp = to_qp(ex);
  try {
    // The bytes are copied at ibv_wr_complete (into the WQE); until then
    // they live here, as one buffer, so the caller may reuse its own.
    auto& data = qp->inline_data.emplace_back();
    for (std::size_t i = 0; i < n; ++i) {
      const auto* p = static_cast<const char*>(bufs[i].addr);
      data.insert(data.end(), p, p + bufs[i].length);
    }
    wr->send_flags |= IBV_SEND_INLINE;
    auto& sge = qp->sges.emplace_back(1);
    sge[0].addr = reinterpret_cast<std::uintptr_t>(data.data());
    sge[0].length = static_cast<uint32_t>(data.size());
    wr->sg_list = sge.data();
    wr->num_sge = 1;
  } catch (...) {
    qp->wr_error = errno_of_current_exception();
  }
}
void wr_set_inline_data(ibv_qp_ex* ex, void* addr, size_t length) {
  const ibv_data_buf buf{addr, length};
  wr_set_inline_data_list(ex, 1, &buf);
}

void fill_wr_ops(ibv_qp_ex& ex) {
  ex.wr_atomic_cmp_swp = wr_atomic_cmp_swp;
  ex.wr_atomic_fetch_add = wr_atomic_fetch_add;
  ex.wr_bind_mw = wr_unsupported_bind;
  ex.wr_local_inv = wr_unsupported_inv;
  ex.wr_rdma_read = wr_rdma_read;
  ex.wr_rdma_write = wr_rdma_write;
  ex.wr_rdma_write_imm = wr_rdma_write_imm;
  ex.wr_send = wr_send;
  ex.wr_send_imm = wr_send_imm;
  ex.wr_send_inv = wr_unsupported_inv;
  ex.wr_send_tso = wr_unsupported_tso;
  ex.wr_set_ud_addr = wr_set_ud_addr;
  ex.wr_set_xrc_srqn = wr_unsupported_xrc;
  ex.wr_set_inline_data = wr_set_inline_data;
  ex.wr_set_inline_data_list = wr_set_inline_data_list;
  ex.wr_set_sge = wr_set_sge;
  ex.wr_set_sge_list = wr_set_sge_list;
  ex.wr_start = wr_start;
  ex.wr_complete = wr_complete;
  ex.wr_abort = wr_abort;
  ex.wr_atomic_write = wr_unsupported_atomic_write;
}

// ---- QP creation, shared by ibv_create_qp and ibv_create_qp_ex -------------------------

ibv_qp* create_qp(ibv_context* context, ibv_pd* pd, const ibv_qp_init_attr& attr) {
  auto& ctx = *to_ctx(context);
  PumpAfter pump(ctx);
  return or_null([&] {
    if (!pd || !attr.send_cq || !attr.recv_cq) fail(EINVAL, "create QP: no PD or CQ");
    if (attr.qp_type != IBV_QPT_RC && attr.qp_type != IBV_QPT_UC && attr.qp_type != IBV_QPT_UD)
      fail(EOPNOTSUPP, "create QP: type");
    front::QpInit init;
    init.send_cq = to_cq(attr.send_cq)->cq.get();
    init.recv_cq = to_cq(attr.recv_cq)->cq.get();
    init.srq = attr.srq ? to_srq(attr.srq)->srq.get() : nullptr;
    init.cap = attr.cap;
    init.qp_type = attr.qp_type;
    init.sq_sig_all = attr.sq_sig_all != 0;
    auto qp = std::make_unique<Qp>();
    qp->qp = to_pd(pd)->pd->create_qp(init);
    auto& v = qp->ex.qp_base;
    v.context = context;
    v.qp_context = attr.qp_context;
    v.pd = pd;
    v.send_cq = attr.send_cq;
    v.recv_cq = attr.recv_cq;
    v.srq = attr.srq;
    v.handle = qp->qp->handle();
    v.qp_num = qp->qp->qp_num();
    v.state = IBV_QPS_RESET;
    v.qp_type = attr.qp_type;
    init_sync(v.mutex, v.cond);
    fill_wr_ops(qp->ex);
    std::lock_guard lock(ctx.mu);
    ctx.qps[qp->qp->handle()] = qp.get();
    return &qp.release()->ex.qp_base;  // the application's until ibv_destroy_qp
  });
}

// ---- extended verbs (struct verbs_context) ----------------------------------------------

int vctx_query_port(ibv_context* context, uint8_t port, ibv_port_attr* out, size_t len) {
  auto& ctx = *to_ctx(context);
  PumpAfter pump(ctx);
  return or_errno([&] {
    ibv_port_attr attr;
    ctx.device->query_port(port, attr);
    std::memset(static_cast<void*>(out), 0, len);
    std::memcpy(static_cast<void*>(out), &attr, std::min(len, sizeof(attr)));
    return 0;
  });
}

int vctx_query_device_ex(ibv_context* context, const ibv_query_device_ex_input* input, ibv_device_attr_ex* out,
                         size_t len) {
  if (input && input->comp_mask) return EINVAL;
  auto& ctx = *to_ctx(context);
  PumpAfter pump(ctx);
  return or_errno([&] {
    ibv_device_attr_ex attr{};
    ctx.device->query_device(attr.orig_attr);
    // The extended flags start with the basic ones, as rdma-core's do.
    attr.device_cap_flags_ex = attr.orig_attr.device_cap_flags;
    // Nothing beyond the basic attributes: no ODP, TSO, RSS, timestamps.
    std::memset(static_cast<void*>(out), 0, len);
    std::memcpy(static_cast<void*>(out), &attr, std::min(len, sizeof(attr)));
    return 0;
  });
}

ibv_qp* vctx_create_qp_ex(ibv_context* context, ibv_qp_init_attr_ex* attr) {
  const uint32_t known = IBV_QP_INIT_ATTR_PD | IBV_QP_INIT_ATTR_SEND_OPS_FLAGS;
  if (attr->comp_mask & ~known || !(attr->comp_mask & IBV_QP_INIT_ATTR_PD)) {
    errno = EOPNOTSUPP;
    return nullptr;
  }
  ibv_qp_init_attr init{};
  init.qp_context = attr->qp_context;
  init.send_cq = attr->send_cq;
  init.recv_cq = attr->recv_cq;
  init.srq = attr->srq;
  init.cap = attr->cap;
  init.qp_type = attr->qp_type;
  init.sq_sig_all = attr->sq_sig_all;
  // Every QP has the send-ops API (ibv_qp_to_qp_ex), whatever send_ops_flags asked.
  auto* qp = create_qp(context, attr->pd, init);
  if (qp) attr->cap = to_qp(qp)->qp->cap();
  return qp;
}

}  // namespace

void fill_ops(verbs_context& vctx) {
  auto& ops = vctx.context.ops;
  ops.poll_cq = op_poll_cq;
  ops.req_notify_cq = op_req_notify_cq;
  ops.post_send = op_post_send;
  ops.post_recv = op_post_recv;
  ops.post_srq_recv = op_post_srq_recv;
  vctx.query_port = vctx_query_port;
  vctx.query_device_ex = vctx_query_device_ex;
  vctx.create_qp_ex = vctx_create_qp_ex;
}

}  // namespace vib::ibverbs

using namespace vib::ibverbs;

extern "C" {

// ---- PD -----------------------------------------------------------------------------

ibv_pd* ibv_alloc_pd(ibv_context* context) {
  auto& ctx = *to_ctx(context);
  PumpAfter pump(ctx);
  return or_null([&] {
    auto pd = std::make_unique<Pd>();
    pd->pd = ctx.device->alloc_pd();
    pd->verbs.context = context;
    pd->verbs.handle = pd->pd->handle();
    return &pd.release()->verbs;  // the application's until ibv_dealloc_pd
  });
}

int ibv_dealloc_pd(ibv_pd* pd) {
  auto& ctx = *to_ctx(pd->context);
  PumpAfter pump(ctx);
  // EBUSY while MRs, QPs, SRQs or AHs of it live: the PD stays.
  if (const int err = or_errno([&] { return to_pd(pd)->pd->dealloc(); })) return err;
  delete to_pd(pd);
  return 0;
}

// ---- MR -----------------------------------------------------------------------------

ibv_mr* ibv_reg_mr_iova2(ibv_pd* pd, void* addr, size_t length, uint64_t iova, unsigned int access) {
  auto& ctx = *to_ctx(pd->context);
  PumpAfter pump(ctx);
  return or_null([&] {
    // vibd registers at the guest's own virtual address (docs/frontend.md);
    // another IOVA cannot be had.
    if (iova != reinterpret_cast<std::uintptr_t>(addr)) fail(EOPNOTSUPP, "register memory at another IOVA");
    if (access & IBV_ACCESS_ON_DEMAND) fail(EOPNOTSUPP, "on-demand paging");
    auto mr = std::make_unique<Mr>();
    try {
      mr->mr = to_pd(pd)->pd->reg_mr(addr, length, static_cast<int>(access & ~IBV_ACCESS_OPTIONAL_RANGE));
    } catch (const std::system_error& e) {
      say_which_limit(e);
      throw;
    }
    auto& v = mr->verbs;
    v.context = pd->context;
    v.pd = pd;
    v.addr = addr;
    v.length = length;
    v.lkey = mr->mr->lkey();
    v.rkey = mr->mr->rkey();
    return &mr.release()->verbs;  // the application's until ibv_dereg_mr
  });
}

ibv_mr* ibv_reg_mr(ibv_pd* pd, void* addr, size_t length, int access) {
  return ibv_reg_mr_iova2(pd, addr, length, reinterpret_cast<std::uintptr_t>(addr), static_cast<unsigned>(access));
}

ibv_mr* ibv_reg_mr_iova(ibv_pd* pd, void* addr, size_t length, uint64_t iova, int access) {
  return ibv_reg_mr_iova2(pd, addr, length, iova, static_cast<unsigned>(access));
}

int ibv_dereg_mr(ibv_mr* mr) {
  auto& ctx = *to_ctx(mr->context);
  PumpAfter pump(ctx);
  if (const int err = or_errno([&] { return to_mr(mr)->mr->deregister(); })) return err;
  delete to_mr(mr);
  return 0;
}

// ---- CQ -----------------------------------------------------------------------------

ibv_cq* ibv_create_cq(ibv_context* context, int cqe, void* cq_context, ibv_comp_channel* channel, int) {
  auto& ctx = *to_ctx(context);
  PumpAfter pump(ctx);
  return or_null([&] {
    auto cq = std::make_unique<Cq>();
    cq->cq = ctx.device->create_cq(cqe);
    cq->channel = channel ? to_channel(channel) : nullptr;
    auto& v = cq->verbs;
    v.context = context;
    v.channel = channel;
    v.cq_context = cq_context;
    v.handle = cq->cq->handle();
    v.cqe = cq->cq->capacity();
    init_sync(v.mutex, v.cond);
    std::lock_guard lock(ctx.mu);
    ctx.cqs[cq->cq->handle()] = cq.get();
    return &cq.release()->verbs;  // the application's until ibv_destroy_cq
  });
}

int ibv_resize_cq(ibv_cq* cq, int cqe) {
  auto& ctx = *to_ctx(cq->context);
  PumpAfter pump(ctx);
  return or_errno([&] {
    to_cq(cq)->cq->resize(cqe);
    cq->cqe = to_cq(cq)->cq->capacity();
    return 0;
  });
}

int ibv_destroy_cq(ibv_cq* verbs_cq) {
  auto& ctx = *to_ctx(verbs_cq->context);
  PumpAfter pump(ctx);
  CompChannel* channel = to_cq(verbs_cq)->channel;
  return destroy_routed(ctx, ctx.cqs, to_cq(verbs_cq), *verbs_cq, [&] {
    if (!channel) return;
    std::lock_guard channel_lock(channel->mu);
    std::erase(channel->events, verbs_cq);  // events not yet taken die with it
  });
}

// ---- SRQ ----------------------------------------------------------------------------

ibv_srq* ibv_create_srq(ibv_pd* pd, ibv_srq_init_attr* attr) {
  auto& ctx = *to_ctx(pd->context);
  PumpAfter pump(ctx);
  return or_null([&] {
    auto srq = std::make_unique<Srq>();
    srq->srq = to_pd(pd)->pd->create_srq(*attr);
    auto& v = srq->verbs;
    v.context = pd->context;
    v.srq_context = attr->srq_context;
    v.pd = pd;
    v.handle = srq->srq->handle();
    init_sync(v.mutex, v.cond);
    std::lock_guard lock(ctx.mu);
    ctx.srqs[srq->srq->handle()] = srq.get();
    return &srq.release()->verbs;  // the application's until ibv_destroy_srq
  });
}

int ibv_modify_srq(ibv_srq* srq, ibv_srq_attr* attr, int mask) {
  auto& ctx = *to_ctx(srq->context);
  PumpAfter pump(ctx);
  return or_errno([&] { return to_srq(srq)->srq->modify(*attr, mask); });
}

int ibv_query_srq(ibv_srq* srq, ibv_srq_attr* attr) {
  auto& ctx = *to_ctx(srq->context);
  PumpAfter pump(ctx);
  return or_errno([&] { return to_srq(srq)->srq->query(*attr); });
}

int ibv_destroy_srq(ibv_srq* verbs_srq) {
  auto& ctx = *to_ctx(verbs_srq->context);
  PumpAfter pump(ctx);
  return destroy_routed(ctx, ctx.srqs, to_srq(verbs_srq), *verbs_srq, [] {});
}

// ---- QP -----------------------------------------------------------------------------

ibv_qp* ibv_create_qp(ibv_pd* pd, ibv_qp_init_attr* attr) {
  auto* qp = create_qp(pd->context, pd, *attr);
  if (qp) attr->cap = to_qp(qp)->qp->cap();
  return qp;
}

ibv_qp_ex* ibv_qp_to_qp_ex(ibv_qp* qp) { return &to_qp(qp)->ex; }

int ibv_modify_qp(ibv_qp* qp, ibv_qp_attr* attr, int mask) {
  auto& ctx = *to_ctx(qp->context);
  PumpAfter pump(ctx);
  return or_errno([&] {
    const int err = to_qp(qp)->qp->modify(*attr, mask);
    if (!err && (mask & IBV_QP_STATE)) qp->state = attr->qp_state;
    return err;
  });
}

int ibv_query_qp(ibv_qp* qp, ibv_qp_attr* attr, int mask, ibv_qp_init_attr* init) {
  auto& ctx = *to_ctx(qp->context);
  PumpAfter pump(ctx);
  return or_errno([&] {
    const int err = to_qp(qp)->qp->query(*attr, mask, *init);
    if (err) return err;
    init->qp_context = qp->qp_context;
    init->send_cq = qp->send_cq;
    init->recv_cq = qp->recv_cq;
    init->srq = qp->srq;
    qp->state = attr->qp_state;
    return 0;
  });
}

int ibv_query_qp_data_in_order(ibv_qp*, ibv_wr_opcode, uint32_t) { return 0; }  // no guarantee given

int ibv_destroy_qp(ibv_qp* verbs_qp) {
  auto& ctx = *to_ctx(verbs_qp->context);
  PumpAfter pump(ctx);
  return destroy_routed(ctx, ctx.qps, to_qp(verbs_qp), *verbs_qp, [] {});
}

// ---- AH -----------------------------------------------------------------------------

ibv_ah* ibv_create_ah(ibv_pd* pd, ibv_ah_attr* attr) {
  auto& ctx = *to_ctx(pd->context);
  PumpAfter pump(ctx);
  return or_null([&] {
    auto ah = to_pd(pd)->pd->create_ah(*attr);
    ah->verbs.context = pd->context;
    ah->verbs.pd = pd;
    ah->verbs.handle = ah->handle;
    // libvibfront's Qp::post_send reads the AH behind wr.ud.ah: hand out
    // its embedded ibv_ah, the application's until ibv_destroy_ah.
    return &ah.release()->verbs;
  });
}

int ibv_destroy_ah(ibv_ah* verbs_ah) {
  auto& ctx = *to_ctx(verbs_ah->context);
  PumpAfter pump(ctx);
  std::unique_ptr<vib::front::Ah> ah(to_ah(verbs_ah));
  return or_errno([&] {
    ah->pd->destroy_ah(std::move(ah));
    return 0;
  });
}

int ibv_init_ah_from_wc(ibv_context* context, uint8_t port, ibv_wc* wc, ibv_grh* grh, ibv_ah_attr* attr) {
  *attr = ibv_ah_attr{};
  attr->dlid = wc->slid;
  attr->sl = wc->sl;
  attr->src_path_bits = wc->dlid_path_bits;
  attr->port_num = port;
  if (!(wc->wc_flags & IBV_WC_GRH)) return 0;
  if (!grh) return EINVAL;
  ibv_port_attr pattr;
  if (ibv_query_port(context, port, &pattr)) return errno;
  const auto header = vib::front::decode_received_header(*grh, pattr.link_layer);
  attr->is_global = 1;
  attr->grh.dgid = header.sender;
  attr->grh.flow_label = header.flow_label;
  attr->grh.hop_limit = header.hop_limit;
  attr->grh.traffic_class = header.traffic_class;
  // The source GID index is the one holding the packet's destination GID.
  for (int i = 0; i < pattr.gid_tbl_len; ++i) {
    ibv_gid gid;
    if (ibv_query_gid(context, port, i, &gid) == 0 && std::memcmp(&gid, &header.receiver, sizeof(gid)) == 0) {
      attr->grh.sgid_index = static_cast<uint8_t>(i);
      return 0;
    }
  }
  char text[INET6_ADDRSTRLEN] = "?";
  ::inet_ntop(AF_INET6, header.receiver.raw, text, sizeof text);
  std::fprintf(stderr, "libibverbs (vib): %s: the packet's destination GID %s is not in port %u's GID table (%d entries)\n",
               ibv_get_device_name(context->device), text, unsigned{port}, pattr.gid_tbl_len);
  return ENOENT;
}

ibv_ah* ibv_create_ah_from_wc(ibv_pd* pd, ibv_wc* wc, ibv_grh* grh, uint8_t port) {
  ibv_ah_attr attr;
  if (int err = ibv_init_ah_from_wc(pd->context, port, wc, grh, &attr)) {
    errno = err;
    return nullptr;
  }
  return ibv_create_ah(pd, &attr);
}

}  // extern "C"
