// Browser test of the Kloigos dashboard, driven by playwright-core with Debian's Chromium.
// Normally started by run.sh, which builds kloigos, starts `kloigos serve` on a fake root and
// passes its address in the environment:
//
//   KLOIGOS_URL             http://127.0.0.1:PORT (required)
//   KLOIGOS_TOKEN           admin bearer token (unset: the server runs without tokens)
//   KLOIGOS_READONLY_TOKEN  a readonly token, for the role checks (optional)
//   KLOIGOS_LOCAL_HOST      hostname of the fake root, already initialized (default webhost)
//   KLOIGOS_ONLINE_CPUS     CPUs of the fake root (default 64)
//   SCREENSHOTS             where the PNGs go (default <repo>/target/browser)
//
// Prints `ok - <step>` / `not ok - <step>: <reason>` and ends with `browser: N passed, M failed`.
import { chromium } from 'playwright-core';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, '../..');
const base = (process.env.KLOIGOS_URL || '').replace(/\/$/, '');
const token = process.env.KLOIGOS_TOKEN || '';
const readonlyToken = process.env.KLOIGOS_READONLY_TOKEN || '';
const localHost = process.env.KLOIGOS_LOCAL_HOST || 'webhost';
const onlineCpus = Number(process.env.KLOIGOS_ONLINE_CPUS || 64);
const shots = process.env.SCREENSHOTS || path.join(repo, 'target/browser');
if (!base) {
  console.error('KLOIGOS_URL is not set (run tests/browser/run.sh)');
  process.exit(2);
}
mkdirSync(shots, { recursive: true });

let passed = 0;
let failed = 0;
const jsErrors = [];
const oneLine = (s) => String(s).split('\n').filter((l) => l.trim())[0]?.slice(0, 300) || 'failed';

async function step(name, fn) {
  try {
    const note = await fn();
    passed++;
    console.log(`ok - ${name}${note ? ` # ${note}` : ''}`);
  } catch (e) {
    failed++;
    console.log(`not ok - ${name}: ${oneLine(e.message)}`);
    await shot(`fail-${name.replace(/[^a-z0-9]+/gi, '-').toLowerCase()}`).catch(() => {});
  }
}

function check(cond, message) {
  if (!cond) throw new Error(message);
}

/** The API, as a script (for setup the dashboard is not under test for). */
async function api(method, p, body) {
  const headers = { 'content-type': 'application/json' };
  if (token) headers.authorization = `Bearer ${token}`;
  const res = await fetch(base + p, { method, headers, body: body && JSON.stringify(body) });
  const text = await res.text();
  if (!res.ok) throw new Error(`${method} ${p}: ${res.status} ${text.slice(0, 200)}`);
  return text ? JSON.parse(text) : null;
}

// A fresh key, as a user would paste it.
const keyDir = mkdtempSync(path.join(tmpdir(), 'kloigos-browser-'));
execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'browser-test', '-f', path.join(keyDir, 'id')]);
const sshKey = readFileSync(path.join(keyDir, 'id.pub'), 'utf8').trim();
rmSync(keyDir, { recursive: true, force: true });

const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic',
  ],
});
const context = await browser.newContext({ viewport: { width: 1440, height: 900 } });
const page = await context.newPage();
page.setDefaultTimeout(10000);
page.on('pageerror', (e) => jsErrors.push(e.message));
page.on('console', (m) => {
  // Failed API calls are logged by Chromium as resource errors; those are expected here.
  if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) jsErrors.push(m.text());
});
const shot = (name) => page.screenshot({ path: path.join(shots, `${name}.png`) });
const t0 = Date.now();
let unitId = '';

async function signIn(secret) {
  await page.waitForSelector('#token-dialog[open]');
  if (secret) {
    await page.fill('#token-input', secret);
    await page.click('#token-submit');
  } else {
    await page.click('#token-skip');
  }
  await closed('token-dialog');
}

