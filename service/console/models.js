// Models: the registry, its lineage graph, a model's recipe as YAML and its profile over depth.
import { getJson, request } from './api.js';
import { lineageGraph } from './charts.js';
import { clear, fmtBytes, fmtCount, fmtTime, h } from './dom.js';
import { profileCharts } from './profile.js';
import { toYaml } from './yaml.js';

// The exits a model has adapters for (its registry record's exit_adapters.exits), or what an adapter is.
export function adapters(record) {
  if (record.type === 'adapter') return `LoRA adapter of ${record.base_model || '?'}`;
  const exits = (record.exit_adapters || {}).exits;
  return Array.isArray(exits) && exits.length ? `exits ${exits.join(', ')}` : '—';
}

// The newest profile job of the model among the listed jobs, or null.
function profileJob(jobs, id) {
  const mine = jobs.filter((j) => j.kind === 'profile' && (j.spec || {}).model === id);
  mine.sort((a, b) => String(b.created_at).localeCompare(String(a.created_at)));
  return mine[0] || null;
}

// What the console says about a model's profile: its real state, never a guess.
export function profileStatus(record, job) {
  if (record.type === 'adapter') {
    return { state: 'adapter', text: `A LoRA adapter: it is applied on top of ${record.base_model || 'its base'}, which is the model that is profiled.` };
  }
  if (job && job.status === 'queued') return { state: 'queued', text: 'Profile queued: it runs on the background worker, no user job waits for it.' };
  if (job && job.status === 'started') {
    return { state: 'running', text: `Profiling now: ${Math.round((job.progress || 0) * 100)}%${job.message ? ` (${job.message})` : ''}.` };
  }
  if (record.profile) {
    const note = record.profile.quality_error ? ` ${record.profile.quality_error}.` : '';
    return { state: 'done', text: `Measured on ${record.profile.device} (${record.profile.dtype}) at ${fmtTime(record.profile.created_at)}; latency scale ${Number(record.profile.latency.scale || 1).toFixed(2)}.${note}` };
  }
  if (job && job.status === 'failed') return { state: 'failed', text: `The profile job failed: ${job.error || 'no reason given'}` };
  if (job && job.status === 'canceled') return { state: 'canceled', text: 'The profile job was canceled.' };
  return { state: 'none', text: 'Not profiled: no profile job is queued or running (STRATA_PROFILE_ON_REGISTER=false, or it was dropped). Until one runs, budgets use the conservative default latency model.' };
}

function recipeYaml(recipe) {
  if (!recipe) return '# no recipe: registered as it is\n';
  const shown = { ...recipe };
  if (shown.kind === 'merge') delete shown.kind; // a merge recipe is mergekit YAML as pasted
  return toYaml(shown);
}

