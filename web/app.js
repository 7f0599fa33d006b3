// Kloigos dashboard: one plain ES module, no framework, no build step. It talks to the same API
// as the CLI (`/api/...`) with the bearer token kept in sessionStorage.
//
// Rendering rules (it must stay fast with thousands of units): each table is rebuilt with one
// innerHTML assignment, only when its data, filters or sort changed; the units table holds only
// the rows in view (windowed); every click is handled by one delegated listener; the search box
// is debounced.

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];
const ESC = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
const esc = (v) => String(v ?? '').replace(/[&<>"']/g, (c) => ESC[c]);
const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: 'base' });
const debounce = (fn, ms) => {
  let t;
  return (...a) => { clearTimeout(t); t = setTimeout(() => fn(...a), ms); };
};

const REFRESH_MS = 5000;
const UNIT_STATUSES = [
  ['FREE', 'Ready to be allocated.'],
  ['ALLOCATING', 'Being set up for a new owner: user, SSH key, CPU slice, port fence.'],
  ['ALLOCATED', "In use: its owner logs in as the unit's user."],
  ['DEALLOCATING', 'Being wiped: processes stopped, key, jobs and files removed.'],
  ['ALLOCATION_FAIL', 'Setting up failed and was rolled back. Deallocate it to make it FREE again.'],
  ['DEALLOCATION_FAIL', 'Wiping failed part way. Deallocate it again, or run `kloigos reconcile` on the host.'],
  ['UNAVAILABLE', 'Its server is initializing or being decommissioned; it cannot be allocated.'],
];
const STATUS_HELP = Object.fromEntries(UNIT_STATUSES);
const DEALLOCATABLE = new Set(['ALLOCATED', 'ALLOCATION_FAIL', 'DEALLOCATION_FAIL']);
const HTTP_TITLES = {
  0: 'Network error', 400: 'Bad request', 401: 'Not signed in', 403: 'Not allowed', 404: 'Not found',
  409: 'Conflict', 422: 'Invalid request', 500: 'Server error',
};

// Units table columns: key, header, sort value (numbers sort numerically, strings naturally),
// width (the table has a fixed layout; columns without a width share what is left).
const COLUMNS = [
  ['compute_id', 'Compute id', (u) => u.compute_id, '13em'],
  ['rz', 'Region-zone', (u) => u.rz, '7.5em'],
  ['hostname', 'Hostname', (u) => u.hostname, '7em'],
  ['ip', 'IP', (u) => u.ip, '7em'],
  ['cpu_count', 'CPUs', (u) => u.cpu_count, '4.5em'],
  ['cpu_range', 'CPU range', (u) => u.firstCpu, '6.5em'],
  ['ports_range', 'Ports', (u) => u.firstPort, ''],
  ['started_at', 'Started at', (u) => u.started_at || '', '11em'],
  ['dep', 'Deployment id', (u) => u.dep, '8.5em'],
  ['owner', 'Owner', (u) => u.owner, '6em'],
  ['other', 'Other tags', (u) => u.otherText, ''],
  ['status', 'Status', (u) => u.status, '10.5em'],
];
const ROW_BUFFER = 40; // rows drawn above and below the visible ones
const SORT_OF = Object.fromEntries(COLUMNS.map(([k, , f]) => [k, f]));

/**
 * A link such as `/#token=klg_…` (demo.sh prints one) signs in: the token is kept for this browser
 * session and taken out of the address bar and its history entry at once. A fragment is never sent
 * to the server, so it reaches no log.
 */
function tokenFromAddress() {
  const m = /^#(?:.*&)?token=([^&]*)/.exec(window.location.hash);
  if (!m) return;
  let token = '';
  try { token = decodeURIComponent(m[1]).trim(); } catch { token = ''; }
  if (token) {
    sessionStorage.setItem('kloigos.token', token);
    sessionStorage.removeItem('kloigos.anonymous');
  }
  window.history.replaceState(null, '', window.location.pathname + window.location.search);
}
tokenFromAddress();

const state = {
  token: sessionStorage.getItem('kloigos.token') || '',
  role: 'readonly',
  view: 'units',
  units: [],
  unitsText: null,
  unitsVersion: 0,
  servers: [],
  serversText: null,
  filters: { q: '', status: '', hostname: '', rz: '', cpus: '' },
  sort: { key: 'compute_id', dir: 1 },
  rendered: {},
  rows: [], // the units table's rows, filtered and sorted
  win: { start: 0, end: 0 }, // the slice of rows in the DOM
  rowH: 28, // measured after the first draw
  events: { cursors: [], items: [], text: null, expanded: new Set() },
  session: 0, // bumped on sign-out: answers to older requests are dropped
  inspector: [],
  inspSel: 0,
};
// Read by the browser tests; harmless otherwise.
const stats = (window.kloigosStats = { renders: 0, lastRenderMs: 0, rows: 0, unitsVersion: 0 });

// ---- API -----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body, lines) {
    const l = lines || errorLines(status, body);
    super(l.join('; '));
    this.status = status;
    this.body = body;
    this.lines = l;
  }
}

/** The messages of an error body: FastAPI's 422 list as `loc : msg`, else its `detail`. */
function errorLines(status, body) {
  const d = body && typeof body === 'object' ? body.detail : undefined;
  if (Array.isArray(d)) return d.map((e) => `${(e.loc || []).join('.')} : ${e.msg}`);
  if (typeof d === 'string') return [d];
  if (typeof body === 'string' && body.trim()) return [body.trim().slice(0, 400)];
  return [status ? `HTTP ${status}` : 'the API could not be reached'];
}

/**
 * Calls the API. Resolves to `{ text, data }` (data parsed unless `raw`) for a 2xx answer,
 * otherwise throws an ApiError. A 401 also asks for a token again. `poll` marks background
 * refreshes, which the inspector shows only on request.
 */
