// Inline SVG: line charts over depth, and the lineage graph (parents -> children, edges labelled).
import { s } from './dom.js';

function niceStep(range, target = 4) {
  const raw = range / target;
  const power = 10 ** Math.floor(Math.log10(raw));
  const unit = raw / power;
  return (unit >= 5 ? 10 : unit >= 2 ? 5 : unit >= 1 ? 2 : 1) * power;
}

function ticks(low, high) {
  if (!(high > low)) return [low];
  const step = niceStep(high - low);
  const out = [];
  for (let v = Math.ceil(low / step) * step; v <= high + step * 1e-9; v += step) out.push(Number(v.toPrecision(10)));
  return out;
}

function label(v) {
  const a = Math.abs(v);
  if (a >= 1000) return `${(v / 1000).toFixed(a >= 10000 ? 0 : 1)}k`;
  if (a >= 10 || v === 0) return String(Math.round(v * 10) / 10);
  return String(Number(v.toPrecision(3)));
}

// series: [{name, points: [[x, y], ...]}]; every series gets its own colour class.
export function lineChart({ title, xLabel, yLabel, series, yFloor = null, width = 380, height = 230 }) {
  const m = { left: 52, right: 14, top: 40, bottom: 38 };
  const points = series.flatMap((one) => one.points);
  const svg = s('svg', { class: 'chart', width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': title });
  svg.append(s('text', { x: m.left, y: 16, class: 'chart-title' }, title));
  if (!points.length) {
    svg.append(s('text', { x: m.left, y: height / 2, class: 'muted' }, 'no data'));
    return svg;
  }
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs);
  const x1 = Math.max(...xs) === x0 ? x0 + 1 : Math.max(...xs);
  let y0 = yFloor === null ? Math.min(...ys) : Math.min(yFloor, ...ys);
  let y1 = Math.max(...ys);
  if (y1 === y0) { y1 += Math.abs(y1) * 0.1 || 1; y0 -= yFloor === null ? Math.abs(y0) * 0.1 || 1 : 0; }
  const pad = (y1 - y0) * 0.06;
  if (yFloor === null) y0 -= pad;
  y1 += pad;
  const px = (x) => m.left + ((x - x0) / (x1 - x0)) * (width - m.left - m.right);
  const py = (y) => height - m.bottom - ((y - y0) / (y1 - y0)) * (height - m.top - m.bottom);
  const axes = s('g', { class: 'axes' });
  for (const t of ticks(y0, y1)) {
    axes.append(s('line', { x1: m.left, x2: width - m.right, y1: py(t), y2: py(t), class: 'grid' }));
    axes.append(s('text', { x: m.left - 6, y: py(t) + 4, class: 'tick', 'text-anchor': 'end' }, label(t)));
  }
  const xTicks = [...new Set(xs)].sort((a, b) => a - b);
  const shown = xTicks.length > 12 ? ticks(x0, x1) : xTicks;
  for (const t of shown) {
    axes.append(s('text', { x: px(t), y: height - m.bottom + 15, class: 'tick', 'text-anchor': 'middle' }, label(t)));
  }
  axes.append(s('line', { x1: m.left, x2: width - m.right, y1: height - m.bottom, y2: height - m.bottom, class: 'axis' }));
  axes.append(s('line', { x1: m.left, x2: m.left, y1: m.top, y2: height - m.bottom, class: 'axis' }));
  axes.append(s('text', { x: (m.left + width - m.right) / 2, y: height - 6, class: 'axis-label', 'text-anchor': 'middle' }, xLabel));
  axes.append(s('text', { x: 12, y: (m.top + height - m.bottom) / 2, class: 'axis-label', 'text-anchor': 'middle',
    transform: `rotate(-90 12 ${(m.top + height - m.bottom) / 2})` }, yLabel));
  svg.append(axes);
  let legendX = m.left;
  series.forEach((one, i) => {
    const sorted = [...one.points].sort((a, b) => a[0] - b[0]);
    const g = s('g', { class: `series s${i % 6}`, 'data-series': one.name });
    g.append(s('polyline', { points: sorted.map(([x, y]) => `${px(x)},${py(y)}`).join(' ') }));
    for (const [x, y] of sorted) {
      g.append(s('circle', { cx: px(x), cy: py(y), r: 3 }, s('title', {}, `${one.name}: depth ${x}, ${label(y)}`)));
    }
    svg.append(g);
    svg.append(s('rect', { x: legendX, y: 24, width: 10, height: 4, class: `legend s${i % 6}` }));
    svg.append(s('text', { x: legendX + 14, y: 30, class: 'legend-text' }, one.name));
    legendX += 24 + one.name.length * 6.2;
  });
  return svg;
}

function levels(models) {
  const byId = new Map(models.map((m) => [m.id, m]));
  const memo = new Map();
  const level = (id, seen = new Set()) => {
    if (memo.has(id)) return memo.get(id);
    const model = byId.get(id);
    if (!model || seen.has(id)) return 0;
    seen.add(id);
    const parents = model.strata.parents || [];
    const value = parents.length ? 1 + Math.max(...parents.map((p) => level(p, seen))) : 0;
    memo.set(id, value);
    return value;
  };
  return level;
}

export function edgeLabel(record) {
  const recipe = record.recipe || {};
  return recipe.merge_method || recipe.kind || '';
}

// models: GET /v1/models `data`. Parents that are not registered (paths) appear as dashed nodes.
export function lineageGraph(models, { selected, onSelect } = {}) {
  const level = levels(models);
  const registered = new Set(models.map((m) => m.id));
  const nodes = new Map();
  for (const m of models) nodes.set(m.id, { id: m.id, level: level(m.id), external: false });
  for (const m of models) {
    for (const p of m.strata.parents || []) {
      if (!registered.has(p) && !nodes.has(p)) nodes.set(p, { id: p, level: 0, external: true });
    }
  }
  const columns = [];
  for (const node of nodes.values()) (columns[node.level] ||= []).push(node);
  const W = 176; const H = 30; const colGap = 250; const rowGap = 48;
  columns.forEach((col) => col.forEach((node, row) => { node.x = 16 + node.level * colGap; node.y = 16 + row * rowGap; }));
  const width = 32 + Math.max(0, columns.length - 1) * colGap + W;
  const height = 32 + Math.max(1, ...columns.map((c) => (c ? c.length : 0))) * rowGap;
  const svg = s('svg', { id: 'lineage', class: 'lineage', width, height, viewBox: `0 0 ${width} ${height}` });
  const edges = s('g', { class: 'edges' });
  for (const m of models) {
    const child = nodes.get(m.id);
    for (const p of m.strata.parents || []) {
      const parent = nodes.get(p);
      const x1 = parent.x + W; const y1 = parent.y + H / 2; const x2 = child.x; const y2 = child.y + H / 2;
      const mid = (x1 + x2) / 2;
      const text = edgeLabel(m.strata);
      edges.append(s('g', { class: 'edge', 'data-parent': p, 'data-child': m.id, 'data-label': text },
        s('path', { d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`, 'marker-end': 'url(#arrow)' }),
        s('text', { x: x1 + 8, y: y1 - 5, class: 'edge-label' }, text)));
    }
  }
  svg.append(s('defs', {}, s('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' },
    s('path', { d: 'M0,0 L10,5 L0,10 z', class: 'arrow-head' }))));
  svg.append(edges);
  for (const node of nodes.values()) {
    const name = node.id.length > 24 ? `${node.id.slice(0, 11)}…${node.id.slice(-11)}` : node.id;
    const cls = ['node', node.external ? 'external' : '', node.id === selected ? 'selected' : ''].join(' ').trim();
    const g = s('g', { class: cls, 'data-model': node.id, transform: `translate(${node.x},${node.y})`,
      onclick: node.external || !onSelect ? undefined : () => onSelect(node.id) },
    s('title', {}, node.id),
    s('rect', { width: W, height: H, rx: 6 }),
    s('text', { x: W / 2, y: H / 2 + 4, 'text-anchor': 'middle' }, name));
    svg.append(g);
  }
  return svg;
}
