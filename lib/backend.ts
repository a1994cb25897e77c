/**
 * The one place that picks the tfjs compute backend.
 *
 * Order: tfjs-node-gpu -> tfjs-node -> wasm -> cpu. Everyone imports
 * "@tensorflow/tfjs"; the node packages are imported dynamically so that a
 * machine without their native libtensorflow still runs (they register a
 * "tensorflow" backend into the same tfjs-core instance when imported).
 *
 * Override with AR_BACKEND (or opts.prefer): gpu | node | wasm | cpu, or the
 * BackendName spellings. An explicit choice is strict: if that backend cannot
 * load, initBackend throws instead of silently running something else, so a
 * benchmark labelled "cpu" or "gpu" is what it says.
 *
 * The cpu backend is far slower than wasm for conv training (bench/README.md
 * has both), so falling back to it without being asked prints a loud warning.
 *
 * tfjs-node-gpu can load and still compute on the CPU: its libtensorflow 2.9
 * needs CUDA 11.2 and cuDNN 8.1, and where they are missing (a CUDA 12
 * machine) TensorFlow lists no GPU device. The label says which device is used
 * (nodeBackendLabel), and AR_BACKEND=gpu refuses to run on the CPU.
 */
import * as tf from "@tensorflow/tfjs";
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import os from "node:os";
import { dirname, join } from "node:path";
import { writeAtomic } from "./atomic.ts";
import { registerWasmGradKernels } from "./wasm_kernels.ts";
import { setSimdPoolThreads } from "./wasm_simd/index.ts";

export type BackendName = "tensorflow-gpu" | "tensorflow" | "wasm" | "cpu";

/** Automatic preference order, fastest first. */
const BACKEND_ORDER: readonly BackendName[] = ["tensorflow-gpu", "tensorflow", "wasm", "cpu"];

export interface InitBackendOptions {
  /** Same values as AR_BACKEND; wins over the environment variable. */
  prefer?: string;
  /** Where warnings go (default: stderr). */
  log?: (line: string) => void;
  /**
   * Whom the wasm backend's extra threads serve (AR_WASM_POOL wins). "xnnpack" (default): tfjs' own
   * pthreadpool runs XNNPACK's operators, the frozen backbones' convolutions, and our SIMD kernels get
   * helpers of their own. "simd": tfjs' threaded build runs its operators on the calling thread and every
   * extra thread is our SIMD pool's, for training from scratch, whose heavy kernels are ours: one pool, so
   * two pools' threads never compete for the same cores (on a busy machine XNNPACK's pool waits, ours
   * hands a late thread's parts to whoever is free).
   */
  wasmPool?: WasmPool;
}

export type WasmPool = "xnnpack" | "simd";

const ALIASES: Record<string, BackendName> = {
  gpu: "tensorflow-gpu",
  "tensorflow-gpu": "tensorflow-gpu",
  "tfjs-node-gpu": "tensorflow-gpu",
  "node-gpu": "tensorflow-gpu",
  node: "tensorflow",
  tensorflow: "tensorflow",
  "tfjs-node": "tensorflow",
  wasm: "wasm",
  cpu: "cpu",
};

/** Maps gpu|node|wasm|cpu (and the BackendName spellings) to a BackendName. */
export function parseBackendName(s: string): BackendName | undefined {
  return ALIASES[s.trim().toLowerCase()];
}

/** The tfjs registry name each of ours runs under. */
function tfName(b: BackendName): string {
  return b === "tensorflow-gpu" || b === "tensorflow" ? "tensorflow" : b;
}

let active: BackendName | undefined;
/** Which node package registered the "tensorflow" backend (they share the name). */
let nodeFlavor: "tensorflow-gpu" | "tensorflow" | undefined;
/** threads: tfjs' own; pool: the threads of our SIMD pool when it has them all (wasmPool "simd"). */
let wasmFacts: { simd: boolean; threads: number; pool?: number } | undefined;
/** Load failures are remembered so repeated calls do not re-import or re-warn. */
const failures = new Map<BackendName, string>();

