// Unmodified verbs programs on vib: Debian's own binaries (ibverbs-utils,
// perftest) run with LD_LIBRARY_PATH pointing at our libibverbs.so.1, as
// two guest processes — the server in domain 5, the client in domain 6 —
// of the host-local Xen, through a real vibd on the software HCA. They
// exchange LID/QPN/PSN (and GID) over TCP on localhost, as on a fabric.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <chrono>
#include <filesystem>
#include <set>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "vibd_fixture.hpp"

using namespace std::chrono_literals;

namespace {

// What one program run left behind.
struct ProgramRun {
  int status = -1;  // as from waitpid
  std::string output;
  bool timed_out = false;
};

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// A TCP port nobody uses now (the kernel's pick), so that tests running in
// parallel, or other suites on the machine, never share a port.
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

class Programs : public vib::test::VibdFixture {
 protected:
  void SetUp() override {
    VibdFixture::SetUp();
    provision(5);
    provision(6);
    start_vibd(VIBD, xen_.dir() + "/vibd.log");
    ASSERT_TRUE(eventually(be(5) + "/state", "2"));
    ASSERT_TRUE(eventually(be(6) + "/state", "2"));
  }

  // Starts `argv` as a process of guest `domid`, output to a file.
  pid_t start(vib::platform::DomId domid, const std::vector<std::string>& argv, const std::string& out) {
    std::vector<std::string> env = {
        "LD_LIBRARY_PATH=" VIB_IBVERBS_DIR,
        "VIB_LOCAL_XEN=" + xen_.dir(),
        "VIB_DOMID=" + std::to_string(domid),
        "PATH=/usr/bin:/bin",
    };
#ifdef VIB_ASAN_RUNTIME
    // Our library is built with AddressSanitizer, the programs are not:
    // the sanitizer's runtime must be loaded first, and the programs' own
    // leaks at exit (perftest frees little) are not ours to report.
    env.push_back("LD_PRELOAD=" VIB_ASAN_RUNTIME);
    env.push_back("ASAN_OPTIONS=detect_leaks=0");
#endif
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

  // Waits for `pid` at most until `deadline`, then kills it (a hard timeout).
  static ProgramRun finish(pid_t pid, const std::string& out, std::chrono::steady_clock::time_point deadline) {
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
      std::this_thread::sleep_for(10ms);
    }
    run.output = slurp(out);
    return run;
  }

  ProgramRun run_one(vib::platform::DomId domid, const std::vector<std::string>& argv, std::chrono::seconds limit = 30s) {
    const std::string out = xen_.dir() + "/single.out";
    return finish(start(domid, argv, out), out, std::chrono::steady_clock::now() + limit);
  }

  // Server in domain 5, client in domain 6 (its last argument the server).
  std::pair<ProgramRun, ProgramRun> run_pair(const std::string& program, std::vector<std::string> args,
                               std::chrono::seconds limit = 30s) {
    const unsigned port = free_port();
    const auto deadline = std::chrono::steady_clock::now() + limit;
    std::vector<std::string> server = {program, "-p", std::to_string(port)};
    server.insert(server.end(), args.begin(), args.end());
    const std::string server_out = xen_.dir() + "/server.out", client_out = xen_.dir() + "/client.out";
    const pid_t s = start(5, server, server_out);
    while (!listening(s, port) && std::chrono::steady_clock::now() < deadline) {
      if (::waitpid(s, nullptr, WNOHANG) == s) break;  // it died: report below
      std::this_thread::sleep_for(10ms);
    }
    std::vector<std::string> client = server;
    client.push_back("localhost");
    const pid_t c = start(6, client, client_out);
    ProgramRun client_run = finish(c, client_out, deadline);
    ProgramRun server_run = finish(s, server_out, deadline);
    return {server_run, client_run};
  }

  static void expect_ok(const ProgramRun& run, const std::string& who, const std::string& pattern) {
    EXPECT_FALSE(run.timed_out) << who << " timed out:\n" << run.output;
    EXPECT_TRUE(WIFEXITED(run.status) && WEXITSTATUS(run.status) == 0)
        << who << " failed (status " << run.status << "):\n"
        << run.output;
    EXPECT_TRUE(std::regex_search(run.output, std::regex(pattern))) << who << " printed no /" << pattern << "/:\n"
                                                                    << run.output;
  }

