// xl-vib: the `xl vib-*` commands. The xl front script runs this for
// vib-* subcommands; it can be run directly too. Output and exit codes
// follow xl's device commands (network-attach/-detach/-list): 0 on success,
// 1 on failure, 2 for a command line xl would not accept.
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <system_error>

#include "vib/libxl_ib.hpp"
#include "vib/platform/xenbus.hpp"

using namespace vib::toolstack;
using vib::platform::DomId;

namespace {

constexpr int kOk = 0, kFail = 1, kUsage = 2;

struct Command {
  const char* name;
  const char* args;
  const char* summary;
  const char* help;
  bool hidden;
};

const Command kCommands[] = {
    {"vib-attach", "[--timeout S] <Domain> <vib-spec>...", "Create a new virtual InfiniBand device.",
     "  <vib-spec> is key=value[,key=value...] (several arguments are joined with ','):\n"
     "    hca=NAME            HCA in the back-end domain (mlx5_0, rxe0) or 'soft' (built-in);\n"
     "                        default: vibd's --hca ('soft' unless configured)\n"
     "    port=N              HCA port (1)\n"
     "    devid=N             device id (lowest free)\n"
     "    backend=DOM         back-end domain name or id (0)\n"
     "    pkeys=P[:P...]      allowed P_Keys (0xffff)\n"
     "    gid-indices=I[:I..] allowed GID indices (0)\n"
     "    max-pds max-cqs max-qps max-srqs max-mrs max-ahs=N   object quotas\n"
     "                        (16, 256, 256, 64, 1024, 1024)\n"
     "    max-pinned-pages=N  registration quota in 4 KiB pages (262144)\n"
     "    script=NAME         hotplug script vibd runs (none; 'vib' is\n"
     "                        /etc/xen/scripts/vib)\n"
     "  --timeout S           wait at most S seconds for the back-end (10)\n",
     false},
    {"vib-detach", "[--force] [--timeout S] <Domain> <DevId>", "Destroy a domain's virtual InfiniBand device.",
     "  --force       remove the device without asking the back-end\n"
     "  --timeout S   wait at most S seconds for the back-end to close it, then\n"
     "                remove it anyway (10)\n",
     false},
    {"vib-list", "[-l] [--json] <Domain(s)>", "List virtual InfiniBand devices for a domain.",
     "  -l, --long    add what vibd serves: objects against the quotas, pinned\n"
     "                pages, and per context its objects, requests, work\n"
     "                requests, completions, errors and last activity\n"
     "  --json        print a JSON array instead of the table\n", false},
    {"vib-provision", "[--config FILE] [--userdata-dir DIR] [--wait S] <Domain>",
     "Attach the vib= devices of a newly created domain.",
     "  Reads the domain's config as xl saved it (DIR/userdata-d.<domid>.<uuid>.xl,\n"
     "  DIR defaults to /var/lib/xen) or FILE, and attaches every vib= item\n"
     "  without waiting for the back-end. Does nothing for a domain already\n"
     "  provisioned.\n"
     "  --wait S      wait up to S seconds for xl to save the config (0)\n",
     true},
    {"vib-cleanup", "", "Remove the vib devices of domains that no longer exist.", "", true},
    {"vib-create-hook", "[--stash-dir DIR] -- <xl create arguments>",
     "Check and keep the vib= lines of a domain about to be created.",
     "  Run by the xl front before Xen's `xl create` with the same arguments:\n"
     "  checks every vib= item (a bad one fails here, before the domain exists)\n"
     "  and keeps the config as DIR/<name>.cfg (default /var/lib/vib/domains),\n"
     "  where vibd finds it when the domain appears.\n",
     true},
    {"vib-migrate-hook", "[--stash-dir DIR] -- <xl migrate arguments>",
     "Send a migrating domain's kept vib config to the target host.",
     "  Run by the xl front before Xen's `xl migrate` with the same arguments:\n"
     "  writes the config kept for the domain (or -C's file) as DIR/<name>.cfg\n"
     "  on the target through xl's ssh command (-s, default ssh), where the\n"
     "  target's vibd finds it for the incoming domain. xl's migration stream\n"
     "  carries no vib= lines. Fails, and so stops the migration, if it cannot.\n",
     true},
};

void usage(std::ostream& out, bool all) {
  out << "Usage: xl-vib [--local-xen DIR [--domid N]] <subcommand> [args]\n"
         "       (or xl <subcommand> [args] through the vib xl front script)\n\n"
         "Subcommands:\n";
  for (const auto& c : kCommands)
    if (all || !c.hidden) out << "  " << c.name << std::string(16 - std::strlen(c.name), ' ') << c.summary << "\n";
  out << "\nGlobal options:\n"
         "  --local-xen DIR     use the host-local Xen of `vib-localxen serve --dir DIR`\n"
         "                      instead of the real one\n"
         "  --domid N           with --local-xen: the domain to act as (default 0)\n"
         "  --help              this text; `xl-vib <subcommand> --help` for one subcommand\n";
}

void command_usage(std::ostream& out, const Command& c) {
  out << "Usage: xl " << c.name << " " << c.args << "\n\n" << c.summary << "\n\n" << c.help;
}

// Turns what the library throws into xl's style of message and exit code.
template <typename Body>
int run(const char* name, Body&& body) {
  try {
    return body();
  } catch (const Error& e) {
    std::cerr << "xl " << name << ": " << e.what() << "\n";
  } catch (const std::system_error& e) {
    std::cerr << "xl " << name << ": xenstore: " << e.what() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "xl " << name << ": " << e.what() << "\n";
  }
  return kFail;
}

std::chrono::milliseconds parse_seconds(const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const double s = std::strtod(text.c_str(), &end);
  if (text.empty() || *end || errno || s < 0 || s > 3600) throw Error(ErrorCode::invalid, "bad timeout '" + text + "' (seconds, 0..3600)");
  return std::chrono::milliseconds(static_cast<long long>(s * 1000));
}

// Splits a subcommand's arguments into options (with their values) and
// positional arguments, refusing unknown options.
struct Args {
  std::vector<std::string> positional;
  std::map<std::string, std::string> options;
};

std::optional<Args> split(const std::vector<std::string>& argv, const std::set<std::string>& flags,
                          const std::set<std::string>& valued, const Command& c) {
  Args a;
  for (std::size_t i = 0; i < argv.size(); ++i) {
    const std::string& arg = argv[i];
    if (arg == "--") {
      a.positional.insert(a.positional.end(), argv.begin() + static_cast<long>(i) + 1, argv.end());
      break;
    }
    if (arg.size() > 1 && arg[0] == '-') {
      if (flags.count(arg)) {
        a.options[arg] = "1";
      } else if (valued.count(arg) && i + 1 < argv.size()) {
        a.options[arg] = argv[++i];
      } else {
        std::cerr << "xl " << c.name << ": unknown or incomplete option " << arg << "\n";
        command_usage(std::cerr, c);
        return std::nullopt;
      }
    } else {
      a.positional.push_back(arg);
    }
  }
  return a;
}

class Cli {
 public:
  explicit Cli(vib::platform::XenTarget target) : target_(std::move(target)) {}

