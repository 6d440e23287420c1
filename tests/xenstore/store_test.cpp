// The host-local xenstore, driven through the real libxenstore (the same code
// vibd uses on Xen) and through the real xenstore-* tools.
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <csignal>
#include <cstdlib>
#include <random>
#include <set>

#include "store_server.hpp"
#include "vib/platform/unique_fd.hpp"
#include "xen/real_xen.hpp"

using namespace vib::platform;
using vib::platform::local::StoreServer;

namespace {

class LocalStore : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vib-xs-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    server_ = StoreServer::start(dir_, {[this](DomId d) { introduced_.insert(d); },
                                        [this](DomId d) { released_.insert(d); }});
    dom0_ = connect(0);
  }
  void TearDown() override {
    server_.reset();
    std::filesystem::remove_all(dir_);
  }

  std::unique_ptr<XenStore> connect(DomId domid) {
    return open_xenstore(XenTarget::local(dir_, domid));
  }

  // Creates a guest the way the toolstack does: introduce it, then give it a
  // home it can read and a device/ area it owns.
  std::unique_ptr<XenStore> make_guest(DomId domid) {
    auto xs = dom0_->domain_path(domid);
    EXPECT_TRUE(introduce(domid));
    dom0_->write(kNoTransaction, xs + "/name", "guest" + std::to_string(domid));
    dom0_->set_permissions(kNoTransaction, xs, {{kDom0, Access::none}, {domid, Access::read}});
    dom0_->mkdir(kNoTransaction, xs + "/device");
    dom0_->set_permissions(kNoTransaction, xs + "/device", {{domid, Access::none}});
    return connect(domid);
  }

  // XS_INTRODUCE / XS_RELEASE, through libxenstore as libxl issues them.
  bool introduce(DomId domid);
  bool release(DomId domid);
  bool is_introduced(DomId domid);

  static std::optional<WatchEvent> wait_event(XenStore& xs, int timeout_ms = 2000) {
    if (auto e = xs.next_watch_event()) return e;
    pollfd p{xs.watch_fd(), POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) <= 0) return std::nullopt;
    return xs.next_watch_event();
  }

  std::string run(const std::string& cmd) {
    // timeout(1) so a tool stuck on a server bug fails the test instead of hanging CTest.
    const std::string full =
        "XENSTORED_PATH=" + local_xenstore_socket(dir_, 0) + " timeout 10 " + cmd;
    FILE* p = ::popen(full.c_str(), "r");
    std::string out;
    std::array<char, 512> buf;
    while (std::size_t n = std::fread(buf.data(), 1, buf.size(), p)) out.append(buf.data(), n);
    status_ = ::pclose(p);
    return out;
  }

  std::string dir_;
  std::unique_ptr<StoreServer> server_;
  std::unique_ptr<XenStore> dom0_;
  std::set<DomId> introduced_, released_;
  int status_ = 0;
};

}  // namespace

extern "C" {
#include <xenstore.h>
}

namespace {
struct RawHandle {
  explicit RawHandle(const std::string& socket) {
    ::setenv("XENSTORED_PATH", socket.c_str(), 1);
    h = xs_open(XS_OPEN_SOCKETONLY);
    ::unsetenv("XENSTORED_PATH");
  }
  ~RawHandle() {
    if (h) xs_close(h);
  }
  xs_handle* h;
};
}  // namespace

bool LocalStore::introduce(DomId domid) {
  RawHandle raw(local_xenstore_socket(dir_, 0));
  return raw.h && xs_introduce_domain(raw.h, domid, 0x1234, 1);
}

bool LocalStore::is_introduced(DomId domid) {
  RawHandle raw(local_xenstore_socket(dir_, 0));
  return raw.h && xs_is_domain_introduced(raw.h, domid);
}

bool LocalStore::release(DomId domid) {
  RawHandle raw(local_xenstore_socket(dir_, 0));
  return raw.h && xs_release_domain(raw.h, domid);
}

