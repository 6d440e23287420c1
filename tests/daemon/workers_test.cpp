// vibd's fast-path workers as a scheduler: contexts spread over the
// workers, one is handed over when removals leave the counts apart, a
// removed context is let go, a kick wakes a sleeping context, and a parked
// one is left alone until its mailbox says otherwise. The contexts here are
// stand-ins that record which worker thread served them.
#include <gtest/gtest.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "hca_events.hpp"
#include "vib/platform/hca.hpp"
#include "vib/platform/unique_fd.hpp"
#include "workers.hpp"

using namespace std::chrono_literals;
using vib::backend::FastPathPool;
using vib::backend::HcaEventRouter;
using vib::backend::Schedulable;
using vib::platform::UniqueFd;

namespace {

class StandIn final : public Schedulable {
 public:
  StandIn() : kick_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)), mail_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {}
  int event_fd() override { return kick_.get(); }
  int mailbox_fd() override { return mail_.get(); }
  void consume_kick() override {
    drain(kick_);
    wakes_.fetch_add(1);
  }
  void consume_mail() override {
    drain(mail_);
    wakes_.fetch_add(1);
  }
  Pass pass() override {
    std::lock_guard lock(mu_);
    served_by_ = std::this_thread::get_id();
    ++passes_;
    return park_.load() ? Pass::parked : Pass::idle;
  }
  bool prepare_sleep() override { return true; }
  void woke() override {}
  bool closed() const override { return closed_.load(); }

  static void raise(const UniqueFd& fd) {
    const std::uint64_t one = 1;
    ASSERT_EQ(::write(fd.get(), &one, sizeof one), 8);
  }
  void kick() { raise(kick_); }
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

 private:
  static void drain(const UniqueFd& fd) {
    std::uint64_t v;
    [[maybe_unused]] auto n = ::read(fd.get(), &v, sizeof v);
  }
  UniqueFd kick_, mail_;
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
  HcaEventRouter router_;
  std::unique_ptr<vib::platform::Hca> hca_ = vib::platform::open_hca("soft");
};

}  // namespace

TEST_F(Workers, ContextsSpreadOverTheWorkersAndMoveWhenRemovalsLeaveThemApart) {
  FastPathPool pool(2, /*max_spin=*/0us, /*nice=*/0, router_);
  std::vector<std::shared_ptr<StandIn>> contexts;
  for (int i = 0; i < 4; ++i) {
    contexts.push_back(std::make_shared<StandIn>());
    pool.add(contexts.back(), *hca_);
  }
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
    const auto server = contexts[static_cast<std::size_t>(i)]->next_server();
    ASSERT_NE(server, std::thread::id{});
    now.insert(server);
  }
  EXPECT_EQ(now.size(), 2u) << "one context per worker again";
  EXPECT_TRUE(now.count(emptied)) << "the emptied worker took one over";
}

TEST_F(Workers, AParkedContextIsLeftAloneUntilItsMailboxWakesIt) {
  // A long spin window: a parked context treated as merely idle would be
  // polled through it.
  FastPathPool pool(1, /*max_spin=*/1000us, /*nice=*/0, router_);
  auto context = std::make_shared<StandIn>();
  context->park_ = true;
  pool.add(context, *hca_);
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
    FastPathPool pool(2, /*max_spin=*/50us, /*nice=*/0, router_);
    for (int i = 0; i < 16; ++i) {
      contexts.push_back(std::make_shared<StandIn>());
      pool.add(contexts.back(), *hca_);
    }
    for (auto& c : contexts) c->kick();
  }
  for (auto& c : contexts) EXPECT_EQ(c.use_count(), 1) << "joined workers hold nothing";
}