async function api(method, path, body, { poll = false, raw = false } = {}) {
  const headers = { Accept: 'application/json' };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const init = { method, headers, cache: 'no-store' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const session = state.session;
  const t0 = performance.now();
  let status = 0;
  let statusText = '';
  let text = '';
  try {
    const res = await fetch(path, init);
    status = res.status;
    statusText = res.statusText;
    text = await res.text();
  } catch (e) {
    text = JSON.stringify({ detail: `network error: ${e.message}` });
  }
  if (session !== state.session) throw Object.assign(new ApiError(0, null, ['signed out']), { stale: true });
  const ms = performance.now() - t0;
  inspect({ method, path, reqBody: init.body, auth: !!state.token, status, statusText, text, ms, poll });
  const ok = status >= 200 && status < 300;
  let data = null;
  if (!ok || !raw) {
    try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  }
  if (status === 401) askToken(`The API answered 401: ${errorLines(status, data)[0]}`);
  if (!ok) throw new ApiError(status, data);
  return { text, data };
}

// ---- token and role --------------------------------------------------------------------------

function askToken(message) {
  const dlg = $('#token-dialog');
  const msg = $('#token-msg');
  msg.hidden = !message;
  msg.textContent = message || '';
  if (!dlg.open) {
    $('#token-input').value = '';
    dlg.showModal();
  }
  $('#token-input').focus();
}

function setToken(token, anonymous = false) {
  state.token = token;
  if (token) sessionStorage.setItem('kloigos.token', token);
  else sessionStorage.removeItem('kloigos.token');
  if (anonymous) sessionStorage.setItem('kloigos.anonymous', '1');
  else sessionStorage.removeItem('kloigos.anonymous');
}

function setRole(role, actor) {
  state.role = ['admin', 'user', 'readonly'].includes(role) ? role : 'readonly';
  state.actor = actor || '';
  document.body.dataset.role = state.role;
  $('#whoami').innerHTML = actor
    ? `<span class="role role-${esc(state.role)}">${esc(state.role)}</span> <span class="mono">${esc(actor)}</span>`
    : '';
  $('#sign-out').textContent = state.token ? 'Sign out' : 'Sign in';
}

async function loadWhoami() {
  try {
    const { data } = await api('GET', '/api/whoami');
    setRole(data.role, data.actor);
    return true;
  } catch (e) {
    if (e.status === 404) setRole('admin', 'no access control');
    else if (e.status === 401) return false;
    else setRole('readonly', '?');
    return true;
  }
}

async function boot() {
  if (!(await loadWhoami())) return;
  state.booted = true;
  api('GET', '/healthz')
    .then(({ data }) => {
      $('#host-info').textContent = data?.hostname ? `· ${data.hostname}${data.version ? ` · v${data.version}` : ''}` : '';
    })
    .catch(() => {});
  refresh(true);
}

// ---- refreshing ------------------------------------------------------------------------------

let inflight = null;
let again = false;

/** Reloads what the current view shows; `user` marks an explicit (not background) reload. */
async function refresh(user = false) {
  if (inflight) {
    again = again || user;
    return inflight;
  }
  inflight = (async () => {
    try {
      if (state.view === 'events') await loadEvents(!user);
      else await Promise.all([loadUnits(!user), state.view === 'servers' ? loadServers(!user) : null]);
      $('#updated').textContent = `updated ${new Date().toLocaleTimeString()}`;
      banner('');
    } catch (e) {
      if (e.status !== 401 && !e.stale) banner(`Cannot load data: ${e.message}`);
    }
  })();
  await inflight;
  inflight = null;
  if (again) {
    again = false;
    await refresh(true);
  }
}

/** Drops everything loaded under the previous identity. */
function forget() {
  state.session++;
  Object.assign(state, { units: [], unitsText: null, servers: [], serversText: null, inspector: [], rendered: {} });
  state.events = { cursors: [], items: [], text: null, expanded: new Set() };
  stats.unitsVersion = ++state.unitsVersion;
  renderUnits(true);
  renderServers(true);
  renderEvents();
  $('#insp-last').textContent = '';
  $('#updated').textContent = '';
}

function tick() {
  if (!$('#auto-refresh').checked || document.hidden || $('#token-dialog').open) return;
  refresh(false);
}

function banner(text) {
  const b = $('#banner');
  b.hidden = !text;
  b.textContent = text;
}

let toastTimer;
function toast(html) {
  const t = $('#toast');
  t.innerHTML = html;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, 8000);
}

// ---- units -----------------------------------------------------------------------------------

function tagValue(v) {
  return Array.isArray(v) ? v.join(',') : String(v);
}

/* The units table is windowed: all rows are filtered and sorted, but only the visible ones
   (plus a buffer) are in the DOM, between two spacer rows that keep the scroll height right.
   Rows have one fixed height (cells do not wrap), so row i is at i * rowH. */

/** Adds the derived fields the table sorts, filters and draws with, once per load. */
function prepUnit(u) {
  const tags = u.tags && typeof u.tags === 'object' ? u.tags : {};
  const other = Object.entries(tags).filter(([k]) => k !== 'deployment_id' && k !== 'owner');
  u.rz = `${u.region}-${u.zone}`;
  u.dep = tags.deployment_id != null ? tagValue(tags.deployment_id) : '';
  u.owner = tags.owner != null ? tagValue(tags.owner) : '';
  u.other = other.map(([k, v]) => [k, tagValue(v)]);
  u.otherText = u.other.map(([k, v]) => `${k}=${v}`).join(' ');
  u.firstCpu = parseInt(u.cpu_list || u.cpu_range, 10) || 0;
  u.firstPort = parseInt(u.ports_range || '', 10) || 0;
  u.cpus = u.cpu_list ? u.cpu_list.split(',').map(Number) : parseCpuList(u.cpu_range);
  u.hay = [u.compute_id, u.hostname, u.ip, u.rz, u.status, u.user, u.cpu_range, u.ports_range, u.dep, u.owner, u.otherText]
    .join(' ')
    .toLowerCase();
  return u;
}

