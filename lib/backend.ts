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
 * The cpu backend is ~60x (filter gradients: >300x) slower than wasm for conv
 * training, so falling back to it without being asked prints a loud warning.
 */
import * as tf from "@tensorflow/tfjs";
import { registerWasmGradKernels } from "./wasm_kernels.ts";

export type BackendName = "tensorflow-gpu" | "tensorflow" | "wasm" | "cpu";

/** Automatic preference order, fastest first. */
export const BACKEND_ORDER: readonly BackendName[] = ["tensorflow-gpu", "tensorflow", "wasm", "cpu"];

export interface InitBackendOptions {
  /** Same values as AR_BACKEND; wins over the environment variable. */
  prefer?: string;
  /** Where warnings go (default: stderr). */
  log?: (line: string) => void;
}

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
let wasmFacts: { simd: boolean; threads: number } | undefined;
/** Load failures are remembered so repeated calls do not re-import or re-warn. */
const failures = new Map<BackendName, string>();

function message(e: unknown): string {
  if (e instanceof Error) return e.message.split("\n")[0];
  if (typeof e === "object" && e != null && "message" in e && typeof e.message === "string") return e.message;
  return String(e);
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
      throw new Error(`${spec} loaded but registered no 'tensorflow' backend in this @tensorflow/tfjs (duplicate tfjs-core version?)`);
    }
    nodeFlavor = which;
  }
  if (!(await tf.setBackend("tensorflow"))) throw new Error("tf.setBackend('tensorflow') failed");
}

async function loadWasm(): Promise<void> {
  const wasm = await import("@tensorflow/tfjs-backend-wasm");
  // Before the first training step (and before setBackend, so the engine runs
  // the setupFunc of the kernel we replace): wasm cannot train conv nets
  // without these.
  registerWasmGradKernels();
  if (!(await tf.setBackend("wasm"))) throw new Error("tf.setBackend('wasm') failed (see the error tfjs printed above)");
  const simd = await tf.env().getAsync("WASM_HAS_SIMD_SUPPORT");
  let threads = 1;
  try {
    threads = wasm.getThreadsCount();
  } catch {
    // Only throws before init; the single-threaded build reports 1 anyway.
  }
  // tfjs disables wasm threads under Node/Bun (tfjs issue #3830), so this is
  // the single-threaded SIMD build: one core.
  wasmFacts = { simd: simd === true, threads };
}

async function load(b: BackendName): Promise<void> {
  switch (b) {
    case "tensorflow-gpu":
    case "tensorflow":
      return loadNode(b);
    case "wasm":
      return loadWasm();
    case "cpu":
      if (!(await tf.setBackend("cpu"))) throw new Error("tf.setBackend('cpu') failed");
      return;
  }
}

/** Tries one backend; returns undefined on success or the reason it failed. */
async function attempt(b: BackendName): Promise<string | undefined> {
  const known = failures.get(b);
  if (known != null) return known;
  if (active === b && tf.engine().backendName === tfName(b)) return undefined;
  try {
    await load(b);
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
 * one switches.
 */
export async function initBackend(opts: InitBackendOptions = {}): Promise<BackendName> {
  const log = opts.log ?? ((line: string) => console.error(line));
  const raw = opts.prefer ?? process.env.AR_BACKEND ?? "";
  if (raw.trim() !== "") {
    const wanted = parseBackendName(raw);
    if (wanted == null) {
      throw new Error(`unknown backend '${raw}' (AR_BACKEND / prefer): use gpu, node, wasm or cpu`);
    }
    const why = await attempt(wanted);
    if (why != null) throw new Error(`backend '${wanted}' was requested but could not be loaded: ${why}`);
    return wanted;
  }
  const skipped: string[] = [];
  for (const b of BACKEND_ORDER) {
    const why = await attempt(b);
    if (why == null) {
      if (b === "cpu") {
        log("!".repeat(78));
        log("WARNING: falling back to the tfjs CPU backend. Conv training is ~60x slower");
        log("than wasm; numbers from this run are not comparable. Why the others failed:");
        for (const s of skipped) log(`  ${s}`);
        log("Set AR_BACKEND=cpu to choose cpu on purpose and silence this warning.");
        log("!".repeat(78));
      }
      return b;
    }
    skipped.push(`${b}: ${why}`);
  }
  throw new Error(`no tfjs backend could be loaded:\n  ${skipped.join("\n  ")}`);
}

/**
 * Short description for the run footer, e.g. "wasm (threads: 1, simd: true)"
 * or "tensorflow-gpu". Reports what tfjs is actually running, even if someone
 * switched backends behind initBackend's back.
 */
export function backendLabel(): string {
  const current = tf.engine().backendName;
  if (current == null) return "uninitialized";
  if (current === "wasm") {
    const f = wasmFacts;
    return f == null ? "wasm" : `wasm (threads: ${f.threads}, simd: ${f.simd})`;
  }
  if (current === "tensorflow") return nodeFlavor ?? "tensorflow";
  return current;
}
