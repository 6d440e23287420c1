#include "workers.hpp"

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <map>
#include <optional>
#include <stdexcept>
#include <system_error>

#include "hca_events.hpp"
#include "log.hpp"
#include "vib/platform/process.hpp"

namespace vib::backend {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// ---- SpinPolicy ------------------------------------------------------------

namespace {

// A spin that got less CPU than this share of its wall time was contended.
constexpr double kFairShare = 0.9;
// How long spinning stays off after contention was seen, at least and at most.
constexpr auto kMinBackoff = 10ms;
constexpr auto kMaxBackoff = 1000ms;
// Below this share of idle periods caught by a spin, spinning does not pay.
constexpr std::uint32_t kMinHitRate = 512;  // of 1024

}  // namespace

std::int64_t SpinPolicy::thread_cpu_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return std::int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

long SpinPolicy::involuntary_switches() {
  rusage usage{};
  ::getrusage(RUSAGE_THREAD, &usage);
  return usage.ru_nivcsw;
}

SpinPolicy::SpinPolicy(std::chrono::microseconds max_spin)
    : max_spin_(max_spin), cpus_(std::max(1L, ::sysconf(_SC_NPROCESSORS_ONLN))),
      loadavg_(::open("/proc/loadavg", O_RDONLY | O_CLOEXEC)) {}

std::chrono::microseconds SpinPolicy::budget(Clock::time_point now) const {
  if (max_spin_.count() == 0 || now < quiet_until_ || hit_rate_ < kMinHitRate) return 0us;
  return max_spin_;
}

// The runnable threads of the whole machine, this one included, against its
// CPUs: "0.50 0.40 0.30 3/456 12345", the fourth field's numerator.
bool SpinPolicy::others_runnable() {
  if (!loadavg_) return false;
  char buf[128];
  const ssize_t n = ::pread(loadavg_.get(), buf, sizeof buf - 1, 0);
  if (n <= 0) return false;
  buf[n] = '\0';
  const char* field = buf;
  for (int spaces = 0; spaces < 3 && field; ++spaces) {
    field = std::strchr(field, ' ');
    if (field) ++field;
  }
  return field && std::atol(field) > cpus_;
}

void SpinPolicy::contention(Clock::time_point now) {
  ++contended_count_;
  quiet_until_ = now + backoff_;
  backoff_ = std::min<std::chrono::milliseconds>(backoff_ * 2, kMaxBackoff);
}

bool SpinPolicy::spin_started(Clock::time_point now) {
  spin_start_ = now;
  spin_cpu_start_ = thread_cpu_ns();
  spin_switches_start_ = involuntary_switches();
  ++spins_;
  contended_now_ = others_runnable();
  if (contended_now_) contention(spin_start_);
  return !contended_now_;
}

bool SpinPolicy::keep_spinning(Clock::time_point now) {
  if (!contended_now_ && others_runnable()) {
    contended_now_ = true;
    contention(now);
  }
  return !contended_now_;
}

void SpinPolicy::spin_ended(Clock::time_point now, bool found_work) {
  const auto wall = std::chrono::duration_cast<std::chrono::nanoseconds>(now - spin_start_).count();
  const auto cpu = thread_cpu_ns() - spin_cpu_start_;
  const bool preempted = involuntary_switches() != spin_switches_start_;
  // Short spins say little about the CPU share (the clocks' own cost); the
  // scheduler's preemption always counts.
  const bool starved = wall > 20'000 && static_cast<double>(cpu) < kFairShare * static_cast<double>(wall);
  if (!contended_now_ && (preempted || starved))
    contention(now);
  else if (!contended_now_)
    backoff_ = std::max<std::chrono::milliseconds>(backoff_ / 2, kMinBackoff);
  hit_rate_ = hit_rate_ - hit_rate_ / 8 + (found_work ? 1024 / 8 : 0);
}

void SpinPolicy::slept(std::chrono::nanoseconds gap) {
  // Work that came back within a spin window after a sleep is a hit a spin
  // would have had; one that came later confirms the sleep.
  const bool would_hit = gap <= max_spin_;
  hit_rate_ = hit_rate_ - hit_rate_ / 8 + (would_hit ? 1024 / 8 : 0);
}

// ---- Worker ----------------------------------------------------------------

class Worker {
 public:
  Worker(unsigned index, std::chrono::microseconds max_spin, int nice, HcaEventRouter& router,
         std::unique_ptr<platform::EventChannels> events)
      : index_(index), nice_(nice), policy_(max_spin), router_(router), events_(std::move(events)),
        epoll_(::epoll_create1(EPOLL_CLOEXEC)), inbox_fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
    if (!events_) throw std::invalid_argument("worker without an event channel handle");
    if (!epoll_ || !inbox_fd_) throw std::system_error(errno, std::generic_category(), "worker epoll");
    inbox_source_.kind = Source::Kind::inbox;
    watch(inbox_fd_.get(), &inbox_source_, EPOLLIN);
    ports_source_.kind = Source::Kind::ports;
    watch(events_->fd(), &ports_source_, EPOLLIN);
    thread_ = std::thread([this] {
      platform::name_this_thread("vib-worker" + std::to_string(index_));
      run();
    });
  }

