// Adding, removing and listing vib devices, the way libxl_device.c does it
// for vif and vbd: the whole device appears in one transaction, progress is
// read only from the back-end's state node, and removal asks the back-end
// first (online=0, Closing) and removes the directories anyway when it does
// not answer in time.
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <set>
#include <system_error>

#include "internal.hpp"
#include "vib/platform/xenbus.hpp"
#include "vib/vibif.h"

namespace vib::toolstack {

using platform::Access;
using platform::DomId;
using platform::kNoTransaction;
using platform::TransactionId;
using platform::XenbusState;

struct Toolstack::Located {
  DomId domid = 0;
  unsigned devid = 0;
  DomId backend_domid = 0;
  std::string backend_path, frontend_path, libxl_path;
};

namespace {

constexpr std::uint64_t kMaxDomId = 0x7FEF;  // DOMID_FIRST_RESERVED - 1

std::string seconds(std::chrono::milliseconds ms) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g s", static_cast<double>(ms.count()) / 1000.0);
  return buf;
}

std::string device_name(DomId domid, unsigned devid) {
  return "vib device " + std::to_string(devid) + " of domain " + std::to_string(domid);
}

std::vector<std::string> children(platform::XenStore& store, TransactionId tx, const std::string& path) {
  return store.directory(tx, path).value_or(std::vector<std::string>{});
}

int read_state(platform::XenStore& store, TransactionId tx, const std::string& path) {
  auto text = store.read(tx, path);
  auto v = text ? platform::parse_decimal(*text, 8) : std::nullopt;
  return v ? static_cast<int>(*v) : 0;
}

// Removes `path` if nothing is left below it, as libxl__xs_path_cleanup
// does for the per-domain directories a device leaves behind.
void remove_if_empty(platform::XenStore& store, TransactionId tx, const std::string& path) {
  auto entries = store.directory(tx, path);
  if (entries && entries->empty()) store.remove(tx, path);
}

}  // namespace

namespace detail {

std::string backend_path(DomId backend, DomId domid, unsigned devid) {
  return "/local/domain/" + std::to_string(backend) + "/backend/" VIBIF_XS_DEVICE_TYPE "/" + std::to_string(domid) +
         "/" + std::to_string(devid);
}

std::string frontend_path(DomId domid, unsigned devid) {
  return "/local/domain/" + std::to_string(domid) + "/device/" VIBIF_XS_DEVICE_TYPE "/" + std::to_string(devid);
}

std::string libxl_path(DomId domid, unsigned devid) {
  return "/libxl/" + std::to_string(domid) + "/device/" VIBIF_XS_DEVICE_TYPE "/" + std::to_string(devid);
}

std::optional<DomId> backend_of(std::string_view path, DomId domid, unsigned devid) {
  constexpr std::string_view prefix = "/local/domain/";
  if (!path.starts_with(prefix)) return std::nullopt;
  path.remove_prefix(prefix.size());
  const auto slash = path.find('/');
  if (slash == std::string_view::npos) return std::nullopt;
  auto be = platform::parse_decimal(path.substr(0, slash), kMaxDomId);
  if (!be) return std::nullopt;
  // Accept exactly the path we would have written, nothing that merely
  // starts like it.
  if (backend_path(static_cast<DomId>(*be), domid, devid) != std::string(prefix) + std::string(path))
    return std::nullopt;
  return static_cast<DomId>(*be);
}

}  // namespace detail

std::string state_name(int state) {
  if (state < 1 || state > 6) return "Unknown";
  return std::string(platform::state_name(static_cast<XenbusState>(state)));
}

Toolstack::Toolstack(const platform::XenTarget& target)
    : target_(target), store_(platform::open_xenstore(target)) {
  if (target.kind == platform::XenTarget::Kind::local) {
    self_ = target.local_domid;
  } else {
    // "domid" relative to our own home; dom0's often has none.
    auto id = store_->read(kNoTransaction, "domid");
    auto v = id ? platform::parse_decimal(*id, kMaxDomId) : std::nullopt;
    self_ = v ? static_cast<DomId>(*v) : platform::kDom0;
  }
}

