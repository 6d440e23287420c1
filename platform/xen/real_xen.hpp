// Internal: the implementations over the real Xen libraries.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "vib/platform/event_channels.hpp"
#include "vib/platform/grants.hpp"
#include "vib/platform/xenstore.hpp"

namespace vib::platform::real {

// libxenstore. With a socket path, connects to that socket (the host-local
// store); without, to the system's xenstored or /dev/xen/xenbus.
std::unique_ptr<XenStore> open_libxenstore(const std::optional<std::string>& socket_path);
std::unique_ptr<GrantMapper> open_grant_mapper();
std::unique_ptr<GrantSharer> open_grant_sharer();
std::unique_ptr<EventChannels> open_event_channels();
// Through the vibgrant module where it is loaded, else open_event_channels().
std::unique_ptr<EventChannels> open_frontend_event_channels();

}  // namespace vib::platform::real
