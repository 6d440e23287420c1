// vibgrant_check: the vibgrant module's ioctls against a hostile caller and
// its promises, in a real guest (run as root, after insmod):
// malformed requests are refused with the documented errno and leave
// nothing granted (INFO's grants_held back where it was), including one
// that fails after pinning and granting (refs not writable); a good grant
// returns distinct refs and counts its pages; read-only memory grants
// read-only and refuses a writable grant; RLIMIT_MEMLOCK bounds what an
// unprivileged process pins (ENOMEM); a fork()ed child writes its own copy
// of granted pages; closing the file ends every grant it held. Its event
// channels: bad binds refused, a loopback pair delivers a notification
// through poll() and read(), a raised port stays masked until UNMASK, 64
// bindings per file, and closing a file notifies the peers of the ports
// bound with NOTIFY_ON_CLOSE, and only those.
//
//   vibgrant_check BACKEND_DOMID THIS_DOMID
//
// Prints one line per check; exit status 1 if any failed.
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <vector>

#include "vib/vibgrant.h"

namespace {

int failures = 0;

void check(bool ok, const char* what) {
  std::printf("vibgrant_check: %s: %s\n", what, ok ? "ok" : "FAILED");
  if (!ok) ++failures;
}

// 0 or the errno of GRANT; `handle` set on success.
int grant(int fd, void* start, std::uint64_t pages, std::uint32_t domid, std::uint32_t flags,
          std::vector<std::uint32_t>& refs, std::uint64_t& handle) {
  refs.assign(pages < 4096 ? static_cast<std::size_t>(pages) : 1, 0);
  vibgrant_grant g{};
  g.start = reinterpret_cast<std::uintptr_t>(start);
  g.pages = pages;
  g.refs = reinterpret_cast<std::uintptr_t>(refs.data());
  g.domid = domid;
  g.flags = flags;
  if (::ioctl(fd, VIBGRANT_IOCTL_GRANT, &g) != 0) return errno;
  handle = g.handle;
  return 0;
}

int release(int fd, std::uint64_t handle) {
  vibgrant_release r{handle};
  return ::ioctl(fd, VIBGRANT_IOCTL_RELEASE, &r) == 0 ? 0 : errno;
}

vibgrant_info info(int fd) {
  vibgrant_info i{};
  if (::ioctl(fd, VIBGRANT_IOCTL_INFO, &i) != 0) std::perror("vibgrant_check: INFO");
  return i;
}

// 0 or the errno of EVTCHN_BIND; `port` set on success.
int bind_port(int fd, std::uint32_t remote, std::uint32_t remote_port, std::uint32_t flags, std::uint32_t& port) {
  vibgrant_evtchn_bind b{};
  b.remote_domid = remote;
  b.remote_port = remote_port;
  b.flags = flags;
  if (::ioctl(fd, VIBGRANT_IOCTL_EVTCHN_BIND, &b) != 0) return errno;
  port = b.port;
  return 0;
}

int on_port(int fd, unsigned long request, std::uint32_t port) {
  vibgrant_evtchn_port p{port};
  return ::ioctl(fd, request, &p) == 0 ? 0 : errno;
}

// The one port read() returns within `ms`, or 0 if none.
std::uint32_t next_raised(int fd, int ms) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, ms) != 1) return 0;
  std::uint32_t ports[4];
  return ::read(fd, ports, sizeof ports) == sizeof ports[0] ? ports[0] : 0;
}

