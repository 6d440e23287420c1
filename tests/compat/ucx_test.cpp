// UCX (Debian's ucx-utils, unmodified) sees vib devices. UCX uses an IB
// device only if /dev/infiniband/<dev_name> is a character device the
// process may read and write; in a guest, vib's udev rule links
// /dev/infiniband/vib to the grant-allocation device. This host has neither,
// so each program runs in a mount namespace of its own whose /dev is an
// overlay with that node (a link to /dev/null): what the guest's rule
// gives, seen by this process only.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "guest_programs.hpp"
#include "vibd_fixture.hpp"

using namespace std::chrono_literals;

namespace {

// The figures of ucx_perftest's "Final:" line (iterations, then latency
// and bandwidth columns), or "" when it printed none.
std::string final_line(const std::string& output) {
  std::smatch m;
  return std::regex_search(output, m, std::regex(R"(Final:\s+([^\n]*))")) ? m[1].str() : "";
}

// `argv` as a plain process of this host, nothing of vib's on its paths,
// with UCX_TLS=`transports`; stdout and stderr to `out`. Everything is
// prepared before fork: the child only duplicates descriptors and execs.
pid_t start_native(const std::vector<std::string>& argv, const std::string& transports, const std::string& out) {
  std::vector<std::string> env_strings = {"UCX_TLS=" + transports};
  for (char** e = environ; *e; ++e) {
    const std::string entry = *e;
    if (entry.rfind("LD_LIBRARY_PATH=", 0) != 0 && entry.rfind("UCX_TLS=", 0) != 0) env_strings.push_back(entry);
  }
  std::vector<char*> envp, args;
  for (auto& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  std::vector<std::string> argv_copy = argv;
  for (auto& a : argv_copy) args.push_back(a.data());
  args.push_back(nullptr);
  const int fd = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return -1;
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    ::execve(args[0], args.data(), envp.data());
    ::_exit(127);
  }
  ::close(fd);
  return pid;
}

class Ucx : public vib::test::VibdFixture {
 protected:
  void SetUp() override {
    VibdFixture::SetUp();
    provision(5);
    provision(6);
    start_vibd(VIBD, xen_.dir() + "/vibd.log");
    ASSERT_TRUE(eventually(be(5) + "/state", "2"));
    ASSERT_TRUE(eventually(be(6) + "/state", "2"));
  }

  // Starts `argv` in guest `domid`, in a mount namespace whose /dev has the
  // node; `name` keeps its overlay and output apart from other programs'.
  pid_t start_with_device_node(vib::platform::DomId domid, const std::string& name, std::vector<std::string> argv,
                               const std::vector<std::string>& extra_env = {}) {
    const std::string overlay = xen_.dir() + "/dev-overlay-" + name;
    const std::string script = "mkdir -p " + overlay + "/upper " + overlay +
                               "/work && mount -t overlay overlay -o lowerdir=/dev,upperdir=" + overlay +
                               "/upper,workdir=" + overlay +
                               "/work /dev && mkdir -p /dev/infiniband && ln -s /dev/null /dev/infiniband/vib && "
                               "exec \"$@\"";
    std::vector<std::string> wrapped = {"/usr/bin/unshare", "--mount", "/bin/sh", "-c", script, "sh"};
    wrapped.insert(wrapped.end(), argv.begin(), argv.end());
    auto env = vib::test::guest_environment(VIB_LIBRARY_DIR, xen_.dir());
    env.extra = extra_env;
    return vib::test::start_guest_program(env, domid, wrapped, output(name));
  }
  std::string output(const std::string& name) const { return xen_.dir() + "/" + name + ".out"; }

  vib::test::ProgramRun run_with_device_node(vib::platform::DomId domid, std::vector<std::string> argv) {
    const pid_t pid = start_with_device_node(domid, "ucx", std::move(argv));
    return vib::test::finish_program(pid, output("ucx"), std::chrono::steady_clock::now() + 60s);
  }

  // ucx_perftest's server in guest 5 and its client in guest 6, both on
  // their vib0 port 1 and nothing else: with the transports limited to
  // vib's, a run that completes went through vib (UCX refuses to start a
  // test for which no listed transport and device can reach the peer).
  void perftest_between_two_guests(const std::vector<std::string>& test, const std::string& transports) {
    const unsigned tcp_port = vib::test::free_port();
    const std::string port = std::to_string(tcp_port);
    const std::vector<std::string> env = {"UCX_NET_DEVICES=vib0:1", "UCX_TLS=" + transports};
    std::vector<std::string> server = {"/usr/bin/ucx_perftest", "-p", port, "-n", "200", "-w", "20"};
    server.insert(server.end(), test.begin(), test.end());
    std::vector<std::string> client = server;
    client.insert(client.begin() + 1, "127.0.0.1");  // the test's TCP exchange, not its data path
    const auto deadline = std::chrono::steady_clock::now() + 90s;
    const pid_t s = start_with_device_node(5, "server", server, env);
    // The client gives up at once when nobody listens.
    while (!vib::test::listening(s, tcp_port) && std::chrono::steady_clock::now() < deadline &&
           !vib::test::has_exited(s))
      std::this_thread::sleep_for(10ms);
    const pid_t c = start_with_device_node(6, "client", client, env);
    const auto client_run = vib::test::finish_program(c, output("client"), deadline);
    const auto server_run = vib::test::finish_program(s, output("server"), deadline);
    for (const auto* run : {&server_run, &client_run}) {
      const char* who = run == &server_run ? "server" : "client";
      EXPECT_FALSE(run->timed_out) << who << " timed out:\n" << run->output;
      EXPECT_TRUE(WIFEXITED(run->status) && WEXITSTATUS(run->status) == 0)
          << who << " failed (status " << run->status << "):\n"
          << run->output;
      EXPECT_EQ(run->output.find("ERROR"), std::string::npos) << who << ":\n" << run->output;
    }
    // The client prints the figures: all 200 iterations completed.
    EXPECT_TRUE(std::regex_search(client_run.output, std::regex(R"(Final:\s+200\s)"))) << client_run.output;
    if (HasFailure()) ADD_FAILURE() << "vibd log:\n" << vib::test::slurp(xen_.dir() + "/vibd.log");
    std::string what;
    for (const auto& arg : test) what += " " + arg;
    std::cout << "[ figures  ] ucx_perftest" << what << " (iterations, latency us 50%/avg/overall, MB/s avg/overall,"
              << " msg/s avg/overall)\n[ figures  ]   through vib (" << transports
              << "): " << final_line(client_run.output) << "\n";
  }

