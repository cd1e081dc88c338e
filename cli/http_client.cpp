#include "cli/http_client.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace kvgate::cli {

namespace {

using Clock = std::chrono::steady_clock;

// Incremental decoder of a chunked body.
class ChunkedBody {
 public:
  // Feeds raw bytes; appends decoded data to `out` (and calls on_body).
  // Returns false on bad framing.
  bool feed(std::string_view raw, std::string& out, const BodyChunkFn& on_body) {
    buf_.append(raw);
    while (!done_) {
      if (remaining_ == 0) {
        const size_t eol = buf_.find("\r\n", pos_);
        if (eol == std::string::npos) break;
        if (after_data_) {  // the CRLF that ends a chunk's data
          if (eol != pos_) return false;
          pos_ = eol + 2;
          after_data_ = false;
          continue;
        }
        char* end = nullptr;
        const unsigned long n = std::strtoul(buf_.c_str() + pos_, &end, 16);
        if (end == buf_.c_str() + pos_) return false;
        pos_ = eol + 2;
        if (n == 0) {
          done_ = true;
          break;
        }
        remaining_ = n;
      }
      const size_t take = std::min(remaining_, buf_.size() - pos_);
      if (take == 0) break;
      std::string_view piece(buf_.data() + pos_, take);
      out.append(piece);
      if (on_body) on_body(piece);
      pos_ += take;
      remaining_ -= take;
      if (remaining_ == 0) after_data_ = true;
    }
    if (pos_ > 65536) {
      buf_.erase(0, pos_);
      pos_ = 0;
    }
    return true;
  }
  bool done() const { return done_; }

 private:
  std::string buf_;
  size_t pos_ = 0;
  size_t remaining_ = 0;
  bool after_data_ = false;
  bool done_ = false;
};

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

}  // namespace

std::string reachable_host(const std::string& listen_host) {
  if (listen_host.empty() || listen_host == "0.0.0.0") return "127.0.0.1";
  if (listen_host == "::" || listen_host == "[::]") return "::1";
  return listen_host;
}

std::string http_request(const std::string& method, const HostPort& at, const std::string& path,
                         const std::string& api_key, const std::string& json_body) {
  std::string r = method + " " + path + " HTTP/1.1\r\nHost: " + at.to_string() +
                  "\r\nConnection: close\r\n";
  if (!api_key.empty()) r += "Authorization: Bearer " + api_key + "\r\n";
  if (method == "POST" || !json_body.empty()) {
    r += "Content-Type: application/json\r\nContent-Length: " + std::to_string(json_body.size()) +
         "\r\n";
  }
  return r + "\r\n" + json_body;
}

Result<HttpReply> http_exchange(const HostPort& at, const std::string& request,
                                std::chrono::milliseconds timeout, const BodyChunkFn& on_body) {
  const auto deadline = Clock::now() + timeout;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const std::string port = std::to_string(at.port);
  if (getaddrinfo(at.host.c_str(), port.c_str(), &hints, &res) != 0 || res == nullptr) {
    return unavailable("cannot resolve " + at.to_string());
  }
  const int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    freeaddrinfo(res);
    return unavailable(std::string("socket: ") + std::strerror(errno));
  }
  auto wait_for = [&](short events) -> bool {
    while (true) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) return false;
      pollfd p{fd, events, 0};
      const int r = poll(&p, 1, static_cast<int>(left.count()));
      if (r > 0) return true;
      if (r < 0 && errno != EINTR) return false;
    }
  };
  Status failure;
  const int rc = connect(fd, res->ai_addr, res->ai_addrlen);
  freeaddrinfo(res);
  if (rc < 0 && errno != EINPROGRESS) failure = unavailable("connect " + at.to_string());
  if (failure.ok() && rc < 0) {
    int err = 0;
    socklen_t len = sizeof err;
    if (!wait_for(POLLOUT) || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0) {
      failure = unavailable("connect " + at.to_string() + (err ? ": " + std::string(std::strerror(err)) : ""));
    }
  }
  size_t sent = 0;
  while (failure.ok() && sent < request.size()) {
    const ssize_t n = send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
    } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
      if (!wait_for(POLLOUT)) {
        failure = Status(StatusCode::kDeadlineExceeded, "sending to " + at.to_string());
      }
    } else {
      failure = unavailable("send to " + at.to_string());
    }
  }
  HttpReply reply;
  std::string head;
  bool have_head = false, chunked = false;
  ChunkedBody chunks;
  while (failure.ok()) {
    char buf[16384];
    const ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n == 0) break;
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) {
        if (!wait_for(POLLIN)) {
          failure = Status(StatusCode::kDeadlineExceeded, "waiting for " + at.to_string());
        }
        continue;
      }
      failure = unavailable("recv from " + at.to_string());
      break;
    }
    std::string_view data(buf, static_cast<size_t>(n));
    if (!have_head) {
      head.append(data);
      const size_t end = head.find("\r\n\r\n");
      if (end == std::string::npos) continue;
      have_head = true;
      if (head.rfind("HTTP/1.", 0) != 0 || end < 12) {
        failure = data_loss("not an HTTP response from " + at.to_string());
        break;
      }
      reply.status = std::atoi(head.c_str() + 9);
      chunked = lower(head.substr(0, end)).find("transfer-encoding: chunked") != std::string::npos;
      const std::string rest = head.substr(end + 4);
      head.resize(end);
      data = std::string_view();
      if (!rest.empty()) {
        if (chunked) {
          if (!chunks.feed(rest, reply.body, on_body)) failure = data_loss("bad chunked body");
        } else {
          reply.body += rest;
          if (on_body) on_body(rest);
        }
      }
      continue;
    }
    if (chunked) {
      if (!chunks.feed(data, reply.body, on_body)) failure = data_loss("bad chunked body");
      if (chunks.done()) break;
    } else {
      reply.body.append(data);
      if (on_body) on_body(data);
    }
  }
  close(fd);
  if (!failure.ok()) return failure;
  if (!have_head) return data_loss("no HTTP response from " + at.to_string());
  return reply;
}

}  // namespace kvgate::cli
