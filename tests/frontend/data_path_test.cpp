// The whole data path, end to end: libvibfront in the "guest" (this test
// process, as domains 5 and 6 of the host-local Xen) -> granted queues and
// doorbell page -> vibd (a real process) -> the soft HCA -> completions
// written back into guest CQs. Objects are freed when a context dies or its
// domain does, and a guest's garbage hurts only that guest.
#include <gtest/gtest.h>
#include <arpa/inet.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>

#include <dirent.h>
#include <malloc.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>

#include "vib/front/verbs.hpp"
#include "rc_connect.hpp"
#include "vibd_fixture.hpp"
#include "writers_around_buffer.hpp"

using namespace std::chrono_literals;
using namespace std::string_literals;
using vib::front::Device;

namespace {

constexpr int kAccess =
    IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_ATOMIC;

// One side of an RC connection: PD, CQ, QP and a registered buffer the
// application allocated itself (not page aligned).
struct Endpoint {
  std::unique_ptr<Device> device;
  std::unique_ptr<vib::front::Pd> pd;
  std::unique_ptr<vib::front::Cq> cq;
  std::unique_ptr<vib::front::Qp> qp;
  std::vector<char> storage = std::vector<char>(3 * 4096);
  char* buf = storage.data() + 100;
  std::unique_ptr<vib::front::Mr> mr;
  std::uint16_t lid = 0;

  explicit Endpoint(vib::platform::XenTarget xen, std::chrono::milliseconds timeout = 5s) {
    vib::front::ChannelOptions options;
    options.xen = xen;
    options.timeout = timeout;
    device = Device::open(options);
    pd = device->alloc_pd();
    cq = device->create_cq(16);
    vib::front::QpInit init;
    init.send_cq = init.recv_cq = cq.get();
    init.cap = ibv_qp_cap{16, 16, 2, 2, 64};
    qp = pd->create_qp(init);
    std::strcpy(buf, "original");
    mr = pd->reg_mr(buf, 8192, kAccess);
    ibv_port_attr port;
    device->query_port(1, port);
    lid = port.lid;
  }

  void connect(const Endpoint& peer) {
    for (auto& step : vib::test::rc_connect_steps(peer.lid, peer.qp->qp_num(), kAccess))
      ASSERT_EQ(qp->modify(step.attr, step.mask), 0) << "to state " << step.attr.qp_state;
  }

  // Waits (bounded) for one completion.
  ibv_wc wait_completion() {
    ibv_wc wc{};
    const auto deadline = std::chrono::steady_clock::now() + 5s;
    while (std::chrono::steady_clock::now() < deadline) {
      if (cq->poll(std::span<ibv_wc>(&wc, 1)) == 1) return wc;
      std::this_thread::yield();
    }
    ADD_FAILURE() << "no completion within 5 s";
    wc.status = IBV_WC_GENERAL_ERR;
    return wc;
  }

  // An RDMA WRITE or READ of `length` bytes between buf + offset and the
  // peer's `remote_addr` under `rkey`, waited for: its completion status.
  ibv_wc_status rdma(ibv_wr_opcode opcode, std::size_t offset, std::uint32_t length, std::uint64_t remote_addr,
                     std::uint32_t rkey) {
    ibv_sge sge{reinterpret_cast<std::uintptr_t>(buf + offset), length, mr->lkey()};
    ibv_send_wr wr{};
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = opcode;
    wr.send_flags = IBV_SEND_SIGNALED;
    wr.wr.rdma.remote_addr = remote_addr;
    wr.wr.rdma.rkey = rkey;
    ibv_send_wr* bad = nullptr;
    if (qp->post_send(&wr, &bad) != 0) return IBV_WC_GENERAL_ERR;
    return wait_completion().status;
  }

  int post_recv(std::uint64_t id, std::size_t offset, std::uint32_t length) {
    ibv_sge sge{reinterpret_cast<std::uintptr_t>(buf + offset), length, mr->lkey()};
    ibv_recv_wr wr{};
    wr.wr_id = id;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    ibv_recv_wr* bad = nullptr;
    return qp->post_recv(&wr, &bad);
  }

