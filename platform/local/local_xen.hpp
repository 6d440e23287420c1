// Internal: the host-local Xen's client side (grants and event channels
// brokered by vib-localxen over the domain's hypervisor socket).
#pragma once

#include <memory>
#include <string>

#include "vib/platform/event_channels.hpp"
#include "vib/platform/grants.hpp"

namespace vib::platform::local {

std::unique_ptr<GrantMapper> open_grant_mapper(const std::string& dir, DomId self);
std::unique_ptr<GrantSharer> open_grant_sharer(const std::string& dir, DomId self);
std::unique_ptr<EventChannels> open_event_channels(const std::string& dir, DomId self);

}  // namespace vib::platform::local