  int dispatch(const Command& c, const std::vector<std::string>& args) {
    for (const auto& a : args) {
      if (a == "--") break;  // what follows is another program's
      if (a == "--help" || a == "-h") {
        command_usage(std::cout, c);
        return kOk;
      }
    }
    const std::string name = c.name;
    if (name == "vib-create-hook") return create_hook(c, args);
    if (name == "vib-migrate-hook") return migrate_hook(c, args);
    if (name == "vib-attach") return attach(c, args);
    if (name == "vib-detach") return detach(c, args);
    if (name == "vib-list") return list(c, args);
    if (name == "vib-provision") return provision(c, args);
    return cleanup(c, args);
  }

 private:
  Toolstack& toolstack() {
    if (!toolstack_) toolstack_ = std::make_unique<Toolstack>(target_);
    return *toolstack_;
  }

  int attach(const Command& c, const std::vector<std::string>& argv) {
    auto a = split(argv, {}, {"--timeout"}, c);
    if (!a) return kUsage;
    if (a->positional.size() < 2) {
      command_usage(std::cerr, c);
      return kUsage;
    }
    return run(c.name, [&] {
      AttachOptions options;
      if (a->options.count("--timeout")) options.timeout = parse_seconds(a->options["--timeout"]);
      std::string spec;
      for (std::size_t i = 1; i < a->positional.size(); ++i) spec += (i > 1 ? "," : "") + a->positional[i];
      const DeviceSpec parsed = parse_spec(spec);
      const DomId domid = toolstack().resolve_domain(a->positional[0]);
      toolstack().attach(domid, parsed, options);
      return kOk;
    });
  }

