// Grant mapping and sharing over the real libxengnttab (gntdev) and
// libxengntshr (gntalloc).
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <mutex>
#include <system_error>
#include <vector>

extern "C" {
#include <xengnttab.h>
}

#include "real_xen.hpp"
#include "vib/platform/unique_fd.hpp"
#include "vib/vibgrant.h"

namespace vib::platform::real {

namespace {

[[noreturn]] void fail(const std::string& what) {
  throw std::system_error(errno, std::generic_category(), what);
}

struct GnttabCloser {
  void operator()(xengnttab_handle* h) const { xengnttab_close(h); }
};
struct GntshrCloser {
  void operator()(xengntshr_handle* h) const { xengntshr_close(h); }
};
using GnttabHandle = std::shared_ptr<xengnttab_handle>;
using GntshrHandle = std::shared_ptr<xengntshr_handle>;

class XenMapping final : public GrantMapping {
 public:
  XenMapping(GnttabHandle h, void* addr, std::size_t pages)
      : h_(std::move(h)), addr_(addr), pages_(pages) {}
  ~XenMapping() override { xengnttab_unmap(h_.get(), addr_, static_cast<uint32_t>(pages_)); }
  std::span<std::byte> bytes() override {
    return {static_cast<std::byte*>(addr_), pages_ * kPageSize};
  }

 private:
  GnttabHandle h_;  // the mapping must go before the handle does
  void* addr_;
  std::size_t pages_;
};

class XenMapper final : public GrantMapper {
 public:
  XenMapper() {
    xengnttab_handle* h = xengnttab_open(nullptr, 0);
    if (!h) fail("cannot open the grant device (/dev/xen/gntdev)");
    h_ = GnttabHandle(h, GnttabCloser{});
  }

  std::unique_ptr<GrantMapping> map(DomId granter, std::span<const GrantRef> refs, bool writable,
                                    const UnmapNotify& notify) override {
    if (refs.empty()) {
      errno = EINVAL;
      fail("mapping no grant refs");
    }
    const bool with_notify = notify.clear_byte_offset || notify.port;
    if (with_notify && refs.size() != 1) {
      errno = EINVAL;
      fail("unmap notify needs a single-page mapping");
    }
    const int prot = PROT_READ | (writable ? PROT_WRITE : 0);
    void* addr;
    if (with_notify) {
      const uint32_t offset = notify.clear_byte_offset ? static_cast<uint32_t>(*notify.clear_byte_offset)
                                                       : static_cast<uint32_t>(-1);
      const evtchn_port_t port = notify.port ? *notify.port : static_cast<evtchn_port_t>(-1);
      addr = xengnttab_map_grant_ref_notify(h_.get(), granter, refs[0], prot, offset, port);
    } else {
      std::vector<uint32_t> raw(refs.begin(), refs.end());
      addr = xengnttab_map_domain_grant_refs(h_.get(), static_cast<uint32_t>(raw.size()), granter,
                                             raw.data(), prot);
    }
    if (!addr)
      fail("mapping " + std::to_string(refs.size()) + " grants of domain " + std::to_string(granter));
    auto mapping = std::make_unique<XenMapping>(h_, addr, refs.size());
    return mapping;
  }

 private:
  GnttabHandle h_;
};

class XenShare final : public SharedPages {
 public:
  XenShare(GntshrHandle h, void* addr, std::vector<GrantRef> refs)
      : h_(std::move(h)), addr_(addr), refs_(std::move(refs)) {}
  ~XenShare() override {
    // gntalloc frees the grants when their mapping goes, wherever it is.
    if (addr_) xengntshr_unshare(h_.get(), addr_, static_cast<uint32_t>(refs_.size()));
  }
  std::span<std::byte> bytes() override {
    return {static_cast<std::byte*>(addr_), refs_.size() * kPageSize};
  }
  std::span<const GrantRef> refs() const override { return refs_; }

 private:
  GntshrHandle h_;
  void* addr_;
  std::vector<GrantRef> refs_;
};

// A set of the application's pages the vibgrant module pinned and granted.
class VibgrantRange final : public GrantedRange {
 public:
  VibgrantRange(std::shared_ptr<UniqueFd> device, std::uint64_t handle, std::vector<GrantRef> refs)
      : device_(std::move(device)), handle_(handle), refs_(std::move(refs)) {}
  ~VibgrantRange() override {
    vibgrant_release release{handle_};
    ::ioctl(device_->get(), VIBGRANT_IOCTL_RELEASE, &release);  // closing the device would too
  }
  std::span<const GrantRef> refs() const override { return refs_; }

