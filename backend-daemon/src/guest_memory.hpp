// A context's view of its guest's memory: grant refs in, mapped pages out.
// vibd maps through the platform's GrantMapper; tests use their own pages.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "vib/platform/grants.hpp"
#include "vib/vibif.h"

namespace vib::backend {

class GuestMemory {
 public:
  virtual ~GuestMemory() = default;
  // Throws std::system_error when any ref is not mappable (EACCES/ENOENT).
  virtual std::unique_ptr<platform::GrantMapping> map(std::span<const platform::GrantRef> refs,
                                                      bool writable) = 0;
  // The memory behind refs for the HCA (GrantMapper::access). Throws likewise.
  virtual std::unique_ptr<platform::MemoryAccess> access(std::span<const platform::GrantRef> refs,
                                                         bool writable) = 0;
};

// The data pages' grant refs a page list describes (vibif.h, PAGE LISTS).
// Indirect pages are mapped read-only and copied before they are read.
// Returns VIBIF_OK or a negative VIBIF_E* status; `max_pages` bounds the list.
int resolve_page_list(GuestMemory& memory, const vibif_page_list& list, std::uint64_t max_pages,
                      std::vector<platform::GrantRef>& refs);

}  // namespace vib::backend