TEST_F(LocalStore, ReadWriteMkdirDirectoryRemove) {
  EXPECT_EQ(dom0_->read(kNoTransaction, "/tool/vib/x"), std::nullopt);
  dom0_->write(kNoTransaction, "/tool/vib/x", "hello");
  EXPECT_EQ(dom0_->read(kNoTransaction, "/tool/vib/x"), "hello");
  dom0_->mkdir(kNoTransaction, "/tool/vib/dir");
  EXPECT_EQ(dom0_->read(kNoTransaction, "/tool/vib/dir"), "");
  auto children = dom0_->directory(kNoTransaction, "/tool/vib");
  ASSERT_TRUE(children);
  EXPECT_EQ(std::set<std::string>(children->begin(), children->end()),
            (std::set<std::string>{"x", "dir"}));
  dom0_->remove(kNoTransaction, "/tool/vib");
  EXPECT_EQ(dom0_->directory(kNoTransaction, "/tool/vib"), std::nullopt);
  EXPECT_NO_THROW(dom0_->remove(kNoTransaction, "/tool/vib"));  // absent is fine
}

TEST_F(LocalStore, BinaryValuesAndLimits) {
  const std::string binary("a\0b\xff", 4);
  dom0_->write(kNoTransaction, "/tool/bin", binary);
  EXPECT_EQ(dom0_->read(kNoTransaction, "/tool/bin"), binary);
  EXPECT_THROW(dom0_->write(kNoTransaction, "/tool/bad//path", "x"), std::system_error);
  EXPECT_THROW(dom0_->write(kNoTransaction, "/tool/bad path", "x"), std::system_error);
}

TEST_F(LocalStore, TransactionsAreIsolatedAndConflictsRetry) {
  dom0_->write(kNoTransaction, "/tool/t/a", "1");
  const auto tx = dom0_->transaction_start();
  dom0_->write(tx, "/tool/t/a", "2");
  dom0_->write(tx, "/tool/t/b", "new");
  // Outside the transaction nothing changed yet.
  EXPECT_EQ(dom0_->read(kNoTransaction, "/tool/t/a"), "1");
  EXPECT_EQ(dom0_->read(kNoTransaction, "/tool/t/b"), std::nullopt);
  EXPECT_EQ(dom0_->read(tx, "/tool/t/a"), "2");
  EXPECT_TRUE(dom0_->transaction_end(tx, false));
  EXPECT_EQ(dom0_->read(kNoTransaction, "/tool/t/a"), "2");
  EXPECT_EQ(dom0_->read(kNoTransaction, "/tool/t/b"), "new");

  // Abort discards.
  const auto aborted = dom0_->transaction_start();
  dom0_->write(aborted, "/tool/t/a", "3");
  EXPECT_TRUE(dom0_->transaction_end(aborted, true));
  EXPECT_EQ(dom0_->read(kNoTransaction, "/tool/t/a"), "2");

  // Someone else changes what the transaction read: the commit must fail.
  auto other = connect(0);
  const auto racing = dom0_->transaction_start();
  EXPECT_EQ(dom0_->read(racing, "/tool/t/a"), "2");
  other->write(kNoTransaction, "/tool/t/a", "theirs");
  dom0_->write(racing, "/tool/t/a", "mine");
  EXPECT_FALSE(dom0_->transaction_end(racing, false));
  EXPECT_EQ(dom0_->read(kNoTransaction, "/tool/t/a"), "theirs");

  // with_transaction retries until it wins.
  int attempts = 0;
  with_transaction(*dom0_, [&](TransactionId t) {
    if (attempts++ == 0) other->write(kNoTransaction, "/tool/t/a", "again");
    auto v = dom0_->read(t, "/tool/t/a");
    dom0_->write(t, "/tool/t/a", *v + "+1");
  });
  EXPECT_EQ(attempts, 2);
  EXPECT_EQ(dom0_->read(kNoTransaction, "/tool/t/a"), "again+1");
}

