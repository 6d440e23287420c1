#include "guest_programs.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>

namespace vib::test {

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

unsigned free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  socklen_t len = sizeof(a);
  unsigned port = 0;
  if (fd >= 0 && ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0)
    port = ntohs(a.sin_port);
  if (fd >= 0) ::close(fd);
  return port;
}

// The inodes of the sockets process `pid` has open.
namespace {

std::set<std::string> socket_inodes(pid_t pid) {
  std::set<std::string> inodes;
  const std::string dir = "/proc/" + std::to_string(pid) + "/fd";
  std::error_code ec;
  for (const auto& fd : std::filesystem::directory_iterator(dir, ec)) {
    const auto target = std::filesystem::read_symlink(fd.path(), ec);
    const std::string t = target.string();
    if (!ec && t.rfind("socket:[", 0) == 0) inodes.insert(t.substr(8, t.size() - 9));
  }
  return inodes;
}

}  // namespace

// Is process `pid` listening on TCP `port` (IPv4 or IPv6)? The servers
// print nothing before they accept, and a client that finds no listener
// gives up at once, so the client starts only after this.
bool listening(pid_t pid, unsigned port) {
  char hex[8];
  std::snprintf(hex, sizeof(hex), ":%04X", port);
  const auto mine = socket_inodes(pid);
  for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream in(table);
    std::string line;
    std::getline(in, line);  // header
    while (std::getline(in, line)) {
      std::istringstream fields(line);
      std::string slot, local, remote, state, queues, timer, retransmits, uid, timeout, inode;
      fields >> slot >> local >> remote >> state >> queues >> timer >> retransmits >> uid >> timeout >> inode;
      if (state == "0A" && local.size() > 5 && local.compare(local.size() - 5, 5, hex) == 0 && mine.count(inode))
        return true;
    }
  }
  return false;
}

pid_t start_guest_program(const GuestEnvironment& guest, platform::DomId domid, const std::vector<std::string>& argv,
                          const std::string& out) {
  std::vector<std::string> env = {
      "LD_LIBRARY_PATH=" + guest.library_dir,
      "VIB_LOCAL_XEN=" + guest.local_xen_dir,
      "VIB_DOMID=" + std::to_string(domid),
      "PATH=/usr/bin:/bin",
  };
  if (!guest.sanitizer_runtime.empty()) {
    // vib's libraries are built with a sanitizer, the programs are not: the
    // sanitizer's runtime must be loaded first, and the programs' own leaks
    // at exit are not ours to report (AddressSanitizer).
    env.push_back("LD_PRELOAD=" + guest.sanitizer_runtime);
    env.push_back("ASAN_OPTIONS=detect_leaks=0");
  }
  env.insert(env.end(), guest.extra.begin(), guest.extra.end());
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(1);
    const int fd = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0 || ::dup2(fd, 1) < 0 || ::dup2(fd, 2) < 0) ::_exit(126);
    std::vector<char*> args, envp;
    for (auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    for (auto& e : env) envp.push_back(const_cast<char*>(e.c_str()));
    envp.push_back(nullptr);
    ::execve(args[0], args.data(), envp.data());
    ::_exit(127);
  }
  return pid;
}

ProgramRun finish_program(pid_t pid, const std::string& out, std::chrono::steady_clock::time_point deadline) {
  ProgramRun run;
  for (;;) {
    const pid_t done = ::waitpid(pid, &run.status, WNOHANG);
    if (done == pid) break;
    if (std::chrono::steady_clock::now() > deadline) {
      run.timed_out = true;
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &run.status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  run.output = slurp(out);
  return run;
}

bool has_exited(pid_t pid) {
  siginfo_t info{};
  return ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_pid == pid;
}

std::pair<ProgramRun, ProgramRun> run_program_pair(const GuestEnvironment& env, const GuestProgram& server,
                                                   const std::function<bool(pid_t)>& server_ready,
                                                   const GuestProgram& client,
                                                   std::chrono::steady_clock::time_point deadline) {
  const pid_t s = start_guest_program(env, server.domid, server.argv, server.out);
  while (!server_ready(s) && !has_exited(s) && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  const pid_t c = start_guest_program(env, client.domid, client.argv, client.out);
  ProgramRun client_run = finish_program(c, client.out, deadline);
  ProgramRun server_run = finish_program(s, server.out, deadline);
  return {std::move(server_run), std::move(client_run)};
}

}  // namespace vib::test
