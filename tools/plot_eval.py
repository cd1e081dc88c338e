#!/usr/bin/env python3
"""Tables and a plot of KV-policy quality against KV saving.

Reads the JSON that `kvgate eval --json` prints -- a single-policy object,
a multi-policy run's {"results": [...]}, a JSON array, or JSON lines (one
of those per line) -- for any number of policies, and writes:

  * a markdown summary with one row per policy: KV saving, keep rate,
    perplexity per context (and its ratio to dense) and passkey accuracy per
    length; then the detailed perplexity table (per policy and context) and
    passkey table (per policy and length, with the per-depth cells);
  * a figure (PNG or SVG, by the extension of --plot): quality against KV
    saving, one marker per policy -- perplexity as a ratio to dense at the
    same context (one colour per context) and passkey accuracy (one colour
    per length).

Example (one shared prefill per window / prompt for every policy):

  kvgate eval --policy all --task perplexity --context 1024,2048 --windows 4 --json > out/eval/ppl.json
  kvgate eval --policy all --task passkey --lengths 1024,2048 --trials 2 --json > out/eval/passkey.json
  python3 tools/plot_eval.py out/eval/ppl.json out/eval/passkey.json \
      --table out/eval/table.md --plot out/eval/quality.png

The table needs only the standard library. The plot needs matplotlib:

  python3 -m pip install matplotlib

Without it the table is still written and the script says what is missing.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path


DEFAULT_WINDOW = 256  # kvgate eval's --n-window default
DEFAULT_KEEP = 0.3    # and its --keep-rate


def flatten(data) -> list:
    """Result objects of one JSON value: an object, {"results": [...]}, or an array of either."""
    if isinstance(data, list):
        return [x for item in data for x in flatten(item)]
    if isinstance(data, dict) and "results" in data and "policy" not in data:
        return flatten(data["results"])
    return [data]


def load_records(paths: list[Path]) -> list[dict]:
    """Every result object in the files: objects, multi-policy runs, arrays, or JSON lines."""
    records: list[dict] = []
    for path in paths:
        text = path.read_text(encoding="utf-8").strip()
        if not text:
            continue
        try:
            items = flatten(json.loads(text))
        except json.JSONDecodeError:
            items = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        items.extend(flatten(json.loads(line)))
                    except json.JSONDecodeError as e:
                        sys.exit(f"plot_eval: {path}:{n}: not JSON: {e}")
        for item in items:
            if not isinstance(item, dict) or "policy" not in item:
                sys.exit(f"plot_eval: {path}: expected kvgate eval JSON objects with a 'policy'")
            item.setdefault("task", "perplexity")
            # A policy run with a budget other than the default is its own
            # row: window-1480 (the window that matches another policy's KV
            # budget), h2o-keep0.25.
            if item["policy"] == "window" and item.get("n_window", DEFAULT_WINDOW) != DEFAULT_WINDOW:
                item["policy"] = f"window-{item['n_window']}"
            keep = item.get("target_keep_rate")
            if item["policy"] in ("h2o", "snapkv") and keep is not None and abs(keep - DEFAULT_KEEP) > 1e-9:
                item["policy"] = f"{item['policy']}-keep{keep:g}"
            records.append(item)
    return records


def perplexity_rows(records: list[dict]) -> list[dict]:
    """One row per (policy, context); a later record for the same key wins."""
    rows: dict[tuple, dict] = {}
    for r in records:
        if r["task"] != "perplexity":
            continue
        key = (r["policy"], int(r["context"]))
        rows[key] = {
            "policy": r["policy"],
            "context": int(r["context"]),
            "score_tokens": int(r.get("score_tokens", 0)),
            "windows": int(r.get("windows", 1)),
            "source": r.get("text") or r.get("data") or "",
            "perplexity": float(r["perplexity"]),
            "kv_saving": float(r.get("kv_saving", 0.0)),
            "keep_rate": float(r.get("keep_rate", 1.0)),
        }
    dense = {ctx: row["perplexity"] for (pol, ctx), row in rows.items() if pol == "dense"}
    for row in rows.values():
        base = dense.get(row["context"])
        row["vs_dense"] = (row["perplexity"] / base - 1.0) if base else None
        row["ratio"] = (row["perplexity"] / base) if base else None
    return sorted(rows.values(), key=lambda x: (x["context"], policy_order(x["policy"])))


def passkey_rows(records: list[dict]) -> list[dict]:
    """One row per (policy, length), merging trials of several runs."""
    acc: dict[tuple, dict] = {}
    for r in records:
        if r["task"] != "passkey":
            continue
        for c in r.get("cells", []):
            key = (r["policy"], int(c["length"]))
            row = acc.setdefault(key, {"policy": r["policy"], "length": int(c["length"]),
                                       "correct": 0, "trials": 0, "depths": defaultdict(lambda: [0, 0]),
                                       "saving_sum": 0.0, "keep_sum": 0.0, "n_cells": 0})
            row["correct"] += int(c["correct"])
            row["trials"] += int(c["trials"])
            d = row["depths"][float(c["depth"])]
            d[0] += int(c["correct"])
            d[1] += int(c["trials"])
            row["saving_sum"] += float(c.get("kv_saving", 0.0))
            row["keep_sum"] += float(c.get("keep_rate", 1.0))
            row["n_cells"] += 1
    rows = []
    for row in acc.values():
        row["accuracy"] = row["correct"] / row["trials"] if row["trials"] else 0.0
        row["kv_saving"] = row["saving_sum"] / row["n_cells"]
        row["keep_rate"] = row["keep_sum"] / row["n_cells"]
        rows.append(row)
    return sorted(rows, key=lambda x: (x["length"], policy_order(x["policy"])))


POLICY_ORDER = ["dense", "window", "h2o", "snapkv", "pod", "gate", "gate+pod"]


def policy_order(p: str) -> tuple:
    return (POLICY_ORDER.index(p), p) if p in POLICY_ORDER else (len(POLICY_ORDER), p)


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:+.2f}%"


def summary(ppl: list[dict], pk: list[dict]) -> list[str]:
    """One row per policy: KV saving and keep rate (of the longest perplexity
    context, else the longest passkey length), perplexity per context with its
    ratio to dense, passkey accuracy per length."""
    policies = sorted({r["policy"] for r in ppl + pk}, key=policy_order)
    contexts = sorted({r["context"] for r in ppl})
    lengths = sorted({r["length"] for r in pk})
    if not policies:
        return []
    where = f"context {contexts[-1]}" if contexts else f"passkey {lengths[-1]}"
    head = f"| policy | KV saving ({where}) | keep rate |"
    rule = "|---|---:|---:|"
    for c in contexts:
        head += f" ppl @{c} | vs dense @{c} |"
        rule += "---:|---:|"
    for n in lengths:
        head += f" passkey @{n} |"
        rule += "---:|"
    out = ["### Summary: quality against KV saving\n", head, rule]
    for p in policies:
        ref = ([r for r in ppl if r["policy"] == p and r["context"] == contexts[-1]] if contexts
               else [r for r in pk if r["policy"] == p and r["length"] == lengths[-1]])
        saving = f"{100 * ref[0]['kv_saving']:.1f}%" if ref else ""
        keep = f"{ref[0]['keep_rate']:.3f}" if ref else ""
        row = f"| {p} | {saving} | {keep} |"
        for c in contexts:
            r = [x for x in ppl if x["policy"] == p and x["context"] == c]
            row += (f" {r[0]['perplexity']:.3f} | {pct(r[0]['vs_dense'])} |" if r else " | |")
        for n in lengths:
            r = [x for x in pk if x["policy"] == p and x["length"] == n]
            row += (f" {100 * r[0]['accuracy']:.0f}% ({r[0]['correct']}/{r[0]['trials']}) |"
                    if r else " |")
        out.append(row)
    out.append("")
    return out


def markdown(ppl: list[dict], pk: list[dict]) -> str:
    out = summary(ppl, pk)
    if ppl:
        out.append("### Perplexity (teacher-forced through the decode path)\n")
        out.append("| policy | context | scored tokens | windows | perplexity | vs dense | KV saving | keep rate |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in ppl:
            out.append(f"| {r['policy']} | {r['context']} | {r['score_tokens']} | {r['windows']} | "
                       f"{r['perplexity']:.3f} | {pct(r['vs_dense'])} | {100 * r['kv_saving']:.1f}% | "
                       f"{r['keep_rate']:.3f} |")
        out.append("")
    if pk:
        depths = sorted({d for r in pk for d in r["depths"]})
        out.append("### Passkey retrieval (greedy answer)\n")
        head = "| policy | length | accuracy | trials | " + " | ".join(f"depth {d:g}" for d in depths)
        out.append(head + " | KV saving | keep rate |")
        out.append("|---|---:|---:|---:|" + "---:|" * len(depths) + "---:|---:|")
        for r in pk:
            cells = []
            for d in depths:
                c, t = r["depths"].get(d, (0, 0))
                cells.append(f"{c}/{t}" if t else "")
            out.append(f"| {r['policy']} | {r['length']} | {100 * r['accuracy']:.0f}% | {r['trials']} | "
                       + " | ".join(cells) + f" | {100 * r['kv_saving']:.1f}% | {r['keep_rate']:.3f} |")
        out.append("")
    if not out:
        out.append("(no perplexity or passkey results)\n")
    return "\n".join(out)


def plot(ppl: list[dict], pk: list[dict], path: Path, zoom: tuple | None = None) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_eval: matplotlib is not installed (python3 -m pip install matplotlib); "
                 "the table was written, the plot was not")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    markers = "osD^v<>Px*"

    policies = sorted({r["policy"] for r in ppl + pk}, key=policy_order)
    marker_of = {p: markers[i % len(markers)] for i, p in enumerate(policies)}

    def series(ax, rows, group_key, y_key, label_fmt, jitter=0.0):
        # Colour: context or length; marker: policy. Points of different
        # policies are not joined (they are not one curve); the dashed line is
        # the group's dense value, the reference every policy is held to.
        # `jitter` shifts groups apart along x (in saving points) so that equal
        # accuracies of several lengths do not hide each other.
        scale = 100.0 if y_key == "accuracy" else 1.0
        groups = defaultdict(list)
        for r in rows:
            groups[r[group_key]].append(r)
        labelled = set()  # each policy's name once per panel; the legend has the rest
        for i, (g, rs) in enumerate(sorted(groups.items())):
            color = f"C{i % 10}"
            ax.plot([], [], color=color, linestyle="-", label=label_fmt.format(g))
            for r in sorted(rs, key=lambda r: policy_order(r["policy"])):
                x = 100 * r["kv_saving"] + jitter * (i - (len(groups) - 1) / 2)
                y = scale * r[y_key]
                ax.plot([x], [y], color=color, marker=marker_of[r["policy"]], linestyle="none",
                        markersize=7)
                if r["policy"] not in labelled:
                    labelled.add(r["policy"])
                    ax.annotate(r["policy"], (x, y), textcoords="offset points", xytext=(5, 3),
                                fontsize=7)
                if r["policy"] == "dense":
                    ax.axhline(y, color=color, linestyle="--", linewidth=0.8, alpha=0.6)
        for p in policies:
            ax.plot([], [], color="gray", marker=marker_of[p], linestyle="none", label=p)

    ax = axes[0]
    # Perplexity as a ratio to dense at the same context, so contexts share
    # one scale and 1.0 is the reference; raw perplexity only when no dense
    # result was given.
    rel = [r for r in ppl if r["ratio"] is not None]
    y_key = "ratio" if rel else "perplexity"
    shown = rel if rel else ppl
    if shown:
        series(ax, shown, "context", y_key, "context {}")
        ax.legend(fontsize=8)
        if zoom is not None:
            # Where the policies that matter crowd together (a far-off point
            # such as window's squeezes them): the same points, magnified.
            x0, x1, y0, y1 = zoom
            inset = ax.inset_axes([0.3, 0.3, 0.48, 0.62])
            series(inset, shown, "context", y_key, "context {}")
            inset.set_xlim(x0, x1)
            inset.set_ylim(y0, y1)
            inset.tick_params(labelsize=7)
            inset.grid(True, alpha=0.3)
            ax.indicate_inset_zoom(inset, edgecolor="gray")
    else:
        ax.text(0.5, 0.5, "no perplexity results", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("KV saving (%)  [1 - compressed bytes / dense bytes]")
    ax.set_ylabel("perplexity / dense perplexity (lower is better)" if rel
                  else "perplexity (lower is better)")
    ax.set_title("Perplexity vs KV saving")
    ax.grid(True, alpha=0.3)

    ax = axes[1]
    if pk:
        series(ax, pk, "length", "accuracy", "{} tokens", jitter=0.8)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no passkey results", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(-5, 105)
    ax.set_xlabel("KV saving (%)  [lengths nudged apart by 0.8 points]")
    ax.set_ylabel("passkey accuracy (%)")
    ax.set_title("Passkey retrieval vs KV saving")
    ax.grid(True, alpha=0.3)

    # Both panels share the x range so policies line up: 0 (dense) to 100%
    # saving, widened if some result lies outside.
    lo = min([0.0] + [100 * r["kv_saving"] for r in ppl + pk])
    hi = max([100.0] + [100 * r["kv_saving"] for r in ppl + pk])
    for a in axes:
        a.set_xlim(lo - 5.0, hi + 5.0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", type=Path, help="kvgate eval --json output files")
    ap.add_argument("--table", type=Path, help="write the markdown table here (default: stdout)")
    ap.add_argument("--plot", type=Path, help="write the figure here (.png or .svg)")
    ap.add_argument("--ppl-zoom", metavar="X0,X1,Y0,Y1",
                    help="perplexity panel: an inset magnifying KV saving X0..X1 (%%) and "
                         "perplexity ratio Y0..Y1")
    args = ap.parse_args()
    for p in args.inputs:
        if not p.is_file():
            print(f"plot_eval: {p}: no such file", file=sys.stderr)
            return 1
    records = load_records(args.inputs)
    ppl, pk = perplexity_rows(records), passkey_rows(records)
    for r in ppl:
        if not math.isfinite(r["perplexity"]):
            print(f"plot_eval: warning: non-finite perplexity for {r['policy']} at {r['context']}",
                  file=sys.stderr)
    table = markdown(ppl, pk)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(table + "\n", encoding="utf-8")
    else:
        print(table)
    if args.plot:
        if args.plot.suffix.lower() not in (".png", ".svg"):
            print("plot_eval: --plot must end in .png or .svg", file=sys.stderr)
            return 2
        zoom = None
        if args.ppl_zoom:
            try:
                zoom = tuple(float(v) for v in args.ppl_zoom.split(","))
            except ValueError:
                zoom = ()
            if len(zoom) != 4 or zoom[0] >= zoom[1] or zoom[2] >= zoom[3]:
                sys.exit(f"plot_eval: --ppl-zoom wants X0,X1,Y0,Y1 with X0 < X1 and Y0 < Y1, "
                         f"got '{args.ppl_zoom}'")
        plot(ppl, pk, args.plot, zoom)
    return 0


if __name__ == "__main__":
    sys.exit(main())
