// The ppl playground's page: an editor with the DSL's highlighting (a <pre> under a
// transparent <textarea>, tokens from the server's /api/highlight), the examples gallery,
// and Run (POST /api/run). Every text from the server is put in with textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const source = $("source"), highlight = $("highlight"), dataBox = $("data"), errorMark = $("error-mark");
const LINE_HEIGHT = 20, PADDING_TOP = 8;
let info = { methods: ["importance"], mcmc: [], chains: [], limits: {} };
let highlightTimer = null, errorLine = null, loadedSource = null;

// ------------------------------------------------------------------ editor
function renderPlain(text) {
  highlight.textContent = text + "\n";
}

function renderTokens(tokens) {
  const frag = document.createDocumentFragment();
  for (const [kind, piece] of tokens) {
    if (kind === "space" || kind === "name" || kind === "punctuation" || kind === "text") {
      frag.appendChild(document.createTextNode(piece));
    } else {
      const span = document.createElement("span");
      span.className = "tk-" + kind;
      span.textContent = piece;
      frag.appendChild(span);
    }
  }
  frag.appendChild(document.createTextNode("\n"));
  highlight.replaceChildren(frag);
}

async function rehighlight() {
  const text = source.value;
  try {
    const r = await postJSON("/api/highlight", { source: text });
    if (r.body && Array.isArray(r.body.tokens) && source.value === text) renderTokens(r.body.tokens);
  } catch (e) { /* plain text stays */ }
}

let loadedName = "";

function onEdit() {
  $("model-name").textContent = loadedName && source.value !== loadedSource ? loadedName + " (edited)" : loadedName;
  renderPlain(source.value);   // at once, so the overlay never lags behind the text
  clearErrorMark();
  clearTimeout(highlightTimer);
  highlightTimer = setTimeout(rehighlight, 120);
}

function syncScroll() {
  highlight.scrollTop = source.scrollTop;
  highlight.scrollLeft = source.scrollLeft;
  placeErrorMark();
}

function setSource(text) {
  source.value = text;
  source.scrollTop = 0;
  onEdit();
  syncScroll();
}

function placeErrorMark() {
  if (errorLine === null) { errorMark.hidden = true; return; }
  errorMark.style.top = (PADDING_TOP + (errorLine - 1) * LINE_HEIGHT - source.scrollTop) + "px";
  errorMark.hidden = false;
}

function clearErrorMark() { errorLine = null; errorMark.hidden = true; }

function goTo(box, line, col) {
  const lines = box.value.split("\n");
  let offset = 0;
  for (let i = 0; i < Math.min(line - 1, lines.length); i++) offset += lines[i].length + 1;
  offset += Math.max(0, (col || 1) - 1);
  box.focus();
  box.setSelectionRange(offset, offset);
  if (box === source) {
    source.scrollTop = Math.max(0, (line - 4) * LINE_HEIGHT);
    syncScroll();
  }
}

source.addEventListener("input", onEdit);
source.addEventListener("scroll", syncScroll);
source.addEventListener("keydown", (ev) => {
  if (ev.key === "Tab" && !ev.shiftKey) {  // indentation, not focus change
    ev.preventDefault();
    const s = source.selectionStart, e = source.selectionEnd;
    source.value = source.value.slice(0, s) + "    " + source.value.slice(e);
    source.selectionStart = source.selectionEnd = s + 4;
    onEdit();
  }
});
document.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); run(); }
});

// ------------------------------------------------------------------ server
async function postJSON(url, body) {
  const r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  let parsed = null;
  try { parsed = await r.json(); } catch (e) { parsed = null; }
  return { status: r.status, body: parsed };
}

async function getJSON(url) {
  const r = await fetch(url);
  return r.json();
}

// ------------------------------------------------------------------ controls
function methodChanged() {
  const m = $("method").value, mcmc = info.mcmc.includes(m);
  for (const el of document.querySelectorAll(".mcmc")) el.hidden = !mcmc;
  $("particles-label").hidden = (m === "enumerate");
  $("particles-name").textContent = (info.chains || []).includes(m) ? "Chains" : "Particles";
}

function applySettings(s) {
  if (s.method && info.methods.includes(s.method)) $("method").value = s.method;
  $("particles").value = s.particles || 1000;
  $("samples").value = s.samples || "";
  $("burn_in").value = (s.burn_in === undefined || s.burn_in === null) ? "" : s.burn_in;
  $("seed").value = s.seed || 0;
  $("options").value = (s.options && Object.keys(s.options).length) ? JSON.stringify(s.options) : "";
  methodChanged();
}

// ------------------------------------------------------------------ gallery
async function loadGallery() {
  const list = $("examples");
  let examples = [];
  try { examples = (await getJSON("/api/examples")).examples; } catch (e) { examples = []; }
  list.replaceChildren();
  if (!examples.length) {
    const li = document.createElement("li"); li.className = "muted"; li.textContent = "no examples folder";
    list.appendChild(li);
    return examples;
  }
  for (const ex of examples) {
    const li = document.createElement("li"), b = document.createElement("button");
    b.type = "button"; b.dataset.example = ex.name;
    b.textContent = ex.name;
    const t = document.createElement("span"); t.className = "title"; t.textContent = ex.title;
    b.appendChild(t);
    b.addEventListener("click", () => loadExample(ex.name));
    li.appendChild(b); list.appendChild(li);
  }
  return examples;
}

