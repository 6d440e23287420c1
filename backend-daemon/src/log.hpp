// vibd's log: one line per event, always naming the object it concerns
// (domain, device, context, verbs object), so an administrator can follow one
// guest's story with grep.
#pragma once

#include <string>
#include <string_view>

namespace vib::backend {

enum class LogLevel { debug, info, warning, error };

// Where log lines go: stderr with a timestamp (foreground), or stderr with
// sd-daemon priority prefixes "<N>" that journald understands (systemd).
void set_log_style(bool systemd_prefixes, LogLevel threshold);
void log_line(LogLevel level, std::string_view subject, std::string_view message);

// Subjects are built the same way everywhere: "dom5/vib0", "dom5/vib0/ctx3".
std::string device_subject(unsigned domid, unsigned devid);
std::string context_subject(unsigned domid, unsigned devid, unsigned ctxid);

}  // namespace vib::backend
