// Issue 13's check that registering memory loses no write: a 2 KiB buffer
// on its own page, counters just before, inside and just after it (on the
// same page, as malloc's metadata and neighbours are), and a thread that
// increments them all for as long as it runs. Header-only and libc-only, so
// the unit tests (libvibfront) and the lab's plain-libibverbs program share
// it.
#pragma once

#include <sys/mman.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <thread>

namespace vib::test {

class WritersAroundBuffer {
 public:
  static constexpr std::size_t kPage = 4096, kBufferOffset = 1024, kBufferBytes = 2048, kCounters = 4;

  WritersAroundBuffer() {
    mapped_ = ::mmap(nullptr, 3 * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapped_ == MAP_FAILED) throw std::runtime_error("mmap failed");
    auto* page = static_cast<unsigned char*>(mapped_) + kPage;
    buffer_ = page + kBufferOffset;
    for (std::size_t i = 0; i < kBufferBytes; ++i) buffer_[i] = pattern(i);
    counters_[0] = reinterpret_cast<std::uint64_t*>(page + 512);  // before the buffer
    counters_[1] = reinterpret_cast<std::uint64_t*>(buffer_);     // its first word
    counters_[2] = reinterpret_cast<std::uint64_t*>(page + 3584);  // after it
    counters_[3] = reinterpret_cast<std::uint64_t*>(page + kPage - 8);
    for (auto* c : counters_) *c = 0;
  }
  ~WritersAroundBuffer() {
    stop();
    ::munmap(mapped_, 3 * kPage);
  }
  WritersAroundBuffer(const WritersAroundBuffer&) = delete;
  WritersAroundBuffer& operator=(const WritersAroundBuffer&) = delete;

  void* buffer() const { return buffer_; }

  // Starts the writer and returns once it has written.
  void start() {
    writer_ = std::thread([this] {
      while (!stop_.load(std::memory_order_relaxed)) {
        for (auto* c : counters_) std::atomic_ref<std::uint64_t>(*c).fetch_add(1, std::memory_order_relaxed);
        ++increments_;
        started_.store(true, std::memory_order_release);
      }
    });
    while (!started_.load(std::memory_order_acquire)) std::this_thread::yield();
  }
  void stop() {
    stop_.store(true);
    if (writer_.joinable()) writer_.join();
  }

  // After stop(): increments per counter, what counter `c` lost of them, and
  // how many of the buffer's bytes (past its counter) changed.
  std::uint64_t increments() const { return increments_; }
  std::uint64_t lost(std::size_t c) const { return increments_ - *counters_[c]; }
  std::size_t bytes_changed() const {
    std::size_t changed = 0;
    for (std::size_t i = sizeof(std::uint64_t); i < kBufferBytes; ++i)
      if (buffer_[i] != pattern(i)) ++changed;
    return changed;
  }

 private:
  static unsigned char pattern(std::size_t i) { return static_cast<unsigned char>(i * 7 + 3); }

  void* mapped_ = nullptr;
  unsigned char* buffer_ = nullptr;
  std::uint64_t* counters_[kCounters] = {};
  std::thread writer_;
  std::atomic<bool> stop_{false}, started_{false};
  std::uint64_t increments_ = 0;
};

}  // namespace vib::test
