// The human-in-the-loop page (served by `jaxalign hitl`, see docs/hitl.md). Every text from the server or the
// model is put into the page as text (textContent), never as markup; the page's Content-Security-Policy allows
// no inline script either.
"use strict";

const $ = (id) => document.getElementById(id);
let settings = null;  // {model, max_tokens} from /hitl/state
let current = null;   // the answer on screen: {prompt, responses: [..], version, truncated: [..], recorded: Set}
let busy = false;
let lastState = null;

// An element with a class and a text, and children appended (strings become text nodes).
function el(tag, className, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  for (const child of children) {
    if (child === null || child === undefined || child === "") continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function plural(count, word) { return `${count} ${word}${count === 1 ? "" : "s"}`; }
function clip(text, length) { text = String(text); return text.length > length ? text.slice(0, length) + "…" : text; }

function banner(text, kind) {
  const node = $("banner");
  node.textContent = text || "";
  node.className = text ? kind : "";
}

function setBusy(value) {
  busy = value;
  updateButtons();
}

// Which buttons work now: none while a request is in flight; an answer's thumbs only until one is recorded.
function updateButtons() {
  document.querySelectorAll("button").forEach((b) => { b.disabled = busy; });
  document.querySelectorAll("#single-actions button").forEach((b) => {
    const action = b.dataset.action;
    const thumbs = action === "thumbs_up" || action === "thumbs_down";
    if (!current) return;
    if (thumbs && (current.recorded.has("thumbs_up") || current.recorded.has("thumbs_down"))) b.disabled = true;
  });
  if (lastState) {
    const r = lastState.retrain;
    $("retrain-now").disabled = busy || r.state === "training" || r.state === "swapping" || lastState.waiting === 0;
  }
}

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error((data.error && data.error.message) || `HTTP ${response.status}`);
  return data;
}

// Stream a chat completion: onText(index, text) for every piece; resolves to {version, finish: [reason per answer]}.
async function streamAnswers(question, n, onText) {
  const response = await fetch("/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({model: settings.model, messages: [{role: "user", content: question}], stream: true, n,
                          max_tokens: settings.max_tokens, temperature: n > 1 ? 0.9 : 0.7, top_p: 0.95})});
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new Error((data.error && data.error.message) || `HTTP ${response.status}`);
  }
  const reader = response.body.getReader(), decoder = new TextDecoder();
  const finish = new Array(n).fill(null);
  let buffer = "", version = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const chunk = JSON.parse(line.slice(6));
      if (chunk.error) throw new Error(chunk.error.message);
      version = chunk.system_fingerprint || version;
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) onText(choice.index, choice.delta.content);
        if (choice.finish_reason) finish[choice.index] = choice.finish_reason;
      }
    }
  }
  return {version, finish};
}

function question() {
  const text = $("question").value.trim();
  if (!text) { banner("Type a question first.", "error"); $("question").focus(); return null; }
  return text;
}

function showTruncated(ids, truncated) {
  ids.forEach((id, i) => {
    const tag = $(id);
    tag.textContent = truncated[i] ? `truncated: cut off at the ${settings.max_tokens}-token limit` : "";
    tag.classList.toggle("hidden", !truncated[i]);
  });
}

function resetActionLabels() {
  document.querySelectorAll("#single-actions button").forEach((b) => {
    b.textContent = b.dataset.label;
    b.classList.remove("recorded");
  });
}

