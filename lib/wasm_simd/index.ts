/**
 * Loads the SIMD kernels of kernels.c into the memory of a live tfjs wasm
 * backend (see kernels.c for what they do and why they are safe there).
 *
 * The module imports tfjs-wasm's own WebAssembly.Memory, so its functions
 * take tensor byte offsets (backend.getMemoryOffset) and work in place: no
 * copies, no per-element JavaScript. One instance per backend instance;
 * memory growth is transparent (same Memory object).
 */
import * as tf from "@tensorflow/tfjs";
import { KERNELS_WASM_PLAIN, KERNELS_WASM_SHARED } from "./binary.ts";
import { SimdPool } from "./pool.ts";
import { POLL_US, type FnName } from "./pool_layout.ts";

/** The module's exports (kernels.c); the trailing range arguments select one part of the work. */
export interface SimdKernels {
  sum_rows(x: number, out: number, rows: number, cols: number, cBegin: number, cEnd: number, mean: number): void;
  maxpool_grad(
    x: number, dy: number, dx: number, b: number, h: number, w: number, c: number, oh: number, ow: number,
    fh: number, fw: number, sh: number, sw: number, padTop: number, padLeft: number, bBegin: number, bEnd: number,
  ): void;
  batchnorm(
    x: number, out: number, rows: number, c: number, mean: number, meanN: number, variance: number, varN: number,
    scale: number, scaleN: number, offset: number, offsetN: number, eps: number, scratch: number,
    rBegin: number, rEnd: number,
  ): void;
  bn_grad_sums(
    x: number, dy: number, mean: number, out: number, rows: number, c: number, cBegin: number, cEnd: number,
  ): void;
  bn_backward_coef(
    variance: number, gamma: number, sums: number, coef: number, dgamma: number, dbeta: number, c: number,
    eps: number, n: number,
  ): void;
  bn_relu_pool(
    x: number, mean: number, variance: number, scale: number, offset: number, eps: number, exact: number,
    scratch: number, y: number, win: number, h: number, w: number, c: number, oh: number, ow: number, bBegin: number,
    bEnd: number,
  ): void;
  bn_relu_pool_sums(x: number, dy: number, win: number, mean: number, out: number, c: number, rBegin: number,
    rEnd: number): void;
  bn_relu_pool_backward(
    x: number, dy: number, win: number, mean: number, coef: number, dx: number, h: number, w: number, c: number,
    oh: number, ow: number, bBegin: number, bEnd: number,
  ): void;
  channel_sums(x: number, mean: number, out: number, c: number, rBegin: number, rEnd: number): void;
  sum_parts(parts: number, out: number, p: number, c: number, n: number): void;
  relu_grad_f32(dy: number, x: number, out: number, begin: number, end: number): void;
  bn_backward(
    x: number, dy: number, mean: number, coef: number, dx: number, c: number, rBegin: number, rEnd: number,
  ): void;
  broadcast_rows(v: number, out: number, rBegin: number, rEnd: number, c: number, group: number): void;
  zero_fill(out: number, n: number): void;
  conv2d_filter_grad(
    x: number, dy: number, dw: number, h: number, w: number, ci: number, oh: number, ow: number, co: number,
    kh: number, kw: number, sh: number, sw: number, padTop: number, padLeft: number, bBegin: number, bEnd: number,
  ): void;
  conv2d_input_grad(
    dy: number, filterT: number, dx: number, b: number, h: number, w: number, ci: number, oh: number, ow: number,
    co: number, kh: number, kw: number, padTop: number, padLeft: number, bBegin: number, bEnd: number,
  ): void;
  binary_f32(op: number, a: number, b: number, out: number, mode: number, c: number, begin: number, end: number): void;
  relu_f32(x: number, out: number, begin: number, end: number): void;
  sqrt_f32(x: number, out: number, begin: number, end: number): void;
  clip_f32(x: number, out: number, lo: number, hi: number, begin: number, end: number): void;
  conv2d_forward(
    x: number, f: number, bias: number, y: number, h: number, w: number, ci: number, oh: number, ow: number,
    co: number, kh: number, kw: number, padTop: number, padLeft: number, bBegin: number, bEnd: number,
  ): void;
  adam_f32(
    x: number, m: number, v: number, g: number, xOut: number, mOut: number, vOut: number, c1: number, c2: number,
    beta1: number, oneMinusBeta1: number, beta2: number, oneMinusBeta2: number, epsilon: number, negLr: number,
    begin: number, end: number,
  ): void;
  depthwise_filter_grad(
    x: number, dy: number, dw: number, h: number, w: number, c: number, oh: number, ow: number,
    kh: number, kw: number, sh: number, sw: number, padTop: number, padLeft: number, bBegin: number, bEnd: number,
  ): void;
}