function message(e: unknown): string {
  if (e instanceof Error) return e.message.split("\n")[0];
  if (typeof e === "object" && e != null && "message" in e && typeof e.message === "string") return e.message;
  return String(e);
}

// ---------------------------------------------------------------------------
// Which device the native backend computes on.
//
// tfjs-node's binding lists TensorFlow's devices once, when it loads, and
// places every op on a GPU if one is listed, else on the CPU; its backend
// object (NodeJSKernelBackend) reports the outcome as `isUsingGpuDevice`.

/** What the libtensorflow that tfjs-node-gpu 4.22 installs needs to see a GPU. */
export const GPU_NEEDS = "libtensorflow 2.9 needs CUDA 11.2 + cuDNN 8.1";

/** The device a native backend object computes on, as it reports it; "unknown" when it reports nothing. */
export function nodeDevice(backend: unknown): "GPU" | "CPU" | "unknown" {
  const flag = typeof backend === "object" && backend != null && "isUsingGpuDevice" in backend
    ? backend.isUsingGpuDevice : undefined;
  return flag === true ? "GPU" : flag === false ? "CPU" : "unknown";
}

/** The footer's name for a native backend: for tfjs-node-gpu, whether a GPU does the work. */
export function nodeBackendLabel(flavor: "tensorflow-gpu" | "tensorflow", backend: unknown): string {
  if (flavor === "tensorflow") return "tensorflow";
  switch (nodeDevice(backend)) {
    case "GPU":
      return "tensorflow-gpu (GPU)";
    case "CPU":
      return `tensorflow-gpu (NO GPU: running on CPU; ${GPU_NEEDS})`;
    case "unknown":
      return "tensorflow-gpu (GPU use not reported by this tfjs-node-gpu)";
  }
}

/** Why the loaded tensorflow-gpu backend is not using a GPU, or undefined when it is (or cannot tell). */
function gpuMissing(): string | undefined {
  if (nodeFlavor !== "tensorflow-gpu" || nodeDevice(tf.findBackend("tensorflow")) !== "CPU") return undefined;
  return `TensorFlow (tfjs-node-gpu) found no GPU device and runs on the CPU (${GPU_NEEDS})`;
}

async function loadNode(which: "tensorflow-gpu" | "tensorflow"): Promise<void> {
  // Both packages register the same backend name, so once one is in, the
  // other cannot be loaded in this process.
  if (nodeFlavor != null && nodeFlavor !== which) {
    throw new Error(`the ${nodeFlavor} flavour of the 'tensorflow' backend is already loaded in this process`);
  }
  if (tf.findBackendFactory("tensorflow") == null) {
    // A variable specifier keeps TypeScript and the bundler from requiring
    // these optional packages to be installed.
    const spec: string = which === "tensorflow-gpu" ? "@tensorflow/tfjs-node-gpu" : "@tensorflow/tfjs-node";
    await import(spec);
    if (tf.findBackendFactory("tensorflow") == null) {
      throw new Error(`${spec} loaded but registered no 'tensorflow' backend in this @tensorflow/tfjs ` +
        "(duplicate tfjs-core version?)");
    }
    nodeFlavor = which;
  }
  if (!(await tf.setBackend("tensorflow"))) throw new Error("tf.setBackend('tensorflow') failed");
}

// ---------------------------------------------------------------------------
// wasm threads under Bun.
//
// tfjs-backend-wasm ships a threaded SIMD build (XNNPACK on a pthreadpool of
// Web Workers) but never uses it under Node/Bun (tensorflow/tfjs#3830): its
// WASM_HAS_MULTITHREAD_SUPPORT flag is hard-wired false there, and even when
// forced on, the Emscripten glue starts each pthread worker from a `blob:`
// URL, which worker_threads' Worker rejects ("must be an absolute path"),
// and then tells the worker to importScripts() the main script from another
// Blob, which the Node flavour of that worker reads with fs.readFileSync.
// Three run-time adjustments make it work, none of them inside node_modules:
//  1. the flag is set to true (a documented tfjs flag);
//  2. during init only, the global `Worker` that the glue assigns and then
//     constructs is an accessor returning a subclass of worker_threads'
//     Worker that swaps the blob: URL for a file holding the same worker
//     source (tfjs ships it as wasmWorkerContents) and the Blob main script
//     for the identical file tfjs ships (wasm-out/...-threaded-simd.js);
//  3. during init only, os.cpus() reports twice the wanted thread count:
//     tfjs-wasm sizes its pool as min(requested, logical cores / 2) because
//     "many x86-64 processors have 2 threads per core", which would cap a
//     2-core machine at 1 thread.
// If any of this fails, initBackend falls back to the single-threaded build.

