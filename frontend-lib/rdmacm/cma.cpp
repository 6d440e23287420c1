// librdmacm over vib: event channels, ids, addresses, connections, QPs.
// The semantics are rdma-core 44's librdmacm (docs/rdma-cm.md); the work is
// vibd's, through the ring of the vib context an id is bound to.
#include "cma.hpp"

#include <arpa/inet.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "vib/front/wire.hpp"
#include "vib_private.h"

namespace vib::rdmacm {

namespace {

constexpr std::uint32_t kUdpQkey = RDMA_UDP_QKEY;

struct Library {
  std::mutex mu;
  bool opened = false;
  std::vector<std::unique_ptr<CmDevice>> devices;
};
Library& library() {
  static Library* l = new Library;  // never destroyed: ids may outlive static destructors
  return *l;
}

void post(int fd) {
  const std::uint64_t one = 1;
  [[maybe_unused]] auto n = ::write(fd, &one, sizeof one);
}

// dev.mu held: one count on the id's channel for one event to fetch.
void announce(IdPriv* p) {
  auto* c = chan(p->id.channel);
  std::lock_guard lock(c->mu);
  c->ready.push_back(p);
  post(c->fd.get());
}

// vib's libibverbs calls this for each VIBIF_EVENT_CM of a device's context.
void on_cm_event(void* arg, std::uint32_t handle) {
  auto* dev = static_cast<CmDevice*>(arg);
  std::lock_guard lock(dev->mu);
  auto it = dev->ids.find(handle);
  if (it == dev->ids.end()) {
    if (dev->early.size() < VIBIF_CM_MAX_IDS) dev->early.insert(handle);
    return;
  }
  announce(it->second);
}

// Opens every vib device once, as rdma-core's ucma_init does; ENODEV if none.
int open_devices() {
  auto& lib = library();
  std::lock_guard lock(lib.mu);
  if (lib.opened) return lib.devices.empty() ? ENODEV : 0;
  int count = 0;
  ibv_device** list = ibv_get_device_list(&count);
  if (!list) return errno ? errno : ENODEV;
  for (int i = 0; i < count; ++i) {
    ibv_context* verbs = ibv_open_device(list[i]);
    if (!verbs) continue;
    auto dev = std::make_unique<CmDevice>();
    dev->verbs = verbs;
    ibv_device_attr attr{};
    if (ibv_query_device(verbs, &attr) == 0)
      dev->max_rd_atomic = static_cast<std::uint8_t>(std::clamp(attr.max_qp_rd_atom, 1, 254));
    vib_ibv_set_cm_handler(verbs, on_cm_event, dev.get());
    lib.devices.push_back(std::move(dev));
  }
  ibv_free_device_list(list);
  lib.opened = true;
  return lib.devices.empty() ? ENODEV : 0;
}

std::vector<CmDevice*> devices() {
  auto& lib = library();
  std::lock_guard lock(lib.mu);
  std::vector<CmDevice*> out;
  for (auto& d : lib.devices) out.push_back(d.get());
  return out;
}

vibif_request request(std::uint16_t op, vibif_handle_t id = 0) {
  vibif_request req;
  std::memset(&req, 0, sizeof(req));
  req.hdr.op = op;
  req.u.cm_id.id = id;
  return req;
}

// 0 or the errno of the back-end's answer.
int call(CmDevice& dev, const vibif_request& req, vibif_response& rsp) {
  std::memset(&rsp, 0, sizeof(rsp));
  return vib_ibv_call(dev.verbs, &req, &rsp);
}
int call(IdPriv& p, const vibif_request& req) {
  vibif_response rsp;
  return call(*p.device, req, rsp);
}

// ---- addresses ------------------------------------------------------------------

bool to_wire(const sockaddr* sa, vibif_cm_addr& out) {
  out = vibif_cm_addr{};
  if (!sa) return true;
  if (sa->sa_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(sa);
    out.family = VIBIF_AF_INET;
    out.port = ntohs(in->sin_port);
    std::memcpy(out.addr, &in->sin_addr, 4);
    return true;
  }
  if (sa->sa_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(sa);
    out.family = VIBIF_AF_INET6;
    out.port = ntohs(in6->sin6_port);
    out.scope_id = in6->sin6_scope_id;
    std::memcpy(out.addr, &in6->sin6_addr, 16);
    return true;
  }
  return false;
}

void from_wire(const vibif_cm_addr& a, sockaddr_storage& out) {
  std::memset(&out, 0, sizeof(out));
  if (a.family == VIBIF_AF_INET) {
    auto* in = reinterpret_cast<sockaddr_in*>(&out);
    in->sin_family = AF_INET;
    in->sin_port = htons(a.port);
    std::memcpy(&in->sin_addr, a.addr, 4);
  } else if (a.family == VIBIF_AF_INET6) {
    auto* in6 = reinterpret_cast<sockaddr_in6*>(&out);
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons(a.port);
    in6->sin6_scope_id = a.scope_id;
    std::memcpy(&in6->sin6_addr, a.addr, 16);
  }
}

bool is_any(const sockaddr* sa) {
  vibif_cm_addr a;
  if (!sa || !to_wire(sa, a)) return true;
  return std::all_of(std::begin(a.addr), std::end(a.addr), [](std::uint8_t b) { return b == 0; });
}

// ---- ids on devices -------------------------------------------------------------------

// Makes `p` the id `handle` of `dev`, and delivers what was announced early.
void attach(IdPriv* p, CmDevice* dev, vibif_handle_t handle) {
  p->device = dev;
  p->handle = handle;
  p->id.verbs = dev->verbs;
  p->id.port_num = 1;
  std::lock_guard lock(dev->mu);
  if (!dev->pd) dev->pd = ibv_alloc_pd(dev->verbs);
  if (!p->id.pd) p->id.pd = dev->pd;
  dev->ids[handle] = p;
  if (dev->early.erase(handle)) announce(p);
}

int create_backend_id(IdPriv* p, CmDevice* dev, vibif_handle_t& handle) {
  auto req = request(VIBIF_OP_CM_CREATE_ID);
  req.u.cm_create_id.port_space = static_cast<std::uint16_t>(p->id.ps);
  req.u.cm_create_id.qp_type = p->id.qp_type == IBV_QPT_UD ? VIBIF_QPT_UD : VIBIF_QPT_RC;
  vibif_response rsp;
  if (int err = call(*dev, req, rsp)) return err;
  handle = rsp.u.handle.handle;
  return 0;
}

void destroy_backend_id(CmDevice* dev, vibif_handle_t handle) {
  vibif_response rsp;
  call(*dev, request(VIBIF_OP_CM_DESTROY_ID, handle), rsp);
}

// Binds on the device that owns `addr` (vibd refuses addresses that are not
// the guest's with EADDRNOTAVAIL, so each device is asked in turn).
int bind_on_a_device(IdPriv* p, const sockaddr* addr) {
  if (p->device) return EINVAL;
  vibif_cm_addr wire;
  if (!addr || !to_wire(addr, wire)) return EAFNOSUPPORT;
  int last = EADDRNOTAVAIL;
  for (CmDevice* dev : devices()) {
    vibif_handle_t h = 0;
    if (int err = create_backend_id(p, dev, h)) return err;
    auto req = request(VIBIF_OP_CM_BIND, h);
    req.u.cm_bind.addr = wire;
    vibif_response rsp;
    const int err = call(*dev, req, rsp);
    if (err == 0) {
      attach(p, dev, h);
      from_wire(rsp.u.cm_addr.addr, p->id.route.addr.src_storage);
      return 0;
    }
    destroy_backend_id(dev, h);
    last = err;
    if (err != EADDRNOTAVAIL) break;
  }
  return last;
}

// Refreshes id->route from vibd: addresses, GIDs, P_Key, the path.
int query_route(IdPriv* p, vibif_cm_route_resp* out = nullptr) {
  vibif_response rsp;
  if (int err = call(*p->device, request(VIBIF_OP_CM_QUERY_ROUTE, p->handle), rsp)) return err;
  const auto& r = rsp.u.cm_route;
  auto& addr = p->id.route.addr;
  from_wire(r.src, addr.src_storage);
  if (r.dst.family) from_wire(r.dst, addr.dst_storage);
  std::memcpy(addr.addr.ibaddr.sgid.raw, r.sgid, 16);
  std::memcpy(addr.addr.ibaddr.dgid.raw, r.dgid, 16);
  addr.addr.ibaddr.pkey = htons(r.pkey);
  auto& path = p->path;
  path = ibv_sa_path_rec{};
  std::memcpy(path.dgid.raw, r.dgid, 16);
  std::memcpy(path.sgid.raw, r.sgid, 16);
  path.dlid = htons(r.ah_attr.dlid);
  path.pkey = htons(r.pkey);
  path.sl = r.ah_attr.sl;
  path.mtu_selector = 2;  // exactly
  path.mtu = r.path_mtu;
  path.reversible = 1;
  path.numb_path = 1;
  path.hop_limit = r.ah_attr.hop_limit;
  p->id.route.path_rec = &path;
  p->id.route.num_paths = 1;
  if (out) *out = r;
  return 0;
}

// ---- QP transitions, with vibd's attributes (as librdmacm's) -------------------------

int qp_attr_from_vibd(IdPriv* p, ibv_qp_state state, ibv_qp_attr& attr, int& mask) {
  if (!p->device) return EINVAL;
  auto req = request(VIBIF_OP_CM_INIT_QP_ATTR, p->handle);
  req.u.cm_id.arg = state;
  vibif_response rsp;
  if (int err = call(*p->device, req, rsp)) return err;
  vib::front::from_wire(rsp.u.cm_qp_attr.attr, attr);
  mask = static_cast<int>(rsp.u.cm_qp_attr.attr_mask);
  return 0;
}

int modify_qp(IdPriv* p, ibv_qp_state state, int resources = -1, int depth = -1) {
  ibv_qp_attr attr;
  int mask = 0;
  if (int err = qp_attr_from_vibd(p, state, attr, mask)) return err;
  if (resources >= 0 && resources != RDMA_MAX_RESP_RES) attr.max_dest_rd_atomic = static_cast<std::uint8_t>(resources);
  if (depth >= 0 && depth != RDMA_MAX_INIT_DEPTH) attr.max_rd_atomic = static_cast<std::uint8_t>(depth);
  return ibv_modify_qp(p->id.qp, &attr, mask);
}

int modify_qp_rtr(IdPriv* p, std::uint8_t resources) {
  if (!p->id.qp) return 0;
  // INIT again first: the access flags depend on the connection's resources.
  if (int err = modify_qp(p, IBV_QPS_INIT)) return err;
  return modify_qp(p, IBV_QPS_RTR, resources);
}

int modify_qp_rts(IdPriv* p, std::uint8_t depth) {
  if (!p->id.qp) return 0;
  return modify_qp(p, IBV_QPS_RTS, -1, depth);
}

void modify_qp_err(IdPriv* p) {
  if (!p->id.qp) return;
  ibv_qp_attr attr{};
  attr.qp_state = IBV_QPS_ERR;
  ibv_modify_qp(p->id.qp, &attr, IBV_QP_STATE);
}

int init_new_qp(IdPriv* p, ibv_qp* qp) {
  ibv_qp_attr attr;
  int mask = 0;
  if (int err = qp_attr_from_vibd(p, IBV_QPS_INIT, attr, mask)) return err;
  if (int err = ibv_modify_qp(qp, &attr, mask)) return err;
  if (p->id.qp_type != IBV_QPT_UD) return 0;
  // UD is ready at once: RTR, then RTS with a send PSN, as librdmacm does.
  attr = ibv_qp_attr{};
  attr.qp_state = IBV_QPS_RTR;
  if (int err = ibv_modify_qp(qp, &attr, IBV_QP_STATE)) return err;
  attr.qp_state = IBV_QPS_RTS;
  attr.sq_psn = 0;
  return ibv_modify_qp(qp, &attr, IBV_QP_STATE | IBV_QP_SQ_PSN);
}

// ---- events ------------------------------------------------------------------------

// A CONNECT_REQUEST's new id: on the listener's device and channel.
IdPriv* new_request_id(IdPriv* listener, const vibif_cm_event_resp& r) {
  auto* p = new IdPriv;
  p->id.context = listener->id.context;
  p->id.ps = listener->id.ps;
  p->id.qp_type = listener->id.qp_type;
  p->id.channel = listener->id.channel;
  p->responder_resources = r.param.responder_resources;
  p->initiator_depth = r.param.initiator_depth;
  attach(p, listener->device, r.new_id);
  if (listener->sync && rdma_migrate_id(&p->id, nullptr) != 0) {
    rdma_destroy_id(&p->id);
    return nullptr;
  }
  query_route(p);
  return p;
}

// Active side, REP received: QP to RTR and RTS, then RTU (rdma-core's
// ucma_process_conn_resp). An error moves the QP to ERR.
int process_conn_resp(IdPriv* p) {
  int err = modify_qp_rtr(p, RDMA_MAX_RESP_RES);
  if (!err) err = modify_qp_rts(p, RDMA_MAX_INIT_DEPTH);
  if (!err) err = call(*p, request(VIBIF_OP_CM_ESTABLISH, p->handle));
  if (err) modify_qp_err(p);
  return err;
}

bool take_count(int fd) {
  std::uint64_t value = 0;
  for (;;) {
    const auto n = ::read(fd, &value, sizeof(value));
    if (n == sizeof(value)) return true;
    if (n < 0 && errno == EINTR) continue;
    return false;
  }
}

// Sync ids: waits for the event the call started (rdma-core's ucma_complete).
int complete(IdPriv* p) {
  if (!p->sync) return 0;
  if (p->id.event) {
    rdma_ack_cm_event(p->id.event);
    p->id.event = nullptr;
  }
  if (rdma_get_cm_event(p->id.channel, &p->id.event)) return -1;
  const rdma_cm_event* e = p->id.event;
  if (e->status) {
    if (e->event == RDMA_CM_EVENT_REJECTED) return fail_errno(ECONNREFUSED);
    return fail_errno(e->status < 0 ? -e->status : e->status);
  }
  return 0;
}

int result(int err) { return err ? fail_errno(err) : 0; }

ibv_qp_type qp_type_of(rdma_port_space ps) {
  return ps == RDMA_PS_UDP || ps == RDMA_PS_IPOIB ? IBV_QPT_UD : IBV_QPT_RC;
}

}  // namespace

}  // namespace vib::rdmacm

