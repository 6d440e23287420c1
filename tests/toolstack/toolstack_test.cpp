// The toolstack on the host-local Xen with a real vibd process: attach,
// list, detach (graceful and forced), provisioning from an xl config, the
// cleanup after a domain dies, the hotplug script, and the xl-vib command.
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <fstream>

#include <yajl/yajl_tree.h>

#include "rc_connect.hpp"
#include "vib/front/channel.hpp"
#include "vib/front/verbs.hpp"
#include "vib/libxl_ib.h"
#include "vib/libxl_ib.hpp"
#include "vib/platform/unique_fd.hpp"
#include "vib/platform/xenstore.hpp"
#include "vibd_fixture.hpp"

using namespace vib::platform;
using namespace vib::toolstack;
using namespace std::chrono_literals;

namespace {

struct Ran {
  int status = -1;  // exit status
  std::string out;  // stdout and stderr
};

Ran run(const std::string& command) {
  Ran r;
  FILE* p = ::popen(("timeout 30 " + command + " 2>&1").c_str(), "r");
  if (!p) return r;
  std::array<char, 512> buf;
  while (std::size_t n = std::fread(buf.data(), 1, buf.size(), p)) r.out.append(buf.data(), n);
  const int st = ::pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/vib-toolstack-XXXXXX";
    if (!::mkdtemp(tmpl)) throw std::runtime_error("mkdtemp");
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  const std::string& path() const { return path_; }
  void write(const std::string& name, const std::string& text, bool executable = false) const {
    std::filesystem::create_directories(std::filesystem::path(path_ + "/" + name).parent_path());
    std::ofstream(path_ + "/" + name) << text;
    if (executable) ::chmod((path_ + "/" + name).c_str(), 0755);
  }

 private:
  std::string path_;
};

class VibToolstack : public vib::test::VibdFixture {
 protected:
  void SetUp() override {
    VibdFixture::SetUp();
    ts_ = std::make_unique<Toolstack>(xen_.as(0));
  }
  // vibd runs the hotplug scripts: the project's own, from the source tree.
  // Provisioning at domain creation looks for xl's saved configs in an
  // empty directory unless a test gives one.
  void start_vibd(const std::string& script_timeout_ms = "10000", const std::string& userdata_dir = "",
                  std::vector<std::string> more = {}) {
    std::vector<std::string> args = {"--scripts-dir", HOTPLUG_DIR, "--script-timeout", script_timeout_ms,
                                     "--userdata-dir", userdata_dir.empty() ? log_.path() : userdata_dir,
                                     "--stash-dir", log_.path()};
    args.insert(args.end(), more.begin(), more.end());
    VibdFixture::start_vibd(VIBD, log_.path() + "/vibd.log", args);
  }
  // For tests of the library's own cleanup: vibd would otherwise do it first.
  void start_vibd_without_provisioning() { start_vibd("10000", "", {"--no-provision"}); }
  std::string vibd_log() const {
    std::ifstream in(log_.path() + "/vibd.log");
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

  std::optional<std::string> read(const std::string& path) { return store_->read(kNoTransaction, path); }
  bool exists(const std::string& path) { return store_->directory(kNoTransaction, path).has_value(); }
  static std::string lx(DomId domid, unsigned devid = 0) {
    return "/libxl/" + std::to_string(domid) + "/device/vib/" + std::to_string(devid);
  }
  void expect_gone(DomId domid, unsigned devid) {
    EXPECT_FALSE(exists(be(domid, devid))) << be(domid, devid);
    EXPECT_FALSE(exists(fe(domid, devid))) << fe(domid, devid);
    EXPECT_FALSE(exists(lx(domid, devid))) << lx(domid, devid);
  }

  // The Error an operation throws.
  template <typename F>
  static std::optional<Error> error_of(F&& f) {
    try {
      f();
    } catch (const Error& e) {
      return e;
    }
    return std::nullopt;
  }

  // Waits until vibd's log (of this run) contains `needle`.
  bool vibd_logged(const std::string& needle) {
    const auto deadline = std::chrono::steady_clock::now() + 5s;
    while (!contains(vibd_log(), needle))
      if (std::chrono::steady_clock::now() > deadline) return false;
      else std::this_thread::sleep_for(10ms);
    return true;
  }

  // Waits until vibd has logged letting device (domid, devid) go `times`
  // times. A device id reused before vibd noticed the old device's removal
  // is not served (vibd keeps the old Device object; see the report to the
  // back-end's owner), so tests that reuse an id wait for this first.
  bool vibd_forgot(DomId domid, unsigned devid, std::size_t times = 1) {
    const std::string needle = "dom" + std::to_string(domid) + "/vib" + std::to_string(devid) + ": removed";
    const auto deadline = std::chrono::steady_clock::now() + 5s;
    for (;;) {
      const std::string log = vibd_log();
      std::size_t n = 0;
      for (auto at = log.find(needle); at != std::string::npos; at = log.find(needle, at + 1)) ++n;
      if (n >= times) return true;
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::sleep_for(10ms);
    }
  }

  std::string xl(const std::string& args) { return std::string(XL_VIB) + " --local-xen " + xen_.dir() + " " + args; }

  TempDir log_;
  std::unique_ptr<Toolstack> ts_;
};

}  // namespace

TEST_F(VibToolstack, AttachListAndGracefulDetachWithVibd) {
  start_vibd();
  auto a = ts_->attach(5, parse_spec("hca=soft,pkeys=0x8001:0xffff,max-qps=8"));
  EXPECT_EQ(a.devid, 0u);
  EXPECT_EQ(a.backend_path, be(5, 0));
  EXPECT_EQ(a.frontend_path, fe(5, 0));
  EXPECT_EQ(read(be(5) + "/state"), "2") << "attach returns once the back-end is in InitWait";
  auto b = ts_->attach(ts_->resolve_domain("guest5"), parse_spec("hca=soft"));
  EXPECT_EQ(b.devid, 1u) << "lowest free";

  // The guest uses device 0: vibd accepted what the toolstack wrote.
  vib::front::ChannelOptions options;
  options.xen = xen_.as(5);
  auto channel = vib::front::Channel::open(options);
  vibif_request req{};
  req.hdr.op = VIBIF_OP_QUERY_DEVICE;
  auto rsp = channel->call(req);
  ASSERT_EQ(rsp.hdr.status, VIBIF_OK);
  EXPECT_EQ(rsp.u.query_device.max_qp, 8u) << "the quota reached the guest";

  auto list = ts_->list(5);
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[0].devid, 0u);
  EXPECT_EQ(list[0].state, 4) << "Connected";
  EXPECT_EQ(list[0].frontend_state, 4);
  EXPECT_EQ(list[0].hca, "soft");
  EXPECT_EQ(list[0].port, 1u);
  EXPECT_EQ(list[0].contexts, 1u);
  EXPECT_TRUE(list[0].online);
  EXPECT_EQ(list[1].state, 2);
  EXPECT_EQ(list[1].contexts, 0u);
  EXPECT_TRUE(ts_->list(6).empty());

  // Graceful: vibd closes the device (and the open context) itself.
  auto result = ts_->detach(5, 0);
  EXPECT_FALSE(result.forced) << result.note;
  expect_gone(5, 0);
  EXPECT_TRUE(exists(be(5, 1)));
  EXPECT_TRUE(contains(vibd_log(), "dom5/vib0: InitWait -> Connected"));
  EXPECT_TRUE(eventually(be(5, 0) + "/state", std::nullopt));
  channel.reset();
  EXPECT_FALSE(ts_->detach(5, 1).forced);
  EXPECT_FALSE(exists("/local/domain/0/backend/vib/5")) << "empty per-domain directories go too";
  EXPECT_FALSE(exists("/libxl/5/device/vib"));
  EXPECT_TRUE(ts_->list(5).empty());
  EXPECT_EQ(stop_vibd(), 0);
}

