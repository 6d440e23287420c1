// The xl front's kept configs: see stash_create_config and send_kept_config
// in libxl_ib.hpp.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string_view>

#include "internal.hpp"
#include "vib/platform/unique_fd.hpp"

namespace vib::toolstack {

namespace {

// A domain name as a file name: xl accepts almost anything, a path does not.
bool usable_as_file_name(const std::string& name) {
  return !name.empty() && name.size() <= 255 && name.front() != '.' && name.find('/') == std::string::npos;
}

// A file's whole text; nullopt if it cannot be read.
std::optional<std::string> read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  if (!in) return std::nullopt;
  return text.str();
}

void write_atomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  platform::UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!fd) throw Error(ErrorCode::failed, "cannot write " + tmp + ": " + std::strerror(errno));
  // A half-written file must not stay behind for the next create to trip on.
  auto give_up = [&](const std::string& what) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw Error(ErrorCode::failed, "cannot write " + what + ": " + std::strerror(err));
  };
  for (std::size_t done = 0; done < text.size();) {
    const ssize_t n = ::write(fd.get(), text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) give_up(tmp);
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(fd.get()) != 0 || ::rename(tmp.c_str(), path.c_str()) != 0) give_up(path);
}

}  // namespace

std::optional<std::string> stash_create_config(const std::vector<std::string>& args, const std::string& dir) {
  // xl create [options] [-f] <ConfigFile> [options] [vars]: the file is
  // -f/--defconfig's value or the first argument without '='; the other
  // arguments without a leading '-' are extra config lines.
  std::optional<std::string> file;
  std::vector<std::string> extra;
  bool dry_run = false;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--defconfig" || a == "-f") {
      if (i + 1 >= args.size()) throw Error(ErrorCode::invalid, "xl create: " + a + " needs a file");
      file = args[++i];
    } else if (a.rfind("--defconfig=", 0) == 0) {
      file = a.substr(12);
    } else if (a == "--dryrun") {
      dry_run = true;
    } else if (a.size() > 1 && a[0] == '-' && a[1] != '-') {
      // Bundled short flags (-pc); an 'f' takes the rest or the next word.
      for (std::size_t k = 1; k < a.size(); ++k) {
        if (a[k] == 'n') dry_run = true;
        if (a[k] != 'f') continue;
        if (k + 1 < a.size()) {
          file = a.substr(k + 1);
        } else {
          if (i + 1 >= args.size()) throw Error(ErrorCode::invalid, "xl create: -f needs a file");
          file = args[++i];
        }
        break;
      }
    } else if (a.size() > 1 && a[0] == '-') {
      // Other long options (--vncviewer, ...) take no value.
    } else if (!file && a.find('=') == std::string::npos) {
      file = a;
    } else {
      extra.push_back(a);
    }
  }
  if (!file || dry_run) return std::nullopt;
  auto read = read_text(*file);
  if (!read) throw Error(ErrorCode::not_found, "cannot read " + *file);
  std::string config = std::move(*read);
  if (!extra.empty()) {
    config += "\n# from the xl create command line\n";
    for (const auto& line : extra) config += line + "\n";
  }
  const auto scan = detail::scan_config(config, *file);
  if (!scan.name) return std::nullopt;  // xl refuses a config without a name
  if (!usable_as_file_name(*scan.name))
    throw Error(ErrorCode::invalid, *file + ": domain name '" + *scan.name + "' cannot be kept for vib");
  const std::string path = dir + "/" + *scan.name + ".cfg";
  if (scan.specs.empty()) {
    std::error_code ignored;
    std::filesystem::remove(path, ignored);  // a stale one would add devices
    return std::nullopt;
  }
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw Error(ErrorCode::failed, "cannot create " + dir + ": " + ec.message());
  write_atomically(path, config);
  return scan.name;
}

