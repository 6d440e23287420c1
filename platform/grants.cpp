#include "vib/platform/grants.hpp"

namespace vib::platform {

std::unique_ptr<MemoryAccess> GrantMapper::access(DomId granter, std::span<const GrantRef> refs, bool writable) {
  std::shared_ptr<GrantMapping> mapping = map(granter, refs, writable);
  return holding(std::make_unique<MappedMemory>(mapping->bytes()), mapping);
}

}  // namespace vib::platform
