// Event channels over the real libxenevtchn, or in a guest over the vibgrant
// module. Peer status needs libxenctrl's evtchn_status, which only a
// privileged domain (dom0, a driver domain) has.
#include <fcntl.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <system_error>

extern "C" {
#include <xenevtchn.h>
}

#include "evtchn_status.h"
#include "real_xen.hpp"
#include "vib/platform/unique_fd.hpp"
#include "vib/vibgrant.h"

namespace vib::platform::real {

namespace {

[[noreturn]] void fail(const std::string& what) {
  throw std::system_error(errno, std::generic_category(), what);
}

// libxenctrl's evtchn_status: an answer only in a privileged domain.
std::optional<bool> peer_closed_by_status(EventPort port) {
  const int closed = vib_evtchn_peer_closed(port);
  if (closed < 0) return std::nullopt;
  return closed == 1;
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

  std::optional<bool> peer_closed(EventPort port) override { return peer_closed_by_status(port); }

 private:
  xenevtchn_handle* h_;
};

// The vibgrant module's event channels (vib/vibgrant.h): the ports a
// front-end process holds when its guest is saved and restored end quietly
// with the process, where /dev/xen/evtchn's crash the guest's kernel. Every
// port tells its peer when the process goes without unbinding it.
class VibgrantEventChannels final : public EventChannels {
 public:
  explicit VibgrantEventChannels(UniqueFd device) : fd_(std::move(device)) {}

  EventPort bind_unbound(DomId remote) override {
    return bind(remote, 0, "allocating an event channel for domain " + std::to_string(remote));
  }

  EventPort bind_interdomain(DomId remote, EventPort remote_port) override {
    const std::string what = "binding to port " + std::to_string(remote_port) + " of domain " + std::to_string(remote);
    if (remote_port == 0) {  // 0 would ask the module to allocate one
      errno = EINVAL;
      fail(what + " (vibgrant)");
    }
    return bind(remote, remote_port, what);
  }

  bool notifies_peer_on_exit() const override { return true; }
  void unbind(EventPort port) override { on_port(VIBGRANT_IOCTL_EVTCHN_UNBIND, port, "unbinding"); }
  void notify(EventPort port) override { on_port(VIBGRANT_IOCTL_EVTCHN_NOTIFY, port, "notifying"); }
  void unmask(EventPort port) override { on_port(VIBGRANT_IOCTL_EVTCHN_UNMASK, port, "unmasking"); }
  int fd() override { return fd_.get(); }

  std::optional<EventPort> pending() override {
    EventPort port;
    return take_pending({&port, 1}) ? std::optional(port) : std::nullopt;
  }

  std::size_t take_pending(std::span<EventPort> out) override {
    static_assert(sizeof(EventPort) == sizeof(__u32));
    if (out.empty()) return 0;
    const ssize_t n = ::read(fd_.get(), out.data(), out.size_bytes());
    if (n < 0) {
      if (errno == EAGAIN) return 0;
      fail("reading pending event channels (vibgrant)");
    }
    return static_cast<std::size_t>(n) / sizeof(EventPort);
  }

  std::optional<bool> peer_closed(EventPort port) override { return peer_closed_by_status(port); }

 private:
  // remote_port 0: a new port `remote` may bind to.
  EventPort bind(DomId remote, EventPort remote_port, const std::string& what) {
    vibgrant_evtchn_bind b{};
    b.remote_domid = remote;
    b.remote_port = remote_port;
    b.flags = VIBGRANT_EVTCHN_NOTIFY_ON_CLOSE;
    if (::ioctl(fd_.get(), VIBGRANT_IOCTL_EVTCHN_BIND, &b) != 0) fail(what + " (vibgrant)");
    return b.port;
  }

  void on_port(unsigned long request, EventPort port, const char* what) {
    vibgrant_evtchn_port p{port};
    if (::ioctl(fd_.get(), request, &p) != 0) fail(std::string(what) + " port " + std::to_string(port) + " (vibgrant)");
  }

  UniqueFd fd_;
};

}  // namespace

std::unique_ptr<EventChannels> open_event_channels() { return std::make_unique<XenEventChannels>(); }

std::unique_ptr<EventChannels> open_frontend_event_channels() {
  UniqueFd device(::open(VIBGRANT_DEVICE, O_RDWR | O_CLOEXEC | O_NONBLOCK));
  if (device) {
    // A module from before event channels answers ENOTTY; ours ENOENT
    // (port 0 is never bound).
    vibgrant_evtchn_port none{0};
    if (::ioctl(device.get(), VIBGRANT_IOCTL_EVTCHN_UNMASK, &none) != 0 && errno == ENOENT)
      return std::make_unique<VibgrantEventChannels>(std::move(device));
  }
  return std::make_unique<XenEventChannels>();
}

}  // namespace vib::platform::real