/** Waits until a dialog is closed (a closed dialog is hidden, so waitForSelector cannot). */
function closed(id) {
  return page.waitForFunction((i) => !document.getElementById(i).open, id);
}

async function signOut() {
  await page.click('#sign-out');
  await page.waitForSelector('#token-dialog[open]');
}

await step('dashboard loads and asks for a token', async () => {
  const res = await page.goto(`${base}/`);
  check(res.status() === 200, `GET / answered ${res.status()}`);
  await page.waitForSelector('#token-dialog[open]');
  const css = await page.evaluate(() => getComputedStyle(document.querySelector('.top')).display);
  check(css === 'flex', 'app.css is not applied');
  await shot('01-token-prompt');
});

await step(token ? 'signs in with the admin token' : 'continues without a token (no --tokens)', async () => {
  await signIn(token);
  await page.waitForSelector('#units-body tr');
  const who = await page.textContent('#whoami');
  check(/admin/.test(who), `whoami shows ${JSON.stringify(who)}`);
  const stored = await page.evaluate(() => sessionStorage.getItem('kloigos.token'));
  check(stored === (token || null), 'token not kept in sessionStorage');
  await shot('02-units');
  return `whoami: ${who.trim()}`;
});

await step('allocates a unit through the dialog', async () => {
  await page.click('#allocate-open');
  await page.waitForSelector('#alloc-dialog[open]');
  await page.fill('#alloc-cpu-count', '4');
  await page.fill('#alloc-tags', 'deployment_id=browser-test\nowner=playwright\nteam=web');
  await page.fill('#alloc-key', sshKey);
  await shot('03-allocate-dialog');
  await page.click('#alloc-submit');
  await closed('alloc-dialog');
  const row = page.locator('#units-body tr[data-status="ALLOCATED"]', { hasText: 'browser-test' });
  await row.first().waitFor();
  unitId = await row.first().getAttribute('data-id');
  check(unitId, 'no ALLOCATED row with deployment browser-test');
  const cells = await row.first().locator('td').allTextContents();
  check(cells.includes('playwright'), `owner column missing: ${cells.join('|')}`);
  check(cells.some((c) => c.includes('team=web')), 'other tags missing');
  await shot('04-allocated');
  return unitId;
});

await step('deallocates it through the row button and the confirm dialog', async () => {
  check(unitId, 'nothing was allocated');
  await page.click(`#units-body button[data-action="deallocate"][data-id="${unitId}"]`);
  await page.waitForSelector('#dealloc-dialog[open]');
  check((await page.textContent('#dealloc-id')) === unitId, 'the dialog names another unit');
  await shot('05-deallocate-confirm');
  await page.click('#dealloc-confirm');
  await closed('dealloc-dialog');
  await page.waitForSelector(`#units-body tr[data-id="${unitId}"][data-status="FREE"]`);
  await shot('06-deallocated');
});

await step('shows 422 validation errors in the dialog', async () => {
  await page.click('#allocate-open');
  await page.waitForSelector('#alloc-dialog[open]');
  await page.fill('#alloc-cpu-count', '0');
  await page.fill('#alloc-tags', '');
  await page.fill('#alloc-key', 'not-a-key');
  await page.click('#alloc-submit');
  const box = page.locator('#alloc-dialog [data-testid="dialog-errors"]');
  await box.waitFor({ state: 'visible' });
  const text = await box.textContent();
  check(/422/.test(text), `no status in ${text}`);
  check(/body\.cpu_count : /.test(text), `no body.cpu_count message in ${text}`);
  check(/body\.ssh_public_key : /.test(text), `no body.ssh_public_key message in ${text}`);
  check((await page.getAttribute('#alloc-key', 'aria-invalid')) === 'true', 'the key field is not marked invalid');
  await shot('07-validation-error');
  await page.click('#alloc-dialog button[data-close]');
  await closed('alloc-dialog');
});

