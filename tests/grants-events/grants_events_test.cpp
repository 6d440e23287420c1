// Grants and event channels on the host-local Xen, with domains acting from
// separate connections (and separate processes where a crash is the point).
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <future>
#include <string>

#include "local_xen.hpp"
#include "wire.hpp"
#include "vib/platform/event_channels.hpp"
#include "vib/platform/grants.hpp"

using namespace vib::platform;

namespace {

class Grants : public ::testing::Test {
 protected:
  void SetUp() override {
    xen_.create_domain(5);
    xen_.create_domain(6);
  }
  vib::test::LocalXen xen_;
};

int error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::system_error& e) {
    return e.code().value();
  }
  return 0;
}

bool wait_readable(int fd, int timeout_ms = 2000) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, timeout_ms) == 1;
}

// The service notices a hang-up asynchronously, and a port has no fd that
// signals its peer's closing, so this polls, bounded.
bool eventually_peer_closed(EventChannels& ev, EventPort port) {
  for (int i = 0; i < 200; ++i) {
    if (ev.peer_closed(port).value_or(false)) return true;
    ::usleep(10000);
  }
  return false;
}

// SIGSTOP takes effect when the process next runs: until /proc says so.
bool stopped(pid_t pid) {
  for (int i = 0; i < 2000; ++i) {
    std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
    std::string line;
    std::getline(stat, line);
    const auto state = line.rfind(')');  // the command may hold spaces and parentheses
    if (state != std::string::npos && line.size() > state + 2 && line[state + 2] == 'T') return true;
    ::usleep(1000);
  }
  return false;
}

// Until thread `tid` of this process waits in recvmsg (for an answer of
// the stopped hypervisor); false after two seconds, with what it was doing.
bool waits_in_recvmsg(const std::atomic<pid_t>& tid, std::string& last) {
  for (int i = 0; i < 2000; ++i) {
    if (const pid_t t = tid.load()) {
      std::ifstream syscall("/proc/self/task/" + std::to_string(t) + "/syscall");
      std::getline(syscall, last);
      if (std::atol(last.c_str()) == SYS_recvmsg && last.find(' ') != std::string::npos) return true;
    }
    ::usleep(1000);
  }
  return false;
}

std::optional<EventPort> wait_event(EventChannels& ev, int timeout_ms = 2000) {
  if (auto p = ev.pending()) return p;
  if (!wait_readable(ev.fd(), timeout_ms)) return std::nullopt;
  return ev.pending();
}

}  // namespace

TEST_F(Grants, SharedPagesAreVisibleBothWays) {
  auto sharer = open_grant_sharer(xen_.as(5));
  auto share = sharer->share(0, 3, /*writable=*/true);
  ASSERT_EQ(share->refs().size(), 3u);
  ASSERT_EQ(share->bytes().size(), 3 * kPageSize);
  std::memcpy(share->bytes().data() + 2 * kPageSize, "from guest", 11);

  auto mapper = open_grant_mapper(xen_.as(0));
  auto mapping = mapper->map(5, share->refs(), /*writable=*/true);
  ASSERT_EQ(mapping->bytes().size(), 3 * kPageSize);
  EXPECT_STREQ(reinterpret_cast<const char*>(mapping->bytes().data() + 2 * kPageSize), "from guest");
  std::memcpy(mapping->bytes().data(), "from dom0", 10);
  EXPECT_STREQ(reinterpret_cast<const char*>(share->bytes().data()), "from dom0");
}

TEST_F(Grants, LargeSharesSpanSeveralMessages) {
  auto share = open_grant_sharer(xen_.as(5))->share(0, 1500, true);
  for (std::size_t i = 0; i < 1500; ++i) share->bytes()[i * kPageSize] = static_cast<std::byte>(i & 0xff);
  auto mapping = open_grant_mapper(xen_.as(0))->map(5, share->refs(), false);
  for (std::size_t i = 0; i < 1500; i += 97)
    EXPECT_EQ(mapping->bytes()[i * kPageSize], static_cast<std::byte>(i & 0xff)) << "page " << i;
}

