// UCX (Debian's ucx-utils, unmodified) sees vib devices. UCX uses an IB
// device only if /dev/infiniband/<dev_name> is a character device the
// process may read and write; in a guest, vib's udev rule links
// /dev/infiniband/vib to the grant-allocation device. This host has neither,
// so each program runs in a mount namespace of its own whose /dev is an
// overlay with that node (a link to /dev/null): what the guest's rule
// gives, seen by this process only.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <chrono>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "guest_programs.hpp"
#include "vibd_fixture.hpp"

using namespace std::chrono_literals;

namespace {

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
           ::waitpid(s, nullptr, WNOHANG) == 0)
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
TEST_F(Ucx, PerftestTagLatencyBetweenTwoGuests) {
  perftest_between_two_guests({"-t", "tag_lat", "-s", "8"}, "rc_verbs,ud_verbs");
}

TEST_F(Ucx, PerftestTagBandwidthBetweenTwoGuests) {
  perftest_between_two_guests({"-t", "tag_bw", "-s", "65536"}, "rc_verbs,ud_verbs");
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
