// The web console in a real browser (headless Chromium through playwright-core), against a
// running registry and gateway. Run by the end-to-end tests as `node tests/console/console.cjs`
// with NODE_PATH pointing at playwright-core and these variables:
//   CONSOLE_URL, GATEWAY_URL, GATEWAY_TOKEN, DEPLOYER_TOKEN, VIEWER_TOKEN, SCOPED_TOKEN,
//   ADAPTER, VERSION, STABLE_VERSION, RUN_ID, CHROMIUM, SCREENSHOT_DIR
// It expects ADAPTER with STABLE_VERSION stable and VERSION in a running canary whose gate
// passes, and RUN_ID a finished training run that produced VERSION. It saves a full-page
// screenshot of every page it visits, exits 0 when every check passed, and otherwise prints
// the failed check and exits 1 (with a screenshot of where it failed). Any console error,
// uncaught exception or Content-Security-Policy violation in the page fails it too.
'use strict';

const fs = require('fs');
const path = require('path');
const { chromium } = require('playwright-core');

const REQUIRED = ['CONSOLE_URL', 'GATEWAY_URL', 'GATEWAY_TOKEN', 'DEPLOYER_TOKEN', 'VIEWER_TOKEN',
  'SCOPED_TOKEN', 'ADAPTER', 'VERSION', 'STABLE_VERSION', 'RUN_ID', 'CHROMIUM', 'SCREENSHOT_DIR'];
const env = {};
for (const k of REQUIRED) {
  if (!process.env[k]) {
    console.error(`console test: environment variable ${k} is not set`);
    process.exit(1);
  }
  env[k] = process.env[k];
}
const BASE = env.CONSOLE_URL.replace(/\/+$/, '');
const UI = `${BASE}/ui/`;
const GATEWAY = env.GATEWAY_URL.replace(/\/+$/, '');
const ADAPTER = env.ADAPTER;
const VERSION = Number(env.VERSION);
const WAIT_MS = 15000;
const LIVE_WAIT_MS = 60000;
fs.mkdirSync(env.SCREENSHOT_DIR, { recursive: true });

class CheckFailed extends Error {}
function check(cond, what) {
  if (!cond) throw new CheckFailed(what);
}

// Browser problems: console errors, uncaught exceptions, CSP violations. A console error for
// an API answer of 4xx is expected (a 404 for an adapter without its own gate policy, an
// adapter a scoped token may not see): Chromium logs every failed fetch.
const problems = [];
function watch(page, label) {
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    const text = m.text();
    if (/^Failed to load resource: the server responded with a status of 4\d\d/.test(text)) return;
    problems.push(`${label}: console error: ${text}`);
  });
  page.on('pageerror', (e) => problems.push(`${label}: uncaught exception: ${e.message}`));
  page.on('crash', () => problems.push(`${label}: the page crashed`));
}
async function noProblems(page) {
  const csp = await page.evaluate(() => window.__cspViolations || []).catch(() => []);
  for (const v of csp) problems.push(`CSP violation: ${v}`);
  if (problems.length) throw new CheckFailed(`the page reported problems:\n  ${problems.join('\n  ')}`);
}

