#include "cm_input.hpp"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "cm_broker.hpp"

namespace vib::test {

namespace {

void check(bool invariant) {
  if (!invariant) std::abort();
}

bool valid_status(std::int32_t s) {
  switch (s) {
    case VIBIF_OK: case VIBIF_EINVAL: case VIBIF_ENOENT: case VIBIF_EAGAIN: case VIBIF_EADDRINUSE:
    case VIBIF_EADDRNOTAVAIL: case VIBIF_ENOTCONN: case VIBIF_EDQUOT: case VIBIF_ENOSYS:
      return true;
    default:
      return false;
  }
}

bool valid_event(std::uint8_t event) {
  switch (event) {
    case 0: case 1: case 2: case 4: case 5: case 7: case 8: case 9: case 10:  // rdma_cm_event_type
      return true;
    default:
      return false;
  }
}

const std::array<backend::DeviceId, 2> kDevices = {backend::DeviceId{5, 0}, backend::DeviceId{6, 0}};

// 192.0.2.1 (device 0), 192.0.2.2 (device 1), loopback, the wildcard, and
// an address nobody has.
void steer(vibif_cm_addr& a) {
  if (!(a.family & 0x8000)) return;
  static const std::array<std::array<std::uint8_t, 4>, 5> kAddresses = {
      {{192, 0, 2, 1}, {192, 0, 2, 2}, {127, 0, 0, 1}, {0, 0, 0, 0}, {198, 51, 100, 9}}};
  const auto& chosen = kAddresses[a.addr[0] % kAddresses.size()];
  std::memset(a.addr, 0, sizeof a.addr);
  std::memcpy(a.addr, chosen.data(), chosen.size());
  a.family = VIBIF_AF_INET;
  a.port = static_cast<std::uint16_t>(7000 + a.port % 4);
}

struct Context {
  std::shared_ptr<backend::CmEndpoint> endpoint;
  std::vector<vibif_handle_t> ids;  // its ids, in the order they appeared
};

class Run {
 public:
  Run() : broker_(std::chrono::minutes(1)) {  // no handshake times out within a run
    broker_.add_device(kDevices[0], {*backend::IpAddress::parse("192.0.2.1")}, backend::CmPort{});
    broker_.add_device(kDevices[1], {*backend::IpAddress::parse("192.0.2.2")}, backend::CmPort{});
    for (std::size_t i = 0; i < contexts_.size(); ++i) open(i);
  }
  ~Run() {
    for (auto& c : contexts_) broker_.close(*c.endpoint);
  }

  std::size_t step(const std::uint8_t* data, std::size_t size) {
    if (size < 3) return size;
    const std::size_t who = (data[0] & 3u) % contexts_.size();
    Context& c = contexts_[who];
    if ((data[0] & 0xe0) == 0xe0) {
      broker_.close(*c.endpoint);
      open(who);
    }
    vibif_request req;
    std::memset(&req, 0, sizeof req);
    req.hdr.id = ++request_id_;
    req.hdr.op = static_cast<std::uint16_t>(VIBIF_OP_CM_CREATE_ID + data[1] % 14);
    const std::size_t length = std::min<std::size_t>({data[2], size - 3, sizeof req.u.raw});
    std::memcpy(req.u.raw, data + 3, length);
    // Every op but CREATE_ID names an id first.
    auto& id = req.u.cm_id.id;
    if (req.hdr.op != VIBIF_OP_CM_CREATE_ID && id < 16 && !c.ids.empty()) id = c.ids[id % c.ids.size()];
    if (req.hdr.op == VIBIF_OP_CM_CREATE_ID) {
      auto& create = req.u.cm_create_id;
      if (create.port_space < 4) {
        create.port_space = create.port_space % 2 ? VIBIF_CM_PS_UDP : VIBIF_CM_PS_TCP;
        create.qp_type = create.port_space == VIBIF_CM_PS_UDP ? VIBIF_QPT_UD : VIBIF_QPT_RC;
      }
    }
    if (req.hdr.op == VIBIF_OP_CM_BIND) steer(req.u.cm_bind.addr);
    if (req.hdr.op == VIBIF_OP_CM_RESOLVE_ADDR) {
      steer(req.u.cm_resolve_addr.src);
      steer(req.u.cm_resolve_addr.dst);
    }
    const vibif_response rsp = c.endpoint->execute(req);
    check(rsp.hdr.id == req.hdr.id && rsp.hdr.op == req.hdr.op && valid_status(rsp.hdr.status));
    if (rsp.hdr.status == VIBIF_OK) {
      if (req.hdr.op == VIBIF_OP_CM_CREATE_ID) c.ids.push_back(rsp.u.handle.handle);
      if (req.hdr.op == VIBIF_OP_CM_GET_EVENT) {
        const auto& e = rsp.u.cm_event;
        check(valid_event(e.event) && e.remaining < VIBIF_CM_MAX_EVENTS &&
              e.param.private_data_len <= VIBIF_CM_MAX_PRIVATE_DATA);
        check((e.new_id != VIBIF_HANDLE_NONE) == (e.event == 4));  // CONNECT_REQUEST carries a new id
        if (e.new_id) c.ids.push_back(e.new_id);
        events_ |= 1u << e.event;
      }
    }
    // The worker's part: what was announced meanwhile, for every context.
    for (auto& each : contexts_) each.endpoint->take_announcements();
    return 3 + length;
  }
  std::uint32_t events() const { return events_; }

 private:
  void open(std::size_t i) {
    contexts_[i].endpoint = broker_.open(kDevices[i == 2 ? 1 : 0], "fuzz-cm", [] {});
    contexts_[i].ids.clear();
  }

  backend::CmBroker broker_;
  std::array<Context, 3> contexts_;
  std::uint64_t request_id_ = 0;
  std::uint32_t events_ = 0;
};

}  // namespace

std::uint32_t run_cm_input(const std::uint8_t* data, std::size_t size) {
  Run run;
  for (std::size_t at = 0; at < size;) at += run.step(data + at, size - at);
  return run.events();
}

}  // namespace vib::test