TEST_F(LocalStore, WatchesFireOnArmWriteBelowAndRemove) {
  dom0_->watch("/tool/w", "tok");
  auto armed = wait_event(*dom0_);
  ASSERT_TRUE(armed);
  EXPECT_EQ(armed->path, "/tool/w");
  EXPECT_EQ(armed->token, "tok");

  auto writer = connect(0);
  writer->write(kNoTransaction, "/tool/w/child", "x");
  auto ev = wait_event(*dom0_);
  ASSERT_TRUE(ev);
  EXPECT_EQ(ev->path, "/tool/w/child");
  writer->write(kNoTransaction, "/tool/other", "x");  // not below the watch
  writer->remove(kNoTransaction, "/tool/w");
  ev = wait_event(*dom0_);
  ASSERT_TRUE(ev);
  EXPECT_EQ(ev->path, "/tool/w");

  dom0_->unwatch("/tool/w", "tok");
  writer->write(kNoTransaction, "/tool/w/again", "x");
  EXPECT_FALSE(wait_event(*dom0_, 200));
}

TEST_F(LocalStore, TransactionWatchEventsFireAtCommit) {
  dom0_->watch("/tool/c", "c");
  ASSERT_TRUE(wait_event(*dom0_));
  auto writer = connect(0);
  const auto tx = writer->transaction_start();
  writer->write(tx, "/tool/c/x", "1");
  EXPECT_FALSE(wait_event(*dom0_, 200));
  ASSERT_TRUE(writer->transaction_end(tx, false));
  auto ev = wait_event(*dom0_);
  ASSERT_TRUE(ev);
  EXPECT_EQ(ev->path, "/tool/c/x");
}

TEST_F(LocalStore, IntroduceAndReleaseDomainsFireSpecialWatches) {
  dom0_->watch("@introduceDomain", "intro");
  dom0_->watch("@releaseDomain", "rel");
  ASSERT_TRUE(wait_event(*dom0_));
  ASSERT_TRUE(wait_event(*dom0_));
  EXPECT_FALSE(is_introduced(5));
  auto guest = make_guest(5);
  auto ev = wait_event(*dom0_);
  ASSERT_TRUE(ev);
  EXPECT_EQ(ev->path, "@introduceDomain");
  EXPECT_TRUE(is_introduced(5));
  // Only the privileged domain manages domains.
  {
    RawHandle as_guest(local_xenstore_socket(dir_, 5));
    ASSERT_TRUE(as_guest.h);
    EXPECT_FALSE(xs_introduce_domain(as_guest.h, 9, 0, 0));
    EXPECT_EQ(errno, EACCES);
    EXPECT_FALSE(xs_release_domain(as_guest.h, 5));
  }
  EXPECT_EQ(introduced_.count(5), 1u);
  EXPECT_TRUE(std::filesystem::exists(local_xenstore_socket(dir_, 5)));

  ASSERT_TRUE(release(5));
  ev = wait_event(*dom0_);
  ASSERT_TRUE(ev);
  EXPECT_EQ(ev->path, "@releaseDomain");
  EXPECT_EQ(released_.count(5), 1u);
  EXPECT_FALSE(std::filesystem::exists(local_xenstore_socket(dir_, 5)));
  EXPECT_FALSE(is_introduced(5));
  // The released domain's connection is gone.
  EXPECT_THROW(guest->read(kNoTransaction, "name"), std::system_error);
}

