#!/usr/bin/env python3
"""llama.cpp CUDA peer of kvgate's GPU engine benchmark (docs/gpu-bench.md).

Runs llama.cpp's own benchmarks, built by scripts/build-llama-cpp-cuda.sh,
on one GGUF with every layer on the GPU:

  * llama-bench -p P1,P2 -n 0 -fa 0,1 -ub U1,U2 -o json: prefill tokens/s
    per prompt length from an empty context;
  * llama-bench -p 0 -n G -d D -fa 0,1 -o json: batch-1 decode tokens/s
    after D tokens of context;
  * llama-batched-bench -npp D -ntg G -npl 1,8,64 --output-format jsonl
    (per flash-attention setting, --reps times): decode tokens/s of B
    sequences stepping together, each after D tokens of its own.

For each figure the best configuration (flash attention on/off, micro-batch)
and the best repetition are kept, llama.cpp at its best; kvgate's benchmark
also reports its best repetition. Prints one JSON object on stdout (and
writes it to --out); progress on stderr.

    python3 bench/llama_cpp_cuda_peer.py --bin-dir .llama-cpp/build-cuda/bin \\
        --model M.gguf [--prefill 512,4096] [--gen 128] [--decode-context 512] \\
        [--batches 1,8,64] [--reps 5] [--ubatch 512,2048] [--fa 0,1] [--out F]
"""
import argparse
import json
import os
import subprocess
import sys


class ParseError(ValueError):
    """Output of a llama.cpp tool that is not what this script expects."""


def log(msg):
    print(f"[llama.cpp cuda] {msg}", file=sys.stderr, flush=True)


# ---- llama-bench -o json ----------------------------------------------------

# Fields of llama-bench's json_printer (tools/llama-bench/llama-bench.cpp,
# test::get_fields and samples_ns/samples_ts) that this script reads.
_BENCH_INT_FIELDS = ("n_prompt", "n_gen", "n_depth", "n_ubatch", "n_batch", "n_gpu_layers",
                     "flash_attn", "avg_ns")
_BENCH_NUM_FIELDS = ("avg_ts", "stddev_ts")


