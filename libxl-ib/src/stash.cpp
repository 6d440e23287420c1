// The xl front's kept configs: see stash_create_config in libxl_ib.hpp.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
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
  std::ifstream in(*file);
  std::stringstream text;
  text << in.rdbuf();
  if (!in) throw Error(ErrorCode::not_found, "cannot read " + *file);
  std::string config = text.str();
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
  std::ifstream in(path);
  if (!in) throw Error(ErrorCode::not_found, "no config kept for " + kept + " in " + dir);
  std::stringstream text;
  text << in.rdbuf();
  return provision_from_config(domid, text.str());
}

}  // namespace vib::toolstack
