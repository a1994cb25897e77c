/**
 * predict.ts — classify photos with a trained checkpoint (by default the best kept model).
 *
 * Usage:
 *   bun predict.ts photo.jpg                         # one image, a small table on stdout
 *   bun predict.ts a.jpg more/ b.png --top-k 2       # files and folders (searched recursively)
 *   cat photo.jpg | bun predict.ts -                 # image bytes on stdin
 *   bun predict.ts photos/ --json > preds.jsonl      # JSON Lines: one PredictionLine (lib/prediction.ts) per image
 *   bun predict.ts photos/ --model checkpoints/latest --batch 64
 *
 * The model: --model DIR, else checkpoints/best-<current git branch> (the loop's best kept model)
 * if it exists, else checkpoints/latest (the last train.ts run); stderr says which and why.
 * Every image goes through lib/images.ts's decodeToRgb at the checkpoint's image size (a frozen
 * backbone's input size for a head-only checkpoint) and is scaled to [0, 1] by pixelsToFloat32:
 * the same pixels prepare.ts caches and train.ts learns from.
 * For the waste task each image also gets the yield head's estimate, marked as an
 * assumption-based estimate unless the model was trained on measured yields.
 *
 * Exit status: 0 when every image was predicted; 1 when any input failed (one line on stderr per
 * failure, naming the file and the problem; the other images are still predicted); 2 when the
 * flags are wrong or no usable model could be loaded. AR_BACKEND picks the tfjs backend.
 */
import { readdir, readFile, stat } from "node:fs/promises";
import { existsSync } from "node:fs";
import { basename, join, resolve } from "node:path";
import { type } from "arktype";
import { cac } from "cac";
// Types only: tfjs, sharp and the checkpoint code are imported when first needed, so --help and
// bad flags answer at once and a cold start pays for each heavy module exactly once.
import type * as TF from "@tensorflow/tfjs";
import type { Checkpoint, CheckpointMeta } from "./lib/checkpoint.ts";
import type { Prediction, PredictionFailure } from "./lib/prediction.ts";
import type { Predictor } from "./prepare.ts";

// ---------------------------------------------------------------------------
// What one prediction looks like: the arktype schema of a --json line is PredictionLine in
// lib/prediction.ts (a separate module, so a run pays nothing to build schemas it never checks).
// ---------------------------------------------------------------------------

export const ASSUMED_YIELD_NOTE =
  "assumption-based estimate: the model learned ASSUMED per-class yields (prepare.ts WASTE_YIELD_TABLE), "
  + "not measurements, until measured yield labels are supplied (bun prepare.ts --yields file.csv)";
const MEASURED_YIELD_NOTE = "estimate from a model trained on measured yield labels";

// ---------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------

const Flags = type({
  inputs: "string[] > 0",
  topK: "1 <= number.integer <= 1000",
  json: "boolean",
  "model?": "string",
  batch: "1 <= number.integer <= 4096",
});
type Flags = typeof Flags.infer;

const DEFAULT_BATCH = 32;
/** Images decoded at once: sharp runs them on libvips threads while the model works. */
const DECODE_CONCURRENCY = 4;

// ---------------------------------------------------------------------------
// Inputs: files, folders (recursive) and "-" (stdin)
// ---------------------------------------------------------------------------

/** One image to predict: `path` null means stdin. */
export interface InputRef { name: string; path: string | null }
export interface InputProblem { name: string; error: string }

/** Expand the command line into image inputs, in order; folders contribute their image files, sorted. */
export async function expandInputs(
  args: readonly string[],
): Promise<{ inputs: InputRef[]; problems: InputProblem[] }> {
  const { isImagePath } = await import("./lib/images.ts");
  const inputs: InputRef[] = [];
  const problems: InputProblem[] = [];
  for (const arg of args) {
    if (arg === "-") { inputs.push({ name: "-", path: null }); continue; }
    const info = await stat(arg).catch((err: unknown) => errorText(err));
    if (typeof info === "string") { problems.push({ name: arg, error: info }); continue; }
    if (info.isFile()) { inputs.push({ name: arg, path: arg }); continue; }
    if (!info.isDirectory()) { problems.push({ name: arg, error: "not a file or folder" }); continue; }
    const found = await filesUnder(arg).catch((err: unknown) => errorText(err));
    if (typeof found === "string") {
      problems.push({ name: arg, error: `cannot list the folder: ${found}` });
      continue;
    }
    const images = found.filter(isImagePath);
    if (images.length === 0) {
      problems.push({ name: arg, error: "folder holds no image files (.jpg, .png, .webp, …)" });
    }
    for (const p of images) inputs.push({ name: p, path: p });
  }
  return { inputs, problems };
}

