// control_fuzz_smoke: runs the fuzz entry point (control_fuzz.cpp) over a
// fixed, seeded set of mutations of valid encoded frames, so that every
// build (gcc included, no libFuzzer) exercises the decoder's error paths.
//
//   control_fuzz_smoke [--iterations N] [--seed S]
//   control_fuzz_smoke --write-corpus DIR    # write the seeds and exit
//
// Seeds are one frame of every message type (stream mode), their payloads
// (payload mode, where mutations get past the CRC) and a stream of all the
// frames. Exit status 0 unless a check aborts.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "common/control_protocol.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

using namespace kvgate;
using namespace kvgate::control;
using namespace std::chrono_literals;

Bytes blob(std::string_view s) {
  Bytes b(s.size());
  std::memcpy(b.data(), s.data(), s.size());
  return b;
}

std::vector<Message> sample_messages() {
  GenerationParams g{{0.8f, 50, 0.95f, 0.0f, 1.05f, 64, 7}, 128, {"\n\n", "END"}};
  std::vector<Message> v;
  v.push_back(Hello{NodeRole::kPrefill, NodeId(3), "prefill-0", "token", kProtocolVersion,
                    "SmolLM2", "127.0.0.1:7001", "ucx", blob("ucx-addr")});
  v.push_back(HelloAck{NodeId(1), kProtocolVersion, 500ms});
  v.push_back(HelloReject{StatusCode::kPermissionDenied, "bad token"});
  v.push_back(Heartbeat{NodeId(3), 9, 1000, 2000, 3000, 4, 5000, 6});
  v.push_back(Reserve{RequestId(11), 65536, 2000ms});
  v.push_back(ReserveGrant{RequestId(11), LeaseId(12), 65536, 1999ms, blob("pages")});
  v.push_back(ReserveDeny{RequestId(11), StatusCode::kResourceExhausted, "full", 10});
  v.push_back(Extend{RequestId(11), LeaseId(12), 4096});
  v.push_back(
      ExtendResult{RequestId(11), LeaseId(12), StatusCode::kOk, "", 69632, 1000ms, blob("pages2")});
  v.push_back(Commit{RequestId(11), LeaseId(12), 60000, 0.25});
  v.push_back(Release{RequestId(11), LeaseId(12), "done"});
  PrefillJob job;
  job.request_id = RequestId(11);
  job.prompt_token_ids = {1, 2, 3, 4};
  job.generation = g;
  job.kv_policy = {"h2o", {{"keep_rate", 0.3}}};
  job.decode_node = NodeId(4);
  job.decode_transport_address = blob("dec-addr");
  job.decode_control_address = "127.0.0.1:7101";
  job.lease_id = LeaseId(12);
  job.granted_bytes = 65536;
  job.pool_descriptor = blob("pages");
  job.deadline_in = 10000ms;
  v.push_back(job);
  TransferManifest man;
  man.request_id = RequestId(11);
  man.lease_id = LeaseId(12);
  man.layout_version = 1;
  man.layout_descriptor = blob("layout");
  man.segments = {{0, 100, 0xAAAA}, {100, 200, 0xBBBB}};
  man.actual_bytes = 300;
  man.dense_bytes = 900;
  man.keep_rate = 0.33;
  man.prompt_tokens = 4;
  man.first_token_id = 42;
  man.generation = g;
  v.push_back(man);
  v.push_back(TransferResult{RequestId(11), LeaseId(12), StatusCode::kDataLoss, "crc"});
  v.push_back(TokenChunk{RequestId(11), 0, {42, 43}, "hi", FinishReason::kStop, {4, 2}});
  v.push_back(Cancel{RequestId(11), "client gone"});
  v.push_back(Error{RequestId(11), StatusCode::kInternal, "oops"});
  // Tensor-parallel bootstrap: rank 0's join (with the 128-byte id), another
  // rank's (none), and the ready of a group of 2.
  Bytes nccl_id(kTpUniqueIdBytes, std::byte{0x5a});
  v.push_back(TpJoin{"tp-group", 0, 2, nccl_id});
  v.push_back(TpJoin{"tp-group", 1, 2, {}});
  v.push_back(TpReady{"tp-group", 2, nccl_id, {{NodeId(3), "gpu-0"}, {NodeId(4), "gpu-1"}}});
  return v;
}