async function loadUnits(poll) {
  const { text } = await api('GET', '/api/compute_units/', undefined, { poll, raw: true });
  if (text === state.unitsText) return;
  state.unitsText = text;
  state.units = JSON.parse(text).map(prepUnit);
  stats.unitsVersion = ++state.unitsVersion;
  updateUnitOptions();
  renderUnits();
  if (state.view === 'servers') renderServers();
}

/** Replaces a select's options with `values`, keeping the current choice even if it vanished. */
function setOptions(select, values, label = (v) => v) {
  const cur = select.value;
  if (cur && !values.includes(cur)) values = [...values, cur];
  const sig = values.join('\u0000');
  if (select.dataset.sig === sig) return;
  select.dataset.sig = sig;
  select.innerHTML = `<option value="">all</option>${values
    .map((v) => `<option value="${esc(v)}">${esc(label(v))}</option>`)
    .join('')}`;
  select.value = cur;
}

function distinct(list, f) {
  return [...new Set(list.map(f))].sort(collator.compare);
}

function updateUnitOptions() {
  const us = state.units;
  setOptions($('#f-status'), UNIT_STATUSES.map(([s]) => s));
  setOptions($('#f-hostname'), distinct(us, (u) => u.hostname));
  setOptions($('#f-rz'), distinct(us, (u) => u.rz));
  setOptions($('#f-cpus'), distinct(us, (u) => String(u.cpu_count)));
  const opts = (vals) => vals.map((v) => `<option value="${esc(v)}"></option>`).join('');
  $('#dl-regions').innerHTML = opts(distinct(us, (u) => u.region));
  $('#dl-zones').innerHTML = opts(distinct(us, (u) => u.zone));
  $('#dl-cpus').innerHTML = opts(distinct(us.filter((u) => u.status === 'FREE'), (u) => String(u.cpu_count)));
}

function filteredUnits() {
  const { q, status, hostname, rz, cpus } = state.filters;
  const words = q.toLowerCase().split(/\s+/).filter(Boolean);
  return state.units.filter(
    (u) =>
      (!status || u.status === status) &&
      (!hostname || u.hostname === hostname) &&
      (!rz || u.rz === rz) &&
      (!cpus || String(u.cpu_count) === cpus) &&
      words.every((w) => u.hay.includes(w)),
  );
}

function sortUnits(rows) {
  const get = SORT_OF[state.sort.key];
  const dir = state.sort.dir;
  const byId = (a, b) => collator.compare(a.compute_id, b.compute_id);
  return rows.sort((a, b) => {
    const x = get(a);
    const y = get(b);
    // Empty values last in both directions; ties by compute id.
    if (x === '' && y !== '') return 1;
    if (y === '' && x !== '') return -1;
    const c = typeof x === 'number' ? x - y : collator.compare(x, y);
    return c ? c * dir : byId(a, b);
  });
}

const badge = (s) => `<span class="badge st-${esc(s)}" title="${esc(STATUS_HELP[s] || '')}">${esc(s)}</span>`;

/** `2026-11-23T10:00:00.123Z` as `2026-11-23 10:00:00Z` (or to the minute); UTC as the API says. */
function startedShort(t, seconds = true) {
  if (!t) return '';
  const s = t.replace('T', ' ').replace(/\.\d+/, '');
  return seconds ? s : `${s.slice(0, 16)}Z`;
}

function unitRow(u, i) {
  const tags = u.other.map(([k, v]) => `<span class="tag">${esc(k)}=${esc(v)}</span>`).join('');
  // A user may give back only the units it allocated (the server enforces it too).
  const mine = state.role !== 'user' || u.allocated_by === state.actor;
  const act = DEALLOCATABLE.has(u.status) && mine
    ? `<button type="button" class="small danger-ghost need-user" data-action="deallocate" data-id="${esc(u.compute_id)}">Deallocate</button>`
    : '';
  return (
    `<tr data-id="${esc(u.compute_id)}" data-status="${esc(u.status)}" aria-rowindex="${i + 2}">` +
    `<td class="mono" title="${esc(u.compute_id)}">${esc(u.compute_id)}</td><td>${esc(u.rz)}</td><td>${esc(u.hostname)}</td>` +
    `<td class="mono" title="${esc(u.ip)}">${esc(u.ip)}</td><td class="num">${u.cpu_count}</td>` +
    `<td class="mono cpus" title="CPUs ${esc(u.cpu_list)}">${esc(u.cpu_range)}</td>` +
    `<td class="mono" title="ports ${esc(u.ports_range)}">${esc(u.ports_range)}</td>` +
    `<td title="${esc(u.started_at || '')}">${esc(startedShort(u.started_at, false))}</td>` +
    `<td title="${esc(u.dep)}">${esc(u.dep)}</td><td title="${esc(u.owner)}">${esc(u.owner)}</td>` +
    `<td class="tags" title="${esc(u.otherText)}">${tags}</td>` +
    `<td>${badge(u.status)}</td><td class="act">${act}</td></tr>`
  );
}

const spacer = (px) =>
  px > 0 ? `<tr class="spacer" aria-hidden="true"><td colspan="${COLUMNS.length + 1}" style="height:${px}px"></td></tr>` : '';

