/*
 * facecluster: the person album page.
 *
 * A plain ES module: no build step, no dependencies. It talks to the API under api/v1 (docs/API.md)
 * with the bearer token the person pasted, kept in localStorage.
 *
 * Routes (hash, so a reload keeps the place):
 *   #/               the people grid (filters are kept in localStorage)
 *   #/people/{id}    one person: name, hide, favourite, cover, faces, merge suggestions
 *
 * Stable data-testid attributes, for browser tests:
 *   sign in   signin-view, signin-form, signin-token, signin-submit, signin-message
 *   top bar   home, stats, undo, edits-toggle, edits-panel, edits-list, edit-item, signout
 *   people    people-view, filters, search, min-faces, order, show-hidden, favorites-only, refresh,
 *             people-status, people-grid, people-sentinel,
 *             person-card (data-person-id), person-card-name, person-card-count
 *   person    person-view, back, person-cover, person-name-input, person-save-name, person-face-count,
 *             person-favorite (aria-pressed), person-hide (text "Hide" / "Unhide"), merge-with,
 *             person-status, person-error,
 *             faces-grid, face-card (data-face-id; aria-pressed="true" when selected), faces-status,
 *             selection-count, use-as-cover, not-this-person, move-to, split, clear-selection,
 *             load-more-faces,
 *             merge-suggestions, merge-suggestion (data-person-id), merge-accept
 *   picker    picker, picker-search, picker-results, picker-result (data-person-id), picker-cancel
 *   feedback  toast (class "error" on failures), toast-message, toast-undo, toast-open, toast-close
 */

const TOKEN_KEY = 'facecluster.token';
const FILTERS_KEY = 'facecluster.filters';
const PEOPLE_PAGE = 100;
const FACES_PAGE = 120;
const THUMB_SIZE = 160;
const IMG_CACHE_MAX = 400;
const IMG_CONCURRENCY = 6;
const MAX_FACES_PER_EDIT = 1000; // the API takes at most 1,000 face ids in one body

const $ = (selector, root = document) => root.querySelector(selector);
const nf = new Intl.NumberFormat();

// ------------------------------------------------------------------------------------ helpers

/** Builds an element: h('button', {type: 'button', 'data-testid': 'x', onclick: f}, 'Label'). */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('on') && typeof value === 'function') el.addEventListener(key.slice(2), value);
    else if (key === 'class') el.className = value;
    else if (key === 'value' || key === 'checked' || key === 'disabled') el[key] = value;
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function debounce(fn, ms) {
  let timer;
  const debounced = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
  debounced.cancel = () => clearTimeout(timer);
  return debounced;
}

function plural(n, word) {
  return `${nf.format(n)} ${word}${n === 1 ? '' : 's'}`;
}

function peopleCount(n) {
  return n === 1 ? '1 person' : `${nf.format(n)} people`;
}

function displayName(person) {
  return (person && person.name) || 'Unnamed';
}

function isAbort(err) {
  return err && err.name === 'AbortError';
}

const relFormat = new Intl.RelativeTimeFormat(undefined, { numeric: 'auto' });

function relativeTime(iso) {
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return '';
  const seconds = Math.round((t - Date.now()) / 1000);
  const steps = [[60, 'second'], [60, 'minute'], [24, 'hour'], [7, 'day'], [4.35, 'week'], [12, 'month'], [Infinity, 'year']];
  let value = seconds;
  for (const [size, unit] of steps) {
    if (Math.abs(value) < size) return relFormat.format(Math.round(value), unit);
    value /= size;
  }
  return '';
}

// ---------------------------------------------------------------------------------------- API

let token = localStorage.getItem(TOKEN_KEY) || '';
let session = new AbortController(); // aborted on sign-out: every request of the old token stops

class ApiError extends Error {
  constructor(status, message, detail) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.detail = detail;
  }
}

function apiUrl(path, query) {
  // Relative to the page, so the app also works when served under a path prefix.
  const url = new URL(`api/v1${path}`, document.baseURI);
  for (const [key, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== '') url.searchParams.set(key, String(value));
  }
  return url.href;
}

function authHeaders(bearer = token) {
  return { Authorization: `Bearer ${bearer}` };
}

/** The `detail` of an error answer as one readable sentence. */
function describeDetail(detail, status) {
  if (typeof detail === 'string' && detail.trim()) return detail;
  if (Array.isArray(detail) && detail.length) {
    // FastAPI validation errors: [{loc: ['body', 'face_ids', 0], msg: '...'}]
    return detail.map((d) => {
      const loc = Array.isArray(d?.loc) ? d.loc.filter((x) => !['body', 'query', 'path'].includes(x)).join('.') : '';
      const msg = d?.msg ?? (typeof d === 'string' ? d : JSON.stringify(d));
      return loc ? `${loc}: ${msg}` : msg;
    }).join('; ');
  }
  if (detail && typeof detail === 'object') return detail.message ?? JSON.stringify(detail);
  if (status === 404) return 'Not found: it may have been merged or deleted meanwhile.';
  if (status === 409) return 'That conflicts with the current state; reload and try again.';
  if (status >= 500) return `The server had a problem (${status}). Try again in a moment.`;
  return `The request failed (${status}).`;
}

function combinedSignal(signal) {
  if (!signal) return session.signal;
  if (typeof AbortSignal.any === 'function') return AbortSignal.any([signal, session.signal]);
  return signal;
}

async function api(path, { method = 'GET', query, body, signal } = {}) {
  const init = {
    method,
    headers: { ...authHeaders(), Accept: 'application/json' },
    signal: combinedSignal(signal),
  };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(apiUrl(path, query), init);
  } catch (err) {
    if (isAbort(err)) throw err;
    throw new ApiError(0, 'Could not reach the server. Check the connection and try again.');
  }
  if (res.status === 204) return null;
  let data = null;
  const text = await res.text();
  if (text) {
    try { data = JSON.parse(text); } catch { data = null; }
  }
  if (res.status === 401) {
    const detail = typeof data?.detail === 'string' ? data.detail : '';
    signOut(`You were signed out: the token was not accepted${detail ? ` (${detail})` : ''}. Paste a valid token to continue.`);
    throw new ApiError(401, 'Not signed in.', data?.detail);
  }
  if (!res.ok) throw new ApiError(res.status, describeDetail(data?.detail, res.status), data?.detail);
  return data;
}

/** A page answer as {items, next_cursor}, tolerating a bare list. */
function asPage(data) {
  if (Array.isArray(data)) return { items: data, next_cursor: null };
  return { items: data?.items ?? [], next_cursor: data?.next_cursor ?? null };
}

function isPerson(value) {
  return value && typeof value === 'object' && 'id' in value && 'face_count' in value;
}

// ------------------------------------------------------------------------------------- images
// <img src> cannot send the Authorization header: images are fetched, kept as Blobs in a small LRU
// cache, and shown through blob: URLs made only once their card is near the viewport. URLs are
// revoked when their card leaves the DOM (releaseImages).

const blobCache = new Map(); // key -> Blob, in LRU order
const blobInflight = new Map(); // key -> Promise<Blob>
const imgTargets = new WeakMap(); // observed element -> its <img>
const imgQueue = new Set(); // images waiting for a fetch slot, in order
let imgActive = 0;

const imgObserver = new IntersectionObserver(onImageIntersect, { rootMargin: '400px 0px' });

function cacheGet(key) {
  const blob = blobCache.get(key);
  if (blob) {
    blobCache.delete(key);
    blobCache.set(key, blob);
  }
  return blob;
}

