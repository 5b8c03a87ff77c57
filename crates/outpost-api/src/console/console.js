// outpost console: reads and acts through the node's JSON API (CONTRACT sections 3, 8, 9), polling
// every 2 s while "live" is on. Plain JavaScript, no libraries, nothing loaded from elsewhere.
'use strict';

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = 'outpost-admin-token';
const REFRESH_MS = 2000;
const FAILED_PAGE = 100;
/** Consumers are read queue by queue: at most this many queues per refresh. */
const CONSUMER_QUEUES = 100;

const ui = {
  role: null,
  status: null,
  routes: [],
  consumers: [],
  busy: false,
  edges: { after: [''], next: null, rows: [], expanded: new Set(), details: new Map() },
  failed: { after: [0], next: null, rows: [], selected: new Set(), reasons: new Set() },
  payload: { id: null, bytes: null, mode: 'text' },
};

// ---- formatting -----------------------------------------------------------------------------

const esc = (s) => String(s ?? '').replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));

/** A duration in seconds as the largest whole units: "42 s", "3 min", "5 h 12 min", "2 d 3 h". */
function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return s + ' s';
  if (s < 3600) return Math.floor(s / 60) + ' min';
  if (s < 86400) {
    const m = Math.floor((s % 3600) / 60);
    return Math.floor(s / 3600) + ' h' + (m ? ' ' + m + ' min' : '');
  }
  const h = Math.floor((s % 86400) / 3600);
  return Math.floor(s / 86400) + ' d' + (h ? ' ' + h + ' h' : '');
}

/** "3 min ago" (or "in 5 s" when the node's clock is ahead of this browser's). */
function ago(iso) {
  const at = Date.parse(iso);
  if (Number.isNaN(at)) return String(iso);
  const diff = (Date.now() - at) / 1000;
  if (Math.abs(diff) < 1) return 'just now';
  return diff >= 0 ? duration(diff) + ' ago' : 'in ' + duration(-diff);
}

/** A time element: relative text, the full ISO time on hover. The text is filled in by fillTimes,
    so a table whose data did not change keeps its elements between refreshes. */
const time = (iso) => (iso ? '<time datetime="' + esc(iso) + '" title="' + esc(iso) + '"></time>' : '<span class="muted">-</span>');

function fillTimes(root) {
  for (const t of root.querySelectorAll('time[datetime]')) {
    const text = ago(t.getAttribute('datetime'));
    if (t.textContent !== text) t.textContent = text;
  }
}

function bytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = Number(n) || 0;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? v : v.toFixed(v < 10 ? 1 : 0)) + ' ' + units[i];
}

const age = (seconds) => (seconds ? '<span title="' + esc(Math.round(seconds)) + ' s">' + esc(duration(seconds)) + '</span>' : '<span class="muted">-</span>');
const badge = (text, cls) => '<span class="badge ' + esc(cls ?? text) + '">' + esc(text) + '</span>';
const dash = (v) => (v === undefined || v === null || v === '' ? '<span class="muted">-</span>' : esc(v));
const cut = (s, n) => { const t = String(s ?? ''); return t.length > n ? t.slice(0, n - 1) + '…' : t; };

/** Replaces a tbody's rows only when what they show changed (times aside), so buttons and
    checkboxes survive the refresh that follows every 2 s. */
function setRows(tbody, html) {
  if (tbody.dataset.html !== html) {
    tbody.innerHTML = html;
    tbody.dataset.html = html;
  }
  fillTimes(tbody);
}

// ---- API ----------------------------------------------------------------------------------

class AuthError extends Error {}

async function api(method, path, body) {
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = 'Bearer ' + token;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: 'no-store' });
  const text = await response.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
  const message = json && json.error ? json.error.message + ' [' + json.error.code + ']' : text || response.statusText;
  if (response.status === 401 || response.status === 403) {
    askForToken((token ? 'The token was refused: ' : 'This node needs an admin token: ') + message);
    throw new AuthError(method + ' ' + path + ': HTTP ' + response.status + ': ' + message);
  }
  if (!response.ok) throw new Error(method + ' ' + path + ': HTTP ' + response.status + ': ' + message);
  return { json, headers: response.headers };
}

const get = async (path) => (await api('GET', path)).json;

