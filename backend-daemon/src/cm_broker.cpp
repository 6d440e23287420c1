// vibd as the guests' connection manager. Every request is a copy of the
// guest's; every id, address, length and state is checked here.
#include "cm_broker.hpp"

#include <arpa/inet.h>
#include <poll.h>
#include <rdma/rdma_cma.h>
#include <sys/eventfd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <system_error>

#include "log.hpp"
#include "vib/platform/process.hpp"

namespace vib::backend {

namespace {

// rdma_cm's event numbers (enum rdma_cm_event_type), as the guest gets them.
enum : std::uint8_t {
  kAddrResolved = 0,
  kAddrError = 1,
  kRouteResolved = 2,
  kRouteError = 3,
  kConnectRequest = 4,
  kConnectResponse = 5,
  kConnectError = 6,
  kUnreachable = 7,
  kRejected = 8,
  kEstablished = 9,
  kDisconnected = 10,
};
// IB CM reject reasons (IBTA 12.6.7.2) and SIDR statuses as rdma_cm reports them.
constexpr int kRejectInvalidServiceId = 8;
constexpr int kRejectConsumer = 28;
constexpr int kSidrReject = 2;
// What librdmacm gives UD ids (RDMA_UDP_QKEY).
constexpr std::uint32_t kUdpQkey = 0x01234567;
// Private data an application may send with each message (rdma_cm's IP
// header taken out of the IB CM's room).
constexpr std::size_t kMaxReqData = 56, kMaxRepData = 196, kMaxRejData = 148, kMaxSidrReqData = 180,
                      kMaxSidrRepData = 136;
constexpr std::uint32_t kDefaultBacklog = VIBIF_CM_MAX_EVENTS;
constexpr std::uint8_t kAckTimeout = 14;    // 4.096 us * 2^14 = 67 ms
constexpr std::uint8_t kMinRnrTimer = 12;
// How long a request waits for a listener that is not there (yet).
constexpr std::chrono::milliseconds kListenerGrace{1000};
// What the host's rdma_cm gets to resolve an address and a route (rping's
// and perftest's choice).
constexpr int kHostResolveTimeoutMs = 2000;
// Host rdma_cm ids (kernel objects in dom0) the ids of one device's guest
// may hold at once: connections and listeners together.
constexpr std::size_t kMaxHostIdsPerDevice = 1024;

bool is_pow2_mtu(std::uint8_t mtu) { return mtu >= IBV_MTU_256 && mtu <= IBV_MTU_4096; }

}  // namespace

// ---- addresses ------------------------------------------------------------------

bool IpAddress::wildcard() const {
  return std::all_of(bytes.begin(), bytes.end(), [](std::uint8_t b) { return b == 0; });
}

bool IpAddress::loopback() const {
  if (family == VIBIF_AF_INET) return bytes[0] == 127;
  static constexpr std::array<std::uint8_t, 16> kLoopback6{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
  return family == VIBIF_AF_INET6 && bytes == kLoopback6;
}

std::array<std::uint8_t, 16> IpAddress::gid() const {
  if (family == VIBIF_AF_INET6) return bytes;
  std::array<std::uint8_t, 16> g{};
  g[10] = g[11] = 0xff;
  std::copy_n(bytes.begin(), 4, g.begin() + 12);
  return g;
}

std::string IpAddress::str() const {
  char text[INET6_ADDRSTRLEN] = "?";
  ::inet_ntop(family == VIBIF_AF_INET6 ? AF_INET6 : AF_INET, bytes.data(), text, sizeof(text));
  return text;
}

IpAddress IpAddress::from_wire(const vibif_cm_addr& a) {
  IpAddress ip;
  ip.family = a.family;
  if (a.family == VIBIF_AF_INET)
    std::copy_n(a.addr, 4, ip.bytes.begin());
  else if (a.family == VIBIF_AF_INET6)
    std::copy_n(a.addr, 16, ip.bytes.begin());
  return ip;
}

std::optional<IpAddress> IpAddress::parse(std::string_view text) {
  const std::string s(text.substr(0, text.find('/')));
  IpAddress ip;
  if (::inet_pton(AF_INET, s.c_str(), ip.bytes.data()) == 1) {
    ip.family = VIBIF_AF_INET;
    return ip;
  }
  if (::inet_pton(AF_INET6, s.c_str(), ip.bytes.data()) == 1) {
    ip.family = VIBIF_AF_INET6;
    return ip;
  }
  return std::nullopt;
}

std::optional<std::vector<IpAddress>> parse_ip_list(std::string_view text) {
  std::vector<IpAddress> out;
  std::size_t at = 0;
  while (at < text.size()) {
    const std::size_t end = std::min(text.find(' ', at), text.size());
    if (end > at) {
      auto ip = IpAddress::parse(text.substr(at, end - at));
      if (!ip || ip->wildcard() || out.size() >= 64) return std::nullopt;
      out.push_back(*ip);
    }
    at = end + 1;
  }
  return out;
}

namespace {

// A host errno as the guest's status.
int host_status(int err) {
  switch (err) {
    case EINVAL: return VIBIF_EINVAL;
    case ENOMEM: return VIBIF_ENOMEM;
    case EADDRINUSE: return VIBIF_EADDRINUSE;
    case EADDRNOTAVAIL: return VIBIF_EADDRNOTAVAIL;
    case ENOTCONN: return VIBIF_ENOTCONN;
    case EPERM: case EACCES: return VIBIF_EPERM;
    default: return VIBIF_EIO;
  }
}

sockaddr_storage to_sockaddr(const IpAddress& ip, std::uint16_t port) {
  sockaddr_storage out{};
  if (ip.family == VIBIF_AF_INET6) {
    auto& a = reinterpret_cast<sockaddr_in6&>(out);
    a.sin6_family = AF_INET6;
    a.sin6_port = htons(port);
    std::copy(ip.bytes.begin(), ip.bytes.end(), a.sin6_addr.s6_addr);
  } else {
    auto& a = reinterpret_cast<sockaddr_in&>(out);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    std::memcpy(&a.sin_addr, ip.bytes.data(), 4);
  }
  return out;
}

// The address and port of a host sockaddr; family 0 if it is neither kind.
std::pair<IpAddress, std::uint16_t> from_sockaddr(const sockaddr_storage& in) {
  IpAddress ip;
  std::uint16_t port = 0;
  if (in.ss_family == AF_INET) {
    const auto& a = reinterpret_cast<const sockaddr_in&>(in);
    ip.family = VIBIF_AF_INET;
    std::memcpy(ip.bytes.data(), &a.sin_addr, 4);
    port = ntohs(a.sin_port);
  } else if (in.ss_family == AF_INET6) {
    const auto& a = reinterpret_cast<const sockaddr_in6&>(in);
    ip.family = VIBIF_AF_INET6;
    std::copy(std::begin(a.sin6_addr.s6_addr), std::end(a.sin6_addr.s6_addr), ip.bytes.begin());
    port = ntohs(a.sin6_port);
  }
  return {ip, port};
}

vibif_cm_addr to_wire(const IpAddress& ip, std::uint16_t port) {
  vibif_cm_addr a{};
  a.family = ip.family;
  a.port = port;
  std::copy_n(ip.bytes.begin(), ip.family == VIBIF_AF_INET ? 4 : 16, a.addr);
  return a;
}

IpAddress loopback_of(std::uint16_t family) {
  IpAddress ip;
  ip.family = family;
  if (family == VIBIF_AF_INET) {
    ip.bytes[0] = 127;
    ip.bytes[3] = 1;
  } else {
    ip.bytes[15] = 1;
  }
  return ip;
}

}  // namespace

// ---- ids ------------------------------------------------------------------------

// Everything under the broker's mutex. A connection links two ids (`peer`);
// a request not yet answered also points at its listener, whose backlog it
// counts against.
struct CmEndpoint::Id {
  using Clock = std::chrono::steady_clock;
  enum class State {
    idle,            // created
    bound,           // CM_BIND
    addr_resolved,   // CM_RESOLVE_ADDR
    route_resolved,  // CM_RESOLVE_ROUTE
    listening,       // CM_LISTEN
    req_sent,        // active: REQ sent, waiting for REP/REJ
    req_received,    // passive: CONNECT_REQUEST reported, waiting for accept/reject
    rep_sent,        // passive: accepted, waiting for RTU
    rep_received,    // active: CONNECT_RESPONSE reported, waiting for CM_ESTABLISH
    established,
    disconnected,    // after DREQ/DREP, a reject, a timeout: no more traffic
  };
  struct Event {
    std::uint8_t type = 0;
    int status = 0;
    vibif_handle_t new_id = 0;
    vibif_cm_conn_param param{};
    std::vector<std::uint8_t> data;
  };

  CmEndpoint* ep = nullptr;
  vibif_handle_t handle = 0;
  std::uint16_t port_space = 0;
  std::uint8_t qp_type = 0;
  State state = State::idle;
  IpAddress src_ip, dst_ip;
  std::uint16_t src_port = 0, dst_port = 0;
  bool bound = false;
  std::optional<DeviceId> peer_device;  // resolved: who answers at dst
  Id* peer = nullptr;
  Id* listener = nullptr;
  std::uint32_t backlog = 0, pending = 0;  // listening
  // This end of the connection and the peer's, as the IB CM carries them.
  std::uint32_t qp_num = 0, psn = 0, qkey = 0;
  std::uint8_t responder_resources = 0, initiator_depth = 0, retry_count = 7, rnr_retry_count = 7;
  std::uint32_t peer_qp_num = 0, peer_psn = 0, peer_qkey = 0;
  std::uint8_t peer_rnr_retry_count = 7;
  std::uint8_t flow_control = 0, srq = 0;
  std::vector<std::uint8_t> request_data;  // the REQ's private data
  bool awaiting_listener = false;          // REQ sent, no listener yet (see connect)
  std::optional<Clock::time_point> deadline;
  std::deque<Event> events;
  // Through the host's rdma_cm (a peer outside vib): the connection's host
  // id, or, listening, one host id per address. Their events carry
  // host_token (0: none registered).
  std::unique_ptr<platform::HostCmId> host;
  std::vector<std::unique_ptr<platform::HostCmId>> host_listeners;
  std::uint64_t host_token = 0;
  std::optional<vibif_ah_attr> host_ah;  // UD: towards the peer, from the SIDR reply
};

CmEndpoint::CmEndpoint(CmBroker& broker, DeviceId device, std::string subject, std::function<void()> wake)
    : broker_(broker),
      device_(device),
      subject_(std::move(subject)),
      log_(subject_),
      wake_(std::move(wake)),
      ids_(VIBIF_CM_MAX_IDS) {}

CmEndpoint::~CmEndpoint() = default;

bool CmEndpoint::handles(std::uint16_t op) const {
  return op >= VIBIF_OP_CM_CREATE_ID && op <= VIBIF_OP_CM_GET_EVENT;
}

vibif_response CmEndpoint::execute(const vibif_request& req) { return broker_.execute(*this, req); }

std::vector<vibif_handle_t> CmEndpoint::take_announcements() {
  if (!announce_pending_.load(std::memory_order_acquire)) return {};
  std::lock_guard lock(broker_.mu_);
  announce_pending_.store(false, std::memory_order_relaxed);
  return std::exchange(announcements_, {});
}

// ---- the broker -------------------------------------------------------------------

CmBroker::CmBroker(std::chrono::milliseconds timeout, HostCmOpener open_host_cm)
    : timeout_(timeout), open_host_cm_(std::move(open_host_cm)) {
  std::random_device seed;
  next_psn_ = seed() & 0xffffff;
  next_port_ = static_cast<std::uint16_t>(32768 + seed() % 28000);
  timer_ = std::thread([this] {
    platform::name_this_thread("vib-cm-timer");
    run_timer();
  });
}

CmBroker::~CmBroker() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  timer_cv_.notify_all();
  timer_.join();
  if (host_events_.joinable()) {
    const std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(host_stop_.get(), &one, sizeof one);
    host_events_.join();
  }
}

void CmBroker::add_device(DeviceId device, std::vector<IpAddress> addresses, CmPort port,
                          std::optional<CmHostView> host) {
  std::lock_guard lock(mu_);
  for (const auto& [other, entry] : devices_)
    for (const auto& ip : addresses)
      if (other.domid != device.domid &&
          std::find(entry.addresses.begin(), entry.addresses.end(), ip) != entry.addresses.end())
        log_line(LogLevel::warning, device_subject(device.domid, device.devid),
                 "address " + ip.str() + " is also domain " + std::to_string(other.domid) +
                     "'s: connections to it reach the first device found");
  devices_[device] = DeviceEntry{std::move(addresses), port, std::move(host)};
}

void CmBroker::remove_device(DeviceId device) {
  std::lock_guard lock(mu_);
  devices_.erase(device);
}

std::shared_ptr<CmEndpoint> CmBroker::open(DeviceId device, std::string subject, std::function<void()> wake) {
  auto ep = std::shared_ptr<CmEndpoint>(new CmEndpoint(*this, device, std::move(subject), std::move(wake)));
  std::lock_guard lock(mu_);
  endpoints_.insert(ep.get());
  return ep;
}

void CmBroker::close(CmEndpoint& ep) {
  std::lock_guard lock(mu_);
  if (ep.closed_) return;
  std::vector<Id*> ids;
  ep.ids_.for_each([&](vibif_handle_t, Id& id) { ids.push_back(&id); });
  for (Id* id : ids) abandon(*id, "its context closed");
  ep.ids_.clear();
  ep.closed_ = true;
  endpoints_.erase(&ep);
}

const CmPort* CmBroker::port_of(DeviceId device) const {
  auto it = devices_.find(device);
  return it == devices_.end() ? nullptr : &it->second.port;
}

bool CmBroker::may_bind(const CmEndpoint& ep, const IpAddress& ip) const {
  if (ip.family != VIBIF_AF_INET && ip.family != VIBIF_AF_INET6) return false;
  if (ip.wildcard() || ip.loopback()) return true;
  auto it = devices_.find(ep.device_);
  return it != devices_.end() &&
         std::find(it->second.addresses.begin(), it->second.addresses.end(), ip) != it->second.addresses.end();
}

bool CmBroker::port_in_use(DeviceId device, std::uint16_t port_space, const IpAddress& ip, std::uint16_t port) const {
  bool used = false;
  for (CmEndpoint* ep : endpoints_) {
    if (ep->device_ != device) continue;
    ep->ids_.for_each([&](vibif_handle_t, const Id& id) {
      if (id.bound && id.port_space == port_space && id.src_port == port &&
          (id.src_ip == ip || id.src_ip.wildcard() || ip.wildcard()))
        used = true;
    });
  }
  return used;
}

std::uint16_t CmBroker::free_port(DeviceId device, std::uint16_t port_space, const IpAddress& ip) {
  for (int tries = 0; tries < 28000; ++tries) {
    const std::uint16_t port = next_port_;
    next_port_ = static_cast<std::uint16_t>(next_port_ >= 60999 ? 32768 : next_port_ + 1);
    if (!port_in_use(device, port_space, ip, port)) return port;
  }
  return 0;
}

std::vector<DeviceId> CmBroker::devices_at(const IpAddress& ip, platform::DomId from) const {
  std::vector<DeviceId> out;
  for (const auto& [device, entry] : devices_) {
    const bool here = ip.loopback()
                          ? device.domid == from
                          : std::find(entry.addresses.begin(), entry.addresses.end(), ip) != entry.addresses.end();
    if (here) out.push_back(device);
  }
  return out;
}

void CmBroker::queue_event(Id& id, std::uint8_t event, int status, const vibif_cm_conn_param* param,
                           const std::uint8_t* data, std::size_t length, vibif_handle_t new_id) {
  CmEndpoint& ep = *id.ep;
  if (ep.closed_) return;
  if (id.events.size() >= VIBIF_CM_MAX_EVENTS) {
    ep.log_.log(LogLevel::warning, "CM id " + std::to_string(id.handle) + ": event queue full, event dropped");
    return;
  }
  Id::Event e;
  e.type = event;
  e.status = status;
  e.new_id = new_id;
  if (param) e.param = *param;
  e.data.assign(data, data + length);
  e.param.private_data_len = static_cast<std::uint8_t>(length);
  id.events.push_back(std::move(e));
  ep.announcements_.push_back(id.handle);
  ep.announce_pending_.store(true, std::memory_order_release);
  ep.wake_();
}

vibif_response CmBroker::execute(CmEndpoint& ep, const vibif_request& req) {
  vibif_response rsp;
  std::memset(&rsp, 0, sizeof(rsp));
  rsp.hdr.id = req.hdr.id;
  rsp.hdr.op = req.hdr.op;
  std::lock_guard lock(mu_);
  if (req.hdr.op == VIBIF_OP_CM_CREATE_ID) {
    rsp.hdr.status = create_id(ep, req.u.cm_create_id, rsp);
    return rsp;
  }
  // Every other op names an id first (cm_id, cm_bind, ... all start with it).
  vibif_handle_t handle;
  std::memcpy(&handle, &req.u, sizeof(handle));
  Id* id = ep.ids_.find(handle);
  if (!id) {
    rsp.hdr.status = VIBIF_ENOENT;
    return rsp;
  }
  int& status = rsp.hdr.status;
  switch (req.hdr.op) {
    case VIBIF_OP_CM_DESTROY_ID: destroy(*id); break;
    case VIBIF_OP_CM_BIND: status = bind(*id, req.u.cm_bind.addr, rsp); break;
    case VIBIF_OP_CM_RESOLVE_ADDR: status = resolve_addr(*id, req.u.cm_resolve_addr, rsp); break;
    case VIBIF_OP_CM_RESOLVE_ROUTE: status = resolve_route(*id); break;
    case VIBIF_OP_CM_LISTEN: status = listen(*id, req.u.cm_id.arg); break;
    case VIBIF_OP_CM_CONNECT: status = connect(*id, req.u.cm_connect); break;
    case VIBIF_OP_CM_ACCEPT: status = accept(*id, req.u.cm_connect); break;
    case VIBIF_OP_CM_REJECT: status = reject(*id, req.u.cm_reject); break;
    case VIBIF_OP_CM_ESTABLISH: status = establish(*id); break;
    case VIBIF_OP_CM_DISCONNECT: status = disconnect(*id); break;
    case VIBIF_OP_CM_INIT_QP_ATTR: status = init_qp_attr(*id, req.u.cm_id.arg, rsp); break;
    case VIBIF_OP_CM_QUERY_ROUTE: status = query_route(*id, rsp); break;
    case VIBIF_OP_CM_GET_EVENT: status = get_event(*id, rsp); break;
    default: status = VIBIF_ENOSYS; break;
  }
  timer_cv_.notify_all();  // a deadline may have been set
  return rsp;
}

int CmBroker::create_id(CmEndpoint& ep, const vibif_cm_create_id_req& r, vibif_response& rsp) {
  const bool rc = r.port_space == VIBIF_CM_PS_TCP && r.qp_type == VIBIF_QPT_RC;
  const bool ud = r.port_space == VIBIF_CM_PS_UDP && r.qp_type == VIBIF_QPT_UD;
  if (!rc && !ud) return VIBIF_EINVAL;
  auto id = std::make_unique<Id>();
  Id* raw = id.get();
  raw->ep = &ep;
  raw->port_space = r.port_space;
  raw->qp_type = r.qp_type;
  const vibif_handle_t h = ep.ids_.insert(std::move(id));
  if (h == VIBIF_HANDLE_NONE) return VIBIF_EDQUOT;
  raw->handle = h;
  rsp.u.handle.handle = h;
  return VIBIF_OK;
}

int CmBroker::bind(Id& id, const vibif_cm_addr& addr, vibif_response& rsp) {
  if (id.state != Id::State::idle) return VIBIF_EINVAL;
  // Not an address at all: a malformed request, not someone else's address.
  if (addr.family != VIBIF_AF_INET && addr.family != VIBIF_AF_INET6) return VIBIF_EINVAL;
  const IpAddress ip = IpAddress::from_wire(addr);
  if (!may_bind(*id.ep, ip)) {
    id.ep->log_.log(LogLevel::warning, "CM bind to " + ip.str() + " refused: not this guest's address");
    return VIBIF_EADDRNOTAVAIL;
  }
  std::uint16_t port = addr.port;
  if (port == 0) {
    port = free_port(id.ep->device_, id.port_space, ip);
    if (port == 0) return VIBIF_EADDRINUSE;
  } else if (port_in_use(id.ep->device_, id.port_space, ip, port)) {
    return VIBIF_EADDRINUSE;
  }
  id.src_ip = ip;
  id.src_port = port;
  id.bound = true;
  id.state = Id::State::bound;
  rsp.u.cm_addr.addr = to_wire(ip, port);
  return VIBIF_OK;
}

int CmBroker::resolve_addr(Id& id, const vibif_cm_resolve_addr_req& r, vibif_response& rsp) {
  if (id.state != Id::State::idle && id.state != Id::State::bound) return VIBIF_EINVAL;
  const IpAddress dst = IpAddress::from_wire(r.dst);
  if ((dst.family != VIBIF_AF_INET && dst.family != VIBIF_AF_INET6) || dst.wildcard()) return VIBIF_EINVAL;
  if (!id.bound) {
    IpAddress src = IpAddress::from_wire(r.src);
    if (r.src.family == 0 || src.wildcard()) {
      // The route's source: loopback for loopback, else the guest's first
      // address of the destination's family.
      src = dst.loopback() ? loopback_of(dst.family) : IpAddress{};
      if (!dst.loopback()) {
        auto it = devices_.find(id.ep->device_);
        if (it != devices_.end())
          for (const auto& mine : it->second.addresses)
            if (mine.family == dst.family) {
              src = mine;
              break;
            }
      }
      if (src.family == 0) {
        queue_event(id, kAddrError, -EADDRNOTAVAIL);
        return VIBIF_OK;  // no address to speak from: an ADDR_ERROR, as with no route
      }
    }
    vibif_response bound;
    if (int err = bind(id, to_wire(src, r.src.port), bound)) return err;
  }
  if (id.src_ip.family != dst.family) return VIBIF_EINVAL;
  id.dst_ip = dst;
  id.dst_port = r.dst.port;
  rsp.u.cm_addr.addr = to_wire(id.src_ip, id.src_port);
  const auto devices = devices_at(dst, id.ep->device_.domid);
  if (devices.empty()) {
    if (!dst.loopback() && host_view(*id.ep)) return host_resolve_addr(id);
    queue_event(id, kAddrError, -EHOSTUNREACH);
    return VIBIF_OK;
  }
  // Several devices of one guest may answer at an address: prefer our own.
  id.peer_device = devices.front();
  for (const auto& d : devices)
    if (d == id.ep->device_) id.peer_device = d;
  id.state = Id::State::addr_resolved;
  queue_event(id, kAddrResolved, 0);
  return VIBIF_OK;
}

int CmBroker::resolve_route(Id& id) {
  if (id.state != Id::State::addr_resolved) return VIBIF_EINVAL;
  if (id.host) {
    if (int err = id.host->resolve_route(kHostResolveTimeoutMs)) queue_event(id, kRouteError, -err);
    return VIBIF_OK;  // ROUTE_RESOLVED or ROUTE_ERROR follows from the host
  }
  id.state = Id::State::route_resolved;
  queue_event(id, kRouteResolved, 0);
  return VIBIF_OK;
}

int CmBroker::listen(Id& id, std::uint32_t backlog) {
  if (id.host) return VIBIF_EINVAL;  // resolving towards a peer outside vib
  if (id.state == Id::State::idle) {
    // Like rdma_listen on an unbound id: every address, a free port.
    IpAddress any;
    any.family = VIBIF_AF_INET;
    vibif_response bound;
    if (int err = bind(id, to_wire(any, 0), bound)) return err;
  }
  if (id.state != Id::State::bound) return VIBIF_EINVAL;
  id.backlog = backlog == 0 || backlog > kDefaultBacklog ? kDefaultBacklog : backlog;
  id.state = Id::State::listening;
  id.ep->log_.log(LogLevel::info, std::string("RDMA-CM listening at ") + id.src_ip.str() + " port " +
                                      std::to_string(id.src_port) +
                                      (id.port_space == VIBIF_CM_PS_UDP ? " (UDP)" : " (TCP)"));
  // Requests that arrived just before this listener now find it.
  std::vector<Id*> waiting;
  for (CmEndpoint* ep : endpoints_)
    ep->ids_.for_each([&](vibif_handle_t, Id& other) {
      if (other.awaiting_listener && find_listener(other) == &id) waiting.push_back(&other);
    });
  for (Id* other : waiting) deliver_request(*other, id);
  host_listen(id);
  return VIBIF_OK;
}

CmBroker::Id* CmBroker::find_listener(const Id& active) {
  if (!active.peer_device) return nullptr;
  Id* found = nullptr;
  for (CmEndpoint* ep : endpoints_) {
    if (ep->device_ != *active.peer_device) continue;
    ep->ids_.for_each([&](vibif_handle_t, Id& id) {
      if (found || id.state != Id::State::listening || id.port_space != active.port_space ||
          id.src_port != active.dst_port)
        return;
      // A listener bound to one address answers there; a wildcard one at
      // every address of its guest, loopback included.
      if (id.src_ip == active.dst_ip || (id.src_ip.wildcard() && (id.src_ip.family == active.dst_ip.family ||
                                                                  id.src_ip.family == VIBIF_AF_INET6)))
        found = &id;
    });
  }
  return found;
}

int CmBroker::connect(Id& id, const vibif_cm_connect_req& r) {
  if (id.state != Id::State::route_resolved) return VIBIF_EINVAL;
  const bool ud = id.qp_type == VIBIF_QPT_UD;
  const std::size_t length = r.param.private_data_len;
  if (length > (ud ? kMaxSidrReqData : kMaxReqData)) return VIBIF_EINVAL;
  id.qp_num = r.param.qp_num & 0xffffff;
  id.psn = next_psn_++ & 0xffffff;
  id.responder_resources = r.param.responder_resources;
  id.initiator_depth = r.param.initiator_depth;
  id.retry_count = std::min<std::uint8_t>(r.param.retry_count, 7);
  id.rnr_retry_count = std::min<std::uint8_t>(r.param.rnr_retry_count, 7);
  id.flow_control = r.param.flow_control;
  id.srq = r.param.srq;
  id.request_data.assign(r.private_data, r.private_data + length);
  if (id.host) return host_connect(id, r);
  id.state = Id::State::req_sent;
  if (Id* listener = find_listener(id)) {
    deliver_request(id, *listener);
    return VIBIF_OK;
  }
  // Nobody listens there yet. A program that re-creates its listener
  // between two connections (perftest does) would lose the race to a client
  // as soon as its guest runs a little slower than native; the request waits
  // briefly for a listener, as a REQ's retries would, then gets the IB CM's
  // answer: REJ "invalid service ID" (UD: a SIDR reply saying the same).
  id.awaiting_listener = true;
  id.deadline = Clock::now() + std::min(timeout_, kListenerGrace);
  return VIBIF_OK;
}

std::unique_ptr<CmBroker::Id> CmBroker::request_id(Id& listener) {
  auto child = std::make_unique<Id>();
  child->ep = listener.ep;
  child->port_space = listener.port_space;
  child->qp_type = listener.qp_type;
  child->state = Id::State::req_received;
  child->listener = &listener;
  return child;
}

void CmBroker::deliver_request(Id& id, Id& listener) {
  const bool ud = id.qp_type == VIBIF_QPT_UD;
  id.awaiting_listener = false;
  if (listener.pending >= listener.backlog) {
    id.state = Id::State::disconnected;
    id.deadline.reset();
    queue_event(id, ud ? kUnreachable : kRejected, ud ? kSidrReject : kRejectConsumer);
    return;
  }
  CmEndpoint& passive = *listener.ep;
  auto child = request_id(listener);
  Id* c = child.get();
  c->src_ip = id.dst_ip;
  c->src_port = id.dst_port;
  c->dst_ip = id.src_ip;
  c->dst_port = id.src_port;
  c->peer_device = id.ep->device_;
  c->peer = &id;
  c->psn = next_psn_++ & 0xffffff;
  // The passive side's resources answer the active side's: rdma_cm swaps them.
  c->responder_resources = id.initiator_depth;
  c->initiator_depth = id.responder_resources;
  c->retry_count = id.retry_count;
  c->peer_qp_num = id.qp_num;
  c->peer_psn = id.psn;
  c->peer_rnr_retry_count = id.rnr_retry_count;
  const vibif_handle_t child_handle = passive.ids_.insert(std::move(child));
  if (child_handle == VIBIF_HANDLE_NONE) {
    id.state = Id::State::disconnected;
    id.deadline.reset();
    queue_event(id, ud ? kUnreachable : kRejected, ud ? kSidrReject : kRejectConsumer);
    return;
  }
  c->handle = child_handle;
  ++listener.pending;
  id.peer = c;
  id.deadline = Clock::now() + timeout_;
  vibif_cm_conn_param p{};
  p.responder_resources = c->responder_resources;
  p.initiator_depth = c->initiator_depth;
  p.flow_control = id.flow_control;
  p.retry_count = id.retry_count;
  p.rnr_retry_count = id.rnr_retry_count;
  p.srq = id.srq;
  p.qp_num = ud ? 0 : id.qp_num;
  queue_event(listener, kConnectRequest, 0, &p, id.request_data.data(), id.request_data.size(), child_handle);
  id.ep->log_.log(LogLevel::debug, "CM: " + id.src_ip.str() + ":" + std::to_string(id.src_port) + " -> " +
                                       id.dst_ip.str() + ":" + std::to_string(id.dst_port) + " request to " +
                                       passive.subject_);
}

int CmBroker::accept(Id& id, const vibif_cm_connect_req& r) {
  if (id.state == Id::State::req_received && id.host) return host_accept(id, r);
  if (id.state != Id::State::req_received || !id.peer) return VIBIF_EINVAL;
  const bool ud = id.qp_type == VIBIF_QPT_UD;
  const std::size_t length = r.param.private_data_len;
  if (length > (ud ? kMaxSidrRepData : kMaxRepData)) return VIBIF_EINVAL;
  Id& active = *id.peer;
  id.qp_num = r.param.qp_num & 0xffffff;
  if (id.listener) {
    --id.listener->pending;
    id.listener = nullptr;
  }
  if (ud) {
    id.qkey = r.param.qkey ? r.param.qkey : kUdpQkey;
    vibif_cm_conn_param p{};
    p.qp_num = id.qp_num;
    p.qkey = id.qkey;
    active.peer_qp_num = id.qp_num;
    active.peer_qkey = id.qkey;
    active.state = Id::State::established;
    active.deadline.reset();
    active.peer = nullptr;
    id.peer = nullptr;
    id.state = Id::State::established;
    queue_event(active, kEstablished, 0, &p, r.private_data, length);
    return VIBIF_OK;
  }
  // The application may lower what it answers with; never raise it.
  if (r.param.responder_resources != 0xff) id.responder_resources = std::min(id.responder_resources, r.param.responder_resources);
  if (r.param.initiator_depth != 0xff) id.initiator_depth = std::min(id.initiator_depth, r.param.initiator_depth);
  id.rnr_retry_count = std::min<std::uint8_t>(r.param.rnr_retry_count, 7);
  active.peer_qp_num = id.qp_num;
  active.peer_psn = id.psn;
  active.peer_rnr_retry_count = id.rnr_retry_count;
  active.state = Id::State::rep_received;
  active.deadline.reset();
  id.state = Id::State::rep_sent;
  id.deadline = Clock::now() + timeout_;
  vibif_cm_conn_param p{};
  p.responder_resources = id.initiator_depth;
  p.initiator_depth = id.responder_resources;
  p.flow_control = r.param.flow_control;
  p.rnr_retry_count = id.rnr_retry_count;
  p.srq = r.param.srq;
  p.qp_num = id.qp_num;
  queue_event(active, kConnectResponse, 0, &p, r.private_data, length);
  return VIBIF_OK;
}

int CmBroker::reject(Id& id, const vibif_cm_reject_req& r) {
  if (id.state != Id::State::req_received) return VIBIF_EINVAL;
  const bool ud = id.qp_type == VIBIF_QPT_UD;
  const std::size_t length = r.private_data_len;
  if (length > (ud ? kMaxSidrRepData : kMaxRejData)) return VIBIF_EINVAL;
  if (id.listener) {
    --id.listener->pending;
    id.listener = nullptr;
  }
  if (id.host) {
    if (int err = id.host->reject({r.private_data, length})) return host_status(err);
  } else if (Id* active = id.peer) {
    active->peer = nullptr;
    active->state = Id::State::disconnected;
    active->deadline.reset();
    queue_event(*active, ud ? kUnreachable : kRejected, ud ? kSidrReject : kRejectConsumer, nullptr, r.private_data,
                length);
  }
  id.peer = nullptr;
  id.state = Id::State::disconnected;
  return VIBIF_OK;
}

int CmBroker::establish(Id& id) {
  if (id.state == Id::State::rep_received && id.host) {
    if (int err = id.host->establish()) return host_status(err);
    id.state = Id::State::established;
    return VIBIF_OK;
  }
  if (id.state != Id::State::rep_received || !id.peer) return VIBIF_EINVAL;
  Id& passive = *id.peer;
  id.state = Id::State::established;
  passive.state = Id::State::established;
  passive.deadline.reset();
  queue_event(passive, kEstablished, 0);
  return VIBIF_OK;
}

int CmBroker::disconnect(Id& id) {
  if (id.host && id.qp_type != VIBIF_QPT_UD &&
      (id.state == Id::State::established || id.state == Id::State::disconnected)) {
    // A DREQ, or the DREP to the peer's; the host's DISCONNECTED follows
    // (after the peer's DISCONNECTED came first, there is none to follow).
    const int err = id.host->disconnect();
    return err && id.state == Id::State::established ? host_status(err) : VIBIF_OK;
  }
  if (id.state == Id::State::disconnected) return VIBIF_OK;  // the peer's DREQ came first: this is the DREP
  if (id.state != Id::State::established || id.qp_type == VIBIF_QPT_UD) return VIBIF_EINVAL;
  if (Id* peer = id.peer) {
    peer->peer = nullptr;
    peer->state = Id::State::disconnected;
    queue_event(*peer, kDisconnected, 0);
  }
  id.peer = nullptr;
  id.state = Id::State::disconnected;
  queue_event(id, kDisconnected, 0);
  return VIBIF_OK;
}

void CmBroker::abandon(Id& id, const char* why) {
  release_host(id);  // the host's rdma_cm tells a peer outside vib (REJ, DREQ)
  if (id.listener) {
    --id.listener->pending;
    id.listener = nullptr;
  }
  if (id.state == Id::State::listening) {
    // Requests it reported but nobody answered yet stay with their ids.
    for (CmEndpoint* ep : endpoints_)
      ep->ids_.for_each([&](vibif_handle_t, Id& other) {
        if (other.listener == &id) other.listener = nullptr;
      });
  }
  Id* peer = std::exchange(id.peer, nullptr);
  if (!peer) return;
  peer->peer = nullptr;
  peer->deadline.reset();
  const bool connected = id.state == Id::State::established;
  peer->state = Id::State::disconnected;
  if (connected)
    queue_event(*peer, kDisconnected, 0);
  else
    queue_event(*peer, peer->qp_type == VIBIF_QPT_UD ? kUnreachable : kRejected,
                peer->qp_type == VIBIF_QPT_UD ? kSidrReject : kRejectConsumer);
  id.ep->log_.log(LogLevel::debug, "CM id " + std::to_string(id.handle) + " went (" + why + "): its peer " +
                                       peer->ep->subject_ + " told");
}

void CmBroker::destroy(Id& id) {
  abandon(id, "destroyed");
  CmEndpoint& ep = *id.ep;
  const vibif_handle_t h = id.handle;
  if (auto* owner = ep.ids_.owner(h)) {
    owner->reset();
    ep.ids_.release(h);
  }
}

void CmBroker::expire(Id& id) {
  id.deadline.reset();
  if (id.awaiting_listener) {
    id.awaiting_listener = false;
    id.state = Id::State::disconnected;
    const bool ud = id.qp_type == VIBIF_QPT_UD;
    queue_event(id, ud ? kUnreachable : kRejected, ud ? kSidrReject : kRejectInvalidServiceId);
    return;
  }
  if (id.state != Id::State::req_sent && id.state != Id::State::rep_sent) return;
  id.ep->log_.log(LogLevel::info, "CM id " + std::to_string(id.handle) + ": peer did not answer in time");
  abandon(id, "timed out");
  id.state = Id::State::disconnected;
  queue_event(id, kUnreachable, -ETIMEDOUT);
}

void CmBroker::run_timer() {
  std::unique_lock lock(mu_);
  while (!stopping_) {
    std::optional<Clock::time_point> next;
    std::vector<Id*> due;
    const auto now = Clock::now();
    for (CmEndpoint* ep : endpoints_)
      ep->ids_.for_each([&](vibif_handle_t, Id& id) {
        if (!id.deadline) return;
        if (*id.deadline <= now)
          due.push_back(&id);
        else if (!next || *id.deadline < *next)
          next = id.deadline;
      });
    for (Id* id : due) expire(*id);
    if (!due.empty()) continue;
    if (next)
      timer_cv_.wait_until(lock, *next);
    else
      timer_cv_.wait(lock);
  }
}

int CmBroker::init_qp_attr(Id& id, std::uint32_t state, vibif_response& rsp) {
  if (id.host) return host_init_qp_attr(id, state, rsp);
  auto& out = rsp.u.cm_qp_attr;
  auto& a = out.attr;
  const bool ud = id.qp_type == VIBIF_QPT_UD;
  a.qp_state = state;
  switch (state) {
    case IBV_QPS_INIT:
      a.pkey_index = 0;
      a.port_num = 1;
      out.attr_mask = IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT;
      if (ud) {
        a.qkey = id.qkey ? id.qkey : kUdpQkey;
        out.attr_mask |= IBV_QP_QKEY;
      } else {
        // Before a connection is known nothing remote is allowed; then what
        // the responder resources allow (as the IB CM sets it).
        const bool connected = id.peer_qp_num != 0 || id.state == Id::State::req_received;
        a.qp_access_flags = connected ? VIBIF_ACCESS_REMOTE_WRITE : 0;
        if (connected && id.responder_resources)
          a.qp_access_flags |= VIBIF_ACCESS_REMOTE_READ | VIBIF_ACCESS_REMOTE_ATOMIC;
        out.attr_mask |= IBV_QP_ACCESS_FLAGS;
      }
      return VIBIF_OK;
    case IBV_QPS_RTR: {
      if (ud) {
        out.attr_mask = IBV_QP_STATE;
        return VIBIF_OK;
      }
      if (id.peer_qp_num == 0 || !id.peer_device) return VIBIF_EINVAL;
      vibif_response route;
      std::memset(&route, 0, sizeof(route));
      if (int err = query_route(id, route)) return err;
      a.ah_attr = route.u.cm_route.ah_attr;
      a.path_mtu = route.u.cm_route.path_mtu;
      a.dest_qp_num = id.peer_qp_num;
      a.rq_psn = id.peer_psn;
      a.max_dest_rd_atomic = id.responder_resources;
      a.min_rnr_timer = kMinRnrTimer;
      out.attr_mask = IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                      IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER;
      return VIBIF_OK;
    }
    case IBV_QPS_RTS:
      a.sq_psn = ud ? 0 : id.psn;
      out.attr_mask = IBV_QP_STATE | IBV_QP_SQ_PSN;
      if (!ud) {
        if (id.peer_qp_num == 0) return VIBIF_EINVAL;
        a.timeout = kAckTimeout;
        a.retry_cnt = id.retry_count;
        a.rnr_retry = id.peer_rnr_retry_count;
        a.max_rd_atomic = id.initiator_depth;
        out.attr_mask |= IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_MAX_QP_RD_ATOMIC;
      }
      return VIBIF_OK;
    default:
      return VIBIF_EINVAL;
  }
}

int CmBroker::query_route(Id& id, vibif_response& rsp) {
  if (id.host) return host_query_route(id, rsp);
  auto& r = rsp.u.cm_route;
  r.src = to_wire(id.src_ip, id.src_port);
  r.dst = to_wire(id.dst_ip, id.dst_port);
  const auto sgid = id.src_ip.gid(), dgid = id.dst_ip.gid();
  std::copy(sgid.begin(), sgid.end(), r.sgid);
  std::copy(dgid.begin(), dgid.end(), r.dgid);
  const CmPort* mine = port_of(id.ep->device_);
  const CmPort* theirs = id.peer_device ? port_of(*id.peer_device) : nullptr;
  if (mine) {
    r.pkey = mine->pkey;
    r.link_layer = mine->link_layer;
    r.path_mtu = mine->active_mtu;
  }
  if (theirs) {
    if (is_pow2_mtu(theirs->active_mtu) && theirs->active_mtu < r.path_mtu) r.path_mtu = theirs->active_mtu;
    auto& ah = r.ah_attr;
    ah.dlid = theirs->lid;
    ah.port_num = 1;
    if (theirs->link_layer == IBV_LINK_LAYER_ETHERNET) {
      ah.is_global = 1;
      std::copy(theirs->gid.begin(), theirs->gid.end(), ah.dgid);
      ah.sgid_index = 0;
      ah.hop_limit = 64;
    }
  }
  return VIBIF_OK;
}

// ---- peers outside vib: the host's rdma_cm --------------------------------------------

const CmHostView* CmBroker::host_view(const CmEndpoint& ep) const {
  auto it = devices_.find(ep.device_);
  return it == devices_.end() || !it->second.host ? nullptr : &*it->second.host;
}

platform::HostConnectionManager* CmBroker::host_cm(CmEndpoint& ep) {
  if (host_cm_ || host_cm_unavailable_) return host_cm_.get();
  std::string why = "none";
  try {
    if (open_host_cm_) host_cm_ = open_host_cm_();
  } catch (const std::system_error& e) {
    why = e.what();
  }
  platform::UniqueFd stop(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!host_cm_ || !stop) {
    host_cm_.reset();
    host_cm_unavailable_ = true;
    ep.log_.log(LogLevel::warning, "this host's rdma_cm is unavailable (" + why +
                                       "): peers outside vib cannot be reached or reach its guests");
    return nullptr;
  }
  host_stop_ = std::move(stop);
  host_events_ = std::thread([this] {
    platform::name_this_thread("vib-cm-host");
    run_host_events();
  });
  return host_cm_.get();
}

bool CmBroker::host_ids_left(const CmEndpoint& ep) {
  auto it = devices_.find(ep.device_);
  return it != devices_.end() && it->second.host_ids < kMaxHostIdsPerDevice;
}

void CmBroker::count_host_ids(const CmEndpoint& ep, std::ptrdiff_t change) {
  if (auto it = devices_.find(ep.device_); it != devices_.end())
    it->second.host_ids = static_cast<std::size_t>(static_cast<std::ptrdiff_t>(it->second.host_ids) + change);
}

std::unique_ptr<platform::HostCmId> CmBroker::new_host_id(Id& id) {
  if (!host_ids_left(*id.ep)) {
    id.ep->log_.log(LogLevel::warning, "CM: the device holds " + std::to_string(kMaxHostIdsPerDevice) +
                                           " host rdma_cm ids, its most: no more peers outside vib");
    return nullptr;
  }
  auto* cm = host_cm(*id.ep);
  if (!cm) return nullptr;
  if (id.host_token == 0) {
    id.host_token = next_token_++;
    host_ids_[id.host_token] = &id;
  }
  try {
    return cm->create_id(id.host_token, id.port_space == VIBIF_CM_PS_UDP ? RDMA_PS_UDP : RDMA_PS_TCP);
  } catch (const std::system_error& e) {
    id.ep->log_.log(LogLevel::warning, std::string("CM: the host's rdma_cm refused an id: ") + e.what());
    return nullptr;
  }
}

void CmBroker::release_host(Id& id) {
  count_host_ids(*id.ep, -static_cast<std::ptrdiff_t>((id.host ? 1 : 0) + id.host_listeners.size()));
  if (id.host_token) host_ids_.erase(id.host_token);
  id.host_token = 0;
  id.host.reset();
  id.host_listeners.clear();
}

int CmBroker::host_resolve_addr(Id& id) {
  if (id.host) return VIBIF_EINVAL;  // the host is resolving it already
  // The host id speaks from one of the guest's own addresses, never from
  // one of dom0's (loopback included).
  IpAddress src = id.src_ip;
  if (src.wildcard()) {
    src = IpAddress{};
    if (auto it = devices_.find(id.ep->device_); it != devices_.end())
      for (const auto& mine : it->second.addresses)
        if (mine.family == id.dst_ip.family) {
          src = mine;
          break;
        }
  }
  if (src.family == 0 || src.loopback()) {
    queue_event(id, kAddrError, -EADDRNOTAVAIL);
    return VIBIF_OK;
  }
  auto host = new_host_id(id);
  if (!host) {
    queue_event(id, kAddrError, -ENETUNREACH);
    return VIBIF_OK;
  }
  const auto from = to_sockaddr(src, 0);  // the host picks the port: it shares the host's
  const auto to = to_sockaddr(id.dst_ip, id.dst_port);
  if (int err = host->resolve_addr(reinterpret_cast<const sockaddr&>(from), reinterpret_cast<const sockaddr&>(to),
                                   kHostResolveTimeoutMs)) {
    id.ep->log_.log(LogLevel::info, "CM: the host cannot resolve " + id.dst_ip.str() + " from " + src.str() + ": " +
                                        std::strerror(err) + " (the address must be on the HCA's network device)");
    host.reset();
    release_host(id);
    queue_event(id, kAddrError, -err);
    return VIBIF_OK;
  }
  id.host = std::move(host);
  count_host_ids(*id.ep, 1);
  return VIBIF_OK;  // ADDR_RESOLVED or ADDR_ERROR follows from the host
}

void CmBroker::host_listen(Id& id) {
  const CmHostView* view = host_view(*id.ep);
  if (!view || id.src_ip.loopback()) return;
  std::vector<IpAddress> addresses;
  if (!id.src_ip.wildcard()) {
    addresses.push_back(id.src_ip);
  } else if (auto it = devices_.find(id.ep->device_); it != devices_.end()) {
    for (const auto& mine : it->second.addresses)
      if (id.src_ip.family == VIBIF_AF_INET6 || mine.family == id.src_ip.family) addresses.push_back(mine);
  }
  std::string where;
  for (const auto& ip : addresses) {
    auto host = new_host_id(id);
    if (!host) return;
    const auto at = to_sockaddr(ip, id.src_port);
    int err = host->bind(reinterpret_cast<const sockaddr&>(at));
    if (!err) err = host->listen(static_cast<int>(id.backlog));
    if (err) {
      id.ep->log_.log(LogLevel::info, "CM: peers outside vib cannot reach " + ip.str() + " port " +
                                          std::to_string(id.src_port) + ": " + std::strerror(err));
      continue;
    }
    where += " " + ip.str();
    id.host_listeners.push_back(std::move(host));
    count_host_ids(*id.ep, 1);
  }
  if (!where.empty())
    id.ep->log_.log(LogLevel::info, "RDMA-CM listening for peers outside vib on " + view->hca + " at" + where +
                                        " port " + std::to_string(id.src_port));
}

int CmBroker::host_connect(Id& id, const vibif_cm_connect_req& r) {
  platform::HostCmParam p;
  p.responder_resources = r.param.responder_resources;
  p.initiator_depth = r.param.initiator_depth;
  p.flow_control = r.param.flow_control;
  p.retry_count = id.retry_count;
  p.rnr_retry_count = id.rnr_retry_count;
  p.srq = r.param.srq;
  p.qp_num = id.qp_num;
  p.private_data = id.request_data;
  if (int err = id.host->connect(p)) return host_status(err);
  id.state = Id::State::req_sent;
  return VIBIF_OK;  // CONNECT_RESPONSE, REJECTED or UNREACHABLE follows from the host
}

int CmBroker::host_accept(Id& id, const vibif_cm_connect_req& r) {
  const std::size_t length = r.param.private_data_len;
  if (length > (id.qp_type == VIBIF_QPT_UD ? kMaxSidrRepData : kMaxRepData)) return VIBIF_EINVAL;
  platform::HostCmParam p;
  p.responder_resources = r.param.responder_resources;
  p.initiator_depth = r.param.initiator_depth;
  p.flow_control = r.param.flow_control;
  p.rnr_retry_count = std::min<std::uint8_t>(r.param.rnr_retry_count, 7);
  p.srq = r.param.srq;
  p.qp_num = r.param.qp_num & 0xffffff;
  p.private_data.assign(r.private_data, r.private_data + length);
  if (int err = id.host->accept(p)) return host_status(err);
  id.qp_num = p.qp_num;
  if (id.listener) {
    --id.listener->pending;
    id.listener = nullptr;
  }
  // UD: the SIDR reply went, nothing follows; RC: ESTABLISHED follows from
  // the host once the RTU arrives.
  id.state = id.qp_type == VIBIF_QPT_UD ? Id::State::established : Id::State::rep_sent;
  return VIBIF_OK;
}

int CmBroker::host_init_qp_attr(Id& id, std::uint32_t state, vibif_response& rsp) {
  const CmHostView* view = host_view(*id.ep);
  if (!view || state > IBV_QPS_RTS) return VIBIF_EINVAL;
  ibv_qp_attr a{};
  a.qp_state = static_cast<ibv_qp_state>(state);
  int mask = 0;
  if (int err = id.host->init_qp_attr(a, mask)) return host_status(err);
  auto& out = rsp.u.cm_qp_attr;
  auto& g = out.attr;
  g.qp_state = a.qp_state;
  if ((mask & IBV_QP_PORT) && a.port_num != view->port) return VIBIF_EPERM;
  g.port_num = 1;  // the guest's port 1 is the device's port
  if (mask & IBV_QP_PKEY_INDEX) {
    std::uint16_t pkey = 0;
    if (int err = id.host->query_pkey(a.pkey_index, pkey)) return host_status(err);
    auto it = std::find_if(view->pkeys.begin(), view->pkeys.end(),
                           [pkey](std::uint16_t mine) { return (mine & 0x7fff) == (pkey & 0x7fff); });
    if (it == view->pkeys.end()) {
      char text[8];
      std::snprintf(text, sizeof text, "0x%04x", pkey);
      id.ep->log_.log(LogLevel::warning, std::string("CM: the connection's P_Key ") + text +
                                             " is not among the device's pkeys");
      return VIBIF_EPERM;
    }
    g.pkey_index = static_cast<std::uint16_t>(it - view->pkeys.begin());
  }
  if ((mask & IBV_QP_AV) && !guest_ah(id, *view, a.ah_attr, g.ah_attr)) return VIBIF_EPERM;
  g.qp_access_flags = static_cast<std::uint32_t>(a.qp_access_flags) & VIBIF_ACCESS_ALL;
  g.path_mtu = a.path_mtu;
  g.qkey = a.qkey;
  g.rq_psn = a.rq_psn;
  g.sq_psn = a.sq_psn;
  g.dest_qp_num = a.dest_qp_num;
  g.max_rd_atomic = a.max_rd_atomic;
  g.max_dest_rd_atomic = a.max_dest_rd_atomic;
  g.min_rnr_timer = a.min_rnr_timer;
  g.timeout = a.timeout;
  g.retry_cnt = a.retry_cnt;
  g.rnr_retry = a.rnr_retry;
  constexpr int kPassed = IBV_QP_STATE | IBV_QP_ACCESS_FLAGS | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_QKEY |
                          IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
                          IBV_QP_RQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER | IBV_QP_SQ_PSN |
                          IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_DEST_QPN;
  out.attr_mask = static_cast<std::uint32_t>(mask & kPassed);
  return VIBIF_OK;
}

bool CmBroker::guest_ah(const Id& id, const CmHostView& view, const ibv_ah_attr& h, vibif_ah_attr& ah) {
  if (guest_ah_attr(h, view.gid_indices, ah)) return true;
  id.ep->log_.log(LogLevel::warning, "CM: " + id.src_ip.str() + "'s GID is at index " +
                                         std::to_string(h.grh.sgid_index) + " of " + view.hca +
                                         ", which is not among the device's gid-indices");
  return false;
}

int CmBroker::host_query_route(Id& id, vibif_response& rsp) {
  const platform::HostCmRoute route = id.host->route();
  auto& r = rsp.u.cm_route;
  const auto [src, src_port] = from_sockaddr(route.src);
  const auto [dst, dst_port] = from_sockaddr(route.dst);
  r.src = src.family ? to_wire(src, src_port) : to_wire(id.src_ip, id.src_port);
  r.dst = dst.family ? to_wire(dst, dst_port) : to_wire(id.dst_ip, id.dst_port);
  std::copy(std::begin(route.sgid.raw), std::end(route.sgid.raw), r.sgid);
  std::copy(std::begin(route.dgid.raw), std::end(route.dgid.raw), r.dgid);
  const CmPort* mine = port_of(id.ep->device_);
  r.pkey = route.pkey ? route.pkey : mine ? mine->pkey : VIBIF_DEFAULT_PKEY;
  r.link_layer = mine ? mine->link_layer : std::uint8_t{IBV_LINK_LAYER_ETHERNET};
  r.path_mtu = route.mtu ? route.mtu : mine ? mine->active_mtu : std::uint8_t{IBV_MTU_1024};
  if (id.host_ah) {
    r.ah_attr = *id.host_ah;  // UD: what the SIDR exchange gave
  } else {
    r.ah_attr.dlid = route.dlid;
    r.ah_attr.sl = route.sl;
    r.ah_attr.hop_limit = route.hop_limit;
    r.ah_attr.port_num = 1;
  }
  return VIBIF_OK;
}

void CmBroker::run_host_events() {
  pollfd fds[2] = {{host_cm_->event_fd(), POLLIN, 0}, {host_stop_.get(), POLLIN, 0}};
  for (;;) {
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      log_line(LogLevel::error, "vibd", std::string("host rdma_cm events: poll: ") + std::strerror(errno));
      return;
    }
    if (fds[1].revents) return;
    while (auto event = host_cm_->next_event()) {
      std::lock_guard lock(mu_);
      on_host_event(*event);
    }
  }
}