Toolstack::~Toolstack() = default;

std::string Toolstack::domain_name(std::string_view name_or_id) {
  const DomId domid = resolve_domain(name_or_id);
  auto name = store_->read(kNoTransaction, "/local/domain/" + std::to_string(domid) + "/name");
  if (!name) throw Error(ErrorCode::not_found, "domain " + std::to_string(domid) + " does not exist");
  return *name;
}

bool Toolstack::domain_exists(DomId domid) {
  return store_->directory(kNoTransaction, store_->domain_path(domid)).has_value();
}

DomId Toolstack::resolve_domain(std::string_view name_or_id) {
  const std::string text(name_or_id);
  if (text.empty()) throw Error(ErrorCode::invalid, "empty domain name");
  if (std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    auto v = platform::parse_decimal(text, kMaxDomId);
    if (!v) throw Error(ErrorCode::invalid, "bad domain id '" + text + "'");
    return static_cast<DomId>(*v);
  }
  // libxl_name_to_domid asks the hypervisor for the domain list and reads
  // their names; xenstore alone gives the same answer on Xen and on the
  // host-local Xen.
  std::vector<DomId> found;
  for (const auto& entry : children(*store_, kNoTransaction, "/local/domain")) {
    auto id = platform::parse_decimal(entry, kMaxDomId);
    if (!id) continue;
    if (store_->read(kNoTransaction, "/local/domain/" + entry + "/name") == text)
      found.push_back(static_cast<DomId>(*id));
  }
  if (found.empty() && text == "Domain-0") return platform::kDom0;
  if (found.empty()) throw Error(ErrorCode::not_found, "no domain named '" + text + "'");
  if (found.size() > 1) throw Error(ErrorCode::invalid, "more than one domain is named '" + text + "'");
  return found.front();
}

std::vector<unsigned> Toolstack::used_devids(TransactionId tx, DomId domid, DomId backend) {
  std::set<unsigned> used;
  const std::string roots[] = {
      "/libxl/" + std::to_string(domid) + "/device/" VIBIF_XS_DEVICE_TYPE,
      "/local/domain/" + std::to_string(domid) + "/device/" VIBIF_XS_DEVICE_TYPE,
      "/local/domain/" + std::to_string(backend) + "/backend/" VIBIF_XS_DEVICE_TYPE "/" + std::to_string(domid)};
  for (const auto& root : roots)
    for (const auto& entry : children(*store_, tx, root))
      if (auto v = platform::parse_decimal(entry, 0xffff)) used.insert(static_cast<unsigned>(*v));
  return {used.begin(), used.end()};
}

void Toolstack::write_device(TransactionId tx, const AttachedDevice& dev, const DeviceSpec& spec) {
  auto& s = *store_;
  const std::string& be = dev.backend_path;
  const std::string& fe = dev.frontend_path;
  const std::string handle = std::to_string(dev.devid);
  // libxl's permissions: each directory is owned by its side and readable
  // by the other; the nodes below inherit them.
  s.mkdir(tx, be);
  s.set_permissions(tx, be, {{dev.backend_domid, Access::none}, {dev.domid, Access::read}});
  s.write(tx, be + "/frontend", fe);
  s.write(tx, be + "/frontend-id", std::to_string(dev.domid));
  s.write(tx, be + "/online", "1");
  s.write(tx, be + "/state", std::to_string(static_cast<int>(XenbusState::initialising)));
  s.write(tx, be + "/handle", handle);
  for (const auto& [key, value] : spec.backend_keys()) s.write(tx, be + "/" + key, value);

  s.mkdir(tx, fe);
  s.set_permissions(tx, fe, {{dev.domid, Access::none}, {dev.backend_domid, Access::read}});
  s.write(tx, fe + "/backend", be);
  s.write(tx, fe + "/backend-id", std::to_string(dev.backend_domid));
  s.write(tx, fe + "/state", std::to_string(static_cast<int>(XenbusState::initialising)));
  s.write(tx, fe + "/handle", handle);

  // The trusted record: the guest can rewrite its front-end's "backend"
  // node, but not this (libxl keeps the same under /libxl since XSA-175).
  const std::string lp = detail::libxl_path(dev.domid, dev.devid);
  s.mkdir(tx, lp);
  s.set_permissions(tx, lp, {{self_, Access::none}});
  s.write(tx, lp + "/frontend", fe);
  s.write(tx, lp + "/backend", be);
}

