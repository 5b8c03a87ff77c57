//! `GET /`: the web console, one self-contained page that reads the JSON API with the operator's token.

use axum::response::Html;

pub async fn page() -> Html<&'static str> {
    Html(CONSOLE_HTML)
}

const CONSOLE_HTML: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>outpost console</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px system-ui,sans-serif;margin:1.5rem;color:#1b1f24;background:#f6f7f9}
 h1{font-size:1.3rem;margin:0 0 .8rem} h2{font-size:1.05rem;margin:1.4rem 0 .4rem}
 table{border-collapse:collapse;background:#fff;min-width:40rem} th,td{padding:.3rem .7rem;border-bottom:1px solid #e3e6ea;text-align:left}
 th{background:#eef0f3;font-weight:600} .state{font-weight:700;padding:.15rem .5rem;border-radius:.3rem}
 .online{background:#d5f5dd;color:#0b5d1e} .offline{background:#fbd9d7;color:#8a1c14}
 .transition_to_online,.transition_to_offline,.maintenance{background:#fff1c2;color:#7a5a00}
 #err{color:#8a1c14} input{font:inherit;padding:.2rem .4rem} small{color:#5b6470}
</style></head><body>
<h1>outpost <span id="node"></span> <span id="state" class="state"></span></h1>
<div>Token (kept in this browser only): <input id="token" type="password" size="30">
 <button id="save">Use</button> <small id="updated"></small></div>
<div id="err"></div>
<h2>Status</h2><table id="status"></table>
<h2>Queues</h2><table id="queues"><thead><tr><th>queue</th><th>messages</th><th>bytes</th><th>oldest age (s)</th><th>first seq</th><th>last seq</th></tr></thead><tbody></tbody></table>
<div id="edges-section" hidden><h2>Edges</h2><table id="edges"><thead><tr><th>edge</th><th>state</th><th>since</th><th>last seen</th><th>upstream</th><th>backlog</th><th>downlink</th><th>last offline cause</th></tr></thead><tbody></tbody></table></div>
<div id="routes-section" hidden><h2>Routes</h2><table id="routes"><thead><tr><th>route</th><th>queue</th><th>mode</th><th>since</th><th>changed by</th><th>reason</th><th>backlog</th><th>failed</th></tr></thead><tbody></tbody></table></div>
<div id="log-section"><h2>Offline log</h2><table id="log"><thead><tr><th>at</th><th>cause</th><th>detail</th></tr></thead><tbody></tbody></table></div>
<script>
const $ = id => document.getElementById(id);
$('token').value = localStorage.getItem('outpost-token') || '';
$('save').onclick = () => { localStorage.setItem('outpost-token', $('token').value); refresh(); };
const esc = s => String(s ?? '').replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
async function api(path) {
  const token = localStorage.getItem('outpost-token');
  const r = await fetch(path, {headers: token ? {Authorization: 'Bearer ' + token} : {}});
  const body = await r.json();
  if (!r.ok) throw new Error(path + ': ' + (body.error ? body.error.message : r.status));
  return body;
}
async function refresh() {
  try {
    const s = await api('/v1/status');
    $('node').textContent = s.node_id + ' (' + s.role + ' ' + s.version + ')';
    $('state').textContent = s.state; $('state').className = 'state ' + s.state;
    const edge = s.role === 'edge';
    const rows = [['state since', s.state_since]].concat(edge ? [
      ['upstream', s.upstream ? s.upstream.url + (s.upstream.is_primary ? ' (primary)' : ' (alternate)') : '-'],
      ['last ping', s.last_ping_at || '-']] : []).concat([
      [edge ? 'backlog' : 'stored', s.backlog.messages + ' messages, ' + s.backlog.bytes + ' bytes, oldest ' + s.backlog.oldest_age_seconds + ' s']]);
    $('log-section').hidden = !edge;
    $('status').innerHTML = rows.map(r => '<tr><th>' + esc(r[0]) + '</th><td>' + esc(r[1]) + '</td></tr>').join('');
    $('log').querySelector('tbody').innerHTML = s.offline_log.slice().reverse().map(e =>
      '<tr><td>' + esc(e.at) + '</td><td>' + esc(e.cause) + '</td><td>' + esc(e.detail) + '</td></tr>').join('');
    const q = await api('/v1/queues');
    $('queues').querySelector('tbody').innerHTML = q.map(x => '<tr><td>' + esc(x.name) + '</td><td>' + x.messages + '</td><td>' + x.bytes +
      '</td><td>' + x.oldest_age_seconds + '</td><td>' + x.first_seq + '</td><td>' + x.last_seq + '</td></tr>').join('');
    const optional = async (path) => { try { return await api(path); } catch (e) { return null; } };
    const edges = s.role === 'central' ? await optional('/v1/edges') : null;
    $('edges-section').hidden = !edges;
    if (edges) $('edges').querySelector('tbody').innerHTML = edges.map(e => {
      const last = (e.offline_log || []).slice(-1)[0];
      return '<tr><td>' + esc(e.id) + '</td><td><span class="state ' + esc(e.state) + '">' + esc(e.state) + '</span></td><td>' + esc(e.state_since) +
        '</td><td>' + esc(e.last_seen) + '</td><td>' + esc(e.upstream_url) + '</td><td>' + esc(e.backlog_messages) + '</td><td>' + esc(e.downlink_pending) + '</td><td>' + esc(last ? last.cause : '') + '</td></tr>';
    }).join('');
    const routes = await optional('/v1/routes');
    $('routes-section').hidden = !routes || routes.length === 0;
    if (routes) $('routes').querySelector('tbody').innerHTML = routes.map(r => '<tr><td>' + esc(r.name) + '</td><td>' + esc(r.queue) +
      '</td><td><span class="state ' + (r.mode === 'forward' ? 'online' : 'offline') + '">' + esc(r.mode) + '</span></td><td>' + esc(r.mode_since) +
      '</td><td>' + esc(r.changed_by) + '</td><td>' + esc(r.reason) + '</td><td>' + esc(r.backlog) + '</td><td>' + esc(r.failed) + '</td></tr>').join('');
    $('err').textContent = ''; $('updated').textContent = 'updated ' + new Date().toLocaleTimeString();
  } catch (e) { $('err').textContent = e.message; }
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"#;
