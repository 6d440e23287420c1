// What the 40 bytes in front of a UD receive hold. On InfiniBand (and vib's
// software HCA) a GRH; on RoCE v2 over IPv4 the packet's IPv4 header in the
// last 20 of them, the first 20 undefined. ibv_init_ah_from_wc needs the
// sender's and the receiver's GIDs from either.
#pragma once

#include <arpa/inet.h>
#include <infiniband/verbs.h>

#include <cstdint>
#include <cstring>

namespace vib::front {

struct ReceivedHeader {
  ibv_gid sender{}, receiver{};  // IPv4 addresses as ::ffff:a.b.c.d
  std::uint32_t flow_label = 0;
  std::uint8_t hop_limit = 0, traffic_class = 0;
};

namespace detail {

inline bool ipv4_header_checks(const std::uint8_t* h) {
  std::uint32_t sum = 0;
  for (int i = 0; i < 20; i += 2) sum += static_cast<std::uint32_t>(h[i] << 8 | h[i + 1]);
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  return sum == 0xffff;  // the header's own checksum included
}

inline ibv_gid v4_mapped(const std::uint8_t* address) {
  ibv_gid gid{};
  gid.raw[10] = gid.raw[11] = 0xff;
  std::memcpy(gid.raw + 12, address, 4);
  return gid;
}

}  // namespace detail

// `link_layer`: the port's (IBV_LINK_LAYER_*). An Ethernet port's header is
// IPv4 when bytes 20..39 are a well-formed IPv4 header (version 4, 20 bytes
// long, its checksum right) or when bytes 0..39 cannot be an IPv6 header
// and bytes 20.. say version 4; otherwise it is a GRH / IPv6 header.
inline ReceivedHeader decode_received_header(const ibv_grh& grh, std::uint8_t link_layer) {
  const auto* bytes = reinterpret_cast<const std::uint8_t*>(&grh);
  const std::uint8_t* v4 = bytes + 20;
  const bool looks_v4 = (v4[0] >> 4) == 4 && (v4[0] & 0xf) == 5;
  const bool v6 = (bytes[0] >> 4) == 6;
  ReceivedHeader out;
  if (link_layer == IBV_LINK_LAYER_ETHERNET && looks_v4 && (detail::ipv4_header_checks(v4) || !v6)) {
    out.sender = detail::v4_mapped(v4 + 12);
    out.receiver = detail::v4_mapped(v4 + 16);
    out.hop_limit = v4[8];
    out.traffic_class = v4[1];
    return out;
  }
  std::uint32_t word;
  std::memcpy(&word, bytes, 4);
  word = ntohl(word);
  out.sender = grh.sgid;
  out.receiver = grh.dgid;
  out.flow_label = word & 0xfffff;
  out.traffic_class = static_cast<std::uint8_t>((word >> 20) & 0xff);
  // An IB reply goes as far as it may; a RoCE one as far as it came.
  out.hop_limit = link_layer == IBV_LINK_LAYER_ETHERNET ? grh.hop_limit : 0xff;
  return out;
}

}  // namespace vib::front