using namespace vib::rdmacm;

extern "C" {

// ---- channels -------------------------------------------------------------------------

rdma_event_channel* rdma_create_event_channel(void) {
  if (int err = open_devices()) {
    errno = err;
    return nullptr;
  }
  auto c = std::make_unique<Channel>();
  c->fd = vib::platform::UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_SEMAPHORE));
  if (!c->fd) return nullptr;
  c->verbs.fd = c->fd.get();
  return &c.release()->verbs;  // the application's until rdma_destroy_event_channel
}

void rdma_destroy_event_channel(rdma_event_channel* channel) { delete chan(channel); }

// ---- ids ----------------------------------------------------------------------------------

int rdma_create_id(rdma_event_channel* channel, rdma_cm_id** id, void* context, rdma_port_space ps) {
  if (!id) return fail_errno(EINVAL);
  if (ps != RDMA_PS_TCP && ps != RDMA_PS_UDP) return fail_errno(EPROTONOSUPPORT);
  if (int err = open_devices()) return fail_errno(err);
  auto p = std::make_unique<IdPriv>();
  p->id.context = context;
  p->id.ps = ps;
  p->id.qp_type = qp_type_of(ps);
  if (!channel) {
    channel = rdma_create_event_channel();
    if (!channel) return -1;
    p->sync = true;
  }
  p->id.channel = channel;
  *id = &p.release()->id;  // the application's until rdma_destroy_id
  return 0;
}

