// Models: the registry, its lineage graph, a model's recipe as YAML and its profile over depth.
import { getJson, request } from './api.js';
import { lineageGraph } from './charts.js';
import { clear, fmtBytes, fmtCount, fmtTime, h } from './dom.js';
import { profileCharts } from './profile.js';
import { toYaml } from './yaml.js';

function adapters(record) {
  const value = record.adapters ?? record.exit_adapters;
  if (!value || (Array.isArray(value) && !value.length)) return '—';
  if (Array.isArray(value)) return value.map((a) => (typeof a === 'object' ? a.id || a.name || a.depth : a)).join(', ');
  if (typeof value === 'object') return Object.keys(value).join(', ') || '—';
  return String(value);
}

function recipeYaml(recipe) {
  if (!recipe) return '# no recipe: registered as it is\n';
  const shown = { ...recipe };
  if (shown.kind === 'merge') delete shown.kind; // a merge recipe is mergekit YAML as pasted
  return toYaml(shown);
}

export async function render(root, ctx) {
  const models = (await getJson('/v1/models')).data;
  let selected = ctx.params.select || (models.length ? models[models.length - 1].id : null);
  const graph = h('div', { class: 'graph' });
  const detail = h('section', { id: 'model-detail', class: 'card' });
  const body = h('tbody');
  const table = h('table', { id: 'models-table' },
    h('thead', {}, h('tr', {}, ['model', 'architecture', 'layers', 'parameters', 'precision', 'size', 'adapters', 'created'].map((t) => h('th', {}, t)))),
    body);

  function select(id) {
    selected = id;
    for (const row of body.children) row.classList.toggle('selected', row.dataset.model === id);
    clear(graph, lineageGraph(models, { selected, onSelect: select }));
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
    const profile = r.profile
      ? h('div', {}, profileCharts(r.profile), h('p', { class: 'muted' },
        `Measured on ${r.profile.device} (${r.profile.dtype}) at ${fmtTime(r.profile.created_at)}; latency scale ${Number(r.profile.latency.scale || 1).toFixed(2)}.`))
      : h('div', {}, h('p', { class: 'muted' }, 'Not profiled yet (the first request with a latency budget profiles it).'),
        h('button', { type: 'button', id: 'profile-model', onclick: async () => {
          try {
            const job = await (await request('/v1/jobs', { method: 'POST', body: { kind: 'profile', model: id } })).json();
            ctx.go('jobs', { focus: job.id });
          } catch (e) { profileNote.textContent = e.message; }
        } }, 'Profile it now'), profileNote);
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
      h('td', { class: 'id' }, m.id), h('td', {}, r.architecture), h('td', { class: 'num' }, r.num_layers ?? '—'),
      h('td', { class: 'num' }, fmtCount(r.num_parameters)), h('td', {}, r.dtype), h('td', { class: 'num' }, fmtBytes(r.size_bytes)),
      h('td', {}, adapters(r)), h('td', {}, fmtTime(r.created))));
  }
  clear(root,
    h('section', { class: 'card' }, h('h2', {}, `Models (${models.length})`),
      models.length ? table : h('p', { class: 'muted' }, 'The registry is empty: import a model with POST /v1/models/import.')),
    h('section', { class: 'card' }, h('h2', {}, 'Lineage'), h('p', { class: 'muted' }, 'Parents → children; each edge is labelled with the method of the child’s recipe.'), graph),
    detail);
  if (selected) select(selected);
  else clear(graph, lineageGraph(models, {}));
}