function cachePut(key, blob) {
  blobCache.set(key, blob);
  while (blobCache.size > IMG_CACHE_MAX) blobCache.delete(blobCache.keys().next().value);
}

function coverUrl(person) {
  return apiUrl(`/people/${person.id}/cover`);
}

function coverKey(person) {
  return `cover:${person.id}:${person.cover_face_id ?? 'auto'}`;
}

function thumbUrl(faceId) {
  return apiUrl(`/faces/${faceId}/thumbnail`, { size: THUMB_SIZE });
}

/**
 * Shows `url` in `img` once `target` (the card; the image itself by default) nears the viewport.
 * Cards use `content-visibility: auto`, so the card is observed rather than the image inside it.
 */
function watchImage(img, url, { key = url, target = img, revalidate = false } = {}) {
  img.dataset.src = url;
  img.dataset.key = key;
  if (revalidate) img.dataset.revalidate = '1';
  img._target = target;
  imgTargets.set(target, img);
  imgObserver.observe(target);
}

function stopWatching(img) {
  if (img._target) {
    imgObserver.unobserve(img._target);
    imgTargets.delete(img._target);
    img._target = null;
  }
  imgQueue.delete(img);
}

function onImageIntersect(entries) {
  for (const entry of entries) {
    const img = imgTargets.get(entry.target);
    if (!img) {
      imgObserver.unobserve(entry.target);
      continue;
    }
    if (!entry.isIntersecting) {
      imgQueue.delete(img); // scrolled past before its turn came: do not fetch it now
      continue;
    }
    const blob = cacheGet(img.dataset.key);
    if (blob) {
      stopWatching(img);
      showBlob(img, blob);
    } else {
      imgQueue.add(img);
    }
  }
  pumpImages();
}

function pumpImages() {
  while (imgActive < IMG_CONCURRENCY && imgQueue.size) {
    const img = imgQueue.values().next().value;
    stopWatching(img);
    if (!img.isConnected) continue;
    const { src, key } = img.dataset;
    imgActive += 1;
    loadBlob(src, key, img.dataset.revalidate === '1')
      .then((blob) => {
        if (img.isConnected && img.dataset.key === key) showBlob(img, blob);
      })
      .catch((err) => {
        if (!isAbort(err) && img.dataset.key === key) {
          img.classList.add('noimg');
          img.closest('.has-img')?.classList.add('noimg');
        }
      })
      .finally(() => {
        imgActive -= 1;
        pumpImages();
      });
  }
}

function loadBlob(url, key, revalidate) {
  const hit = cacheGet(key);
  if (hit) return Promise.resolve(hit);
  let pending = blobInflight.get(key);
  if (!pending) {
    pending = (async () => {
      const res = await fetch(url, {
        headers: authHeaders(),
        signal: session.signal,
        cache: revalidate ? 'no-cache' : 'default', // covers change; ETag makes the check cheap
      });
      if (res.status === 401) {
        signOut('You were signed out: the token was not accepted. Paste a valid token to continue.');
        throw new ApiError(401, 'Not signed in.');
      }
      if (!res.ok) throw new ApiError(res.status, `Image answered ${res.status}.`);
      const blob = await res.blob();
      cachePut(key, blob);
      return blob;
    })().finally(() => blobInflight.delete(key));
    blobInflight.set(key, pending);
  }
  return pending;
}

function showBlob(img, blob) {
  if (img.dataset.blob) URL.revokeObjectURL(img.dataset.blob);
  const url = URL.createObjectURL(blob);
  img.dataset.blob = url;
  img.src = url;
  img.classList.remove('noimg');
  img.closest('.has-img')?.classList.remove('noimg');
}

/** Stops loading and revokes the blob: URLs of every image in (or being) `root`. */
function releaseImages(root) {
  if (!root) return;
  const imgs = root.matches?.('img[data-src]') ? [root] : [];
  imgs.push(...root.querySelectorAll('img[data-src]'));
  for (const img of imgs) {
    stopWatching(img);
    if (img.dataset.blob) {
      URL.revokeObjectURL(img.dataset.blob);
      delete img.dataset.blob;
    }
    img.removeAttribute('src');
  }
}

function coverImage(person, { size = THUMB_SIZE, target, testid } = {}) {
  const img = h('img', {
    class: 'cover', width: size, height: size, loading: 'lazy', decoding: 'async', alt: '', 'data-testid': testid,
  });
  watchImage(img, coverUrl(person), { key: coverKey(person), target: target || img, revalidate: true });
  return img;
}

// ------------------------------------------------------------------------------------- toasts

const toastBox = $('#toasts');

function toast(message, { error = false, actions = [], timeout } = {}) {
  const el = h('div', {
    class: `toast${error ? ' error' : ''}`, 'data-testid': 'toast', role: error ? 'alert' : undefined,
  });
  let timer = null;
  const dismiss = () => {
    clearTimeout(timer);
    el.remove();
  };
  const arm = () => {
    clearTimeout(timer);
    timer = setTimeout(dismiss, timeout ?? (error ? 10000 : 7000));
  };
  el.append(h('span', { class: 'toast-message', 'data-testid': 'toast-message' }, message));
  for (const action of actions) {
    el.append(h('button', {
      type: 'button',
      class: 'toast-action',
      'data-testid': action.testid,
      onclick: () => {
        dismiss();
        action.run();
      },
    }, action.label));
  }
  el.append(h('button', {
    type: 'button', class: 'toast-close', 'data-testid': 'toast-close', 'aria-label': 'Dismiss', onclick: dismiss,
  }, '×'));
  el.addEventListener('mouseenter', () => clearTimeout(timer));
  el.addEventListener('mouseleave', arm);
  el.addEventListener('focusin', () => clearTimeout(timer));
  el.addEventListener('focusout', arm);
  toastBox.append(el);
  while (toastBox.children.length > 4) toastBox.firstElementChild.remove();
  arm();
  return el;
}

function errorMessage(err) {
  if (err instanceof ApiError) return err.message;
  return err?.message || 'Something went wrong.';
}

function errorToast(err, prefix = '') {
  if (isAbort(err) || err?.status === 401) return; // a 401 already went back to the sign-in form
  toast(`${prefix}${errorMessage(err)}`, { error: true });
}

/** The toast after an edit: its Undo reverses the `undoCount` edits the action made. */
function editToast(message, { undoCount = 1, open } = {}) {
  const actions = [];
  if (open) actions.push({ label: 'Open', testid: 'toast-open', run: () => { location.hash = open; } });
  actions.push({ label: 'Undo', testid: 'toast-undo', run: () => undo(undoCount) });
  // Undo reverses the most recent edits: an older toast's Undo would now undo this one instead.
  for (const old of toastBox.querySelectorAll('.toast.edit')) old.remove();
  toast(message, { actions }).classList.add('edit');
  afterEdit();
}

function afterEdit() {
  refreshStats();
  if (!editsPanel.hidden) loadEdits();
}

// ------------------------------------------------------------------------------ stats and edits

const statsEl = $('#stats');
const undoBtn = $('#undo');
const editsToggle = $('#edits-toggle');
const editsPanel = $('#edits-panel');
const editsList = $('#edits-list');