function notice(text, isError) {
  const n = $('notice');
  n.textContent = text;
  n.className = isError ? 'error' : '';
  n.hidden = false;
  delete n.dataset.stale;
}

/** Runs one operator action: shows what happened, then refreshes at once. */
async function act(label, fn) {
  try {
    const text = await fn();
    notice(text || label + ': done');
  } catch (e) {
    notice(label + ' failed: ' + e.message, true);
  }
  await refresh();
}

// ---- token --------------------------------------------------------------------------------

function askForToken(why) {
  $('token-why').textContent = why;
  if ($('token-bar').hidden) {
    $('token-bar').hidden = false;
    $('token-input').focus();
  }
}

$('token-open').onclick = () => askForToken(sessionStorage.getItem(TOKEN_KEY) ? 'A token is set for this tab.' : 'No token is set for this tab.');
$('token-form').onsubmit = (e) => {
  e.preventDefault();
  const token = $('token-input').value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token); else sessionStorage.removeItem(TOKEN_KEY);
  $('token-input').value = '';
  $('token-bar').hidden = true;
  refresh();
};
$('token-forget').onclick = () => {
  sessionStorage.removeItem(TOKEN_KEY);
  $('token-input').value = '';
  notice('token forgotten');
  refresh();
};

// ---- confirmation dialog ------------------------------------------------------------------

/** Asks before an action that destroys or reroutes. Resolves to null (cancelled) or {reason}. */
function confirmAction({ title, text, ok, danger, reason }) {
  return new Promise((resolve) => {
    const dialog = $('confirm');
    $('confirm-title').textContent = title;
    $('confirm-text').textContent = text;
    $('confirm-reason-row').hidden = reason === undefined;
    $('confirm-reason').value = reason ?? '';
    $('confirm-ok').textContent = ok;
    $('confirm-ok').className = danger ? 'danger' : 'primary';
    const finish = (confirmed) => {
      $('confirm-form').onsubmit = null;
      $('confirm-cancel').onclick = null;
      dialog.oncancel = null;
      if (dialog.open) dialog.close();
      resolve(confirmed ? { reason: $('confirm-reason').value.trim() } : null);
    };
    $('confirm-form').onsubmit = (e) => { e.preventDefault(); finish(true); };
    $('confirm-cancel').onclick = () => finish(false);
    dialog.oncancel = (e) => { e.preventDefault(); finish(false); };
    dialog.showModal();
    (reason !== undefined ? $('confirm-reason') : $('confirm-cancel')).focus();
  });
}

// ---- rendering ----------------------------------------------------------------------------

function renderStatus(s) {
  const edge = s.role === 'edge';
  $('node').textContent = s.node_id + ' (' + s.role + ' ' + s.version + ')';
  $('state').textContent = s.state;
  $('state').className = 'badge ' + s.state;
  const b = s.backlog || {};
  const facts = [['state', badge(s.state) + ' since ' + time(s.state_since)]];
  if (edge) {
    facts.push(['upstream', s.upstream ? esc(s.upstream.url) + (s.upstream.is_primary ? ' (primary)' : ' (alternate)') : dash()]);
    facts.push(['last ping', s.last_ping_at ? time(s.last_ping_at) : dash()]);
  }
  facts.push([edge ? 'backlog' : 'stored', esc(b.messages ?? 0) + ' messages, ' + esc(bytes(b.bytes)) + (b.messages ? ', oldest ' + age(b.oldest_age_seconds) : '')]);
  if (edge && b.unforwarded_bytes !== undefined && b.unforwarded_bytes !== null) {
    // `drain` is the node's own estimate, e.g. "~4 min at 310 kB/s".
    facts.push(['to forward', esc(bytes(b.unforwarded_bytes)) + (b.drain ? ', done in ' + esc(b.drain) : '')]);
  }
  const html = facts.map(([k, v]) => '<dt>' + esc(k) + '</dt><dd>' + v + '</dd>').join('');
  if ($('status').dataset.html !== html) { $('status').innerHTML = html; $('status').dataset.html = html; }
  fillTimes($('status'));

  $('act-online').hidden = !edge;
  $('act-maintenance').hidden = edge;
  if (!edge) {
    const on = s.state === 'maintenance';
    $('act-maintenance').textContent = on ? 'Turn maintenance off' : 'Turn maintenance on';
    $('act-maintenance').className = on ? 'primary' : 'danger';
    $('act-maintenance').dataset.enable = on ? 'false' : 'true';
  }
  $('log-section').hidden = !edge;
  if (edge) {
    setRows($('log').tBodies[0], (s.offline_log || []).slice().reverse().map((e) =>
      '<tr><td>' + time(e.at) + '</td><td>' + esc(e.cause) + '</td><td>' + esc(e.detail) + '</td></tr>').join('')
      || '<tr><td colspan="3" class="muted">never offline</td></tr>');
  }
}

