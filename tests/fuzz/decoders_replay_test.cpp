// The fast-path, xenstore-value and connection-manager fuzz targets' bodies
// in every build: the seed corpus (tests/fuzz/corpus), then pseudo-random
// inputs.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <vector>

#include "cm_input.hpp"
#include "wqe_input.hpp"
#include "xenstore_values_input.hpp"

namespace {

using Input = std::vector<std::uint8_t>;

std::map<std::string, Input> seeds(const std::string& target) {
  std::map<std::string, Input> out;
  for (const auto& entry : std::filesystem::directory_iterator(std::string(VIB_FUZZ_CORPUS) + "/" + target)) {
    std::ifstream in(entry.path(), std::ios::binary);
    out[entry.path().filename()] = Input(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  return out;
}

TEST(WqeFuzzReplay, SeedsAndRandomQueueEntries) {
  const auto corpus = seeds("wqe");
  ASSERT_GE(corpus.size(), 4u);
  std::map<std::string, std::size_t> successes;
  for (const auto& [name, seed] : corpus) successes[name] = vib::test::run_wqe_input(seed.data(), seed.size());
  // The seeds reach the HCA, not only the decoders' refusals: the receive,
  // SEND, RDMA WRITE and READ all complete, as do the UD send and its
  // receive on the SRQ.
  EXPECT_EQ(successes["rc-send-write-read"], 4u);
  EXPECT_EQ(successes["ud-srq"], 2u);
  EXPECT_EQ(successes["malformed"], 0u);
  std::mt19937_64 rng(20261205);
  for (int round = 0; round < 300; ++round) {
    Input input(16 + rng() % 2048);
    for (auto& b : input) b = static_cast<std::uint8_t>(rng());
    // Mostly small keys, handles and counts, as the steering expects.
    for (std::size_t i = 0; i < input.size(); ++i)
      if (rng() % 3 == 0) input[i] = static_cast<std::uint8_t>(rng() % 3);
    vib::test::run_wqe_input(input.data(), input.size());
  }
}

TEST(XenstoreValuesFuzzReplay, SeedsAndRandomValues) {
  const auto corpus = seeds("xenstore_values");
  ASSERT_GE(corpus.size(), 4u);
  for (const auto& [name, seed] : corpus) vib::test::run_xenstore_values_input(seed.data(), seed.size());
  std::mt19937_64 rng(20261205);
  const std::string alphabet = "0123456789xX,:= .-/abcdef\x01";
  for (int round = 0; round < 3000; ++round) {
    Input input(rng() % 200);
    for (auto& b : input)
      b = rng() % 8 == 0 ? 0 : static_cast<std::uint8_t>(alphabet[rng() % alphabet.size()]);
    vib::test::run_xenstore_values_input(input.data(), input.size());
  }
}

// The seeds drive whole exchanges, not only refusals: each reaches the
// events its story ends with (rdma_cm_event_type numbers).
TEST(CmFuzzReplay, SeedsAndRandomRequests) {
  const auto corpus = seeds("cm");
  ASSERT_GE(corpus.size(), 5u);
  std::map<std::string, std::uint32_t> events;
  for (const auto& [name, seed] : corpus) events[name] = vib::test::run_cm_input(seed.data(), seed.size());
  auto saw = [&](const std::string& seed, std::initializer_list<int> wanted) {
    for (int e : wanted) EXPECT_TRUE(events[seed] & (1u << e)) << seed << ": event " << e << " never came";
  };
  constexpr int kAddrResolved = 0, kRouteResolved = 2, kConnectRequest = 4, kConnectResponse = 5, kRejected = 8,
                kEstablished = 9, kDisconnected = 10;
  saw("rc-handshake",
      {kAddrResolved, kRouteResolved, kConnectRequest, kConnectResponse, kEstablished, kDisconnected});
  saw("reject-with-data", {kConnectRequest, kRejected});
  saw("ud-sidr", {kConnectRequest, kEstablished});
  saw("peer-dies-mid-handshake", {kConnectRequest, kRejected});
  saw("loopback-and-refusals", {kAddrResolved, kRouteResolved, kConnectRequest});
  std::mt19937_64 rng(20261207);
  for (int round = 0; round < 300; ++round) {
    Input input(3 + rng() % 1024);
    for (auto& b : input) b = static_cast<std::uint8_t>(rng());
    // Mostly small ids and lengths, as the steering expects.
    for (std::size_t i = 0; i < input.size(); ++i)
      if (rng() % 3 == 0) input[i] = static_cast<std::uint8_t>(rng() % 4);
    vib::test::run_cm_input(input.data(), input.size());
  }
}

}  // namespace
