"""The official `openai` Python client against a running gateway, unmodified.

    python gateway/tests/openai_client.py http://127.0.0.1:8500/v1 BASE_MODEL_NAME [ADAPTER]

Exits non-zero on the first mismatch. Needs `pip install openai`.
"""

import sys

import openai

base_url, base = sys.argv[1], sys.argv[2]
adapter = sys.argv[3] if len(sys.argv) > 3 else None
client = openai.OpenAI(base_url=base_url, api_key="unused-when-auth-is-off")
messages = [{"role": "user", "content": "What is the capital of France?"}]

ids = [m.id for m in client.models.list().data]
assert base in ids, ids

for model in [base] + ([adapter] if adapter else []):
    full = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    text = full.choices[0].message.content
    assert full.usage.completion_tokens >= 1, full
    pieces, usage = [], None
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == text, ("".join(pieces), text)
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens, usage
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=2)
    print(model, "arm:", raw.headers.get("x-loraops-arm"), "text:", repr(text))

    comp = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=6, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt="The quick brown fox", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert streamed == comp.choices[0].text, (streamed, comp.choices[0].text)

try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body
try:
    client.chat.completions.create(model=base, messages=messages, n=3)
    raise SystemExit("expected BadRequestError")
except openai.BadRequestError as e:
    assert e.body["param"] == "n", e.body
print("openai", openai.__version__, "client: ok")
