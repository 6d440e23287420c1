// Internal to the host-local Xen: one message with optional fds on a
// SOCK_SEQPACKET socket, for both the service and its clients.
#pragma once

#include <span>
#include <string>
#include <vector>

#include "vib/platform/unique_fd.hpp"

namespace vib::platform::local {

// Returns false when the peer has gone or the socket failed.
bool send_message(int sock, std::span<const std::byte> bytes, std::span<const int> fds = {});
// Receives one message; returns false on EOF/error (errno set, 0 on EOF).
// Fds beyond `max_fds` or a truncated message are errors: the message is
// dropped and its fds closed.
bool receive_message(int sock, std::vector<std::byte>& bytes, std::vector<UniqueFd>& fds,
                     std::size_t max_bytes, std::size_t max_fds, bool nonblocking = false);

UniqueFd connect_seqpacket(const std::string& path);

}  // namespace vib::platform::local
