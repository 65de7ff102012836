// Console page timings in headless Chromium: for each page, the time from navigation start to
// the page's main content being rendered and painted (the app sets `data-ready` on <main> once
// a page rendered, and `data-painted-ms` at the first frame after it), over LOADS full page
// loads (reloads of one tab) and LOADS in-app navigations after a warm-up; prints a markdown
// table.
//
//   NODE_PATH=… node bench/console/timing.cjs REGISTRY_URL TOKEN SEED_JSON [LOADS]
// Environment: CHROMIUM (default /usr/bin/chromium), BENCH_GOAL_MS (default 200).
'use strict';

const { chromium } = require('playwright-core');

const [registry, token, seedJson, loadsArg] = process.argv.slice(2);
const seed = JSON.parse(seedJson);
const LOADS = Number(loadsArg || 10);
const GOAL = Number(process.env.BENCH_GOAL_MS || 200);
const UI = `${registry.replace(/\/+$/, '')}/ui/`;

const rolled = seed.rolled.filter((n) => n !== seed.big);
const PAGES = [
  ['adapters home', '#/adapters', 'adapters', `${rolled.length + 1} adapters, ${rolled.length + 1} rollouts`],
  ['adapter, 1,000 versions', `#/adapters/${seed.big}`, 'adapter', `${seed.versions} versions, newest 100 shown`],
  ['version', `#/adapters/${seed.big}/versions/${seed.versions}`, 'version', 'evidence, gate report, lineage'],
  ['rollouts overview', '#/rollouts', 'rollouts', `${rolled.length + 1} rollouts`],
  ['rollout', `#/adapters/${rolled[0]}/rollout`, 'rollout', 'charts, analysis, audit trail'],
  ['run', `#/runs/${seed.run}`, 'run', '1,000 steps of 5 curves'],
  ['training runs', '#/runs', 'runs', ''],
  ['base model', `#/base-models/${seed.base}`, 'base-model', `${rolled.length + 1} adapters on it`],
];

function quantile(sorted, q) {
  const i = (sorted.length - 1) * q;
  const lo = Math.floor(i);
  const hi = Math.ceil(i);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (i - lo);
}

async function state(page, hash, expect) {
  const r = await page.evaluate(() => {
    const m = document.getElementById('main');
    return { ready: m.dataset.ready, readyMs: Number(m.dataset.readyMs), paintedMs: Number(m.dataset.paintedMs),
      error: (document.querySelector('[data-testid="page-error"]') || {}).textContent || null };
  });
  if (r.ready !== expect || r.error) throw new Error(`${hash} rendered ${r.ready}${r.error ? `: ${r.error}` : ''}`);
  return r;
}

/** A full page load (a reload of the tab: new document, every script and API call again). */
async function fullLoad(page, hash, expect) {
  await page.reload({ waitUntil: 'commit' });
  await page.waitForSelector('main[data-painted-ms]', { timeout: 30000 });
  return state(page, hash, expect);
}

/** In-app navigation: from another page to this one by its link (a hash change). */
async function inApp(page, hash, expect) {
  const [from, fromName] = hash === '#/runs' ? ['#/rollouts', 'rollouts'] : ['#/runs', 'runs'];
  await page.evaluate((h) => { location.hash = h; }, from);
  await page.waitForSelector(`main[data-ready="${fromName}"][data-painted-ms]`, { timeout: 30000 });
  const t0 = await page.evaluate((h) => { const t = performance.now(); location.hash = h; return t; }, hash);
  await page.waitForSelector(`main[data-ready="${expect}"][data-painted-ms]`, { timeout: 30000 });
  const r = await state(page, hash, expect);
  return { readyMs: r.readyMs - t0, paintedMs: r.paintedMs - t0 };
}

/** Chat requests for the rollout page's adapter, so its charts have points to draw. */
async function traffic(gateway, model, n) {
  let ok = 0;
  const one = async (i) => {
    try {
      const res = await fetch(`${gateway.replace(/\/+$/, '')}/v1/chat/completions`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
        body: JSON.stringify({ model, messages: [{ role: 'user', content: 'hi' }], max_tokens: 4, user: `u${i}` }),
      });
      await res.arrayBuffer();
      if (res.ok) ok += 1;
    } catch { /* counted as not ok */ }
  };
  for (let i = 0; i < n; i += 8) await Promise.all(Array.from({ length: Math.min(8, n - i) }, (_, k) => one(i + k)));
  console.error(`sent ${n} chat requests for ${model}: ${ok} answered`);
}

async function main() {
  if (process.env.BENCH_GATEWAY_URL) {
    await traffic(process.env.BENCH_GATEWAY_URL, rolled[0], Number(process.env.BENCH_REQUESTS || 200));
    await new Promise((r) => setTimeout(r, 4000)); // the gateway's next reports
  }
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium' });
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  await context.addInitScript((t) => sessionStorage.setItem('loraops.token', t), token);
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  const rows = [];
  let failed = false;
  const stats = (xs) => {
    const s = xs.slice().sort((a, b) => a - b);
    return { med: quantile(s, 0.5), p95: quantile(s, 0.95) };
  };
  for (const [label, hash, expect, what] of PAGES) {
    // Warm-up: the tab on this page, caches filled, the registry's first queries done.
    await page.goto(UI + hash);
    await page.waitForSelector(`main[data-ready="${expect}"][data-painted-ms]`, { timeout: 30000 });
    await fullLoad(page, hash, expect);
    const full = [];
    const ready = [];
    for (let i = 0; i < LOADS; i++) {
      const r = await fullLoad(page, hash, expect);
      full.push(r.paintedMs);
      ready.push(r.readyMs);
    }
    const nav = [];
    for (let i = 0; i < LOADS; i++) nav.push((await inApp(page, hash, expect)).paintedMs);
    if (errors.length) throw new Error(`${hash}: ${errors.join('; ')}`);
    const f = stats(full);
    const n = stats(nav);
    const pass = f.p95 <= GOAL;
    failed ||= !pass;
    rows.push(`| ${label} | ${what} | ${stats(ready).med.toFixed(0)} | ${f.med.toFixed(0)} | ${f.p95.toFixed(0)} | ${n.med.toFixed(0)} | ${n.p95.toFixed(0)} | ${GOAL} | ${pass ? 'pass' : 'FAIL'} |`);
    console.error(`${label}: load median ${f.med.toFixed(0)} ms, p95 ${f.p95.toFixed(0)} ms; in-app median ${n.med.toFixed(0)} ms, p95 ${n.p95.toFixed(0)} ms`);
  }
  await browser.close();
  const cpus = require('os').cpus().length;
  const loadAvg = require('os').loadavg()[0].toFixed(2);
  console.log(`Console pages in headless Chromium at 1280×800 (${cpus} CPUs, load average ${loadAvg} at the end), ${LOADS} of each after a warm-up.`);
  console.log('Load: a full page load (reload: HTML, scripts, /me and the page\'s API calls), ms from navigation start to the');
  console.log('first frame painted after the page rendered ("ready": rendered into the DOM). In-app: following a link from');
  console.log('another console page, ms from the hash change to that frame. Pass: load p95 within the goal.\n');
  console.log('| page | data | load ready median | load median | load p95 | in-app median | in-app p95 | goal | result |');
  console.log('|---|---|---:|---:|---:|---:|---:|---:|---|');
  for (const r of rows) console.log(r);
  process.exit(failed && process.env.BENCH_CHECK ? 1 : 0);
}

main().catch((e) => {
  console.error(`timing failed: ${e.message}`);
  process.exit(1);
});