int rdma_destroy_id(rdma_cm_id* id) {
  IdPriv* p = priv(id);
  if (CmDevice* dev = p->device) {
    destroy_backend_id(dev, p->handle);
    std::lock_guard lock(dev->mu);
    dev->ids.erase(p->handle);
    dev->early.erase(p->handle);
    auto* c = chan(id->channel);
    std::lock_guard channel_lock(c->mu);
    std::erase(c->ready, p);
  }
  if (p->sync && id->event) {
    rdma_ack_cm_event(id->event);
    id->event = nullptr;
  }
  {
    std::unique_lock lock(p->mu);
    p->cv.wait(lock, [&] { return p->events_completed >= p->events_reported; });
  }
  if (p->sync) rdma_destroy_event_channel(id->channel);
  delete p;
  return 0;
}

int rdma_bind_addr(rdma_cm_id* id, sockaddr* addr) {
  if (!addr) return fail_errno(EINVAL);
  return result(bind_on_a_device(priv(id), addr));
}

int rdma_resolve_addr(rdma_cm_id* id, sockaddr* src_addr, sockaddr* dst_addr, int timeout_ms) {
  IdPriv* p = priv(id);
  vibif_cm_addr src{}, dst{};
  if (!dst_addr || !to_wire(dst_addr, dst) || !to_wire(src_addr, src)) return fail_errno(EINVAL);
  if (!p->device) {
    if (src_addr && !is_any(src_addr)) {
      if (int err = bind_on_a_device(p, src_addr)) return fail_errno(err);
    } else {
      // Unbound: vibd picks the source, the guest's address towards dst.
      const auto all = devices();
      if (all.empty()) return fail_errno(ENODEV);
      vibif_handle_t h = 0;
      if (int err = create_backend_id(p, all.front(), h)) return fail_errno(err);
      attach(p, all.front(), h);
    }
  }
  auto req = request(VIBIF_OP_CM_RESOLVE_ADDR, p->handle);
  req.u.cm_resolve_addr.timeout_ms = static_cast<std::uint32_t>(std::max(timeout_ms, 0));
  req.u.cm_resolve_addr.src = src;
  req.u.cm_resolve_addr.dst = dst;
  vibif_response rsp;
  if (int err = call(*p->device, req, rsp)) return fail_errno(err);
  from_wire(rsp.u.cm_addr.addr, id->route.addr.src_storage);
  std::memcpy(&id->route.addr.dst_storage, dst_addr,
              dst_addr->sa_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in));
  return complete(p);
}