def parse_llama_bench_json(text):
    """The list of test records of `llama-bench -o json` output.

    Each record must have the integer fields above, numeric avg_ts and
    stddev_ts, and equally long non-empty samples_ns / samples_ts lists of
    positive numbers; ParseError names the record and field otherwise.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ParseError(f"llama-bench output is not JSON: {e}") from None
    if not isinstance(data, list) or not data:
        raise ParseError("llama-bench output is not a non-empty JSON list of tests")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise ParseError(f"llama-bench test {i} is not an object")
        for f in _BENCH_INT_FIELDS:
            if not isinstance(rec.get(f), int) or isinstance(rec.get(f), bool):
                raise ParseError(f"llama-bench test {i}: field '{f}' missing or not an integer")
        for f in _BENCH_NUM_FIELDS:
            if not isinstance(rec.get(f), (int, float)) or isinstance(rec.get(f), bool):
                raise ParseError(f"llama-bench test {i}: field '{f}' missing or not a number")
        ns, ts = rec.get("samples_ns"), rec.get("samples_ts")
        if not isinstance(ns, list) or not isinstance(ts, list) or not ts or len(ns) != len(ts):
            raise ParseError(f"llama-bench test {i}: samples_ns/samples_ts missing or unequal")
        if not all(isinstance(x, (int, float)) and x > 0 for x in ns + ts):
            raise ParseError(f"llama-bench test {i}: a sample is not a positive number")
        if rec["n_prompt"] == 0 and rec["n_gen"] == 0:
            raise ParseError(f"llama-bench test {i}: neither n_prompt nor n_gen is set")
    return data


def _config(rec):
    return {"flash_attn": rec["flash_attn"], "n_ubatch": rec["n_ubatch"],
            "n_batch": rec["n_batch"]}


def best_llama_bench(records, n_prompt, n_gen, n_depth):
    """The fastest test with these token counts over the configurations run:
    tokens/s of its best repetition (max samples_ts), with its mean, the
    configuration, and the number of repetitions. None when no test matches."""
    best = None
    for rec in records:
        if (rec["n_prompt"], rec["n_gen"], rec["n_depth"]) != (n_prompt, n_gen, n_depth):
            continue
        top = max(rec["samples_ts"])
        if best is None or top > best["tokens_per_s"]:
            best = {"tokens_per_s": top, "mean_tokens_per_s": rec["avg_ts"],
                    "stddev_tokens_per_s": rec["stddev_ts"], "reps": len(rec["samples_ts"]),
                    **_config(rec)}
    return best


# ---- llama-batched-bench --output-format jsonl -------------------------------

_BATCHED_FIELDS = ("pp", "tg", "pl", "n_kv", "flash_attn", "t_pp", "speed_pp", "t_tg",
                   "speed_tg")


def parse_batched_bench_jsonl(text):
    """The result rows of `llama-batched-bench --output-format jsonl`.

    The tool prints other lines (logs, the perf summary) around them; rows are
    the lines that are JSON objects with a speed_tg key. Each must have the
    fields above as numbers (ParseError otherwise). An output with no row is
    an error: the usual cause is a -c too small for pl x (pp + tg), which the
    tool skips silently.
    """
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line.startswith("{") or '"speed_tg"' not in line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ParseError(f"llama-batched-bench line {n} is not JSON: {e}") from None
        for f in _BATCHED_FIELDS:
            if not isinstance(rec.get(f), (int, float)) or isinstance(rec.get(f), bool):
                raise ParseError(f"llama-batched-bench line {n}: field '{f}' missing or not a number")
        if rec["speed_tg"] <= 0 or rec["pl"] < 1:
            raise ParseError(f"llama-batched-bench line {n}: non-positive speed_tg or pl")
        rows.append(rec)
    if not rows:
        raise ParseError("llama-batched-bench printed no result rows (is -c >= pl x (pp + tg)?)")
    return rows


def first_rows_per_batch(rows):
    """Rows of one llama-batched-bench run, each (pl, pp, tg) kept once (the
    first): a repeated batch size at the end of -npl is a sentinel."""
    seen, out = set(), []
    for r in rows:
        key = (r["pl"], r["pp"], r["tg"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def best_batched(rows, pl, pp, tg):
    """Fastest decode (speed_tg = pl x tg / t_tg) of pl sequences, None if absent."""
    best = None
    for r in rows:
        if (r["pl"], r["pp"], r["tg"]) != (pl, pp, tg):
            continue
        if best is None or r["speed_tg"] > best["tokens_per_s"]:
            best = {"tokens_per_s": r["speed_tg"], "flash_attn": r["flash_attn"],
                    "n_ubatch": r.get("n_ubatch"), "context": pp}
    return best


# ---- running the tools ---------------------------------------------------------

def _run(cmd, timeout):
    log("$ " + " ".join(cmd))
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise RuntimeError(f"{os.path.basename(cmd[0])} exited with {p.returncode}")
    return p.stdout, p.stderr


def _ints(s):
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not a comma-separated list of integers")
    if not out or any(x < 0 for x in out):
        raise argparse.ArgumentTypeError(f"'{s}' needs non-negative integers")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin-dir", required=True, help="folder with llama-bench and llama-batched-bench")
    ap.add_argument("--model", required=True)
    ap.add_argument("--prefill", type=_ints, default=[512, 4096])
    ap.add_argument("--gen", type=int, default=128, help="decode steps timed")
    ap.add_argument("--decode-context", type=int, default=512)
    ap.add_argument("--batches", type=_ints, default=[1, 8, 64])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ubatch", type=_ints, default=[512, 2048], help="llama-bench -ub values tried")
    ap.add_argument("--fa", type=_ints, default=[0, 1], help="flash attention settings tried")
    ap.add_argument("--ngl", type=int, default=99)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per tool run")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    bench = os.path.join(args.bin_dir, "llama-bench")
    batched = os.path.join(args.bin_dir, "llama-batched-bench")
    for b in (bench, batched):
        if not os.access(b, os.X_OK):
            sys.exit(f"{b} missing: run scripts/build-llama-cpp-cuda.sh")
    if not os.path.isfile(args.model):
        sys.exit(f"{args.model}: no such model file")
    fa = ",".join(str(x) for x in args.fa)
    common = ["-m", args.model, "-ngl", str(args.ngl), "-fa", fa, "-r", str(args.reps), "-o", "json"]

    out = {"tool": "llama.cpp", "model": args.model, "prefill": {}, "decode": {}}
    # Prefill: one llama_decode per prompt (n_batch = the longest prompt),
    # in micro-batches of each -ub tried.
    nb = max(max(args.prefill), max(args.ubatch))
    text, _ = _run([bench, *common, "-p", ",".join(map(str, args.prefill)), "-n", "0",
                    "-b", str(nb), "-ub", ",".join(map(str, args.ubatch))], args.timeout)
    recs = parse_llama_bench_json(text)
    first = recs[0]
    for k in ("build_commit", "build_number", "gpu_info", "backends", "model_type", "model_size",
              "model_n_params"):
        out[k] = first.get(k)
    if "CUDA" not in str(first.get("backends", "")):
        log(f"warning: llama-bench reports backends '{first.get('backends')}', not CUDA")
    for p in args.prefill:
        best = best_llama_bench(recs, p, 0, 0)
        if best is None:
            raise ParseError(f"llama-bench gave no pp{p} result")
        out["prefill"][str(p)] = best
        log(f"prefill {p}: {best['tokens_per_s']:.0f} tok/s (fa {best['flash_attn']}, "
            f"ub {best['n_ubatch']})")

    # Batch-1 decode after decode_context tokens (llama-bench's own tg test).
    text, _ = _run([bench, *common, "-p", "0", "-n", str(args.gen), "-d",
                    str(args.decode_context)], args.timeout)
    recs = parse_llama_bench_json(text)
    best = best_llama_bench(recs, 0, args.gen, args.decode_context)
    if best is None:
        raise ParseError(f"llama-bench gave no tg{args.gen} @ d{args.decode_context} result")
    best["context"] = args.decode_context
    out["decode_llama_bench_b1"] = best
    log(f"decode b1 (llama-bench): {best['tokens_per_s']:.1f} tok/s (fa {best['flash_attn']})")

    # Batched decode: llama-batched-bench, each fa setting, best of reps.
    # Its asynchronous logger sometimes loses the last row at exit (seen
    # with 0.3.36's CPU build, ~1 run in 10), so a repeat of the first batch
    # size goes last as a sentinel and is dropped (first_rows_per_batch).
    rows = []
    ctx = max(args.batches) * (args.decode_context + args.gen)
    npl = ",".join(map(str, args.batches + args.batches[:1]))
    for f in args.fa:
        for r in range(args.reps):
            so, se = _run([batched, "-m", args.model, "-ngl", str(args.ngl), "-c", str(ctx),
                           "-b", "2048", "-ub", "512", "-npp", str(args.decode_context),
                           "-ntg", str(args.gen), "-npl", npl,
                           "-fa", "on" if f else "off", "--output-format", "jsonl"],
                          args.timeout)
            got = first_rows_per_batch(parse_batched_bench_jsonl(so + "\n" + se))
            missing = sorted(set(args.batches) - {g["pl"] for g in got})
            if missing:
                log(f"warning: this run printed no row for batch {missing}")
            rows += got
    for b in args.batches:
        best = best_batched(rows, b, args.decode_context, args.gen)
        if best is None:
            raise ParseError(f"llama-batched-bench gave no result for batch {b}")
        out["decode"][str(b)] = best
        log(f"decode b{b}: {best['tokens_per_s']:.1f} tok/s (fa {best['flash_attn']})")
    # Batch 1: the better of the two tools (both at the same context).
    b1 = out["decode"].get("1")
    if b1 is not None and out["decode_llama_bench_b1"]["tokens_per_s"] > b1["tokens_per_s"]:
        out["decode"]["1"] = dict(out["decode_llama_bench_b1"], source="llama-bench")

    text = json.dumps(out, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ParseError, RuntimeError, subprocess.TimeoutExpired) as e:
        log(f"error: {e}")
        sys.exit(1)
