#!/usr/bin/env python3
"""One table of kvgate's CUDA engine against llama.cpp's CUDA build
(docs/gpu-bench.md), from kvgate_engine_cuda_bench --json files and
bench/llama_cpp_cuda_peer.py --out files.

    python3 tools/gpu_bench_table.py --kvgate K1.json [K2.json ...] \\
        --llama NAME=P1.json [NAME=P2.json ...] [--out summary.json]

Rows per model: prefill at each prompt length (tokens/s, TFLOP/s and the
fraction of peak), decode at batch 1, 8, 64 (tokens/s, GB/s and the fraction
of peak), with kvgate / llama.cpp. llama.cpp's TFLOP/s and GB/s are its
tokens/s times kvgate's FLOP and byte counts for the same work (the same
model and lengths), so the two columns compare like with like. kvgate has
batch-1 decode only (CudaForward decodes one sequence); its batch-8/64
cells are "n/a". A model with llama.cpp figures but no kvgate file (kvgate
failed on it) still gets its rows, with tokens/s only (the rates need
kvgate's counts). Prints the table on stdout; --out writes the rows as JSON.
"""
import argparse
import json
import sys


def decode_bytes_per_step(cfg, gemv_weight_bytes, batch, context, steps):
    """Bytes one decode step of `batch` sequences reads, counted as
    kvgate_engine_cuda_bench counts batch 1: every GEMV weight once, plus
    each sequence's K and V rows (fp16, all layers) at the mean context."""
    kv_row = 2.0 * cfg["n_layers"] * cfg["n_kv_heads"] * cfg["head_dim"] * 2
    return gemv_weight_bytes + batch * kv_row * (context + (steps + 1) / 2.0)


def build_rows(kvgate, peers, batches=(1, 8, 64)):
    """kvgate: the parsed --json object of kvgate_engine_cuda_bench (its
    "models" may hold several); peers: {model name: parsed peer JSON}.
    Returns a list of row dicts (model, metric, kvgate / llama.cpp figures,
    ratio); a side missing a figure has None there and no ratio."""
    peak_tf, peak_gb = kvgate["peak_tflops"], kvgate["peak_gbps"]
    rows = []
    names = list(kvgate["models"]) + [n for n in peers if n not in kvgate["models"]]
    for name in names:
        peer = peers.get(name, {})
        m = kvgate["models"].get(name)
        if m is None:
            rows += _llama_only_rows(name, peer, batches)
            continue
        cfg = m["config"]
        for n, p in m["prefill"].items():
            lp = peer.get("prefill", {}).get(n)
            ltok = lp["tokens_per_s"] if lp else None
            ltf = (p["flops"] * ltok / int(n) / 1e12) if ltok else None
            rows.append({
                "model": name, "metric": f"prefill {n}", "unit": "TFLOP/s",
                "kvgate_tokens_per_s": p["tokens_per_s"], "kvgate_rate": p["tflops"],
                "kvgate_fraction": p["tflops"] / peak_tf,
                "llama_tokens_per_s": ltok, "llama_rate": ltf,
                "llama_fraction": ltf / peak_tf if ltf else None,
                "llama_config": {k: lp.get(k) for k in ("flash_attn", "n_ubatch")} if lp else None,
                "ratio": p["tokens_per_s"] / ltok if ltok else None,
            })
        dec = m.get("decode", {})
        best_b1 = max(dec.values(), key=lambda d: d["tokens_per_s"]) if dec else None
        for b in batches:
            k = best_b1 if b == 1 else None
            ld = peer.get("decode", {}).get(str(b))
            ltok = ld["tokens_per_s"] if ld else None
            context = (k or ld or {}).get("context", 512)
            steps = k["steps"] if k else 128
            bytes_step = decode_bytes_per_step(cfg, cfg["gemv_weight_bytes"], b, context, steps)
            lgb = bytes_step * ltok / b / 1e9 if ltok else None
            rows.append({
                "model": name, "metric": f"decode b{b}", "unit": "GB/s",
                "kvgate_tokens_per_s": k["tokens_per_s"] if k else None,
                "kvgate_rate": k["gbps"] if k else None,
                "kvgate_fraction": k["gbps"] / peak_gb if k else None,
                "llama_tokens_per_s": ltok, "llama_rate": lgb,
                "llama_fraction": lgb / peak_gb if lgb else None,
                "llama_config": {"flash_attn": ld.get("flash_attn")} if ld else None,
                "ratio": k["tokens_per_s"] / ltok if (k and ltok) else None,
            })
    return rows


