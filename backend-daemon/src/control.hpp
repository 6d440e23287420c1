// The control path of one context: the guest's verbs objects, named by
// handles, and the requests that create and use them. Independent of Xen, so
// it is tested and fuzzed on its own.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "guest_memory.hpp"
#include "handle_table.hpp"
#include "vib/platform/hca.hpp"
#include "vib/vibif.h"

namespace vib::backend {

// The device's configuration, as the toolstack wrote it (defaults applied).
struct DeviceConfig {
  std::string hca;
  std::uint8_t port = VIBIF_DEFAULT_PORT;
  std::vector<std::uint16_t> pkeys{VIBIF_DEFAULT_PKEY};
  std::vector<std::uint32_t> gid_indices{0};
  std::uint32_t max_pds = VIBIF_DEFAULT_MAX_PDS;
  std::uint32_t max_cqs = VIBIF_DEFAULT_MAX_CQS;
  std::uint32_t max_qps = VIBIF_DEFAULT_MAX_QPS;
  std::uint32_t max_srqs = VIBIF_DEFAULT_MAX_SRQS;
  std::uint32_t max_mrs = VIBIF_DEFAULT_MAX_MRS;
  std::uint32_t max_ahs = VIBIF_DEFAULT_MAX_AHS;
  std::uint64_t max_pinned_pages = VIBIF_DEFAULT_MAX_PINNED_PAGES;
};

class ControlPath {
 public:
  ControlPath(const DeviceConfig& config, platform::Hca& hca, GuestMemory& memory, std::string subject);
  ~ControlPath();
  ControlPath(const ControlPath&) = delete;
  ControlPath& operator=(const ControlPath&) = delete;

  // Never throws; every failure is a status in the response.
  vibif_response execute(const vibif_request& req);
  // Frees every object; returns what was freed, for the log.
  std::string free_all();
  std::size_t pds() const { return pds_.size(); }
  std::size_t ahs() const { return ahs_.size(); }
  std::size_t mrs() const { return mrs_.size(); }
  std::uint64_t pinned_pages() const { return pinned_pages_; }

 private:
  const DeviceConfig& config_;
  platform::Hca& hca_;
  std::string subject_;
  // A registration: the guest's pages, mapped, and the HCA's MR over them
  // (declared in that order, so the MR goes before the mapping).
  struct GuestMr {
    std::unique_ptr<platform::GrantMapping> pages;
    std::unique_ptr<platform::MemoryRegion> mr;
    std::uint64_t page_count = 0;
  };

  vibif_response reg_mr(const vibif_request& req);

  GuestMemory& memory_;
  std::uint64_t pinned_pages_ = 0;
  // Declared parents first: members are destroyed children first.
  HandleTable<platform::ProtectionDomain> pds_;
  HandleTable<platform::AddressHandle> ahs_;
  HandleTable<GuestMr> mrs_;
};

}  // namespace vib::backend
