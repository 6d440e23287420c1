// Where the host-local Xen's sockets live: one definition for servers and clients.
#include "vib/platform/types.hpp"

namespace vib::platform {

std::string local_xenstore_socket(const std::string& dir, DomId domid) {
  return dir + "/domain/" + std::to_string(domid) + "/xenstore";
}

std::string local_hypervisor_socket(const std::string& dir, DomId domid) {
  return dir + "/domain/" + std::to_string(domid) + "/hypervisor";
}

}  // namespace vib::platform
