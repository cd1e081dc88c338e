#!/usr/bin/env python3
"""llama.cpp peer for `kvgate bench engine`: the same measurements on the same
GGUF, token ids and thread count, through llama-cpp-python. Prints one JSON
object on stdout; progress on stderr.

    python3 bench/llama_cpp_peer.py --model M --tokens ids.json --threads N \
        --decode-tokens 64 --batch 8 --reps 3
"""
import argparse
import ctypes
import json
import sys
import time

import llama_cpp


def log(msg):
    print(f"[llama.cpp] {msg}", file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", required=True, help="JSON file: {prefill: [...], decode_prompt: [...]}")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    spec = json.load(open(args.tokens))
    prefill_ids = spec["prefill"]
    decode_prompt = spec["decode_prompt"]
    n_ctx = max(len(prefill_ids), len(decode_prompt) + args.decode_tokens) + 16

    # llama.cpp logs every graph node at load; keep stderr for our progress.
    @llama_cpp.llama_log_callback
    def quiet(level, text, user_data):
        pass
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(args.model.encode(), mparams)
    if not model:
        sys.exit(f"cannot load {args.model}")
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

    def make_ctx(n_seq):
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx * n_seq
        cp.n_batch = max(512, len(prefill_ids))
        cp.n_ubatch = cp.n_batch
        cp.n_seq_max = n_seq
        cp.n_threads = args.threads
        cp.n_threads_batch = args.threads
        cp.flash_attn_type = 0  # disabled: the same attention math as kvgate's reference mode
        return llama_cpp.llama_init_from_model(model, cp)

    def decode(ctx, entries):
        """entries: list of (token, pos, seq, want_logits)."""
        b = llama_cpp.llama_batch_init(len(entries), 0, 1)
        b.n_tokens = len(entries)
        for i, (t, pos, seq, want) in enumerate(entries):
            b.token[i] = t
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if want else 0
        rc = llama_cpp.llama_decode(ctx, b)
        llama_cpp.llama_batch_free(b)
        if rc != 0:
            sys.exit(f"llama_decode failed: {rc}")

    def argmax_row(ctx, i):
        row = llama_cpp.llama_get_logits_ith(ctx, i)
        best, best_v = 0, float("-inf")
        # numpy-free argmax over a ctypes pointer would be slow; use numpy.
        import numpy as np
        arr = np.ctypeslib.as_array(row, shape=(n_vocab,))
        return int(arr.argmax())

    def clear(ctx):
        mem = llama_cpp.llama_get_memory(ctx)
        llama_cpp.llama_memory_clear(mem, True)

    out = {}
    ctx = make_ctx(1)
    # Prefill: best of reps, after one warm-up.
    times = []
    for rep in range(args.reps + 1):
        clear(ctx)
        t0 = time.perf_counter()
        decode(ctx, [(t, i, 0, i == len(prefill_ids) - 1) for i, t in enumerate(prefill_ids)])
        dt = time.perf_counter() - t0
        if rep > 0:
            times.append(dt)
        log(f"prefill {len(prefill_ids)} tokens: {dt * 1e3:.1f} ms")
    out["prefill_tokens_per_s"] = len(prefill_ids) / min(times)

    def decode_run(ctx, n_seq):
        clear(ctx)
        entries = []
        for s in range(n_seq):
            entries += [(t, i, s, i == len(decode_prompt) - 1) for i, t in enumerate(decode_prompt)]
        decode(ctx, entries)
        last = [argmax_row(ctx, (s + 1) * len(decode_prompt) - 1) for s in range(n_seq)]
        pos = len(decode_prompt)
        t0 = time.perf_counter()
        for step in range(args.decode_tokens):
            decode(ctx, [(last[s], pos, s, True) for s in range(n_seq)])
            last = [argmax_row(ctx, s) for s in range(n_seq)]
            pos += 1
        return time.perf_counter() - t0

    best = min(decode_run(ctx, 1) for _ in range(args.reps))
    out["decode_b1_tokens_per_s"] = args.decode_tokens / best
    log(f"decode batch 1: {out['decode_b1_tokens_per_s']:.1f} tokens/s")
    llama_cpp.llama_free(ctx)
    ctx = make_ctx(args.batch)
    best = min(decode_run(ctx, args.batch) for _ in range(args.reps))
    out[f"decode_b{args.batch}_tokens_per_s"] = args.batch * args.decode_tokens / best
    log(f"decode batch {args.batch}: {out[f'decode_b{args.batch}_tokens_per_s']:.1f} tokens/s")
    llama_cpp.llama_free(ctx)
    out["version"] = llama_cpp.__version__
    print(json.dumps(out))


if __name__ == "__main__":
    main()
