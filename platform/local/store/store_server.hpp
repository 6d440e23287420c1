// The host-local xenstore: serves the xenstore wire protocol (xen/io/xs_wire.h)
// on one unix socket per live domain, <dir>/domain/<domid>/xenstore. The socket
// a client connected to is its domain identity, so Xen's permission rules apply
// to guests exactly as they do under xenstored. The real libxenstore and the
// xenstore-* tools talk to it through XENSTORED_PATH.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "vib/platform/types.hpp"

namespace vib::platform::local {

class StoreServer {
 public:
  struct DomainHooks {
    std::function<void(DomId)> introduced;  // after XS_INTRODUCE created the domain
    std::function<void(DomId)> released;    // after XS_RELEASE destroyed it
  };

  // Creates <dir>/domain/0/xenstore and serves in a thread of its own until
  // destroyed. Throws std::system_error if the socket cannot be created.
  static std::unique_ptr<StoreServer> start(const std::string& dir, DomainHooks hooks = {});
  virtual ~StoreServer() = default;
};

}  // namespace vib::platform::local
