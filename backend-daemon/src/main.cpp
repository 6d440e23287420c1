// vibd command line: options, signals, systemd notification.
#include <signal.h>
#include <sys/signalfd.h>

#include <cstring>
#include <iostream>

#ifdef VIB_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

#include "vib/backend/vibd.hpp"
#include "vib/platform/hca.hpp"
#include "vib/platform/unique_fd.hpp"

namespace {

void usage(std::ostream& out) {
  out << "Usage: vibd [options]\n"
         "Serves vib (virtual InfiniBand) devices to Xen guests.\n"
         "\n"
         "  --hca NAME          HCA for devices whose configuration names none\n"
         "                      (default: soft, the built-in software HCA)\n"
         "  --scripts-dir DIR   where relative hotplug script names live\n"
         "                      (default " VIB_XEN_SCRIPTS_DIR ")\n"
         "  --script-timeout MS how long a hotplug script may run (default 30000)\n"
         "  --cm-timeout MS     how long an RDMA-CM request or reply waits for its answer (default 20000)\n"
         "  --no-provision      do not add the vib= devices of domains xl creates\n"
         "  --stash-dir DIR     where the xl front keeps domain configs\n"
         "                      (default /var/lib/vib/domains)\n"
         "  --userdata-dir DIR  where xl saves domain configs (default /var/lib/xen)\n"
         "  --status-interval MS  how often, at most, the devices' counters are\n"
         "                      published for `xl vib-list -l` (default 1000)\n"
         "  --local-xen DIR     use the host-local Xen served by `vib-localxen serve --dir DIR`\n"
         "                      instead of the real one (machines without a hypervisor)\n"
         "  --domid N           with --local-xen: the domain vibd acts as (default 0)\n"
         "  --workers N         fast-path worker threads serving the contexts\n"
         "                      (default: one per online CPU)\n"
         "  --max-spin US       how long an idle worker may busy-poll before it sleeps, when\n"
         "                      spinning pays and takes no CPU from anyone (default 50; 0: never)\n"
         "  --worker-nice N     the workers' nice value, -20..19 (default -10: they run only\n"
         "                      for their guests' work, so it goes first; 0 leaves it)\n"
         "  --control-threads N threads for slow control requests, at most\n"
         "                      (default: two per online CPU)\n"
         "  --systemd           log with journald priorities (also when JOURNAL_STREAM is set)\n"
         "  --verbose           log every object created and freed\n"
         "  --list-hcas         print the HCAs vibd can use and exit\n"
         "  --help              this text\n"
         "\n"
         "vibd runs in the foreground; SIGTERM or SIGINT closes every device and exits.\n"
         "One vibd serves a domain: a second one exits with status 3.\n";
}

}  // namespace

int main(int argc, char** argv) {
  vib::backend::DaemonOptions options;
  std::string local_dir;
  long domid = 0;
  options.systemd_logging = std::getenv("JOURNAL_STREAM") != nullptr;
  options.scripts_dir = VIB_XEN_SCRIPTS_DIR;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << "vibd: " << arg << " needs a value\n";
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "--help" || arg == "-h") {
      usage(std::cout);
      return 0;
    } else if (arg == "--hca") {
      options.default_hca = value();
    } else if (arg == "--no-provision") {
      options.provision = false;
    } else if (arg == "--stash-dir") {
      options.stash_dir = value();
    } else if (arg == "--userdata-dir") {
      options.userdata_dir = value();
    } else if (arg == "--scripts-dir") {
      options.scripts_dir = value();
    } else if (arg == "--script-timeout") {
      const std::string v = value();
      char* end = nullptr;
      const long ms = std::strtol(v.c_str(), &end, 10);
      if (v.empty() || *end || ms <= 0 || ms > 3600 * 1000) {
        std::cerr << "vibd: bad --script-timeout '" << v << "' (milliseconds, 1..3600000)\n";
        return 2;
      }
      options.script_timeout = std::chrono::milliseconds(ms);
    } else if (arg == "--cm-timeout") {
      const std::string v = value();
      char* end = nullptr;
      const long ms = std::strtol(v.c_str(), &end, 10);
      if (v.empty() || *end || ms <= 0 || ms > 3600 * 1000) {
        std::cerr << "vibd: bad --cm-timeout '" << v << "' (milliseconds, 1..3600000)\n";
        return 2;
      }
      options.cm_timeout = std::chrono::milliseconds(ms);
    } else if (arg == "--status-interval") {
      const std::string v = value();
      char* end = nullptr;
      const long ms = std::strtol(v.c_str(), &end, 10);
      if (v.empty() || *end || ms < 100 || ms > 60000) {
        std::cerr << "vibd: bad --status-interval '" << v << "' (milliseconds, 100..60000)\n";
        return 2;
      }
      options.status_interval = std::chrono::milliseconds(ms);
    } else if (arg == "--local-xen") {
      local_dir = value();
    } else if (arg == "--domid") {
      const std::string v = value();
      char* end = nullptr;
      domid = std::strtol(v.c_str(), &end, 10);
      if (*end || domid < 0 || domid >= 0x7FF0) {
        std::cerr << "vibd: bad --domid '" << v << "'\n";
        return 2;
      }
    } else if (arg == "--workers" || arg == "--max-spin" || arg == "--control-threads" || arg == "--worker-nice") {
      const std::string v = value();
      char* end = nullptr;
      const long n = std::strtol(v.c_str(), &end, 10);
      const long min = arg == "--max-spin" ? 0 : arg == "--worker-nice" ? -20 : 1;
      const long max = arg == "--max-spin" ? 100000 : arg == "--worker-nice" ? 19 : 1024;
      if (v.empty() || *end || n < min || n > max) {
        std::cerr << "vibd: bad " << arg << " '" << v << "' (" << min << ".." << max << ")\n";
        return 2;
      }
      if (arg == "--workers") options.workers = static_cast<unsigned>(n);
      if (arg == "--max-spin") options.max_spin = std::chrono::microseconds(n);
      if (arg == "--control-threads") options.control_threads = static_cast<unsigned>(n);
      if (arg == "--worker-nice") options.worker_nice = static_cast<int>(n);
    } else if (arg == "--systemd") {
      options.systemd_logging = true;
    } else if (arg == "--verbose") {
      options.verbose = true;
    } else if (arg == "--list-hcas") {
      for (const auto& h : vib::platform::list_hcas())
        std::cout << h.name << (h.software ? "  (built-in software HCA)" : "") << "\n";
      return 0;
    } else {
      std::cerr << "vibd: unknown option " << arg << " (see --help)\n";
      return 2;
    }
  }
  if (!local_dir.empty())
    options.xen = vib::platform::XenTarget::local(local_dir, static_cast<vib::platform::DomId>(domid));
  else if (domid != 0) {
    std::cerr << "vibd: --domid only applies with --local-xen\n";
    return 2;
  }

  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  pthread_sigmask(SIG_BLOCK, &mask, nullptr);
  vib::platform::UniqueFd stop(::signalfd(-1, &mask, SFD_CLOEXEC));
  if (!stop) {
    std::cerr << "vibd: signalfd: " << std::strerror(errno) << "\n";
    return 1;
  }
#ifdef VIB_HAVE_SYSTEMD
  // A no-op outside systemd (no NOTIFY_SOCKET).
  options.notify = [](const std::string& message) { sd_notify(0, message.c_str()); };
#endif
  return vib::backend::run_daemon(options, stop.get());
}
