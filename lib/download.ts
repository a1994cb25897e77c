/**
 * Fetching over a network that may fail for a moment: one retry rule for every file the project
 * downloads (hub datasets in lib/sources.ts, backbone weights in lib/backbones.ts).
 *
 * A dropped connection, a timeout, a 5xx, a 429 or a body cut short is tried again after a pause
 * that doubles each time; a 4xx (a missing file, no access) is the server's final answer and fails
 * at once.
 */

/** An HTTP answer that is not 2xx, as an Error that keeps its status. */
export function httpError(res: Response, prefix = ""): Error & { status: number } {
  return Object.assign(new Error(`${prefix}HTTP ${res.status} ${res.statusText}`.trim()), { status: res.status });
}

/** The HTTP status an error carries: ours (httpError) say `status`, @huggingface/hub's `statusCode`. */
function httpStatus(err: unknown): number | undefined {
  if (!(err instanceof Error)) return undefined;
  const e = err as Error & { status?: unknown; statusCode?: unknown };
  const s = e.status ?? e.statusCode;
  return typeof s === "number" ? s : undefined;
}

/** A 4xx other than 408 (request timeout) and 429 (too many requests) will not change on retry. */
function isFinalAnswer(err: unknown): boolean {
  const s = httpStatus(err);
  return s !== undefined && s >= 400 && s < 500 && s !== 408 && s !== 429;
}

/** First line of an error, whitespace folded, no trailing period: it is embedded in a sentence. */
export function oneLine(err: unknown): string {
  const msg = err instanceof Error ? err.message : String(err);
  return msg.replace(/\s+/g, " ").trim().replace(/[.\s]+$/, "");
}

export interface RetryOptions {
  /** Attempts in all (default 3). */
  attempts?: number;
  /** Pause before the second attempt; it doubles after each failure (default 1 s). */
  backoffMs?: number;
  /** Where to say that an attempt failed and will be retried (default: nowhere). */
  log?: (line: string) => void;
}

/**
 * `fn` until it succeeds, at most `attempts` times. Errors name `what`: `<what>: HTTP 404 Not Found`
 * for a final answer, `<what>: failed after 3 attempts: <each distinct reason>` when retries ran out.
 */
export async function withRetry<T>(what: string, fn: () => Promise<T>, o: RetryOptions = {}): Promise<T> {
  const attempts = o.attempts ?? 3;
  let delay = o.backoffMs ?? 1000;
  const reasons: string[] = [];
  for (let a = 1; a <= attempts; a++) {
    try {
      return await fn();
    } catch (err) {
      if (isFinalAnswer(err)) throw new Error(`${what}: ${oneLine(err)}`, { cause: err });
      reasons.push(oneLine(err));
      if (a < attempts) {
        o.log?.(`${what}: attempt ${a}: ${reasons.at(-1)}; retrying in ${(delay / 1000).toFixed(1)} s`);
        await Bun.sleep(delay);
        delay *= 2;
      }
    }
  }
  const n = `${attempts} attempt${attempts === 1 ? "" : "s"}`;
  throw new Error(`${what}: failed after ${n}: ${[...new Set(reasons)].join("; ")}`);
}

/**
 * GET `url` whole. A non-2xx answer is an httpError; a body shorter than the Content-Length the
 * server announced (a connection cut mid-file) is an error too, so withRetry fetches it again.
 */
export async function fetchBytes(url: string, timeoutMs = 120_000): Promise<Uint8Array> {
  const res = await fetch(url, { signal: AbortSignal.timeout(timeoutMs), redirect: "follow" });
  if (!res.ok) throw httpError(res);
  const bytes = new Uint8Array(await res.arrayBuffer());
  const declared = res.headers.get("content-length");
  if (declared !== null && res.headers.get("content-encoding") === null && Number(declared) !== bytes.byteLength) {
    throw new Error(`got ${bytes.byteLength} bytes, the server announced ${declared} (truncated download)`);
  }
  return bytes;
}
