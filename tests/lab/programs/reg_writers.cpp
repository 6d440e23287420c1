// reg_writers: registering memory must not lose a write another thread makes
// to the pages under the buffer at the same moment (issue 13). A writer
// thread increments counters just before, inside and just after a 2 KiB
// buffer, all on the buffer's page (as malloc's metadata and neighbours
// are), while the main thread registers and deregisters the buffer with
// plain libibverbs; at the end every counter must equal the writer's own
// count and the buffer's other bytes must be unchanged. The same check as
// CTest DataPath.WritesAroundABufferSurviveRegistrationLoops, for a real
// guest through vib's libibverbs.so.1.
//
//   reg_writers [-d DEVICE] [-n CYCLES]
//
// Prints the increments, what was lost, and the mean reg+dereg time; exit
// status 1 on any loss or error.
#include <infiniband/verbs.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "writers_around_buffer.hpp"

namespace {

int fail(const char* what) {
  std::fprintf(stderr, "reg_writers: %s: %s\n", what, std::strerror(errno));
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::string device_name;
  int cycles = 1000;
  for (int opt; (opt = ::getopt(argc, argv, "d:n:")) != -1;) {
    if (opt == 'd') device_name = optarg;
    else if (opt == 'n') cycles = std::atoi(optarg);
    else {
      std::fprintf(stderr, "usage: reg_writers [-d DEVICE] [-n CYCLES]\n");
      return 2;
    }
  }
  int count = 0;
  ibv_device** list = ibv_get_device_list(&count);
  if (!list || count == 0) return fail("no RDMA device");
  ibv_device* device = list[0];
  for (int i = 0; i < count && !device_name.empty(); ++i)
    if (device_name == ibv_get_device_name(list[i])) device = list[i];
  ibv_context* context = ibv_open_device(device);
  if (!context) return fail("ibv_open_device");
  ibv_pd* pd = ibv_alloc_pd(context);
  if (!pd) return fail("ibv_alloc_pd");

  vib::test::WritersAroundBuffer memory;
  memory.start();
  const int access = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;
  int done = 0, rc = 0;
  const auto begin = std::chrono::steady_clock::now();
  for (; done < cycles; ++done) {
    ibv_mr* mr = ibv_reg_mr(pd, memory.buffer(), memory.kBufferBytes, access);
    if (!mr) {
      rc = fail(("ibv_reg_mr, cycle " + std::to_string(done)).c_str());
      break;
    }
    if (ibv_dereg_mr(mr) != 0) {
      rc = fail(("ibv_dereg_mr, cycle " + std::to_string(done)).c_str());
      break;
    }
  }
  const auto elapsed = std::chrono::steady_clock::now() - begin;
  memory.stop();

  const auto increments = static_cast<unsigned long long>(memory.increments());
  std::printf("reg_writers: %d register/deregister cycles, %.1f us each, %llu increments per counter\n", done,
              done ? std::chrono::duration<double, std::micro>(elapsed).count() / done : 0.0, increments);
  for (std::size_t c = 0; c < memory.kCounters; ++c) {
    if (memory.lost(c) == 0) continue;
    std::printf("reg_writers: counter %zu LOST %llu of %llu increments\n", c,
                static_cast<unsigned long long>(memory.lost(c)), increments);
    rc = 1;
  }
  if (const std::size_t changed = memory.bytes_changed()) {
    std::printf("reg_writers: %zu bytes of the buffer changed\n", changed);
    rc = 1;
  }
  if (rc == 0) std::printf("reg_writers: no write lost\n");
  ibv_dealloc_pd(pd);
  ibv_close_device(context);
  ibv_free_device_list(list);
  return rc;
}