const requireHere = createRequire(import.meta.url);
/** How long the threaded build may take to start before we fall back (it normally needs a fraction of a second). */
const THREAD_INIT_TIMEOUT_S = 30;

/** AR_WASM_POOL if set (xnnpack or simd), else the caller's choice, else "xnnpack". */
function wasmPoolWanted(option: WasmPool | undefined): WasmPool {
  const raw = process.env.AR_WASM_POOL?.trim();
  if (raw == null || raw === "") return option ?? "xnnpack";
  if (raw !== "xnnpack" && raw !== "simd") throw new Error(`AR_WASM_POOL must be xnnpack or simd, got '${raw}'`);
  return raw;
}

/** Threads wanted: AR_WASM_THREADS (1 = single-threaded build), else every core, at most 8 (tfjs' pool). */
function wantedWasmThreads(): number {
  const raw = process.env.AR_WASM_THREADS?.trim();
  if (raw != null && raw !== "") {
    const n = Number(raw);
    if (!Number.isInteger(n) || n < 1) throw new Error(`AR_WASM_THREADS must be a positive integer, got '${raw}'`);
    return Math.min(n, 8);
  }
  const cores = typeof os.availableParallelism === "function" ? os.availableParallelism() : os.cpus().length;
  return Math.max(1, Math.min(cores, 8));
}

interface WorkerPatch {
  /** Undoes the global adjustments (call once init has settled). */
  restore(): void;
  /** From now on worker errors go to the Emscripten glue again (they are fatal there). */
  initDone(): void;
}

/**
 * `onInitError` receives an error raised by a pthread worker while the
 * backend initializes (the glue would rethrow it and kill the process):
 * initBackend then falls back to the single-threaded build.
 */
function patchForWasmThreads(threads: number, onInitError: (e: unknown) => void): WorkerPatch {
  let initializing = true;
  const pkgDir = dirname(requireHere.resolve("@tensorflow/tfjs-backend-wasm/package.json"));
  const mainScript = join(pkgDir, "wasm-out", "tfjs-backend-wasm-threaded-simd.js");
  const workerModule: unknown = requireHere(join(pkgDir, "wasm-out", "tfjs-backend-wasm-threaded-simd.worker.js"));
  const contents = (workerModule as { wasmWorkerContents?: unknown }).wasmWorkerContents;
  if (typeof contents !== "string" || !existsSync(mainScript)) {
    throw new Error("tfjs-backend-wasm's threaded worker sources not found");
  }
  // Same escaping tfjs applies before making its Blob (literal newlines
  // inside the source's string literals).
  const source = contents.replace(/\n/g, "\\n");
  const hash = createHash("sha256").update(source).digest("hex").slice(0, 16);
  const workerFile = join(os.tmpdir(), `tfjs-wasm-pthread-${hash}.cjs`);
  // Atomic: a process starting its workers at the same moment never reads a half-written file.
  if (!existsSync(workerFile)) writeAtomic(workerFile, source);
  const wt = requireHere("node:worker_threads") as typeof import("node:worker_threads");
  const Base = wt.Worker;
  class PthreadWorker extends Base {
    private glueOnError?: (e: unknown) => void;
    // The glue sets `worker.onerror` to a handler that rethrows; during init a
    // failing worker means "no threads here", not a crash.
    get onerror(): (e: unknown) => void {
      return (e) => (initializing ? onInitError(e) : this.glueOnError?.(e));
    }
    set onerror(fn: (e: unknown) => void) {
      this.glueOnError = fn;
    }
    constructor(file: string | URL, options?: import("node:worker_threads").WorkerOptions) {
      super(typeof file === "string" && file.startsWith("blob:") ? workerFile : file, options);
      this.unref();
    }
    // The glue ref()s a worker while it runs a pthread, and pthreadpool's
    // threads run for the life of the process, so the process would never
    // exit on its own. Workers only compute while the main thread waits on
    // them, so they never need to keep the process alive.
    override ref(): void {}
    override postMessage(message: unknown, transfer?: readonly import("node:worker_threads").Transferable[]): void {
      const m = message;
      const loadsBlob = typeof m === "object" && m != null && "cmd" in m && m.cmd === "load" && "urlOrBlob" in m;
      if (loadsBlob && m.urlOrBlob instanceof Blob) {
        message = { ...m, urlOrBlob: mainScript };
      }
      super.postMessage(message, transfer);
    }
  }
  const g = globalThis as Record<string, unknown>;
  const workerDesc = Object.getOwnPropertyDescriptor(globalThis, "Worker");
  Object.defineProperty(globalThis, "Worker", { configurable: true, get: () => PthreadWorker, set: () => {} });
  const realCpus = os.cpus;
  const cpus = realCpus.call(os);
  const fake = Array.from({ length: Math.max(cpus.length, 2 * threads) }, (_, i) => cpus[i % cpus.length]!);
  os.cpus = () => fake;
  return {
    initDone() {
      initializing = false;
    },
    restore() {
      os.cpus = realCpus;
      if (workerDesc != null) Object.defineProperty(globalThis, "Worker", workerDesc);
      else delete g.Worker;
    },
  };
}

