// Devices at domain creation. xl does not know vib=, so it ignores the line;
// but it saves the whole config file as the domain's libxl userdata "xl",
// and that is where the vib= items are found again once the domain exists.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>

#include "internal.hpp"
#include "vib/platform/xenbus.hpp"
#include "vib/vibif.h"

namespace vib::toolstack {

using platform::DomId;
using platform::kNoTransaction;
using platform::TransactionId;

namespace {

bool is_uuid(std::string_view s) {
  if (s.size() != 36) return false;
  for (std::size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    const bool dash = i == 8 || i == 13 || i == 18 || i == 23;
    if (dash ? c != '-' : !((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))) return false;
  }
  return true;
}

std::string provisioned_mark(DomId domid) { return "/libxl/" + std::to_string(domid) + "/vib-provisioned"; }

}  // namespace

std::optional<std::string> Toolstack::find_userdata(DomId domid, const std::string& userdata_dir) {
  // libxl writes /local/domain/<domid>/vm = "/vm/<uuid>", and names the
  // userdata file after the same uuid (libxl__userdata_path).
  auto vm = store_->read(kNoTransaction, store_->domain_path(domid) + "/vm");
  if (!vm) return std::nullopt;
  const auto slash = vm->rfind('/');
  const std::string uuid = slash == std::string::npos ? *vm : vm->substr(slash + 1);
  if (!is_uuid(uuid)) throw Error(ErrorCode::invalid, "domain " + std::to_string(domid) + " has a malformed vm node '" + *vm + "'");
  const std::string path = userdata_dir + "/userdata-d." + std::to_string(domid) + "." + uuid + ".xl";
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) return std::nullopt;
  return path;
}

ProvisionResult Toolstack::provision_domain(DomId domid, const std::string& userdata_dir,
                                            std::chrono::milliseconds wait_for_file) {
  // xl stores the userdata after libxl_domain_create_new returns, so an
  // @introduceDomain watcher may look before the file is there.
  const auto deadline = std::chrono::steady_clock::now() + wait_for_file;
  std::optional<std::string> path;
  for (;;) {
    path = find_userdata(domid, userdata_dir);
    if (path || std::chrono::steady_clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (!path)
    throw Error(ErrorCode::not_found, "no xl config saved for domain " + std::to_string(domid) + " in " + userdata_dir);
  std::ifstream in(*path);
  std::stringstream text;
  text << in.rdbuf();
  if (!in) throw Error(ErrorCode::not_found, "cannot read " + *path);
  return provision_from_config(domid, text.str());
}

ProvisionResult Toolstack::provision_from_config(DomId domid, std::string_view config_text) {
  ProvisionResult result;
  auto scan = detail::scan_config(config_text, "domain " + std::to_string(domid) + " config");
  result.warnings = std::move(scan.warnings);
  if (scan.specs.empty()) return result;
  if (domid == platform::kDom0) throw Error(ErrorCode::invalid, "vib devices are for guest domains, not domain 0");
  if (!domain_exists(domid)) throw Error(ErrorCode::not_found, "domain " + std::to_string(domid) + " does not exist");
  // Everything that can fail without the store is checked before the
  // transaction, so a bad config attaches nothing.
  std::vector<DomId> backends;
  std::set<unsigned> explicit_ids;
  for (const auto& spec : scan.specs) {
    const DomId be = resolve_domain(spec.backend);
    if (be == domid) throw Error(ErrorCode::invalid, "domain " + std::to_string(domid) + " cannot be its own back-end");
    if (!domain_exists(be)) throw Error(ErrorCode::not_found, "back-end domain " + std::to_string(be) + " does not exist");
    backends.push_back(be);
    if (spec.devid && !explicit_ids.insert(*spec.devid).second)
      throw Error(ErrorCode::invalid, "vib devid " + std::to_string(*spec.devid) + " is given to two devices");
  }
  platform::with_transaction(*store_, [&](TransactionId tx) {
    result.devices.clear();
    result.already_provisioned = store_->read(tx, provisioned_mark(domid)).has_value();
    if (result.already_provisioned) return;
    std::set<unsigned> used;
    for (DomId be : backends)
      for (unsigned id : used_devids(tx, domid, be)) used.insert(id);
    for (unsigned id : explicit_ids)
      if (used.count(id)) throw Error(ErrorCode::exists, "vib device " + std::to_string(id) + " of domain " + std::to_string(domid) + " already exists");
    used.insert(explicit_ids.begin(), explicit_ids.end());
    for (std::size_t i = 0; i < scan.specs.size(); ++i) {
      const auto& spec = scan.specs[i];
      AttachedDevice dev;
      dev.domid = domid;
      dev.backend_domid = backends[i];
      if (spec.devid) {
        dev.devid = *spec.devid;
      } else {
        while (used.count(dev.devid)) ++dev.devid;
        if (dev.devid > 0xffff) throw Error(ErrorCode::exists, "domain " + std::to_string(domid) + " has no free vib device id");
        used.insert(dev.devid);
      }
      dev.backend_path = detail::backend_path(dev.backend_domid, domid, dev.devid);
      dev.frontend_path = detail::frontend_path(domid, dev.devid);
      write_device(tx, dev, spec);
      result.devices.push_back(std::move(dev));
    }
    // Watchers see @introduceDomain for every domain that appears: the mark
    // makes a second call (or a restarted vibd) leave the domain alone, even
    // after the administrator detached its devices.
    store_->write(tx, provisioned_mark(domid), std::to_string(result.devices.size()));
    store_->set_permissions(tx, provisioned_mark(domid), {{self_, platform::Access::none}});
  });
  return result;
}

}  // namespace vib::toolstack
