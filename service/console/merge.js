// Merge editor: a mergekit YAML, validated without queueing (POST /v1/merges/validate), submitted
// (POST /v1/merges) and followed to the end.
import { followJob, formatDetail, getJson, request } from './api.js';
import { clear, h } from './dom.js';
import { outcome, progressBar } from './jobs.js';

let draft = null; // the text survives switching views

function template(models) {
  const ids = models.map((m) => m.id);
  const [base, a, b] = [ids[0] || 'base-model', ids[1] || 'variant-1', ids[2] || ids[1] || 'variant-2'];
  return `merge_method: ties
base_model: ${base}
models:
  - model: ${a}
    parameters: {weight: 0.5, density: 0.5}
  - model: ${b}
    parameters: {weight: 0.5, density: 0.5}
parameters: {normalize: true}
dtype: float32
name: ${base}-ties-${Math.random().toString(36).slice(2, 6)}
`;
}

function fmtParams(params) {
  return Object.entries(params).map(([k, v]) => `${k}=${typeof v === 'number' ? Number(v.toPrecision(4)) : v}`).join(', ');
}

function planTable(plan) {
  return h('div', { class: 'scroll' }, h('table', { id: 'plan-table' },
    h('thead', {}, h('tr', {}, h('th', {}, 'tensor'), h('th', {}, 'shape'), h('th', {}, 't'),
      h('th', {}, 'per model'), h('th', {}, 'global'))),
    h('tbody', {}, plan.tensors.map((t) => h('tr', {},
      h('td', { class: 'id' }, t.name), h('td', {}, t.shape.join('×')), h('td', { class: 'num' }, t.layer_position.toFixed(3)),
      h('td', {}, t.merged ? t.models.map((m) => h('div', {}, h('b', {}, m.model), ` ${fmtParams(m.parameters)}`)) : h('span', { class: 'muted' }, `copied from ${plan.reference_model}`)),
      h('td', {}, t.merged ? fmtParams(t.parameters) : ''))))));
}

export async function render(root, ctx) {
  if (ctx.params.draft) draft = ctx.params.draft;
  if (draft === null) draft = template((await getJson('/v1/models')).data);
  const editor = h('textarea', { id: 'merge-yaml', spellcheck: 'false', rows: 16, oninput: () => { draft = editor.value; } });
  editor.value = draft;
  const output = h('div', { id: 'merge-output' });
  const follow = h('div', { id: 'merge-follow' });
  let controller = null;

  function showError(e) {
    clear(output, h('div', { class: 'error', id: 'merge-error' }, h('b', {}, `${e.status || ''} `), h('pre', {}, e.detail !== undefined ? formatDetail(e.detail) : e.message)));
  }

  async function validate() {
    clear(output, h('p', { class: 'muted' }, 'Validating…'));
    try {
      const plan = await (await request('/v1/merges/validate', { method: 'POST', body: editor.value, type: 'application/yaml' })).json();
      clear(output, h('div', { class: 'ok', id: 'merge-valid' },
        `Valid: ${plan.merge_method} of ${plan.input_models.join(', ')} → ${plan.name || '(name derived at submission)'}; ${plan.num_tensors} tensors, resolved per tensor below.`),
      planTable(plan));
    } catch (e) { showError(e); }
  }

  function drawJob(view) {
    const done = view.status === 'finished' && view.result && view.result.model;
    clear(follow, h('div', { class: 'card inner', id: 'merge-job', 'data-status': view.status },
      h('p', {}, 'Job ', h('code', {}, view.id), ' — ', h('span', { class: `status ${view.status}`, id: 'merge-job-status' }, view.status),
        view.elapsed_s !== null ? ` after ${view.elapsed_s.toFixed(1)} s` : ''),
      progressBar(view),
      h('p', { class: 'message' }, view.message || ''),
      view.error ? h('p', { class: 'error-text' }, view.error) : '',
      done ? h('p', {}, `Registered ${view.result.model}. `, h('button', { type: 'button', id: 'show-lineage', onclick: () => ctx.go('models', { select: view.result.model }) }, 'Show it in the lineage')) : '',
      !done && view.status === 'finished' ? h('p', {}, outcome(view)) : ''));
  }

  async function submit() {
    if (output.querySelector('.error')) clear(output);
    try {
      const job = await (await request('/v1/merges', { method: 'POST', body: editor.value, type: 'application/yaml' })).json();
      drawJob(job);
      controller = new AbortController();
      await followJob(job.id, drawJob, controller.signal);
    } catch (e) {
      if (!(controller && controller.signal.aborted)) showError(e);
    }
  }

  clear(root, h('section', { class: 'card' }, h('h2', {}, 'Merge editor'),
    h('p', { class: 'muted' }, 'Paste or edit a mergekit YAML (models form; Strata adds name and seed). Validate resolves every tensor’s parameters without queueing anything.'),
    editor,
    h('div', { class: 'actions' },
      h('button', { type: 'button', id: 'merge-validate', onclick: validate }, 'Validate'),
      h('button', { type: 'button', id: 'merge-submit', class: 'primary', onclick: submit }, 'Submit merge'),
      h('button', { type: 'button', onclick: async () => { draft = template((await getJson('/v1/models')).data); editor.value = draft; } }, 'Reset template')),
    follow, output));
  return () => { if (controller) controller.abort(); };
}
