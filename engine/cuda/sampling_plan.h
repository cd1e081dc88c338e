// Sampling on the GPU: argument checks, the host-side uniform draw, and a
// CPU model of exactly what the kernel computes.
//
// The kernel (sampling.cu) mirrors engine::Sampler (engine/sampler.h) with
// the differences listed here, each chosen so a row stays one thread block
// with no global workspace:
//   - No repetition penalty: the caller applies it to the logits first (it
//     needs the row's history, which the kernel does not see).
//   - The random number is not drawn on the GPU. The caller passes u in
//     [0, 1) per row, drawn with sampling_uniform() from the request's
//     std::mt19937_64 seeded like Sampler: r = u * total is then exactly the
//     draw Sampler makes, so the same seed gives the same token.
//   - At most kSampleMaxCandidates (1024) candidates reach the top-p /
//     min-p walk. The softmax denominator is still taken over every
//     candidate Sampler would keep (top_k of them, or the whole vocabulary
//     when top_k is off), so each probability is Sampler's; only when top-p
//     (or top-p off) would keep more than 1024 tokens does the kernel draw
//     among the 1024 most likely ones, renormalized.
//   - NaN logits are never chosen (Sampler's ordering is unspecified there).
// Greedy rows (temperature <= 0) take engine::argmax's rule: the largest
// value, lowest id on ties, 0 when no value is above -inf.
//
// Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <random>
#include <span>

#include "common/status.h"
#include "engine/cuda/kernel_params.h"

namespace kvgate::engine::cuda {

// The uniform Sampler draws, scaled to [0, 1): libstdc++'s
// uniform_real_distribution<double>(0, total) returns
// generate_canonical<double, 53>(g) * total, so this is that factor.
double sampling_uniform(std::mt19937_64& rng);

// Same ranges as engine::SamplingParams::validate (temperature >= 0 finite,
// top_k >= 0, top_p in (0, 1], min_p in [0, 1]) and u in [0, 1).
Status check_sample_row(const SampleRow& row);

// vocab in [1, 2^31 - 1], n_rows in [1, 2^31 - 1].
Status check_sampling_shape(int64_t n_rows, int64_t vocab);

// Dynamic shared memory of the sampling kernel (candidate keys, ids,
// probabilities, the radix histogram and reduction scratch).
size_t sampling_shared_bytes();

// The kernel's result for one row, on the CPU (the oracle of the gpu
// conformance test; equal to engine::Sampler when at most 1024 candidates
// survive, which sampling_plan_test checks).
int32_t sample_reference(std::span<const float> logits, const SampleRow& row);

}  // namespace kvgate::engine::cuda