TEST_F(LocalStore, GuestsAreConfinedByNodePermissions) {
  auto guest5 = make_guest(5);
  auto guest6 = make_guest(6);
  const std::string backend = "/local/domain/0/backend/vib/5/0";
  const std::string frontend = "/local/domain/5/device/vib/0";

  // Relative paths resolve under the guest's home; it may write its own area.
  EXPECT_EQ(guest5->read(kNoTransaction, "name"), "guest5");
  guest5->write(kNoTransaction, "device/vib/0/state", "1");
  EXPECT_EQ(dom0_->read(kNoTransaction, frontend + "/state"), "1");
  // ...and owns what it created there.
  auto perms = dom0_->get_permissions(kNoTransaction, frontend + "/state");
  ASSERT_TRUE(perms);
  EXPECT_EQ((*perms)[0].domid, 5);

  // A guest cannot write the back-end's nodes, even once it may read them.
  dom0_->write(kNoTransaction, backend + "/state", "2");
  EXPECT_THROW(guest5->read(kNoTransaction, backend + "/state"), std::system_error);
  dom0_->set_permissions(kNoTransaction, backend + "/state", {{kDom0, Access::none}, {5, Access::read}});
  EXPECT_EQ(guest5->read(kNoTransaction, backend + "/state"), "2");
  try {
    guest5->write(kNoTransaction, backend + "/state", "6");
    FAIL() << "guest wrote a back-end node";
  } catch (const std::system_error& e) {
    EXPECT_EQ(e.code().value(), EACCES);
  }
  EXPECT_THROW(guest5->write(kNoTransaction, "/local/domain/0/backend/vib/5/0/new", "x"),
               std::system_error);
  EXPECT_EQ(dom0_->read(kNoTransaction, backend + "/state"), "2");

  // Another guest can neither read nor write guest 5's area.
  EXPECT_THROW(guest6->read(kNoTransaction, frontend + "/state"), std::system_error);
  EXPECT_THROW(guest6->write(kNoTransaction, frontend + "/evil", "x"), std::system_error);

  // Only the owner changes permissions, and cannot give the node away.
  EXPECT_THROW(guest6->set_permissions(kNoTransaction, frontend + "/state", {{6, Access::both}}),
               std::system_error);
  EXPECT_THROW(guest5->set_permissions(kNoTransaction, frontend + "/state", {{6, Access::both}}),
               std::system_error);
  guest5->set_permissions(kNoTransaction, frontend + "/state", {{5, Access::none}, {6, Access::read}});
  EXPECT_EQ(guest6->read(kNoTransaction, frontend + "/state"), "1");

}

TEST_F(LocalStore, WatchersAreToldOnlyAboutNodesTheyMayRead) {
  auto guest5 = make_guest(5);
  guest5->watch("/local/domain/0/backend", "be");
  // Arming fires regardless; the node need not exist.
  ASSERT_TRUE(wait_event(*guest5));
  dom0_->write(kNoTransaction, "/local/domain/0/backend/secret", "x");
  EXPECT_FALSE(wait_event(*guest5, 200));
  dom0_->write(kNoTransaction, "/local/domain/0/backend/shared", "x");
  dom0_->set_permissions(kNoTransaction, "/local/domain/0/backend/shared",
                         {{kDom0, Access::none}, {5, Access::read}});
  auto ev = wait_event(*guest5);
  ASSERT_TRUE(ev);
  EXPECT_EQ(ev->path, "/local/domain/0/backend/shared");
}

TEST_F(LocalStore, GarbageOnTheSocketEndsOnlyThatConnection) {
  const std::string path = local_xenstore_socket(dir_, 0);
  for (int round = 0; round < 3; ++round) {
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strcpy(addr.sun_path, path.c_str());
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    // An oversized length, then an unknown type, then a truncated header.
    const std::uint32_t bad[3][4] = {{XS_READ, 1, 0, 0xFFFFFFu}, {9999, 1, 0, 0}, {XS_READ, 1, 0, 3}};
    ASSERT_GT(::write(fd, bad[round], round == 2 ? 10 : sizeof(bad[round])), 0);
    if (round < 2) {
      char c;
      EXPECT_EQ(::read(fd, &c, 1), 0) << "server should hang up";
    }
    ::close(fd);
  }
  dom0_->write(kNoTransaction, "/tool/alive", "yes");
  EXPECT_EQ(dom0_->read(kNoTransaction, "/tool/alive"), "yes");
}

