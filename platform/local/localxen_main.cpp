// vib-localxen: a Xen for machines without a hypervisor. It serves a
// xenstore (real wire protocol) and grant tables / event channels, one socket
// per simulated domain, so vibd and guest processes run as separate processes
// through the same code paths they use on Xen.
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>

extern "C" {
#include <xenstore.h>
}

#include "hypervisor/hypervisor_service.hpp"
#include "store/store_server.hpp"
#include "vib/platform/unique_fd.hpp"
#include "vib/platform/xenstore.hpp"

using namespace vib::platform;

namespace {

void usage(std::ostream& out) {
  out << "Usage: vib-localxen serve --dir DIR\n"
         "       vib-localxen create-domain --dir DIR --domid N [--name NAME] [--max-grant-frames F]\n"
         "       vib-localxen destroy-domain --dir DIR --domid N\n"
         "\n"
         "serve           run the host-local Xen in the foreground until SIGTERM/SIGINT:\n"
         "                DIR/domain/<domid>/xenstore   xenstore wire protocol (point\n"
         "                                              XENSTORED_PATH here for xenstore-*)\n"
         "                DIR/domain/<domid>/hypervisor grant tables and event channels\n"
         "create-domain   introduce a guest domain and write its xenstore home the way\n"
         "                the toolstack does (name, domid, device/, data/); its grant\n"
         "                table holds F * 512 grants (as xl's max_grant_frames; default 2048)\n"
         "destroy-domain  release a domain as libxl does: its xenstore home is removed,\n"
         "                then its connections, grants and event channels go and\n"
         "                @releaseDomain fires\n";
}

int serve(const std::string& dir) {
  std::filesystem::create_directories(dir);
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  pthread_sigmask(SIG_BLOCK, &mask, nullptr);  // before any thread starts
  UniqueFd signals(::signalfd(-1, &mask, SFD_CLOEXEC));

  auto hypervisor = local::HypervisorService::start(dir);
  auto store = local::StoreServer::start(
      dir, {[&](DomId d) { hypervisor->domain_created(d); },
            [&](DomId d) { hypervisor->domain_destroyed(d); }});
  std::cout << "vib-localxen: ready, serving " << dir << " (XENSTORED_PATH="
            << local_xenstore_socket(dir, kDom0) << ")" << std::endl;
  pollfd p{signals.get(), POLLIN, 0};
  while (::poll(&p, 1, -1) < 0 && errno == EINTR) {
  }
  std::cout << "vib-localxen: stopping" << std::endl;
  return 0;
}

struct RawHandle {
  explicit RawHandle(const std::string& dir) {
    ::setenv("XENSTORED_PATH", local_xenstore_socket(dir, kDom0).c_str(), 1);
    h = xs_open(XS_OPEN_SOCKETONLY);
  }
  ~RawHandle() {
    if (h) xs_close(h);
  }
  xs_handle* h;
};

int create_domain(const std::string& dir, DomId domid, const std::string& name, long max_grant_frames) {
  // Read by the hypervisor when the domain is introduced, as libxl gives
  // Xen the domain's table size when it creates it; none: the default.
  const auto frames_file =
      std::filesystem::path(local_hypervisor_socket(dir, domid)).parent_path() / "max_grant_frames";
  std::filesystem::create_directories(frames_file.parent_path());
  std::filesystem::remove(frames_file);
  if (max_grant_frames > 0) std::ofstream(frames_file) << max_grant_frames << "\n";
  RawHandle raw(dir);
  if (!raw.h) {
    std::cerr << "vib-localxen: cannot connect to the store: " << std::strerror(errno) << "\n";
    return 1;
  }
  auto xs = open_xenstore(XenTarget::local(dir, kDom0));
  const std::string home = xs->domain_path(domid);
  // As libxl lays out a new domain (libxl__domain_make): a home the guest may
  // read, and areas it owns for its devices and its own data; only then is
  // the domain introduced (libxl__build_post), so an @introduceDomain
  // watcher finds the home there.
  with_transaction(*xs, [&](TransactionId tx) {
    xs->write(tx, home + "/name", name);
    xs->write(tx, home + "/domid", std::to_string(domid));
    xs->set_permissions(tx, home, {{kDom0, Access::none}, {domid, Access::read}});
    xs->set_permissions(tx, home + "/name", {{kDom0, Access::none}, {domid, Access::read}});
    xs->set_permissions(tx, home + "/domid", {{kDom0, Access::none}, {domid, Access::read}});
    // "/libxl" as libxl makes it for a driver domain (driver_domain=1): any
    // simulated domain may run a vibd, which announces itself there.
    for (const char* area : {"/device", "/data", "/control", "/libxl"}) {
      xs->mkdir(tx, home + area);
      xs->set_permissions(tx, home + area, {{domid, Access::none}});
    }
    xs->write(tx, "/local/domain/0/backend", "");
  });
  if (!xs_introduce_domain(raw.h, domid, 0, 0)) {
    std::cerr << "vib-localxen: cannot introduce domain " << domid << ": " << std::strerror(errno) << "\n";
    xs->remove(kNoTransaction, home);
    return 1;
  }
  std::cout << "domain " << domid << " (" << name << ") created\n";
  return 0;
}

int destroy_domain(const std::string& dir, DomId domid) {
  RawHandle raw(dir);
  if (!raw.h) {
    std::cerr << "vib-localxen: cannot reach the store in " << dir << "\n";
    return 1;
  }
  // In libxl's order: the domain's home goes first, then the hypervisor
  // releases the domain and @releaseDomain fires. Whoever wakes for it
  // (vibd, the toolstack's cleanup) finds the home gone already.
  auto xs = open_xenstore(XenTarget::local(dir, kDom0));
  xs->remove(kNoTransaction, xs->domain_path(domid));
  if (!xs_release_domain(raw.h, domid)) {
    std::cerr << "vib-localxen: cannot release domain " << domid << ": " << std::strerror(errno) << "\n";
    return 1;
  }
  std::cout << "domain " << domid << " destroyed\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
    usage(argc < 2 ? std::cerr : std::cout);
    return argc < 2 ? 2 : 0;
  }
  const std::string command = argv[1];
  std::string dir, name;
  long domid = -1, max_grant_frames = 0;
  for (int i = 2; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help") {
      usage(std::cout);
      return 0;
    }
    if (i + 1 >= argc) {
      std::cerr << "vib-localxen: " << arg << " needs a value\n";
      return 2;
    }
    const std::string value = argv[++i];
    if (arg == "--dir") {
      dir = value;
    } else if (arg == "--name") {
      name = value;
    } else if (arg == "--max-grant-frames") {
      char* end = nullptr;
      max_grant_frames = std::strtol(value.c_str(), &end, 10);
      if (*end || max_grant_frames < 1 || max_grant_frames > 2048) {
        std::cerr << "vib-localxen: --max-grant-frames must be 1..2048, not '" << value << "'\n";
        return 2;
      }
    } else if (arg == "--domid") {
      char* end = nullptr;
      domid = std::strtol(value.c_str(), &end, 10);
      if (*end || domid < 1 || domid >= 0x7FF0) {
        std::cerr << "vib-localxen: --domid must be a guest domain id (1..32751), not '" << value << "'\n";
        return 2;
      }
    } else {
      std::cerr << "vib-localxen: unknown option " << arg << "\n";
      return 2;
    }
  }
  if (dir.empty()) {
    std::cerr << "vib-localxen: --dir is required\n";
    return 2;
  }
  try {
    if (command == "serve") return serve(dir);
    if (domid < 0) {
      std::cerr << "vib-localxen: --domid is required\n";
      return 2;
    }
    if (command == "create-domain")
      return create_domain(dir, static_cast<DomId>(domid), name.empty() ? "guest" + std::to_string(domid) : name,
                           max_grant_frames);
    if (command == "destroy-domain") return destroy_domain(dir, static_cast<DomId>(domid));
    std::cerr << "vib-localxen: unknown command " << command << "\n";
    usage(std::cerr);
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "vib-localxen: " << e.what() << "\n";
    return 1;
  }
}