function edgeState(e) {
  // The central's own view (CONTRACT section 5): `state`, plus `connected` and `reported_state`
  // when the node sends them.
  let html = badge(e.state);
  const notes = [];
  if (e.connected === false) notes.push('not connected');
  if (e.connected === true) notes.push('connected');
  if (e.reported_state && e.reported_state !== e.state) notes.push('last reported ' + e.reported_state);
  if (notes.length) html += '<small class="sub">' + esc(notes.join(', ')) + '</small>';
  return html;
}

function edgeDetail(e) {
  const log = (e.offline_log || []).slice().reverse();
  const detail = ui.edges.details.get(e.id);
  let html = '<h4>Offline log of ' + esc(e.id) + '</h4>';
  html += log.length
    ? '<table class="edge-log"><thead><tr><th>at</th><th>cause</th><th>detail</th></tr></thead><tbody>' +
      log.map((x) => '<tr><td>' + time(x.at) + '</td><td>' + esc(x.cause) + '</td><td>' + esc(x.detail) + '</td></tr>').join('') + '</tbody></table>'
    : '<p class="muted">never offline</p>';
  html += '<h4>Downlink waiting for ' + esc(e.id) + '</h4>';
  if (!detail) html += '<p class="muted">loading…</p>';
  else if (detail.error) html += '<p class="muted">' + esc(detail.error) + '</p>';
  else if (!detail.queues.length) html += '<p class="muted">nothing waits</p>';
  else html += '<table><thead><tr><th>queue</th><th class="num">pending</th><th class="num">oldest</th><th class="num">delivered seq</th></tr></thead><tbody>' +
    detail.queues.map((q) => '<tr><td>' + esc(q.queue) + '</td><td class="num">' + esc(q.pending) + '</td><td class="num">' + age(q.oldest_age_seconds) +
      '</td><td class="num">' + esc(q.delivered_seq) + '</td></tr>').join('') + '</tbody></table>';
  return html;
}

function renderEdges() {
  const rows = ui.edges.rows;
  const html = rows.map((e) => {
    // The central's own cause (`cause`, e.g. link_lost) when it sends one, else the edge's last
    // offline-log entry.
    const logged = (e.offline_log || []).slice(-1)[0];
    const last = e.cause ? { cause: e.cause, at: e.state_since } : logged;
    const open = ui.edges.expanded.has(e.id);
    let row = '<tr data-edge="' + esc(e.id) + '"><td class="id">' + esc(e.id) + (e.version ? '<small class="sub">' + esc(e.version) + '</small>' : '') +
      '</td><td>' + edgeState(e) + '</td><td>' + time(e.state_since) + '</td><td class="opt">' + time(e.last_seen) +
      '</td><td class="opt">' + dash(e.upstream_url) + '</td><td class="num">' + esc(e.backlog_messages ?? 0) +
      '</td><td class="num">' + esc(e.downlink_pending ?? 0) + '</td><td>' + (last ? esc(last.cause) + '<small class="sub">' + time(last.at) + '</small>' : dash()) +
      '</td><td class="acts"><button type="button" class="small" data-action="edge-online" data-edge="' + esc(e.id) + '">Send online</button>' +
      '<button type="button" class="small' + (open ? ' on' : '') + '" data-action="edge-detail" data-edge="' + esc(e.id) + '">Log</button></td></tr>';
    if (open) row += '<tr class="detail" data-edge-detail="' + esc(e.id) + '"><td colspan="9">' + edgeDetail(e) + '</td></tr>';
    return row;
  }).join('');
  setRows($('edges').tBodies[0], html || '<tr><td colspan="9" class="muted">no edges' + ($('edges-state').value ? ' in this state' : ' yet') + '</td></tr>');
  const page = ui.edges.after.length;
  $('edges-page').textContent = 'page ' + page;
  $('edges-prev').disabled = page <= 1;
  $('edges-next').disabled = !ui.edges.next;
}