  ~Worker() {
    stop_.store(true, std::memory_order_release);
    kick();
    thread_.join();
  }

  const std::shared_ptr<platform::EventChannels>& events() const { return events_; }

  // `home`: the context's port is bound through this worker's handle.
  void adopt(std::shared_ptr<Schedulable> context, platform::Hca& hca, bool home) {
    post(Command{Command::Kind::adopt, std::move(context), &hca, nullptr, home, false});
  }
  void drop(std::shared_ptr<Schedulable> context, bool home) {
    post(Command{Command::Kind::drop, std::move(context), nullptr, nullptr, home, false});
  }
  // The context, served by another worker, is gone: its kicks are no one's.
  void forget_port(std::shared_ptr<Schedulable> context) {
    post(Command{Command::Kind::forget_port, std::move(context), nullptr, nullptr, true, false});
  }
  void hand_over(std::shared_ptr<Schedulable> context, platform::Hca& hca, Worker& to, bool home, bool to_home) {
    post(Command{Command::Kind::hand_over, std::move(context), &hca, &to, home, to_home});
  }

 private:
  // Ports taken from the handle per wait; what remains keeps its fd readable.
  static constexpr std::size_t kKicksPerWait = 64;

  struct Entry;
  struct Source {
    enum class Kind { inbox, hca, ports, mail } kind = Kind::inbox;
    Entry* entry = nullptr;
    platform::Hca* hca = nullptr;
  };
  struct Entry {
    std::shared_ptr<Schedulable> context;
    platform::Hca* hca = nullptr;
    enum class State { awake, asleep, parked, finished } state = State::awake;
    Clock::time_point last_work;
    bool watched = false;  // its mailbox is in the epoll set
    Source mail;
  };
  // Who a port bound through this worker's handle belongs to.
  struct PortOwner {
    const Schedulable* context = nullptr;
    Entry* here = nullptr;                // served by this worker
    std::weak_ptr<Schedulable> away;      // or by another one
  };
  struct Command {
    enum class Kind { adopt, drop, forget_port, hand_over } kind;
    std::shared_ptr<Schedulable> context;
    platform::Hca* hca;
    Worker* to;
    bool home;     // this worker holds the context's port
    bool to_home;  // hand_over: `to` holds it
  };

  void post(Command command) {
    {
      std::lock_guard lock(inbox_mu_);
      inbox_.push_back(std::move(command));
    }
    kick();
  }
  void kick() {
    const std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(inbox_fd_.get(), &one, sizeof one);
  }

