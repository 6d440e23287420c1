// vibd as the connection manager, at the protocol level (vibif.h,
// CONNECTION MANAGEMENT): two guests (domains 5 and 6 of the host-local Xen,
// addresses 192.0.2.5 and 192.0.2.6) send CM_* requests with libvibfront;
// what librdmacm makes of them is tested with real programs in
// tests/compat/rdmacm_test.cpp. Here: private data both ways, rejects,
// timeouts, a peer that dies mid-handshake, addresses a guest may not use.
#include <arpa/inet.h>
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "vib/front/verbs.hpp"
#include "vibd_fixture.hpp"

using namespace std::chrono_literals;
using vib::front::Device;

namespace {

constexpr std::uint8_t kConnectRequest = 4, kConnectResponse = 5, kUnreachable = 7, kRejected = 8,
                       kEstablished = 9, kDisconnected = 10, kAddrResolved = 0, kAddrError = 1, kRouteResolved = 2;

vibif_cm_addr ipv4(const char* text, std::uint16_t port) {
  vibif_cm_addr a{};
  a.family = VIBIF_AF_INET;
  a.port = port;
  EXPECT_EQ(::inet_pton(AF_INET, text, a.addr), 1);
  return a;
}

vibif_request cm_request(std::uint16_t op, vibif_handle_t id = 0) {
  vibif_request req;
  std::memset(&req, 0, sizeof(req));
  req.hdr.op = op;
  req.u.cm_id.id = id;
  return req;
}

// One guest process with its vib context.
struct Guest {
  std::unique_ptr<Device> device;

