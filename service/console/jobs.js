// Jobs: every job with its status and live progress (server-sent events per active job), cancel.
import { followJob, getJson, request } from './api.js';
import { clear, fmtTime, h } from './dom.js';

const ENDED = new Set(['finished', 'failed', 'canceled']);
// A browser opens at most 6 HTTP/1.1 connections to a host: follow a few jobs live, poll the rest.
const MAX_FOLLOWED = 3;

export function progressBar(view) {
  const percent = Math.round((view.progress || 0) * 100);
  const bar = h('div', { class: `progress ${view.status}`, role: 'progressbar', 'aria-valuenow': percent, 'aria-valuemin': 0, 'aria-valuemax': 100 },
    h('div', { class: 'fill' }), h('span', {}, `${percent}%`));
  bar.firstChild.style.width = `${percent}%`;
  return bar;
}

export function outcome(view) {
  if (view.error) return view.error;
  if (view.result && view.result.model) return `model ${view.result.model}`;
  if (view.result) return JSON.stringify(view.result).slice(0, 80);
  return '';
}

export async function render(root, ctx) {
  const views = new Map();
  const followers = new Map();
  const open = new Set(ctx.params.focus ? [ctx.params.focus] : []);
  const body = h('tbody');
  const note = h('p', { class: 'muted' });
  let stopped = false;

  function draw() {
    const rows = [...views.values()].sort((a, b) => String(b.created_at).localeCompare(String(a.created_at)));
    clear(body, rows.flatMap((v) => {
      const cancel = ENDED.has(v.status) ? '' : h('button', { type: 'button', class: 'cancel', onclick: async (e) => {
        e.stopPropagation();
        try { views.set(v.id, await (await request(`/v1/jobs/${encodeURIComponent(v.id)}`, { method: 'DELETE' })).json()); draw(); } catch (err) { note.textContent = err.message; }
      } }, 'Cancel');
      const row = h('tr', { 'data-job': v.id, 'data-status': v.status, class: open.has(v.id) ? 'selected' : '', onclick: () => { open.has(v.id) ? open.delete(v.id) : open.add(v.id); draw(); } },
        h('td', { class: 'id', title: v.id }, v.id.slice(0, 8)), h('td', {}, v.kind), h('td', {}, h('span', { class: `status ${v.status}` }, v.status)),
        h('td', {}, progressBar(v)), h('td', { class: 'message' }, v.message || ''), h('td', {}, fmtTime(v.created_at)),
        h('td', { class: 'num' }, v.elapsed_s === null ? '—' : `${v.elapsed_s.toFixed(1)} s`), h('td', { class: v.error ? 'error-text' : '' }, outcome(v)), h('td', {}, cancel));
      if (!open.has(v.id)) return [row];
      const details = { id: v.id, spec: v.spec, created_at: v.created_at, started_at: v.started_at, ended_at: v.ended_at, result: v.result, error: v.error };
      return [row, h('tr', { class: 'details' }, h('td', { colspan: 9 }, h('pre', {}, JSON.stringify(details, null, 2))))];
    }));
  }

  function follow(id) {
    if (followers.has(id) || stopped || followers.size >= MAX_FOLLOWED) return;
    const controller = new AbortController();
    followers.set(id, controller);
    followJob(id, (view) => { views.set(id, view); draw(); }, controller.signal)
      .catch((e) => { if (!controller.signal.aborted) note.textContent = `${id.slice(0, 8)}: ${e.message}`; })
      .finally(() => followers.delete(id));
  }

  async function refresh() {
    const list = (await getJson('/v1/jobs?limit=200')).data;
    for (const v of list) {
      if (!followers.has(v.id)) views.set(v.id, v);
      if (!ENDED.has(v.status)) follow(v.id);
    }
    draw();
  }

  clear(root, h('section', { class: 'card' }, h('h2', {}, 'Jobs'),
    h('p', { class: 'muted' }, 'Active jobs update live from GET /v1/jobs/{id}/events (a few at a time; the list refreshes every 3 s); click a row for its spec, timings and result.'),
    note,
    h('table', { id: 'jobs-table' }, h('thead', {}, h('tr', {}, ['job', 'kind', 'status', 'progress', 'phase', 'created', 'time', 'result or error', ''].map((t) => h('th', {}, t)))), body)));
  await refresh();
  const timer = setInterval(() => refresh().catch((e) => { note.textContent = e.message; }), 3000);
  return () => {
    stopped = true;
    clearInterval(timer);
    for (const controller of followers.values()) controller.abort();
  };
}
