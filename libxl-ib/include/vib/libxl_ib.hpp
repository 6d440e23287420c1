// libxl-ib: the toolstack side of vib devices. It parses `vib=` specs, and
// adds, removes and lists vib devices in xenstore the way libxl does for its
// own split devices (libxl_device.c): one transaction for the back-end and
// front-end directories, libxl's permissions, a trusted record under
// /libxl/<domid>, the back-end's state as the only signal of progress, and a
// forced removal when a back-end does not close in time.
//
// libxl itself is not used: libxl_ctx_alloc needs a hypervisor, and vib must
// work on the host-local Xen too. Everything goes through vib's XenStore
// interface, so the same code drives xenstored and vib-localxen.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "vib/platform/types.hpp"
#include "vib/platform/xenstore.hpp"

namespace vib::toolstack {

// Error classes, shared with the C API (libxl_ib.h gives them numbers).
enum class ErrorCode {
  invalid,    // bad spec, bad argument, bad config file
  not_found,  // no such domain, device or file
  exists,     // the device id is taken
  timed_out,  // the back-end did not answer in time
  backend,    // the back-end or the hotplug script reported an error
  xenstore,   // the store refused an operation
  failed,     // anything else
};

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& what) : std::runtime_error(what), code_(code) {}
  ErrorCode code() const { return code_; }

 private:
  ErrorCode code_;
};

// One `vib=` item. Absent optionals are left out of xenstore, so the
// back-end applies its defaults (VIBIF_DEFAULT_* in vibif.h; the HCA is
// vibd's --hca, "soft" unless configured otherwise).
struct DeviceSpec {
  std::optional<std::string> hca;
  unsigned port = 1;                      // always written
  std::optional<unsigned> devid;          // default: lowest free
  std::string backend = "0";              // domain name or id
  std::vector<std::uint16_t> pkeys;       // empty: back-end default (0xffff)
  std::vector<std::uint8_t> gid_indices;  // empty: back-end default (0)
  std::optional<std::uint32_t> max_pds, max_cqs, max_qps, max_srqs, max_mrs, max_ahs;
  std::optional<std::uint64_t> max_pinned_pages;
  std::optional<std::string> script;  // relative names are under the scripts dir
  std::vector<std::string> ip;        // RDMA-CM addresses (empty: the guest's vif addresses)

  // The back-end keys this spec sets, in the order they are written.
  std::vector<std::pair<std::string, std::string>> backend_keys() const;
  // The spec again, normalised (what `xl vib-list` would need to recreate it).
  std::string to_string() const;
};

// Parses "key=value,key=value". Throws Error(invalid) naming the key and
// the item. pkeys and gid-indices take several values separated by ':' (a
// bare number after them continues the list: "pkeys=0xffff,0x8001").
DeviceSpec parse_spec(std::string_view item);

// Every `vib = [ ... ]` item of an xl domain config, parsed with libxlutil.
// No vib= line gives an empty list. Throws Error(invalid) with libxlutil's
// report or the bad item.
std::vector<DeviceSpec> parse_config(std::string_view config_text, const std::string& filename = "config");

struct AttachOptions {
  // Wait for the back-end to reach InitWait (and for the hotplug script to
  // report "connected"). Provisioning at domain creation does not wait.
  bool wait = true;
  std::chrono::milliseconds timeout{10000};
};

struct AttachedDevice {
  platform::DomId domid = 0;
  unsigned devid = 0;
  platform::DomId backend_domid = 0;
  std::string backend_path;
  std::string frontend_path;
};

struct DetachOptions {
  bool force = false;  // remove at once, do not ask the back-end
  // libxl's LIBXL_DESTROY_TIMEOUT: after this the device is removed anyway.
  std::chrono::milliseconds timeout{10000};
};

struct DetachResult {
  bool forced = false;  // the back-end did not close the device (or --force)
  std::string note;     // why it was forced, for the administrator
};

// A running vibd announces itself in its own domain, as xen-9pfsd does under
// libxl/xen-9pfs: vibd_dir(domain)/state = "running" and /pid, written in one
// transaction when it starts and removed when it stops; below
// vibd_dir(domain)/devices/<domid>/<devid>, the status of each device it
// serves (format_status). Only that vibd writes there, only it and dom0 read.
std::string vibd_dir(platform::DomId backend);