TEST_F(VibToolstack, XenstoreLsShowsLibxlsLayoutAndPermissions) {
  start_vibd();
  ts_->attach(5, parse_spec("hca=soft,max-pds=4"));
  int status = 0;
  const std::string tree = xen_.xenstore_tool("xenstore-ls -fp /local/domain/0/backend/vib/5/0", &status);
  ASSERT_EQ(status, 0) << tree;
  for (const char* line : {
           "/local/domain/0/backend/vib/5/0/frontend = \"/local/domain/5/device/vib/0\"   (n0,r5)",
           "/local/domain/0/backend/vib/5/0/frontend-id = \"5\"   (n0,r5)",
           "/local/domain/0/backend/vib/5/0/online = \"1\"   (n0,r5)",
           "/local/domain/0/backend/vib/5/0/handle = \"0\"   (n0,r5)",
           "/local/domain/0/backend/vib/5/0/hca = \"soft\"   (n0,r5)",
           "/local/domain/0/backend/vib/5/0/port = \"1\"   (n0,r5)",
           "/local/domain/0/backend/vib/5/0/max-pds = \"4\"   (n0,r5)",
           "/local/domain/0/backend/vib/5/0/state = \"2\"   (n0,r5)",
       })
    EXPECT_TRUE(contains(tree, line)) << line << "\n" << tree;
  const std::string front = xen_.xenstore_tool("xenstore-ls -fp /local/domain/5/device/vib/0");
  for (const char* line : {
           "/local/domain/5/device/vib/0/backend = \"/local/domain/0/backend/vib/5/0\"   (n5,r0)",
           "/local/domain/5/device/vib/0/backend-id = \"0\"   (n5,r0)",
           "/local/domain/5/device/vib/0/state = \"1\"   (n5,r0)",
           "/local/domain/5/device/vib/0/handle = \"0\"   (n5,r0)",
       })
    EXPECT_TRUE(contains(front, line)) << line << "\n" << front;
  const std::string record = xen_.xenstore_tool("xenstore-ls -fp /libxl/5/device/vib/0");
  EXPECT_TRUE(contains(record, "/libxl/5/device/vib/0/backend = \"/local/domain/0/backend/vib/5/0\"   (n0)")) << record;

  // What the permissions mean: the guest reads its back-end but cannot
  // change it; another guest sees nothing of either side.
  auto guest = open_xenstore(xen_.as(5));
  EXPECT_EQ(guest->read(kNoTransaction, be(5) + "/hca"), "soft");
  EXPECT_THROW(guest->write(kNoTransaction, be(5) + "/hca", "mlx5_0"), std::system_error);
  EXPECT_THROW(guest->read(kNoTransaction, lx(5) + "/backend"), std::system_error);
  auto other = open_xenstore(xen_.as(6));
  EXPECT_THROW(other->read(kNoTransaction, be(5) + "/hca"), std::system_error);
  EXPECT_THROW(other->read(kNoTransaction, fe(5) + "/state"), std::system_error);
}

TEST_F(VibToolstack, DeviceIdsAndRefusals) {
  start_vibd();
  EXPECT_EQ(ts_->attach(5, parse_spec("hca=soft,devid=7")).devid, 7u);
  auto taken = error_of([&] { ts_->attach(5, parse_spec("hca=soft,devid=7")); });
  ASSERT_TRUE(taken);
  EXPECT_EQ(taken->code(), ErrorCode::exists);
  EXPECT_TRUE(contains(taken->what(), "vib device 7 of domain 5 already exists")) << taken->what();
  EXPECT_EQ(ts_->attach(5, parse_spec("hca=soft")).devid, 0u);
  EXPECT_EQ(ts_->attach(5, parse_spec("hca=soft,backend=Domain-0")).devid, 1u);

  struct Case {
    DomId domid;
    const char* spec;
    ErrorCode code;
    const char* says;
  } cases[] = {
      {0, "hca=soft", ErrorCode::invalid, "not domain 0"},
      {9, "hca=soft", ErrorCode::not_found, "domain 9 does not exist"},
      {5, "backend=guest5", ErrorCode::invalid, "its own back-end"},
      {5, "backend=99", ErrorCode::not_found, "back-end domain 99 does not exist"},
      {5, "backend=nosuchdomain", ErrorCode::not_found, "no domain named 'nosuchdomain'"},
  };
  for (const auto& c : cases) {
    auto e = error_of([&] { ts_->attach(c.domid, parse_spec(c.spec)); });
    ASSERT_TRUE(e) << c.spec;
    EXPECT_EQ(e->code(), c.code) << c.spec;
    EXPECT_TRUE(contains(e->what(), c.says)) << e->what();
  }
  EXPECT_EQ(ts_->resolve_domain("guest6"), 6);
  EXPECT_EQ(ts_->resolve_domain("6"), 6);
  EXPECT_EQ(error_of([&] { ts_->resolve_domain("99999"); })->code(), ErrorCode::invalid);
  auto missing = error_of([&] { ts_->detach(5, 3); });
  ASSERT_TRUE(missing);
  EXPECT_EQ(missing->code(), ErrorCode::not_found);
  EXPECT_EQ(ts_->list(5).size(), 3u);
}

TEST_F(VibToolstack, ABackendErrorFailsTheAttachAndLeavesNothing) {
  start_vibd();
  auto e = error_of([&] { ts_->attach(5, parse_spec("hca=mlx5_nonexistent")); });
  ASSERT_TRUE(e);
  EXPECT_EQ(e->code(), ErrorCode::backend);
  EXPECT_TRUE(contains(e->what(), "mlx5_nonexistent")) << "vibd's error text: " << e->what();
  expect_gone(5, 0);
  ASSERT_TRUE(vibd_forgot(5, 0));
  EXPECT_EQ(ts_->attach(5, parse_spec("hca=soft")).devid, 0u) << "the id is free again";
}

TEST_F(VibToolstack, AttachWithoutVibdFailsAtOnceAndLeavesNothing) {
  // No announcement: nothing to wait for.
  AttachOptions options;
  options.timeout = 60s;
  auto e = error_of([&] { ts_->attach(5, parse_spec("hca=soft"), options); });
  ASSERT_TRUE(e);
  EXPECT_EQ(e->code(), ErrorCode::backend);
  EXPECT_TRUE(contains(e->what(), "no vibd serves back-end domain 0 (no /local/domain/0/libxl/vibd/state"))
      << e->what();
  expect_gone(5, 0);

  // The announcement of a vibd that crashed: its process is gone.
  pid_t dead = ::fork();
  if (dead == 0) ::_exit(0);
  ASSERT_GT(dead, 0);
  ::waitpid(dead, nullptr, 0);
  store_->write(kNoTransaction, "/local/domain/0/libxl/vibd/state", "running");
  store_->write(kNoTransaction, "/local/domain/0/libxl/vibd/pid", std::to_string(dead));
  EXPECT_FALSE(ts_->vibd_running(0));
  e = error_of([&] { ts_->attach(5, parse_spec("hca=soft"), options); });
  ASSERT_TRUE(e);
  EXPECT_EQ(e->code(), ErrorCode::backend) << e->what();
  expect_gone(5, 0);

  // A vibd that is announced and alive but does not answer: the wait runs out.
  store_->write(kNoTransaction, "/local/domain/0/libxl/vibd/pid", std::to_string(::getpid()));
  EXPECT_TRUE(ts_->vibd_running(0));
  options.timeout = 300ms;
  e = error_of([&] { ts_->attach(5, parse_spec("hca=soft"), options); });
  ASSERT_TRUE(e);
  EXPECT_EQ(e->code(), ErrorCode::timed_out);
  EXPECT_TRUE(contains(e->what(), "did not reach InitWait within 0.3 s (is vibd running there?)")) << e->what();
  expect_gone(5, 0);
}

TEST_F(VibToolstack, ForcedDetachWithoutVibd) {
  AttachOptions no_wait;
  no_wait.wait = false;
  ts_->attach(5, parse_spec("hca=soft"), no_wait);
  ts_->attach(5, parse_spec("hca=soft"), no_wait);
  ASSERT_EQ(read(be(5, 0) + "/state"), "1");
  ASSERT_EQ(ts_->list(5).size(), 2u);
  EXPECT_EQ(ts_->list(5)[0].state, 1);

  // No vibd announced: nobody would answer the Closing, so it is not asked.
  DetachOptions graceful;
  graceful.timeout = 60s;
  auto result = ts_->detach(5, 0, graceful);
  EXPECT_TRUE(result.forced);
  EXPECT_TRUE(contains(result.note, "no vibd serves back-end domain 0; removed the device without it")) << result.note;
  expect_gone(5, 0);
  ts_->attach(5, parse_spec("hca=soft"), no_wait);

  // One announced that does not answer: removed anyway after the timeout, and said so.
  store_->write(kNoTransaction, "/local/domain/0/libxl/vibd/state", "running");
  store_->write(kNoTransaction, "/local/domain/0/libxl/vibd/pid", std::to_string(::getpid()));
  graceful.timeout = 300ms;
  const auto start = std::chrono::steady_clock::now();
  result = ts_->detach(5, 0, graceful);
  EXPECT_GE(std::chrono::steady_clock::now() - start, 300ms);
  EXPECT_TRUE(result.forced);
  EXPECT_TRUE(contains(result.note, "did not close the device within 0.3 s; removed it forcibly")) << result.note;
  expect_gone(5, 0);

  // --force: not even asked.
  DetachOptions force;
  force.force = true;
  force.timeout = 60s;
  const auto start2 = std::chrono::steady_clock::now();
  EXPECT_TRUE(ts_->detach(5, 1, force).forced);
  EXPECT_LT(std::chrono::steady_clock::now() - start2, 5s);
  expect_gone(5, 1);
}

