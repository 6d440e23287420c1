// The broker's path to peers outside vib (docs/rdma-cm.md): a guest on an
// rdma-core HCA connects through the host's rdma_cm. The host's rdma_cm is a
// scripted double behind platform::HostConnectionManager; the real one is
// proven in the lab (scenario m: rping against a native rping in dom0).
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <rdma/rdma_cma.h>
#include <sys/eventfd.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cm_broker.hpp"
#include "vib/platform/unique_fd.hpp"

namespace vib::backend {
namespace {

using platform::HostCmEvent;
using platform::HostCmId;
using platform::HostCmParam;
using platform::HostCmRoute;

std::string text_of(const sockaddr_storage& a) {
  char out[INET6_ADDRSTRLEN] = "";
  if (a.ss_family == AF_INET) {
    const auto& in = reinterpret_cast<const sockaddr_in&>(a);
    ::inet_ntop(AF_INET, &in.sin_addr, out, sizeof out);
    return std::string(out) + ":" + std::to_string(ntohs(in.sin_port));
  }
  return a.ss_family == 0 ? "none" : "other";
}

sockaddr_storage address(const char* ip, std::uint16_t port) {
  sockaddr_storage a{};
  auto& in = reinterpret_cast<sockaddr_in&>(a);
  in.sin_family = AF_INET;
  in.sin_port = htons(port);
  ::inet_pton(AF_INET, ip, &in.sin_addr);
  return a;
}

// What the scripted host rdma_cm saw and what it answers with.
struct HostScript {
  std::mutex mu;
  std::deque<HostCmEvent> events;
  platform::UniqueFd ready{::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)};
  std::vector<std::string> calls;  // "<id> <call> <detail>"
  int live_ids = 0;
  int next_id = 1;
  std::string device = "rxe0";
  ibv_qp_attr answer{};  // init_qp_attr's
  int answer_mask = 0;
  std::uint16_t pkey = 0xffff;

  void push(HostCmEvent e) {
    std::lock_guard lock(mu);
    events.push_back(std::move(e));
    const std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(ready.get(), &one, sizeof one);
  }
  void record(int id, const std::string& what) {
    std::lock_guard lock(mu);
    calls.push_back(std::to_string(id) + " " + what);
  }
  bool saw(const std::string& what) {
    std::lock_guard lock(mu);
    for (const auto& c : calls)
      if (c.find(what) != std::string::npos) return true;
    return false;
  }
  std::string all_calls() {
    std::lock_guard lock(mu);
    std::string out;
    for (const auto& c : calls) out += c + "\n";
    return out;
  }
};

class ScriptedId final : public HostCmId {
 public:
  ScriptedId(std::shared_ptr<HostScript> script, std::uint64_t token, HostCmRoute route = {})
      : script_(std::move(script)), token_(token), route_(route) {
    std::lock_guard lock(script_->mu);
    number_ = script_->next_id++;
    ++script_->live_ids;
  }
  ~ScriptedId() override {
    script_->record(number_, "destroyed");
    std::lock_guard lock(script_->mu);
    --script_->live_ids;
  }
  int bind(const sockaddr& addr) override {
    route_.src = reinterpret_cast<const sockaddr_storage&>(addr);
    script_->record(number_, "bind " + text_of(route_.src));
    return 0;
  }
  int resolve_addr(const sockaddr& src, const sockaddr& dst, int) override {
    route_.src = reinterpret_cast<const sockaddr_storage&>(src);
    route_.dst = reinterpret_cast<const sockaddr_storage&>(dst);
    script_->record(number_, "resolve_addr " + text_of(route_.src) + " -> " + text_of(route_.dst));
    return 0;
  }
  int resolve_route(int) override {
    script_->record(number_, "resolve_route");
    return 0;
  }
  int listen(int) override {
    script_->record(number_, "listen");
    return 0;
  }
  int connect(const HostCmParam& p) override {
    script_->record(number_, "connect qp " + std::to_string(p.qp_num) + " data " +
                                 std::string(p.private_data.begin(), p.private_data.end()));
    return 0;
  }
  int accept(const HostCmParam& p) override {
    script_->record(number_, "accept qp " + std::to_string(p.qp_num) + " data " +
                                 std::string(p.private_data.begin(), p.private_data.end()));
    return 0;
  }
  int reject(std::span<const std::uint8_t> data) override {
    script_->record(number_, "reject " + std::string(data.begin(), data.end()));
    return 0;
  }
  int establish() override {
    script_->record(number_, "establish");
    return 0;
  }
  int disconnect() override {
    script_->record(number_, "disconnect");
    return 0;
  }
  int init_qp_attr(ibv_qp_attr& attr, int& mask) override {
    script_->record(number_, "init_qp_attr " + std::to_string(attr.qp_state));
    std::lock_guard lock(script_->mu);
    if (attr.qp_state != script_->answer.qp_state) return EINVAL;  // as the kernel: it answers for a state
    attr = script_->answer;
    mask = script_->answer_mask;
    return 0;
  }
  std::string device_name() const override {
    std::lock_guard lock(script_->mu);
    return script_->device;
  }
  std::uint8_t port_num() const override { return 1; }
  int query_pkey(std::uint16_t, std::uint16_t& pkey) const override {
    std::lock_guard lock(script_->mu);
    pkey = script_->pkey;
    return 0;
  }
  HostCmRoute route() const override { return route_; }
  void set_token(std::uint64_t token) override { token_ = token; }