async function loadExample(name) {
  const ex = await getJSON("/api/examples/" + encodeURIComponent(name));
  if (ex.ok === false) { showError(ex.error); return; }
  loadedName = name + ".ppl"; loadedSource = ex.source;
  setSource(ex.source);
  dataBox.value = ex.data;
  applySettings(ex);
  for (const b of document.querySelectorAll("#examples button")) b.classList.toggle("current", b.dataset.example === name);
  $("results").hidden = true; $("error").hidden = true;
  setStatus("loaded example " + name + " — press Run");
}

// ------------------------------------------------------------------ run
function setStatus(text, bad) {
  $("status").textContent = text;
  $("status").classList.toggle("bad", !!bad);
}

async function run() {
  const button = $("run");
  if (button.disabled) return;
  button.disabled = true;
  const started = performance.now();
  const tick = setInterval(() => setStatus("running… " + ((performance.now() - started) / 1000).toFixed(1) + " s"), 100);
  setStatus("running…");
  const m = $("method").value;
  const body = { source: source.value, data: dataBox.value, method: m, seed: $("seed").value || 0,
                 particles: $("particles").value || 1000, options: $("options").value };
  if (info.mcmc.includes(m)) { body.samples = $("samples").value; body.burn_in = $("burn_in").value; }
  try {
    const r = await postJSON("/api/run", body);
    if (r.body && r.body.ok) { showResult(r.body); setStatus("done in " + r.body.seconds.toFixed(2) + " s"); }
    else if (r.body && r.body.error) { showError(r.body.error); setStatus(r.body.error.kind + " (HTTP " + r.status + ")", true); }
    else setStatus("the server gave no answer (HTTP " + r.status + ")", true);
  } catch (e) {
    setStatus("cannot reach the playground server: is `ppl playground` still running?", true);
  } finally {
    clearInterval(tick);
    button.disabled = false;
  }
}

function showResult(r) {
  $("error").hidden = true;
  clearErrorMark();
  $("results").hidden = false;
  $("header").textContent = r.header;
  const w = $("warnings");
  w.replaceChildren();
  w.hidden = !r.warnings.length;
  if (r.warnings.length) {
    const b = document.createElement("b"); b.textContent = "⚠ this result may be unreliable"; w.appendChild(b);
    const ul = document.createElement("ul");
    for (const text of r.warnings) { const li = document.createElement("li"); li.textContent = text; ul.appendChild(li); }
    w.appendChild(ul);
  }
  const table = $("table");
  table.replaceChildren();
  const head = table.createTHead().insertRow();
  for (const h of r.table.header) { const th = document.createElement("th"); th.textContent = h; head.appendChild(th); }
  const tbody = table.createTBody();
  for (const row of r.table.rows) {
    const tr = tbody.insertRow();
    for (const cell of row) tr.insertCell().textContent = cell;
  }
  $("table-notes").textContent = r.table.notes.join("\n");
  $("output-box").hidden = !r.output;
  $("output").textContent = r.output || "";
  $("messages").textContent = (r.notes || []).map((n) => "note: " + n).join("\n");
  showImage("plot", r.plot);
  showImage("graph", r.graph);
  $("graph-note").textContent = r.graph_note || "";
}

function showImage(id, uri) {
  $(id + "-box").hidden = !uri;
  if (uri) $(id).src = uri; else $(id).removeAttribute("src");
}

function showError(err) {
  $("results").hidden = true;
  const box = $("error");
  box.replaceChildren();
  box.hidden = false;
  const loc = document.createElement("div");
  loc.className = "loc";
  const where = err.line ? `${err.file}:${err.line}:${err.col}: ` : "";
  loc.textContent = where + err.kind + ": " + err.message;
  box.appendChild(loc);
  if (err.line && err.source_line !== undefined) {
    const gutter = String(err.line).padStart(5) + " | ";
    const pre = document.createElement("pre");
    pre.className = "excerpt";
    pre.appendChild(document.createTextNode(gutter + err.source_line + "\n" + " ".repeat(gutter.length)));
    const caret = document.createElement("span");
    caret.className = "caret"; caret.textContent = err.caret;
    pre.appendChild(caret);
    box.appendChild(pre);
    const target = err.file === "data.json" ? dataBox : source;
    loc.title = "go to the spot";
    loc.addEventListener("click", () => goTo(target, err.line, err.col));
    if (target === source) { errorLine = err.line; placeErrorMark(); }
  }
  if (err.hint) {
    const hint = document.createElement("div");
    hint.className = "hint"; hint.textContent = "hint: " + err.hint;
    box.appendChild(hint);
  }
}

// ------------------------------------------------------------------ start
const DEFAULT_MODEL = `def coin(flips):
    p ~ beta(1, 1)
    for f in flips:
        observe f ~ bernoulli(p)
    return p
`;

async function start() {
  try { info = await getJSON("/api/info"); } catch (e) { /* the defaults */ }
  const select = $("method");
  for (const m of info.methods) { const o = document.createElement("option"); o.value = o.textContent = m; select.appendChild(o); }
  select.addEventListener("change", methodChanged);
  $("run").addEventListener("click", run);
  const l = info.limits || {};
  if (l.time_limit) $("limits").textContent = `limits: ${l.time_limit} s per run, ${l.max_particles.toLocaleString()} particles, ${l.max_samples.toLocaleString()} samples`;
  const examples = await loadGallery();
  if (examples.some((e) => e.name === "coin")) await loadExample("coin");
  else { setSource(DEFAULT_MODEL); dataBox.value = '{"flips": [1, 1, 0, 1]}'; applySettings({ method: "importance", particles: 1000 }); }
  document.body.dataset.ready = "1";
}

start();
