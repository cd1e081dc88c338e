// Helpers for the decode node tests: a fake control connection that records
// what the node sends, a prefill done in-process the way the prefill node
// does it (prefill_compressed in a pool of the decode node's page size,
// export_wire_image), and shipping its pages through a sender Transport.
// Waiting is always on a condition with a deadline, never a fixed sleep.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/control_channel.h"
#include "common/control_protocol.h"
#include "common/crc32c.h"
#include "engine/kv_policy_spec.h"
#include "engine/model.h"
#include "engine/policy_cache.h"
#include "engine/sampler.h"
#include "kvstore/footprint.h"
#include "kvstore/page_pool.h"
#include "kvstore/wire_image.h"
#include "transport/transport.h"
#include "transport/wire.h"

namespace kvgate::decode::testing {

using namespace std::chrono_literals;
using Messages = std::vector<control::Message>;

// A control connection that records every message sent on it.
class FakeConnection final : public control::Connection {
 public:
  void send(const control::Message& message) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return;
    messages_.push_back(message);
    cv_.notify_all();
  }
  void close(const Status&) override {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
    cv_.notify_all();
  }
  bool is_open() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return !closed_;
  }
  const control::Hello& peer() const override { return hello_; }
  std::string remote_address() const override { return "fake"; }

  // Waits until done(messages) or the limit passes; returns done(). `done`
  // runs under the lock: it must use its argument, not the accessors.
  bool wait(const std::function<bool(const Messages&)>& done,
            std::chrono::milliseconds limit = 120000ms) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, limit, [&] { return done(messages_); });
  }
  Messages messages() const {
    std::lock_guard<std::mutex> lock(mu_);
    return messages_;
  }
  template <typename T>
  std::vector<T> all(RequestId id = RequestId()) const {
    std::vector<T> out;
    for (const auto& m : messages()) {
      if (const T* t = std::get_if<T>(&m)) {
        if (!id.valid() || t->request_id == id) out.push_back(*t);
      }
    }
    return out;
  }
  // Waits for the first T of request `id`.
  template <typename T>
  std::optional<T> wait_for(RequestId id, std::chrono::milliseconds limit = 120000ms) {
    std::optional<T> found;
    wait(
        [&](const Messages& ms) {
          for (const auto& m : ms) {
            if (const T* t = std::get_if<T>(&m); t && t->request_id == id) {
              found = *t;
              return true;
            }
          }
          return false;
        },
        limit);
    return found;
  }
  // Waits for the last TokenChunk of `id` (finish_reason != kNone).
  bool wait_finished(RequestId id, std::chrono::milliseconds limit = 120000ms) {
    return wait(
        [&](const Messages& ms) {
          for (const auto& m : ms) {
            if (const auto* c = std::get_if<control::TokenChunk>(&m);
                c && c->request_id == id && c->finish_reason != control::FinishReason::kNone) {
              return true;
            }
          }
          return false;
        },
        limit);
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  Messages messages_;
  bool closed_ = false;
  control::Hello hello_;
};

// Messages of type T for request `id` in `ms` (for wait() predicates, which
// run under the connection's lock and must not call its accessors).
template <typename T>
size_t count_of(const Messages& ms, RequestId id) {
  size_t n = 0;
  for (const auto& m : ms) {
    if (const T* t = std::get_if<T>(&m); t && t->request_id == id) ++n;
  }
  return n;
}

// The streamed completion of one request, from its chunks.
struct Streamed {
  std::vector<int32_t> tokens;
  std::string text;
  control::FinishReason finish = control::FinishReason::kNone;
  control::Usage usage;
  size_t chunks = 0;
  bool indexes_consistent = true;  // first_token_index counts the tokens before
};

inline Streamed streamed(const FakeConnection& conn, RequestId id) {
  Streamed s;
  for (const auto& c : conn.all<control::TokenChunk>(id)) {
    if (c.first_token_index != s.tokens.size()) s.indexes_consistent = false;
    s.tokens.insert(s.tokens.end(), c.token_ids.begin(), c.token_ids.end());
    s.text += c.text;
    s.usage = c.usage;
    ++s.chunks;
    if (c.finish_reason != control::FinishReason::kNone) s.finish = c.finish_reason;
  }
  return s;
}

// A prompt's compressed cache, built as the prefill node builds it.
struct Prefilled {
  engine::KvPolicyConfig policy;
  std::shared_ptr<const engine::PolicyPlan> plan;
  std::unique_ptr<kvstore::PagePool> pool;
  std::optional<kvstore::CompressedKvCache> cache;
  kvstore::WireImage image;
  int32_t first_token = -1;
  int64_t prompt_tokens = 0;
  std::vector<std::vector<std::byte>> staging;  // one buffer per segment, alive until sent
};