  void watch(int fd, Source* source, std::uint32_t events) {
    epoll_event ev{};
    ev.events = events;
    ev.data.ptr = source;
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0)
      throw std::system_error(errno, std::generic_category(), "epoll_ctl");
  }

  void unwatch(Entry& e) {
    if (e.watched) ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, e.context->mailbox_fd(), nullptr);
    e.watched = false;
  }

  // Forgets the context's port unless a newer context has it (ports are
  // numbers a handle reuses).
  void forget(const Schedulable& context) {
    auto it = ports_.find(context.event_port());
    if (it != ports_.end() && it->second.context == &context) ports_.erase(it);
  }

  void take_inbox() {
    std::vector<Command> commands;
    {
      std::lock_guard lock(inbox_mu_);
      commands.swap(inbox_);
    }
    for (auto& c : commands) {
      if (c.kind == Command::Kind::adopt) {
        // A hand-over can cross the removal of the context it hands over.
        if (c.context->closed()) continue;
        Entry& e = add(std::move(c.context), *c.hca);
        if (c.home) ports_[e.context->event_port()] = PortOwner{e.context.get(), &e, {}};
        continue;
      }
      if (c.kind == Command::Kind::forget_port) {
        forget(*c.context);
        continue;
      }
      if (c.kind == Command::Kind::drop && c.home) forget(*c.context);
      auto it = std::find_if(entries_.begin(), entries_.end(),
                             [&](const std::unique_ptr<Entry>& e) { return e->context == c.context; });
      if (it == entries_.end()) continue;
      unwatch(**it);
      std::erase(awake_, it->get());
      if (c.kind == Command::Kind::hand_over) {
        // Its kicks still arrive here: passed on through its mailbox.
        if (c.home) ports_[c.context->event_port()] = PortOwner{c.context.get(), nullptr, c.context};
        if ((*it)->state != Entry::State::finished) {
          // The new worker starts with it awake: whatever is pending is seen.
          (*it)->context->woke();
          c.to->adopt(std::move((*it)->context), *c.hca, c.to_home);
        }
      }
      entries_.erase(it);
    }
  }

  Entry& add(std::shared_ptr<Schedulable> context, platform::Hca& hca) {
    if (!hcas_.count(&hca)) {
      // Completion events of sleeping contexts: whichever worker is free
      // takes each one (EPOLLEXCLUSIVE) and wakes the owner.
      auto& source = hca_sources_.emplace_back(std::make_unique<Source>());
      source->kind = Source::Kind::hca;
      source->hca = &hca;
      watch(hca.completion_fd(), source.get(), EPOLLIN | EPOLLEXCLUSIVE);
      hcas_.insert(&hca);
    }
    auto entry = std::make_unique<Entry>();
    entry->context = std::move(context);
    entry->hca = &hca;
    entry->last_work = Clock::now();
    entry->mail = Source{Source::Kind::mail, entry.get(), nullptr};
    watch(entry->context->mailbox_fd(), &entry->mail, EPOLLIN);
    entry->watched = true;
    awake_.push_back(entry.get());
    entries_.push_back(std::move(entry));
    return *entries_.back();
  }

  void wake_entry(Entry& e, Clock::time_point now) {
    if (e.state == Entry::State::asleep || e.state == Entry::State::parked) {
      e.context->woke();
      e.state = Entry::State::awake;
      e.last_work = now;
      awake_.push_back(&e);
    }
  }

  // The ports its guests raised on this worker's handle: one batch, without
  // a call to learn that none is left (the handle's fd says so).
  void take_kicks(Clock::time_point now) {
    platform::EventPort raised[kKicksPerWait];
    std::size_t n = 0;
    try {
      n = events_->take_pending(raised);
    } catch (const std::system_error& e) {
      log_line(LogLevel::error, "vibd/worker" + std::to_string(index_), e.what());
      return;
    }
    for (std::size_t i = 0; i < n; ++i) {
      const platform::EventPort port = raised[i];
      try {
        events_->unmask(port);
      } catch (const std::system_error&) {
        continue;  // unbound meanwhile: its context was freed
      }
      auto it = ports_.find(port);
      // Not known yet: a context not adopted yet starts awake anyway.
      if (it == ports_.end()) continue;
      if (Entry* e = it->second.here) {
        if (e->state == Entry::State::finished) continue;
        e->context->kicked();
        wake_entry(*e, now);
      } else if (auto context = it->second.away.lock()) {
        context->kicked();
        context->raise_mail();
      }
    }
  }

  // Waits for wake-ups (timeout in ms, -1 forever) and handles them.
  void wait_events(int timeout_ms) {
    epoll_event evs[64];
    const int n = ::epoll_wait(epoll_.get(), evs, 64, timeout_ms);
    if (n < 0 && errno != EINTR)
      log_line(LogLevel::error, "vibd/worker" + std::to_string(index_), std::string("epoll_wait: ") + std::strerror(errno));
    const auto now = Clock::now();
    for (int i = 0; i < n; ++i) {
      auto* source = static_cast<Source*>(evs[i].data.ptr);
      switch (source->kind) {
        case Source::Kind::inbox: {
          std::uint64_t v;
          [[maybe_unused]] auto r = ::read(inbox_fd_.get(), &v, sizeof v);
          break;
        }
        case Source::Kind::hca: router_.dispatch_completions(*source->hca); break;
        case Source::Kind::ports: take_kicks(now); break;
        case Source::Kind::mail:
          if (source->entry->state != Entry::State::finished) {
            source->entry->context->consume_mail();
            wake_entry(*source->entry, now);
          }
          break;
      }
    }
  }

  void finish(Entry& e) {
    e.state = Entry::State::finished;
    unwatch(e);
  }

  void run() {
    if (nice_ != 0 && ::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), nice_) != 0)
      log_line(LogLevel::debug, "vibd/worker" + std::to_string(index_),
               std::string("cannot set nice ") + std::to_string(nice_) + ": " + std::strerror(errno));
    bool spinning = false;
    auto last_work = Clock::now();
    unsigned idle_passes = 0;
    while (!stop_.load(std::memory_order_acquire)) {
      take_inbox();
      auto now = Clock::now();
      const auto budget = policy_.budget(now);
      bool did = false;
      // One bounded pass over every awake context; the sleepy ones go to sleep.
      for (std::size_t i = 0; i < awake_.size();) {
        Entry& e = *awake_[i];
        bool keep = true;
        switch (e.context->pass()) {
          case Schedulable::Pass::worked:
            did = true;
            e.last_work = now;
            break;
          case Schedulable::Pass::idle:
            if (now - e.last_work >= budget && e.context->prepare_sleep()) {
              e.state = Entry::State::asleep;
              keep = false;
            }
            break;
          case Schedulable::Pass::parked:
            e.state = Entry::State::parked;
            keep = false;
            break;
          case Schedulable::Pass::finished:
            finish(e);
            keep = false;
            break;
        }
        if (keep) {
          ++i;
        } else {
          awake_[i] = awake_.back();
          awake_.pop_back();
        }
      }
      now = Clock::now();
      if (did) {
        if (spinning) policy_.spin_ended(now, true);
        spinning = false;
        last_work = now;
        // Sleeping contexts' kicks, now and then while busy.
        if (++idle_passes % 64 == 0) wait_events(0);
        continue;
      }
      if (!awake_.empty()) {
        // Idle but some contexts are still within their spin window; the
        // next pass puts them to sleep once others want the CPU.
        if (!spinning) {
          policy_.spin_started(now);
          spinning = true;
        } else if (++idle_passes % 32 == 0) {
          policy_.keep_spinning(now);
        }
        wait_events(0);
        continue;
      }
      if (spinning) policy_.spin_ended(now, false);
      spinning = false;
      wait_events(-1);
      policy_.slept(Clock::now() - last_work);
    }
    ports_.clear();
    entries_.clear();  // lets go of every context (destroyed elsewhere: ControlPool)
  }

  unsigned index_;
  int nice_;
  SpinPolicy policy_;
  HcaEventRouter& router_;
  // Shared with the contexts whose ports are bound through it: it outlives
  // the worker until the last of them is freed.
  std::shared_ptr<platform::EventChannels> events_;
  platform::UniqueFd epoll_;
  platform::UniqueFd inbox_fd_;
  Source inbox_source_;
  Source ports_source_;
  std::mutex inbox_mu_;
  std::vector<Command> inbox_;
  // The worker thread's own.
  std::vector<std::unique_ptr<Entry>> entries_;
  std::vector<Entry*> awake_;
  std::map<platform::EventPort, PortOwner> ports_;
  std::set<platform::Hca*> hcas_;
  std::vector<std::unique_ptr<Source>> hca_sources_;
  std::atomic<bool> stop_{false};
  std::thread thread_;  // last: runs on everything above
};

