// The public HTTP API, as every other client uses it: bearer key, JSON errors, server-sent events.
const KEY_NAME = 'strata-api-key';

export const auth = {
  key: sessionStorage.getItem(KEY_NAME) || '',
  onUnauthorized: null,
};

export function setKey(key) {
  auth.key = key;
  if (key) sessionStorage.setItem(KEY_NAME, key);
  else sessionStorage.removeItem(KEY_NAME);
}

export function formatDetail(detail) {
  if (typeof detail === 'string') return detail;
  if (Array.isArray(detail)) {
    return detail.map((e) => `${(e.loc || []).filter((p) => p !== 'body').join('.') || 'body'}: ${e.msg}`).join('\n');
  }
  return detail ? JSON.stringify(detail) : '';
}

export class ApiError extends Error {
  constructor(status, detail) {
    super(`${status}: ${formatDetail(detail) || 'request failed'}`);
    this.status = status;
    this.detail = detail;
  }
}

// fetch with the key; a non-2xx answer throws ApiError carrying the server's `detail`.
export async function request(path, { method = 'GET', body, type, signal } = {}) {
  const headers = {};
  if (auth.key) headers.Authorization = `Bearer ${auth.key}`;
  let payload = body;
  if (body !== undefined && typeof body !== 'string') {
    payload = JSON.stringify(body);
    headers['Content-Type'] = 'application/json';
  } else if (type) {
    headers['Content-Type'] = type;
  }
  const response = await fetch(path, { method, headers, body: payload, signal });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch { /* not JSON */ }
    if (response.status === 401 && auth.onUnauthorized) auth.onUnauthorized();
    throw new ApiError(response.status, detail);
  }
  return response;
}

export async function getJson(path, options) {
  return (await request(path, options)).json();
}

// Server-sent events from a fetch response (EventSource cannot send an Authorization header).
export async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n/g, '\n');
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = 'message';
      const data = [];
      for (const line of block.split('\n')) {
        if (!line || line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? '' : line.slice(colon + 1);
        if (text.startsWith(' ')) text = text.slice(1);
        if (field === 'event') event = text;
        else if (field === 'data') data.push(text);
      }
      if (data.length) yield { event, data: data.join('\n') };
    }
  }
}

// Follow one job over GET /v1/jobs/{id}/events; resolves with its last view.
export async function followJob(id, onView, signal) {
  const response = await request(`/v1/jobs/${encodeURIComponent(id)}/events`, { signal });
  let last = null;
  for await (const message of events(response)) {
    if (message.event === 'job') {
      last = JSON.parse(message.data);
      onView(last);
    } else if (message.event === 'error') {
      throw new Error(JSON.parse(message.data).detail);
    }
  }
  return last;
}