TEST_F(Grants, OnlyTheGranteeMapsAndOnlyAsGranted) {
  auto sharer = open_grant_sharer(xen_.as(5));
  auto rw = sharer->share(0, 1, true);
  auto ro = sharer->share(0, 1, false);

  // Domain 6 is not the grantee.
  EXPECT_EQ(error_of([&] { open_grant_mapper(xen_.as(6))->map(5, rw->refs(), false); }), EACCES);
  auto dom0 = open_grant_mapper(xen_.as(0));
  // A read-only grant cannot be mapped writable, but can be read.
  EXPECT_EQ(error_of([&] { dom0->map(5, ro->refs(), true); }), EACCES);
  EXPECT_NO_THROW(dom0->map(5, ro->refs(), false));
  // A ref never granted, or claimed from the wrong granter, fails whole.
  const GrantRef bogus[] = {rw->refs()[0], 999999};
  EXPECT_EQ(error_of([&] { dom0->map(5, bogus, false); }), ENOENT);
  EXPECT_EQ(error_of([&] { dom0->map(6, rw->refs(), false); }), ENOENT);
}

TEST_F(Grants, EndingAShareRevokesNewMapsButKeepsExistingOnes) {
  auto sharer = open_grant_sharer(xen_.as(5));
  auto share = sharer->share(0, 1, true);
  const GrantRef ref = share->refs()[0];
  std::memcpy(share->bytes().data(), "kept", 5);
  auto dom0 = open_grant_mapper(xen_.as(0));
  auto mapping = dom0->map(5, share->refs(), false);
  share.reset();
  EXPECT_STREQ(reinterpret_cast<const char*>(mapping->bytes().data()), "kept");
  EXPECT_EQ(error_of([&] { dom0->map(5, std::span(&ref, 1), false); }), ENOENT);
}

// Ending a share is one message the hypervisor does not answer. A map sent
// after it from another connection must still find it ended, even when the
// hypervisor, stopped meanwhile, finds the map beside more than one of the
// sharer's messages (it serves one message per connection per turn).
TEST_F(Grants, AShareEndedBeforeAMapIsEndedForIt) {
  auto sharer = open_grant_sharer(xen_.as(5));
  auto first = sharer->share(0, 1, true);
  auto second = sharer->share(0, 1, true);
  const GrantRef ref = second->refs()[0];
  auto dom0 = open_grant_mapper(xen_.as(0));
  ASSERT_EQ(::kill(xen_.pid(), SIGSTOP), 0);
  ASSERT_TRUE(stopped(xen_.pid())) << "vib-localxen did not stop";
  first.reset();
  second.reset();
  std::atomic<pid_t> mapper_tid{0};
  auto mapped = std::async(std::launch::async, [&] {
    mapper_tid = static_cast<pid_t>(::syscall(SYS_gettid));
    return error_of([&] { dom0->map(5, std::span(&ref, 1), false); });
  });
  // Until the map is sent: the thread waits in recvmsg for the answer.
  std::string last;
  const bool waiting = waits_in_recvmsg(mapper_tid, last);
  ASSERT_EQ(::kill(xen_.pid(), SIGCONT), 0);
  ASSERT_TRUE(waiting) << "the map request was never sent: " << last;
  EXPECT_EQ(mapped.get(), ENOENT);
}