void CmBroker::on_host_event(platform::HostCmEvent& e) {
  auto it = host_ids_.find(e.token);
  if (it == host_ids_.end()) return;  // its guest id went since (a request's new id goes with `e`: a REJ)
  Id& id = *it->second;
  vibif_cm_conn_param p{};
  p.responder_resources = e.param.responder_resources;
  p.initiator_depth = e.param.initiator_depth;
  p.flow_control = e.param.flow_control;
  p.retry_count = e.param.retry_count;
  p.rnr_retry_count = e.param.rnr_retry_count;
  p.srq = e.param.srq;
  p.qp_num = e.param.qp_num & 0xffffff;
  p.qkey = e.param.qkey;
  const std::size_t length = std::min<std::size_t>(e.param.private_data.size(), VIBIF_CM_MAX_PRIVATE_DATA);
  const std::uint8_t* data = e.param.private_data.data();
  switch (e.type) {
    case RDMA_CM_EVENT_ADDR_RESOLVED: {
      const CmHostView* view = host_view(*id.ep);
      const std::string hca = id.host ? id.host->device_name() : "";
      if (!view || hca != view->hca || id.host->port_num() != view->port) {
        // The route leaves through another HCA than the guest's QPs are on.
        id.ep->log_.log(LogLevel::warning, "CM: " + id.dst_ip.str() + " is reached through " +
                                               (hca.empty() ? std::string("no HCA") : hca) + " on this host, not " +
                                               (view ? view->hca : std::string("the device's HCA")));
        release_host(id);
        queue_event(id, kAddrError, -EHOSTUNREACH);
        return;
      }
      id.state = Id::State::addr_resolved;
      queue_event(id, kAddrResolved, 0);
      return;
    }
    case RDMA_CM_EVENT_ADDR_ERROR:
      release_host(id);
      queue_event(id, kAddrError, e.status);
      return;
    case RDMA_CM_EVENT_ROUTE_RESOLVED:
      if (id.state == Id::State::addr_resolved) id.state = Id::State::route_resolved;
      queue_event(id, kRouteResolved, 0);
      return;
    case RDMA_CM_EVENT_ROUTE_ERROR:
      queue_event(id, kRouteError, e.status);
      return;
    case RDMA_CM_EVENT_CONNECT_REQUEST:
      on_host_request(id, e);
      return;
    case RDMA_CM_EVENT_CONNECT_RESPONSE:
      if (id.state != Id::State::req_sent) return;
      id.state = Id::State::rep_received;
      queue_event(id, kConnectResponse, 0, &p, data, length);
      return;
    case RDMA_CM_EVENT_ESTABLISHED:
      if (id.qp_type == VIBIF_QPT_UD && e.param.ah) {
        // The SIDR reply: the guest sends to the peer with this vector.
        const CmHostView* view = host_view(*id.ep);
        vibif_ah_attr ah{};
        if (!view || !guest_ah(id, *view, *e.param.ah, ah)) {
          id.state = Id::State::disconnected;
          queue_event(id, kUnreachable, -EPERM);
          return;
        }
        id.host_ah = ah;
      }
      id.state = Id::State::established;
      queue_event(id, kEstablished, 0, &p, data, length);
      return;
    case RDMA_CM_EVENT_REJECTED:
    case RDMA_CM_EVENT_UNREACHABLE:
    case RDMA_CM_EVENT_CONNECT_ERROR:
      id.state = Id::State::disconnected;
      queue_event(id, static_cast<std::uint8_t>(e.type), e.status, nullptr, data, length);
      return;
    case RDMA_CM_EVENT_DISCONNECTED:
      id.state = Id::State::disconnected;
      queue_event(id, kDisconnected, 0);
      return;
    default:  // TIMEWAIT_EXIT, ADDR_CHANGE, DEVICE_REMOVAL: nothing the guest's id needs
      id.ep->log_.log(LogLevel::debug, "CM id " + std::to_string(id.handle) + ": host event " +
                                           rdma_event_str(static_cast<rdma_cm_event_type>(e.type)) + " ignored");
      return;
  }
}

