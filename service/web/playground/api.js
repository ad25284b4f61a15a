// The service's HTTP API as the playground uses it: JSON requests carrying the API key, and the
// Server-Sent Events of POST /generate read from a fetch body (EventSource cannot POST, send
// headers or be aborted mid-request).

/** An error the API answered with ({"error": {code, message, details}}), or a transport failure. */
export class ApiError extends Error {
  constructor(status, code, message, details = null) {
    super(message);
    this.name = "ApiError";
    this.status = status; // HTTP status; null for an error event inside a stream, 0 for no answer
    this.code = code;
    this.details = details;
  }
}

async function errorOf(response) {
  const text = await response.text();
  try {
    const { error } = JSON.parse(text);
    if (error && typeof error.message === "string") {
      return new ApiError(response.status, error.code ?? "error", error.message, error.details ?? null);
    }
  } catch {
    // not our JSON error shape (a proxy's page, say): report the status line
  }
  return new ApiError(response.status, `http_${response.status}`, `${response.status} ${response.statusText}`.trim());
}

/** JSON.parse reviver: an integer past 2^53 (a 63-bit seed) would lose digits as a JS number, so
 * it is kept as its exact text where the browser gives the source (JSON.parse source access). */
function exactIntegers(key, value, context) {
  const inexact = typeof value === "number" && Number.isInteger(value) && !Number.isSafeInteger(value);
  return inexact && context?.source ? context.source : value;
}

// An integer of 16 digits or more (not a float's digits): only those can be past 2^53.
const LONG_INTEGER = /(?<![\d.])\d{16,}(?![\d.eE])/;

function parseJson(text) {
  // the reviver runs for every value: only for a text that may need it (a token event does not)
  return LONG_INTEGER.test(text) ? JSON.parse(text, exactIntegers) : JSON.parse(text);
}

/** One SSE block ("data: {...}" lines) as its JSON, or null for a comment or keep-alive. */
function parseEvent(block) {
  if (block.startsWith("data: ") && !block.includes("\n")) return parseJson(block.slice(6)); // a token's
  const data = block
    .split(/\r?\n/)
    .filter((line) => line.startsWith("data:"))
    .map((line) => line.slice(5).replace(/^ /, ""));
  return data.length ? parseJson(data.join("\n")) : null;
}

export class Api {
  /** `key()` returns the API key to send (empty: send none). */
  constructor(key) {
    this.key = key;
  }

  headers(withBody) {
    const headers = {};
    if (withBody) headers["Content-Type"] = "application/json";
    const key = this.key();
    if (key) headers.Authorization = `Bearer ${key}`;
    return headers;
  }

  async send(method, path, body, signal) {
    let response;
    try {
      response = await fetch(path, {
        method,
        headers: this.headers(body !== undefined),
        body: body === undefined ? undefined : JSON.stringify(body),
        signal,
      });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, "network_error", `cannot reach the server: ${err.message}`);
    }
    if (!response.ok) throw await errorOf(response);
    return response;
  }

  /** The JSON answer of a request (null for 204 No Content). Paths are relative to the page. */
  async json(method, path, body = undefined, signal = undefined) {
    const response = await this.send(method, path, body, signal);
    return response.status === 204 ? null : parseJson(await response.text());
  }

  /** The events of a streamed POST, yielded as arrays: whatever arrived in one read. Once `signal`
   * is aborted nothing more is yielded: the fetch is aborted and what it had received is dropped. */
  async *events(path, body, signal) {
    const response = await this.send("POST", path, body, signal);
    const reader = response.body.getReader();
    const decoder = new TextDecoder(); // not a TextDecoderStream: a pipe adds work to every read
    let buffer = "";
    let finished = false;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        signal?.throwIfAborted(); // a read that raced the abort
        buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
        const blocks = buffer.split(/\r?\n\r?\n/);
        buffer = blocks.pop(); // an event not complete yet
        const events = blocks.map(parseEvent).filter((event) => event !== null);
        if (events.length) yield events;
        if (done) break;
      }
      finished = true;
    } finally {
      // the consumer stopped early or failed: close the connection, so the server stops generating
      if (!finished) reader.cancel().catch(() => {});
    }
    if (buffer.trim()) throw new ApiError(0, "stream_cut", "the stream ended in the middle of an event");
  }
}