TEST_F(VibToolstack, ProvisionFromConfigAtDomainCreation) {
  start_vibd();
  const std::string config =
      "name = \"guest5\"\n"
      "memory = 1024\n"
      "vib = [ 'hca=soft,port=1,pkeys=0x8001', 'hca=soft,devid=3', '' ]\n";
  auto result = ts_->provision_from_config(5, config);
  EXPECT_FALSE(result.already_provisioned);
  ASSERT_EQ(result.devices.size(), 3u);
  EXPECT_EQ(result.devices[0].devid, 0u);
  EXPECT_EQ(result.devices[1].devid, 3u) << "explicit ids are kept";
  EXPECT_EQ(result.devices[2].devid, 1u) << "the others take the lowest free ids";
  EXPECT_EQ(read(be(5, 0) + "/pkeys"), "0x8001");
  EXPECT_FALSE(read(be(5, 1) + "/hca")) << "'' leaves the HCA to vibd's default";
  // Nothing waited; vibd takes them from here.
  for (unsigned devid : {0u, 1u, 3u}) EXPECT_TRUE(eventually(be(5, devid) + "/state", "2")) << devid;

  // Again (a second @introduceDomain, a restarted vibd): nothing happens,
  // even after the administrator removed a device.
  ts_->detach(5, 3);
  auto again = ts_->provision_from_config(5, config);
  EXPECT_TRUE(again.already_provisioned);
  EXPECT_TRUE(again.devices.empty());
  EXPECT_EQ(ts_->list(5).size(), 2u);

  // All or nothing: one bad item and no device appears.
  auto bad = error_of([&] { ts_->provision_from_config(6, "vib = [ 'hca=soft', 'hca=soft,max-qps=lots' ]\n"); });
  ASSERT_TRUE(bad);
  EXPECT_EQ(bad->code(), ErrorCode::invalid);
  EXPECT_TRUE(contains(bad->what(), "bad max-qps 'lots'")) << bad->what();
  EXPECT_TRUE(contains(bad->what(), "'hca=soft,max-qps=lots'")) << bad->what();
  auto twice = error_of([&] { ts_->provision_from_config(6, "vib = [ 'devid=2', 'devid=2' ]\n"); });
  ASSERT_TRUE(twice);
  EXPECT_TRUE(contains(twice->what(), "devid 2 is given to two devices")) << twice->what();
  EXPECT_TRUE(ts_->list(6).empty());
  EXPECT_FALSE(read("/libxl/6/vib-provisioned"));
  // A config without vib= is fine and marks nothing.
  EXPECT_TRUE(ts_->provision_from_config(6, "name = \"guest6\"\n").devices.empty());
  // A lowered grant table limit is worth a warning.
  auto warned = ts_->provision_from_config(6, "max_grant_frames = 8\nvib = [ 'hca=soft' ]\n");
  ASSERT_EQ(warned.warnings.size(), 1u);
  EXPECT_TRUE(contains(warned.warnings[0], "max_grant_frames=8")) << warned.warnings[0];
}

TEST_F(VibToolstack, ProvisionFromTheConfigXlSaved) {
  start_vibd();
  TempDir userdata;
  const std::string uuid = "6f2c5d8e-93a1-4b7e-8d0a-1c2b3d4e5f60";
  EXPECT_FALSE(ts_->find_userdata(5, userdata.path())) << "no vm node yet";
  store_->write(kNoTransaction, "/local/domain/5/vm", "/vm/" + uuid);
  EXPECT_FALSE(ts_->find_userdata(5, userdata.path())) << "no file yet";
  auto missing = error_of([&] { ts_->provision_domain(5, userdata.path(), 200ms); });
  ASSERT_TRUE(missing);
  EXPECT_EQ(missing->code(), ErrorCode::not_found);

  const std::string file = "userdata-d.5." + uuid + ".xl";
  userdata.write(file, "name = \"guest5\"\nvib = [ 'hca=soft', 'hca=soft,max-pds=2' ]\n");
  EXPECT_EQ(ts_->find_userdata(5, userdata.path()), userdata.path() + "/" + file);
  auto result = ts_->provision_domain(5, userdata.path());
  ASSERT_EQ(result.devices.size(), 2u);
  EXPECT_EQ(read(be(5, 1) + "/max-pds"), "2");
  EXPECT_TRUE(eventually(be(5, 1) + "/state", "2"));

  // The same through the command, for domain 6 (hidden subcommand).
  store_->write(kNoTransaction, "/local/domain/6/vm", "/vm/" + uuid);
  userdata.write("userdata-d.6." + uuid + ".xl", "vib = [ 'hca=soft,devid=4' ]\n");
  auto ran = run(xl("vib-provision --userdata-dir " + userdata.path() + " guest6"));
  EXPECT_EQ(ran.status, 0) << ran.out;
  EXPECT_TRUE(contains(ran.out, "domain 6: vib device 4 on back-end domain 0")) << ran.out;
  ran = run(xl("vib-provision --userdata-dir " + userdata.path() + " 6"));
  EXPECT_EQ(ran.status, 0) << ran.out;
  EXPECT_TRUE(contains(ran.out, "already provisioned")) << ran.out;

  store_->write(kNoTransaction, "/local/domain/5/vm", "/vm/not-a-uuid");
  EXPECT_EQ(error_of([&] { ts_->find_userdata(5, userdata.path()); })->code(), ErrorCode::invalid);
}

TEST_F(VibToolstack, CleanupAfterDomainDeath) {
  start_vibd_without_provisioning();
  ts_->attach(5, parse_spec("hca=soft"));
  ts_->attach(5, parse_spec("hca=soft"));
  ts_->attach(6, parse_spec("hca=soft"));
  ts_->provision_from_config(5, "vib = [ 'hca=soft' ]\n");
  EXPECT_EQ(ts_->cleanup_dead_domains(), 0u) << "nobody died";
  xen_.destroy_domain(5);
  EXPECT_EQ(ts_->cleanup_dead_domains(), 3u);
  EXPECT_FALSE(exists("/local/domain/0/backend/vib/5"));
  EXPECT_FALSE(exists("/libxl/5"));
  ASSERT_EQ(ts_->list(6).size(), 1u) << "other domains keep theirs";
  EXPECT_EQ(ts_->list(6)[0].state, 2);
  EXPECT_TRUE(eventually("/local/domain/0/backend/vib/5", std::nullopt));
  // vibd let the dead domain's devices go (in no promised order).
  EXPECT_TRUE(vibd_forgot(5, 0)) << vibd_log();
  EXPECT_TRUE(vibd_forgot(5, 1)) << vibd_log();
  auto ran = run(xl("vib-cleanup"));
  EXPECT_EQ(ran.status, 0) << ran.out;
  EXPECT_TRUE(contains(ran.out, "removed 0 vib devices")) << ran.out;
  EXPECT_EQ(stop_vibd(), 0);
}

