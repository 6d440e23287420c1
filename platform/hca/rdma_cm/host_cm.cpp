// HostConnectionManager over librdmacm. Every id lives on one event
// channel whose descriptor is non-blocking, so the reader polls it and never
// sits inside librdmacm holding an unacknowledged event.
#include "vib/platform/host_cm.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <rdma/rdma_cma.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <system_error>

namespace vib::platform {

namespace {

int errno_of(int rc) { return rc == 0 ? 0 : (errno ? errno : EIO); }

rdma_conn_param to_rdma(const HostCmParam& p) {
  rdma_conn_param c{};
  c.private_data = p.private_data.empty() ? nullptr : p.private_data.data();
  c.private_data_len = static_cast<std::uint8_t>(std::min<std::size_t>(p.private_data.size(), 255));
  c.responder_resources = p.responder_resources;
  c.initiator_depth = p.initiator_depth;
  c.flow_control = p.flow_control;
  c.retry_count = p.retry_count;
  c.rnr_retry_count = p.rnr_retry_count;
  c.srq = p.srq;
  c.qp_num = p.qp_num;
  return c;
}

std::size_t sockaddr_size(const sockaddr& a) {
  return a.sa_family == AF_INET6 ? sizeof(sockaddr_in6) : a.sa_family == AF_INET ? sizeof(sockaddr_in) : 0;
}

class RdmaCmId final : public HostCmId {
 public:
  explicit RdmaCmId(rdma_cm_id* id) : id_(id) {}
  ~RdmaCmId() override { rdma_destroy_id(id_); }
  RdmaCmId(const RdmaCmId&) = delete;
  RdmaCmId& operator=(const RdmaCmId&) = delete;

  int bind(const sockaddr& addr) override {
    return errno_of(rdma_bind_addr(id_, const_cast<sockaddr*>(&addr)));
  }
  int resolve_addr(const sockaddr& src, const sockaddr& dst, int timeout_ms) override {
    return errno_of(rdma_resolve_addr(id_, const_cast<sockaddr*>(&src), const_cast<sockaddr*>(&dst), timeout_ms));
  }
  int resolve_route(int timeout_ms) override { return errno_of(rdma_resolve_route(id_, timeout_ms)); }
  int listen(int backlog) override { return errno_of(rdma_listen(id_, backlog)); }
  int connect(const HostCmParam& param) override {
    auto c = to_rdma(param);
    return errno_of(rdma_connect(id_, &c));
  }
  int accept(const HostCmParam& param) override {
    auto c = to_rdma(param);
    return errno_of(rdma_accept(id_, &c));
  }
  int reject(std::span<const std::uint8_t> data) override {
    return errno_of(rdma_reject(id_, data.empty() ? nullptr : data.data(),
                                static_cast<std::uint8_t>(std::min<std::size_t>(data.size(), 255))));
  }
  int establish() override { return errno_of(rdma_establish(id_)); }
  int disconnect() override { return errno_of(rdma_disconnect(id_)); }
  int init_qp_attr(ibv_qp_attr& attr, int& mask) override {
    const ibv_qp_state wanted = attr.qp_state;  // the kernel reads the state asked for from here
    attr = ibv_qp_attr{};
    attr.qp_state = wanted;
    mask = 0;
    return errno_of(rdma_init_qp_attr(id_, &attr, &mask));
  }
  std::string device_name() const override {
    if (!id_->verbs || !id_->verbs->device) return {};
    const char* name = ibv_get_device_name(id_->verbs->device);
    return name ? name : "";
  }
  std::uint8_t port_num() const override { return id_->port_num; }
  int query_pkey(std::uint16_t index, std::uint16_t& pkey) const override {
    if (!id_->verbs) return ENODEV;
    __be16 value = 0;
    if (int rc = ibv_query_pkey(id_->verbs, id_->port_num, index, &value)) return rc;
    pkey = ntohs(value);
    return 0;
  }
  HostCmRoute route() const override {
    HostCmRoute r;
    const auto& a = id_->route.addr;
    std::memcpy(&r.src, &a.src_addr, std::min(sizeof(r.src), sockaddr_size(a.src_addr)));
    std::memcpy(&r.dst, &a.dst_addr, std::min(sizeof(r.dst), sockaddr_size(a.dst_addr)));
    r.sgid = a.addr.ibaddr.sgid;
    r.dgid = a.addr.ibaddr.dgid;
    r.pkey = ntohs(a.addr.ibaddr.pkey);
    if (id_->route.num_paths > 0 && id_->route.path_rec) {
      const ibv_sa_path_rec& path = id_->route.path_rec[0];
      r.mtu = path.mtu;
      r.dlid = ntohs(path.dlid);
      r.sl = path.sl;
      r.hop_limit = path.hop_limit;
      r.pkey = ntohs(path.pkey);
    }
    return r;
  }
  void set_token(std::uint64_t token) override {
    id_->context = reinterpret_cast<void*>(static_cast<std::uintptr_t>(token));
  }