async function loadWasm(pool: WasmPool): Promise<void> {
  const wasm = await import("@tensorflow/tfjs-backend-wasm");
  // Before the first training step (and before setBackend, so the engine runs
  // the setupFunc of the kernels we replace): wasm cannot train conv nets
  // without these.
  registerWasmGradKernels();
  const threads = wantedWasmThreads();
  let threadNote: string | undefined;
  let ready = false;
  if (threads > 1 && typeof SharedArrayBuffer !== "undefined") {
    // wasm multithreading under Bun (see above); the single-threaded build if it fails
    let patch: WorkerPatch | undefined;
    let timer: ReturnType<typeof setTimeout> | undefined;
    try {
      let fail: (e: unknown) => void = () => {};
      const failed = new Promise<never>((_, reject) => { fail = reject; });
      patch = patchForWasmThreads(threads, (e) => fail(e));
      const silent = new Error(`no answer from the pthread workers in ${THREAD_INIT_TIMEOUT_S} s`);
      timer = setTimeout(() => fail(silent), THREAD_INIT_TIMEOUT_S * 1000);
      tf.env().set("WASM_HAS_MULTITHREAD_SUPPORT", true);
      wasm.setThreadsCount(pool === "simd" ? 1 : threads);
      setSimdPoolThreads(pool === "simd" ? threads : undefined);
      // A later setBackend supersedes a hung one: tfjs ignores the outdated init.
      const ok = await Promise.race([tf.setBackend("wasm"), failed]);
      if (!ok) throw new Error("threaded build failed to initialize");
      patch.initDone();
      ready = true;
    } catch (e) {
      threadNote = `wasm threads unavailable (${message(e)}); running single-threaded`;
      tf.env().set("WASM_HAS_MULTITHREAD_SUPPORT", false);
      wasm.setThreadsCount(-1);
    } finally {
      if (timer != null) clearTimeout(timer);
      patch?.restore();
    }
  }
  if (!ready && !(await tf.setBackend("wasm"))) {
    throw new Error("tf.setBackend('wasm') failed (see the error tfjs printed above)");
  }
  const simd = await tf.env().getAsync("WASM_HAS_SIMD_SUPPORT");
  let actual = 1;
  try {
    actual = wasm.getThreadsCount();
  } catch {
    // Only throws before init; the single-threaded build reports 1 anyway.
  }
  wasmFacts = { simd: simd === true, threads: actual, pool: ready && pool === "simd" ? threads : undefined };
  if (threadNote != null) console.error(threadNote);
}