TEST_F(VibToolstack, HotplugScriptRunDirectly) {
  AttachOptions no_wait;
  no_wait.wait = false;
  ts_->attach(5, parse_spec("hca=mlx5_9,port=1"), no_wait);
  TempDir sysfs;
  auto script = [&](const std::string& action) {
    return run("env XENSTORED_PATH=" + local_xenstore_socket(xen_.dir(), 0) + " XENBUS_PATH=" + be(5) +
               " VIB_SYSFS_ROOT=" + sysfs.path() + " VIB_DEFAULTS=/nonexistent sh " HOTPLUG_DIR "/vib " + action);
  };
  // The HCA is missing.
  auto ran = script("add");
  EXPECT_EQ(ran.status, 1) << ran.out;
  EXPECT_EQ(read(be(5) + "/hotplug-status"), "error");
  const auto why = read(be(5) + "/error");
  ASSERT_TRUE(why);
  EXPECT_TRUE(contains(*why, "HCA mlx5_9 not found")) << *why;
  EXPECT_EQ(read(be(5) + "/hotplug-error"), why) << "Xen's own key too";
  // Present, port down.
  sysfs.write("class/infiniband/mlx5_9/ports/1/state", "1: DOWN\n");
  ran = script("add");
  EXPECT_EQ(ran.status, 1) << ran.out;
  EXPECT_TRUE(contains(read(be(5) + "/error").value_or(""), "port 1 of HCA mlx5_9 is not ACTIVE (state: 1: DOWN)"));
  // No such port.
  store_->write(kNoTransaction, be(5) + "/port", "2");
  EXPECT_EQ(script("add").status, 1);
  EXPECT_TRUE(contains(read(be(5) + "/error").value_or(""), "HCA mlx5_9 has no port 2"));
  // Active.
  store_->write(kNoTransaction, be(5) + "/port", "1");
  sysfs.write("class/infiniband/mlx5_9/ports/1/state", "4: ACTIVE\n");
  ran = script("add");
  EXPECT_EQ(ran.status, 0) << ran.out;
  EXPECT_EQ(read(be(5) + "/hotplug-status"), "connected");
  // The software HCA needs no sysfs; a name that would leave sysfs is refused.
  store_->write(kNoTransaction, be(5) + "/hca", "soft");
  EXPECT_EQ(script("add").status, 0);
  store_->write(kNoTransaction, be(5) + "/hca", "../../etc");
  EXPECT_EQ(script("add").status, 1);
  EXPECT_TRUE(contains(read(be(5) + "/error").value_or(""), "bad HCA name"));
  ran = script("remove");
  EXPECT_EQ(ran.status, 0) << ran.out;
  EXPECT_FALSE(read(be(5) + "/hotplug-status"));
  EXPECT_EQ(run("env XENBUS_PATH= sh " HOTPLUG_DIR "/vib add").status, 1);
}

TEST_F(VibToolstack, AttachRunsTheHotplugScript) {
  start_vibd();
  auto dev = ts_->attach(5, parse_spec("hca=soft,script=vib"));
  EXPECT_EQ(read(dev.backend_path + "/hotplug-status"), "connected");
  EXPECT_EQ(read(dev.backend_path + "/script"), "vib");
  EXPECT_FALSE(ts_->detach(5, dev.devid).forced);
  ASSERT_TRUE(vibd_forgot(5, 0, 1));
  // vibd ran it, in its own domain, for both ends of the device's life.
  EXPECT_TRUE(contains(vibd_log(), "running hotplug script " HOTPLUG_DIR "/vib add")) << vibd_log();
  EXPECT_TRUE(contains(vibd_log(), "running hotplug script " HOTPLUG_DIR "/vib remove")) << vibd_log();

  // A script that fails: its reason is the attach's error, nothing is left.
  TempDir scripts;
  scripts.write("refuse",
                "#!/bin/sh\n"
                "xenstore-write \"$XENBUS_PATH/error\" \"no RDMA for you\" \"$XENBUS_PATH/hotplug-status\" error\n"
                "exit 1\n",
                true);
  auto e = error_of([&] { ts_->attach(5, parse_spec("hca=soft,script=" + scripts.path() + "/refuse")); });
  ASSERT_TRUE(e);
  EXPECT_EQ(e->code(), ErrorCode::backend);
  EXPECT_TRUE(contains(e->what(), "no RDMA for you")) << e->what();
  expect_gone(5, 0);
  ASSERT_TRUE(vibd_forgot(5, 0, 2));

  // A script that leaves a daemon behind on its output is done when it exits.
  scripts.write("daemonize",
                "#!/bin/sh\n"
                "sleep 20 &\n"
                "xenstore-write \"$XENBUS_PATH/hotplug-status\" connected\n",
                true);
  const auto start = std::chrono::steady_clock::now();
  auto d = ts_->attach(5, parse_spec("hca=soft,script=" + scripts.path() + "/daemonize"));
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  ts_->detach(5, d.devid);
  ASSERT_TRUE(vibd_forgot(5, 0, 3));

  // A script that hangs is killed at vibd's time limit.
  EXPECT_EQ(stop_vibd(), 0);
  start_vibd("300");
  scripts.write("hang", "#!/bin/sh\nexec sleep 30\n", true);
  auto hung = error_of([&] { ts_->attach(5, parse_spec("hca=soft,script=" + scripts.path() + "/hang")); });
  ASSERT_TRUE(hung);
  EXPECT_EQ(hung->code(), ErrorCode::backend);
  EXPECT_TRUE(contains(hung->what(), "did not finish within 300 ms")) << hung->what();
  expect_gone(5, 0);
}

TEST_F(VibToolstack, VibdProvisionsTheDomainsXlCreatesAndCleansUpAfterThem) {
  TempDir userdata, stash, bin;
  // Created while vibd was down, its config saved by `xl config-update`
  // (libxl userdata "xl"): provisioned when vibd starts.
  xen_.create_domain(8);
  store_->write(kNoTransaction, "/local/domain/8/vm", "/vm/00000000-0000-4000-8000-000000000008");
  userdata.write("userdata-d.8.00000000-0000-4000-8000-000000000008.xl", "name = \"guest8\"\nvib = [ 'hca=soft' ]\n");
  start_vibd("10000", userdata.path(), {"--stash-dir", stash.path()});
  EXPECT_TRUE(eventually(be(8) + "/state", "2"));

  // `xl create` through the xl front. Xen's xl is played by a script that
  // builds the domain on the host-local Xen (and notes that it ran).
  bin.write("xl",
            "#!/bin/sh\n"
            "[ \"$1\" = create ] || exit 3\n"
            "touch " + bin.path() + "/ran\n"
            "exec " VIB_LOCALXEN " create-domain --dir " + xen_.dir() + " --domid 7 --name guest7 >/dev/null\n",
            true);
  bin.write("guest7.cfg", "name = \"guest7\"\nmemory = 512\nvib = [ 'hca=soft,script=vib' ]\n");
  const std::string front = "env VIB_REAL_XL=" + bin.path() + "/xl VIB_XL_VIB=" XL_VIB " VIB_STASH_DIR=" + stash.path() +
                            " sh " XL_FRONT " create ";
  auto ran = run(front + bin.path() + "/guest7.cfg 'vib=[\"hca=soft,script=vib\",\"hca=soft,max-qps=4\"]'");
  ASSERT_EQ(ran.status, 0) << ran.out;
  EXPECT_TRUE(std::filesystem::exists(stash.path() + "/guest7.cfg")) << "kept for vibd, by name";
  ASSERT_TRUE(eventually(be(7) + "/hotplug-status", "connected"));
  EXPECT_EQ(read(be(7) + "/state"), "2");
  EXPECT_TRUE(eventually(be(7, 1) + "/state", "2")) << "the command line's vib= wins, as in xl";
  EXPECT_EQ(read(be(7, 1) + "/max-qps"), "4");
  EXPECT_TRUE(read("/libxl/7/vib-provisioned"));

  // The domain `xl migrate` builds on this host is named "guest7--incoming"
  // until its memory is all there: it gets guest7's devices.
  xen_.create_domain(12);
  store_->write(kNoTransaction, "/local/domain/12/name", "guest7--incoming");
  EXPECT_TRUE(eventually(be(12, 1) + "/state", "2")) << vibd_log();
  EXPECT_EQ(read(be(12, 1) + "/max-qps"), "4");

  // A bad vib= line stops xl create before the domain exists.
  std::filesystem::remove(bin.path() + "/ran");
  bin.write("bad.cfg", "name = \"guest9\"\nvib = [ 'hca=soft,max-qps=lots' ]\n");
  ran = run(front + bin.path() + "/bad.cfg");
  EXPECT_EQ(ran.status, 1);
  EXPECT_TRUE(contains(ran.out, "max-qps")) << ran.out;
  EXPECT_FALSE(std::filesystem::exists(bin.path() + "/ran")) << "Xen's xl was not run";

  // A restarted vibd does not add them twice.
  EXPECT_EQ(stop_vibd(), 0);
  const auto first_log = vibd_log();
  EXPECT_TRUE(contains(first_log, "dom8: provisioned 1 vib devices from its xl config")) << first_log;
  EXPECT_TRUE(contains(first_log, "dom7: provisioned 2 vib devices from its xl config")) << first_log;
  start_vibd("10000", userdata.path(), {"--stash-dir", stash.path()});
  // The state still reads 2 from the first vibd: what shows that this one
  // serves the device is its own "add" finishing.
  ASSERT_TRUE(vibd_logged("dom7/vib0: hotplug script " HOTPLUG_DIR "/vib add: connected")) << vibd_log();
  ASSERT_TRUE(vibd_logged("dom8/vib0: InitWait")) << vibd_log();
  EXPECT_FALSE(read(be(7, 2) + "/state"));
  EXPECT_EQ(read(be(7) + "/state"), "2");

  // xl destroy: libxl removes what it knows; vibd frees the device, runs
  // its remove script and removes its directories.
  xen_.destroy_domain(7);
  EXPECT_TRUE(eventually("/local/domain/0/backend/vib/7", std::nullopt));
  EXPECT_TRUE(eventually("/libxl/7", std::nullopt));
  EXPECT_TRUE(vibd_forgot(7, 0)) << vibd_log();
  EXPECT_TRUE(vibd_forgot(7, 1)) << vibd_log();
  EXPECT_TRUE(read(be(8) + "/state")) << "another guest's devices stay";
  EXPECT_EQ(stop_vibd(), 0);
  const auto log = vibd_log();
  EXPECT_FALSE(contains(log, "provisioned")) << log;
  EXPECT_TRUE(contains(log, "running hotplug script " HOTPLUG_DIR "/vib remove")) << log;
  EXPECT_TRUE(contains(log, "removed 2 vib devices of destroyed domains")) << log;
}

