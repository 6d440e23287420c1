// vibd as a real process on the host-local Xen, guests as real clients:
// the device handshake, per-process contexts and their cleanup.
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "local_xen.hpp"
#include "vib/front/channel.hpp"
#include "vib/platform/xenstore.hpp"

using namespace vib::platform;
using namespace std::chrono_literals;

namespace {

class Vibd : public ::testing::Test {
 protected:
  void SetUp() override {
    xen_.create_domain(5);
    xen_.create_domain(6);
    store_ = open_xenstore(xen_.as(0));
  }
  void TearDown() override { stop_vibd(); }

  void start_vibd() {
    const pid_t parent = ::getpid();
    pid_ = ::fork();
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive a killed test
      if (::getppid() != parent) ::_exit(1);
      ::execl(VIBD, VIBD, "--local-xen", xen_.dir().c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
  }
  int stop_vibd() {
    if (pid_ <= 0) return -1;
    ::kill(pid_, SIGTERM);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
    return status;
  }

  static std::string be(DomId domid, unsigned devid = 0) {
    return "/local/domain/0/backend/vib/" + std::to_string(domid) + "/" + std::to_string(devid);
  }
  static std::string fe(DomId domid, unsigned devid = 0) {
    return "/local/domain/" + std::to_string(domid) + "/device/vib/" + std::to_string(devid);
  }

  // What the toolstack writes for a device, with libxl's permissions.
  void provision(DomId domid, const std::string& hca = "soft") {
    with_transaction(*store_, [&](TransactionId tx) {
      store_->write(tx, be(domid) + "/frontend", fe(domid));
      store_->write(tx, be(domid) + "/frontend-id", std::to_string(domid));
      store_->write(tx, be(domid) + "/online", "1");
      store_->write(tx, be(domid) + "/state", "1");
      store_->write(tx, be(domid) + "/hca", hca);
      store_->set_permissions(tx, be(domid), {{kDom0, Access::none}, {domid, Access::read}});
      for (const char* key : {"/frontend", "/frontend-id", "/online", "/state", "/hca"})
        store_->set_permissions(tx, be(domid) + key, {{kDom0, Access::none}, {domid, Access::read}});
      store_->write(tx, fe(domid) + "/backend", be(domid));
      store_->write(tx, fe(domid) + "/backend-id", "0");
      store_->write(tx, fe(domid) + "/state", "1");
      for (const char* key : {"", "/backend", "/backend-id", "/state"})
        store_->set_permissions(tx, fe(domid) + key, {{domid, Access::none}, {kDom0, Access::read}});
    });
  }

  // Polls xenstore (bounded) until `path` reads `want` (nullopt: is absent).
  bool eventually(const std::string& path, std::optional<std::string> want, std::chrono::milliseconds limit = 5s) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < deadline) {
      if (store_->read(kNoTransaction, path) == want) return true;
      std::this_thread::sleep_for(10ms);
    }
    return false;
  }

  std::unique_ptr<vib::front::Channel> open_channel(DomId domid) {
    vib::front::ChannelOptions options;
    options.xen = xen_.as(domid);
    return vib::front::Channel::open(options);
  }

  static vibif_request request(std::uint16_t op) {
    vibif_request req;
    std::memset(&req, 0, sizeof(req));
    req.hdr.op = op;
    return req;
  }

  vib::test::LocalXen xen_;
  std::unique_ptr<XenStore> store_;
  pid_t pid_ = -1;
};

}  // namespace

