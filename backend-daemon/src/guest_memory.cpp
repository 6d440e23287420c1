#include "guest_memory.hpp"

#include <cstring>
#include <system_error>

namespace vib::backend {

namespace {

std::uint64_t pages_for(std::uint64_t entries, std::uint64_t per_page) { return (entries + per_page - 1) / per_page; }

// Maps `pages` indirect pages and copies their first `count` refs out.
int read_indirect(GuestMemory& memory, std::span<const platform::GrantRef> pages, std::uint64_t count,
                  std::vector<platform::GrantRef>& out) {
  // Mapped in chunks so one request never pins a huge window of dom0's space.
  constexpr std::size_t kChunk = 64;
  out.clear();
  out.reserve(count);
  for (std::size_t first = 0; first < pages.size() && out.size() < count; first += kChunk) {
    const auto chunk = pages.subspan(first, std::min(kChunk, pages.size() - first));
    std::unique_ptr<platform::GrantMapping> mapping;
    try {
      mapping = memory.map(chunk, /*writable=*/false);
    } catch (const std::system_error&) {
      return VIBIF_EACCES;
    }
    const std::uint64_t take = std::min<std::uint64_t>(count - out.size(), chunk.size() * VIBIF_REFS_PER_PAGE);
    const std::size_t at = out.size();
    out.resize(at + take);
    std::memcpy(out.data() + at, mapping->bytes().data(), take * sizeof(platform::GrantRef));
  }
  return out.size() == count ? VIBIF_OK : VIBIF_EFAULT;
}

}  // namespace

int resolve_page_list(GuestMemory& memory, const vibif_page_list& list, std::uint64_t max_pages,
                      std::vector<platform::GrantRef>& refs) {
  const std::uint64_t n = list.nr_pages;
  if (n == 0 || n > max_pages || list.nr_refs > VIBIF_PAGE_LIST_INLINE) return VIBIF_EINVAL;
  const std::span<const platform::GrantRef> inline_refs(list.refs, list.nr_refs);
  switch (list.levels) {
    case 0:
      if (list.nr_refs != n) return VIBIF_EINVAL;
      refs.assign(inline_refs.begin(), inline_refs.end());
      return VIBIF_OK;
    case 1:
      if (list.nr_refs != pages_for(n, VIBIF_REFS_PER_PAGE)) return VIBIF_EINVAL;
      return read_indirect(memory, inline_refs, n, refs);
    case 2: {
      const std::uint64_t second = pages_for(n, VIBIF_REFS_PER_PAGE);
      if (list.nr_refs != pages_for(second, VIBIF_REFS_PER_PAGE)) return VIBIF_EINVAL;
      std::vector<platform::GrantRef> level2;
      if (int status = read_indirect(memory, inline_refs, second, level2)) return status;
      return read_indirect(memory, level2, n, refs);
    }
    default:
      return VIBIF_EINVAL;
  }
}

}  // namespace vib::backend