  int detach(const Command& c, const std::vector<std::string>& argv) {
    auto a = split(argv, {"--force", "-f"}, {"--timeout"}, c);
    if (!a) return kUsage;
    if (a->positional.size() != 2) {
      command_usage(std::cerr, c);
      return kUsage;
    }
    return run(c.name, [&] {
      DetachOptions options;
      options.force = a->options.count("--force") || a->options.count("-f");
      if (a->options.count("--timeout")) options.timeout = parse_seconds(a->options["--timeout"]);
      const DomId domid = toolstack().resolve_domain(a->positional[0]);
      const auto devid = vib::platform::parse_decimal(a->positional[1], 0xffff);
      if (!devid) throw Error(ErrorCode::invalid, "bad device id '" + a->positional[1] + "'");
      const auto result = toolstack().detach(domid, static_cast<unsigned>(*devid), options);
      if (!result.note.empty() && !options.force)
        std::cerr << "xl " << c.name << ": warning: " << device(domid, *devid) << ": " << result.note << "\n";
      return kOk;
    });
  }

  int list(const Command& c, const std::vector<std::string>& argv) {
    auto a = split(argv, {"--json", "-l", "--long"}, {}, c);
    if (!a) return kUsage;
    if (a->positional.empty()) {
      command_usage(std::cerr, c);
      return kUsage;
    }
    const bool json = a->options.count("--json") > 0;
    const bool long_form = a->options.count("-l") > 0 || a->options.count("--long") > 0;
    int rc = kOk;
    std::vector<DeviceInfo> all;
    if (!json) std::cout << "Idx BE  Hdl State HCA        Port Ctx BE-path\n";
    for (const auto& name : a->positional) {
      // Like `xl network-list`: a bad domain is reported, the others listed.
      const int one = run(c.name, [&] {
        const DomId domid = toolstack().resolve_domain(name);
        if (!toolstack().domain_exists(domid))
          throw Error(ErrorCode::not_found, "domain '" + name + "' does not exist");
        for (auto& d : toolstack().list(domid, long_form)) {
          if (json) {
            all.push_back(std::move(d));
            continue;
          }
          char line[160];
          std::snprintf(line, sizeof line, "%-3u %-3u %-3u %-5d %-10s %-4u %-3u ", d.devid,
                        static_cast<unsigned>(d.backend_domid), d.devid, d.state,
                        d.hca.empty() ? "(default)" : d.hca.c_str(), d.port, d.contexts);
          std::cout << line << d.backend_path << "\n";
          if (long_form) print_status(d);
        }
        return kOk;
      });
      if (one != kOk) rc = one;
    }
    if (json) std::cout << devices_to_json(all, true, long_form);
    return rc;
  }