AttachedDevice Toolstack::attach(DomId domid, const DeviceSpec& spec, const AttachOptions& options) {
  if (domid == platform::kDom0)
    throw Error(ErrorCode::invalid, "vib devices are for guest domains, not domain 0");
  const DomId backend = resolve_domain(spec.backend);
  if (backend == domid) throw Error(ErrorCode::invalid, "domain " + std::to_string(domid) + " cannot be its own back-end");
  if (!domain_exists(domid)) throw Error(ErrorCode::not_found, "domain " + std::to_string(domid) + " does not exist");
  if (!domain_exists(backend))
    throw Error(ErrorCode::not_found, "back-end domain " + std::to_string(backend) + " does not exist");
  // A caller that waits would wait in vain (provisioning does not wait: the
  // devices are there for vibd when it starts).
  if (options.wait && !vibd_running(backend))
    throw Error(ErrorCode::backend, "no vibd serves back-end domain " + std::to_string(backend) + " (no " +
                                        vibd_dir(backend) + "/state, or its process is gone): start it there " +
                                        "(systemctl start vibd)");

  AttachedDevice dev;
  dev.domid = domid;
  dev.backend_domid = backend;
  platform::with_transaction(*store_, [&](TransactionId tx) {
    const auto used = used_devids(tx, domid, backend);
    auto taken = [&](unsigned id) { return std::binary_search(used.begin(), used.end(), id); };
    if (spec.devid) {
      if (taken(*spec.devid)) throw Error(ErrorCode::exists, device_name(domid, *spec.devid) + " already exists");
      dev.devid = *spec.devid;
    } else {
      dev.devid = 0;
      while (taken(dev.devid)) ++dev.devid;
      if (dev.devid > 0xffff) throw Error(ErrorCode::exists, "domain " + std::to_string(domid) + " has no free vib device id");
    }
    dev.backend_path = detail::backend_path(backend, domid, dev.devid);
    dev.frontend_path = detail::frontend_path(domid, dev.devid);
    write_device(tx, dev, spec);
  });
  if (!options.wait) return dev;
  try {
    wait_attached(dev, spec.script.has_value(), options.timeout);
  } catch (...) {
    // A device that failed to attach leaves nothing behind, like a failed
    // `xl network-attach`.
    Located where{dev.domid, dev.devid, dev.backend_domid, dev.backend_path, dev.frontend_path,
                  detail::libxl_path(dev.domid, dev.devid)};
    try {
      remove_device(where);
    } catch (const std::exception&) {
    }
    throw;
  }
  return dev;
}