int rdma_resolve_route(rdma_cm_id* id, int timeout_ms) {
  IdPriv* p = priv(id);
  if (!p->device) return fail_errno(EINVAL);
  auto req = request(VIBIF_OP_CM_RESOLVE_ROUTE, p->handle);
  req.u.cm_id.arg = static_cast<std::uint32_t>(std::max(timeout_ms, 0));
  if (int err = call(*p, req)) return fail_errno(err);
  return complete(p);
}

int rdma_listen(rdma_cm_id* id, int backlog) {
  IdPriv* p = priv(id);
  if (!p->device) {
    sockaddr_in any{};
    any.sin_family = AF_INET;
    if (int err = bind_on_a_device(p, reinterpret_cast<sockaddr*>(&any))) return fail_errno(err);
  }
  auto req = request(VIBIF_OP_CM_LISTEN, p->handle);
  req.u.cm_id.arg = static_cast<std::uint32_t>(std::max(backlog, 0));
  if (int err = call(*p, req)) return fail_errno(err);
  return result(query_route(p));
}

int rdma_connect(rdma_cm_id* id, rdma_conn_param* param) {
  IdPriv* p = priv(id);
  if (!p->device || (id->ps == RDMA_PS_TCP && !id->qp && !param)) return fail_errno(EINVAL);
  const std::uint8_t max = p->device->max_rd_atomic;
  if (param && ((param->responder_resources != RDMA_MAX_RESP_RES && param->responder_resources > max) ||
                (param->initiator_depth != RDMA_MAX_INIT_DEPTH && param->initiator_depth > max)))
    return fail_errno(EINVAL);
  p->initiator_depth = param && param->initiator_depth != RDMA_MAX_INIT_DEPTH ? param->initiator_depth : max;
  p->responder_resources =
      param && param->responder_resources != RDMA_MAX_RESP_RES ? param->responder_resources : max;
  auto req = request(VIBIF_OP_CM_CONNECT, p->handle);
  auto& c = req.u.cm_connect;
  c.param.qp_num = id->qp ? id->qp->qp_num : (param ? param->qp_num : 0);
  c.param.srq = id->qp ? (id->qp->srq != nullptr) : (param ? param->srq : 0);
  c.param.responder_resources = p->responder_resources;
  c.param.initiator_depth = p->initiator_depth;
  c.param.flow_control = param ? param->flow_control : 0;
  c.param.retry_count = param ? param->retry_count : 7;
  c.param.rnr_retry_count = param ? param->rnr_retry_count : 7;
  std::vector<std::uint8_t> data = p->connect_data;
  if (param && param->private_data && param->private_data_len) {
    const auto* bytes = static_cast<const std::uint8_t*>(param->private_data);
    data.insert(data.end(), bytes, bytes + param->private_data_len);
  }
  if (data.size() > VIBIF_CM_MAX_PRIVATE_DATA) return fail_errno(EINVAL);
  std::copy(data.begin(), data.end(), c.private_data);
  c.param.private_data_len = static_cast<std::uint8_t>(data.size());
  if (int err = call(*p, req)) return fail_errno(err);
  p->connect_data.clear();
  return complete(p);
}