async function filesUnder(dir: string): Promise<string[]> {
  const byName = (a: { name: string }, b: { name: string }) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
  const entries = (await readdir(dir, { withFileTypes: true })).sort(byName);
  const out: string[] = [];
  for (const e of entries) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...(await filesUnder(p)));
    else if (e.isFile()) out.push(p);
  }
  return out;
}

/** Node's fs errors say "ENOENT: no such file or directory, stat 'x'": keep the readable middle. */
function errorText(err: unknown): string {
  if (typeof err === "object" && err !== null && "code" in err) {
    const code = String(err.code);
    if (code === "ENOENT") return "no such file or directory";
    if (code === "EACCES" || code === "EPERM") return "permission denied";
    if (code === "EISDIR") return "is a folder";
  }
  return (err instanceof Error ? err.message : String(err)).split("\n")[0] ?? "unknown error";
}

// ---------------------------------------------------------------------------
// Preprocessing: the one path prepare.ts uses (decodeToRgb), then the same [0, 1] scaling
// ---------------------------------------------------------------------------

export type Decoded = { input: InputRef; pixels: Uint8Array } | { input: InputRef; error: string };

/** Read an input's bytes and decode them to size×size×3 uint8: exactly what the cache holds for a file. */
export async function decodeInput(input: InputRef, size: number): Promise<Decoded> {
  const { decodeToRgb } = await import("./lib/images.ts");
  let bytes: Uint8Array;
  try {
    bytes = input.path === null
      ? new Uint8Array(await Bun.stdin.arrayBuffer())
      : new Uint8Array(await readFile(input.path));
  } catch (err) {
    return { input, error: `cannot read: ${errorText(err)}` };
  }
  if (bytes.length === 0) return { input, error: "empty file, not an image" };
  try {
    return { input, pixels: await decodeToRgb(bytes, size) };
  } catch (err) {
    return { input, error: `not a readable image: ${errorText(err)}` };
  }
}

/** Decoded images as the model's input: float32 [B, S, S, 3] in [0, 1], as prepare.ts's imageBatch. */
export async function inputTensor(pixels: readonly Uint8Array[], size: number): Promise<TF.Tensor4D> {
  const tf = await import("@tensorflow/tfjs");
  const { pixelsToFloat32 } = await import("./lib/images.ts");
  return tf.tensor4d(pixelsToFloat32(pixels, size), [pixels.length, size, size, 3]);
}

// ---------------------------------------------------------------------------
// The model: which checkpoint, and is it usable here
// ---------------------------------------------------------------------------

/** --model, else checkpoints/best-<branch> if present, else checkpoints/latest; with the reason. */
export async function chooseModel(explicit: string | undefined): Promise<{ dir: string; why: string }> {
  if (explicit !== undefined) return { dir: explicit, why: "--model" };
  const { bestCheckpointDir, LATEST_CHECKPOINT_DIR } = await import("./lib/checkpoint.ts");
  const branch = currentBranch();
  if (branch !== null) {
    const best = bestCheckpointDir(branch);
    if (existsSync(best)) return { dir: best, why: `the best kept model of branch ${branch}` };
    return { dir: LATEST_CHECKPOINT_DIR, why: `the last train.ts run: branch ${branch} has no ${best} yet` };
  }
  return {
    dir: LATEST_CHECKPOINT_DIR,
    why: "the last train.ts run: not on a git branch, so no best-<branch> model to look for",
  };
}

function currentBranch(): string | null {
  // symbolic-ref also names a branch with no commit yet, and fails on a detached HEAD.
  const r = Bun.spawnSync(["git", "symbolic-ref", "--short", "-q", "HEAD"], { stdout: "pipe", stderr: "ignore" });
  const name = r.exitCode === 0 ? r.stdout.toString().trim() : "";
  return name === "" ? null : name;
}