  // The long form's lines under a device: what its vibd published.
  static void print_status(const DeviceInfo& d) {
    const std::string be = std::to_string(d.backend_domid);
    if (!d.vibd_running) {
      std::cout << "    no vibd serves back-end domain " << be << "\n";
      return;
    }
    if (!d.status) {
      std::cout << "    vibd running; nothing published for this device yet\n";
      return;
    }
    const DeviceStatus& s = *d.status;
    const ObjectCounts held = s.objects();
    std::cout << "    HCA " << (s.hca.empty() ? "(none)" : s.hca) << " port " << s.port << ", vibd running; PDs "
              << held.pds << "/" << s.quotas.pds << " CQs " << held.cqs << "/" << s.quotas.cqs << " QPs " << held.qps
              << "/" << s.quotas.qps << " SRQs " << held.srqs << "/" << s.quotas.srqs << " MRs " << held.mrs << "/"
              << s.quotas.mrs << " AHs " << held.ahs << "/" << s.quotas.ahs << "; pinned pages " << s.pinned_pages()
              << "/" << s.max_pinned_pages << "\n";
    if (s.contexts.empty()) return;
    std::cout << "    Ctx       PDs  CQs  QPs SRQs  MRs  AHs   Pinned   Requests Errors       WQEs Completions Errors "
                 "Active\n";
    const auto now = std::chrono::duration_cast<std::chrono::seconds>(
                         std::chrono::system_clock::now().time_since_epoch()).count();
    for (const auto& c : s.contexts) {
      char line[200];
      std::snprintf(line, sizeof line, "    %-9u %4llu %4llu %4llu %4llu %4llu %4llu %8llu %10llu %6llu %10llu %11llu %6llu ",
                    c.id, ull(c.objects.pds), ull(c.objects.cqs), ull(c.objects.qps), ull(c.objects.srqs),
                    ull(c.objects.mrs), ull(c.objects.ahs), ull(c.pinned_pages), ull(c.requests),
                    ull(c.request_errors), ull(c.wqes), ull(c.completions), ull(c.completion_errors));
      std::cout << line;
      if (c.last_activity == 0)
        std::cout << "never\n";
      else
        std::cout << std::max<long long>(0, now - c.last_activity) << "s ago\n";
    }
  }
  static unsigned long long ull(std::uint64_t v) { return static_cast<unsigned long long>(v); }

  int provision(const Command& c, const std::vector<std::string>& argv) {
    auto a = split(argv, {}, {"--config", "--userdata-dir", "--wait"}, c);
    if (!a) return kUsage;
    if (a->positional.size() != 1) {
      command_usage(std::cerr, c);
      return kUsage;
    }
    return run(c.name, [&] {
      const DomId domid = toolstack().resolve_domain(a->positional[0]);
      ProvisionResult result;
      if (a->options.count("--config")) {
        std::ifstream in(a->options["--config"]);
        if (!in) throw Error(ErrorCode::not_found, "cannot read " + a->options["--config"]);
        std::stringstream text;
        text << in.rdbuf();
        result = toolstack().provision_from_config(domid, text.str());
      } else {
        const std::string dir = a->options.count("--userdata-dir") ? a->options["--userdata-dir"] : "/var/lib/xen";
        const auto wait = a->options.count("--wait") ? parse_seconds(a->options["--wait"]) : std::chrono::milliseconds(0);
        result = toolstack().provision_domain(domid, dir, wait);
      }
      for (const auto& w : result.warnings) std::cerr << "xl " << c.name << ": warning: " << w << "\n";
      if (result.already_provisioned)
        std::cout << "domain " << domid << ": already provisioned, nothing done\n";
      for (const auto& d : result.devices)
        std::cout << "domain " << domid << ": vib device " << d.devid << " on back-end domain " << d.backend_domid << "\n";
      return kOk;
    });
  }

  // xl create's own arguments follow "--" untouched: they are not ours to
  // interpret beyond what stash_create_config needs.
  // A hook's "[--stash-dir DIR] -- <xl's arguments>": the directory and the
  // arguments, or nullopt after printing the usage.
  static std::optional<std::pair<std::string, std::vector<std::string>>> hook_args(
      const Command& c, const std::vector<std::string>& argv) {
    std::string dir = vib::toolstack::kConfigStashDir;
    std::size_t i = 0;
    for (; i < argv.size() && argv[i] != "--"; ++i) {
      if (argv[i] == "--stash-dir" && i + 1 < argv.size()) {
        dir = argv[++i];
      } else {
        command_usage(std::cerr, c);
        return std::nullopt;
      }
    }
    if (i >= argv.size()) {
      command_usage(std::cerr, c);
      return std::nullopt;
    }
    return std::pair{dir, std::vector<std::string>(argv.begin() + static_cast<long>(i) + 1, argv.end())};
  }

