#include "vib/platform/grants.hpp"

namespace vib::platform {

std::unique_ptr<MemoryAccess> GrantMapper::access(DomId granter, std::span<const GrantRef> refs, bool writable) {
  std::shared_ptr<GrantMapping> mapping = map(granter, refs, writable);
  return holding(std::make_unique<MappedMemory>(mapping->bytes()), mapping);
}

std::string grant_table_full(std::size_t needed, std::uint64_t table_size, const std::string& in_use) {
  std::string why = "needs " + std::to_string(needed) + " grants; the grant table is full";
  if (table_size) {
    // Version 1 entries, 512 to a 4 KiB frame.
    why += " (it holds " + std::to_string(table_size) + ", max_grant_frames=" + std::to_string(table_size / 512);
    why += in_use.empty() ? ")" : "; " + in_use + ")";
  }
  // xl create fails with EINVAL above the hypervisor's limit (seen in the lab).
  return why + ": raise max_grant_frames in the domain's xl config (Xen 4.17 refuses more than its " +
         "gnttab_max_frames, 64 unless raised on Xen's command line)";
}

}  // namespace vib::platform