/**
 * Load a checkpoint and check that it is whole and self-consistent (its files against the
 * content.sha256 the loop wrote when it kept it, meta.json against the model's input and output
 * shapes, preprocessing version). Throws one line naming the folder and problem.
 */
export async function loadModel(dir: string): Promise<Checkpoint> {
  if (!existsSync(dir)) {
    throw new Error(`${dir}: no such checkpoint folder; train one with \`bun train.ts\` or pass --model DIR`);
  }
  await checkDigest(dir);
  const [{ initBackend }, { loadCheckpoint }, { PREPROCESSING }] = await Promise.all([
    import("./lib/backend.ts"), import("./lib/checkpoint.ts"), import("./lib/images.ts"),
  ]);
  await initBackend();
  const ckpt = await loadCheckpoint(dir);
  const { meta, model } = ckpt;
  const s = meta.imageSize;
  const problems: string[] = [];
  const input = model.inputs[0]?.shape ?? [];
  // A head over a frozen backbone takes features, not images: only an image model's input is checked.
  const takesImages = model.inputs.length === 1 && input.length === 4
    && input[1] === s && input[2] === s && input[3] === 3;
  if (meta.backbone === null && !takesImages) {
    problems.push(`the model takes input [${input.map(String).join(",")}] but meta.json says ${s}x${s}x3 images`);
  }
  const probsShape = model.outputs[0]?.shape ?? [];
  if (probsShape[1] !== meta.classes.length) {
    problems.push(`the model outputs ${probsShape[1]} class probabilities for ${meta.classes.length} classes `
      + "in meta.json");
  }
  if (meta.hasYieldHead && model.outputs.length < 2) {
    problems.push("meta.json promises a yield head the model does not have");
  }
  if (meta.preprocessing !== PREPROCESSING && !KNOWN_OTHER_PREPROCESSING.has(meta.preprocessing)) {
    problems.push(`trained on images preprocessed as "${meta.preprocessing}", `
      + `this code decodes as "${PREPROCESSING}": re-train`);
  }
  if (problems.length > 0) throw new Error(`${dir}: incompatible checkpoint: ${problems.join("; ")}`);
  return ckpt;
}

/**
 * A model the loop kept carries content.sha256: a file that no longer matches it (an experiment,
 * or anything else, wrote over it) would give wrong predictions under the old val_accuracy.
 */
async function checkDigest(dir: string): Promise<void> {
  const { DIGEST_FILE, digestProblems } = await import("./lib/best_model.ts");
  const problems = await digestProblems(dir);
  if (problems.length === 0) return;
  // checkpoints/best-autoresearch_<tag>: the loop's journal has a copy it can put back.
  const tag = /^best-autoresearch_(.+)$/.exec(basename(resolve(dir)))?.[1];
  const fix = tag !== undefined
    ? `\`bun loop.ts --resume --tag ${tag} --max-experiments 0\` restores the loop's copy`
    : "re-train it or copy it again";
  throw new Error(`${dir}: ${problems.join(", ")} since it was saved (checked against its ${DIGEST_FILE}): `
    + `its predictions cannot be trusted; ${fix}`);
}

/**
 * The side photos are decoded to: meta.imageSize, or a frozen backbone's input size (as its
 * features were computed in training).
 */
export async function imageSizeFor(ckpt: Checkpoint): Promise<number> {
  const { inputSizeFor } = await import("./lib/checkpoint.ts");
  return inputSizeFor(ckpt.meta);
}

/** Preprocessing tags other than PREPROCESSING that still take decodeToRgb's pixels (with a warning). */
const KNOWN_OTHER_PREPROCESSING = new Set(["synthetic-raw", "cifar100-binary-hwc"]);

function describeModel(dir: string, why: string, meta: CheckpointMeta, size: number): string[] {
  const metrics = Object.entries(meta.metrics).map(([k, v]) => `${k} ${v.toFixed(4)}`).join(", ");
  const backbone = meta.backbone !== null ? ` into frozen backbone ${meta.backbone}` : "";
  const trained = meta.createdAt.slice(0, 16).replace("T", " ");
  const lines = [
    `model: ${dir} (${why})`,
    `  task ${meta.task}, ${meta.classes.length} classes, ${size}x${size} px${backbone}, `
      + `commit ${meta.commit ?? "?"}, trained ${trained}${metrics ? `, val: ${metrics}` : ""}`,
  ];
  if (meta.synthetic || meta.preprocessing === "synthetic-raw") {
    lines.push("  WARNING: trained on SYNTHETIC images (a plumbing test): its predictions on real photos mean nothing");
  }
  if (meta.sample === true) {
    lines.push("  WARNING: trained on data/sample: not a measure of quality (a few dozen photos, for trying the tool)");
  }
  if (meta.preprocessing === "cifar100-binary-hwc") {
    lines.push(`  note: trained on CIFAR-100's ${meta.imageSize}x${meta.imageSize} images; `
      + "photos are shrunk to that size");
  }
  return lines;
}

