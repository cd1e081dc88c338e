#!/usr/bin/env python3
"""Writes tests/data/golden_tokens.json: llama.cpp's tokenization of SmolLM2.

The golden file pins kvgate's tokenizer (engine/tokenizer.cpp) to llama.cpp
token for token. It holds, for the model file below:
  encode: {"text" (or "text_hex" for bytes that are not valid UTF-8),
           "add_bos", "parse_special", "ids"} as llama_tokenize gives them
           (add_bos is llama_tokenize's add_special);
  decode: {"ids", "render_special", "text" or "text_hex"} as llama_detokenize
          gives them (remove_special false);
  eog_ids: the ids llama_vocab_is_eog accepts.

Run from the repository root, with llama-cpp-python installed
(pip install llama-cpp-python) and the model fetched (scripts/fetch-model.sh):

    python3 tools/make_golden_tokens.py [--model PATH] [--out PATH]

Re-run it when the cases below change; commit the JSON it writes.
"""

import argparse
import ctypes
import json
import sys

import llama_cpp

DEFAULT_MODEL = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = "tests/data/golden_tokens.json"

LONG_PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon; "
    "Neil Armstrong's first words were: \"That's one small step for [a] man, one giant leap "
    "for mankind.\" Today, over 8,000,000,000 people live on Earth (as of 2023-11-15), and "
    "about 60% of them use the Internet daily!  Meanwhile, researchers at the lab --- who'd "
    "been working since 6:30am --- announced a 3.5x speed-up on their H100 GPUs, costing "
    "$2.49/hour each.\n\nQ: Isn't that remarkable?\nA: Yes; it's remarkable, but we'll see.\n"
    "\tIndented line with tabs\t\tand trailing spaces   \n"
    "Mixed: café, naïve, 東京, Москва, القاهرة, 🚀🔥, and — of course — π ≈ 3.14159."
)

ENCODE_TEXTS = [
    # empty and basic
    "",
    "Hello world",
    "hello world",
    " Hello",
    "Hello  world",
    "Hello world!",
    # whitespace runs, tabs, newlines
    "   leading spaces",
    "trailing spaces   ",
    " " * 20 + "x",
    " " * 33,
    "a" + " " * 7 + "b",
    "\t\tindented with tabs",
    "\t \t x",
    "\n",
    "\n\n\n",
    "line1\nline2\r\nline3\rline4",
    "x\n\n  y\n   \n z",
    "ends with newline\n",
    "    def f(x):\n        return x * 2\n\n\nprint(f(21))\n",
    # digits and numbers
    "3.14159",
    "1,000,000",
    "12345678901234567890",
    "2024-01-15 12:30:45",
    "v1.2.3-rc4",
    "$100.00 and 50% off",
    "a1b2c3 x86_64 H2O",
    " 42 7  9",
    "Ⅻ ½ ² ³",
    "٣٤٥ १२३ １２３",
    # punctuation
    "Hello, world! How are you?",
    "...!!!???---",
    "(a+b)*c = d; e[0] = {f: g};",
    "@#$%^&*~`|\\/<>",
    "\"double\" and 'single' quotes",
    "--flag=value -x",
    "a—b – c … d",
    # contractions
    "I'm sure you don't know what they've done, but we're fine and it's ok; he'd say you'll see.",
    "I'M DON'T THEY'VE WE'RE",
    "'s 't 're 've 'm 'll 'd",
    "rock'n'roll o'clock ''quoted''",
    # non-ASCII scripts
    "café naïve résumé Ünïcödé",
    "e\u0301 vs é",
    "日本語のテキストです。",
    "中文测试，你好！",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم",
    "Γειά σου Κόσμε",
    "हिन्दी भाषा",
    "한국어 텍스트",
    "ﬁ ligature and ß",
    # non-ASCII white space
    "a\u00a0b\u3000c\u2003d\u0085e\u2028f",
    " \u00a0 x",
    # emoji
    "😀",
    "Hello 👋 world 🌍!",
    "👨‍👩‍👧‍👦 family",
    "🇫🇷🇩🇪 flags",
    "👍🏽 ❤️ ✨",
    # code and markup
    "#include <vector>\nint main() { std::vector<int> v{1, 2, 3}; return v.size(); }",
    '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}',
    "<html><body class=\"x\">Hi &amp; bye</body></html>",
    "https://example.com/path?q=1&x=2#frag",
    "SELECT * FROM users WHERE id = 42;",
    # long words
    "a" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    LONG_PARAGRAPH,
]

