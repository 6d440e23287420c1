// vibd's execution model (docs/design.md, "vibd threads"): a fixed set of
// fast-path workers, each serving many contexts, and a small pool for the
// control requests that may take long. What a worker or the pool does with a
// context is the context's business (Context); this file only schedules.
#pragma once

#include <sys/resource.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "vib/platform/event_channels.hpp"
#include "vib/platform/hca.hpp"
#include "vib/platform/unique_fd.hpp"

namespace vib::backend {

class HcaEventRouter;

// What a worker needs from a context. Every call but the constructor's and
// kicked()'s happens on the context's current worker thread.
class Schedulable {
 public:
  virtual ~Schedulable() = default;
  // The event channel port its guest kicks, bound through the handle of its
  // home worker (FastPathPool::next_home).
  virtual platform::EventPort event_port() const = 0;
  // Its guest kicked it: called on its home worker's thread, which has
  // taken and unmasked the port and then wakes the context.
  virtual void kicked() = 0;
  // What wakes the context otherwise (HCA events, the control pool), and
  // its home worker's kicks once another worker serves it (see raise_mail).
  virtual int mailbox_fd() = 0;
  // After mailbox_fd() was readable: consumes what made it so.
  virtual void consume_mail() = 0;
  // From its home worker's thread, for a kick when another worker serves it.
  virtual void raise_mail() = 0;
  enum class Pass {
    worked,    // did something: poll again soon
    idle,      // nothing to do
    parked,    // the control pool has it: do not poll it until it wakes
    finished,  // the guest has gone: never poll it again
  };
  // One bounded pass over the context's ring and queues.
  virtual Pass pass() = 0;
  // Going to sleep: tells the guest to kick and the HCA to raise completion
  // events, then looks once more. False if work arrived meanwhile (the
  // context stays awake).
  virtual bool prepare_sleep() = 0;
  // Woken: the guest may stop kicking.
  virtual void woke() = 0;
  // Closed by vibd's main thread: a worker that is handed it lets it go.
  virtual bool closed() const = 0;
};

// Decides whether an idle worker spins or sleeps. Spinning pays only when
// work comes back within the spin window, and is acceptable only while no
// one else wants a CPU. Measured at the start of a spin and now and then
// during it: the machine's runnable threads (/proc/loadavg) against its
// online CPUs; and at its end: the worker's involuntary context switches
// (getrusage RUSAGE_THREAD) and its CPU time against wall time. More
// runnable threads than CPUs, a preemption, or less than 90% of the wall
// time means the CPUs are contended: the worker stops spinning for a
// back-off that grows while contention lasts.
class SpinPolicy {
 public:
  using Clock = std::chrono::steady_clock;
  explicit SpinPolicy(std::chrono::microseconds max_spin);
  // How long to spin now before sleeping (zero: sleep at once).
  std::chrono::microseconds budget(Clock::time_point now) const;
  // A spin starts at `now`; false if others want the CPU (then it ends at
  // once).
  bool spin_started(Clock::time_point now);
  // During a spin: false once others want the CPU.
  bool keep_spinning(Clock::time_point now);
  // A spin ended; `found_work` says whether it caught work.
  void spin_ended(Clock::time_point now, bool found_work);
  // After a sleep: `gap` from the last work to the next; a short one would
  // have been caught by a spin.
  void slept(std::chrono::nanoseconds gap);

  std::uint64_t spins() const { return spins_; }
  std::uint64_t contended() const { return contended_count_; }

 private:
  static std::int64_t thread_cpu_ns();
  static long involuntary_switches();
  bool others_runnable();
  void contention(Clock::time_point now);

  std::chrono::microseconds max_spin_;
  long cpus_;
  platform::UniqueFd loadavg_;
  Clock::time_point spin_start_{};
  std::int64_t spin_cpu_start_ = 0;
  long spin_switches_start_ = 0;
  bool contended_now_ = false;
  Clock::time_point quiet_until_{};  // no spinning before this
  std::chrono::milliseconds backoff_{10};
  // Exponentially weighted share of idle periods that a spin would catch
  // (fixed point, 1024 = all).
  std::uint32_t hit_rate_ = 1024;
  std::uint64_t spins_ = 0, contended_count_ = 0;
};

class Worker;

// The fast-path workers. Contexts are added by vibd's main thread, go to
// the worker serving the fewest, and move when the counts drift apart.
//
// Each worker has one event channel handle (like one xenevtchn handle: one
// fd whatever the number of ports) and waits on it for the kicks of every
// context placed on it, its *home*. A port stays bound where it was bound:
// when a context has moved to another worker, its home worker passes its
// kicks on through the context's mailbox.
class FastPathPool {
 public:
  using OpenEventChannels = std::function<std::unique_ptr<platform::EventChannels>()>;
  // `nice`: the workers' nice value (they run only for their guests' work,
  // so they go first when they have some; 0 leaves it). `open_handle` opens
  // each worker's event channel handle.
  FastPathPool(unsigned workers, std::chrono::microseconds max_spin, int nice, HcaEventRouter& router,
               const OpenEventChannels& open_handle);
  ~FastPathPool();  // stops and joins the workers (each pass is bounded)
  FastPathPool(const FastPathPool&) = delete;
  FastPathPool& operator=(const FastPathPool&) = delete;

  // Where the next context goes: the worker serving the fewest, and the
  // handle its port is to be bound through (the handle lives as long as
  // any context holds it).
  struct Home {
    unsigned worker = 0;
    std::shared_ptr<platform::EventChannels> events;
  };
  Home next_home();
  // `context`'s port was bound through `home.events`.
  void add(std::shared_ptr<Schedulable> context, platform::Hca& hca, const Home& home);
  // Never waits for the worker: it lets go of the context on its next loop.
  void remove(const std::shared_ptr<Schedulable>& context);
  unsigned size() const { return static_cast<unsigned>(workers_.size()); }

 private:
  struct Placement {
    std::weak_ptr<Schedulable> context;
    unsigned worker;  // serving it now
    unsigned home;    // holding its port
    platform::Hca* hca;
  };
  std::vector<unsigned> counts() const;  // contexts per worker; mu_ held
  void rebalance();
  std::vector<std::unique_ptr<Worker>> workers_;
  std::mutex mu_;
  std::map<const Schedulable*, Placement> placed_;
};

// Threads for control requests that may take long (registrations, queue
// creation: anything that maps guest pages or may block in the HCA). A
// context is queued at most once and served by one thread at a time, so its
// requests stay in order. The pool grows while every thread is busy and
// work waits, up to `max_threads`, so one guest's slow request stalls no
// other guest.
class ControlPool {
 public:
  using Task = std::function<void()>;
  explicit ControlPool(unsigned max_threads);
  ~ControlPool();  // runs what is queued, then joins
  ControlPool(const ControlPool&) = delete;
  ControlPool& operator=(const ControlPool&) = delete;
  void submit(Task task);
  unsigned threads() const;

 private:
  void run();
  unsigned max_threads_;
  int base_nice_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> queue_;
  unsigned idle_ = 0;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace vib::backend
