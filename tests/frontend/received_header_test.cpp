// The header in front of a UD receive, as vib's ibv_init_ah_from_wc reads
// it: a GRH on InfiniBand, an IPv4 header on RoCE v2 (lab scenario m:
// udaddy's server answering a native client over rxe through vib).
#include "received_header.hpp"

#include <gtest/gtest.h>

#include <array>
#include <cstring>

namespace {

using vib::front::decode_received_header;

// 20 undefined bytes, then an IPv4 header from 192.0.2.1 to 192.0.2.10.
ibv_grh roce_v2_ipv4(bool right_checksum, std::uint8_t first = 0) {
  std::array<std::uint8_t, 40> bytes{};
  bytes.fill(first);
  std::uint8_t* ip = bytes.data() + 20;
  const std::uint8_t header[20] = {0x45, 0x10, 0, 60, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0, 192, 0, 2, 1, 192, 0, 2, 10};
  std::memcpy(ip, header, 20);
  std::uint32_t sum = 0;
  for (int i = 0; i < 20; i += 2) sum += static_cast<std::uint32_t>(ip[i] << 8 | ip[i + 1]);
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  const auto check = static_cast<std::uint16_t>(~sum + (right_checksum ? 0 : 1));
  ip[10] = static_cast<std::uint8_t>(check >> 8);
  ip[11] = static_cast<std::uint8_t>(check);
  ibv_grh grh;
  std::memcpy(&grh, bytes.data(), sizeof grh);
  return grh;
}

// Whether `gid` is ::ffff:192.0.2.<last>.
bool is_mapped(const ibv_gid& gid, std::uint8_t last) {
  const std::uint8_t want[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, last};
  return std::memcmp(gid.raw, want, 16) == 0;
}

TEST(ReceivedHeader, RoceV2CarriesAnIpv4HeaderWhoseAddressesAreTheGids) {
  const auto h = decode_received_header(roce_v2_ipv4(true), IBV_LINK_LAYER_ETHERNET);
  EXPECT_TRUE(is_mapped(h.sender, 1));
  EXPECT_TRUE(is_mapped(h.receiver, 10));
  EXPECT_EQ(h.hop_limit, 64);
  EXPECT_EQ(h.traffic_class, 0x10);
  EXPECT_EQ(h.flow_label, 0u);
}

TEST(ReceivedHeader, UndefinedBytesThatLookLikeIpv6DoNotHideAGoodIpv4Header) {
  const auto h = decode_received_header(roce_v2_ipv4(true, 0x60), IBV_LINK_LAYER_ETHERNET);
  EXPECT_TRUE(is_mapped(h.sender, 1));
}

TEST(ReceivedHeader, AnIpv6HeaderWithABadIpv4ChecksumAtTwentyIsAGrh) {
  ibv_grh grh = roce_v2_ipv4(false, 0x60);
  const auto h = decode_received_header(grh, IBV_LINK_LAYER_ETHERNET);
  EXPECT_EQ(std::memcmp(&h.sender, &grh.sgid, 16), 0);
  EXPECT_EQ(std::memcmp(&h.receiver, &grh.dgid, 16), 0);
}

TEST(ReceivedHeader, InfinibandAlwaysHasAGrh) {
  ibv_grh grh{};
  grh.version_tclass_flow = htonl(6u << 28 | 0x23u << 20 | 0x12345u);
  grh.hop_limit = 3;
  grh.sgid.raw[15] = 7;
  grh.dgid.raw[15] = 8;
  const auto h = decode_received_header(grh, IBV_LINK_LAYER_INFINIBAND);
  EXPECT_EQ(h.sender.raw[15], 7);
  EXPECT_EQ(h.receiver.raw[15], 8);
  EXPECT_EQ(h.flow_label, 0x12345u);
  EXPECT_EQ(h.traffic_class, 0x23);
  EXPECT_EQ(h.hop_limit, 0xff);
  // An IPv4-looking tail changes nothing on InfiniBand.
  const auto v4 = decode_received_header(roce_v2_ipv4(true), IBV_LINK_LAYER_INFINIBAND);
  EXPECT_EQ(v4.hop_limit, 0xff);
  EXPECT_EQ(v4.sender.raw[10], 0);
}

}  // namespace