async function ask(n) {
  const prompt = question();
  if (!prompt || busy || !settings) return;
  banner("");
  current = null;
  resetActionLabels();
  setBusy(true);
  $("single").classList.toggle("hidden", n !== 1);
  $("double").classList.toggle("hidden", n !== 2);
  closeEdit();
  const boxes = n === 1 ? [$("answer")] : [$("answer-a"), $("answer-b")];
  const tags = n === 1 ? ["single-truncated"] : ["truncated-a", "truncated-b"];
  boxes.forEach((b) => { b.textContent = ""; });
  showTruncated(tags, [false, false]);
  const texts = new Array(n).fill("");
  $("ask-meta").textContent = "answering…";
  try {
    const {version, finish} = await streamAnswers(prompt, n, (i, piece) => {
      texts[i] += piece; boxes[i].textContent = texts[i];
    });
    const truncated = finish.map((reason) => reason === "length");
    current = {prompt, responses: texts, version, truncated, recorded: new Set()};
    showTruncated(tags, truncated);
    $(n === 1 ? "single-version" : "double-version").textContent = `answered by ${version}`;
    $("ask-meta").textContent = "";
  } catch (error) {
    current = null;
    $("ask-meta").textContent = "";
    banner(`The model could not answer: ${error.message}`, "error");
  } finally {
    setBusy(false);
  }
}

const RECORDED = {thumbs_up: "Thumbs up recorded", thumbs_down: "Thumbs down recorded"};

async function send(record, done) {
  if (busy) return false;
  setBusy(true);
  try {
    const saved = await api("/hitl/feedback", record);
    banner(`Saved (${plural(saved.records, "record")}; ${saved.waiting} waiting for the next retraining).`, "info");
    if (done) done();
    await refresh();
    return true;
  } catch (error) {
    banner(`Not saved: ${error.message}`, "error");
    return false;
  } finally {
    setBusy(false);
  }
}

function singleRecord(action, extra) {
  return {prompt: current.prompt, response: current.responses[0], model_version: current.version, action, ...extra};
}

function openEdit() {
  $("edit-box").value = current.responses[0];
  ["edit-box", "edit-actions"].forEach((id) => $(id).classList.remove("hidden"));
  ["answer", "single-actions"].forEach((id) => $(id).classList.add("hidden"));
  $("edit-box").focus();
}

function closeEdit() {
  ["edit-box", "edit-actions"].forEach((id) => $(id).classList.add("hidden"));
  ["answer", "single-actions"].forEach((id) => $(id).classList.remove("hidden"));
}

function done() { $("single").classList.add("hidden"); $("double").classList.add("hidden"); current = null; }

function thumbs(button, action) {
  const answer = current;
  send(singleRecord(action), () => {
    answer.recorded.add(action);
    button.textContent = RECORDED[action];
    button.classList.add("recorded");
  });
}

function start() {
  document.querySelectorAll("#single-actions button").forEach((button) => {
    button.dataset.label = button.textContent;
    button.addEventListener("click", () => {
      if (!current) return;
      const action = button.dataset.action;
      if (action === "edit") return openEdit();
      if (action === "thumbs_up" || action === "thumbs_down") return thumbs(button, action);
      send(singleRecord(action), done);
    });
  });
  $("save-edit").addEventListener("click", () => {
    if (current) send(singleRecord("edit", {edit: $("edit-box").value}), () => { closeEdit(); done(); });
  });
  $("cancel-edit").addEventListener("click", closeEdit);
  document.querySelectorAll("[data-pick]").forEach((button) => {
    button.addEventListener("click", () => {
      if (!current) return;
      const chosen = Number(button.dataset.pick);
      send({prompt: current.prompt, action: "pick", model_version: current.version,
            response: current.responses[chosen], choice: {responses: current.responses, chosen}}, done);
    });
  });
  $("ask").addEventListener("click", () => ask(1));
  $("ask-two").addEventListener("click", () => ask(2));
  $("question").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) ask(1); });
  $("retrain-now").addEventListener("click", () => command("/hitl/retrain", {}, (r) => `Training ${r.version}…`));
  refresh();
  setInterval(() => { if (!busy) refresh(); }, 2000);
}

// A POST from the side bar; the banner says what happened.
async function command(path, body, said) {
  if (busy) return;
  setBusy(true);
  try { const reply = await api(path, body); banner(said(reply), "info"); await refresh(); }
  catch (error) { banner(error.message, "error"); }
  finally { setBusy(false); }
}