// ---- FastPathPool ----------------------------------------------------------

FastPathPool::FastPathPool(unsigned workers, std::chrono::microseconds max_spin, int nice, HcaEventRouter& router,
                           const OpenEventChannels& open_handle) {
  for (unsigned i = 0; i < std::max(1u, workers); ++i)
    workers_.push_back(std::make_unique<Worker>(i, max_spin, nice, router, open_handle()));
}

FastPathPool::~FastPathPool() { workers_.clear(); }

std::vector<unsigned> FastPathPool::counts() const {
  std::vector<unsigned> count(workers_.size(), 0);
  for (auto& [ctx, p] : placed_) ++count[p.worker];
  return count;
}

FastPathPool::Home FastPathPool::next_home() {
  std::lock_guard lock(mu_);
  const auto count = counts();
  const auto least = static_cast<unsigned>(std::min_element(count.begin(), count.end()) - count.begin());
  return Home{least, workers_[least]->events()};
}

void FastPathPool::add(std::shared_ptr<Schedulable> context, platform::Hca& hca, const Home& home) {
  std::lock_guard lock(mu_);
  if (home.worker >= workers_.size() || home.events != workers_[home.worker]->events())
    throw std::invalid_argument("a context bound through no worker's event channels");
  placed_[context.get()] = Placement{context, home.worker, home.worker, &hca};
  workers_[home.worker]->adopt(std::move(context), hca, /*home=*/true);
}