  std::uint64_t token() const { return token_; }

 private:
  std::shared_ptr<HostScript> script_;
  int number_ = 0;
  std::uint64_t token_;
  HostCmRoute route_;
};

class ScriptedHostCm final : public platform::HostConnectionManager {
 public:
  explicit ScriptedHostCm(std::shared_ptr<HostScript> script) : script_(std::move(script)) {}
  std::unique_ptr<HostCmId> create_id(std::uint64_t token, int port_space) override {
    auto id = std::make_unique<ScriptedId>(script_, token);
    script_->record(0, "create_id ps " + std::to_string(port_space) + " token " + std::to_string(token));
    return id;
  }
  int event_fd() const override { return script_->ready.get(); }
  std::optional<HostCmEvent> next_event() override {
    std::lock_guard lock(script_->mu);
    if (script_->events.empty()) {
      std::uint64_t value;
      [[maybe_unused]] auto n = ::read(script_->ready.get(), &value, sizeof value);
      return std::nullopt;
    }
    HostCmEvent e = std::move(script_->events.front());
    script_->events.pop_front();
    return e;
  }

 private:
  std::shared_ptr<HostScript> script_;
};

const DeviceId kGuest{5, 0};

class HostCm : public ::testing::Test {
 protected:
  HostCm()
      : broker_(std::chrono::seconds(5), [this]() -> std::unique_ptr<platform::HostConnectionManager> {
          ++opened_;
          if (host_unavailable_) throw std::system_error(ENODEV, std::generic_category(), "rdma_create_event_channel");
          return std::make_unique<ScriptedHostCm>(script_);
        }) {}
  ~HostCm() override {
    if (endpoint_) broker_.close(*endpoint_);
  }

  // The guest's device on "rxe0": GID table {host 0, host 3}, P_Key 0xffff.
  void add_rxe_device(std::vector<const char*> addresses = {"192.0.2.10"}) {
    std::vector<IpAddress> ips;
    for (const char* a : addresses) ips.push_back(*IpAddress::parse(a));
    broker_.add_device(kGuest, ips, CmPort{}, CmHostView{"rxe0", 1, {0, 3}, {0xffff}});
    open();
  }
  void open() {
    endpoint_ = broker_.open(kGuest, "dom5/vib0 ctx 1", [this] {
      std::lock_guard lock(wake_mu_);
      ++wakes_;
      wake_cv_.notify_all();
    });
  }

