// Unmodified RDMA-CM programs on vib: Debian's rdmacm-utils and perftest's
// -R mode, with vib's librdmacm.so.1 and libibverbs.so.1 on
// LD_LIBRARY_PATH, as processes of guest domains 5 (192.0.2.5) and 6
// (192.0.2.6) of the host-local Xen; vibd on the software HCA is their
// connection manager. The addresses are names inside vibd only: no IP
// packet is sent (documentation range, RFC 5737).
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

using vib::test::ProgramRun;
using vib::test::slurp;

constexpr const char* kAddress5 = "192.0.2.5";
constexpr const char* kAddress6 = "192.0.2.6";

class RdmaCm : public vib::test::VibdFixture {
 protected:
  void SetUp() override {
    VibdFixture::SetUp();
    log_ = xen_.dir() + "/vibd.log";
    provision_with_ip(5, "192.0.2.5");
    provision_with_ip(6, "192.0.2.6");
    start_vibd(VIBD, log_);
    ASSERT_TRUE(eventually(be(5) + "/state", "2"));
    ASSERT_TRUE(eventually(be(6) + "/state", "2"));
  }

  pid_t start(vib::platform::DomId domid, const std::vector<std::string>& argv, const std::string& out) {
    const auto env = vib::test::guest_environment(VIB_LIBRARY_DIR, xen_.dir());
    return vib::test::start_guest_program(env, domid, argv, out);
  }

  ProgramRun run_one(vib::platform::DomId domid, const std::vector<std::string>& argv, std::chrono::seconds limit = 30s) {
    const std::string out = xen_.dir() + "/single.out";
    return vib::test::finish_program(start(domid, argv, out), out, std::chrono::steady_clock::now() + limit);
  }

  // The server in `server_dom`, then the client once vibd logged a listener
  // at `where` ("192.0.2.5 port 7174"): the servers print nothing before a
  // client connects, and a client that finds no listener is rejected at once.
  std::pair<ProgramRun, ProgramRun> run_pair(vib::platform::DomId server_dom, const std::vector<std::string>& server,
                                             const std::string& where, vib::platform::DomId client_dom,
                                             const std::vector<std::string>& client, std::chrono::seconds limit = 60s) {
    bool heard = false;
    auto runs = vib::test::run_program_pair(
        vib::test::guest_environment(VIB_LIBRARY_DIR, xen_.dir()), {server_dom, server, xen_.dir() + "/server.out"},
        [&](pid_t) { return heard = slurp(log_).find("RDMA-CM listening at " + where) != std::string::npos; },
        {client_dom, client, xen_.dir() + "/client.out"}, std::chrono::steady_clock::now() + limit);
    EXPECT_TRUE(heard) << "no listener at " << where << ":\n" << slurp(log_);
    return runs;
  }

  void expect_ok(const ProgramRun& run, const std::string& who, const std::string& pattern) {
    EXPECT_FALSE(run.timed_out) << who << " timed out:\n" << run.output;
    EXPECT_TRUE(WIFEXITED(run.status) && WEXITSTATUS(run.status) == 0)
        << who << " failed (status " << run.status << "):\n"
        << run.output;
    EXPECT_TRUE(std::regex_search(run.output, std::regex(pattern)))
        << who << " printed no /" << pattern << "/:\n"
        << run.output;
  }

  void expect_pair_ok(const std::pair<ProgramRun, ProgramRun>& runs, const std::string& server_pattern,
                      const std::string& client_pattern) {
    expect_ok(runs.first, "server", server_pattern);
    expect_ok(runs.second, "client", client_pattern);
    if (HasFailure()) ADD_FAILURE() << "vibd log:\n" << slurp(log_);
  }

  std::string log_;
};

// rping verifies every byte of every ping (-V); a few thousand round trips,
// each an RDMA READ of the client's buffer and an RDMA WRITE back.
TEST_F(RdmaCm, RpingBetweenTwoGuests) {
  const std::string count = "2000";
  auto runs = run_pair(5, {"/usr/bin/rping", "-s", "-a", kAddress5, "-V", "-C", count, "-S", "100"},
                       std::string(kAddress5) + " port 7174", 6,
                       {"/usr/bin/rping", "-c", "-a", kAddress5, "-V", "-C", count, "-S", "100"},
                       // Each ping is four completion-channel wake-ups on each side: about 2 ms
                       // on an idle 2-CPU machine, 20 ms when it is oversubscribed.
                       110s);
  expect_pair_ok(runs, "", "");
}