  explicit Guest(vib::platform::XenTarget xen) {
    vib::front::ChannelOptions options;
    options.xen = xen;
    device = Device::open(options);
  }
  int call(const vibif_request& req, vibif_response& rsp) { return device->call_errno(req, rsp); }
  int call(const vibif_request& req) {
    vibif_response rsp;
    return call(req, rsp);
  }
  vibif_handle_t create_id(std::uint16_t port_space = VIBIF_CM_PS_TCP) {
    auto req = cm_request(VIBIF_OP_CM_CREATE_ID);
    req.u.cm_create_id.port_space = port_space;
    req.u.cm_create_id.qp_type = port_space == VIBIF_CM_PS_UDP ? VIBIF_QPT_UD : VIBIF_QPT_RC;
    vibif_response rsp;
    EXPECT_EQ(call(req, rsp), 0);
    return rsp.u.handle.handle;
  }
  int bind(vibif_handle_t id, const vibif_cm_addr& addr) {
    auto req = cm_request(VIBIF_OP_CM_BIND, id);
    req.u.cm_bind.addr = addr;
    return call(req);
  }
  int listen(vibif_handle_t id) { return call(cm_request(VIBIF_OP_CM_LISTEN, id)); }
  // The id's next event, waiting (bounded) for its doorbell announcement.
  vibif_cm_event_resp event(vibif_handle_t id) {
    const auto deadline = std::chrono::steady_clock::now() + 5s;
    while (std::chrono::steady_clock::now() < deadline) {
      vibif_response rsp;
      const int err = call(cm_request(VIBIF_OP_CM_GET_EVENT, id), rsp);
      if (err == 0) return rsp.u.cm_event;
      EXPECT_EQ(err, EAGAIN);
      std::this_thread::sleep_for(2ms);
    }
    ADD_FAILURE() << "no CM event for id " << id << " within 5 s";
    vibif_cm_event_resp none{};
    none.event = 0xff;
    return none;
  }
  bool no_event(vibif_handle_t id) {
    vibif_response rsp;
    return call(cm_request(VIBIF_OP_CM_GET_EVENT, id), rsp) == EAGAIN;
  }
  int connect(vibif_handle_t id, std::uint32_t qp_num, const std::string& data = {}, std::uint16_t op = VIBIF_OP_CM_CONNECT) {
    auto req = cm_request(op, id);
    auto& c = req.u.cm_connect;
    c.param.qp_num = qp_num;
    c.param.responder_resources = 1;
    c.param.initiator_depth = 1;
    c.param.retry_count = 7;
    c.param.rnr_retry_count = 7;
    c.param.private_data_len = static_cast<std::uint8_t>(data.size());
    std::memcpy(c.private_data, data.data(), data.size());
    return call(req);
  }
  // An id that reached ROUTE_RESOLVED towards `dst`.
  vibif_handle_t routed_to(const vibif_cm_addr& dst) {
    const vibif_handle_t id = create_id();
    auto req = cm_request(VIBIF_OP_CM_RESOLVE_ADDR, id);
    req.u.cm_resolve_addr.dst = dst;
    EXPECT_EQ(call(req), 0);
    EXPECT_EQ(event(id).event, kAddrResolved);
    EXPECT_EQ(call(cm_request(VIBIF_OP_CM_RESOLVE_ROUTE, id)), 0);
    EXPECT_EQ(event(id).event, kRouteResolved);
    return id;
  }
  vibif_cm_qp_attr_resp qp_attr(vibif_handle_t id, std::uint32_t state) {
    auto req = cm_request(VIBIF_OP_CM_INIT_QP_ATTR, id);
    req.u.cm_id.arg = state;
    vibif_response rsp;
    EXPECT_EQ(call(req, rsp), 0);
    return rsp.u.cm_qp_attr;
  }
};

std::string data_of(const vibif_cm_event_resp& e) {
  return std::string(reinterpret_cast<const char*>(e.private_data), e.param.private_data_len);
}

class Cm : public vib::test::VibdFixture {
 protected:
  void SetUp() override {
    VibdFixture::SetUp();
    log_ = xen_.dir() + "/vibd.log";
    provision_with_ip(5, "192.0.2.5");
    provision_with_ip(6, "192.0.2.6");
    start_vibd(VIBD, log_, {"--cm-timeout", cm_timeout()});
    ASSERT_TRUE(eventually(be(5) + "/state", "2"));
    ASSERT_TRUE(eventually(be(6) + "/state", "2"));
    ASSERT_TRUE(eventually(be(5) + "/" VIBIF_XS_FEATURE_RDMA_CM, "1"));
  }
  // vibd's default: the steps of a handshake never race its timer, however
  // slowly a loaded machine runs them. The cases about the timer itself
  // shorten it (CmShortTimeout).
  virtual const char* cm_timeout() const { return "20000"; }
  // A listener of `g` at 192.0.2.5:`port`.
  vibif_handle_t listener(Guest& g, std::uint16_t port) {
    const vibif_handle_t id = g.create_id();
    EXPECT_EQ(g.bind(id, ipv4("192.0.2.5", port)), 0);
    EXPECT_EQ(g.listen(id), 0);
    return id;
  }
  std::string log_;
};

TEST_F(Cm, AGuestBindsOnlyToItsOwnLoopbackOrAnyAddress) {
  Guest b(xen_.as(6));
  EXPECT_EQ(b.bind(b.create_id(), ipv4("192.0.2.5", 1000)), EADDRNOTAVAIL) << "domain 5's address";
  EXPECT_EQ(b.bind(b.create_id(), ipv4("198.51.100.1", 1000)), EADDRNOTAVAIL) << "nobody's address";
  EXPECT_EQ(b.bind(b.create_id(), ipv4("192.0.2.6", 1000)), 0);
  EXPECT_EQ(b.bind(b.create_id(), ipv4("192.0.2.6", 1000)), EADDRINUSE);
  EXPECT_EQ(b.bind(b.create_id(), ipv4("127.0.0.1", 1001)), 0);
  EXPECT_EQ(b.bind(b.create_id(), ipv4("0.0.0.0", 1002)), 0);
  // Not an address at all: a malformed request.
  for (const std::uint16_t family : {std::uint16_t{0}, std::uint16_t{1}, std::uint16_t{0x8002}}) {
    auto bad = ipv4("192.0.2.6", 1003);
    bad.family = family;
    EXPECT_EQ(b.bind(b.create_id(), bad), EINVAL) << "family " << family;
  }
  // Nor may it speak from another guest's address.
  const vibif_handle_t id = b.create_id();
  auto req = cm_request(VIBIF_OP_CM_RESOLVE_ADDR, id);
  req.u.cm_resolve_addr.src = ipv4("192.0.2.5", 0);
  req.u.cm_resolve_addr.dst = ipv4("192.0.2.5", 1000);
  EXPECT_EQ(b.call(req), EADDRNOTAVAIL);
  // An address no device has: ADDR_ERROR.
  const vibif_handle_t lost = b.create_id();
  req = cm_request(VIBIF_OP_CM_RESOLVE_ADDR, lost);
  req.u.cm_resolve_addr.dst = ipv4("198.51.100.1", 1000);
  EXPECT_EQ(b.call(req), 0);
  const auto e = b.event(lost);
  EXPECT_EQ(e.event, kAddrError);
  EXPECT_EQ(e.status, -EHOSTUNREACH);
}

TEST_F(Cm, ConnectAcceptEstablishDisconnectWithPrivateDataBothWays) {
  Guest a(xen_.as(5)), b(xen_.as(6));
  const vibif_handle_t listen = listener(a, 4000);
  const vibif_handle_t active = b.routed_to(ipv4("192.0.2.5", 4000));
  const std::string hello(56, 'h');  // the most an RC request carries
  EXPECT_EQ(b.connect(active, 0x1234, hello + "x"), EINVAL) << "57 bytes";
  ASSERT_EQ(b.connect(active, 0x1234, hello), 0);
  const auto req = a.event(listen);
  ASSERT_EQ(req.event, kConnectRequest);
  EXPECT_EQ(data_of(req), hello);
  EXPECT_EQ(req.param.qp_num, 0x1234u);
  const vibif_handle_t passive = req.new_id;
  ASSERT_NE(passive, 0u);
  // The passive QP's path: to the active QP, at the active PSN.
  const auto rtr = a.qp_attr(passive, IBV_QPS_RTR);
  EXPECT_EQ(rtr.attr.dest_qp_num, 0x1234u);
  EXPECT_NE(rtr.attr_mask & IBV_QP_AV, 0u);
  EXPECT_EQ(rtr.attr.ah_attr.dlid, 1) << "the soft HCA's LID";
  const std::string welcome(196, 'w');  // the most a reply carries
  ASSERT_EQ(a.connect(passive, 0x5678, welcome, VIBIF_OP_CM_ACCEPT), 0);
  const auto rep = b.event(active);
  ASSERT_EQ(rep.event, kConnectResponse);
  EXPECT_EQ(data_of(rep), welcome);
  EXPECT_EQ(rep.param.qp_num, 0x5678u);
  const auto active_rtr = b.qp_attr(active, IBV_QPS_RTR);
  EXPECT_EQ(active_rtr.attr.dest_qp_num, 0x5678u);
  EXPECT_EQ(active_rtr.attr.rq_psn, a.qp_attr(passive, IBV_QPS_RTS).attr.sq_psn) << "PSNs agree";
  EXPECT_EQ(rtr.attr.rq_psn, b.qp_attr(active, IBV_QPS_RTS).attr.sq_psn);
  EXPECT_TRUE(a.no_event(passive)) << "no ESTABLISHED before the RTU";
  ASSERT_EQ(b.call(cm_request(VIBIF_OP_CM_ESTABLISH, active)), 0);
  EXPECT_EQ(a.event(passive).event, kEstablished);
  ASSERT_EQ(a.call(cm_request(VIBIF_OP_CM_DISCONNECT, passive)), 0);
  EXPECT_EQ(a.event(passive).event, kDisconnected);
  EXPECT_EQ(b.event(active).event, kDisconnected);
  EXPECT_EQ(b.call(cm_request(VIBIF_OP_CM_DISCONNECT, active)), 0) << "the DREP to a DREQ";
  EXPECT_TRUE(b.no_event(active));
}

TEST_F(Cm, ARejectCarriesItsPrivateData) {
  Guest a(xen_.as(5)), b(xen_.as(6));
  const vibif_handle_t listen = listener(a, 4001);
  const vibif_handle_t active = b.routed_to(ipv4("192.0.2.5", 4001));
  ASSERT_EQ(b.connect(active, 0x42), 0);
  const auto req = a.event(listen);
  ASSERT_EQ(req.event, kConnectRequest);
  auto reject = cm_request(VIBIF_OP_CM_REJECT, req.new_id);
  reject.u.cm_reject.private_data_len = 148;  // the most a REJ carries
  for (int i = 0; i < 148; ++i) reject.u.cm_reject.private_data[i] = static_cast<std::uint8_t>(i * 7);
  ASSERT_EQ(a.call(reject), 0);
  const auto e = b.event(active);
  EXPECT_EQ(e.event, kRejected);
  EXPECT_EQ(e.status, 28) << "consumer defined";
  ASSERT_EQ(e.param.private_data_len, 148);
  for (int i = 0; i < 148; ++i) EXPECT_EQ(e.private_data[i], static_cast<std::uint8_t>(i * 7)) << "byte " << i;
}

TEST_F(Cm, NoListenerIsInvalidServiceId) {
  Guest b(xen_.as(6));
  const vibif_handle_t active = b.routed_to(ipv4("192.0.2.5", 4002));
  ASSERT_EQ(b.connect(active, 0x42), 0);
  const auto e = b.event(active);
  EXPECT_EQ(e.event, kRejected);
  EXPECT_EQ(e.status, 8);
}

// A timer short enough that unanswered handshakes expire within the test.
class CmShortTimeout : public Cm {
 protected:
  const char* cm_timeout() const override { return "300"; }
};

TEST_F(CmShortTimeout, AnUnansweredRequestTimesOut) {
  Guest a(xen_.as(5)), b(xen_.as(6));
  const vibif_handle_t listen = listener(a, 4003);
  const vibif_handle_t active = b.routed_to(ipv4("192.0.2.5", 4003));
  ASSERT_EQ(b.connect(active, 0x42), 0);
  const auto req = a.event(listen);
  ASSERT_EQ(req.event, kConnectRequest);
  // Nobody accepts: after vibd's CM timeout the active side gives up, and
  // the passive side learns the request is gone.
  const auto e = b.event(active);
  EXPECT_EQ(e.event, kUnreachable);
  EXPECT_EQ(e.status, -ETIMEDOUT);
  EXPECT_EQ(a.event(req.new_id).event, kRejected);
  EXPECT_EQ(a.connect(req.new_id, 0x43, {}, VIBIF_OP_CM_ACCEPT), EINVAL) << "too late";
}

TEST_F(CmShortTimeout, AnAcceptWithoutRtuTimesOut) {
  Guest a(xen_.as(5)), b(xen_.as(6));
  const vibif_handle_t listen = listener(a, 4004);
  const vibif_handle_t active = b.routed_to(ipv4("192.0.2.5", 4004));
  ASSERT_EQ(b.connect(active, 0x42), 0);
  const vibif_handle_t passive = a.event(listen).new_id;
  ASSERT_EQ(a.connect(passive, 0x43, {}, VIBIF_OP_CM_ACCEPT), 0);
  EXPECT_EQ(b.event(active).event, kConnectResponse);
  // The active side never sends its RTU.
  const auto e = a.event(passive);
  EXPECT_EQ(e.event, kUnreachable);
  EXPECT_EQ(e.status, -ETIMEDOUT);
  EXPECT_EQ(b.event(active).event, kRejected);
}

TEST_F(Cm, APeerThatDiesMidHandshakeIsReported) {
  Guest b(xen_.as(6));
  vibif_handle_t active = 0;
  {
    Guest a(xen_.as(5));
    const vibif_handle_t listen = listener(a, 4005);
    active = b.routed_to(ipv4("192.0.2.5", 4005));
    ASSERT_EQ(b.connect(active, 0x42), 0);
    ASSERT_EQ(a.event(listen).event, kConnectRequest);
  }  // the passive process goes away before it answers
  auto e = b.event(active);
  EXPECT_EQ(e.event, kRejected);
  EXPECT_EQ(e.status, 28);

  // And the other way round: the active side dies after the REP.
  Guest a(xen_.as(5));
  const vibif_handle_t listen = listener(a, 4006);
  vibif_handle_t passive = 0;
  {
    Guest c(xen_.as(6));
    const vibif_handle_t id = c.routed_to(ipv4("192.0.2.5", 4006));
    ASSERT_EQ(c.connect(id, 0x44), 0);
    passive = a.event(listen).new_id;
    ASSERT_EQ(a.connect(passive, 0x45, {}, VIBIF_OP_CM_ACCEPT), 0);
    EXPECT_EQ(c.event(id).event, kConnectResponse);
  }
  e = a.event(passive);
  EXPECT_EQ(e.event, kRejected);
  EXPECT_EQ(e.status, 28);
  // The listener's port was released with the dead context: a new one binds.
  Guest d(xen_.as(5));
  EXPECT_EQ(d.bind(d.create_id(), ipv4("192.0.2.5", 4005)), 0);
}

TEST_F(Cm, AnEstablishedPeerThatDiesDisconnects) {
  Guest a(xen_.as(5));
  const vibif_handle_t listen = listener(a, 4007);
  vibif_handle_t passive = 0;
  {
    Guest b(xen_.as(6));
    const vibif_handle_t active = b.routed_to(ipv4("192.0.2.5", 4007));
    ASSERT_EQ(b.connect(active, 0x46), 0);
    passive = a.event(listen).new_id;
    ASSERT_EQ(a.connect(passive, 0x47, {}, VIBIF_OP_CM_ACCEPT), 0);
    EXPECT_EQ(b.event(active).event, kConnectResponse);
    ASSERT_EQ(b.call(cm_request(VIBIF_OP_CM_ESTABLISH, active)), 0);
    EXPECT_EQ(a.event(passive).event, kEstablished);
  }
  EXPECT_EQ(a.event(passive).event, kDisconnected);
}

TEST_F(Cm, EveryEventIsAnnouncedOnTheDoorbellPage) {
  Guest a(xen_.as(5));
  const vibif_handle_t id = a.create_id();
  auto req = cm_request(VIBIF_OP_CM_RESOLVE_ADDR, id);
  req.u.cm_resolve_addr.dst = ipv4("127.0.0.1", 5000);
  ASSERT_EQ(a.call(req), 0);
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  std::optional<vibif_event> announced;
  while (!announced && std::chrono::steady_clock::now() < deadline) {
    announced = a.device->next_event();
    if (!announced) std::this_thread::sleep_for(2ms);
  }
  ASSERT_TRUE(announced);
  EXPECT_EQ(announced->type, VIBIF_EVENT_CM);
  EXPECT_EQ(announced->handle, id);
  EXPECT_EQ(a.event(id).event, kAddrResolved);
}

// With vibd's default timeout, a request waits up to a second for its listener.
TEST_F(Cm, ARequestWaitsBrieflyForAListenerBeingCreated) {
  // perftest re-creates its listener between two connections; a client that
  // is a little faster must not be rejected for it.
  Guest a(xen_.as(5)), b(xen_.as(6));
  const vibif_handle_t active = b.routed_to(ipv4("192.0.2.5", 4010));
  ASSERT_EQ(b.connect(active, 0x42, "early"), 0);
  const vibif_handle_t listen = listener(a, 4010);
  const auto req = a.event(listen);
  ASSERT_EQ(req.event, kConnectRequest);
  EXPECT_EQ(data_of(req), "early");
  EXPECT_TRUE(b.no_event(active));
}

}  // namespace
