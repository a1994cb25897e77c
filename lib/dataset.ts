/**
 * The prepared dataset as every script sees it: the tasks, the manifest, the cache's layout on disk,
 * and loading it. prepare.ts writes the cache (and re-exports all of this); train.ts, evaluate(),
 * the backbones' feature cache, checkpoints and the loop's integrity check read it through here.
 *
 * Layout: CACHE_ROOT/active.json names the active dataset's folder (the last one prepared), which
 * holds images.u8 (N×S×S×3 uint8, HWC, in manifest order), manifest.json and skipped.tsv. When
 * prepare was asked for more sizes (`--sizes 64,96`), active.json also lists the folders of the same
 * images at the other sizes: one full cache each, the same items in the same order and split.
 */
import { existsSync, readFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { homedir } from "node:os";
import { join, resolve } from "node:path";
import { type } from "arktype";
import * as tf from "@tensorflow/tfjs";
import { pixelsToFloat32, sha256File, sha256Hex } from "./images.ts";

/** The three tasks: what a dataset's labels mean and which metrics evaluate() reports. */
export const Task = type("'waste' | 'cifar100' | 'screening'");
export type Task = typeof Task.infer;

/** Where prepared datasets live (AR_CACHE overrides). */
export const CACHE_ROOT = resolve(process.env.AR_CACHE ?? join(homedir(), ".cache", "autoresearch-vision"));

/**
 * Where an image is used: train is what models learn from, val what every keep decision reads,
 * test what only a final re-measure reads (`bun prepare.ts evaluate --split test`).
 */
export const Split = type("'train' | 'val' | 'test'");
export type Split = typeof Split.infer;

const ManifestItem = type({
  path: "string",
  label: "number.integer >= 0",
  sha256: "string",
  split: Split,
  yield: "number",
});
/**
 * What a model trained on a dataset must match: the task, the classes in label order, the positive
 * class (screening), the image side and the preprocessing. A checkpoint records the same fields.
 */
export const DatasetSignature = type({
  task: Task,
  classes: "string[]",
  positiveClass: "string | null",
  imageSize: "number.integer > 0",
  preprocessing: "string",
});

/**
 * The manifest's layout and split rule: version 1 had train/val only, so a version-1 cache is
 * re-prepared rather than read with a different meaning.
 */
export const MANIFEST_VERSION = "2";

export const Manifest = DatasetSignature.merge({
  version: `'${MANIFEST_VERSION}'`,
  source: "string",
  synthetic: "boolean",
  /** True for data/sample (absent in older caches): its numbers are no measure of model quality. */
  "sample?": "boolean",
  yieldSource: "string",
  fingerprint: "string",
  createdAt: "string",
  skipped: "number.integer >= 0",
  duplicates: "number.integer >= 0",
  items: ManifestItem.array(),
  /**
   * sha256 of images.u8 and of this manifest (without createdAt and checksums), written last by prepare:
   * a cache changed afterwards (by a train.ts, by hand) is rebuilt by prepare and refused by loadCache.
   * Absent in caches written before the check existed: those still load, and prepare rebuilds them once.
   */
  "checksums?": { images: "string", manifest: "string" },
});
export type Manifest = typeof Manifest.infer;
type Checksums = NonNullable<Manifest["checksums"]>;

// ---------------------------------------------------------------------------
// The layout on disk
// ---------------------------------------------------------------------------

/** `dir`: the active dataset at its task's own size; `sizes`: size in pixels → folder of the other sizes. */
export const ActivePointer = type({ dir: "string", "sizes?": "Record<string, string>" });
export type ActivePointer = typeof ActivePointer.infer;

/** The file naming the active dataset's folder. */
export function activePointerPath(cacheRoot = CACHE_ROOT): string {
  return join(cacheRoot, "active.json");
}

/** The files of one prepared dataset's folder. */
export function cacheFiles(dir: string): { images: string; manifest: string; skipped: string } {
  return { images: join(dir, "images.u8"), manifest: join(dir, "manifest.json"), skipped: join(dir, "skipped.tsv") };
}

/** active.json, read and checked; a one-line error naming it when there is none. */
export function readActivePointer(cacheRoot = CACHE_ROOT): ActivePointer {
  const pointer = activePointerPath(cacheRoot);
  if (!existsSync(pointer)) {
    throw new Error(`${pointer}: no prepared dataset; run \`bun prepare.ts --source DIR\` first`);
  }
  let raw: unknown;
  try { raw = JSON.parse(readFileSync(pointer, "utf8")); } catch { throw new Error(`${pointer}: not valid JSON`); }
  const p = ActivePointer(raw);
  if (p instanceof type.errors) throw new Error(`${pointer}: ${p.summary}`);
  return p;
}

/** The active dataset's folder; a one-line error naming active.json when there is none. */
export function activeCacheDir(cacheRoot = CACHE_ROOT): string {
  return readActivePointer(cacheRoot).dir;
}

/**
 * The image sides the active dataset is cached at (its own size plus any other `--sizes`) and `current`
 * (HP's value, so HP_SPACE always holds it; a run at an uncached size fails with loadCacheAtSize's
 * error), ascending. A `current` of 0 (the prepared default size) stands in for the active cache's own
 * size. Only `current` when nothing is prepared, so `train.ts --print-hp` works before prepare.
 */
export function cachedImageSizes(current: number, cacheRoot = CACHE_ROOT): number[] {
  const sizes = [current];
  try {
    const p = readActivePointer(cacheRoot);
    // 0 stands for the prepared default size: listing that size as well would be a move that changes nothing.
    if (current !== 0) sizes.push(parseManifest(readFileSync(cacheFiles(p.dir).manifest, "utf8"), p.dir).imageSize);
    sizes.push(...Object.keys(p.sizes ?? {}).map(Number));
  } catch { /* nothing prepared, or unreadable: loadCache says why when a run starts */ }
  return [...new Set(sizes)].sort((a, b) => a - b);
}

export function parseManifest(text: string, dir: string): Manifest {
  const path = cacheFiles(dir).manifest;
  let raw: unknown;
  try { raw = JSON.parse(text); } catch { throw new Error(`${path}: not valid JSON`); }
  const version = typeof raw === "object" && raw !== null && "version" in raw ? raw.version : undefined;
  if (version !== MANIFEST_VERSION) {
    throw new Error(`${path}: manifest version ${JSON.stringify(version)}, this prepare.ts writes ` +
      `${MANIFEST_VERSION} (train/val/test split); re-run prepare.ts with the same --task and --source`);
  }
  const m = Manifest(raw);
  if (m instanceof type.errors) throw new Error(`${path}: not a valid manifest: ${m.summary}`);
  return m;
}

// ---------------------------------------------------------------------------
// Checksums: a cache whose content no longer matches its manifest is never used
// ---------------------------------------------------------------------------

/** sha256 of a manifest without createdAt (a rebuild of the same data keeps it) and without its checksums. */
function manifestSha256(m: Manifest): string {
  const { createdAt: _createdAt, checksums: _checksums, ...content } = m;
  return sha256Hex(new TextEncoder().encode(JSON.stringify(content)));
}

/** The checksums prepare records in a manifest, over the images it writes with it. */
export function cacheChecksums(m: Manifest, images: Uint8Array): Checksums {
  return { images: sha256Hex(images), manifest: manifestSha256(m) };
}

/**
 * Why the cache in `dir` does not match its manifest (one line naming the file), or null when it does.
 * `images` is images.u8's content when already read; otherwise the file is hashed from disk.
 */
export async function cacheMismatch(dir: string, m: Manifest, images?: Uint8Array): Promise<string | null> {
  const files = cacheFiles(dir);
  if (m.checksums === undefined) {
    return `${files.manifest} records no checksums (an older prepare.ts wrote it), so its content cannot be verified`;
  }
  if (manifestSha256(m) !== m.checksums.manifest) {
    return `${files.manifest} does not match the sha256 it recorded: it was edited after prepare`;
  }
  const expected = m.items.length * m.imageSize * m.imageSize * 3;
  const size = images?.length ?? (existsSync(files.images) ? Bun.file(files.images).size : -1);
  if (size !== expected) {
    const has = size < 0 ? "is missing" : `holds ${size} bytes`;
    return `${files.images} ${has}, but ${files.manifest} lists ${m.items.length} images (${expected} bytes)`;
  }
  const sha = images === undefined ? await sha256File(files.images) : sha256Hex(images);
  if (sha !== m.checksums.images) {
    return `${files.images} does not match the sha256 recorded in ${files.manifest}: it was changed after prepare`;
  }
  return null;
}

/** Shell-quotes a word only when it needs it. */
function shellWord(s: string): string {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replaceAll("'", "'\\''")}'`;
}