/** Puts the rows around the scroll position in the DOM (one innerHTML), if they are not already. */
function drawWindow(force = false) {
  const wrap = $('#units-wrap');
  const rows = state.rows;
  const h = state.rowH;
  const first = Math.floor(wrap.scrollTop / h);
  const last = first + Math.ceil(wrap.clientHeight / h) + 1;
  const { start, end } = state.win;
  const inside = (first >= start + 5 || start === 0) && (last <= end - 5 || end >= rows.length);
  if (!force && inside) return;
  const s = Math.max(0, first - ROW_BUFFER);
  const e = Math.min(rows.length, last + ROW_BUFFER);
  let html = spacer(s * h);
  for (let i = s; i < e; i++) html += unitRow(rows[i], i);
  html += spacer((rows.length - e) * h);
  const body = $('#units-body');
  body.innerHTML = html;
  state.win = { start: s, end: e };
  // The real row height (fonts differ): measured once, then the window is drawn again.
  const measured = body.querySelector('tr[data-id]')?.getBoundingClientRect().height;
  if (measured && Math.abs(measured - h) > 0.25) {
    state.rowH = measured;
    drawWindow(true);
  }
}

function renderUnits(force = false) {
  const query = `${JSON.stringify(state.filters)}|${state.sort.key}|${state.sort.dir}`;
  const key = `${state.unitsVersion}|${query}`;
  if (!force && key === state.rendered.units) return;
  // A new query starts at the top; new data under the same query keeps the scroll position.
  if (state.rendered.units && !state.rendered.units.endsWith(`|${query}`)) $('#units-wrap').scrollTop = 0;
  state.rendered.units = key;
  const t0 = performance.now();
  state.rows = sortUnits(filteredUnits());
  drawWindow(true);
  const shown = state.rows.length;
  const total = state.units.length;
  $('#units-table').setAttribute('aria-rowcount', String(shown + 1));
  $('#units-empty').hidden = shown > 0 || total === 0;
  $('#units-count').textContent = shown === total ? `(${total})` : `(${shown} of ${total})`;
  renderSummary();
  for (const th of $$('#units-head th[data-key]')) {
    const on = th.dataset.key === state.sort.key;
    th.setAttribute('aria-sort', on ? (state.sort.dir > 0 ? 'ascending' : 'descending') : 'none');
  }
  stats.lastRenderMs = performance.now() - t0;
  stats.rows = shown;
  stats.renders++;
}

function renderSummary() {
  const counts = {};
  for (const u of state.units) counts[u.status] = (counts[u.status] || 0) + 1;
  $('#status-summary').innerHTML = UNIT_STATUSES.filter(([s]) => counts[s] || s === 'FREE' || s === 'ALLOCATED')
    .map(
      ([s, help]) =>
        `<button type="button" class="chip" data-action="status-filter" data-status="${s}" aria-pressed="${state.filters.status === s}" title="${esc(help)}">` +
        `${badge(s)} <span class="count">${counts[s] || 0}</span></button>`,
    )
    .join('');
}

function readFilters() {
  state.filters = {
    q: $('#f-search').value.trim(),
    status: $('#f-status').value,
    hostname: $('#f-hostname').value,
    rz: $('#f-rz').value,
    cpus: $('#f-cpus').value,
  };
  renderUnits();
}

// ---- servers and the CPU map ----------------------------------------------------------------

/** Linux cpulist syntax: `0-15`, `0,2,4`, `0-30:2`. */
function parseCpuList(s) {
  const out = [];
  for (const part of String(s || '').split(',')) {
    const m = part.trim().match(/^(\d+)(?:-(\d+)(?::(\d+))?)?$/);
    if (!m) continue;
    const a = +m[1];
    const b = m[2] != null ? +m[2] : a;
    const step = m[3] ? +m[3] : 1;
    for (let i = a; i <= b && out.length < 100000; i += step) out.push(i);
  }
  return out;
}

async function loadServers(poll) {
  const { text } = await api('GET', '/api/admin/servers', undefined, { poll, raw: true });
  if (text === state.serversText) return;
  state.serversText = text;
  state.servers = JSON.parse(text);
  renderServers();
}

function renderServers(force = false) {
  const key = `${state.unitsVersion}|${state.serversText}`;
  if (!force && key === state.rendered.servers) return;
  state.rendered.servers = key;
  const byHost = new Map();
  for (const u of state.units) {
    if (!byHost.has(u.hostname)) byHost.set(u.hostname, []);
    byHost.get(u.hostname).push(u);
  }
  // This host first, decommissioned ones last.
  const rank = (s) => (s.local ? 0 : s.status === 'DECOMMISSIONED' ? 2 : 1);
  const servers = [...state.servers].sort((a, b) => rank(a) - rank(b) || collator.compare(a.hostname, b.hostname));
  const retired = servers.filter((s) => s.status === 'DECOMMISSIONED').length;
  $('#servers-count').textContent = `(${servers.length - retired}${retired ? ` + ${retired} decommissioned` : ''})`;
  $('#servers-list').innerHTML = servers.length
    ? servers.map((s) => serverCard(s, byHost.get(s.hostname) || [])).join('')
    : '<p class="empty">No server yet. An admin adds one with “Init server”.</p>';
  const sel = $('#decom-hostname');
  const cur = sel.value;
  sel.innerHTML = servers
    .filter((s) => s.status !== 'DECOMMISSIONED')
    .map((s) => `<option>${esc(s.hostname)}</option>`)
    .join('');
  if (cur) sel.value = cur;
}

/** A fleet host's state on its server card: reachable or not, stale, last report, drift. */
function hostState(s) {
  if (s.local || s.inventory_only) return '';
  const h = s.host;
  if (!h || !h.joined) return '<span class="tag host-bad" data-testid="host-state">not joined</span>';
  const bad = h.unreachable_since || h.stale;
  const words = [];
  if (h.unreachable_since) words.push(`unreachable since ${startedShort(h.unreachable_since)}`);
  else words.push('reachable');
  if (h.stale) words.push('stale');
  words.push(h.last_report_at ? `report ${startedShort(h.last_report_at)}` : 'no report');
  if (h.version) words.push(`v${h.version}`);
  const drift = (h.drift || []).length;
  if (drift) words.push(`drift ${drift}`);
  const title = drift ? `Repaired at the last pull:\n${h.drift.join('\n')}` : 'No drift at the last pull';
  return `<span class="tag ${bad ? 'host-bad' : 'host-ok'}" data-testid="host-state" title="${esc(title)}">${esc(words.join(' · '))}</span>`;
}