function formatStats(me) {
  if (!me || typeof me !== 'object') return '';
  const s = (typeof me.stats === 'object' && me.stats) || (typeof me.statistics === 'object' && me.statistics) || me;
  const parts = [];
  const name = [me.name, me.user, me.username, me.user_name].find((x) => typeof x === 'string' && x);
  if (name) parts.push(name);
  const photos = s.photos;
  if (photos && typeof photos === 'object') {
    const total = Object.values(photos).reduce((sum, n) => sum + (typeof n === 'number' ? n : 0), 0);
    const extra = ['pending', 'failed'].filter((k) => photos[k] > 0).map((k) => `${nf.format(photos[k])} ${k}`);
    parts.push(`${plural(total, 'photo')}${extra.length ? ` (${extra.join(', ')})` : ''}`);
  } else if (typeof photos === 'number') {
    parts.push(plural(photos, 'photo'));
  }
  const faces = s.faces ?? s.face_count;
  if (typeof faces === 'number') parts.push(plural(faces, 'face'));
  const persons = s.persons ?? s.people ?? s.person_count;
  if (typeof persons === 'number') {
    const named = s.named_persons ?? s.named;
    parts.push(`${peopleCount(persons)}${typeof named === 'number' ? ` (${nf.format(named)} named)` : ''}`);
  }
  return parts.join(' · ');
}

function renderStats(me) {
  statsEl.textContent = formatStats(me);
}

async function loadStats() {
  if (!token) return;
  try {
    renderStats(await api('/me'));
  } catch (err) {
    if (!isAbort(err) && err.status !== 401) statsEl.textContent = '';
  }
}

const refreshStats = debounce(loadStats, 400);

function describeEdit(edit) {
  if (!edit || typeof edit !== 'object') return 'Edit';
  const text = [edit.summary, edit.description, edit.message, edit.label, edit.text].find((x) => typeof x === 'string' && x);
  if (text) return text;
  const kind = String(edit.kind ?? edit.action ?? edit.type ?? edit.op ?? edit.operation ?? 'edit').replace(/[_-]+/g, ' ');
  const nice = kind.charAt(0).toUpperCase() + kind.slice(1);
  const target = edit.person_id ?? edit.target_id ?? edit.person?.id;
  return target != null ? `${nice} · person ${target}` : nice;
}

async function loadEdits() {
  editsList.replaceChildren(h('li', { class: 'muted' }, 'Loading…'));
  try {
    const { items } = asPage(await api('/edits', { query: { limit: 10 } }));
    editsList.replaceChildren();
    if (!items.length) editsList.append(h('li', { class: 'muted' }, 'No edits yet.'));
    for (const edit of items) {
      const undone = Boolean(edit.undone ?? edit.undone_at);
      const when = edit.created_at ?? edit.at ?? edit.time;
      editsList.append(h('li', { class: undone ? 'edit undone' : 'edit', 'data-testid': 'edit-item' },
        h('span', { class: 'edit-text' }, describeEdit(edit)),
        undone ? h('span', { class: 'badge' }, 'undone') : null,
        when ? h('time', { datetime: when, title: new Date(when).toLocaleString() }, relativeTime(when)) : null));
    }
  } catch (err) {
    if (isAbort(err) || err.status === 401) return;
    editsList.replaceChildren(h('li', { class: 'error-text' }, errorMessage(err)));
  }
}

function setEditsOpen(open) {
  editsPanel.hidden = !open;
  editsToggle.setAttribute('aria-expanded', String(open));
  if (open) loadEdits();
}

editsToggle.addEventListener('click', () => setEditsOpen(editsPanel.hidden));
document.addEventListener('click', (e) => {
  if (!editsPanel.hidden && !editsPanel.contains(e.target) && !editsToggle.contains(e.target)) setEditsOpen(false);
});

let undoing = false;

/** POST /edits/undo `times` times (stopping at 409), then reloads the current view. */
async function undo(times = 1) {
  if (undoing) return;
  undoing = true;
  undoBtn.disabled = true;
  undoBtn.textContent = 'Undoing…';
  let done = 0;
  let last = null;
  try {
    for (let i = 0; i < times; i += 1) {
      try {
        last = await api('/edits/undo', { method: 'POST' });
        done += 1;
      } catch (err) {
        if (err.status === 409) {
          if (done === 0) toast('Nothing to undo.');
          break;
        }
        throw err;
      }
    }
  } catch (err) {
    errorToast(err, 'Undo failed: ');
  } finally {
    undoing = false;
    undoBtn.disabled = false;
    undoBtn.textContent = 'Undo';
  }
  if (!done) return;
  const what = done === 1 && last && typeof last === 'object' ? describeEdit(last.edit ?? last) : '';
  toast(done > 1 ? `Undid ${done} edits.` : `Undone${what && what !== 'Edit' ? `: ${what}` : '.'}`);
  people.dirty = true;
  refreshStats();
  if (!editsPanel.hidden) loadEdits();
  reloadCurrentView();
}

undoBtn.addEventListener('click', () => undo(1));

// ------------------------------------------------------------------------------------ sign in

const topbar = $('#topbar');
const signinView = $('#signin-view');
const signinForm = $('#signin-form');
const signinToken = $('#signin-token');
const signinSubmit = $('#signin-submit');
const signinMessage = $('#signin-message');
const peopleView = $('#people-view');
const personView = $('#person-view');

let currentView = null;

// The faces toolbar sticks just below the top bar, whose height changes as it wraps.
new ResizeObserver(() => {
  document.documentElement.style.setProperty('--topbar-h', `${topbar.offsetHeight}px`);
}).observe(topbar);

function showView(name) {
  currentView = name;
  signinView.hidden = name !== 'signin';
  peopleView.hidden = name !== 'people';
  personView.hidden = name !== 'person';
  topbar.hidden = name === 'signin';
}

function setSigninMessage(message, isError = true) {
  signinMessage.hidden = !message;
  signinMessage.textContent = message || '';
  signinMessage.classList.toggle('error-text', isError);
}

function showSignin(message) {
  showView('signin');
  document.title = 'Sign in · People';
  if (message !== undefined) setSigninMessage(message);
  signinToken.focus();
}

function signOut(message, { isError = true } = {}) {
  token = '';
  localStorage.removeItem(TOKEN_KEY);
  session.abort();
  session = new AbortController();
  closePicker();
  closePerson();
  resetPeopleView();
  blobCache.clear(); // another token may be another user
  statsEl.textContent = '';
  setEditsOpen(false);
  editsList.replaceChildren();
  showSignin(message ?? '');
  signinMessage.classList.toggle('error-text', isError);
}

signinForm.addEventListener('submit', async (e) => {
  e.preventDefault();
  const value = signinToken.value.trim().replace(/^Bearer\s+/i, '');
  if (!value) {
    setSigninMessage('Paste a token first.');
    signinToken.focus();
    return;
  }
  signinSubmit.disabled = true;
  signinSubmit.textContent = 'Checking…';
  try {
    const res = await fetch(apiUrl('/me'), { headers: { ...authHeaders(value), Accept: 'application/json' } });
    const data = await res.json().catch(() => null);
    if (res.status === 401) {
      setSigninMessage('That token was not accepted. Check that you pasted all of it, or create a new one.');
      signinToken.select();
      return;
    }
    if (!res.ok) {
      setSigninMessage(describeDetail(data?.detail, res.status));
      return;
    }
    token = value;
    localStorage.setItem(TOKEN_KEY, token);
    signinToken.value = '';
    setSigninMessage('');
    renderStats(data);
    route();
  } catch {
    setSigninMessage('Could not reach the server. Check the connection and try again.');
  } finally {
    signinSubmit.disabled = false;
    signinSubmit.textContent = 'Sign in';
  }
});