  void expect_pair_ok(const std::pair<ProgramRun, ProgramRun>& runs, const std::string& pattern,
                      const std::string& server_pattern = {}) {
    expect_ok(runs.first, "server", server_pattern.empty() ? pattern : server_pattern);
    expect_ok(runs.second, "client", pattern);
    if (HasFailure()) ADD_FAILURE() << "vibd log:\n" << slurp(xen_.dir() + "/vibd.log");
  }
};

TEST_F(Programs, IbvDevicesListsTheGuestsDevice) {
  expect_ok(run_one(5, {"/usr/bin/ibv_devices"}), "ibv_devices", R"(vib0\s+[0-9a-f]{16})");
}

TEST_F(Programs, IbvDevinfoShowsTheDeviceAndAnActivePort) {
  const ProgramRun run = run_one(6, {"/usr/bin/ibv_devinfo", "-v"});
  expect_ok(run, "ibv_devinfo", R"(hca_id:\s+vib0)");
  EXPECT_NE(run.output.find("PORT_ACTIVE"), std::string::npos) << run.output;
  EXPECT_NE(run.output.find("vib-soft"), std::string::npos) << run.output;
  EXPECT_NE(run.output.find("GID[  0]"), std::string::npos) << run.output;
}

TEST_F(Programs, IbvRcPingpong) {
  expect_pair_ok(run_pair("/usr/bin/ibv_rc_pingpong", {"-n", "100"}), R"(100 iters in)");
}

TEST_F(Programs, IbvRcPingpongWithCompletionEvents) {
  // -e: the programs sleep in ibv_get_cq_event on a completion channel.
  expect_pair_ok(run_pair("/usr/bin/ibv_rc_pingpong", {"-n", "100", "-e"}), R"(100 iters in)");
}

TEST_F(Programs, IbvUdPingpong) {
  expect_pair_ok(run_pair("/usr/bin/ibv_ud_pingpong", {"-n", "100"}), R"(100 iters in)");
}

TEST_F(Programs, IbvSrqPingpong) {
  expect_pair_ok(run_pair("/usr/bin/ibv_srq_pingpong", {"-n", "100"}), R"(100 iters in)");
}

// perftest's result rows: "<bytes> <iterations> ..." under the header.
const std::string kLatencyRow = R"(#bytes #iterations[^\n]*\n\s*\d+\s+100\s+\d)";
const std::string kBandwidthRow = R"(#bytes\s+#iterations[^\n]*\n\s*\d+\s+100\s+\d)";

TEST_F(Programs, IbSendLat) {
  expect_pair_ok(run_pair("/usr/bin/ib_send_lat", {"-n", "100"}), kLatencyRow);
}

TEST_F(Programs, IbWriteBw) {
  expect_pair_ok(run_pair("/usr/bin/ib_write_bw", {"-n", "100"}), kBandwidthRow);
}

TEST_F(Programs, IbSendBw) {
  expect_pair_ok(run_pair("/usr/bin/ib_send_bw", {"-n", "100"}), kBandwidthRow);
}

TEST_F(Programs, IbWriteLat) {
  expect_pair_ok(run_pair("/usr/bin/ib_write_lat", {"-n", "100"}), kLatencyRow);
}

// The passive side of READ and atomics only serves memory: perftest prints
// no results there, just the connection.
const std::string kConnected = R"(remote address: LID 0x[0-9a-f]+ QPN)";

TEST_F(Programs, IbReadLat) {
  expect_pair_ok(run_pair("/usr/bin/ib_read_lat", {"-n", "100"}), kLatencyRow, kConnected);
}

TEST_F(Programs, IbAtomicLat) {
  expect_pair_ok(run_pair("/usr/bin/ib_atomic_lat", {"-n", "100"}), kLatencyRow, kConnected);
}

}  // namespace
