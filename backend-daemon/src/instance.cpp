#include "instance.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <system_error>

#include "vib/libxl_ib.hpp"

namespace vib::backend {

using platform::kNoTransaction;

std::string instance_lock_path(const platform::XenTarget& xen) {
  if (xen.kind == platform::XenTarget::Kind::local)
    return xen.local_dir + "/vibd-dom" + std::to_string(xen.local_domid) + ".lock";
  return "/run/vib/vibd.lock";
}

Instance::Instance(const platform::XenTarget& xen, platform::XenStore& store, platform::DomId self)
    : store_(store), dir_(toolstack::vibd_dir(self)) {
  const std::string path = instance_lock_path(xen);
  if (xen.kind == platform::XenTarget::Kind::real) ::mkdir("/run/vib", 0755);  // systemd's RuntimeDirectory= otherwise
  lock_ = platform::UniqueFd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (!lock_) throw std::system_error(errno, std::generic_category(), "cannot open " + path);
  if (::flock(lock_.get(), LOCK_EX | LOCK_NB) < 0) {
    if (errno != EWOULDBLOCK) throw std::system_error(errno, std::generic_category(), "cannot lock " + path);
    const auto pid = store.read(kNoTransaction, dir_ + "/pid");
    throw AlreadyRunning("another vibd" + (pid ? " (pid " + *pid + ")" : std::string()) + " already serves domain " +
                         std::to_string(self) + ": it holds " + path + "; not starting a second one");
  }
  const std::string pid = std::to_string(::getpid());
  platform::with_transaction(store, [&](platform::TransactionId tx) {
    replaced_.clear();
    if (store.read(tx, dir_ + "/state")) replaced_ = store.read(tx, dir_ + "/pid").value_or("?");
    // A crashed vibd's status goes with its announcement.
    store.remove(tx, dir_);
    store.mkdir(tx, dir_);
    // Only this domain (and dom0, which reads everything) sees it.
    store.set_permissions(tx, dir_, {{self, platform::Access::none}});
    store.write(tx, dir_ + "/pid", pid);
    store.write(tx, dir_ + "/state", "running");
  });
}

Instance::~Instance() {
  try {
    store_.remove(kNoTransaction, dir_);
  } catch (const std::system_error&) {
    // The store is gone (xenstored stopped first): nothing left to tidy.
  }
}

}  // namespace vib::backend
