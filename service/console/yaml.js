// A small YAML writer for recipes (plain data: mappings, lists, strings, numbers, booleans, null).
const PLAIN = /^[A-Za-z_./][A-Za-z0-9_./ -]*$/;
const RESERVED = /^(true|false|yes|no|on|off|null|~|y|n)$/i;

function scalar(value) {
  if (value === null || value === undefined) return 'null';
  if (typeof value === 'number' || typeof value === 'boolean') return String(value);
  const text = String(value);
  if (PLAIN.test(text) && !RESERVED.test(text) && !text.endsWith(' ') && !text.includes(': ')) return text;
  return JSON.stringify(text);
}

function isScalar(value) {
  return value === null || typeof value !== 'object';
}

function inline(value) {
  if (isScalar(value)) return scalar(value);
  if (Array.isArray(value)) return `[${value.map(inline).join(', ')}]`;
  return `{${Object.entries(value).map(([k, v]) => `${scalar(k)}: ${inline(v)}`).join(', ')}}`;
}

function small(value, depth = 0) {
  // Short lists and mappings of scalars (or of short lists) read best on one line, as mergekit examples
  // write them: `parameters: {weight: 0.5, density: [0.4, 0.8]}`.
  if (isScalar(value)) return true;
  const items = Array.isArray(value) ? value : Object.values(value);
  const simple = (item) => isScalar(item) || (depth === 0 && Array.isArray(item) && small(item, 1));
  return items.every(simple) && inline(value).length <= 72;
}

export function toYaml(value, indent = '') {
  if (isScalar(value) || small(value)) return `${inline(value)}\n`;
  const lines = [];
  if (Array.isArray(value)) {
    for (const item of value) {
      if (isScalar(item) || small(item)) {
        lines.push(`${indent}- ${inline(item)}`);
      } else {
        const body = toYaml(item, `${indent}  `).trimStart();
        lines.push(`${indent}- ${body.trimEnd()}`);
      }
    }
  } else {
    for (const [key, item] of Object.entries(value)) {
      if (isScalar(item) || small(item)) {
        lines.push(`${indent}${scalar(key)}: ${inline(item)}`);
      } else {
        lines.push(`${indent}${scalar(key)}:`);
        lines.push(toYaml(item, Array.isArray(item) ? `${indent}  ` : `${indent}  `).trimEnd());
      }
    }
  }
  return `${lines.join('\n')}\n`;
}
