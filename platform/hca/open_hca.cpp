// Chooses the implementation behind open_hca() by device name.
#include <system_error>

#include "soft/soft_hca.hpp"
#include "verbs/verbs_hca.hpp"
#include "vib/platform/hca.hpp"

namespace vib::platform {

namespace {

// An MR over a mapping of memory that lives as long as the MR.
class MrHoldingMemory final : public MemoryRegion {
 public:
  MrHoldingMemory(std::unique_ptr<MemoryAccess> memory, std::unique_ptr<MemoryRegion> mr)
      : memory_(std::move(memory)), mr_(std::move(mr)) {}
  std::uint32_t lkey() const override { return mr_->lkey(); }
  std::uint32_t rkey() const override { return mr_->rkey(); }

 private:
  std::unique_ptr<MemoryAccess> memory_;  // declared first: outlives the registration
  std::unique_ptr<MemoryRegion> mr_;
};

}  // namespace

std::unique_ptr<MemoryRegion> Hca::reg_mr(ProtectionDomain& pd, std::unique_ptr<MemoryAccess> memory,
                                          std::size_t offset, std::size_t length, std::uint64_t iova,
                                          int access) {
  const auto bytes = memory->mapped();
  if (bytes.empty())
    throw std::system_error(EOPNOTSUPP, std::generic_category(),
                            name() + ": registering memory that is not mapped in this process");
  if (offset > bytes.size() || length > bytes.size() - offset)
    throw std::system_error(EINVAL, std::generic_category(), name() + ": reg_mr beyond the memory given");
  auto mr = reg_mr(pd, bytes.data() + offset, length, iova, access);
  return std::make_unique<MrHoldingMemory>(std::move(memory), std::move(mr));
}

std::vector<HcaDescription> list_hcas() {
  std::vector<HcaDescription> result{{std::string(kSoftHcaName), true}};
  for (auto& name : verbs::device_names()) result.push_back({name, false});
  return result;
}

std::unique_ptr<Hca> open_hca(std::string_view name) {
  if (name == "soft" || name == kSoftHcaName) return soft::open_soft_hca();
  return verbs::open_verbs_hca(name);
}

}  // namespace vib::platform
