// Basic Xen identifiers shared by every platform interface.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace vib::platform {

using DomId = std::uint16_t;
using GrantRef = std::uint32_t;
using EventPort = std::uint32_t;

inline constexpr DomId kDom0 = 0;
inline constexpr std::size_t kPageSize = 4096;

// Which Xen a process talks to. The product default is the real one; the
// host-local Xen (tests, demos, machines without a hypervisor) is only ever
// chosen explicitly, by a command-line flag or a configuration entry.
struct XenTarget {
  enum class Kind { real, local };
  Kind kind = Kind::real;
  // Host-local only: the directory the local Xen serves from, and the domain
  // this process acts as (one socket per domain, see docs/design.md).
  std::string local_dir;
  DomId local_domid = kDom0;

  static XenTarget real() { return {}; }
  static XenTarget local(std::string dir, DomId domid) {
    return {Kind::local, std::move(dir), domid};
  }
};

// Paths of the host-local Xen's per-domain sockets, one definition for the
// servers and every client.
std::string local_xenstore_socket(const std::string& dir, DomId domid);
std::string local_hypervisor_socket(const std::string& dir, DomId domid);

}  // namespace vib::platform
