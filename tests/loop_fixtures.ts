/**
 * What the end-to-end tests of loop.ts share: a temp git repository with the project's fixed files
 * and a stub train.ts, `bun loop.ts` run in it with a 1-second budget on a synthetic cache, and
 * readers of what the loop left (results.tsv, the journal, git).
 *
 * STUB is a constant model (it always predicts HP.cls and a yield of HP.yieldValue), so its
 * metrics follow from HP exactly and keep/discard outcomes are deterministic; HP.mode makes it
 * throw, print NaN, hang, skip the footer or the checkpoint, print a false footer, change
 * prepare.ts, or write over the kept model. On the synthetic val split (10 ewaste, 5 recyclable,
 * 8 organic) cls 0 scores accuracy 10/23, cls 2 8/23, cls 1 5/23.
 */
import { expect } from "bun:test";
import { cpSync, existsSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { prepareData, type Task } from "../prepare.ts";
import { readState, type State } from "../lib/journal.ts";
import { parseResults, type ResultRow } from "../lib/results.ts";
import { ROOT, tempDir } from "./helpers.ts";

const BUN = process.execPath;
/**
 * The limit for a test (or hook) that runs loop.ts in child processes (train, evaluate, git):
 * declared so a plain `bun test` needs no --timeout, and generous for a busy machine.
 */
export const E2E_MS = 180_000;
/**
 * The backend of every loop a test runs and of its children: wasm on one thread, so that no
 * `bun prepare.ts evaluate` starts a thread pool first; the stubs' metrics do not depend on it.
 */
export const WASM_ENV = { AR_BACKEND: "wasm", AR_WASM_THREADS: "1" };
/** Temp folders to remove after the file's tests (removeTemps). */
export const made: string[] = [];
/** The prepared cache loop runs read (AR_CACHE) unless a run names another. */
export const fixture = { cache: "" };

/** A synthetic cache for `task` in a temp folder (removed by removeTemps). */
export async function syntheticCache(task: Task): Promise<string> {
  const dir = tempDir("arv-loop-cache-");
  made.push(dir);
  await prepareData({ task, source: "synthetic", cacheRoot: dir, log: () => {} });
  return dir;
}

/** The synthetic waste cache every loop of a test file measures on (call in beforeAll). */
export async function prepareCache(): Promise<string> {
  fixture.cache = await syntheticCache("waste");
  return fixture.cache;
}

export function removeTemps(): void {
  for (const d of made.splice(0)) rmSync(d, { recursive: true, force: true });
}

export interface StubHp {
  cls?: number;
  yieldValue?: number;
  mode?: string;
  /** More HP keys, e.g. { backbone: "nsfwjs-mobilenetv2", backboneSize: 32 } (the stub ignores them). */
  extra?: Record<string, string | number>;
}

/** A train.ts whose metrics are a function of HP (see the file comment). */
export function stub(hp: StubHp = {}, space = `{ cls: [1], yieldValue: [0.5], mode: ["ok"], seed: [0] }`): string {
  return `/** Test stub of train.ts: a constant model whose metrics follow from HP exactly. */
import { appendFileSync, existsSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import type { SymbolicTensor, Tensor } from "@tensorflow/tfjs";
import type { Predictor } from "./prepare.ts";

export const HP = {
  cls: ${hp.cls ?? 1}, // the class the model always predicts
  yieldValue: ${hp.yieldValue ?? 0.5}, // its constant yield estimate
  // ok | throw | nan | hang | nofooter | nockpt | tamper | linger | features | scribble | fakefooter
  mode: "${hp.mode ?? "ok"}",
  seed: 0,
${Object.entries(hp.extra ?? {}).map(([k, v]) => `  ${k}: ${JSON.stringify(v)},\n`).join("")}};
// a line that a simplification may delete

export const HP_SPACE = ${space};

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  if (args.includes("--print-hp")) { console.log(JSON.stringify({ HP, HP_SPACE })); return; }
  const at = args.indexOf("--checkpoint");
  const ckpt = at >= 0 ? args[at + 1]! : "checkpoints/latest";
  console.log("stub train.ts: " + JSON.stringify(HP));
  if (HP.mode === "throw") throw new Error("boom in train.ts");
  if (HP.mode === "nan") { console.log("FAIL: loss is NaN at step 3"); process.exit(1); }
  if (HP.mode === "hang") {
    const child = Bun.spawn(["sleep", "300"], { stdout: "ignore", stderr: "ignore", stdin: "ignore" });
    console.log("hanging: pids " + process.pid + " " + child.pid);
    setInterval(() => {}, 1000);
    return;
  }
  if (HP.mode === "features") {
    // A cold backbone: progress lines every 0.5 s for STUB_FEATURE_LINES lines, as lib/backbones.ts prints them.
    const n = Number(process.env.STUB_FEATURE_LINES ?? 12);
    for (let i = 1; i <= n; i++) {
      console.log("features stub@8: " + i + "/" + n + " images, 2.0 img/s");
      await Bun.sleep(500);
    }
    console.log("features stub@8: " + n + " images in " + (n / 2).toFixed(1) + " s, cached in /nowhere");
    console.log("backend: stub  budget: 1s");
  }
  // Loaded only now: --print-hp (asked before every run) and the faults above need none of them, and a
  // hang or a feature stall starts at once, so their deadlines need no time for bun to load tfjs.
  const tf = await import("@tensorflow/tfjs");
  const { evaluate, loadCache, printFooter } = await import("./prepare.ts");
  const { saveCheckpoint } = await import("./lib/checkpoint.ts");
  let y = HP.yieldValue;
  const counter = process.env.STUB_COUNTER; // noise test: run i adds STUB_OFFSETS[i] to the yield
  if (counter) {
    const i = existsSync(counter) ? readFileSync(counter, "utf8").length : 0;
    appendFileSync(counter, "x");
    y += Number((process.env.STUB_OFFSETS ?? "").split(",")[i] ?? 0) || 0;
  }
  const ds = await loadCache();
  const input = tf.input({ shape: [ds.imageSize, ds.imageSize, 3] });
  const pooled = tf.layers.globalAveragePooling2d({}).apply(input) as SymbolicTensor;
  const cls = tf.layers.dense({ units: ds.numClasses, activation: "softmax" });
  const yld = tf.layers.dense({ units: 1 });
  const outputs = [cls.apply(pooled) as SymbolicTensor, yld.apply(pooled) as SymbolicTensor];
  const model = tf.model({ inputs: input, outputs });
  const bias = Array.from({ length: ds.numClasses }, (_, c) => (c === HP.cls ? 5 : 0));
  cls.setWeights([tf.zeros([3, ds.numClasses]), tf.tensor1d(bias)]);
  yld.setWeights([tf.zeros([3, 1]), tf.tensor1d([y])]);
  const predict: Predictor = (images) => {
    const [probs, yields] = model.predict(images) as Tensor[];
    return { probs: probs!, yields };
  };
  const result = await evaluate(predict, ds);
  if (HP.mode !== "nockpt") {
    await saveCheckpoint(ckpt, model, {
      version: "1", task: ds.task, classes: ds.manifest.classes, positiveClass: ds.manifest.positiveClass,
      imageSize: ds.imageSize, preprocessing: ds.manifest.preprocessing, backbone: null, hasYieldHead: true,
      numParams: model.countParams(), metrics: result.metrics, commit: null, createdAt: new Date().toISOString(),
      synthetic: ds.manifest.synthetic,
    });
  }
  if (HP.mode === "tamper") appendFileSync("prepare.ts", "\\n// changed by train.ts\\n");
  if (HP.mode === "scribble") {
    // Zeros over the kept model's weights, same size: it still loads, and predicts the same for everything.
    for (const d of readdirSync("checkpoints").filter((n) => n.startsWith("best-"))) {
      const w = "checkpoints/" + d + "/weights.bin";
      writeFileSync(w, new Uint8Array(readFileSync(w).length));
    }
  }
  const facts = {
    training_seconds: 1, total_seconds: 1, peak_memory_mb: 1, num_steps: 1, num_params: model.countParams(),
    backend: "stub",
  };
  // fakefooter: a footer that claims a far better model than the checkpoint is.
  const claimed = { ...result, metrics: { ...result.metrics, val_accuracy: 0.99, yield_mse: 0, combined_score: 0.99 } };
  if (HP.mode !== "nofooter") printFooter(HP.mode === "fakefooter" ? claimed : result, facts, ds.manifest.synthetic);
  if (HP.mode === "linger") setInterval(() => {}, 1000); // done, but never exits
}
main().catch((err: unknown) => {
  console.error("error: " + (err instanceof Error ? err.message : String(err)));
  process.exit(1);
});
`;
}

export function sh(dir: string, cmd: string): string {
  const r = Bun.spawnSync(["sh", "-c", cmd], { cwd: dir, stdout: "pipe", stderr: "pipe" });
  if (r.exitCode !== 0) throw new Error(`${cmd}: ${r.stderr.toString()}`);
  return r.stdout.toString().trim();
}

/** A git repository with the project's fixed files, `train` as train.ts, and one commit. */
export function makeRepo(train: string, opts: { runMd?: string | null; files?: Record<string, string> } = {}): string {
  const dir = tempDir("arv-loop-");
  made.push(dir);
  const fixed = [
    "prepare.ts", "loop.ts", "predict.ts", "program.md", "lib", "package.json", "tsconfig.json", ".gitignore",
  ];
  for (const f of fixed) {
    cpSync(join(ROOT, f), join(dir, f), { recursive: true });
  }
  symlinkSync(join(ROOT, "node_modules"), join(dir, "node_modules"));
  writeFileSync(join(dir, "train.ts"), train);
  if (opts.runMd !== null) writeFileSync(join(dir, "run.md"), opts.runMd ?? "True\n");
  for (const [name, text] of Object.entries(opts.files ?? {})) writeFileSync(join(dir, name), text);
  // node_modules is a symlink here, which the `node_modules/` ignore pattern (a folder) misses.
  sh(dir, "git init -q && echo node_modules >> .git/info/exclude && git config user.name test "
    + "&& git config user.email test@example.com && git add -A && git commit -qm init");
  return dir;
}

export interface LoopRun { code: number | null; signal: string | null; out: string }

/** `bun loop.ts` in `dir` with a 1 s budget; --no-summarize unless asked for. */
export function loop(dir: string, args: string[], env: Record<string, string> = {}, summarize = false): LoopRun {
  const quiet = summarize ? [] : ["--no-summarize"];
  const r = Bun.spawnSync([BUN, "loop.ts", "--budget", "1", "--grace", "0", ...quiet, ...args], {
    cwd: dir, stdout: "pipe", stderr: "pipe",
    env: { ...process.env, AR_CACHE: fixture.cache, ...WASM_ENV, AR_TEST_ALLOWANCE_S: "30", ...env },
  });
  const signal = r.signalCode == null ? null : String(r.signalCode);
  return { code: r.exitCode, signal, out: r.stdout.toString() + r.stderr.toString() };
}

export function rows(dir: string): ResultRow[] {
  const path = join(dir, "results.tsv");
  if (!existsSync(path)) return [];
  const parsed = parseResults(readFileSync(path, "utf8"));
  expect(parsed.errors).toEqual([]);
  return parsed.rows;
}

export function state(dir: string): State {
  const st = readState(join(dir, ".autoresearch", "state.json"));
  if (!st) throw new Error("no state.json");
  return st;
}

/** Replace text in train.ts and commit it (what an agent following program.md does). */
export function commitTrain(dir: string, from: string | RegExp, to: string, message: string): void {
  const path = join(dir, "train.ts");
  const before = readFileSync(path, "utf8");
  const after = before.replace(from, to);
  expect(after).not.toBe(before);
  writeFileSync(path, after);
  sh(dir, `git commit -qam '${message}'`);
}

export const head = (dir: string) => sh(dir, "git rev-parse HEAD");
export const clean = (dir: string) => sh(dir, "git status --porcelain");
export const last = <T>(xs: T[]): T => xs[xs.length - 1]!;
export const ACC = { ewaste: 10 / 23, organic: 8 / 23, recyclable: 5 / 23 };

