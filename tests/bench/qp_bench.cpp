// The control path's cost, on the call programs make most: create an RC QP,
// take it through INIT, RTR and RTS towards a peer, destroy it. Direct on
// the soft HCA in this process, and through vib (one ring round trip per
// call, and the QP's queue pages granted to vibd and mapped there).
#include <algorithm>

#include "bench_sections.hpp"
#include "bench_workload.hpp"
#include "vib/front/verbs.hpp"
#include "vib/platform/hca.hpp"

namespace vib::bench {

namespace {

// Median of `iterations` timed runs of `once`, in µs.
template <class F>
double median_us(int iterations, F once) {
  for (int i = 0; i < std::max(5, iterations / 10); ++i) once();  // warm up
  std::vector<double> samples;
  samples.reserve(static_cast<std::size_t>(iterations));
  for (int i = 0; i < iterations; ++i) {
    const auto t0 = Clock::now();
    once();
    samples.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  std::sort(samples.begin(), samples.end());
  return percentile(samples, 50);
}

}  // namespace

QpLifecycle run_qp_lifecycle(int iterations, const std::string& vibd_log) {
  QpLifecycle r;
  {
    auto hca = platform::open_hca("soft");
    auto pd = hca->alloc_pd();
    auto cq = hca->create_cq(256);
    ibv_port_attr port{};
    hca->query_port(1, port);
    platform::QueuePairInit init;
    init.send_cq = init.recv_cq = cq.get();
    init.cap = queue_caps();
    auto peer = hca->create_qp(*pd, init);
    r.direct_us = median_us(iterations, [&] {
      auto qp = hca->create_qp(*pd, init);
      connect_qp(*qp, port.lid, peer->qp_num());
    });
  }
  {
    VibHost host({5}, vibd_log, vibd_args());
    front::ChannelOptions options;
    options.xen = host.as(5);
    auto device = front::Device::open(options);
    auto pd = device->alloc_pd();
    auto cq = device->create_cq(256);
    ibv_port_attr port{};
    device->query_port(1, port);
    front::QpInit init;
    init.send_cq = init.recv_cq = cq.get();
    init.cap = queue_caps();
    auto peer = pd->create_qp(init);
    r.via_us = median_us(iterations, [&] {
      auto qp = pd->create_qp(init);
      connect_qp(*qp, port.lid, peer->qp_num());
      if (qp->destroy() != 0) fail("QP lifecycle: destroy refused");
    });
  }
  return r;
}

}  // namespace vib::bench
