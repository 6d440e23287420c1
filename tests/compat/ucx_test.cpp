// UCX (Debian's ucx-utils, unmodified) sees vib devices. UCX uses an IB
// device only if /dev/infiniband/<dev_name> is a character device the
// process may read and write; in a guest, vib's udev rule links
// /dev/infiniband/vib to the grant-allocation device. This host has neither,
// so each program runs in a mount namespace of its own whose /dev is an
// overlay with that node (a link to /dev/null): what the guest's rule
// gives, seen by this process only.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <string>
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
    start_vibd(VIBD, xen_.dir() + "/vibd.log");
    ASSERT_TRUE(eventually(be(5) + "/state", "2"));
  }

  vib::test::ProgramRun run_with_device_node(vib::platform::DomId domid, std::vector<std::string> argv) {
    const std::string overlay = xen_.dir() + "/dev-overlay";
    const std::string script = "mkdir -p " + overlay + "/upper " + overlay +
                               "/work && mount -t overlay overlay -o lowerdir=/dev,upperdir=" + overlay +
                               "/upper,workdir=" + overlay +
                               "/work /dev && mkdir -p /dev/infiniband && ln -s /dev/null /dev/infiniband/vib && "
                               "exec \"$@\"";
    std::vector<std::string> wrapped = {"/usr/bin/unshare", "--mount", "/bin/sh", "-c", script, "sh"};
    wrapped.insert(wrapped.end(), argv.begin(), argv.end());
    const auto env = vib::test::guest_environment(VIB_LIBRARY_DIR, xen_.dir());
    const std::string out = xen_.dir() + "/ucx.out";
    const pid_t pid = vib::test::start_guest_program(env, domid, wrapped, out);
    return vib::test::finish_program(pid, out, std::chrono::steady_clock::now() + 60s);
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

}  // namespace
