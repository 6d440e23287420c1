// vibd's fast-path workers as a scheduler: contexts spread over the
// workers, one is handed over when removals leave the counts apart, a
// removed context is let go, a kick wakes a sleeping context, and a parked
// one is left alone until its mailbox says otherwise. The contexts here are
// stand-ins that record which worker thread served them.
#include <gtest/gtest.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <deque>
#include <chrono>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "hca_events.hpp"
#include "vib/platform/event_channels.hpp"
#include "vib/platform/hca.hpp"
#include "vib/platform/unique_fd.hpp"
#include "workers.hpp"

using namespace std::chrono_literals;
using vib::backend::FastPathPool;
using vib::backend::HcaEventRouter;
using vib::backend::Schedulable;
using vib::platform::EventPort;
using vib::platform::UniqueFd;

namespace {

// A worker's event channel handle: ports raised by the test, taken by the
// worker. Like a xenevtchn handle, its fd is readable while one is pending.
class TestPorts final : public vib::platform::EventChannels {
 public:
  TestPorts() : signal_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {}
  EventPort bind_unbound(vib::platform::DomId) override {
    std::lock_guard lock(mu_);
    return next_++;
  }
  EventPort bind_interdomain(vib::platform::DomId remote, EventPort) override { return bind_unbound(remote); }
  void unbind(EventPort) override {}
  void notify(EventPort) override {}
  int fd() override { return signal_.get(); }
  std::optional<EventPort> pending() override {
    std::lock_guard lock(mu_);
    if (raised_.empty()) return std::nullopt;
    const EventPort port = raised_.front();
    raised_.pop_front();
    if (raised_.empty()) {
      std::uint64_t v;
      [[maybe_unused]] auto n = ::read(signal_.get(), &v, sizeof v);
    }
    return port;
  }
  void unmask(EventPort) override {}
  std::optional<bool> peer_closed(EventPort) override { return std::nullopt; }

  void raise(EventPort port) {
    std::lock_guard lock(mu_);
    raised_.push_back(port);
    const std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(signal_.get(), &one, sizeof one);
  }

 private:
  UniqueFd signal_;
  std::mutex mu_;
  EventPort next_ = 1;
  std::deque<EventPort> raised_;
};

class StandIn final : public Schedulable {
 public:
  // Binds its port through the handle of the worker the pool places it on.
  explicit StandIn(FastPathPool::Home home)
      : home_(std::move(home)), port_(home_.events->bind_unbound(1)),
        mail_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {}
  EventPort event_port() const override { return port_; }
  void kicked() override {
    kicked_on_.store(std::this_thread::get_id());
    wakes_.fetch_add(1);
  }
  int mailbox_fd() override { return mail_.get(); }
  void consume_mail() override {
    drain(mail_);
    wakes_.fetch_add(1);
  }
  void raise_mail() override { mail(); }
  Pass pass() override {
    std::lock_guard lock(mu_);
    served_by_ = std::this_thread::get_id();
    ++passes_;
    return park_.load() ? Pass::parked : Pass::idle;
  }
  bool prepare_sleep() override { return true; }
  void woke() override {}
  bool closed() const override { return closed_.load(); }

  const FastPathPool::Home& home() const { return home_; }
  static void raise(const UniqueFd& fd) {
    const std::uint64_t one = 1;
    ASSERT_EQ(::write(fd.get(), &one, sizeof one), 8);
  }
  void kick() { static_cast<TestPorts&>(*home_.events).raise(port_); }
  void mail() { raise(mail_); }
  // Forgets who served it, then waits (bounded) for the next pass.
  std::thread::id next_server() {
    {
      std::lock_guard lock(mu_);
      served_by_ = {};
    }
    for (int i = 0; i < 500; ++i) {
      {
        std::lock_guard lock(mu_);
        if (served_by_ != std::thread::id{}) return served_by_;
      }
      kick();
      std::this_thread::sleep_for(10ms);
    }
    return {};
  }
  std::uint64_t passes() {
    std::lock_guard lock(mu_);
    return passes_;
  }

  std::atomic<bool> park_{false};
  std::atomic<bool> closed_{false};
  std::atomic<std::uint64_t> wakes_{0};
  std::atomic<std::thread::id> kicked_on_{};

