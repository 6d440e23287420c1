// vibd's threads: one guest's slow request (a large registration, held in
// the middle of mapping its pages) stalls neither other guests nor the same
// guest's other processes, nor the data path of contexts served by the same
// fast-path worker. vibd runs in this process (run_daemon) so the test can
// hold that mapping; the guests use libvibfront as usual.
#include <gtest/gtest.h>
#include <sys/eventfd.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <future>
#include <mutex>
#include <thread>

#include "vib/backend/vibd.hpp"
#include "vib/front/verbs.hpp"
#include "rc_connect.hpp"
#include "vib/platform/unique_fd.hpp"
#include "vibd_fixture.hpp"

using namespace std::chrono_literals;
using vib::front::Device;
using namespace vib::platform;

namespace {

constexpr DomId kSlowGuest = 5;
constexpr std::size_t kLargePages = 256;  // mappings this big from kSlowGuest are held

// Delegates to the real (host-local) mapper, but holds kSlowGuest's large
// mappings until released.
class HoldingMapper final : public GrantMapper {
 public:
  explicit HoldingMapper(std::unique_ptr<GrantMapper> real) : real_(std::move(real)) {}
  // The test's release() may still be leaving the lock when the daemon's
  // thread destroys this: taking it orders the two.
  ~HoldingMapper() override { std::lock_guard lock(mu); }
  std::unique_ptr<GrantMapping> map(DomId granter, std::span<const GrantRef> refs, bool writable,
                                    const UnmapNotify& notify) override {
    hold_if_large(granter, refs);
    return real_->map(granter, refs, writable, notify);
  }
  std::unique_ptr<vib::platform::MemoryAccess> access(DomId granter, std::span<const GrantRef> refs,
                                                      bool writable) override {
    hold_if_large(granter, refs);
    return real_->access(granter, refs, writable);
  }

  std::mutex mu;
  std::condition_variable cv;
  bool holding = false, released = false;

 private:
  void hold_if_large(DomId granter, std::span<const GrantRef> refs) {
    if (granter != kSlowGuest || refs.size() < kLargePages) return;
    std::unique_lock lock(mu);
    holding = true;
    cv.notify_all();
    cv.wait(lock, [&] { return released; });
  }

  std::unique_ptr<GrantMapper> real_;
};

class VibdThreads : public vib::test::VibdFixture {
 protected:
  void start_in_process(unsigned workers = 0, unsigned control_threads = 0) {
    vib::backend::DaemonOptions options;
    options.xen = xen_.as(0);
    options.provision = false;
    options.workers = workers;
    options.control_threads = control_threads;
    options.wrap_grant_mapper = [this](std::unique_ptr<GrantMapper> real) {
      auto holding = std::make_unique<HoldingMapper>(std::move(real));
      mapper_ = holding.get();
      return holding;
    };
    stop_ = UniqueFd(::eventfd(0, EFD_CLOEXEC));
    ASSERT_TRUE(stop_);
    daemon_ = std::thread([this, options] { exit_code_ = vib::backend::run_daemon(options, stop_.get()); });
  }
  void TearDown() override {
    stop_in_process();
    VibdFixture::TearDown();
  }
  void stop_in_process() {
    if (!daemon_.joinable()) return;
    release();
    const std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(stop_.get(), &one, sizeof one);
    daemon_.join();
    mapper_ = nullptr;  // went with the daemon
  }
  bool wait_until_held() {
    HoldingMapper* mapper = nullptr;
    for (int i = 0; i < 1000 && !(mapper = mapper_.load()); ++i) std::this_thread::sleep_for(5ms);
    if (!mapper) return false;
    std::unique_lock lock(mapper->mu);
    return mapper->cv.wait_for(lock, 10s, [&] { return mapper->holding; });
  }
  void release() {
    HoldingMapper* mapper = mapper_.load();
    if (!mapper) return;
    std::lock_guard lock(mapper->mu);
    mapper->released = true;
    mapper->cv.notify_all();
  }
  std::unique_ptr<Device> open(DomId domid) {
    vib::front::ChannelOptions options;
    options.xen = xen_.as(domid);
    return Device::open(options);
  }