// Objects by kind: what a context holds, or a device's quotas.
struct ObjectCounts {
  std::uint64_t pds = 0, cqs = 0, qps = 0, srqs = 0, mrs = 0, ahs = 0;
  ObjectCounts& operator+=(const ObjectCounts& o);
  bool operator==(const ObjectCounts&) const = default;
};

// One guest process's context, as vibd last published it.
struct ContextStatus {
  unsigned id = 0;
  ObjectCounts objects;
  std::uint64_t pinned_pages = 0;
  std::uint64_t requests = 0, request_errors = 0;  // requests answered, with an error
  std::uint64_t wqes = 0;                          // work requests handed to the HCA
  std::uint64_t completions = 0, completion_errors = 0;
  std::int64_t last_activity = 0;  // seconds since the Unix epoch; 0: never
  bool operator==(const ContextStatus&) const = default;
};

// A device as vibd serves it. The published text (format_status) is
// "key=value" words separated by spaces: one node per device and one per
// context, so a driver domain's vibd stays well within its xenstore quota.
// Readers skip keys they do not know.
struct DeviceStatus {
  int state = 0;    // the back-end's XenbusState
  std::string hca;  // the HCA vibd opened ("soft0", "mlx5_0"); empty if none
  unsigned port = 0;
  ObjectCounts quotas;  // max-pds ... max-ahs
  std::uint64_t max_pinned_pages = 0;
  std::vector<ContextStatus> contexts;  // not in the device's own node
  ObjectCounts objects() const;          // held by all contexts
  std::uint64_t pinned_pages() const;
};
std::string format_status(const DeviceStatus& device);
std::string format_status(const ContextStatus& context);
DeviceStatus parse_device_status(std::string_view text);
ContextStatus parse_context_status(unsigned id, std::string_view text);

struct DeviceInfo {
  platform::DomId domid = 0;
  unsigned devid = 0;
  platform::DomId backend_domid = 0;
  std::string backend_path;
  std::string frontend_path;
  int state = 0;           // back-end XenbusState (0 when unreadable)
  int frontend_state = 0;  // front-end XenbusState
  std::string hca;         // empty: the back-end's default
  unsigned port = 1;
  unsigned contexts = 0;  // live per-process contexts
  bool online = false;
  std::string hotplug_status;
  std::string error;
  // list(..., with_status): whether a vibd runs in the back-end domain, and
  // what it published for the device (nullopt: nothing yet).
  bool vibd_running = false;
  std::optional<DeviceStatus> status;
};

// Output of `xl vib-list --json`: a JSON array of the devices (yajl_gen);
// with_status adds each device's "status" (`xl vib-list -l --json`).
std::string devices_to_json(const std::vector<DeviceInfo>& devices, bool beautify = true, bool with_status = false);

// Where the xl front keeps the configs of domains created with `xl create`,
// by domain name, for vibd. xl itself keeps no copy with the vib= lines: it
// saves only libxl's parsed config (userdata "libxl-json"), and its "xl"
// userdata exists only after `xl config-update`.
inline constexpr const char* kConfigStashDir = "/var/lib/vib/domains";

// What `xl create ARGS` is about to create, as far as vib is concerned:
// finds the config file and the extra "key=value" lines the way xl does,
// checks every vib= item, and keeps the config as dir/<name>.cfg for vibd,
// or removes a kept one when the config has no vib= lines. Returns the
// domain name when a config was kept; nullopt when nothing was (no vib=
// lines, a dry run, no config file given). Throws Error(invalid) naming the
// bad item, so a bad vib= line stops `xl create` before the domain exists.
std::optional<std::string> stash_create_config(const std::vector<std::string>& xl_create_args,
                                               const std::string& dir = kConfigStashDir);

// `xl migrate [options] <Domain> <host>` as xl parses it (options
// "FC:s:epD", --debug, --live): what vib needs to know of it.
struct MigrateCommand {
  std::string domain;       // name or domain id, as given
  std::string host;         // the target; with an empty ssh command, the receiver's command line
  std::string ssh_command = "ssh";
  std::optional<std::string> config_file;  // -C: the config xl sends instead of the domain's own
};
MigrateCommand parse_migrate_command(const std::vector<std::string>& xl_migrate_args);

