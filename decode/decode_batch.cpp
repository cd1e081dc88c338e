// The decode engine's batched step and token streaming (decode_engine.h,
// docs/cluster.md step 6).
#include <algorithm>
#include <chrono>

#include "decode/decode_engine.h"
#include "decode/decode_sequence.h"

namespace kvgate::decode {

Status DecodeEngine::ensure_pages(Request& r) {
  const int64_t need = engine::max_append_pages(*r.seq->cache);
  const int64_t left = leases_->pages_left(r.lease);
  if (left >= need) return Status();
  // Grow the committed lease by a page round: what the worst next append
  // takes, so a lease near its end is not extended every step.
  auto grown = leases_->extend(r.lease, need * page_bytes_, Clock::now());
  if (grown.ok()) return Status();
  return resource_exhausted("KV pool full: request " + std::to_string(r.id.value()) +
                            " needs up to " + std::to_string(need) + " more pages (" +
                            std::to_string(need * page_bytes_) + " bytes) at token " +
                            std::to_string(r.seq->cache->n_tokens()) +
                            " and its lease cannot grow: " + grown.status().message());
}

control::FinishReason DecodeEngine::accept_token(Request& r, int32_t token,
                                                 control::TokenChunk& chunk) {
  Sequence& s = *r.seq;
  control::FinishReason finish = control::FinishReason::kNone;
  if (!s.ignore_eos && tokenizer_.is_eog(token)) {
    finish = control::FinishReason::kStop;  // the end-of-generation token is not part of the text
  } else {
    chunk.token_ids.push_back(token);
    s.history.push_back(token);
    ++s.completion_tokens;
    s.next_token = token;
    chunk.text += s.stops.feed(s.decoder.push(token));
    if (s.stops.stopped()) {
      finish = control::FinishReason::kStop;
    } else if (s.completion_tokens >= s.max_new_tokens) {
      finish = control::FinishReason::kLength;
    } else if (s.cache->n_tokens() + 1 > context_tokens_) {
      finish = control::FinishReason::kLength;  // feeding this token would pass the context
    }
  }
  if (finish != control::FinishReason::kNone && !s.stops.stopped()) {
    chunk.text += s.stops.feed(s.decoder.flush());
    chunk.text += s.stops.flush();
  }
  return finish;
}

void DecodeEngine::send_chunk(Request& r, control::TokenChunk& chunk) {
  chunk.request_id = r.id;
  chunk.usage = {r.seq->prompt_tokens, r.seq->completion_tokens};
  metrics_->add_generated_tokens(static_cast<int64_t>(chunk.token_ids.size()));
  if (r.coordinator) r.coordinator->send(chunk);
  if (chunk.finish_reason != control::FinishReason::kNone) drop(r.id);
}

void DecodeEngine::fail_sequence(Request& r, const Status& status) {
  note("request " + std::to_string(r.id.value()) + ": failed: " + status.to_string());
  const StatusCode code = status.ok() ? StatusCode::kInternal : status.code();
  if (r.coordinator) r.coordinator->send(control::Error{r.id, code, status.message()});
  control::TokenChunk chunk;
  chunk.first_token_index = r.seq ? r.seq->completion_tokens : 0;
  chunk.finish_reason = control::FinishReason::kError;
  if (r.seq) {
    send_chunk(r, chunk);  // drops the request
  } else {
    drop(r.id);
  }
}

void DecodeEngine::step() {
  if (active_.empty()) return;
  const auto t0 = Clock::now();
  const size_t n_max = static_cast<size_t>(options_.decode.max_batch_requests);
  const size_t n_take = std::min(active_.size(), n_max);
  // Round robin when more are admitted than a step takes.
  std::vector<RequestId> ids(active_.begin(), active_.begin() + static_cast<std::ptrdiff_t>(n_take));
  if (active_.size() > n_take) {
    std::rotate(active_.begin(), active_.begin() + static_cast<std::ptrdiff_t>(n_take), active_.end());
  }
  step_items_.clear();
  step_requests_.clear();
  for (RequestId id : ids) {
    auto it = requests_.find(id);
    if (it == requests_.end() || !it->second->seq) continue;
    Request& r = *it->second;
    if (Status s = ensure_pages(r); !s.ok()) {
      fail_sequence(r, s);  // this sequence only; the batch goes on
      continue;
    }
    step_items_.push_back(engine::DecodeItem{r.seq->plan.get(), &*r.seq->cache, r.seq->next_token,
                                             r.seq->prompt_tokens});
    step_requests_.push_back(&r);
  }
  if (step_items_.empty()) return;
  const int64_t n_vocab = model_.config().n_vocab;
  logits_.resize(step_items_.size() * static_cast<size_t>(n_vocab));
  step_status_.assign(step_items_.size(), Status());
  const Status run = options_.device ? options_.device->step(step_items_, logits_, step_status_)
                                     : batch_->step(step_items_, logits_, step_status_);
  if (Status s = run; !s.ok()) {
    for (Status& st : step_status_) st = s;
  }
  ++steps_;
  const auto now = Clock::now();
  for (size_t k = 0; k < step_requests_.size(); ++k) {
    Request& r = *step_requests_[k];
    if (!step_status_[k].ok()) {
      fail_sequence(r, step_status_[k]);
      continue;
    }
    Sequence& s = *r.seq;
    const std::span<const float> row(logits_.data() + k * static_cast<size_t>(n_vocab),
                                     static_cast<size_t>(n_vocab));
    const int32_t token = s.sampler.sample(row, s.history);
    control::TokenChunk chunk;
    chunk.first_token_index = s.completion_tokens;
    chunk.finish_reason = accept_token(r, token, chunk);
    metrics_->observe_inter_token(std::chrono::duration<double>(now - s.last_token_at).count());
    s.last_token_at = now;
    send_chunk(r, chunk);  // may drop r
  }
  metrics_->observe_step(std::chrono::duration<double>(Clock::now() - t0).count(),
                         static_cast<int64_t>(step_items_.size()));
}

}  // namespace kvgate::decode