void check_event_channels(std::uint32_t backend, std::uint32_t self) {
  const int fd = ::open(VIBGRANT_DEVICE, O_RDWR | O_CLOEXEC | O_NONBLOCK);
  std::uint32_t a = 0, b = 0, unused = 0;
  check(bind_port(fd, backend, 0, 1u << 7, unused) == EINVAL, "event channel: unknown flag: EINVAL");
  check(bind_port(fd, 0x7FF0, 0, 0, unused) == EINVAL, "event channel: reserved domid: EINVAL");
  check(on_port(fd, VIBGRANT_IOCTL_EVTCHN_UNMASK, 0) == ENOENT, "event channel: a port not bound here: ENOENT");
  check(bind_port(fd, self, 0, 0, a) == 0 && a != 0, "event channel: a port this domain may bind");
  check(bind_port(fd, self, a, 0, b) == 0 && b != 0 && b != a, "event channel: bound to it (loopback)");
  // Xen raises a port it has just bound, for an event sent before it was.
  check(next_raised(fd, 5000) == b && on_port(fd, VIBGRANT_IOCTL_EVTCHN_UNMASK, b) == 0,
        "event channel: the new binding is raised once, then unmasked");
  std::uint32_t buf[4];
  check(::read(fd, buf, sizeof buf) == -1 && errno == EAGAIN, "event channel: nothing raised: read() EAGAIN");
  check(on_port(fd, VIBGRANT_IOCTL_EVTCHN_NOTIFY, a) == 0 && next_raised(fd, 5000) == b,
        "event channel: a notification makes poll() ready and read() return the peer's port");
  on_port(fd, VIBGRANT_IOCTL_EVTCHN_NOTIFY, a);
  check(next_raised(fd, 300) == 0, "event channel: a raised port stays masked until UNMASK");
  check(on_port(fd, VIBGRANT_IOCTL_EVTCHN_UNMASK, b) == 0 && next_raised(fd, 5000) == b,
        "event channel: UNMASK delivers what was raised meanwhile");
  check(on_port(fd, VIBGRANT_IOCTL_EVTCHN_UNBIND, b) == 0 && on_port(fd, VIBGRANT_IOCTL_EVTCHN_UNBIND, b) == ENOENT,
        "event channel: unbound once, then ENOENT");
  on_port(fd, VIBGRANT_IOCTL_EVTCHN_UNBIND, a);
  std::size_t bound = 0;
  while (bound < VIBGRANT_MAX_EVTCHNS && bind_port(fd, backend, 0, 0, unused) == 0) ++bound;
  check(bound == VIBGRANT_MAX_EVTCHNS && bind_port(fd, backend, 0, 0, unused) == EMFILE,
        "event channel: 64 bindings per file, the 65th EMFILE");
  ::close(fd);

  // A process that dies with a port bound: its peer hears of it only if
  // the port asked for it.
  const int peer = ::open(VIBGRANT_DEVICE, O_RDWR | O_CLOEXEC | O_NONBLOCK);
  const int dying = ::open(VIBGRANT_DEVICE, O_RDWR | O_CLOEXEC | O_NONBLOCK);
  bind_port(peer, self, 0, 0, a);
  check(bind_port(dying, self, a, VIBGRANT_EVTCHN_NOTIFY_ON_CLOSE, b) == 0, "event channel: bound NOTIFY_ON_CLOSE");
  ::close(dying);
  check(next_raised(peer, 5000) == a, "event channel: closing its file notifies the peer");
  on_port(peer, VIBGRANT_IOCTL_EVTCHN_UNMASK, a);
  const int quiet = ::open(VIBGRANT_DEVICE, O_RDWR | O_CLOEXEC | O_NONBLOCK);
  check(bind_port(quiet, self, a, 0, b) == 0, "event channel: bound again, without the flag");
  ::close(quiet);
  check(next_raised(peer, 300) == 0, "event channel: closing that file notifies nobody");
  ::close(peer);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: vibgrant_check BACKEND_DOMID THIS_DOMID\n");
    return 2;
  }
  const auto backend = static_cast<std::uint32_t>(std::atoi(argv[1]));
  const auto self = static_cast<std::uint32_t>(std::atoi(argv[2]));
  int fd = ::open(VIBGRANT_DEVICE, O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    std::perror("vibgrant_check: " VIBGRANT_DEVICE);
    return 1;
  }
  const std::uint64_t held_before = info(fd).grants_held;
  std::printf("vibgrant_check: grant table of %llu entries, %llu held by vibgrant\n",
              static_cast<unsigned long long>(info(fd).grants_total), static_cast<unsigned long long>(held_before));

  constexpr std::size_t kPages = 16, kPage = 4096;
  auto* buf = static_cast<char*>(::mmap(nullptr, kPages * kPage, PROT_READ | PROT_WRITE,
                                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  std::memset(buf, 'p', kPages * kPage);
  std::vector<std::uint32_t> refs;
  std::uint64_t handle = 0;

  // Malformed requests.
  check(grant(fd, buf, 0, backend, VIBGRANT_WRITABLE, refs, handle) == EINVAL, "no pages: EINVAL");
  check(grant(fd, buf, VIBGRANT_MAX_PAGES + 1ull, backend, VIBGRANT_WRITABLE, refs, handle) == EINVAL,
        "more than VIBGRANT_MAX_PAGES: EINVAL");
  check(grant(fd, buf + 8, 1, backend, VIBGRANT_WRITABLE, refs, handle) == EINVAL, "unaligned start: EINVAL");
  check(grant(fd, buf, 1, backend, 0x80, refs, handle) == EINVAL, "unknown flags: EINVAL");
  check(grant(fd, buf, 1, 0x7FF0, VIBGRANT_WRITABLE, refs, handle) == EINVAL, "reserved domid: EINVAL");
  check(release(fd, 12345) == ENOENT, "release of an unknown handle: ENOENT");
  void* hole = ::mmap(nullptr, kPage, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ::munmap(hole, kPage);
  check(grant(fd, hole, 1, backend, 0, refs, handle) == EFAULT, "unmapped memory: EFAULT");
  {
    vibgrant_grant g{};
    g.start = reinterpret_cast<std::uintptr_t>(buf);
    g.pages = kPages;
    g.domid = backend;
    g.flags = VIBGRANT_WRITABLE;
    auto* ro = static_cast<char*>(::mmap(nullptr, kPage, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    g.refs = reinterpret_cast<std::uintptr_t>(ro);
    check(::ioctl(fd, VIBGRANT_IOCTL_GRANT, &g) != 0 && errno == EFAULT,
          "refs not writable (fails after pinning and granting): EFAULT");
    check(grant(fd, ro, 1, backend, VIBGRANT_WRITABLE, refs, handle) == EFAULT,
          "writable grant of read-only memory: EFAULT");
    check(grant(fd, ro, 1, backend, 0, refs, handle) == 0, "read-only grant of read-only memory");
    check(release(fd, handle) == 0, "its release");
    ::munmap(ro, kPage);
  }
  check(info(fd).grants_held == held_before, "nothing left granted by the refused requests");

  // A good grant.
  check(grant(fd, buf, kPages, backend, VIBGRANT_WRITABLE, refs, handle) == 0, "16 pages granted writable");
  check(std::set<std::uint32_t>(refs.begin(), refs.end()).size() == kPages, "16 distinct refs");
  check(info(fd).grants_held == held_before + kPages && info(fd).pinned_pages == kPages, "counted in INFO");
  check(release(fd, handle) == 0 && release(fd, handle) == ENOENT, "released once, then ENOENT");
  check(info(fd).grants_held == held_before && info(fd).pinned_pages == 0, "nothing held after release");

  // fork() with granted pages: the child writes its own copy.
  check(grant(fd, buf, kPages, backend, VIBGRANT_WRITABLE, refs, handle) == 0, "granted again for fork");
  const pid_t child = ::fork();
  if (child == 0) {
    std::memset(buf, 'c', kPage);
    std::_Exit(buf[0] == 'c' ? 0 : 1);
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  check(WIFEXITED(status) && WEXITSTATUS(status) == 0 && buf[0] == 'p' && buf[kPage - 1] == 'p',
        "a fork()ed child writes its own copy of granted pages");

  // Closing the file ends what it held.
  ::close(fd);
  fd = ::open(VIBGRANT_DEVICE, O_RDWR | O_CLOEXEC);
  check(info(fd).grants_held == held_before, "closing the file ended its grants");

  // RLIMIT_MEMLOCK for a process without CAP_IPC_LOCK (root gives it up).
  const pid_t limited = ::fork();
  if (limited == 0) {
    rlimit lim{8 * kPage, 8 * kPage};
    if (::setrlimit(RLIMIT_MEMLOCK, &lim) != 0 || ::setresuid(65534, 65534, 65534) != 0) std::_Exit(3);
    std::vector<std::uint32_t> r;
    std::uint64_t h = 0;
    if (grant(fd, buf, kPages, backend, VIBGRANT_WRITABLE, r, h) != ENOMEM) std::_Exit(1);
    if (grant(fd, buf, 4, backend, VIBGRANT_WRITABLE, r, h) != 0) std::_Exit(2);
    std::_Exit(0);  // exiting closes its copy of the file; the parent's stays open
  }
  ::waitpid(limited, &status, 0);
  check(WIFEXITED(status) && WEXITSTATUS(status) == 0,
        "RLIMIT_MEMLOCK of 8 pages: 16 refused with ENOMEM, 4 granted");
  ::close(fd);
  fd = ::open(VIBGRANT_DEVICE, O_RDWR | O_CLOEXEC);
  check(info(fd).grants_held == held_before, "nothing held after every file closed");
  ::close(fd);
  check_event_channels(backend, self);
  std::printf("vibgrant_check: %s\n", failures ? "FAILED" : "all ok");
  return failures ? 1 : 0;
}
