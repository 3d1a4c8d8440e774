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

export function label(v) {
  const a = Math.abs(v);
  for (const [size, unit] of [[1e9, 'G'], [1e6, 'M'], [1e3, 'k']]) {
    if (a >= size) return `${Number((v / size).toPrecision(3))}${unit}`;
  }
  if (a >= 10 || v === 0) return String(Math.round(v * 10) / 10);
  return String(Number(v.toPrecision(3)));
}

// Ticks of a log10 axis over [lo, hi] (exponents): whole decades, 1-2-5 within a decade or two, and plain
// ticks of the values within less than a decade.
export function logTicks(lo, hi) {
  const out = [];
  if (hi - lo < 1) return ticks(10 ** lo, 10 ** hi).filter((v) => v > 0).map(Math.log10);
  if (hi - lo >= 2) {
    const step = Math.max(1, Math.ceil((hi - lo) / 6));
    for (let e = Math.ceil(lo); e <= hi + 1e-9; e += step) out.push(e);
    return out;
  }
  for (let e = Math.floor(lo); e <= Math.ceil(hi); e += 1) {
    for (const m of [1, 2, 5]) {
      const t = e + Math.log10(m);
      if (t >= lo - 1e-9 && t <= hi + 1e-9) out.push(t);
    }
  }
  return out.length ? out : [lo];
}

