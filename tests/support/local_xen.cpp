#include "local_xen.hpp"

#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <stdexcept>

namespace vib::test {

namespace {

int run_command(const std::string& cmd, std::string* out) {
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) throw std::runtime_error("cannot run " + cmd);
  std::array<char, 512> buf;
  while (std::size_t n = std::fread(buf.data(), 1, buf.size(), p))
    if (out) out->append(buf.data(), n);
  return ::pclose(p);
}

}  // namespace

LocalXen::LocalXen() {
  char tmpl[] = "/tmp/vib-localxen-XXXXXX";
  if (!::mkdtemp(tmpl)) throw std::runtime_error("mkdtemp");
  dir_ = tmpl;
  int out[2];
  if (::pipe(out) != 0) throw std::runtime_error("pipe");
  const pid_t parent = ::getpid();
  pid_ = ::fork();
  if (pid_ == 0) {
    // A test killed by a timeout or a sanitizer must not leave its Xen
    // behind holding ctest's output pipe.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(1);
    ::dup2(out[1], STDOUT_FILENO);
    ::close(out[0]);
    ::close(out[1]);
    ::execl(VIB_LOCALXEN, VIB_LOCALXEN, "serve", "--dir", dir_.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ::close(out[1]);
  // Ready once it printed its first line (after its sockets exist).
  pollfd p{out[0], POLLIN, 0};
  char c = 0;
  bool ready = false;
  while (::poll(&p, 1, 10000) > 0 && ::read(out[0], &c, 1) == 1)
    if (c == '\n') {
      ready = true;
      break;
    }
  ::close(out[0]);
  if (!ready) {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    throw std::runtime_error("vib-localxen did not start");
  }
}

LocalXen::~LocalXen() {
  if (pid_ > 0) {
    ::kill(pid_, SIGTERM);
    ::waitpid(pid_, nullptr, 0);
  }
  std::error_code ignored;
  std::filesystem::remove_all(dir_, ignored);
}

void LocalXen::create_domain(platform::DomId domid, unsigned max_grant_frames) {
  std::string cmd = std::string(VIB_LOCALXEN) + " create-domain --dir " + dir_ + " --domid " + std::to_string(domid);
  if (max_grant_frames) cmd += " --max-grant-frames " + std::to_string(max_grant_frames);
  cmd += " >/dev/null";
  if (run_command(cmd, nullptr) != 0) throw std::runtime_error("create-domain failed");
}

void LocalXen::destroy_domain(platform::DomId domid) {
  const std::string cmd = std::string(VIB_LOCALXEN) + " destroy-domain --dir " + dir_ + " --domid " +
                          std::to_string(domid) + " >/dev/null";
  if (run_command(cmd, nullptr) != 0) throw std::runtime_error("destroy-domain failed");
}

std::string LocalXen::xenstore_tool(const std::string& command, int* status) const {
  std::string out;
  const int rc = run_command("XENSTORED_PATH=" + dir_ + "/domain/0/xenstore " + command, &out);
  if (status) *status = rc;
  return out;
}

}  // namespace vib::test
