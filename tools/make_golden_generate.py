#!/usr/bin/env python3
"""Write tests/data/golden_generate.json from llama.cpp (llama-cpp-python).

For a varied set of prompts: the prompt's token ids (as llama.cpp tokenizes
them), the greedy continuation for STEPS tokens, and at every step the top-5
next-token ids and logits. The engine's tests (tests/unit/engine/model_test.cpp)
compare against this file.

Run (needs `pip install llama-cpp-python numpy` and scripts/fetch-model.sh):
    python3 tools/make_golden_generate.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf]

llama.cpp settings: flash attention off, f16 KV cache (its defaults for the
non-FA path), one sequence, all of the prompt in one batch.
"""
import argparse
import json
import os
import sys

import numpy as np
import llama_cpp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40

PROMPTS = [
    # (name, text, is_chat)
    ("plain_story", "Once upon a time, in a small village by the sea,", False),
    ("plain_facts", "The capital of France is", False),
    ("plain_code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", False),
    ("plain_numbers", "1, 1, 2, 3, 5, 8, 13, 21,", False),
    ("plain_list", "Here are three tips for staying healthy:\n1.", False),
    ("plain_unicode", "Le café près de la gare sert des croissants. En anglais, cela veut dire", False),
    ("chat_sky", "Why is the sky blue?", True),
    ("chat_math", "What is 12 times 7? Answer briefly.", True),
    ("chat_poem", "Write a haiku about autumn leaves.", True),
    ("chat_long", "Summarize the following paragraph in one sentence.\n\n"
     "The industrial revolution began in Great Britain in the late eighteenth century "
     "and spread to Europe and North America. It replaced hand production with machines, "
     "introduced new chemical and iron production processes, and made steam power widely "
     "used. Cities grew quickly as people moved from farms to factories, and the standard "
     "of living changed for millions of people, though working conditions were often harsh.", True),
]


def chatml(user_text):
    return ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
            "<|im_end|>\n<|im_start|>user\n" + user_text + "<|im_end|>\n<|im_start|>assistant\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "data", "golden_generate.json"))
    args = ap.parse_args()

    llm = llama_cpp.Llama(model_path=args.model, n_ctx=1024, n_batch=512, n_ubatch=512,
                          n_threads=os.cpu_count(), flash_attn=False, logits_all=False,
                          verbose=False)
    cases = []
    for i, (name, text, is_chat) in enumerate(PROMPTS):
        prompt = chatml(text) if is_chat else text
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        steps = []
        for _ in range(STEPS):
            # Only the last position has logits (logits_all=False): output row 0.
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()
            order = np.argsort(-logits, kind="stable")[:5]
            tok = int(order[0])
            steps.append({"token": tok,
                          "top5_ids": [int(t) for t in order],
                          "top5_logits": [round(float(logits[t]), 5) for t in order]})
            llm.eval([tok])
        cases.append({"name": name, "chat": is_chat, "prompt": prompt, "prompt_ids": ids,
                      "steps": steps})
        print(f"[{i + 1}/{len(PROMPTS)}] {name}: {len(ids)} prompt tokens, "
              f"greedy {llm.detokenize([s['token'] for s in steps])[:60]!r}", file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump({"generator": f"llama-cpp-python {llama_cpp.__version__}",
                   "model": os.path.basename(args.model), "steps": STEPS, "cases": cases}, f,
                  indent=None, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