  int post(ibv_wr_opcode opcode, std::uint64_t id, std::size_t offset, std::uint32_t length,
           const Endpoint* remote = nullptr, std::size_t remote_offset = 0, unsigned flags = IBV_SEND_SIGNALED) {
    ibv_sge sge{reinterpret_cast<std::uintptr_t>(buf + offset), length, mr->lkey()};
    ibv_send_wr wr{};
    wr.wr_id = id;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = opcode;
    wr.send_flags = flags;
    if (remote) {
      const auto addr = reinterpret_cast<std::uintptr_t>(remote->buf + remote_offset);
      // wr.wr is a union: fill only the member the opcode uses.
      if (opcode == IBV_WR_ATOMIC_FETCH_AND_ADD) {
        wr.wr.atomic.remote_addr = addr;
        wr.wr.atomic.rkey = remote->mr->rkey();
        wr.wr.atomic.compare_add = 5;
      } else {
        wr.wr.rdma.remote_addr = addr;
        wr.wr.rdma.rkey = remote->mr->rkey();
      }
    }
    ibv_send_wr* bad = nullptr;
    return qp->post_send(&wr, &bad);
  }
};

// kill(SIGSTOP) returns before the target has stopped: waits (bounded)
// until every thread of `pid` is in the stopped state.
bool wait_until_stopped(pid_t pid) {
  const std::string tasks = "/proc/" + std::to_string(pid) + "/task";
  for (int attempt = 0; attempt < 500; ++attempt) {
    bool all = true;
    if (DIR* dir = ::opendir(tasks.c_str())) {
      while (dirent* e = ::readdir(dir)) {
        if (e->d_name[0] == '.') continue;
        std::ifstream stat(tasks + "/" + e->d_name + "/stat");
        std::string line;
        std::getline(stat, line);
        const auto close = line.rfind(')');
        if (close != std::string::npos && close + 2 < line.size() && line[close + 2] != 'T') all = false;
      }
      ::closedir(dir);
    }
    if (all) return true;
    std::this_thread::sleep_for(10ms);
  }
  return false;
}

class DataPath : public vib::test::VibdFixture {
 protected:
  void SetUp() override {
    VibdFixture::SetUp();
    log_ = xen_.dir() + "/vibd.log";
    provision(5);
    provision(6);
    start_vibd(VIBD, log_);
    ASSERT_TRUE(eventually(be(5) + "/state", "2"));
    ASSERT_TRUE(eventually(be(6) + "/state", "2"));
  }
  std::string vibd_log() {
    std::ifstream in(log_);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }
  bool log_eventually_has(const std::string& text) {
    for (int i = 0; i < 500; ++i) {
      if (vibd_log().find(text) != std::string::npos) return true;
      std::this_thread::sleep_for(10ms);
    }
    return false;
  }
  std::string log_;
};

TEST_F(DataPath, TwoContextsExchangeDataOverRcThroughVibd) {
  Endpoint a(xen_.as(5)), b(xen_.as(5));  // two processes' contexts of one device
  a.connect(b);
  b.connect(a);

  // SEND/RECV: bytes land in b's own (remapped, not page-aligned) buffer.
  ASSERT_EQ(b.post_recv(7, 1000, 64), 0);
  std::strcpy(a.buf, "hello through vib");
  ASSERT_EQ(a.post(IBV_WR_SEND, 1, 0, 18), 0);
  ibv_wc wc = a.wait_completion();
  EXPECT_EQ(wc.status, IBV_WC_SUCCESS);
  EXPECT_EQ(wc.opcode, IBV_WC_SEND);
  EXPECT_EQ(wc.wr_id, 1u);
  wc = b.wait_completion();
  EXPECT_EQ(wc.status, IBV_WC_SUCCESS);
  EXPECT_EQ(wc.opcode, IBV_WC_RECV);
  EXPECT_EQ(wc.wr_id, 7u);
  EXPECT_EQ(wc.byte_len, 18u);
  EXPECT_EQ(wc.qp_num, b.qp->qp_num());
  EXPECT_STREQ(b.buf + 1000, "hello through vib");

  // RDMA WRITE into b at b's own virtual address, with its real rkey.
  std::strcpy(a.buf + 200, "written remotely");
  ASSERT_EQ(a.post(IBV_WR_RDMA_WRITE, 2, 200, 17, &b, 5000), 0);
  EXPECT_EQ(a.wait_completion().status, IBV_WC_SUCCESS);
  EXPECT_STREQ(b.buf + 5000, "written remotely");

  // RDMA READ from b.
  std::strcpy(b.buf + 6000, "read me");
  ASSERT_EQ(a.post(IBV_WR_RDMA_READ, 3, 300, 8, &b, 6000), 0);
  wc = a.wait_completion();
  EXPECT_EQ(wc.status, IBV_WC_SUCCESS);
  EXPECT_EQ(wc.opcode, IBV_WC_RDMA_READ);
  EXPECT_STREQ(a.buf + 300, "read me");

  // Fetch-and-add on an 8-byte word of b (its address is 8-byte aligned).
  const std::size_t word = 7000 - (reinterpret_cast<std::uintptr_t>(b.buf + 7000) % 8);
  std::uint64_t before = 40;
  std::memcpy(b.buf + word, &before, 8);
  ASSERT_EQ(a.post(IBV_WR_ATOMIC_FETCH_AND_ADD, 4, 400 - (reinterpret_cast<std::uintptr_t>(a.buf + 400) % 8), 8, &b,
                   word),
            0);
  wc = a.wait_completion();
  EXPECT_EQ(wc.status, IBV_WC_SUCCESS);
  EXPECT_EQ(wc.opcode, IBV_WC_FETCH_ADD);
  std::uint64_t after = 0;
  std::memcpy(&after, b.buf + word, 8);
  EXPECT_EQ(after, 45u);

  // Inline send: the source buffer may change right after posting.
  ASSERT_EQ(b.post_recv(8, 2000, 64), 0);
  std::strcpy(a.buf + 500, "inline!");
  ASSERT_EQ(a.post(IBV_WR_SEND, 5, 500, 8, nullptr, 0, IBV_SEND_SIGNALED | IBV_SEND_INLINE), 0);
  std::strcpy(a.buf + 500, "changed");
  EXPECT_EQ(a.wait_completion().status, IBV_WC_SUCCESS);
  EXPECT_EQ(b.wait_completion().wr_id, 8u);
  EXPECT_STREQ(b.buf + 2000, "inline!");

  // A completion event for an armed CQ, through the event channel.
  b.cq->request_notify(false);
  ASSERT_EQ(b.post_recv(9, 3000, 64), 0);
  ASSERT_EQ(a.post(IBV_WR_SEND, 6, 0, 4), 0);
  EXPECT_EQ(a.wait_completion().status, IBV_WC_SUCCESS);
  std::optional<vibif_event> event;
  for (int i = 0; i < 500 && !(event && event->type == VIBIF_EVENT_COMPLETION); ++i) {
    pollfd p{b.device->event_fd(), POLLIN, 0};
    ::poll(&p, 1, 10);
    b.device->consume_notifications();
    // Asynchronous events (the QP's communication-established) may come first.
    event = b.device->next_event();
  }
  ASSERT_TRUE(event) << "no completion event";
  EXPECT_EQ(event->type, VIBIF_EVENT_COMPLETION);
  EXPECT_EQ(event->handle, b.cq->handle());
  EXPECT_EQ(b.wait_completion().wr_id, 9u);
}

// Issue 13: registering a buffer must not lose a write another thread makes
// to the pages under it at the same moment. A writer increments counters
// just before, inside and just after a 2 KiB buffer (all on the buffer's
// page, as malloc's metadata and neighbours are) while this thread registers
// and deregisters the buffer hundreds of times; every increment must be
// there at the end, and the buffer's other bytes unchanged.
TEST_F(DataPath, WritesAroundABufferSurviveRegistrationLoops) {
  auto device = Device::open([&] {
    vib::front::ChannelOptions options;
    options.xen = xen_.as(5);
    return options;
  }());
  auto pd = device->alloc_pd();
  vib::test::WritersAroundBuffer memory;
  memory.start();
  constexpr int kCycles = 1000;
  int registered = 0;
  for (int i = 0; i < kCycles; ++i) {
    try {
      auto mr = pd->reg_mr(memory.buffer(), memory.kBufferBytes, kAccess);
      ++registered;
    } catch (const std::system_error& e) {
      ADD_FAILURE() << "registration " << i << ": " << e.what();
      break;
    }
  }
  memory.stop();

  EXPECT_EQ(registered, kCycles);
  for (std::size_t c = 0; c < memory.kCounters; ++c)
    EXPECT_EQ(memory.lost(c), 0u) << "counter " << c << " lost " << memory.lost(c) << " of " << memory.increments()
                                  << " increments";
  EXPECT_EQ(memory.bytes_changed(), 0u) << "bytes of the buffer changed by registering it";
}

// Writes a 16-byte pattern from `from` into `to`'s memory at `at` through
// `rkey`; true when it completed and landed byte for byte.
bool lands(Endpoint& from, const void* at, std::uint32_t rkey, char tag) {
  char pattern[16];
  for (int i = 0; i < 16; ++i) pattern[i] = static_cast<char>(tag + i);
  std::memcpy(from.buf + 4000, pattern, sizeof(pattern));
  if (from.rdma(IBV_WR_RDMA_WRITE, 4000, sizeof(pattern), reinterpret_cast<std::uintptr_t>(at), rkey) !=
      IBV_WC_SUCCESS)
    return false;
  return std::memcmp(at, pattern, sizeof(pattern)) == 0;
}

// Issue 13: MPI and UCX register overlapping and nested ranges of the same
// pages; each registration stands on its own whatever is deregistered first.
TEST_F(DataPath, OverlappingAndNestedRegistrationsAreIndependentInAnyDeregOrder) {
  Endpoint a(xen_.as(5)), b(xen_.as(6));
  a.connect(b);
  b.connect(a);
  auto partial = b.pd->reg_mr(b.buf + 3000, 5000, kAccess);  // overlaps part of b.mr's pages
  auto nested = b.pd->reg_mr(b.buf + 5000, 100, kAccess);    // inside both
  auto again = b.pd->reg_mr(b.buf + 3000, 5000, kAccess);    // the same range twice
  EXPECT_TRUE(lands(a, b.buf + 10, b.mr->rkey(), 'a'));
  EXPECT_TRUE(lands(a, b.buf + 7000, partial->rkey(), 'b'));
  b.mr.reset();  // the first, enclosing registration goes first
  EXPECT_TRUE(lands(a, b.buf + 3000, partial->rkey(), 'c'));
  EXPECT_TRUE(lands(a, b.buf + 5010, nested->rkey(), 'd'));
  EXPECT_TRUE(lands(a, b.buf + 7900, again->rkey(), 'e'));
  partial.reset();
  EXPECT_TRUE(lands(a, b.buf + 5020, nested->rkey(), 'f'));
  EXPECT_TRUE(lands(a, b.buf + 3500, again->rkey(), 'g'));
  again.reset();
  EXPECT_TRUE(lands(a, b.buf + 5040, nested->rkey(), 'h'));
}

// Memory the application may only read registers without LOCAL_WRITE, and
// a remote peer reads it; asking for write access to it is refused.
TEST_F(DataPath, ReadOnlyMemoryRegistersWithoutLocalWrite) {
  Endpoint a(xen_.as(5)), b(xen_.as(6));
  a.connect(b);
  b.connect(a);
  void* page = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(page, MAP_FAILED);
  std::memcpy(page, "read-only but readable remotely", 32);
  ASSERT_EQ(::mprotect(page, 4096, PROT_READ), 0);
  try {
    b.pd->reg_mr(page, 4096, IBV_ACCESS_LOCAL_WRITE);
    ADD_FAILURE() << "read-only memory registered with LOCAL_WRITE";
  } catch (const std::system_error& e) {
    EXPECT_EQ(e.code().value(), EFAULT) << e.what();
  }
  auto mr = b.pd->reg_mr(page, 4096, IBV_ACCESS_REMOTE_READ);
  ASSERT_EQ(a.rdma(IBV_WR_RDMA_READ, 100, 32, reinterpret_cast<std::uintptr_t>(page), mr->rkey()), IBV_WC_SUCCESS);
  EXPECT_STREQ(a.buf + 100, "read-only but readable remotely");
  mr.reset();
  ::munmap(page, 4096);
}

// A buffer unmapped before its deregistration: the deregistration leaves
// whatever the application mapped there since untouched — here a shared
// file mapping, which must still reach its file afterwards.
TEST_F(DataPath, FreeBeforeDeregTouchesNothing) {
  Endpoint b(xen_.as(6));
  constexpr std::size_t kBytes = 2 * 4096;
  void* first = ::mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(first, MAP_FAILED);
  std::memset(first, 0x11, kBytes);
  auto mr = b.pd->reg_mr(static_cast<char*>(first) + 100, kBytes - 200, kAccess);
  ASSERT_EQ(::munmap(first, kBytes), 0);
  const int file = ::memfd_create("free-before-dereg", MFD_CLOEXEC);
  ASSERT_GE(file, 0);
  ASSERT_EQ(::ftruncate(file, kBytes), 0);
  void* second = ::mmap(first, kBytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED_NOREPLACE, file, 0);
  ASSERT_EQ(second, first) << "the address was taken meanwhile";
  auto* bytes = static_cast<unsigned char*>(second);
  for (std::size_t i = 0; i < kBytes; ++i) bytes[i] = static_cast<unsigned char>(i * 13 + 1);
  mr.reset();
  std::size_t changed = 0;
  for (std::size_t i = 0; i < kBytes; ++i)
    if (bytes[i] != static_cast<unsigned char>(i * 13 + 1)) ++changed;
  EXPECT_EQ(changed, 0u) << "bytes of the new mapping changed by deregistering the old one";
  std::memcpy(bytes + 5000, "still the file's", 16);
  char back[16] = {};
  ASSERT_EQ(::pread(file, back, sizeof(back), 5000), 16);
  EXPECT_EQ(std::string(back, 16), "still the file's") << "the new mapping no longer reaches its file";
  ::munmap(second, kBytes);
  ::close(file);
}

// fork() after registration: the child gets its own copy of the registered
// pages (what it writes stays its own), and the parent's registration keeps
// working. rdma-core on this kernel behaves so without ibv_fork_init.
TEST_F(DataPath, AForkedChildWritesItsOwnCopyOfRegisteredPages) {
  Endpoint a(xen_.as(5)), b(xen_.as(6));
  a.connect(b);
  b.connect(a);
  std::strcpy(b.buf + 1000, "parent's");
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    std::strcpy(b.buf + 1000, "child's!");
    std::_Exit(std::strcmp(b.buf + 1000, "child's!") == 0 ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  EXPECT_STREQ(b.buf + 1000, "parent's");
  EXPECT_TRUE(lands(a, b.buf + 1000, b.mr->rkey(), 'p'));
}

// Transparent huge pages under a registration: reached like any page.
TEST_F(DataPath, TransparentHugePagesRegister) {
  Endpoint a(xen_.as(5)), b(xen_.as(6));
  a.connect(b);
  b.connect(a);
  constexpr std::size_t kHuge = 2u << 20;
  void* mapped = ::mmap(nullptr, 2 * kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(mapped, MAP_FAILED);
  auto* huge = reinterpret_cast<char*>((reinterpret_cast<std::uintptr_t>(mapped) + kHuge - 1) & ~(kHuge - 1));
  ::madvise(huge, kHuge, MADV_HUGEPAGE);  // a hint: the test holds whether or not the kernel follows it
  std::memset(huge, 0x5a, kHuge);
  auto mr = b.pd->reg_mr(huge, kHuge, kAccess);
  for (std::size_t at : {std::size_t{0}, std::size_t{4096 * 37 + 5}, kHuge / 2 + 1, kHuge - 16})
    EXPECT_TRUE(lands(a, huge + at, mr->rkey(), static_cast<char>('A' + at % 23))) << "at offset " << at;
  EXPECT_EQ(static_cast<unsigned char>(huge[20]), 0x5a);
  mr.reset();
  ::munmap(mapped, 2 * kHuge);
}

// The kernel's pool of 2 MiB huge pages holds at least `pages` free ones
// while this lives: as root it grows the pool for the test and shrinks it
// back after; otherwise it uses what the administrator reserved.
class HugePageReservation {
 public:
  explicit HugePageReservation(long pages) {
    const long free_now = read_count(kFree);
    if (free_now >= pages) {
      ok_ = true;
      return;
    }
    old_total_ = read_count(kTotal);
    if (old_total_ < 0 || !write_count(old_total_ + pages - std::max(free_now, 0L))) return;
    grown_ = true;
    ok_ = read_count(kFree) >= pages;
  }
  ~HugePageReservation() {
    if (grown_) write_count(old_total_);
  }
  bool ok() const { return ok_; }

 private:
  static constexpr const char* kTotal = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";
  static constexpr const char* kFree = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";
  static long read_count(const char* path) {
    std::ifstream in(path);
    long n = -1;
    in >> n;
    return in ? n : -1;
  }
  static bool write_count(long n) {
    std::ofstream out(kTotal);
    out << n;
    out.flush();
    return static_cast<bool>(out);
  }
  long old_total_ = -1;
  bool grown_ = false, ok_ = false;
};

// hugetlbfs pages (MAP_HUGETLB), as MPI and DPDK-style programs allocate
// their buffers: registered whole and in part, reached at offsets spread
// over the huge page's 4 KiB frames.
TEST_F(DataPath, HugetlbPagesRegister) {
  constexpr std::size_t kHuge = 2u << 20;
  HugePageReservation reservation(1);
  if (!reservation.ok())
    GTEST_SKIP() << "no free 2 MiB huge page and not allowed to reserve one (run as root, or "
                    "echo 1 > /proc/sys/vm/nr_hugepages)";
  void* mapped = ::mmap(nullptr, kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
  ASSERT_NE(mapped, MAP_FAILED) << std::strerror(errno);
  auto* huge = static_cast<char*>(mapped);
  std::memset(huge, 0x5a, kHuge);
  Endpoint a(xen_.as(5)), b(xen_.as(6));
  a.connect(b);
  b.connect(a);
  {
    auto whole = b.pd->reg_mr(huge, kHuge, kAccess);
    auto part = b.pd->reg_mr(huge + 4096 * 100 + 7, 3 * 4096, kAccess);
    for (std::size_t at = 3; at < kHuge; at += 4096 * 29 + 1)
      EXPECT_TRUE(lands(a, huge + at, whole->rkey(), static_cast<char>('A' + at % 23))) << "at offset " << at;
    EXPECT_TRUE(lands(a, huge + 4096 * 101, part->rkey(), 'p'));
    EXPECT_FALSE(lands(a, huge + 4096 * 104 + 16, part->rkey(), 'q')) << "beyond the partial registration";
  }
  EXPECT_EQ(static_cast<unsigned char>(huge[1]), 0x5a);
  EXPECT_EQ(static_cast<unsigned char>(huge[kHuge - 1]), 0x5a);
  ::munmap(mapped, kHuge);
}

// Issue 13: malloc's metadata shares pages with the buffers programs
// register, and other threads allocate all the time (perftest's processes
// died with "malloc(): corrupted top size" while vib copied and remapped).
// Four threads allocate, fill, check and free blocks while this thread
// registers and deregisters malloc'd buffers of many sizes; every block
// must hold its bytes (under ASan in CI, any heap damage stops the test).
TEST_F(DataPath, MallocdBuffersRegisterWhileOtherThreadsAllocate) {
  // One arena for every thread, so that their blocks and the registered
  // buffers share pages (glibc would otherwise give each thread its own).
  ::mallopt(M_ARENA_MAX, 1);
  Endpoint a(xen_.as(5)), b(xen_.as(6));
  a.connect(b);
  b.connect(a);
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> damaged{0}, checked{0};
  std::vector<std::thread> allocators;
  for (int t = 0; t < 4; ++t) {
    allocators.emplace_back([&, t] {
      std::vector<std::pair<unsigned char*, std::size_t>> live;
      std::uint32_t seed = 0x9e3779b9u * (t + 1);
      while (!stop.load(std::memory_order_relaxed)) {
        seed = seed * 1664525u + 1013904223u;
        if (live.size() < 64 && (seed >> 28) < 10) {
          const std::size_t size = 16 + (seed >> 8) % 6000;
          auto* block = static_cast<unsigned char*>(std::malloc(size));
          if (!block) continue;
          std::memset(block, static_cast<int>(size & 0xff), size);
          live.emplace_back(block, size);
        } else if (!live.empty()) {
          const std::size_t i = (seed >> 4) % live.size();
          auto [block, size] = live[i];
          for (std::size_t k = 0; k < size; ++k)
            if (block[k] != static_cast<unsigned char>(size & 0xff)) {
              damaged.fetch_add(1);
              break;
            }
          checked.fetch_add(1, std::memory_order_relaxed);
          std::free(block);
          live[i] = live.back();
          live.pop_back();
        }
      }
      for (auto [block, size] : live) std::free(block);
    });
  }
  constexpr int kCycles = 300;
  int registered = 0;
  for (int i = 0; i < kCycles; ++i) {
    const std::size_t size = 64 + (static_cast<std::size_t>(i) * 977) % 20000;
    std::unique_ptr<char, decltype(&std::free)> buffer(static_cast<char*>(std::malloc(size)), &std::free);
    ASSERT_TRUE(buffer);
    std::memset(buffer.get(), 'm', size);
    try {
      auto mr = b.pd->reg_mr(buffer.get(), size, kAccess);
      ++registered;
      if (i % 25 == 0) {
        EXPECT_TRUE(lands(a, buffer.get() + size - 16, mr->rkey(), static_cast<char>('a' + i % 20)))
            << "cycle " << i;
      }
    } catch (const std::system_error& e) {
      ADD_FAILURE() << "registration " << i << ": " << e.what();
      break;
    }
  }
  stop = true;
  for (auto& t : allocators) t.join();
  EXPECT_EQ(registered, kCycles);
  EXPECT_EQ(damaged.load(), 0u) << "heap blocks of other threads changed while buffers were registered";
  EXPECT_GT(checked.load(), 0u) << "the allocating threads never ran";
}

// Issue 11: a device's `pkeys` list confines its guest, through vibd as on
// the soft HCA itself. Guests in partitions 0x8001 and 0x8002 of one HCA
// cannot reach each other (RC retries out, nothing lands), two in 0x8001
// can, and a P_Key index beyond the guest's own list is EPERM.
TEST_F(DataPath, GuestsInDifferentPartitionsCannotReachEachOther) {
  const std::pair<vib::platform::DomId, const char*> devices[] = {{7, "0x8001"}, {8, "0x8002"}, {9, "0x8001"}};
  for (auto [domid, pkeys] : devices) {
    xen_.create_domain(domid);
    vib::platform::with_transaction(*store_, [&](vib::platform::TransactionId tx) {
      provision_in(tx, domid, "soft");
      store_->write(tx, be(domid) + "/" VIBIF_XS_PKEYS, pkeys);
    });
  }
  for (auto [domid, pkeys] : devices) ASSERT_TRUE(eventually(be(domid) + "/state", "2")) << "domain " << domid;

  Endpoint in_8001(xen_.as(7)), in_8002(xen_.as(8));
  in_8001.connect(in_8002);
  in_8002.connect(in_8001);
  std::memset(in_8002.buf, 0x11, 64);
  std::memset(in_8001.buf + 64, 0x22, 64);
  EXPECT_EQ(in_8001.rdma(IBV_WR_RDMA_WRITE, 64, 64, reinterpret_cast<std::uintptr_t>(in_8002.buf), in_8002.mr->rkey()),
            IBV_WC_RETRY_EXC_ERR);
  EXPECT_EQ(static_cast<unsigned char>(in_8002.buf[0]), 0x11) << "a write crossed partitions";
  EXPECT_EQ(static_cast<unsigned char>(in_8002.buf[63]), 0x11) << "a write crossed partitions";

  Endpoint left(xen_.as(7)), right(xen_.as(9));
  left.connect(right);
  right.connect(left);
  EXPECT_TRUE(lands(left, right.buf + 8, right.mr->rkey(), 'k')) << "same partition, other guest";

  vib::front::QpInit init;
  init.send_cq = init.recv_cq = left.cq.get();
  init.cap = ibv_qp_cap{4, 4, 1, 1, 0};
  auto qp = left.pd->create_qp(init);
  auto steps = vib::test::rc_connect_steps(right.lid, right.qp->qp_num(), kAccess);
  steps[0].attr.pkey_index = 1;  // the guest's list has one entry
  EXPECT_EQ(qp->modify(steps[0].attr, steps[0].mask), EPERM);
}

// Processes of one guest that open the device at the same moment each get
// a context of their own, also when the ids their pids suggest are taken
// (stale nodes here, other processes' contexts in life) and they all move
// on to the same free one, as processes reopening after a back-end restart
// do: looking for a free id and claiming it is one transaction.
TEST_F(DataPath, ProcessesOpeningAtOnceGetContextsOfTheirOwn) {
  constexpr int kProcesses = 6;
  int go[2], ids[2], release[2];
  ASSERT_EQ(::pipe(go), 0);
  ASSERT_EQ(::pipe(ids), 0);
  ASSERT_EQ(::pipe(release), 0);
  std::vector<pid_t> children;
  for (int i = 0; i < kProcesses; ++i) {
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      char byte;
      if (::read(go[0], &byte, 1) != 1) std::_Exit(2);
      // Held until the parent has every id: a context closed earlier would
      // free its id for the next process.
      std::unique_ptr<Device> device;
      std::unique_ptr<vib::front::Pd> pd;
      std::uint32_t id = 0;
      try {
        vib::front::ChannelOptions options;
        options.xen = xen_.as(5);
        device = Device::open(options);
        pd = device->alloc_pd();  // the context is served, not merely named
        id = device->channel().context_id();
      } catch (const std::exception&) {
        std::_Exit(3);
      }
      if (::write(ids[1], &id, sizeof id) != sizeof id) std::_Exit(4);
      if (::read(release[0], &byte, 1) != 1) std::_Exit(5);
      std::_Exit(0);
    }
    children.push_back(pid);
  }
  // Every id from the lowest child's pid to the highest looks taken: all
  // of them go looking for the same next one.
  std::vector<unsigned> first;
  for (pid_t pid : children) first.push_back(static_cast<unsigned>(pid) % VIBIF_MAX_CTXID);
  const auto [low, high] = std::minmax_element(first.begin(), first.end());
  auto guest = vib::platform::open_xenstore(xen_.as(5));
  for (unsigned id = *low; id <= *high && *high - *low < 256; ++id)
    guest->write(vib::platform::kNoTransaction, fe(5) + "/ctx/" + std::to_string(id) + "/state", "6");
  const std::string all_go(kProcesses, 'g');
  ASSERT_EQ(::write(go[1], all_go.data(), all_go.size()), static_cast<ssize_t>(all_go.size()));
  std::set<std::uint32_t> got;
  for (int i = 0; i < kProcesses; ++i) {
    pollfd p{ids[0], POLLIN, 0};
    if (::poll(&p, 1, 20000) != 1) break;
    std::uint32_t id = 0;
    if (::read(ids[0], &id, sizeof id) != sizeof id) break;
    got.insert(id);
  }
  ASSERT_EQ(::write(release[1], all_go.data(), all_go.size()), static_cast<ssize_t>(all_go.size()));
  for (pid_t pid : children) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child " << pid << " status " << status;
  }
  EXPECT_EQ(got.size(), static_cast<std::size_t>(kProcesses)) << "each process its own context";
  for (int fd : {go[0], go[1], ids[0], ids[1], release[0], release[1]}) ::close(fd);
}

// vib-devinfo's output for domain `domid` of the host-local Xen in `dir`.
std::string run_devinfo(const std::string& dir, int domid) {
  const std::string cmd = std::string(VIB_DEVINFO) + " --local-xen " + dir + " --domid " + std::to_string(domid);
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(::popen(cmd.c_str(), "r"), ::pclose);
  std::string out;
  if (!pipe) return out;
  char chunk[512];
  for (std::size_t n; (n = std::fread(chunk, 1, sizeof chunk, pipe.get())) > 0;) out.append(chunk, n);
  return out;
}

// Every page of a registration is one grant of the guest's table, which
// holds max_grant_frames * 512: beyond it the registration fails with
// ENOSPC, naming the need, the table and the setting that raises it, and
// leaves nothing granted; a domain created with a larger table registers
// the same.
TEST_F(DataPath, ARegistrationBeyondTheGrantTableFailsNamingMaxGrantFrames) {
  xen_.create_domain(7, /*max_grant_frames=*/4);   // 2048 grants: 8 MiB
  xen_.create_domain(8, /*max_grant_frames=*/16);  // 8192 grants: 32 MiB
  provision(7);
  provision(8);
  ASSERT_TRUE(eventually(be(7) + "/state", "2"));
  ASSERT_TRUE(eventually(be(8) + "/state", "2"));
  constexpr std::size_t kBytes = 16u << 20;  // 4096 pages
  std::vector<char> buffer(kBytes + 4096);
  char* start = reinterpret_cast<char*>((reinterpret_cast<std::uintptr_t>(buffer.data()) + 4095) & ~std::uintptr_t{4095});

  Endpoint small(xen_.as(7));
  try {
    small.pd->reg_mr(start, kBytes, kAccess);
    ADD_FAILURE() << "16 MiB registered in a grant table of 2048 entries";
  } catch (const std::system_error& e) {
    EXPECT_EQ(e.code().value(), ENOSPC) << e.what();
    const std::string what = e.what();
    EXPECT_NE(what.find("needs 4096 grants"), std::string::npos) << what;
    EXPECT_NE(what.find("it holds 2048, max_grant_frames=4"), std::string::npos) << what;
    EXPECT_NE(what.find("raise max_grant_frames in the domain's xl config"), std::string::npos) << what;
  }
  // The grants the failed registration took on the way (all but the last
  // few hundred of the table) are back: 1500 pages fit again.
  auto fits = small.pd->reg_mr(start, 1500 * 4096, kAccess);
  // vib-devinfo shows the table and its use: these 1500 and the contexts'
  // (each context's connection keeps up to 64 entries reserved for its next
  // grants, vib-devinfo's too).
  const std::string devinfo = run_devinfo(xen_.dir(), 7);
  const std::string table = "grant table:   2048 entries (max_grant_frames=4), ";
  const auto at = devinfo.find(table);
  ASSERT_NE(at, std::string::npos) << devinfo;
  const long held = std::atol(devinfo.c_str() + at + table.size());
  EXPECT_GE(held, 1500) << devinfo;
  EXPECT_LT(held, 1700) << devinfo;
  fits.reset();

  Endpoint large(xen_.as(8));
  Endpoint peer(xen_.as(5));
  large.connect(peer);
  peer.connect(large);
  auto mr = large.pd->reg_mr(start, kBytes, kAccess);
  EXPECT_TRUE(lands(peer, start + kBytes - 100, mr->rkey(), 'z'));
}

TEST_F(DataPath, ImmediatesGatherListsAndCompareAndSwap) {
  Endpoint a(xen_.as(5)), b(xen_.as(6));
  a.connect(b);
  b.connect(a);

  // SEND with immediate, gathered from two pieces (the QP's max_send_sge;
  // a third is EINVAL), scattered into two.
  std::strcpy(a.buf + 10, "gathe");
  std::strcpy(a.buf + 100, "red send");
  ibv_sge gather[3] = {{reinterpret_cast<std::uintptr_t>(a.buf + 10), 5, a.mr->lkey()},
                       {reinterpret_cast<std::uintptr_t>(a.buf + 100), 8, a.mr->lkey()},
                       {reinterpret_cast<std::uintptr_t>(a.buf + 300), 1, a.mr->lkey()}};
  ibv_sge scatter[2] = {{reinterpret_cast<std::uintptr_t>(b.buf + 1000), 6, b.mr->lkey()},
                        {reinterpret_cast<std::uintptr_t>(b.buf + 2000), 64, b.mr->lkey()}};
  ibv_recv_wr rwr{};
  rwr.wr_id = 11;
  rwr.sg_list = scatter;
  rwr.num_sge = 2;
  ibv_recv_wr* bad_recv = nullptr;
  ASSERT_EQ(b.qp->post_recv(&rwr, &bad_recv), 0);
  ibv_send_wr swr{};
  swr.wr_id = 21;
  swr.sg_list = gather;
  swr.num_sge = 3;
  swr.opcode = IBV_WR_SEND_WITH_IMM;
  swr.send_flags = IBV_SEND_SIGNALED;
  swr.imm_data = htonl(0xfeedbeef);
  ibv_send_wr* bad_send = nullptr;
  EXPECT_EQ(a.qp->post_send(&swr, &bad_send), EINVAL);
  EXPECT_EQ(bad_send, &swr);
  swr.num_sge = 2;
  ASSERT_EQ(a.qp->post_send(&swr, &bad_send), 0);
  EXPECT_EQ(a.wait_completion().status, IBV_WC_SUCCESS);
  ibv_wc wc = b.wait_completion();
  EXPECT_EQ(wc.status, IBV_WC_SUCCESS);
  EXPECT_EQ(wc.opcode, IBV_WC_RECV);
  EXPECT_EQ(wc.wr_id, 11u);
  EXPECT_EQ(wc.byte_len, 13u);
  EXPECT_TRUE(wc.wc_flags & IBV_WC_WITH_IMM);
  EXPECT_EQ(ntohl(wc.imm_data), 0xfeedbeefu);
  EXPECT_EQ(std::string(b.buf + 1000, 6), "gather");
  EXPECT_EQ(std::string(b.buf + 2000, 8), "ed send"s + '\0');

  // RDMA WRITE with immediate: the data lands and a receive is consumed.
  ASSERT_EQ(b.post_recv(12, 3000, 16), 0);
  std::strcpy(a.buf + 400, "with imm");
  swr = ibv_send_wr{};
  ibv_sge one{reinterpret_cast<std::uintptr_t>(a.buf + 400), 9, a.mr->lkey()};
  swr.wr_id = 22;
  swr.sg_list = &one;
  swr.num_sge = 1;
  swr.opcode = IBV_WR_RDMA_WRITE_WITH_IMM;
  swr.send_flags = IBV_SEND_SIGNALED;
  swr.imm_data = htonl(42);
  swr.wr.rdma.remote_addr = reinterpret_cast<std::uintptr_t>(b.buf + 5000);
  swr.wr.rdma.rkey = b.mr->rkey();
  ASSERT_EQ(a.qp->post_send(&swr, &bad_send), 0);
  EXPECT_EQ(a.wait_completion().status, IBV_WC_SUCCESS);
  wc = b.wait_completion();
  EXPECT_EQ(wc.status, IBV_WC_SUCCESS);
  EXPECT_EQ(wc.opcode, IBV_WC_RECV_RDMA_WITH_IMM);
  EXPECT_EQ(wc.wr_id, 12u);
  EXPECT_EQ(ntohl(wc.imm_data), 42u);
  EXPECT_STREQ(b.buf + 5000, "with imm");

  // Compare-and-swap: swaps when equal, and returns the old value either way.
  const std::size_t word = 7000 - (reinterpret_cast<std::uintptr_t>(b.buf + 7000) % 8);
  const std::size_t result = 600 - (reinterpret_cast<std::uintptr_t>(a.buf + 600) % 8);
  std::uint64_t value = 7;
  std::memcpy(b.buf + word, &value, 8);
  auto cas = [&](std::uint64_t compare, std::uint64_t swap_in) {
    ibv_sge out{reinterpret_cast<std::uintptr_t>(a.buf + result), 8, a.mr->lkey()};
    ibv_send_wr w{};
    w.wr_id = 23;
    w.sg_list = &out;
    w.num_sge = 1;
    w.opcode = IBV_WR_ATOMIC_CMP_AND_SWP;
    w.send_flags = IBV_SEND_SIGNALED;
    w.wr.atomic.remote_addr = reinterpret_cast<std::uintptr_t>(b.buf + word);
    w.wr.atomic.rkey = b.mr->rkey();
    w.wr.atomic.compare_add = compare;
    w.wr.atomic.swap = swap_in;
    ibv_send_wr* bad = nullptr;
    EXPECT_EQ(a.qp->post_send(&w, &bad), 0);
    const ibv_wc done = a.wait_completion();
    EXPECT_EQ(done.status, IBV_WC_SUCCESS);
    EXPECT_EQ(done.opcode, IBV_WC_COMP_SWAP);
    std::uint64_t old = 0, now = 0;
    std::memcpy(&old, a.buf + result, 8);
    std::memcpy(&now, b.buf + word, 8);
    return std::pair(old, now);
  };
  using Words = std::pair<std::uint64_t, std::uint64_t>;  // (returned old value, value now)
  EXPECT_EQ(cas(7, 99), (Words{7, 99}));
  EXPECT_EQ(cas(7, 123), (Words{99, 99})) << "no swap when different";
}

TEST_F(DataPath, QueueFullIsAnErrorAndNothingIsOverwritten) {
  Endpoint a(xen_.as(5)), b(xen_.as(6));
  a.connect(b);
  b.connect(a);
  // 16 receive slots: the 17th post is refused, like hardware's ENOMEM.
  // vibd moves posted receives on to the HCA as soon as it sees them, which
  // frees their slots; held still (SIGSTOP) it cannot, so the ring's own
  // limit is what this sees.
  {
    ::kill(pid_, SIGSTOP);
    struct Resume {
      pid_t pid;
      ~Resume() { ::kill(pid, SIGCONT); }
    } resume{pid_};
    ASSERT_TRUE(wait_until_stopped(pid_)) << "vibd did not stop";
    for (int i = 0; i < 16; ++i)
      ASSERT_EQ(b.post_recv(static_cast<std::uint64_t>(i), 64 * static_cast<unsigned>(i), 64), 0);
    EXPECT_EQ(b.post_recv(99, 0, 64), ENOMEM);
  }
  // The CQ has 16 entries; 16 sends fill b's CQ, and they all arrive intact.
  for (int i = 0; i < 16; ++i) {
    ASSERT_EQ(a.post(IBV_WR_SEND, 100 + static_cast<unsigned>(i), 0, 4), 0);
    EXPECT_EQ(a.wait_completion().status, IBV_WC_SUCCESS);
  }
  for (int i = 0; i < 16; ++i) {
    const ibv_wc wc = b.wait_completion();
    EXPECT_EQ(wc.wr_id, static_cast<std::uint64_t>(i)) << "completions in order, none lost";
  }
}

// max_recv_wr / max_send_wr bound what the application has outstanding, as
// on an HCA: a slot is free when its completion is polled, not when vibd
// has handed the WQE on to the HCA (before, a guest could have about twice
// max_recv_wr receives outstanding).
TEST_F(DataPath, QueueSlotsAreFreedWhenTheirCompletionsArePolled) {
  Endpoint a(xen_.as(5)), b(xen_.as(6));
  a.connect(b);
  b.connect(a);
  for (int i = 0; i < 16; ++i)
    ASSERT_EQ(b.post_recv(static_cast<std::uint64_t>(i), 64 * static_cast<unsigned>(i), 64), 0);
  // The send's success proves vibd handed all 16 receives to the HCA (it
  // takes a queue's posted WQEs in one pass).
  ASSERT_EQ(a.post(IBV_WR_SEND, 100, 0, 4), 0);
  ASSERT_EQ(a.wait_completion().status, IBV_WC_SUCCESS);
  EXPECT_EQ(b.post_recv(16, 0, 64), ENOMEM) << "15 receives wait, one completion is not polled";
  EXPECT_EQ(b.wait_completion().wr_id, 0u);
  EXPECT_EQ(b.post_recv(16, 0, 64), 0) << "polling the completion freed its slot";
  EXPECT_EQ(b.post_recv(17, 0, 64), ENOMEM);

  // Unsignaled sends keep their slots until a later signaled completion of
  // the same queue is polled.
  for (unsigned i = 0; i < 16; ++i) {
    a.buf[512 + i] = static_cast<char>('A' + i);
    ASSERT_EQ(a.post(IBV_WR_RDMA_WRITE, 200 + i, 512 + i, 1, &b, 2048 + i, i == 15 ? IBV_SEND_SIGNALED : 0), 0);
  }
  volatile const char* last = b.buf + 2048 + 15;
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (*last != 'P' && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  ASSERT_EQ(*last, 'P') << "the 16th write landed: vibd consumed every send WQE";
  EXPECT_EQ(a.post(IBV_WR_RDMA_WRITE, 300, 0, 1, &b, 4000, 0), ENOMEM);
  EXPECT_EQ(a.wait_completion().wr_id, 215u);
  for (unsigned i = 0; i < 16; ++i)
    EXPECT_EQ(a.post(IBV_WR_RDMA_WRITE, 300 + i, 0, 1, &b, 4000, 0), 0) << "one completion retired all 16";

  // Flushed completions retire their slots too, once polled.
  ibv_qp_attr error{};
  error.qp_state = IBV_QPS_ERR;
  ASSERT_EQ(b.qp->modify(error, IBV_QP_STATE), 0);
  EXPECT_EQ(b.post_recv(18, 0, 64), ENOMEM) << "flushed, but not polled yet";
  for (int i = 0; i < 16; ++i) EXPECT_EQ(b.wait_completion().status, IBV_WC_WR_FLUSH_ERR);
  EXPECT_EQ(b.post_recv(18, 0, 64), 0);
}

TEST_F(DataPath, AGuestCannotUseAnotherGuestsKeysOrHandles) {
  Endpoint a(xen_.as(5)), b(xen_.as(6));
  a.connect(b);
  b.connect(a);
  // b names a's lkey in its own send: a's MR is in another PD, so the HCA
  // refuses it (a local protection error), and b's QP alone goes to error.
  ibv_sge sge{reinterpret_cast<std::uintptr_t>(a.buf), 8, a.mr->lkey()};
  ibv_send_wr wr{};
  wr.wr_id = 1;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = IBV_WR_SEND;
  wr.send_flags = IBV_SEND_SIGNALED;
  ibv_send_wr* bad = nullptr;
  ASSERT_EQ(b.qp->post_send(&wr, &bad), 0);
  const ibv_wc wc = b.wait_completion();
  EXPECT_NE(wc.status, IBV_WC_SUCCESS);

  // a's handles mean nothing in b's context.
  auto req = request(VIBIF_OP_DESTROY_QP);
  req.u.handle.handle = 1u << 16;  // the first handle of a context
  const auto rsp = b.device->channel().call(req);
  EXPECT_TRUE(rsp.hdr.status == VIBIF_ENOENT || rsp.hdr.status == VIBIF_OK);
  ibv_qp_attr attr;
  ibv_qp_init_attr init;
  ASSERT_EQ(a.qp->query(attr, 0, init), 0);
  EXPECT_EQ(attr.qp_state, IBV_QPS_RTS) << "a's QP is untouched";
}

TEST_F(DataPath, GarbageInAQueueBreaksOnlyThatQp) {
  Endpoint a(xen_.as(5)), b(xen_.as(6));
  a.connect(b);
  b.connect(a);
  // Another pair of the same guests keeps working while one is broken.
  Endpoint c(xen_.as(5)), d(xen_.as(6));
  c.connect(d);
  d.connect(c);
  // a's guest overruns its send queue's producer index by far.
  auto& db = a.device->channel().doorbell();
  for (auto& slot : db.slots) slot.producer += 1000;
  ibv_qp_attr attr;
  ibv_qp_init_attr init;
  bool broken = false;
  for (int i = 0; i < 500 && !broken; ++i) {
    ASSERT_EQ(a.qp->query(attr, 0, init), 0);
    broken = attr.qp_state == IBV_QPS_ERR;
    if (!broken) std::this_thread::sleep_for(10ms);
  }
  EXPECT_TRUE(broken) << "the overrun QP is in the error state";
  ASSERT_EQ(d.post_recv(1, 0, 64), 0);
  ASSERT_EQ(c.post(IBV_WR_SEND, 2, 0, 4), 0);
  EXPECT_EQ(c.wait_completion().status, IBV_WC_SUCCESS);
  EXPECT_EQ(d.wait_completion().status, IBV_WC_SUCCESS);
}

TEST_F(DataPath, ACallToABackEndThatClosedTheContextFailsWithoutWaitingOutTheTimeout) {
  Endpoint a(xen_.as(5), 60s);
  // vibd frozen mid-way through closing the context: its node is gone (the
  // test removes it for it), and no response will ever come.
  ASSERT_EQ(::kill(pid_, SIGSTOP), 0);
  // kill() returns before vibd has stopped: until it has, it could still
  // answer the call below.
  int stop_status = 0;
  ASSERT_EQ(::waitpid(pid_, &stop_status, WUNTRACED), pid_);
  ASSERT_TRUE(WIFSTOPPED(stop_status));
  const auto contexts = store_->directory(vib::platform::kNoTransaction, be(5) + "/ctx").value_or(std::vector<std::string>{});
  ASSERT_EQ(contexts.size(), 1u);
  store_->remove(vib::platform::kNoTransaction, be(5) + "/ctx/" + contexts[0]);
  int code = 0;
  try {
    a.device->alloc_pd();
  } catch (const std::system_error& e) {
    code = e.code().value();
  }
  ::kill(pid_, SIGCONT);
  EXPECT_EQ(code, ENODEV) << "0: vibd answered; ETIMEDOUT: the 60 s timeout ran out instead";
}

TEST_F(DataPath, ARequestRightAfterOneServedOnTheControlPoolIsAnswered) {
  // QP creation and destruction go to the control pool, QUERY_PORT is
  // served by the worker: each round hands the context over and back while
  // the guest's next request arrives. A request whose kick the worker took
  // while the pool still held the context, and that nobody looked at
  // afterwards, would time out here (the call's 5 s) instead of answering.
  vib::front::ChannelOptions options;
  options.xen = xen_.as(5);
  auto device = Device::open(options);
  auto pd = device->alloc_pd();
  auto cq = device->create_cq(16);
  vib::front::QpInit init;
  init.send_cq = init.recv_cq = cq.get();
  init.cap = ibv_qp_cap{4, 4, 1, 1, 0};
  ibv_port_attr port{};
  for (int round = 0; round < 1500; ++round) {
    auto qp = pd->create_qp(init);
    ASSERT_NO_THROW(device->query_port(1, port)) << "round " << round;
    qp.reset();
    ASSERT_NO_THROW(device->query_port(1, port)) << "round " << round;
  }
}

TEST_F(DataPath, AContextCrashAndADomainDeathFreeEverything) {
  // A guest process with a connected QP pair, killed without any cleanup.
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t child = ::fork();
  if (child == 0) {
    ::close(ready[0]);
    Endpoint a(xen_.as(5)), b(xen_.as(5));
    a.connect(b);
    b.connect(a);
    [[maybe_unused]] auto n = ::write(ready[1], "r", 1);
    ::pause();
    std::_Exit(0);
  }
  ::close(ready[1]);
  char byte = 0;
  ASSERT_EQ(::read(ready[0], &byte, 1), 1) << "the guest process failed to set up";
  ::close(ready[0]);
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  EXPECT_TRUE(log_eventually_has("freed: 1 QPs, 1 CQs, 0 SRQs, 1 MRs, 0 AHs, 1 PDs")) << vibd_log();
  bool removed = false;
  for (int i = 0; i < 500 && !removed; ++i) {
    removed = store_->directory(vib::platform::kNoTransaction, be(5) + "/ctx").value_or(std::vector<std::string>{}).empty();
    if (!removed) std::this_thread::sleep_for(10ms);
  }
  EXPECT_TRUE(removed) << "the back-end removed both contexts' nodes";

  // A domain that dies with its objects: everything goes at once.
  try {
    Endpoint c(xen_.as(6)), d(xen_.as(6));
    c.connect(d);
    d.connect(c);
    xen_.destroy_domain(6);
    // vibd learns it from @releaseDomain or from the guest's vanished
    // nodes, whichever it sees first; either way everything goes.
    const std::string freed = "freed: 1 QPs, 1 CQs, 0 SRQs, 1 MRs, 0 AHs, 1 PDs";
    auto count = [&] {
      const std::string log = vibd_log();
      std::size_t n = 0;
      for (std::size_t at = 0; (at = log.find(freed, at)) != std::string::npos; ++at) ++n;
      return n;
    };
    for (int i = 0; i < 500 && count() < 4; ++i) std::this_thread::sleep_for(10ms);
    EXPECT_EQ(count(), 4u) << "two contexts of the crashed process, two of the dead domain\n" << vibd_log();
  } catch (const std::system_error& e) {
    ADD_FAILURE() << e.what() << "\nvibd log:\n" << vibd_log();
  }
}

}  // namespace
