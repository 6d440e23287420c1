// Test double of a guest's memory for vibd's control path: grant ref r is
// page r of one memfd, so what the "guest" writes the mapping sees. Refs at
// or beyond `pages` are not granted (EACCES), as a forged ref would be.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <system_error>

#include "guest_memory.hpp"

namespace vib::test {

class FakeGuestMemory final : public backend::GuestMemory {
 public:
  explicit FakeGuestMemory(std::size_t pages) : pages_(pages) {
    fd_ = ::memfd_create("fake-guest", MFD_CLOEXEC);
    if (fd_ < 0 || ::ftruncate(fd_, static_cast<off_t>(pages * 4096)) != 0)
      throw std::system_error(errno, std::generic_category(), "fake guest memory");
  }
  ~FakeGuestMemory() override { ::close(fd_); }

  // The guest's own view of page r (for writing page lists and data).
  std::byte* page(std::uint32_t r) {
    if (views_.empty()) {
      void* p = ::mmap(nullptr, pages_ * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
      views_.push_back(static_cast<std::byte*>(p));
    }
    return views_[0] + std::size_t{r} * 4096;
  }

  std::unique_ptr<platform::GrantMapping> map(std::span<const platform::GrantRef> refs, bool writable) override {
    for (auto r : refs)
      if (r >= pages_) throw std::system_error(EACCES, std::generic_category(), "ref not granted");
    ++maps_;
    return std::make_unique<Mapping>(fd_, refs, writable);
  }
  std::unique_ptr<platform::MemoryAccess> access(std::span<const platform::GrantRef> refs, bool writable) override {
    std::shared_ptr<platform::GrantMapping> mapping = map(refs, writable);
    return platform::holding(std::make_unique<platform::MappedMemory>(mapping->bytes()), mapping);
  }
  std::size_t maps() const { return maps_; }

 private:
  class Mapping final : public platform::GrantMapping {
   public:
    Mapping(int fd, std::span<const platform::GrantRef> refs, bool writable) : size_(refs.size() * 4096) {
      base_ = static_cast<std::byte*>(::mmap(nullptr, size_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
      for (std::size_t i = 0; i < refs.size(); ++i)
        ::mmap(base_ + i * 4096, 4096, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED | MAP_FIXED, fd,
               static_cast<off_t>(refs[i]) * 4096);
    }
    ~Mapping() override { ::munmap(base_, size_); }
    std::span<std::byte> bytes() override { return {base_, size_}; }

   private:
    std::byte* base_;
    std::size_t size_;
  };

  std::size_t pages_;
  int fd_ = -1;
  std::vector<std::byte*> views_;
  std::size_t maps_ = 0;
};

}  // namespace vib::test