$('#signout').addEventListener('click', () => signOut('You signed out.', { isError: false }));

// Signing out (or in) in another tab applies here too.
window.addEventListener('storage', (e) => {
  if (e.key !== TOKEN_KEY) return;
  if (!e.newValue && token) signOut('You signed out in another tab.', { isError: false });
  else if (e.newValue && e.newValue !== token) {
    token = e.newValue;
    blobCache.clear();
    resetPeopleView();
    route();
    loadStats();
  }
});

// ------------------------------------------------------------------------------------- people

const grid = $('#people-grid');
const sentinel = $('#people-sentinel');
const peopleStatus = $('#people-status');
const filterQ = $('#filter-q');
const filterMin = $('#filter-min');
const filterOrder = $('#filter-order');
const filterHidden = $('#filter-hidden');
const filterFavorite = $('#filter-favorite');

const people = {
  initialized: false,
  cursor: null,
  hasMore: true,
  loading: false,
  gen: 0,
  ctrl: null,
  count: 0,
  scrollY: 0,
  dirty: false, // reload the whole grid when it is shown again (after undo, split)
  stale: new Set(), // person ids edited elsewhere: refresh their cards when the grid is shown again
};

const filters = loadFilters();

function loadFilters() {
  const defaults = { q: '', minFaces: 1, order: 'faces', showHidden: false, favorite: false };
  try {
    const saved = JSON.parse(localStorage.getItem(FILTERS_KEY) || '{}');
    return { ...defaults, ...saved };
  } catch {
    return defaults;
  }
}

function saveFilters() {
  localStorage.setItem(FILTERS_KEY, JSON.stringify(filters));
}

function syncFilterInputs() {
  filterQ.value = filters.q;
  filterMin.value = String(filters.minFaces);
  filterOrder.value = filters.order;
  filterHidden.checked = filters.showHidden;
  filterFavorite.checked = filters.favorite;
}

function peopleQuery() {
  return {
    limit: PEOPLE_PAGE,
    hidden: filters.showHidden ? 'all' : 'false',
    favorite: filters.favorite ? 'true' : undefined,
    q: filters.q.trim() || undefined,
    min_faces: filters.minFaces,
    order: filters.order,
  };
}

function matchesFilters(p) {
  if (p.hidden && !filters.showHidden) return false;
  if (filters.favorite && !p.favorite) return false;
  if ((p.face_count ?? 0) < filters.minFaces) return false;
  const q = filters.q.trim().toLowerCase();
  return !q || (p.name || '').toLowerCase().includes(q);
}

function personCard(p) {
  const card = h('a', {
    class: 'person-card has-img', href: `#/people/${p.id}`, 'data-testid': 'person-card', 'data-person-id': p.id,
  });
  const badges = [];
  if (p.favorite) badges.push(h('span', { class: 'badge fav', title: 'Favourite' }, '★'));
  if (p.hidden) badges.push(h('span', { class: 'badge' }, 'Hidden'));
  card.append(
    h('span', { class: 'thumb' }, coverImage(p, { target: card }), badges.length ? h('span', { class: 'badges' }, badges) : null),
    h('span', { class: `name${p.name ? '' : ' unnamed'}`, 'data-testid': 'person-card-name' }, displayName(p)),
    h('span', { class: 'count', 'data-testid': 'person-card-count' }, plural(p.face_count ?? 0, 'face')),
  );
  return card;
}

function removeCard(card) {
  releaseImages(card);
  card.remove();
  people.count -= 1;
}

function resetPeopleView() {
  people.gen += 1;
  people.ctrl?.abort();
  releaseImages(grid);
  grid.replaceChildren();
  peopleStatus.textContent = '';
  people.initialized = false;
  people.loading = false;
  people.dirty = false;
  people.stale.clear();
}

function reloadPeople() {
  people.gen += 1;
  people.ctrl?.abort();
  people.ctrl = null;
  releaseImages(grid);
  grid.replaceChildren();
  people.cursor = null;
  people.hasMore = true;
  people.loading = false;
  people.count = 0;
  people.stale.clear();
  people.dirty = false;
  loadMorePeople();
}

async function loadMorePeople() {
  if (people.loading || !people.hasMore || !token) return;
  people.loading = true;
  const gen = people.gen;
  const ctrl = new AbortController();
  people.ctrl = ctrl;
  peopleStatus.replaceChildren(people.count ? 'Loading more…' : 'Loading…');
  try {
    const page = asPage(await api('/people', { query: { ...peopleQuery(), cursor: people.cursor }, signal: ctrl.signal }));
    if (gen !== people.gen) return;
    const frag = document.createDocumentFragment();
    for (const p of page.items) {
      if (grid.querySelector(`[data-person-id="${p.id}"]`)) continue;
      frag.append(personCard(p));
      people.count += 1;
    }
    grid.append(frag);
    people.cursor = page.next_cursor;
    people.hasMore = Boolean(page.next_cursor) && page.items.length > 0;
    if (!people.count) peopleStatus.textContent = 'No people match these filters.';
    else peopleStatus.textContent = people.hasMore ? '' : `${peopleCount(people.count)}.`;
  } catch (err) {
    if (gen !== people.gen || isAbort(err) || err.status === 401) return;
    peopleStatus.replaceChildren(
      h('span', { class: 'error-text' }, `Could not load people: ${errorMessage(err)} `),
      h('button', { type: 'button', onclick: () => loadMorePeople() }, 'Retry'),
    );
  } finally {
    if (gen === people.gen) {
      people.loading = false;
      // Observing again reports the sentinel's current state, so a page that did not fill the
      // screen loads the next one at once.
      if (people.hasMore && currentView === 'people') {
        sentinelObserver.unobserve(sentinel);
        sentinelObserver.observe(sentinel);
      }
    }
  }
}

const sentinelObserver = new IntersectionObserver((entries) => {
  if (entries.some((e) => e.isIntersecting) && currentView === 'people') loadMorePeople();
}, { rootMargin: '1200px 0px' });
sentinelObserver.observe(sentinel);

function showPeople() {
  showView('people');
  document.title = 'People';
  if (!people.initialized) {
    people.initialized = true;
    syncFilterInputs();
    reloadPeople();
    return;
  }
  if (people.dirty) {
    reloadPeople();
    return;
  }
  const y = people.scrollY;
  requestAnimationFrame(() => window.scrollTo(0, y));
  if (people.stale.size) refreshStaleCards();
  sentinelObserver.unobserve(sentinel);
  sentinelObserver.observe(sentinel);
}

/** Cards of people edited on their page: updated in place, so the grid keeps its scroll position. */
async function refreshStaleCards() {
  const ids = [...people.stale];
  people.stale.clear();
  const gen = people.gen;
  await Promise.all(ids.map(async (id) => {
    if (!grid.querySelector(`[data-person-id="${id}"]`)) return;
    let p = null;
    try {
      p = await api(`/people/${id}`);
    } catch (err) {
      if (err.status !== 404) return;
    }
    const card = grid.querySelector(`[data-person-id="${id}"]`);
    if (gen !== people.gen || !card) return;
    if (!p || !matchesFilters(p)) removeCard(card);
    else {
      releaseImages(card);
      card.replaceWith(personCard(p));
    }
  }));
}

const onSearch = debounce(() => {
  filters.q = filterQ.value;
  saveFilters();
  reloadPeople();
}, 300);