await step('shows a 409 detail in the init server dialog', async () => {
  await page.goto(`${base}/#/servers`);
  await page.click('#init-open');
  await page.waitForSelector('#init-dialog[open]');
  await page.fill('#init-hostname', localHost);
  await page.fill('#init-ip', '192.0.2.10');
  await page.fill('#init-region', 'eu');
  await page.fill('#init-zone', 'a');
  await page.fill('#init-ranges', '0-3');
  await page.click('#init-submit');
  const box = page.locator('#init-dialog [data-testid="dialog-errors"]');
  await box.waitFor({ state: 'visible' });
  const text = await box.innerText();
  check(/409/.test(text), `expected a 409, got ${text}`);
  await page.click('#init-dialog button[data-close]');
  return oneLine(text.replace(/\s+/g, ' '));
});

await step('inits an inventory-only server through the dialog', async () => {
  await page.click('#init-open');
  await page.fill('#init-hostname', 'browserhost');
  await page.fill('#init-ip', '192.0.2.50');
  await page.fill('#init-region', 'eu');
  await page.fill('#init-zone', 'b');
  await page.fill('#init-ranges', '0-3, 4-7 8-15');
  const preview = await page.textContent('#init-preview');
  check(/3 units/.test(preview), `preview says ${preview}`);
  await page.check('#init-inventory-only');
  await shot('08-init-server-dialog');
  await page.click('#init-submit');
  await closed('init-dialog');
  await page.waitForSelector('[data-testid="server-card"][data-host="browserhost"] .cpu');
  const cells = await page.locator('[data-host="browserhost"] .cpu').count();
  check(cells === 16, `browserhost shows ${cells} CPU cells, expected 16`);
  const badge = await page.locator('[data-host="browserhost"] [data-testid="inventory-only"]').count();
  check(badge === 1, 'browserhost is not shown as inventory-only');
});

await step('server view draws the CPU map by NUMA node', async () => {
  const card = page.locator(`[data-testid="server-card"][data-host="${localHost}"]`);
  await card.locator('.cpu').first().waitFor();
  const cells = await card.locator('.cpu').count();
  check(cells >= onlineCpus, `${cells} cells for ${onlineCpus} CPUs`);
  const groups = await card.locator('[data-testid="numa-group"]').allTextContents();
  const numa = groups.filter((g) => g.startsWith('NUMA node')).length;
  await card.locator('.cpu[data-u]').nth(5).hover();
  const info = await card.locator('.cell-info').textContent();
  check(info.includes(`${localHost}_`), `hover info: ${info}`);
  check((await card.locator('.cpu.hl').count()) > 0, 'hovering does not highlight the unit');
  await shot('09-servers');
  return numa ? `${cells} cells in ${numa} NUMA nodes` : `${cells} cells, no numa_nodes from the API`;
});

await step('decommissions the server through the dialog', async () => {
  await page.click('[data-host="browserhost"] button[data-action="decommission"]');
  await page.waitForSelector('#decom-dialog[open]');
  check((await page.inputValue('#decom-hostname')) === 'browserhost', 'dialog did not preselect the server');
  await page.check('#decom-force');
  await shot('10-decommission-dialog');
  await page.click('#decom-submit');
  await closed('decom-dialog');
  await page.waitForSelector('[data-host="browserhost"] .sv-DECOMMISSIONED');
  check((await page.locator('[data-host="browserhost"] .cpu').count()) === 0, 'a decommissioned server still shows CPUs');
});

await step('audit log shows the allocate and deallocate events', async () => {
  check(unitId, 'nothing was allocated');
  await page.goto(`${base}/#/events`);
  await page.fill('#e-compute', unitId);
  const rows = page.locator('#events-body tr[data-eid]');
  await page.waitForFunction(
    (id) => [...document.querySelectorAll('#events-body tr[data-eid]')].length >= 2 &&
      [...document.querySelectorAll('#events-body tr[data-eid]')].every((r) => r.textContent.includes(id)),
    unitId,
  );
  const ops = (await rows.locator('td:nth-child(5)').allTextContents()).join(',');
  check(ops.includes('allocate') && ops.includes('deallocate'), `operations: ${ops}`);
  const alloc = rows.filter({ has: page.locator('td:nth-child(5)', { hasText: /^allocate$/ }) }).first();
  await alloc.locator('button[data-action="expand"]').click();
  const more = page.locator('#events-body tr.ev-more').first();
  await more.waitFor();
  const ba = await more.textContent();
  check(ba.includes('FREE') && ba.includes('ALLOCATED'), 'before/after not shown');
  await shot('11-audit-log');
  return ops;
});