function renderRoutes() {
  const html = ui.routes.map((r) => {
    const toStore = r.mode === 'forward';
    return '<tr data-route="' + esc(r.name) + '"><td>' + esc(r.name) + '</td><td class="opt">' + esc(r.queue) + '</td><td>' + badge(r.mode) +
      '</td><td>' + time(r.mode_since) + '</td><td class="opt">' + dash(r.changed_by) + '</td><td>' + dash(r.reason) +
      '</td><td class="num">' + esc(r.backlog) + '</td><td class="num">' + esc(r.failed) + '</td><td class="acts">' +
      (toStore
        ? '<button type="button" class="small danger" data-action="route-store" data-route="' + esc(r.name) + '">Store…</button>'
        : '<button type="button" class="small" data-action="route-forward" data-route="' + esc(r.name) + '">Forward…</button>') +
      (r.failed ? '<button type="button" class="small" data-action="route-failed" data-route="' + esc(r.name) + '">Failed</button>' : '') +
      '</td></tr>';
  }).join('');
  setRows($('routes').tBodies[0], html);
  // The failed browser's route choice follows the routes and the pull consumers
  // (`consumer:NAME`, as the failed list names a consumer's entries).
  const select = $('failed-route');
  const consumerRoutes = Array.from(new Set(ui.consumers.map((c) => 'consumer:' + c.name))).sort();
  const names = ui.routes.map((r) => r.name).concat(consumerRoutes);
  const have = Array.from(select.options).slice(1).map((o) => o.value);
  if (have.join('\n') !== names.join('\n')) {
    const chosen = select.value;
    select.innerHTML = '<option value="">any</option>' + names.map((n) => '<option value="' + esc(n) + '">' + esc(n) + '</option>').join('');
    select.value = names.includes(chosen) ? chosen : '';
  }
}

function failedShown() {
  const reason = $('failed-reason').value;
  const error = $('failed-error').value.trim().toLowerCase();
  const attempts = Number($('failed-attempts').value) || 0;
  return ui.failed.rows.filter((f) => (!reason || f.reason === reason) &&
    (!error || String(f.last_error || '').toLowerCase().includes(error)) && (Number(f.attempts) || 0) >= attempts);
}

function renderFailed() {
  for (const f of ui.failed.rows) ui.failed.reasons.add(f.reason);
  const reasons = Array.from(ui.failed.reasons).sort();
  const rsel = $('failed-reason');
  if (Array.from(rsel.options).slice(1).map((o) => o.value).join('\n') !== reasons.join('\n')) {
    const chosen = rsel.value;
    rsel.innerHTML = '<option value="">any</option>' + reasons.map((r) => '<option value="' + esc(r) + '">' + esc(r) + '</option>').join('');
    rsel.value = chosen;
  }
  const present = new Set(ui.failed.rows.map((f) => String(f.id)));
  for (const id of Array.from(ui.failed.selected)) if (!present.has(id)) ui.failed.selected.delete(id);
  const shown = failedShown();
  const html = shown.map((f) => {
    const id = esc(f.id);
    return '<tr data-failed="' + id + '"><td><input type="checkbox" data-select="' + id + '"' + (ui.failed.selected.has(String(f.id)) ? ' checked' : '') +
      '></td><td class="id">' + id + '</td><td>' + esc(f.route) + '</td><td class="opt">' + esc(f.queue) + (f.edge ? '<small class="sub">edge ' + esc(f.edge) + '</small>' : '') +
      '</td><td class="opt num">' + esc(f.seq) + '</td><td class="num">' + esc(f.attempts) + '</td><td>' + esc(f.reason) + '</td><td>' + time(f.last_failed_at) +
      '</td><td class="error" title="' + esc(f.last_error) + '">' + esc(cut(f.last_error, 160)) + '</td><td class="acts">' +
      '<button type="button" class="small" data-action="failed-view" data-id="' + id + '">View</button>' +
      '<button type="button" class="small" data-action="failed-resubmit" data-id="' + id + '">Resubmit</button>' +
      '<button type="button" class="small danger" data-action="failed-discard" data-id="' + id + '">Discard</button></td></tr>';
  }).join('');
  const hidden = ui.failed.rows.length - shown.length;
  setRows($('failed').tBodies[0], html || '<tr><td colspan="10" class="muted">' +
    (ui.failed.rows.length ? 'no failed message matches the filters' : 'no failed messages') + '</td></tr>');
  const page = ui.failed.after.length;
  $('failed-page').textContent = 'page ' + page + ', ' + shown.length + ' shown' + (hidden ? ', ' + hidden + ' filtered out' : '');
  $('failed-prev').disabled = page <= 1;
  $('failed-next').disabled = !ui.failed.next;
  $('failed-resubmit-route').disabled = !$('failed-route').value;
  $('failed-resubmit-route').textContent = $('failed-route').value ? 'Resubmit all of ' + $('failed-route').value : 'Resubmit all of route';
  $('failed-resubmit-selected').disabled = ui.failed.selected.size === 0;
  $('failed-discard-selected').disabled = ui.failed.selected.size === 0;
  $('failed-all').checked = shown.length > 0 && shown.every((f) => ui.failed.selected.has(String(f.id)));
}