struct Seed {
  std::string name;
  std::vector<uint8_t> bytes;
  size_t body = 0;  // where the frame or payload starts (after the mode bytes)
};

std::vector<uint8_t> to_u8(std::span<const std::byte> b) {
  std::vector<uint8_t> out(b.size());
  if (!b.empty()) std::memcpy(out.data(), b.data(), b.size());
  return out;
}

std::vector<Seed> make_seeds() {
  std::vector<Seed> seeds;
  std::vector<std::byte> all;
  for (const Message& m : sample_messages()) {
    const std::string name(message_type_name(message_type(m)));
    std::vector<uint8_t> frame = to_u8(encode(m));
    frame.insert(frame.begin(), 0);  // stream mode
    seeds.push_back({"frame_" + name, std::move(frame), 1});
    std::vector<std::byte> payload(payload_bytes(m));
    write_payload(m, payload);
    const auto type = static_cast<uint16_t>(message_type(m));
    std::vector<uint8_t> p = {1, static_cast<uint8_t>(type), static_cast<uint8_t>(type >> 8)};
    const auto pb = to_u8(payload);
    p.insert(p.end(), pb.begin(), pb.end());
    seeds.push_back({"payload_" + name, std::move(p), 3});
    encode_to(m, all);
  }
  std::vector<uint8_t> stream = to_u8(all);
  stream.insert(stream.begin(), 0);
  seeds.push_back({"stream_all", std::move(stream), 1});
  return seeds;
}

// Runs the entry point on an exact-size heap copy, so a sanitizer build
// catches any read even one byte past the input.
void run_one(const std::vector<uint8_t>& bytes) {
  std::unique_ptr<uint8_t[]> copy(new uint8_t[bytes.size() + (bytes.empty() ? 1 : 0)]);
  if (!bytes.empty()) std::memcpy(copy.get(), bytes.data(), bytes.size());
  LLVMFuzzerTestOneInput(copy.get(), bytes.size());
}

// True if the input yields a message: how many mutants get past the framing
// and payload checks (a smoke run that decodes nothing exercises little).
bool decodes(const std::vector<uint8_t>& bytes) {
  if (bytes.empty()) return false;
  const auto* p = reinterpret_cast<const std::byte*>(bytes.data());
  if ((bytes[0] & 1) != 0) {
    if (bytes.size() < 3) return false;
    const auto type = static_cast<MessageType>(bytes[1] | (bytes[2] << 8));
    return decode_payload(type, std::span(p + 3, bytes.size() - 3)).ok();
  }
  FrameDecoder d;
  d.feed(std::span(p + 1, bytes.size() - 1));
  auto m = d.next();
  return m.ok() && m->has_value();
}

class Mutator {
 public:
  explicit Mutator(uint64_t seed) : rng_(seed) {}

  uint64_t below(uint64_t n) { return n == 0 ? 0 : rng_() % n; }

