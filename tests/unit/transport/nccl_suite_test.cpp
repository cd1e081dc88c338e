// The transport suite (transport_suite_test.cpp, transport_segment_signals_
// test.cpp: every scenario every backend must pass) over the nccl transport
// on fake links: a FakeNcclFabric of 8 ranks (host memory) and local control
// links. create_transport(kind nccl) reaches them through the link provider
// registered here, so the suite's fixture builds nccl transports as it
// builds the others. The binary holds the suite's files too; ctest runs only
// the NcclFake instantiation (tests/CMakeLists.txt: TEST_FILTER).
#include <gtest/gtest.h>

#include <memory>

#include "tests/unit/transport/transport_suite_fixture.h"
#include "tests/unit/transport/transport_test_util.h"
#include "transport/nccl/fake_nccl_link.h"
#include "transport/nccl/local_control_link.h"
#include "transport/nccl/nccl_transport.h"

namespace kvgate::transport::testing {
namespace {

// Installs the provider before any test: each transport created gets the
// lowest rank without a live link (a destroyed transport frees its rank).
class NcclFakeEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    auto fabric = FakeNcclFabric::create(8);
    set_nccl_link_provider([fabric]() -> Result<NcclLinks> {
      const int rank = fabric->next_free_rank();
      if (rank < 0) return resource_exhausted("fake nccl: all 8 ranks are in use");
      KVGATE_ASSIGN_OR_RETURN(auto data, fabric->link(rank));
      return NcclLinks{std::move(data), LocalControlLink::create()};
    });
  }
  void TearDown() override { set_nccl_link_provider(nullptr); }
};

const auto* const kEnv = ::testing::AddGlobalTestEnvironment(new NcclFakeEnvironment);

std::vector<TransportParam> nccl_params() {
  TransportConfig c;
  c.kind = TransportKind::kNccl;
  // "put" in the name: the suite's put expectations apply (landing notices
  // with the manifest; the sender checks the grant).
  return {{"nccl_put_fake", c}};
}

INSTANTIATE_TEST_SUITE_P(NcclFake, TransportSuite, ::testing::ValuesIn(nccl_params()),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace kvgate::transport::testing