const onMinFaces = debounce(() => {
  const n = Number.parseInt(filterMin.value, 10);
  const value = Number.isFinite(n) && n >= 1 ? n : 1;
  if (value === filters.minFaces) return;
  filters.minFaces = value;
  saveFilters();
  reloadPeople();
}, 400);

$('#filters').addEventListener('submit', (e) => e.preventDefault());
filterQ.addEventListener('input', onSearch);
filterMin.addEventListener('input', onMinFaces);
filterOrder.addEventListener('change', () => {
  filters.order = filterOrder.value;
  saveFilters();
  reloadPeople();
});
filterHidden.addEventListener('change', () => {
  filters.showHidden = filterHidden.checked;
  saveFilters();
  reloadPeople();
});
filterFavorite.addEventListener('change', () => {
  filters.favorite = filterFavorite.checked;
  saveFilters();
  reloadPeople();
});
$('#people-refresh').addEventListener('click', () => {
  reloadPeople();
  loadStats();
});

// ------------------------------------------------------------------------------------- person

let pv = null; // the open person page's state
let hopsFromPeople = 0; // 1 when the previous history entry is the people grid

const facesObserver = new IntersectionObserver((entries) => {
  if (pv && entries.some((e) => e.isIntersecting)) loadFaces(pv);
}, { rootMargin: '800px 0px' });

function closePerson() {
  if (!pv) return;
  pv.closed = true;
  pv.ctrl.abort();
  facesObserver.disconnect();
  releaseImages(personView);
  personView.replaceChildren();
  personView.removeAttribute('aria-busy');
  pv = null;
}

function goBack() {
  if (hopsFromPeople === 1) history.back();
  else location.hash = '#/';
}

function openPerson(id, { keepScroll = false } = {}) {
  const y = window.scrollY;
  closePerson();
  showView('person');
  const v = {
    id,
    person: null,
    ctrl: new AbortController(),
    closed: false,
    busy: false,
    selected: new Set(),
    lastClicked: null,
    faceCards: new Map(), // face id -> card
    faces: { cursor: null, hasMore: true, loading: false, gen: 0 },
    els: {},
  };
  pv = v;
  buildPerson(v);
  window.scrollTo(0, keepScroll ? y : 0);
  loadPerson(v);
}

async function loadPerson(v) {
  try {
    const p = await api(`/people/${v.id}`, { signal: v.ctrl.signal });
    if (v.closed) return;
    setPerson(v, p);
  } catch (err) {
    if (v.closed || isAbort(err) || err.status === 401) return;
    showPersonError(v, err);
    return;
  }
  setBusy(v, false);
  loadFaces(v);
  loadSuggestions(v);
}

function showPersonError(v, err) {
  releaseImages(personView);
  const message = err.status === 404
    ? 'This person does not exist any more: it may have been merged into someone else, or all its faces were moved.'
    : `Could not load this person: ${errorMessage(err)}`;
  personView.replaceChildren(
    h('button', { type: 'button', class: 'back quiet', 'data-testid': 'back', onclick: goBack }, '← People'),
    h('p', { class: 'person-error', 'data-testid': 'person-error', role: 'alert' }, message),
    err.status === 404 ? null : h('button', { type: 'button', onclick: () => openPerson(v.id) }, 'Retry'),
  );
}

function buildPerson(v) {
  const e = v.els;
  e.cover = h('img', {
    class: 'cover', width: THUMB_SIZE, height: THUMB_SIZE, alt: '', decoding: 'async', 'data-testid': 'person-cover',
  });
  e.coverBox = h('div', { class: 'person-cover has-img noimg' }, e.cover);
  e.nameInput = h('input', {
    id: 'person-name', type: 'text', autocomplete: 'off', placeholder: 'Unnamed', maxlength: 255, 'data-testid': 'person-name-input',
    onkeydown: (ev) => {
      if (ev.key === 'Escape' && v.person) e.nameInput.value = v.person.name || '';
    },
  });
  e.saveName = h('button', { type: 'submit', class: 'primary', 'data-testid': 'person-save-name', 'data-edit': '' }, 'Save');
  e.meta = h('p', { class: 'meta', 'data-testid': 'person-face-count' }, 'Loading…');
  e.favorite = h('button', {
    type: 'button', 'data-testid': 'person-favorite', 'data-edit': '', 'aria-pressed': 'false', onclick: () => toggleFavorite(v),
  }, '☆ Favourite');
  e.hide = h('button', { type: 'button', 'data-testid': 'person-hide', 'data-edit': '', onclick: () => toggleHidden(v) }, 'Hide');
  e.mergeWith = h('button', { type: 'button', 'data-testid': 'merge-with', 'data-edit': '', onclick: () => mergeWith(v) }, 'Merge with…');
  e.status = h('p', { class: 'status', 'data-testid': 'person-status', 'aria-live': 'polite' });

  e.selCount = h('span', { class: 'sel-count', 'data-testid': 'selection-count', 'aria-live': 'polite' });
  e.useCover = h('button', { type: 'button', 'data-testid': 'use-as-cover', 'data-edit': '', 'data-needs': 'one', onclick: () => useAsCover(v) }, 'Use as cover');
  e.notThis = h('button', { type: 'button', class: 'danger', 'data-testid': 'not-this-person', 'data-edit': '', 'data-needs': 'some', onclick: () => notThisPerson(v) }, 'Not this person');
  e.moveTo = h('button', { type: 'button', 'data-testid': 'move-to', 'data-edit': '', 'data-needs': 'some', onclick: () => moveTo(v) }, 'Move to…');
  e.split = h('button', { type: 'button', 'data-testid': 'split', 'data-edit': '', 'data-needs': 'some', onclick: () => splitOff(v) }, 'Split into new person');
  e.clearSel = h('button', { type: 'button', class: 'quiet', 'data-testid': 'clear-selection', onclick: () => clearSelection(v) }, 'Clear selection');
  e.facesGrid = h('div', {
    class: 'faces-grid', 'data-testid': 'faces-grid', role: 'group', 'aria-label': 'Faces; activate a face to select it',
  });
  e.facesGrid.addEventListener('click', (ev) => {
    const card = ev.target.closest('.face-card');
    if (card) toggleFace(v, card, ev.shiftKey);
  });
  e.facesStatus = h('p', { class: 'status', 'data-testid': 'faces-status', 'aria-live': 'polite' });
  e.loadMore = h('button', { type: 'button', class: 'load-more', 'data-testid': 'load-more-faces', hidden: true, onclick: () => loadFaces(v) }, 'Load more faces');
  e.facesSentinel = h('div', { class: 'sentinel', 'aria-hidden': 'true' });
  e.suggestions = h('ul', { class: 'suggestions', 'data-testid': 'merge-suggestions' });

  const facesSection = h('section', { class: 'faces', 'aria-labelledby': 'faces-heading' },
    h('h2', { id: 'faces-heading' }, 'Faces'),
    h('div', { class: 'toolbar', role: 'toolbar', 'aria-label': 'Selected faces' },
      e.selCount, e.useCover, e.notThis, e.moveTo, e.split, e.clearSel),
    e.facesGrid, e.facesStatus, e.loadMore, e.facesSentinel);
  facesSection.addEventListener('keydown', (ev) => {
    if (ev.key === 'Escape' && v.selected.size) clearSelection(v);
  });

  personView.replaceChildren(
    h('button', { type: 'button', class: 'back quiet', 'data-testid': 'back', onclick: goBack }, '← People'),
    h('div', { class: 'person-head' },
      e.coverBox,
      h('div', { class: 'person-info' },
        h('form', {
          class: 'name-form',
          onsubmit: (ev) => {
            ev.preventDefault();
            saveName(v);
          },
        },
        h('label', { for: 'person-name' }, 'Name'),
        h('div', { class: 'row' }, e.nameInput, e.saveName)),
        e.meta,
        h('div', { class: 'actions' }, e.favorite, e.hide, e.mergeWith),
        e.status)),
    h('div', { class: 'person-body' },
      facesSection,
      h('aside', { class: 'suggestions-panel', 'aria-labelledby': 'suggestions-heading' },
        h('h2', { id: 'suggestions-heading' }, 'Merge suggestions'),
        h('p', { class: 'muted small' }, 'People who look similar. “Same person” merges them into this one.'),
        e.suggestions)),
  );
  setBusy(v, true); // until the person is loaded
  facesObserver.observe(e.facesSentinel);
}

