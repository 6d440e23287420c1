// vibgrant_check: the vibgrant module's ioctls against a hostile caller and
// its promises, in a real guest (run as root, after insmod):
// malformed requests are refused with the documented errno and leave
// nothing granted (INFO's grants_held back where it was), including one
// that fails after pinning and granting (refs not writable); a good grant
// returns distinct refs and counts its pages; read-only memory grants
// read-only and refuses a writable grant; RLIMIT_MEMLOCK bounds what an
// unprivileged process pins (ENOMEM); a fork()ed child writes its own copy
// of granted pages; closing the file ends every grant it held.
//
//   vibgrant_check BACKEND_DOMID
//
// Prints one line per check; exit status 1 if any failed.
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

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: vibgrant_check BACKEND_DOMID\n");
    return 2;
  }
  const auto backend = static_cast<std::uint32_t>(std::atoi(argv[1]));
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
  std::printf("vibgrant_check: %s\n", failures ? "FAILED" : "all ok");
  return failures ? 1 : 0;
}