function renderConsumers() {
  $('consumers-section').hidden = ui.consumers.length === 0;
  setRows($('consumers').tBodies[0], ui.consumers.map((c) => '<tr data-consumer="' + esc(c.queue + '/' + c.name) + '"><td>' + esc(c.queue) +
    '</td><td>' + esc(c.name) + '</td><td class="opt num">' + esc(c.position) + '</td><td class="num">' + esc(c.leased) + '</td><td class="num">' +
    esc(c.pending) + '</td><td class="num">' + esc(c.deliveries_max) + '</td><td class="opt">' + time(c.created_at) + '</td><td>' + time(c.last_active_at) +
    '</td><td class="acts"><button type="button" class="small danger" data-action="consumer-forget" data-queue="' + esc(c.queue) + '" data-name="' +
    esc(c.name) + '">Forget…</button></td></tr>').join(''));
}

async function loadConsumers(queues) {
  const all = [];
  for (const q of queues.slice(0, CONSUMER_QUEUES)) {
    try {
      for (const c of (await get('/v1/queues/' + encodeURIComponent(q.name) + '/consumers')) || []) all.push(Object.assign({ queue: q.name }, c));
    } catch (e) {
      if (e instanceof AuthError) throw e;
      // A node without pull consumers, or a queue gone meanwhile: nothing to show for it.
    }
  }
  ui.consumers = all;
}

function renderQueues(queues) {
  setRows($('queues').tBodies[0], queues.map((q) => '<tr><td>' + esc(q.name) + '</td><td class="num">' + esc(q.messages) +
    '</td><td class="num">' + esc(bytes(q.bytes)) + '</td><td class="num">' + age(q.oldest_age_seconds) + '</td><td class="opt num">' +
    esc(q.first_seq) + '</td><td class="opt num">' + esc(q.last_seq) + '</td></tr>').join('') || '<tr><td colspan="6" class="muted">no queues yet</td></tr>');
}

// ---- loading ------------------------------------------------------------------------------

async function loadEdges() {
  const params = new URLSearchParams();
  params.set('limit', $('edges-limit').value);
  if ($('edges-state').value) params.set('state', $('edges-state').value);
  const after = ui.edges.after[ui.edges.after.length - 1];
  if (after) params.set('after', after);
  const { json, headers } = await api('GET', '/v1/edges?' + params);
  ui.edges.rows = json || [];
  ui.edges.next = headers.get('Outpost-Next-After');
  for (const id of ui.edges.expanded) {
    try {
      ui.edges.details.set(id, { queues: await get('/v1/edges/' + encodeURIComponent(id) + '/downlink') });
    } catch (e) {
      if (e instanceof AuthError) throw e;
      ui.edges.details.set(id, { error: e.message });
    }
  }
}

