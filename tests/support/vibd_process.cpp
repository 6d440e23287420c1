#include "vibd_process.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <system_error>

namespace vib::test {

pid_t spawn_vibd(const char* vibd, const std::string& local_xen_dir, const std::string& log,
                 const std::vector<std::string>& extra_args) {
  std::vector<std::string> args = {vibd, "--local-xen", local_xen_dir};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) throw std::system_error(errno, std::generic_category(), "fork");
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive a killed test
    if (::getppid() != parent) ::_exit(1);
    if (!log.empty()) {
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (fd < 0 || ::dup2(fd, 2) < 0) ::_exit(126);
    }
    ::execv(vibd, argv.data());
    ::_exit(127);
  }
  return pid;
}

int stop_vibd(pid_t& pid) {
  if (pid <= 0) return -1;
  ::kill(pid, SIGTERM);
  int status = 0;
  ::waitpid(pid, &status, 0);
  pid = -1;
  return status;
}

std::string backend_path(platform::DomId domid, unsigned devid) {
  return "/local/domain/0/backend/vib/" + std::to_string(domid) + "/" + std::to_string(devid);
}
std::string frontend_path(platform::DomId domid, unsigned devid) {
  return "/local/domain/" + std::to_string(domid) + "/device/vib/" + std::to_string(devid);
}

void provision_device(platform::XenStore& store, platform::TransactionId tx, platform::DomId domid,
                      const std::string& hca) {
  using namespace platform;
  const std::string be = backend_path(domid), fe = frontend_path(domid);
  store.write(tx, be + "/frontend", fe);
  store.write(tx, be + "/frontend-id", std::to_string(domid));
  store.write(tx, be + "/online", "1");
  store.write(tx, be + "/state", "1");
  store.write(tx, be + "/hca", hca);
  store.set_permissions(tx, be, {{kDom0, Access::none}, {domid, Access::read}});
  for (const char* key : {"/frontend", "/frontend-id", "/online", "/state", "/hca"})
    store.set_permissions(tx, be + key, {{kDom0, Access::none}, {domid, Access::read}});
  store.write(tx, fe + "/backend", be);
  store.write(tx, fe + "/backend-id", "0");
  store.write(tx, fe + "/state", "1");
  for (const char* key : {"", "/backend", "/backend-id", "/state"})
    store.set_permissions(tx, fe + key, {{domid, Access::none}, {kDom0, Access::read}});
}

}  // namespace vib::test
