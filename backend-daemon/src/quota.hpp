// A device's quotas (max-pds, ..., max-pinned-pages in its back-end
// directory) hold for the device as a whole: every context of the device
// charges one shared account, so a guest that opens more contexts gets no
// more of dom0's memory or the HCA's objects (issue 11, finding 2).
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>

namespace vib::backend {

struct DeviceConfig;

enum class Quota : unsigned { pds, ahs, mrs, cqs, srqs, qps, pinned_pages, count };

// What the device's contexts hold together, against the device's limits.
// Shared by the device and its contexts (a context may outlive its device
// by a little); any thread.
class DeviceQuota {
 public:
  explicit DeviceQuota(const DeviceConfig& config);
  // Moves one holder's share of `q` from `held` to `wanted`: always when it
  // shrinks, and when it grows only while the device's total stays within
  // the limit (or `force`). False (nothing changed) when it would not.
  bool move(Quota q, std::uint64_t held, std::uint64_t wanted, bool force = false);
  std::uint64_t used(Quota q) const;
  std::uint64_t limit(Quota q) const { return limit_[static_cast<unsigned>(q)]; }

 private:
  mutable std::mutex mu_;
  std::array<std::uint64_t, static_cast<unsigned>(Quota::count)> limit_{}, used_{};
};

// One context's share of its device's quota. Its holdings are set to what
// the context has after each request (so every failure and destroy path
// gives back what it took) and returned in full when it goes.
class QuotaShare {
 public:
  explicit QuotaShare(std::shared_ptr<DeviceQuota> device) : device_(std::move(device)) {}
  ~QuotaShare() { release_all(); }
  QuotaShare(const QuotaShare&) = delete;
  QuotaShare& operator=(const QuotaShare&) = delete;

  // Before creating: may the context hold `wanted` of `q` now? Takes it if so.
  bool reserve(Quota q, std::uint64_t wanted);
  // After a request: what the context really holds (never refused).
  void settle(Quota q, std::uint64_t actual);
  void release_all();
  const DeviceQuota& device() const { return *device_; }

 private:
  std::shared_ptr<DeviceQuota> device_;
  std::array<std::uint64_t, static_cast<unsigned>(Quota::count)> held_{};
};

}  // namespace vib::backend