int rdma_accept(rdma_cm_id* id, rdma_conn_param* param) {
  IdPriv* p = priv(id);
  if (!p->device || (id->ps == RDMA_PS_TCP && !id->qp && !param)) return fail_errno(EINVAL);
  const std::uint8_t max = p->device->max_rd_atomic;
  p->initiator_depth = !param || param->initiator_depth == RDMA_MAX_INIT_DEPTH ? std::min(p->initiator_depth, max)
                                                                               : param->initiator_depth;
  p->responder_resources = !param || param->responder_resources == RDMA_MAX_RESP_RES
                               ? std::min(p->responder_resources, max)
                               : param->responder_resources;
  const bool ud = id->qp_type == IBV_QPT_UD;
  if (!ud) {
    if (int err = modify_qp_rtr(p, p->responder_resources)) return fail_errno(err);
    if (int err = modify_qp_rts(p, p->initiator_depth)) return fail_errno(err);
  }
  auto req = request(VIBIF_OP_CM_ACCEPT, p->handle);
  auto& c = req.u.cm_connect;
  c.param.qp_num = id->qp ? id->qp->qp_num : param->qp_num;
  c.param.srq = id->qp ? (id->qp->srq != nullptr) : param->srq;
  c.param.qkey = kUdpQkey;
  c.param.responder_resources = p->responder_resources;
  c.param.initiator_depth = p->initiator_depth;
  c.param.flow_control = param ? param->flow_control : 0;
  c.param.rnr_retry_count = param ? param->rnr_retry_count : 7;
  if (param && param->private_data && param->private_data_len) {
    std::memcpy(c.private_data, param->private_data, param->private_data_len);
    c.param.private_data_len = param->private_data_len;
  }
  if (int err = call(*p, req)) {
    modify_qp_err(p);
    return fail_errno(err);
  }
  return ud ? 0 : complete(p);
}

int rdma_reject(rdma_cm_id* id, const void* private_data, uint8_t private_data_len) {
  IdPriv* p = priv(id);
  if (!p->device) return fail_errno(EINVAL);
  auto req = request(VIBIF_OP_CM_REJECT, p->handle);
  if (private_data && private_data_len) {
    if (private_data_len > VIBIF_CM_MAX_PRIVATE_DATA) return fail_errno(EINVAL);
    std::memcpy(req.u.cm_reject.private_data, private_data, private_data_len);
    req.u.cm_reject.private_data_len = private_data_len;
  }
  return result(call(*p, req));
}

int rdma_reject_ece(rdma_cm_id* id, const void* private_data, uint8_t private_data_len) {
  return rdma_reject(id, private_data, private_data_len);
}

int rdma_establish(rdma_cm_id* id) {
  IdPriv* p = priv(id);
  if (id->qp || !p->device) return fail_errno(EINVAL);
  return result(call(*p, request(VIBIF_OP_CM_ESTABLISH, p->handle)));
}

int rdma_notify(rdma_cm_id*, ibv_event_type) { return 0; }  // vibd learns of establishment from CM_ESTABLISH

int rdma_disconnect(rdma_cm_id* id) {
  IdPriv* p = priv(id);
  if (!id->verbs || !p->device) return fail_errno(EINVAL);
  modify_qp_err(p);
  if (int err = call(*p, request(VIBIF_OP_CM_DISCONNECT, p->handle))) return fail_errno(err);
  return complete(p);
}

int rdma_init_qp_attr(rdma_cm_id* id, ibv_qp_attr* qp_attr, int* qp_attr_mask) {
  return result(qp_attr_from_vibd(priv(id), qp_attr->qp_state, *qp_attr, *qp_attr_mask));
}

// ---- events ------------------------------------------------------------------------------