  UniqueFd stop_;
  std::thread daemon_;
  int exit_code_ = -1;
  std::atomic<HoldingMapper*> mapper_{nullptr};  // owned by the daemon's environment, set on its thread
};

// Everything a process does to get going, with a small registration.
void exercise(Device& device) {
  ibv_device_attr attr;
  device.query_device(attr);
  auto pd = device.alloc_pd();
  auto cq = device.create_cq(8);
  vib::front::QpInit init;
  init.send_cq = init.recv_cq = cq.get();
  init.cap = ibv_qp_cap{4, 4, 1, 1, 0};
  auto qp = pd->create_qp(init);
  std::vector<char> buffer(2 * 4096);
  auto mr = pd->reg_mr(buffer.data(), buffer.size(), IBV_ACCESS_LOCAL_WRITE);
  EXPECT_NE(mr->lkey(), 0u);
}

// A context with a connected RC QP and a registered buffer.
struct Peer {
  std::unique_ptr<Device> device;
  std::unique_ptr<vib::front::Pd> pd;
  std::unique_ptr<vib::front::Cq> cq;
  std::unique_ptr<vib::front::Qp> qp;
  std::vector<char> buffer = std::vector<char>(4096);
  std::unique_ptr<vib::front::Mr> mr;

  explicit Peer(std::unique_ptr<Device> opened) : device(std::move(opened)) {
    pd = device->alloc_pd();
    cq = device->create_cq(16);
    vib::front::QpInit init;
    init.send_cq = init.recv_cq = cq.get();
    init.cap = ibv_qp_cap{16, 16, 1, 1, 0};
    qp = pd->create_qp(init);
    mr = pd->reg_mr(buffer.data(), buffer.size(), IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
  }
  void connect(const Peer& peer) {
    ibv_port_attr port;
    device->query_port(1, port);
    for (auto& step : vib::test::rc_connect_steps(port.lid, peer.qp->qp_num(), IBV_ACCESS_REMOTE_WRITE))
      ASSERT_EQ(qp->modify(step.attr, step.mask), 0);
  }
  // RDMA-writes `n` bytes of value `byte` into the peer; true once completed.
  bool write_to(Peer& peer, char byte, std::size_t n) {
    std::memset(buffer.data(), byte, n);
    ibv_sge sge{reinterpret_cast<std::uintptr_t>(buffer.data()), static_cast<std::uint32_t>(n), mr->lkey()};
    ibv_send_wr wr{};
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = IBV_WR_RDMA_WRITE;
    wr.send_flags = IBV_SEND_SIGNALED;
    wr.wr.rdma.remote_addr = reinterpret_cast<std::uintptr_t>(peer.buffer.data());
    wr.wr.rdma.rkey = peer.mr->rkey();
    ibv_send_wr* bad = nullptr;
    if (qp->post_send(&wr, &bad) != 0) return false;
    ibv_wc wc{};
    for (const auto deadline = std::chrono::steady_clock::now() + 10s; std::chrono::steady_clock::now() < deadline;)
      if (cq->poll(std::span<ibv_wc>(&wc, 1)) == 1) return wc.status == IBV_WC_SUCCESS;
    return false;
  }
};

}  // namespace

TEST_F(VibdThreads, ALargeRegistrationStallsNoDataPathOnTheSameWorker) {
  provision(5);
  provision(6);
  start_in_process(/*workers=*/1);  // every context on one worker
  auto slow = open(kSlowGuest);
  auto slow_pd = slow->alloc_pd();
  // Two processes' contexts, connected, before the registration is held:
  // one of the slow guest, one of another guest.
  auto a = std::make_unique<Peer>(open(kSlowGuest));
  auto b = std::make_unique<Peer>(open(6));
  a->connect(*b);
  b->connect(*a);
  std::vector<char> large(kLargePages * 4096 * 2);
  auto registration = std::async(std::launch::async, [&] {
    return slow_pd->reg_mr(large.data(), large.size(), IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
  });
  ASSERT_TRUE(wait_until_held()) << "the large registration reached vibd's mapping";

  // The control pool is inside the slow context's request; the worker that
  // serves all three contexts must still carry the others' writes.
  for (int i = 0; i < 20; ++i) {
    ASSERT_TRUE(a->write_to(*b, static_cast<char>('a' + i), 512)) << "write " << i;
    EXPECT_EQ(std::string(b->buffer.data(), 512), std::string(512, static_cast<char>('a' + i)));
    ASSERT_TRUE(b->write_to(*a, static_cast<char>('A' + i), 1024)) << "write back " << i;
    EXPECT_EQ(std::string(a->buffer.data(), 1024), std::string(1024, static_cast<char>('A' + i)));
  }
  EXPECT_EQ(registration.wait_for(0s), std::future_status::timeout) << "still held";

  release();
  auto mr = registration.get();
  EXPECT_NE(mr->rkey(), 0u);
  mr.reset();
  slow_pd.reset();
  slow.reset();
  a.reset();
  b.reset();
  stop_in_process();
  EXPECT_EQ(exit_code_, 0);
}

TEST_F(VibdThreads, ALargeRegistrationStallsNoOtherGuestNorProcess) {
  provision(5);
  provision(6);
  start_in_process();
  auto slow = open(kSlowGuest);
  auto slow_pd = slow->alloc_pd();
  std::vector<char> large(kLargePages * 4096 * 2);
  auto registration = std::async(std::launch::async, [&] {
    return slow_pd->reg_mr(large.data(), large.size(), IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
  });
  ASSERT_TRUE(wait_until_held()) << "the large registration reached vibd's mapping";

  // vibd is inside the slow guest's request now, and stays there until
  // released: everything below must still be served.
  std::unique_ptr<Device> other_guest, same_guest_other_process;
  auto others = std::async(std::launch::async, [&] {
    other_guest = open(6);
    exercise(*other_guest);
    same_guest_other_process = open(kSlowGuest);
    exercise(*same_guest_other_process);
  });
  // A vibd that served requests one at a time would never get here: bound
  // the wait so such a failure is a failure, not a hang.
  EXPECT_EQ(others.wait_for(10s), std::future_status::ready) << "others were stalled by the held registration";
  EXPECT_EQ(registration.wait_for(0s), std::future_status::timeout) << "still held";

  release();
  others.get();
  auto mr = registration.get();
  EXPECT_NE(mr->rkey(), 0u);
  mr.reset();
  slow_pd.reset();
  slow.reset();
  other_guest.reset();
  same_guest_other_process.reset();
  stop_in_process();
  EXPECT_EQ(exit_code_, 0);
}

// A registration of a few pages is served on the fast-path worker: with the
// control pool's only thread inside a large registration, another guest's
// small registration and deregistration still complete.
TEST_F(VibdThreads, ASmallRegistrationWaitsForNoControlThread) {
  provision(5);
  provision(6);
  start_in_process(/*workers=*/1, /*control_threads=*/1);
  auto slow = open(kSlowGuest);
  auto slow_pd = slow->alloc_pd();
  auto other = open(6);
  auto other_pd = other->alloc_pd();
  std::vector<char> large(kLargePages * 4096 * 2);
  auto registration = std::async(std::launch::async, [&] {
    return slow_pd->reg_mr(large.data(), large.size(), IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
  });
  ASSERT_TRUE(wait_until_held()) << "the large registration reached vibd's mapping";

  std::vector<char> small(2 * 4096);
  auto small_registrations = std::async(std::launch::async, [&] {
    for (int i = 0; i < 10; ++i) {
      auto mr = other_pd->reg_mr(small.data() + i, small.size() - i, IBV_ACCESS_LOCAL_WRITE);
      if (mr->lkey() == 0) return false;
    }
    return true;
  });
  EXPECT_EQ(small_registrations.wait_for(10s), std::future_status::ready)
      << "small registrations waited for the control pool";
  EXPECT_EQ(registration.wait_for(0s), std::future_status::timeout) << "still held";

  release();
  EXPECT_TRUE(small_registrations.get());
  EXPECT_NE(registration.get()->rkey(), 0u);
  other_pd.reset();
  other.reset();
  slow_pd.reset();
  slow.reset();
  stop_in_process();
  EXPECT_EQ(exit_code_, 0);
}
