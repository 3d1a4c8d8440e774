// Playground: prompt or chat at a latency budget; streams tokens from POST /v1/generate and shows what
// the budget bought: the chosen depth, predicted vs actual latency, budget met, and the exit's quality.
import { events, getJson, request } from './api.js';
import { clear, fmtMs, h } from './dom.js';
import { exitQuality } from './profile.js';

const MIN_MS = 1;
const MAX_MS = 100000;
const STEPS = 1000;
export const budgetAt = (position) => Math.round(MIN_MS * (MAX_MS / MIN_MS) ** (position / STEPS) * 100) / 100;

const state = { model: null, mode: 'prompt', chat: [], history: [] };

// The exit's quality as the server reports it (strata.quality), or null when the model is not profiled yet.
function describeQuality(q) {
  if (!q) return null;
  const adapter = q.exit_adapter ? 'exit adapter applied' : 'no exit adapter';
  return `perplexity ${q.perplexity_ratio.toFixed(2)}× full depth, top-1 agreement ${(100 * q.top1_agreement).toFixed(0)}%, ${adapter}`;
}

export async function render(root) {
  const models = (await getJson('/v1/models')).data;
  if (!state.model || !models.some((m) => m.id === state.model)) state.model = models.length ? models[0].id : null;
  const select = h('select', { id: 'pg-model', onchange: () => { state.model = select.value; state.chat = []; drawChat(); } },
    models.map((m) => h('option', { value: m.id, selected: m.id === state.model }, `${m.id} (${m.strata.num_layers ?? '?'} layers)`)));
  const mode = h('select', { id: 'pg-mode', onchange: () => { state.mode = mode.value; drawChat(); } },
    h('option', { value: 'prompt', selected: state.mode === 'prompt' }, 'prompt'), h('option', { value: 'chat', selected: state.mode === 'chat' }, 'chat'));
  const input = h('textarea', { id: 'pg-input', rows: 3, placeholder: 'The capital of France is' });
  const maxTokens = h('input', { id: 'pg-max-tokens', type: 'number', min: 1, max: 1024, value: 32 });
  const useBudget = h('input', { id: 'pg-use-budget', type: 'checkbox', checked: true, onchange: () => { slider.disabled = !useBudget.checked; showBudget(); } });
  const slider = h('input', { id: 'pg-budget', type: 'range', min: 0, max: STEPS, step: 1, value: 600, oninput: () => showBudget() });
  const budgetText = h('output', { id: 'pg-budget-value' });
  const maxPpl = h('input', { id: 'pg-max-ppl', type: 'number', min: 1, step: 0.1, placeholder: 'none' });
  const speculative = h('input', { id: 'pg-spec', type: 'checkbox', onchange: () => { draftDepth.disabled = draftTokens.disabled = !speculative.checked; } });
  const draftDepth = h('input', { id: 'pg-draft-depth', type: 'number', min: 1, value: 1, disabled: true });
  const draftTokens = h('input', { id: 'pg-draft-tokens', type: 'number', min: 1, max: 32, value: 4, disabled: true });
  const run = h('button', { type: 'button', id: 'pg-run', class: 'primary' }, 'Generate');
  const transcript = h('div', { id: 'pg-chat', class: 'chat' });
  const output = h('pre', { id: 'pg-output', class: 'generated' });
  const stats = h('dl', { id: 'pg-stats', class: 'stats' });
  const historyBody = h('tbody');
  const error = h('div', { id: 'pg-error' });

  function showBudget() {
    budgetText.textContent = useBudget.checked ? fmtMs(budgetAt(Number(slider.value))) : 'no budget (full depth)';
  }

  function drawChat() {
    clear(transcript, state.mode === 'chat'
      ? [state.chat.map((m) => h('div', { class: `msg ${m.role}` }, h('b', {}, `${m.role}: `), m.content)),
        state.chat.length ? h('button', { type: 'button', onclick: () => { state.chat = []; drawChat(); } }, 'Clear chat') : '']
      : []);
  }

  function drawHistory() {
    clear(historyBody, state.history.map((r) => h('tr', { 'data-depth': r.depth },
      h('td', {}, r.model), h('td', { class: 'num' }, r.budget === null ? '—' : fmtMs(r.budget)), h('td', { class: 'num depth' }, `${r.depth} / ${r.layers}`),
      h('td', { class: 'num' }, fmtMs(r.predicted)), h('td', { class: 'num' }, fmtMs(r.elapsed)),
      h('td', {}, r.met === null ? '—' : r.met ? 'yes' : 'no'), h('td', {}, r.quality))));
  }

  function body() {
    const payload = { model: state.model, max_new_tokens: Number(maxTokens.value) || 32, stream: true };
    if (state.mode === 'chat') payload.messages = [...state.chat, { role: 'user', content: input.value }];
    else payload.prompt = input.value;
    if (useBudget.checked) payload.latency_budget_ms = budgetAt(Number(slider.value));
    if (maxPpl.value !== '') payload.max_perplexity_ratio = Number(maxPpl.value); // sent only when set
    if (speculative.checked) payload.speculative = { draft_depth: Number(draftDepth.value), num_draft_tokens: Number(draftTokens.value) };
    return payload;
  }

  function drawStats(strata, quality) {
    const rows = [
      ['depth', `${strata.depth} of ${strata.num_layers} layers`],
      ['predicted latency', fmtMs(strata.predicted_ms)],
      ['actual latency', fmtMs(strata.elapsed_ms)],
      ['budget', strata.latency_budget_ms === null || strata.latency_budget_ms === undefined ? 'none' : fmtMs(strata.latency_budget_ms)],
      ['budget met', strata.budget_met === null || strata.budget_met === undefined ? '—' : strata.budget_met ? 'yes' : 'no'],
      ['queue wait', fmtMs(strata.queue_ms)],
      ['batch size', strata.batch_size ?? '—'],
      ['exit quality', quality],
      ['precision', strata.precision ?? '—'],
    ];
    if (strata.speculative) {
      const sp = strata.speculative;
      rows.push(['speculative', `draft depth ${sp.draft_depth}, ${sp.accepted}/${sp.drafted} accepted (${(100 * sp.acceptance_rate).toFixed(0)}%) in ${sp.iterations} passes`]);
    }
    clear(stats, rows.flatMap(([k, v]) => [h('dt', {}, k), h('dd', { 'data-field': k }, v)]));
  }

  async function generate() {
    if (!state.model) return;
    const payload = body();
    run.disabled = true;
    clear(error);
    output.textContent = '';
    clear(stats, h('dt', {}, 'status'), h('dd', {}, useBudget.checked ? 'choosing a depth…' : 'generating…'));
    try {
      const response = await request('/v1/generate', { method: 'POST', body: payload });
      let done = null;
      for await (const message of events(response)) {
        if (message.data === '[DONE]') break;
        const data = JSON.parse(message.data);
        if (data.type === 'token') output.textContent += data.text;
        else if (data.type === 'done') done = data;
        else if (data.type === 'error') throw new Error(data.error);
      }
      if (!done) throw new Error('the stream ended without a result');
      const strata = done.strata;
      let quality = describeQuality(strata.quality);
      if (!quality) {
        const record = await getJson(`/v1/models/${encodeURIComponent(payload.model)}`);
        const q = exitQuality(record.strata.profile, strata.depth);
        const profiled = Object.keys((record.strata.profile || {}).quality || {}).join(', ');
        quality = q ? `perplexity ${q.ratio.toFixed(2)}× full depth, top-1 agreement ${(100 * q.agreement).toFixed(0)}% (profile)`
          : `not profiled at depth ${strata.depth}${profiled ? ` (profiled: ${profiled})` : ''}`;
      }
      drawStats(strata, quality);
      state.history.unshift({ model: payload.model, budget: payload.latency_budget_ms ?? null, depth: strata.depth, layers: strata.num_layers,
        predicted: strata.predicted_ms, elapsed: strata.elapsed_ms, met: strata.budget_met ?? null, quality });
      drawHistory();
      if (state.mode === 'chat') {
        state.chat.push({ role: 'user', content: input.value }, { role: 'assistant', content: done.text });
        input.value = '';
        drawChat();
      }
    } catch (e) {
      clear(stats);
      clear(error, h('div', { class: 'error' }, e.message));
    } finally {
      run.disabled = false;
    }
  }
  run.addEventListener('click', generate);

  const label = (text, control, hint) => h('label', {}, h('span', {}, text), control, hint ? h('small', { class: 'muted' }, hint) : '');
  clear(root, h('section', { class: 'card' }, h('h2', {}, 'Playground'),
    models.length ? '' : h('p', { class: 'muted' }, 'No model is registered yet.'),
    h('div', { class: 'controls' },
      label('model', select), label('mode', mode), label('max new tokens', maxTokens),
      h('label', { class: 'budget' }, h('span', {}, 'latency budget'), h('span', { class: 'inline' }, useBudget, slider), budgetText),
      label('max perplexity ratio', maxPpl, 'quality floor; sent only when set'),
      h('label', {}, h('span', {}, 'speculative drafting'), h('span', { class: 'inline' }, speculative, 'draft depth', draftDepth, 'tokens', draftTokens))),
    transcript, input, h('div', { class: 'actions' }, run), error,
    h('div', { class: 'split' }, h('div', { class: 'grow' }, h('h3', {}, 'Output'), output), h('div', {}, h('h3', {}, 'What the budget bought'), stats))),
  h('section', { class: 'card' }, h('h2', {}, 'Runs'),
    h('table', { id: 'pg-history' }, h('thead', {}, h('tr', {}, ['model', 'budget', 'depth', 'predicted', 'actual', 'met', 'exit quality'].map((t) => h('th', {}, t)))), historyBody)));
  showBudget();
  drawChat();
  drawHistory();
}