 private:
  static void drain(const UniqueFd& fd) {
    std::uint64_t v;
    [[maybe_unused]] auto n = ::read(fd.get(), &v, sizeof v);
  }
  FastPathPool::Home home_;
  EventPort port_;
  UniqueFd mail_;
  std::mutex mu_;
  std::thread::id served_by_{};
  std::uint64_t passes_ = 0;
};

// Waits (bounded) until only `owner` holds `p`.
bool let_go(const std::shared_ptr<StandIn>& p) {
  for (int i = 0; i < 500 && p.use_count() > 1; ++i) std::this_thread::sleep_for(10ms);
  return p.use_count() == 1;
}

class Workers : public ::testing::Test {
 protected:
  FastPathPool make_pool(unsigned workers, std::chrono::microseconds max_spin) {
    return FastPathPool(workers, max_spin, /*nice=*/0, router_, [] { return std::make_unique<TestPorts>(); });
  }
  // A stand-in placed where the pool puts the next context.
  std::shared_ptr<StandIn> place(FastPathPool& pool, bool parked = false) {
    auto context = std::make_shared<StandIn>(pool.next_home());
    context->park_ = parked;
    pool.add(context, *hca_, context->home());
    return context;
  }
  HcaEventRouter router_;
  std::unique_ptr<vib::platform::Hca> hca_ = vib::platform::open_hca("soft");
};

}  // namespace

TEST_F(Workers, ContextsSpreadOverTheWorkersAndMoveWhenRemovalsLeaveThemApart) {
  FastPathPool pool = make_pool(2, /*max_spin=*/0us);
  std::vector<std::shared_ptr<StandIn>> contexts;
  for (int i = 0; i < 4; ++i) contexts.push_back(place(pool));
  std::map<std::thread::id, std::vector<int>> by_worker;
  for (int i = 0; i < 4; ++i) {
    const auto server = contexts[static_cast<std::size_t>(i)]->next_server();
    ASSERT_NE(server, std::thread::id{}) << "context " << i << " was never served";
    by_worker[server].push_back(i);
  }
  ASSERT_EQ(by_worker.size(), 2u) << "two workers, both serving";
  for (auto& [worker, served] : by_worker) EXPECT_EQ(served.size(), 2u);

  // Both contexts of one worker go: the other worker's two are now one too
  // many, and one of them moves.
  const auto emptied = by_worker.begin()->first;
  const auto& leaving = by_worker.begin()->second;
  const auto& staying = std::next(by_worker.begin())->second;
  for (int i : leaving) {
    contexts[static_cast<std::size_t>(i)]->closed_ = true;
    pool.remove(contexts[static_cast<std::size_t>(i)]);
    EXPECT_TRUE(let_go(contexts[static_cast<std::size_t>(i)])) << "the worker let go of removed context " << i;
  }
  std::set<std::thread::id> now;
  for (int i : staying) {
    auto& context = *contexts[static_cast<std::size_t>(i)];
    const auto server = context.next_server();
    ASSERT_NE(server, std::thread::id{});
    now.insert(server);
    // Its port stays on its first worker's handle: that worker takes its
    // kicks and passes them on to the one serving it now, which slept
    // between kicks (no spinning here): only a kick brought the pass.
    EXPECT_NE(context.kicked_on_.load(), std::thread::id{});
    if (server == emptied) {
      EXPECT_NE(context.kicked_on_.load(), server) << "kicked on its home worker";
    }
  }
  EXPECT_EQ(now.size(), 2u) << "one context per worker again";
  EXPECT_TRUE(now.count(emptied)) << "the emptied worker took one over";
}

