// vib= specs and xl configs: every key, its bounds (those vibd enforces),
// and errors that name the key and the item.
#include <gtest/gtest.h>

#include "vib/libxl_ib.h"
#include "vib/libxl_ib.hpp"
#include "vib/vibif.h"

using namespace vib::toolstack;

extern "C" int c_api_spec_check(const char* spec, char* err, unsigned long errlen);

namespace {

// The message of the Error that parsing `item` throws ("" if none).
std::string error_of(const std::string& item) {
  try {
    parse_spec(item);
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid);
    return e.what();
  }
  return "";
}

void expect_error(const std::string& item, const std::string& mentions) {
  const std::string why = error_of(item);
  EXPECT_NE(why.find(mentions), std::string::npos) << "spec '" << item << "': " << why;
  EXPECT_NE(why.find("'" + item + "'"), std::string::npos) << "the item is named: " << why;
}

}  // namespace

TEST(VibSpec, EveryKey) {
  auto s = parse_spec(
      "hca=mlx5_0,port=2,devid=3,backend=driverdom,pkeys=0x8001:0xffff,gid-indices=0:1,max-pds=4,max-cqs=5,"
      "max-qps=6,max-srqs=7,max-mrs=8,max-ahs=9,max-pinned-pages=0x1000,script=vib");
  EXPECT_EQ(s.hca, "mlx5_0");
  EXPECT_EQ(s.port, 2u);
  EXPECT_EQ(s.devid, 3u);
  EXPECT_EQ(s.backend, "driverdom");
  EXPECT_EQ(s.pkeys, (std::vector<std::uint16_t>{0x8001, 0xffff}));
  EXPECT_EQ(s.gid_indices, (std::vector<std::uint8_t>{0, 1}));
  EXPECT_EQ(s.max_pds, 4u);
  EXPECT_EQ(s.max_ahs, 9u);
  EXPECT_EQ(s.max_pinned_pages, 4096u);
  EXPECT_EQ(s.script, "vib");
  // What goes to xenstore is what vibd's read_device_config parses.
  const auto keys = s.backend_keys();
  const std::vector<std::pair<std::string, std::string>> want = {
      {"hca", "mlx5_0"},   {"port", "2"},    {"pkeys", "0x8001,0xffff"}, {"gid-indices", "0,1"},
      {"max-pds", "4"},    {"max-cqs", "5"}, {"max-qps", "6"},           {"max-srqs", "7"},
      {"max-mrs", "8"},    {"max-ahs", "9"}, {"max-pinned-pages", "4096"}, {"script", "vib"}};
  EXPECT_EQ(keys, want);
  EXPECT_EQ(parse_spec(s.to_string()).backend_keys(), keys) << s.to_string();
}

TEST(VibSpec, IpListsTheGuestsRdmaCmAddresses) {
  auto s = parse_spec("hca=soft,ip=192.0.2.5 2001:db8::5");
  EXPECT_EQ(s.ip, (std::vector<std::string>{"192.0.2.5", "2001:db8::5"}));
  EXPECT_EQ(s.backend_keys().back(), (std::pair<std::string, std::string>{"ip", "192.0.2.5 2001:db8::5"}));
  EXPECT_EQ(parse_spec(s.to_string()).ip, s.ip) << s.to_string();
  expect_error("ip=192.0.2.300", "bad ip '192.0.2.300'");
  expect_error("ip=host.example", "bad ip");
}

TEST(VibSpec, DefaultsAreLeftToTheBackend) {
  for (const char* item : {"", "  "}) {
    auto s = parse_spec(item);
    EXPECT_FALSE(s.hca);
    EXPECT_EQ(s.port, unsigned{VIBIF_DEFAULT_PORT});
    EXPECT_FALSE(s.devid) << "lowest free";
    EXPECT_EQ(s.backend, "0");
    EXPECT_TRUE(s.pkeys.empty());
    EXPECT_FALSE(s.max_qps);
    EXPECT_EQ(s.backend_keys(), (std::vector<std::pair<std::string, std::string>>{{"port", "1"}}));
  }
}

TEST(VibSpec, ListValuesAcceptCommasSpacesAndColons) {
  EXPECT_EQ(parse_spec("pkeys=0xffff,0x8001,hca=soft").pkeys, (std::vector<std::uint16_t>{0xffff, 0x8001}));
  EXPECT_EQ(parse_spec(" hca = soft , gid-indices=1:2 ,3").gid_indices, (std::vector<std::uint8_t>{1, 2, 3}));
  EXPECT_EQ(parse_spec("pkeys=32769").pkeys, (std::vector<std::uint16_t>{0x8001}));
}

