// The next-token distribution panel: POST /next with commit false (a peek: the session is
// unchanged) after the session plus the text being typed, debounced, newest answer only.
import { visible } from "./transcript.js";

const TOP_N = 10;
const DEBOUNCE_MS = 250;

export class Distribution {
  /** `body()` gives the /next request for now ({text, session_id?}); `onError` shows a failure. */
  constructor(api, list, entropy, body, onError) {
    Object.assign(this, { api, list, entropy, body, onError });
    this.timer = null;
    this.controller = null;
  }

  schedule(delay = DEBOUNCE_MS) {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.refresh(), delay);
  }

  async refresh() {
    this.controller?.abort(); // only the latest text's answer may be drawn
    const controller = new AbortController();
    this.controller = controller;
    try {
      const request = { ...this.body(), top_n: TOP_N, commit: false };
      const answer = await this.api.json("POST", "next", request, controller.signal);
      if (controller === this.controller) this.draw(answer);
    } catch (err) {
      if (err.name !== "AbortError") {
        this.list.replaceChildren();
        this.onError(err);
      }
    }
  }

  draw(answer) {
    this.entropy.textContent = `entropy ${answer.entropy.toFixed(3)} nats`;
    const top = answer.next[0]?.prob || 1;
    this.list.replaceChildren(...answer.next.map((t) => item(t, top)));
  }
}

function item(t, top) {
  const li = document.createElement("li");
  li.dataset.id = t.id;
  li.dataset.prob = t.prob;
  li.dataset.token = t.token;
  li.title = `id ${t.id}, log-probability ${t.logprob.toFixed(3)}: click to type it`;
  const token = document.createElement("code");
  token.textContent = visible(t.token);
  const bar = document.createElement("span");
  bar.className = "bar";
  bar.style.width = `${(100 * t.prob) / top}%`;
  const prob = document.createElement("span");
  prob.className = "prob";
  prob.textContent = `${(100 * t.prob).toFixed(1)}%`;
  li.append(token, bar, prob);
  return li;
}
