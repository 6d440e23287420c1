// reg_big: registers one large buffer with plain libibverbs, to show where
// the guest's grant table ends (issue 13): every 4 KiB page of a registration
// through vib is one grant, and a PV guest's table holds max_grant_frames *
// 512 of them (Xen's default of 64 frames: 128 MiB).
//
//   reg_big [-d DEVICE] [-m MIB]
//
// Touches every page of an MIB MiB buffer first (so the registration pins
// memory that is there, as an application's would be), registers it with
// LOCAL_WRITE | REMOTE_WRITE | REMOTE_READ, reports the time and
// deregisters. When /dev/xen/vibgrant is there, prints the grant table's
// size and use as the module reports them. On failure prints errno and
// strerror and exits 1 (libvibfront says which limit on stderr itself).
#include <fcntl.h>
#include <infiniband/verbs.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "vib/vibgrant.h"

namespace {

int fail(const char* what) {
  const int err = errno;
  std::printf("reg_big: %s failed: errno %d (%s)\n", what, err, std::strerror(err));
  return 1;
}

// The table as the vibgrant module sees it, if it is loaded.
void print_grant_table(const char* when) {
  const int fd = ::open(VIBGRANT_DEVICE, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  vibgrant_info info{};
  if (::ioctl(fd, VIBGRANT_IOCTL_INFO, &info) == 0)
    std::printf("reg_big: %s: grant table holds %llu (max_grant_frames=%llu), vibgrant holds %llu\n", when,
                static_cast<unsigned long long>(info.grants_total),
                static_cast<unsigned long long>(info.grants_total / 512),
                static_cast<unsigned long long>(info.grants_held));
  ::close(fd);
}

struct DeviceListFree {
  void operator()(ibv_device** list) const { ibv_free_device_list(list); }
};
struct ContextClose {
  void operator()(ibv_context* c) const { ibv_close_device(c); }
};
struct PdDealloc {
  void operator()(ibv_pd* pd) const { ibv_dealloc_pd(pd); }
};

class Buffer {
 public:
  explicit Buffer(std::size_t bytes)
      : bytes_(bytes), addr_(::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)) {}
  ~Buffer() {
    if (addr_ != MAP_FAILED) ::munmap(addr_, bytes_);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  bool ok() const { return addr_ != MAP_FAILED; }
  char* data() const { return static_cast<char*>(addr_); }

 private:
  std::size_t bytes_;
  void* addr_;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  std::string device_name;
  long mib = 256;
  for (int opt; (opt = ::getopt(argc, argv, "d:m:")) != -1;) {
    if (opt == 'd') device_name = optarg;
    else if (opt == 'm') mib = std::atol(optarg);
    else mib = 0;
  }
  if (mib <= 0) {
    std::fprintf(stderr, "usage: reg_big [-d DEVICE] [-m MIB]\n");
    return 2;
  }
  int count = 0;
  std::unique_ptr<ibv_device*, DeviceListFree> list(ibv_get_device_list(&count));
  if (!list || count == 0) return fail("ibv_get_device_list");
  ibv_device* device = device_name.empty() ? list.get()[0] : nullptr;
  for (int i = 0; i < count && !device; ++i)
    if (device_name == ibv_get_device_name(list.get()[i])) device = list.get()[i];
  if (!device) {
    std::printf("reg_big: no device %s\n", device_name.c_str());
    return 1;
  }
  std::unique_ptr<ibv_context, ContextClose> context(ibv_open_device(device));
  if (!context) return fail("ibv_open_device");
  std::unique_ptr<ibv_pd, PdDealloc> pd(ibv_alloc_pd(context.get()));
  if (!pd) return fail("ibv_alloc_pd");

  const std::size_t bytes = static_cast<std::size_t>(mib) << 20;
  Buffer buffer(bytes);
  if (!buffer.ok()) return fail("mmap");
  const long page = ::sysconf(_SC_PAGESIZE);
  for (std::size_t off = 0; off < bytes; off += static_cast<std::size_t>(page)) buffer.data()[off] = 1;
  print_grant_table("before");

  const int access = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;
  auto t0 = std::chrono::steady_clock::now();
  ibv_mr* mr = ibv_reg_mr(pd.get(), buffer.data(), bytes, access);
  const double reg_s = seconds_since(t0);
  if (!mr) {
    const int err = errno;
    print_grant_table("after the failure");
    errno = err;
    std::printf("reg_big: registering %ld MiB gave up after %.3f s\n", mib, reg_s);
    return fail("ibv_reg_mr");
  }
  print_grant_table("registered");
  t0 = std::chrono::steady_clock::now();
  if (ibv_dereg_mr(mr) != 0) return fail("ibv_dereg_mr");
  std::printf("reg_big: registered %ld MiB in %.3f s, deregistered in %.3f s\n", mib, reg_s, seconds_since(t0));
  return 0;
}
