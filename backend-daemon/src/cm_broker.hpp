// Connection management for guests (vibif.h, CONNECTION MANAGEMENT): vibd is
// the guests' RDMA-CM. One CmBroker serves every context of vibd; each
// context has a CmEndpoint holding its CM ids.
//
// Threads: a context's worker executes that context's CM requests; one op
// may queue events on another context's ids (the peer of a connection), so
// all CM state — every endpoint's ids, the address table, the listeners —
// is guarded by the broker's one mutex. CM operations are rare and short;
// the fast path never takes it. An event for an id is queued there and its
// context's worker is woken (its mailbox), which then announces it to the
// guest on the doorbell page (take_announcements). The broker's timer thread
// expires handshakes whose peer does not answer.
//
// The broker never touches a QP: the guest moves its own QPs with the
// attributes CM_INIT_QP_ATTR answers, as librdmacm does with the kernel.
//
// Peers outside vib (a native program in dom0, another node): a guest on an
// rdma-core HCA that resolves an address no vib guest has, or listens, gets
// a host rdma_cm id beside its own (platform::HostCmId). The host's rdma_cm
// runs the exchange with the guest's QP number; its events become the
// guest's, and its QP attributes are translated to the guest's port, P_Key
// and GID tables (an attribute outside them is refused: the device's
// gid-indices and pkeys confine the guest here too). The host connection
// manager is opened at first use; one thread reads its events.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "control.hpp"
#include "device_id.hpp"
#include "handle_table.hpp"
#include "vib/platform/host_cm.hpp"
#include "vib/platform/unique_fd.hpp"
#include "vib/vibif.h"

namespace vib::backend {

// An IP address without a port, as vibif_cm_addr carries it.
struct IpAddress {
  std::uint16_t family = 0;  // VIBIF_AF_INET or VIBIF_AF_INET6; 0: unspecified
  std::array<std::uint8_t, 16> bytes{};
  auto operator<=>(const IpAddress&) const = default;

  bool wildcard() const;
  bool loopback() const;
  // The RoCE v2 GID of the address: ::ffff:a.b.c.d, or the IPv6 address.
  std::array<std::uint8_t, 16> gid() const;
  std::string str() const;
  static IpAddress from_wire(const vibif_cm_addr& a);
  // "192.0.2.5" or "2001:db8::5" (a "/prefix" is ignored, as in vif's ip).
  static std::optional<IpAddress> parse(std::string_view text);
};
// A space-separated list of addresses (the "ip" node); nullopt if any is bad.
std::optional<std::vector<IpAddress>> parse_ip_list(std::string_view text);

// What a device's HCA port looks like to the peers of its guests.
struct CmPort {
  std::uint16_t lid = 0;
  std::array<std::uint8_t, 16> gid{};  // the port's GID at the guest's index 0
  std::uint8_t link_layer = IBV_LINK_LAYER_INFINIBAND;
  std::uint8_t active_mtu = IBV_MTU_1024;
  std::uint16_t pkey = VIBIF_DEFAULT_PKEY;  // the guest's P_Key index 0
};

// A device on an rdma-core HCA, as its guest's view maps to the host's:
// what the host rdma_cm path needs (absent for the software HCA).
struct CmHostView {
  std::string hca;  // the HCA's device name, as rdma_cm reports it
  std::uint8_t port = 1;
  std::vector<std::uint32_t> gid_indices;  // the guest's GID table: host indices, in order
  std::vector<std::uint16_t> pkeys;        // the guest's P_Key table
};

class CmBroker;

// One context's CM ids. Created and closed by the context on vibd's main
// thread; executes on the context's worker.
class CmEndpoint final : public ControlExtension {
 public:
  ~CmEndpoint() override;
  bool handles(std::uint16_t op) const override;
  vibif_response execute(const vibif_request& req) override;
  // The ids with events queued since the last call: the worker writes one
  // doorbell event for each. One atomic load when there are none.
  std::vector<vibif_handle_t> take_announcements();

 private:
  friend class CmBroker;
  struct Id;
  CmEndpoint(CmBroker& broker, DeviceId device, std::string subject, std::function<void()> wake);

  CmBroker& broker_;
  const DeviceId device_;
  const std::string subject_;
  // Everything this context's requests make the broker log: a guest can
  // bind, listen and let handshakes time out as often as it likes.
  LogLimiter log_;
  const std::function<void()> wake_;
  // Broker mutex for everything below but `announce_pending_`.
  HandleTable<Id> ids_;  // VIBIF_CM_MAX_IDS
  std::vector<vibif_handle_t> announcements_;
  std::atomic<bool> announce_pending_{false};
  bool closed_ = false;
};

class CmBroker {
 public:
  using HostCmOpener = std::function<std::unique_ptr<platform::HostConnectionManager>()>;
  // `timeout`: how long a REQ waits for REP/REJ, and a REP for RTU (between
  // guests; the host's rdma_cm keeps its own). `open_host_cm`: called once,
  // when a guest first needs a peer outside vib.
  explicit CmBroker(std::chrono::milliseconds timeout, HostCmOpener open_host_cm = platform::open_host_cm);
  ~CmBroker();
  CmBroker(const CmBroker&) = delete;
  CmBroker& operator=(const CmBroker&) = delete;

  // A device its guest may use: its addresses and its port. Resolving one
  // of the addresses finds this device. `host`: it may reach peers outside
  // vib through the host's rdma_cm.
  void add_device(DeviceId device, std::vector<IpAddress> addresses, CmPort port,
                  std::optional<CmHostView> host = std::nullopt);
  void remove_device(DeviceId device);

