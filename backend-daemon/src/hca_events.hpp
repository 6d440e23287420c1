// How the HCA's events reach the context that owns the object they name.
//
// An HCA has one completion-event fd and one async-event fd for all of its
// objects; the fast-path workers wait on the first, vibd's main thread on the
// second, and each event goes to the owning context's mailbox, which wakes
// the context on its worker. Workers
// register and unregister their objects (ControlPath's HcaObjectListener).
#pragma once

#include <sys/eventfd.h>

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <system_error>
#include <vector>

#include "vib/platform/hca.hpp"
#include "vib/platform/unique_fd.hpp"

namespace vib::backend {

// One context's inbox. Shared (shared_ptr) by the worker and the router, so
// an event routed while the context closes lands in a live object.
class ContextMailbox {
 public:
  ContextMailbox() : wake_fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
    if (!wake_fd_) throw std::system_error(errno, std::generic_category(), "eventfd");
  }
  int fd() const { return wake_fd_.get(); }
  void wake() {
    pending_.store(true, std::memory_order_release);
    const std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_fd_.get(), &one, sizeof one);
  }
  void post(const platform::AsyncEvent& event) {
    {
      std::lock_guard lock(mu_);
      events_.push_back(event);
    }
    wake();
  }
  // The queued asynchronous events. The worker calls this on every pass of
  // its busy-poll loop, so when nothing was posted it costs one atomic load:
  // no system call, no lock (the fd is drained only by clear_wake()).
  std::vector<platform::AsyncEvent> take() {
    if (!pending_.load(std::memory_order_acquire) || !pending_.exchange(false, std::memory_order_acq_rel)) return {};
    std::lock_guard lock(mu_);
    return std::exchange(events_, {});
  }
  // After the worker's sleep ended on fd(): resets it, so the next sleep
  // waits. Whatever was posted stays pending for take().
  void clear_wake() {
    std::uint64_t value;
    [[maybe_unused]] auto n = ::read(wake_fd_.get(), &value, sizeof value);
  }

 private:
  platform::UniqueFd wake_fd_;
  std::atomic<bool> pending_{false};
  std::mutex mu_;
  std::vector<platform::AsyncEvent> events_;
};

class HcaEventRouter {
 public:
  void add(const void* object, std::shared_ptr<ContextMailbox> mailbox) {
    std::lock_guard lock(mu_);
    owners_[object] = std::move(mailbox);
  }
  void remove(const void* object) {
    std::lock_guard lock(mu_);
    owners_.erase(object);
  }
  // Completion events (a fast-path worker): wakes the owners of the CQs.
  void dispatch_completions(platform::Hca& hca) {
    while (platform::CompletionQueue* cq = hca.next_completion_event())
      if (auto mailbox = owner(cq)) mailbox->wake();
  }
  // Asynchronous events (vibd's main thread): queued for their owners; a
  // port's event for every context with an object on the HCA.
  void dispatch_async(platform::Hca& hca) {
    while (auto event = hca.next_async_event()) {
      const void* object = event->qp ? static_cast<const void*>(event->qp)
                           : event->cq ? static_cast<const void*>(event->cq)
                                       : static_cast<const void*>(event->srq);
      if (object) {
        if (auto mailbox = owner(object)) mailbox->post(*event);
        continue;
      }
      std::set<ContextMailbox*> told;
      for (auto& mailbox : all_owners())
        if (told.insert(mailbox.get()).second) mailbox->post(*event);
    }
  }

 private:
  std::vector<std::shared_ptr<ContextMailbox>> all_owners() {
    std::lock_guard lock(mu_);
    std::vector<std::shared_ptr<ContextMailbox>> out;
    for (auto& [object, mailbox] : owners_) out.push_back(mailbox);
    return out;
  }
  std::shared_ptr<ContextMailbox> owner(const void* object) {
    std::lock_guard lock(mu_);
    auto it = owners_.find(object);
    return it == owners_.end() ? nullptr : it->second;
  }
  std::mutex mu_;
  std::map<const void*, std::shared_ptr<ContextMailbox>> owners_;
};

}  // namespace vib::backend
