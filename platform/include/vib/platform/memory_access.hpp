// How an HCA reaches the bytes of a memory region. Usually a range mapped in
// this process (a gntdev mapping of a guest's granted frames on real Xen);
// on the host-local Xen, where a guest grants its application's own pages in
// place and those pages belong to another process, by cross-memory access
// (process_vm_readv/writev) to that process.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

namespace vib::platform {

class MemoryAccess {
 public:
  virtual ~MemoryAccess() = default;
  virtual std::size_t size() const = 0;
  // All size() bytes mapped contiguously in this process, or empty when the
  // memory is reachable only through read/write (an HCA that needs a mapping,
  // like an rdma-core device, refuses such memory).
  virtual std::span<std::byte> mapped() = 0;
  // Copy [offset, offset + n) out or in. False when the bytes cannot be
  // reached (the owner unmapped them or has gone): the caller reports a
  // protection error, nothing else is touched. Bounds are the caller's
  // to check (offset + n <= size()).
  virtual bool read(std::size_t offset, std::span<std::byte> out) = 0;
  virtual bool write(std::size_t offset, std::span<const std::byte> in) = 0;
  // 64-bit atomics at an 8-byte aligned offset; the original value, or none
  // when unreachable. Atomic against the owner's CPUs only when mapped().
  virtual std::optional<std::uint64_t> fetch_add(std::size_t offset, std::uint64_t add) = 0;
  virtual std::optional<std::uint64_t> compare_swap(std::size_t offset, std::uint64_t compare,
                                                    std::uint64_t swap) = 0;
};

// A range of this process's own address space (kept mapped by its owner).
class MappedMemory final : public MemoryAccess {
 public:
  explicit MappedMemory(std::span<std::byte> bytes) : bytes_(bytes) {}
  std::size_t size() const override { return bytes_.size(); }
  std::span<std::byte> mapped() override { return bytes_; }
  bool read(std::size_t offset, std::span<std::byte> out) override;
  bool write(std::size_t offset, std::span<const std::byte> in) override;
  std::optional<std::uint64_t> fetch_add(std::size_t offset, std::uint64_t add) override;
  std::optional<std::uint64_t> compare_swap(std::size_t offset, std::uint64_t compare,
                                            std::uint64_t swap) override;

 private:
  std::span<std::byte> bytes_;
};

// Pages of another process, in order, reached with process_vm_readv/writev.
// Atomics are read-modify-write under this object's lock: atomic against the
// HCA's other operations on the region, not against the owner's CPUs (as an
// HCA reporting IBV_ATOMIC_HCA promises).
class ProcessMemory final : public MemoryAccess {
 public:
  struct Piece {
    std::uint64_t address;  // in the owner's address space
    std::size_t length;
  };
  // `pieces` in region order; adjacent ones are merged.
  ProcessMemory(pid_t owner, std::span<const Piece> pieces);
  std::size_t size() const override { return size_; }
  std::span<std::byte> mapped() override { return {}; }
  bool read(std::size_t offset, std::span<std::byte> out) override;
  bool write(std::size_t offset, std::span<const std::byte> in) override;
  std::optional<std::uint64_t> fetch_add(std::size_t offset, std::uint64_t add) override;
  std::optional<std::uint64_t> compare_swap(std::size_t offset, std::uint64_t compare,
                                            std::uint64_t swap) override;

 private:
  bool transfer(std::size_t offset, std::byte* local, std::size_t n, bool to_owner);
  pid_t owner_;
  std::vector<Piece> pieces_;
  std::vector<std::size_t> starts_;  // region offset of each piece
  std::size_t size_ = 0;
  std::mutex atomics_;
};

// `memory` together with what keeps its bytes reachable (a mapping, the
// hypervisor's hold on grants), which is destroyed after it.
std::unique_ptr<MemoryAccess> holding(std::unique_ptr<MemoryAccess> memory, std::shared_ptr<void> owner);

}  // namespace vib::platform