void CmBroker::on_host_request(Id& listener, platform::HostCmEvent& e) {
  std::unique_ptr<platform::HostCmId> host = std::move(e.new_id);
  if (!host) return;
  if (listener.state != Id::State::listening || listener.pending >= listener.backlog ||
      !host_ids_left(*listener.ep)) {
    host->reject({});
    return;
  }
  CmEndpoint& passive = *listener.ep;
  const platform::HostCmRoute route = host->route();
  auto child = request_id(listener);
  Id* c = child.get();
  std::tie(c->src_ip, c->src_port) = from_sockaddr(route.src);
  std::tie(c->dst_ip, c->dst_port) = from_sockaddr(route.dst);
  // rdma_cm reports the resources from this side's point of view already.
  c->responder_resources = e.param.responder_resources;
  c->initiator_depth = e.param.initiator_depth;
  c->retry_count = e.param.retry_count;
  c->peer_qp_num = e.param.qp_num & 0xffffff;
  c->peer_rnr_retry_count = e.param.rnr_retry_count;
  const vibif_handle_t handle = passive.ids_.insert(std::move(child));
  if (handle == VIBIF_HANDLE_NONE) {
    host->reject({});
    return;
  }
  c->handle = handle;
  c->host_token = next_token_++;
  host->set_token(c->host_token);
  host_ids_[c->host_token] = c;
  c->host = std::move(host);
  count_host_ids(passive, 1);
  ++listener.pending;
  vibif_cm_conn_param p{};
  p.responder_resources = c->responder_resources;
  p.initiator_depth = c->initiator_depth;
  p.flow_control = e.param.flow_control;
  p.retry_count = e.param.retry_count;
  p.rnr_retry_count = e.param.rnr_retry_count;
  p.srq = e.param.srq;
  p.qp_num = c->qp_type == VIBIF_QPT_UD ? 0 : c->peer_qp_num;  // a SIDR request names no QP
  if (c->qp_type == VIBIF_QPT_UD && e.param.ah) {
    const CmHostView* view = host_view(passive);
    vibif_ah_attr ah{};
    if (view && guest_ah(*c, *view, *e.param.ah, ah)) c->host_ah = ah;
  }
  const std::size_t length = std::min<std::size_t>(e.param.private_data.size(), VIBIF_CM_MAX_PRIVATE_DATA);
  queue_event(listener, kConnectRequest, 0, &p, e.param.private_data.data(), length, handle);
  passive.log_.log(LogLevel::info, "CM: request from " + c->dst_ip.str() + ":" + std::to_string(c->dst_port) +
                                       " (outside vib) to " + c->src_ip.str() + ":" + std::to_string(c->src_port));
}

int CmBroker::get_event(Id& id, vibif_response& rsp) {
  if (id.events.empty()) return VIBIF_EAGAIN;
  Id::Event e = std::move(id.events.front());
  id.events.pop_front();
  auto& out = rsp.u.cm_event;
  out.event = e.type;
  out.remaining = static_cast<std::uint8_t>(std::min<std::size_t>(id.events.size(), 255));
  out.status = e.status;
  out.new_id = e.new_id;
  out.param = e.param;
  std::copy(e.data.begin(), e.data.end(), out.private_data);
  return VIBIF_OK;
}

}  // namespace vib::backend