TEST_F(Vibd, DeviceHandshakeAndControlRequests) {
  provision(5);
  start_vibd();
  ASSERT_TRUE(eventually(be(5) + "/state", "2")) << "InitWait";
  EXPECT_EQ(store_->read(kNoTransaction, be(5) + "/protocol-versions"), "1");
  auto channel = open_channel(5);
  EXPECT_EQ(store_->read(kNoTransaction, be(5) + "/state"), "4");
  const std::string ctx = be(5) + "/ctx/" + std::to_string(channel->context_id());
  EXPECT_EQ(store_->read(kNoTransaction, ctx + "/state"), "4");
  EXPECT_TRUE(store_->read(kNoTransaction, ctx + "/doorbell-ref"));

  auto dev = channel->call(request(VIBIF_OP_QUERY_DEVICE));
  ASSERT_EQ(dev.hdr.status, VIBIF_OK);
  EXPECT_STREQ(dev.u.query_device.fw_ver, "vib-soft 1.0");
  EXPECT_EQ(dev.u.query_device.max_pd, VIBIF_DEFAULT_MAX_PDS) << "quotas shape what the guest sees";

  auto port = request(VIBIF_OP_QUERY_PORT);
  port.u.query_port.port = 2;
  EXPECT_EQ(channel->call(port).hdr.status, VIBIF_EINVAL) << "only the configured port exists";

  // PDs: handles are checked, quotas enforced.
  std::vector<vibif_handle_t> pds;
  for (unsigned i = 0; i < VIBIF_DEFAULT_MAX_PDS; ++i) {
    auto rsp = channel->call(request(VIBIF_OP_ALLOC_PD));
    ASSERT_EQ(rsp.hdr.status, VIBIF_OK);
    pds.push_back(rsp.u.handle.handle);
  }
  EXPECT_EQ(channel->call(request(VIBIF_OP_ALLOC_PD)).hdr.status, VIBIF_EDQUOT);
  auto dealloc = request(VIBIF_OP_DEALLOC_PD);
  dealloc.u.handle.handle = pds[3];
  EXPECT_EQ(channel->call(dealloc).hdr.status, VIBIF_OK);
  EXPECT_EQ(channel->call(dealloc).hdr.status, VIBIF_ENOENT) << "a freed handle is stale";
  dealloc.u.handle.handle = pds[4] ^ 0x10000;  // right index, wrong generation
  EXPECT_EQ(channel->call(dealloc).hdr.status, VIBIF_ENOENT);
  auto bogus = request(999);
  EXPECT_EQ(channel->call(bogus).hdr.status, VIBIF_ENOSYS) << "unknown operation";

  channel.reset();
  EXPECT_TRUE(eventually(ctx + "/state", std::nullopt)) << "vibd closed and removed the context";
}

TEST_F(Vibd, ContextsAreIsolatedPerProcessAndPerGuest) {
  provision(5);
  provision(6);
  start_vibd();
  auto a = open_channel(5);
  auto b = open_channel(6);
  auto pd = a->call(request(VIBIF_OP_ALLOC_PD));
  ASSERT_EQ(pd.hdr.status, VIBIF_OK);
  // Another guest presenting the first guest's handle finds nothing.
  auto dealloc = request(VIBIF_OP_DEALLOC_PD);
  dealloc.u.handle.handle = pd.u.handle.handle;
  EXPECT_EQ(b->call(dealloc).hdr.status, VIBIF_ENOENT);
  EXPECT_EQ(a->call(dealloc).hdr.status, VIBIF_OK);
}

TEST_F(Vibd, AGuestProcessThatDiesIsCleanedUp) {
  provision(5);
  start_vibd();
  ASSERT_TRUE(eventually(be(5) + "/state", "2"));
  int pipefd[2];
  ASSERT_EQ(::pipe(pipefd), 0);
  const pid_t child = ::fork();
  if (child == 0) {
    auto channel = open_channel(5);
    auto pd = channel->call(request(VIBIF_OP_ALLOC_PD));
    const unsigned id = pd.hdr.status == VIBIF_OK ? channel->context_id() : 0;
    if (::write(pipefd[1], &id, sizeof(id)) != sizeof(id)) ::_exit(1);
    ::pause();
    ::_exit(0);
  }
  unsigned ctxid = 0;
  ASSERT_EQ(::read(pipefd[0], &ctxid, sizeof(ctxid)), static_cast<ssize_t>(sizeof(ctxid)));
  ASSERT_NE(ctxid, 0u);
  const std::string ctx = be(5) + "/ctx/" + std::to_string(ctxid);
  EXPECT_EQ(store_->read(kNoTransaction, ctx + "/state"), "4");
  ::kill(child, SIGKILL);  // no chance to close anything
  ::waitpid(child, nullptr, 0);
  EXPECT_TRUE(eventually(ctx + "/state", std::nullopt)) << "the crash was noticed and the context freed";
  // The device goes on serving new processes.
  auto again = open_channel(5);
  EXPECT_EQ(again->call(request(VIBIF_OP_ALLOC_PD)).hdr.status, VIBIF_OK);
}