void Toolstack::wait_attached(const AttachedDevice& dev, bool has_script, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  const std::string& be = dev.backend_path;
  enum class Outcome { waiting, ready, failed, gone } outcome = Outcome::waiting;
  // The back-end dir's watch fires for every node below it, so one wait
  // sees state, hotplug-status and error together.
  auto check = [&](bool want_hotplug) {
    return [&, want_hotplug](const std::optional<std::string>& dir) {
      if (!dir) {
        outcome = Outcome::gone;
        return true;
      }
      const int state = read_state(*store_, kNoTransaction, be + "/state");
      const auto hotplug = store_->read(kNoTransaction, be + "/hotplug-status");
      if (state == static_cast<int>(XenbusState::closed) || hotplug == "error") {
        outcome = Outcome::failed;
        return true;
      }
      const bool up = state >= static_cast<int>(XenbusState::init_wait) && state <= static_cast<int>(XenbusState::connected);
      if (up && (!want_hotplug || hotplug == "connected")) {
        outcome = Outcome::ready;
        return true;
      }
      return false;
    };
  };
  auto failure_text = [&] {
    for (const char* key : {VIBIF_XS_ERROR, "hotplug-error"})
      if (auto text = store_->read(kNoTransaction, be + "/" + key); text && !text->empty()) return *text;
    return std::string("no reason given");
  };
  auto wait = [&](bool want_hotplug, const std::string& what) {
    const auto left = std::max(std::chrono::milliseconds(0),
                               std::chrono::ceil<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()));
    try {
      platform::wait_for_node(*store_, be, check(want_hotplug), left);
    } catch (const std::system_error& e) {
      if (e.code().value() != ETIMEDOUT) throw;
      throw Error(ErrorCode::timed_out, device_name(dev.domid, dev.devid) + ": back-end domain " +
                                            std::to_string(dev.backend_domid) + " " + what + " within " +
                                            seconds(timeout) + " (is vibd running there?)");
    }
    if (outcome == Outcome::gone)
      throw Error(ErrorCode::failed, device_name(dev.domid, dev.devid) + ": removed while it was being attached");
    if (outcome == Outcome::failed) {
      // vibd writes error, hotplug-status and then Closed, one by one:
      // removing the directory before its last write would let that write
      // recreate it. Give the back-end a moment to finish.
      try {
        platform::wait_for_node(
            *store_, be + "/state",
            [](const std::optional<std::string>& s) { return !s || platform::parse_state(*s) == XenbusState::closed; },
            std::chrono::milliseconds(1000));
      } catch (const std::system_error&) {
      }
      throw Error(ErrorCode::backend, device_name(dev.domid, dev.devid) + ": back-end reported an error: " + failure_text());
    }
  };
  wait(false, "did not reach InitWait");
  if (!has_script) return;
  // vibd runs the hotplug script in the back-end's domain (it plays the part
  // xl devd plays for a driver domain's vifs, in every domain), so the
  // verdict is the same whichever domain serves the device.
  wait(true, "did not report its hotplug script's status");
}

std::optional<Toolstack::Located> Toolstack::locate(DomId domid, unsigned devid) {
  Located where;
  where.domid = domid;
  where.devid = devid;
  where.frontend_path = detail::frontend_path(domid, devid);
  where.libxl_path = detail::libxl_path(domid, devid);
  auto accept = [&](const std::optional<std::string>& path) {
    if (!path) return false;
    auto be = detail::backend_of(*path, domid, devid);
    if (!be) return false;
    where.backend_domid = *be;
    where.backend_path = *path;
    return true;
  };
  if (accept(store_->read(kNoTransaction, where.libxl_path + "/backend"))) return where;
  // Devices written by another toolstack have no record; the front-end's
  // link is then checked against the one shape it may have.
  if (accept(store_->read(kNoTransaction, where.frontend_path + "/backend"))) return where;
  // Neither (the guest removed its front-end): look in every back-end.
  for (const auto& entry : children(*store_, kNoTransaction, "/local/domain")) {
    auto be = platform::parse_decimal(entry, kMaxDomId);
    if (!be) continue;
    const std::string path = detail::backend_path(static_cast<DomId>(*be), domid, devid);
    if (store_->directory(kNoTransaction, path)) {
      where.backend_domid = static_cast<DomId>(*be);
      where.backend_path = path;
      return where;
    }
  }
  if (store_->directory(kNoTransaction, where.libxl_path) || store_->directory(kNoTransaction, where.frontend_path)) {
    where.backend_domid = self_;
    where.backend_path = detail::backend_path(self_, domid, devid);
    return where;
  }
  return std::nullopt;
}

