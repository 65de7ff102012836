// Seeds a registry for the console benchmark over its REST API: one adapter with many
// versions (each with evidence, a gate with a rule, a training manifest naming a run), many
// adapters each with one version and a running canary, and a training run with its curves.
//
//   node bench/console/seed.cjs REGISTRY_URL TOKEN BASE_MODEL_DIR [VERSIONS] [ADAPTERS]
// Prints one JSON line: {"big": NAME, "versions": N, "rolled": [NAMES], "run": ID, "base": NAME}.
'use strict';

const fs = require('fs');
const path = require('path');
const crypto = require('crypto');

const [registry, token, baseDir, versionsArg, adaptersArg] = process.argv.slice(2);
if (!registry || !token || !baseDir) {
  console.error('usage: seed.cjs REGISTRY_URL TOKEN BASE_MODEL_DIR [VERSIONS] [ADAPTERS]');
  process.exit(2);
}
const VERSIONS = Number(versionsArg || 1000);
const ADAPTERS = Number(adaptersArg || 100);
const BIG = 'bench-big';
const API = `${registry.replace(/\/+$/, '')}/api/v1`;
const cfg = JSON.parse(fs.readFileSync(path.join(baseDir, 'config.json'), 'utf8'));
const BASE = path.basename(fs.realpathSync(baseDir));

async function call(method, p, body, { ok = [200, 201] } = {}) {
  const headers = { Authorization: `Bearer ${token}` };
  let payload = body;
  if (body !== undefined && !(body instanceof FormData)) {
    headers['Content-Type'] = 'application/json';
    payload = JSON.stringify(body);
  }
  for (let attempt = 0; ; attempt++) {
    const res = await fetch(API + p, { method, headers, body: payload });
    const text = await res.text();
    if (ok.includes(res.status)) return text ? JSON.parse(text) : null;
    // Concurrent pushes to one adapter may race for a version number: retry those.
    if ((res.status === 409 || res.status === 503) && attempt < 5) {
      await new Promise((r) => setTimeout(r, 50 * (attempt + 1)));
      continue;
    }
    throw new Error(`${method} ${p}: ${res.status} ${text.slice(0, 400)}`);
  }
}

// A PEFT LoRA adapter on q_proj and v_proj with seeded random weights (distinct bytes per seed).
function safetensors(seed, r) {
  const hidden = cfg.hidden_size;
  const heads = cfg.num_attention_heads;
  const kv = cfg.num_key_value_heads || heads;
  const headDim = cfg.head_dim || hidden / heads;
  let state = BigInt(seed) * 0x9E3779B97F4A7C15n | 1n;
  const mask = (1n << 64n) - 1n;
  const next = () => {
    state ^= (state << 13n) & mask;
    state ^= state >> 7n;
    state ^= (state << 17n) & mask;
    return (Number(state >> 40n) / 2 ** 24 - 0.5) * 0.02;
  };
  const tensors = [];
  for (let l = 0; l < cfg.num_hidden_layers; l++) {
    for (const [m, out] of [['q_proj', heads * headDim], ['v_proj', kv * headDim]]) {
      for (const [ab, shape] of [['A', [r, hidden]], ['B', [out, r]]]) {
        tensors.push([`base_model.model.model.layers.${l}.self_attn.${m}.lora_${ab}.weight`, shape]);
      }
    }
  }
  tensors.sort((a, b) => (a[0] < b[0] ? -1 : 1));
  const header = { __metadata__: { format: 'pt' } };
  let offset = 0;
  for (const [k, shape] of tensors) {
    const n = shape[0] * shape[1] * 4;
    header[k] = { dtype: 'F32', shape, data_offsets: [offset, offset + n] };
    offset += n;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (json.length % 8)) % 8);
  const buf = Buffer.alloc(8 + json.length + offset);
  buf.writeBigUInt64LE(BigInt(json.length), 0);
  buf.write(json, 8, 'utf8');
  let o = 8 + json.length;
  for (let i = 0; i < offset / 4; i++, o += 4) buf.writeFloatLE(next(), o);
  return buf;
}

function adapterConfig(r) {
  return JSON.stringify({
    peft_type: 'LORA', task_type: 'CAUSAL_LM', r, lora_alpha: 2 * r, lora_dropout: 0,
    target_modules: ['q_proj', 'v_proj'], base_model_name_or_path: BASE, bias: 'none',
    use_rslora: false, use_dora: false, fan_in_fan_out: false, inference_mode: true,
  });
}

function manifest(runId, seed) {
  return JSON.stringify({
    format: 'loraops.training/v1', method: 'sft', trainer_version: 'bench', base_model: BASE,
    datasets: [
      { role: 'train', path: 'data/train.jsonl', digest: `sha256:${crypto.createHash('sha256').update(`train${seed}`).digest('hex')}`, rows: 1000 },
      { role: 'val', path: 'data/val.jsonl', digest: `sha256:${crypto.createHash('sha256').update(`val${seed}`).digest('hex')}`, rows: 100 },
    ],
    config: { steps: 100, lr: 2e-4, batch_size: 4, lora: { r: 4, alpha: 8 } },
    metrics: { final_loss: 1.5, best_val_loss: 1.6 },
    created_at: new Date().toISOString(),
    ...(runId ? { run_id: runId } : {}),
  });
}

