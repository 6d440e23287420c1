// A vib device: its guest domain and its device number there.
#pragma once

#include <compare>

#include "vib/platform/types.hpp"

namespace vib::backend {

struct DeviceId {
  platform::DomId domid;
  unsigned devid;
  auto operator<=>(const DeviceId&) const = default;
};

}  // namespace vib::backend