void Toolstack::remove_device(const Located& where) {
  const std::string be_domain_dir = "/local/domain/" + std::to_string(where.backend_domid) +
                                    "/backend/" VIBIF_XS_DEVICE_TYPE "/" + std::to_string(where.domid);
  platform::with_transaction(*store_, [&](TransactionId tx) {
    store_->remove(tx, where.frontend_path);
    store_->remove(tx, where.backend_path);
    store_->remove(tx, where.libxl_path);
    remove_if_empty(*store_, tx, be_domain_dir);
    remove_if_empty(*store_, tx, "/libxl/" + std::to_string(where.domid) + "/device/" VIBIF_XS_DEVICE_TYPE);
  });
}

DetachResult Toolstack::detach(DomId domid, unsigned devid, const DetachOptions& options) {
  auto where = locate(domid, devid);
  if (!where) throw Error(ErrorCode::not_found, "domain " + std::to_string(domid) + " has no vib device " + std::to_string(devid));
  DetachResult result;
  const std::string& be = where->backend_path;
  if (options.force) {
    result.forced = true;
    result.note = "removed without waiting for the back-end (forced)";
  } else if (!vibd_running(where->backend_domid)) {
    // Nobody would answer the Closing; a vibd that starts later finds no
    // directory and keeps nothing.
    result.forced = true;
    result.note = "no vibd serves back-end domain " + std::to_string(where->backend_domid) +
                  "; removed the device without it";
  } else {
    bool present = false;
    platform::with_transaction(*store_, [&](TransactionId tx) {
      const int state = read_state(*store_, tx, be + "/state");
      present = store_->directory(tx, be).has_value();
      if (!present) return;
      store_->write(tx, be + "/online", "0");
      // A back-end that already closed (or failed) keeps its Closed.
      if (state != static_cast<int>(XenbusState::closed))
        store_->write(tx, be + "/state", std::to_string(static_cast<int>(XenbusState::closing)));
    });
    if (present) {
      try {
        platform::wait_for_node(
            *store_, be + "/state",
            [](const std::optional<std::string>& s) {
              return !s || platform::parse_state(*s) == XenbusState::closed;
            },
            options.timeout);
      } catch (const std::system_error& e) {
        if (e.code().value() != ETIMEDOUT) throw;
        result.forced = true;
        result.note = "the back-end (domain " + std::to_string(where->backend_domid) +
                      ") did not close the device within " + seconds(options.timeout) + "; removed it forcibly";
      }
    }
  }
  remove_device(*where);
  return result;
}