 private:
  rdma_cm_id* const id_;
};

class RdmaCm final : public HostConnectionManager {
 public:
  RdmaCm() : channel_(rdma_create_event_channel()) {
    if (!channel_) throw std::system_error(errno ? errno : ENODEV, std::generic_category(), "rdma_create_event_channel");
    const int flags = ::fcntl(channel_->fd, F_GETFL);
    if (flags < 0 || ::fcntl(channel_->fd, F_SETFL, flags | O_NONBLOCK) < 0) {
      const int err = errno;
      rdma_destroy_event_channel(channel_);
      throw std::system_error(err, std::generic_category(), "rdma_cm event channel");
    }
  }
  ~RdmaCm() override { rdma_destroy_event_channel(channel_); }
  RdmaCm(const RdmaCm&) = delete;
  RdmaCm& operator=(const RdmaCm&) = delete;

  std::unique_ptr<HostCmId> create_id(std::uint64_t token, int port_space) override {
    rdma_cm_id* id = nullptr;
    if (rdma_create_id(channel_, &id, reinterpret_cast<void*>(static_cast<std::uintptr_t>(token)),
                       static_cast<rdma_port_space>(port_space)) != 0)
      throw std::system_error(errno, std::generic_category(), "rdma_create_id");
    return std::make_unique<RdmaCmId>(id);
  }

  int event_fd() const override { return channel_->fd; }

  std::optional<HostCmEvent> next_event() override {
    rdma_cm_event* ev = nullptr;
    if (rdma_get_cm_event(channel_, &ev) != 0) return std::nullopt;  // EAGAIN: none waits
    HostCmEvent out;
    out.type = ev->event;
    out.status = ev->status;
    const bool request = ev->event == RDMA_CM_EVENT_CONNECT_REQUEST;
    const rdma_cm_id* named = request && ev->listen_id ? ev->listen_id : ev->id;
    out.token = static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(named->context));
    const std::uint8_t* data = nullptr;
    std::size_t length = 0;
    if (ev->id->ps == RDMA_PS_UDP) {
      out.param.qp_num = ev->param.ud.qp_num;
      out.param.qkey = ev->param.ud.qkey;
      if (ev->event == RDMA_CM_EVENT_ESTABLISHED || request) out.param.ah = ev->param.ud.ah_attr;
      data = static_cast<const std::uint8_t*>(ev->param.ud.private_data);
      length = ev->param.ud.private_data_len;
    } else {
      const auto& c = ev->param.conn;
      out.param.responder_resources = c.responder_resources;
      out.param.initiator_depth = c.initiator_depth;
      out.param.flow_control = c.flow_control;
      out.param.retry_count = c.retry_count;
      out.param.rnr_retry_count = c.rnr_retry_count;
      out.param.srq = c.srq;
      out.param.qp_num = c.qp_num;
      data = static_cast<const std::uint8_t*>(c.private_data);
      length = c.private_data_len;
    }
    if (data) out.param.private_data.assign(data, data + length);
    if (request) out.new_id = std::make_unique<RdmaCmId>(ev->id);
    rdma_ack_cm_event(ev);
    return out;
  }

 private:
  rdma_event_channel* const channel_;
};

}  // namespace

std::unique_ptr<HostConnectionManager> open_host_cm() { return std::make_unique<RdmaCm>(); }

}  // namespace vib::platform