 private:
  std::shared_ptr<UniqueFd> device_;
  std::uint64_t handle_;
  std::vector<GrantRef> refs_;
};

class XenSharer final : public GrantSharer {
 public:
  XenSharer() {
    xengntshr_handle* h = xengntshr_open(nullptr, 0);
    if (!h) fail("cannot open the grant allocation device (/dev/xen/gntalloc)");
    h_ = GntshrHandle(h, GntshrCloser{});
  }

  std::unique_ptr<SharedPages> share(DomId grantee, std::size_t pages, bool writable,
                                     const UnmapNotify& notify) override {
    const bool with_notify = notify.clear_byte_offset || notify.port;
    if (pages == 0 || (with_notify && pages != 1)) {
      errno = EINVAL;
      fail("sharing " + std::to_string(pages) + " pages" + (with_notify ? " with unmap notify" : ""));
    }
    std::vector<uint32_t> refs(pages);
    void* addr;
    if (with_notify) {
      const int offset = notify.clear_byte_offset ? static_cast<int>(*notify.clear_byte_offset) : -1;
      const evtchn_port_t port = notify.port ? *notify.port : static_cast<evtchn_port_t>(-1);
      addr = xengntshr_share_page_notify(h_.get(), grantee, refs.data(), writable, offset, port);
    } else {
      addr = xengntshr_share_pages(h_.get(), grantee, static_cast<int>(pages), refs.data(), writable);
    }
    if (!addr) fail("granting " + std::to_string(pages) + " pages to domain " + std::to_string(grantee));
    return std::make_unique<XenShare>(h_, addr, std::vector<GrantRef>(refs.begin(), refs.end()));
  }

  std::unique_ptr<GrantedRange> grant_range(DomId grantee, std::byte* start, std::size_t pages,
                                            bool writable) override {
    if (pages == 0 || pages > VIBGRANT_MAX_PAGES || reinterpret_cast<std::uintptr_t>(start) % kPageSize) {
      errno = EINVAL;
      fail("granting " + std::to_string(pages) + " pages in place");
    }
    auto device = vibgrant();
    std::vector<GrantRef> refs(pages);
    vibgrant_grant g{};
    g.start = reinterpret_cast<std::uintptr_t>(start);
    g.pages = pages;
    g.refs = reinterpret_cast<std::uintptr_t>(refs.data());
    g.domid = grantee;
    g.flags = writable ? VIBGRANT_WRITABLE : 0;
    if (::ioctl(device->get(), VIBGRANT_IOCTL_GRANT, &g) != 0) {
      const int err = errno;
      std::string why = "granting " + std::to_string(pages) + " pages of this process to domain " + std::to_string(grantee);
      if (err == ENOMEM) why += " (pinned memory would exceed RLIMIT_MEMLOCK: raise it, e.g. ulimit -l)";
      if (err == ENOSPC) {
        // The kernel and other front-ends hold a few entries too, so what
        // is left can be less than the difference.
        const auto use = table_use();
        why += ": " + (use ? grant_table_full(pages, use->size, std::to_string(use->held_by_vib) +
                                                                    " held by vib's registrations in this guest")
                           : grant_table_full(pages, 0, {}));
      }
      errno = err;
      fail(why);
    }
    return std::make_unique<VibgrantRange>(std::move(device), g.handle, std::move(refs));
  }

  std::optional<GrantTableUse> table_use() override {
    std::shared_ptr<UniqueFd> device;
    try {
      device = vibgrant();
    } catch (const std::system_error&) {
      return std::nullopt;  // no module: nothing here knows the table
    }
    vibgrant_info info{};
    if (::ioctl(device->get(), VIBGRANT_IOCTL_INFO, &info) != 0 || !info.grants_total) return std::nullopt;
    return GrantTableUse{info.grants_total, info.grants_held};
  }

 private:
  // Opened on first use: only registering memory needs the module.
  std::shared_ptr<UniqueFd> vibgrant() {
    std::lock_guard lock(mu_);
    if (!vibgrant_) {
      UniqueFd fd(::open(VIBGRANT_DEVICE, O_RDWR | O_CLOEXEC));
      if (!fd) {
        if (errno == ENOENT) errno = ENODEV;
        fail("cannot open " VIBGRANT_DEVICE " (is the vibgrant module loaded? modprobe vibgrant)");
      }
      vibgrant_ = std::make_shared<UniqueFd>(std::move(fd));
    }
    return vibgrant_;
  }

  GntshrHandle h_;
  std::mutex mu_;
  std::shared_ptr<UniqueFd> vibgrant_;
};

}  // namespace

std::unique_ptr<GrantMapper> open_grant_mapper() { return std::make_unique<XenMapper>(); }
std::unique_ptr<GrantSharer> open_grant_sharer() { return std::make_unique<XenSharer>(); }

}  // namespace vib::platform::real