std::vector<DeviceInfo> Toolstack::list(DomId domid, bool with_status) {
  std::set<unsigned> devids;
  for (const auto& root : {"/libxl/" + std::to_string(domid) + "/device/" VIBIF_XS_DEVICE_TYPE,
                           "/local/domain/" + std::to_string(domid) + "/device/" VIBIF_XS_DEVICE_TYPE,
                           "/local/domain/" + std::to_string(self_) + "/backend/" VIBIF_XS_DEVICE_TYPE "/" +
                               std::to_string(domid)})
    for (const auto& entry : children(*store_, kNoTransaction, root))
      if (auto v = platform::parse_decimal(entry, 0xffff)) devids.insert(static_cast<unsigned>(*v));
  std::vector<DeviceInfo> out;
  for (unsigned devid : devids) {
    auto where = locate(domid, devid);
    // The guest may write below its own device/ area even after a device
    // went (a process closing its context late): only the back-end's
    // directory or our record make a device.
    if (!where || (!store_->directory(kNoTransaction, where->backend_path) &&
                   !store_->directory(kNoTransaction, where->libxl_path)))
      continue;
    DeviceInfo info;
    info.domid = domid;
    info.devid = devid;
    info.backend_domid = where->backend_domid;
    info.backend_path = where->backend_path;
    info.frontend_path = where->frontend_path;
    const std::string& be = where->backend_path;
    info.state = read_state(*store_, kNoTransaction, be + "/state");
    info.frontend_state = read_state(*store_, kNoTransaction, where->frontend_path + "/state");
    info.hca = store_->read(kNoTransaction, be + "/" VIBIF_XS_HCA).value_or("");
    auto port = store_->read(kNoTransaction, be + "/" VIBIF_XS_PORT);
    auto port_v = port ? platform::parse_decimal(*port, 255) : std::nullopt;
    info.port = port_v ? static_cast<unsigned>(*port_v) : VIBIF_DEFAULT_PORT;
    info.contexts = static_cast<unsigned>(children(*store_, kNoTransaction, be + "/" VIBIF_XS_CTX_DIR).size());
    info.online = store_->read(kNoTransaction, be + "/online") == "1";
    info.hotplug_status = store_->read(kNoTransaction, be + "/hotplug-status").value_or("");
    info.error = store_->read(kNoTransaction, be + "/" VIBIF_XS_ERROR).value_or("");
    if (with_status) {
      info.vibd_running = vibd_running(info.backend_domid);
      const std::string published = vibd_dir(info.backend_domid) + "/devices/" + std::to_string(domid) + "/" +
                                    std::to_string(devid);
      if (auto text = info.vibd_running ? store_->read(kNoTransaction, published) : std::nullopt) {
        info.status = parse_device_status(*text);
        for (const auto& ctx : children(*store_, kNoTransaction, published)) {
          auto id = platform::parse_decimal(ctx, VIBIF_MAX_CTXID);
          auto ctx_text = id ? store_->read(kNoTransaction, published + "/" + ctx) : std::nullopt;
          if (ctx_text) info.status->contexts.push_back(parse_context_status(static_cast<unsigned>(*id), *ctx_text));
        }
      }
    }
    out.push_back(std::move(info));
  }
  return out;
}

unsigned Toolstack::cleanup_dead_domains() {
  unsigned removed = 0;
  std::set<DomId> dead;
  for (const auto& be_entry : children(*store_, kNoTransaction, "/local/domain")) {
    auto be = platform::parse_decimal(be_entry, kMaxDomId);
    if (!be) continue;
    const std::string root = "/local/domain/" + be_entry + "/backend/" VIBIF_XS_DEVICE_TYPE;
    for (const auto& dom_entry : children(*store_, kNoTransaction, root)) {
      auto domid = platform::parse_decimal(dom_entry, kMaxDomId);
      if (!domid || domain_exists(static_cast<DomId>(*domid))) continue;
      dead.insert(static_cast<DomId>(*domid));
      // vibd ran the devices' remove scripts when it saw the domain die.
      removed += static_cast<unsigned>(children(*store_, kNoTransaction, root + "/" + dom_entry).size());
      store_->remove(kNoTransaction, root + "/" + dom_entry);
    }
  }
  // Records of domains that died without a back-end directory, and
  // provisioning marks (libxl removes /libxl/<domid> itself; the host-local
  // Xen does not).
  for (const auto& entry : children(*store_, kNoTransaction, "/libxl")) {
    auto domid = platform::parse_decimal(entry, kMaxDomId);
    if (domid && !domain_exists(static_cast<DomId>(*domid))) dead.insert(static_cast<DomId>(*domid));
  }
  for (DomId domid : dead) {
    const std::string base = "/libxl/" + std::to_string(domid);
    platform::with_transaction(*store_, [&](TransactionId tx) {
      store_->remove(tx, base + "/device/" VIBIF_XS_DEVICE_TYPE);
      store_->remove(tx, base + "/vib-provisioned");
      remove_if_empty(*store_, tx, base + "/device");
      remove_if_empty(*store_, tx, base);
    });
  }
  return removed;
}

}  // namespace vib::toolstack
