// The rdma-core implementation on a machine without RDMA devices.
#include <gtest/gtest.h>

#include <cerrno>
#include <string>
#include <system_error>

#include "vib/platform/hca.hpp"

using namespace vib::platform;

TEST(VerbsHca, MissingDeviceFailsNamingIt) {
  // A name no HCA ever has, so the check runs on every machine.
  try {
    auto hca = open_hca("mlx5_0_vib_absent");
    FAIL() << "opened a device that does not exist";
  } catch (const std::system_error& e) {
    EXPECT_NE(e.code().value(), 0);
    EXPECT_NE(std::string(e.what()).find("mlx5_0_vib_absent"), std::string::npos) << e.what();
  }
}

TEST(VerbsHca, ListsSoftHcaFirstAndNoRdmaCoreDeviceHere) {
  auto hcas = list_hcas();
  ASSERT_FALSE(hcas.empty());
  EXPECT_EQ(hcas[0].name, kSoftHcaName);
  EXPECT_TRUE(hcas[0].software);
  for (std::size_t i = 1; i < hcas.size(); ++i) EXPECT_FALSE(hcas[i].software);
  EXPECT_EQ(hcas.size(), 1U) << "libibverbs found a device on the build machine";
}

TEST(VerbsHca, SoftAliasOpensSoft0) {
  EXPECT_EQ(open_hca("soft")->name(), "soft0");
  EXPECT_EQ(open_hca("soft0")->name(), "soft0");
}