// ---------------------------------------------------------------------------
// Prediction, in batches
// ---------------------------------------------------------------------------

/** Run the model on decoded images and turn its outputs into Prediction objects. */
export async function classify(
  ckpt: Checkpoint,
  predict: Predictor,
  modelName: string,
  batch: { input: InputRef; pixels: Uint8Array }[],
  topK: number,
): Promise<Prediction[]> {
  const { meta } = ckpt;
  const C = meta.classes.length;
  const x = await inputTensor(batch.map((d) => d.pixels), await imageSizeFor(ckpt));
  const out = await predict(x, new Int32Array(batch.length));
  x.dispose();
  const probs = await out.probs.data();
  const yields = out.yields ? await out.yields.data() : null;
  out.probs.dispose();
  out.yields?.dispose();
  const round = (v: number) => Math.min(1, Math.max(0, Number(v.toFixed(6))));
  const measured = meta.yieldSource?.startsWith("csv:") === true;
  return batch.map((d, i) => {
    const row = Array.from(probs.subarray(i * C, (i + 1) * C), (p, c) => ({
      class: meta.classes[c] ?? `class_${c}`, index: c, probability: round(p),
    }));
    // Best first; equal probabilities go to the lower index, as evaluate() breaks ties.
    const ranked = [...row].sort((a, b) => b.probability - a.probability || a.index - b.index);
    const best = ranked[0]!;
    const p: Prediction = {
      ok: true, file: d.input.name, class: best.class, index: best.index, confidence: best.probability,
      top: ranked.slice(0, Math.min(topK, C)), task: meta.task, model: modelName,
    };
    if (meta.task === "waste" && yields !== null) {
      p.yield = {
        estimate: round(yields[i] ?? 0),
        basis: measured ? "measured" : "assumed",
        note: measured ? MEASURED_YIELD_NOTE : ASSUMED_YIELD_NOTE,
      };
    }
    if (meta.task === "screening" && meta.positiveClass !== null) {
      const pos = row.find((r) => r.class === meta.positiveClass);
      if (pos) {
        p.screening = { positiveClass: pos.class, positive: best.index === pos.index, probability: pos.probability };
      }
    }
    return p;
  });
}

// ---------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------

const pct = (p: number) => `${(100 * p).toFixed(1)}%`;

function tableHeader(nameWidth: number, task: string): string {
  const yieldColumn = task === "waste" ? "yield*  " : "";
  return `${"file".padEnd(nameWidth)}  ${"prediction".padEnd(22)} ${"conf".padStart(6)}  ${yieldColumn}others`;
}

function tableRow(p: Prediction, nameWidth: number): string {
  const name = p.file.length > nameWidth ? `…${p.file.slice(-(nameWidth - 1))}` : p.file.padEnd(nameWidth);
  const others = p.top.slice(1).map((t) => `${t.class} ${pct(t.probability)}`).join(", ");
  const y = p.yield ? `${p.yield.estimate.toFixed(2).padStart(6)}  ` : "";
  return `${name}  ${`${p.class} (${p.index})`.padEnd(22)} ${pct(p.confidence).padStart(6)}  ${y}${others}`;
}

function failureLine(f: PredictionFailure): string {
  return `predict.ts: ${f.file}: ${f.error}`;
}

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

