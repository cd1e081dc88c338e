// The real model and its tokenizer, loaded once per test binary, for tests
// that need them. Tests skip cleanly when the model file is absent.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <memory>

#include "engine/model.h"
#include "engine/tokenizer.h"

namespace kvgate::engine::testing {

struct TestModel {
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<Tokenizer> tokenizer;
};

// Null members when the file is missing; a load error fails the test.
inline const TestModel* test_model() {
  static TestModel* loaded = [] {
    auto* out = new TestModel;
    if (!std::filesystem::exists(KVGATE_TEST_MODEL)) return out;
    auto m = LlamaModel::load(KVGATE_TEST_MODEL);
    if (!m.ok()) {
      ADD_FAILURE() << m.status().to_string();
      return out;
    }
    auto spec = tokenizer_spec_from_gguf((*m)->gguf());
    if (!spec.ok()) {
      ADD_FAILURE() << spec.status().to_string();
      return out;
    }
    auto t = Tokenizer::create(std::move(*spec));
    if (!t.ok()) {
      ADD_FAILURE() << t.status().to_string();
      return out;
    }
    out->model = std::move(*m);
    out->tokenizer = std::make_unique<Tokenizer>(std::move(*t));
    return out;
  }();
  return loaded;
}

}  // namespace kvgate::engine::testing

// Binds `L` to the loaded model, or skips the test when it is absent.
#define KVGATE_REQUIRE_MODEL()                                                        \
  const ::kvgate::engine::testing::TestModel* L = ::kvgate::engine::testing::test_model(); \
  if (!L->model) GTEST_SKIP() << "model not found at " KVGATE_TEST_MODEL              \
                                 " (run scripts/fetch-model.sh)";                     \
  ASSERT_NE(L->tokenizer, nullptr)