  int create_hook(const Command& c, const std::vector<std::string>& argv) {
    auto hooked = hook_args(c, argv);
    if (!hooked) return kUsage;
    const auto& [dir, create_args] = *hooked;
    // The same words as xl create's, so errors read as xl create's.
    return run("create", [&] {
      vib::toolstack::stash_create_config(create_args, dir);
      return kOk;
    });
  }

  int migrate_hook(const Command& c, const std::vector<std::string>& argv) {
    auto hooked = hook_args(c, argv);
    if (!hooked) return kUsage;
    const auto& [dir, migrate_args] = *hooked;
    return run("migrate", [&] {
      const auto migrate = vib::toolstack::parse_migrate_command(migrate_args);
      const std::string name = toolstack().domain_name(migrate.domain);
      if (vib::toolstack::send_kept_config(migrate, name, dir, dir))
        std::cerr << "xl migrate: sent the vib config of " << name << " to " << migrate.host << "\n";
      return kOk;
    });
  }

  int cleanup(const Command& c, const std::vector<std::string>& argv) {
    auto a = split(argv, {}, {}, c);
    if (!a) return kUsage;
    if (!a->positional.empty()) {
      command_usage(std::cerr, c);
      return kUsage;
    }
    return run(c.name, [&] {
      std::cout << "removed " << toolstack().cleanup_dead_domains() << " vib devices of dead domains\n";
      return kOk;
    });
  }

  static std::string device(DomId domid, std::uint64_t devid) {
    return "vib device " + std::to_string(devid) + " of domain " + std::to_string(domid);
  }

  vib::platform::XenTarget target_;
  std::unique_ptr<Toolstack> toolstack_;
};

}  // namespace

int main(int argc, char** argv) {
  std::string local_dir;
  long domid = 0;
  bool domid_given = false;
  int i = 1;
  for (; i < argc && argv[i][0] == '-'; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      usage(std::cout, false);
      return kOk;
    }
    if (arg == "--local-xen" || arg == "--domid") {
      if (i + 1 >= argc) {
        std::cerr << "xl-vib: " << arg << " needs a value\n";
        return kUsage;
      }
      const std::string value = argv[++i];
      if (arg == "--local-xen") {
        local_dir = value;
      } else {
        auto v = vib::platform::parse_decimal(value, 0x7FEF);
        if (!v) {
          std::cerr << "xl-vib: bad --domid '" << value << "'\n";
          return kUsage;
        }
        domid = static_cast<long>(*v);
        domid_given = true;
      }
      continue;
    }
    std::cerr << "xl-vib: unknown option " << arg << " (see --help)\n";
    return kUsage;
  }
  if (i >= argc) {
    usage(std::cerr, false);
    return kUsage;
  }
  const std::string name = argv[i];
  if (name == "help") {
    usage(std::cout, true);
    return kOk;
  }
  if (domid_given && local_dir.empty()) {
    std::cerr << "xl-vib: --domid only applies with --local-xen\n";
    return kUsage;
  }
  const auto target = local_dir.empty() ? vib::platform::XenTarget::real()
                                        : vib::platform::XenTarget::local(local_dir, static_cast<DomId>(domid));
  for (const auto& c : kCommands) {
    if (name != c.name) continue;
    Cli cli(target);
    return cli.dispatch(c, std::vector<std::string>(argv + i + 1, argv + argc));
  }
  std::cerr << "xl-vib: unknown subcommand '" << name << "'\n";
  usage(std::cerr, false);
  return kUsage;
}