function serverCard(s, units) {
  const head =
    `<header class="server-head"><h2>${esc(s.hostname)}</h2>` +
    `<span class="badge sv-${esc(s.status)}">${esc(s.status)}</span>${s.local ? '<span class="tag">this host</span>' : ''}` +
    (s.inventory_only ? '<span class="tag inv" data-testid="inventory-only" title="Recorded only: Kloigos does not configure this host">inventory only</span>' : '') +
    hostState(s) +
    `<span class="mono">${esc(s.ip)}</span><span>${esc(s.region)}-${esc(s.zone)}</span>`;
  if (s.status === 'DECOMMISSIONED') {
    return `<article class="server retired" data-host="${esc(s.hostname)}" data-testid="server-card">${head}` +
      `<span class="muted">created ${esc(startedShort(s.created_at))}</span></header></article>`;
  }
  units = [...units].sort((a, b) => a.firstCpu - b.firstCpu);
  const owner = new Map(); // cpu -> unit index
  units.forEach((u, i) => u.cpus.forEach((c) => owner.set(c, i)));
  const groups = [];
  const placed = new Set();
  for (const n of s.numa_nodes || []) {
    const cpus = parseCpuList(n.cpus);
    cpus.forEach((c) => placed.add(c));
    groups.push([`NUMA node ${n.node}`, n.cpus, cpus]);
  }
  const rest = [...owner.keys()].filter((c) => !placed.has(c)).sort((a, b) => a - b);
  if (rest.length) {
    groups.push([groups.length ? 'Other CPUs' : 'CPUs', groups.length ? '' : 'NUMA layout unknown', rest, !groups.length]);
  }
  const counts = {};
  for (const u of units) counts[u.status] = (counts[u.status] || 0) + 1;
  const countText = Object.entries(counts).map(([st, n]) => `${n} ${st}`).join(', ');
  const cell = (c) => {
    const i = owner.get(c);
    if (i === undefined) return `<span class="cpu none" title="CPU ${c}: in no unit">${c}</span>`;
    const u = units[i];
    return `<span class="cpu st-${esc(u.status)}${i % 2 ? ' alt' : ''}" data-u="${i}" data-id="${esc(u.compute_id)}" title="CPU ${c}: ${esc(u.compute_id)} ${esc(u.status)}">${c}</span>`;
  };
  const map = groups
    .map(
      ([label, sub, cpus, flat]) =>
        `<div class="numa${flat ? ' flat' : ''}" data-testid="numa-group"><div class="numa-label">${esc(label)} <span class="muted mono">${esc(sub)}</span></div>` +
        `<div class="cells">${cpus.map(cell).join('')}</div></div>`,
    )
    .join('');
  return (
    `<article class="server" data-host="${esc(s.hostname)}" data-testid="server-card">${head}` +
    `<span class="muted">${units.length} units${countText ? ` (${esc(countText)})` : ''} · ports from ${esc(s.port_base)}, ${esc(s.ports_per_cpu)}/CPU</span>` +
    `<span class="grow"></span>` +
    `<button type="button" class="small danger-ghost need-admin" data-action="decommission" data-host="${esc(s.hostname)}">Decommission…</button></header>` +
    `<div class="cpumap">${map || '<p class="muted">No CPU known.</p>'}</div>` +
    `<p class="cell-info muted" aria-live="polite">Hover a CPU to see its unit; click it to list the unit.</p></article>`
  );
}

let hovered = null;
function hoverCell(e) {
  const cell = e.target.closest?.('.cpu[data-u]');
  const card = e.target.closest?.('.server');
  const key = cell && card ? `${card.dataset.host}|${cell.dataset.u}` : null;
  if (key === hovered) return;
  hovered = key;
  $$('#servers-list .cpu.hl').forEach((c) => c.classList.remove('hl'));
  if (!cell) return;
  $$(`.cpu[data-u="${cell.dataset.u}"]`, card).forEach((c) => c.classList.add('hl'));
  const u = state.units.find((x) => x.compute_id === cell.dataset.id);
  if (u) {
    $('.cell-info', card).innerHTML =
      `${badge(u.status)} <strong class="mono">${esc(u.compute_id)}</strong> · ${u.cpu_count} CPUs (${esc(u.cpu_range)}) · ports ${esc(u.ports_range)}` +
      ` · user ${esc(u.user)}${u.owner ? ` · owner ${esc(u.owner)}` : ''}${u.dep ? ` · deployment ${esc(u.dep)}` : ''}`;
  }
}

// ---- audit log -------------------------------------------------------------------------------

function eventQuery() {
  const p = new URLSearchParams({ limit: $('#e-limit').value });
  const before = state.events.cursors.at(-1);
  if (before != null) p.set('before', before);
  for (const [name, id] of [['compute_id', '#e-compute'], ['hostname', '#e-hostname'], ['operation', '#e-operation'], ['actor', '#e-actor']]) {
    const v = $(id).value.trim();
    if (v) p.set(name, v);
  }
  return p.toString();
}

async function loadEvents(poll) {
  const ev = state.events;
  if (poll && ev.cursors.length) return; // only the newest page follows new events
  const { text } = await api('GET', `/api/events?${eventQuery()}`, undefined, { poll, raw: true });
  if (text === ev.text) return;
  ev.text = text;
  ev.items = JSON.parse(text);
  renderEvents();
}

const pretty = (v) => (v == null ? '—' : JSON.stringify(v, null, 2));