# Invalid UTF-8 and other raw bytes (stored as hex).
ENCODE_BYTES = [
    b"\xff\xfe",
    b"abc\x80def",
    b"\xc3\x28 bad continuation",
    b"\xe2\x82",
    b"\xf0\x9f\x98 truncated emoji",
    b"\xed\xa0\x80 surrogate",
    b"\xc0\x80 overlong",
    b"nul\x00inside",
]

# Texts tried with parse_special both true and false.
SPECIAL_TEXTS = [
    "<|im_start|>user\nhi<|im_end|>",
    "Hello<|im_end|>world",
    "<|endoftext|><|endoftext|>",
    "<reponame>repo<file_sep>file.py\ncode",
    "<|im_start|><|im_start|>",
    "<|im_start|",
    "x <|im_start|>  y",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]

# Texts whose ids are detokenized (plus a few fixed id lists).
DECODE_TEXTS = [
    "Hello world!",
    "café 日本 👨‍👩‍👧‍👦",
    "<|im_start|>user\nhi<|im_end|>",
    "  spaced  out  ",
]
DECODE_IDS = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
    [100, 200, 300, 400, 500, 1000, 10000, 49151],
]


def tokenize(llm, data, add_bos, special):
    return llm.tokenize(data, add_bos=add_bos, special=special)


def detokenize(vocab, ids, render_special):
    arr = (llama_cpp.llama_token * len(ids))(*ids)
    size = 64 + 64 * len(ids)
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, False, render_special)
    if n < 0:
        raise RuntimeError("detokenize buffer too small")
    return buf.raw[:n]


def text_field(data):
    try:
        return {"text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"text_hex": data.hex()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()

    llm = llama_cpp.Llama(model_path=args.model, vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

    encode = []

    def add(data, add_bos, special):
        entry = text_field(data)
        entry.update({"add_bos": add_bos, "parse_special": special,
                      "ids": tokenize(llm, data, add_bos, special)})
        encode.append(entry)

    for text in ENCODE_TEXTS:
        add(text.encode("utf-8"), False, False)
    for data in ENCODE_BYTES:
        add(data, False, False)
    for text in SPECIAL_TEXTS:
        for special in (True, False):
            add(text.encode("utf-8"), False, special)
    # add_bos (llama_tokenize's add_special): SmolLM2 has add_bos_token=false.
    add(b"Hello world", True, False)
    add(b"<|im_start|>user\nhi<|im_end|>", True, True)

    decode = []
    id_lists = [tokenize(llm, t.encode("utf-8"), False, True) for t in DECODE_TEXTS] + DECODE_IDS
    for ids in id_lists:
        for render in (False, True):
            entry = {"ids": ids, "render_special": render}
            entry.update(text_field(detokenize(vocab, ids, render)))
            decode.append(entry)
    # Token by token through an emoji: pieces that are not whole characters.
    emoji_ids = tokenize(llm, "👨‍👩‍👧".encode("utf-8"), False, False)
    for i in range(len(emoji_ids)):
        entry = {"ids": emoji_ids[i:i + 1], "render_special": False}
        entry.update(text_field(detokenize(vocab, emoji_ids[i:i + 1], False)))
        decode.append(entry)

    golden = {
        "model": args.model.rsplit("/", 1)[-1],
        "generator": "llama-cpp-python " + llama_cpp.__version__,
        "vocab_size": n_vocab,
        "eog_ids": [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)],
        "encode": encode,
        "decode": decode,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(golden, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {len(encode)} encode and {len(decode)} decode cases to {args.out}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