int rdma_get_cm_event(rdma_event_channel* channel, rdma_cm_event** event) {
  if (!event || !channel) return fail_errno(EINVAL);
  Channel* c = chan(channel);
  for (;;) {
    if (!take_count(c->fd.get())) return -1;  // errno: EAGAIN on a non-blocking channel
    IdPriv* p = nullptr;
    {
      std::lock_guard lock(c->mu);
      if (c->ready.empty()) continue;  // its id was destroyed or moved
      p = c->ready.front();
      c->ready.pop_front();
    }
    vibif_response rsp;
    const int err = call(*p->device, request(VIBIF_OP_CM_GET_EVENT, p->handle), rsp);
    if (err == EAGAIN || err == ENOENT) continue;
    if (err) return fail_errno(err);
    const auto& r = rsp.u.cm_event;
    auto e = std::make_unique<Event>();
    e->id_priv = p;
    e->event.id = &p->id;
    e->event.event = static_cast<rdma_cm_event_type>(r.event);
    e->event.status = r.status;
    const std::size_t length = std::min<std::size_t>(r.param.private_data_len, VIBIF_CM_MAX_PRIVATE_DATA);
    e->private_data.assign(r.private_data, r.private_data + length);
    const void* data = e->private_data.empty() ? nullptr : e->private_data.data();
    const bool ud = p->id.qp_type == IBV_QPT_UD;
    if (ud) {
      auto& u = e->event.param.ud;
      u.private_data = data;
      u.private_data_len = static_cast<std::uint8_t>(length);
      u.qp_num = r.param.qp_num;
      u.qkey = r.param.qkey;
    } else {
      auto& conn = e->event.param.conn;
      conn.private_data = data;
      conn.private_data_len = static_cast<std::uint8_t>(length);
      conn.responder_resources = r.param.responder_resources;
      conn.initiator_depth = r.param.initiator_depth;
      conn.flow_control = r.param.flow_control;
      conn.retry_count = r.param.retry_count;
      conn.rnr_retry_count = r.param.rnr_retry_count;
      conn.srq = r.param.srq;
      conn.qp_num = r.param.qp_num;
    }
    switch (r.event) {
      case RDMA_CM_EVENT_ADDR_RESOLVED:
      case RDMA_CM_EVENT_ROUTE_RESOLVED:
        query_route(p);
        break;
      case RDMA_CM_EVENT_CONNECT_REQUEST: {
        IdPriv* child = new_request_id(p, r);
        if (!child) continue;
        e->event.listen_id = &p->id;
        e->event.id = &child->id;
        break;
      }
      case RDMA_CM_EVENT_CONNECT_RESPONSE:
        if (p->id.qp) {
          const int failed = process_conn_resp(p);
          e->event.event = failed ? RDMA_CM_EVENT_CONNECT_ERROR : RDMA_CM_EVENT_ESTABLISHED;
          e->event.status = -failed;
          p->connect_error = failed != 0;
        }
        break;
      case RDMA_CM_EVENT_ESTABLISHED:
        if (ud) {
          vibif_cm_route_resp route{};
          query_route(p, &route);
          vib::front::from_wire(route.ah_attr, e->event.param.ud.ah_attr);
        }
        break;
      case RDMA_CM_EVENT_REJECTED:
        if (p->connect_error) continue;
        modify_qp_err(p);
        break;
      case RDMA_CM_EVENT_DISCONNECTED:
        if (p->connect_error) continue;
        break;
      default:
        break;
    }
    {
      std::lock_guard lock(e->id_priv->mu);
      ++e->id_priv->events_reported;
    }
    *event = &e.release()->event;  // the application's until rdma_ack_cm_event
    return 0;
  }
}

int rdma_ack_cm_event(rdma_cm_event* event) {
  if (!event) return fail_errno(EINVAL);
  std::unique_ptr<Event> e(evt(event));
  std::lock_guard lock(e->id_priv->mu);
  ++e->id_priv->events_completed;
  e->id_priv->cv.notify_all();
  return 0;
}

const char* rdma_event_str(rdma_cm_event_type event) {
  static const char* const names[] = {
      "RDMA_CM_EVENT_ADDR_RESOLVED",    "RDMA_CM_EVENT_ADDR_ERROR",       "RDMA_CM_EVENT_ROUTE_RESOLVED",
      "RDMA_CM_EVENT_ROUTE_ERROR",      "RDMA_CM_EVENT_CONNECT_REQUEST",  "RDMA_CM_EVENT_CONNECT_RESPONSE",
      "RDMA_CM_EVENT_CONNECT_ERROR",    "RDMA_CM_EVENT_UNREACHABLE",      "RDMA_CM_EVENT_REJECTED",
      "RDMA_CM_EVENT_ESTABLISHED",      "RDMA_CM_EVENT_DISCONNECTED",     "RDMA_CM_EVENT_DEVICE_REMOVAL",
      "RDMA_CM_EVENT_MULTICAST_JOIN",   "RDMA_CM_EVENT_MULTICAST_ERROR",  "RDMA_CM_EVENT_ADDR_CHANGE",
      "RDMA_CM_EVENT_TIMEWAIT_EXIT"};
  const auto i = static_cast<unsigned>(event);
  return i < sizeof(names) / sizeof(names[0]) ? names[i] : "UNKNOWN EVENT";
}

int rdma_migrate_id(rdma_cm_id* id, rdma_event_channel* channel) {
  IdPriv* p = priv(id);
  if (p->sync && !channel) return fail_errno(EINVAL);
  const bool sync = channel == nullptr;
  if (sync) {
    channel = rdma_create_event_channel();
    if (!channel) return -1;
  }
  rdma_event_channel* old = id->channel;
  {
    std::unique_lock<std::mutex> dev_lock;
    if (p->device) dev_lock = std::unique_lock(p->device->mu);
    Channel* from = chan(old);
    Channel* to = chan(channel);
    std::scoped_lock locks(from->mu, to->mu);
    // Counts already posted for this id move with it.
    const auto moved = std::count(from->ready.begin(), from->ready.end(), p);
    std::erase(from->ready, p);
    for (long i = 0; i < moved; ++i) {
      to->ready.push_back(p);
      post(to->fd.get());
    }
    id->channel = channel;
  }
  if (p->sync) {
    if (id->event) {
      rdma_ack_cm_event(id->event);
      id->event = nullptr;
    }
    rdma_destroy_event_channel(old);
  }
  p->sync = sync;
  std::unique_lock lock(p->mu);
  p->cv.wait(lock, [&] { return p->events_completed >= p->events_reported; });
  return 0;
}

int rdma_set_option(rdma_cm_id*, int level, int optname, void*, size_t) {
  // Type of service, address reuse, IPv6-only, ACK timeout: vibd's paths
  // have no use for them. Explicit IB paths are not offered.
  if (level == RDMA_OPTION_ID) return 0;
  (void)optname;
  return fail_errno(ENOSYS);
}


