// Event channels over the real libxenevtchn. Peer status needs libxenctrl's
// evtchn_status, which only a privileged domain (dom0, a driver domain) has.
#include <fcntl.h>

#include <cerrno>
#include <system_error>

extern "C" {
#include <xenevtchn.h>
}

#include "evtchn_status.h"
#include "real_xen.hpp"

namespace vib::platform::real {

namespace {

[[noreturn]] void fail(const std::string& what) {
  throw std::system_error(errno, std::generic_category(), what);
}

class XenEventChannels final : public EventChannels {
 public:
  XenEventChannels() : h_(xenevtchn_open(nullptr, 0)) {
    if (!h_) fail("cannot open the event channel device (/dev/xen/evtchn)");
    // pending() must not wait: xenevtchn_pending() is a read() of the
    // device, which blocks until the next event unless the fd is
    // non-blocking (libxenevtchn has no open flag for it). Callers drain
    // with `while (auto port = pending())` and sleep in poll() instead.
    const int fd = xenevtchn_fd(h_);
    const int flags = ::fcntl(fd, F_GETFL);
    if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
      const int err = errno;
      xenevtchn_close(h_);
      errno = err;
      fail("cannot make the event channel device non-blocking");
    }
  }
  ~XenEventChannels() override { xenevtchn_close(h_); }
  XenEventChannels(const XenEventChannels&) = delete;
  XenEventChannels& operator=(const XenEventChannels&) = delete;

  EventPort bind_unbound(DomId remote) override {
    const xenevtchn_port_or_error_t port = xenevtchn_bind_unbound_port(h_, remote);
    if (port < 0) fail("allocating an event channel for domain " + std::to_string(remote));
    return static_cast<EventPort>(port);
  }

  EventPort bind_interdomain(DomId remote, EventPort remote_port) override {
    const xenevtchn_port_or_error_t port = xenevtchn_bind_interdomain(h_, remote, remote_port);
    if (port < 0)
      fail("binding to port " + std::to_string(remote_port) + " of domain " + std::to_string(remote));
    return static_cast<EventPort>(port);
  }

  void unbind(EventPort port) override {
    if (xenevtchn_unbind(h_, port) != 0) fail("unbinding port " + std::to_string(port));
  }
  void notify(EventPort port) override {
    if (xenevtchn_notify(h_, port) != 0) fail("notifying port " + std::to_string(port));
  }
  int fd() override { return xenevtchn_fd(h_); }

  std::optional<EventPort> pending() override {
    const xenevtchn_port_or_error_t port = xenevtchn_pending(h_);
    if (port < 0) {
      if (errno == EAGAIN) return std::nullopt;
      fail("reading pending event channels");
    }
    return static_cast<EventPort>(port);
  }

  void unmask(EventPort port) override {
    if (xenevtchn_unmask(h_, port) != 0) fail("unmasking port " + std::to_string(port));
  }

  std::optional<bool> peer_closed(EventPort port) override {
    const int closed = vib_evtchn_peer_closed(port);
    if (closed < 0) return std::nullopt;
    return closed == 1;
  }

 private:
  xenevtchn_handle* h_;
};

}  // namespace

std::unique_ptr<EventChannels> open_event_channels() { return std::make_unique<XenEventChannels>(); }

}  // namespace vib::platform::real