async function loadFailed() {
  const params = new URLSearchParams();
  params.set('limit', String(FAILED_PAGE));
  const route = $('failed-route').value;
  if (route) params.set('route', route);
  const after = ui.failed.after[ui.failed.after.length - 1];
  if (after) params.set('after_id', String(after));
  const rows = (await get('/v1/failed?' + params)) || [];
  ui.failed.rows = rows;
  ui.failed.next = rows.length === FAILED_PAGE ? rows[rows.length - 1].id : null;
}

async function refresh() {
  if (ui.busy) { ui.again = true; return; }
  ui.busy = true;
  try {
    const s = await get('/v1/status');
    ui.status = s;
    ui.role = s.role;
    renderStatus(s);
    const queues = (await get('/v1/queues')) || [];
    renderQueues(queues);
    await loadConsumers(queues);
    renderConsumers();
    const central = s.role === 'central';
    $('edges-section').hidden = !central;
    if (central) { await loadEdges(); renderEdges(); }
    ui.routes = (await get('/v1/routes')) || [];
    $('routes-section').hidden = ui.routes.length === 0;
    renderRoutes();
    await loadFailed();
    $('failed-section').hidden = ui.routes.length === 0 && ui.consumers.length === 0 && ui.failed.rows.length === 0 && ui.failed.after.length === 1;
    renderFailed();
    $('updated').textContent = 'updated ' + new Date().toLocaleTimeString();
    if ($('notice').dataset.stale === 'refresh') { $('notice').hidden = true; delete $('notice').dataset.stale; }
  } catch (e) {
    if (!(e instanceof AuthError)) { notice('refresh failed: ' + e.message, true); $('notice').dataset.stale = 'refresh'; }
  } finally {
    ui.busy = false;
    if (ui.again) { ui.again = false; refresh(); }
  }
}

// ---- actions ------------------------------------------------------------------------------

const actions = {
  async 'edge-online'(el) {
    const id = el.dataset.edge;
    await act('transition to online for ' + id, async () => {
      const { json } = await api('POST', '/v1/edges/' + encodeURIComponent(id) + '/transition-online');
      return 'sent "transition to online" to edge ' + id + (json && json.delivery ? ' (' + (json.delivery === 'link' ? 'on its link' : 'at its next probe') + ')' : '');
    });
  },
  async 'edge-detail'(el) {
    const id = el.dataset.edge;
    if (ui.edges.expanded.has(id)) ui.edges.expanded.delete(id); else ui.edges.expanded.add(id);
    renderEdges();
    await refresh();
  },
  async 'route-store'(el) { await switchRoute(el.dataset.route, 'store'); },
  async 'route-forward'(el) { await switchRoute(el.dataset.route, 'forward'); },
  async 'route-failed'(el) {
    $('failed-route').value = el.dataset.route;
    ui.failed.after = [0];
    await refresh();
    $('failed-section').scrollIntoView();
  },
  async 'consumer-forget'(el) {
    const { queue, name } = el.dataset;
    const c = ui.consumers.find((x) => x.queue === queue && x.name === name);
    const ok = await confirmAction({
      title: 'Forget consumer ' + name + ' of queue ' + queue + '?',
      text: 'Its position and leases are dropped and it no longer holds messages in storage' +
        (c && c.pending ? ' (' + c.pending + ' it has not taken may be released)' : '') + '. Its next lease starts it again at the oldest message still stored.',
      ok: 'Forget', danger: true,
    });
    if (!ok) return;
    await act('forgetting consumer ' + name, async () => {
      await api('DELETE', '/v1/queues/' + encodeURIComponent(queue) + '/consumers/' + encodeURIComponent(name));
      return 'consumer ' + name + ' of queue ' + queue + ' forgotten';
    });
  },
  async 'failed-view'(el) { await showPayload(el.dataset.id); },
  async 'failed-resubmit'(el) {
    const id = el.dataset.id;
    await act('resubmit of failed entry ' + id, async () => {
      await api('POST', '/v1/failed/' + encodeURIComponent(id) + '/resubmit');
      return 'failed entry ' + id + ' resubmitted to its route';
    });
  },
  async 'failed-discard'(el) {
    const id = el.dataset.id;
    const f = ui.failed.rows.find((x) => String(x.id) === id);
    const ok = await confirmAction({
      title: 'Discard failed message ' + id + '?',
      text: 'Message ' + (f ? f.message_id + ' of route ' + f.route : id) + ' is deleted for good; it will not be delivered.',
      ok: 'Discard', danger: true,
    });
    if (!ok) return;
    await act('discard of failed entry ' + id, async () => {
      await api('DELETE', '/v1/failed/' + encodeURIComponent(id));
      if (ui.payload.id === id) closePayload();
      return 'failed entry ' + id + ' discarded';
    });
  },
};