  // The same UCP test between two plain processes of this host, without
  // vib, over `transports` (printed beside vib's figures; nothing asserted
  // of them: a host without that transport prints "unavailable").
  void print_direct(const std::vector<std::string>& test, const std::string& transports) {
    const unsigned tcp_port = vib::test::free_port();
    std::vector<std::string> server = {"/usr/bin/ucx_perftest", "-p", std::to_string(tcp_port), "-n", "200", "-w", "20"};
    server.insert(server.end(), test.begin(), test.end());
    std::vector<std::string> client = server;
    client.insert(client.begin() + 1, "127.0.0.1");
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    const std::string server_out = output("direct-server"), client_out = output("direct-client");
    const pid_t s = start_native(server, transports, server_out);
    while (!vib::test::listening(s, tcp_port) && std::chrono::steady_clock::now() < deadline &&
           !vib::test::has_exited(s))
      std::this_thread::sleep_for(10ms);
    const pid_t c = start_native(client, transports, client_out);
    const auto client_run = vib::test::finish_program(c, client_out, deadline);
    vib::test::finish_program(s, server_out, deadline);
    const std::string figures = final_line(client_run.output);
    std::cout << "[ figures  ]   direct (" << transports << "): " << (figures.empty() ? "unavailable" : figures)
              << "\n";
  }
};

TEST_F(Ucx, UcxInfoListsTheVibDeviceWithRcVerbs) {
  const auto run = run_with_device_node(5, {"/usr/bin/ucx_info", "-d", "-t", "rc_verbs"});
  EXPECT_FALSE(run.timed_out) << run.output;
  EXPECT_TRUE(WIFEXITED(run.status) && WEXITSTATUS(run.status) == 0) << run.output;
  EXPECT_NE(run.output.find("Memory domain: vib0"), std::string::npos) << run.output;
  EXPECT_NE(run.output.find("Transport: rc_verbs"), std::string::npos) << run.output;
  EXPECT_NE(run.output.find("Device: vib0:1"), std::string::npos) << run.output;
}


// UCP over vib: tag matching, through rc_verbs with ud_verbs for wire-up.
// Each prints its figures next to the same test between two processes
// without vib: over UCX's shared memory (the floor of any host-local path)
// and over TCP on loopback.
TEST_F(Ucx, PerftestTagLatencyBetweenTwoGuests) {
  perftest_between_two_guests({"-t", "tag_lat", "-s", "8"}, "rc_verbs,ud_verbs");
  print_direct({"-t", "tag_lat", "-s", "8"}, "posix,self");
  print_direct({"-t", "tag_lat", "-s", "8"}, "tcp,self");
}

TEST_F(Ucx, PerftestTagBandwidthBetweenTwoGuests) {
  perftest_between_two_guests({"-t", "tag_bw", "-s", "65536"}, "rc_verbs,ud_verbs");
  print_direct({"-t", "tag_bw", "-s", "65536"}, "posix,self");
  print_direct({"-t", "tag_bw", "-s", "65536"}, "tcp,self");
}

// UCT over vib: zero-copy RDMA writes from a registered 64 KiB buffer.
TEST_F(Ucx, PerftestPutBandwidthBetweenTwoGuests) {
  perftest_between_two_guests({"-d", "vib0:1", "-x", "rc_verbs", "-t", "put_bw", "-D", "zcopy", "-s", "65536"},
                              "rc_verbs");
}

TEST_F(Ucx, PerftestActiveMessageLatencyBetweenTwoGuests) {
  perftest_between_two_guests({"-d", "vib0:1", "-x", "rc_verbs", "-t", "am_lat", "-s", "8"}, "rc_verbs");
}

TEST_F(Ucx, PerftestActiveMessageLatencyOverUdBetweenTwoGuests) {
  perftest_between_two_guests({"-d", "vib0:1", "-x", "ud_verbs", "-t", "am_lat", "-s", "8"}, "ud_verbs");
}

}  // namespace