export async function render(root, ctx) {
  const [models, jobs] = await Promise.all([
    getJson('/v1/models').then((r) => r.data),
    getJson('/v1/jobs?limit=1000').then((r) => r.data).catch(() => []),
  ]);
  let selected = ctx.params.select || (models.length ? models[models.length - 1].id : null);
  const graph = h('div', { class: 'graph' });
  const detail = h('section', { id: 'model-detail', class: 'card' });
  const body = h('tbody');
  const table = h('table', { id: 'models-table' },
    h('thead', {}, h('tr', {}, ['model', 'architecture', 'layers', 'parameters', 'precision', 'size', 'adapters', 'created'].map((t) => h('th', {}, t)))),
    body);

  const expanded = new Set(); // sibling groups the user opened
  let zoom = 1;
  function drawGraph() {
    const svg = lineageGraph(models, { selected, onSelect: select, expanded, onToggle: (key) => {
      if (expanded.has(key)) expanded.delete(key); else expanded.add(key);
      drawGraph();
    } });
    svg.setAttribute('width', Math.round(Number(svg.getAttribute('width')) * zoom));
    svg.setAttribute('height', Math.round(Number(svg.getAttribute('height')) * zoom));
    clear(graph, svg);
  }
  function zoomBy(factor) {
    zoom = factor === null ? Math.min(1, graph.clientWidth / (Number(graph.firstChild?.viewBox.baseVal.width) || 1)) : Math.min(3, Math.max(0.25, zoom * factor));
    drawGraph();
  }
  graph.addEventListener('wheel', (e) => { if (e.ctrlKey) { e.preventDefault(); zoomBy(e.deltaY < 0 ? 1.15 : 1 / 1.15); } }, { passive: false });
  const graphTools = h('div', { class: 'actions graph-tools' },
    h('button', { type: 'button', id: 'lineage-zoom-out', title: 'Zoom out (or Ctrl + wheel)', onclick: () => zoomBy(1 / 1.25) }, '−'),
    h('button', { type: 'button', id: 'lineage-zoom-in', title: 'Zoom in (or Ctrl + wheel)', onclick: () => zoomBy(1.25) }, '+'),
    h('button', { type: 'button', id: 'lineage-fit', onclick: () => zoomBy(null) }, 'Fit'),
    h('button', { type: 'button', id: 'lineage-collapse', onclick: () => { expanded.clear(); drawGraph(); } }, 'Collapse groups'),
    h('span', { class: 'muted' }, 'Drag the scroll bars to pan; a node “N × method ▸” stands for N alike children of one parent: click it to expand.'));

  function select(id) {
    selected = id;
    for (const row of body.children) row.classList.toggle('selected', row.dataset.model === id);
    drawGraph();
    showDetail(id);
  }

  function showDetail(id) {
    const model = models.find((m) => m.id === id);
    if (!model) { clear(detail, h('p', { class: 'muted' }, 'No model selected.')); return; }
    const r = model.strata;
    const recipe = h('pre', { class: 'yaml', id: 'recipe-yaml' }, recipeYaml(r.recipe));
    const actions = h('div', { class: 'actions' });
    if (r.recipe && r.recipe.kind === 'merge') {
      actions.append(h('button', { type: 'button', onclick: () => ctx.go('merge', { draft: recipeYaml(r.recipe) }) }, 'Open recipe in the merge editor'));
    }
    const profileNote = h('p', { class: 'muted' });
    const status = profileStatus(r, profileJob(Array.isArray(jobs) ? jobs : [], id));
    const canProfile = ['none', 'failed', 'canceled', 'done'].includes(status.state);
    const button = canProfile ? h('button', { type: 'button', id: 'profile-model', onclick: async () => {
      try {
        const job = await (await request('/v1/jobs', { method: 'POST', body: { kind: 'profile', model: id } })).json();
        ctx.go('jobs', { focus: job.id });
      } catch (e) { profileNote.textContent = e.message; }
    } }, status.state === 'done' ? 'Profile it again' : 'Profile it now') : null;
    const statusLine = h('p', { class: `muted profile-status ${status.state}`, id: 'profile-status', 'data-state': status.state }, status.text);
    const profile = h('div', {}, r.profile && r.profile.latency ? profileCharts(r.profile) : null, statusLine, button, profileNote);
    clear(detail,
      h('h2', {}, id),
      h('p', { class: 'muted' }, `parents: ${(r.parents || []).join(', ') || 'none'}`),
      h('div', { class: 'split' },
        h('div', {}, h('h3', {}, 'Recipe'), recipe, actions),
        h('div', { class: 'grow' }, h('h3', {}, 'Profile over depth'), profile)));
  }

  for (const m of models) {
    const r = m.strata;
    body.append(h('tr', { 'data-model': m.id, onclick: () => select(m.id) },
      h('td', { class: 'id' }, m.id), h('td', {}, r.architecture), h('td', { class: 'num' }, r.type === 'adapter' ? '—' : r.num_layers ?? '—'),
      h('td', { class: 'num' }, fmtCount(r.num_parameters)), h('td', {}, r.dtype), h('td', { class: 'num' }, fmtBytes(r.size_bytes)),
      h('td', {}, adapters(r)), h('td', {}, fmtTime(r.created))));
  }
  clear(root,
    h('section', { class: 'card' }, h('h2', {}, `Models (${models.length})`),
      models.length ? table : h('p', { class: 'muted' }, 'The registry is empty: import a model with POST /v1/models/import.')),
    h('section', { class: 'card' }, h('h2', {}, 'Lineage'), h('p', { class: 'muted' }, 'Parents → children, one column per generation, families of one base together; each child is labelled with its recipe’s method.'), graphTools, graph),
    detail);
  if (selected) select(selected);
  else drawGraph();
}
