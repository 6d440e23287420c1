// Internal: the rdma-core (libibverbs) implementation.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "vib/platform/hca.hpp"

namespace vib::platform::verbs {

std::vector<std::string> device_names();
// Throws std::system_error naming the device when absent or unopenable.
std::unique_ptr<Hca> open_verbs_hca(std::string_view name);

}  // namespace vib::platform::verbs
