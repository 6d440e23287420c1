// Memory registration's cost (issue 13): ibv_reg_mr and ibv_dereg_mr of an
// application buffer per size, direct on the soft HCA in this process and
// through vib (the pages granted in place, the refs sent in REG_MR, vibd
// registering them). Each size is registered anew every time: no cache.
#include <algorithm>

#include "bench_sections.hpp"
#include "bench_workload.hpp"
#include "vib/front/verbs.hpp"
#include "vib/platform/hca.hpp"

namespace vib::bench {

namespace {

// Medians over `rounds` of one registration followed by its deregistration.
template <class Register>
RegCost time_rounds(int rounds, Register reg) {
  std::vector<double> reg_us, dereg_us;
  for (int i = 0; i < rounds + 1; ++i) {  // the first round warms up
    const auto t0 = Clock::now();
    auto mr = reg();
    const auto t1 = Clock::now();
    mr.reset();
    const auto t2 = Clock::now();
    if (i == 0) continue;
    reg_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    dereg_us.push_back(std::chrono::duration<double, std::micro>(t2 - t1).count());
  }
  std::sort(reg_us.begin(), reg_us.end());
  std::sort(dereg_us.begin(), dereg_us.end());
  return {percentile(reg_us, 50), percentile(dereg_us, 50)};
}

// Fewer rounds for larger sizes: about the same time per size.
int rounds_for(std::size_t bytes, int iterations) {
  const std::size_t pages = bytes / 4096;
  return static_cast<int>(std::clamp<std::size_t>(static_cast<std::size_t>(iterations) / 10 / std::max<std::size_t>(1, pages / 64), 3, 200));
}

}  // namespace

std::vector<RegSize> run_registration(const std::vector<std::size_t>& sizes, int iterations,
                                      const std::string& vibd_log) {
  std::vector<RegSize> out;
  const std::size_t largest = *std::max_element(sizes.begin(), sizes.end());
  Buffer buffer(largest);
  constexpr int kAccessAll = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;
  auto hca = platform::open_hca("soft");
  auto direct_pd = hca->alloc_pd();
  VibHost host({5}, vibd_log, vibd_args());
  front::ChannelOptions options;
  options.xen = host.as(5);
  options.timeout = std::chrono::seconds(60);
  auto device = front::Device::open(options);
  auto pd = device->alloc_pd();
  for (std::size_t bytes : sizes) {
    const int rounds = rounds_for(bytes, iterations);
    RegSize r{bytes, {}, {}};
    r.direct = time_rounds(rounds, [&] {
      return hca->reg_mr(*direct_pd, buffer.data, bytes, reinterpret_cast<std::uintptr_t>(buffer.data), kAccessAll);
    });
    r.via = time_rounds(rounds, [&] { return pd->reg_mr(buffer.data, bytes, kAccessAll); });
    out.push_back(r);
  }
  return out;
}

}  // namespace vib::bench