// Granting memory in place is posted, unanswered, under refs the sharer
// reserved before (as a guest writes its own grant table): a map sent after
// it from another connection finds it, even when the hypervisor, stopped
// meanwhile, finds the map beside the grant messages. When the range ends
// its entries go back to the table, all but the few the sharer keeps for
// its next grants.
TEST_F(Grants, AGrantInPlaceIsThereForTheNextMapAndItsEntriesReturn) {
  auto sharer = open_grant_sharer(xen_.as(5));
  const std::size_t pages = 400;  // several grant messages, fewer than the sharer keeps
  std::vector<char> memory((pages + 1) * kPageSize, 'm');
  auto* start = reinterpret_cast<std::byte*>(
      (reinterpret_cast<std::uintptr_t>(memory.data()) + kPageSize - 1) & ~(kPageSize - 1));
  const auto before = sharer->table_use();
  ASSERT_TRUE(before);
  sharer->grant_range(0, start, pages, true).reset();  // reserves the refs the next one takes
  const auto reserved = sharer->table_use();
  EXPECT_GE(reserved->held_by_vib, before->held_by_vib);
  EXPECT_LE(reserved->held_by_vib, before->held_by_vib + 512) << "an ended range keeps at most 512 entries";

  auto dom0 = open_grant_mapper(xen_.as(0));
  ASSERT_EQ(::kill(xen_.pid(), SIGSTOP), 0);
  ASSERT_TRUE(stopped(xen_.pid())) << "vib-localxen did not stop";
  std::unique_ptr<GrantedRange> range;
  const int granted = error_of([&] { range = sharer->grant_range(0, start, pages, true); });
  ASSERT_EQ(granted, 0) << "granting waited for the stopped hypervisor";
  std::unique_ptr<MemoryAccess> access;
  std::atomic<pid_t> mapper_tid{0};
  auto mapped = std::async(std::launch::async, [&] {
    mapper_tid = static_cast<pid_t>(::syscall(SYS_gettid));
    return error_of([&] { access = dom0->access(5, range->refs(), true); });
  });
  std::string last;
  const bool waiting = waits_in_recvmsg(mapper_tid, last);
  ASSERT_EQ(::kill(xen_.pid(), SIGCONT), 0);
  ASSERT_TRUE(waiting) << "the map request was never sent: " << last;
  ASSERT_EQ(mapped.get(), 0);
  std::vector<std::byte> seen(pages * kPageSize);
  access->read(0, seen);
  EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](std::byte b) { return b == std::byte{'m'}; }));
  EXPECT_GE(sharer->table_use()->held_by_vib, before->held_by_vib + pages);

  access.reset();
  range.reset();
  EXPECT_LE(sharer->table_use()->held_by_vib, before->held_by_vib + 512);
}

