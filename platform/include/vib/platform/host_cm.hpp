// The host's RDMA connection manager (the kernel's rdma_cm through
// librdmacm), as vibd uses it to connect a guest's QP on an rdma-core HCA
// with a peer that is not a vib guest: a native program in dom0 or another
// node of the fabric. vibd owns one host id per guest CM id that needs one;
// the guest's QP (created by vibd on the same HCA) is named by its number,
// and the guest moves it itself with the attributes init_qp_attr gives, as
// librdmacm applications without rdma_create_qp do.
//
// Threading: any call from any thread; an id must not be destroyed while
// another thread uses it. Events are read by one thread (next_event).
#pragma once

#include <infiniband/verbs.h>
#include <sys/socket.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace vib::platform {

// What a connection message carries (rdma_conn_param, or the UD parameters).
struct HostCmParam {
  std::uint8_t responder_resources = 0, initiator_depth = 0, flow_control = 0, retry_count = 0,
               rnr_retry_count = 0, srq = 0;
  std::uint32_t qp_num = 0, qkey = 0;
  std::vector<std::uint8_t> private_data;
  // UD (SIDR) events: the address vector towards the peer, in host terms.
  std::optional<ibv_ah_attr> ah;
};

// The id's addresses and path, once resolved (or once a request arrived).
struct HostCmRoute {
  sockaddr_storage src{}, dst{};
  ibv_gid sgid{}, dgid{};
  std::uint16_t pkey = 0;  // host byte order
  std::uint8_t mtu = 0;    // enum ibv_mtu, 0 when no path is known
  std::uint16_t dlid = 0;
  std::uint8_t sl = 0, hop_limit = 0;
};

class HostCmId {
 public:
  // rdma_destroy_id: the kernel sends the REJ or DREQ/DREP its state owes.
  virtual ~HostCmId() = default;
  // Each returns 0 or an errno.
  virtual int bind(const sockaddr& addr) = 0;
  virtual int resolve_addr(const sockaddr& src, const sockaddr& dst, int timeout_ms) = 0;
  virtual int resolve_route(int timeout_ms) = 0;
  virtual int listen(int backlog) = 0;
  virtual int connect(const HostCmParam& param) = 0;
  virtual int accept(const HostCmParam& param) = 0;
  virtual int reject(std::span<const std::uint8_t> private_data) = 0;
  // The RTU of an active id whose QP the caller moved to RTS.
  virtual int establish() = 0;
  virtual int disconnect() = 0;
  // The attributes for moving a QP to attr.qp_state (set by the caller), in
  // the host's terms: its port number, P_Key and GID table indices.
  virtual int init_qp_attr(ibv_qp_attr& attr, int& mask) = 0;
  // The HCA and port the id is bound to; "" and 0 before bind/resolve.
  virtual std::string device_name() const = 0;
  virtual std::uint8_t port_num() const = 0;
  virtual int query_pkey(std::uint16_t index, std::uint16_t& pkey) const = 0;  // host order
  virtual HostCmRoute route() const = 0;
  // The value every event of this id carries (HostCmEvent::token).
  virtual void set_token(std::uint64_t token) = 0;
};

struct HostCmEvent {
  std::uint64_t token = 0;  // the id's; a CONNECT_REQUEST's: its listener's
  int type = 0;             // enum rdma_cm_event_type
  int status = 0;
  HostCmParam param;        // the peer's
  std::unique_ptr<HostCmId> new_id;  // CONNECT_REQUEST: the new connection, token unset
};

class HostConnectionManager {
 public:
  virtual ~HostConnectionManager() = default;
  // port_space: RDMA_PS_TCP or RDMA_PS_UDP. Throws std::system_error.
  virtual std::unique_ptr<HostCmId> create_id(std::uint64_t token, int port_space) = 0;
  // Readable (POLLIN) while events wait.
  virtual int event_fd() const = 0;
  // The next event, already acknowledged to the kernel, so that destroying
  // an id never waits for the reader; nullopt when none waits.
  virtual std::optional<HostCmEvent> next_event() = 0;
};

// librdmacm on this host. Throws std::system_error (ENODEV when the kernel
// has no rdma_cm: /dev/infiniband/rdma_cm is missing).
std::unique_ptr<HostConnectionManager> open_host_cm();

}  // namespace vib::platform