  vibif_response call(std::uint16_t op, vibif_handle_t id, const void* body = nullptr, std::size_t size = 0) {
    vibif_request req;
    std::memset(&req, 0, sizeof req);
    req.hdr.op = op;
    if (body) std::memcpy(&req.u, body, size);
    else std::memcpy(&req.u, &id, sizeof id);
    return endpoint_->execute(req);
  }
  vibif_handle_t create_id(bool ud = false) {
    vibif_cm_create_id_req r{};
    r.port_space = ud ? VIBIF_CM_PS_UDP : VIBIF_CM_PS_TCP;
    r.qp_type = ud ? VIBIF_QPT_UD : VIBIF_QPT_RC;
    const auto rsp = call(VIBIF_OP_CM_CREATE_ID, 0, &r, sizeof r);
    EXPECT_EQ(rsp.hdr.status, VIBIF_OK);
    return rsp.u.handle.handle;
  }
  static vibif_cm_addr wire(const char* ip, std::uint16_t port) {
    vibif_cm_addr a{};
    a.family = VIBIF_AF_INET;
    a.port = port;
    ::inet_pton(AF_INET, ip, a.addr);
    return a;
  }
  int resolve(vibif_handle_t id, const char* dst, std::uint16_t port) {
    vibif_cm_resolve_addr_req r{};
    r.id = id;
    r.dst = wire(dst, port);
    return call(VIBIF_OP_CM_RESOLVE_ADDR, id, &r, sizeof r).hdr.status;
  }
  // The id's next event, once the broker has one (the host's events arrive
  // on the broker's thread); fails the test after 10 s of nothing.
  vibif_cm_event_resp next_event(vibif_handle_t id) {
    std::unique_lock lock(wake_mu_);
    for (int waited = 0; waited < 1000; ++waited) {
      lock.unlock();
      const auto rsp = call(VIBIF_OP_CM_GET_EVENT, id);
      lock.lock();
      if (rsp.hdr.status == VIBIF_OK) return rsp.u.cm_event;
      const int seen = wakes_;
      wake_cv_.wait_for(lock, std::chrono::milliseconds(10), [&] { return wakes_ != seen; });
    }
    ADD_FAILURE() << "no CM event for id " << id;
    return {};
  }
  // An event from the host for the id the broker registered under `token`.
  void host_event(std::uint64_t token, int type, int status = 0, HostCmParam param = {},
                  std::unique_ptr<HostCmId> new_id = nullptr) {
    HostCmEvent e;
    e.token = token;
    e.type = type;
    e.status = status;
    e.param = std::move(param);
    e.new_id = std::move(new_id);
    script_->push(std::move(e));
  }
  // The token of the host id the broker created last.
  std::uint64_t last_token() {
    std::lock_guard lock(script_->mu);
    for (auto it = script_->calls.rbegin(); it != script_->calls.rend(); ++it) {
      const auto at = it->find("token ");
      if (at != std::string::npos) return std::stoull(it->substr(at + 6));
    }
    return 0;
  }
  // Through ADDR_RESOLVED and ROUTE_RESOLVED to 192.0.2.1:7000.
  vibif_handle_t resolved_id(bool ud = false) {
    const vibif_handle_t id = create_id(ud);
    EXPECT_EQ(resolve(id, "192.0.2.1", 7000), VIBIF_OK);
    const std::uint64_t token = last_token();
    EXPECT_NE(token, 0u);
    host_event(token, RDMA_CM_EVENT_ADDR_RESOLVED);
    EXPECT_EQ(next_event(id).event, RDMA_CM_EVENT_ADDR_RESOLVED);
    EXPECT_EQ(call(VIBIF_OP_CM_RESOLVE_ROUTE, id).hdr.status, VIBIF_OK);
    host_event(token, RDMA_CM_EVENT_ROUTE_RESOLVED);
    EXPECT_EQ(next_event(id).event, RDMA_CM_EVENT_ROUTE_RESOLVED);
    return id;
  }