function renderEvents() {
  const ev = state.events;
  const limit = +$('#e-limit').value;
  const focusId = document.activeElement?.closest?.('#events-body tr')?.dataset.eid;
  $('#events-body').innerHTML = ev.items
    .map((e) => {
      const open = ev.expanded.has(e.id);
      const main =
        `<tr data-eid="${e.id}" class="${open ? 'open' : ''}"><td><button type="button" class="expander" data-action="expand" aria-expanded="${open}" aria-label="Before and after of event ${e.id}">${open ? '▾' : '▸'}</button></td>` +
        `<td class="num">${e.id}</td><td class="nowrap" title="${esc(e.time)}">${esc(startedShort(e.time))}</td><td class="mono">${esc(e.actor)}</td>` +
        `<td>${esc(e.operation)}</td><td class="mono">${esc(e.compute_id || '')}</td><td>${esc(e.hostname || '')}</td>` +
        `<td><span class="badge res-${e.result === 'ok' ? 'ok' : 'error'}">${esc(e.result)}</span></td>` +
        `<td class="detail" title="${esc(e.detail || '')}">${esc(e.detail || '')}</td></tr>`;
      const more = open
        ? `<tr class="ev-more" data-for="${e.id}"><td></td><td colspan="8"><div class="before-after">` +
          `<div><h3>Before</h3><pre class="code">${esc(pretty(e.before))}</pre></div>` +
          `<div><h3>After</h3><pre class="code">${esc(pretty(e.after))}</pre></div></div></td></tr>`
        : '';
      return main + more;
    })
    .join('');
  $('#events-empty').hidden = ev.items.length > 0;
  $('#e-newer').disabled = ev.cursors.length === 0;
  $('#e-older').disabled = ev.items.length < limit;
  const ids = ev.items.map((e) => e.id);
  $('#e-page').textContent = ids.length
    ? `page ${ev.cursors.length + 1} · events #${ids[0]}–#${ids.at(-1)}`
    : `page ${ev.cursors.length + 1}`;
  if (focusId) $(`#events-body tr[data-eid="${focusId}"] .expander`)?.focus();
}

function resetEvents() {
  state.events.cursors = [];
  state.events.text = null;
  refresh(true);
}

// ---- API inspector ---------------------------------------------------------------------------

const MAX_SHOWN = 30000;

function inspect(entry) {
  if (entry.poll && !$('#insp-polls').checked) return;
  entry.at = new Date();
  state.inspector.unshift(entry);
  state.inspector.length = Math.min(state.inspector.length, 25);
  state.inspSel = 0;
  $('#insp-last').textContent = `${entry.method} ${entry.path} → ${entry.status || 'network error'} · ${entry.ms.toFixed(0)} ms`;
  if ($('#inspector').open) renderInspector();
}

function prettyText(text) {
  if (!text) return '';
  let out = text;
  try { out = JSON.stringify(JSON.parse(text), null, 2); } catch { /* not JSON: as is */ }
  return out.length > MAX_SHOWN ? `${out.slice(0, MAX_SHOWN)}\n… (${out.length - MAX_SHOWN} more characters)` : out;
}

function renderInspector() {
  const list = state.inspector;
  $('#insp-history').innerHTML = list
    .map(
      (e, i) =>
        `<li><button type="button" class="link${i === state.inspSel ? ' sel' : ''}" data-action="inspect" data-i="${i}">` +
        `<span class="st ${e.status >= 200 && e.status < 300 ? 'ok' : 'bad'}">${e.status || 'ERR'}</span> ${esc(e.method)} ${esc(e.path)}</button></li>`,
    )
    .join('');
  const e = list[state.inspSel];
  if (!e) {
    $('#insp-req').textContent = 'No request yet.';
    $('#insp-res').textContent = '';
    $('#insp-status').textContent = '';
    return;
  }
  $('#insp-req').textContent =
    `${e.method} ${e.path}\n${e.auth ? 'Authorization: Bearer ••••••\n' : ''}${e.reqBody ? `\n${prettyText(e.reqBody)}` : ''}`;
  $('#insp-status').innerHTML =
    `<span class="st ${e.status >= 200 && e.status < 300 ? 'ok' : 'bad'}">${e.status || 'network error'} ${esc(e.statusText || '')}</span>` +
    ` <span class="muted">${e.ms.toFixed(1)} ms · ${e.at.toLocaleTimeString()}</span>`;
  $('#insp-res').textContent = prettyText(e.text) || '(empty body)';
}

// ---- dialogs ---------------------------------------------------------------------------------

function openDialog(dlg) {
  clearErrors(dlg);
  dlg.showModal();
  dlg.querySelector('input:not([type=hidden]), select, textarea, button.primary, button.danger')?.focus();
}

function clearErrors(dlg) {
  const box = dlg.querySelector('.errors');
  if (box) { box.hidden = true; box.innerHTML = ''; }
  dlg.querySelectorAll('[aria-invalid]').forEach((el) => el.removeAttribute('aria-invalid'));
}

function showErrors(dlg, err) {
  const box = dlg.querySelector('.errors');
  const status = err.status ?? 0;
  const title = err instanceof ApiError && !err.client
    ? `${status ? `${status} ` : ''}${HTTP_TITLES[status] || 'Error'}`
    : 'Please check the form';
  box.innerHTML = `<strong>${esc(title)}</strong><ul>${(err.lines || [err.message]).map((l) => `<li>${esc(l)}</li>`).join('')}</ul>`;
  box.hidden = false;
  // Mark the fields a 422 names (loc = ["body", field, ...]).
  const detail = err.body?.detail;
  if (Array.isArray(detail)) {
    for (const d of detail) {
      const field = d.loc?.[0] === 'body' ? d.loc[1] : undefined;
      if (typeof field === 'string') dlg.querySelector(`[name="${CSS.escape(field)}"]`)?.setAttribute('aria-invalid', 'true');
    }
  }
}

function clientError(lines) {
  const e = new ApiError(0, null, lines);
  e.client = true;
  return e;
}

