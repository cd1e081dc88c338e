// The listener and the connector against misbehaving peers (raw sockets):
// garbage, oversized frames, bad checksums, messages out of turn. Each gets
// an Error naming the problem and a closed connection; the listener goes on
// serving good peers.
#include <gtest/gtest.h>

#include "tests/unit/common/control_channel_test_util.h"

namespace kvgate::control {
namespace {

using namespace channel_test;

// --------------------------------------------------------- malformed input

TEST(ControlChannel, GarbageBytesGetAnErrorAndTheListenerSurvives) {
  IoThread io;
  Server server;
  server.start(io.io());
  expect_error_answer(
      server.port(),
      std::as_bytes(std::span(std::string_view("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))),
      StatusCode::kDataLoss, "magic");
  EXPECT_EQ(server.listener->counters().malformed, 1u);
  expect_good_connection(io.io(), server, 1);
}

TEST(ControlChannel, OversizedFrameHeaderBeforeHelloGetsOutOfRange) {
  IoThread io;
  Server server;
  server.start(io.io());
  // Over the handshake limit (64 KiB) though far under max_frame_bytes.
  expect_error_answer(server.port(), header_claiming(MessageType::kHello, 200 * 1024),
                      StatusCode::kOutOfRange, "");
  EXPECT_EQ(server.listener->counters().malformed, 1u);
  expect_good_connection(io.io(), server, 2);
}

TEST(ControlChannel, OversizedFrameAfterHandshakeGetsOutOfRange) {
  IoThread io;
  Server server;
  ChannelOptions o = test_options();
  server.start(io.io(), o);
  RawSocket raw(server.port());
  ASSERT_TRUE(raw.connected());
  Hello h = test_hello();
  h.cluster_token = o.cluster_token;
  raw.send(encode(h));
  auto ack = raw.read_message();
  ASSERT_TRUE(ack.ok()) << ack.status().to_string();
  ASSERT_TRUE(std::holds_alternative<HelloAck>(*ack));
  ASSERT_TRUE(server.recorder.wait([](const auto& r) { return r.opened_count() == 1; }));
  // Past the handshake the limit is max_frame_bytes: a big frame is fine...
  raw.send(encode(job_of_frame_size(200 * 1024, 5)));
  ASSERT_TRUE(server.recorder.wait([](const auto& r) { return r.message_count() == 1; }));
  // ...one over it is not.
  raw.send(header_claiming(MessageType::kPrefillJob, static_cast<uint32_t>(o.max_frame_bytes)));
  auto error = raw.read_message();
  ASSERT_TRUE(error.ok()) << error.status().to_string();
  ASSERT_TRUE(std::holds_alternative<Error>(*error));
  EXPECT_EQ(std::get<Error>(*error).code, StatusCode::kOutOfRange);
  EXPECT_FALSE(raw.read_message().ok());  // then the end of the stream
  raw.close();
  // The owner hears the decoder's status, once.
  ASSERT_TRUE(server.recorder.wait([](const auto& r) { return r.closed_count() == 1; }));
  EXPECT_EQ(server.recorder.closed()[0].code(), StatusCode::kOutOfRange);
  EXPECT_EQ(server.listener->counters().malformed, 1u);
  expect_good_connection(io.io(), server, 3);
}

TEST(ControlChannel, BadPayloadCrcGetsDataLoss) {
  IoThread io;
  Server server;
  server.start(io.io());
  Hello h = test_hello();
  h.cluster_token = test_options().cluster_token;
  std::vector<std::byte> frame = encode(h);
  frame.back() ^= std::byte{0x40};  // payload corrupted, header intact
  expect_error_answer(server.port(), frame, StatusCode::kDataLoss, "checksum");
  EXPECT_EQ(server.listener->counters().malformed, 1u);
  EXPECT_EQ(server.hello_count(), 0u);
  expect_good_connection(io.io(), server, 4);
}

TEST(ControlChannel, MessageBeforeHelloIsRefused) {
  IoThread io;
  Server server;
  server.start(io.io());
  expect_error_answer(server.port(), encode(heartbeat(1, 1)), StatusCode::kInvalidArgument,
                      "expected Hello first, got Heartbeat");
  EXPECT_EQ(server.listener->counters().malformed, 1u);
  expect_good_connection(io.io(), server, 5);
}

// A raw listener answers the Hello with garbage: the connector fails with
// the decoder's code instead of hanging.
TEST(ControlChannel, ConnectorGetsDecoderErrorFromABadListener) {
  IoThread io;
  asio::ip::tcp::acceptor acceptor(io.io(), {asio::ip::make_address("127.0.0.1"), 0});
  const uint16_t port = acceptor.local_endpoint().port();
  Dial dial;
  dial.start(io.io(), port);
  asio::ip::tcp::socket peer(io.io());
  boost::system::error_code ec;
  acceptor.accept(peer, ec);  // this thread; the io thread runs the connector
  ASSERT_FALSE(ec) << ec.message();
  asio::write(peer, asio::buffer(std::string("HTTP/1.1 400 Bad Request\r\n\r\n")), ec);
  auto [conn, ack] = dial.get();
  EXPECT_EQ(conn.status().code(), StatusCode::kDataLoss) << conn.status().to_string();
  EXPECT_NE(conn.status().message().find("magic"), std::string::npos);
}

}  // namespace
}  // namespace kvgate::control
