// Internal: the built-in software HCA.
#pragma once

#include <memory>

#include "vib/platform/hca.hpp"

namespace vib::platform::soft {

std::unique_ptr<Hca> open_soft_hca();

}  // namespace vib::platform::soft