/** Runs a dialog's action: busy button, errors shown in the dialog, closed on success. */
async function submitDialog(dlg, action) {
  const btn = dlg.querySelector('button[type=submit]');
  clearErrors(dlg);
  btn.disabled = true;
  dlg.setAttribute('aria-busy', 'true');
  try {
    await action();
    dlg.close();
  } catch (e) {
    showErrors(dlg, e);
  } finally {
    btn.disabled = false;
    dlg.removeAttribute('aria-busy');
  }
}

/** `key=value` lines (strings), or `key:=JSON` for numbers and lists. */
function parseTags(text) {
  const tags = {};
  const errors = [];
  text.split('\n').forEach((line, i) => {
    line = line.trim();
    if (!line || line.startsWith('#')) return;
    const typed = line.match(/^([^=:]+):=(.*)$/);
    const plain = line.match(/^([^=]+)=(.*)$/);
    if (typed) {
      try { tags[typed[1].trim()] = JSON.parse(typed[2]); } catch { errors.push(`tags line ${i + 1} : ${typed[2].trim()} is not JSON`); }
    } else if (plain) {
      tags[plain[1].trim()] = plain[2].trim();
    } else {
      errors.push(`tags line ${i + 1} : expected key=value`);
    }
  });
  return { tags, errors };
}

/** One range per line when there are several lines, else split on commas and spaces. */
function parseRanges(text) {
  const lines = text.split('\n').map((l) => l.trim()).filter(Boolean);
  if (lines.length > 1) return lines.map((l) => l.replace(/\s+/g, ''));
  return (lines[0] || '').split(/[,\s]+/).filter(Boolean);
}

function freeHint() {
  const region = $('#alloc-region').value.trim();
  const zone = $('#alloc-zone').value.trim();
  const free = {};
  for (const u of state.units) {
    if (u.status === 'FREE' && (!region || u.region === region) && (!zone || u.zone === zone)) {
      free[u.cpu_count] = (free[u.cpu_count] || 0) + 1;
    }
  }
  const parts = Object.entries(free).sort((a, b) => a[0] - b[0]).map(([c, n]) => `${n} × ${c} CPUs`);
  $('#alloc-free').textContent = parts.length ? `FREE now: ${parts.join(' · ')}` : 'No FREE unit matches this region and zone.';
}

function openDeallocate(id) {
  const u = state.units.find((x) => x.compute_id === id);
  const dlg = $('#dealloc-dialog');
  dlg.dataset.id = id;
  $('#dealloc-id').textContent = id;
  $('#dealloc-info').textContent = u
    ? `${u.cpu_count} CPUs on ${u.hostname}, user ${u.user}${u.owner ? `, owner ${u.owner}` : ''}${u.dep ? `, deployment ${u.dep}` : ''}; ${u.status}`
    : '';
  openDialog(dlg);
}

async function openDecommission(host) {
  try { await loadServers(false); } catch { /* the dialog shows the error on submit */ }
  if (host) $('#decom-hostname').value = host;
  $('#decom-force').checked = false;
  openDialog($('#decom-dialog'));
}

// ---- wiring ----------------------------------------------------------------------------------