let shot = 0;
const shots = [];
async function screenshot(page, name) {
  shot += 1;
  const file = path.join(env.SCREENSHOT_DIR, `${String(shot).padStart(2, '0')}-${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  shots.push(file);
  return file;
}

/** Navigates inside the app and waits until the page has rendered (`main[data-ready]`). */
async function go(page, hash, expect) {
  await page.evaluate(() => { delete document.getElementById('main').dataset.ready; });
  await page.evaluate((h) => { location.hash = h; }, hash);
  await ready(page, expect);
}
async function ready(page, expect) {
  const sel = expect ? `main[data-ready="${expect}"]` : 'main[data-ready]';
  await page.waitForSelector(sel, { timeout: WAIT_MS });
}
async function clickAndWait(page, locator, expect) {
  await page.evaluate(() => { delete document.getElementById('main').dataset.ready; });
  await locator.click();
  await ready(page, expect);
}

async function login(page, token, who) {
  // A fresh document: nothing of the previous session's page state carries over.
  await page.goto('about:blank');
  await page.goto(`${UI}#/login`);
  await ready(page, 'login');
  const input = page.locator('input#token');
  check(await input.getAttribute('type') === 'password', 'the token field is a password field');
  check(await page.locator('label[for="token"]').count() === 1, 'the token field has a label');
  await input.fill(token);
  await clickAndWait(page, page.locator('#login-submit'), 'adapters');
  const name = await page.locator('#who-name').textContent();
  check(name && name.length > 0, `the header names who is signed in (${who})`);
  const stored = await page.evaluate(() => ({ s: sessionStorage.length, l: localStorage.length }));
  check(stored.s === 1 && stored.l === 0, `the token is kept in sessionStorage only (${JSON.stringify(stored)})`);
}

async function logout(page) {
  await page.evaluate(() => { delete document.getElementById('main').dataset.ready; });
  await page.locator('#logout').click();
  await ready(page, 'login');
  check(await page.evaluate(() => sessionStorage.length) === 0, 'log out clears the token');
}

async function text(page, selector) {
  const l = page.locator(selector);
  if (await l.count() === 0) return null;
  return (await l.first().textContent()).trim();
}
const count = (s) => (s === null ? 0 : Number(s.replace(/[^0-9.]/g, '')) || 0);

async function api(pathname, token) {
  const res = await fetch(`${BASE}/api/v1${pathname}`, { headers: { Authorization: `Bearer ${token}` } });
  const body = await res.json().catch(() => null);
  return { status: res.status, body };
}

// Chat completions through the gateway, varying `user` so both arms get traffic.
let nextUser = 0;
const arms = { canary: 0, stable: 0, other: 0, failed: 0 };
let lastFailure = '';
async function traffic(n) {
  const one = async () => {
    const user = `u${nextUser++}`;
    try {
      const res = await fetch(`${GATEWAY}/v1/chat/completions`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${env.GATEWAY_TOKEN}`, 'Content-Type': 'application/json' },
        body: JSON.stringify({ model: ADAPTER, messages: [{ role: 'user', content: 'hi' }], max_tokens: 4, user }),
      });
      await res.arrayBuffer();
      if (!res.ok) {
        arms.failed += 1;
        lastFailure = `HTTP ${res.status}`;
        return;
      }
      const arm = res.headers.get('x-loraops-arm');
      arms[arm in arms ? arm : 'other'] += 1;
    } catch (e) {
      arms.failed += 1;
      lastFailure = e.message;
    }
  };
  const jobs = [];
  for (let i = 0; i < n; i++) jobs.push(one());
  await Promise.all(jobs);
}

async function main() {
  const browser = await chromium.launch({ executablePath: env.CHROMIUM, headless: true });
  let page = null;
  let step = 'start';
  const run = async (name, fn) => {
    step = name;
    await fn();
    await noProblems(page);
    console.log(`ok - ${name}`);
  };
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    await context.addInitScript(() => {
      window.__cspViolations = [];
      document.addEventListener('securitypolicyviolation', (e) => {
        window.__cspViolations.push(`${e.violatedDirective} blocked ${e.blockedURI || 'inline'} (${e.sourceFile || ''}:${e.lineNumber || ''})`);
      });
    });
    page = await context.newPage();
    watch(page, 'desktop');

    await run('the console loads and asks for a token', async () => {
      await page.goto(UI);
      await ready(page, 'login');
      check(page.url().includes('#/login'), `an anonymous visit lands on the login page (${page.url()})`);
      check(!(await page.locator('#logout').isVisible()), 'no Log out button before signing in');
      await screenshot(page, 'login');
    });

    await run('a deployer signs in', async () => {
      await login(page, env.DEPLOYER_TOKEN, 'deployer');
      await screenshot(page, 'adapters');
    });

    await run('the search box finds the adapter', async () => {
      const rows = page.locator('#adapters-table tbody tr');
      const total = await rows.count();
      check(total >= 1, 'the adapters table has rows');
      await page.locator('#adapter-filter').fill(ADAPTER);
      const visible = page.locator('#adapters-table tbody tr:not([hidden])');
      const names = await visible.locator('th a').allTextContents();
      check(names.includes(ADAPTER), `${ADAPTER} is listed after filtering (${names.join(', ')})`);
      check(names.every((n) => n.toLowerCase().includes(ADAPTER.toLowerCase())), `the filter hides other names (${names.join(', ')})`);
      const rollout = await visible.filter({ has: page.locator(`th a:text-is("${ADAPTER}")`) }).locator('.badge').first().textContent();
      check(/running/.test(rollout), `the rollout column shows the running canary (${rollout})`);
      await screenshot(page, 'adapters-search');
      await clickAndWait(page, page.locator(`#adapters-table th a:text-is("${ADAPTER}")`), 'adapter');
      check((await text(page, 'h1')) === ADAPTER, 'the adapter page is titled by its name');
      await screenshot(page, 'adapter');
    });

    await run('the version page shows evidence and a passing gate report', async () => {
      await clickAndWait(page, page.locator(`table.versions a[href="#/adapters/${ADAPTER}/versions/${VERSION}"]`).first(), 'version');
      check(page.url().endsWith(`#/adapters/${ADAPTER}/versions/${VERSION}`), `the version page has its own URL (${page.url()})`);
      const evidence = await page.locator('[data-testid="evidence-row"]').count();
      check(evidence >= 1, `the evidence table lists the evidence (${evidence} rows)`);
      const suite = await text(page, '[data-testid="evidence-row"] th');
      check(suite && suite.length > 0, 'an evidence row names its suite');
      const rules = page.locator('[data-testid="gate-rule"]');
      const n = await rules.count();
      check(n >= 1, `the gate report has a row per rule (${n})`);
      for (let i = 0; i < n; i++) {
        const outcome = await rules.nth(i).getAttribute('data-outcome');
        const shown = (await rules.nth(i).locator('.badge').textContent()).trim();
        check(outcome === 'pass' && shown === 'pass', `gate rule ${i + 1} shows pass (${outcome}, ${shown})`);
      }
      check(await page.locator('[data-testid="gate-verdict"]').getAttribute('data-outcome') === 'pass', 'the gate verdict is pass');
      await screenshot(page, 'version');
    });

    await run('the run page shows the status and the loss chart', async () => {
      const link = page.locator(`a[href="#/runs/${env.RUN_ID}"]`).first();
      check(await link.count() === 1, 'the version links to the training run that produced it');
      await clickAndWait(page, link, 'run');
      const status = await page.locator('[data-testid="run-status"]').getAttribute('data-status');
      check(['succeeded', 'failed', 'interrupted'].includes(status), `the run shows a finished status (${status})`);
      check(/succeeded|failed|interrupted/.test(await text(page, '[data-testid="run-status"]')), 'the status is written out');
      const canvas = page.locator('[data-chart="loss"] canvas');
      check(await canvas.count() === 1, 'the loss chart rendered a uPlot canvas');
      const box = await canvas.boundingBox();
      check(box && box.width > 100 && box.height > 50, `the loss chart has a size (${JSON.stringify(box)})`);
      check(await page.locator('[data-chart="lr"] canvas').count() === 1, 'the learning-rate chart rendered');
      await screenshot(page, 'run');
    });

    await run('the rollouts overview lists the rollout', async () => {
      await clickAndWait(page, page.locator('nav a[data-nav="rollouts"]'), 'rollouts');
      const row = page.locator('table.rollouts tbody tr').filter({ has: page.locator(`th a:text-is("${ADAPTER}")`) });
      check(await row.count() === 1, `${ADAPTER} is in the rollouts overview`);
      await screenshot(page, 'rollouts');
      await clickAndWait(page, row.locator(`a[href="#/adapters/${ADAPTER}/rollout"]`).first(), 'rollout');
      const state = await page.locator('[data-testid="rollout-state"]').getAttribute('data-state');
      check(state === 'running', `the rollout page shows state running (${state})`);
      await screenshot(page, 'rollout');
    });

    await run('the rollout page updates live while the gateway serves traffic', async () => {
      await page.evaluate(() => { window.__sameDocument = true; });
      const before = count(await text(page, '[data-testid="arm-canary-requests"]'));
      const deadline = Date.now() + LIVE_WAIT_MS;
      let now = before;
      while (Date.now() < deadline) {
        await traffic(16);
        await page.waitForTimeout(500);
        now = count(await text(page, '[data-testid="arm-canary-requests"]'));
        if (now > before) break;
      }
      console.log(`  gateway answers by arm: ${JSON.stringify(arms)}${lastFailure ? `, last failure: ${lastFailure}` : ''}`);
      check(arms.canary + arms.stable > 0, `the gateway served the adapter (${JSON.stringify(arms)} ${lastFailure})`);
      check(now > before, `the canary request count grew from ${before} within ${LIVE_WAIT_MS / 1000} s (now ${now})`);
      check(await page.evaluate(() => window.__sameDocument === true), 'the page updated without a reload');
      check(await page.locator('[data-chart="requests"] canvas').count() === 1, 'the per-arm charts rendered');
      check(await page.locator('[data-testid="arm-stable-requests"]').count() === 1, 'the stable arm has its row');
      await screenshot(page, 'rollout-live');
    });

    await run('pause asks for confirmation, and cancel changes nothing', async () => {
      const pause = page.locator('button[data-action="pause"]');
      check(await pause.count() === 1, 'a deployer sees Pause on a running rollout');
      check(await page.locator('button[data-action="resume"]').count() === 0, 'Resume is not offered while running');
      await pause.click();
      const dialog = page.locator('dialog#confirm');
      await dialog.waitFor({ state: 'visible', timeout: WAIT_MS });
      await page.locator('#confirm-cancel').click();
      await dialog.waitFor({ state: 'hidden', timeout: WAIT_MS });
      const r = await api(`/adapters/${ADAPTER}/rollouts/current`, env.DEPLOYER_TOKEN);
      check(r.body && r.body.rollout.state === 'running', `cancel leaves the rollout running (${r.body && r.body.rollout.state})`);
    });

    await run('pause, confirmed, pauses the rollout', async () => {
      await page.locator('button[data-action="pause"]').click();
      const dialog = page.locator('dialog#confirm');
      await dialog.waitFor({ state: 'visible', timeout: WAIT_MS });
      check(/pause/i.test(await dialog.locator('h2').textContent()), 'the dialog says what it confirms');
      await screenshot(page, 'rollout-confirm');
      await page.locator('#confirm-ok').click();
      await page.waitForSelector('[data-testid="rollout-state"][data-state="paused"]', { timeout: WAIT_MS });
      await page.waitForSelector('[data-testid="action-result"]', { timeout: WAIT_MS });
      check(await page.locator('button[data-action="resume"]').count() === 1, 'Resume is offered once paused');
      check(await page.locator('button[data-action="pause"]').count() === 0, 'Pause is no longer offered');
      const r = await api(`/adapters/${ADAPTER}/rollouts/current`, env.DEPLOYER_TOKEN);
      check(r.status === 200 && r.body.rollout.state === 'paused', `the API says paused (${r.status} ${r.body && r.body.rollout.state})`);
      await screenshot(page, 'rollout-paused');
    });

    await run('log out', async () => {
      await logout(page);
      check(/logged out/i.test(await text(page, '[data-testid="login-reason"]') || ''), 'the login page says why');
      await screenshot(page, 'logged-out');
    });

    await run('a viewer sees no action buttons', async () => {
      await login(page, env.VIEWER_TOKEN, 'viewer');
      await go(page, `#/adapters/${ADAPTER}/rollout`, 'rollout');
      const actions = 'button[data-action], #ro-actions button';
      check(await page.locator(actions).count() === 0, 'no action button on the rollout page');
      for (const label of ['Pause', 'Resume', 'Approve', 'Promote', 'Abort']) {
        check(await page.getByRole('button', { name: label, exact: true }).count() === 0, `no ${label} button for a viewer`);
      }
      check(await page.locator('[data-testid="rollout-state"]').getAttribute('data-state') === 'paused', 'the viewer sees the state');
      await screenshot(page, 'viewer-rollout');
      await go(page, `#/adapters/${ADAPTER}/versions/${VERSION}`, 'version');
      check(await page.locator(actions).count() === 0, 'no action button on the version page');
      check(await page.getByRole('button', { name: 'Start canary' }).count() === 0, 'no Start canary button for a viewer');
      await screenshot(page, 'viewer-version');
      await logout(page);
    });

    await run('a token scoped to another adapter does not see it', async () => {
      await login(page, env.SCOPED_TOKEN, 'scoped viewer');
      const listed = await page.locator(`#adapters-table tbody tr[data-name="${ADAPTER.toLowerCase()}"]`).count();
      check(listed === 0, `${ADAPTER} is not listed for the scoped token`);
      await screenshot(page, 'scoped-adapters');
      await go(page, `#/adapters/${ADAPTER}`);
      const h1 = await text(page, 'h1');
      const msg = await text(page, '[data-testid="page-error"]');
      check(/not found/i.test(h1 || '') && /not found/i.test(msg || ''), `the adapter page says not found (${h1}: ${msg})`);
      await screenshot(page, 'scoped-not-found');
    });

    await run('an invalid token sends the user back to login with the reason', async () => {
      await page.evaluate(() => sessionStorage.setItem('loraops.token', 'not-a-valid-token'));
      await page.goto(`${UI}#/rollouts`);
      await ready(page, 'login');
      const reason = await text(page, '[data-testid="login-reason"]');
      check(reason && reason.length > 0, 'the login page gives the reason of the 401');
      check(await page.evaluate(() => sessionStorage.length) === 0, 'the rejected token is forgotten');
      await screenshot(page, 'unauthorized');
    });

    await run('the home page fits a narrow screen', async () => {
      await page.setViewportSize({ width: 390, height: 844 });
      await login(page, env.DEPLOYER_TOKEN, 'deployer, narrow');
      const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      check(overflow <= 0, `nothing overflows horizontally at 390 px (by ${overflow} px)`);
      await screenshot(page, 'narrow-adapters');
      await go(page, `#/adapters/${ADAPTER}/rollout`, 'rollout');
      const overflow2 = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      check(overflow2 <= 0, `the rollout page does not overflow at 390 px (by ${overflow2} px)`);
      await screenshot(page, 'narrow-rollout');
    });

    await browser.close();
    console.log(`console test passed; screenshots in ${env.SCREENSHOT_DIR}`);
    process.exit(0);
  } catch (e) {
    const what = e instanceof CheckFailed ? e.message : `${e.name}: ${e.message}`;
    console.error(`FAILED: ${step}: ${what}`);
    if (problems.length && !(e instanceof CheckFailed && e.message.startsWith('the page reported'))) {
      console.error(`also reported by the page:\n  ${problems.join('\n  ')}`);
    }
    if (page) {
      try {
        const file = await screenshot(page, 'FAILED');
        console.error(`screenshot of the failure: ${file}`);
      } catch (err) {
        console.error(`no screenshot of the failure: ${err.message}`);
      }
    }
    await browser.close().catch(() => {});
    process.exit(1);
  }
}

main().catch((e) => {
  console.error(`FAILED: ${e.stack || e}`);
  process.exit(1);
});