TEST_F(LocalStore, RealXenstoreToolsWorkAgainstIt) {
  auto guest = make_guest(5);
  run(std::string(XENSTORE_WRITE) + " /local/domain/0/backend/vib/5/0/state 2 "
      "/local/domain/0/backend/vib/5/0/hca soft");
  ASSERT_EQ(status_, 0);
  EXPECT_EQ(dom0_->read(kNoTransaction, "/local/domain/0/backend/vib/5/0/hca"), "soft");
  EXPECT_EQ(run(std::string(XENSTORE_READ) + " /local/domain/0/backend/vib/5/0/state"), "2\n");
  const std::string ls = run(std::string(XENSTORE_LS) + " /local/domain/0/backend/vib");
  ASSERT_EQ(status_, 0);
  EXPECT_NE(ls.find("5 = \"\""), std::string::npos) << ls;
  EXPECT_NE(ls.find("hca = \"soft\""), std::string::npos) << ls;
  EXPECT_NE(ls.find("state = \"2\""), std::string::npos) << ls;
  // -p prints the permissions libxenstore read back over the wire.
  const std::string lsp = run(std::string(XENSTORE_LS) + " -p /local/domain/5");
  EXPECT_NE(lsp.find("device = \"\"  . ."), std::string::npos) << lsp;
  EXPECT_NE(lsp.find("(n5)"), std::string::npos) << lsp;
}

namespace {
// Reads replies until the one with `req_id` arrives (true) or the server hangs
// up / stays silent for 5 s (false).
bool await_reply(int fd, std::uint32_t req_id) {
  std::string in;
  for (;;) {
    while (in.size() >= sizeof(xsd_sockmsg)) {
      xsd_sockmsg hdr;
      std::memcpy(&hdr, in.data(), sizeof(hdr));
      if (in.size() < sizeof(hdr) + hdr.len) break;
      if (hdr.type != XS_WATCH_EVENT && hdr.req_id == req_id) return true;
      in.erase(0, sizeof(hdr) + hdr.len);
    }
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 5000) <= 0) return false;
    char buf[4096];
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n <= 0) return false;
    in.append(buf, static_cast<std::size_t>(n));
  }
}
}  // namespace

TEST_F(LocalStore, RandomMessagesNeverStopTheServer) {
  auto guest = make_guest(5);
  // Well-framed messages of every type with random ids and payloads, on a
  // guest and a dom0 connection: whatever the server makes of them, it must
  // keep serving everyone else. A final request on each connection proves the
  // server really worked through the batch rather than dropping it unread.
  std::mt19937 random(20261123);
  constexpr std::uint32_t kSentinel = 0xFFFFFFFFu;
  int batches_answered = 0;
  for (DomId domid : {DomId{5}, kDom0}) {
    for (int connection = 0; connection < 20; ++connection) {
      UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
      sockaddr_un addr{};
      addr.sun_family = AF_UNIX;
      const std::string path = local_xenstore_socket(dir_, domid);
      std::strcpy(addr.sun_path, path.c_str());
      ASSERT_EQ(::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
      std::string wire;
      auto append = [&](std::uint32_t type, std::uint32_t req_id, std::uint32_t tx_id,
                        const std::string& payload) {
        const xsd_sockmsg hdr{type, req_id, tx_id, static_cast<std::uint32_t>(payload.size())};
        wire.append(reinterpret_cast<const char*>(&hdr), sizeof(hdr));
        wire += payload;
      };
      for (int message = 0; message < 50; ++message) {
        std::string payload(random() % 300, '\0');
        for (auto& ch : payload) {
          // Mostly path-like text with NULs, so parsing gets past the first check.
          const auto r = random() % 8;
          ch = r == 0 ? '\0' : r == 1 ? '/' : static_cast<char>('a' + random() % 4);
        }
        // A rare unknown type, which ends the connection.
        std::uint32_t type = static_cast<std::uint32_t>(
            random() % 400 == 0 ? XS_TYPE_COUNT + random() % 5 : random() % XS_TYPE_COUNT);
        // Do not let dom0 release itself or other live domains of this test.
        if (domid == kDom0 && (type == XS_RELEASE || type == XS_INTRODUCE)) type = XS_READ;
        append(type, static_cast<std::uint32_t>(random() % 1000000),
               static_cast<std::uint32_t>(random() % 3), payload);
      }
      append(XS_DIRECTORY, kSentinel, 0, std::string("/", 2));
      if (::send(fd.get(), wire.data(), wire.size(), MSG_NOSIGNAL) < 0) continue;  // hung up
      if (await_reply(fd.get(), kSentinel)) ++batches_answered;
    }
  }
  EXPECT_GT(batches_answered, 10);
  dom0_->write(kNoTransaction, "/tool/alive", "yes");
  EXPECT_EQ(dom0_->read(kNoTransaction, "/tool/alive"), "yes");
  EXPECT_EQ(guest->read(kNoTransaction, "name"), "guest5");
}

#ifdef VIB_LOCALXEN
namespace {
// Reads the child's stdout until `needle` appears (true), or EOF/timeout (false).
bool wait_for_output(int fd, const std::string& needle, std::string& seen, bool* eof = nullptr) {
  while (needle.empty() || seen.find(needle) == std::string::npos) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 10000) <= 0) return false;
    char buf[256];
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n <= 0) {
      if (eof) *eof = n == 0;
      return false;
    }
    seen.append(buf, static_cast<std::size_t>(n));
  }
  return true;
}