/** The kernels bound to one backend, and how many threads a call may be split across. */
export interface Simd {
  k: SimdKernels;
  /** Number of parts to split a call into (1 = no split). */
  threads: number;
  /** Set by setSimdSplit(): split every call, however small. */
  forced?: boolean;
  /** Whether tfjs' own operators run single-threaded, this pool having all the threads (wasmPool "simd"). */
  ownsThreads: boolean;
  /** Runs k[fn](...parts[i]) for every part, in parallel where helper threads are up. */
  run(fn: FnName, parts: number[][]): void;
}

/** The part of tfjs-wasm's backend object these kernels use. */
export interface WasmBackendLike extends tf.KernelBackend {
  getMemoryOffset(dataId: object): number;
  makeOutput(shape: number[], dtype: tf.DataType): tf.TensorInfo;
  incRef(dataId: object): void;
  disposeData(dataId: object, force?: boolean): boolean;
  wasm: {
    _malloc(n: number): number; _free(p: number): void; HEAPU8: Uint8Array; tfjs?: { getThreadsCount?: () => number };
  };
}

export function isWasmBackend(b: unknown): b is WasmBackendLike {
  if (!(b instanceof tf.KernelBackend)) return false;
  const r = b as unknown as Record<string, unknown>;
  const methods = typeof r.getMemoryOffset === "function" && typeof r.makeOutput === "function";
  return methods && typeof r.wasm === "object" && r.wasm != null;
}

const cache = new WeakMap<object, Simd | null>();

/** The Memory tfjs-wasm runs in: exported by the plain build, created in JS by the threaded one. */
function memoryOf(module: object): WebAssembly.Memory | undefined {
  const m = module as { asm?: { memory?: unknown }; wasmMemory?: unknown };
  if (m.asm?.memory instanceof WebAssembly.Memory) return m.asm.memory;
  if (m.wasmMemory instanceof WebAssembly.Memory) return m.wasmMemory;
  return undefined;
}

let poolThreads: number | undefined;

/**
 * Threads for our pool when tfjs runs its own operators single-threaded (lib/backend.ts, wasmPool
 * "simd"); undefined: as many as tfjs' pthreadpool has. Read when the kernels bind to a backend.
 */
export function setSimdPoolThreads(n: number | undefined): void {
  poolThreads = n;
}

const pools: SimdPool[] = [];

/** Sets how long our pools' threads poll before they sleep (bench/train_step.ts --poll-ab); undefined: POLL_US. */
export function setSimdPoolPoll(us: number | undefined): void {
  for (const p of pools) p.setPoll(us ?? POLL_US);
}

let disabledReason: string | undefined = process.env.AR_WASM_SIMD === "0" ? "AR_WASM_SIMD=0" : undefined;
let forcedSplit: number | undefined;

/** Turns the SIMD kernels off (or back on) for this process: kernels then delegate to tfjs' own. */
export function setSimdKernelsEnabled(on: boolean): void {
  disabledReason = on ? undefined : "disabled by setSimdKernelsEnabled(false)";
}

/**
 * Splits every kernel call into n parts (undefined: one per thread), for
 * tests: parts without a helper thread run one after the other on this
 * thread, and must give the same bits as one part.
 */
export function setSimdSplit(n: number | undefined): void {
  forcedSplit = n;
}

/** The kernels for this backend, or null when they cannot run here (then callers use tfjs' own kernels). */
export function simdKernels(backend: WasmBackendLike): Simd | null {
  if (disabledReason != null) return null;
  const hit = cache.get(backend.wasm);
  if (hit !== undefined) return withSplit(hit);
  let simd: Simd | null = null;
  try {
    const memory = memoryOf(backend.wasm);
    if (memory != null) {
      const shared = typeof SharedArrayBuffer !== "undefined" && memory.buffer instanceof SharedArrayBuffer;
      const bytes = new Uint8Array(Buffer.from(shared ? KERNELS_WASM_SHARED : KERNELS_WASM_PLAIN, "base64"));
      const instance = new WebAssembly.Instance(new WebAssembly.Module(bytes), { env: { memory } });
      const k = instance.exports as unknown as SimdKernels;
      // Helper threads only where the heap is shared (tfjs' threaded build), one per extra thread.
      const threads = shared ? Math.max(1, poolThreads ?? backend.wasm.tfjs?.getThreadsCount?.() ?? 1) : 1;
      const pool = threads > 1 ? new SimdPool(memory, bytes, threads - 1, poolThreads != null ? POLL_US : 0) : null;
      if (pool != null && poolThreads != null) pools.push(pool);
      const fns = k as unknown as Record<FnName, (...a: number[]) => void>;
      simd = {
        k,
        threads,
        ownsThreads: poolThreads != null,
        run(fn, parts) {
          const local = fns[fn];
          if (pool == null || parts.length === 1) for (const p of parts) local(...p);
          else pool.run(fn, parts, local);
        },
      };
    }
  } catch {
    simd = null; // e.g. a runtime without wasm SIMD: tfjs' own kernels still work
  }
  cache.set(backend.wasm, simd);
  return withSplit(simd);
}

function withSplit(s: Simd | null): Simd | null {
  return s == null || forcedSplit == null ? s : { ...s, threads: forcedSplit, forced: true };
}