function setPerson(v, p) {
  const e = v.els;
  const old = v.person;
  v.person = p;
  document.title = `${displayName(p)} · People`;
  if (document.activeElement !== e.nameInput || !old || e.nameInput.value === (old.name || '')) e.nameInput.value = p.name || '';
  if (!old || coverKey(old) !== coverKey(p)) {
    releaseImages(e.cover);
    e.coverBox.classList.add('noimg');
    watchImage(e.cover, coverUrl(p), { key: coverKey(p), revalidate: true });
  }
  e.meta.replaceChildren(
    plural(p.face_count ?? 0, 'face'),
    p.hidden ? ' · hidden' : '',
    p.confirmed ? ' · confirmed' : '',
    p.created_at ? ` · found ${relativeTime(p.created_at)}` : '',
  );
  e.favorite.setAttribute('aria-pressed', String(Boolean(p.favorite)));
  e.favorite.textContent = p.favorite ? '★ Favourite' : '☆ Favourite';
  e.hide.textContent = p.hidden ? 'Unhide' : 'Hide';
  for (const [faceId, card] of v.faceCards) markCover(card, faceId === p.cover_face_id);
  updateToolbar(v);
}

/** Reloads the person after an edit of its faces; a person left without faces may be gone. */
async function refreshPerson(v) {
  try {
    const p = await api(`/people/${v.id}`);
    if (!v.closed) setPerson(v, p);
  } catch (err) {
    if (v.closed) return;
    if (err.status === 404) showPersonError(v, err);
    else errorToast(err);
  }
}

function setBusy(v, busy) {
  v.busy = busy;
  personView.toggleAttribute('aria-busy', busy);
  for (const btn of personView.querySelectorAll('[data-edit]')) btn.disabled = busy;
  if (!busy) updateToolbar(v);
}

/** Runs one edit: every edit button is disabled meanwhile, errors become a toast. */
async function runEdit(v, fn) {
  if (v.busy || v.closed || !v.person) return;
  setBusy(v, true);
  try {
    await fn();
  } catch (err) {
    if (!v.closed) errorToast(err);
  } finally {
    if (!v.closed) {
      setBusy(v, false);
      v.els.status.textContent = '';
    }
  }
}

function saveName(v) {
  return runEdit(v, async () => {
    const value = v.els.nameInput.value.trim();
    if (value === (v.person.name || '')) {
      v.els.nameInput.value = value;
      toast('The name is unchanged.');
      return;
    }
    const res = await api(`/people/${v.id}`, { method: 'PATCH', body: { name: value || null } });
    if (v.closed) return;
    setPerson(v, isPerson(res) ? res : { ...v.person, name: value || null });
    v.els.nameInput.value = v.person.name || '';
    people.stale.add(v.id);
    editToast(value ? `Renamed to “${value}”.` : 'Name cleared.');
  });
}

function toggleHidden(v) {
  return runEdit(v, async () => {
    const hidden = !v.person.hidden;
    const res = await api(`/people/${v.id}`, { method: 'PATCH', body: { hidden } });
    if (v.closed) return;
    setPerson(v, isPerson(res) ? res : { ...v.person, hidden });
    people.stale.add(v.id);
    editToast(hidden ? `Hid ${displayName(v.person)}.` : `${displayName(v.person)} is shown again.`);
  });
}

function toggleFavorite(v) {
  return runEdit(v, async () => {
    const favorite = !v.person.favorite;
    const res = await api(`/people/${v.id}`, { method: 'PATCH', body: { favorite } });
    if (v.closed) return;
    setPerson(v, isPerson(res) ? res : { ...v.person, favorite });
    people.stale.add(v.id);
    editToast(favorite ? `${displayName(v.person)} is a favourite.` : `${displayName(v.person)} is no longer a favourite.`);
  });
}

// faces

function faceLabel(f, isCover) {
  return `Face ${f.id}${isCover ? ', cover' : ''}${f.blurry ? ', blurry' : ''}`;
}

function faceCard(v, f) {
  const isCover = v.person && f.id === v.person.cover_face_id;
  const img = h('img', { width: THUMB_SIZE, height: THUMB_SIZE, loading: 'lazy', decoding: 'async', alt: '' });
  const card = h('button', {
    type: 'button',
    class: `face-card has-img${isCover ? ' is-cover' : ''}${f.blurry ? ' blurry' : ''}`,
    'data-testid': 'face-card',
    'data-face-id': f.id,
    'aria-pressed': 'false',
    'aria-label': faceLabel(f, isCover),
    title: f.blurry ? 'Blurry face' : undefined,
  }, img, h('span', { class: 'face-badge cover-badge', 'aria-hidden': 'true' }, 'Cover'));
  card._face = f;
  watchImage(img, thumbUrl(f.id), { target: card });
  return card;
}

function markCover(card, isCover) {
  card.classList.toggle('is-cover', isCover);
  card.setAttribute('aria-label', faceLabel(card._face, isCover));
}

async function loadFaces(v) {
  const st = v.faces;
  if (st.loading || !st.hasMore || v.closed || !v.person) return;
  st.loading = true;
  const gen = st.gen;
  const e = v.els;
  e.loadMore.disabled = true;
  e.facesStatus.textContent = v.faceCards.size ? 'Loading more faces…' : 'Loading faces…';
  try {
    const page = asPage(await api(`/people/${v.id}/faces`, { query: { limit: FACES_PAGE, cursor: st.cursor }, signal: v.ctrl.signal }));
    if (v.closed || gen !== st.gen) return;
    const frag = document.createDocumentFragment();
    for (const f of page.items) {
      if (v.faceCards.has(f.id)) continue;
      const card = faceCard(v, f);
      v.faceCards.set(f.id, card);
      frag.append(card);
    }
    e.facesGrid.append(frag);
    st.cursor = page.next_cursor;
    st.hasMore = Boolean(page.next_cursor) && page.items.length > 0;
    e.facesStatus.textContent = v.faceCards.size ? '' : 'No faces.';
  } catch (err) {
    if (v.closed || gen !== st.gen || isAbort(err) || err.status === 401) return;
    e.facesStatus.replaceChildren(h('span', { class: 'error-text' }, `Could not load faces: ${errorMessage(err)}`));
  } finally {
    if (!v.closed && gen === st.gen) {
      st.loading = false;
      e.loadMore.hidden = !st.hasMore;
      e.loadMore.disabled = false;
      if (st.hasMore) {
        facesObserver.unobserve(e.facesSentinel);
        facesObserver.observe(e.facesSentinel);
      }
    }
  }
}