inline std::unique_ptr<Prefilled> prefill(engine::CpuForward& forward,
                                          const engine::KvPolicyConfig& policy,
                                          const std::vector<int32_t>& prompt, int64_t page_bytes) {
  auto p = std::make_unique<Prefilled>();
  p->policy = policy;
  auto plan = engine::plan_kv_policy(forward.model().config(), policy);
  EXPECT_TRUE(plan.ok()) << plan.status().to_string();
  if (!plan.ok()) return nullptr;
  p->plan = *plan;
  auto bytes = engine::compressed_pool_bytes(p->plan->layout, static_cast<int64_t>(prompt.size()),
                                             page_bytes);
  EXPECT_TRUE(bytes.ok()) << bytes.status().to_string();
  auto pool = kvstore::PagePool::create(page_bytes, *bytes + 4 * page_bytes);
  EXPECT_TRUE(pool.ok());
  p->pool = std::move(*pool);
  std::vector<float> logits(forward.model().config().n_vocab);
  auto pre = engine::prefill_compressed(forward, p->plan, prompt, p->pool.get(), logits);
  EXPECT_TRUE(pre.ok()) << pre.status().to_string();
  if (!pre.ok()) return nullptr;
  p->cache.emplace(std::move(pre->cache));
  p->first_token = engine::argmax(logits);
  p->prompt_tokens = static_cast<int64_t>(prompt.size());
  auto image = kvstore::export_wire_image(*p->cache);
  EXPECT_TRUE(image.ok()) << image.status().to_string();
  p->image = std::move(*image);
  return p;
}

// The manifest the prefill node sends after its transfer.
inline control::TransferManifest manifest_for(const Prefilled& p, RequestId id, LeaseId lease,
                                              uint32_t max_new_tokens) {
  control::TransferManifest m;
  m.request_id = id;
  m.lease_id = lease;
  m.layout_version = kvstore::kWireImageVersion;
  m.layout_descriptor = p.image.descriptor;
  for (const auto& seg : p.image.segments) {
    control::TransferSegment s;
    s.offset_bytes = static_cast<uint64_t>(seg.first_page * p.image.page_bytes);
    s.length_bytes = static_cast<uint64_t>(seg.n_pages * p.image.page_bytes);
    m.segments.push_back(s);
  }
  m.actual_bytes = static_cast<uint64_t>(p.cache->bytes());
  m.dense_bytes = static_cast<uint64_t>(kvstore::dense_bytes(p.plan->layout, p.prompt_tokens));
  m.keep_rate = engine::cache_keep_rate(*p.cache);
  m.prompt_tokens = static_cast<uint32_t>(p.prompt_tokens);
  m.first_token_id = p.first_token;
  m.generation.max_new_tokens = max_new_tokens;
  m.kv_policy = engine::kv_policy_spec(p.policy);
  return m;
}

// Ships the image's pages into the grant (one segment per wire segment,
// gathered into staging buffers) and progresses `sender` until its send
// event. Returns the sender's event status.
inline Status ship(transport::Transport& sender, transport::PeerId peer,
                   const transport::Bytes& grant, Prefilled& p) {
  auto g = transport::wire::decode_grant(grant);
  if (!g.ok()) return g.status();
  const transport::TransferId id(g->transfer_id);
  KVGATE_RETURN_IF_ERROR(sender.begin_send(peer, id, grant, transport::Clock::now() + 60s));
  const int64_t pb = p.image.page_bytes;
  p.staging.clear();
  p.staging.resize(p.image.segments.size());
  for (size_t i = 0; i < p.image.segments.size(); ++i) {
    const auto& seg = p.image.segments[i];
    auto& buf = p.staging[i];
    buf.resize(static_cast<size_t>(seg.n_pages * pb));
    for (int64_t k = 0; k < seg.n_pages; ++k) {
      std::memcpy(buf.data() + k * pb, p.pool->data(p.image.pages[seg.first_page + k]),
                  static_cast<size_t>(pb));
    }
    KVGATE_RETURN_IF_ERROR(sender.send_segment(peer, id, static_cast<uint32_t>(i), buf.data(),
                                               buf.size(),
                                               static_cast<uint64_t>(seg.first_page * pb)));
  }
  KVGATE_RETURN_IF_ERROR(sender.finish(peer, id));
  std::vector<transport::TransferEvent> events;
  const auto end = transport::Clock::now() + 60s;
  while (transport::Clock::now() < end) {
    sender.progress(events);
    for (const auto& e : events) {
      if (e.side == transport::TransferSide::kSend && e.id == id) return e.status;
    }
    std::this_thread::yield();  // the receiver's engine thread does the copy
  }
  return Status(StatusCode::kDeadlineExceeded, "test: no send event");
}

}  // namespace kvgate::decode::testing
