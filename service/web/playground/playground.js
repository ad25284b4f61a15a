// The playground: generate into a session, continue it with new text only, fork it, reset it,
// and watch the next-token distribution (POST /next, a peek: commit false) as you type.
import { Api, ApiError } from "./api.js";
import { Distribution } from "./distribution.js";
import { Pending, Transcript } from "./transcript.js";

const KEY_STORAGE = "lstm-lm.api-key"; // /docs reads it too

const $ = (id) => document.getElementById(id);
const el = {
  apiKey: $("api-key"),
  model: $("model-name"),
  prompt: $("prompt"),
  temperature: $("temperature"),
  topP: $("top-p"),
  maxTokens: $("max-tokens"),
  generate: $("generate"),
  continue: $("continue"),
  stop: $("stop"),
  fork: $("fork"),
  reset: $("reset"),
  sessions: $("sessions"),
  sessionInfo: $("session-info"),
  output: $("output"),
  status: $("status"),
  error: $("error"),
  distribution: $("distribution"),
  entropy: $("entropy"),
};

const api = new Api(() => el.apiKey.value.trim());
const transcript = new Transcript(el.output);

// The sessions this page made, by id: {label, tokens, pieces}. `current` is the one shown.
const branches = new Map();
let current = null;
let branchCount = 0;
let running = null; // the AbortController of the generation in flight

// ---- errors and status -----------------------------------------------------------------

function showError(err) {
  const where = err.status ? ` (HTTP ${err.status})` : "";
  const title = document.createElement("strong");
  title.textContent = `${err.code ?? "error"}${where}: `;
  const parts = [title, document.createTextNode(err.message)];
  if (Array.isArray(err.details)) {
    const list = document.createElement("ul");
    for (const d of err.details) {
      const item = document.createElement("li");
      item.textContent = d && d.field ? `${d.field}: ${d.message}` : JSON.stringify(d);
      list.append(item);
    }
    parts.push(list);
  } else if (err.details != null) {
    const pre = document.createElement("pre");
    pre.textContent = JSON.stringify(err.details, null, 2);
    parts.push(pre);
  }
  el.error.replaceChildren(...parts);
  el.error.hidden = false;
}

function clearError() {
  el.error.hidden = true;
  el.error.replaceChildren();
}

function setStatus(text) {
  el.status.textContent = text;
}

// ---- sessions --------------------------------------------------------------------------

function addBranch(id, tokens, pieces, origin) {
  branchCount += 1;
  const label = origin ? `#${branchCount} (fork of ${origin})` : `#${branchCount}`;
  branches.set(id, { id, label, tokens, pieces });
  const option = document.createElement("option");
  option.value = id;
  el.sessions.append(option);
  select(id);
  return branches.get(id);
}

function select(id) {
  current = id;
  el.sessions.value = id ?? "";
  transcript.render(id ? branches.get(id).pieces : []);
  refreshControls();
}

function refreshControls() {
  for (const option of el.sessions.options) {
    const b = branches.get(option.value);
    if (b) option.textContent = `${b.label} · ${b.tokens} tokens · ${b.id.slice(0, 8)}…`;
  }
  const b = current && branches.get(current);
  el.sessionInfo.textContent = b ? `session ${b.id}` : "no session: Generate starts one";
  el.sessionInfo.dataset.sessionId = b ? b.id : "";
  const busy = running !== null;
  el.generate.disabled = busy;
  el.continue.disabled = busy || !b;
  el.fork.disabled = busy || !b;
  el.reset.disabled = busy || !b;
  el.sessions.disabled = busy || branches.size === 0;
  el.stop.disabled = !busy;
}

function forget(id) {
  branches.delete(id);
  el.sessions.querySelector(`option[value="${CSS.escape(id)}"]`)?.remove();
  select(null);
}

async function fork() {
  clearError();
  const origin = branches.get(current);
  try {
    const created = await api.json("POST", `sessions/${encodeURIComponent(origin.id)}/fork`);
    addBranch(created.session_id, created.tokens, [...origin.pieces], origin.label);
    setStatus(`forked ${origin.label}: continuing one never changes the other`);
  } catch (err) {
    showError(err);
  }
}

async function reset() {
  clearError();
  const branch = branches.get(current);
  try {
    await api.json("DELETE", `sessions/${encodeURIComponent(branch.id)}`);
    setStatus(`deleted ${branch.label} on the server`);
  } catch (err) {
    showError(err); // e.g. already expired: it is gone either way
  }
  forget(branch.id);
  scheduleDistribution(0);
}

// ---- generation ------------------------------------------------------------------------

function params() {
  return {
    max_tokens: Number(el.maxTokens.value),
    temperature: Number(el.temperature.value),
    top_p: Number(el.topP.value),
  };
}