function route() {
  const v = (location.hash.match(/^#\/(\w+)/) || [])[1];
  state.view = ['units', 'servers', 'events'].includes(v) ? v : 'units';
  document.body.dataset.view = state.view;
  for (const name of ['units', 'servers', 'events']) {
    $(`#view-${name}`).hidden = name !== state.view;
    const tab = $(`#tab-${name}`);
    if (name === state.view) tab.setAttribute('aria-current', 'page');
    else tab.removeAttribute('aria-current');
  }
  if (state.view === 'servers') renderServers();
  if (state.view === 'units') drawWindow(true); // it may have been drawn while hidden
  if (state.booted) refresh(true);
}

function init() {
  $('#units-cols').innerHTML =
    COLUMNS.map(([k, , , w]) => `<col class="c-${k}"${w ? ` style="width:${w}"` : ''}>`).join('') + '<col style="width:7.5em">';
  $('#units-head').innerHTML =
    COLUMNS.map(([k, label]) => `<th scope="col" data-key="${k}" aria-sort="none"><button type="button" class="sort" data-sort="${k}">${esc(label)}<span class="arrow" aria-hidden="true"></span></button></th>`).join('') +
    '<th scope="col"><span class="sr-only">Actions</span></th>';
  $('#legend-list').innerHTML = UNIT_STATUSES.map(([s, help]) => `<div><dt>${badge(s)}</dt><dd>${esc(help)}</dd></div>`).join('');

  // Units: sorting, filters, row actions (all delegated).
  $('#units-head').addEventListener('click', (e) => {
    const key = e.target.closest('[data-sort]')?.dataset.sort;
    if (!key) return;
    state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : 1 };
    renderUnits();
  });
  let frame = 0;
  const onScroll = () => {
    if (!frame) frame = requestAnimationFrame(() => { frame = 0; drawWindow(); });
  };
  $('#units-wrap').addEventListener('scroll', onScroll, { passive: true });
  window.addEventListener('resize', onScroll);
  const filters = $('#unit-filters');
  filters.addEventListener('change', readFilters);
  $('#f-search').addEventListener('input', debounce(readFilters, 200));
  filters.addEventListener('reset', () => setTimeout(readFilters));

  document.addEventListener('click', (e) => {
    const t = e.target.closest('[data-action], [data-close]');
    if (!t) return;
    if (t.hasAttribute('data-close')) { t.closest('dialog')?.close(); return; }
    switch (t.dataset.action) {
      case 'deallocate': openDeallocate(t.dataset.id); break;
      case 'decommission': openDecommission(t.dataset.host); break;
      case 'status-filter':
        $('#f-status').value = state.filters.status === t.dataset.status ? '' : t.dataset.status;
        readFilters();
        break;
      case 'expand': {
        const id = +t.closest('tr').dataset.eid;
        const ex = state.events.expanded;
        if (ex.has(id)) ex.delete(id); else ex.add(id);
        renderEvents();
        break;
      }
      case 'inspect': state.inspSel = +t.dataset.i; renderInspector(); break;
      default:
    }
  });

  // Servers: hover to highlight a unit, click to list it.
  const list = $('#servers-list');
  list.addEventListener('mouseover', hoverCell);
  list.addEventListener('mouseleave', hoverCell);
  list.addEventListener('click', (e) => {
    const id = e.target.closest('.cpu[data-id]')?.dataset.id;
    if (!id) return;
    $('#f-search').value = id;
    readFilters();
    location.hash = '#/units';
  });

  // Audit log.
  const ef = $('#event-filters');
  ef.addEventListener('change', resetEvents);
  ef.addEventListener('input', debounce((e) => { if (e.target.type === 'search') resetEvents(); }, 300));
  ef.addEventListener('reset', () => setTimeout(resetEvents));
  $('#e-older').addEventListener('click', () => {
    const last = state.events.items.at(-1);
    if (!last) return;
    state.events.cursors.push(last.id);
    refresh(true);
  });
  $('#e-newer').addEventListener('click', () => {
    state.events.cursors.pop();
    refresh(true);
  });

  // Header.
  $('#sign-out').addEventListener('click', () => {
    state.booted = false;
    setToken('');
    forget();
    setRole('readonly', '');
    askToken('');
  });
  const auto = $('#auto-refresh');
  auto.checked = sessionStorage.getItem('kloigos.autoRefresh') !== '0';
  auto.addEventListener('change', () => sessionStorage.setItem('kloigos.autoRefresh', auto.checked ? '1' : '0'));
  $('#inspector').addEventListener('toggle', () => { if ($('#inspector').open) renderInspector(); });

  // Token dialog.
  const td = $('#token-dialog');
  td.addEventListener('cancel', (e) => e.preventDefault()); // choose a button instead
  $('#token-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const token = $('#token-input').value.trim();
    if (!token) { askToken('Enter a token, or continue without one.'); return; }
    setToken(token);
    td.close();
    boot();
  });
  $('#token-skip').addEventListener('click', () => {
    setToken('', true);
    td.close();
    boot();
  });

  // Allocate.
  $('#allocate-open').addEventListener('click', () => { freeHint(); openDialog($('#alloc-dialog')); });
  $('#alloc-region').addEventListener('input', freeHint);
  $('#alloc-zone').addEventListener('input', freeHint);
  $('#alloc-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const dlg = $('#alloc-dialog');
    submitDialog(dlg, async () => {
      const { tags, errors } = parseTags($('#alloc-tags').value);
      if (errors.length) throw clientError(errors);
      const body = { ssh_public_key: $('#alloc-key').value.trim() };
      const count = $('#alloc-cpu-count').value.trim();
      if (count) body.cpu_count = Number.isFinite(+count) ? +count : count;
      for (const f of ['region', 'zone']) {
        const v = $(`#alloc-${f}`).value.trim();
        if (v) body[f] = v;
      }
      body.tags = tags; // required by the API (upstream v0.2), even when empty
      const { data: u } = await api('POST', '/api/compute_units/allocate', body);
      toast(`Allocated <strong class="mono">${esc(u.compute_id)}</strong>: <code>ssh ${esc(u.user)}@${esc(u.ip)}</code>, ports ${esc(u.ports_range)}`);
      $('#alloc-key').value = '';
      refresh(true);
    });
  });

  // Deallocate.
  $('#dealloc-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const dlg = $('#dealloc-dialog');
    submitDialog(dlg, async () => {
      const id = dlg.dataset.id;
      await api('DELETE', `/api/compute_units/deallocate/${encodeURIComponent(id)}`);
      toast(`Deallocated <strong class="mono">${esc(id)}</strong>.`);
      refresh(true);
    });
  });

  // Init server.
  $('#init-open').addEventListener('click', () => { $('#init-preview').textContent = ''; openDialog($('#init-dialog')); });
  $('#init-ranges').addEventListener('input', () => {
    const r = parseRanges($('#init-ranges').value);
    $('#init-preview').textContent = r.length ? `${r.length} unit${r.length > 1 ? 's' : ''}: ${r.slice(0, 40).join(' | ')}${r.length > 40 ? ' …' : ''}` : '';
  });
  $('#init-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const dlg = $('#init-dialog');
    submitDialog(dlg, async () => {
      const body = {};
      for (const f of ['hostname', 'ip', 'region', 'zone']) body[f] = $(`#init-${f}`).value.trim();
      body.cpu_ranges = parseRanges($('#init-ranges').value);
      for (const [f, id] of [['port_base', '#init-port-base'], ['ports_per_cpu', '#init-ports-per-cpu'], ['uid_base', '#init-uid-base']]) {
        const v = $(id).value.trim();
        if (v) body[f] = +v;
      }
      if ($('#init-inventory-only').checked) body.inventory_only = true;
      await api('POST', '/api/admin/init_server', body);
      toast(`Server <strong>${esc(body.hostname)}</strong> initialized with ${body.cpu_ranges.length} units.`);
      $('#init-form').reset();
      refresh(true);
    });
  });

  // Decommission.
  $('#decom-open').addEventListener('click', () => openDecommission());
  $('#decom-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const dlg = $('#decom-dialog');
    submitDialog(dlg, async () => {
      const host = $('#decom-hostname').value;
      if (!host) throw clientError(['hostname : choose a server']);
      const force = $('#decom-force').checked;
      await api('DELETE', `/api/admin/decommission_server/${encodeURIComponent(host)}?force=${force}`);
      toast(`Server <strong>${esc(host)}</strong> decommissioned.`);
      refresh(true);
    });
  });

  window.addEventListener('hashchange', route);
  document.addEventListener('visibilitychange', () => { if (!document.hidden) tick(); });
  setInterval(tick, REFRESH_MS);

  route();
  if (state.token || sessionStorage.getItem('kloigos.anonymous')) boot();
  else askToken('');
}

init();
