#include <poll.h>

#include <cerrno>
#include <system_error>

#include "vib/platform/xenstore.hpp"

namespace vib::platform {

std::optional<std::string> wait_for_node(
    XenStore& store, const std::string& path,
    const std::function<bool(const std::optional<std::string>&)>& done,
    std::chrono::milliseconds timeout) {
  using Clock = std::chrono::steady_clock;
  const std::string token = "vib-wait:" + path;
  store.watch(path, token);
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    // Read after arming the watch, so a change in between is not missed.
    auto value = store.read(kNoTransaction, path);
    if (done(value)) {
      store.unwatch(path, token);
      return value;
    }
    const auto now = Clock::now();
    if (now >= deadline) {
      store.unwatch(path, token);
      throw std::system_error(ETIMEDOUT, std::generic_category(), "timed out waiting for " + path);
    }
    // Rounded up: a wait that truncated to whole milliseconds would give up
    // before its timeout (0.9 ms left read as 0).
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - now);
    pollfd p{store.watch_fd(), POLLIN, 0};
    ::poll(&p, 1, static_cast<int>(left.count()));
    while (store.next_watch_event()) {
    }
  }
}

}  // namespace vib::platform