await step('API inspector shows the last request and response', async () => {
  await page.click('#inspector > summary');
  await page.waitForFunction(() => document.querySelector('#insp-req').textContent.trim() !== '');
  const req = await page.textContent('#insp-req');
  const res = await page.textContent('#insp-res');
  const status = await page.textContent('#insp-status');
  check(/^GET \/api\/events\?/.test(req), `request: ${oneLine(req)}`);
  check(res.includes(unitId), 'response body not shown');
  check(/200/.test(status) && /ms/.test(status), `status line: ${status}`);
  await shot('12-inspector');
  await page.click('#inspector > summary');
});

if (token) {
  await step('a rejected token brings the prompt back with the 401', async () => {
    await page.goto(`${base}/#/units`);
    await signOut();
    check((await page.evaluate(() => sessionStorage.getItem('kloigos.token'))) === null, 'sign out kept the token');
    await page.fill('#token-input', 'klg_not_a_real_token');
    await page.click('#token-submit');
    await page.waitForSelector('#token-dialog[open] #token-msg:not([hidden])');
    const msg = await page.textContent('#token-msg');
    check(/401/.test(msg), `message: ${msg}`);
    await shot('13-token-rejected');
    return oneLine(msg);
  });
}

if (readonlyToken) {
  await step('a readonly token hides the actions', async () => {
    if (!(await page.isVisible('#token-dialog[open]'))) await signOut();
    await page.fill('#token-input', readonlyToken);
    await page.click('#token-submit');
    await page.waitForFunction(() => document.body.dataset.role === 'readonly' && document.querySelector('#whoami').textContent.includes('readonly'));
    await page.waitForSelector('#units-body tr');
    check(!(await page.isVisible('#allocate-open')), 'Allocate is visible to readonly');
    check((await page.locator('#units-body button[data-action="deallocate"]:visible').count()) === 0, 'Deallocate buttons visible');
    await page.goto(`${base}/#/servers`);
    check(!(await page.isVisible('#init-open')), 'Init server is visible to readonly');
    await shot('14-readonly');
  });
}

if (token) {
  await step('signs in again as admin', async () => {
    if (!(await page.isVisible('#token-dialog[open]'))) await signOut();
    await signIn(token);
    await page.waitForFunction(() => document.body.dataset.role === 'admin');
  });
}

if (token) {
  await step('a #token= link signs in and leaves the address bar', async () => {
    // A fresh browser session, as a newcomer opening the link demo.sh prints.
    const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    try {
      const p = await ctx.newPage();
      await p.goto(`${base}/#token=${encodeURIComponent(token)}`);
      await p.waitForFunction(() => document.body.dataset.role === 'admin');
      check(!(await p.isVisible('#token-dialog[open]')), 'asked for a token anyway');
      const where = await p.evaluate(() => window.location.href);
      check(!where.includes('token') && !where.includes(token), `address still holds it: ${where}`);
      const stored = await p.evaluate(() => sessionStorage.getItem('kloigos.token'));
      check(stored === token, 'token not kept in sessionStorage');
    } finally {
      await ctx.close();
    }
  });
}