function reloadFaces(v) {
  const st = v.faces;
  st.gen += 1;
  st.cursor = null;
  st.hasMore = true;
  st.loading = false;
  releaseImages(v.els.facesGrid);
  v.els.facesGrid.replaceChildren();
  v.faceCards.clear();
  v.selected.clear();
  v.lastClicked = null;
  updateToolbar(v);
  loadFaces(v);
}

function removeFaces(v, faceIds) {
  for (const id of faceIds) {
    const card = v.faceCards.get(id);
    if (card) {
      releaseImages(card);
      card.remove();
    }
    v.faceCards.delete(id);
    v.selected.delete(id);
  }
  v.lastClicked = null;
  updateToolbar(v);
  if (!v.faceCards.size && !v.faces.hasMore) v.els.facesStatus.textContent = 'No faces.';
  if (v.faces.hasMore) {
    facesObserver.unobserve(v.els.facesSentinel);
    facesObserver.observe(v.els.facesSentinel);
  }
}

function toggleFace(v, card, range) {
  const id = Number(card.dataset.faceId);
  const cards = [...v.els.facesGrid.children];
  const index = cards.indexOf(card);
  if (range && v.lastClicked !== null) {
    const last = cards.findIndex((c) => Number(c.dataset.faceId) === v.lastClicked);
    if (last >= 0) {
      const select = !v.selected.has(id);
      const [from, to] = last < index ? [last, index] : [index, last];
      for (const c of cards.slice(from, to + 1)) setSelected(v, c, select);
      v.lastClicked = id;
      updateToolbar(v);
      return;
    }
  }
  setSelected(v, card, !v.selected.has(id));
  v.lastClicked = id;
  updateToolbar(v);
}

function setSelected(v, card, selected) {
  const id = Number(card.dataset.faceId);
  if (selected) v.selected.add(id);
  else v.selected.delete(id);
  card.setAttribute('aria-pressed', String(selected));
}

function clearSelection(v) {
  for (const id of v.selected) {
    const card = v.faceCards.get(id);
    if (card) card.setAttribute('aria-pressed', 'false');
  }
  v.selected.clear();
  v.lastClicked = null;
  updateToolbar(v);
}

/** The selected face ids in grid order. */
function selectedIds(v) {
  return [...v.faceCards.keys()].filter((id) => v.selected.has(id));
}

function updateToolbar(v) {
  const e = v.els;
  if (!e.selCount) return;
  const n = v.selected.size;
  e.selCount.textContent = n ? `${plural(n, 'face')} selected` : 'Click faces to select them.';
  const onlyId = n === 1 ? [...v.selected][0] : null;
  e.useCover.disabled = v.busy || n !== 1 || (v.person && onlyId === v.person.cover_face_id);
  for (const btn of [e.notThis, e.moveTo, e.split]) btn.disabled = v.busy || n === 0;
  e.clearSel.disabled = n === 0;
}

function useAsCover(v) {
  return runEdit(v, async () => {
    const [faceId] = selectedIds(v);
    if (faceId === undefined) return;
    const res = await api(`/people/${v.id}`, { method: 'PATCH', body: { cover_face_id: faceId } });
    if (v.closed) return;
    clearSelection(v);
    setPerson(v, isPerson(res) ? res : { ...v.person, cover_face_id: faceId });
    people.stale.add(v.id);
    editToast('Cover changed.');
  });
}

function notThisPerson(v) {
  return runEdit(v, async () => {
    const ids = selectedIds(v);
    const done = [];
    let failure = null;
    for (const [i, faceId] of ids.entries()) {
      if (ids.length > 1) v.els.status.textContent = `Removing face ${i + 1} of ${ids.length}…`;
      try {
        await api(`/people/${v.id}/faces/${faceId}`, { method: 'DELETE' });
        done.push(faceId);
      } catch (err) {
        if (err.status === 401 || isAbort(err)) throw err;
        failure ??= err;
      }
    }
    if (v.closed) return;
    removeFaces(v, done);
    people.stale.add(v.id);
    if (done.length) {
      editToast(`Removed ${plural(done.length, 'face')} from ${displayName(v.person)}.`, { undoCount: done.length });
    }
    if (failure) errorToast(failure, `${plural(ids.length - done.length, 'face')} could not be removed: `);
    await refreshPerson(v);
  });
}

function tooManyFaces(ids) {
  if (ids.length <= MAX_FACES_PER_EDIT) return false;
  toast(`Select at most ${nf.format(MAX_FACES_PER_EDIT)} faces at a time.`, { error: true });
  return true;
}

async function moveTo(v) {
  if (v.busy || !v.selected.size) return;
  const ids = selectedIds(v);
  if (tooManyFaces(ids)) return;
  const target = await pickPerson({ title: `Move ${plural(ids.length, 'face')} to…`, exclude: v.id });
  if (!target || v.closed) return;
  await runEdit(v, async () => {
    await api(`/people/${target.id}/faces`, { method: 'POST', body: { face_ids: ids } });
    if (v.closed) return;
    removeFaces(v, ids);
    people.stale.add(v.id);
    people.stale.add(target.id);
    editToast(`Moved ${plural(ids.length, 'face')} to ${displayName(target)}.`, { open: `#/people/${target.id}` });
    await refreshPerson(v);
  });
}

function splitOff(v) {
  return runEdit(v, async () => {
    const ids = selectedIds(v);
    if (tooManyFaces(ids)) return;
    const created = await api('/people', { method: 'POST', body: { face_ids: ids } });
    if (v.closed) return;
    removeFaces(v, ids);
    people.stale.add(v.id);
    people.dirty = true; // the new person belongs in the grid
    const newId = created?.id ?? created?.person?.id;
    editToast(`Split ${plural(ids.length, 'face')} into a new person.`, { open: newId != null ? `#/people/${newId}` : undefined });
    await refreshPerson(v);
  });
}

// merging

/** How many of `ids` were merged, and the failures, from the per-id results of a merge. */
function mergeOutcome(res, ids) {
  const results = Array.isArray(res) ? res : (Array.isArray(res?.results) ? res.results : []);
  const failed = results.filter((r) => r && typeof r === 'object' && (
    r.ok === false || r.merged === false || r.error || r.detail || (typeof r.status === 'number' && r.status >= 400)));
  const merged = results.length ? results.length - failed.length : ids.length;
  const faces = results.reduce((sum, r) => sum + (r && r.merged !== false && typeof r.faces === 'number' ? r.faces : 0), 0);
  return { merged, failed, faces };
}

function mergeInto(v, others) {
  return runEdit(v, async () => {
    const ids = others.map((o) => o.id);
    const res = await api(`/people/${v.id}/merge`, { method: 'POST', body: { person_ids: ids } });
    if (v.closed) return;
    const { merged, failed, faces } = mergeOutcome(res, ids);
    people.stale.add(v.id);
    for (const id of ids) people.stale.add(id);
    if (merged) editToast(`Merged ${merged + 1} people${faces ? ` (${plural(faces, 'face')} joined)` : ''}.`);
    for (const r of failed) {
      const id = r.person_id ?? r.id;
      const detail = r.detail ?? r.error;
      const why = detail ? describeDetail(detail, r.status) : 'was not merged: it may have been merged or deleted already.';
      toast(`${id != null ? `Person ${id} ` : 'A person '}${why}`, { error: true });
    }
    const p = isPerson(res) ? res : (isPerson(res?.person) ? res.person : null);
    if (p) setPerson(v, p);
    else await refreshPerson(v);
    if (v.closed || !pv || pv !== v) return;
    reloadFaces(v);
    loadSuggestions(v);
  });
}

