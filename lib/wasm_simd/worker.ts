/**
 * A helper thread of lib/wasm_simd/pool.ts: instantiates the SIMD kernels on
 * tfjs-wasm's shared memory, then waits (Atomics.wait, no event loop, no
 * polling) for parts of kernel calls and runs them. See pool.ts for the
 * control block layout.
 */
import { CTRL, FN_NAMES } from "./pool_layout.ts";

declare const self: Worker;

self.onmessage = (e: MessageEvent) => {
  type Start = { memory: WebAssembly.Memory; bytes: Uint8Array<ArrayBuffer>; ctrl: SharedArrayBuffer };
  const { memory, bytes, ctrl: sab } = e.data as Start;
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
    Atomics.store(ctrl, CTRL.READY, -1);
    return;
  }
  Atomics.store(ctrl, CTRL.READY, 1);
  let seq = 0;
  for (;;) {
    Atomics.wait(ctrl, CTRL.SEQ, seq);
    seq = Atomics.load(ctrl, CTRL.SEQ);
    if (seq < 0) return;
    let status = 0;
    try {
      const n = ctrl[CTRL.NARGS]!;
      const a: number[] = [];
      for (let i = 0; i < n; i++) a.push(args[i]!);
      fns[ctrl[CTRL.FN]!]!(...a);
    } catch {
      status = 1;
    }
    ctrl[CTRL.STATUS] = status;
    Atomics.store(ctrl, CTRL.DONE, seq);
    Atomics.notify(ctrl, CTRL.DONE);
  }
};