await step('/docs serves the interactive API docs', async () => {
  const docs = await context.newPage();
  try {
    const res = await docs.goto(`${base}/docs`);
    check(res.status() === 200, `GET /docs answered ${res.status()}`);
    const hasUi = (await docs.locator('#swagger-ui, .swagger-ui').count()) > 0;
    if (!hasUi) return 'status 200, no swagger-ui element';
    await docs.waitForSelector('.swagger-ui .opblock', { timeout: 15000 });
    const ops = await docs.locator('.swagger-ui .opblock').count();
    await docs.screenshot({ path: path.join(shots, '15-docs.png') });
    return `swagger-ui with ${ops} operations`;
  } finally {
    await docs.close();
  }
});

let perf = '';
await step('renders 2,000 units', async () => {
  const before = (await api('GET', '/api/compute_units/')).length;
  const ranges = Array.from({ length: 100 }, (_, i) => String(i));
  for (let h = 0; h < 20; h++) {
    const hostname = `h${String(h).padStart(2, '0')}`;
    await api('POST', '/api/admin/init_server', {
      hostname, ip: `10.1.0.${h + 1}`, region: h < 10 ? 'eu' : 'us', zone: h % 2 ? 'b' : 'a', cpu_ranges: ranges,
      inventory_only: true,
    });
  }
  // Some variety in the statuses and tags.
  for (let i = 0; i < 40; i++) {
    await api('POST', '/api/compute_units/allocate', {
      cpu_count: 1, region: 'us', tags: { deployment_id: `load-${i % 4}`, owner: `user${i % 7}` }, ssh_public_key: sshKey,
      inventory_only: true,
    });
  }
  const total = before + 2000;
  await page.goto(`${base}/#/units`);
  const tLoad = Date.now();
  await page.reload();
  await page.waitForFunction((n) => window.kloigosStats?.rows >= n, total, { timeout: 30000 });
  const load = Date.now() - tLoad;
  const first = await page.evaluate(() => window.kloigosStats.lastRenderMs);
  const rowCount = await page.evaluate(() => window.kloigosStats.rows);
  check(rowCount === total, `${rowCount} rows, expected ${total}`);
  check((await page.getAttribute('#units-table', 'aria-rowcount')) === String(total + 1), 'aria-rowcount is wrong');
  const inDom = await page.locator('#units-body tr[data-id]').count();
  check(inDom < 200, `${inDom} rows in the DOM: the table is not windowed`);
  await shot('16-units-2000');
  // Scrolled to the end, the last unit (natural order of compute ids) is drawn.
  const lastId = await page.evaluate(() => {
    const w = document.getElementById('units-wrap');
    w.scrollTop = w.scrollHeight;
    return new Promise((r) => setTimeout(() => r(document.querySelector('#units-body tr[data-id]:last-of-type')?.dataset.id), 300));
  });
  check(lastId === `${localHost}_56-62:2`, `last row after scrolling: ${lastId}`);
  await page.evaluate(() => { document.getElementById('units-wrap').scrollTop = 0; });

  // Synchronous in the page: the click handler renders, then layout is forced, so this is
  // the time until the browser can paint the new table.
  const timed = (fn, arg) => page.evaluate(([f, a]) => {
    const t = performance.now();
    new Function('a', f)(a);
    void document.getElementById('units-body').offsetHeight;
    return performance.now() - t;
  }, [fn, arg]);
  const click = 'document.querySelector(a).click()';
  const sortMs = await timed(click, '#units-head button[data-sort="cpu_range"]');
  const reverseMs = await timed(click, '#units-head button[data-sort="cpu_range"]');
  const statusMs = await timed(click, '#status-summary button[data-status="FREE"]');
  await timed(click, '#status-summary button[data-status="FREE"]');
  // The search box's change event skips its 200 ms debounce.
  const search = "const i = document.querySelector('#f-search'); i.value = a; i.dispatchEvent(new Event('change', { bubbles: true }))";
  const searchMs = await timed(search, 'h07_');
  check((await page.evaluate(() => window.kloigosStats.rows)) === 100, 'search h07_ does not give 100 rows');
  await timed(search, '');
  const ms = (x) => `${x.toFixed(0)} ms`;
  perf =
    `reload to all rows drawn ${load} ms (table build ${ms(first)}); re-sort ${ms(sortMs)}, reverse ${ms(reverseMs)}, ` +
    `status filter ${ms(statusMs)}, search ${ms(searchMs)} (each: handler + DOM + layout)`;
  console.log(`# render ${total} units: ${perf}`);
  return `${total} rows, ${inDom} in the DOM`;
});

