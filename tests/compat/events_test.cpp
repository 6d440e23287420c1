// Our libibverbs.so.1 called directly (this test links it, not rdma-core's):
// completion channels under concurrent control calls, and device discovery
// when there is nothing, or nothing usable, to discover.
#include <gtest/gtest.h>
#include <infiniband/verbs.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "rc_connect.hpp"
#include "vibd_fixture.hpp"

using namespace std::chrono_literals;

namespace {

constexpr int kAccess = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;

class Compat : public vib::test::VibdFixture {
 protected:
  // libibverbs reads the domain from the environment at each discovery and
  // open; a test acting as two guests switches it in between.
  void act_as(vib::platform::DomId domid) {
    ::setenv("VIB_LOCAL_XEN", xen_.dir().c_str(), 1);
    ::setenv("VIB_DOMID", std::to_string(domid).c_str(), 1);
  }

  ibv_context* open_first_device(vib::platform::DomId domid) {
    act_as(domid);
    int n = 0;
    ibv_device** list = ibv_get_device_list(&n);
    if (!list || n < 1) {
      ADD_FAILURE() << "no device in domain " << domid;
      if (list) ibv_free_device_list(list);
      return nullptr;
    }
    ibv_context* ctx = ibv_open_device(list[0]);
    ibv_free_device_list(list);  // the device outlives the list
    EXPECT_NE(ctx, nullptr) << std::strerror(errno);
    return ctx;
  }
};

// One side of an RC connection, through the verbs API only.
struct Side {
  ibv_context* ctx = nullptr;
  ibv_comp_channel* channel = nullptr;
  ibv_pd* pd = nullptr;
  ibv_cq* cq = nullptr;
  ibv_qp* qp = nullptr;
  ibv_mr* mr = nullptr;
  std::vector<char> buf = std::vector<char>(8192);
  uint16_t lid = 0;

  void create(ibv_context* c, bool with_channel) {
    ctx = c;
    if (with_channel) {
      channel = ibv_create_comp_channel(ctx);
      ASSERT_NE(channel, nullptr);
    }
    pd = ibv_alloc_pd(ctx);
    ASSERT_NE(pd, nullptr);
    cq = ibv_create_cq(ctx, 16, this, channel, 0);
    ASSERT_NE(cq, nullptr);
    mr = ibv_reg_mr(pd, buf.data(), buf.size(), kAccess);
    ASSERT_NE(mr, nullptr);
    ibv_qp_init_attr init{};
    init.send_cq = init.recv_cq = cq;
    init.cap = ibv_qp_cap{16, 16, 1, 1, 0};
    init.qp_type = IBV_QPT_RC;
    qp = ibv_create_qp(pd, &init);
    ASSERT_NE(qp, nullptr);
    ibv_port_attr port;
    ASSERT_EQ(ibv_query_port(ctx, 1, &port), 0);
    lid = port.lid;
  }

  void connect(const Side& peer) {
    for (auto& step : vib::test::rc_connect_steps(peer.lid, peer.qp->qp_num, kAccess))
      ASSERT_EQ(ibv_modify_qp(qp, &step.attr, step.mask), 0) << "to state " << step.attr.qp_state;
  }

  int post_recv(uint64_t id) {
    ibv_sge sge{reinterpret_cast<uintptr_t>(buf.data() + 4096), 64, mr->lkey};
    ibv_recv_wr wr{};
    wr.wr_id = id;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    ibv_recv_wr* bad = nullptr;
    return ibv_post_recv(qp, &wr, &bad);
  }

  int post_send(uint64_t id) {
    ibv_sge sge{reinterpret_cast<uintptr_t>(buf.data()), 16, mr->lkey};
    ibv_send_wr wr{};
    wr.wr_id = id;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = IBV_WR_SEND;
    wr.send_flags = IBV_SEND_SIGNALED;
    ibv_send_wr* bad = nullptr;
    return ibv_post_send(qp, &wr, &bad);
  }