void FastPathPool::remove(const std::shared_ptr<Schedulable>& context) {
  std::lock_guard lock(mu_);
  auto it = placed_.find(context.get());
  if (it == placed_.end()) return;
  const Placement& p = it->second;
  workers_[p.worker]->drop(context, p.worker == p.home);
  if (p.worker != p.home) workers_[p.home]->forget_port(context);
  placed_.erase(it);
  rebalance();
}

// Moves one context from the busiest worker to the least busy when their
// counts differ by more than one (after a removal, at most one move is due);
// one whose port the least busy holds, if any: its kicks then need no
// passing on.
void FastPathPool::rebalance() {
  const auto count = counts();
  const auto most = static_cast<unsigned>(std::max_element(count.begin(), count.end()) - count.begin());
  const auto least = static_cast<unsigned>(std::min_element(count.begin(), count.end()) - count.begin());
  if (count[most] <= count[least] + 1) return;
  Placement* chosen = nullptr;
  for (auto& [ctx, p] : placed_) {
    if (p.worker != most || p.context.expired()) continue;
    if (!chosen || p.home == least) chosen = &p;
    if (p.home == least) break;
  }
  if (!chosen) return;
  auto context = chosen->context.lock();
  if (!context) return;
  chosen->worker = least;
  workers_[most]->hand_over(std::move(context), *chosen->hca, *workers_[least], most == chosen->home,
                            least == chosen->home);
}

// ---- ControlPool -----------------------------------------------------------

ControlPool::ControlPool(unsigned max_threads)
    : max_threads_(std::max(1u, max_threads)), base_nice_(::getpriority(PRIO_PROCESS, 0)) {}

ControlPool::~ControlPool() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
  // Whatever a finishing task queued after the threads left.
  while (!queue_.empty()) {
    Task task = std::move(queue_.front());
    queue_.pop_front();
    task();
  }
}

void ControlPool::submit(Task task) {
  std::lock_guard lock(mu_);
  queue_.push_back(std::move(task));
  if (idle_ == 0 && threads_.size() < max_threads_ && !stopping_)
    threads_.emplace_back([this] {
      platform::name_this_thread("vib-control");
      run();
    });
  else
    cv_.notify_one();
}

unsigned ControlPool::threads() const {
  std::lock_guard lock(mu_);
  return static_cast<unsigned>(threads_.size());
}

void ControlPool::run() {
  // Started from whichever thread submitted first (a worker, maybe): this
  // pool's work is not urgent, so it runs at the process's own priority.
  ::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), base_nice_);
  std::unique_lock lock(mu_);
  for (;;) {
    ++idle_;
    cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
    --idle_;
    if (queue_.empty()) return;  // stopping, nothing left
    Task task = std::move(queue_.front());
    queue_.pop_front();
    lock.unlock();
    task();
    task = nullptr;  // whatever it owned goes before the lock is taken again
    lock.lock();
  }
}

}  // namespace vib::backend
