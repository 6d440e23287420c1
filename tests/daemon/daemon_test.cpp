// vibd as a real process on the host-local Xen, guests as real clients:
// the device handshake, per-process contexts and their cleanup.
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <sys/stat.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <cstring>
#include <thread>

#include "local_xen.hpp"
#include "vibd_fixture.hpp"
#include "vib/front/channel.hpp"
#include "vib/platform/xenstore.hpp"

using namespace vib::platform;
using namespace std::chrono_literals;

namespace {

class Vibd : public vib::test::VibdFixture {
 protected:
  void start_vibd() { VibdFixture::start_vibd(VIBD); }

  std::unique_ptr<vib::front::Channel> open_channel(DomId domid) {
    vib::front::ChannelOptions options;
    options.xen = xen_.as(domid);
    return vib::front::Channel::open(options);
  }
};

}  // namespace

TEST_F(Vibd, DeviceHandshakeAndControlRequests) {
  provision(5);
  start_vibd();
  ASSERT_TRUE(eventually(be(5) + "/state", "2")) << "InitWait";
  EXPECT_EQ(store_->read(kNoTransaction, be(5) + "/protocol-versions"), "2");
  auto channel = open_channel(5);
  EXPECT_EQ(store_->read(kNoTransaction, be(5) + "/state"), "4");
  const std::string ctx = be(5) + "/ctx/" + std::to_string(channel->context_id());
  EXPECT_EQ(store_->read(kNoTransaction, ctx + "/state"), "4");
  EXPECT_FALSE(store_->read(kNoTransaction, ctx + "/doorbell-ref")) << "the process shares its doorbell page";
  EXPECT_TRUE(store_->read(kNoTransaction, fe(5) + "/ctx/" + std::to_string(channel->context_id()) + "/doorbell-ref"));

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

// vibd killed (-9) and started again while a guest process holds a context:
// the new vibd has none of that context's state, so it closes it, and the
// process's next call fails at once (not after the call timeout); a new
// context works.
TEST_F(Vibd, AContextOfAKilledVibdIsClosedByTheNextOne) {
  provision(5);
  start_vibd();
  vib::front::ChannelOptions options;
  options.xen = xen_.as(5);
  options.timeout = 20s;
  auto channel = vib::front::Channel::open(options);
  ASSERT_EQ(channel->call(request(VIBIF_OP_ALLOC_PD)).hdr.status, VIBIF_OK);
  const std::string ctx = be(5) + "/ctx/" + std::to_string(channel->context_id());
  kill_vibd();
  start_vibd();
  ASSERT_GT(pid_, 0);
  EXPECT_TRUE(eventually(ctx + "/state", "6")) << "the orphaned context is closed";
  EXPECT_TRUE(store_->read(kNoTransaction, ctx + "/" VIBIF_XS_ERROR)) << "with the reason";
  const auto start = std::chrono::steady_clock::now();
  try {
    channel->call(request(VIBIF_OP_QUERY_DEVICE));
    ADD_FAILURE() << "a call on the lost context succeeded";
  } catch (const std::system_error& e) {
    EXPECT_EQ(e.code().value(), ENODEV) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s) << "the call failed fast, not at its timeout";
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
  // No doorbell page, then one that was never granted to dom0.
  for (const auto& [id, doorbell] : {std::pair{"78", ""}, std::pair{"79", "4095"}}) {
    const std::string c = fe(5) + "/ctx/" + id;
    with_transaction(*guest, [&](TransactionId tx) {
      guest->write(tx, c + "/ring-page-order", "0");
      guest->write(tx, c + "/ring-ref", "8");
      guest->write(tx, c + "/event-channel", "1");
      if (*doorbell) guest->write(tx, c + "/doorbell-ref", doorbell);
      guest->write(tx, c + "/state", "3");
    });
    EXPECT_TRUE(eventually(be(5) + "/ctx/" + id + "/state", "6")) << "refused: doorbell-ref '" << doorbell << "'";
    const auto refusal = store_->read(kNoTransaction, be(5) + "/ctx/" + id + "/error");
    ASSERT_TRUE(refusal);
    if (!*doorbell) {
      EXPECT_NE(refusal->find("doorbell-ref"), std::string::npos) << *refusal;
    }
  }
  EXPECT_EQ(victim->call(request(VIBIF_OP_QUERY_DEVICE)).hdr.status, VIBIF_OK);
}

TEST_F(Vibd, ADeviceReaddedBeforeVibdLooksStartsAfresh) {
  provision(5, "mlx5_nonexistent");
  start_vibd();
  ASSERT_TRUE(eventually(be(5) + "/hotplug-status", "error"));
  // The toolstack removes the failed device and adds a good one with the same
  // devid in one transaction: vibd never sees the directory missing.
  with_transaction(*store_, [&](TransactionId tx) {
    store_->remove(tx, be(5));
    provision_in(tx, 5, "soft");
  });
  ASSERT_TRUE(eventually(be(5) + "/state", "2")) << "the new device reaches InitWait";
  EXPECT_FALSE(store_->read(kNoTransaction, be(5) + "/error")) << "nothing of the old one written back";
  auto channel = open_channel(5);
  EXPECT_EQ(channel->call(request(VIBIF_OP_QUERY_DEVICE)).hdr.status, VIBIF_OK);
}

TEST_F(Vibd, RunsTheHotplugScriptOnAddAndOnUnplug) {
  char dir_template[] = "/tmp/vib-hotplug-XXXXXX";
  ASSERT_TRUE(::mkdtemp(dir_template));
  const std::string dir = dir_template;
  const std::string trace = dir + "/trace";
  {
    std::ofstream script(dir + "/record");
    script << "#!/bin/sh\n"
              "echo \"$1 $XENBUS_PATH $XENBUS_TYPE\" >> " << trace << "\n"
              "[ \"$1\" = add ] && xenstore-write \"$XENBUS_PATH/hotplug-status\" connected\n"
              "exit 0\n";
  }
  ::chmod((dir + "/record").c_str(), 0755);
  auto read_trace = [&] {
    std::ifstream in(trace);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  provision(5);
  store_->write(kNoTransaction, be(5) + "/script", "record");  // relative: under --scripts-dir
  provision(6);
  store_->write(kNoTransaction, be(6) + "/script", "../record");
  VibdFixture::start_vibd(VIBD, {}, {"--scripts-dir", dir});

  ASSERT_TRUE(eventually(be(5) + "/hotplug-status", "connected"));
  EXPECT_EQ(read_trace(), "add " + be(5) + " vib\n");
  auto channel = open_channel(5);
  EXPECT_EQ(channel->call(request(VIBIF_OP_QUERY_DEVICE)).hdr.status, VIBIF_OK);
  // A relative name may not leave the scripts directory.
  ASSERT_TRUE(eventually(be(6) + "/hotplug-status", "error"));
  EXPECT_EQ(store_->read(kNoTransaction, be(6) + "/error"), "bad hotplug script name '../record'");

  // Unplugged: the script's remove runs, then the back-end reports Closed.
  store_->write(kNoTransaction, be(5) + "/online", "0");
  ASSERT_TRUE(eventually(be(5) + "/state", "6"));
  EXPECT_EQ(read_trace(), "add " + be(5) + " vib\nremove " + be(5) + " vib\n");
  std::filesystem::remove_all(dir);
}