__be16 rdma_get_src_port(rdma_cm_id* id) {
  const sockaddr* a = &id->route.addr.src_addr;
  return a->sa_family == AF_INET6 ? reinterpret_cast<const sockaddr_in6*>(a)->sin6_port
                                  : reinterpret_cast<const sockaddr_in*>(a)->sin_port;
}
__be16 rdma_get_dst_port(rdma_cm_id* id) {
  const sockaddr* a = &id->route.addr.dst_addr;
  return a->sa_family == AF_INET6 ? reinterpret_cast<const sockaddr_in6*>(a)->sin6_port
                                  : reinterpret_cast<const sockaddr_in*>(a)->sin_port;
}

ibv_context** rdma_get_devices(int* num_devices) {
  open_devices();
  const auto all = devices();
  auto** list = static_cast<ibv_context**>(std::calloc(all.size() + 1, sizeof(ibv_context*)));
  if (!list) return nullptr;
  for (std::size_t i = 0; i < all.size(); ++i) list[i] = all[i]->verbs;
  if (num_devices) *num_devices = static_cast<int>(all.size());
  return list;
}

void rdma_free_devices(ibv_context** list) { std::free(list); }

// ---- QPs and SRQs -----------------------------------------------------------------------

}  // extern "C"

namespace vib::rdmacm {
namespace {

void destroy_cqs(rdma_cm_id* id) {
  if (id->recv_cq) {
    ibv_destroy_cq(id->recv_cq);
    if (id->send_cq && id->send_cq != id->recv_cq) ibv_destroy_cq(id->send_cq);
  } else if (id->send_cq) {
    ibv_destroy_cq(id->send_cq);
  }
  id->recv_cq = id->send_cq = nullptr;
  if (id->recv_cq_channel) ibv_destroy_comp_channel(id->recv_cq_channel);
  if (id->send_cq_channel && id->send_cq_channel != id->recv_cq_channel) ibv_destroy_comp_channel(id->send_cq_channel);
  id->recv_cq_channel = id->send_cq_channel = nullptr;
}

int create_cqs(rdma_cm_id* id, std::uint32_t send_size, std::uint32_t recv_size) {
  if (recv_size) {
    id->recv_cq_channel = ibv_create_comp_channel(id->verbs);
    if (id->recv_cq_channel)
      id->recv_cq = ibv_create_cq(id->verbs, static_cast<int>(recv_size), id, id->recv_cq_channel, 0);
    if (!id->recv_cq) {
      destroy_cqs(id);
      return -1;
    }
  }
  if (send_size) {
    id->send_cq_channel = ibv_create_comp_channel(id->verbs);
    if (id->send_cq_channel)
      id->send_cq = ibv_create_cq(id->verbs, static_cast<int>(send_size), id, id->send_cq_channel, 0);
    if (!id->send_cq) {
      destroy_cqs(id);
      return -1;
    }
  }
  return 0;
}

}  // namespace
}  // namespace vib::rdmacm