TEST_F(VibToolstack, XlVibCommand) {
  auto ran = run(std::string(XL_VIB) + " --help");
  EXPECT_EQ(ran.status, 0);
  EXPECT_TRUE(contains(ran.out, "vib-attach")) << ran.out;
  EXPECT_FALSE(contains(ran.out, "vib-provision")) << "hidden";
  EXPECT_EQ(run(std::string(XL_VIB) + " vib-frobnicate").status, 2);
  EXPECT_EQ(run(xl("vib-attach")).status, 2) << "usage";

  start_vibd();
  ran = run(xl("vib-attach guest5 hca=soft port=1"));
  EXPECT_EQ(ran.status, 0) << ran.out;
  ran = run(xl("vib-attach 5 hca=soft,colour=blue"));
  EXPECT_EQ(ran.status, 1);
  EXPECT_TRUE(contains(ran.out, "xl vib-attach: vib spec 'hca=soft,colour=blue': unknown key 'colour'")) << ran.out;
  ran = run(xl("vib-attach 42 hca=soft"));
  EXPECT_EQ(ran.status, 1);
  EXPECT_TRUE(contains(ran.out, "domain 42 does not exist")) << ran.out;

  ran = run(xl("vib-list 5 6"));
  EXPECT_EQ(ran.status, 0) << ran.out;
  EXPECT_TRUE(contains(ran.out, "Idx BE  Hdl State HCA        Port Ctx BE-path\n")) << ran.out;
  EXPECT_TRUE(contains(ran.out, "0   0   0   2     soft       1    0   /local/domain/0/backend/vib/5/0\n")) << ran.out;
  ran = run(xl("vib-list --json guest5"));
  EXPECT_EQ(ran.status, 0) << ran.out;
  EXPECT_TRUE(contains(ran.out, "\"hca\": \"soft\"")) << ran.out;
  EXPECT_TRUE(contains(ran.out, "\"state-name\": \"InitWait\"")) << ran.out;
  ran = run(xl("vib-list 5 nosuch"));
  EXPECT_EQ(ran.status, 1) << "a bad domain fails the command, the others are listed";
  EXPECT_TRUE(contains(ran.out, "/local/domain/0/backend/vib/5/0")) << ran.out;

  ran = run(xl("vib-detach 5 0"));
  EXPECT_EQ(ran.status, 0) << ran.out;
  ran = run(xl("vib-detach 5 0"));
  EXPECT_EQ(ran.status, 1);
  EXPECT_TRUE(contains(ran.out, "domain 5 has no vib device 0")) << ran.out;
  stop_vibd();
  EXPECT_EQ(run(xl("vib-attach 5 hca=soft --timeout 0.2")).status, 1);
  AttachOptions no_wait;
  no_wait.wait = false;
  ts_->attach(5, parse_spec("hca=soft"), no_wait);
  ran = run(xl("vib-detach --timeout 0.2 5 0"));
  EXPECT_EQ(ran.status, 0) << ran.out;
  EXPECT_TRUE(contains(ran.out, "warning: vib device 0 of domain 5: no vibd serves back-end domain 0")) << ran.out;
}

TEST_F(VibToolstack, XlFrontScriptRoutes) {
  const std::string front = std::string("env VIB_REAL_XL=/bin/echo VIB_XL_VIB=/bin/echo sh ") + XL_FRONT;
  // create: the hook sees xl create's arguments, then Xen's xl gets
  // exactly the same command line.
  auto ran = run(front + " -v create -c 'guest one.cfg'");
  EXPECT_EQ(ran.out, "vib-create-hook -- -c guest one.cfg\n-v create -c guest one.cfg\n");
  // A failing hook (a bad vib= line) stops it, with the hook's status.
  ran = run(std::string("env VIB_REAL_XL=/bin/echo VIB_XL_VIB=/bin/false sh ") + XL_FRONT + " create x.cfg");
  EXPECT_EQ(ran.status, 1);
  EXPECT_EQ(ran.out, "");
  // migrate: the hook sends the kept config first, the same way.
  ran = run(front + " -t migrate -s 'ssh -p 2222' guest host2");
  EXPECT_EQ(ran.out, "vib-migrate-hook -- -s ssh -p 2222 guest host2\n-t migrate -s ssh -p 2222 guest host2\n");
  ran = run(std::string("env VIB_REAL_XL=/bin/echo VIB_XL_VIB=/bin/false sh ") + XL_FRONT + " migrate guest host2");
  EXPECT_EQ(ran.status, 1) << "a config that could not be sent stops the migration";
  EXPECT_EQ(ran.out, "");
  ran = run(front + " list");
  EXPECT_EQ(ran.out, "list\n");
  // Ours: xl's global flags dropped, the rest passed on.
  ran = run(front + " -v vib-list --json 5");
  EXPECT_EQ(ran.out, "vib-list --json 5\n");
  // And for real, into xl-vib.
  ran = run(std::string("env VIB_REAL_XL=/bin/false VIB_XL_VIB=") + XL_VIB + " sh " + XL_FRONT + " vib-list --help");
  EXPECT_EQ(ran.status, 0) << ran.out;
  EXPECT_TRUE(contains(ran.out, "Usage: xl vib-list")) << ran.out;
  // The real xl's exit status comes back.
  EXPECT_EQ(run(std::string("env VIB_REAL_XL=/bin/false sh ") + XL_FRONT + " list").status, 1);
  // Without Xen's xl (vib-backend installed before xen-utils-common, or
  // without it) the front says so instead of a bare "not found".
  ran = run(std::string("env VIB_REAL_XL=/nonexistent/xl sh ") + XL_FRONT + " list");
  EXPECT_EQ(ran.status, 127);
  EXPECT_TRUE(contains(ran.out, "Xen's xl (/nonexistent/xl) is not installed")) << ran.out;
}

