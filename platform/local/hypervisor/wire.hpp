// Internal to the host-local Xen: messages on a domain's hypervisor socket
// (SOCK_SEQPACKET, one message per request or reply; page fds ride along as
// SCM_RIGHTS). Fixed-size header, then `count` 32-bit entries.
#pragma once

#include <cstdint>

namespace vib::platform::local::wire {

enum class Op : std::uint32_t {
  grant = 1,         // pages `id`.. of the fd that rides along, under the `count` refs (see
                     // below); never answered
  end_grant,         // the `count` shares whose first refs are the entries; answered only
                     // without kNoReply
  map,               // `count` refs of domain `domid`; reply: per ref (fd index, page, 0, 0)
                     // + fds, or (kProcessPage, address low, high, pid) for a grant_range ref
  unmap,             // mapping `id`
  alloc_unbound,     // remote `domid`; reply: port in `value` + the port's signal fd
  bind_interdomain,  // remote `domid`, remote `port`; reply: local port in `value`
                     // + the port's signal fd + the remote port's signal fd
  unbind,            // `port`
  notify,            // `port` (when the caller has no signal fd of the peer yet)
  peer_status,       // `port`; reply: `value` 1 when the peer has gone
  // Service -> client, unasked, to the connection owning `port`:
  bound,             // a peer bound to `port`; its signal fd rides along
  peer_closed,       // the peer of `port` has gone
  // Client -> service again:
  grant_range,       // `count` / 3 pages of the caller's own process, in place, as (ref,
                     // address low, high) triples; never answered
  query_size,        // the caller's own grant table (GNTTABOP_query_size): its size in entries
                     // in `value`, and one entry: how many are in use (granted or reserved)
  reserve_refs,      // `id` entries of the caller's own grant table, for this connection to
                     // choose from; reply: the first of a run of `id` in `value`
  release_refs,      // `count` / 2 (first, count) runs of reserved refs, none granted: back to
                     // the table; never answered
};

// A guest enters its grants in its own grant table, memory it writes without
// asking Xen: a grant is no round trip. grant and grant_range keep that: the
// refs come from runs the connection reserved (one call for many grants),
// each not granted at the time, and the grant is posted without an answer.
// Each message is one share, known by its first ref. A posted message the
// service cannot carry out (a ref not reserved, or granted already) closes
// the connection, the only way left to tell the client, and ends what it
// held, as when its process dies.

// In a map reply, instead of an fd index: the page is another process's, at
// the address that follows, reached by cross-memory access.
inline constexpr std::uint32_t kProcessPage = 0xffffffffu;
inline constexpr std::uint32_t kMapReplyEntriesPerRef = 4;
inline constexpr std::uint32_t kGrantRangeEntriesPerPage = 3;

// Each port has a signal fd (an eventfd) that the service and the peer
// write to raise the port: a notify is one write(2), no round trip through
// the service. The owner keeps Xen's masking rule itself: a raised port is
// masked until unmasked, and raises meanwhile are remembered once (the
// eventfd's count) and seen on unmask.

inline constexpr std::uint32_t kWritable = 1u << 0;
inline constexpr std::uint32_t kNotifyByte = 1u << 1;
inline constexpr std::uint32_t kNotifyPort = 1u << 2;
// On end_grant and unmap: the service answers nothing. What they end had no
// unmap notification (whose firing other connections' requests must not
// overtake), so the caller has nothing to wait for: on Xen these are a
// system call in the guest or dom0, not a round trip to another process.
// Requests later on the same connection are served after it, and a map or
// query_size of the domain's grants serves it first (it could have caused
// them). grant, grant_range and release_refs are never answered and are
// ordered the same way.
inline constexpr std::uint32_t kNoReply = 1u << 3;

// Bounds that keep every message small and every loop short.
inline constexpr std::uint32_t kMaxEntries = 512;       // refs per grant/map message
inline constexpr std::uint32_t kMaxFdsPerMessage = 64;  // distinct page files per map reply
inline constexpr std::uint32_t kGrantsPerFrame = 512;  // version 1 entries in a 4 KiB frame
inline constexpr std::uint32_t kMaxGrantsPerDomain = 1u << 20;  // unless the domain was created with fewer
inline constexpr std::uint32_t kMaxPortsPerDomain = 4096;

struct Request {
  Op op;
  std::uint32_t domid;
  std::uint32_t port;
  std::uint32_t flags;
  std::uint32_t count;
  std::uint32_t notify_offset;
  std::uint32_t notify_port;
  std::uint32_t id;
};

struct Reply {
  Op op;
  std::int32_t status;  // 0 or a positive errno
  std::uint32_t value;
  std::uint32_t count;
};

inline constexpr std::size_t kMaxMessage =
    sizeof(Request) + kMapReplyEntriesPerRef * kMaxEntries * sizeof(std::uint32_t);

}  // namespace vib::platform::local::wire
