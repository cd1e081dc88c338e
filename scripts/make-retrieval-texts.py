#!/usr/bin/env python3
"""Writes retrieval episodes for gate calibration (docs/calibration.md).

A creation-time gate learns which tokens later queries need from the
teacher attention of its calibration text. Novels almost never hide a fact
that a much later question asks for, so a gate calibrated on them alone
never learns to keep such a fact once it leaves the window (the passkey
task, docs/eval.md). Each episode here is calibration prose (the novels of
eval-data/calib only: no evaluation text) with one fact inserted, more
prose, then a question about the fact and its answer:

    <prose> The code of the blue cabinet is 58213. <prose, 300-600 words>
    Question: what is the code of the blue cabinet? Answer: the code of the
    blue cabinet is 58213.

Facts, objects and phrasings are drawn from small lists with a seed; none
is the evaluation's passkey wording ("pass key", "Remember it", the grass
filler). Deterministic for a given seed and input.

With --probes FILE it also writes grouping probes for `kvgate calibrate
--grouping-probes`: separate episodes (other draws) that each END with the
answer's value, one after another, separated by a form feed line. The
calibration compares layers' attention on their last queries, where the
model retrieves the fact, and does not share scores between layers that
disagree there (docs/calibration.md).

usage: make-retrieval-texts.py CALIB_DIR OUT_FILE [--episodes N] [--seed S]
                               [--probes FILE] [--probe-count N]
"""
import argparse
import pathlib
import random
import re

OBJECTS = ["blue cabinet", "north gate", "old safe", "library door", "east tower", "red trunk",
           "cellar lock", "garden shed", "study desk", "iron box", "chapel vault", "stable loft"]
KINDS = ["code", "number", "combination", "key number", "secret number"]
FACT_FORMS = [
    "The {kind} of the {obj} is {val}.",
    "Note well: the {kind} of the {obj} is {val}.",
    "She wrote it down: the {kind} of the {obj} was {val}.",
    "For the {obj}, the {kind} is {val}.",
]
QUESTION_FORMS = [
    "Question: what is the {kind} of the {obj}? Answer: the {kind} of the {obj} is {val}.",
    "What was the {kind} of the {obj}? It was {val}.",
    "Tell me the {kind} of the {obj}. The {kind} of the {obj} is {val}.",
]


def words_of(calib_dir):
    text = " ".join(p.read_text(encoding="utf-8") for p in sorted(pathlib.Path(calib_dir).glob("*.txt")))
    return re.sub(r"\s+", " ", text).split(" ")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("calib_dir")
    ap.add_argument("out_file")
    ap.add_argument("--episodes", type=int, default=150)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--probes")
    ap.add_argument("--probe-count", type=int, default=32)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    words = words_of(a.calib_dir)
    if len(words) < 5000:
        raise SystemExit(f"make-retrieval-texts: {a.calib_dir} holds too little text ({len(words)} words)")

    def prose(n):
        start = rng.randrange(0, len(words) - n)
        return " ".join(words[start:start + n])

    def episode():
        obj, kind = rng.choice(OBJECTS), rng.choice(KINDS)
        digits = rng.choice([4, 5, 6])
        val = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        fact = rng.choice(FACT_FORMS).format(kind=kind, obj=obj, val=val)
        question = rng.choice(QUESTION_FORMS).format(kind=kind, obj=obj, val=val)
        return f"{prose(rng.randrange(20, 120))}\n\n{fact}\n\n{prose(rng.randrange(300, 600))}\n\n{question}"

    out = [episode() + "\n\n" for _ in range(a.episodes)]
    pathlib.Path(a.out_file).write_text("".join(out), encoding="utf-8")
    if a.probes:
        # Probes end with the answer (no trailing text): their last queries retrieve.
        pathlib.Path(a.probes).write_text("\n\f\n".join(episode() for _ in range(a.probe_count)),
                                          encoding="utf-8")


if __name__ == "__main__":
    main()