std::optional<WatchEvent> next_event(XenStore& xs) {
  if (auto e = xs.next_watch_event()) return e;
  pollfd p{xs.watch_fd(), POLLIN, 0};
  if (::poll(&p, 1, 5000) <= 0) return std::nullopt;
  return xs.next_watch_event();
}
}  // namespace

TEST(LocalXenTool, ServeCreateAndDestroyDomains) {
  char tmpl[] = "/tmp/vib-lx-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  int out[2];
  ASSERT_EQ(::pipe2(out, O_CLOEXEC), 0);
  UniqueFd out_read(out[0]);
  const pid_t server = ::fork();
  ASSERT_GE(server, 0);
  if (server == 0) {
    ::dup2(out[1], STDOUT_FILENO);
    ::execl(VIB_LOCALXEN, VIB_LOCALXEN, "serve", "--dir", dir.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ::close(out[1]);
  std::string seen;
  const bool ready = wait_for_output(out_read.get(), "ready", seen);
  auto tool = [&](const std::string& args) {
    return std::system(("timeout 10 " VIB_LOCALXEN " " + args + " --dir " + dir + " >/dev/null").c_str());
  };
  if (ready) {
    auto dom0 = open_xenstore(XenTarget::local(dir, kDom0));
    dom0->watch("@releaseDomain", "gone");
    ASSERT_TRUE(next_event(*dom0));  // the arming event

    EXPECT_EQ(tool("create-domain --domid 7 --name web"), 0);
    EXPECT_TRUE(std::filesystem::exists(local_xenstore_socket(dir, 7)));
    {
      auto guest = open_xenstore(XenTarget::local(dir, 7));
      EXPECT_EQ(guest->read(kNoTransaction, "name"), "web");
      EXPECT_EQ(guest->read(kNoTransaction, "domid"), "7");
      guest->write(kNoTransaction, "device/vib/0/state", "1");  // its own device area
      EXPECT_THROW(guest->write(kNoTransaction, "name", "hijack"), std::system_error);
    }
    EXPECT_EQ(tool("destroy-domain --domid 7"), 0);
    auto ev = next_event(*dom0);
    ASSERT_TRUE(ev);
    EXPECT_EQ(ev->path, "@releaseDomain");
    EXPECT_FALSE(dom0->read(kNoTransaction, "/local/domain/7"));
    EXPECT_FALSE(std::filesystem::exists(local_xenstore_socket(dir, 7)));
  }
  ::kill(server, SIGTERM);
  // EOF on its stdout means it is exiting; bounded so a hang fails the test.
  bool eof = false;
  wait_for_output(out_read.get(), "", seen, &eof);
  if (!eof) {
    ::kill(server, SIGKILL);
    ADD_FAILURE() << "vib-localxen did not stop on SIGTERM";
  }
  int status = -1;
  ::waitpid(server, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  std::filesystem::remove_all(dir);
  ASSERT_TRUE(ready) << "no ready line: " << seen;
}
#endif