// series: [{name, points: [[x, y], ...]}]; every series gets its own colour class. `logY`: a log10 y axis
// (values <= 0 are left out), for quantities that span orders of magnitude.
export function lineChart({ title, xLabel, yLabel, series, yFloor = null, logY = false, width = 380, height = 240 }) {
  const m = { left: 52, right: 14, top: 48, bottom: 38 };
  const f = logY ? Math.log10 : (v) => v;
  series = series.map((one) => ({ ...one, points: one.points.filter(([, y]) => Number.isFinite(f(y))).map(([x, y]) => [x, f(y)]) }));
  if (logY && yFloor !== null) yFloor = yFloor > 0 ? f(yFloor) : null;
  const points = series.flatMap((one) => one.points);
  const svg = s('svg', { class: 'chart', width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': title,
    'data-scale': logY ? 'log' : 'linear' });
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
  for (const t of logY ? logTicks(y0, y1) : ticks(y0, y1)) {
    axes.append(s('line', { x1: m.left, x2: width - m.right, y1: py(t), y2: py(t), class: 'grid' }));
    axes.append(s('text', { x: m.left - 6, y: py(t) + 4, class: 'tick', 'text-anchor': 'end' }, label(logY ? 10 ** t : t)));
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
    transform: `rotate(-90 12 ${(m.top + height - m.bottom) / 2})` }, logY ? `${yLabel} (log scale)` : yLabel));
  svg.append(axes);
  let legendX = m.left;
  series.forEach((one, i) => {
    const sorted = [...one.points].sort((a, b) => a[0] - b[0]);
    const g = s('g', { class: `series s${i % 6}`, 'data-series': one.name });
    g.append(s('polyline', { points: sorted.map(([x, y]) => `${px(x)},${py(y)}`).join(' ') }));
    for (const [x, y] of sorted) {
      g.append(s('circle', { cx: px(x), cy: py(y), r: 3 }, s('title', {}, `${one.name}: depth ${x}, ${label(logY ? 10 ** y : y)}`)));
    }
    svg.append(g);
    svg.append(s('rect', { x: legendX, y: 27, width: 10, height: 4, class: `legend s${i % 6}` }));
    svg.append(s('text', { x: legendX + 14, y: 33, class: 'legend-text' }, one.name));
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

export const COLLAPSE_AT = 4; // this many leaf siblings made alike (same parents, same method) show as one node

// Leaf models with the same parents and the same method, COLLAPSE_AT or more of them: {key: {ids, parents, label}}.
export function siblingGroups(models) {
  const hasChildren = new Set(models.flatMap((m) => m.strata.parents || []));
  const groups = new Map();
  for (const m of models) {
    const parents = m.strata.parents || [];
    if (!parents.length || hasChildren.has(m.id)) continue;
    const key = `${parents.join('\u0000')}\u0001${edgeLabel(m.strata)}`;
    if (!groups.has(key)) groups.set(key, { key, ids: [], parents, label: edgeLabel(m.strata) });
    groups.get(key).ids.push(m.id);
  }
  return new Map([...groups].filter(([, g]) => g.ids.length >= COLLAPSE_AT));
}

// models: GET /v1/models `data`. Columns by generation (parents left of children), rows grouped by family
// (the base a model descends from) and ordered by their parents' rows, so edges stay short and labels apart.
// Parents that are not registered (paths) appear as dashed nodes. Groups of alike leaf siblings (the variants
// of one base) show as one node until expanded (`expanded`: a Set of group keys; `onToggle(key)`).
export function lineageGraph(models, { selected, onSelect, expanded = new Set(), onToggle } = {}) {
  const level = levels(models);
  const registered = new Set(models.map((m) => m.id));
  const groups = siblingGroups(models);
  const collapsedOf = new Map(); // model id -> its group, while the group is collapsed
  for (const g of groups.values()) {
    if (expanded.has(g.key) || g.ids.includes(selected)) continue;
    for (const id of g.ids) collapsedOf.set(id, g);
  }
  const nodes = new Map();
  const edgesIn = new Map(); // node id -> {parents, label}
  for (const m of models) {
    const g = collapsedOf.get(m.id);
    const id = g ? `group:${g.key}` : m.id;
    if (!nodes.has(id)) {
      nodes.set(id, g
        ? { id, level: level(m.id), group: g, title: `${g.ids.length} models (${g.label || 'children'}): ${g.ids.join(', ')}` }
        : { id, level: level(m.id), title: m.id });
      edgesIn.set(id, { parents: m.strata.parents || [], label: edgeLabel(m.strata) });
    }
  }
  for (const m of models) {
    for (const p of m.strata.parents || []) {
      if (!registered.has(p) && !nodes.has(p)) nodes.set(p, { id: p, level: 0, external: true, title: p });
    }
  }
  // family: the root a node descends from through first parents; rows follow the families' first appearance
  const family = (id, seen = new Set()) => {
    const parents = (edgesIn.get(id) || {}).parents || [];
    if (!parents.length || seen.has(id)) return id;
    seen.add(id);
    return family(parents[0], seen);
  };
  const familyOrder = new Map();
  for (const id of nodes.keys()) { const f = family(id); if (!familyOrder.has(f)) familyOrder.set(f, familyOrder.size); }
  // each family gets a band of rows as tall as its fullest column; within a band, a column is ordered by the
  // rows of its nodes' parents
  const W = 176; const H = 30; const colGap = 270; const rowGap = 46;
  const bands = new Map(); // family -> columns of its nodes
  for (const node of nodes.values()) {
    const f = family(node.id);
    if (!bands.has(f)) bands.set(f, []);
    (bands.get(f)[node.level] ||= []).push(node);
  }
  const rowOf = new Map();
  let bandStart = 0;
  let levelsUsed = 0;
  for (const f of [...bands.keys()].sort((a, b) => familyOrder.get(a) - familyOrder.get(b))) {
    const columns = bands.get(f);
    columns.forEach((col) => {
      if (!col) return;
      const parentRow = (node) => {
        const rows = ((edgesIn.get(node.id) || {}).parents || []).map((p) => rowOf.get(p)).filter((r) => r !== undefined);
        return rows.length ? rows.reduce((a, b) => a + b, 0) / rows.length : 0;
      };
      col.sort((a, b) => (parentRow(a) - parentRow(b)) || a.id.localeCompare(b.id));
      col.forEach((node, i) => {
        const row = bandStart + i;
        rowOf.set(node.id, row);
        node.x = 16 + node.level * colGap;
        node.y = 24 + row * rowGap;
      });
    });
    bandStart += Math.max(1, ...columns.map((c) => (c ? c.length : 0)));
    levelsUsed = Math.max(levelsUsed, columns.length);
  }
  const width = 40 + Math.max(0, levelsUsed - 1) * colGap + W;
  const height = 40 + Math.max(1, bandStart) * rowGap;
  const svg = s('svg', { id: 'lineage', class: 'lineage', width, height, viewBox: `0 0 ${width} ${height}` });
  const edges = s('g', { class: 'edges' });
  const labels = s('g', { class: 'edge-labels' });
  for (const [id, { parents, label: text }] of edgesIn) {
    const child = nodes.get(id);
    for (const p of parents) {
      const parent = nodes.get(p);
      const x1 = parent.x + W; const y1 = parent.y + H / 2; const x2 = child.x; const y2 = child.y + H / 2;
      const mid = (x1 + x2) / 2;
      edges.append(s('g', { class: 'edge', 'data-parent': p, 'data-child': id, 'data-label': text },
        s('path', { d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`, 'marker-end': 'url(#arrow)' })));
    }
    // one label per child, just above where its edges arrive: children sit rowGap apart, so labels never meet
    if (parents.length && text) {
      labels.append(s('text', { x: child.x - 12, y: child.y + H / 2 - 7, class: 'edge-label', 'text-anchor': 'end', 'data-child': id }, text));
    }
  }
  svg.append(s('defs', {}, s('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' },
    s('path', { d: 'M0,0 L10,5 L0,10 z', class: 'arrow-head' }))));
  svg.append(edges, labels);
  for (const node of nodes.values()) {
    const text = node.group ? `${node.group.ids.length} × ${node.group.label || 'children'} ▸` : node.id;
    const name = text.length > 24 ? `${text.slice(0, 11)}…${text.slice(-11)}` : text;
    const cls = ['node', node.external ? 'external' : '', node.group ? 'group' : '', node.id === selected ? 'selected' : ''].join(' ').trim();
    const click = node.group ? (onToggle && (() => onToggle(node.group.key)))
      : node.external || !onSelect ? undefined : () => onSelect(node.id);
    const g = s('g', { class: cls, 'data-model': node.group ? undefined : node.id, 'data-group': node.group ? node.group.key : undefined,
      transform: `translate(${node.x},${node.y})`, onclick: click },
    s('title', {}, node.title),
    s('rect', { width: W, height: H, rx: 6 }),
    s('text', { x: W / 2, y: H / 2 + 4, 'text-anchor': 'middle' }, name));
    svg.append(g);
  }
  return svg;
}
