// Unmodified programs as processes of guest domains of the host-local Xen:
// vib's libraries first on LD_LIBRARY_PATH, VIB_LOCAL_XEN and VIB_DOMID set,
// output to a file, a hard time limit.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "vib/platform/types.hpp"

namespace vib::test {

// What one program run left behind.
struct ProgramRun {
  int status = -1;  // as from waitpid
  std::string output;
  bool timed_out = false;
};

struct GuestEnvironment {
  std::string library_dir;  // vib's libibverbs.so.1 (and librdmacm.so.1)
  std::string local_xen_dir;
  std::string sanitizer_runtime;  // preloaded when vib's libraries are sanitized
  std::vector<std::string> extra;  // more NAME=value entries
};

// vib's libraries in `library_dir`; with a sanitized build (the including
// test target defines VIB_SANITIZER_RUNTIME), the sanitizer runtime preloaded.
inline GuestEnvironment guest_environment(const std::string& library_dir, const std::string& local_xen_dir) {
  GuestEnvironment env;
  env.library_dir = library_dir;
  env.local_xen_dir = local_xen_dir;
#ifdef VIB_SANITIZER_RUNTIME
  env.sanitizer_runtime = VIB_SANITIZER_RUNTIME;
#endif
  return env;
}

std::string slurp(const std::string& path);
// A TCP port nobody uses now (the kernel's pick).
unsigned free_port();
// Is process `pid` listening on TCP `port` (IPv4 or IPv6)?
bool listening(pid_t pid, unsigned port);

// Starts `argv` as a process of guest `domid`, stdout and stderr to `out`;
// it dies with this process.
pid_t start_guest_program(const GuestEnvironment& env, platform::DomId domid, const std::vector<std::string>& argv,
                          const std::string& out);
// Waits for `pid` until `deadline`, then kills it (a hard timeout).
ProgramRun finish_program(pid_t pid, const std::string& out, std::chrono::steady_clock::time_point deadline);
// Has process `pid` exited? It stays to be reaped (by finish_program, which
// then still gets its status).
bool has_exited(pid_t pid);

// One program as a process of guest `domid`, its output to `out`.
struct GuestProgram {
  platform::DomId domid;
  std::vector<std::string> argv;
  std::string out;
};

// A server and its client, as (server run, client run): the client starts
// once `server_ready(server pid)` says the server can take it (polled every
// 10 ms), or the server exited, or `deadline` passed; a run that did not end
// by `deadline` is killed. What went wrong is in the runs.
std::pair<ProgramRun, ProgramRun> run_program_pair(const GuestEnvironment& env, const GuestProgram& server,
                                                   const std::function<bool(pid_t)>& server_ready,
                                                   const GuestProgram& client,
                                                   std::chrono::steady_clock::time_point deadline);

}  // namespace vib::test