// What `xl migrate` needs on the target host for the domain `name` to get
// its vib devices there: the config kept for it (or -C's file, checked like
// `xl create`'s), written as remote_dir/<name>.cfg on the target through the
// ssh command xl will use (one `<ssh> <host> <sh command>` run, the config
// on its stdin; written atomically, mode 0600). Returns whether a config
// was sent: not when none is kept (and -C's file has no vib= lines), and
// not for a receiver on this host (an empty ssh command), which finds the
// kept config here. Throws Error(failed) naming the host and the ssh exit
// status when sending fails, so the migration does not start and the
// domain stays where it is.
bool send_kept_config(const MigrateCommand& migrate, const std::string& name, const std::string& dir = kConfigStashDir,
                      const std::string& remote_dir = kConfigStashDir);

struct ProvisionResult {
  std::vector<AttachedDevice> devices;
  bool already_provisioned = false;  // a previous call did it: nothing done
  std::vector<std::string> warnings;
};

class Toolstack {
 public:
  // Opens the store of `target`; the toolstack acts as target's domain
  // (dom0, or local_domid on the host-local Xen).
  explicit Toolstack(const platform::XenTarget& target);
  Toolstack(const Toolstack&) = delete;
  Toolstack& operator=(const Toolstack&) = delete;
  ~Toolstack();

  // "5", or a domain name (scanning /local/domain/*/name; "Domain-0" is 0).
  platform::DomId resolve_domain(std::string_view name_or_id);
  // The name of a domain, given its name or id (Error(not_found) if none).
  std::string domain_name(std::string_view name_or_id);
  // Whether /local/domain/<domid> exists (libxl removes it when a domain dies).
  bool domain_exists(platform::DomId domid);

  AttachedDevice attach(platform::DomId domid, const DeviceSpec& spec, const AttachOptions& options = {});
  DetachResult detach(platform::DomId domid, unsigned devid, const DetachOptions& options = {});
  // with_status: also whether vibd runs and what it published (`-l`).
  std::vector<DeviceInfo> list(platform::DomId domid, bool with_status = false);
  // Whether a vibd serves `backend`: its announcement is there and, when it
  // runs in this domain, its process too (a crashed vibd leaves the nodes).
  bool vibd_running(platform::DomId backend);

  // Attaches every vib= device of an xl config to a domain that was just
  // created, in one transaction and without waiting for the back-end.
  // Idempotent: a domain already provisioned is left alone. All or nothing:
  // one bad item attaches none.
  ProvisionResult provision_from_config(platform::DomId domid, std::string_view config_text);
  // The same from the config the xl front kept for the domain's name (see
  // stash_create_config); Error(not_found) when there is none.
  ProvisionResult provision_stashed(platform::DomId domid, const std::string& dir = kConfigStashDir);
  // The same from the config xl saved for the domain (see find_userdata).
  ProvisionResult provision_domain(platform::DomId domid, const std::string& userdata_dir = "/var/lib/xen",
                                   std::chrono::milliseconds wait_for_file = std::chrono::milliseconds(0));
  // The path of the config file xl saved for `domid` (libxl userdata "xl":
  // <dir>/userdata-d.<domid>.<uuid>.xl, uuid from /local/domain/<domid>/vm);
  // nullopt when the domain has no vm node or the file does not exist.
  std::optional<std::string> find_userdata(platform::DomId domid, const std::string& userdata_dir = "/var/lib/xen");

  // Removes the vib devices of domains that no longer exist (libxl leaves
  // back-end directories of device kinds it does not know). Returns how many
  // devices were removed.
  unsigned cleanup_dead_domains();


  platform::XenStore& store() { return *store_; }
  platform::DomId self() const { return self_; }

 private:
  struct Located;
  std::optional<Located> locate(platform::DomId domid, unsigned devid);
  void write_device(platform::TransactionId tx, const AttachedDevice& dev, const DeviceSpec& spec);
  std::vector<unsigned> used_devids(platform::TransactionId tx, platform::DomId domid, platform::DomId backend);
  void remove_device(const Located& where);
  void wait_attached(const AttachedDevice& dev, bool has_script, std::chrono::milliseconds timeout);

  platform::XenTarget target_;
  std::unique_ptr<platform::XenStore> store_;
  platform::DomId self_ = platform::kDom0;
};

// "Initialising", "InitWait", ... for a XenbusState number.
std::string state_name(int state);

}  // namespace vib::toolstack