/** Generate into a new session ("new") or the current one ("continue"), streaming the text. */
async function generate(mode) {
  if (running) return;
  clearError();
  const prompt = el.prompt.value;
  const controller = new AbortController();
  running = controller;
  refreshControls();
  let pending = null;
  let branch = null;
  const started = performance.now();
  setStatus("generating…");
  try {
    if (mode === "new" || !current) {
      const created = await api.json("POST", "sessions", {}, controller.signal);
      branch = addBranch(created.session_id, created.tokens, []);
      refreshControls();
    } else {
      branch = branches.get(current);
    }
    // only the new text is sent: the session holds everything before it
    const body = { session_id: branch.id, prompt, ...params(), stream: true, logprobs: 1 };
    let final = null;
    for await (const events of api.events("generate", body, controller.signal)) {
      if (!pending) {
        pending = new Pending(transcript, branch.pieces, prompt);
        // a stop draws nothing more at once, whatever is still queued or in flight
        controller.signal.addEventListener("abort", () => pending.halt(), { once: true });
        if (el.prompt.value === prompt) el.prompt.value = ""; // it is on its way into the session
      }
      const tokens = [];
      for (const event of events) {
        if ("token" in event) tokens.push(event);
        else final = event;
      }
      pending.append(tokens); // drawn at the next animation frame
    }
    if (!final) throw new ApiError(0, "stream_cut", "the stream ended before its final event: nothing was saved");
    if (final.error) throw new ApiError(null, final.error.code, final.error.message, final.error.details);
    pending?.commit();
    branch.tokens = final.usage.session_tokens;
    const seconds = (performance.now() - started) / 1000;
    const n = final.usage.completion_tokens;
    setStatus(
      `finished (${final.finish_reason}): ${n} tokens in ${seconds.toFixed(2)} s` +
        ` (${Math.round(n / seconds)} tokens/s) · seed ${final.seed} · the session holds ${branch.tokens} tokens`,
    );
  } catch (err) {
    pending?.discard(err.name === "AbortError" ? "stopped: not saved" : "failed: not saved");
    if (!el.prompt.value) el.prompt.value = prompt; // it never reached the session: type on from it
    if (err.name === "AbortError") {
      setStatus("stopped: the server keeps nothing of an abandoned stream, so the session is as it was");
      if (branch) checkAfterStop(branch);
    } else {
      setStatus("failed: nothing was saved");
      showError(err);
    }
  } finally {
    running = null;
    refreshControls();
    scheduleDistribution(0);
  }
}

/** A stop that raced the end of a generation may find it saved: say so rather than hide it. */
async function checkAfterStop(branch) {
  try {
    const info = await api.json("GET", `sessions/${encodeURIComponent(branch.id)}`);
    if (info.tokens !== branch.tokens) {
      setStatus(`stopped too late: the server had saved the generation (${info.tokens} tokens, not ${branch.tokens})`);
      branch.tokens = info.tokens;
      refreshControls();
    }
  } catch (err) {
    showError(err);
  }
}

// ---- next-token distribution -----------------------------------------------------------

const distribution = new Distribution(
  api,
  el.distribution,
  el.entropy,
  () => (current ? { text: el.prompt.value, session_id: current } : { text: el.prompt.value }),
  showError,
);

function scheduleDistribution(delay) {
  distribution.schedule(delay);
}

function typeToken(event) {
  const item = event.target.closest("li");
  const token = item?.dataset.token;
  if (!token || token === "<s>" || token === "<unk>") return; // specials are not text
  el.prompt.value += token;
  el.prompt.focus();
  scheduleDistribution(0);
}

// ---- wiring ----------------------------------------------------------------------------

async function loadInfo() {
  try {
    const info = await api.json("GET", "info");
    el.model.textContent = `${info.model.name} · ${info.model.tokenizer} tokenizer · ${info.store} store`;
    el.maxTokens.max = info.limits.max_tokens;
  } catch (err) {
    el.model.textContent = "";
    showError(err);
  }
}

el.apiKey.value = window.localStorage.getItem(KEY_STORAGE) ?? "";
el.apiKey.addEventListener("input", () => {
  window.localStorage.setItem(KEY_STORAGE, el.apiKey.value.trim());
});
el.apiKey.addEventListener("change", () => {
  clearError();
  loadInfo();
  scheduleDistribution(0);
});
el.prompt.addEventListener("input", () => scheduleDistribution());
el.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    generate(current ? "continue" : "new");
  }
});
el.generate.addEventListener("click", () => generate("new"));
el.continue.addEventListener("click", () => generate("continue"));
el.stop.addEventListener("click", () => running?.abort());
el.fork.addEventListener("click", fork);
el.reset.addEventListener("click", reset);
el.sessions.addEventListener("change", () => {
  select(el.sessions.value || null);
  scheduleDistribution(0);
});
el.distribution.addEventListener("click", typeToken);

refreshControls();
loadInfo();
scheduleDistribution(0);
