/**
 * Runs the parts of a SIMD kernel call on several threads.
 *
 * With tfjs-wasm's threaded build the heap is a SharedArrayBuffer, so helper Workers can instantiate
 * the same kernels module on the same memory. The main thread writes every part's arguments into
 * one shared control block (pool_layout.ts) and opens the call (a helper that still polls sees it at
 * once; only a sleeping one is woken, a system call), and then every thread, itself included, claims
 * parts with one atomic increment until none is left; it returns when all are finished. Each thread
 * claims its own share of the parts first (the same images on the same core, kernel after kernel), then
 * the others': a helper that wakes late (a busy machine, a vCPU that shares its core) leaves its parts
 * to whoever is free, so a call never waits for one slow thread.
 * partsFor in lib/wasm_kernels.ts keeps small calls on one thread.
 *
 * Helpers start asynchronously: until one is ready the main thread claims every part, which gives
 * the same result (kernels.c: any split computes every element identically), just later. A helper
 * that fails to start is never counted; a part that fails on a helper makes the call throw.
 */
import { claimParts, CTRL, FN_NAMES, GEN_MASK, spinWhileEqual, type FnName } from "./pool_layout.ts";

const WAIT_LIMIT_MS = 60_000;

export class SimdPool {
  private ctrl: Int32Array;
  private args: Float64Array;
  private helpers = 0;

  /** `pollUs`: how long a thread polls before it sleeps (POLL_US where the pool owns the cores, else 0). */
  constructor(memory: WebAssembly.Memory, bytes: Uint8Array, helpers: number, pollUs: number) {
    const sab = new SharedArrayBuffer(CTRL.ARGS_BYTE + 8 * CTRL.MAX_ARGS * CTRL.MAX_PARTS);
    this.ctrl = new Int32Array(sab);
    this.ctrl[CTRL.SPIN_US] = pollUs;
    this.args = new Float64Array(sab, CTRL.ARGS_BYTE);
    for (let i = 0; i < Math.min(helpers, CTRL.MAX_THREADS - 1); i++) {
      try {
        const worker = new Worker(new URL("./worker.ts", import.meta.url).href);
        (worker as Worker & { unref?: () => void }).unref?.(); // helpers never keep the process alive
        worker.postMessage({ memory, bytes, ctrl: sab, index: i + 1 });
        this.helpers++;
      } catch {
        break; // fewer helpers: more parts for the others
      }
    }
  }

  /** Threads a call can be split across: this one and every helper that has started. */
  get threads(): number {
    return 1 + Math.min(this.helpers, Atomics.load(this.ctrl, CTRL.READY));
  }

  /** Sets how long a thread polls before it sleeps, from the next call on. */
  setPoll(us: number): void {
    Atomics.store(this.ctrl, CTRL.SPIN_US, us);
  }

  /** Parts the helpers have run so far, and helpers asleep now (the rest poll or work). */
  get helperStats(): { parts: number; sleeping: number } {
    return { parts: Atomics.load(this.ctrl, CTRL.HELPER_PARTS), sleeping: Atomics.load(this.ctrl, CTRL.SLEEPERS) };
  }

  /** Runs fn(...parts[i]) for every part; returns when all are done. */
  run(fn: FnName, parts: number[][], local: (...a: number[]) => void): void {
    const c = this.ctrl;
    const n = parts.length;
    const wide = parts.some((p) => p.length > CTRL.MAX_ARGS);
    if (n > CTRL.MAX_PARTS || wide || Atomics.load(c, CTRL.READY) === 0) {
      for (const p of parts) local(...p);
      return;
    }
    for (let i = 0; i < n; i++) this.args.set(parts[i]!, i * CTRL.MAX_ARGS);
    c[CTRL.FN] = FN_NAMES.indexOf(fn);
    c[CTRL.NARGS] = parts[0]!.length;
    const threads = 1 + this.helpers;
    const gen = (Atomics.load(c, CTRL.GEN) + 1) & GEN_MASK;
    Atomics.store(c, CTRL.STATUS, 0);
    Atomics.store(c, CTRL.FINISHED, 0);
    // The number first: a late claim on the last call that reads the new size also reads the new number.
    Atomics.store(c, CTRL.GEN, gen);
    Atomics.store(c, CTRL.COUNT, n);
    Atomics.store(c, CTRL.THREADS, threads);
    // Opens the call: everything above is visible to whoever claims a part.
    for (let t = 0; t < threads; t++) Atomics.store(c, CTRL.NEXT0 + t, gen << 16);
    Atomics.add(c, CTRL.SEQ, 1);
    if (Atomics.load(c, CTRL.SLEEPERS) > 0) Atomics.notify(c, CTRL.SEQ); // a helper still polling sees SEQ move
    claimParts(c, 0, (i) => {
      local(...parts[i]!);
      Atomics.add(c, CTRL.FINISHED, 1);
    });
    const t0 = performance.now();
    for (let f = Atomics.load(c, CTRL.FINISHED); f < n; f = Atomics.load(c, CTRL.FINISHED)) {
      if (spinWhileEqual(c, CTRL.FINISHED, f)) continue; // a helper's last part usually ends within the poll
      // Raised before the wait reads FINISHED: a part that ends after this is seen by the wait or notifies it.
      Atomics.store(c, CTRL.WAITING, 1);
      Atomics.wait(c, CTRL.FINISHED, f, 1000);
      Atomics.store(c, CTRL.WAITING, 0);
      if (performance.now() - t0 > WAIT_LIMIT_MS) {
        throw new Error(`wasm SIMD helper thread did not finish ${fn} in ${WAIT_LIMIT_MS / 1000} s`);
      }
    }
    if (Atomics.load(c, CTRL.STATUS) !== 0) throw new Error(`wasm SIMD kernel ${fn} failed on a helper thread`);
  }
}

/**
 * Splits [0, n) into `parts` contiguous ranges, each a multiple of `unit` except the last; empty
 * ranges dropped.
 */
export function splitRange(n: number, parts: number, unit = 1): [number, number][] {
  const units = Math.ceil(n / unit);
  const out: [number, number][] = [];
  let u0 = 0;
  for (let p = 0; p < parts; p++) {
    const u1 = Math.round(((p + 1) * units) / parts);
    const begin = Math.min(n, u0 * unit), end = Math.min(n, u1 * unit);
    if (end > begin) out.push([begin, end]);
    u0 = u1;
  }
  return out;
}

/**
 * Splits [0, n) into one contiguous share per thread, each cut into parts that shrink toward its end (a
 * third of what is left, at least one): a thread that finishes its share early waits for the other's last
 * part only, a small one, while the first parts stay large. Every share has the same number of parts
 * (claimParts deals parts to threads by position); where the parts would not fit in one call, or a share
 * would be empty, equal parts instead.
 */
export function taperedRanges(n: number, threads: number): [number, number][] {
  const least = Math.floor(n / threads);
  const sizes: number[] = [];
  for (let left = least; left > 0; left -= sizes.at(-1)!) sizes.push(Math.max(1, Math.ceil(left / 3)));
  if (least === 0 || sizes.length * threads > CTRL.MAX_PARTS) return splitRange(n, threads * 4);
  const out: [number, number][] = [];
  for (let t = 0, begin = 0; t < threads; t++) {
    const extra = Math.floor(((t + 1) * n) / threads) - Math.floor((t * n) / threads) - least; // 0 or 1
    sizes.forEach((size, i) => {
      const end = begin + size + (i === 0 ? extra : 0);
      out.push([begin, end]);
      begin = end;
    });
  }
  return out;
}
