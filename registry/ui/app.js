// The loraops console: a single-page app over the registry's /api/v1, rendered in the browser.
// Plain modules, no build step; charts by the vendored uPlot (its IIFE build, loaded on the
// first page with a chart).
//
// Every string from the API reaches the DOM through `html` (escaped) or textContent; nothing
// is evaluated, no inline style or script is written (the page's Content-Security-Policy
// forbids both). Each page sets `data-ready` on <main> once its main content is rendered.

const TOKEN_KEY = 'loraops.token';
const API = new URL('../api/v1', document.baseURI).pathname;
const VERSIONS_PAGE = 100;
const RUN_POLL_MS = 2000;
const ROLLOUT_POLL_MS = 2500;
const ACTIVE_STATES = new Set(['shadowing', 'running', 'awaiting_approval', 'paused']);

const main = document.getElementById('main');
const announcer = document.getElementById('announce');

// ---------------------------------------------------------------------------------------------
// Escaping: html`…${x}…` escapes every interpolated value unless it is itself html (or raw).

class Html {
  constructor(s) { this.s = s; }
  toString() { return this.s; }
}
const ESC = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ESC[c]);
const raw = (s) => new Html(s);
function part(v) {
  if (v instanceof Html) return v.s;
  if (Array.isArray(v)) return v.map(part).join('');
  if (v === null || v === undefined || v === false) return '';
  return esc(v);
}
function html(strings, ...vals) {
  let out = strings[0];
  for (let i = 0; i < vals.length; i++) out += part(vals[i]) + strings[i + 1];
  return new Html(out);
}

// ---------------------------------------------------------------------------------------------
// The API.

class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

let me = null; // GET /me of the current token
let loginReason = '';
let returnTo = '';

async function api(path, { method = 'GET', body, signal } = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = { Accept: 'application/json' };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let res;
  try {
    res = await fetch(API + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: 'no-store',
      credentials: 'omit',
    });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'unreachable', `The registry could not be reached (${e.message}).`);
  }
  const text = await res.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch { data = null; }
  }
  if (res.ok) return data;
  const err = (data && data.error) || {};
  const e = new ApiError(res.status, err.code || `http_${res.status}`,
    err.message || `${res.status} ${res.statusText}`.trim(), err.details);
  if (res.status === 401) signOut(`Signed out: ${e.message}`);
  throw e;
}

/** A promise's outcome without throwing: {ok, value} or {ok: false, error}. */
function settle(p) {
  return p.then((value) => ({ ok: true, value }), (error) => ({ ok: false, error }));
}

const enc = encodeURIComponent;

// ---------------------------------------------------------------------------------------------
// Formatting.

const pad = (n) => String(n).padStart(2, '0');
function fmtTime(iso) {
  if (!iso) return html`<span class="muted">—</span>`;
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return html`${iso}`;
  const s = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} `
    + `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  return html`<time datetime="${iso}" title="${iso}">${s}</time>`;
}
function fmtClock(secs) {
  const d = new Date(secs * 1000);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}
function fmtBytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let x = Number(n);
  while (x >= 1024 && i < units.length - 1) { x /= 1024; i++; }
  return i === 0 ? `${x} B` : `${x.toFixed(x < 10 ? 2 : 1)} ${units[i]}`;
}
function fmtNum(x, digits = 4) {
  if (x === null || x === undefined || x === '') return '—';
  if (typeof x !== 'number') return String(x);
  if (Number.isInteger(x)) return x.toLocaleString('en-US');
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return x.toExponential(2);
  return String(Number(x.toPrecision(digits)));
}
const fmtPct = (x, digits = 1) => (x === null || x === undefined ? '—' : `${x.toFixed(digits)} %`);
const fmtRate = (x) => (x === null || x === undefined ? '—' : `${(x * 100).toFixed(2)} %`);
const fmtMs = (x) => (x === null || x === undefined ? '—' : `${x < 10 ? x.toFixed(1) : Math.round(x)} ms`);
function fmtValue(v) {
  if (v === null || v === undefined) return '—';
  if (typeof v === 'number') return fmtNum(v, 6);
  if (typeof v === 'string' || typeof v === 'boolean') return String(v);
  return JSON.stringify(v);
}
function digest(d, len = 12) {
  if (!d) return html`<span class="muted">—</span>`;
  const i = d.indexOf(':');
  const short = i >= 0 && d.length > i + 1 + len ? `${d.slice(0, i + 1 + len)}…` : d;
  return html`<code class="digest" title="${d}">${short}</code>`;
}
const shortId = (id) => (id ? String(id).slice(0, 8) : '');
function badge(state, label) {
  const cls = String(state || 'unknown').toLowerCase().replace(/[^a-z0-9_]/g, '_');
  return html`<span class="badge badge-${cls}">${label || String(state || 'unknown').replace(/_/g, ' ')}</span>`;
}
const dash = html`<span class="muted">—</span>`;
const vlink = (name, v) => html`<a href="#/adapters/${enc(name)}/versions/${v}">v${v}</a>`;
const alink = (name) => html`<a href="#/adapters/${enc(name)}">${name}</a>`;
const runLink = (id) => html`<a href="#/runs/${enc(id)}"><code>${shortId(id)}</code></a>`;

function table(caption, headers, rows, { cls = '', captionVisible = false, empty = 'None.' } = {}) {
  if (!rows.length) return html`<p class="muted empty">${empty}</p>`;
  return html`<div class="table-wrap"><table class="${cls}">
<caption class="${captionVisible ? '' : 'sr-only'}">${caption}</caption>
<thead><tr>${headers.map((h) => html`<th scope="col">${h}</th>`)}</tr></thead>
<tbody>${rows}</tbody></table></div>`;
}

/** A definition list from [term, html|string, wide?] items; empty values are left out. */
function dl(pairs) {
  return html`<dl class="facts">${pairs.filter(([, v]) => v !== undefined && v !== null && v !== '')
    .map(([k, v, wide]) => html`<div class="${wide ? 'wide' : ''}"><dt>${k}</dt><dd>${v}</dd></div>`)}</dl>`;
}

/** Nested objects flattened to `a.b.c` rows. */
function flatten(obj, prefix = '', out = []) {
  if (obj && typeof obj === 'object' && !Array.isArray(obj)) {
    const keys = Object.keys(obj);
    if (!keys.length && prefix) out.push([prefix, '{}']);
    for (const k of keys) flatten(obj[k], prefix ? `${prefix}.${k}` : k, out);
  } else {
    out.push([prefix, fmtValue(obj)]);
  }
  return out;
}
function kvTable(caption, obj, empty = 'None.') {
  const rows = flatten(obj || {}).map(([k, v]) => html`<tr><th scope="row"><code>${k}</code></th><td>${v}</td></tr>`);
  if (!rows.length) return html`<p class="muted empty">${empty}</p>`;
  return html`<div class="table-wrap"><table class="kv"><caption class="sr-only">${caption}</caption>
<thead><tr><th scope="col">Name</th><th scope="col">Value</th></tr></thead><tbody>${rows}</tbody></table></div>`;
}

function say(msg) {
  announcer.textContent = '';
  // A fresh node each time makes screen readers announce a repeated message too.
  setTimeout(() => { announcer.textContent = msg; }, 30);
}

// ---------------------------------------------------------------------------------------------
// Session.

const canDeploy = () => !!me && (me.roles || []).some((r) => r === 'deployer' || r === 'admin');

/** Forgets the token and shows the login page with `reason`; after a 401 the next sign-in
 * returns to the page the user was on. */
function signOut(reason, remember = true) {
  sessionStorage.removeItem(TOKEN_KEY);
  me = null;
  loginReason = reason || '';
  const h = location.hash;
  returnTo = remember && h && !h.startsWith('#/login') ? h : '';
  if (location.hash === '#/login') route();
  else location.hash = '#/login';
}