async function rollback(name, serving) {
  if (busy) return;
  if (!window.confirm(`Serve ${name} instead of ${serving}? New answers will come from ${name}, and the next `
                      + `retraining starts from it.`)) return;
  setBusy(true);
  banner(`Loading ${name}…`, "info");
  try { await api("/hitl/rollback", {version: name}); banner(`Now serving ${name}.`, "info"); await refresh(); }
  catch (error) { banner(`Could not serve ${name}: ${error.message}`, "error"); }
  finally { setBusy(false); }
}

function retrainText(state) {
  const r = state.retrain;
  if (r.state === "training" && r.stage) {
    if (r.phase === "waiting") return r.message;
    if (r.phase === "compiling" || !r.step) {
      return `Training ${r.version}: ${r.stage}, compiling (${plural(r.steps, "step")} to go)`;
    }
    if (r.phase === "finishing") return `Training ${r.version}: ${r.stage}, ${r.steps} of ${r.steps} steps done, exporting`;
    return `Training ${r.version}: ${r.stage}, step ${r.step} of ${r.steps}`;
  }
  let text = r.message || "";
  if (r.state === "idle") {
    text = (text ? text + ". " : "") + (state.auto
      ? `${state.waiting} of ${plural(state.threshold, "new record")} before the next retraining.`
      : `${plural(state.waiting, "new record")}; automatic retraining is off.`);
  }
  return text;
}

function stepsOf(version) {
  const done = Object.entries(version.stages).filter(([, info]) => info.status !== "skipped");
  return done.map(([stage, info]) => `${stage} ${info.steps === undefined ? "" : plural(info.steps, "step")}`.trim())
    .join(", ");
}

function versionItem(v, state) {
  const li = el("li", "");
  li.append(el("b", "", v.name), " ");
  li.append(el("span", `tag${v.status === "failed" ? " failed" : ""}`, v.status), " ");
  if (v.name === state.serving) li.append(el("span", "tag serving", "serving"), " ");
  li.append(el("span", "meta", v.parent
    ? `from ${v.parent}, records ${v.records[0]}–${v.records[1]}${stepsOf(v) ? "; " + stepsOf(v) : ""}`
    : "base model"));
  if (v.error) li.append(el("div", "meta error-text", v.error));
  const button = (label, onClick) => {
    const b = el("button", "", label);
    b.disabled = busy;
    b.addEventListener("click", onClick);
    li.append(b);
  };
  if (v.status === "ready" && v.name !== state.serving) button("Serve this", () => rollback(v.name, state.serving));
  if (v.status === "failed") {
    button("Retry", () => command("/hitl/retry", {version: v.name}, (r) => `Training ${r.version} again…`));
  }
  return li;
}

function historyItem(h) {
  const answer = h.action === "edit" ? h.edit : h.response;
  const label = {edit: "edited to", pick: "picked"}[h.action] || "answer";
  return el("li", "",
    el("span", "tag", h.action.replace("_", " ")), " ", el("span", "meta", h.model_version || ""),
    el("div", "", clip(h.prompt, 120)),
    el("div", "history-answer", `${label}: ${clip(answer || "", 200)}`));
}

let shownRecovered = false;
async function refresh() {
  let state, history;
  try { [state, history] = await Promise.all([api("/hitl/state"), api("/hitl/history?limit=30")]); }
  catch (error) { banner(`The server does not answer: ${error.message}`, "error"); return; }
  lastState = state;
  settings = {model: state.model, max_tokens: state.max_tokens};
  $("model").textContent = state.model;
  $("serving").textContent = state.serving;
  const r = state.retrain;
  $("retrain-text").textContent = retrainText(state);
  $("retrain-bar").style.width = r.state === "training" && r.steps ? `${100 * r.step / r.steps}%`
      : `${Math.min(100, 100 * state.waiting / state.threshold)}%`;
  $("versions").replaceChildren(...state.versions.map((v) => versionItem(v, state)));
  $("history").replaceChildren(...history.records.map(historyItem));
  updateButtons();
  if (state.recovered.length && !shownRecovered) {
    shownRecovered = true;
    banner(state.recovered.join(" "), "warn");
  }
}

document.addEventListener("DOMContentLoaded", start);
