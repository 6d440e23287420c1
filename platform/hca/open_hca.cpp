// Chooses the implementation behind open_hca() by device name.
#include "soft/soft_hca.hpp"
#include "verbs/verbs_hca.hpp"
#include "vib/platform/hca.hpp"

namespace vib::platform {

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