/**
 * The command that prepares this manifest's dataset again (its task, source, positive class and yields),
 * with `--sizes` when `sizes` names more than the manifest's own.
 */
export function prepareCommandFor(m: Manifest, sizes: number[] = []): string {
  const source = m.synthetic ? "synthetic" : m.sample ? "sample" : m.source;
  const words = ["bun", "prepare.ts", "--task", m.task, "--source", source];
  if (m.positiveClass !== null) words.push("--positive", m.positiveClass);
  if (m.yieldSource.startsWith("csv:")) words.push("--yields", m.yieldSource.slice("csv:".length));
  const all = [...new Set([m.imageSize, ...sizes])].sort((a, b) => a - b);
  if (all.length > 1) words.push("--sizes", all.join(","));
  return words.map(shellWord).join(" ");
}

/** What identifies the active dataset's content; "missing" where a part is absent or unreadable. */
export interface CacheFingerprint {
  dir: string;
  /** sha256 of images.u8. */
  images: string;
  /** sha256 of the manifest without createdAt: re-preparing the same source gives the same value. */
  manifest: string;
  task: Task | null;
}

/** The active dataset's fingerprint, for a check that nothing changed the data between two moments. */
export async function cacheFingerprint(cacheRoot = CACHE_ROOT): Promise<CacheFingerprint> {
  const missing = { dir: "missing", images: "missing", manifest: "missing", task: null };
  let dir: string;
  try { dir = activeCacheDir(cacheRoot); } catch { return missing; }
  const files = cacheFiles(dir);
  let m: Manifest;
  try { m = parseManifest(readFileSync(files.manifest, "utf8"), dir); } catch { return { ...missing, dir }; }
  if (!existsSync(files.images)) return { ...missing, dir };
  const { createdAt: _createdAt, ...content } = m;
  const hasher = new Bun.CryptoHasher("sha256").update(JSON.stringify(content));
  // The other sizes count as part of the data: their recorded checksums (loadCache holds each cache to
  // its own) join the hash, so re-preparing one of them is a change too. Without --sizes: as before.
  const p = readActivePointer(cacheRoot);
  for (const [size, at] of Object.entries(p.sizes ?? {}).sort(([a], [b]) => Number(a) - Number(b))) {
    let other: Manifest["checksums"] | "missing" = "missing";
    try { other = parseManifest(readFileSync(cacheFiles(at).manifest, "utf8"), at).checksums ?? "missing"; } catch {}
    hasher.update(JSON.stringify({ size, dir: at, checksums: other }));
  }
  return { dir, images: await sha256File(files.images), manifest: hasher.digest("hex"), task: m.task };
}

