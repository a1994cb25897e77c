/**
 * Runs the parts of a SIMD kernel call on several threads.
 *
 * With tfjs-wasm's threaded build the heap is a SharedArrayBuffer, so helper
 * Workers can instantiate the same kernels module on the same memory. Each
 * helper has a small shared control block (pool_layout.ts) and sleeps in
 * Atomics.wait; the main thread writes a part's arguments, bumps SEQ and
 * notifies, runs part 0 itself, then waits for every helper's DONE. A
 * round trip is small next to the kernels it splits (partsFor in
 * lib/wasm_kernels.ts keeps small calls on one thread).
 *
 * Helpers start asynchronously: until one reports READY its parts run on the
 * main thread, which gives the same result (kernels.c: any split computes
 * every element identically), just later. A helper that fails to start is
 * never used; one that fails a part makes the call throw.
 */
import { CTRL, FN_NAMES, type FnName } from "./pool_layout.ts";

interface Helper {
  ctrl: Int32Array;
  args: Float64Array;
  seq: number;
  worker: Worker;
}

const WAIT_LIMIT_MS = 60_000;

export class SimdPool {
  private helpers: Helper[] = [];

  constructor(memory: WebAssembly.Memory, bytes: Uint8Array, helpers: number) {
    for (let i = 0; i < helpers; i++) {
      try {
        const sab = new SharedArrayBuffer(CTRL.ARGS_BYTE + 8 * CTRL.MAX_ARGS);
        const worker = new Worker(new URL("./worker.ts", import.meta.url).href);
        (worker as Worker & { unref?: () => void }).unref?.(); // helpers never keep the process alive
        worker.postMessage({ memory, bytes, ctrl: sab });
        this.helpers.push({ ctrl: new Int32Array(sab), args: new Float64Array(sab, CTRL.ARGS_BYTE), seq: 0, worker });
      } catch {
        break; // fewer helpers: parts run on the main thread
      }
    }
  }

  /** Threads a call is split across (main + helpers), counting helpers still starting. */
  get threads(): number {
    return 1 + this.helpers.filter((h) => Atomics.load(h.ctrl, CTRL.READY) >= 0).length;
  }

  /** Runs fn(...parts[i]) for every part, part 0 on this thread; returns when all are done. */
  run(fn: FnName, parts: number[][], local: (...a: number[]) => void): void {
    const dispatched: Helper[] = [];
    const leftovers: number[][] = [];
    for (let i = 1; i < parts.length; i++) {
      const h = this.helpers[i - 1];
      if (h == null || Atomics.load(h.ctrl, CTRL.READY) !== 1 || parts[i]!.length > CTRL.MAX_ARGS) {
        leftovers.push(parts[i]!);
        continue;
      }
      const a = parts[i]!;
      for (let k = 0; k < a.length; k++) h.args[k] = a[k]!;
      h.ctrl[CTRL.NARGS] = a.length;
      h.ctrl[CTRL.FN] = FN_NAMES.indexOf(fn);
      h.seq += 1;
      Atomics.store(h.ctrl, CTRL.SEQ, h.seq);
      Atomics.notify(h.ctrl, CTRL.SEQ);
      dispatched.push(h);
    }
    if (parts[0] != null) local(...parts[0]);
    for (const a of leftovers) local(...a);
    let failed = false;
    for (const h of dispatched) {
      const t0 = performance.now();
      while (Atomics.load(h.ctrl, CTRL.DONE) !== h.seq) {
        Atomics.wait(h.ctrl, CTRL.DONE, Atomics.load(h.ctrl, CTRL.DONE), 1000);
        if (performance.now() - t0 > WAIT_LIMIT_MS) {
          throw new Error(`wasm SIMD helper thread did not finish ${fn} in ${WAIT_LIMIT_MS / 1000} s`);
        }
      }
      if (h.ctrl[CTRL.STATUS] !== 0) failed = true;
    }
    if (failed) throw new Error(`wasm SIMD kernel ${fn} failed on a helper thread`);
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
