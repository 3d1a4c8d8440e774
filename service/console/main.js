// The console shell: the login view (when the API wants a key), then one view at a time by URL hash.
import { auth, getJson, setKey } from './api.js';
import { clear, h } from './dom.js';
import * as jobs from './jobs.js';
import * as merge from './merge.js';
import * as models from './models.js';
import * as playground from './playground.js';

const VIEWS = { models, jobs, merge, playground };
const app = document.getElementById('app');
const nav = document.getElementById('nav');
const logout = document.getElementById('logout');
let cleanup = null;
let pendingParams = {};

function login(message) {
  if (cleanup) { cleanup(); cleanup = null; }
  nav.hidden = true;
  logout.hidden = true;
  document.body.dataset.view = 'login';
  const key = h('input', { id: 'api-key', type: 'password', autocomplete: 'current-password', placeholder: 'API key', required: true });
  const status = h('p', { id: 'login-message', class: message ? 'error-text' : 'muted' }, message || 'This server needs an API key (STRATA_API_KEYS). It is kept for this browser tab only and sent as a bearer token.');
  const form = h('form', { id: 'login', class: 'card narrow', onsubmit: async (e) => {
    e.preventDefault();
    setKey(key.value.trim());
    try {
      await getJson('/v1/models');
      location.hash = location.hash || '#models';
      show();
    } catch (err) {
      setKey('');
      status.className = 'error-text';
      status.textContent = err.status === 401 ? 'That key was refused.' : err.message;
    }
  } }, h('h2', {}, 'Sign in'), status, key, h('button', { type: 'submit', class: 'primary' }, 'Use this key'));
  clear(app, form);
  key.focus();
}

async function show() {
  const name = location.hash.replace(/^#/, '') || 'models';
  const view = VIEWS[name] ? name : 'models';
  if (cleanup) { cleanup(); cleanup = null; }
  nav.hidden = false;
  logout.hidden = !auth.key;
  document.body.dataset.view = view;
  delete document.body.dataset.ready;
  for (const link of nav.querySelectorAll('a')) link.classList.toggle('active', link.dataset.view === view);
  const params = pendingParams;
  pendingParams = {};
  clear(app, h('p', { class: 'muted' }, 'Loading…'));
  try {
    cleanup = (await VIEWS[view].render(app, { params, go })) || null;
    document.body.dataset.ready = view; // rendered (tests wait for this)
  } catch (e) {
    if (e.status !== 401) clear(app, h('div', { class: 'error' }, e.message));
  }
}

function go(view, params = {}) {
  pendingParams = params;
  if (location.hash === `#${view}`) show();
  else location.hash = `#${view}`;
}

async function start() {
  auth.onUnauthorized = () => {
    const had = Boolean(auth.key);
    setKey('');
    login(had ? 'The server refused the key; enter it again.' : undefined);
  };
  logout.addEventListener('click', () => { setKey(''); login(); });
  window.addEventListener('hashchange', () => { if (document.body.dataset.view !== 'login') show(); });
  try {
    await getJson('/v1/models'); // 401 without a (valid) key when STRATA_API_KEYS is set
  } catch (e) {
    if (e.status === 401) return; // onUnauthorized shows the login view
    clear(app, h('div', { class: 'error' }, `The API did not answer: ${e.message}`));
    return;
  }
  show();
}

start();