function renderHeader() {
  const nav = document.getElementById('nav');
  const who = document.getElementById('who');
  const signedIn = !!me;
  nav.hidden = !signedIn;
  who.hidden = !signedIn;
  if (signedIn) {
    const roles = (me.roles || []).join(', ') || 'no roles';
    const scope = me.adapters ? ` · adapters ${me.adapters.join(', ')}` : '';
    const name = document.getElementById('who-name');
    name.textContent = `${me.sub} (${roles}${scope})`;
    name.title = name.textContent;
  }
  const section = (location.hash.match(/^#\/([a-z-]+)/) || [])[1] || 'adapters';
  const active = section === 'base-models' ? 'adapters' : section;
  for (const a of nav.querySelectorAll('a[data-nav]')) {
    if (a.dataset.nav === active) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

document.getElementById('logout').addEventListener('click', () => {
  signOut('You have logged out.', false);
});

// ---------------------------------------------------------------------------------------------
// Confirmation dialog (a modal <dialog>: focus stays in it, Escape cancels).

const dialog = document.getElementById('confirm');
function confirmAction({ title, body, confirmLabel = 'Confirm', danger = false }) {
  document.getElementById('confirm-title').textContent = title;
  document.getElementById('confirm-body').innerHTML = part(body);
  const ok = document.getElementById('confirm-ok');
  const cancel = document.getElementById('confirm-cancel');
  ok.textContent = confirmLabel;
  ok.classList.toggle('danger', danger);
  return new Promise((resolve) => {
    const done = (answer) => {
      ok.removeEventListener('click', onOk);
      cancel.removeEventListener('click', onCancel);
      dialog.removeEventListener('close', onClose);
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    const onOk = () => done(true);
    const onCancel = () => done(false);
    const onClose = () => done(false);
    ok.addEventListener('click', onOk);
    cancel.addEventListener('click', onCancel);
    dialog.addEventListener('close', onClose);
    dialog.showModal();
    cancel.focus();
  });
}

// ---------------------------------------------------------------------------------------------
// Pages: each runs in a context that dies when the user navigates away (its fetches are
// aborted, its polls and charts stopped).

class Page {
  constructor() {
    this.controller = new AbortController();
    this.signal = this.controller.signal;
    this.dead = false;
    this.timers = new Set();
    this.charts = [];
    this.cleanups = [];
  }
  api(path, opts = {}) { return api(path, { ...opts, signal: this.signal }); }
  render(h, title) {
    if (this.dead) return;
    main.innerHTML = part(h);
    if (title) document.title = `${title} · loraops`;
  }
  /** Runs `fn` every `ms` (never two at once, skipped while the tab is hidden); returns a stop function. */
  every(ms, fn) {
    let stopped = false;
    let id = 0;
    const tick = async () => {
      this.timers.delete(id);
      if (this.dead || stopped) return;
      if (!document.hidden) {
        try { await fn(); } catch (e) { if (!this.dead && e.name !== 'AbortError') this.onPollError(e); }
      }
      if (!this.dead && !stopped) { id = setTimeout(tick, ms); this.timers.add(id); }
    };
    id = setTimeout(tick, ms);
    this.timers.add(id);
    return () => { stopped = true; clearTimeout(id); this.timers.delete(id); };
  }
  onPollError(e) {
    const s = main.querySelector('[data-live-status]');
    if (s) s.textContent = `Live updates failing: ${e.message}; retrying.`;
  }
  close() {
    this.dead = true;
    this.controller.abort();
    for (const t of this.timers) clearTimeout(t);
    for (const c of this.charts) c.destroy();
    for (const f of this.cleanups) f();
  }
}

let current = null;
let firstRoute = true;

const ROUTES = [
  [/^\/adapters$/, 'adapters', pageAdapters],
  [/^\/adapters\/([^/]+)$/, 'adapter', pageAdapter],
  [/^\/adapters\/([^/]+)\/versions\/(\d+)$/, 'version', pageVersion],
  [/^\/adapters\/([^/]+)\/rollout$/, 'rollout', pageRollout],
  [/^\/base-models\/([^/]+)$/, 'base-model', pageBaseModel],
  [/^\/rollouts$/, 'rollouts', pageRollouts],
  [/^\/runs$/, 'runs', pageRuns],
  [/^\/runs\/([^/]+)$/, 'run', pageRun],
];

async function route() {
  if (current) current.close();
  const page = new Page();
  current = page;
  delete main.dataset.ready;
  delete main.dataset.readyMs;
  delete main.dataset.paintedMs;
  if (dialog.open) dialog.close();

  const hash = location.hash.replace(/^#/, '') || '/';
  const [path, query = ''] = hash.split('?');
  const params = new URLSearchParams(query);

  if (path === '/' || path === '') {
    location.replace('#/adapters');
    return;
  }
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (path === '/login' || !token) {
    if (path !== '/login') {
      returnTo = location.hash;
      location.replace('#/login');
      return;
    }
    me = token ? me : null;
    renderHeader();
    pageLogin(page);
    ready(page, 'login');
    return;
  }

  let name = 'not-found';
  let handler = null;
  let args = [];
  for (const [re, n, h] of ROUTES) {
    const m = path.match(re);
    if (m) {
      name = n;
      handler = h;
      args = m.slice(1).map((s) => { try { return decodeURIComponent(s); } catch { return s; } });
      break;
    }
  }
  try {
    // Who the token is, fetched alongside the page's own data; pages that show actions wait
    // for it (page.whoami) before rendering.
    page.whoami = me ? Promise.resolve(me) : page.api('/me').then((m) => { me = m; return m; });
    page.whoami.then(() => { if (!page.dead) renderHeader(); }, () => {});
    if (!handler) {
      await page.whoami;
      throw new ApiError(404, 'not_found', `There is no page at ${location.hash}.`);
    }
    await Promise.all([page.whoami, handler(page, ...args, params)]);
  } catch (e) {
    if (page.dead || e.name === 'AbortError') return;
    renderError(page, e);
  }
  if (page.dead) return;
  ready(page, name);
  // Chart pages opened later need uPlot: parse it while the user reads this one.
  if (!uplotLoading && !window.uPlot && window.requestIdleCallback) {
    requestIdleCallback(() => { loadUPlot().catch(() => {}); }, { timeout: 3000 });
  }
  if (!firstRoute) {
    main.focus({ preventScroll: true });
    window.scrollTo(0, 0);
  }
  firstRoute = false;
}

/** Marks the page rendered: `data-ready` (its name), `data-ready-ms` (ms since navigation
 * start) and, at the first frame after it, `data-painted-ms`. */
function ready(page, name) {
  if (page.dead) return;
  main.dataset.ready = name;
  main.dataset.readyMs = performance.now().toFixed(1);
  requestAnimationFrame(() => setTimeout(() => {
    if (!page.dead) main.dataset.paintedMs = performance.now().toFixed(1);
  }, 0));
}

function renderError(page, e) {
  let title = 'Something went wrong';
  if (e instanceof ApiError) {
    if (e.status === 404) title = 'Not found';
    else if (e.status === 403) title = 'Not allowed';
    else if (e.status === 0) title = 'Registry unreachable';
  }
  page.render(html`<h1>${title}</h1>
<p class="error" role="alert" data-testid="page-error">${e.message}</p>
<p><a href="#/adapters">Back to the adapters</a></p>`, title);
}

window.addEventListener('hashchange', route);

// ---------------------------------------------------------------------------------------------
// Login.

function pageLogin(page) {
  const reason = loginReason;
  page.render(html`<section class="login" aria-labelledby="login-title">
<h1 id="login-title">Sign in</h1>
${reason ? html`<p class="notice" role="alert" data-testid="login-reason">${reason}</p>` : ''}
<form id="login-form" novalidate>
  <label for="token">API token</label>
  <input id="token" name="token" type="password" autocomplete="off" spellcheck="false"
    aria-describedby="token-hint" required>
  <p id="token-hint" class="hint">A JWT, e.g. from <code>loraops token issue --sub NAME --role viewer</code>.
  It is kept in this browser tab only and forgotten when the tab closes.</p>
  <p id="login-error" class="error" role="alert" hidden></p>
  <button type="submit" id="login-submit">Sign in</button>
</form></section>`, 'Sign in');
  const form = document.getElementById('login-form');
  const input = document.getElementById('token');
  const error = document.getElementById('login-error');
  input.focus();
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const token = input.value.trim().replace(/^Bearer\s+/i, '');
    if (!token) {
      error.textContent = 'Enter a token.';
      error.hidden = false;
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    error.hidden = true;
    try {
      // Not page.api: a 401 here is answered on this form, not by a redirect.
      const res = await fetch(`${API}/me`, {
        headers: { Authorization: `Bearer ${token}`, Accept: 'application/json' },
        cache: 'no-store',
        credentials: 'omit',
      });
      const body = await res.json().catch(() => null);
      if (!res.ok) throw new ApiError(res.status, '', (body && body.error && body.error.message) || `${res.status} ${res.statusText}`);
      me = body;
    } catch (e) {
      sessionStorage.removeItem(TOKEN_KEY);
      me = null;
      error.textContent = `Sign-in failed: ${e.message}`;
      error.hidden = false;
      input.select();
      return;
    }
    loginReason = '';
    const to = returnTo && !returnTo.startsWith('#/login') ? returnTo : '#/adapters';
    returnTo = '';
    location.hash = to;
  });
}

// ---------------------------------------------------------------------------------------------
// Adapters (home).

function rolloutCell(r) {
  if (!r) return dash;
  return html`<a href="#/adapters/${enc(r.adapter)}/rollout" class="rollout-link">${badge(r.state)}
<span class="muted">v${r.version}${ACTIVE_STATES.has(r.state) ? html` · ${fmtNum(r.weight)} %` : ''}</span></a>`;
}

function adapterRows(items, rollouts) {
  return items.map((a) => html`<tr data-name="${a.name.toLowerCase()}">
<th scope="row">${alink(a.name)}</th>
<td><a href="#/base-models/${enc(a.base_model)}">${a.base_model}</a></td>
<td>${a.latest_version ? vlink(a.name, a.latest_version) : dash}</td>
<td>${a.stable_version ? vlink(a.name, a.stable_version) : dash}</td>
<td>${rolloutCell(rollouts.get(a.name))}</td>
<td>${fmtTime(a.created_at)}</td></tr>`);
}

async function pageAdapters(page, params) {
  const [adapters, rollouts, bases] = await Promise.all([
    page.api('/adapters?limit=500'),
    settle(page.api('/rollouts')),
    settle(page.api('/base-models?limit=500')),
  ]);
  const byAdapter = new Map();
  if (rollouts.ok) for (const r of rollouts.value.items) byAdapter.set(r.adapter, r);
  const q = params.get('q') || '';
  const baseRows = bases.ok ? bases.value.items.map((b) => html`<tr>
<th scope="row"><a href="#/base-models/${enc(b.name)}">${b.name}</a></th>
<td>${b.architecture || dash}</td>
<td>${fmtNum(b.dims && b.dims.num_hidden_layers)}</td>
<td>${fmtNum(b.dims && b.dims.hidden_size)}</td>
<td>${digest(b.digest)}</td>
<td>${fmtTime(b.created_at)}</td></tr>`) : [];

  page.render(html`<h1>Adapters</h1>
<div class="toolbar">
  <label for="adapter-filter">Filter by name</label>
  <input id="adapter-filter" type="search" autocomplete="off" spellcheck="false" value="${q}"
    aria-controls="adapters-table" placeholder="e.g. support">
  <span id="adapter-count" class="muted" aria-live="polite"></span>
</div>
${rollouts.ok ? '' : html`<p class="notice">Rollout states unavailable: ${rollouts.error.message}</p>`}
<div class="table-wrap"><table id="adapters-table" class="adapters">
<caption class="sr-only">Adapters</caption>
<thead><tr><th scope="col">Name</th><th scope="col">Base model</th><th scope="col">Latest</th>
<th scope="col">Stable</th><th scope="col">Rollout</th><th scope="col">Created</th></tr></thead>
<tbody>${adapterRows(adapters.items, byAdapter)}</tbody></table></div>
<p id="adapters-empty" class="muted empty" hidden></p>
<p><button type="button" id="adapters-more" class="quiet" ${adapters.next ? '' : raw('hidden')}>Load more adapters</button></p>
<h2>Base models</h2>
${bases.ok ? table('Base models', ['Name', 'Architecture', 'Layers', 'Hidden size', 'Digest', 'Registered'], baseRows,
    { empty: 'No base models registered.' })
    : html`<p class="error">Base models unavailable: ${bases.error.message}</p>`}`, 'Adapters');

  const input = document.getElementById('adapter-filter');
  const tbody = main.querySelector('#adapters-table tbody');
  const count = document.getElementById('adapter-count');
  const empty = document.getElementById('adapters-empty');
  const more = document.getElementById('adapters-more');
  let total = adapters.items.length;
  let next = adapters.next;
  const apply = () => {
    const needle = input.value.trim().toLowerCase();
    let shown = 0;
    for (const tr of tbody.rows) {
      const hit = !needle || tr.dataset.name.includes(needle);
      tr.hidden = !hit;
      if (hit) shown++;
    }
    const noun = (n) => `${n} adapter${n === 1 ? '' : 's'}`;
    count.textContent = needle ? `${shown} of ${noun(total)}` : `${noun(total)}${next ? ' loaded' : ''}`;
    empty.hidden = shown > 0;
    empty.textContent = total === 0
      ? 'No adapters yet. Push one with loraops adapter push DIR --name NAME.'
      : `No adapter name contains “${input.value.trim()}”.`;
  };
  input.addEventListener('input', () => {
    apply();
    const v = input.value.trim();
    history.replaceState(null, '', v ? `#/adapters?q=${enc(v)}` : '#/adapters');
  });
  more.addEventListener('click', async () => {
    more.disabled = true;
    try {
      const p = await page.api(`/adapters?limit=500&after=${enc(next)}`);
      tbody.insertAdjacentHTML('beforeend', part(adapterRows(p.items, byAdapter)));
      total += p.items.length;
      next = p.next;
      more.hidden = !next;
      apply();
    } catch (e) {
      if (!page.dead && e.name !== 'AbortError') say(`Loading more adapters failed: ${e.message}`);
    } finally {
      more.disabled = false;
    }
  });
  apply();
}

// ---------------------------------------------------------------------------------------------
// Base model.

async function listAll(page, path, limit = 500) {
  const out = [];
  let after = null;
  for (let i = 0; i < 100; i++) {
    const sep = path.includes('?') ? '&' : '?';
    const p = await page.api(`${path}${sep}limit=${limit}${after ? `&after=${enc(after)}` : ''}`);
    out.push(...p.items);
    if (!p.next) break;
    after = p.next;
  }
  return out;
}

async function pageBaseModel(page, name) {
  const [bases, adapters, evidence] = await Promise.all([
    listAll(page, '/base-models'),
    settle(listAll(page, '/adapters')),
    settle(page.api(`/base-models/${enc(name)}/evidence`)),
  ]);
  const b = bases.find((x) => x.name === name);
  if (!b) throw new ApiError(404, 'not_found', `base model "${name}" not found`);
  const dims = b.dims || {};
  const mine = adapters.ok ? adapters.value.filter((a) => a.base_model === name) : [];
  page.render(html`<p class="crumbs"><a href="#/adapters">Adapters</a> / base model</p>
<h1>${b.name}</h1>
${b.description ? html`<p>${b.description}</p>` : ''}
${dl([
    ['Architecture', b.architecture || dash],
    ['Weights digest', b.digest ? html`<code class="wrap">${b.digest}</code>` : dash, true],
    ['Registered', html`${fmtTime(b.created_at)} by ${b.created_by}`],
  ])}
<h2>Dimensions</h2>
${Object.values(dims).some((v) => v !== null && v !== undefined)
    ? dl(Object.entries(dims).map(([k, v]) => [k.replace(/_/g, ' '), v === null || v === undefined ? null : fmtNum(v)]))
    : html`<p class="muted">No dimensions recorded.</p>`}
<h2>Adapters on ${b.name}</h2>
${adapters.ok ? table('Adapters on this base model', ['Name', 'Latest', 'Stable', 'Created'],
    mine.map((a) => html`<tr><th scope="row">${alink(a.name)}</th>
<td>${a.latest_version ? vlink(a.name, a.latest_version) : dash}</td>
<td>${a.stable_version ? vlink(a.name, a.stable_version) : dash}</td><td>${fmtTime(a.created_at)}</td></tr>`),
    { empty: 'No adapters on this base model.' })
    : html`<p class="error">Adapters unavailable: ${adapters.error.message}</p>`}
<h2>Base-model evidence</h2>
${evidence.ok ? evidenceTable(evidence.value, 'Evidence for the base model')
    : html`<p class="muted">Unavailable: ${evidence.error.message}</p>`}`, b.name);
}

// ---------------------------------------------------------------------------------------------
// Adapter.

function versionRows(a, items, rollout) {
  const canary = rollout && ACTIVE_STATES.has(rollout.state) ? rollout.version : null;
  return items.map((v) => {
    const tags = [];
    if (v.version === a.stable_version) tags.push(badge('stable'));
    if (v.version === canary) tags.push(badge('canary'));
    if (v.version === a.latest_version) tags.push(badge('latest'));
    const method = v.lineage && typeof v.lineage === 'object' ? v.lineage.method : null;
    return html`<tr><th scope="row">${vlink(a.name, v.version)}</th>
<td class="tags">${tags.length ? tags : ''}</td>
<td>${digest(v.digest)}</td>
<td class="num">${fmtBytes(v.size_bytes)}</td>
<td class="num">${v.summary ? html`${v.summary.r} / ${fmtNum(v.summary.lora_alpha)}` : dash}</td>
<td>${method || dash}</td>
<td>${v.run ? runLink(v.run) : dash}</td>
<td>${v.created_by}</td>
<td>${fmtTime(v.created_at)}</td></tr>`;
  });
}

function gateRuleText(r) {
  const parts = [];
  if (r.threshold !== null && r.threshold !== undefined) parts.push(`${r.op} ${fmtNum(r.threshold, 6)}`);
  if (r.max_regression !== null && r.max_regression !== undefined) {
    parts.push(`no worse than ${r.vs || 'stable'} by more than ${fmtNum(r.max_regression, 6)} (${r.op})`);
  }
  return parts.join('; ') || r.op;
}

function gatePolicy(gate) {
  if (!gate.ok) {
    if (gate.error.status === 404) {
      return html`<p class="muted">No policy of its own: the default policy (<code>*</code>) applies,
or, without one, the built-in rule “any evidence for the version's digest”.</p>`;
    }
    return html`<p class="error">Gate unavailable: ${gate.error.message}</p>`;
  }
  const g = gate.value;
  const p = g.policy || {};
  return html`<p class="muted">Set by ${g.updated_by}, ${fmtTime(g.updated_at)}.</p>
${dl([
    ['Required suites', (p.required_suites || []).length ? p.required_suites.map((s) => html`<code>${s}</code> `) : 'none beyond the rules'],
    ['Evidence age', p.max_evidence_age_hours ? `at most ${fmtNum(p.max_evidence_age_hours)} h` : 'any'],
  ])}
${table('Gate rules', ['Suite', 'Metric', 'Requirement'], (p.rules || []).map((r) => html`<tr>
<th scope="row"><code>${r.suite}</code></th><td>${r.metric}</td><td>${gateRuleText(r)}</td></tr>`), { empty: 'No metric rules.' })}`;
}

function rolloutSummary(name, ro) {
  if (!ro.ok) {
    if (ro.error.status === 404) return html`<p class="muted">No rollout yet.</p>`;
    return html`<p class="error">Rollout unavailable: ${ro.error.message}</p>`;
  }
  const r = ro.value.rollout;
  return html`${dl([
    ['State', badge(r.state)],
    ['Version', html`${vlink(name, r.version)}${r.from_version ? html` (stable was ${vlink(name, r.from_version)})` : ''}`],
    ['Canary weight', `${fmtNum(r.weight)} %`],
    ['Step', `${Math.min(r.step_index + 1, r.spec.steps.length)} of ${r.spec.steps.length} (${r.spec.steps.map((s) => `${s} %`).join(' → ')})`],
    ['Started', html`${fmtTime(r.created_at)} by ${r.created_by}`],
    ['Updated', fmtTime(r.updated_at)],
  ])}
<p><a href="#/adapters/${enc(name)}/rollout">Open the rollout (live metrics, analysis, audit trail)</a></p>`;
}

function runRows(items, withAdapter) {
  return items.map((r) => html`<tr><th scope="row">${runLink(r.id)}</th>
${withAdapter ? html`<td>${r.adapter ? alink(r.adapter) : dash}</td>` : ''}
<td>${r.method}</td><td>${badge(r.status)}</td>
<td class="num">${fmtNum(r.last_step)} / ${fmtNum(r.total_steps)}</td>
<td>${r.base_model}</td><td>${r.created_by}</td><td>${fmtTime(r.created_at)}</td><td>${fmtTime(r.ended_at)}</td></tr>`);
}
const RUN_HEADERS = ['Run', 'Method', 'Status', 'Steps', 'Base model', 'Started by', 'Started', 'Ended'];

async function pageAdapter(page, name) {
  const base = `/adapters/${enc(name)}`;
  const [a, gate, ro, runs] = await Promise.all([
    page.api(base),
    settle(page.api(`${base}/gate`)),
    settle(page.api(`${base}/rollouts/current`)),
    settle(page.api(`/runs?adapter=${enc(name)}&limit=20`)),
  ]);
  // The listing is oldest first, by version number: the newest page starts after latest − 100.
  let upTo = a.latest_version || 0;
  const fetchVersions = async () => {
    const after = Math.max(0, upTo - VERSIONS_PAGE);
    const p = await page.api(`${base}/versions?limit=${VERSIONS_PAGE}${after ? `&after=${after}` : ''}`);
    const items = p.items.filter((v) => v.version <= upTo).sort((x, y) => y.version - x.version);
    upTo = after;
    return items;
  };
  const first = upTo ? await fetchVersions() : [];
  const rollout = ro.ok ? ro.value.rollout : null;
  page.render(html`<p class="crumbs"><a href="#/adapters">Adapters</a> / adapter</p>
<h1>${a.name}</h1>
${dl([
    ['Base model', html`<a href="#/base-models/${enc(a.base_model)}">${a.base_model}</a>`],
    ['Latest version', a.latest_version ? vlink(a.name, a.latest_version) : dash],
    ['Stable version', a.stable_version ? vlink(a.name, a.stable_version) : html`<span class="muted">none promoted yet</span>`],
    ['Created', html`${fmtTime(a.created_at)} by ${a.created_by}`],
  ])}
<div class="grid2">
<section aria-labelledby="h-rollout"><h2 id="h-rollout">Rollout</h2>${rolloutSummary(a.name, ro)}</section>
<section aria-labelledby="h-gate"><h2 id="h-gate">Gate policy</h2>${gatePolicy(gate)}</section>
</div>
<section aria-labelledby="h-versions"><h2 id="h-versions">Versions</h2>
<p class="muted">${a.latest_version ? `${a.latest_version} version${a.latest_version === 1 ? '' : 's'}, newest first.` : ''}</p>
${table('Versions, newest first', ['Version', html`<span class="sr-only">Labels</span>`, 'Digest', 'Size', 'Rank / alpha', 'Method', 'Training run', 'Pushed by', 'Pushed'],
    versionRows(a, first, rollout), { cls: 'versions', empty: 'No versions.' })}
<p><button type="button" id="versions-more" class="quiet" ${upTo > 0 ? '' : raw('hidden')}>Show older versions</button></p>
</section>
<section aria-labelledby="h-runs"><h2 id="h-runs">Training runs</h2>
${runs.ok ? table('Training runs of this adapter', RUN_HEADERS, runRows(runs.value.items, false), { empty: 'No training runs recorded for this adapter.' })
    : html`<p class="muted">Training runs unavailable: ${runs.error.message}</p>`}
${runs.ok && runs.value.next ? html`<p><a href="#/runs?adapter=${enc(a.name)}">All training runs of ${a.name}</a></p>` : ''}
</section>`, a.name);

  const more = document.getElementById('versions-more');
  const tbody = main.querySelector('table.versions tbody');
  more.addEventListener('click', async () => {
    more.disabled = true;
    try {
      const items = await fetchVersions();
      tbody.insertAdjacentHTML('beforeend', part(versionRows(a, items, rollout)));
      more.hidden = upTo <= 0;
      say(`${items.length} older versions shown.`);
    } catch (e) {
      if (!page.dead && e.name !== 'AbortError') say(`Loading older versions failed: ${e.message}`);
    } finally {
      more.disabled = false;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Version.

function metricsList(m) {
  const keys = Object.keys(m || {});
  if (!keys.length) return dash;
  return html`<ul class="metrics">${keys.map((k) => html`<li><span class="k">${k}</span> <span class="v">${fmtNum(m[k], 6)}</span></li>`)}</ul>`;
}

function evidenceTable(items, caption) {
  return table(caption, ['Suite', 'Suite version', 'Suite digest', 'Metrics', 'Cases', 'Engine', 'Produced by', 'Recorded'],
    items.map((e) => html`<tr data-testid="evidence-row">
<th scope="row">${e.suite.name}</th><td>${e.suite.version || dash}</td><td>${digest(e.suite.digest)}</td>
<td>${metricsList(e.metrics)}</td><td class="num">${fmtNum(e.cases)}</td>
<td>${e.engine ? html`${e.engine.engine} <span class="muted">${e.engine.engine_version}</span>` : dash}</td>
<td>${e.produced_by || e.created_by}</td><td>${fmtTime(e.created_at)}</td></tr>`),
    { cls: 'evidence', empty: 'No evidence recorded.' });
}

function gateReportTable(rep, caption) {
  return table(caption, ['Rule', 'Required', 'Observed', 'Result', 'Why'],
    (rep.rules || []).map((r) => html`<tr data-testid="gate-rule" data-outcome="${r.passed ? 'pass' : 'fail'}">
<th scope="row"><code>${r.rule}</code></th><td>${r.required}</td><td class="num">${fmtNum(r.observed, 6)}</td>
<td>${r.passed ? badge('pass') : badge('fail')}</td><td>${r.note || (r.evidence_id ? `evidence #${r.evidence_id}` : '')}</td></tr>`),
    { cls: 'gate-report', empty: 'The policy has no rules.' });
}

function gateReport(rep) {
  if (!rep.ok) return html`<p class="error">Gate report unavailable: ${rep.error.message}</p>`;
  const r = rep.value;
  const scope = r.policy_scope === 'builtin' ? 'the built-in policy (any evidence for this digest)'
    : r.policy_scope === '*' ? 'the default policy (*)' : `${r.policy_scope}'s own policy`;
  return html`<p data-testid="gate-verdict" data-outcome="${r.passed ? 'pass' : 'fail'}">
${r.passed ? badge('pass', 'gate passes') : badge('fail', 'gate fails')}
<span class="muted">Evaluated now against ${scope}${r.stable_version ? `; relative rules compare with stable v${r.stable_version}` : ''}.</span></p>
${gateReportTable(r, 'Gate report, one row per rule')}`;
}

function parentLink(p) {
  if (!p) return null;
  if (typeof p === 'string') {
    const m = p.match(/^([A-Za-z0-9][A-Za-z0-9._-]*)@(\d+)$/);
    return m ? vlink(m[1], Number(m[2])) : html`<code>${p}</code>`;
  }
  if (typeof p === 'object' && p.adapter && p.version) return html`${p.adapter} ${vlink(p.adapter, p.version)}`;
  return html`<code>${JSON.stringify(p)}</code>`;
}

function lineageSection(v) {
  const l = v.lineage && typeof v.lineage === 'object' ? v.lineage : null;
  if (!l && !v.run) return html`<p class="muted">This version was pushed without a training manifest.</p>`;
  const ds = (l && l.datasets) || [];
  return html`${dl([
    ['Method', l && l.method],
    ['Trainer', l && l.trainer_version],
    ['Base model', l && l.base_model ? html`<code class="wrap">${l.base_model}</code>` : null],
    ['Base model digest', l && l.base_model_digest ? html`<code class="wrap">${l.base_model_digest}</code>` : null, true],
    ['Parent', l ? parentLink(l.parent) : null],
    ['Training run', v.run ? runLink(v.run) : null],
    ['Trained', l && l.created_at ? fmtTime(l.created_at) : null],
  ])}
<h3>Datasets</h3>
${table('Training datasets', ['Role', 'Path', 'Digest', 'Rows'], ds.map((d) => html`<tr>
<th scope="row">${d.role}</th><td><code class="wrap">${d.path}</code></td><td>${digest(d.digest)}</td><td class="num">${fmtNum(d.rows)}</td></tr>`),
    { empty: 'No datasets recorded.' })}
${l && l.metrics && Object.keys(l.metrics).length ? html`<h3>Training summary</h3>${kvTable('Training summary metrics', l.metrics)}` : ''}
${l && l.config ? html`<details><summary>Training configuration</summary>${kvTable('Training configuration', l.config)}</details>` : ''}`;
}

async function pageVersion(page, name, vs) {
  const v = Number(vs);
  const base = `/adapters/${enc(name)}`;
  const [ver, , a, evidence, report, ro] = await Promise.all([
    page.api(`${base}/versions/${v}`),
    page.whoami,
    settle(page.api(base)),
    settle(page.api(`${base}/versions/${v}/evidence`)),
    settle(page.api(`${base}/versions/${v}/gate-report`)),
    settle(page.api(`${base}/rollouts/current`)),
  ]);
  const rollout = ro.ok ? ro.value.rollout : null;
  const active = rollout && ACTIVE_STATES.has(rollout.state) ? rollout : null;
  const isStable = a.ok && a.value.stable_version === v;
  const tags = [];
  if (isStable) tags.push(badge('stable'));
  if (active && active.version === v) tags.push(badge('canary'));
  const s = ver.summary || {};

  let actions = '';
  if (canDeploy()) {
    if (active) {
      actions = html`<p class="muted">A rollout of ${vlink(name, active.version)} is ${active.state.replace(/_/g, ' ')}:
<a href="#/adapters/${enc(name)}/rollout">open it</a>. A new canary can start when it has ended.</p>`;
    } else if (!isStable) {
      actions = html`<div class="actions"><button type="button" data-action="start-canary" id="start-canary">Start canary</button></div>`;
    }
  }

  page.render(html`<p class="crumbs"><a href="#/adapters">Adapters</a> / ${alink(name)} / version</p>
<h1>${name} <span class="muted">v${v}</span> ${tags}</h1>
<section aria-labelledby="h-actions" class="${actions ? '' : 'sr-only'}"><h2 id="h-actions" class="sr-only">Actions</h2>
${actions}<div id="action-result" aria-live="polite"></div></section>
${dl([
    ['Digest', html`<code class="wrap" data-testid="version-digest">${ver.digest}</code>`, true],
    ['Base model', html`<a href="#/base-models/${enc(ver.base_model)}">${ver.base_model}</a>`],
    ['Size', fmtBytes(ver.size_bytes)],
    ['LoRA', `rank ${s.r}, alpha ${fmtNum(s.lora_alpha)}, ${s.layers} layers, ${fmtNum(s.trainable_params)} parameters`],
    ['Target modules', (s.target_modules || []).join(', ')],
    ['Pushed', html`${fmtTime(ver.created_at)} by ${ver.created_by}`],
  ])}
<section aria-labelledby="h-gate"><h2 id="h-gate">Gate report</h2>${gateReport(report)}</section>
<section aria-labelledby="h-evidence"><h2 id="h-evidence">Evidence</h2>
${evidence.ok ? evidenceTable(evidence.value, 'Evidence for this version')
    : html`<p class="error">Evidence unavailable: ${evidence.error.message}</p>`}</section>
<section aria-labelledby="h-lineage"><h2 id="h-lineage">Lineage</h2>${lineageSection(ver)}</section>
<section aria-labelledby="h-files"><h2 id="h-files">Files</h2>
${table('Files', ['Name', 'SHA-256', 'Size'], (ver.files || []).map((f) => html`<tr>
<th scope="row"><code>${f.name}</code></th><td><code class="wrap sha">${f.sha256}</code></td><td class="num">${fmtBytes(f.size)}</td></tr>`), { cls: 'files' })}
</section>
<details><summary>adapter_config.json</summary><pre class="json">${JSON.stringify(ver.config, null, 2)}</pre></details>`,
  `${name} v${v}`);

  const btn = document.getElementById('start-canary');
  if (!btn) return;
  const out = document.getElementById('action-result');
  btn.addEventListener('click', async () => {
    const fromStable = a.ok && a.value.stable_version ? ` Stable v${a.value.stable_version} keeps the rest of the traffic.` : '';
    const ok = await confirmAction({
      title: `Start a canary of ${name} v${v}?`,
      body: html`<p>The gate is checked first. If it passes, v${v} receives a first share of the
traffic and moves through the rollout's steps (5, 25, 50, 100 % by default) as its live analysis passes.${fromStable}</p>`,
      confirmLabel: 'Start canary',
    });
    if (!ok || page.dead) return;
    btn.disabled = true;
    out.innerHTML = part(html`<p class="muted">Starting…</p>`);
    try {
      const st = await page.api(`${base}/rollouts`, { method: 'POST', body: { version: v } });
      say(`Canary of ${name} v${v} started: ${st.rollout.state}.`);
      location.hash = `#/adapters/${enc(name)}/rollout`;
    } catch (e) {
      if (page.dead || e.name === 'AbortError') return;
      btn.disabled = false;
      const rep = e.details && Array.isArray(e.details.rules) ? e.details : null;
      out.innerHTML = part(html`<div class="error-box" role="alert"><p class="error">Not started: ${e.message}</p>
${rep ? gateReportTable(rep, 'Gate report of the refused start') : ''}</div>`);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Charts (uPlot).

const COLORS = {
  canary: '#d9480f', stable: '#1864ab', shadow: '#7048e8',
  loss: '#1864ab', val_loss: '#d9480f', lr: '#2b8a3e', tokens_per_s: '#0b7285',
  grad_norm: '#5f3dc4', memory_bytes: '#862e9c',
};
const PALETTE = ['#1864ab', '#d9480f', '#2b8a3e', '#5f3dc4', '#c2255c', '#0b7285', '#e67700', '#495057'];

/** uPlot, loaded on the first page that draws a chart (the others never parse it). */
let uplotLoading = null;
function loadUPlot() {
  if (window.uPlot) return Promise.resolve(window.uPlot);
  if (!uplotLoading) {
    uplotLoading = new Promise((resolve, reject) => {
      const s = document.createElement('script');
      s.src = 'vendor/uPlot.iife.min.js';
      s.onload = () => resolve(window.uPlot);
      s.onerror = () => { uplotLoading = null; s.remove(); reject(new Error('the chart library did not load')); };
      document.head.appendChild(s);
    });
  }
  return uplotLoading;
}

/** Width of a y axis that fits its longest label. */
function axisSize(u, values) {
  if (!values || !values.length) return 48;
  const longest = values.reduce((n, v) => Math.max(n, String(v).length), 0);
  return Math.ceil(longest * 7.2) + 20;
}

/** y ranges: `zero` starts at 0, `percent` is 0–100, `unit` is 0–1, `rate` is 0 to at least 1 %. */
const Y_RANGES = {
  auto: null,
  zero: (u, min, max) => [0, max === null || max <= 0 ? 1 : max * 1.1],
  percent: () => [0, 100],
  unit: () => [0, 1],
  rate: (u, min, max) => [0, Math.max(0.01, (max || 0) * 1.15)],
};

/**
 * A chart in `el` (a .chart element); `series`: [{label, color, points}], x is time (unix
 * seconds) or step. A lone x value is padded so the chart still has a span to draw in.
 */
function makeChart(page, el, { series, time, yFormat, yRange = 'auto', height = 220, width, data }) {
  if (!window.uPlot) {
    el.textContent = 'Charts unavailable: the chart library did not load.';
    return null;
  }
  width = Math.max(240, width || el.clientWidth || 600);
  const fmtY = yFormat || ((v) => fmtNum(v, 4));
  const pad = time ? 30 : 1;
  const y = { auto: true };
  if (Y_RANGES[yRange]) y.range = Y_RANGES[yRange];
  const opts = {
    width,
    height,
    cursor: { drag: { x: true, y: false } },
    scales: {
      x: {
        time,
        range: (u, min, max) => (min === null ? [0, 1] : min === max ? [min - pad, max + pad] : [min, max]),
      },
      y,
    },
    legend: { live: true },
    series: [
      time ? { label: 'Time', value: (u, v) => (v === null || v === undefined ? '—' : fmtClock(v)) }
        : { label: 'Step', value: (u, v) => (v === null || v === undefined ? '—' : fmtNum(v)) },
      ...series.map((s, i) => ({
        label: s.label,
        stroke: s.color || PALETTE[i % PALETTE.length],
        width: 2,
        spanGaps: s.spanGaps ?? true,
        // Points where the data is sparse (uPlot's default), always for sparse series.
        points: s.points ? { show: true, size: 6 } : { size: 6 },
        value: (u, v) => (v === null || v === undefined ? '—' : fmtY(v)),
      })),
    ],
    axes: [
      time ? { space: 70, values: (u, ticks) => ticks.map((t) => fmtClock(t)) } : { space: 50 },
      { size: axisSize, values: (u, ticks) => ticks.map((t) => fmtY(t)) },
    ],
  };
  const chart = new window.uPlot(opts, data || [[], ...series.map(() => [])], el);
  page.charts.push(chart);
  const entry = { chart, el, height };
  if (!page.resize) {
    page.resize = [];
    let frame = 0;
    const onResize = () => {
      cancelAnimationFrame(frame);
      frame = requestAnimationFrame(() => {
        for (const c of page.resize) {
          const w = Math.max(240, c.el.clientWidth);
          if (w !== c.chart.width) c.chart.setSize({ width: w, height: c.height });
        }
      });
    };
    window.addEventListener('resize', onResize);
    page.cleanups.push(() => { window.removeEventListener('resize', onResize); cancelAnimationFrame(frame); });
  }
  page.resize.push(entry);
  return chart;
}

/** Aligns `[x, y]` series by x: [xs, ys1, ys2, …] with nulls where a series has no point. */
function align(lists) {
  const xs = new Set();
  for (const l of lists) for (const [x] of l) xs.add(x);
  const sorted = [...xs].sort((a, b) => a - b);
  const index = new Map(sorted.map((x, i) => [x, i]));
  const out = [sorted];
  for (const l of lists) {
    const ys = new Array(sorted.length).fill(null);
    for (const [x, y] of l) ys[index.get(x)] = y;
    out.push(ys);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Training runs.

async function pageRuns(page, params) {
  const adapter = params.get('adapter');
  const q = adapter ? `&adapter=${enc(adapter)}` : '';
  const first = await page.api(`/runs?limit=100${q}`);
  page.render(html`<h1>Training runs${adapter ? html` of ${alink(adapter)}` : ''}</h1>
<p class="muted">Newest first. A run appears here when <code>loraops train … --registry URL</code> starts it.</p>
${table('Training runs, newest first', ['Run', 'Adapter', ...RUN_HEADERS.slice(1)], runRows(first.items, true),
    { cls: 'runs', empty: 'No training runs recorded.' })}
<p><button type="button" id="runs-more" class="quiet" ${first.next ? '' : raw('hidden')}>Load more runs</button></p>`,
  'Training runs');
  let next = first.next;
  const more = document.getElementById('runs-more');
  more.addEventListener('click', async () => {
    more.disabled = true;
    try {
      const p = await page.api(`/runs?limit=100${q}&after=${enc(next)}`);
      main.querySelector('table.runs tbody').insertAdjacentHTML('beforeend', part(runRows(p.items, true)));
      next = p.next;
      more.hidden = !next;
    } catch (e) {
      if (!page.dead && e.name !== 'AbortError') say(`Loading more runs failed: ${e.message}`);
    } finally {
      more.disabled = false;
    }
  });
}

const RUN_CHARTS = [
  { id: 'loss', title: 'Loss', keys: [['loss', 'training loss'], ['val_loss', 'validation loss']], points: true },
  { id: 'lr', title: 'Learning rate', keys: [['lr', 'learning rate']] },
  { id: 'tps', title: 'Throughput', keys: [['tokens_per_s', 'tokens/s']] },
  { id: 'grad', title: 'Gradient norm', keys: [['grad_norm', 'gradient norm']] },
  { id: 'mem', title: 'Memory', keys: [['memory_bytes', 'memory']], yFormat: (v) => fmtBytes(v) },
];
const KNOWN_SERIES = new Set(RUN_CHARTS.flatMap((c) => c.keys.map(([k]) => k)));

function runFacts(r) {
  const pct = r.total_steps ? Math.min(100, (100 * r.last_step) / r.total_steps) : 0;
  return dl([
    ['Status', html`<span data-testid="run-status" data-status="${r.status}">${badge(r.status)}</span>`],
    ['Progress', html`<progress max="${r.total_steps || 1}" value="${r.last_step}" aria-label="Steps done">${pct.toFixed(0)} %</progress>
<span class="num">step ${fmtNum(r.last_step)} of ${fmtNum(r.total_steps)}</span>`],
    ['Method', r.method],
    ['Adapter', r.adapter ? alink(r.adapter) : dash],
    ['Base model', html`<code class="wrap">${r.base_model}</code>`],
    ['Started', html`${fmtTime(r.created_at)} by ${r.created_by}`],
    ['Ended', r.ended_at ? fmtTime(r.ended_at) : html`<span class="muted">not yet</span>`],
    ['Versions made from it', (r.versions || []).length
      ? r.versions.map((v) => html`<span class="chip">${v.adapter} ${vlink(v.adapter, v.version)}</span> `)
      : html`<span class="muted">none pushed yet</span>`],
  ]);
}

async function pageRun(page, id) {
  const [r, m] = await Promise.all([
    page.api(`/runs/${enc(id)}`),
    page.api(`/runs/${enc(id)}/metrics`),
    loadUPlot().catch(() => null),
  ]);
  const series = new Map(Object.entries(m.series || {}).map(([k, v]) => [k, v.slice()]));
  let lastStep = 0;
  for (const pts of series.values()) for (const [s] of pts) if (s > lastStep) lastStep = s;

  const charts = [];
  const extras = () => [...series.keys()].filter((k) => !KNOWN_SERIES.has(k)).sort();
  // The loss chart always (validation loss once there is any), the others when they have data.
  const chartDefs = () => [
    ...RUN_CHARTS.filter((c) => c.id === 'loss' || c.keys.some(([k]) => series.has(k)))
      .map((c) => (c.id === 'loss' ? { ...c, keys: c.keys.filter(([k]) => k === 'loss' || series.has(k)) } : c)),
    ...extras().map((k, i) => ({ id: `x${i}`, title: k, keys: [[k, k]] })),
  ];
  const layoutOf = (list) => list.map((d) => `${d.id}:${d.keys.map(([k]) => k).join('+')}`).join();
  let defs = chartDefs();
  const chartHtml = (list) => list.map((c) => html`<figure class="chart-box">
<figcaption id="cap-${c.id}">${c.title}</figcaption>
<div class="chart" data-chart="${c.id}" role="img" aria-labelledby="cap-${c.id}"></div></figure>`);

  page.render(html`<p class="crumbs"><a href="#/runs">Training runs</a> / run</p>
<h1>Run <code>${shortId(r.id)}</code> <span class="muted">${r.method}${r.adapter ? html` · ${r.adapter}` : ''}</span></h1>
<p class="muted wrap"><code>${r.id}</code></p>
<div id="run-facts" aria-live="polite">${runFacts(r)}</div>
<p class="muted" data-live-status aria-live="polite">${r.status === 'running' ? 'Live: refreshed every 2 s.' : ''}</p>
<section aria-labelledby="h-curves"><h2 id="h-curves">Curves</h2>
<div class="charts" id="run-charts">${chartHtml(defs)}</div></section>
${r.summary ? html`<section aria-labelledby="h-summary"><h2 id="h-summary">Summary</h2>${kvTable('Run summary', r.summary)}</section>` : ''}
<section aria-labelledby="h-config"><h2 id="h-config">Hyperparameters</h2>${kvTable('Training configuration', r.config)}</section>
<section aria-labelledby="h-data"><h2 id="h-data">Datasets</h2>
${table('Datasets', ['Role', 'Path', 'Digest', 'Rows'], (r.datasets || []).map((d) => html`<tr>
<th scope="row">${d.role}</th><td><code class="wrap">${d.path}</code></td><td>${digest(d.digest)}</td><td class="num">${fmtNum(d.rows)}</td></tr>`),
    { empty: 'No datasets recorded.' })}</section>`, `Run ${shortId(r.id)}`);

  const build = () => {
    for (const c of charts) c.chart.destroy();
    page.charts = page.charts.filter((c) => !charts.some((x) => x.chart === c));
    if (page.resize) page.resize.length = 0;
    charts.length = 0;
    // Every width first, then every chart: one layout, not one per chart.
    const els = defs.map((d) => main.querySelector(`[data-chart="${d.id}"]`));
    const widths = els.map((el) => el.clientWidth);
    defs.forEach((d, i) => {
      const chart = makeChart(page, els[i], {
        time: false,
        yFormat: d.yFormat,
        width: widths[i],
        data: dataOf(d),
        series: d.keys.map(([k, label], j) => ({ label, color: COLORS[k] || PALETTE[j], points: d.points && k === 'val_loss' })),
      });
      if (chart) charts.push({ chart, def: d });
    });
  };
  const dataOf = (d) => align(d.keys.map(([k]) => series.get(k) || []));
  const update = () => {
    for (const c of charts) c.chart.setData(dataOf(c.def));
  };
  build();

  if (r.status !== 'running') return;
  const stop = page.every(RUN_POLL_MS, async () => {
    const [run, more] = await Promise.all([
      page.api(`/runs/${enc(id)}`),
      page.api(`/runs/${enc(id)}/metrics?after_step=${lastStep}`),
    ]);
    if (page.dead) return;
    let added = false;
    for (const [k, pts] of Object.entries(more.series || {})) {
      if (!pts.length) continue;
      if (!series.has(k)) series.set(k, []);
      const list = series.get(k);
      const top = list.length ? list[list.length - 1][0] : -1;
      for (const p of pts) if (p[0] > top) { list.push(p); added = true; }
      for (const [s] of pts) if (s > lastStep) lastStep = s;
    }
    const newDefs = chartDefs();
    if (layoutOf(newDefs) !== layoutOf(defs)) {
      defs = newDefs;
      document.getElementById('run-charts').innerHTML = part(chartHtml(defs));
      build();
    } else if (added) {
      update();
    }
    document.getElementById('run-facts').innerHTML = part(runFacts(run));
    const status = main.querySelector('[data-live-status]');
    if (run.status !== 'running') {
      status.textContent = `The run ended: ${run.status}.`;
      stop();
    } else {
      status.textContent = `Live: refreshed every 2 s (step ${fmtNum(lastStep)}).`;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Rollouts.

function stateActions(state) {
  switch (state) {
    case 'running':
    case 'shadowing': return ['pause', 'promote', 'abort'];
    case 'paused': return ['resume', 'promote', 'abort'];
    case 'awaiting_approval': return ['approve', 'promote', 'abort'];
    case 'promoted': return ['rollback-promotion'];
    default: return [];
  }
}
const ACTIONS = {
  pause: { label: 'Pause', verb: 'pause', text: 'The canary keeps its current weight; the analysis stops moving it until it is resumed.' },
  resume: { label: 'Resume', verb: 'resume', text: 'The analysis continues from the current step.' },
  approve: { label: 'Approve', verb: 'approve', text: 'The canary moves on to the next step it was waiting for.' },
  promote: { label: 'Promote', verb: 'promote', text: 'The canary becomes the stable version at once and receives all traffic.' },
  abort: { label: 'Abort', verb: 'abort', danger: true, text: 'All traffic goes back to the stable version; the rollout ends.' },
  'rollback-promotion': { label: 'Roll back promotion', verb: 'roll back the promotion of', danger: true, text: 'The previous stable version becomes stable again and receives all traffic.' },
};

function stepTimeline(r) {
  const steps = r.spec.steps || [];
  const items = [];
  const ended = !ACTIVE_STATES.has(r.state);
  const shadow = !!r.spec.shadow;
  const inShadow = r.state === 'shadowing' || (shadow && r.weight === 0 && r.step_index === 0 && r.state !== 'promoted' && !ended
    && r.state !== 'running');
  if (shadow) {
    const cls = inShadow ? 'current' : 'done';
    items.push(html`<li class="${cls}" ${inShadow ? raw('aria-current="step"') : ''}><span class="dot"></span>shadow ${fmtNum(r.spec.shadow.percent)} %</li>`);
  }
  steps.forEach((s, i) => {
    let cls = 'todo';
    if (r.state === 'promoted') cls = 'done';
    else if (inShadow) cls = 'todo';
    else if (i < r.step_index) cls = 'done';
    else if (i === r.step_index) cls = ended ? 'stopped' : 'current';
    const gate = (r.spec.approve_before || []).includes(s) ? html` <span class="muted">(approval)</span>` : '';
    items.push(html`<li class="${cls}" ${cls === 'current' ? raw('aria-current="step"') : ''}><span class="dot"></span>${fmtNum(s)} %${gate}</li>`);
  });
  items.push(html`<li class="${r.state === 'promoted' ? 'done' : 'todo'}"><span class="dot"></span>stable</li>`);
  return html`<ol class="steps" aria-label="Steps">${items}</ol>`;
}

function rolloutHead(r) {
  return html`${dl([
    ['State', html`<span data-testid="rollout-state" data-state="${r.state}">${badge(r.state)}</span>`],
    ['Canary weight', html`<span data-testid="rollout-weight">${fmtNum(r.weight)} %</span>`],
    ['Version', html`${vlink(r.adapter, r.version)}${r.from_version ? html` against stable ${vlink(r.adapter, r.from_version)}` : html` <span class="muted">(first version: no stable arm)</span>`}`],
    ['Failed analyses', `${r.failures} of ${r.spec.failure_limit} allowed`],
    ['Analysis', `every ${r.spec.interval_secs} s, at least ${r.spec.min_requests} requests and ${r.spec.min_users} users per arm`],
    ['Rules', (r.spec.rules || []).length ? html`<ul class="plain">${r.spec.rules.map((x) => html`<li><code>${ruleText(x)}</code></li>`)}</ul>` : 'built-in defaults'],
    ['Started', html`${fmtTime(r.created_at)} by ${r.created_by}`],
    ['Updated', fmtTime(r.updated_at)],
  ])}`;
}

function ruleText(x) {
  if (!x.compare) return `${x.metric} ${x.op} ${x.threshold}`;
  return `${x.metric}: canary ${x.compare === 'ratio' ? '/' : '-'} stable ${x.op} ${x.threshold} at confidence ${x.confidence ?? 0.95}`;
}

function actionButtons(r) {
  if (!canDeploy()) return '';
  const list = stateActions(r.state);
  if (!list.length) return '';
  return html`${list.map((a) => html`<button type="button" data-action="${a}" class="${ACTIONS[a].danger ? 'danger' : ''}">${ACTIONS[a].label}</button>`)}`;
}

function auditTable(events) {
  const rows = events.slice().reverse().map((e) => html`<tr>
<td>${fmtTime(e.at)}</td><td>${e.actor}</td><th scope="row">${e.action}</th>
<td>${e.from_state ? html`${badge(e.from_state)} → ` : ''}${badge(e.to_state)}</td>
<td class="num">${fmtNum(e.weight)} %</td><td class="reason">${e.reason}</td></tr>`);
  return table('Audit trail, newest first', ['At', 'Actor', 'Action', 'State', 'Weight', 'Reason'], rows,
    { cls: 'audit', empty: 'No events.' });
}

function fmtInterval(iv) {
  if (!Array.isArray(iv) || iv.length !== 2) return '—';
  return `[${fmtNum(iv[0], 3)}, ${fmtNum(iv[1], 3)}]`;
}

function verdicts(events) {
  const list = events.filter((e) => e.details && typeof e.details === 'object' && e.details.verdict).reverse();
  if (!list.length) return html`<p class="muted">No analysis yet: the first verdict comes after the first interval with traffic.</p>`;
  return html`<ol class="verdicts">${list.map((e) => {
    const d = e.details;
    const arms = Array.isArray(d.arms) ? d.arms : [];
    return html`<li class="verdict"><h3>${badge(d.verdict)} <span class="muted">${d.phase || ''} interval ending</span> ${fmtTime(d.window_end || e.at)}</h3>
<p>${e.reason}</p>
${arms.length ? html`<p class="muted small">${arms.map((x) => `${x.arm} v${x.version}: ${fmtNum(x.requests)} requests, error rate ${fmtRate(x.error_rate)}, p95 ${fmtMs(x.latency_p95_ms)}`).join(' · ')}</p>` : ''}
${table('Analysis rules', ['Rule', 'Window', 'Outcome', 'Estimate', 'Interval', 'p-value', 'Test'], (d.rules || []).map((x) => html`<tr>
<th scope="row"><code>${x.rule}</code></th><td>${x.window}</td><td>${badge(x.outcome)}</td><td class="num">${fmtNum(x.estimate, 4)}</td>
<td class="num">${fmtInterval(x.interval)}</td><td class="num">${fmtNum(x.p_value, 3)}</td><td>${x.test}</td></tr>`), { empty: 'No rules evaluated.' })}</li>`;
  })}</ol>`;
}

const ARM_ORDER = ['canary', 'shadow', 'stable'];
const SERIES_CHARTS = [
  { id: 'share', title: 'Share of traffic', field: 'share', yRange: 'percent', yFormat: (v) => `${fmtNum(v, 3)} %` },
  { id: 'errors', title: 'Error rate', field: 'error_rate', yRange: 'rate', yFormat: (v) => fmtRate(v) },
  { id: 'p95', title: 'Latency p95', field: 'latency_p95_ms', yRange: 'zero', yFormat: (v) => fmtMs(v) },
  { id: 'judge', title: 'Judge score', field: 'judge_score', yRange: 'unit', yFormat: (v) => fmtNum(v, 3), optional: true },
  { id: 'requests', title: 'Requests per bucket', field: 'requests', yRange: 'zero', yFormat: (v) => fmtNum(v, 4) },
];

function armsOf(points) {
  const seen = new Set();
  for (const p of points) for (const a of p.arms) seen.add(a.arm);
  return [...seen].sort((a, b) => (ARM_ORDER.indexOf(a) + 10 * (ARM_ORDER.indexOf(a) < 0)) - (ARM_ORDER.indexOf(b) + 10 * (ARM_ORDER.indexOf(b) < 0)) || a.localeCompare(b));
}

function armTable(points, arms) {
  if (!arms.length) return html`<p class="muted" data-testid="arms-empty">No traffic reported yet.</p>`;
  const last = points[points.length - 1];
  const totals = new Map();
  for (const p of points) {
    for (const a of p.arms) {
      const t = totals.get(a.arm) || { requests: 0, errors: 0 };
      t.requests += a.requests;
      t.errors += a.errors;
      totals.set(a.arm, t);
    }
  }
  const rows = arms.map((arm) => {
    const a = last.arms.find((x) => x.arm === arm) || null;
    const t = totals.get(arm) || { requests: 0, errors: 0 };
    const id = (f) => `arm-${arm}-${f}`;
    return html`<tr data-arm="${arm}"><th scope="row">${badge(arm)}</th>
<td data-testid="${id('version')}">${a ? `v${a.version}` : '—'}</td>
<td class="num" data-testid="${id('share')}">${a ? fmtPct(a.share) : '—'}</td>
<td class="num" data-testid="${id('requests-latest')}">${a ? fmtNum(a.requests) : '0'}</td>
<td class="num" data-testid="${id('requests')}">${fmtNum(t.requests)}</td>
<td class="num" data-testid="${id('errors')}">${fmtNum(t.errors)}</td>
<td class="num" data-testid="${id('error-rate')}">${a ? fmtRate(a.error_rate) : '—'}</td>
<td class="num" data-testid="${id('latency-p95')}">${a ? fmtMs(a.latency_p95_ms) : '—'}</td>
<td class="num" data-testid="${id('judge')}">${a && a.judge_score !== null && a.judge_score !== undefined ? fmtNum(a.judge_score, 3) : '—'}</td></tr>`;
  });
  return html`<p class="muted small">Latest bucket ending ${fmtTime(last.at)}; totals over the charted window.</p>
${table('Per-arm numbers of the latest bucket', ['Arm', 'Version', 'Share', 'Requests (latest)', 'Requests (total)', 'Errors (total)', 'Error rate', 'p95 latency', 'Judge score'], rows, { cls: 'arms' })}`;
}

async function pageRollout(page, name) {
  const base = `/adapters/${enc(name)}/rollouts/current`;
  const [st, , , ser] = await Promise.all([
    page.api(base),
    page.whoami,
    loadUPlot().catch(() => null),
    settle(page.api(`${base}/series`)),
  ]);
  let r = st.rollout;
  let events = st.events;
  let points = ser.ok ? ser.value.points : [];
  let bucket = ser.ok ? ser.value.bucket_secs : null;

  page.render(html`<p class="crumbs"><a href="#/adapters">Adapters</a> / ${alink(name)} / rollout</p>
<h1>Rollout of ${name} <span class="muted">v${r.version}</span></h1>
<div id="ro-head" aria-live="polite">${rolloutHead(r)}</div>
<div id="ro-steps">${stepTimeline(r)}</div>
<section aria-labelledby="h-actions" id="ro-actions-section"><h2 id="h-actions" class="sr-only">Actions</h2>
<div class="actions" id="ro-actions">${actionButtons(r)}</div>
<div id="action-result" aria-live="polite"></div></section>
<section aria-labelledby="h-live"><h2 id="h-live">Live metrics</h2>
<p class="muted" data-live-status aria-live="polite"></p>
${ser.ok ? '' : html`<p class="error">Live metrics unavailable: ${ser.error.message}</p>`}
<div class="charts" id="ro-charts"></div>
<div id="ro-arms" aria-live="polite"></div></section>
<section aria-labelledby="h-analysis"><h2 id="h-analysis">Analysis</h2><div id="ro-verdicts">${verdicts(events)}</div></section>
<section aria-labelledby="h-audit"><h2 id="h-audit">Audit trail</h2><div id="ro-audit">${auditTable(events)}</div></section>`,
  `Rollout of ${name}`);

  const chartsEl = document.getElementById('ro-charts');
  const armsEl = document.getElementById('ro-arms');
  const liveEl = main.querySelector('[data-live-status]');
  let charts = [];
  let layout = '';
  /** [times, one series per arm] of one metric; a bucket without reports breaks the lines. */
  const dataOf = (d, arms) => {
    const xs = [];
    const ys = arms.map(() => []);
    let prev = null;
    for (const p of points) {
      const t = Date.parse(p.at) / 1000;
      if (prev !== null && bucket && t - prev > 1.5 * bucket) {
        xs.push(prev + bucket);
        for (const y of ys) y.push(null);
      }
      xs.push(t);
      arms.forEach((arm, i) => {
        const a = p.arms.find((x) => x.arm === arm);
        const v = a ? a[d.field] : null;
        ys[i].push(v === undefined ? null : v);
      });
      prev = t;
    }
    return [xs, ...ys];
  };
  const draw = () => {
    const arms = armsOf(points);
    const hasJudge = points.some((p) => p.arms.some((a) => a.judge_score !== null && a.judge_score !== undefined));
    const defs = SERIES_CHARTS.filter((c) => !c.optional || hasJudge);
    const key = `${arms.join()}|${defs.map((d) => d.id).join()}`;
    if (key !== layout) {
      layout = key;
      for (const c of charts) c.chart.destroy();
      page.charts = page.charts.filter((c) => !charts.some((x) => x.chart === c));
      if (page.resize) page.resize.length = 0;
      charts = [];
      chartsEl.innerHTML = part(defs.map((c) => html`<figure class="chart-box">
<figcaption id="cap-${c.id}">${c.title}</figcaption>
<div class="chart" data-chart="${c.id}" role="img" aria-labelledby="cap-${c.id}"></div></figure>`));
      const shown = arms.length ? arms : ['canary', 'stable'];
      const els = defs.map((d) => chartsEl.querySelector(`[data-chart="${d.id}"]`));
      const widths = els.map((el) => el.clientWidth);
      defs.forEach((d, i) => {
        const chart = makeChart(page, els[i], {
          time: true,
          yFormat: d.yFormat,
          yRange: d.yRange,
          height: 180,
          width: widths[i],
          data: dataOf(d, shown),
          series: shown.map((arm) => ({ label: arm, color: COLORS[arm], spanGaps: false })),
        });
        if (chart) charts.push({ chart, def: d, arms: shown, fresh: true });
      });
    }
    for (const c of charts) {
      if (c.fresh) c.fresh = false;
      else c.chart.setData(dataOf(c.def, c.arms));
    }
    armsEl.innerHTML = part(armTable(points, arms));
  };
  draw();

  const live = () => ACTIVE_STATES.has(r.state);
  const setLive = () => {
    liveEl.textContent = live()
      ? `Live: refreshed every ${ROLLOUT_POLL_MS / 1000} s${bucket ? `, ${bucket} s buckets` : ''}.`
      : `The rollout has ended (${r.state.replace(/_/g, ' ')}); no more updates.`;
  };
  setLive();

  const show = (status) => {
    const changed = status.rollout.updated_at !== r.updated_at || status.rollout.state !== r.state
      || status.events.length !== events.length;
    const stateChanged = status.rollout.state !== r.state;
    r = status.rollout;
    events = status.events;
    if (!changed) return;
    document.getElementById('ro-head').innerHTML = part(rolloutHead(r));
    document.getElementById('ro-steps').innerHTML = part(stepTimeline(r));
    if (stateChanged) document.getElementById('ro-actions').innerHTML = part(actionButtons(r));
    document.getElementById('ro-verdicts').innerHTML = part(verdicts(events));
    document.getElementById('ro-audit').innerHTML = part(auditTable(events));
    setLive();
  };

  document.getElementById('ro-actions').addEventListener('click', async (ev) => {
    const btn = ev.target.closest('button[data-action]');
    if (!btn) return;
    const action = btn.dataset.action;
    const def = ACTIONS[action];
    const out = document.getElementById('action-result');
    const ok = await confirmAction({
      title: `${def.label}: ${name} v${r.version}?`,
      body: html`<p>${def.text}</p><p class="muted">The rollout is ${r.state.replace(/_/g, ' ')} at ${fmtNum(r.weight)} %.</p>`,
      confirmLabel: def.label,
      danger: !!def.danger,
    });
    if (!ok || page.dead) return;
    for (const b of main.querySelectorAll('#ro-actions button')) b.disabled = true;
    try {
      const status = await page.api(`${base}/${action}`, { method: 'POST' });
      if (page.dead) return;
      show(status);
      document.getElementById('ro-actions').innerHTML = part(actionButtons(r));
      out.innerHTML = part(html`<p class="success" data-testid="action-result">Done: the rollout is now ${badge(r.state)}.</p>`);
      say(`${def.label} done: the rollout is now ${r.state.replace(/_/g, ' ')}.`);
      if (live()) startPolling();
    } catch (e) {
      if (page.dead || e.name === 'AbortError') return;
      for (const b of main.querySelectorAll('#ro-actions button')) b.disabled = false;
      out.innerHTML = part(html`<p class="error" role="alert" data-testid="action-error">${def.label} failed: ${e.message}</p>`);
    }
  });

  let stopPolling = null;
  const startPolling = () => {
    if (stopPolling) return;
    stopPolling = page.every(ROLLOUT_POLL_MS, async () => {
      const [status, s] = await Promise.all([page.api(base), page.api(`${base}/series`)]);
      if (page.dead) return;
      show(status);
      const last = (x) => (x.length ? `${x[x.length - 1].at}|${JSON.stringify(x[x.length - 1].arms)}` : '');
      if (s.points.length !== points.length || last(s.points) !== last(points)) {
        points = s.points;
        bucket = s.bucket_secs;
        draw();
      }
      setLive();
      if (!live()) { stopPolling(); stopPolling = null; }
    });
  };
  if (live()) startPolling();
}

async function pageRollouts(page, params) {
  const activeOnly = params.get('active') === 'true';
  const first = await page.api(`/rollouts${activeOnly ? '?active=true' : ''}`);
  const rows = (items) => items.map((r) => html`<tr>
<th scope="row">${alink(r.adapter)}</th>
<td><a href="#/adapters/${enc(r.adapter)}/rollout">${badge(r.state)}</a></td>
<td>${vlink(r.adapter, r.version)}</td>
<td>${r.from_version ? vlink(r.adapter, r.from_version) : dash}</td>
<td class="num">${fmtNum(r.weight)} %</td>
<td class="num">${Math.min(r.step_index + 1, r.spec.steps.length)} / ${r.spec.steps.length}</td>
<td>${r.created_by}</td><td>${fmtTime(r.created_at)}</td><td>${fmtTime(r.updated_at)}</td></tr>`);
  page.render(html`<h1>Rollouts</h1>
<p class="muted">The latest rollout of each adapter, most recently updated first.</p>
<div class="toolbar"><input type="checkbox" id="active-only" ${activeOnly ? raw('checked') : ''}>
<label for="active-only">Active rollouts only</label></div>
${table('Rollouts', ['Adapter', 'State', 'Version', 'Stable', 'Weight', 'Step', 'Started by', 'Started', 'Updated'], rows(first.items),
    { cls: 'rollouts', empty: activeOnly ? 'No rollout is active.' : 'No rollouts yet.' })}
<p><button type="button" id="rollouts-more" class="quiet" ${first.next ? '' : raw('hidden')}>Load more rollouts</button></p>`,
  'Rollouts');
  document.getElementById('active-only').addEventListener('change', (ev) => {
    location.hash = ev.target.checked ? '#/rollouts?active=true' : '#/rollouts';
  });
  let next = first.next;
  const more = document.getElementById('rollouts-more');
  more.addEventListener('click', async () => {
    more.disabled = true;
    try {
      const p = await page.api(`/rollouts?${activeOnly ? 'active=true&' : ''}after=${enc(next)}`);
      main.querySelector('table.rollouts tbody').insertAdjacentHTML('beforeend', part(rows(p.items)));
      next = p.next;
      more.hidden = !next;
    } catch (e) {
      if (!page.dead && e.name !== 'AbortError') say(`Loading more rollouts failed: ${e.message}`);
    } finally {
      more.disabled = false;
    }
  });
}

// ---------------------------------------------------------------------------------------------

route();
