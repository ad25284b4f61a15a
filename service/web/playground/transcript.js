// A session's text as the page shows it: what the user sent (plain) and what the model generated,
// each generated token shaded by how likely the model found it. The page keeps only pieces the
// server has saved in the session; a generation in flight is drawn apart until its final event.
//
// Drawing must keep up with a server streaming thousands of tokens a second into a text of any
// length, so the cost of each update may not grow with the text:
// - the text is laid out in blocks ("chunks") of about a thousand characters, each ending at a line
//   end (so it looks and copies the same as one run of text), so appending re-lays out only the
//   last chunk: one long run of inline spans is laid out whole at every update, ~170 ms per frame
//   at 100,000 tokens, and the page fell behind the stream and answered a click seconds late;
// - chunks out of sight are neither laid out nor painted (content-visibility: auto, in the CSS);
// - tokens that arrive are queued and drawn at most once per animation frame, in one fragment, and
//   a stop drops what is queued: nothing is drawn after it;
// - a token is a span with a shared class for its shade (no inline style) and its probability in
//   data-p; its tooltip is made when the pointer first reaches it.

const CHUNK_CHARS = 1024; // a chunk closes at the first line end after this many characters,
const CHUNK_MAX = 4096; // or here whatever comes (a text without line ends)
const SHADES = 16; // shade levels: finer than the eye tells apart

/** A token's display text in lists: whitespace made visible. */
export function visible(text) {
  return text.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/ /g, "␣");
}

/** Background of a generated token: the less likely it was, the stronger the shade. */
export function shade(p) {
  const alpha = (0.75 * (1 - Math.min(Math.max(p, 0), 1))).toFixed(3);
  return `rgba(255, 140, 0, ${alpha})`;
}

function shadeLevel(p) {
  return Math.round(SHADES * (1 - Math.min(Math.max(p, 0), 1)));
}

// one rule per level (.gen.s0 … .gen.s16), shared by every token of that level
const shades = new CSSStyleSheet();
for (let level = 0; level <= SHADES; level += 1) {
  shades.insertRule(`#output .gen.s${level} { background-color: ${shade(1 - level / SHADES)}; }`);
}
document.adoptedStyleSheets = [...document.adoptedStyleSheets, shades];

function promptNode(text) {
  const span = document.createElement("span");
  span.className = "sent";
  span.textContent = text;
  return span;
}

function tokenNode(piece) {
  const span = document.createElement("span");
  span.textContent = piece.text;
  if (piece.p === null) {
    span.className = "gen";
  } else {
    span.className = `gen s${shadeLevel(piece.p)}`;
    span.dataset.p = piece.p.toFixed(4);
  }
  return span;
}

/** A token event ({token, id, logprob}) as a piece of the transcript. */
export function tokenPiece(event) {
  return { kind: "token", text: event.token, p: event.logprob == null ? null : Math.exp(event.logprob) };
}

/** A prompt's text in parts that end at line ends (and are at most CHUNK_MAX long), so chunks can close. */
function promptParts(text) {
  const parts = [];
  let start = 0;
  while (start < text.length) {
    let end = text.indexOf("\n", start) + 1 || text.length;
    if (end - start > CHUNK_MAX) {
      end = start + CHUNK_MAX;
      if (/[\uDC00-\uDFFF]/.test(text[end])) end -= 1; // not between the halves of a surrogate pair
    }
    parts.push(text.slice(start, end));
    start = end;
  }
  return parts;
}

function explain(event) {
  const span = event.target.closest?.(".gen[data-p]");
  if (span && !span.title) span.title = `p = ${Number(span.dataset.p).toFixed(3)}`;
}

/** The output box: pieces drawn into chunks, appended to only at the end. */
export class Transcript {
  constructor(container) {
    this.container = container;
    this.chunk = null; // the chunk being filled
    this.full = true; // whether the next node starts a new chunk
    this.chars = 0; // characters in this.chunk
    container.addEventListener("mouseover", explain);
  }

  /** Draw a session's saved pieces, replacing what was there. */
  render(pieces) {
    this.container.replaceChildren();
    this.chunk = null;
    this.full = true;
    this.write(pieces, null);
  }

  /** Draw pieces at the end. Those of a `group` ({className, wrappers}) go into one span of that
   * class per chunk they reach (the group's wrappers), so the group can be restyled as a whole. */
  write(pieces, group) {
    let fragment = null;
    let into = null;
    const flush = () => {
      if (fragment) into.append(fragment);
      fragment = null;
    };
    for (const piece of pieces) {
      for (const text of piece.kind === "prompt" ? promptParts(piece.text) : [piece.text]) {
        if (this.full) {
          flush();
          this.chunk = document.createElement("div");
          this.chunk.className = "chunk";
          this.container.append(this.chunk);
          this.chars = 0;
        }
        if (!fragment) {
          fragment = document.createDocumentFragment();
          into = this.target(group);
        }
        fragment.append(piece.kind === "prompt" ? promptNode(text) : tokenNode(piece));
        this.chars += text.length;
        this.full = this.chars >= CHUNK_MAX || (this.chars >= CHUNK_CHARS && text.endsWith("\n"));
      }
    }
    flush();
  }

  target(group) {
    if (!group) return this.chunk;
    const last = group.wrappers.at(-1);
    if (last && last.parentNode === this.chunk && last === this.chunk.lastChild) return last;
    const wrapper = document.createElement("span");
    wrapper.className = group.className;
    this.chunk.append(wrapper);
    group.wrappers.push(wrapper);
    return wrapper;
  }
}

/** A generation in flight: its prompt and tokens, drawn as they arrive, saved on commit(). */
export class Pending {
  /** Drawn after what `transcript` shows; `pieces` are the session's saved pieces. */
  constructor(transcript, pieces, prompt) {
    this.transcript = transcript;
    this.pieces = pieces; // extended on commit()
    this.own = prompt ? [{ kind: "prompt", text: prompt }] : []; // what is drawn
    this.queue = []; // tokens received, not drawn yet
    this.frame = 0;
    this.closed = false;
    this.group = { className: "pending", wrappers: [] };
    transcript.write(this.own, this.group);
  }

  /** Token events ({token, id, logprob}): queued, and drawn at the next animation frame. */
  append(events) {
    if (this.closed) return;
    for (const event of events) this.queue.push(tokenPiece(event));
    if (!this.frame && this.queue.length) this.frame = requestAnimationFrame(() => this.draw());
  }

  /** Draw what is queued, in one DOM update. */
  draw() {
    this.frame = 0;
    if (this.closed || !this.queue.length) return;
    const batch = this.queue;
    this.queue = [];
    this.transcript.write(batch, this.group);
    for (const piece of batch) this.own.push(piece);
  }

  /** Nothing more is drawn: what is queued is dropped (a stop shows what was on screen). */
  halt() {
    cancelAnimationFrame(this.frame);
    this.frame = 0;
    this.queue = [];
    this.closed = true;
  }

  /** The server saved it: it is part of the session now (all of it, drawn at once). */
  commit() {
    this.draw();
    this.halt();
    for (const piece of this.own) this.pieces.push(piece);
    for (const wrapper of this.group.wrappers) wrapper.classList.remove("pending");
  }

  /** Stopped or failed: the server kept none of it; shown struck through until the next redraw
   * (all that arrived if it failed; after a stop, halt() already dropped what was not drawn). */
  discard(reason) {
    this.draw();
    this.halt();
    for (const wrapper of this.group.wrappers) {
      wrapper.classList.replace("pending", "discarded");
      wrapper.title = reason;
    }
  }
}
