#include "transport/ucx/ucx_context.h"

#include <cstdlib>
#include <string>

namespace kvgate::transport {

Status ucx_status(ucs_status_t status, std::string_view what) {
  std::string m = "ucx: " + std::string(what) + ": " + ucs_status_string(status);
  switch (status) {
    case UCS_OK:
      return {};
    case UCS_ERR_CANCELED:
      return Status(StatusCode::kCancelled, std::move(m));
    case UCS_ERR_NO_MEMORY:
    case UCS_ERR_NO_RESOURCE:
    case UCS_ERR_EXCEEDS_LIMIT:
      return resource_exhausted(std::move(m));
    case UCS_ERR_UNSUPPORTED:
      return unimplemented(std::move(m));
    case UCS_ERR_INVALID_PARAM:
    case UCS_ERR_INVALID_ADDR:
      return invalid_argument(std::move(m));
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_ENDPOINT_TIMEOUT:
    case UCS_ERR_TIMED_OUT:
    case UCS_ERR_NO_DEVICE:
    case UCS_ERR_IO_ERROR:
    case UCS_ERR_REJECTED:
    case UCS_ERR_NOT_CONNECTED:
    case UCS_ERR_SOME_CONNECTS_FAILED:
      return unavailable(std::move(m));
    default:
      return internal_error(std::move(m));
  }
}

namespace {

struct UcxDefault {
  const char* env;    // the user's variable: when set, it wins
  const char* key;    // as ucp_config_modify takes it (applied to every
                      // transport whose configuration has that field)
  const char* value;
};
// TCP_RX_SEG_SIZE: the tcp transport's receive buffer, which is also its
// largest active message, hence the fragment size of a rendezvous over tcp
// (UCX 1.13 moves rendezvous data over tcp as AM fragments, copied once
// from that buffer into the destination). 64 KiB (UCX's default) costs a
// handler call and a recv() per 64 KiB; 512 KiB measured ~25% more goodput
// at 16–64 MiB on loopback (transport/README.md). Ends with different
// values still interoperate (checked with ucx_perftest, 64K against 512K).
constexpr UcxDefault kUcxDefaults[] = {{"UCX_TCP_RX_SEG_SIZE", "RX_SEG_SIZE", "512K"}};

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ",") + x;
  return s;
}

}  // namespace

Result<std::unique_ptr<UcxContext>> UcxContext::create(const TransportConfig& config, std::byte* region,
                                                       size_t region_bytes) {
  std::unique_ptr<UcxContext> self(new UcxContext);
  ucp_config_t* cfg = nullptr;
  ucs_status_t st = ucp_config_read(nullptr, nullptr, &cfg);
  if (st != UCS_OK) return ucx_status(st, "reading UCX configuration");
  if (!config.ucx_tls.empty()) st = ucp_config_modify(cfg, "TLS", join(config.ucx_tls).c_str());
  if (st == UCS_OK && !config.ucx_net_devices.empty())
    st = ucp_config_modify(cfg, "NET_DEVICES", join(config.ucx_net_devices).c_str());
  if (st != UCS_OK) {
    ucp_config_release(cfg);
    return ucx_status(st, "transport.ucx_tls/ucx_net_devices");
  }
  // Defaults kvgate chooses for UCX (each only where the user's environment
  // does not set it): see kUcxDefaults.
  for (const auto& d : kUcxDefaults) {
    if (std::getenv(d.env) != nullptr) continue;
    st = ucp_config_modify(cfg, d.key, d.value);
    if (st != UCS_OK) {
      ucp_config_release(cfg);
      return ucx_status(st, std::string("setting ") + d.env);
    }
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  // TAG: any receiver accepts the tag op from its peers.
  params.features = UCP_FEATURE_AM | UCP_FEATURE_RMA | UCP_FEATURE_TAG;
  st = ucp_init(&params, cfg, &self->context_);
  ucp_config_release(cfg);
  if (st != UCS_OK) return ucx_status(st, "ucp_init");

  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;
  st = ucp_worker_create(self->context_, &wp, &self->worker_);
  if (st != UCS_OK) return ucx_status(st, "ucp_worker_create");

  ucp_address_t* addr = nullptr;
  size_t addr_len = 0;
  st = ucp_worker_get_address(self->worker_, &addr, &addr_len);
  if (st != UCS_OK) return ucx_status(st, "ucp_worker_get_address");
  const auto* a = reinterpret_cast<const std::byte*>(addr);
  self->worker_address_.assign(a, a + addr_len);
  ucp_worker_release_address(self->worker_, addr);

  if (region != nullptr && region_bytes > 0) {
    ucp_mem_map_params_t mp{};
    mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
    mp.address = region;
    mp.length = region_bytes;
    st = ucp_mem_map(self->context_, &mp, &self->memh_);
    if (st != UCS_OK) return ucx_status(st, "registering the KV region");
    void* rkey = nullptr;
    size_t rkey_len = 0;
    st = ucp_rkey_pack(self->context_, self->memh_, &rkey, &rkey_len);
    if (st != UCS_OK) return ucx_status(st, "ucp_rkey_pack");
    const auto* r = static_cast<const std::byte*>(rkey);
    self->packed_rkey_.assign(r, r + rkey_len);
    ucp_rkey_buffer_release(rkey);
  }
  return self;
}

UcxContext::~UcxContext() {
  if (memh_) ucp_mem_unmap(context_, memh_);
  if (worker_) ucp_worker_destroy(worker_);
  if (context_) ucp_cleanup(context_);
}

}  // namespace kvgate::transport