function parseFlags(argv: string[]): Flags | null {
  const cli = cac("predict.ts");
  cli.usage("<image|folder|-> [more...] [options]")
    .option("--top-k <k>", "how many of the most probable classes to show", { default: 3 })
    .option("--json", "print one JSON object per image (JSON Lines)", { default: false })
    .option("--model <dir>", "checkpoint folder (default: checkpoints/best-<branch>, else checkpoints/latest)")
    .option("--batch <n>", "images per forward pass", { default: DEFAULT_BATCH });
  cli.help();
  // cac drops a lone "-": carry it through as a token no path can be.
  const STDIN = "\u0000stdin";
  const parsed = cli.parse(argv.map((a) => (a === "-" ? STDIN : a)), { run: false });
  if (parsed.options.help === true) return null;
  const o = parsed.options;
  const flags = Flags({
    // mri turns numeric-looking arguments into numbers: file names are strings again here.
    inputs: parsed.args.map((a) => (String(a) === STDIN ? "-" : String(a))),
    topK: Number(o.topK), json: o.json === true, batch: Number(o.batch),
    ...(o.model !== undefined ? { model: String(o.model) } : {}),
  });
  if (flags instanceof type.errors) {
    throw new UsageError(flags.summary.includes("inputs")
      ? "give at least one image, folder or - (see --help)"
      : flags.summary);
  }
  return flags;
}

class UsageError extends Error {}

async function main(): Promise<number> {
  const t0 = performance.now();
  const flags = parseFlags(process.argv);
  if (flags === null) return 0;
  const say = (line: string) => process.stderr.write(`${line}\n`);
  const emit = (line: string) => process.stdout.write(`${line}\n`);
  const { inputs, problems } = await expandInputs(flags.inputs);
  let failed = 0;
  const fail = (f: PredictionFailure) => {
    failed++;
    say(failureLine(f));
    if (flags.json) emit(JSON.stringify(f));
  };
  for (const p of problems) fail({ ok: false, file: p.name, error: p.error });
  if (inputs.length === 0) return 1;

  const { dir, why } = await chooseModel(flags.model);
  const ckpt = await loadModel(dir);
  const size = await imageSizeFor(ckpt);
  // Made once, before decoding: a frozen backbone loads while sharp decodes the first batch.
  const predict = (await import("./lib/checkpoint.ts")).predictorFor(ckpt);
  for (const line of describeModel(dir, why, ckpt.meta, size)) say(line);
  const nameWidth = Math.min(48, Math.max(4, ...inputs.map((i) => i.name.length)));
  if (!flags.json) emit(tableHeader(nameWidth, ckpt.meta.task));

  // Decode batch b+1 (sharp, on libvips threads) while the model runs on batch b.
  const { mapPool } = await import("./lib/images.ts");
  const decodeBatch = (b: number) =>
    mapPool(inputs.slice(b * flags.batch, (b + 1) * flags.batch), DECODE_CONCURRENCY, (inp) => decodeInput(inp, size));
  const batches = Math.ceil(inputs.length / flags.batch);
  let predicted = 0;
  let next = decodeBatch(0);
  for (let b = 0; b < batches; b++) {
    const decoded = await next;
    if (b + 1 < batches) next = decodeBatch(b + 1);
    const good = decoded.flatMap((d) => ("pixels" in d ? [d] : []));
    const preds = good.length > 0 ? await classify(ckpt, predict, dir, good, flags.topK) : [];
    let k = 0;
    for (const d of decoded) { // input order, failures in place
      if (!("pixels" in d)) { fail({ ok: false, file: d.input.name, error: d.error }); continue; }
      const p = preds[k++]!;
      predicted++;
      emit(flags.json ? JSON.stringify(p) : tableRow(p, nameWidth));
    }
  }
  if (!flags.json && ckpt.meta.task === "waste" && ckpt.meta.hasYieldHead) {
    const note = ckpt.meta.yieldSource?.startsWith("csv:") ? MEASURED_YIELD_NOTE : ASSUMED_YIELD_NOTE;
    emit(`* yield: estimated recoverable fraction of the item's mass; ${note}`);
  }
  const seconds = (performance.now() - t0) / 1000;
  const rate = (predicted / seconds).toFixed(1);
  say(`${predicted} predicted, ${failed} failed, in ${seconds.toFixed(2)} s (${rate} images/s incl. start-up)`);
  return failed > 0 ? 1 : 0;
}

if (import.meta.main) {
  main().then((code) => process.exit(code), (err: unknown) => {
    const msg = err instanceof Error ? err.message : String(err);
    process.stderr.write(`predict.ts: ${msg.split("\n")[0]}\n`);
    process.exit(2);
  });
}
