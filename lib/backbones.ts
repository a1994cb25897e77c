/**
 * Pretrained image backbones for transfer learning, and the cache of their features.
 *
 * One small API: a backbone name (optionally "name@size") → a frozen feature extractor.
 *
 *   const bb = await loadBackbone("nsfwjs-mobilenetv2", { inputSize: 128 });
 *   const f = bb.features(images);              // [B, H, W, 3] in [0, 1] → [B, bb.featureDim]
 *   const fc = await datasetFeatures(ds, bb);   // every dataset row, computed once, then cached
 *   featureRows(fc, indices)                    // [B, D] tensor for a batch of dataset rows
 *
 * Backbones (BACKBONES below):
 * - "nsfwjs-mobilenetv2" (offline, from the npm package nsfwjs, MIT): a Keras MobileNetV2 (alpha
 *   1.0) whose weights were fine-tuned by the nsfwjs authors for NSFW classification (5 classes).
 *   NOT ImageNet weights: it started from ImageNet, but every layer we use was then trained on
 *   their task. Ships inside the package as base64 JS (uint8-quantized, 2.6 MB), so it needs no
 *   network. nsfwjs feeds it pixels scaled to [0, 1], so that is the range used here.
 * - "nsfwjs-inceptionv3" (offline, the same package, MIT): the Keras InceptionV3 nsfwjs also ships
 *   (29 MB of base64 JS), NSFW-trained like the MobileNetV2, [0, 1] pixels. Pooled at a middle block,
 *   where the ImageNet start's general features survived the NSFW training (the registry entry).
 * - "coco-centernet-mobilenetv3" (offline, from the npm package @vladmandic/human, MIT): a CenterNet
 *   object detector on MobileNetV3 trained on COCO's 80 classes (bottle, cup, laptop, phone, fruit,
 *   …: what people throw away), a tfjs graph model (float16, 4 MB). Fed unscaled RGB [0, 255], as
 *   human feeds it. Fully convolutional: any side that is a multiple of 32 runs once the neck's
 *   three upsampling sizes (baked in for 512) are rewritten. Features: three nodes pooled and
 *   concatenated (the registry entry says which).
 * - "mobilenet-v2-imagenet" (online): Google's ImageNet MobileNetV2 1.0/224 from TF Hub, tfjs graph
 *   format (the model @tensorflow-models/mobilenet loads), input [0, 1], fixed 224×224 input.
 * - "mobilenet-v1-imagenet" (online): Google's ImageNet MobileNetV1 1.0/224, tfjs layers format
 *   (the tfjs examples' model), input [-1, 1]; other input sizes work (rebuilt, see below).
 * Online backbones are downloaded on first use into CACHE_ROOT/backbones/<name>/ (temp folder +
 * rename, each file retried (lib/download.ts), sizes checked against model.json's weightsManifest
 * and any pinned size/sha256), with a files.json of sha256s that is re-checked on every load; later
 * loads need no network. A cache that fails the check is deleted and downloaded again.
 *
 * Features are the last conv block's output, global-average-pooled (1280-d for MobileNetV2). A
 * layers model runs at another input size by rebuilding it from its JSON with a new input shape,
 * cut at the feature layer, and copying the weights layer by layer.
 *
 * Fine-tuning (loadBackbone's unfreezeBlocks k > 0, a layers model with spec.blockEnds): the
 * backbone is cut k blocks short of the end; its feature maps (flattened, not pooled) are what
 * features() returns and the cache holds, and trainableBlocks() gives the last k blocks as a
 * model of their own with the pretrained weights, for train.ts to train with its head.
 *
 * Feature cache: <dataset dir>/features-<name>-<size>.f32 (+ .json), computed from the ORIGINAL
 * source images decoded at the backbone's input size with decodeToRgb (the image cache is only
 * 64×64); synthetic and CIFAR datasets have no files, so their cached pixels are upsampled. The
 * JSON key is (backbone, weights hash, input size, EXTRACTION version, dataset fingerprint): any
 * change recomputes.
 */