async function switchRoute(name, mode) {
  const r = ui.routes.find((x) => x.name === name);
  const ok = await confirmAction(mode === 'store'
    ? { title: 'Store route ' + name + '?', text: 'Route ' + name + ' stops delivering; messages of queue ' + (r ? r.queue : '?') + ' are kept until it forwards again.', ok: 'Switch to store', danger: true, reason: '' }
    : { title: 'Forward route ' + name + '?', text: 'Route ' + name + ' delivers again, starting with the ' + (r ? r.backlog : 'stored') + ' messages it holds.', ok: 'Switch to forward', reason: '' });
  if (!ok) return;
  await act(mode + ' of route ' + name, async () => {
    const body = ok.reason ? { reason: ok.reason } : {};
    const { json } = await api('POST', '/v1/routes/' + encodeURIComponent(name) + '/' + mode, body);
    return 'route ' + name + ' is now in ' + json.mode + ' mode' + (json.reason ? ' (' + json.reason + ')' : '');
  });
}

$('act-online').onclick = () => act('transition to online', async () => {
  await api('POST', '/v1/admin/transition-online');
  return 'transition to online requested';
});

$('act-maintenance').onclick = async () => {
  const enable = $('act-maintenance').dataset.enable === 'true';
  const ok = await confirmAction(enable
    ? { title: 'Turn maintenance on?', text: 'Every edge goes offline and stays offline until maintenance is turned off. Edges keep accepting messages and store them.', ok: 'Turn maintenance on', danger: true }
    : { title: 'Turn maintenance off?', text: 'Edges may go online again: each one on its next probe, or at once when you send it "transition to online".', ok: 'Turn maintenance off' });
  if (!ok) return;
  await act('maintenance ' + (enable ? 'on' : 'off'), async () => {
    await api('POST', '/v1/admin/maintenance', { enabled: enable });
    return 'maintenance is ' + (enable ? 'on' : 'off');
  });
};

$('failed-resubmit-route').onclick = async () => {
  const route = $('failed-route').value;
  if (!route) return;
  const r = ui.routes.find((x) => x.name === route);
  const ok = await confirmAction({
    title: 'Resubmit every failed message of ' + route + '?',
    text: 'All ' + (r ? r.failed : '') + ' failed messages of route ' + route + ' go back on the route, to be delivered before the rest of its queue.',
    ok: 'Resubmit all',
  });
  if (!ok) return;
  await act('resubmit of route ' + route, async () => {
    const { json } = await api('POST', '/v1/failed/resubmit', { route });
    return json.resubmitted + ' failed messages of route ' + route + ' resubmitted';
  });
};

$('failed-resubmit-selected').onclick = async () => {
  const ids = Array.from(ui.failed.selected).map(Number);
  if (!ids.length) return;
  await act('resubmit of ' + ids.length + ' entries', async () => {
    const { json } = await api('POST', '/v1/failed/resubmit', { ids });
    ui.failed.selected.clear();
    return json.resubmitted + ' failed messages resubmitted';
  });
};

$('failed-discard-selected').onclick = async () => {
  const ids = Array.from(ui.failed.selected);
  if (!ids.length) return;
  const ok = await confirmAction({ title: 'Discard ' + ids.length + ' failed messages?', text: 'Entries ' + ids.join(', ') + ' are deleted for good.', ok: 'Discard', danger: true });
  if (!ok) return;
  await act('discard of ' + ids.length + ' entries', async () => {
    const errors = [];
    for (const id of ids) {
      try { await api('DELETE', '/v1/failed/' + encodeURIComponent(id)); ui.failed.selected.delete(id); } catch (e) { errors.push(e.message); }
    }
    if (errors.length) throw new Error(errors.join('; '));
    return ids.length + ' failed messages discarded';
  });
};

document.addEventListener('click', (e) => {
  const el = e.target.closest('[data-action]');
  if (el && actions[el.dataset.action]) {
    e.preventDefault();
    actions[el.dataset.action](el);
  }
});