  // Mutates past the mode bytes (seed.body) so the mode stays as seeded.
  void mutate(const Seed& seed, std::vector<uint8_t>& b) {
    static constexpr uint32_t kOdd32[] = {
        0, 1, 2, 3, 4, 20, 24, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, 0x10000};
    const size_t lo = std::min(seed.body, b.size());
    const size_t span = b.size() - lo;
    switch (below(9)) {
      case 0:  // flip a bit
        if (span != 0) b[lo + below(span)] ^= static_cast<uint8_t>(1u << below(8));
        break;
      case 1:  // random byte
        if (span != 0) b[lo + below(span)] = static_cast<uint8_t>(rng_());
        break;
      case 2:  // truncate
        b.resize(lo + below(span + 1));
        break;
      case 3: {  // insert random bytes
        const size_t at = lo + below(span + 1);
        std::vector<uint8_t> ins(1 + below(8));
        for (auto& x : ins) x = static_cast<uint8_t>(rng_());
        b.insert(b.begin() + static_cast<std::ptrdiff_t>(at), ins.begin(), ins.end());
        break;
      }
      case 4: {  // delete a range
        if (span == 0) break;
        const size_t at = lo + below(span);
        const size_t n = 1 + below(std::min<size_t>(16, b.size() - at));
        b.erase(b.begin() + static_cast<std::ptrdiff_t>(at),
                b.begin() + static_cast<std::ptrdiff_t>(at + n));
        break;
      }
      case 5: {  // duplicate a chunk (repeated frames, list items)
        if (span < 2) break;
        const size_t at = lo + below(span);
        const size_t n = 1 + below(std::min<size_t>(64, b.size() - at));
        std::vector<uint8_t> chunk(b.begin() + static_cast<std::ptrdiff_t>(at),
                                   b.begin() + static_cast<std::ptrdiff_t>(at + n));
        b.insert(b.begin() + static_cast<std::ptrdiff_t>(at), chunk.begin(), chunk.end());
        break;
      }
      case 6:
      case 7: {  // a length, count or header field set to an extreme value
        if (span < 4) break;
        uint32_t v = kOdd32[below(std::size(kOdd32))];
        if (below(3) == 0) v = static_cast<uint32_t>(span + below(8)) - 4;  // about the end
        const size_t at = lo + below(span - 3);
        std::memcpy(b.data() + at, &v, 4);
        break;
      }
      default: {  // +-1 on a byte (off-by-one lengths)
        if (span != 0) b[lo + below(span)] += below(2) ? 1 : 0xFF;
        break;
      }
    }
  }

 private:
  std::mt19937_64 rng_;  // output fixed by the standard: runs are reproducible
};

int write_corpus(const std::string& dir) {
  std::filesystem::create_directories(dir);
  for (const Seed& s : make_seeds()) {
    std::ofstream out(std::filesystem::path(dir) / s.name, std::ios::binary);
    out.write(reinterpret_cast<const char*>(s.bytes.data()),
              static_cast<std::streamsize>(s.bytes.size()));
    if (!out) {
      std::fprintf(stderr, "cannot write %s/%s\n", dir.c_str(), s.name.c_str());
      return 1;
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  uint64_t iterations = 20000;
  uint64_t prng_seed = 0x6b76676174650001ull;
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg == "--iterations" && i + 1 < argc) {
      iterations = std::strtoull(argv[++i], nullptr, 10);
    } else if (arg == "--seed" && i + 1 < argc) {
      prng_seed = std::strtoull(argv[++i], nullptr, 10);
    } else if (arg == "--write-corpus" && i + 1 < argc) {
      return write_corpus(argv[++i]);
    } else {
      std::fprintf(stderr,
                   "usage: control_fuzz_smoke [--iterations N] [--seed S] "
                   "[--write-corpus DIR]\n");
      return 2;
    }
  }

  const auto start = std::chrono::steady_clock::now();
  const std::vector<Seed> seeds = make_seeds();
  uint64_t runs = 0;
  // Every seed must decode; every prefix of a single-frame seed is run.
  for (const Seed& s : seeds) {
    if (!decodes(s.bytes)) {
      std::fprintf(stderr, "seed %s does not decode\n", s.name.c_str());
      return 1;
    }
    run_one(s.bytes);
    ++runs;
    if (s.name == "stream_all") continue;
    for (size_t n = 0; n < s.bytes.size(); ++n) {
      run_one(
          std::vector<uint8_t>(s.bytes.begin(), s.bytes.begin() + static_cast<std::ptrdiff_t>(n)));
      ++runs;
    }
  }

  Mutator m(prng_seed);
  uint64_t decoded = 0;
  for (uint64_t i = 0; i < iterations; ++i) {
    const Seed& seed = seeds[m.below(seeds.size())];
    std::vector<uint8_t> bytes = seed.bytes;
    const uint64_t n_mutations = 1 + m.below(3);
    for (uint64_t k = 0; k < n_mutations; ++k) m.mutate(seed, bytes);
    run_one(bytes);
    if (decodes(bytes)) ++decoded;
    ++runs;
  }
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  std::printf(
      "control_fuzz_smoke: %zu seeds, %llu runs (%llu mutants, %llu of them decoded) in %.0f ms\n",
      seeds.size(), static_cast<unsigned long long>(runs),
      static_cast<unsigned long long>(iterations), static_cast<unsigned long long>(decoded), ms);
  return 0;
}