  // A context's endpoint; `wake` must be callable from any thread (it wakes
  // the context's worker). close() tells the peers of its connections and
  // frees its ids; call it once the worker has stopped.
  std::shared_ptr<CmEndpoint> open(DeviceId device, std::string subject, std::function<void()> wake);
  void close(CmEndpoint& endpoint);

 private:
  friend class CmEndpoint;
  using Id = CmEndpoint::Id;
  using Clock = std::chrono::steady_clock;
  struct DeviceEntry {
    std::vector<IpAddress> addresses;
    CmPort port;
    std::optional<CmHostView> host;
    std::size_t host_ids = 0;  // host rdma_cm ids its guest's ids hold (kMaxHostIdsPerDevice)
  };

  vibif_response execute(CmEndpoint& ep, const vibif_request& req);
  int create_id(CmEndpoint& ep, const vibif_cm_create_id_req& r, vibif_response& rsp);
  int bind(Id& id, const vibif_cm_addr& addr, vibif_response& rsp);
  int resolve_addr(Id& id, const vibif_cm_resolve_addr_req& r, vibif_response& rsp);
  int resolve_route(Id& id);
  int listen(Id& id, std::uint32_t backlog);
  int connect(Id& id, const vibif_cm_connect_req& r);
  // A connection request's new id on `listener`'s side (req_received),
  // counted against its backlog once the caller adds it to the table.
  std::unique_ptr<Id> request_id(Id& listener);
  // The REQ of `id` reaches `listener`: a new id there, CONNECT_REQUEST.
  void deliver_request(Id& id, Id& listener);
  int accept(Id& id, const vibif_cm_connect_req& r);
  int reject(Id& id, const vibif_cm_reject_req& r);
  int establish(Id& id);
  int disconnect(Id& id);
  int init_qp_attr(Id& id, std::uint32_t state, vibif_response& rsp);
  int query_route(Id& id, vibif_response& rsp);
  int get_event(Id& id, vibif_response& rsp);
  // The peer of a connection learns that this end went away (destroyed,
  // closed, timed out), and both are unlinked.
  void abandon(Id& id, const char* why);
  void destroy(Id& id);

  // The host rdma_cm path (see the top of this file).
  const CmHostView* host_view(const CmEndpoint& ep) const;
  platform::HostConnectionManager* host_cm(CmEndpoint& ep);
  // A host id for `id`, registered under the id's token; null (logged) if
  // the host cannot make one or the device holds its most. Counted against
  // the device once attached to the id (attach_host), uncounted by
  // release_host.
  std::unique_ptr<platform::HostCmId> new_host_id(Id& id);
  int host_resolve_addr(Id& id);
  void host_listen(Id& id);
  int host_connect(Id& id, const vibif_cm_connect_req& r);
  int host_accept(Id& id, const vibif_cm_connect_req& r);
  int host_init_qp_attr(Id& id, std::uint32_t state, vibif_response& rsp);
  int host_query_route(Id& id, vibif_response& rsp);
  // A host address vector in the guest's terms; false (logged) if its
  // source GID is outside the device's table.
  bool guest_ah(const Id& id, const CmHostView& view, const ibv_ah_attr& host, vibif_ah_attr& out);
  bool host_ids_left(const CmEndpoint& ep);
  void count_host_ids(const CmEndpoint& ep, std::ptrdiff_t change);
  void release_host(Id& id);
  void run_host_events();
  void on_host_event(platform::HostCmEvent& e);
  void on_host_request(Id& listener, platform::HostCmEvent& e);

  bool may_bind(const CmEndpoint& ep, const IpAddress& ip) const;
  bool port_in_use(DeviceId device, std::uint16_t port_space, const IpAddress& ip, std::uint16_t port) const;
  std::uint16_t free_port(DeviceId device, std::uint16_t port_space, const IpAddress& ip);
  // The devices answering at `ip` for a guest of domain `from`.
  std::vector<DeviceId> devices_at(const IpAddress& ip, platform::DomId from) const;
  Id* find_listener(const Id& active);
  const CmPort* port_of(DeviceId device) const;
  void queue_event(Id& id, std::uint8_t event, int status, const vibif_cm_conn_param* param = nullptr,
                   const std::uint8_t* data = nullptr, std::size_t length = 0, vibif_handle_t new_id = 0);
  void run_timer();
  void expire(Id& id);

  const std::chrono::milliseconds timeout_;
  std::mutex mu_;
  std::condition_variable timer_cv_;
  bool stopping_ = false;
  std::map<DeviceId, DeviceEntry> devices_;
  std::set<CmEndpoint*> endpoints_;
  std::uint32_t next_psn_ = 0x1a2b3c;
  std::uint16_t next_port_ = 0;
  const HostCmOpener open_host_cm_;
  std::unique_ptr<platform::HostConnectionManager> host_cm_;  // opened at first use
  bool host_cm_unavailable_ = false;                           // the attempt failed
  std::map<std::uint64_t, Id*> host_ids_;                      // by token
  std::uint64_t next_token_ = 1;
  platform::UniqueFd host_stop_;  // an eventfd: the host event thread ends
  std::thread host_events_;       // reads host_cm_'s events; started with it
  std::thread timer_;             // last: started when everything else exists
};

}  // namespace vib::backend
