#include "coordinator/api_keys.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

namespace kvgate::coordinator {
namespace {

TEST(ApiKeys, ParsesKeysCommentsAndBlankLines) {
  auto keys = ApiKeys::parse("# team keys\n\n  sk-one  \nsk-two\r\n# sk-three\n", "keys.txt");
  ASSERT_TRUE(keys.ok()) << keys.status().to_string();
  EXPECT_EQ(keys->size(), 2u);
  EXPECT_EQ(keys->check("Bearer sk-one"), ApiKeys::Check::kOk);
  EXPECT_EQ(keys->check("bearer sk-two"), ApiKeys::Check::kOk);
  EXPECT_EQ(keys->check("Bearer sk-three"), ApiKeys::Check::kWrong);
  EXPECT_EQ(keys->check("Bearer sk-on"), ApiKeys::Check::kWrong);
  EXPECT_EQ(keys->check("Bearer sk-one2"), ApiKeys::Check::kWrong);
  EXPECT_EQ(keys->check("Basic sk-one"), ApiKeys::Check::kWrong);
  EXPECT_EQ(keys->check("sk-one"), ApiKeys::Check::kWrong);
  EXPECT_EQ(keys->check(""), ApiKeys::Check::kMissing);
  EXPECT_EQ(keys->check("Bearer "), ApiKeys::Check::kMissing);
}

TEST(ApiKeys, EmptyOrMissingFileIsAnErrorNamingIt) {
  auto empty = ApiKeys::parse("# nothing\n\n", "/etc/kvgate/keys");
  ASSERT_FALSE(empty.ok());
  EXPECT_NE(empty.status().message().find("/etc/kvgate/keys"), std::string::npos);
  auto missing = ApiKeys::load_file("/nonexistent/kvgate-keys");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("/nonexistent/kvgate-keys"), std::string::npos);
  auto spaced = ApiKeys::parse("a b\n", "f");
  EXPECT_FALSE(spaced.ok());
}

TEST(ApiKeys, LoadsAFile) {
  const auto path = std::filesystem::temp_directory_path() / "kvgate_api_keys_test.txt";
  { std::ofstream(path) << "k1\nk2\n"; }
  auto keys = ApiKeys::load_file(path.string());
  std::filesystem::remove(path);
  ASSERT_TRUE(keys.ok());
  EXPECT_EQ(keys->check("Bearer k2"), ApiKeys::Check::kOk);
}

TEST(ApiKeys, ConstantTimeEqual) {
  EXPECT_TRUE(constant_time_equal("", ""));
  EXPECT_TRUE(constant_time_equal("abc", "abc"));
  EXPECT_FALSE(constant_time_equal("abc", "abd"));
  EXPECT_FALSE(constant_time_equal("abc", "ab"));
  EXPECT_FALSE(constant_time_equal("ab", "abc"));
  EXPECT_FALSE(constant_time_equal(std::string("a\0", 2), "a"));
}

}  // namespace
}  // namespace kvgate::coordinator