MigrateCommand parse_migrate_command(const std::vector<std::string>& args) {
  MigrateCommand m;
  std::vector<std::string> positional;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--debug" || a == "--live") continue;
    if (a == "--") {
      positional.insert(positional.end(), args.begin() + static_cast<long>(i) + 1, args.end());
      break;
    }
    if (a.size() > 1 && a[0] == '-' && a[1] != '-') {
      // Bundled short flags (-Fe); C and s take the rest or the next word.
      for (std::size_t k = 1; k < a.size(); ++k) {
        if (a[k] != 'C' && a[k] != 's') continue;
        std::string value;
        if (k + 1 < a.size()) {
          value = a.substr(k + 1);
        } else {
          if (i + 1 >= args.size()) throw Error(ErrorCode::invalid, std::string("xl migrate: -") + a[k] + " needs a value");
          value = args[++i];
        }
        (a[k] == 'C' ? m.config_file.emplace() : m.ssh_command) = value;
        break;
      }
    } else if (a.size() > 1 && a[0] == '-') {
      throw Error(ErrorCode::invalid, "xl migrate: unknown option " + a);
    } else {
      positional.push_back(a);
    }
  }
  if (positional.size() != 2) throw Error(ErrorCode::invalid, "xl migrate: expected <Domain> <host>");
  m.domain = positional[0];
  m.host = positional[1];
  return m;
}

namespace {

// `text` as one word of a POSIX shell command line.
std::string shell_quoted(const std::string& text) {
  std::string quoted = "'";
  for (char c : text) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

}  // namespace

bool send_kept_config(const MigrateCommand& migrate, const std::string& name, const std::string& dir,
                      const std::string& remote_dir) {
  if (migrate.ssh_command.empty()) return false;  // the receiver runs here
  if (!usable_as_file_name(name))
    throw Error(ErrorCode::invalid, "domain name '" + name + "' cannot be kept for vib");
  std::optional<std::string> config;
  if (migrate.config_file) {
    config = read_text(*migrate.config_file);
    if (!config) throw Error(ErrorCode::not_found, "cannot read " + *migrate.config_file);
    if (detail::scan_config(*config, *migrate.config_file).specs.empty()) return false;
  } else {
    config = read_text(dir + "/" + name + ".cfg");
    if (!config) return false;  // created without vib= lines, or not through the xl front
  }
  const std::string target = remote_dir + "/" + name + ".cfg";
  const std::string remote = "umask 077 && mkdir -p " + shell_quoted(remote_dir) + " && cat > " +
                             shell_quoted(target + ".tmp") + " && mv -f " + shell_quoted(target + ".tmp") + " " +
                             shell_quoted(target);
  // As xl runs its own: `exec <ssh command> <host> ...` through sh -c.
  const std::string command = "exec " + migrate.ssh_command + " " + migrate.host + " " + shell_quoted(remote);
  std::FILE* pipe = ::popen(command.c_str(), "w");
  if (!pipe) throw Error(ErrorCode::failed, "cannot run " + migrate.ssh_command + ": " + std::strerror(errno));
  // An ssh that exits before reading (a refused login) must fail the write,
  // not kill the process with SIGPIPE.
  struct sigaction ignore {}, previous {};
  ignore.sa_handler = SIG_IGN;
  ::sigaction(SIGPIPE, &ignore, &previous);
  const bool written = std::fwrite(config->data(), 1, config->size(), pipe) == config->size();
  const int status = ::pclose(pipe);
  ::sigaction(SIGPIPE, &previous, nullptr);
  if (!written || status == -1 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
    throw Error(ErrorCode::failed,
                "cannot send the vib config of " + name + " to " + migrate.host + " (" + migrate.ssh_command +
                    (status != -1 && WIFEXITED(status) ? " exited " + std::to_string(WEXITSTATUS(status)) : " failed") +
                    "); not migrating: the domain would arrive without its vib devices");
  return true;
}

ProvisionResult Toolstack::provision_stashed(platform::DomId domid, const std::string& dir) {
  const auto name = store_->read(platform::kNoTransaction, "/local/domain/" + std::to_string(domid) + "/name");
  if (!name || !usable_as_file_name(*name))
    throw Error(ErrorCode::not_found, "domain " + std::to_string(domid) + " has no usable name");
  // xl migrate-receive names the domain it builds "<name>--incoming" until
  // all its memory has come (then it renames it): <name>'s config is its.
  constexpr std::string_view incoming = "--incoming";
  std::string kept = *name;
  if (kept.size() > incoming.size() && kept.ends_with(incoming)) kept.resize(kept.size() - incoming.size());
  const std::string path = dir + "/" + kept + ".cfg";
  const auto config = read_text(path);
  if (!config) throw Error(ErrorCode::not_found, "no config kept for " + kept + " in " + dir);
  return provision_from_config(domid, *config);
}

}  // namespace vib::toolstack