// ---------------------------------------------------------------------------
// Loading the cache (what train.ts and evaluate() read)
// ---------------------------------------------------------------------------

export interface Dataset {
  dir: string;
  manifest: Manifest;
  /** N×S×S×3 uint8, HWC. */
  images: Uint8Array;
  labels: Int32Array;
  yields: Float32Array;
  train: Int32Array;
  val: Int32Array;
  /** Read only by a deliberate re-measure (evaluate(…, { split: "test" })), never by a keep decision. */
  test: Int32Array;
  numClasses: number;
  imageSize: number;
  task: Task;
}

/** The active dataset (the last one prepared), or the cache in `dir`. */
export async function loadCache(dir?: string, cacheRoot = CACHE_ROOT): Promise<Dataset> {
  const at = dir ?? activeCacheDir(cacheRoot);
  const files = cacheFiles(at);
  const manifest = parseManifest(await readFile(files.manifest, "utf8"), at);
  const images = new Uint8Array(await readFile(files.images));
  const px = manifest.imageSize * manifest.imageSize * 3;
  if (images.length !== manifest.items.length * px) {
    const expected = manifest.items.length * px;
    const fix = prepareCommandFor(manifest);
    throw new Error(`${files.images}: ${images.length} bytes, expected ${expected}; rebuild it: \`${fix}\``);
  }
  // Hashing costs ~1 ms per MB; it keeps train.ts and evaluate() off a cache changed after prepare.
  const why = manifest.checksums === undefined ? null : await cacheMismatch(at, manifest, images);
  if (why !== null) throw new Error(`${why}; rebuild it: \`${prepareCommandFor(manifest)}\``);
  const idx = (split: Split) =>
    Int32Array.from(manifest.items.flatMap((it, i) => (it.split === split ? [i] : [])));
  return {
    dir: at, manifest, images,
    labels: Int32Array.from(manifest.items, (it) => it.label),
    yields: Float32Array.from(manifest.items, (it) => it.yield),
    train: idx("train"), val: idx("val"), test: idx("test"),
    numClasses: manifest.classes.length, imageSize: manifest.imageSize, task: manifest.task,
  };
}

