// Reading a model's profile (GET /v1/models/{id} -> strata.profile): latency and quality per depth.
import { h } from './dom.js';
import { lineChart } from './charts.js';

export const PROMPT_TOKENS = 64;

function depthsOf(table) {
  return Object.keys(table || {}).map(Number).filter(Number.isFinite).sort((a, b) => a - b);
}

// Numeric quality fields per exit, flattened one level ("adapter.perplexity"), so profiles that add
// exit-adapter columns are plotted beside the plain ones.
function numericFields(entry, prefix = '') {
  const out = {};
  for (const [key, value] of Object.entries(entry || {})) {
    if (typeof value === 'number') out[prefix + key] = value;
    else if (value && typeof value === 'object' && !Array.isArray(value) && !prefix) {
      Object.assign(out, numericFields(value, `${key}.`));
    }
  }
  return out;
}

export function latencySeries(profile) {
  const latency = profile.latency || {};
  const scale = latency.scale || 1;
  const depths = depthsOf(latency.depths);
  return [
    { name: 'per new token', points: depths.map((k) => [k, scale * latency.depths[k].c_ms_per_new_token]) },
    {
      name: `prefill, ${PROMPT_TOKENS}-token prompt`,
      points: depths.map((k) => [k, scale * (latency.depths[k].a_ms + PROMPT_TOKENS * latency.depths[k].b_ms_per_prompt_token)]),
    },
  ];
}

export function qualitySeries(profile) {
  const quality = profile.quality || {};
  const depths = depthsOf(quality);
  const full = profile.num_layers && quality[profile.num_layers] ? profile.num_layers : depths[depths.length - 1];
  const fullPerplexity = full !== undefined ? quality[full].perplexity : null;
  const fields = new Set(depths.flatMap((k) => Object.keys(numericFields(quality[k]))));
  const ratio = [];
  const agreement = [];
  for (const field of fields) {
    const points = depths.map((k) => [k, numericFields(quality[k])[field]]).filter(([, v]) => typeof v === 'number');
    if (field.endsWith('perplexity') && fullPerplexity) {
      ratio.push({ name: field === 'perplexity' ? 'plain exit' : field.replace(/\.?perplexity$/, '') || field,
        points: points.map(([k, v]) => [k, v / fullPerplexity]) });
    } else if (field.includes('agreement')) {
      agreement.push({ name: field === 'top1_agreement' ? 'plain exit' : field.replace(/\.?top1_agreement$/, '') || field, points });
    }
  }
  return { ratio, agreement, full, fullPerplexity };
}

// The exit's quality as the profile measured it: {depth, ratio, agreement} or null if not profiled there.
export function exitQuality(profile, depth) {
  if (!profile || !profile.quality) return null;
  const entry = profile.quality[depth];
  const { fullPerplexity } = qualitySeries(profile);
  if (!entry || !fullPerplexity) return null;
  return { depth, ratio: entry.perplexity / fullPerplexity, agreement: entry.top1_agreement };
}

export function profileCharts(profile) {
  const { ratio, agreement } = qualitySeries(profile);
  return h('div', { class: 'charts' },
    lineChart({ title: 'Predicted latency', xLabel: 'exit depth (layers)', yLabel: 'ms', series: latencySeries(profile), yFloor: 0 }),
    lineChart({ title: 'Perplexity ratio to full depth', xLabel: 'exit depth (layers)', yLabel: 'ratio', series: ratio, yFloor: 1, logY: true }),
    lineChart({ title: 'Top-1 agreement with full depth', xLabel: 'exit depth (layers)', yLabel: 'agreement', series: agreement, yFloor: 0 }));
}