TEST(VibSpec, EveryKindOfBadSpec) {
  expect_error("hca=soft,colour=blue", "unknown key 'colour'");
  expect_error("hca=soft,nonsense", "'nonsense' is not key=value");
  expect_error("hca", "'hca' is not key=value");
  expect_error("hca=", "key 'hca' has no value");
  expect_error("hca=soft,,port=1", "empty entry");
  expect_error("hca=soft,", "empty entry");
  expect_error("hca=soft,hca=mlx5_0", "key 'hca' given twice");
  expect_error("hca=../etc", "bad hca '../etc'");
  expect_error("hca=a/b", "bad hca");
  expect_error("hca=" + std::string(65, 'x'), "bad hca");
  expect_error("port=0", "bad port '0' (a number 1..255)");
  expect_error("port=256", "bad port '256'");
  expect_error("port=one", "bad port 'one'");
  expect_error("port=-1", "bad port");
  expect_error("devid=65536", "bad devid '65536'");
  expect_error("devid=x", "bad devid");
  expect_error("backend=a/b", "bad backend");
  expect_error("pkeys=0x10000", "bad pkeys '0x10000'");
  expect_error("pkeys=0xffff:zz", "bad pkeys");
  expect_error("pkeys=1:2:3:4:5:6:7:8:9:10:11:12:13:14:15:16:17", "at most 16 values");
  expect_error("gid-indices=256", "bad gid-indices '256'");
  expect_error("gid-indices=0::1", "bad gid-indices");
  for (const char* q : {"max-pds", "max-cqs", "max-qps", "max-srqs", "max-mrs", "max-ahs"}) {
    expect_error(std::string(q) + "=65536", std::string("bad ") + q + " '65536'");
    expect_error(std::string(q) + "=1k", std::string("bad ") + q + " '1k'");
  }
  expect_error("max-pinned-pages=1099511627777", "bad max-pinned-pages");
  expect_error("script=a\tb", "bad script");
}

TEST(VibConfig, ParsedWithLibxlutil) {
  const auto specs = parse_config(
      "name = \"guest\"\n"
      "memory = 1024\n"
      "vif = [ 'bridge=xenbr0' ]\n"
      "vib = [ 'hca=mlx5_0,port=1,pkeys=0x8001', 'hca=soft' ]\n");
  ASSERT_EQ(specs.size(), 2u);
  EXPECT_EQ(specs[0].hca, "mlx5_0");
  EXPECT_EQ(specs[0].pkeys, (std::vector<std::uint16_t>{0x8001}));
  EXPECT_EQ(specs[1].hca, "soft");
  EXPECT_TRUE(parse_config("name = \"guest\"\n").empty()) << "no vib= line, no devices";
}

TEST(VibConfig, BadConfigs) {
  auto error = [](const std::string& text) -> std::string {
    try {
      parse_config(text, "guest.cfg");
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::invalid);
      return e.what();
    }
    return "";
  };
  EXPECT_NE(error("vib = 'hca=soft'\n").find("must be a list"), std::string::npos);
  EXPECT_NE(error("vib = [ 'hca=soft' \n").find("guest.cfg"), std::string::npos) << "libxlutil's report";
  EXPECT_NE(error("vib = [ 'hca=soft', 'port=0' ]\n").find("'port=0'"), std::string::npos);
}

TEST(VibCApi, SpecCheckCrossesNoException) {
  char err[256];
  EXPECT_EQ(vib_spec_check("hca=soft,port=1", err, sizeof err), VIB_TK_OK);
  EXPECT_STREQ(err, "");
  EXPECT_EQ(vib_spec_check("hca=soft,port=0", err, sizeof err), VIB_TK_ERR_INVALID);
  EXPECT_NE(std::string(err).find("bad port"), std::string::npos) << err;
  char tiny[8];
  EXPECT_EQ(vib_spec_check("bogus=1", tiny, sizeof tiny), VIB_TK_ERR_INVALID);
  EXPECT_EQ(std::string(tiny).size(), 7u) << "truncated, terminated";
  // And from a C translation unit.
  EXPECT_EQ(c_api_spec_check("max-qps=x", err, sizeof err), VIB_TK_ERR_INVALID);
  EXPECT_NE(std::string(err).find("max-qps"), std::string::npos) << err;
  vib_tk* tk = nullptr;
  EXPECT_EQ(vib_tk_open(&tk, "/nonexistent-vib-dir", 0, err, sizeof err), VIB_TK_ERR_XENSTORE);
  EXPECT_EQ(tk, nullptr);
  EXPECT_NE(std::string(err), "");
}
