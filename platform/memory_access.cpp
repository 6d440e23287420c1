#include "vib/platform/memory_access.hpp"

#include <sys/uio.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>

namespace vib::platform {

bool MappedMemory::read(std::size_t offset, std::span<std::byte> out) {
  std::memcpy(out.data(), bytes_.data() + offset, out.size());
  return true;
}

bool MappedMemory::write(std::size_t offset, std::span<const std::byte> in) {
  std::memcpy(bytes_.data() + offset, in.data(), in.size());
  return true;
}

std::optional<std::uint64_t> MappedMemory::fetch_add(std::size_t offset, std::uint64_t add) {
  // The owner's CPUs may touch the word concurrently: operate atomically.
  std::atomic_ref<std::uint64_t> word(*reinterpret_cast<std::uint64_t*>(bytes_.data() + offset));
  return word.fetch_add(add);
}

std::optional<std::uint64_t> MappedMemory::compare_swap(std::size_t offset, std::uint64_t compare,
                                                        std::uint64_t swap) {
  std::atomic_ref<std::uint64_t> word(*reinterpret_cast<std::uint64_t*>(bytes_.data() + offset));
  word.compare_exchange_strong(compare, swap);  // compare now holds the original
  return compare;
}

ProcessMemory::ProcessMemory(pid_t owner, std::span<const Piece> pieces) : owner_(owner) {
  for (const auto& p : pieces) {
    if (p.length == 0) continue;
    if (!pieces_.empty() && pieces_.back().address + pieces_.back().length == p.address) {
      pieces_.back().length += p.length;
    } else {
      pieces_.push_back(p);
      starts_.push_back(size_);
    }
    size_ += p.length;
  }
}

bool ProcessMemory::transfer(std::size_t offset, std::byte* local, std::size_t n, bool to_owner) {
  if (n == 0) return true;
  if (offset > size_ || n > size_ - offset) return false;
  // The piece holding `offset`, then as many as the range spans (IOV_MAX
  // bounds one call; longer ranges take several).
  std::size_t i = static_cast<std::size_t>(std::upper_bound(starts_.begin(), starts_.end(), offset) - starts_.begin()) - 1;
  std::size_t skip = offset - starts_[i];
  while (n > 0) {
    constexpr std::size_t kMaxIov = 512;
    iovec remote[kMaxIov];
    std::size_t count = 0, bytes = 0;
    while (count < kMaxIov && bytes < n) {  // in bounds: checked above
      const std::size_t avail = pieces_[i].length - skip;
      const std::size_t take = std::min(avail, n - bytes);
      remote[count++] = {reinterpret_cast<void*>(pieces_[i].address + skip), take};
      bytes += take;
      if (take == avail) {
        ++i;
        skip = 0;
      } else {
        skip += take;
      }
    }
    iovec mine{local, bytes};
    const ssize_t done = to_owner ? ::process_vm_writev(owner_, &mine, 1, remote, count, 0)
                                  : ::process_vm_readv(owner_, &mine, 1, remote, count, 0);
    if (done < 0 || static_cast<std::size_t>(done) != bytes) return false;
    local += bytes;
    n -= bytes;
  }
  return true;
}

bool ProcessMemory::read(std::size_t offset, std::span<std::byte> out) {
  return transfer(offset, out.data(), out.size(), /*to_owner=*/false);
}

bool ProcessMemory::write(std::size_t offset, std::span<const std::byte> in) {
  return transfer(offset, const_cast<std::byte*>(in.data()), in.size(), /*to_owner=*/true);
}

std::optional<std::uint64_t> ProcessMemory::fetch_add(std::size_t offset, std::uint64_t add) {
  std::lock_guard lock(atomics_);
  std::uint64_t value;
  if (!read(offset, std::as_writable_bytes(std::span(&value, 1)))) return std::nullopt;
  const std::uint64_t sum = value + add;
  if (!write(offset, std::as_bytes(std::span(&sum, 1)))) return std::nullopt;
  return value;
}

std::optional<std::uint64_t> ProcessMemory::compare_swap(std::size_t offset, std::uint64_t compare,
                                                         std::uint64_t swap) {
  std::lock_guard lock(atomics_);
  std::uint64_t value;
  if (!read(offset, std::as_writable_bytes(std::span(&value, 1)))) return std::nullopt;
  if (value == compare && !write(offset, std::as_bytes(std::span(&swap, 1)))) return std::nullopt;
  return value;
}

namespace {

class Holding final : public MemoryAccess {
 public:
  Holding(std::unique_ptr<MemoryAccess> memory, std::shared_ptr<void> owner)
      : owner_(std::move(owner)), memory_(std::move(memory)) {}
  std::size_t size() const override { return memory_->size(); }
  std::span<std::byte> mapped() override { return memory_->mapped(); }
  bool read(std::size_t offset, std::span<std::byte> out) override { return memory_->read(offset, out); }
  bool write(std::size_t offset, std::span<const std::byte> in) override { return memory_->write(offset, in); }
  std::optional<std::uint64_t> fetch_add(std::size_t offset, std::uint64_t add) override {
    return memory_->fetch_add(offset, add);
  }
  std::optional<std::uint64_t> compare_swap(std::size_t offset, std::uint64_t compare,
                                            std::uint64_t swap) override {
    return memory_->compare_swap(offset, compare, swap);
  }

 private:
  std::shared_ptr<void> owner_;             // declared first: destroyed last
  std::unique_ptr<MemoryAccess> memory_;
};

}  // namespace

std::unique_ptr<MemoryAccess> holding(std::unique_ptr<MemoryAccess> memory, std::shared_ptr<void> owner) {
  return std::make_unique<Holding>(std::move(memory), std::move(owner));
}

}  // namespace vib::platform
