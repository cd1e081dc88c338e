// The --json report of bench/engine_cuda_bench.cpp (docs/gpu-bench.md): its
// pieces make valid JSON with the keys and values tools/gpu_bench_table.py
// reads. The benchmark's file is included with its main renamed, so its
// internal helpers are reachable; no GPU is needed. Built with KVGATE_CUDA
// (the benchmark links the CUDA forward).
#define main kvgate_engine_cuda_bench_main
#include "bench/engine_cuda_bench.cpp"
#undef main

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

namespace kvgate::engine::cuda {
namespace {

TEST(EngineCudaBenchJson, ReportParsesWithTheTableKeys) {
  LlamaConfig c;
  c.n_layers = 32;
  c.n_embd = 4096;
  c.n_ff = 14336;
  c.n_heads = 32;
  c.n_kv_heads = 8;
  c.head_dim = 128;
  c.n_vocab = 128256;
  const std::string model = json_object(
      {json_config(c, "f16", 16060000000LL),
       "\"prefill\": " + json_object({json_prefill(512, 0.1, prefill_flops(c, 512), 1000.0),
                                      json_prefill(4096, 2.0, 6.0e13, 1000.0)}),
       "\"decode\": " + json_object({json_decode("plain", 512, 128, 0.010, 16.1e9, 4000.0),
                                     json_decode("graph", 512, 128, 0.008, 16.1e9, 4000.0)})});
  const auto j = nlohmann::json::parse(json_object({"\"llama3-8b\": " + model, "\"b\": {}"}));
  const auto& m = j.at("llama3-8b");
  EXPECT_EQ(m.at("config").at("n_kv_heads"), 8);
  EXPECT_EQ(m.at("config").at("head_dim"), 128);
  EXPECT_EQ(m.at("config").at("gemv_weight_bytes"), 16060000000LL);
  EXPECT_EQ(m.at("config").at("weight_type"), "f16");
  const auto& p = m.at("prefill").at("4096");
  EXPECT_DOUBLE_EQ(p.at("tokens_per_s").get<double>(), 2048.0);
  EXPECT_DOUBLE_EQ(p.at("tflops").get<double>(), 30.0);  // 6e13 FLOPs in 2 s
  EXPECT_DOUBLE_EQ(p.at("fraction").get<double>(), 0.03);
  EXPECT_DOUBLE_EQ(p.at("ms").get<double>(), 2000.0);
  // Llama-3-8B: 2 x 6.98e9 matrix parameters x 512 tokens + attention + logits.
  EXPECT_NEAR(m.at("prefill").at("512").at("flops").get<double>(), 7.2167e12, 1e9);
  const auto& g = m.at("decode").at("graph");
  EXPECT_DOUBLE_EQ(g.at("tokens_per_s").get<double>(), 125.0);
  EXPECT_NEAR(g.at("gbps").get<double>(), 2012.5, 1e-9);
  EXPECT_NEAR(g.at("fraction").get<double>(), 0.503125, 1e-5);
  EXPECT_EQ(g.at("context"), 512);
  EXPECT_EQ(g.at("steps"), 128);
  EXPECT_EQ(m.at("decode").at("plain").at("batch"), 1);
  EXPECT_TRUE(j.at("b").empty());
}

TEST(EngineCudaBenchJson, ModelFileFlags) {
  Flags f;
  const char* argv[] = {"bench", "--model-file", "x.gguf", "--name", "llama3-8b", "--json", "o.json"};
  ASSERT_TRUE(parse_flags(7, const_cast<char**>(argv), f));
  EXPECT_EQ(f.models, "file");  // --model-file alone: just that file
  EXPECT_EQ(f.model_file, "x.gguf");
  EXPECT_EQ(f.name, "llama3-8b");
  EXPECT_EQ(f.json_out, "o.json");
  Flags g;
  const char* both[] = {"bench", "--models", "smollm2,file", "--model-file", "x.gguf"};
  ASSERT_TRUE(parse_flags(5, const_cast<char**>(both), g));
  EXPECT_EQ(g.models, "smollm2,file");
  Flags h;
  const char* bad[] = {"bench", "--name", "a\"b"};
  EXPECT_FALSE(parse_flags(3, const_cast<char**>(bad), h));
}

}  // namespace
}  // namespace kvgate::engine::cuda
