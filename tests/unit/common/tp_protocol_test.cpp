// TpJoin / TpReady (tensor-parallel bootstrap) on the wire: round trips,
// and every value the decoder must refuse, with the field it names.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "common/control_protocol.h"

namespace kvgate::control {
namespace {

Bytes id_bytes(size_t n, uint8_t seed = 1) {
  Bytes b(n);
  for (size_t i = 0; i < n; ++i) b[i] = std::byte(static_cast<uint8_t>(seed + i * 31));
  return b;
}

// Encodes `m` as is (the encoder does not check values) and decodes it.
Result<Message> reencode(const Message& m) {
  std::vector<std::byte> payload(payload_bytes(m));
  write_payload(m, payload);
  return decode_payload(message_type(m), payload);
}

void expect_rejected(const Message& m, const std::string& text) {
  auto got = reencode(m);
  ASSERT_FALSE(got.ok()) << "accepted: " << text;
  EXPECT_EQ(got.status().code(), StatusCode::kInvalidArgument) << got.status().to_string();
  EXPECT_EQ(got.status().message(), text);
  // And framed, through the stream decoder: the same verdict.
  FrameDecoder d;
  d.feed(encode(m));
  auto framed = d.next();
  ASSERT_FALSE(framed.ok());
  EXPECT_EQ(framed.status().message(), text);
}

TEST(TpProtocol, TypesAreKnownAndNamed) {
  EXPECT_EQ(static_cast<uint16_t>(MessageType::kTpJoin), 50);
  EXPECT_EQ(static_cast<uint16_t>(MessageType::kTpReady), 51);
  EXPECT_TRUE(is_known_message_type(50));
  EXPECT_TRUE(is_known_message_type(51));
  EXPECT_FALSE(is_known_message_type(52));
  EXPECT_EQ(message_type_name(MessageType::kTpJoin), "TpJoin");
  EXPECT_EQ(message_type_name(MessageType::kTpReady), "TpReady");
  EXPECT_EQ(tp_group_error_prefix("g1"), "tp group 'g1': ");
}

TEST(TpProtocol, RoundTrips) {
  const std::vector<Message> messages = {
      TpJoin{"g", 0, 1, id_bytes(kTpUniqueIdBytes)},
      TpJoin{std::string(kMaxTpGroupNameBytes, 'x'), 63, kMaxTpWorld, {}},
      TpReady{"g", 3, id_bytes(kTpUniqueIdBytes, 9),
              {{NodeId(11), "a"}, {NodeId(12), ""}, {NodeId(0xFFFFFFFFFFFFFFFFull), "c"}}},
  };
  for (const Message& m : messages) {
    FrameDecoder d;
    d.feed(encode(m));
    auto got = d.next();
    ASSERT_TRUE(got.ok()) << got.status().to_string();
    ASSERT_TRUE(got->has_value());
    EXPECT_EQ(**got, m);
  }
  // Wire layout of a small join: group (u32 len + bytes), rank u32, world
  // u32, unique_id (u32 len + bytes).
  const Message join = TpJoin{"ab", 1, 2, {}};
  EXPECT_EQ(payload_bytes(join), 4u + 2 + 4 + 4 + 4);
}

TEST(TpProtocol, JoinRejections) {
  const Bytes id = id_bytes(kTpUniqueIdBytes);
  expect_rejected(TpJoin{"", 0, 1, id}, "control: TpJoin.group: empty");
  expect_rejected(TpJoin{std::string(kMaxTpGroupNameBytes + 1, 'g'), 0, 1, id},
                  "control: TpJoin.group: 129 bytes, at most 128");
  expect_rejected(TpJoin{"g", 0, 0, id}, "control: TpJoin.world: 0 is not in 1..64");
  expect_rejected(TpJoin{"g", 0, 65, id}, "control: TpJoin.world: 65 is not in 1..64");
  expect_rejected(TpJoin{"g", 3, 3, {}}, "control: TpJoin.rank: 3 >= world 3");
  expect_rejected(TpJoin{"g", 0, 3, id_bytes(127)},
                  "control: TpJoin.unique_id: 127 bytes from rank 0, need 128");
  expect_rejected(TpJoin{"g", 0, 3, {}},
                  "control: TpJoin.unique_id: 0 bytes from rank 0, need 128");
  expect_rejected(TpJoin{"g", 2, 3, id},
                  "control: TpJoin.unique_id: 128 bytes from rank 2, only rank 0 sends one");
}

TEST(TpProtocol, ReadyRejections) {
  const Bytes id = id_bytes(kTpUniqueIdBytes);
  const std::vector<TpMember> two = {{NodeId(1), "a"}, {NodeId(2), "b"}};
  expect_rejected(TpReady{"", 2, id, two}, "control: TpReady.group: empty");
  expect_rejected(TpReady{"g", 0, id, {}}, "control: TpReady.world: 0 is not in 1..64");
  expect_rejected(TpReady{"g", 2, id_bytes(5), two},
                  "control: TpReady.unique_id: 5 bytes, need 128");
  expect_rejected(TpReady{"g", 3, id, two}, "control: TpReady.members: 2 members for world 3");
  std::vector<TpMember> many(kMaxTpWorld + 1, TpMember{NodeId(1), "n"});
  expect_rejected(TpReady{"g", 64, id, many}, "control: TpReady.members: 65 items, at most 64");
}

TEST(TpProtocol, TruncatedPayloadNamesTheField) {
  const Message m = TpJoin{"g", 0, 1, id_bytes(kTpUniqueIdBytes)};
  std::vector<std::byte> payload(payload_bytes(m));
  write_payload(m, payload);
  payload.resize(payload.size() - 1);
  auto got = decode_payload(MessageType::kTpJoin, payload);
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), StatusCode::kDataLoss);
  EXPECT_EQ(got.status().message(),
            "control: TpJoin.unique_id: truncated (need 128 bytes, 127 left)");
}

}  // namespace
}  // namespace kvgate::control