/**
 * The active dataset at `size` pixels: the active cache itself when that is its size or `size` is 0, else the cache
 * prepare made with `--sizes`, refused unless it holds the same images in the same split. An uncached
 * size is a one-line error naming the command that prepares it.
 */
export async function loadCacheAtSize(size: number, cacheRoot = CACHE_ROOT): Promise<Dataset> {
  const p = readActivePointer(cacheRoot);
  const own = await loadCache(p.dir, cacheRoot);
  if (size === 0 || own.imageSize === size) return own; // 0: the size prepared by default
  const at = p.sizes?.[String(size)];
  const cached = [own.imageSize, ...Object.keys(p.sizes ?? {}).map(Number)];
  if (at === undefined) {
    const fix = prepareCommandFor(own.manifest, [...cached, size]);
    throw new Error(`${activePointerPath(cacheRoot)}: the active dataset is not cached at ${size} px (cached: `
      + `${cached.sort((a, b) => a - b).join(", ")}): prepare it with \`${fix}\``
      + ", or set HP.imageSize to one of those");
  }
  const ds = await loadCache(at, cacheRoot);
  const key = (m: Manifest) => JSON.stringify([m.task, m.classes, m.positiveClass, m.yieldSource,
    m.items.map((it) => [it.path, it.sha256, it.label, it.split, it.yield])]);
  if (ds.imageSize !== size || key(ds.manifest) !== key(own.manifest)) {
    throw new Error(`${cacheFiles(at).manifest}: not the active dataset's images and split at ${size} px; `
      + `prepare again: \`${prepareCommandFor(own.manifest, cached)}\``);
  }
  return ds;
}

/** Images at `indices` as a float32 tensor in [0, 1], shape [B, S, S, 3]. */
export function imageBatch(ds: Dataset, indices: ArrayLike<number>): tf.Tensor4D {
  const px = ds.imageSize * ds.imageSize * 3;
  const rows = Array.from(indices, (i) => ds.images.subarray(i * px, (i + 1) * px));
  // The same scaling predict.ts applies to a new photo (lib/images.ts).
  return tf.tensor4d(pixelsToFloat32(rows, ds.imageSize), [indices.length, ds.imageSize, ds.imageSize, 3]);
}

/**
 * What a model must provide to evaluate(): class probabilities [B, C] (and, for waste, yields [B]
 * or [B, 1]) for a batch of evaluated images in [0, 1]. `indices` are the dataset rows, so a predictor
 * built on cached backbone features can look them up.
 */
export type Predictor = (images: tf.Tensor4D, indices: Int32Array) =>
  | { probs: tf.Tensor; yields?: tf.Tensor }
  | Promise<{ probs: tf.Tensor; yields?: tf.Tensor }>;
