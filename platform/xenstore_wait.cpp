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
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      store.unwatch(path, token);
      throw std::system_error(ETIMEDOUT, std::generic_category(), "timed out waiting for " + path);
    }
    pollfd p{store.watch_fd(), POLLIN, 0};
    ::poll(&p, 1, static_cast<int>(left.count()));
    while (store.next_watch_event()) {
    }
  }
}

}  // namespace vib::platform
