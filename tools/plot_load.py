#!/usr/bin/env python3
"""Latency curves from `kvgate bench load --out FILE` results.

Reads any number of result files (one per deployment: e.g. the disaggregated
cluster and a colocated `kvgate serve` on the same machine) and writes

  * a markdown table (--table): per run and concurrency level, TTFT and
    inter-token latency p50/p99, end-to-end p99, throughput and goodput;
  * a figure (--plot, PNG or SVG): TTFT p50/p99, inter-token p50/p99 and
    throughput against concurrency, one line per run.

  python3 tools/plot_load.py out/load/cluster.json out/load/colocated.json \
      --table docs/results/load.md --plot docs/results/load.png

The table needs only the standard library; the plot needs matplotlib.
"""
from __future__ import annotations

import argparse
import json
import sys


def fmt(v, spec=".0f"):
    return "–" if v is None else format(v, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+")
    ap.add_argument("--table")
    ap.add_argument("--plot")
    a = ap.parse_args()
    runs = []
    for path in a.results:
        with open(path) as f:
            runs.append(json.load(f))

    lines = ["| run | concurrency | ok/failed | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | E2E p99 | tokens/s | requests/s | goodput/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        for l in r["levels"]:
            lines.append(
                f"| {r['label']} | {l['concurrency']} | {l['ok']}/{l['failed']} | "
                f"{fmt(l['ttft']['p50_ms'])} ms | {fmt(l['ttft']['p99_ms'])} ms | "
                f"{fmt(l['itl']['p50_ms'], '.1f')} ms | {fmt(l['itl']['p99_ms'], '.1f')} ms | "
                f"{fmt(l['e2e']['p99_ms'])} ms | {fmt(l['throughput_tokens_per_s'], '.1f')} | "
                f"{fmt(l['requests_per_s'], '.2f')} | {fmt(l['goodput_requests_per_s'], '.2f')} |")
    r0 = runs[0]
    header = (f"Prompts drawn from {r0['prompt_tokens_mix']} tokens, {r0['output_tokens']} output tokens "
              f"each (ignore_eos); goodput SLO: TTFT <= {r0['slo']['ttft_ms']:.0f} ms and mean "
              f"inter-token latency <= {r0['slo']['itl_ms']:.0f} ms.\n\n")
    table = header + "\n".join(lines) + "\n"
    if a.table:
        with open(a.table, "w") as f:
            f.write(table)
    print(table)

    if a.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("plot_load: matplotlib is missing (python3 -m pip install matplotlib)", file=sys.stderr)
            return 1
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for r in runs:
            c = [l["concurrency"] for l in r["levels"]]
            for key, ax in (("ttft", axes[0]), ("itl", axes[1])):
                p50 = [l[key]["p50_ms"] for l in r["levels"]]
                p99 = [l[key]["p99_ms"] for l in r["levels"]]
                line, = ax.plot(c, p50, marker="o", label=f"{r['label']} p50")
                ax.plot(c, p99, marker="x", linestyle="--", color=line.get_color(), label=f"{r['label']} p99")
            axes[2].plot(c, [l["throughput_tokens_per_s"] for l in r["levels"]], marker="o", label=r["label"])
        axes[0].set_title("time to first token")
        axes[0].set_ylabel("ms")
        axes[1].set_title("inter-token latency")
        axes[1].set_ylabel("ms")
        axes[2].set_title("output throughput")
        axes[2].set_ylabel("tokens/s")
        for ax in axes:
            ax.set_xlabel("concurrent requests")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)
        print(f"plot_load: wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
