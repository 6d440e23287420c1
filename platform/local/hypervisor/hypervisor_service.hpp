// Internal to the host-local Xen: the grant-table and event-channel service.
//
// It listens on <dir>/domain/<domid>/hypervisor for every live domain; the
// connection a request arrives on is the identity of the calling domain.
#pragma once

#include <memory>
#include <string>

#include "vib/platform/types.hpp"

namespace vib::platform::local {

class HypervisorService {
 public:
  virtual ~HypervisorService() = default;  // stops serving, closes every socket

  // Starts serving in a thread of its own. Domain 0 exists from the start.
  static std::unique_ptr<HypervisorService> start(const std::string& dir);

  // Called by the store when a domain is introduced / released. Thread-safe.
  // Destroying a domain closes its connections, unbinds its ports (their
  // peers see peer_closed), revokes its grants and unmaps nothing of others.
  virtual void domain_created(DomId domid) = 0;
  virtual void domain_destroyed(DomId domid) = 0;
};

}  // namespace vib::platform::local
