// A session's text as the page shows it: what the user sent (plain) and what the model generated,
// each generated token shaded by how likely the model found it. The page keeps only pieces the
// server has saved in the session; a generation in flight is drawn apart until its final event.

/** A token's display text in lists: whitespace made visible. */
export function visible(text) {
  return text.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/ /g, "␣");
}

/** Background of a generated token: the less likely it was, the stronger the shade. */
export function shade(p) {
  const alpha = (0.75 * (1 - Math.min(Math.max(p, 0), 1))).toFixed(3);
  return `rgba(255, 140, 0, ${alpha})`;
}

function promptNode(text) {
  const span = document.createElement("span");
  span.className = "sent";
  span.textContent = text;
  return span;
}

function tokenNode(piece) {
  const span = document.createElement("span");
  span.className = "gen";
  span.textContent = piece.text;
  if (piece.p !== null) {
    span.dataset.p = piece.p.toFixed(4);
    span.style.backgroundColor = shade(piece.p);
    span.title = `p = ${piece.p.toFixed(3)}`;
  }
  return span;
}

function nodeOf(piece) {
  return piece.kind === "prompt" ? promptNode(piece.text) : tokenNode(piece);
}

/** Draw a session's saved pieces into `container`, replacing what was there. */
export function render(container, pieces) {
  container.replaceChildren(...pieces.map(nodeOf));
}

/** A generation in flight: its prompt and tokens, drawn as they arrive, saved on commit(). */
export class Pending {
  constructor(container, pieces, prompt) {
    this.pieces = pieces; // the session's saved pieces, extended on commit()
    this.own = prompt ? [{ kind: "prompt", text: prompt }] : [];
    this.node = document.createElement("span");
    this.node.className = "pending";
    this.node.append(...this.own.map(nodeOf));
    container.append(this.node);
  }

  /** Token events ({token, id, logprob}) as they came in one read: drawn in one DOM update. */
  append(events) {
    const fragment = document.createDocumentFragment();
    for (const event of events) {
      const piece = { kind: "token", text: event.token, p: event.logprob == null ? null : Math.exp(event.logprob) };
      this.own.push(piece);
      fragment.append(tokenNode(piece));
    }
    this.node.append(fragment);
  }

  get generatedText() {
    return this.own.filter((piece) => piece.kind === "token").map((piece) => piece.text).join("");
  }

  /** The server saved it: it is part of the session now. */
  commit() {
    this.pieces.push(...this.own);
    this.node.classList.remove("pending");
  }

  /** Stopped or failed: the server kept none of it; shown struck through until the next redraw. */
  discard(reason) {
    this.node.classList.replace("pending", "discarded");
    this.node.title = reason;
  }
}