  // Busy-polls (bounded) for one completion.
  bool poll_one(ibv_wc& wc) {
    const auto deadline = std::chrono::steady_clock::now() + 5s;
    while (std::chrono::steady_clock::now() < deadline)
      if (ibv_poll_cq(cq, 1, &wc) == 1) return true;
    return false;
  }

  void destroy() {
    if (qp) {
      EXPECT_EQ(ibv_destroy_qp(qp), 0);
    }
    if (mr) {
      EXPECT_EQ(ibv_dereg_mr(mr), 0);
    }
    if (cq) {
      EXPECT_EQ(ibv_destroy_cq(cq), 0);
    }
    if (pd) {
      EXPECT_EQ(ibv_dealloc_pd(pd), 0);
    }
    if (channel) {
      EXPECT_EQ(ibv_destroy_comp_channel(channel), 0);
    }
    if (ctx) {
      EXPECT_EQ(ibv_close_device(ctx), 0);
    }
  }
};

TEST_F(Compat, CompletionEventsAreNotLostToConcurrentControlCalls) {
  provision(5);
  provision(6);
  start_vibd(VIBD);
  ASSERT_TRUE(eventually(be(5) + "/state", "2"));
  ASSERT_TRUE(eventually(be(6) + "/state", "2"));
  Side rx, tx;
  rx.create(open_first_device(5), /*with_channel=*/true);
  tx.create(open_first_device(6), false);
  ASSERT_FALSE(HasFatalFailure());
  rx.connect(tx);
  tx.connect(rx);
  ASSERT_FALSE(HasFatalFailure());

  // Control calls on the receiving context, all the time: each waits on
  // the event channel that also announces the completion events, and
  // consumes what it finds there.
  std::atomic<bool> stop{false};
  std::atomic<int> calls{0};
  std::thread control([&] {
    while (!stop) {
      ibv_port_attr port;
      ibv_query_port(rx.ctx, 1, &port);
      if (ibv_pd* pd = ibv_alloc_pd(rx.ctx)) ibv_dealloc_pd(pd);
      ++calls;
    }
  });

  constexpr int kRounds = 100;
  int events = 0;
  for (int i = 0; i < kRounds && !HasFailure(); ++i) {
    ASSERT_EQ(ibv_req_notify_cq(rx.cq, 0), 0);
    ASSERT_EQ(rx.post_recv(static_cast<uint64_t>(i)), 0);
    ASSERT_EQ(tx.post_send(static_cast<uint64_t>(i)), 0);
    ibv_wc wc;
    ASSERT_TRUE(tx.poll_one(wc));
    ASSERT_EQ(wc.status, IBV_WC_SUCCESS);
    // The channel's fd is what applications sleep on.
    pollfd p{rx.channel->fd, POLLIN, 0};
    ASSERT_EQ(::poll(&p, 1, 5000), 1) << "completion event " << i << " lost";
    ibv_cq* cq = nullptr;
    void* cq_context = nullptr;
    ASSERT_EQ(ibv_get_cq_event(rx.channel, &cq, &cq_context), 0);
    EXPECT_EQ(cq, rx.cq);
    EXPECT_EQ(cq_context, &rx);
    ibv_ack_cq_events(cq, 1);
    ++events;
    ASSERT_TRUE(rx.poll_one(wc));
    EXPECT_EQ(wc.status, IBV_WC_SUCCESS);
    EXPECT_EQ(wc.wr_id, static_cast<uint64_t>(i));
  }
  stop = true;
  control.join();
  EXPECT_EQ(events, kRounds);
  EXPECT_GT(calls.load(), 0);
  rx.destroy();
  tx.destroy();
}

TEST_F(Compat, AnEventWhoseNotificationAControlCallConsumedIsStillDelivered) {
  provision(5);
  provision(6);
  start_vibd(VIBD);
  ASSERT_TRUE(eventually(be(5) + "/state", "2"));
  ASSERT_TRUE(eventually(be(6) + "/state", "2"));
  Side rx, tx;
  // Without the dispatcher thread, only the control calls below read the
  // event channel: they consume the completion event's notification, and
  // the event reaches the channel only if each call dispatches what it
  // leaves queued. Deterministic, where a race with the thread is not.
  ::setenv("VIB_EVENT_THREAD", "0", 1);
  rx.create(open_first_device(5), true);
  ::unsetenv("VIB_EVENT_THREAD");
  tx.create(open_first_device(6), false);
  ASSERT_FALSE(HasFatalFailure());
  rx.connect(tx);
  tx.connect(rx);
  ASSERT_FALSE(HasFatalFailure());
  ASSERT_EQ(ibv_req_notify_cq(rx.cq, 0), 0);
  ASSERT_EQ(rx.post_recv(1), 0);
  ASSERT_EQ(tx.post_send(1), 0);
  ibv_wc wc;
  ASSERT_TRUE(tx.poll_one(wc));
  pollfd p{rx.channel->fd, POLLIN, 0};
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (::poll(&p, 1, 0) == 0 && std::chrono::steady_clock::now() < deadline) {
    ibv_port_attr port;
    ASSERT_EQ(ibv_query_port(rx.ctx, 1, &port), 0);
    std::this_thread::sleep_for(1ms);
  }
  ASSERT_EQ(::poll(&p, 1, 0), 1) << "the completion event was lost";
  ibv_cq* cq = nullptr;
  void* cq_context = nullptr;
  ASSERT_EQ(ibv_get_cq_event(rx.channel, &cq, &cq_context), 0);
  EXPECT_EQ(cq, rx.cq);
  ibv_ack_cq_events(cq, 1);
  ASSERT_TRUE(rx.poll_one(wc));
  EXPECT_EQ(wc.wr_id, 1u);
  rx.destroy();
  tx.destroy();
}

TEST_F(Compat, NoDevicesIsAnEmptyList) {
  // No vib device in the domain (and vibd not even running).
  act_as(5);
  int n = -1;
  ibv_device** list = ibv_get_device_list(&n);
  ASSERT_NE(list, nullptr);
  EXPECT_EQ(n, 0);
  EXPECT_EQ(list[0], nullptr);
  ibv_free_device_list(list);

  // No Xen at all where the environment points: no devices either.
  ::setenv("VIB_LOCAL_XEN", (xen_.dir() + "/nowhere").c_str(), 1);
  n = -1;
  list = ibv_get_device_list(&n);
  ASSERT_NE(list, nullptr);
  EXPECT_EQ(n, 0);
  ibv_free_device_list(list);
}

// fork() is safe wherever vib registers memory: it grants the pages in
// place (the host-local Xen, real Xen with the vibgrant module) or refuses
// the registration (real Xen without it); rdma-core's answer for kernels
// that copy pinned pages on fork is the same.
TEST_F(Compat, ForkSafetyIsAnsweredTruthfully) {
  act_as(5);
  EXPECT_EQ(ibv_fork_init(), 0);
  EXPECT_EQ(ibv_is_fork_initialized(), IBV_FORK_UNNEEDED);
  ::unsetenv("VIB_LOCAL_XEN");
  EXPECT_EQ(ibv_is_fork_initialized(), IBV_FORK_UNNEEDED) << "real Xen refuses registrations it cannot grant in place";
  act_as(5);
}

TEST_F(Compat, ADeviceWhoseBackEndFailedIsNotListed) {
  provision(5, "no-such-hca");
  provision(6);
  start_vibd(VIBD);
  ASSERT_TRUE(eventually(be(5) + "/state", "6")) << "vibd closes a device on an unknown HCA";
  ASSERT_TRUE(eventually(be(6) + "/state", "2"));
  act_as(5);
  int n = -1;
  ibv_device** list = ibv_get_device_list(&n);
  ASSERT_NE(list, nullptr);
  EXPECT_EQ(n, 0);
  ibv_free_device_list(list);

  act_as(6);
  list = ibv_get_device_list(&n);
  ASSERT_NE(list, nullptr);
  ASSERT_EQ(n, 1);
  EXPECT_STREQ(ibv_get_device_name(list[0]), "vib0");
  EXPECT_NE(ibv_get_device_guid(list[0]), 0u);
  ibv_free_device_list(list);
}

TEST_F(Compat, OpeningADeviceThatFailedMeanwhileIsAnError) {
  // Listed while its back-end was still starting, refused by the time it
  // is opened: NULL and an errno, no crash.
  provision(5, "no-such-hca");
  act_as(5);
  int n = -1;
  ibv_device** list = ibv_get_device_list(&n);
  ASSERT_NE(list, nullptr);
  ASSERT_EQ(n, 1) << "a device whose back-end has not answered yet is listed";
  start_vibd(VIBD);
  ASSERT_TRUE(eventually(be(5) + "/state", "6"));
  errno = 0;
  EXPECT_EQ(ibv_open_device(list[0]), nullptr);
  EXPECT_EQ(errno, ENODEV);
  ibv_free_device_list(list);
}

namespace {

// The next asynchronous event of `ctx` within `limit`; IBV_EVENT_SM_CHANGE
// (which vib never sends) when there is none.
ibv_event_type next_async_event(ibv_context* ctx, std::chrono::milliseconds limit) {
  pollfd p{ctx->async_fd, POLLIN, 0};
  if (::poll(&p, 1, static_cast<int>(limit.count())) != 1) return IBV_EVENT_SM_CHANGE;
  ibv_async_event e{};
  if (ibv_get_async_event(ctx, &e) != 0) return IBV_EVENT_SM_CHANGE;
  const auto type = e.event_type;
  ibv_ack_async_event(&e);
  return type;
}

}  // namespace

// A back-end that stops (systemctl stop: SIGTERM) is a fatal device error to
// the programs that had the device open, as a dead HCA is with rdma-core;
// not silence.
TEST_F(Compat, ABackEndThatStopsIsADeviceFatalEvent) {
  provision(5);
  start_vibd(VIBD);
  ibv_context* ctx = open_first_device(5);
  ASSERT_NE(ctx, nullptr);
  ibv_comp_channel* channel = ibv_create_comp_channel(ctx);
  ASSERT_NE(channel, nullptr);
  ibv_cq* cq = ibv_create_cq(ctx, 4, nullptr, channel, 0);
  ASSERT_NE(cq, nullptr);
  ASSERT_EQ(ibv_req_notify_cq(cq, 0), 0);
  // A thread waits for a completion that will never come.
  std::atomic<int> waited{1}, waited_errno{0};
  std::thread waiter([&] {
    ibv_cq* got = nullptr;
    void* context = nullptr;
    waited = ibv_get_cq_event(channel, &got, &context);
    waited_errno = errno;
  });
  EXPECT_EQ(next_async_event(ctx, 1500ms), IBV_EVENT_SM_CHANGE) << "nothing while the back-end serves";
  stop_vibd();
  EXPECT_EQ(next_async_event(ctx, 10s), IBV_EVENT_DEVICE_FATAL);
  waiter.join();  // woken, not left blocked for ever
  EXPECT_EQ(waited, -1);
  EXPECT_EQ(waited_errno, EIO);
  EXPECT_EQ(ibv_destroy_cq(cq), 0) << "objects of a lost context can be freed";
  EXPECT_EQ(ibv_destroy_comp_channel(channel), 0);
  EXPECT_EQ(ibv_close_device(ctx), 0);
}

// What was posted and not completed when the back-end went completes with
// IBV_WC_WR_FLUSH_ERR, as on an HCA in its fatal state: a program polling
// for a completion learns at once instead of by its own timeout. What had
// completed before is not reported again.
TEST_F(Compat, WorkOutstandingWhenTheBackEndStopsIsFlushed) {
  provision(5);
  start_vibd(VIBD);
  Side a, b;
  ASSERT_NO_FATAL_FAILURE(a.create(open_first_device(5), false));
  ASSERT_NO_FATAL_FAILURE(b.create(open_first_device(5), false));
  ASSERT_NO_FATAL_FAILURE(a.connect(b));
  ASSERT_NO_FATAL_FAILURE(b.connect(a));
  ASSERT_EQ(b.post_recv(10), 0);
  ASSERT_EQ(a.post_send(20), 0);
  ibv_wc wc{};
  ASSERT_TRUE(a.poll_one(wc));
  EXPECT_EQ(wc.wr_id, 20u);
  EXPECT_EQ(wc.status, IBV_WC_SUCCESS);
  ASSERT_TRUE(b.poll_one(wc));
  EXPECT_EQ(wc.wr_id, 10u);
  // b has no receive left: a's sends wait (RNR, retried for ever); a's
  // receives wait for sends b never makes.
  for (uint64_t id : {21, 22}) ASSERT_EQ(a.post_send(id), 0);
  for (uint64_t id : {11, 12, 13}) ASSERT_EQ(a.post_recv(id), 0);
  EXPECT_EQ(ibv_poll_cq(a.cq, 1, &wc), 0) << "nothing completes while the back-end serves";

  stop_vibd();
  EXPECT_EQ(next_async_event(a.ctx, 10s), IBV_EVENT_DEVICE_FATAL);
  std::vector<ibv_wc> got(8);
  const int n = ibv_poll_cq(a.cq, static_cast<int>(got.size()), got.data());
  ASSERT_EQ(n, 5);
  std::vector<uint64_t> ids;
  for (int i = 0; i < n; ++i) {
    EXPECT_EQ(got[i].status, IBV_WC_WR_FLUSH_ERR) << "wr " << got[i].wr_id;
    EXPECT_EQ(got[i].qp_num, a.qp->qp_num);
    ids.push_back(got[i].wr_id);
  }
  EXPECT_EQ(ids, (std::vector<uint64_t>{21, 22, 11, 12, 13})) << "each queue oldest first, once";
  EXPECT_EQ(ibv_poll_cq(a.cq, 1, &wc), 0) << "flushed once";
  a.destroy();
  b.destroy();
}

// A vibd killed (-9) and started again (systemd's Restart=) closes the
// contexts it cannot know; their programs get the fatal event too.
TEST_F(Compat, AContextLostToAVibdRestartIsADeviceFatalEvent) {
  provision(5);
  start_vibd(VIBD);
  ibv_context* ctx = open_first_device(5);
  ASSERT_NE(ctx, nullptr);
  ibv_pd* pd = ibv_alloc_pd(ctx);
  ASSERT_NE(pd, nullptr);
  kill_vibd();
  start_vibd(VIBD);
  EXPECT_EQ(next_async_event(ctx, 10s), IBV_EVENT_DEVICE_FATAL);
  errno = 0;
  EXPECT_EQ(ibv_alloc_pd(ctx), nullptr) << "calls on the lost context fail";
  EXPECT_EQ(errno, ENODEV);
  EXPECT_EQ(ibv_dealloc_pd(pd), 0) << "the back-end freed it with the context: freeing it here succeeds";
  EXPECT_EQ(ibv_close_device(ctx), 0);
  ibv_context* again = open_first_device(5);
  ASSERT_NE(again, nullptr) << "a new open works";
  ibv_pd* pd2 = ibv_alloc_pd(again);
  EXPECT_NE(pd2, nullptr);
  if (pd2) ibv_dealloc_pd(pd2);
  EXPECT_EQ(ibv_close_device(again), 0);
}

TEST_F(Compat, DestroyingAnObjectInUseIsEbusyAndLeavesItWorking) {
  provision(5);
  start_vibd(VIBD);
  ASSERT_TRUE(eventually(be(5) + "/state", "2"));
  ibv_context* ctx = open_first_device(5);
  ASSERT_NE(ctx, nullptr);
  ibv_pd* pd = ibv_alloc_pd(ctx);
  ASSERT_NE(pd, nullptr);
  ibv_cq* cq = ibv_create_cq(ctx, 8, nullptr, nullptr, 0);
  ASSERT_NE(cq, nullptr);
  ibv_srq_init_attr srq_init{};
  srq_init.attr.max_wr = 4;
  srq_init.attr.max_sge = 1;
  ibv_srq* srq = ibv_create_srq(pd, &srq_init);
  ASSERT_NE(srq, nullptr);
  ibv_qp_init_attr qp_init{};
  qp_init.send_cq = qp_init.recv_cq = cq;
  qp_init.srq = srq;
  qp_init.qp_type = IBV_QPT_RC;
  qp_init.cap.max_send_wr = 4;
  qp_init.cap.max_send_sge = 1;
  ibv_qp* qp = ibv_create_qp(pd, &qp_init);
  ASSERT_NE(qp, nullptr);
  std::vector<char> buf(4096);
  ibv_mr* mr = ibv_reg_mr(pd, buf.data(), buf.size(), IBV_ACCESS_LOCAL_WRITE);
  ASSERT_NE(mr, nullptr);

  // As with rdma-core: refused while in use, and the object still works.
  EXPECT_EQ(ibv_destroy_cq(cq), EBUSY);
  EXPECT_EQ(ibv_destroy_srq(srq), EBUSY);
  EXPECT_EQ(ibv_dealloc_pd(pd), EBUSY);
  ibv_wc wc;
  EXPECT_EQ(ibv_poll_cq(cq, 1, &wc), 0) << "the CQ is still there";
  ibv_srq_attr srq_attr{};
  EXPECT_EQ(ibv_query_srq(srq, &srq_attr), 0) << "the SRQ is still there";
  ibv_mr* another = ibv_reg_mr(pd, buf.data(), 64, IBV_ACCESS_LOCAL_WRITE);
  ASSERT_NE(another, nullptr) << "the PD is still there";

  // In the right order everything goes.
  EXPECT_EQ(ibv_dereg_mr(another), 0);
  EXPECT_EQ(ibv_dereg_mr(mr), 0);
  EXPECT_EQ(ibv_destroy_qp(qp), 0);
  EXPECT_EQ(ibv_destroy_srq(srq), 0);
  EXPECT_EQ(ibv_destroy_cq(cq), 0);
  EXPECT_EQ(ibv_dealloc_pd(pd), 0);
  EXPECT_EQ(ibv_close_device(ctx), 0);
}

// A registration beyond the guest's grant table (max_grant_frames * 512
// grants, one per page): NULL with errno ENOSPC, as the application checks
// it, and the limit and the setting that raises it on stderr, since errno
// cannot name them.
TEST_F(Compat, ARegistrationBeyondTheGrantTableIsEnospcAndNamesTheLimit) {
  xen_.create_domain(7, /*max_grant_frames=*/4);  // 2048 grants: 8 MiB
  provision(7);
  start_vibd(VIBD);
  ASSERT_TRUE(eventually(be(7) + "/state", "2"));
  ibv_context* ctx = open_first_device(7);
  ASSERT_NE(ctx, nullptr);
  ibv_pd* pd = ibv_alloc_pd(ctx);
  ASSERT_NE(pd, nullptr);
  std::vector<char> buf(16u << 20);
  ::testing::internal::CaptureStderr();
  errno = 0;
  ibv_mr* mr = ibv_reg_mr(pd, buf.data(), buf.size(), IBV_ACCESS_LOCAL_WRITE);
  const int err = errno;
  const std::string said = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(mr, nullptr);
  EXPECT_EQ(err, ENOSPC) << std::strerror(err);
  EXPECT_NE(said.find("libvibfront: ibv_reg_mr: "), std::string::npos) << said;
  EXPECT_NE(said.find("max_grant_frames=4"), std::string::npos) << said;
  EXPECT_NE(said.find("raise max_grant_frames in the domain's xl config"), std::string::npos) << said;
  if (mr) ibv_dereg_mr(mr);
  EXPECT_EQ(ibv_dealloc_pd(pd), 0);
  EXPECT_EQ(ibv_close_device(ctx), 0);
}

}  // namespace
