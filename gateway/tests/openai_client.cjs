// The official `openai` npm client against a running gateway, unmodified.
//
//     NODE_PATH=…/node_modules node gateway/tests/openai_client.cjs http://127.0.0.1:8500/v1 BASE [ADAPTER]
//
// Exits non-zero on the first mismatch.

const assert = require("node:assert/strict");
const OpenAI = require("openai");

const [baseURL, base, adapter] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused-when-auth-is-off" });
const messages = [{ role: "user", content: "What is the capital of France?" }];

async function main() {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  assert.ok(ids.includes(base), `${base} not in ${ids}`);

  for (const model of adapter ? [base, adapter] : [base]) {
    const full = await client.chat.completions.create({ model, messages, max_tokens: 8, temperature: 0 });
    const text = full.choices[0].message.content;
    let streamed = "";
    let usage = null;
    const stream = await client.chat.completions.create({
      model, messages, max_tokens: 8, temperature: 0, stream: true, stream_options: { include_usage: true },
    });
    for await (const chunk of stream) {
      if (chunk.choices.length) streamed += chunk.choices[0].delta.content ?? "";
      if (chunk.usage) usage = chunk.usage;
    }
    assert.equal(streamed, text);
    assert.equal(usage.completion_tokens, full.usage.completion_tokens);
  }

  // n, log-probabilities, structured output, a tool round trip.
  const many = await client.chat.completions.create({ model: base, messages, max_tokens: 4, n: 3, seed: 1 });
  assert.deepEqual(many.choices.map((c) => c.index), [0, 1, 2]);

  const lp = await client.chat.completions.create({
    model: base, messages, max_tokens: 5, temperature: 0, logprobs: true, top_logprobs: 3,
  });
  assert.equal(lp.choices[0].logprobs.content.length, lp.usage.completion_tokens);
  assert.ok(lp.choices[0].logprobs.content.every((t) => t.top_logprobs.length === 3));

  const schema = {
    type: "object", properties: { answer: { type: "string", maxLength: 16 }, sure: { type: "boolean" } },
    required: ["answer", "sure"], additionalProperties: false,
  };
  const js = await client.chat.completions.create({
    model: base, messages, max_tokens: 150,
    response_format: { type: "json_schema", json_schema: { name: "a", schema, strict: true } },
  });
  const obj = JSON.parse(js.choices[0].message.content);
  assert.equal(typeof obj.answer, "string");
  assert.equal(typeof obj.sure, "boolean");

  const tools = [{
    type: "function",
    function: { name: "lookup", parameters: { type: "object", properties: { q: { type: "string", maxLength: 10 } }, required: ["q"], additionalProperties: false } },
  }];
  const called = await client.chat.completions.create({ model: base, messages, tools, tool_choice: "required", max_tokens: 150 });
  const call = called.choices[0].message.tool_calls[0];
  assert.equal(called.choices[0].finish_reason, "tool_calls");
  assert.equal(call.function.name, "lookup");
  assert.equal(typeof JSON.parse(call.function.arguments).q, "string");
  const follow = await client.chat.completions.create({
    model: base, tools, max_tokens: 6, tool_choice: "none",
    messages: [...messages, called.choices[0].message, { role: "tool", tool_call_id: call.id, content: "Paris" }],
  });
  assert.equal(typeof follow.choices[0].message.content, "string");

  // Errors arrive typed, naming the parameter.
  await assert.rejects(
    client.chat.completions.create({ model: "no-such-model", messages }),
    (e) => e instanceof OpenAI.NotFoundError && e.code === "model_not_found",
  );
  await assert.rejects(
    client.chat.completions.create({ model: base, messages, n: 99 }),
    (e) => e instanceof OpenAI.BadRequestError && e.param === "n",
  );
  console.log("openai npm", OpenAI.VERSION ?? "", "client: ok");
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