await step('auto-refresh keeps filters and does not re-render unchanged data', async () => {
  await page.selectOption('#f-rz', 'us-a');
  await page.selectOption('#f-status', 'FREE');
  await page.waitForFunction(() => {
    const rows = [...document.querySelectorAll('#units-body tr[data-id]')];
    return rows.length > 0 && rows.every((r) => r.dataset.status === 'FREE' && r.children[1].textContent === 'us-a');
  });
  await page.locator('#units-body').evaluate((el) => { el.closest('.table-wrap').scrollTop = 600; });
  const renders = await page.evaluate(() => window.kloigosStats.renders);
  await page.waitForTimeout(5600); // one refresh period, data unchanged
  check((await page.evaluate(() => window.kloigosStats.renders)) === renders, 'unchanged data was rendered again');
  // Change the data behind the page: the next refresh re-renders, filters and scroll kept.
  const rowsBefore = await page.evaluate(() => window.kloigosStats.rows);
  await api('POST', '/api/compute_units/allocate', { cpu_count: 1, region: 'us', zone: 'a', tags: {}, ssh_public_key: sshKey, inventory_only: true });
  await page.waitForFunction((k) => window.kloigosStats.renders > k, renders, { timeout: 12000 });
  check((await page.inputValue('#f-rz')) === 'us-a' && (await page.inputValue('#f-status')) === 'FREE', 'filters were reset');
  const rowsAfter = await page.evaluate(() => window.kloigosStats.rows);
  check(rowsAfter === rowsBefore - 1, `rows ${rowsBefore} -> ${rowsAfter} after allocating in us-a`);
  const scroll = await page.locator('#units-body').evaluate((el) => el.closest('.table-wrap').scrollTop);
  check(scroll > 0, 'scroll position was reset');
  await page.click('#f-clear');
});

await step('server view with 21 servers', async () => {
  await page.goto(`${base}/#/servers`);
  await page.waitForSelector('[data-host="h19"] .cpu');
  const servers = await page.locator('[data-testid="server-card"]').count();
  check(servers >= 21, `${servers} server cards`);
  await shot('17-servers-many');
  return `${servers} cards, ${await page.locator('.cpu').count()} CPU cells`;
});

await step('audit log pages older and newer', async () => {
  await page.goto(`${base}/#/events`);
  await page.selectOption('#e-limit', '20');
  await page.waitForFunction(() => document.querySelectorAll('#events-body tr[data-eid]').length === 20);
  const ids = async () => (await page.locator('#events-body tr[data-eid]').evaluateAll((rs) => rs.map((r) => +r.dataset.eid)));
  const first = await ids();
  check(await page.isDisabled('#e-newer'), 'Newer enabled on the first page');
  await page.click('#e-older');
  await page.waitForFunction((top) => +document.querySelector('#events-body tr[data-eid]')?.dataset.eid < top, first.at(-1));
  const second = await ids();
  check(second[0] < first.at(-1), 'older page is not older');
  await shot('18-audit-log-page-2');
  await page.click('#e-newer');
  await page.waitForFunction((top) => +document.querySelector('#events-body tr[data-eid]')?.dataset.eid === top, first[0]);
  return `page 1 #${first[0]}–#${first.at(-1)}, page 2 #${second[0]}–#${second.at(-1)}`;
});

await step('no JavaScript errors', async () => {
  check(jsErrors.length === 0, jsErrors.join(' | '));
});

await browser.close();
console.log(`# ${((Date.now() - t0) / 1000).toFixed(1)} s in the browser; screenshots in ${path.relative(repo, shots) || shots}`);
console.log(`browser: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
