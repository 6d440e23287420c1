// Grant tables as vib uses them: map pages another domain granted to us
// (libxengnttab), and allocate pages and grant them to another domain
// (libxengntshr / gntalloc).
//
// Two implementations: the real libxengnttab/libxengntshr, and the host-local
// Xen's, where the local hypervisor hands out a page only to the domain it
// was granted to.
#pragma once

#include <cstddef>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "vib/platform/memory_access.hpp"
#include "vib/platform/types.hpp"

namespace vib::platform {

// What to do when a mapping or a share goes away, including when the process
// holding it dies: clear one byte of the page and/or notify an event channel.
// This is how the other side learns of a crash (libxenvchan does the same).
// Xen offers it only for single-page shares and mappings; both implementations
// refuse it (EINVAL) on more than one page.
struct UnmapNotify {
  std::optional<std::size_t> clear_byte_offset;  // within the first page
  std::optional<EventPort> port;                 // a port bound by this process
};

// Pages of another domain mapped into this process. Unmapped on destruction.
class GrantMapping {
 public:
  virtual ~GrantMapping() = default;
  virtual std::span<std::byte> bytes() = 0;
};

class GrantMapper {
 public:
  virtual ~GrantMapper() = default;
  // Maps `refs` granted by `granter`, contiguously, in order. Throws
  // std::system_error when any ref is not granted to this domain (or is
  // read-only and `writable` was asked), and maps nothing in that case.
  virtual std::unique_ptr<GrantMapping> map(DomId granter, std::span<const GrantRef> refs,
                                            bool writable,
                                            const UnmapNotify& notify = {}) = 0;
  // The memory behind `refs` for an HCA: a mapping like map()'s, or, for
  // pages the granter granted in place from a process of its own (the
  // host-local Xen's GrantSharer::grant_range), cross-memory access to that
  // process. Throws like map(). The default maps.
  virtual std::unique_ptr<MemoryAccess> access(DomId granter, std::span<const GrantRef> refs,
                                               bool writable);
};

// Pages this process allocated and granted to one other domain. Access is
// ended and the pages freed on destruction.
class SharedPages {
 public:
  virtual ~SharedPages() = default;
  virtual std::span<std::byte> bytes() = 0;
  virtual std::span<const GrantRef> refs() const = 0;
};

// Pages of this process's address space granted in place, where they are:
// nothing is copied or moved, so the application keeps using them
// undisturbed. The grants end on destruction; the pages stay the
// application's (and, if it has unmapped them meanwhile, nothing happens to
// whatever it mapped there since).
class GrantedRange {
 public:
  virtual ~GrantedRange() = default;
  virtual std::span<const GrantRef> refs() const = 0;
};

// A domain's grant table: its size in entries (max_grant_frames * 512) and
// how many of them vib holds, as far as the platform can tell.
struct GrantTableUse {
  std::uint64_t size = 0;
  std::uint64_t held_by_vib = 0;
};

class GrantSharer {
 public:
  virtual ~GrantSharer() = default;
  // This domain's table, or nullopt where nothing reports it (real Xen
  // without the vibgrant module). On real Xen the count is the module's
  // in-place grants, all processes together; on the host-local Xen every
  // entry the domain's processes hold, granted or reserved for their next
  // grants.
  virtual std::optional<GrantTableUse> table_use() = 0;
  // Allocates `pages` zeroed pages and grants them to `grantee`.
  virtual std::unique_ptr<SharedPages> share(DomId grantee, std::size_t pages, bool writable,
                                             const UnmapNotify& notify = {}) = 0;
  // Grants the `pages` pages at `start` (page-aligned, mapped by this
  // process) to `grantee`, one ref per 4 KiB page. On real Xen the guest
  // kernel's vibgrant module pins them (counted against RLIMIT_MEMLOCK) and
  // grants the frames; the host-local Xen records them for cross-memory
  // access. Throws std::system_error: EFAULT for memory not mapped (or not
  // writable when `writable`), ENOMEM over RLIMIT_MEMLOCK, ENOSPC when the
  // grant table is full.
  virtual std::unique_ptr<GrantedRange> grant_range(DomId grantee, std::byte* start, std::size_t pages,
                                                    bool writable) = 0;
};

// Why granting `needed` pages failed with ENOSPC, for the error: the table's
// size in entries (0: unknown) and what holds some of it (empty: unknown),
// and the setting that makes it larger.
std::string grant_table_full(std::size_t needed, std::uint64_t table_size, const std::string& in_use);

std::unique_ptr<GrantMapper> open_grant_mapper(const XenTarget& target);
std::unique_ptr<GrantSharer> open_grant_sharer(const XenTarget& target);

}  // namespace vib::platform