TEST_F(Vibd, DomainDeathFreesItsContexts) {
  provision(5);
  start_vibd();
  auto channel = open_channel(5);
  const std::string ctx = be(5) + "/ctx/" + std::to_string(channel->context_id());
  ASSERT_EQ(channel->call(request(VIBIF_OP_ALLOC_PD)).hdr.status, VIBIF_OK);
  xen_.destroy_domain(5);
  EXPECT_TRUE(eventually(ctx + "/state", std::nullopt));
  // The toolstack then removes the back-end directory; vibd lets the device go.
  store_->remove(kNoTransaction, "/local/domain/0/backend/vib/5");
  EXPECT_EQ(stop_vibd(), 0) << "clean exit on SIGTERM";
}

TEST_F(Vibd, AMissingHcaIsAReadableErrorNotACrash) {
  provision(5, "mlx5_nonexistent");
  start_vibd();
  ASSERT_TRUE(eventually(be(5) + "/hotplug-status", "error"));
  EXPECT_EQ(store_->read(kNoTransaction, be(5) + "/state"), "6");
  const auto error = store_->read(kNoTransaction, be(5) + "/error");
  ASSERT_TRUE(error);
  EXPECT_NE(error->find("mlx5_nonexistent"), std::string::npos) << *error;
  // The guest is told why.
  try {
    open_channel(5);
    FAIL() << "opened a failed device";
  } catch (const std::system_error& e) {
    EXPECT_NE(std::string(e.what()).find("mlx5_nonexistent"), std::string::npos) << e.what();
  }
  // And vibd serves other guests meanwhile.
  provision(6);
  auto ok = open_channel(6);
  EXPECT_EQ(ok->call(request(VIBIF_OP_QUERY_DEVICE)).hdr.status, VIBIF_OK);
}

TEST_F(Vibd, AGarbageRingProducerClosesOnlyThatContext) {
  provision(5);
  provision(6);
  start_vibd();
  auto victim = open_channel(6);
  // A guest that lies about its ring is cut off; others are untouched. The
  // channel API cannot lie, so reach the shared ring through xenstore: the
  // guest owns its ctx nodes and could write anything there too.
  auto guest = open_xenstore(xen_.as(5));
  const std::string ctx = fe(5) + "/ctx/77";
  with_transaction(*guest, [&](TransactionId tx) {
    guest->write(tx, ctx + "/ring-page-order", "9");  // beyond the maximum
    guest->write(tx, ctx + "/ring-ref", "8");
    guest->write(tx, ctx + "/event-channel", "1");
    guest->write(tx, ctx + "/state", "3");
  });
  guest->write(kNoTransaction, fe(5) + "/state", "4");
  EXPECT_TRUE(eventually(be(5) + "/ctx/77/state", "6")) << "refused";
  const auto why = store_->read(kNoTransaction, be(5) + "/ctx/77/error");
  ASSERT_TRUE(why);
  EXPECT_NE(why->find("ring-page-order"), std::string::npos) << *why;
  EXPECT_EQ(victim->call(request(VIBIF_OP_QUERY_DEVICE)).hdr.status, VIBIF_OK);
}