extern "C" {

int rdma_create_qp_ex(rdma_cm_id* id, ibv_qp_init_attr_ex* attr) {
  IdPriv* p = priv(id);
  if (id->qp || !p->device) return fail_errno(EINVAL);
  if (!(attr->comp_mask & IBV_QP_INIT_ATTR_PD) || !attr->pd) {
    attr->comp_mask |= IBV_QP_INIT_ATTR_PD;
    attr->pd = id->pd;
  } else if (attr->pd->context != id->verbs) {
    return fail_errno(EINVAL);
  }
  if ((id->recv_cq && attr->recv_cq && id->recv_cq != attr->recv_cq) ||
      (id->send_cq && attr->send_cq && id->send_cq != attr->send_cq))
    return fail_errno(EINVAL);
  if (create_cqs(id, attr->send_cq || id->send_cq ? 0 : attr->cap.max_send_wr,
                 attr->recv_cq || id->recv_cq ? 0 : attr->cap.max_recv_wr))
    return -1;
  if (!attr->send_cq) attr->send_cq = id->send_cq;
  if (!attr->recv_cq) attr->recv_cq = id->recv_cq;
  if (id->srq && !attr->srq) attr->srq = id->srq;
  ibv_qp_init_attr init{};
  init.qp_context = attr->qp_context;
  init.send_cq = attr->send_cq;
  init.recv_cq = attr->recv_cq;
  init.srq = attr->srq;
  init.cap = attr->cap;
  init.qp_type = attr->qp_type;
  init.sq_sig_all = attr->sq_sig_all;
  ibv_qp* qp = ibv_create_qp(attr->pd, &init);
  if (!qp) {
    destroy_cqs(id);
    return -1;
  }
  attr->cap = init.cap;
  if (int err = init_new_qp(p, qp)) {
    ibv_destroy_qp(qp);
    destroy_cqs(id);
    return fail_errno(err);
  }
  id->pd = qp->pd;
  id->qp = qp;
  return 0;
}

int rdma_create_qp(rdma_cm_id* id, ibv_pd* pd, ibv_qp_init_attr* qp_init_attr) {
  ibv_qp_init_attr_ex ex{};
  std::memcpy(&ex, qp_init_attr, sizeof(*qp_init_attr));
  ex.comp_mask = IBV_QP_INIT_ATTR_PD;
  ex.pd = pd ? pd : id->pd;
  const int ret = rdma_create_qp_ex(id, &ex);
  std::memcpy(qp_init_attr, &ex, sizeof(*qp_init_attr));
  return ret;
}

void rdma_destroy_qp(rdma_cm_id* id) {
  ibv_destroy_qp(id->qp);
  id->qp = nullptr;
  destroy_cqs(id);
}

int rdma_create_srq_ex(rdma_cm_id* id, ibv_srq_init_attr_ex* attr) {
  if (!(attr->comp_mask & IBV_SRQ_INIT_ATTR_TYPE) || attr->srq_type != IBV_SRQT_BASIC) return fail_errno(EOPNOTSUPP);
  if (!(attr->comp_mask & IBV_SRQ_INIT_ATTR_PD) || !attr->pd) {
    attr->pd = id->pd;
    attr->comp_mask |= IBV_SRQ_INIT_ATTR_PD;
  }
  ibv_srq_init_attr init{};
  init.srq_context = attr->srq_context;
  init.attr = attr->attr;
  ibv_srq* srq = ibv_create_srq(attr->pd, &init);
  if (!srq) return -1;
  attr->attr = init.attr;
  if (!id->pd) id->pd = attr->pd;
  id->srq = srq;
  return 0;
}

int rdma_create_srq(rdma_cm_id* id, ibv_pd* pd, ibv_srq_init_attr* attr) {
  ibv_srq_init_attr_ex ex{};
  std::memcpy(&ex, attr, sizeof(*attr));
  ex.comp_mask = IBV_SRQ_INIT_ATTR_TYPE | IBV_SRQ_INIT_ATTR_PD;
  ex.srq_type = IBV_SRQT_BASIC;
  ex.pd = pd;
  const int ret = rdma_create_srq_ex(id, &ex);
  std::memcpy(attr, &ex, sizeof(*attr));
  return ret;
}

void rdma_destroy_srq(rdma_cm_id* id) {
  ibv_destroy_srq(id->srq);
  id->srq = nullptr;
  destroy_cqs(id);
}

// ---- synchronous endpoints -----------------------------------------------------------------

int rdma_get_request(rdma_cm_id* listen, rdma_cm_id** id) {
  IdPriv* p = priv(listen);
  if (!p->sync) return fail_errno(EINVAL);
  if (listen->event) {
    rdma_ack_cm_event(listen->event);
    listen->event = nullptr;
  }
  rdma_cm_event* event = nullptr;
  if (rdma_get_cm_event(listen->channel, &event)) return -1;
  int err = 0;
  if (event->event == RDMA_CM_EVENT_REJECTED)
    err = ECONNREFUSED;
  else if (event->status)
    err = event->status < 0 ? -event->status : event->status;
  else if (event->event != RDMA_CM_EVENT_CONNECT_REQUEST)
    err = EINVAL;
  if (!err && p->has_qp_init_attr) {
    ibv_qp_init_attr attr = p->qp_init_attr;
    if (rdma_create_qp(event->id, listen->pd, &attr)) err = errno;
  }
  if (err) {
    listen->event = event;
    return fail_errno(err);
  }
  *id = event->id;
  (*id)->event = event;
  return 0;
}

int rdma_create_ep(rdma_cm_id** id, rdma_addrinfo* res, ibv_pd* pd, ibv_qp_init_attr* qp_init_attr) {
  rdma_cm_id* cm_id = nullptr;
  if (rdma_create_id(nullptr, &cm_id, nullptr, static_cast<rdma_port_space>(res->ai_port_space))) return -1;
  IdPriv* p = priv(cm_id);
  int ret = 0;
  if (res->ai_flags & RAI_PASSIVE) {
    ret = rdma_bind_addr(cm_id, res->ai_src_addr);
    if (!ret) {
      if (pd) cm_id->pd = pd;
      if (qp_init_attr) {
        p->has_qp_init_attr = true;
        p->qp_init_attr = *qp_init_attr;
        p->qp_init_attr.qp_type = static_cast<ibv_qp_type>(res->ai_qp_type);
      }
    }
  } else {
    ret = rdma_resolve_addr(cm_id, res->ai_src_addr, res->ai_dst_addr, 2000);
    if (!ret) ret = rdma_resolve_route(cm_id, 2000);
    if (!ret && qp_init_attr) {
      qp_init_attr->qp_type = static_cast<ibv_qp_type>(res->ai_qp_type);
      ret = rdma_create_qp(cm_id, pd, qp_init_attr);
    }
    if (!ret && res->ai_connect_len) {
      const auto* bytes = static_cast<const std::uint8_t*>(res->ai_connect);
      p->connect_data.assign(bytes, bytes + res->ai_connect_len);
    }
  }
  if (ret) {
    const int err = errno;
    rdma_destroy_ep(cm_id);
    return fail_errno(err);
  }
  *id = cm_id;
  return 0;
}

void rdma_destroy_ep(rdma_cm_id* id) {
  if (id->qp) rdma_destroy_qp(id);
  if (id->srq) rdma_destroy_srq(id);
  rdma_destroy_id(id);
}

// ---- not offered --------------------------------------------------------------------------

int rdma_join_multicast(rdma_cm_id*, sockaddr*, void*) { return fail_errno(ENOSYS); }
int rdma_join_multicast_ex(rdma_cm_id*, rdma_cm_join_mc_attr_ex*, void*) { return fail_errno(ENOSYS); }
int rdma_leave_multicast(rdma_cm_id*, sockaddr*) { return fail_errno(ENOSYS); }
int rdma_get_remote_ece(rdma_cm_id*, ibv_ece*) { return fail_errno(EOPNOTSUPP); }
int rdma_set_local_ece(rdma_cm_id*, ibv_ece*) { return fail_errno(EOPNOTSUPP); }

}  // extern "C"
