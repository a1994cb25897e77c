/**
 * Checkpoints: a tfjs layers model saved as model.json + weights.bin (the format tfjs-node's
 * file:// handler writes, so the files load there too) plus meta.json describing what the model
 * expects. We write them with our own IO handler because the file:// handler only exists in
 * tfjs-node, and the wasm/cpu path must do the same thing.
 *
 * Layout: checkpoints/latest/ (the last train.ts run), checkpoints/best-<branch>/ (the loop's best
 * kept model), or any folder given with --model.
 */
import { mkdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { type } from "arktype";
import * as tf from "@tensorflow/tfjs";
import { Task, type Dataset, type Manifest, type Predictor } from "./dataset.ts";
// Register the ViT's custom layers, the heads' Standardize and the conv blocks' ArBnReluPool with tfjs: such
// checkpoints load wherever checkpoints do.
import "./vit.ts";
import "./standardize.ts";
import "./batchnorm.ts";

export const CheckpointMeta = type({
  version: "'1'",
  task: Task,
  classes: "string[]",
  positiveClass: "string | null",
  imageSize: "number.integer > 0",
  preprocessing: "string",
  /** Backbone name when the model is a head over backbone features (see lib/backbones.ts). */
  backbone: "string | null",
  /**
   * Fine-tuned: the model is the backbone's last k blocks + the head, fed the frozen part's feature
   * maps (lib/backbones.ts, Backbone.unfrozenBlocks). Absent: 0, a head over pooled features.
   */
  "unfrozenBlocks?": "number.integer >= 0",
  hasYieldHead: "boolean",
  numParams: "number.integer >= 0",
  metrics: "Record<string, number>",
  commit: "string | null",
  createdAt: "string",
  synthetic: "boolean",
  /** Trained on data/sample (the manifest's flag; absent in older checkpoints): predict.ts warns. */
  "sample?": "boolean",
  "notes?": "string",
  /** The manifest's yieldSource ("assumed-table" or "csv:<path>"): predict.ts says whether yields are measured. */
  "yieldSource?": "string",
});
export type CheckpointMeta = typeof CheckpointMeta.infer;

/** What a checkpoint copies from its dataset's manifest: every field the two share but their own version and date. */
type FromManifest = Exclude<keyof Manifest & keyof CheckpointMeta, "version" | "createdAt">;
// A Record, so a field added to both types and not listed here is a compile error, not a silent drop.
const FROM_MANIFEST: Record<FromManifest, true> = {
  task: true, classes: true, positiveClass: true, imageSize: true, preprocessing: true, synthetic: true,
  sample: true, yieldSource: true,
};

/** The meta of a model trained on `manifest`'s data: the data's facts from the manifest, the model's from `model`. */
export function checkpointMeta(
  manifest: Pick<Manifest, FromManifest>,
  model: Omit<CheckpointMeta, FromManifest | "version" | "createdAt">,
): CheckpointMeta {
  // An optional field the manifest lacks stays absent (not undefined) in the meta.
  const data = Object.fromEntries(Object.keys(FROM_MANIFEST).map((k) => [k, manifest[k as FromManifest]])
    .filter(([, v]) => v !== undefined));
  return { version: "1", ...(data as Pick<Manifest, FromManifest>), ...model, createdAt: new Date().toISOString() };
}

const ModelJson = type({
  modelTopology: "object",
  weightsManifest: type({ paths: "string[]", weights: "object[]" }).array(),
  "format?": "string",
  "generatedBy?": "string",
  "convertedBy?": "string | null",
});

export interface Checkpoint { dir: string; model: tf.LayersModel; meta: CheckpointMeta; numParams: number }

/** Save atomically: write into a temp folder, then swap it in, so a crash never leaves half a model. */
export async function saveCheckpoint(dir: string, model: tf.LayersModel, meta: CheckpointMeta): Promise<void> {
  const tmp = `${dir}.tmp-${process.pid}`;
  await rm(tmp, { recursive: true, force: true });
  await mkdir(tmp, { recursive: true });
  await model.save(tf.io.withSaveHandler(async (artifacts) => {
    if (!artifacts.weightData || !artifacts.weightSpecs) throw new Error("model has no weights to save");
    const parts = Array.isArray(artifacts.weightData) ? artifacts.weightData : [artifacts.weightData];
    const weights = tf.io.concatenateArrayBuffers(parts);
    await writeFile(join(tmp, "weights.bin"), new Uint8Array(weights));
    await writeFile(join(tmp, "model.json"), JSON.stringify({
      modelTopology: artifacts.modelTopology,
      format: artifacts.format ?? "layers-model",
      generatedBy: artifacts.generatedBy,
      convertedBy: artifacts.convertedBy ?? null,
      weightsManifest: [{ paths: ["weights.bin"], weights: artifacts.weightSpecs }],
    }));
    return { modelArtifactsInfo: tf.io.getModelArtifactsInfoForJSON(artifacts) };
  }));
  await writeFile(join(tmp, "meta.json"), JSON.stringify(meta, null, 2));
  await rm(dir, { recursive: true, force: true });
  await mkdir(join(dir, ".."), { recursive: true });
  await rename(tmp, dir);
}

export async function readMeta(dir: string): Promise<CheckpointMeta> {
  const path = join(dir, "meta.json");
  if (!existsSync(path)) throw new Error(`${path}: no checkpoint here (meta.json missing)`);
  let raw: unknown;
  try { raw = JSON.parse(await readFile(path, "utf8")); } catch { throw new Error(`${path}: not valid JSON`); }
  const meta = CheckpointMeta(raw);
  if (meta instanceof type.errors) throw new Error(`${path}: not a checkpoint meta file: ${meta.summary}`);
  return meta;
}

/**
 * Load a checkpoint; when `expect` is given, refuse one made for another task, class list or
 * image size with a one-line error naming the folder and the mismatch.
 */
export async function loadCheckpoint(
  dir: string,
  expect?: Pick<Dataset, "task" | "imageSize"> & { manifest: { classes: string[] } },
): Promise<Checkpoint> {
  const meta = await readMeta(dir);
  if (expect) {
    const problems: string[] = [];
    if (meta.task !== expect.task) problems.push(`task ${meta.task}, data is ${expect.task}`);
    if (meta.imageSize !== expect.imageSize) problems.push(`image size ${meta.imageSize}, data is ${expect.imageSize}`);
    const classes = meta.classes.join(",");
    const dataClasses = expect.manifest.classes.join(",");
    if (classes !== dataClasses) problems.push(`classes [${classes}], data has [${dataClasses}]`);
    if (problems.length) throw new Error(`${dir}: incompatible checkpoint: ${problems.join("; ")}`);
  }
  const model = await loadLayersModel(dir);
  return { dir, model, meta, numParams: model.countParams() };
}

async function loadLayersModel(dir: string): Promise<tf.LayersModel> {
  const jsonPath = join(dir, "model.json");
  if (!existsSync(jsonPath)) throw new Error(`${jsonPath}: missing`);
  let parsed: unknown;
  try {
    parsed = JSON.parse(await readFile(jsonPath, "utf8"));
  } catch {
    throw new Error(`${jsonPath}: not valid JSON`);
  }
  const mj = ModelJson(parsed);
  if (mj instanceof type.errors) throw new Error(`${jsonPath}: not a tfjs layers model: ${mj.summary}`);
  const weightSpecs = mj.weightsManifest.flatMap((g) => g.weights) as tf.io.WeightsManifestEntry[];
  const buffers = await Promise.all(mj.weightsManifest.flatMap((g) => g.paths).map(async (p) => {
    const path = join(dir, p);
    if (!existsSync(path)) throw new Error(`${path}: weights file missing`);
    return new Uint8Array(await readFile(path));
  }));
  const total = buffers.reduce((s, b) => s + b.byteLength, 0);
  const expected = weightSpecs.reduce((s, w) => s + w.shape.reduce((a, b) => a * b, 1) * bytesPerElement(w), 0);
  if (total !== expected) {
    throw new Error(`${join(dir, "weights.bin")}: ${total} bytes, model.json expects ${expected} `
      + "(corrupted or truncated weights)");
  }
  const weightData = tf.io.concatenateArrayBuffers(buffers.map((b) => b.slice().buffer));
  try {
    const modelTopology = mj.modelTopology as tf.io.ModelArtifacts["modelTopology"];
    return await tf.loadLayersModel(tf.io.fromMemory({ modelTopology, weightSpecs, weightData }));
  } catch (err) {
    const why = err instanceof Error ? err.message.split("\n")[0] : String(err);
    throw new Error(`${jsonPath}: cannot build the model: ${why}`);
  }
}

function bytesPerElement(w: tf.io.WeightsManifestEntry): number {
  if (w.quantization) return w.quantization.dtype === "uint8" ? 1 : 2;
  return w.dtype === "bool" ? 1 : 4;
}

/**
 * The model as evaluate() wants it: output 0 is class probabilities, output 1 (if present) the
 * yield estimate. A checkpoint over a frozen backbone (meta.backbone = "name@size") is a head
 * only: the predictor loads the backbone (lib/backbones.ts) on its first call and, given the
 * dataset `ds`, looks up its cached features by row index as training did; without `ds` (new
 * photos) it runs the backbone on the images, resized to its input size (see inputSizeFor).
 */
export function predictorFor(ckpt: Checkpoint, ds?: Dataset): Predictor {
  const id = ckpt.meta.backbone;
  if (id === null) return layersPredictor(ckpt.model);
  // Start loading the backbone now: predict.ts decodes its photos (sharp's threads) meanwhile.
  const ready: Promise<Predictor> = (async () => {
    const { backbonePredictor, datasetFeatures, loadBackbone } = await import("./backbones.ts");
    // No trial forward pass: the first real batch checks the feature shape just the same.
    const unfreezeBlocks = ckpt.meta.unfrozenBlocks ?? 0;
    const bb = await loadBackbone(id, { trialPass: false, unfreezeBlocks }).catch((err: unknown) => {
      throw new Error(`${ckpt.dir}: backbone ${id}: ${err instanceof Error ? err.message : String(err)}`);
    });
    const features = ds ? await datasetFeatures(ds, bb, { log: (l) => console.error(l) }) : undefined;
    return backbonePredictor(ckpt.model, bb, features);
  })();
  ready.catch(() => {}); // reported when the predictor is called, not as an unhandled rejection
  return async (images, indices) => (await ready)(images, indices);
}

/** The Predictor of a model fed the images themselves: output 0 class probabilities, output 1 (if any) yields. */
export function layersPredictor(model: tf.LayersModel): Predictor {
  return (images) => {
    const out = model.predict(images);
    const outs = Array.isArray(out) ? out : [out];
    return { probs: outs[0]!, yields: outs[1] };
  };
}

/** The side of the images a checkpoint's model should be fed: its backbone's input, else meta.imageSize. */
export function inputSizeFor(meta: CheckpointMeta): number {
  if (meta.backbone === null) return meta.imageSize;
  const m = /@(\d+)$/.exec(meta.backbone);
  return m ? Number(m[1]) : meta.imageSize;
}

/** Where the loop keeps the best kept model of a git branch (predict.ts looks here first). */
export function bestCheckpointDir(branch: string, root = "checkpoints"): string {
  return join(root, `best-${branch.replace(/[^A-Za-z0-9._-]+/g, "_")}`);
}
export const LATEST_CHECKPOINT_DIR = join("checkpoints", "latest");
