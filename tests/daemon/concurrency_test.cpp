// vibd's threads: one guest's slow request (a large registration, held in
// the middle of mapping its pages) stalls neither other guests nor the same
// guest's other processes. vibd runs in this process (run_daemon) so the
// test can hold that mapping; the guests use libvibfront as usual.
#include <gtest/gtest.h>
#include <sys/eventfd.h>

#include <condition_variable>
#include <future>
#include <mutex>
#include <thread>

#include "vib/backend/vibd.hpp"
#include "vib/front/verbs.hpp"
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
  std::unique_ptr<GrantMapping> map(DomId granter, std::span<const GrantRef> refs, bool writable,
                                    const UnmapNotify& notify) override {
    if (granter == kSlowGuest && refs.size() >= kLargePages) {
      std::unique_lock lock(mu);
      holding = true;
      cv.notify_all();
      cv.wait(lock, [&] { return released; });
    }
    return real_->map(granter, refs, writable, notify);
  }

  std::mutex mu;
  std::condition_variable cv;
  bool holding = false, released = false;

 private:
  std::unique_ptr<GrantMapper> real_;
};

class VibdThreads : public vib::test::VibdFixture {
 protected:
  void start_in_process() {
    vib::backend::DaemonOptions options;
    options.xen = xen_.as(0);
    options.provision = false;
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
    for (int i = 0; i < 1000 && !mapper_; ++i) std::this_thread::sleep_for(5ms);
    if (!mapper_) return false;
    std::unique_lock lock(mapper_->mu);
    return mapper_->cv.wait_for(lock, 10s, [&] { return mapper_->holding; });
  }
  void release() {
    if (!mapper_) return;
    std::lock_guard lock(mapper_->mu);
    mapper_->released = true;
    mapper_->cv.notify_all();
  }
  std::unique_ptr<Device> open(DomId domid) {
    vib::front::ChannelOptions options;
    options.xen = xen_.as(domid);
    return Device::open(options);
  }

  UniqueFd stop_;
  std::thread daemon_;
  int exit_code_ = -1;
  HoldingMapper* mapper_ = nullptr;  // owned by the daemon's environment
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

}  // namespace

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