  std::shared_ptr<HostScript> script_ = std::make_shared<HostScript>();
  bool host_unavailable_ = false;
  int opened_ = 0;
  std::mutex wake_mu_;
  std::condition_variable wake_cv_;
  int wakes_ = 0;
  CmBroker broker_;
  std::shared_ptr<CmEndpoint> endpoint_;
};

TEST_F(HostCm, AnActiveConnectionRunsThroughTheHostsRdmaCmWithTheGuestsQpAndTables) {
  add_rxe_device();
  const vibif_handle_t id = resolved_id();
  EXPECT_TRUE(script_->saw("resolve_addr 192.0.2.10:0 -> 192.0.2.1:7000")) << script_->all_calls();
  const std::uint64_t token = last_token();

  vibif_cm_connect_req c{};
  c.id = id;
  c.param.qp_num = 0x123;
  c.param.private_data_len = 5;
  std::memcpy(c.private_data, "hello", 5);
  ASSERT_EQ(call(VIBIF_OP_CM_CONNECT, id, &c, sizeof c).hdr.status, VIBIF_OK);
  EXPECT_TRUE(script_->saw("connect qp 291 data hello")) << script_->all_calls();

  HostCmParam rep;
  rep.qp_num = 0x456;
  rep.responder_resources = 4;
  rep.private_data = {'w', 'o', 'r', 'l', 'd'};
  host_event(token, RDMA_CM_EVENT_CONNECT_RESPONSE, 0, rep);
  const auto response = next_event(id);
  EXPECT_EQ(response.event, RDMA_CM_EVENT_CONNECT_RESPONSE);
  EXPECT_EQ(response.param.qp_num, 0x456u);
  EXPECT_EQ(response.param.responder_resources, 4);
  ASSERT_EQ(response.param.private_data_len, 5);
  EXPECT_EQ(std::memcmp(response.private_data, "world", 5), 0);

  // RTR as the host's rdma_cm gives it, in the guest's terms: host GID 3 is
  // the guest's index 1, the device's port is the guest's port 1.
  {
    std::lock_guard lock(script_->mu);
    auto& a = script_->answer;
    a.qp_state = IBV_QPS_RTR;
    a.path_mtu = IBV_MTU_1024;
    a.dest_qp_num = 0x456;
    a.rq_psn = 77;
    a.ah_attr.is_global = 1;
    a.ah_attr.grh.sgid_index = 3;
    a.ah_attr.grh.hop_limit = 64;
    a.ah_attr.grh.dgid.raw[15] = 1;
    a.ah_attr.port_num = 1;
    a.max_dest_rd_atomic = 4;
    script_->answer_mask = IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                           IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER | IBV_QP_ALT_PATH;
  }
  vibif_cm_id_req q{id, IBV_QPS_RTR};
  const auto rtr = call(VIBIF_OP_CM_INIT_QP_ATTR, id, &q, sizeof q);
  ASSERT_EQ(rtr.hdr.status, VIBIF_OK);
  const auto& attr = rtr.u.cm_qp_attr.attr;
  EXPECT_TRUE(script_->saw("init_qp_attr 2")) << script_->all_calls();
  EXPECT_EQ(attr.ah_attr.sgid_index, 1);
  EXPECT_EQ(attr.ah_attr.port_num, 1);
  EXPECT_EQ(attr.ah_attr.is_global, 1);
  EXPECT_EQ(attr.ah_attr.dgid[15], 1);
  EXPECT_EQ(attr.dest_qp_num, 0x456u);
  EXPECT_EQ(attr.rq_psn, 77u);
  EXPECT_EQ(attr.max_dest_rd_atomic, 4);
  // What the guest cannot set (an alternate path) is not passed on.
  EXPECT_EQ(rtr.u.cm_qp_attr.attr_mask & IBV_QP_ALT_PATH, 0u);
  EXPECT_NE(rtr.u.cm_qp_attr.attr_mask & IBV_QP_AV, 0u);

  ASSERT_EQ(call(VIBIF_OP_CM_ESTABLISH, id).hdr.status, VIBIF_OK);
  EXPECT_TRUE(script_->saw("establish"));
  ASSERT_EQ(call(VIBIF_OP_CM_DISCONNECT, id).hdr.status, VIBIF_OK);
  EXPECT_TRUE(script_->saw("disconnect"));
  host_event(token, RDMA_CM_EVENT_DISCONNECTED);
  EXPECT_EQ(next_event(id).event, RDMA_CM_EVENT_DISCONNECTED);

  ASSERT_EQ(call(VIBIF_OP_CM_DESTROY_ID, id).hdr.status, VIBIF_OK);
  std::lock_guard lock(script_->mu);
  EXPECT_EQ(script_->live_ids, 0);
}

TEST_F(HostCm, AUdPeerOutsideVibAnswersTheSidrRequestWithItsQpAndAddress) {
  add_rxe_device();
  const vibif_handle_t id = resolved_id(/*ud=*/true);
  const std::uint64_t token = last_token();
  EXPECT_TRUE(script_->saw("create_id ps " + std::to_string(RDMA_PS_UDP))) << script_->all_calls();
  vibif_cm_connect_req c{};
  c.id = id;
  c.param.qp_num = 0x321;
  c.param.private_data_len = 3;
  std::memcpy(c.private_data, "udp", 3);
  ASSERT_EQ(call(VIBIF_OP_CM_CONNECT, id, &c, sizeof c).hdr.status, VIBIF_OK);
  EXPECT_TRUE(script_->saw("connect qp 801 data udp")) << script_->all_calls();

  HostCmParam rep;
  rep.qp_num = 0x654;
  rep.qkey = 0x01234567;
  ibv_ah_attr ah{};
  ah.is_global = 1;
  ah.grh.sgid_index = 3;
  ah.grh.dgid.raw[15] = 9;
  ah.grh.hop_limit = 64;
  ah.port_num = 1;
  rep.ah = ah;
  host_event(token, RDMA_CM_EVENT_ESTABLISHED, 0, rep);
  const auto established = next_event(id);
  EXPECT_EQ(established.event, RDMA_CM_EVENT_ESTABLISHED);
  EXPECT_EQ(established.param.qp_num, 0x654u);
  EXPECT_EQ(established.param.qkey, 0x01234567u);
  // The guest builds its address handle from the route: in its own terms.
  const auto route = call(VIBIF_OP_CM_QUERY_ROUTE, id);
  ASSERT_EQ(route.hdr.status, VIBIF_OK);
  EXPECT_EQ(route.u.cm_route.ah_attr.is_global, 1);
  EXPECT_EQ(route.u.cm_route.ah_attr.sgid_index, 1);
  EXPECT_EQ(route.u.cm_route.ah_attr.dgid[15], 9);
  EXPECT_EQ(route.u.cm_route.ah_attr.port_num, 1);
}

TEST_F(HostCm, AUdListenerAnswersSidrRequestsFromOutsideVib) {
  add_rxe_device();
  const vibif_handle_t listener = create_id(/*ud=*/true);
  vibif_cm_bind_req b{};
  b.id = listener;
  b.addr = wire("192.0.2.10", 7174);
  ASSERT_EQ(call(VIBIF_OP_CM_BIND, listener, &b, sizeof b).hdr.status, VIBIF_OK);
  vibif_cm_id_req l{listener, 4};
  ASSERT_EQ(call(VIBIF_OP_CM_LISTEN, listener, &l, sizeof l).hdr.status, VIBIF_OK);
  EXPECT_TRUE(script_->saw("bind 192.0.2.10:7174")) << script_->all_calls();
  HostCmRoute route;
  route.src = address("192.0.2.10", 7174);
  route.dst = address("192.0.2.1", 40000);
  HostCmParam req;
  req.private_data = {'q'};
  ibv_ah_attr ah{};
  ah.is_global = 1;
  ah.grh.sgid_index = 0;
  req.ah = ah;
  host_event(last_token(), RDMA_CM_EVENT_CONNECT_REQUEST, 0, req, std::make_unique<ScriptedId>(script_, 0, route));
  const auto request = next_event(listener);
  ASSERT_EQ(request.event, RDMA_CM_EVENT_CONNECT_REQUEST);
  EXPECT_EQ(request.param.qp_num, 0u);  // a SIDR request names no QP
  vibif_cm_connect_req a{};
  a.id = request.new_id;
  a.param.qp_num = 0x88;
  ASSERT_EQ(call(VIBIF_OP_CM_ACCEPT, request.new_id, &a, sizeof a).hdr.status, VIBIF_OK);
  EXPECT_TRUE(script_->saw("accept qp 136")) << script_->all_calls();
  // The SIDR reply is all: no RTU, no event; the id is usable at once.
  const auto route_rsp = call(VIBIF_OP_CM_QUERY_ROUTE, request.new_id);
  EXPECT_EQ(route_rsp.u.cm_route.ah_attr.is_global, 1);
  EXPECT_EQ(route_rsp.u.cm_route.ah_attr.sgid_index, 0);
}

TEST_F(HostCm, AGidOrPKeyOutsideTheDevicesTablesIsRefused) {
  add_rxe_device();
  const vibif_handle_t id = resolved_id();
  {
    std::lock_guard lock(script_->mu);
    script_->answer.qp_state = IBV_QPS_RTR;
    script_->answer.ah_attr.is_global = 1;
    script_->answer.ah_attr.grh.sgid_index = 5;  // not in {0, 3}
    script_->answer_mask = IBV_QP_STATE | IBV_QP_AV;
  }
  vibif_cm_id_req rtr{id, IBV_QPS_RTR};
  EXPECT_EQ(call(VIBIF_OP_CM_INIT_QP_ATTR, id, &rtr, sizeof rtr).hdr.status, VIBIF_EPERM);
  {
    std::lock_guard lock(script_->mu);
    script_->answer = ibv_qp_attr{};
    script_->answer.qp_state = IBV_QPS_INIT;
    script_->answer.port_num = 1;
    script_->answer_mask = IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT;
    script_->pkey = 0x8001;  // the device allows only 0xffff
  }
  vibif_cm_id_req init{id, IBV_QPS_INIT};
  EXPECT_EQ(call(VIBIF_OP_CM_INIT_QP_ATTR, id, &init, sizeof init).hdr.status, VIBIF_EPERM);
  {
    std::lock_guard lock(script_->mu);
    script_->pkey = 0xffff;
  }
  const auto ok = call(VIBIF_OP_CM_INIT_QP_ATTR, id, &init, sizeof init);
  EXPECT_EQ(ok.hdr.status, VIBIF_OK);
  EXPECT_EQ(ok.u.cm_qp_attr.attr.pkey_index, 0);
}

TEST_F(HostCm, ARequestFromOutsideVibReachesTheGuestsListenerAndItsAcceptGoesBack) {
  add_rxe_device();
  const vibif_handle_t listener = create_id();
  vibif_cm_bind_req b{};
  b.id = listener;
  b.addr = wire("192.0.2.10", 7001);
  ASSERT_EQ(call(VIBIF_OP_CM_BIND, listener, &b, sizeof b).hdr.status, VIBIF_OK);
  vibif_cm_id_req l{listener, 8};
  ASSERT_EQ(call(VIBIF_OP_CM_LISTEN, listener, &l, sizeof l).hdr.status, VIBIF_OK);
  EXPECT_TRUE(script_->saw("bind 192.0.2.10:7001")) << script_->all_calls();
  EXPECT_TRUE(script_->saw("listen"));
  const std::uint64_t token = last_token();

  HostCmRoute route;
  route.src = address("192.0.2.10", 7001);
  route.dst = address("192.0.2.1", 5555);
  auto incoming = std::make_unique<ScriptedId>(script_, 0, route);
  ScriptedId* incoming_id = incoming.get();
  HostCmParam req;
  req.qp_num = 0x777;
  req.initiator_depth = 2;
  req.private_data = {'h', 'i'};
  host_event(token, RDMA_CM_EVENT_CONNECT_REQUEST, 0, req, std::move(incoming));
  const auto request = next_event(listener);
  ASSERT_EQ(request.event, RDMA_CM_EVENT_CONNECT_REQUEST);
  EXPECT_EQ(request.param.qp_num, 0x777u);
  EXPECT_EQ(request.param.initiator_depth, 2);
  ASSERT_EQ(request.param.private_data_len, 2);
  EXPECT_EQ(std::memcmp(request.private_data, "hi", 2), 0);
  const vibif_handle_t child = request.new_id;
  ASSERT_NE(child, VIBIF_HANDLE_NONE);

  const auto route_rsp = call(VIBIF_OP_CM_QUERY_ROUTE, child);
  ASSERT_EQ(route_rsp.hdr.status, VIBIF_OK);
  EXPECT_EQ(route_rsp.u.cm_route.dst.port, 5555);
  EXPECT_EQ(route_rsp.u.cm_route.dst.addr[3], 1);
  EXPECT_EQ(route_rsp.u.cm_route.src.port, 7001);

  vibif_cm_connect_req a{};
  a.id = child;
  a.param.qp_num = 0x999;
  a.param.private_data_len = 2;
  std::memcpy(a.private_data, "ok", 2);
  ASSERT_EQ(call(VIBIF_OP_CM_ACCEPT, child, &a, sizeof a).hdr.status, VIBIF_OK);
  EXPECT_TRUE(script_->saw("accept qp 2457 data ok")) << script_->all_calls();
  const std::uint64_t child_token = incoming_id->token();
  EXPECT_NE(child_token, token);
  host_event(child_token, RDMA_CM_EVENT_ESTABLISHED);
  EXPECT_EQ(next_event(child).event, RDMA_CM_EVENT_ESTABLISHED);
}

TEST_F(HostCm, AWildcardListenerIsReachableOnlyAtTheGuestsOwnAddresses) {
  add_rxe_device({"192.0.2.10", "192.0.2.11"});
  const vibif_handle_t listener = create_id();
  vibif_cm_bind_req b{};
  b.id = listener;
  b.addr = wire("0.0.0.0", 7002);
  ASSERT_EQ(call(VIBIF_OP_CM_BIND, listener, &b, sizeof b).hdr.status, VIBIF_OK);
  vibif_cm_id_req l{listener, 0};
  ASSERT_EQ(call(VIBIF_OP_CM_LISTEN, listener, &l, sizeof l).hdr.status, VIBIF_OK);
  EXPECT_TRUE(script_->saw("bind 192.0.2.10:7002"));
  EXPECT_TRUE(script_->saw("bind 192.0.2.11:7002"));
  EXPECT_FALSE(script_->saw("bind 0.0.0.0")) << script_->all_calls();
}

TEST_F(HostCm, TheHostIdNeverSpeaksFromAnAddressThatIsNotTheGuests) {
  add_rxe_device();
  const vibif_handle_t id = create_id();
  vibif_cm_bind_req b{};
  b.id = id;
  b.addr = wire("127.0.0.1", 0);
  ASSERT_EQ(call(VIBIF_OP_CM_BIND, id, &b, sizeof b).hdr.status, VIBIF_OK);
  ASSERT_EQ(resolve(id, "192.0.2.1", 7000), VIBIF_OK);
  const auto e = next_event(id);
  EXPECT_EQ(e.event, RDMA_CM_EVENT_ADDR_ERROR);
  EXPECT_EQ(e.status, -EADDRNOTAVAIL);
  EXPECT_FALSE(script_->saw("resolve_addr")) << script_->all_calls();
}

TEST_F(HostCm, AnAddressTheHostReachesThroughAnotherHcaIsAnError) {
  add_rxe_device();
  {
    std::lock_guard lock(script_->mu);
    script_->device = "mlx5_0";
  }
  const vibif_handle_t id = create_id();
  ASSERT_EQ(resolve(id, "198.51.100.7", 7000), VIBIF_OK);
  host_event(last_token(), RDMA_CM_EVENT_ADDR_RESOLVED);
  const auto e = next_event(id);
  EXPECT_EQ(e.event, RDMA_CM_EVENT_ADDR_ERROR);
  EXPECT_EQ(e.status, -EHOSTUNREACH);
  std::lock_guard lock(script_->mu);
  EXPECT_EQ(script_->live_ids, 0);  // the host id went with the error
}

TEST_F(HostCm, ClosingTheContextDestroysEveryHostIdItHad) {
  add_rxe_device();
  const vibif_handle_t active = resolved_id();
  vibif_cm_connect_req c{};
  c.id = active;
  c.param.qp_num = 0x55;
  ASSERT_EQ(call(VIBIF_OP_CM_CONNECT, active, &c, sizeof c).hdr.status, VIBIF_OK);
  const vibif_handle_t listener = create_id();
  vibif_cm_id_req l{listener, 0};
  vibif_cm_bind_req b{};
  b.id = listener;
  b.addr = wire("192.0.2.10", 7003);
  ASSERT_EQ(call(VIBIF_OP_CM_BIND, listener, &b, sizeof b).hdr.status, VIBIF_OK);
  ASSERT_EQ(call(VIBIF_OP_CM_LISTEN, listener, &l, sizeof l).hdr.status, VIBIF_OK);
  {
    std::lock_guard lock(script_->mu);
    EXPECT_EQ(script_->live_ids, 2);
  }
  broker_.close(*endpoint_);
  endpoint_.reset();
  std::lock_guard lock(script_->mu);
  EXPECT_EQ(script_->live_ids, 0);
}

TEST_F(HostCm, TheDeviceHoldsABoundedNumberOfHostIds) {
  // Two processes of the guest listen as much as they may: host rdma_cm ids
  // are dom0's kernel memory, so the device as a whole gets 1024.
  add_rxe_device();
  auto second = broker_.open(kGuest, "dom5/vib0 ctx 2", [] {});
  int listened = 0;
  for (auto* ep : {endpoint_.get(), second.get()}) {
    for (int i = 0; i < 600; ++i) {
      vibif_cm_create_id_req r{};
      r.port_space = VIBIF_CM_PS_TCP;
      r.qp_type = VIBIF_QPT_RC;
      vibif_request req{};
      req.hdr.op = VIBIF_OP_CM_CREATE_ID;
      std::memcpy(&req.u, &r, sizeof r);
      const auto created = ep->execute(req);
      ASSERT_EQ(created.hdr.status, VIBIF_OK);
      vibif_cm_id_req l{created.u.handle.handle, 1};
      req.hdr.op = VIBIF_OP_CM_LISTEN;
      std::memset(&req.u, 0, sizeof req.u);
      std::memcpy(&req.u, &l, sizeof l);
      // Every guest listener works for vib's guests; only host ids run out.
      ASSERT_EQ(ep->execute(req).hdr.status, VIBIF_OK);
      ++listened;
    }
  }
  EXPECT_EQ(listened, 1200);
  {
    std::lock_guard lock(script_->mu);
    EXPECT_EQ(script_->live_ids, 1024);
  }
  // Ids given back make room again.
  broker_.close(*second);
  {
    std::lock_guard lock(script_->mu);
    EXPECT_EQ(script_->live_ids, 600);
  }
  const vibif_handle_t more = create_id();
  vibif_cm_id_req l{more, 1};
  ASSERT_EQ(call(VIBIF_OP_CM_LISTEN, more, &l, sizeof l).hdr.status, VIBIF_OK);
  std::lock_guard lock(script_->mu);
  EXPECT_EQ(script_->live_ids, 601);
}

TEST_F(HostCm, WithoutTheHostsRdmaCmOnlyVibGuestsAreReachable) {
  host_unavailable_ = true;
  add_rxe_device();
  const vibif_handle_t id = create_id();
  ASSERT_EQ(resolve(id, "192.0.2.1", 7000), VIBIF_OK);
  const auto e = next_event(id);
  EXPECT_EQ(e.event, RDMA_CM_EVENT_ADDR_ERROR);
  EXPECT_EQ(e.status, -ENETUNREACH);
  // Tried once, not on every request.
  const vibif_handle_t again = create_id();
  ASSERT_EQ(resolve(again, "192.0.2.1", 7000), VIBIF_OK);
  EXPECT_EQ(next_event(again).event, RDMA_CM_EVENT_ADDR_ERROR);
  EXPECT_EQ(opened_, 1);
}

TEST_F(HostCm, TheSoftwareHcaNeverOpensTheHostsRdmaCm) {
  broker_.add_device(kGuest, {*IpAddress::parse("192.0.2.10")}, CmPort{});
  open();
  const vibif_handle_t id = create_id();
  ASSERT_EQ(resolve(id, "192.0.2.1", 7000), VIBIF_OK);
  const auto e = next_event(id);
  EXPECT_EQ(e.event, RDMA_CM_EVENT_ADDR_ERROR);
  EXPECT_EQ(e.status, -EHOSTUNREACH);
  EXPECT_EQ(opened_, 0);
}

}  // namespace
}  // namespace vib::backend