def _llama_only_rows(name, peer, batches):
    rows = []
    metrics = [(f"prefill {n}", p) for n, p in peer.get("prefill", {}).items()]
    metrics += [(f"decode b{b}", peer.get("decode", {}).get(str(b))) for b in batches]
    for metric, lp in metrics:
        rows.append({
            "model": name, "metric": metric, "unit": None, "kvgate_tokens_per_s": None,
            "kvgate_rate": None, "kvgate_fraction": None,
            "llama_tokens_per_s": lp["tokens_per_s"] if lp else None, "llama_rate": None,
            "llama_fraction": None, "llama_config": None, "ratio": None,
        })
    return rows


def _f(v, fmt):
    return "n/a" if v is None else format(v, fmt)


def format_table(rows, peak_tflops, peak_gbps):
    head = (f"{'model':<12} {'metric':<13} {'kvgate tok/s':>12} {'rate':>8} {'%peak':>6}   "
            f"{'llama.cpp tok/s':>15} {'rate':>8} {'%peak':>6}   {'kvgate/llama':>12}")
    lines = [f"peaks: {peak_tflops:.0f} TFLOP/s, {peak_gbps:.0f} GB/s "
             "(rate: TFLOP/s for prefill, GB/s for decode; target kvgate/llama >= 1.00)",
             head, "-" * len(head)]
    for r in rows:
        pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}"
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}x" + ("" if r["ratio"] >= 1.0 else " <")
        lines.append(
            f"{r['model']:<12} {r['metric']:<13} {_f(r['kvgate_tokens_per_s'], '12.1f'):>12} "
            f"{_f(r['kvgate_rate'], '8.1f'):>8} {pct(r['kvgate_fraction']):>6}   "
            f"{_f(r['llama_tokens_per_s'], '15.1f'):>15} {_f(r['llama_rate'], '8.1f'):>8} "
            f"{pct(r['llama_fraction']):>6}   {ratio:>12}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kvgate", nargs="*", default=[], help="kvgate_engine_cuda_bench --json files")
    ap.add_argument("--peak-tflops", type=float, help="when no kvgate file gives the peaks")
    ap.add_argument("--peak-gbps", type=float)
    ap.add_argument("--llama", nargs="*", default=[], help="NAME=peer.json (NAME as in kvgate's models)")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    merged = None
    if not args.kvgate:
        if args.peak_tflops is None or args.peak_gbps is None:
            sys.exit("without --kvgate files, --peak-tflops and --peak-gbps are needed")
        merged = {"peak_tflops": args.peak_tflops, "peak_gbps": args.peak_gbps, "models": {}}
    for path in args.kvgate:
        with open(path) as fh:
            k = json.load(fh)
        if merged is None:
            merged = {"peak_tflops": k["peak_tflops"], "peak_gbps": k["peak_gbps"], "models": {}}
        merged["models"].update(k["models"])
    peers = {}
    for item in args.llama:
        name, sep, path = item.partition("=")
        if not sep:
            sys.exit(f"--llama wants NAME=FILE, got '{item}'")
        with open(path) as fh:
            peers[name] = json.load(fh)
    rows = build_rows(merged, peers)
    print(format_table(rows, merged["peak_tflops"], merged["peak_gbps"]))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"peak_tflops": merged["peak_tflops"], "peak_gbps": merged["peak_gbps"],
                       "rows": rows, "llama_cpp": peers}, fh, indent=1)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
