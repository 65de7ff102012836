"""The official `openai` Python client against a running gateway, unmodified.

    python gateway/tests/openai_client.py http://127.0.0.1:8500/v1 BASE_MODEL_NAME [ADAPTER] [--no-seed]

Exits non-zero on the first mismatch. Needs `pip install openai`.
"""

import json
import sys

import openai

base_url, base = sys.argv[1], sys.argv[2]
adapter = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] else None
# mistral.rs 0.8.1 has no per-request seed: sampled requests with a seed are refused there.
supports_seed = "--no-seed" not in sys.argv
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

# n answers, each with its index, counted together.
many = client.chat.completions.create(model=base, messages=messages, max_tokens=4, temperature=0.8, n=3, seed=5 if supports_seed else None)
assert [c.index for c in many.choices] == [0, 1, 2], many
assert many.usage.completion_tokens >= 3, many.usage
streamed_indexes = set()
for chunk in client.chat.completions.create(model=base, messages=messages, max_tokens=4, n=3, temperature=0.8, seed=5 if supports_seed else None, stream=True):
    for c in chunk.choices:
        streamed_indexes.add(c.index)
assert streamed_indexes == {0, 1, 2}, streamed_indexes

# Log-probabilities, whole and streamed: one entry per token, with the alternatives asked for.
lp = client.chat.completions.create(model=base, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
content = lp.choices[0].logprobs.content
if supports_seed:
    assert len(content) == lp.usage.completion_tokens, (len(content), lp.usage)
else:  # mistral.rs 0.8.1 streams no log-probability for a sequence's last token
    assert 1 <= len(content) <= lp.usage.completion_tokens, (len(content), lp.usage)
assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content), content
assert all(t.logprob >= t.top_logprobs[1].logprob - 1e-4 for t in content), content
streamed_lp = []
for chunk in client.chat.completions.create(model=base, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2, stream=True):
    for c in chunk.choices:
        if c.logprobs and c.logprobs.content:
            streamed_lp.extend(c.logprobs.content)
assert [t.token for t in streamed_lp] == [t.token for t in content], (streamed_lp, content)
comp_lp = client.completions.create(model=base, prompt="The quick brown fox", max_tokens=4, temperature=0, logprobs=2)
assert len(comp_lp.choices[0].logprobs.tokens) == comp_lp.usage.completion_tokens, comp_lp

# Structured outputs: every answer parses and validates, whatever the (random) model prefers.
schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
          "population": {"type": "integer", "minimum": 0, "maximum": 100000000}},
          "required": ["city", "population"], "additionalProperties": False}
for seed in range(3):
    r = client.chat.completions.create(
        model=base, messages=messages, max_tokens=120, temperature=1.0, seed=seed if supports_seed else None,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"city", "population"} and isinstance(obj["city"], str) and len(obj["city"]) <= 10, obj
    assert isinstance(obj["population"], int) and obj["population"] >= 0, obj
    # mistral.rs 0.8.1 keeps decoding (empty text) after the grammar is complete, up to max_tokens.
    assert r.choices[0].finish_reason == "stop" or not supports_seed, r
r = client.chat.completions.create(model=base, messages=messages, max_tokens=200, temperature=0,
                                   response_format={"type": "json_object"})
assert r.choices[0].message.content.startswith("{"), r
if r.choices[0].finish_reason == "stop":  # any object: the model may write one longer than max_tokens
    assert isinstance(json.loads(r.choices[0].message.content), dict), r

# Tools: a forced call parses into tool_calls; its result goes back as a tool message.
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                         "required": ["city"], "additionalProperties": False}}}]
ask = [{"role": "user", "content": "What is the weather in Paris?"}]
r = client.chat.completions.create(model=base, messages=ask, tools=tools, tool_choice="required", max_tokens=150)
choice = r.choices[0]
assert choice.finish_reason == "tool_calls", choice
call = choice.message.tool_calls[0]
assert call.type == "function" and call.function.name == "get_weather" and call.id, call
assert isinstance(json.loads(call.function.arguments)["city"], str), call
calls, deltas = {}, 0
for chunk in client.chat.completions.create(model=base, messages=ask, tools=tools, tool_choice="required",
                                            max_tokens=150, stream=True):
    for c in chunk.choices:
        for tc in c.delta.tool_calls or []:
            deltas += 1
            entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        if c.finish_reason:
            assert c.finish_reason == "tool_calls", c
assert deltas >= 1 and calls[0]["name"] == "get_weather", calls
json.loads(calls[0]["arguments"])
named = client.chat.completions.create(model=base, messages=ask, tools=tools, max_tokens=150,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
assert named.choices[0].message.tool_calls[0].function.name == "get_weather", named
# "stop", as OpenAI does for a named function (mistral.rs 0.8.1: see the json_schema case above).
assert named.choices[0].finish_reason == "stop" or not supports_seed, named
follow = ask + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
answer = client.chat.completions.create(model=base, messages=follow, tools=tools, tool_choice="none", max_tokens=8)
assert answer.choices[0].message.tool_calls is None and answer.choices[0].message.content is not None, answer

# Same seed, same request: the same tokens.
if supports_seed:
    a, b = (client.chat.completions.create(model=base, messages=messages, max_tokens=12, temperature=1.0, seed=42)
            .choices[0].message.content for _ in range(2))
    assert a == b, (a, b)

try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body
for bad, param in [({"n": 99}, "n"), ({"extra_body": {"top_k": 3}}, "top_k"),
                   ({"tool_choice": "required"}, "tool_choice"), ({"logprobs": False, "top_logprobs": 3}, "top_logprobs")]:
    try:
        client.chat.completions.create(model=base, messages=messages, **bad)
        raise SystemExit(f"expected BadRequestError for {bad}")
    except openai.BadRequestError as e:
        assert e.body["param"] == param and e.body["type"] == "invalid_request_error", e.body
print("openai", openai.__version__, "client: ok")