TEST_F(RdmaCm, RpingOverLoopbackInOneGuest) {
  auto runs = run_pair(5, {"/usr/bin/rping", "-s", "-a", "127.0.0.1", "-V", "-C", "200"}, "127.0.0.1 port 7174", 5,
                       {"/usr/bin/rping", "-c", "-a", "127.0.0.1", "-V", "-C", "200", "-v"});
  expect_pair_ok(runs, "", "ping data: rdma-ping-199");
}

TEST_F(RdmaCm, RpingWithTheApplicationsOwnQp) {
  // -q: rping creates and moves its QP itself, with rdma_init_qp_attr, and
  // passes its number in rdma_conn_param.
  auto runs = run_pair(5, {"/usr/bin/rping", "-s", "-q", "-a", kAddress5, "-V", "-C", "100"},
                       std::string(kAddress5) + " port 7174", 6,
                       {"/usr/bin/rping", "-c", "-q", "-a", kAddress5, "-V", "-C", "100"});
  expect_pair_ok(runs, "", "");
}

TEST_F(RdmaCm, AGuestCannotListenAtAnotherGuestsAddress) {
  const ProgramRun run = run_one(6, {"/usr/bin/rping", "-s", "-a", kAddress5, "-C", "1"});
  EXPECT_FALSE(run.timed_out);
  EXPECT_FALSE(WIFEXITED(run.status) && WEXITSTATUS(run.status) == 0) << run.output;
  EXPECT_NE(run.output.find("Cannot assign requested address"), std::string::npos) << run.output;
  EXPECT_NE(slurp(log_).find("CM bind to 192.0.2.5 refused"), std::string::npos);
}

TEST_F(RdmaCm, NoListenerIsARejection) {
  const ProgramRun run = run_one(6, {"/usr/bin/rping", "-c", "-a", kAddress5, "-C", "1"});
  EXPECT_FALSE(run.timed_out);
  EXPECT_FALSE(WIFEXITED(run.status) && WEXITSTATUS(run.status) == 0) << run.output;
  EXPECT_NE(run.output.find("RDMA_CM_EVENT_REJECTED, error 8"), std::string::npos) << run.output;
}

TEST_F(RdmaCm, Ucmatose) {
  auto runs = run_pair(5, {"/usr/bin/ucmatose", "-b", kAddress5, "-c", "4", "-C", "50"},
                       std::string(kAddress5) + " port 7471", 6,
                       {"/usr/bin/ucmatose", "-s", kAddress5, "-c", "4", "-C", "50"});
  expect_pair_ok(runs, "data transfers complete", "data transfers complete");
}

TEST_F(RdmaCm, Udaddy) {
  auto runs = run_pair(5, {"/usr/bin/udaddy", "-b", kAddress5, "-c", "2", "-C", "20"},
                       std::string(kAddress5) + " port 7174 (UDP)", 6,
                       {"/usr/bin/udaddy", "-s", kAddress5, "-c", "2", "-C", "20"});
  expect_pair_ok(runs, "data transfers complete", "data transfers complete");
}

TEST_F(RdmaCm, RdmaServerAndRdmaClient) {
  auto runs = run_pair(5, {"/usr/bin/rdma_server", "-s", kAddress5}, std::string(kAddress5) + " port 7471", 6,
                       {"/usr/bin/rdma_client", "-s", kAddress5});
  expect_pair_ok(runs, "rdma_server: end 0", "rdma_client: end 0");
}

// perftest's result rows: "<bytes> <iterations> ..." under the header.
const std::string kPerftestRow = R"(#bytes\s+#iterations[^\n]*\n\s*\d+\s+\d+\s+\d)";

TEST_F(RdmaCm, IbSendLatWithRdmaCm) {
  auto runs = run_pair(5, {"/usr/bin/ib_send_lat", "-R", "-n", "100"}, "0.0.0.0 port 18515", 6,
                       {"/usr/bin/ib_send_lat", "-R", "-n", "100", kAddress5});
  expect_pair_ok(runs, kPerftestRow, kPerftestRow);
}

TEST_F(RdmaCm, IbWriteBwWithRdmaCm) {
  auto runs = run_pair(5, {"/usr/bin/ib_write_bw", "-R", "-n", "100"}, "0.0.0.0 port 18515", 6,
                       {"/usr/bin/ib_write_bw", "-R", "-n", "100", kAddress5});
  expect_pair_ok(runs, "", kPerftestRow);
}

}  // namespace
