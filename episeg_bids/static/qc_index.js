// episeg-bids dataset QC report: table, viewer, keyboard ratings kept in localStorage.
// Data come from the JSON block #qc-data; they are only ever written with textContent or as
// attribute values (never innerHTML), so text from the dataset is shown, not run.
'use strict';
(function () {
  const data = JSON.parse(document.getElementById('qc-data').textContent);
  const runs = data.runs;
  const STORE = 'episeg-bids-qc:' + data.dataset.key;
  const STATES = ['pass', 'fail', 'artifact'];
  const SYMBOL = { pass: '✔', fail: '✘', artifact: '⚠' };
  const LABEL = { pass: 'Pass', fail: 'Fail', artifact: 'Artifact' };
  const COLUMNS = [{ key: 'qc', label: 'QC', title: 'your rating' }, { key: 'rank', label: 'Rank', numeric: true,
    title: 'your rank, 0–9' }].concat(data.columns.filter((c) => c.table));
  const $ = (id) => document.getElementById(id);
  const tbody = document.querySelector('#runs tbody');
  const rowEls = [];
  let ratings = loadRatings();
  let visible = runs.map((_, i) => i);
  let current = runs.length ? 0 : -1;
  let overlay = 'contour';
  let overlayOn = true;
  let wholeField = false;
  let referenceOn = true;
  let sortKey = null;
  let sortDir = 1;

  function notice(text) { $('notice').textContent = text; }

  function cleanRatings(obj) {
    const out = Object.create(null);
    if (!obj || typeof obj !== 'object') return out;
    for (const [key, value] of Object.entries(obj)) {
      if (!value || typeof value !== 'object') continue;
      const r = {};
      if (STATES.includes(value.qc)) r.qc = value.qc;
      if (Number.isInteger(value.rank) && value.rank >= 0 && value.rank <= 9) r.rank = value.rank;
      if (typeof value.rated === 'string') r.rated = value.rated;
      if (typeof value.mask_date === 'string') r.mask_date = value.mask_date;
      if (r.qc !== undefined || r.rank !== undefined) out[key] = r;
    }
    return out;
  }

  function loadRatings() {
    try {
      const raw = window.localStorage.getItem(STORE);
      return cleanRatings(raw ? JSON.parse(raw).ratings : null);
    } catch (err) {
      notice('Ratings cannot be read from this browser’s storage (' + err.message + '); export them to keep them.');
      return Object.create(null);
    }
  }

  function saveRatings() {
    try {
      window.localStorage.setItem(STORE, JSON.stringify({ version: 1, dataset: data.dataset.path, ratings: ratings }));
    } catch (err) {
      notice('Ratings cannot be saved in this browser (' + err.message + '); export them before closing the page.');
    }
  }

  function rating(i) { return ratings[runs[i].key] || {}; }

  function isStale(i) {
    const r = rating(i);
    return Boolean(r.mask_date && runs[i].date && r.mask_date !== runs[i].date);
  }

  function value(i, key) {
    if (key === 'qc') return rating(i).qc || null;
    if (key === 'rank') return rating(i).rank === undefined ? null : rating(i).rank;
    const v = runs[i].cells[key];
    return v === undefined ? null : v;
  }

  function format(v) {
    if (v === null || v === undefined || v === '') return '';
    if (typeof v === 'number') {
      if (Number.isInteger(v)) return String(v);
      if (Math.abs(v) >= 1000) return v.toFixed(0);
      return Math.abs(v) >= 100 ? v.toFixed(1) : v.toFixed(2);
    }
    return String(v);
  }

  function buildTable() {
    const head = document.querySelector('#runs thead tr');
    for (const col of COLUMNS) {
      const th = document.createElement('th');
      th.dataset.key = col.key;
      if (col.numeric) th.className = 'num';
      const button = document.createElement('button');
      button.type = 'button';
      button.textContent = col.label;
      button.title = 'Sort by ' + col.label + (col.title ? ': ' + col.title : '');
      button.addEventListener('click', () => sortBy(col.key));
      th.appendChild(button);
      head.appendChild(th);
    }
    runs.forEach((run, i) => {
      const tr = document.createElement('tr');
      tr.dataset.index = String(i);
      for (const col of COLUMNS) {
        const td = document.createElement('td');
        td.className = (col.numeric ? 'num ' : '') + (col.key === 'flag_codes' ? 'flags' : col.key);
        tr.appendChild(td);
      }
      tr.addEventListener('click', () => select(i));
      rowEls.push(tr);
      tbody.appendChild(tr);
      fillRow(i);
    });
  }

  function fillRow(i) {
    const tr = rowEls[i];
    const r = rating(i);
    COLUMNS.forEach((col, c) => {
      const td = tr.children[c];
      if (col.key === 'qc') {  // the symbol shows, the word is for screen readers and the tooltip
        td.replaceChildren();
        if (r.qc) {
          const symbol = document.createElement('span');
          symbol.setAttribute('aria-hidden', 'true');
          symbol.textContent = SYMBOL[r.qc] + (isStale(i) ? '↻' : '');
          const word = document.createElement('span');
          word.className = 'visually-hidden';
          word.textContent = LABEL[r.qc];
          td.append(symbol, word);
        }
        td.title = r.qc ? LABEL[r.qc] + (isStale(i) ? ': rated before the mask was recomputed' : '') : '';
      } else {
        td.title = format(value(i, col.key));
        // long flag codes may wrap after their underscores (a zero-width space), never inside a word
        td.textContent = col.key === 'flag_codes' ? td.title.replace(/_/g, '_\u200b') : td.title;
      }
    });
    tr.className = r.qc ? 'qc-' + r.qc : '';
  }

  function haystack(i) {
    const run = runs[i];
    const parts = [run.title, run.key, run.input, run.task_name, value(i, 'qc'), LABEL[value(i, 'qc')]];
    for (const cell of Object.values(run.cells)) parts.push(format(cell));
    for (const flag of run.flags) parts.push(flag.code, flag.message);
    return parts.filter(Boolean).join(' ').toLowerCase();
  }

  function compare(a, b) {
    const va = value(a, sortKey);
    const vb = value(b, sortKey);
    const ea = va === null || va === '';
    const eb = vb === null || vb === '';
    if (ea || eb) return ea && eb ? a - b : (ea ? 1 : -1);
    const c = typeof va === 'number' && typeof vb === 'number'
      ? va - vb : String(va).localeCompare(String(vb), undefined, { numeric: true });
    return c * sortDir || a - b;
  }

  function refresh() {
    const terms = $('search').value.toLowerCase().split(/\s+/).filter(Boolean);
    let order = runs.map((_, i) => i);
    if (sortKey !== null) order.sort(compare);
    visible = order.filter((i) => { const text = haystack(i); return terms.every((t) => text.includes(t)); });
    const shown = new Set(visible);
    for (const i of order) {
      rowEls[i].hidden = !shown.has(i);
      tbody.appendChild(rowEls[i]);
    }
    for (const th of document.querySelectorAll('#runs th')) {
      if (th.dataset.key === sortKey) th.setAttribute('aria-sort', sortDir > 0 ? 'ascending' : 'descending');
      else th.removeAttribute('aria-sort');
    }
    if (visible.length && !shown.has(current)) select(visible[0]);
    else markSelection();
    progress();
  }

  function sortBy(key) {
    if (sortKey === key) sortDir = -sortDir; else { sortKey = key; sortDir = 1; }
    refresh();
  }

  function progress() {
    const counts = { pass: 0, fail: 0, artifact: 0 };
    let rated = 0;
    runs.forEach((_, i) => { const q = rating(i).qc; if (q) { counts[q] += 1; rated += 1; } });
    $('progress').textContent = 'rated ' + rated + '/' + runs.length + ' · ✔ ' + counts.pass + ' pass · ✘ ' +
      counts.fail + ' fail · ⚠ ' + counts.artifact + ' artifact' + (visible.length < runs.length ? ' · showing ' + visible.length : '');
  }

  function markSelection() {
    rowEls.forEach((tr, i) => tr.setAttribute('aria-selected', String(i === current)));
  }

  function select(i) {
    if (i < 0 || i >= runs.length) return;
    current = i;
    try { history.replaceState(null, '', '#' + encodeURIComponent(runs[i].key)); } catch (err) { /* file:// limits */ }
    markSelection();
    rowEls[i].scrollIntoView({ block: 'nearest' });
    renderViewer();
  }

  function move(step) {
    if (!visible.length) return;
    const at = visible.indexOf(current);
    const next = at < 0 ? 0 : Math.min(visible.length - 1, Math.max(0, at + step));
    select(visible[next]);
  }

  function nextUnrated() {
    const at = Math.max(0, visible.indexOf(current));
    for (let k = 1; k <= visible.length; k += 1) {
      const i = visible[(at + k) % visible.length];
      if (!rating(i).qc) { select(i); return; }
    }
    notice('Every run shown is rated.');
  }

  // the figures' URL fragment: <overlay>[-full][-noref] (see episeg_bids.qc_figures)
  function figureSrc(href) {
    return href + '#' + (overlayOn ? overlay : 'none') + (wholeField ? '-full' : '') + (referenceOn ? '' : '-noref');
  }

  function renderFigures() {
    const run = runs[current];
    if (!run) return;
    const figs = $('v-figs');
    if (run.figures) {
      $('v-mosaic').src = figureSrc(run.figures.mosaic);
      $('v-sagittal').src = figureSrc(run.figures.sagittal);
      $('v-area').src = run.figures.area;
    }
    figs.hidden = !run.figures;
    $('v-missing').hidden = Boolean(run.figures);
    $('v-missing').textContent = run.missing || '';
    $('v-full').setAttribute('aria-pressed', String(wholeField));
    $('v-reference').hidden = !run.reference;
    $('v-reference').setAttribute('aria-pressed', String(referenceOn));
    $('v-reference-legend').hidden = !run.reference || !referenceOn;
    $('v-reference-name').textContent = run.reference || '';
  }

  function renderComponents(run) {
    const box = $('v-components');
    const body = box.querySelector('tbody');
    body.replaceChildren();
    box.hidden = !run.components.length;
    for (const c of run.components) {
      const tr = document.createElement('tr');
      if (c.flagged) tr.className = 'flagged';
      for (const [text, numeric] of [['#' + c.id, false], [c.slices, false], [c.centroid, false], [c.voxels, true],
        [c.volume, true], [c.distance, true], [c.status, false]]) {
        const td = document.createElement('td');
        td.textContent = String(text);
        if (numeric) td.className = 'num';
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
    $('v-components-more').textContent = run.components_more
      ? 'and ' + run.components_more + ' other component(s), the cord included: the subject page lists them all' : '';
  }

  function renderViewer() {
    const run = runs[current];
    if (!run) return;
    const r = rating(current);
    $('v-title').textContent = run.title;
    const status = $('v-status');
    status.replaceChildren();
    const state = document.createElement('span');
    state.className = 'state ' + (r.qc || '');
    state.textContent = (r.qc ? SYMBOL[r.qc] + ' ' + LABEL[r.qc] : 'not rated') +
      (r.rank !== undefined ? ' · rank ' + r.rank : '');
    status.appendChild(state);
    if (isStale(current)) {
      const stale = document.createElement('span');
      stale.className = 'stale';
      stale.textContent = '↻ rated before the mask was recomputed; check again ';
      status.appendChild(stale);
    }
    const where = document.createElement('span');
    where.textContent = (run.task_name ? 'TaskName “' + run.task_name + '” · ' : '') + 'mask ' + run.key +
      (run.demo ? ' · DEMO model' : '');
    status.appendChild(where);
    const list = $('v-flags');
    list.replaceChildren();
    if (!run.flags.length) {
      const li = document.createElement('li');
      li.className = 'ok';
      li.textContent = 'No automatic flag.';
      list.appendChild(li);
    }
    for (const flag of run.flags) {
      const li = document.createElement('li');
      const chip = document.createElement('span');
      chip.className = 'chip' + (flag.source === 'group' ? ' group' : '');
      chip.textContent = flag.code;
      li.appendChild(chip);
      li.appendChild(document.createTextNode(' ' + flag.message + (flag.source === 'group' ? ' (group level)' : '')));
      list.appendChild(li);
    }
    const dl = $('v-metrics');
    dl.replaceChildren();
    for (const [label, text] of run.metrics) {
      const dt = document.createElement('dt');
      dt.textContent = label;
      const dd = document.createElement('dd');
      dd.textContent = text;
      dl.append(dt, dd);
    }
    $('v-page').href = run.page;
    renderComponents(run);
    renderFigures();
  }

  function rate(change) {
    if (current < 0) return;
    const run = runs[current];
    const r = Object.assign({}, rating(current), change);
    for (const k of ['qc', 'rank']) if (r[k] === null || r[k] === undefined) delete r[k];
    if (r.qc === undefined && r.rank === undefined) delete ratings[run.key];
    else {
      r.rated = new Date().toISOString();
      r.mask_date = run.date || '';
      ratings[run.key] = r;
    }
    saveRatings();
    fillRow(current);
    renderViewer();
    progress();
  }

  function cycle() {
    const q = rating(current).qc;
    rate({ qc: q ? STATES[(STATES.indexOf(q) + 1) % STATES.length] : 'pass' });
  }

  function download(name, text, type) {
    const url = URL.createObjectURL(new Blob([text], { type: type }));
    const a = document.createElement('a');
    a.href = url;
    a.download = name;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    notice('Saved ' + name + ' to your downloads.');
  }

  function tsvCell(v) {
    return v === null || v === undefined || v === '' ? 'n/a' : String(v).replace(/[\t\r\n]+/g, ' ');
  }

  function ratingsTSV() {
    const head = ['mask', 'input', 'participant_id', 'session_id', 'task', 'run', 'qc', 'rank', 'rated_at',
      'mask_date', 'flags'];
    const lines = [head.join('\t')];
    runs.forEach((run, i) => {
      const r = rating(i);
      const c = run.cells;
      lines.push([run.key, run.input, 'sub-' + c.subject, c.session ? 'ses-' + c.session : null, c.task, c.run,
        r.qc, r.rank, r.rated, run.date, run.flags.map((f) => f.code).join(',')].map(tsvCell).join('\t'));
    });
    return lines.join('\n') + '\n';
  }

  function ratingsJSON() {
    return JSON.stringify({ dataset: data.dataset.name, dataset_key: data.dataset.key, dataset_path: data.dataset.path,
      exported: new Date().toISOString(), ratings: ratings }, null, 2) + '\n';
  }

  function yamlList(state) {
    const chosen = runs.filter((_, i) => rating(i).qc === state);
    const list = (items) => (items.length ? '\n' + items.map((s) => '- ' + JSON.stringify(s)).join('\n') : ' []');
    return '# episeg-bids QC: runs marked ' + LABEL[state] + ' in ' + JSON.stringify(data.dataset.name) + ', ' +
      new Date().toISOString() + '\n# FILES_SEG: input images (SCT manual_correction.py style); ' +
      'MASKS: masks to correct, relative to ' + JSON.stringify(data.dataset.path) + '\n' +
      'FILES_SEG:' + list(chosen.map((run) => String(run.input || run.title).split('/').pop())) + '\n' +
      'MASKS:' + list(chosen.map((run) => run.key)) + '\n';
  }

  function importJSON(file) {
    const reader = new FileReader();
    reader.onload = () => {
      try {
        const parsed = JSON.parse(String(reader.result));
        const imported = cleanRatings(parsed && typeof parsed === 'object' && parsed.ratings ? parsed.ratings : parsed);
        const keys = Object.keys(imported);
        for (const key of keys) ratings[key] = imported[key];
        saveRatings();
        runs.forEach((_, i) => fillRow(i));
        refresh();
        renderViewer();
        notice('Imported ' + keys.length + ' rating(s) from ' + file.name + '.');
      } catch (err) {
        notice(file.name + ' is not a ratings JSON export (' + err.message + ').');
      }
    };
    reader.readAsText(file);
  }

  function toggleWholeField() { wholeField = !wholeField; renderFigures(); }

  function toggleReference() { referenceOn = !referenceOn; renderFigures(); }

  function toggleHelp(show) {
    $('help').hidden = show === undefined ? !$('help').hidden : !show;
  }

  function onKey(event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const target = event.target;
    if (target instanceof HTMLInputElement && target.type !== 'file') {
      if (event.key === 'Escape' || event.key === 'Enter') {
        target.blur();
        if (event.key === 'Enter' && visible.length) select(visible[0]);
        event.preventDefault();
      } else if (event.key === 'ArrowDown' || event.key === 'ArrowUp') {
        move(event.key === 'ArrowDown' ? 1 : -1);
        event.preventDefault();
      }
      return;
    }
    const key = event.key;
    if (key === 'ArrowDown' || key === 'j') move(1);
    else if (key === 'ArrowUp' || key === 'k') move(-1);
    else if (key === 'ArrowRight') { overlayOn = !overlayOn; renderFigures(); }
    else if (key === 'c') { overlay = overlay === 'fill' ? 'contour' : 'fill'; overlayOn = true; renderFigures(); }
    else if (key === 'w') toggleWholeField();
    else if (key === 'g') toggleReference();
    else if (key === 'f') cycle();
    else if (/^[0-9]$/.test(key)) rate({ rank: Number(key) });
    else if (key === 'x' || key === 'Delete' || key === 'Backspace') rate({ qc: null, rank: null });
    else if (key === 'n') nextUnrated();
    else if (key === '/') $('search').focus();
    else if (key === 'd') $('v-figs').classList.toggle('full');
    else if (key === '?') toggleHelp();
    else if (key === 'Escape') toggleHelp(false);
    else return;
    event.preventDefault();
  }

  buildTable();
  $('search').addEventListener('input', refresh);
  $('export-tsv').addEventListener('click', () => download('qc_ratings.tsv', ratingsTSV(), 'text/tab-separated-values'));
  $('export-json').addEventListener('click', () => download('qc_ratings.json', ratingsJSON(), 'application/json'));
  $('export-fails').addEventListener('click', () => download('qc_fails.yml', yamlList('fail'), 'text/yaml'));
  $('export-artifacts').addEventListener('click', () => download('qc_artifacts.yml', yamlList('artifact'), 'text/yaml'));
  $('import-json').addEventListener('change', (event) => {
    const file = event.target.files[0];
    if (file) importJSON(file);
    event.target.value = '';
  });
  $('help-button').addEventListener('click', () => toggleHelp());
  $('v-full').addEventListener('click', toggleWholeField);
  $('v-reference').addEventListener('click', toggleReference);
  $('help').addEventListener('click', () => toggleHelp(false));
  document.addEventListener('keydown', onKey);
  const linked = runs.findIndex((run) => '#' + encodeURIComponent(run.key) === window.location.hash);
  if (linked >= 0) current = linked;
  refresh();
  if (current >= 0) select(current);
}());