import { existsSync, readFileSync } from "node:fs";
import { readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { basename, dirname, join, resolve } from "node:path";
import { type } from "arktype";
import * as tf from "@tensorflow/tfjs";
import { replaceDirAtomic, writeAtomic } from "./atomic.ts";
import { CACHE_ROOT, imageBatch, type Dataset, type Predictor } from "./dataset.ts";
import { fetchBytes, withRetry } from "./download.ts";
import { decodeToRgb, mirrorRgb, pixelsToFloat32, PREPROCESSING, sha256Hex } from "./images.ts";

// ---------------------------------------------------------------------------
// The registry
// ---------------------------------------------------------------------------

export const BACKBONE_NAMES = [
  "nsfwjs-mobilenetv2", "nsfwjs-inceptionv3", "coco-centernet-mobilenetv3", "mobilenet-v2-imagenet",
  "mobilenet-v1-imagenet",
] as const;
export type BackboneName = (typeof BACKBONE_NAMES)[number];
/**
 * Two backbones whose pooled features are concatenated (each part cached on its own, at the same
 * input side): what one network's training task missed, the other's may have kept.
 */
export const BACKBONE_COMBOS = ["coco-centernet-mobilenetv3+nsfwjs-mobilenetv2"] as const;
export type BackboneCombo = (typeof BACKBONE_COMBOS)[number];

/** Where a URL backbone's files live: `${base}${file}${query}` for model.json and each shard. */
export interface Mirror { base: string; query?: string }
/** A file whose size and sha256 are known in advance (checked on download and on every load). */
export interface PinnedFile { path: string; size: number; sha256: string }

export interface BackboneSpec {
  name: string;
  title: string;
  /** true: ImageNet-trained weights. false: see `weights`. */
  imagenet: boolean;
  weights: string;
  license: string;
  format: "layers" | "graph";
  source:
    /** One of the Keras models bundled in the nsfwjs package as CommonJS modules. */
    | { kind: "nsfwjs"; model: NsfwjsModel }
    /** model.json + its shards shipped inside an installed npm package (`file` is the json's path in it). */
    | { kind: "npm"; package: string; file: string }
    | { kind: "url"; mirrors: Mirror[]; pinned?: PinnedFile[] };
  /**
   * The layer(s) (layers model) or node(s) (graph model) whose outputs are each global-average-pooled
   * and concatenated in this order; a layers model lists its layers in network order.
   */
  featureNode: string | readonly string[];
  featureDim: number;
  nativeSize: number;
  /**
   * Layers models can be rebuilt for another input size; a graph model only when `sizeConstants`
   * says how its baked-in shapes follow the input side.
   */
  resizable: boolean;
  /** Pixel values [0, 1] are mapped linearly to this range before the model. */
  inputRange: readonly [number, number];
  /** The input side must be a multiple of this (the strides of a fully convolutional graph). */
  sizeStep?: number;
  /** graph: int32 [h, w] constants that are the input side divided by this (upsampling targets). */
  sizeConstants?: Readonly<Record<string, number>>;
  /**
   * layers: where the frozen part ends when the last k blocks are fine-tuned (entry k-1), from the
   * top down; absent: the backbone is frozen whole.
   */
  blockEnds?: readonly string[];
}

const TFHUB_MOBILENET_V2 = "google/imagenet/mobilenet_v2_100_224/classification/2/";

const NSFWJS_WEIGHTS = "fine-tuned by nsfwjs for NSFW classification (ImageNet start, then trained on their " +
  "5-class task): NOT ImageNet weights";

export const BACKBONES: Record<BackboneName, BackboneSpec> = {
  "nsfwjs-mobilenetv2": {
    name: "nsfwjs-mobilenetv2",
    title: "MobileNetV2 1.0 from the nsfwjs npm package (offline)",
    imagenet: false,
    weights: NSFWJS_WEIGHTS,
    license: "MIT (nsfwjs)",
    format: "layers",
    source: { kind: "nsfwjs", model: "mobilenet_v2" },
    featureNode: "out_relu",
    featureDim: 1280,
    nativeSize: 224,
    resizable: true,
    inputRange: [0, 1], // nsfwjs's own preprocessing: img / 255
    // Unfreezing 1: block_16 + Conv_1 train (block_16 has no residual); 2: block_15 as well.
    blockEnds: ["block_15_add", "block_14_add"],
  },
  "nsfwjs-inceptionv3": {
    name: "nsfwjs-inceptionv3",
    title: "InceptionV3 from the nsfwjs npm package (offline)",
    imagenet: false,
    weights: NSFWJS_WEIGHTS,
    license: "MIT (nsfwjs)",
    format: "layers",
    source: { kind: "nsfwjs", model: "inception_v3" },
    // A middle block (768 channels, stride 16), not the last: the top blocks were retrained for NSFW
    // classes and describe waste worse, the last by far (bench/README.md: a linear probe of every
    // block's pooled output). Cut there, the network also costs about half of a full pass.
    featureNode: "mixed4",
    featureDim: 768,
    nativeSize: 299,
    resizable: true,
    inputRange: [0, 1], // nsfwjs's own preprocessing: img / 255
    // Unfreezing 1: the mixed4 block trains; 2: mixed3 (the stride-2 reduction) as well.
    blockEnds: ["mixed3", "mixed2"],
  },
  "coco-centernet-mobilenetv3": {
    name: "coco-centernet-mobilenetv3",
    title: "CenterNet object detector on MobileNetV3, COCO (from the npm package @vladmandic/human, offline)",
    imagenet: false,
    weights: "trained for COCO 2017 object detection (80 classes: bottle, cup, laptop, phone, banana, …) " +
      "by github.com/610265158/mobilenetv3_centernet; converted to tfjs (float16) by @vladmandic/human",
    // The upstream repository names no licence of its own; the npm package that ships the files is MIT.
    license: "MIT (@vladmandic/human, which ships the files); model from github.com/610265158/mobilenetv3_centernet",
    format: "graph",
    source: { kind: "npm", package: "@vladmandic/human", file: "models/centernet.json" },
    featureNode: [
      "tower_0/extern1/hard_swish/mul_1", // the backbone's last stage, stride 32, 480 channels
      "tower_0/CenternetHead/mul", // the neck's features the detection heads read, stride 4, 128 channels
      "tower_0/keypoints", // the 80 class heatmaps (sigmoid), pooled: "how much of each COCO class"
    ],
    featureDim: 480 + 128 + 80,
    nativeSize: 512,
    resizable: true,
    inputRange: [0, 255], // @vladmandic/human feeds it unscaled RGB; in [0, 1] its detections are nonsense
    sizeStep: 32,
    // The neck upsamples stride 32 → 16 → 8 → 4 to sizes baked in for a 512 input.
    sizeConstants: {
      "tower_0/CenternetHead/c5_upsample/up_sampling2d/mul": 16,
      "tower_0/CenternetHead/c4_upsample/up_sampling2d_1/mul": 8,
      "tower_0/CenternetHead/c3_upsample/up_sampling2d_2/mul": 4,
    },
  },
  "mobilenet-v2-imagenet": {
    name: "mobilenet-v2-imagenet",
    title: "Google MobileNetV2 1.0/224, ImageNet (TF Hub, tfjs graph model)",
    imagenet: true,
    weights: "ImageNet (ILSVRC-2012) classification",
    license: "Apache-2.0 (Google)",
    format: "graph",
    source: {
      kind: "url",
      // sha256s are not pinned: these files could not be fetched from the machine this was written
      // on. Downloads are checked against model.json's weightsManifest sizes and their sha256s are
      // recorded in the cache's files.json, which every later load re-checks.
      mirrors: [
        { base: `https://storage.googleapis.com/tfhub-tfjs-modules/${TFHUB_MOBILENET_V2}` },
        { base: `https://tfhub.dev/${TFHUB_MOBILENET_V2}`, query: "?tfjs-format=file" },
      ],
    },
    // What @tensorflow-models/mobilenet's infer(img, true) returns.
    featureNode: "module_apply_default/MobilenetV2/Logits/AvgPool",
    featureDim: 1280,
    nativeSize: 224,
    resizable: false,
    inputRange: [0, 1], // TF Hub image modules take [0, 1]
  },
  "mobilenet-v1-imagenet": {
    name: "mobilenet-v1-imagenet",
    title: "Google MobileNetV1 1.0/224, ImageNet (tfjs layers model from the tfjs examples)",
    imagenet: true,
    weights: "ImageNet (ILSVRC-2012) classification",
    license: "Apache-2.0 (Google)",
    format: "layers",
    source: {
      kind: "url",
      mirrors: [{ base: "https://storage.googleapis.com/tfjs-models/tfjs/mobilenet_v1_1.0_224/" }],
    },
    featureNode: "conv_pw_13_relu",
    featureDim: 1024,
    nativeSize: 224,
    resizable: true,
    inputRange: [-1, 1], // Keras MobileNet preprocessing
    blockEnds: ["conv_pw_12_relu", "conv_pw_11_relu"],
  },
};

function isBackboneName(s: string): s is BackboneName {
  return (BACKBONE_NAMES as readonly string[]).includes(s);
}

/** "name", "name@size" or "name+name@size" (what checkpoints record in meta.backbone). */
export function parseBackboneId(id: string): { name: string; inputSize: number | null } {
  const m = /^([A-Za-z0-9._-]+(?:\+[A-Za-z0-9._-]+)*)(?:@(\d+))?$/.exec(id.trim());
  if (!m) throw new Error(`backbone "${id}": expected NAME or NAME@SIZE (one of ${BACKBONE_NAMES.join(", ")})`);
  return { name: m[1]!, inputSize: m[2] ? Number(m[2]) : null };
}

// ---------------------------------------------------------------------------
// tfjs model files (model.json + weight shards)
// ---------------------------------------------------------------------------

const WeightEntry = type({
  name: "string",
  shape: "number.integer[]",
  dtype: "string",
  "quantization?": { dtype: "string", "min?": "number", "scale?": "number", "original_dtype?": "string" },
});
const ModelJson = type({
  modelTopology: "object",
  weightsManifest: type({ paths: "string[]", weights: WeightEntry.array() }).array(),
  "format?": "string",
  "generatedBy?": "string",
  "convertedBy?": "string | null",
  "signature?": "object",
  "userDefinedMetadata?": "object",
  "modelInitializer?": "object",
});
type ModelJson = typeof ModelJson.infer;

const FilesManifest = type({
  version: "'1'",
  name: "string",
  url: "string",
  downloadedAt: "string",
  files: type({ path: "string", size: "number.integer >= 0", sha256: /^[0-9a-f]{64}$/ }).array(),
});
type FilesManifest = typeof FilesManifest.infer;

interface Artifacts { json: ModelJson; weightData: ArrayBuffer }

function parseModelJson(raw: unknown, where: string): ModelJson {
  const mj = ModelJson(raw);
  if (mj instanceof type.errors) throw new Error(`${where}: not a tfjs model.json: ${mj.summary}`);
  return mj;
}

function bytesOf(w: typeof WeightEntry.infer): number {
  const n = w.shape.reduce((a, b) => a * b, 1);
  if (w.quantization) return n * (w.quantization.dtype === "uint8" || w.quantization.dtype === "int8" ? 1 : 2);
  if (w.dtype === "string") throw new Error(`weight ${w.name}: string weights are not supported`);
  return n * (w.dtype === "bool" ? 1 : 4);
}

/** Bytes each weight group must have in total, from model.json alone. */
function groupBytes(mj: ModelJson): number[] {
  return mj.weightsManifest.map((g) => g.weights.reduce((s, w) => s + bytesOf(w), 0));
}

function safePath(p: string): string {
  if (p.includes("..") || p.startsWith("/") || p.includes("\\") || p.includes("?")) {
    throw new Error(`model.json names an unsafe weights path "${p}"`);
  }
  return p;
}

function weightSpecsOf(a: Artifacts): tf.io.WeightsManifestEntry[] {
  return a.json.weightsManifest.flatMap((g) => g.weights) as tf.io.WeightsManifestEntry[];
}

function concat(parts: Uint8Array[]): ArrayBuffer {
  const total = parts.reduce((s, p) => s + p.byteLength, 0);
  const out = new Uint8Array(total);
  let o = 0;
  for (const p of parts) { out.set(p, o); o += p.byteLength; }
  return out.buffer;
}

// ---------------------------------------------------------------------------
// Download + verify + cache (URL backbones)
// ---------------------------------------------------------------------------

interface DownloadOptions {
  name: string;
  mirrors: Mirror[];
  /** The verified folder (e.g. CACHE_ROOT/backbones/<name>); written whole or not at all. */
  dest: string;
  pinned?: PinnedFile[];
  /** Attempts per file (default 3). */
  attempts?: number;
  /** Per-request timeout (default 120 s). */
  timeoutMs?: number;
  /** First retry delay; doubles each time (default 1 s). */
  backoffMs?: number;
  log?: (line: string) => void;
}

/** Fetch one file, retrying; `check` throws if the bytes are wrong (which also retries). */
async function fetchChecked(url: string, o: DownloadOptions, check: (bytes: Uint8Array) => void): Promise<Uint8Array> {
  const log = o.log;
  const retry = { attempts: o.attempts, backoffMs: o.backoffMs, log: log && ((l: string) => log(`download ${l}`)) };
  return withRetry(url, async () => {
    const bytes = await fetchBytes(url, o.timeoutMs);
    check(bytes);
    return bytes;
  }, retry);
}

/**
 * Download model.json and its shards into a temp folder next to `dest`, verify them, and rename
 * the folder into place. On any failure the temp folder is removed: `dest` is either absent or
 * complete and verified.
 */
async function downloadModelFiles(o: DownloadOptions): Promise<FilesManifest> {
  const log = o.log ?? ((l: string) => console.error(l));
  const pinned = new Map((o.pinned ?? []).map((p) => [p.path, p]));
  const checkPinned = (path: string) => (bytes: Uint8Array) => {
    const pin = pinned.get(path);
    if (!pin) return;
    if (bytes.byteLength !== pin.size) {
      throw new Error(`${path}: got ${bytes.byteLength} bytes, expected ${pin.size} (truncated or wrong file)`);
    }
    const sha = sha256Hex(bytes);
    if (sha !== pin.sha256) {
      const [got, want] = [sha.slice(0, 12), pin.sha256.slice(0, 12)];
      throw new Error(`${path}: sha256 ${got}…, expected ${want}… (corrupt or changed file)`);
    }
  };
  const errors: string[] = [];
  for (const mirror of o.mirrors) {
    const url = (p: string) => `${mirror.base}${p}${mirror.query ?? ""}`;
    try {
      const manifest = await replaceDirAtomic(o.dest, async (tmp): Promise<FilesManifest> => {
        log(`backbone ${o.name}: downloading ${url("model.json")}`);
        const jsonBytes = await fetchChecked(url("model.json"), o, (b) => {
          checkPinned("model.json")(b);
          parseModelJson(JSON.parse(new TextDecoder().decode(b)), url("model.json"));
        });
        const mj = parseModelJson(JSON.parse(new TextDecoder().decode(jsonBytes)), url("model.json"));
        const files: FilesManifest["files"] = [
          { path: "model.json", size: jsonBytes.byteLength, sha256: sha256Hex(jsonBytes) },
        ];
        await writeFile(join(tmp, "model.json"), jsonBytes);
        const expected = groupBytes(mj);
        for (const [g, group] of mj.weightsManifest.entries()) {
          // Shard sizes are not in model.json, only each group's total: re-fetch the group if it is off.
          let got: Uint8Array[] = [];
          for (let round = 1; ; round++) {
            got = [];
            for (const p of group.paths.map(safePath)) got.push(await fetchChecked(url(p), o, checkPinned(p)));
            const total = got.reduce((s, b) => s + b.byteLength, 0);
            if (total === expected[g]) break;
            const why = `weights group ${g + 1} (${group.paths.join(", ")}): got ${total} bytes, ` +
              `model.json's weightsManifest needs ${expected[g]} (truncated download)`;
            if (round >= (o.attempts ?? 3)) throw new Error(`${mirror.base}: ${why}`);
            log(`backbone ${o.name}: ${why}; retrying`);
          }
          for (const [k, p] of group.paths.entries()) {
            const bytes = got[k]!;
            await writeFile(join(tmp, p), bytes);
            files.push({ path: p, size: bytes.byteLength, sha256: sha256Hex(bytes) });
          }
        }
        const downloadedAt = new Date().toISOString();
        const m: FilesManifest = { version: "1", name: o.name, url: mirror.base, downloadedAt, files };
        await writeFile(join(tmp, "files.json"), JSON.stringify(m, null, 2));
        await verifyDir(tmp); // what is on disk is what was checked
        return m;
      });
      const mb = manifest.files.reduce((s, f) => s + f.size, 0) / 1e6;
      log(`backbone ${o.name}: ${manifest.files.length} files, ${mb.toFixed(1)} MB verified and cached in ${o.dest}`);
      return manifest;
    } catch (err) {
      errors.push(err instanceof Error ? err.message : String(err));
    }
  }
  throw new Error(`backbone ${o.name}: download failed, nothing was cached:\n  ${errors.join("\n  ")}`);
}

/** Check a cached folder against its files.json (sizes and sha256); returns the manifest. */
async function verifyDir(dir: string): Promise<FilesManifest> {
  const path = join(dir, "files.json");
  if (!existsSync(path)) throw new Error(`${path}: missing`);
  const m = FilesManifest(JSON.parse(await readFile(path, "utf8")));
  if (m instanceof type.errors) throw new Error(`${path}: ${m.summary}`);
  for (const f of m.files) {
    const p = join(dir, safePath(f.path));
    if (!existsSync(p)) throw new Error(`${p}: missing`);
    const bytes = new Uint8Array(await readFile(p));
    if (bytes.byteLength !== f.size) {
      throw new Error(`${p}: ${bytes.byteLength} bytes, files.json says ${f.size} (truncated)`);
    }
    if (sha256Hex(bytes) !== f.sha256) throw new Error(`${p}: sha256 does not match files.json (corrupt)`);
  }
  return m;
}

async function readArtifactsDir(dir: string, file = "model.json"): Promise<Artifacts> {
  const json = parseModelJson(JSON.parse(await readFile(join(dir, file), "utf8")), join(dir, file));
  const paths = json.weightsManifest.flatMap((g) => g.paths).map((p) => join(dir, safePath(p)));
  const parts = await Promise.all(paths.map(async (p) => new Uint8Array(await readFile(p))));
  return { json, weightData: concat(parts) };
}

export interface UrlModelOptions {
  cacheRoot?: string;
  mirrors?: Mirror[];
  attempts?: number;
  backoffMs?: number;
  timeoutMs?: number;
  log?: (l: string) => void;
}

/** The verified cache folder of a URL backbone, downloading it first if absent or corrupt. */
export async function ensureUrlModel(spec: BackboneSpec, o: UrlModelOptions = {}): Promise<string> {
  if (spec.source.kind !== "url") throw new Error(`backbone ${spec.name} is not downloaded from a URL`);
  const log = o.log ?? ((l: string) => console.error(l));
  const dest = join(resolve(o.cacheRoot ?? CACHE_ROOT), "backbones", spec.name);
  await removeDeadTemps(dest);
  if (existsSync(dest)) {
    try {
      await verifyDir(dest);
      return dest;
    } catch (err) {
      const why = err instanceof Error ? err.message : String(err);
      log(`backbone ${spec.name}: cached copy is damaged (${why}); deleting it and downloading again`);
      await rm(dest, { recursive: true, force: true });
    }
  }
  try {
    await downloadModelFiles({
      name: spec.name, mirrors: o.mirrors ?? spec.source.mirrors, dest, pinned: spec.source.pinned,
      attempts: o.attempts, backoffMs: o.backoffMs, timeoutMs: o.timeoutMs, log,
    });
  } catch (err) {
    // Another process may have finished the same download first (our rename then fails).
    if (existsSync(dest) && await verifyDir(dest).then(() => true, () => false)) return dest;
    throw err;
  }
  return dest;
}

// ---------------------------------------------------------------------------
// The offline backbone inside the nsfwjs package
// ---------------------------------------------------------------------------

const ModuleDefault = type({ default: "unknown" });

export type NsfwjsModel = "mobilenet_v2" | "inception_v3";

async function nsfwjsArtifacts(model: NsfwjsModel): Promise<Artifacts> {
  // The package's own export: model.json and the weight shards as base64, in CommonJS modules.
  const def = model === "mobilenet_v2"
    ? (await import("nsfwjs/models/mobilenet_v2")).MobileNetV2Model
    : (await import("nsfwjs/models/inception_v3")).InceptionV3Model;
  const jsonMod = ModuleDefault(await def.modelJson());
  if (jsonMod instanceof type.errors) throw new Error(`nsfwjs: unexpected model module: ${jsonMod.summary}`);
  const json = parseModelJson(jsonMod.default, `nsfwjs/models/${model} (model.min.js)`);
  const parts: Uint8Array[] = [];
  for (const [i, bundle] of def.weightBundles.entries()) {
    const shard = ModuleDefault(await bundle());
    if (shard instanceof type.errors || typeof shard.default !== "string") {
      throw new Error(`nsfwjs: weight bundle ${i + 1} is not a base64 string`);
    }
    parts.push(new Uint8Array(Buffer.from(shard.default, "base64")));
  }
  const weightData = concat(parts);
  const need = groupBytes(json).reduce((a, b) => a + b, 0);
  if (weightData.byteLength !== need) {
    throw new Error(`nsfwjs: weights have ${weightData.byteLength} bytes, model.json needs ${need}`);
  }
  return { json, weightData };
}

// ---------------------------------------------------------------------------
// Offline backbones shipped as model files inside an npm package
// ---------------------------------------------------------------------------

const PackageJson = type({ name: "string" });

/** The folder of an installed npm package: up from its resolved entry point to its package.json. */
function packageRoot(pkg: string): string {
  let entry: string;
  try { entry = createRequire(import.meta.url).resolve(pkg); } catch {
    throw new Error(`npm package ${pkg} is not installed (run npm install)`);
  }
  for (let dir = dirname(entry); dir !== dirname(dir); dir = dirname(dir)) {
    const pj = join(dir, "package.json");
    if (!existsSync(pj)) continue;
    const parsed = PackageJson(JSON.parse(readFileSync(pj, "utf8")));
    if (!(parsed instanceof type.errors) && parsed.name === pkg) return dir;
  }
  throw new Error(`npm package ${pkg}: no package.json above ${entry}`);
}

/** model.json and its shards from an installed package: no network; sizes checked against the manifest. */
async function npmArtifacts(pkg: string, file: string): Promise<Artifacts> {
  const path = join(packageRoot(pkg), safePath(file));
  if (!existsSync(path)) throw new Error(`${path}: missing from the installed package ${pkg}`);
  const a = await readArtifactsDir(dirname(path), basename(path));
  const need = groupBytes(a.json).reduce((x, y) => x + y, 0);
  if (a.weightData.byteLength !== need) {
    const got = a.weightData.byteLength;
    throw new Error(`${path}: weights have ${got} bytes, the model needs ${need} (damaged package)`);
  }
  return a;
}

/**
 * A graph model's artifacts for input side `size`: the input placeholder takes any batch and
 * `size`×`size`, and the int32 [h, w] constants of `sizeConstants` become size / divisor.
 */
function graphForSize(a: Artifacts, size: number, consts: Readonly<Record<string, number>>): Artifacts {
  const json = structuredClone(a.json);
  const checked = GraphTopology(json.modelTopology);
  if (checked instanceof type.errors) throw new Error(`not a graph model topology: ${checked.summary}`);
  // The same object, now known to have that shape: edited in place.
  const topo = json.modelTopology as typeof GraphTopology.infer;
  for (const node of topo.node) {
    if (node.op !== "Placeholder") continue;
    const dims = node.attr?.shape?.shape?.dim;
    if (dims?.length === 4) dims.splice(0, 3, { size: "-1" }, { size: String(size) }, { size: String(size) });
  }
  const weightData = a.weightData.slice(0);
  let offset = 0;
  const found = new Set<string>();
  for (const w of json.weightsManifest.flatMap((g) => g.weights)) {
    const divisor = consts[w.name];
    if (divisor !== undefined) {
      if (w.dtype !== "int32" || w.quantization || w.shape.join() !== "2") {
        throw new Error(`constant ${w.name} is not an int32 [h, w] pair`);
      }
      new Int32Array(weightData, offset, 2).set([size / divisor, size / divisor]);
      found.add(w.name);
    }
    offset += bytesOf(w);
  }
  const missing = Object.keys(consts).filter((k) => !found.has(k));
  if (missing.length) throw new Error(`size constants not in the model: ${missing.join(", ")}`);
  return { json, weightData };
}

const GraphTopology = type({
  node: type({
    name: "string", op: "string",
    "attr?": { "shape?": { "shape?": { "dim?": type({ size: "string" }).array() } } },
  }).array(),
});

// ---------------------------------------------------------------------------
// Building the feature extractor
// ---------------------------------------------------------------------------

const KerasLayerJson = type({
  name: "string", class_name: "string", config: "Record<string, unknown>", inbound_nodes: "unknown[]",
});
const KerasFunctional = type({
  class_name: "string",
  config: { layers: KerasLayerJson.array(), input_layers: "unknown[]", output_layers: "unknown[]" },
});

/** Names of the layers `inbound_nodes` reaches from `layer` (itself included). */
function ancestors(layers: (typeof KerasLayerJson.infer)[], layer: string): Set<string> {
  const byName = new Map(layers.map((l) => [l.name, l]));
  const seen = new Set<string>();
  const stack = [layer];
  while (stack.length) {
    const n = stack.pop()!;
    if (seen.has(n)) continue;
    const l = byName.get(n);
    if (!l) throw new Error(`layer "${n}" not found in the model`);
    seen.add(n);
    // Keras 2 JSON: inbound_nodes = [[[name, nodeIndex, tensorIndex, kwargs], ...], ...]
    for (const node of l.inbound_nodes) {
      if (!Array.isArray(node)) continue;
      for (const t of node) if (Array.isArray(t) && typeof t[0] === "string") stack.push(t[0]);
    }
  }
  return seen;
}

/** The pretrained layers model of `a`, as tfjs loads it. */
function loadFull(a: Artifacts): Promise<tf.LayersModel> {
  return tf.loadLayersModel(tf.io.fromMemory({
    modelTopology: a.json.modelTopology as tf.io.ModelArtifacts["modelTopology"], weightSpecs: weightSpecsOf(a),
    weightData: a.weightData,
  }));
}

/**
 * A new model from `full`'s Keras JSON as `edit` rewrites it, each layer that has weights given the
 * pretrained layer's of the same name. `full` is disposed.
 */
async function rebuilt(
  a: Artifacts, full: tf.LayersModel, edit: (cfg: typeof KerasFunctional.infer) => void,
): Promise<tf.LayersModel> {
  try {
    const topo = a.json.modelTopology as Record<string, unknown>;
    const cfg = KerasFunctional(structuredClone(topo.model_config ?? topo));
    if (cfg instanceof type.errors) throw new Error(`not a functional Keras model (${cfg.summary})`);
    edit(cfg);
    // (validated above; tfjs types its JSON input as PyJsonDict)
    const modelTopology = { class_name: cfg.class_name, config: cfg.config } as unknown as tf.serialization.ConfigDict;
    const model = await tf.models.modelFromJSON({ modelTopology });
    for (const layer of model.layers) {
      if (layer.weights.length > 0) layer.setWeights(full.getLayer(layer.name).getWeights());
    }
    return model;
  } finally {
    full.dispose();
  }
}

/**
 * A layers model cut at `cut`, with input `size`×`size`: the JSON is rebuilt with the new input
 * shape and only the layers the cut needs, then the weights are copied layer by layer.
 */
async function layersTrunk(a: Artifacts, cut: string, size: number, nativeSize: number): Promise<tf.LayersModel> {
  const full = await loadFull(a);
  if (size === nativeSize) {
    return tf.model({ inputs: full.inputs, outputs: full.getLayer(cut).output as tf.SymbolicTensor });
  }
  return rebuilt(a, full, (cfg) => {
    const keep = ancestors(cfg.config.layers, cut);
    cfg.config.layers = cfg.config.layers.filter((l) => keep.has(l.name));
    const inputs = cfg.config.layers.filter((l) => l.class_name === "InputLayer");
    if (inputs.length !== 1) throw new Error(`expected one input layer, found ${inputs.length}`);
    inputs[0]!.config.batch_input_shape = [null, size, size, 3];
    cfg.config.output_layers = [[cut, 0, 0]];
  });
}

/**
 * The layers after `from` up to `to` as a model of their own, fed `from`'s output map flattened
 * ([B, h·w·c]) and ending in global average pooling: the blocks fine-tuning trains. The JSON is
 * rebuilt with an input + reshape in place of `from`, and the pretrained weights copied in.
 */
async function layersBlocks(a: Artifacts, from: string, to: string, map: readonly number[]): Promise<tf.LayersModel> {
  return rebuilt(a, await loadFull(a), (cfg) => {
    const frozen = ancestors(cfg.config.layers, from);
    const keep = ancestors(cfg.config.layers, to);
    const blocks = cfg.config.layers.filter((l) => keep.has(l.name) && !frozen.has(l.name));
    // References to the frozen part's last layer now read the reshaped input instead.
    const rewire = (n: unknown): unknown => Array.isArray(n)
      ? (n[0] === from ? [BLOCKS_MAP, 0, 0, n[3] ?? {}] : n.map(rewire)) : n;
    for (const l of blocks) l.inbound_nodes = l.inbound_nodes.map(rewire);
    const D = map.reduce((x, y) => x * y, 1);
    cfg.config.layers = [
      { name: BLOCKS_INPUT, class_name: "InputLayer", inbound_nodes: [],
        config: { batch_input_shape: [null, D], dtype: "float32", sparse: false, name: BLOCKS_INPUT } },
      { name: BLOCKS_MAP, class_name: "Reshape", inbound_nodes: [[[BLOCKS_INPUT, 0, 0, {}]]],
        config: { name: BLOCKS_MAP, trainable: true, dtype: "float32", target_shape: [...map] } },
      ...blocks,
      { name: BLOCKS_POOL, class_name: "GlobalAveragePooling2D", inbound_nodes: [[[to, 0, 0, {}]]],
        config: { name: BLOCKS_POOL, trainable: true, dtype: "float32", data_format: "channels_last" } },
    ];
    cfg.config.input_layers = [[BLOCKS_INPUT, 0, 0]];
    cfg.config.output_layers = [[BLOCKS_POOL, 0, 0]];
  });
}
const BLOCKS_INPUT = "frozen_features", BLOCKS_MAP = "frozen_map", BLOCKS_POOL = "blocks_pool";

export interface Backbone {
  /** "name@size": recorded in checkpoints (meta.backbone) and in the feature cache key. */
  readonly id: string;
  readonly spec: BackboneSpec;
  readonly inputSize: number;
  readonly featureDim: number;
  /** sha256 (first 16 hex) of the weight bytes: a change of weights invalidates cached features. */
  readonly weightsId: string;
  /**
   * Fine-tuning: how many of the last blocks are NOT in this (frozen) part. 0: the whole backbone,
   * features pooled. k > 0: features() stops where spec.blockEnds[k-1] says and returns that
   * feature map flattened ([B, h·w·c], what the trainable blocks take), cached like pooled ones.
   */
  readonly unfrozenBlocks: number;
  /** [B, H, W, 3] pixels in [0, 1] (resized bilinearly if H, W ≠ inputSize) → [B, featureDim]. */
  features(images: tf.Tensor4D): tf.Tensor2D;
  /**
   * With unfrozenBlocks > 0: a new trainable copy (pretrained weights) of the blocks after the
   * frozen part, [B, featureDim] → [B, pooled features]. Throws when unfrozenBlocks is 0.
   */
  trainableBlocks(): Promise<tf.LayersModel>;
  /** A combination (BACKBONE_COMBOS): its backbones, whose features are concatenated in this order. */
  readonly parts?: readonly Backbone[];
  dispose(): void;
}

export interface LoadBackboneOptions extends UrlModelOptions {
  /** Input side; default: the size in the id ("name@128"), else the backbone's native size. */
  inputSize?: number;
  /** Fine-tuning: leave the last k blocks out of the frozen part (see Backbone.unfrozenBlocks). */
  unfreezeBlocks?: number;
  /** Use this spec instead of the registry entry (tests, experiments). */
  spec?: BackboneSpec;
  /** Load again even if this process already has it (by default a backbone is loaded once). */
  reload?: boolean;
  /** Run one forward pass on zeros at load, so a wrong cut fails before a long extraction (default true). */
  trialPass?: boolean;
}

const loaded = new Map<string, Promise<Backbone>>();

/** Whether `name` has blocks fine-tuning can unfreeze (a layers model with spec.blockEnds). */
export function fineTunable(name: string): boolean {
  return isBackboneName(name) && (BACKBONES[name].blockEnds?.length ?? 0) > 0;
}

/** Load a backbone by name or "name@size". Loaded once per process, input size and frozen part. */
export async function loadBackbone(id: string, o: LoadBackboneOptions = {}): Promise<Backbone> {
  const parsed = parseBackboneId(id);
  if (parsed.name.includes("+")) return loadCombo(parsed.name.split("+"), parsed.inputSize, o);
  const spec = o.spec ?? (isBackboneName(parsed.name) ? BACKBONES[parsed.name] : undefined);
  if (!spec) throw new Error(`unknown backbone "${parsed.name}": choose one of ${BACKBONE_NAMES.join(", ")}`);
  let size = o.inputSize ?? parsed.inputSize ?? spec.nativeSize;
  if (!spec.resizable && size !== spec.nativeSize) {
    const log = o.log ?? ((l: string) => console.error(l));
    const fixed = `${spec.nativeSize}×${spec.nativeSize}`;
    log(`backbone ${spec.name}: a ${spec.format} model with a fixed ${fixed} input; using that instead of ${size}`);
    size = spec.nativeSize;
  }
  if (!Number.isInteger(size) || size < 32 || size > 512) {
    throw new Error(`backbone ${spec.name}: input size ${size} is out of range (32..512)`);
  }
  if (spec.sizeStep && size % spec.sizeStep !== 0) {
    throw new Error(`backbone ${spec.name}: input size ${size} is not a multiple of ${spec.sizeStep} ` +
      `(its strides); try ${Math.max(spec.sizeStep, Math.round(size / spec.sizeStep) * spec.sizeStep)}`);
  }
  const unfreeze = o.unfreezeBlocks ?? 0;
  const ends = spec.blockEnds ?? [];
  if (!Number.isInteger(unfreeze) || unfreeze < 0 || unfreeze > ends.length) {
    throw new Error(`backbone ${spec.name}: cannot unfreeze ${unfreeze} blocks ` + (ends.length
      ? `(0..${ends.length})` : `(a ${spec.format} model: it can only be used frozen, unfreezeBlocks 0)`));
  }
  const key = JSON.stringify([spec, size, unfreeze, resolve(o.cacheRoot ?? CACHE_ROOT), o.mirrors ?? null]);
  let p = o.reload ? undefined : loaded.get(key);
  if (!p) {
    p = build(spec, size, unfreeze, o).then((bb) => ({ ...bb, dispose: () => { loaded.delete(key); bb.dispose(); } }));
    loaded.set(key, p);
    p.catch(() => loaded.delete(key));
  }
  return p;
}

/**
 * Backbones run side by side on the same input side, their pooled features concatenated: frozen
 * whole (no blocks to fine-tune), each part's features cached on its own.
 */
async function loadCombo(names: string[], size: number | null, o: LoadBackboneOptions): Promise<Backbone> {
  const label = names.join("+");
  if ((o.unfreezeBlocks ?? 0) > 0) {
    throw new Error(`backbone ${label}: a combination can only be used frozen, unfreezeBlocks 0`);
  }
  if (new Set(names).size !== names.length) throw new Error(`backbone ${label}: names a backbone twice`);
  const native = names.map((n) => isBackboneName(n) ? BACKBONES[n].nativeSize : 224);
  const inputSize = o.inputSize ?? size ?? Math.min(...native);
  const parts: Backbone[] = [];
  for (const n of names) parts.push(await loadBackbone(n, { ...o, inputSize, unfreezeBlocks: 0, spec: undefined }));
  const sizes = new Set(parts.map((p) => p.inputSize));
  if (sizes.size !== 1) throw new Error(`backbone ${label}: its parts cannot share the input side ${inputSize}`);
  const featureDim = parts.reduce((s, p) => s + p.featureDim, 0);
  const spec: BackboneSpec = {
    ...parts[0]!.spec, name: label, title: parts.map((p) => p.spec.title).join(" + "),
    imagenet: parts.every((p) => p.spec.imagenet), weights: parts.map((p) => p.spec.weights).join("; "),
    license: parts.map((p) => p.spec.license).join("; "), featureDim, blockEnds: undefined,
  };
  return {
    id: `${label}@${inputSize}`, spec, inputSize, featureDim, unfrozenBlocks: 0, parts,
    weightsId: sha256Hex(new TextEncoder().encode(parts.map((p) => p.weightsId).join("+"))).slice(0, 16),
    features: (images) => tf.tidy(() => tf.concat(parts.map((p) => p.features(images)), 1) as tf.Tensor2D),
    trainableBlocks: () => Promise.reject(new Error(`backbone ${label}: frozen whole, no blocks to train`)),
    dispose: () => { for (const p of parts) p.dispose(); },
  };
}

async function artifactsOf(spec: BackboneSpec, o: LoadBackboneOptions): Promise<Artifacts> {
  switch (spec.source.kind) {
    case "nsfwjs": return nsfwjsArtifacts(spec.source.model);
    case "npm": return npmArtifacts(spec.source.package, spec.source.file);
    case "url": return readArtifactsDir(await ensureUrlModel(spec, o));
  }
}

async function build(spec: BackboneSpec, size: number, unfreeze: number, o: LoadBackboneOptions): Promise<Backbone> {
  const a = await artifactsOf(spec, o);
  const weightsId = sha256Hex(new Uint8Array(a.weightData)).slice(0, 16);
  const [lo, hi] = spec.inputRange;
  const nodes = typeof spec.featureNode === "string" ? [spec.featureNode] : [...spec.featureNode];
  const frozenEnd = unfreeze > 0 ? spec.blockEnds![unfreeze - 1]! : null;
  let run: (x: tf.Tensor4D) => tf.Tensor[];
  let dispose: () => void;
  let map: readonly number[] | null = null;
  if (spec.format === "layers") {
    // Several layers: the model is cut after the last (deepest) one and every one of them is pooled.
    const cut = frozenEnd ?? nodes.at(-1)!;
    if (frozenEnd && nodes.length !== 1) {
      throw new Error(`backbone ${spec.name}: fine-tuning trains up to one layer, not ${nodes.join("+")}`);
    }
    const trunk = await layersTrunk(a, cut, size, spec.nativeSize).catch((err: unknown) => {
      const why = err instanceof Error ? err.message : String(err);
      throw new Error(`backbone ${spec.name}: cannot cut at "${cut}" for ${size}×${size}: ${why}`);
    });
    const single = frozenEnd != null || nodes.length === 1;
    const outputs = single ? trunk : tf.model({ inputs: trunk.inputs, outputs: nodes.map((n) => {
      if (!trunk.layers.some((l) => l.name === n)) {
        throw new Error(`backbone ${spec.name}: layer "${n}" is not before "${cut}" (list layers in network order)`);
      }
      return trunk.getLayer(n).output as tf.SymbolicTensor;
    }) });
    if (frozenEnd) map = trunk.outputs[0]!.shape.slice(1).map(Number);
    run = (x) => { const y = outputs.predict(x); return Array.isArray(y) ? y : [y]; };
    dispose = () => trunk.dispose();
  } else {
    const sized = spec.sizeConstants ? graphForSize(a, size, spec.sizeConstants) : a;
    const graph = await tf.loadGraphModel(tf.io.fromMemory({
      modelTopology: sized.json.modelTopology as tf.io.ModelArtifacts["modelTopology"], format: "graph-model",
      weightSpecs: weightSpecsOf(sized), weightData: sized.weightData, signature: sized.json.signature,
      userDefinedMetadata: sized.json.userDefinedMetadata as tf.io.ModelArtifacts["userDefinedMetadata"],
      modelInitializer: sized.json.modelInitializer,
    }));
    run = (x) => {
      const out = graph.execute(x, nodes.length === 1 ? nodes[0]! : nodes);
      return Array.isArray(out) ? out : [out];
    };
    dispose = () => graph.dispose();
  }
  const featureDim = map ? map.reduce((x, y) => x * y, 1) : spec.featureDim;
  const bb: Backbone = {
    id: `${spec.name}@${size}`, spec, inputSize: size, featureDim, weightsId, unfrozenBlocks: unfreeze,
    features(images) {
      return tf.tidy(() => {
        let x: tf.Tensor4D = images;
        if (x.shape[1] !== size || x.shape[2] !== size) x = tf.image.resizeBilinear(x, [size, size], false, true);
        x = tf.add(tf.mul(x, hi - lo), lo);
        const outs = run(x);
        // A frozen part's map is kept whole (the trainable blocks read it); features are pooled.
        const parts = outs.map((f) => map ? tf.reshape(f, [f.shape[0]!, -1]) : f.rank === 4 ? tf.mean(f, [1, 2]) : f);
        const f = parts.length === 1 ? parts[0]! : tf.concat(parts, 1);
        if (f.rank !== 2 || f.shape[1] !== featureDim) {
          throw new Error(`backbone ${spec.name}: features of shape [${f.shape}], expected [B, ${featureDim}]`);
        }
        return f as tf.Tensor2D;
      });
    },
    async trainableBlocks() {
      if (!frozenEnd || !map) throw new Error(`backbone ${spec.name}@${size}: frozen whole, no blocks to train`);
      return layersBlocks(a, frozenEnd, nodes[0]!, map);
    },
    dispose,
  };
  // One tiny forward pass: a wrong cut or shape fails here, not in the middle of extraction.
  if (o.trialPass !== false) tf.tidy(() => bb.features(tf.zeros([1, size, size, 3])));
  return bb;
}

// ---------------------------------------------------------------------------
// Feature cache
// ---------------------------------------------------------------------------

/** Bump when the way features are computed changes (and it includes decodeToRgb's version). */
const EXTRACTION = `features-v1/${PREPROCESSING}`;

const FeatureCacheMeta = type({
  version: "'1'",
  backbone: "string",
  weightsId: "string",
  inputSize: "number.integer > 0",
  extraction: "string",
  datasetFingerprint: "string",
  pixels: "'source-files' | 'upsampled-cache'",
  n: "number.integer >= 0",
  dim: "number.integer > 0",
  seconds: "number >= 0",
  createdAt: "string",
});
type FeatureCacheMeta = typeof FeatureCacheMeta.infer;

/**
 * Which photo the features are of: the photo as prepared, or its mirror image (left and right
 * swapped), what a random horizontal flip shows the head when training on cached features.
 */
export type FeatureView = "photo" | "mirrored";

export interface FeatureCache {
  /** Backbone id ("name@size"). */
  backbone: string;
  view: FeatureView;
  n: number;
  dim: number;
  /** n × dim, row i = dataset row i. */
  data: Float32Array;
  /** Seconds the extraction took when it was computed (cold). */
  extractSeconds: number;
  /** Seconds this call took (load from disk when warm). */
  seconds: number;
  reused: boolean;
  path: string;
}

export function featureCachePath(
  ds: Pick<Dataset, "dir">, backbone: Pick<Backbone, "spec" | "inputSize"> & { unfrozenBlocks?: number },
  view: FeatureView = "photo",
): string {
  const k = backbone.unfrozenBlocks ?? 0;
  const part = k > 0 ? `-frozen-to-${backbone.spec.blockEnds![k - 1]}` : "";
  const mirrored = view === "mirrored" ? "-mirrored" : "";
  return join(ds.dir, `features-${backbone.spec.name}-${backbone.inputSize}${part}${mirrored}.f32`);
}

/**
 * What the feature cache records as the backbone: its id, the node(s) pooled (another choice of
 * nodes is other features), and where a frozen part for fine-tuning ends.
 */
function cachedAs(bb: Backbone, view: FeatureView): string {
  const nodes = ` nodes ${[bb.spec.featureNode].flat().join("+")}`;
  const frozen = bb.unfrozenBlocks > 0 ? ` frozen to ${bb.spec.blockEnds![bb.unfrozenBlocks - 1]}` : "";
  return `${bb.id}${nodes}${frozen}${view === "mirrored" ? " of the mirrored photos" : ""}`;
}

/** Row i of each part's features, side by side: a combination's features from its parts' caches. */
function concatFeatures(bb: Backbone, parts: FeatureCache[], view: FeatureView, seconds: number): FeatureCache {
  const n = parts[0]!.n;
  const dim = parts.reduce((s, p) => s + p.dim, 0);
  const data = new Float32Array(n * dim);
  for (let i = 0; i < n; i++) {
    let o = i * dim;
    for (const p of parts) { data.set(p.data.subarray(i * p.dim, (i + 1) * p.dim), o); o += p.dim; }
  }
  const extractSeconds = parts.reduce((s, p) => s + p.extractSeconds, 0);
  return {
    backbone: bb.id, view, n, dim, data, extractSeconds, seconds, reused: parts.every((p) => p.reused),
    path: parts.map((p) => p.path).join(" + "),
  };
}

/**
 * Backbone features of every row of `ds` (every split), from the cache next to the image cache
 * when its key matches, else computed (with progress lines) and written atomically.
 */
export async function datasetFeatures(
  ds: Dataset, bb: Backbone,
  o: { log?: (l: string) => void; force?: boolean; batchSize?: number; view?: FeatureView } = {},
): Promise<FeatureCache> {
  const log = o.log ?? ((l: string) => console.log(l));
  const t0 = performance.now();
  const view = o.view ?? "photo";
  if (bb.parts) {
    const parts: FeatureCache[] = [];
    for (const p of bb.parts) parts.push(await datasetFeatures(ds, p, o));
    return concatFeatures(bb, parts, view, (performance.now() - t0) / 1000);
  }
  const path = featureCachePath(ds, bb, view);
  const fromFiles = !(ds.manifest.synthetic || ds.task === "cifar100");
  const key = {
    backbone: cachedAs(bb, view), weightsId: bb.weightsId, inputSize: bb.inputSize, extraction: EXTRACTION,
    datasetFingerprint: ds.manifest.fingerprint, pixels: fromFiles ? "source-files" : "upsampled-cache",
  } as const;
  const n = ds.manifest.items.length;
  if (!o.force && existsSync(`${path}.json`) && existsSync(path)) {
    const meta = FeatureCacheMeta(JSON.parse(await readFile(`${path}.json`, "utf8")));
    if (!(meta instanceof type.errors) && (Object.keys(key) as (keyof typeof key)[]).every((k) => meta[k] === key[k])
      && meta.n === n && meta.dim === bb.featureDim && (await stat(path)).size === n * bb.featureDim * 4) {
      const data = new Float32Array((await readFile(path)).buffer.slice(0));
      const seconds = (performance.now() - t0) / 1000;
      const took = `extraction took ${meta.seconds.toFixed(1)} s; loaded in ${seconds.toFixed(2)} s`;
      log(`features ${bb.id}${view === "mirrored" ? " (mirrored)" : ""}: ${n} rows from ${path} (cached: ${took})`);
      const extractSeconds = meta.seconds;
      return { backbone: bb.id, view, n, dim: bb.featureDim, data, extractSeconds, seconds, reused: true, path };
    }
    log(`features ${bb.id}: cache at ${path} is stale or damaged; recomputing`);
  }
  if (!fromFiles) {
    const what = ds.manifest.synthetic ? "synthetic" : "CIFAR";
    const size = `${ds.imageSize}×${ds.imageSize}`;
    log(`features ${bb.id}: ${what} data has no source files: upsampling the cached ${size} pixels`);
  }
  const data = new Float32Array(n * bb.featureDim);
  const S = bb.inputSize;
  // Smaller batches at large inputs: the wasm heap never shrinks, and training runs in this process after.
  const batch = o.batchSize ?? Math.max(8, Math.min(32, Math.round(32 * (128 / S) ** 2)));
  const rows = Array.from({ length: n }, (_, i) => i);
  /** One source file's bytes, checked against the sha256 prepare.ts recorded. */
  const sourceBytes = (i: number): Uint8Array => {
    const item = ds.manifest.items[i]!;
    const file = join(ds.manifest.source, item.path);
    let bytes: Uint8Array;
    try { bytes = new Uint8Array(readFileSync(file)); } catch {
      throw new Error(`${file}: source image missing; features are computed from the original files ` +
        "(re-run prepare.ts if the dataset moved)");
    }
    if (sha256Hex(bytes) !== item.sha256) {
      throw new Error(`${file}: changed since prepare.ts cached it (sha256 differs); re-run prepare.ts`);
    }
    return bytes;
  };
  // The files are read here and every decode of the batch handed to sharp at once: its threads then
  // decode the whole batch while the backbone's synchronous forward pass holds this thread (a promise
  // pool would start its next decode only when the forward pass yields).
  const decode = (idx: number[]): Promise<tf.Tensor4D> => {
    if (!fromFiles && view === "photo") return Promise.resolve(imageBatch(ds, idx));
    const side = fromFiles ? S : ds.imageSize;
    const px = side * side * 3;
    const jobs = idx.map((i) => fromFiles ? decodeToRgb(sourceBytes(i), S) : ds.images.subarray(i * px, (i + 1) * px));
    return Promise.all(jobs).then((rows) => {
      const floats = pixelsToFloat32(view === "mirrored" ? rows.map((r) => mirrorRgb(r, side)) : rows, side);
      return tf.tensor4d(floats, [idx.length, side, side, 3]);
    });
  };
  /** The next batch's decode, started now; a failure is reported where it is awaited. */
  const prefetch = (idx: number[]): Promise<tf.Tensor4D> => {
    const p = decode(idx);
    p.catch(() => {});
    return p;
  };
  let lastLog = performance.now();
  let next = prefetch(rows.slice(0, batch));
  for (let start = 0; start < n; start += batch) {
    const x = await next;
    if (start + batch < n) next = prefetch(rows.slice(start + batch, start + 2 * batch));
    const f = bb.features(x);
    x.dispose();
    data.set(await f.data() as Float32Array, start * bb.featureDim);
    f.dispose();
    const done = Math.min(n, start + batch);
    if (performance.now() - lastLog > 5000 || done === n) {
      lastLog = performance.now();
      const s = (performance.now() - t0) / 1000;
      const left = done < n ? `, ~${((n - done) / (done / s)).toFixed(0)} s left` : "";
      log(`features ${bb.id}: ${done}/${n} images, ${(done / s).toFixed(1)} img/s${left}`);
    }
  }
  const seconds = (performance.now() - t0) / 1000;
  const meta: FeatureCacheMeta = {
    version: "1", ...key, n, dim: bb.featureDim, seconds: Number(seconds.toFixed(3)),
    createdAt: new Date().toISOString(),
  };
  writeAtomic(path, new Uint8Array(data.buffer));
  writeAtomic(`${path}.json`, JSON.stringify(meta, null, 2)); // written last: it is what says "complete"
  log(`features ${bb.id}: ${n} images in ${seconds.toFixed(1)} s, cached in ${path}`);
  return { backbone: bb.id, view, n, dim: bb.featureDim, data, extractSeconds: seconds, seconds, reused: false, path };
}

/**
 * A frozen backbone and its features of every row of `ds`: what a run on a backbone needs before its
 * first step. `bun prepare.ts features` calls it ahead of train.ts (the loop does, on its own
 * clock), and train.ts's startRun calls it again and finds the features cached.
 */
export async function backboneWithFeatures(
  ds: Dataset, name: string,
  o: { inputSize?: number; unfreezeBlocks?: number; mirrored?: boolean; log?: (l: string) => void } = {},
): Promise<{ backbone: Backbone; features: FeatureCache; mirrored: FeatureCache | null }> {
  const backbone = await loadBackbone(name, {
    inputSize: o.inputSize, unfreezeBlocks: o.unfreezeBlocks, ...(o.log ? { log: o.log } : {}),
  });
  const features = await datasetFeatures(ds, backbone, { log: o.log });
  const mirrored = o.mirrored ? await datasetFeatures(ds, backbone, { log: o.log, view: "mirrored" }) : null;
  return { backbone, features, mirrored };
}

/**
 * The fine-tuned blocks and the head as one model, [B, frozen features] → the head's outputs: what
 * a fine-tuned checkpoint holds, and what backbonePredictor runs over the frozen part's features.
 */
export function blocksAndHead(blocks: tf.LayersModel, head: tf.LayersModel): tf.LayersModel {
  return tf.model({ inputs: blocks.inputs, outputs: head.apply(blocks.outputs[0]!) as tf.SymbolicTensor[] });
}

/**
 * Cached features of dataset rows `indices`, as a [B, D] tensor. With `mirror`, each row is the
 * mirrored photo's features instead when mirror.rand() < 0.5: a random horizontal flip.
 */
export function featureRows(
  fc: FeatureCache, indices: ArrayLike<number>, mirror?: { fc: FeatureCache; rand: () => number },
): tf.Tensor2D {
  if (mirror && (mirror.fc.n !== fc.n || mirror.fc.dim !== fc.dim)) {
    throw new Error(`mirrored features ${mirror.fc.n}×${mirror.fc.dim} do not match ${fc.n}×${fc.dim}`);
  }
  const out = new Float32Array(indices.length * fc.dim);
  for (let b = 0; b < indices.length; b++) {
    const i = indices[b]!;
    if (i < 0 || i >= fc.n) throw new Error(`feature row ${i} out of range (cache has ${fc.n})`);
    const src = mirror && mirror.rand() < 0.5 ? mirror.fc : fc;
    out.set(src.data.subarray(i * fc.dim, (i + 1) * fc.dim), b * fc.dim);
  }
  return tf.tensor2d(out, [indices.length, fc.dim]);
}

/**
 * The Predictor of a head trained on backbone features: with `cache` (the dataset's features),
 * rows are looked up by index, as in training; without, the backbone runs on the images given
 * (new photos: pass them at backbone.inputSize for the same pixels as training).
 */
export function backbonePredictor(head: tf.LayersModel, bb: Backbone, cache?: FeatureCache): Predictor {
  return (images, indices) => {
    const x = cache ? featureRows(cache, indices) : bb.features(images);
    const out = head.predict(x);
    x.dispose();
    const outs = Array.isArray(out) ? out : [out];
    return { probs: outs[0]!, yields: outs[1] };
  };
}

/** Human-readable line for meta.notes and logs. */
export function describeBackbone(bb: Backbone): string {
  if (bb.parts) {
    return `frozen backbones ${bb.id}, pooled features concatenated (${bb.featureDim}-d; the checkpoint holds only ` +
      `the head): ${bb.parts.map(describeBackbone).join(" | ")}`;
  }
  const weights = bb.spec.imagenet ? "ImageNet" : bb.spec.weights;
  const k = bb.unfrozenBlocks;
  const holds = k > 0
    ? `the checkpoint holds the last ${k} block(s), fine-tuned, and the head; the frozen part ends at ` +
      `${bb.spec.blockEnds![k - 1]} (its ${bb.featureDim}-value feature maps are what is cached)`
    : `the checkpoint holds only the head over ${bb.featureDim}-d pooled features`;
  return `${k > 0 ? "partly fine-tuned" : "frozen"} backbone ${bb.id}: ${bb.spec.title}; input ` +
    `${bb.inputSize}x${bb.inputSize}, pixels scaled to [${bb.spec.inputRange.join(", ")}]; weights ${weights} ` +
    `(sha256 ${bb.weightsId}…); ${holds}`;
}

/** Temp folders of downloads whose process is gone (killed mid-download): never a valid cache. */
async function removeDeadTemps(dest: string): Promise<void> {
  const dir = resolve(dest, "..");
  if (!existsSync(dir)) return;
  const prefix = `${dest.slice(dir.length + 1)}.tmp-`;
  for (const d of await readdir(dir)) {
    if (!d.startsWith(prefix)) continue;
    const pid = Number(d.slice(prefix.length).split("-")[0]);
    let alive = false;
    try { process.kill(pid, 0); alive = true; } catch { /* no such process */ }
    if (!alive) await rm(join(dir, d), { recursive: true, force: true });
  }
}