TEST_F(Workers, EachWorkerHasOneEventChannelHandleForAllItsContexts) {
  FastPathPool pool = make_pool(2, /*max_spin=*/0us);
  std::vector<std::shared_ptr<StandIn>> contexts;
  for (int i = 0; i < 8; ++i) contexts.push_back(place(pool));
  std::set<vib::platform::EventChannels*> handles;
  for (auto& c : contexts) handles.insert(c->home().events.get());
  EXPECT_EQ(handles.size(), 2u) << "8 contexts, 2 workers, 2 handles";
  // Once its worker has it (a kick before that is moot: a context starts
  // awake), every kick on a shared handle reaches its own context.
  for (auto& c : contexts)
    for (int i = 0; i < 500 && c->passes() == 0; ++i) std::this_thread::sleep_for(2ms);
  for (auto& c : contexts) {
    const auto wakes = c->wakes_.load();
    c->kick();
    for (int i = 0; i < 500 && c->wakes_.load() == wakes; ++i) std::this_thread::sleep_for(2ms);
    EXPECT_GT(c->wakes_.load(), wakes);
  }
  for (auto& c : contexts) {
    c->closed_ = true;
    pool.remove(c);
    EXPECT_TRUE(let_go(c));
  }
}

TEST_F(Workers, AParkedContextIsLeftAloneUntilItsMailboxWakesIt) {
  // A long spin window: a parked context treated as merely idle would be
  // polled through it.
  FastPathPool pool = make_pool(1, /*max_spin=*/1000us);
  auto context = place(pool, /*parked=*/true);
  ASSERT_NE(context->next_server(), std::thread::id{});
  // Parked: only a wake (kick or mail) brings it one more pass, which parks
  // it again; a worker that kept polling it would pass it far more often.
  for (int i = 0; i < 10; ++i) {
    context->kick();
    std::this_thread::sleep_for(5ms);
  }
  std::this_thread::sleep_for(50ms);
  EXPECT_LE(context->passes(), context->wakes_.load() + 1) << "passes only when woken";
  context->park_ = false;
  const auto passes = context->passes();
  context->mail();
  for (int i = 0; i < 500 && context->passes() == passes; ++i) std::this_thread::sleep_for(10ms);
  EXPECT_GT(context->passes(), passes) << "the mailbox gave it back";
  context->closed_ = true;
  pool.remove(context);
  EXPECT_TRUE(let_go(context));
}

TEST_F(Workers, StoppingLetsGoOfEveryContext) {
  std::vector<std::shared_ptr<StandIn>> contexts;
  {
    FastPathPool pool = make_pool(2, /*max_spin=*/50us);
    for (int i = 0; i < 16; ++i) contexts.push_back(place(pool));
    for (auto& c : contexts) c->kick();
  }
  for (auto& c : contexts) EXPECT_EQ(c.use_count(), 1) << "joined workers hold nothing";
}

// ---- SpinPolicy: when a worker may spin (issue 12) --------------------------

using vib::backend::SpinPolicy;

TEST(SpinPolicy, NeverSpinsWhenSpinningIsOff) {
  SpinPolicy policy(0us);
  EXPECT_EQ(policy.budget(SpinPolicy::Clock::now()), 0us);
}

// Spinning pays only while the work comes back within a spin's window; once
// most idle periods outlast it, the worker sleeps at once, and spins again
// when the work comes back quickly again.
TEST(SpinPolicy, SpinsOnlyWhileSpinsWouldCatchTheWork) {
  SpinPolicy policy(200us);
  const auto now = SpinPolicy::Clock::now();
  EXPECT_EQ(policy.budget(now), 200us) << "a new worker spins";
  for (int i = 0; i < 8; ++i) policy.slept(5ms);
  EXPECT_EQ(policy.budget(now), 0us) << "eight idle periods longer than the window";
  for (int i = 0; i < 8; ++i) policy.slept(50us);
  EXPECT_EQ(policy.budget(now), 200us) << "eight short ones";
}

// A spin that got little CPU for its wall time was taking turns with other
// threads (the guests it serves, on a dom0 with few CPUs): spinning stops
// for a back-off, then resumes.
TEST(SpinPolicy, AStarvedSpinStopsSpinningForAWhile) {
  SpinPolicy policy(200us);
  ASSERT_EQ(policy.budget(SpinPolicy::Clock::now()), 200us);
  const auto start = SpinPolicy::Clock::now();
  policy.spin_started(start);
  // Ends, as far as the policy can tell, 5 ms of wall time later, having
  // used microseconds of CPU.
  const auto end = start + 5ms;
  policy.spin_ended(end, /*found_work=*/true);
  EXPECT_EQ(policy.budget(end), 0us);
  EXPECT_GE(policy.contended(), 1u);
  EXPECT_EQ(policy.budget(end + 2s), 200us) << "the back-off ends";
}