// More pages than the largest grant table holds (2^20 entries, 4 GiB):
// refused as a full table, with nothing reserved or granted.
TEST_F(Grants, ARangeLargerThanAnyGrantTableIsRefusedAsAFullTable) {
  auto sharer = open_grant_sharer(xen_.as(5));
  const std::size_t pages = (std::size_t{1} << 20) + 1;
  void* area = ::mmap(nullptr, pages * kPageSize, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  ASSERT_NE(area, MAP_FAILED);
  const auto before = sharer->table_use();
  ASSERT_TRUE(before);
  EXPECT_EQ(error_of([&] { sharer->grant_range(0, static_cast<std::byte*>(area), pages, false); }), ENOSPC);
  EXPECT_EQ(sharer->table_use()->held_by_vib, before->held_by_vib);
  ::munmap(area, pages * kPageSize);
}

// What the hypervisor never answers it cannot refuse: a grant under a ref
// the connection did not reserve, or the release of a ref still granted,
// closes that connection (ending what it granted) and nothing else.
TEST_F(Grants, AGrantUnderARefNotReservedClosesOnlyThatConnection) {
  namespace wire = vib::platform::local::wire;
  auto raw = [&] {
    int fd = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strcpy(addr.sun_path, local_hypervisor_socket(xen_.dir(), 5).c_str());
    EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    return fd;
  };
  auto send = [](int fd, wire::Op op, std::uint32_t id, std::vector<std::uint32_t> args) {
    wire::Request req{op, 0, 0, wire::kWritable, static_cast<std::uint32_t>(args.size()), 0, 0, id};
    std::vector<std::byte> msg(sizeof(req) + args.size() * 4);
    std::memcpy(msg.data(), &req, sizeof(req));
    if (!args.empty()) std::memcpy(msg.data() + sizeof(req), args.data(), args.size() * 4);
    return ::send(fd, msg.data(), msg.size(), 0) == static_cast<ssize_t>(msg.size());
  };
  auto hung_up = [](int fd) {
    char c;
    return ::recv(fd, &c, 1, 0) <= 0;
  };
  alignas(4096) static char page[4096];
  const auto address = reinterpret_cast<std::uint64_t>(page);
  const std::uint32_t lo = static_cast<std::uint32_t>(address), hi = static_cast<std::uint32_t>(address >> 32);

  const int guesser = raw();
  ASSERT_TRUE(send(guesser, wire::Op::grant_range, 0, {4000, lo, hi}));
  EXPECT_TRUE(hung_up(guesser));
  ::close(guesser);

  const int releaser = raw();
  ASSERT_TRUE(send(releaser, wire::Op::reserve_refs, 2, {}));
  wire::Reply reply{};
  ASSERT_EQ(::recv(releaser, &reply, sizeof(reply), 0), static_cast<ssize_t>(sizeof(reply)));
  ASSERT_EQ(reply.status, 0);
  const GrantRef ref = reply.value;
  ASSERT_TRUE(send(releaser, wire::Op::grant_range, 0, {ref, lo, hi}));
  auto dom0 = open_grant_mapper(xen_.as(0));
  EXPECT_NO_THROW(dom0->access(5, std::span(&ref, 1), true));
  ASSERT_TRUE(send(releaser, wire::Op::release_refs, 0, {ref, 2}));
  EXPECT_TRUE(hung_up(releaser));
  ::close(releaser);
  EXPECT_EQ(error_of([&] { dom0->access(5, std::span(&ref, 1), true); }), ENOENT);

  // The domain's other connections go on.
  auto share = open_grant_sharer(xen_.as(5))->share(0, 1, true);
  EXPECT_NO_THROW(dom0->map(5, share->refs(), true));
}

// Granting a process's own memory in place refuses what pinning it would on
// real Xen (EFAULT): a hole, a page it may not write when the grantee may,
// a page it may not read. Small ranges and ranges above 1 MiB are checked
// differently (faulting the pages in vs the maps file): both sizes here.
TEST_F(Grants, GrantingInPlaceRefusesWhatPinningWould) {
  auto sharer = open_grant_sharer(xen_.as(5));
  for (const std::size_t pages : {std::size_t{1}, std::size_t{600}}) {
    SCOPED_TRACE(std::to_string(pages) + " pages");
    const std::size_t bytes = pages * kPageSize;
    // [ writable | read-only | inaccessible ], each `pages` long.
    auto* area = static_cast<std::byte*>(
        ::mmap(nullptr, 3 * bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    ASSERT_NE(area, MAP_FAILED);
    std::byte* writable = area;
    std::byte* read_only = area + bytes;
    std::byte* inaccessible = area + 2 * bytes;
    std::memset(read_only, 0x5a, bytes);
    ASSERT_EQ(::mprotect(read_only, bytes, PROT_READ), 0);
    ASSERT_EQ(::mprotect(inaccessible, bytes, PROT_NONE), 0);
    // A hole this process makes could be filled at once by another thread's
    // mmap (the sanitizers' runtimes map memory of their own). Instead, the
    // first megabytes above mmap_min_addr: the kernel places mappings from
    // the top down and a PIE test binary never gets one this low.
    auto* unmapped = reinterpret_cast<std::byte*>(std::uintptr_t{16} * kPageSize);

    EXPECT_NO_THROW(sharer->grant_range(0, writable, pages, /*writable=*/true));
    EXPECT_NO_THROW(sharer->grant_range(0, read_only, pages, /*writable=*/false));
    EXPECT_EQ(error_of([&] { sharer->grant_range(0, read_only, pages, true); }), EFAULT);
    EXPECT_EQ(error_of([&] { sharer->grant_range(0, inaccessible, pages, false); }), EFAULT);
    EXPECT_EQ(error_of([&] { sharer->grant_range(0, unmapped, pages, false); }), EFAULT);
    // A range that runs from good pages into a bad one fails whole.
    EXPECT_EQ(error_of([&] { sharer->grant_range(0, writable + kPageSize, pages, true); }), EFAULT);
    EXPECT_EQ(error_of([&] { sharer->grant_range(0, inaccessible - kPageSize, pages + 1, false); }), EFAULT);
    // Checking did not change what the process sees.
    EXPECT_EQ(read_only[bytes - 1], std::byte{0x5a});
    ::munmap(area, 3 * bytes);
  }
}

TEST_F(Grants, EventsCrossDomainsWithXenMasking) {
  auto guest = open_event_channels(xen_.as(5));
  auto dom0 = open_event_channels(xen_.as(0));
  const EventPort guest_port = guest->bind_unbound(0);
  // Only the domain the port was allocated for may bind to it.
  EXPECT_EQ(error_of([&] { open_event_channels(xen_.as(6))->bind_interdomain(5, guest_port); }), EINVAL);
  const EventPort dom0_port = dom0->bind_interdomain(5, guest_port);

  dom0->notify(dom0_port);
  EXPECT_EQ(wait_event(*guest), guest_port);
  // Masked until unmasked: more notifications collapse into one.
  dom0->notify(dom0_port);
  dom0->notify(dom0_port);
  EXPECT_FALSE(wait_event(*guest, 100));
  guest->unmask(guest_port);
  EXPECT_EQ(wait_event(*guest), guest_port);
  guest->unmask(guest_port);
  EXPECT_FALSE(wait_event(*guest, 100));

  // And the other way.
  guest->notify(guest_port);
  EXPECT_EQ(wait_event(*dom0), dom0_port);
  EXPECT_EQ(dom0->peer_closed(dom0_port), false);
  guest->unbind(guest_port);
  EXPECT_EQ(dom0->peer_closed(dom0_port), true);
}

TEST_F(Grants, PeerClosedWhenTheProcessDiesOrTheDomainIsDestroyed) {
  auto dom0 = open_event_channels(xen_.as(0));
  for (const bool destroy_domain : {false, true}) {
    int pipefd[2];
    ASSERT_EQ(::pipe(pipefd), 0);
    const pid_t child = ::fork();
    if (child == 0) {
      auto guest = open_event_channels(xen_.as(5));
      const EventPort port = guest->bind_unbound(0);
      if (::write(pipefd[1], &port, sizeof(port)) != sizeof(port)) ::_exit(1);
      ::pause();
      ::_exit(0);
    }
    EventPort guest_port = 0;
    ASSERT_EQ(::read(pipefd[0], &guest_port, sizeof(guest_port)), static_cast<ssize_t>(sizeof(guest_port)));
    ::close(pipefd[0]);
    ::close(pipefd[1]);
    const EventPort port = dom0->bind_interdomain(5, guest_port);
    EXPECT_EQ(dom0->peer_closed(port), false);
    if (destroy_domain) {
      xen_.destroy_domain(5);
    } else {
      ::kill(child, SIGKILL);
    }
    ::kill(child, SIGKILL);
    ::waitpid(child, nullptr, 0);
    EXPECT_TRUE(eventually_peer_closed(*dom0, port))
        << (destroy_domain ? "after domain destruction" : "after SIGKILL");
  }
}

TEST_F(Grants, UnmapNotifyFiresWhenTheSharingProcessIsKilled) {
  auto dom0_events = open_event_channels(xen_.as(0));
  int pipefd[2];
  ASSERT_EQ(::pipe(pipefd), 0);
  const pid_t child = ::fork();
  if (child == 0) {
    auto events = open_event_channels(xen_.as(5));
    const EventPort port = events->bind_unbound(0);
    auto share = open_grant_sharer(xen_.as(5))->share(0, 1, true, UnmapNotify{100, port});
    share->bytes()[100] = std::byte{1};
    const std::uint32_t msg[2] = {port, share->refs()[0]};
    if (::write(pipefd[1], msg, sizeof(msg)) != sizeof(msg)) ::_exit(1);
    ::pause();
    ::_exit(0);
  }
  std::uint32_t msg[2];
  ASSERT_EQ(::read(pipefd[0], msg, sizeof(msg)), static_cast<ssize_t>(sizeof(msg)));
  ::close(pipefd[0]);
  ::close(pipefd[1]);
  const EventPort port = dom0_events->bind_interdomain(5, msg[0]);
  auto mapping = open_grant_mapper(xen_.as(0))->map(5, std::span<const GrantRef>(&msg[1], 1), true);
  EXPECT_EQ(mapping->bytes()[100], std::byte{1});

  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  EXPECT_EQ(wait_event(*dom0_events), port);
  EXPECT_EQ(mapping->bytes()[100], std::byte{0});
  EXPECT_TRUE(eventually_peer_closed(*dom0_events, port));
}

// The guest's view of a back-end crash: the mapper's notify clears a byte in
// the guest's own page and raises the guest's port.
TEST_F(Grants, UnmapNotifyFiresWhenTheMappingProcessIsKilled) {
  auto guest_events = open_event_channels(xen_.as(5));
  const EventPort guest_port = guest_events->bind_unbound(0);
  auto share = open_grant_sharer(xen_.as(5))->share(0, 1, true);
  share->bytes()[200] = std::byte{1};
  const GrantRef ref = share->refs()[0];
  int pipefd[2];
  ASSERT_EQ(::pipe(pipefd), 0);
  const pid_t child = ::fork();
  if (child == 0) {
    auto events = open_event_channels(xen_.as(0));
    const EventPort port = events->bind_interdomain(5, guest_port);
    auto mapping = open_grant_mapper(xen_.as(0))->map(5, std::span(&ref, 1), true, UnmapNotify{200, port});
    const char ready = mapping->bytes()[200] == std::byte{1} ? 'y' : 'n';
    if (::write(pipefd[1], &ready, 1) != 1) ::_exit(1);
    ::pause();
    ::_exit(0);
  }
  char ready = 0;
  ASSERT_EQ(::read(pipefd[0], &ready, 1), 1);
  ::close(pipefd[0]);
  ::close(pipefd[1]);
  EXPECT_EQ(ready, 'y') << "the mapper did not see the guest's byte";
  EXPECT_FALSE(wait_event(*guest_events, 50));

  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  EXPECT_EQ(wait_event(*guest_events), guest_port);
  EXPECT_EQ(share->bytes()[200], std::byte{0});
  EXPECT_TRUE(eventually_peer_closed(*guest_events, guest_port));
}

TEST_F(Grants, UnmapNotifyNeedsASinglePage) {
  auto events = open_event_channels(xen_.as(5));
  const EventPort port = events->bind_unbound(0);
  EXPECT_EQ(error_of([&] { open_grant_sharer(xen_.as(5))->share(0, 2, true, UnmapNotify{0, port}); }), EINVAL);
}

TEST_F(Grants, GarbageOnTheHypervisorSocketEndsOnlyThatConnection) {
  const std::string path = local_hypervisor_socket(xen_.dir(), 5);
  for (std::size_t size : {std::size_t{1}, std::size_t{32}, std::size_t{3000}}) {
    int fd = ::socket(AF_UNIX, SOCK_SEQPACKET, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strcpy(addr.sun_path, path.c_str());
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    std::vector<unsigned char> junk(size, 0xff);
    ASSERT_EQ(::send(fd, junk.data(), junk.size(), 0), static_cast<ssize_t>(size));
    char c;
    EXPECT_LE(::recv(fd, &c, 1, 0), 0) << "the service should hang up on " << size << " bytes of junk";
    ::close(fd);
  }
  auto share = open_grant_sharer(xen_.as(5))->share(0, 1, true);
  EXPECT_NO_THROW(open_grant_mapper(xen_.as(0))->map(5, share->refs(), true));
}

TEST(RealXen, OpensOnXenAndFailsClearlyWithoutIt) {
  if (::access("/dev/xen/gntdev", F_OK) == 0) {  // on Xen (the lab): the real devices open
    EXPECT_NO_THROW(open_grant_mapper(XenTarget::real()));
    EXPECT_NO_THROW(open_event_channels(XenTarget::real()));
    return;
  }
  try {
    open_grant_mapper(XenTarget::real());
    FAIL() << "opened a grant device that does not exist";
  } catch (const std::system_error& e) {
    EXPECT_NE(std::string(e.what()).find("/dev/xen/gntdev"), std::string::npos) << e.what();
  }
  EXPECT_THROW(open_grant_sharer(XenTarget::real()), std::system_error);
  EXPECT_THROW(open_event_channels(XenTarget::real()), std::system_error);
}
