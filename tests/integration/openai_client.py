#!/usr/bin/env python3
"""The official `openai` Python client against a running kvgate API.

Usage: openai_client.py BASE_URL API_KEY MODEL EXPECTED_JSON

EXPECTED_JSON maps "chat" and "completion" to the greedy texts of
`kvgate generate` for the prompts below (computed by the caller), so the
client's view is compared with the single-process engine. Exits non-zero
with a message naming the first failed check. Run by
tests/integration/cluster_test.cpp with PYTHONPATH=.pydeps
(scripts/fetch-test-deps.sh).
"""
import json
import sys

import openai

CHAT_PROMPT = "Name three colours of the rainbow."
COMPLETION_PROMPT = "The capital of France is"
MAX_TOKENS = 12


def check(cond, what):
    if not cond:
        print(f"openai_client: FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def main():
    base_url, key, model, expected_json = sys.argv[1:5]
    expected = json.loads(expected_json)
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=300)

    models = client.models.list()
    check(any(m.id == model for m in models.data), f"/v1/models lists {model}: {models}")

    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": CHAT_PROMPT}],
        max_tokens=MAX_TOKENS, temperature=0)
    text = chat.choices[0].message.content
    check(text == expected["chat"], f"chat text {text!r} == {expected['chat']!r}")
    check(chat.usage.completion_tokens <= MAX_TOKENS and chat.usage.prompt_tokens > 5,
          f"chat usage {chat.usage}")
    check(chat.choices[0].finish_reason in ("stop", "length"), "chat finish_reason")

    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": CHAT_PROMPT}],
        max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    check("".join(parts) == expected["chat"], f"streamed chat {''.join(parts)!r}")
    check(usage is not None and usage.completion_tokens == chat.usage.completion_tokens,
          f"streamed usage {usage}")

    comp = client.completions.create(model=model, prompt=COMPLETION_PROMPT,
                                     max_tokens=MAX_TOKENS, temperature=0)
    check(comp.choices[0].text == expected["completion"],
          f"completion {comp.choices[0].text!r} == {expected['completion']!r}")

    stream = client.completions.create(model=model, prompt=COMPLETION_PROMPT,
                                       max_tokens=MAX_TOKENS, temperature=0, stream=True)
    streamed = "".join(c.choices[0].text for c in stream if c.choices)
    check(streamed == expected["completion"], f"streamed completion {streamed!r}")

    try:
        client.chat.completions.create(model="no-such-model",
                                       messages=[{"role": "user", "content": "hi"}])
        check(False, "an unknown model is refused")
    except openai.NotFoundError as e:
        check("model" in str(e), f"the error names the model: {e}")

    bad = openai.OpenAI(base_url=base_url, api_key="wrong-key", max_retries=0)
    try:
        bad.models.list()
        check(False, "a wrong API key is refused")
    except openai.AuthenticationError:
        pass
    print("openai_client: every check passed")


if __name__ == "__main__":
    main()