// `xl migrate 5 host2` through the front: the hook finds domain 5's name,
// and hands its kept config to xl's ssh command for the target host.
TEST_F(VibToolstack, XlMigrateHookSendsTheKeptConfigOfTheDomainGivenByIdOrName) {
  const auto name = read("/local/domain/5/name");
  ASSERT_TRUE(name);
  TempDir dir;
  const std::string config = "name = \"" + *name + "\"\nvib = [ 'hca=soft' ]\n";
  dir.write("stash/" + *name + ".cfg", config);
  dir.write("fake-ssh", "#!/bin/sh\nprintf '%s\\n' \"$@\" > " + dir.path() + "/args\ncat > " + dir.path() +
                            "/received\n",
            /*executable=*/true);
  for (const std::string& domain : {std::string("5"), *name}) {
    SCOPED_TRACE(domain);
    std::filesystem::remove(dir.path() + "/received");
    auto ran = run(xl("vib-migrate-hook --stash-dir " + dir.path() + "/stash -- -s " + dir.path() + "/fake-ssh " +
                      domain + " host2"));
    EXPECT_EQ(ran.status, 0) << ran.out;
    EXPECT_TRUE(contains(ran.out, "sent the vib config of " + *name + " to host2")) << ran.out;
    std::ifstream received(dir.path() + "/received"), args(dir.path() + "/args");
    std::stringstream text, words;
    text << received.rdbuf();
    words << args.rdbuf();
    EXPECT_EQ(text.str(), config);
    EXPECT_EQ(words.str().rfind("host2\n", 0), 0u) << words.str();
    EXPECT_TRUE(contains(words.str(), dir.path() + "/stash/" + *name + ".cfg")) << words.str();
  }
  auto ran = run(xl("vib-migrate-hook -- -s " + dir.path() + "/fake-ssh 77 host2"));
  EXPECT_EQ(ran.status, 1);
  EXPECT_TRUE(contains(ran.out, "xl migrate: domain 77 does not exist")) << ran.out;
}

TEST_F(VibToolstack, OneVibdPerDomainAndACrashedOneDoesNotBlockItsRestart) {
  start_vibd();
  ASSERT_GT(pid_, 0);
  const std::string dir = "/local/domain/0/libxl/vibd";
  EXPECT_EQ(read(dir + "/state"), "running");
  EXPECT_EQ(read(dir + "/pid"), std::to_string(pid_));
  EXPECT_EQ(store_->get_permissions(kNoTransaction, dir),
            (vib::platform::NodePermissions{{0, vib::platform::Access::none}}))
      << "only its domain (and dom0) read it";
  EXPECT_TRUE(ts_->vibd_running(0));

  // A second vibd for the same domain refuses, says why, and leaves the
  // first one's announcement alone.
  pid_t second = vib::test::spawn_vibd(VIBD, xen_.dir(), log_.path() + "/second.log", {"--no-provision"});
  int status = 0;
  ASSERT_EQ(::waitpid(second, &status, 0), second);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 3);
  std::ifstream in(log_.path() + "/second.log");
  const std::string second_log(std::istreambuf_iterator<char>(in), {});
  EXPECT_TRUE(contains(second_log, "another vibd (pid " + std::to_string(pid_) + ") already serves domain 0"))
      << second_log;
  EXPECT_EQ(read(dir + "/pid"), std::to_string(pid_));

  // A crash leaves the announcement behind; the toolstack sees through it,
  // and the next vibd starts anyway and replaces it.
  const pid_t crashed = pid_;
  ::kill(pid_, SIGKILL);
  ::waitpid(pid_, nullptr, 0);
  pid_ = -1;
  EXPECT_EQ(read(dir + "/pid"), std::to_string(crashed));
  EXPECT_FALSE(ts_->vibd_running(0));
  start_vibd();
  ASSERT_GT(pid_, 0) << vibd_log();
  EXPECT_EQ(read(dir + "/pid"), std::to_string(pid_));
  // start_vibd returns when the new pid is announced; vibd logs the
  // replacement after that commit, so the line is waited for, not assumed.
  EXPECT_TRUE(vibd_logged("replaced the announcement of vibd pid " + std::to_string(crashed))) << vibd_log();
  EXPECT_EQ(ts_->attach(5, parse_spec("hca=soft")).devid, 0u) << "and it serves";

  // A clean stop removes it.
  EXPECT_EQ(stop_vibd(), 0);
  EXPECT_FALSE(exists(dir));
  EXPECT_FALSE(ts_->vibd_running(0));
}

