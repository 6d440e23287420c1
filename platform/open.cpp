// Chooses between the real Xen and the host-local Xen. The choice is always
// the caller's (XenTarget), never inferred from the environment.
#include "local/local_xen.hpp"
#include "vib/platform/event_channels.hpp"
#include "vib/platform/grants.hpp"
#include "vib/platform/xenstore.hpp"
#include "xen/real_xen.hpp"

namespace vib::platform {

std::unique_ptr<XenStore> open_xenstore(const XenTarget& target) {
  if (target.kind == XenTarget::Kind::local)
    return real::open_libxenstore(local_xenstore_socket(target.local_dir, target.local_domid));
  return real::open_libxenstore(std::nullopt);
}

std::unique_ptr<GrantMapper> open_grant_mapper(const XenTarget& target) {
  if (target.kind == XenTarget::Kind::local)
    return local::open_grant_mapper(target.local_dir, target.local_domid);
  return real::open_grant_mapper();
}

std::unique_ptr<GrantSharer> open_grant_sharer(const XenTarget& target) {
  if (target.kind == XenTarget::Kind::local)
    return local::open_grant_sharer(target.local_dir, target.local_domid);
  return real::open_grant_sharer();
}

std::unique_ptr<EventChannels> open_event_channels(const XenTarget& target) {
  if (target.kind == XenTarget::Kind::local)
    return local::open_event_channels(target.local_dir, target.local_domid);
  return real::open_event_channels();
}

std::unique_ptr<EventChannels> open_frontend_event_channels(const XenTarget& target) {
  if (target.kind == XenTarget::Kind::local)
    return local::open_event_channels(target.local_dir, target.local_domid);
  return real::open_frontend_event_channels();
}

}  // namespace vib::platform