async function load(b: BackendName, pool: WasmPool): Promise<void> {
  switch (b) {
    case "tensorflow-gpu":
    case "tensorflow":
      return loadNode(b);
    case "wasm":
      return loadWasm(pool);
    case "cpu":
      if (!(await tf.setBackend("cpu"))) throw new Error("tf.setBackend('cpu') failed");
      return;
  }
}

/** Tries one backend; returns undefined on success or the reason it failed. */
async function attempt(b: BackendName, pool: WasmPool): Promise<string | undefined> {
  const known = failures.get(b);
  if (known != null) return known;
  if (active === b && tf.engine().backendName === tfName(b)) return undefined;
  try {
    await load(b, pool);
    active = b;
    return undefined;
  } catch (e) {
    const why = message(e);
    failures.set(b, why);
    return why;
  }
}

/**
 * Selects and initializes the backend; returns which one. Idempotent: a
 * second call with the same preference is a no-op, a call with a different
 * one switches. The wasm pool (wasmPool) is fixed when wasm first loads.
 */
export async function initBackend(opts: InitBackendOptions = {}): Promise<BackendName> {
  const log = opts.log ?? ((line: string) => console.error(line));
  const pool = wasmPoolWanted(opts.wasmPool);
  const raw = opts.prefer ?? process.env.AR_BACKEND ?? "";
  if (raw.trim() !== "") {
    const wanted = parseBackendName(raw);
    if (wanted == null) {
      throw new Error(`unknown backend '${raw}' (AR_BACKEND / prefer): use gpu, node, wasm or cpu`);
    }
    const why = await attempt(wanted, pool);
    if (why != null) throw new Error(`backend '${wanted}' was requested but could not be loaded: ${why}`);
    // Asked for the GPU: running on the CPU instead would make every number mislabelled.
    const cpuOnly = wanted === "tensorflow-gpu" ? gpuMissing() : undefined;
    if (cpuOnly != null) {
      const anyway = "without AR_BACKEND it runs there anyway, labelled NO GPU";
      throw new Error(`backend 'tensorflow-gpu' was requested, but ${cpuOnly}; ${anyway}`);
    }
    return wanted;
  }
  const skipped: string[] = [];
  for (const b of BACKEND_ORDER) {
    const why = await attempt(b, pool);
    if (why == null) {
      if (b === "cpu") {
        log("!".repeat(78));
        log("WARNING: falling back to the tfjs CPU backend. Conv training is ~60x slower");
        log("than wasm; numbers from this run are not comparable. Why the others failed:");
        for (const s of skipped) log(`  ${s}`);
        log("Set AR_BACKEND=cpu to choose cpu on purpose and silence this warning.");
        log("!".repeat(78));
      }
      const cpuOnly = b === "tensorflow-gpu" ? gpuMissing() : undefined;
      if (cpuOnly != null) log(`WARNING: ${cpuOnly}; the footer's backend line says so`);
      return b;
    }
    skipped.push(`${b}: ${why}`);
  }
  throw new Error(`no tfjs backend could be loaded:\n  ${skipped.join("\n  ")}`);
}

/**
 * Short description for the run footer, e.g. "wasm (threads: 1, simd: true)"
 * or "tensorflow-gpu (GPU)". Reports what tfjs is actually running, even if
 * someone switched backends behind initBackend's back.
 */
export function backendLabel(): string {
  const current = tf.engine().backendName;
  if (current == null) return "uninitialized";
  if (current === "wasm") {
    const f = wasmFacts;
    if (f?.pool != null) return `wasm (threads: ${f.pool} in the SIMD pool, simd: ${f.simd})`;
    return f == null ? "wasm" : `wasm (threads: ${f.threads}, simd: ${f.simd})`;
  }
  if (current === "tensorflow") {
    return nodeFlavor == null ? "tensorflow" : nodeBackendLabel(nodeFlavor, tf.findBackend("tensorflow"));
  }
  return current;
}