async function mergeWith(v) {
  if (v.busy) return;
  const other = await pickPerson({ title: `Merge into ${displayName(v.person)}…`, exclude: v.id });
  if (other && !v.closed) await mergeInto(v, [other]);
}

function formatSimilarity(value) {
  if (typeof value !== 'number' || Number.isNaN(value)) return '';
  if (value >= 0 && value <= 1) return `${Math.round(value * 100)}% similar`;
  return `similarity ${value.toFixed(2)}`;
}

async function loadSuggestions(v) {
  const list = v.els.suggestions;
  releaseImages(list);
  list.replaceChildren(h('li', { class: 'muted' }, 'Loading…'));
  try {
    const data = await api(`/people/${v.id}/suggestions`, { query: { limit: 10 }, signal: v.ctrl.signal });
    if (v.closed) return;
    const items = Array.isArray(data) ? data : (data?.items ?? data?.suggestions ?? []);
    list.replaceChildren();
    if (!items.length) list.append(h('li', { class: 'muted' }, 'No suggestions.'));
    for (const item of items) {
      const li = suggestionItem(v, item);
      if (li) list.append(li);
    }
  } catch (err) {
    if (v.closed || isAbort(err) || err.status === 401) return;
    list.replaceChildren(h('li', { class: 'error-text' }, `Could not load suggestions: ${errorMessage(err)}`));
  }
}

function suggestionItem(v, item) {
  const p = isPerson(item?.person) ? item.person : (item?.person && typeof item.person === 'object' ? item.person : item);
  const id = p?.id ?? item?.person_id;
  if (id == null) return null;
  const person = { ...p, id };
  const similarity = item.similarity ?? item.score ?? p.similarity;
  const li = h('li', { class: 'suggestion has-img', 'data-testid': 'merge-suggestion', 'data-person-id': id });
  li.append(
    h('a', { class: 'suggestion-cover', href: `#/people/${id}`, tabindex: '-1', 'aria-hidden': 'true' }, coverImage(person, { size: 64, target: li })),
    h('div', { class: 'suggestion-info' },
      h('a', { class: `name${person.name ? '' : ' unnamed'}`, href: `#/people/${id}` }, displayName(person)),
      h('span', { class: 'muted small' }, [
        typeof person.face_count === 'number' ? plural(person.face_count, 'face') : '',
        formatSimilarity(similarity),
      ].filter(Boolean).join(' · '))),
    h('button', {
      type: 'button',
      'data-testid': 'merge-accept',
      'data-edit': '',
      disabled: v.busy,
      'aria-label': `Same person: merge ${displayName(person)} into ${displayName(v.person)}`,
      onclick: () => mergeInto(v, [person]),
    }, 'Same person'),
  );
  return li;
}

// ------------------------------------------------------------------------------ person picker

const picker = $('#picker');
const pickerTitle = $('#picker-title');
const pickerSearch = $('#picker-search');
const pickerResults = $('#picker-results');
const pickerStatus = $('#picker-status');
let pickerState = null;

/** Asks for a person in a modal dialog; resolves to the person, or null when cancelled. */
function pickPerson({ title, exclude }) {
  return new Promise((resolve) => {
    pickerState = { resolve, exclude, chosen: null, gen: 0 };
    pickerTitle.textContent = title;
    pickerSearch.value = '';
    pickerResults.replaceChildren();
    pickerStatus.textContent = '';
    picker.showModal();
    pickerSearch.focus();
    searchPicker();
  });
}

function closePicker() {
  if (picker.open) picker.close();
}

picker.addEventListener('close', () => {
  searchPickerSoon.cancel();
  releaseImages(pickerResults);
  pickerResults.replaceChildren();
  const state = pickerState;
  pickerState = null;
  state?.resolve(state.chosen);
});

async function searchPicker() {
  const state = pickerState;
  if (!state) return;
  state.gen += 1;
  const gen = state.gen;
  const q = pickerSearch.value.trim();
  pickerStatus.textContent = 'Searching…';
  try {
    const { items } = asPage(await api('/people', {
      query: { q: q || undefined, hidden: 'all', limit: 30, order: q ? 'name' : 'faces' },
    }));
    if (pickerState !== state || gen !== state.gen) return;
    releaseImages(pickerResults);
    pickerResults.replaceChildren();
    const shown = items.filter((p) => p.id !== state.exclude);
    pickerStatus.textContent = shown.length ? '' : 'Nobody matches.';
    for (const p of shown) {
      const btn = h('button', {
        type: 'button',
        class: 'picker-result has-img',
        'data-testid': 'picker-result',
        'data-person-id': p.id,
        onclick: () => {
          state.chosen = p;
          picker.close();
        },
      });
      btn.append(
        coverImage(p, { size: 48, target: btn }),
        h('span', { class: `name${p.name ? '' : ' unnamed'}` }, displayName(p)),
        h('span', { class: 'muted small' }, `${plural(p.face_count ?? 0, 'face')}${p.hidden ? ' · hidden' : ''}`),
      );
      pickerResults.append(h('li', {}, btn));
    }
  } catch (err) {
    if (isAbort(err) || err.status === 401 || pickerState !== state) return;
    pickerStatus.replaceChildren(h('span', { class: 'error-text' }, errorMessage(err)));
  }
}

const searchPickerSoon = debounce(searchPicker, 250);
pickerSearch.addEventListener('input', searchPickerSoon);
pickerSearch.addEventListener('keydown', (e) => {
  if (e.key !== 'Enter') return;
  e.preventDefault(); // Enter would submit the dialog form and cancel
  pickerResults.querySelector('button')?.focus();
});

// ------------------------------------------------------------------------------------- routing

function parseRoute() {
  const m = location.hash.match(/^#\/people\/(\d+)\/?$/);
  if (m) return { name: 'person', id: Number(m[1]) };
  return { name: 'people' };
}

function route() {
  if (!token) {
    closePerson();
    showSignin();
    return;
  }
  const r = parseRoute();
  if (r.name === 'person') {
    if (currentView === 'people') {
      people.scrollY = window.scrollY;
      hopsFromPeople = 1;
    } else {
      hopsFromPeople = 0;
    }
    closePicker();
    openPerson(r.id);
  } else {
    if (location.hash && location.hash !== '#/') history.replaceState(null, '', '#/');
    closePicker();
    closePerson();
    showPeople();
  }
}

function reloadCurrentView() {
  if (!token) return;
  if (currentView === 'person' && pv) openPerson(pv.id, { keepScroll: true });
  else if (currentView === 'person') route();
  else if (currentView === 'people') reloadPeople();
}

window.addEventListener('hashchange', route);

// Ctrl/Cmd+Z undoes the last edit, except while typing.
document.addEventListener('keydown', (e) => {
  if (!(e.ctrlKey || e.metaKey) || e.shiftKey || e.altKey || e.key.toLowerCase() !== 'z') return;
  if (!token || picker.open || e.target.closest?.('input, textarea, select, [contenteditable]')) return;
  e.preventDefault();
  undo(1);
});

document.addEventListener('keydown', (e) => {
  if (e.key === 'Escape' && !editsPanel.hidden) {
    setEditsOpen(false);
    editsToggle.focus();
  }
});

route();
if (token) loadStats();