#ifdef VIB_HAVE_SYSTEMD
// vibd.service is Type=notify: systemd takes vibd for started at READY=1.
TEST_F(VibToolstack, VibdTellsSystemdWhenItServesWhatItServesAndWhenItStops) {
  // A device that exists before vibd starts: READY=1 means vibd took it.
  AttachOptions no_wait;
  no_wait.wait = false;
  ts_->attach(5, parse_spec("hca=soft"), no_wait);
  // What systemd listens on (sd_notify(3): a datagram socket in NOTIFY_SOCKET).
  const std::string path = log_.path() + "/notify";
  vib::platform::UniqueFd sock(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  ASSERT_TRUE(sock);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  ASSERT_EQ(::bind(sock.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ::setenv("NOTIFY_SOCKET", path.c_str(), 1);
  start_vibd();
  ::unsetenv("NOTIFY_SOCKET");
  // The messages, in order, until one contains `want`.
  std::string received;
  auto until = [&](const std::string& want) {
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    while (!contains(received, want) && std::chrono::steady_clock::now() < deadline) {
      pollfd p{sock.get(), POLLIN, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      char buf[512];
      const auto n = ::recv(sock.get(), buf, sizeof buf, 0);
      if (n > 0) received.append(buf, static_cast<std::size_t>(n)).append("\n");
    }
    return contains(received, want);
  };
  ASSERT_TRUE(until("READY=1")) << received;
  EXPECT_EQ(read(be(5, 0) + "/state"), "2") << "READY=1 came after vibd took the device";
  EXPECT_TRUE(until("STATUS=serving 1 vib devices (0 connected), 0 guest contexts")) << received;
  EXPECT_EQ(stop_vibd(), 0);
  EXPECT_TRUE(until("STOPPING=1")) << received;
  EXPECT_LT(received.find("READY=1"), received.find("STOPPING=1"));
}
#endif  // VIB_HAVE_SYSTEMD (vibd notifies only when built with libsystemd)

namespace {

// yajl_tree helpers for `xl vib-list --json`.
struct JsonFree {
  void operator()(yajl_val v) const { yajl_tree_free(v); }
};
using Json = std::unique_ptr<std::remove_pointer_t<yajl_val>, JsonFree>;

yajl_val at(yajl_val v, std::initializer_list<const char*> path) {
  std::vector<const char*> p(path);
  p.push_back(nullptr);
  return yajl_tree_get(v, p.data(), yajl_t_any);
}
long long integer(yajl_val v, std::initializer_list<const char*> path) {
  yajl_val n = at(v, path);
  return n && YAJL_IS_INTEGER(n) ? YAJL_GET_INTEGER(n) : -1;
}

}  // namespace

TEST_F(VibToolstack, XlVibListLongShowsLiveCounters) {
  start_vibd("10000", "", {"--status-interval", "100"});
  ts_->attach(5, parse_spec("hca=soft,max-qps=8,max-pinned-pages=1000"));
  using vib::toolstack::ContextStatus;
  using vib::toolstack::DeviceInfo;

  // vibd publishes at most every 100 ms: waits until the one context's
  // published status satisfies `done`.
  auto wait_published = [&](const std::function<bool(const DeviceInfo&, const ContextStatus&)>& done) {
    std::string seen;  // what was published last, for the failure message
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    while (std::chrono::steady_clock::now() < deadline) {
      seen.clear();
      for (const auto& d : ts_->list(5, /*with_status=*/true)) {
        if (!d.status) continue;
        seen += vib::toolstack::format_status(*d.status) + "\n";
        for (const auto& c : d.status->contexts) seen += "  " + vib::toolstack::format_status(c) + "\n";
        if (d.status->contexts.size() == 1 && done(d, d.status->contexts[0])) return d;
      }
      std::this_thread::sleep_for(20ms);
    }
    ADD_FAILURE() << "vibd never published what the guest did; last seen:\n" << seen;
    return DeviceInfo{};
  };

  // A guest process creates objects of every kind but AHs, moves one
  // message between its two QPs, and has one request refused.
  vib::front::ChannelOptions options;
  options.xen = xen_.as(5);
  auto device = vib::front::Device::open(options);
  auto pd = device->alloc_pd();
  auto cq_a = device->create_cq(16), cq_b = device->create_cq(16);
  vib::front::QpInit init;
  init.cap = ibv_qp_cap{16, 16, 1, 1, 0};
  init.send_cq = init.recv_cq = cq_a.get();
  auto qp_a = pd->create_qp(init);
  init.send_cq = init.recv_cq = cq_b.get();
  auto qp_b = pd->create_qp(init);
  ibv_srq_init_attr srq_init{};
  srq_init.attr.max_wr = 8;
  srq_init.attr.max_sge = 1;
  auto srq = pd->create_srq(srq_init);

  // The queues' pages are pinned too; the registration adds its own.
  const vib::toolstack::ObjectCounts queues{1, 2, 2, 1, 0, 0};
  const DeviceInfo before = wait_published([&](const DeviceInfo&, const ContextStatus& c) { return c.objects == queues; });
  ASSERT_TRUE(before.status);
  const std::uint64_t queue_pages = before.status->pinned_pages();
  EXPECT_GT(queue_pages, 0u);
  std::vector<char> storage(5 * 4096);
  char* buf = storage.data() + 100;
  const int access = IBV_ACCESS_LOCAL_WRITE;
  auto mr = pd->reg_mr(buf, 8192, access);
  const auto first = reinterpret_cast<std::uintptr_t>(buf) / 4096;
  const auto last = (reinterpret_cast<std::uintptr_t>(buf) + 8192 - 1) / 4096;
  const std::uint64_t pinned = queue_pages + (last - first + 1);
  ibv_port_attr port;
  device->query_port(1, port);
  for (auto& step : vib::test::rc_connect_steps(port.lid, qp_b->qp_num(), access))
    ASSERT_EQ(qp_a->modify(step.attr, step.mask), 0);
  for (auto& step : vib::test::rc_connect_steps(port.lid, qp_a->qp_num(), access))
    ASSERT_EQ(qp_b->modify(step.attr, step.mask), 0);
  ibv_sge recv_sge{reinterpret_cast<std::uintptr_t>(buf + 4096), 64, mr->lkey()};
  ibv_recv_wr recv{};
  recv.sg_list = &recv_sge;
  recv.num_sge = 1;
  ibv_recv_wr* bad_recv = nullptr;
  ASSERT_EQ(qp_b->post_recv(&recv, &bad_recv), 0);
  std::strcpy(buf, "counted");
  ibv_sge send_sge{reinterpret_cast<std::uintptr_t>(buf), 8, mr->lkey()};
  ibv_send_wr send{};
  send.sg_list = &send_sge;
  send.num_sge = 1;
  send.opcode = IBV_WR_SEND;
  send.send_flags = IBV_SEND_SIGNALED;
  ibv_send_wr* bad_send = nullptr;
  ASSERT_EQ(qp_a->post_send(&send, &bad_send), 0);
  for (auto* cq : {cq_a.get(), cq_b.get()}) {
    ibv_wc wc{};
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    while (cq->poll(std::span<ibv_wc>(&wc, 1)) == 0 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(1ms);
    ASSERT_EQ(wc.status, IBV_WC_SUCCESS);
  }
  EXPECT_EQ(pd->dealloc(), EBUSY) << "a refused request";

  const vib::toolstack::ObjectCounts all{1, 2, 2, 1, 1, 0};
  const DeviceInfo after = wait_published([&](const DeviceInfo&, const ContextStatus& c) {
    return c.objects == all && c.request_errors == 1 && c.completions == 2;
  });
  ASSERT_TRUE(after.status);
  EXPECT_TRUE(after.vibd_running);
  EXPECT_EQ(after.status->hca, "soft0");
  EXPECT_EQ(after.status->port, 1u);
  EXPECT_EQ(after.status->quotas.qps, 8u);
  EXPECT_EQ(after.status->max_pinned_pages, 1000u);
  EXPECT_EQ(after.status->pinned_pages(), pinned);
  const ContextStatus* ctx = &after.status->contexts[0];
  EXPECT_EQ(ctx->id, device->channel().context_id());
  EXPECT_EQ(ctx->pinned_pages, pinned);
  EXPECT_EQ(ctx->wqes, 2u) << "one send, one receive";
  EXPECT_EQ(ctx->completion_errors, 0u);
  // Requests: query port, alloc PD, 2 CQs, 2 QPs, SRQ, MR, 6 modifies, the
  // refused dealloc, and what opening the device asked.
  EXPECT_GE(ctx->requests, 15u);
  const auto now = std::chrono::duration_cast<std::chrono::seconds>(
                       std::chrono::system_clock::now().time_since_epoch()).count();
  EXPECT_GT(ctx->last_activity, now - 60);
  EXPECT_LE(ctx->last_activity, now + 1);

  // The same through `xl vib-list -l --json`, and the table.
  auto ran = run(xl("vib-list -l --json 5"));
  ASSERT_EQ(ran.status, 0) << ran.out;
  char err[256];
  Json json(yajl_tree_parse(ran.out.c_str(), err, sizeof err));
  ASSERT_TRUE(json && YAJL_IS_ARRAY(json.get())) << err << ran.out;
  ASSERT_EQ(YAJL_GET_ARRAY(json.get())->len, 1u);
  yajl_val dev = YAJL_GET_ARRAY(json.get())->values[0];
  yajl_val status = at(dev, {"status"});
  ASSERT_TRUE(status) << ran.out;
  EXPECT_STREQ(YAJL_GET_STRING(at(status, {"vibd"})), "running");
  EXPECT_EQ(integer(status, {"objects", "qps"}), 2);
  EXPECT_EQ(integer(status, {"quotas", "qps"}), 8);
  EXPECT_EQ(integer(status, {"pinned-pages"}), static_cast<long long>(pinned));
  EXPECT_EQ(integer(status, {"max-pinned-pages"}), 1000);
  yajl_val contexts = at(status, {"contexts"});
  ASSERT_TRUE(contexts && YAJL_IS_ARRAY(contexts) && YAJL_GET_ARRAY(contexts)->len == 1) << ran.out;
  yajl_val c = YAJL_GET_ARRAY(contexts)->values[0];
  EXPECT_EQ(integer(c, {"id"}), static_cast<long long>(ctx->id));
  EXPECT_EQ(integer(c, {"objects", "pds"}), 1);
  EXPECT_EQ(integer(c, {"objects", "cqs"}), 2);
  EXPECT_EQ(integer(c, {"objects", "srqs"}), 1);
  EXPECT_EQ(integer(c, {"objects", "mrs"}), 1);
  EXPECT_EQ(integer(c, {"objects", "ahs"}), 0);
  EXPECT_EQ(integer(c, {"wqes"}), 2);
  EXPECT_EQ(integer(c, {"completions"}), 2);
  EXPECT_EQ(integer(c, {"request-errors"}), 1);
  ran = run(xl("vib-list -l 5"));
  ASSERT_EQ(ran.status, 0) << ran.out;
  EXPECT_TRUE(contains(ran.out, "HCA soft0 port 1, vibd running")) << ran.out;
  EXPECT_TRUE(contains(ran.out, "QPs 2/8")) << ran.out;
  EXPECT_TRUE(contains(ran.out, "pinned pages " + std::to_string(pinned) + "/1000")) << ran.out;

  // The process goes: its context leaves the status.
  qp_a.reset();
  qp_b.reset();
  srq.reset();
  mr.reset();
  pd.reset();
  cq_a.reset();
  cq_b.reset();
  device.reset();
  const std::string published = "/local/domain/0/libxl/vibd/devices/5/0";
  bool gone = false;
  for (auto end = std::chrono::steady_clock::now() + 10s; !gone && std::chrono::steady_clock::now() < end;
       std::this_thread::sleep_for(20ms))
    gone = store_->directory(kNoTransaction, published).value_or(std::vector<std::string>{"x"}).empty();
  EXPECT_TRUE(gone) << "the context's node went";

  // vibd stopped: said so, with nothing stale.
  EXPECT_EQ(stop_vibd(), 0);
  ran = run(xl("vib-list -l --json 5"));
  EXPECT_TRUE(contains(ran.out, "\"vibd\": \"not running\"")) << ran.out;
  EXPECT_FALSE(contains(ran.out, "\"contexts\": [")) << ran.out;
}

TEST_F(VibToolstack, CApi) {
  start_vibd_without_provisioning();
  vib_tk* raw = nullptr;
  char err[256];
  ASSERT_EQ(vib_tk_open(&raw, xen_.dir().c_str(), 0, err, sizeof err), VIB_TK_OK) << err;
  std::unique_ptr<vib_tk, decltype(&vib_tk_close)> tk(raw, vib_tk_close);
  unsigned domid = 0, devid = 99;
  ASSERT_EQ(vib_tk_resolve_domain(tk.get(), "guest5", &domid), VIB_TK_OK);
  EXPECT_EQ(domid, 5u);
  ASSERT_EQ(vib_tk_attach(tk.get(), domid, "hca=soft", 5000, &devid), VIB_TK_OK) << vib_tk_error(tk.get());
  EXPECT_EQ(devid, 0u);
  EXPECT_EQ(vib_tk_attach(tk.get(), domid, "hca=soft,devid=0", 5000, nullptr), VIB_TK_ERR_EXISTS);
  EXPECT_TRUE(contains(vib_tk_error(tk.get()), "already exists"));
  EXPECT_EQ(vib_tk_attach(tk.get(), 0, "hca=soft", 5000, nullptr), VIB_TK_ERR_INVALID);
  EXPECT_EQ(vib_tk_attach(tk.get(), 5, "hca=mlx5_nonexistent", 5000, nullptr), VIB_TK_ERR_BACKEND);
  char* json = nullptr;
  ASSERT_EQ(vib_tk_list_json(tk.get(), 5, &json), VIB_TK_OK);
  std::unique_ptr<char, decltype(&std::free)> owned(json, std::free);
  EXPECT_TRUE(contains(json, "\"devid\": 0")) << json;
  unsigned count = 0;
  EXPECT_EQ(vib_tk_provision(tk.get(), 6, "vib = [ 'hca=soft', 'hca=soft' ]", &count), VIB_TK_OK);
  EXPECT_EQ(count, 2u);
  EXPECT_EQ(vib_tk_provision_domain(tk.get(), 6, "/nonexistent", 0, &count), VIB_TK_ERR_NOT_FOUND);
  int forced = -1;
  EXPECT_EQ(vib_tk_detach(tk.get(), 5, 0, 0, 5000, &forced), VIB_TK_OK) << vib_tk_error(tk.get());
  EXPECT_EQ(forced, 0);
  EXPECT_EQ(vib_tk_detach(tk.get(), 5, 0, 0, 5000, &forced), VIB_TK_ERR_NOT_FOUND);
  xen_.destroy_domain(6);
  unsigned removed = 0;
  EXPECT_EQ(vib_tk_cleanup(tk.get(), &removed), VIB_TK_OK);
  EXPECT_EQ(removed, 2u);
}

TEST(VibStash, ReadsXlMigratesArgumentsAsXlDoes) {
  auto m = parse_migrate_command({"guest", "host2"});
  EXPECT_EQ(m.domain, "guest");
  EXPECT_EQ(m.host, "host2");
  EXPECT_EQ(m.ssh_command, "ssh");
  EXPECT_FALSE(m.config_file);
  m = parse_migrate_command({"-Fe", "--debug", "-s", "ssh -p 2222", "-C", "new.cfg", "--live", "7", "host2"});
  EXPECT_EQ(m.domain, "7");
  EXPECT_EQ(m.ssh_command, "ssh -p 2222");
  EXPECT_EQ(m.config_file, "new.cfg");
  m = parse_migrate_command({"-pCnew.cfg", "-s", "", "guest", "xl migrate-receive"});
  EXPECT_EQ(m.config_file, "new.cfg");
  EXPECT_EQ(m.ssh_command, "");
  EXPECT_EQ(m.host, "xl migrate-receive");
  EXPECT_THROW(parse_migrate_command({"guest"}), Error);
  EXPECT_THROW(parse_migrate_command({"guest", "host2", "extra"}), Error);
  EXPECT_THROW(parse_migrate_command({"-s"}), Error);
  EXPECT_THROW(parse_migrate_command({"--bogus", "guest", "host2"}), Error);
}

// The target host is reached through a stand-in for ssh that records the
// host and runs the remote command here; the "remote" kept configs live in
// their own directory.
TEST(VibStash, MigrateSendsTheKeptConfigThroughXlsSshCommand) {
  TempDir dir;
  const std::string here = dir.path() + "/here", there = dir.path() + "/there dir";
  dir.write("fake-ssh", "#!/bin/sh\n[ \"$1\" = -p ] && shift 2\necho \"$1\" > " + dir.path() +
                            "/host\nshift\nexec sh -c \"$*\"\n",
            /*executable=*/true);
  dir.write("failing-ssh", "#!/bin/sh\necho 'Permission denied' >&2\nexit 255\n", true);
  const std::string config = "name = \"guest\"\nvib = [ 'hca=soft' ]\n";
  dir.write("here/guest.cfg", config);
  MigrateCommand m;
  m.domain = "guest";
  m.host = "host2";
  m.ssh_command = dir.path() + "/fake-ssh -p 2222";
  EXPECT_TRUE(send_kept_config(m, "guest", here, there));
  std::ifstream sent(there + "/guest.cfg");
  std::stringstream text;
  text << sent.rdbuf();
  EXPECT_EQ(text.str(), config) << "the kept config, byte for byte";
  EXPECT_EQ(std::filesystem::status(there + "/guest.cfg").permissions() & std::filesystem::perms::all,
            std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  EXPECT_FALSE(std::filesystem::exists(there + "/guest.cfg.tmp"));
  std::ifstream host(dir.path() + "/host");
  std::string host_name;
  host >> host_name;
  EXPECT_EQ(host_name, "host2");
  // Nothing kept for a domain: nothing to send.
  EXPECT_FALSE(send_kept_config(m, "other", here, there));
  // -C: that file is what the target creates the domain from.
  dir.write("new.cfg", "name = \"guest\"\nvib = [ 'hca=soft', 'hca=soft' ]\n");
  m.config_file = dir.path() + "/new.cfg";
  EXPECT_TRUE(send_kept_config(m, "guest", here, there));
  std::ifstream resent(there + "/guest.cfg");
  std::stringstream retext;
  retext << resent.rdbuf();
  EXPECT_NE(retext.str().find("'hca=soft', 'hca=soft'"), std::string::npos);
  dir.write("plain.cfg", "name = \"guest\"\n");
  m.config_file = dir.path() + "/plain.cfg";
  EXPECT_FALSE(send_kept_config(m, "guest", here, there)) << "-C without vib= lines";
  dir.write("bad.cfg", "name = \"guest\"\nvib = [ 'hca=soft,bogus=1' ]\n");
  m.config_file = dir.path() + "/bad.cfg";
  EXPECT_THROW(send_kept_config(m, "guest", here, there), Error) << "checked like xl create's";
  m.config_file.reset();
  // A receiver on this host finds the kept config here.
  m.ssh_command = "";
  EXPECT_FALSE(send_kept_config(m, "guest", here, there));
  // An ssh that fails stops the migration, saying why.
  m.ssh_command = dir.path() + "/failing-ssh";
  try {
    send_kept_config(m, "guest", here, there);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot send the vib config of guest to host2"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("exited 255"), std::string::npos) << e.what();
  }
  EXPECT_THROW(send_kept_config(m, "../guest", here, there), Error);
}

TEST(VibStash, FindsTheConfigLikeXlCreateAndKeepsOnlyConfigsWithVibLines) {
  TempDir dir;
  dir.write("a.cfg", "name = \"a\"\nvib = [ 'hca=soft' ]\n");
  dir.write("plain.cfg", "name = \"a\"\nmemory = 256\n");
  const std::string kept = dir.path() + "/stash/a.cfg";
  EXPECT_EQ(stash_create_config({"-p", "-f", dir.path() + "/a.cfg"}, dir.path() + "/stash"), "a");
  EXPECT_TRUE(std::filesystem::exists(kept));
  std::filesystem::remove(kept);
  EXPECT_EQ(stash_create_config({"-pf" + dir.path() + "/a.cfg", "memory=300"}, dir.path() + "/stash"), "a");
  EXPECT_EQ(stash_create_config({"--defconfig=" + dir.path() + "/a.cfg"}, dir.path() + "/stash"), "a");
  EXPECT_EQ(stash_create_config({"-n", dir.path() + "/a.cfg"}, dir.path() + "/stash"), std::nullopt) << "dry run";
  EXPECT_EQ(stash_create_config({"-q"}, dir.path() + "/stash"), std::nullopt) << "no config file";
  // The same name created again without vib= lines: the kept config goes.
  EXPECT_TRUE(std::filesystem::exists(kept));
  EXPECT_EQ(stash_create_config({dir.path() + "/plain.cfg"}, dir.path() + "/stash"), std::nullopt);
  EXPECT_FALSE(std::filesystem::exists(kept));
  // Names that are not file names, and unreadable files, are errors.
  dir.write("slash.cfg", "name = \"../x\"\nvib = [ 'hca=soft' ]\n");
  EXPECT_THROW(stash_create_config({dir.path() + "/slash.cfg"}, dir.path() + "/stash"), Error);
  EXPECT_THROW(stash_create_config({dir.path() + "/missing.cfg"}, dir.path() + "/stash"), Error);
}