document.addEventListener('change', (e) => {
  const id = e.target.dataset && e.target.dataset.select;
  if (id) {
    if (e.target.checked) ui.failed.selected.add(id); else ui.failed.selected.delete(id);
    renderFailed();
  }
});

$('failed-all').onchange = () => {
  for (const f of failedShown()) {
    if ($('failed-all').checked) ui.failed.selected.add(String(f.id)); else ui.failed.selected.delete(String(f.id));
  }
  renderFailed();
};

for (const id of ['failed-reason', 'failed-error', 'failed-attempts']) $(id).addEventListener('input', renderFailed);
$('failed-route').onchange = () => { ui.failed.after = [0]; ui.failed.selected.clear(); refresh(); };
$('failed-next').onclick = () => { if (ui.failed.next) { ui.failed.after.push(ui.failed.next); refresh(); } };
$('failed-prev').onclick = () => { if (ui.failed.after.length > 1) { ui.failed.after.pop(); refresh(); } };
$('edges-state').onchange = () => { ui.edges.after = ['']; refresh(); };
$('edges-limit').onchange = () => { ui.edges.after = ['']; refresh(); };
$('edges-next').onclick = () => { if (ui.edges.next) { ui.edges.after.push(ui.edges.next); refresh(); } };
$('edges-prev').onclick = () => { if (ui.edges.after.length > 1) { ui.edges.after.pop(); refresh(); } };

// ---- payload viewer -----------------------------------------------------------------------

async function showPayload(id) {
  try {
    const f = await get('/v1/failed/' + encodeURIComponent(id));
    const raw = atob(f.payload_base64 || '');
    const data = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) data[i] = raw.charCodeAt(i);
    ui.payload = { id: String(id), bytes: data, mode: looksLikeText(data) ? 'text' : 'hex' };
    $('payload-title').textContent = 'Failed entry ' + id + ': message ' + f.message_id;
    $('payload-meta').textContent = 'route ' + f.route + ', queue ' + f.queue + ', seq ' + f.seq + ', origin ' + f.origin + ' #' + f.origin_seq +
      ', ' + (f.content_type || 'no content type') + ', ' + data.length + ' bytes, accepted ' + f.accepted_at;
    $('payload').hidden = false;
    renderPayload();
    $('payload').scrollIntoView({ block: 'nearest' });
  } catch (e) {
    if (!(e instanceof AuthError)) notice('cannot show failed entry ' + id + ': ' + e.message, true);
  }
}

function looksLikeText(data) {
  try { new TextDecoder('utf-8', { fatal: true }).decode(data); } catch (_) { return false; }
  return !data.some((b) => b < 9 || (b > 13 && b < 32));
}

function hexDump(data) {
  const lines = [];
  for (let off = 0; off < data.length; off += 16) {
    const chunk = Array.from(data.slice(off, off + 16));
    const hex = chunk.map((b) => b.toString(16).padStart(2, '0')).join(' ');
    const ascii = chunk.map((b) => (b >= 32 && b < 127 ? String.fromCharCode(b) : '.')).join('');
    lines.push(off.toString(16).padStart(8, '0') + '  ' + hex.padEnd(47) + '  ' + ascii);
  }
  return lines.join('\n');
}

function renderPayload() {
  const { bytes: data, mode } = ui.payload;
  if (!data) return;
  $('payload-body').textContent = mode === 'hex' ? hexDump(data) : new TextDecoder('utf-8').decode(data);
  $('payload-text').classList.toggle('on', mode === 'text');
  $('payload-hex').classList.toggle('on', mode === 'hex');
}

function closePayload() {
  ui.payload = { id: null, bytes: null, mode: 'text' };
  $('payload').hidden = true;
}

$('payload-text').onclick = () => { ui.payload.mode = 'text'; renderPayload(); };
$('payload-hex').onclick = () => { ui.payload.mode = 'hex'; renderPayload(); };
$('payload-close').onclick = closePayload;

// ---- live refresh -------------------------------------------------------------------------

setInterval(() => { if ($('live').checked && !document.hidden) refresh(); }, REFRESH_MS);
$('live').onchange = () => { if ($('live').checked) refresh(); };
refresh();
