// Inter-domain event channels as vib uses them (libxenevtchn).
//
// Two implementations: the real libxenevtchn, and the host-local Xen's,
// brokered by the local hypervisor.
#pragma once

#include <memory>
#include <cstddef>
#include <optional>
#include <span>

#include "vib/platform/types.hpp"

namespace vib::platform {

// One handle, like a xenevtchn_handle: every port bound through it is unbound
// when it is destroyed (or when the process dies).
class EventChannels {
 public:
  virtual ~EventChannels() = default;

  // Allocates a port that `remote` may bind to (the side that publishes the
  // port number in xenstore).
  virtual EventPort bind_unbound(DomId remote) = 0;
  // Binds to a port `remote` allocated for us.
  virtual EventPort bind_interdomain(DomId remote, EventPort remote_port) = 0;
  virtual void unbind(EventPort port) = 0;
  virtual void notify(EventPort port) = 0;

  // Pollable (POLLIN) while a port is pending.
  virtual int fd() = 0;
  // Non-blocking: the next pending port, masked until unmask(); nullopt if none.
  virtual std::optional<EventPort> pending() = 0;
  // Non-blocking: up to out.size() pending ports, each masked until
  // unmask(); returns how many. A handle serving many ports takes them in
  // batches: after fewer than asked, fd() tells of the next one raised, so
  // no call is spent learning that there is none.
  virtual std::size_t take_pending(std::span<EventPort> out) {
    std::size_t n = 0;
    while (n < out.size()) {
      const auto port = pending();
      if (!port) break;
      out[n++] = *port;
    }
    return n;
  }
  virtual void unmask(EventPort port) = 0;

  // Whether the peer of every port bound here is notified when this process
  // exits or dies without unbinding it. Otherwise a process that needs its
  // peer told asks for an unmap notification on a shared page instead.
  virtual bool notifies_peer_on_exit() const { return false; }

  // True when the other end of an interdomain port has gone (unbound, its
  // process died, its domain died). nullopt where this handle cannot tell
  // (the real implementation needs the privilege of dom0 / a driver domain).
  virtual std::optional<bool> peer_closed(EventPort port) = 0;
};

std::unique_ptr<EventChannels> open_event_channels(const XenTarget& target);

// For a guest's front-end process. On real Xen, through the vibgrant module
// when it is loaded: Linux's /dev/xen/evtchn hits a BUG_ON when a port bound
// before the guest was saved and restored (or migrated) is closed after it,
// which the process's exit does; vibgrant's ports end quietly. Without the
// module, and on the host-local Xen, the same as open_event_channels().
std::unique_ptr<EventChannels> open_frontend_event_channels(const XenTarget& target);

}  // namespace vib::platform
