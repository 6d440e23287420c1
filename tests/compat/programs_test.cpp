// Unmodified verbs programs on vib: Debian's own binaries (ibverbs-utils,
// perftest) run with LD_LIBRARY_PATH pointing at our libibverbs.so.1, as
// two guest processes — the server in domain 5, the client in domain 6 —
// of the host-local Xen, through a real vibd on the software HCA. They
// exchange LID/QPN/PSN (and GID) over TCP on localhost, as on a fabric.
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

using vib::test::finish_program;
using vib::test::free_port;
using vib::test::listening;
using vib::test::ProgramRun;
using vib::test::slurp;

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
    const auto env = vib::test::guest_environment(VIB_IBVERBS_DIR, xen_.dir());
    return vib::test::start_guest_program(env, domid, argv, out);
  }
  static ProgramRun finish(pid_t pid, const std::string& out, std::chrono::steady_clock::time_point deadline) {
    return finish_program(pid, out, deadline);
  }

  ProgramRun run_one(vib::platform::DomId domid, const std::vector<std::string>& argv, std::chrono::seconds limit = 30s) {
    const std::string out = xen_.dir() + "/single.out";
    return finish(start(domid, argv, out), out, std::chrono::steady_clock::now() + limit);
  }

  // Server in domain 5, client in domain 6 (its last argument the server,
  // after `client_args`).
  std::pair<ProgramRun, ProgramRun> run_pair(const std::string& program, std::vector<std::string> args,
                                             std::chrono::seconds limit = 30s,
                                             const std::vector<std::string>& client_args = {}) {
    const unsigned port = free_port();
    std::vector<std::string> server = {program, "-p", std::to_string(port)};
    server.insert(server.end(), args.begin(), args.end());
    std::vector<std::string> client = server;
    client.insert(client.end(), client_args.begin(), client_args.end());
    client.push_back("localhost");
    return vib::test::run_program_pair(vib::test::guest_environment(VIB_IBVERBS_DIR, xen_.dir()),
                                       {5, server, xen_.dir() + "/server.out"},
                                       [port](pid_t s) { return vib::test::listening(s, port); },
                                       {6, client, xen_.dir() + "/client.out"}, std::chrono::steady_clock::now() + limit);
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
  // Every attribute the device reports, as vibd's limits shape it.
  EXPECT_TRUE(std::regex_search(run.output, std::regex(R"(max_sge_rd:\s+16
)"))) << run.output;
  EXPECT_TRUE(std::regex_search(run.output, std::regex(R"(max_res_rd_atom:\s+[1-9]\d*
)"))) << run.output;
  EXPECT_TRUE(std::regex_search(run.output, std::regex(R"(max_srq_sge:\s+16
)"))) << run.output;
  EXPECT_TRUE(std::regex_search(run.output, std::regex(R"(device_cap_flags_ex:\s+0x3400
)"))) << run.output;
}

// infiniband-diags' ibstat reads CAs through libibumad, which vib answers
// from verbs (no sysfs CA in a guest).
TEST_F(Programs, IbstatShowsTheVibCaAndItsPort) {
  const ProgramRun run = run_one(5, {"/usr/sbin/ibstat"});
  expect_ok(run, "ibstat", R"(CA 'vib0')");
  for (const char* line : {"Firmware version: vib-soft 1.0", "State: Active", "Physical state: LinkUp", "Rate: 100",
                           "Base lid: 1", "Port GUID: 0x0002c9fffe000001", "Link layer: InfiniBand"})
    EXPECT_NE(run.output.find(line), std::string::npos) << line << " in:\n" << run.output;
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

// The project's own data check through vib: SEND with immediate, RDMA
// WRITE (with and without immediate), RDMA READ and atomics from 1 byte to
// 64 KiB, every byte checked where it lands (the pingpongs check nothing).
TEST_F(Programs, RdmaCheckVerifiesEveryByteOfEveryOperation) {
  expect_pair_ok(run_pair(RDMA_CHECK, {"-n", "16"}),
                 R"(16 iterations of SEND with immediate, RDMA WRITE, RDMA WRITE with immediate, RDMA READ, )"
                 R"(fetch-and-add and compare-and-swap, 1 to 65536 bytes: \d+ bytes verified here, all correct)");
}

// A program that had the device open when its back-end died (vibd killed
// and started again, as systemd's Restart= does) gets IBV_EVENT_DEVICE_FATAL,
// opens the device again and goes on: rdma_check -r closes everything,
// reopens, reconnects with its peer and redoes the interrupted iteration,
// every byte still checked; -E ends it 20 iterations later.
TEST_F(Programs, RdmaCheckReopensTheDeviceAfterVibdRestarts) {
  const unsigned port = free_port();
  std::vector<std::string> server = {RDMA_CHECK, "-p", std::to_string(port), "-n", "100000", "-r", "1"};
  std::vector<std::string> client = server;
  client.insert(client.end(), {"-E", "20", "localhost"});
  const std::string server_out = xen_.dir() + "/server.out", client_out = xen_.dir() + "/client.out";
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  const pid_t s = start(5, server, server_out);
  while (!listening(s, port) && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(10ms);
  const pid_t c = start(6, client, client_out);
  // Both have set up and are moving data: any moment from here on is one
  // the programs must survive.
  auto connected = [&](const std::string& out) { return slurp(out).find("connected to the peer") != std::string::npos; };
  while (!(connected(server_out) && connected(client_out)) && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(10ms);
  ASSERT_TRUE(connected(server_out) && connected(client_out)) << slurp(server_out) << slurp(client_out);
  kill_vibd();
  start_vibd(VIBD, xen_.dir() + "/vibd-again.log");
  const ProgramRun client_run = finish(c, client_out, deadline);
  const ProgramRun server_run = finish(s, server_out, deadline);
  for (const auto* run : {&server_run, &client_run}) {
    EXPECT_FALSE(run->timed_out) << run->output;
    EXPECT_TRUE(WIFEXITED(run->status) && WEXITSTATUS(run->status) == 0) << "status " << run->status << ":\n"
                                                                          << run->output;
    EXPECT_TRUE(std::regex_search(run->output, std::regex(R"(bytes verified here, all correct)"))) << run->output;
    EXPECT_NE(run->output.find("lost the device and reopened it 1 times"), std::string::npos) << run->output;
  }
  const std::string fatal = "the device is lost (IBV_EVENT_DEVICE_FATAL)";
  EXPECT_TRUE(client_run.output.find(fatal) != std::string::npos || server_run.output.find(fatal) != std::string::npos)
      << "one of them saw the fatal event itself";
  if (HasFailure()) ADD_FAILURE() << "vibd logs:\n" << slurp(xen_.dir() + "/vibd.log") << slurp(xen_.dir() + "/vibd-again.log");
}

// ... and it can fail: one flipped byte in the last RDMA WRITE (-x on the
// client) is found by the server, and both exit 1.
TEST_F(Programs, RdmaCheckFindsAFlippedByte) {
  const auto [server, client] = run_pair(RDMA_CHECK, {"-n", "3"}, 30s, {"-x"});
  for (const ProgramRun* run : {&server, &client}) {
    EXPECT_FALSE(run->timed_out) << run->output;
    EXPECT_TRUE(WIFEXITED(run->status) && WEXITSTATUS(run->status) == 1) << "status " << run->status << ":\n"
                                                                          << run->output;
  }
  EXPECT_NE(server.output.find("rdma_check: FAIL: iteration 2, RDMA WRITE of 4096 bytes: 1 bytes differ, the first at "
                               "offset 2048"),
            std::string::npos)
      << server.output;
  EXPECT_NE(client.output.find("rdma_check: FAIL: iteration 2: the peer found a mismatch"), std::string::npos)
      << client.output;
}

}  // namespace
