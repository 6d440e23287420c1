#include "quota.hpp"

#include "control.hpp"

namespace vib::backend {

DeviceQuota::DeviceQuota(const DeviceConfig& config) {
  limit_ = {config.max_pds, config.max_ahs, config.max_mrs,         config.max_cqs,
            config.max_srqs, config.max_qps, config.max_pinned_pages};
}

bool DeviceQuota::move(Quota q, std::uint64_t held, std::uint64_t wanted, bool force) {
  const auto i = static_cast<unsigned>(q);
  std::lock_guard lock(mu_);
  if (!force && wanted > held && used_[i] + (wanted - held) > limit_[i]) return false;
  used_[i] = used_[i] - held + wanted;
  return true;
}

std::uint64_t DeviceQuota::used(Quota q) const {
  std::lock_guard lock(mu_);
  return used_[static_cast<unsigned>(q)];
}

bool QuotaShare::reserve(Quota q, std::uint64_t wanted) {
  auto& held = held_[static_cast<unsigned>(q)];
  if (wanted <= held) return true;
  if (!device_->move(q, held, wanted)) return false;
  held = wanted;
  return true;
}

void QuotaShare::settle(Quota q, std::uint64_t actual) {
  auto& held = held_[static_cast<unsigned>(q)];
  if (actual == held) return;
  // Growing here only follows a reserve(), so it is within the limit; the
  // count must stay true either way.
  device_->move(q, held, actual, /*force=*/true);
  held = actual;
}

void QuotaShare::release_all() {
  for (unsigned i = 0; i < held_.size(); ++i) settle(static_cast<Quota>(i), 0);
}

}  // namespace vib::backend
