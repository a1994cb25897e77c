/**
 * A helper thread of lib/wasm_simd/pool.ts: instantiates the SIMD kernels on tfjs-wasm's shared
 * memory, then waits until a call starts and claims its parts one at a time until none is left. It
 * polls for a while after each call (POLL_US in pool_layout.ts: the next one usually opens within it),
 * then sleeps (Atomics.wait, no event loop), so an idle pool does not hold a core. See pool_layout.ts for
 * the control block.
 */
import { claimParts, CTRL, FN_NAMES, spinWhileEqual } from "./pool_layout.ts";

declare const self: Worker;

self.onmessage = (e: MessageEvent) => {
  type Start = { memory: WebAssembly.Memory; bytes: Uint8Array<ArrayBuffer>; ctrl: SharedArrayBuffer; index: number };
  const { memory, bytes, ctrl: sab, index } = e.data as Start;
  const ctrl = new Int32Array(sab);
  const args = new Float64Array(sab, CTRL.ARGS_BYTE);
  let fns: ((...a: number[]) => void)[];
  try {
    const instance = new WebAssembly.Instance(new WebAssembly.Module(bytes), { env: { memory } });
    const ex = instance.exports as Record<string, unknown>;
    fns = FN_NAMES.map((n) => {
      const f = ex[n];
      if (typeof f !== "function") throw new Error(`kernel ${n} missing`);
      return f as (...a: number[]) => void;
    });
  } catch {
    return; // never counted as ready: the main thread runs every part itself
  }
  Atomics.add(ctrl, CTRL.READY, 1);
  let seq = Atomics.load(ctrl, CTRL.SEQ);
  for (;;) {
    if (!spinWhileEqual(ctrl, CTRL.SEQ, seq)) {
      // Counted before the wait reads SEQ: a call that opens after this is seen by the wait or notifies it.
      Atomics.add(ctrl, CTRL.SLEEPERS, 1);
      Atomics.wait(ctrl, CTRL.SEQ, seq);
      Atomics.sub(ctrl, CTRL.SLEEPERS, 1);
    }
    seq = Atomics.load(ctrl, CTRL.SEQ);
    claimParts(ctrl, index, (i) => {
      try {
        const n = ctrl[CTRL.NARGS]!;
        const a: number[] = [];
        for (let k = 0; k < n; k++) a.push(args[i * CTRL.MAX_ARGS + k]!);
        fns[ctrl[CTRL.FN]!]!(...a);
      } catch {
        Atomics.store(ctrl, CTRL.STATUS, 1);
      }
      Atomics.add(ctrl, CTRL.HELPER_PARTS, 1);
      Atomics.add(ctrl, CTRL.FINISHED, 1);
      if (Atomics.load(ctrl, CTRL.WAITING) !== 0) Atomics.notify(ctrl, CTRL.FINISHED);
    });
  }
};