async function push(name, seed, runId) {
  const form = new FormData();
  form.append('adapter_config.json', new Blob([adapterConfig(4)]), 'adapter_config.json');
  form.append('adapter_model.safetensors', new Blob([safetensors(seed, 4)]), 'adapter_model.safetensors');
  form.append('manifest.json', new Blob([manifest(runId, seed)]), 'manifest.json');
  return call('POST', `/adapters/${name}/versions`, form);
}

let suite = null;
async function evidence(name, v) {
  const now = new Date().toISOString();
  return call('POST', `/adapters/${name}/versions/${v.version}/evidence`, {
    adapter_digest: v.digest,
    suite,
    engine: { engine: 'bench', engine_version: '0', decoding: {} },
    metrics: { accuracy: 0.9, refusal_rate: 0.01 },
    cases: 1,
    produced_by: 'bench/console',
    started_at: now,
    finished_at: now,
  });
}

async function pool(n, limit, fn) {
  let i = 0;
  const worker = async () => { while (i < n) { const k = i++; await fn(k); } };
  await Promise.all(Array.from({ length: Math.min(limit, n) }, worker));
}

async function main() {
  const t0 = Date.now();
  const s = await call('POST', '/suites', {
    manifest: { name: 'smoke', version: '1', scorer: { type: 'contains' }, thresholds: [{ metric: 'accuracy', op: '>=', value: 0 }] },
    cases: '{"prompt": "hi", "expected": ""}\n',
  });
  suite = { name: 'smoke', version: '1', digest: s.digest };

  // A training run with curves, which the big adapter's newest version names.
  const runId = crypto.randomUUID();
  const STEPS = 1000;
  await call('POST', '/runs', {
    id: runId, adapter: BIG, method: 'sft', base_model: BASE,
    config: { steps: STEPS, lr: 2e-4, batch_size: 4, warmup_steps: 50, lora: { r: 4, alpha: 8, dropout: 0.05 } },
    datasets: [{ role: 'train', path: 'data/train.jsonl', digest: `sha256:${'0'.repeat(64)}`, rows: 1000 }],
    total_steps: STEPS,
  });
  const points = [];
  for (let step = 1; step <= STEPS; step++) {
    const loss = 2.5 * Math.exp(-step / 300) + 0.8 + 0.05 * Math.sin(step / 7);
    points.push({ step, name: 'loss', value: loss });
    points.push({ step, name: 'lr', value: 2e-4 * Math.min(1, step / 50) * (1 - step / (STEPS + 1)) });
    points.push({ step, name: 'tokens_per_s', value: 900 + 40 * Math.sin(step / 20) });
    points.push({ step, name: 'grad_norm', value: 1 / Math.sqrt(step) });
    if (step % 50 === 0) points.push({ step, name: 'val_loss', value: loss + 0.1 });
  }
  await call('POST', `/runs/${runId}/metrics`, { points });
  await call('POST', `/runs/${runId}/end`, { status: 'succeeded', summary: { final_loss: 0.9, tokens: 4096000 } });

  // The many small adapters, each with a running canary, alongside the big one.
  const rolled = [];
  const small = pool(ADAPTERS, 4, async (i) => {
    const name = `bench-${String(i).padStart(3, '0')}`;
    const pushed = await push(name, 100000 + i, null);
    await evidence(name, pushed);
    await call('POST', `/adapters/${name}/rollouts`, { version: pushed.version, interval_secs: 3600 });
    rolled.push(name);
  });

  // The big adapter: VERSIONS versions, each with evidence, the newest from the run above.
  const big = (async () => {
    await evidence(BIG, await push(BIG, 1, null));
    await call('PUT', `/adapters/${BIG}/gate`, {
      required_suites: ['smoke@1'],
      rules: [{ suite: 'smoke@1', metric: 'accuracy', op: '>=', threshold: 0.5 }],
    });
    await pool(VERSIONS - 2, 2, async (k) => { await evidence(BIG, await push(BIG, k + 2, null)); });
    await evidence(BIG, await push(BIG, VERSIONS, runId));
  })();
  await Promise.all([small, big]);
  const latest = (await call('GET', `/adapters/${BIG}`)).latest_version;
  await call('POST', `/adapters/${BIG}/rollouts`, { version: latest, interval_secs: 3600 });
  rolled.sort();
  console.error(`seeded ${VERSIONS} versions of ${BIG} and ${ADAPTERS} adapters with rollouts in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  console.log(JSON.stringify({ big: BIG, versions: latest, rolled, run: runId, base: BASE }));
}

main().catch((e) => {
  console.error(`seed failed: ${e.message}`);
  process.exit(1);
});
