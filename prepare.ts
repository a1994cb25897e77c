/**
 * prepare.ts — the fixed harness of autoresearch-vision. The research agent never edits this file.
 *
 * It holds the constants of the game (time budget, image size, task), turns a data source into a
 * compact uint8 cache, loads that cache for train.ts, and owns evaluate(): the ground-truth metric
 * that the loop trusts.
 *
 * Usage:
 *   bun prepare.ts                                          # waste task, from the HuggingFace hub
 *   bun prepare.ts --source ../shared/datasets/waste3       # waste task, from a local ImageFolder
 *   bun prepare.ts --source sample                          # the small sample in data/sample: trying the tool only
 *   bun prepare.ts --task screening --source DIR --positive trash
 *   bun prepare.ts --task cifar100                          # official CIFAR-100 binary archive
 *   bun prepare.ts --source synthetic                       # SYNTHETIC images, plumbing tests only
 *   bun prepare.ts --source DIR --sizes 64,96               # also cache the same images and split at 96 px
 *   bun prepare.ts evaluate --model checkpoints/latest      # re-measure a saved checkpoint on val
 *   bun prepare.ts evaluate --model DIR --split test        # ... on test, which no keep decision reads
 *   bun prepare.ts features --backbone nsfwjs-mobilenetv2 --size 224   # cache a backbone's features
 *   bun prepare.ts features --backbone nsfwjs-mobilenetv2 --unfreeze 1  # ... of its frozen part (fine-tuning)
 *   bun prepare.ts features --backbone nsfwjs-mobilenetv2 --mirrored    # ... and of every photo mirrored
 *
 * Environment: AR_CACHE (cache root), AR_TASK / AR_SOURCE / AR_POSITIVE (defaults for the flags),
 * AR_BACKEND (see lib/backend.ts).
 */
import { readFile, stat, writeFile } from "node:fs/promises";
import { existsSync } from "node:fs";
import { join, relative, resolve } from "node:path";
import { type } from "arktype";
import { cac } from "cac";
import { replaceDirAtomic, writeAtomic } from "./lib/atomic.ts";
import {
  activePointerPath, CACHE_ROOT, cacheChecksums, cacheFiles, cacheMismatch, imageBatch, loadCache, loadCacheAtSize,
  Manifest, MANIFEST_VERSION, parseManifest, type ActivePointer, type Split, Task, type Dataset, type Predictor,
} from "./lib/dataset.ts";
import { decodeToRgb, mapPool, PREPROCESSING, RESIZED, resizeRgb, sha256Hex } from "./lib/images.ts";
import {
  downloadCifar100, downloadHfDataset, linkReport, listImageFolder, loadCifar100, mapWasteLabel, WASTE_CLASSES,
  type WasteClass, REAL_SETS_HINT, SAMPLE_DIR, SAMPLE_NOTE, sampleFolder,
} from "./lib/sources.ts";

// The dataset, its cache layout and the loader live in lib/dataset.ts (checkpoints and backbones read
// them too); they are part of the harness, so they are reachable from here.
export {
  activeCacheDir, activePointerPath, CACHE_ROOT, cachedImageSizes, cacheFiles, cacheFingerprint, imageBatch, loadCache,
  loadCacheAtSize, Manifest, prepareCommandFor, Split, Task, type CacheFingerprint, type Dataset, type Predictor,
} from "./lib/dataset.ts";

// ---------------------------------------------------------------------------
// Constants (fixed, do not modify)
// ---------------------------------------------------------------------------

/** Seconds of training wall-clock per experiment (warm-up/compile steps are not counted). */
export const TIME_BUDGET = 300;
/** Side of the square images in the cache, fed to the model and to evaluate() (ImageFolder tasks). */
export const IMAGE_SIZE = 64;
/** CIFAR-100 is kept at its native 32×32. */
export const CIFAR_IMAGE_SIZE = 32;
/**
 * The sides `--sizes` may add (train.ts's HP.imageSize picks among those prepared). Each is a
 * full cache of its own, made from the original photos at that side, with the same images and split.
 * CIFAR-100's photos are 32×32: a larger side is an upsampling of them (no detail added, only more
 * pixels for the model to look at).
 */
export const EXTRA_IMAGE_SIZES = [32, 48, 64, 96, 128] as const;
/** Images per forward pass in evaluate(): bounded memory, same result for any value. */
export const EVAL_BATCH_SIZE = 128;
/**
 * Share of each class held out for validation: what every keep decision reads. The same 0.2 as the
 * old two-way split, so every image that was val stays val. CIFAR-100 carves it from its train set.
 */
export const VAL_FRACTION = 0.2;
/**
 * Share of each class held out for test, read only by a final re-measure. As large as val: on the
 * small sets the test interval is what a person trusts, and a smaller test set would be wider than the
 * val figures it checks (on ~230 images ±0.04 at an accuracy of 0.9). Training keeps 60%. CIFAR-100's
 * test split is its official 10,000-image test set instead.
 */
export const TEST_FRACTION = 0.2;
/**
 * The split rule, part of every cache's fingerprint: a cache split by another rule is re-prepared.
 * An image's own side is set by the first 32 bits of its sha256 as a fraction in [0, 1).
 */
export const SPLIT_RULE = `sha256[0:8]/2^32: val < ${VAL_FRACTION} <= test < ${VAL_FRACTION + TEST_FRACTION} <= train`;
/**
 * waste: combined_score = val_accuracy − YIELD_WEIGHT · yield_mse, every term a fraction: accuracy in
 * [0, 1], not percent. The waste seed computes the same formula on accuracy in percent (99.85), where
 * 0.1 · yield_mse can never move the score by more than 0.1 of a point and the yield head is invisible
 * to the keep rule; here a yield_mse of 0.1 costs 0.01, one accuracy point. So our yield term weighs
 * 100× what the seed's does, on purpose. The seed's score is 100 · val_accuracy − YIELD_WEIGHT · yield_mse,
 * computable from our columns.
 */
export const YIELD_WEIGHT = 0.1;
/** Fewer images than this in a class gets a warning: its accuracy is close to meaningless. */
export const FEW_IMAGES = 30;
export const HF_WASTE_REPO = "NeoAivara/Waste_Classification_data";

/**
 * ASSUMED recoverable-material yield per waste class (fraction of the item's mass that can be
 * recovered). These are placeholders chosen by the developers, NOT measured labels: every image
 * of a class gets the same target until a CSV of measured per-image yields is supplied with
 * `--yields file.csv` (columns: path,yield; path relative to the source folder).
 *   ewaste 0.30: metals and some plastics from boards, casings and cables; the rest is not recovered.
 *   recyclable 0.85: clean dry plastic, glass, metal, paper, cardboard mostly goes back into use.
 *   organic 0.60: mass that ends up as compost after water loss.
 */
export const WASTE_YIELD_TABLE: Record<WasteClass, number> = {
  ewaste: 0.3,
  recyclable: 0.85,
  organic: 0.6,
};

/** The shared waste3 folder (../shared/datasets/waste3): the set WASTE_DATA_NOTE describes. */
const SHARED_WASTE3 = resolve(import.meta.dir, "..", "shared", "datasets", "waste3");

export const WASTE_DATA_NOTE =
  "waste3 caveat: organic has only a handful of photos, and ewaste/recyclable come from different photo " +
  "sources (home scenes vs white studio sheets): accuracy partly measures the background";

// ---------------------------------------------------------------------------
// Task configuration
// ---------------------------------------------------------------------------

interface TaskMetrics {
  /** results.tsv's metric columns, in order. */
  columns: string[];
  /** The default primary (keep rule) and the tie-breaker. */
  primary: string;
  secondary: string;
  lowerIsBetter: string[];
  /** What a session may choose as its primary (`primary`, the default, first). */
  primaries: string[];
  /** Reported by evaluate() and printed in the footer after `columns`, but not results.tsv columns. */
  extra: string[];
  /**
   * For a primary a model that ignores its input can score well on: the metric holding that score in
   * evaluate()'s metrics, or the score itself. A best run within noise of it has learned nothing.
   */
  trivial: Record<string, string | number>;
}

/** Metrics of each task: results.tsv columns, the keep rule's choices, and what a trivial model scores. */
export const TASK_METRICS: Record<Task, TaskMetrics> = {
  waste: {
    columns: ["val_accuracy", "yield_mse", "combined_score"],
    primary: "combined_score", secondary: "val_accuracy", lowerIsBetter: ["yield_mse"],
    primaries: ["combined_score"], extra: [], trivial: {},
  },
  cifar100: {
    columns: ["top1", "top5"], primary: "top1", secondary: "top5", lowerIsBetter: [],
    primaries: ["top1"], extra: [], trivial: {},
  },
  screening: {
    columns: ["bin_acc", "mc_acc"], primary: "bin_acc", secondary: "mc_acc", lowerIsBetter: [],
    primaries: ["bin_acc", "balanced_bin_acc"],
    extra: ["sensitivity", "specificity", "balanced_bin_acc", "prevalence", "trivial_bin_acc"],
    // Always answering the majority side scores trivial_bin_acc; any constant answer balances to 0.5.
    trivial: { bin_acc: "trivial_bin_acc", balanced_bin_acc: 0.5 },
  },
};

/** One line per metric: what it measures (the footer's and the summary's wording). */
export const METRIC_HELP: Record<string, string> = {
  val_accuracy: "share of images whose class is right (a fraction in [0, 1], not percent)",
  yield_mse: "mean squared error of the yield estimate, yields being fractions in [0, 1]; lower is better",
  combined_score: `val_accuracy − ${YIELD_WEIGHT} · yield_mse, both fractions (the waste seed uses percent ` +
    "accuracy, so the yield term weighs 100× more here than there)",
  top1: "share of images whose highest-probability class is right",
  top5: "share of images whose class is among the 5 most probable",
  bin_acc: "share of images on the right side of positive-vs-rest; a model that never says positive " +
    "scores trivial_bin_acc",
  mc_acc: "share of images whose class (all N) is right",
  sensitivity: "recall of the positive class: share of positive images called positive (0 with none)",
  specificity: "share of negative images called negative (0 with none)",
  balanced_bin_acc: "(sensitivity + specificity) / 2: 0.5 for any constant answer, whatever the prevalence; " +
    "the primary to pick for rare positives",
  prevalence: "share of positive images in the evaluated split",
  trivial_bin_acc: "bin_acc of always answering the majority side: max(prevalence, 1 − prevalence)",
};

/**
 * What a model that ignores its input scores on `primary` for these metrics, or null when the task has
 * no such figure (waste, cifar100: a constant answer scores far below any trained model there).
 */
export function trivialScore(
  metrics: Record<string, number>, task: Task, primary = TASK_METRICS[task].primary,
): number | null {
  const t = TASK_METRICS[task].trivial[primary];
  return typeof t === "number" ? t : t === undefined ? null : metrics[t] ?? null;
}

/**
 * Half-width of the 95% Wilson interval of a proportion p measured on n items: "±x" next to an
 * accuracy. Wilson rather than the normal approximation because it stays honest at p near 0 or 1
 * and on a handful of images.
 */
export function interval95(p: number, n: number): number {
  if (n <= 0) return 1;
  const z = 1.96, z2 = z * z;
  return (z / (1 + z2 / n)) * Math.sqrt((p * (1 - p)) / n + z2 / (4 * n * n));
}

/** The yield target of a class when no measurement is given: the table for waste, none otherwise. */
function assumedYield(task: Task, cls: string): number {
  return task === "waste" ? WASTE_YIELD_TABLE[cls as WasteClass] ?? 0 : 0;
}

// ---------------------------------------------------------------------------
// Data preparation
// ---------------------------------------------------------------------------

export interface PrepareOptions {
  task: Task;
  /** Image sides to cache; the task's own (IMAGE_SIZE, CIFAR_IMAGE_SIZE) always is. See EXTRA_IMAGE_SIZES. */
  sizes?: number[];
  /** "hf" (HuggingFace hub), "cifar" (official archive), "sample" (data/sample), "synthetic", or a folder path. */
  source: string;
  positive?: string;
  yieldsCsv?: string;
  cacheRoot?: string;
  force?: boolean;
  hubUrl?: string;
  cifarUrl?: string;
  log?: (line: string) => void;
}

export interface PrepareResult { dir: string; manifest: Manifest; reused: boolean; seconds: number }

type Log = (line: string) => void;
interface Candidate { path: string; className: string; read: () => Promise<Uint8Array> }

/** Prepare (or reuse) the cache for a task and source, and make it the active dataset. */
export async function prepareData(opts: PrepareOptions): Promise<PrepareResult> {
  const log = opts.log ?? ((l: string) => console.log(l));
  const cacheRoot = resolve(opts.cacheRoot ?? CACHE_ROOT);
  const t0 = performance.now();
  const synthetic = opts.source === "synthetic";
  const say = synthetic ? (l: string) => log(`[SYNTHETIC DATA] ${l}`) : log;
  const own = opts.task === "cifar100" ? CIFAR_IMAGE_SIZE : IMAGE_SIZE;
  for (const s of opts.sizes ?? []) {
    if (s !== own && !(EXTRA_IMAGE_SIZES as readonly number[]).includes(s)) {
      throw new Error(`--sizes: ${s} is not one of ${own}, ${EXTRA_IMAGE_SIZES.filter((e) => e !== own).join(", ")}`);
    }
  }
  const prepareAt = (size: number) => opts.task === "cifar100" ? prepareCifar(opts, cacheRoot, say, size)
    : synthetic ? prepareSynthetic(opts, cacheRoot, say, size) : prepareImageFolder(opts, cacheRoot, say, size);
  const result = await prepareAt(own);
  // The same candidates and content hashes at each size, so the same split (checked again on load).
  const others: Record<string, string> = {};
  for (const size of [...new Set(opts.sizes ?? [])].filter((s) => s !== own).sort((a, b) => a - b)) {
    const r = await prepareAt(size);
    others[String(size)] = r.dir;
    const mb = (await dirBytes(r.dir)) / 1e6;
    say(`cache at ${size} px: ${r.dir} (${r.reused ? "reused" : "written"}, ${mb.toFixed(1)} MB)`);
  }
  // Without --sizes, active.json stays exactly what it was: { dir }.
  const pointer: ActivePointer = Object.keys(others).length > 0 ? { dir: result.dir, sizes: others }
    : { dir: result.dir };
  writeAtomic(activePointerPath(cacheRoot), JSON.stringify(pointer));
  result.seconds = (performance.now() - t0) / 1000;
  describeDataset(result.manifest, say);
  const mb = (await dirBytes(result.dir)) / 1e6;
  const how = result.reused ? "reused" : "written";
  say(`cache: ${result.dir} (${how}, ${mb.toFixed(1)} MB) in ${result.seconds.toFixed(1)} s`);
  return result;
}

async function prepareImageFolder(
  opts: PrepareOptions, cacheRoot: string, log: Log, size: number,
): Promise<PrepareResult> {
  let root = opts.source;
  if (root === "hf") {
    if (opts.task !== "waste") {
      throw new Error(`--source hf is the waste task's hub dataset; give --source DIR for task ${opts.task}`);
    }
    const destDir = join(cacheRoot, "downloads", "hf", HF_WASTE_REPO.replace("/", "__"));
    root = (await downloadHfDataset({ repo: HF_WASTE_REPO, destDir, hubUrl: opts.hubUrl, log })).root;
  }
  if (root === "sample") root = sampleFolder();
  root = resolve(root);
  const listing = listImageFolder(root);
  for (const line of linkReport(listing, root)) log(line);
  let classes: string[];
  let classOf: (folder: string) => string | null;
  if (opts.task === "waste") {
    classes = [...WASTE_CLASSES];
    classOf = (folder) => mapWasteLabel(folder);
  } else {
    classes = listing.classes;
    classOf = (folder) => folder;
  }
  const positive = opts.task === "screening" ? (opts.positive ?? "") : null;
  if (positive !== null && !classes.includes(positive)) {
    const folders = classes.join(", ");
    if (positive !== "" && existsSync(join(root, positive))) {
      const classesWithImages = `classes with images: ${folders}`;
      throw new Error(`${root}/${positive}: the positive class's folder holds no images (${classesWithImages})`);
    }
    throw new Error(`${root}: positive class "${positive}" is not one of the class folders (${folders}); ` +
      "pass --positive NAME");
  }
  const unmapped = new Map<string, number>();
  const candidates: Candidate[] = [];
  for (const f of listing.files) {
    const cls = classOf(f.className);
    if (cls === null) { unmapped.set(f.className, (unmapped.get(f.className) ?? 0) + 1); continue; }
    const read = async () => new Uint8Array(await readFile(f.path));
    candidates.push({ path: relative(root, f.path), className: cls, read });
  }
  for (const [folder, n] of unmapped) {
    log(`warning: ${root}/${folder}: ${n} files in a folder that maps to no waste class; not used ` +
      "(see WASTE_LABEL_MAP in lib/sources.ts)");
  }
  refuseUnlearnable(root, classes, positive, candidates.map((c) => c.className));
  const yields = await loadYields(opts);
  // Sizes and modification times stand for the files' content: a changed photo re-prepares.
  const stats = await Promise.all(listing.files.map(async (f) => {
    const s = await stat(f.path);
    return `${relative(root, f.path)}:${s.size}:${s.mtimeMs}`;
  }));
  const key = {
    task: opts.task, classes, positive, size, PREPROCESSING, yields: yields.fingerprint, stats,
    split: SPLIT_RULE,
  };
  const fingerprint = sha256Hex(new TextEncoder().encode(JSON.stringify(key)));
  const dir = join(cacheRoot, `${opts.task}-${slug(root)}-${size}`);
  const reused = await reuseIfFresh(dir, fingerprint, opts.force, log);
  if (reused) return { dir, manifest: reused, reused: true, seconds: 0 };
  return await writeCache({
    dir, fingerprint, task: opts.task, classes, positive, source: root, synthetic: false, sample: root === SAMPLE_DIR,
    yieldSource: yields.source, candidates, yieldOf: yields.of, log, size,
  });
}

async function prepareCifar(opts: PrepareOptions, cacheRoot: string, log: Log, size: number): Promise<PrepareResult> {
  if (opts.source === "sample") {
    throw new Error("--source sample holds waste photos; cifar100 needs --source cifar or a cifar-100-binary folder");
  }
  const folder = opts.source === "hf" || opts.source === "cifar"
    ? await downloadCifar100({ destDir: join(cacheRoot, "downloads", "cifar100"), url: opts.cifarUrl, log })
    : resolve(opts.source);
  const key = { task: "cifar100", folder, size, split: `official test; ${SPLIT_RULE}` };
  const fingerprint = sha256Hex(new TextEncoder().encode(JSON.stringify(key)));
  const dir = join(cacheRoot, `cifar100-${size}`);
  const reused = await reuseIfFresh(dir, fingerprint, opts.force, log);
  if (reused) return { dir, manifest: reused, reused: true, seconds: 0 };
  const data = loadCifar100(folder);
  const px = CIFAR_IMAGE_SIZE * CIFAR_IMAGE_SIZE * 3;
  const rows = (part: typeof data.train, file: string) => Array.from({ length: part.n }, (_, i) => {
    const pixels = part.images.subarray(i * px, (i + 1) * px);
    return { path: `${file}#${i}`, label: part.labels[i] ?? 0, sha: sha256Hex(pixels), pixels };
  });
  // The official test set stays whole as test, so our test numbers compare with published ones; val is
  // carved from the official train set by hash. A train image identical to a test image is left out:
  // no image is both learned and tested.
  const test = rows(data.test, "test.bin");
  const testShas = new Map(test.map((r) => [r.sha, r.path]));
  const skipped: { path: string; reason: string }[] = [];
  const train = rows(data.train, "train.bin").filter((r) => {
    const twin = testShas.get(r.sha);
    if (twin !== undefined) skipped.push({ path: r.path, reason: `identical to ${twin}: left out of train and val` });
    return twin === undefined;
  });
  const trainSplits = splitByHash(train, { val: VAL_FRACTION, test: 0 });
  const all = [...train.map((r, i) => ({ ...r, split: trainSplits[i] ?? "train" })),
    ...test.map((r) => ({ ...r, split: "test" as const }))];
  // The hashes (and so the split) are of the native 32×32 pixels at every size.
  const images = new Uint8Array(all.length * size * size * 3);
  await mapPool(all, 4, async (r, i) => {
    const pixels = size === CIFAR_IMAGE_SIZE ? r.pixels : await resizeRgb(r.pixels, CIFAR_IMAGE_SIZE, size);
    images.set(pixels, i * size * size * 3);
  });
  const items: Manifest["items"] = all.map((r) => ({
    path: r.path, label: r.label, sha256: r.sha, split: r.split, yield: 0,
  }));
  if (skipped.length > 0) log(`cifar100: ${skipped.length} train images identical to a test image, left out`);
  const manifest: Manifest = {
    version: MANIFEST_VERSION, task: "cifar100", classes: data.classNames, positiveClass: null,
    imageSize: size,
    preprocessing: size === CIFAR_IMAGE_SIZE ? "cifar100-binary-hwc" : `cifar100-binary-hwc-${RESIZED}`,
    source: folder, synthetic: false,
    yieldSource: "none", fingerprint, createdAt: new Date().toISOString(), skipped: skipped.length, duplicates: 0,
    items,
  };
  await commitCache(dir, manifest, images, skipped);
  return { dir, manifest, reused: false, seconds: 0 };
}

/** Coloured shapes, one look per class. Only for plumbing tests: never a measure of model quality. */
async function prepareSynthetic(
  opts: PrepareOptions, cacheRoot: string, log: Log, size: number,
): Promise<PrepareResult> {
  const classes = opts.task === "waste" ? [...WASTE_CLASSES] : ["synthetic_a", "synthetic_b", "synthetic_positive"];
  const positive = opts.task === "screening" ? "synthetic_positive" : null;
  const perClass = 40;
  const candidates: Candidate[] = [];
  for (let c = 0; c < classes.length; c++) {
    for (let i = 0; i < perClass; i++) {
      const read = async () => syntheticImage(c, i);
      candidates.push({ path: `synthetic/${classes[c]}/${i}.raw`, className: classes[c] ?? "", read });
    }
  }
  const fingerprint = sha256Hex(new TextEncoder().encode(`synthetic-v1-${opts.task}-${size}-${SPLIT_RULE}`));
  const dir = join(cacheRoot, `${opts.task}-synthetic-${size}`);
  const reused = await reuseIfFresh(dir, fingerprint, opts.force, log);
  if (reused) return { dir, manifest: reused, reused: true, seconds: 0 };
  return await writeCache({
    dir, fingerprint, task: opts.task, classes, positive, source: "synthetic", synthetic: true, yieldSource: "table",
    candidates, yieldOf: (_path, cls) => assumedYield(opts.task, cls), log, raw: true, size,
  });
}

/** A raw IMAGE_SIZE² RGB image: class c has its own hue and shape, with seeded noise. */
function syntheticImage(c: number, i: number): Uint8Array {
  const s = IMAGE_SIZE;
  const out = new Uint8Array(s * s * 3);
  let seed = (c + 1) * 7919 + i * 104729;
  const rand = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
  const cx = s * (0.3 + 0.4 * rand()), cy = s * (0.3 + 0.4 * rand()), r = s * (0.15 + 0.1 * rand());
  // Class 0 a disc, class 1 a square, class 2 a diamond.
  const inside = (x: number, y: number) => c === 0 ? Math.hypot(x - cx, y - cy) < r
    : c === 1 ? Math.abs(x - cx) < r && Math.abs(y - cy) < r
    : Math.abs(x - cx) + Math.abs(y - cy) < r;
  for (let y = 0; y < s; y++) {
    for (let x = 0; x < s; x++) {
      const hit = inside(x, y);
      const o = (y * s + x) * 3;
      for (let k = 0; k < 3; k++) {
        out[o + k] = Math.max(0, Math.min(255, (hit ? (k === c % 3 ? 220 : 40) : 128) + (rand() - 0.5) * 60));
      }
    }
  }
  return out;
}

interface WriteCacheArgs {
  dir: string; fingerprint: string; task: Task; classes: string[]; positive: string | null; source: string;
  synthetic: boolean; sample?: boolean; yieldSource: string; candidates: Candidate[];
  yieldOf: (path: string, cls: string) => number;
  /** `raw`: the candidates are IMAGE_SIZE² RGB pixels already (synthetic), resized when `size` differs. */
  log: Log; raw?: boolean; size: number;
}

/** Decode every candidate (in parallel, bounded), split by content hash, and write the cache. */
async function writeCache(a: WriteCacheArgs): Promise<PrepareResult> {
  const px = a.size * a.size * 3;
  const t0 = performance.now();
  let done = 0;
  const skipped: { path: string; reason: string }[] = [];
  // Four decodes in flight keep both cores busy; sharp runs them on its libuv threads.
  const decoded = await mapPool(a.candidates, 4, async (c) => {
    try {
      const bytes = await c.read();
      const sha = sha256Hex(bytes);
      // The hash is of the file's bytes, whatever the size: every size gets the same split.
      const pixels = !a.raw ? await decodeToRgb(bytes, a.size)
        : a.size === IMAGE_SIZE ? bytes : await resizeRgb(bytes, IMAGE_SIZE, a.size);
      return { c, sha, pixels };
    } catch (err) {
      const reason = (err instanceof Error ? err.message : String(err)).split("\n")[0] ?? "unknown error";
      skipped.push({ path: c.path, reason });
      a.log(`skipped ${c.path}: ${reason}`);
      return null;
    } finally {
      if (++done % 200 === 0 || done === a.candidates.length) {
        const s = (performance.now() - t0) / 1000;
        a.log(`prepare: ${done}/${a.candidates.length} images decoded, ${(done / s).toFixed(0)} images/s`);
      }
    }
  });
  const kept = decoded.filter((d): d is NonNullable<typeof d> => d !== null);
  refuseUnlearnable(a.source, a.classes, a.positive, kept.map((d) => d.c.className)); // some may not decode
  const splits = splitByHash(kept.map((d) => ({ sha: d.sha, label: a.classes.indexOf(d.c.className) })));
  const seen = new Set<string>();
  let duplicates = 0;
  const images = new Uint8Array(kept.length * px);
  const items: Manifest["items"] = kept.map((d, i) => {
    if (seen.has(d.sha)) duplicates++;
    seen.add(d.sha);
    images.set(d.pixels, i * px);
    const { path, className } = d.c;
    const label = a.classes.indexOf(className);
    return { path, label, sha256: d.sha, split: splits[i] ?? "train", yield: a.yieldOf(path, className) };
  });
  const manifest: Manifest = {
    version: MANIFEST_VERSION, task: a.task, classes: a.classes, positiveClass: a.positive, imageSize: a.size,
    preprocessing: !a.raw ? PREPROCESSING : a.size === IMAGE_SIZE ? "synthetic-raw" : `synthetic-raw-${RESIZED}`,
    source: a.source, synthetic: a.synthetic,
    sample: a.sample === true,
    yieldSource: a.yieldSource, fingerprint: a.fingerprint, createdAt: new Date().toISOString(),
    skipped: skipped.length, duplicates, items,
  };
  if (skipped.length > 0) {
    a.log(`skipped ${skipped.length} of ${a.candidates.length} files (listed in ${cacheFiles(a.dir).skipped})`);
  }
  if (duplicates > 0) {
    a.log(`${duplicates} exact duplicate files (same sha256): they share one split, so none straddles two`);
  }
  await commitCache(a.dir, manifest, images, skipped);
  return { dir: a.dir, manifest, reused: false, seconds: 0 };
}

export interface SplitFractions { val: number; test: number }

/** An image's own side: set by its bytes alone (SPLIT_RULE). */
export function hashSplit(sha: string, f: SplitFractions = { val: VAL_FRACTION, test: TEST_FRACTION }): Split {
  const score = parseInt(sha.slice(0, 8), 16) / 2 ** 32;
  return score < f.val ? "val" : score < f.val + f.test ? "test" : "train";
}

/**
 * Refuses, before any training, a dataset that cannot be learned or measured: fewer than 2 classes with
 * images, or for screening a positive class without images or without negatives. `found` holds the class
 * of every image.
 */
function refuseUnlearnable(source: string, classes: string[], positive: string | null, found: string[]): void {
  const counts = new Map<string, number>();
  for (const c of found) counts.set(c, (counts.get(c) ?? 0) + 1);
  const have = classes.filter((c) => (counts.get(c) ?? 0) > 0);
  const listed = have.map((c) => `${c} ${counts.get(c)}`).join(", ");
  if (positive !== null && !have.includes(positive)) {
    const others = have.length > 0 ? `classes with images: ${listed}` : "no class has images";
    throw new Error(`${source}: the positive class "${positive}" has no usable images (${others})`);
  }
  if (positive !== null && have.length === 1) {
    throw new Error(`${source}: screening needs negatives, but the positive class "${positive}" is the only ` +
      `class with images (${listed}); add folders of other classes`);
  }
  if (have.length < 2) {
    const which = have.length === 0 ? "no class has usable images" : `only ${listed} has images`;
    throw new Error(`${source}: ${which}; a classifier needs images of at least 2 classes (of ${classes.join(", ")})`);
  }
}

/**
 * Deterministic stratified split keyed by content hash: an image's side is set by its own bytes
 * (hashSplit), so identical files land together and adding files leaves such an image where it is.
 * Small classes get a floor: a class of 2+ distinct images that hashes no image to val lends its
 * lowest-hash training image to val; one of 3+ likewise to test. Those lent images are the only ones
 * that adding files can move, plus one training image of a class that grows past 2 or 3 images:
 * val and test images never move, and in a class of 3+ no training image ever moves to val or test.
 * The floor only lends training images, so a class of n ≥ 3 images that all hash to val (or all to
 * test) keeps that gap (2 · 0.2^n of such classes), and a small class can be left with nothing to
 * train on (describeDataset says so). An image filed under two classes follows the first class that
 * lent it, so even then it never straddles.
 */
export function splitByHash(
  items: readonly { sha: string; label: number }[], f: SplitFractions = { val: VAL_FRACTION, test: TEST_FRACTION },
): Split[] {
  const lent = new Map<string, Split>();
  const side = (sha: string) => lent.get(sha) ?? hashSplit(sha, f);
  const byClass = new Map<number, Set<string>>();
  for (const it of items) byClass.set(it.label, (byClass.get(it.label) ?? new Set()).add(it.sha));
  for (const label of [...byClass.keys()].sort((a, b) => a - b)) {
    const shas = [...byClass.get(label)!].sort();
    // Always the lowest hashes of train: an added image can only take a lent one's place, never
    // push another training image out.
    const fill = (to: Split) => {
      if (shas.some((sha) => side(sha) === to)) return;
      const spare = shas.find((sha) => side(sha) === "train" && !lent.has(sha));
      if (spare !== undefined) lent.set(spare, to);
    };
    if (shas.length >= 2) fill("val");
    if (shas.length >= 3 && f.test > 0) fill("test");
  }
  return items.map((it) => side(it.sha));
}

interface Yields { of: (path: string, cls: string) => number; source: string; fingerprint: string }

async function loadYields(opts: PrepareOptions): Promise<Yields> {
  const table = (cls: string) => assumedYield(opts.task, cls);
  const csv = opts.yieldsCsv;
  if (!csv) {
    const source = opts.task === "waste" ? "assumed-table" : "none";
    return { of: (_p, cls) => table(cls), source, fingerprint: "table" };
  }
  const text = await readFile(csv, "utf8").catch(() => { throw new Error(`${csv}: cannot read the yields CSV`); });
  const measured = new Map<string, number>();
  text.split(/\r?\n/).forEach((line, i) => {
    if (i === 0 || line.trim() === "") return;
    const [path, value] = line.split(",");
    const y = Number(value);
    if (!path || !Number.isFinite(y) || y < 0 || y > 1) {
      throw new Error(`${csv}:${i + 1}: expected "path,yield" with yield in [0,1], got "${line}"`);
    }
    measured.set(path.trim(), y);
  });
  const fingerprint = sha256Hex(new TextEncoder().encode(text));
  return { of: (p, cls) => measured.get(p) ?? table(cls), source: `csv:${resolve(csv)}`, fingerprint };
}

/**
 * The cache in `dir` when it was made from the same source (`fingerprint`) and its files still match the
 * checksums in its manifest; otherwise null, and a cache that exists but cannot be trusted says why.
 */
async function reuseIfFresh(
  dir: string, fingerprint: string, force: boolean | undefined, log: Log,
): Promise<Manifest | null> {
  const path = cacheFiles(dir).manifest;
  if (force || !existsSync(path)) return null;
  let m: Manifest;
  try {
    m = parseManifest(await readFile(path, "utf8"), dir);
  } catch (e) {
    log(`cache: ${e instanceof Error ? e.message : String(e)}; rebuilding it`);
    return null;
  }
  if (m.fingerprint !== fingerprint) return null; // the source changed: an ordinary re-prepare
  const why = await cacheMismatch(dir, m);
  if (why !== null) log(`cache: ${why}; rebuilding it`);
  return why === null ? m : null;
}

/**
 * Write images.u8, manifest.json and skipped.tsv into a temp dir, then swap it in whole. Records the
 * checksums in `manifest`, so a later change to either file is seen by prepare and loadCache.
 */
async function commitCache(
  dir: string, manifest: Manifest, images: Uint8Array, skipped: { path: string; reason: string }[],
): Promise<void> {
  const rows = skipped.map((s) => `${s.path}\t${s.reason.replace(/\s+/g, " ")}`);
  manifest.checksums = cacheChecksums(manifest, images);
  await replaceDirAtomic(dir, async (tmp) => {
    const files = cacheFiles(tmp);
    await writeFile(files.images, images);
    await writeFile(files.manifest, JSON.stringify(manifest));
    await writeFile(files.skipped, ["path\treason", ...rows].join("\n") + "\n");
  });
}

async function dirBytes(dir: string): Promise<number> {
  let total = 0;
  for (const f of Object.values(cacheFiles(dir))) total += existsSync(f) ? (await stat(f)).size : 0;
  return total;
}

function slug(path: string): string {
  const tail = path.split(/[\\/]/).filter(Boolean).slice(-2).join("_").replace(/[^A-Za-z0-9_.-]/g, "_");
  return `${tail}-${sha256Hex(new TextEncoder().encode(path)).slice(0, 8)}`;
}

/**
 * Per-class counts with a warning for thin classes, the split sizes and how precisely an accuracy
 * can be measured on them: printed by prepare, train and evaluate.
 */
export function describeDataset(m: Manifest, log: Log): void {
  const count = (c: number | null, split: Split) =>
    m.items.filter((it) => (c === null || it.label === c) && it.split === split).length;
  const rows = m.classes.map((name, c) => ({
    name, train: count(c, "train"), val: count(c, "val"), test: count(c, "test"),
  }));
  const positive = m.positiveClass ? ` (positive class: ${m.positiveClass})` : "";
  const tags = `${m.synthetic ? "  [SYNTHETIC]" : ""}${m.sample ? "  [SAMPLE]" : ""}`;
  log(`task: ${m.task}${positive}  source: ${m.source}${tags}`);
  if (m.sample) {
    log(`SAMPLE: ${m.items.length} photos, ${SAMPLE_NOTE}`);
    log(`SAMPLE: ${REAL_SETS_HINT}`);
  }
  const pad = (v: number) => String(v).padStart(6);
  for (const r of rows) {
    const n = r.train + r.val + r.test;
    const warn = n === 0 ? "  <- NO IMAGES: this class cannot be learned or measured"
      : r.train === 0 ? `  <- nothing to train on: its ${n} images all went to val/test`
      : n < FEW_IMAGES ? `  <- only ${n} images: its accuracy is nearly meaningless` : "";
    log(`  class ${r.name.padEnd(14)} train ${pad(r.train)}  val ${pad(r.val)}  test ${pad(r.test)}${warn}`);
  }
  const [train, val, test] = (["train", "val", "test"] as const).map((sp) => count(null, sp));
  const within = (n: number) => `±${interval95(0.5, n).toFixed(3)} on ${n}`;
  log(`split: train ${train}  val ${val} (every keep decision)  test ${test} (only a deliberate re-measure)`);
  log(`95% interval of an accuracy, at worst: ${within(val ?? 0)} val images, ${within(test ?? 0)} test images`);
  const pos = m.positiveClass === null ? -1 : m.classes.indexOf(m.positiveClass);
  if (pos >= 0) {
    const pv = count(pos, "val"), pt = count(pos, "test");
    log(`screening: sensitivity rests on the ${m.positiveClass} images alone: ${within(pv)} val, ${within(pt)} test`);
  }
  if (m.task === "waste" && !m.synthetic) {
    // The caveat is about waste3's photos (data/sample is a slice of them), not a person's own folder.
    const waste3 = m.sample === true || m.source === SAMPLE_DIR || resolve(m.source) === SHARED_WASTE3;
    const yields = m.yieldSource === "assumed-table"
      ? "ASSUMED per-class values (WASTE_YIELD_TABLE), not measurements" : m.yieldSource;
    log(waste3 ? `note: ${WASTE_DATA_NOTE}; yields are ${yields}` : `note: yields are ${yields}`);
  }
}

// ---------------------------------------------------------------------------
// Training batches (what train.ts reads; the cache itself is loaded by loadCache, lib/dataset.ts)
// ---------------------------------------------------------------------------

/** Endless shuffled epochs of training indices (seeded, so a run is reproducible). */
export function* trainBatches(
  ds: Dataset, batchSize: number, seed = 0,
): Generator<{ indices: Int32Array; epoch: number }> {
  if (ds.train.length === 0) throw new Error(`${ds.dir}: the training split is empty`);
  let state = (seed * 2654435761 + 1) >>> 0;
  const rand = () => ((state = (state * 1664525 + 1013904223) >>> 0) / 2 ** 32);
  const order = Int32Array.from(ds.train);
  for (let epoch = 0; ; epoch++) {
    for (let i = order.length - 1; i > 0; i--) {
      const j = Math.floor(rand() * (i + 1));
      const t = order[i]!; order[i] = order[j]!; order[j] = t;
    }
    for (let i = 0; i + batchSize <= Math.max(order.length, batchSize); i += batchSize) {
      const indices = new Int32Array(batchSize);
      for (let b = 0; b < batchSize; b++) indices[b] = order[(i + b) % order.length]!;
      yield { indices, epoch };
    }
  }
}

// ---------------------------------------------------------------------------
// Evaluation (the ground truth: do not modify)
// ---------------------------------------------------------------------------

export interface PerClass { name: string; count: number; correct: number; accuracy: number | null }
/** The splits evaluate() measures: val by default (keep decisions), test on request only. */
export type EvalSplit = Exclude<Split, "train">;
export interface EvalResult {
  task: Task;
  split: EvalSplit;
  n: number;
  metrics: Record<string, number>;
  primary: string;
  perClass: PerClass[];
  /** confusion[true][predicted] */
  confusion: number[][];
}

/**
 * Run the model on a whole split, in order, and score it. Deterministic for a fixed model. The split
 * is val unless asked: test is for a deliberate re-measure, never for a keep decision.
 */
export async function evaluate(
  predict: Predictor, ds: Dataset, opts: { split?: EvalSplit } = {},
): Promise<EvalResult> {
  const split = opts.split ?? "val";
  const rows = ds[split];
  if (rows.length === 0) throw new Error(`${ds.dir}: the ${split} split is empty: nothing to measure`);
  const C = ds.numClasses;
  const n = rows.length;
  const probs = new Float32Array(n * C);
  const yields = new Float32Array(n);
  for (let start = 0; start < n; start += EVAL_BATCH_SIZE) {
    const indices = rows.subarray(start, Math.min(n, start + EVAL_BATCH_SIZE));
    const x = imageBatch(ds, indices);
    const out = await predict(x, indices);
    x.dispose();
    if (out.probs.shape[0] !== indices.length || out.probs.shape[1] !== C) {
      throw new Error(`predictor returned probs of shape [${out.probs.shape}], expected [${indices.length}, ${C}]`);
    }
    probs.set(await out.probs.data() as Float32Array, start * C);
    if (out.yields) yields.set(await out.yields.data() as Float32Array, start);
    out.probs.dispose();
    out.yields?.dispose();
  }
  const labels = Int32Array.from(rows, (i) => ds.labels[i]!);
  const trueYields = Float32Array.from(rows, (i) => ds.yields[i]!);
  const { classes, positiveClass } = ds.manifest;
  const predYields = yields;
  return computeMetrics({ task: ds.task, split, classes, positiveClass, labels, probs, predYields, trueYields });
}

interface Predictions {
  task: Task;
  /** Which split the labels come from (val when absent): the footer says it. */
  split?: EvalSplit;
  classes: string[];
  positiveClass: string | null;
  labels: Int32Array;
  /** [n, C] row-major. */
  probs: Float32Array;
  predYields?: Float32Array;
  trueYields?: Float32Array;
}

/** Pure scoring of predictions: separate from evaluate() so it can be tested on hand-built inputs. */
export function computeMetrics(a: Predictions): EvalResult {
  const C = a.classes.length;
  const n = a.labels.length;
  const confusion = a.classes.map(() => new Array<number>(C).fill(0));
  let top1 = 0, top5 = 0;
  const predicted = new Int32Array(n);
  for (let i = 0; i < n; i++) {
    const row = a.probs.subarray(i * C, (i + 1) * C);
    let best = 0;
    for (let c = 1; c < C; c++) if (row[c]! > row[best]!) best = c; // ties go to the lower index: deterministic
    predicted[i] = best;
    const y = a.labels[i]!;
    confusion[y]![best]!++;
    if (best === y) top1++;
    // top-5: the true class is among the 5 highest, counting classes strictly above it.
    let above = 0;
    for (let c = 0; c < C; c++) if (row[c]! > row[y]! || (row[c] === row[y] && c < y)) above++;
    if (above < 5) top5++;
  }
  const safe = (num: number, den: number) => (den === 0 ? 0 : num / den);
  const perClass = a.classes.map((name, c) => {
    const count = confusion[c]!.reduce((s, v) => s + v, 0);
    const correct = confusion[c]![c]!;
    return { name, count, correct, accuracy: count === 0 ? null : correct / count };
  });
  const metrics: Record<string, number> = {};
  if (a.task === "waste") {
    let se = 0;
    for (let i = 0; i < n; i++) se += ((a.predYields?.[i] ?? 0) - (a.trueYields?.[i] ?? 0)) ** 2;
    metrics.val_accuracy = safe(top1, n);
    metrics.yield_mse = safe(se, n);
    metrics.combined_score = metrics.val_accuracy - YIELD_WEIGHT * metrics.yield_mse;
  } else if (a.task === "cifar100") {
    metrics.top1 = safe(top1, n);
    metrics.top5 = safe(top5, n);
  } else {
    const pos = a.classes.indexOf(a.positiveClass ?? "");
    if (pos < 0) throw new Error(`screening: positive class "${a.positiveClass}" is not among ${a.classes.join(", ")}`);
    let tp = 0, fn = 0, tn = 0, fp = 0;
    for (let i = 0; i < n; i++) {
      const said = predicted[i] === pos;
      if (a.labels[i] === pos) said ? tp++ : fn++;
      else said ? fp++ : tn++;
    }
    metrics.bin_acc = safe(tp + tn, n);
    metrics.mc_acc = safe(top1, n);
    metrics.sensitivity = safe(tp, tp + fn);
    metrics.specificity = safe(tn, tn + fp);
    metrics.balanced_bin_acc = (metrics.sensitivity + metrics.specificity) / 2;
    metrics.prevalence = safe(tp + fn, n);
    // From counts, not 1 − prevalence: the never-positive model's bin_acc equals it to the bit.
    metrics.trivial_bin_acc = safe(Math.max(tp + fn, tn + fp), n);
  }
  const split = a.split ?? "val";
  return { task: a.task, split, n, metrics, primary: TASK_METRICS[a.task].primary, perClass, confusion };
}

// ---------------------------------------------------------------------------
// The footer (the lines the loop and the seeds' tools grep)
// ---------------------------------------------------------------------------

export interface RunFacts {
  training_seconds: number;
  total_seconds: number;
  peak_memory_mb: number;
  num_steps: number;
  num_params: number;
  backend: string;
}

/** What the footer's `data:` line says about the images: nothing for a real, full set. */
export type DataFlags = Pick<Manifest, "synthetic" | "sample">;

export function footerLines(r: EvalResult, facts: RunFacts, data: DataFlags = { synthetic: false }): string[] {
  const fmt = (v: number) => v.toFixed(6);
  const kv = (key: string, value: string | number) => `${`${key}:`.padEnd(17)} ${value}`;
  const lines = ["---"];
  const { columns, extra } = TASK_METRICS[r.task];
  for (const k of [...columns, ...extra]) lines.push(kv(k, fmt(r.metrics[k] ?? 0)));
  lines.push(
    kv("training_seconds", facts.training_seconds.toFixed(1)),
    kv("total_seconds", facts.total_seconds.toFixed(1)),
    kv("peak_memory_mb", facts.peak_memory_mb.toFixed(1)),
    kv("num_steps", facts.num_steps),
    kv("num_params", facts.num_params),
    kv("backend", facts.backend),
    kv("split", r.split),
    kv(`${r.split}_images`, r.n),
    kv("ci95", intervalNote(r)),
  );
  for (const pc of r.perClass) {
    lines.push(kv(`class_acc_${pc.name}`, `${pc.accuracy === null ? "n/a" : fmt(pc.accuracy)} (n=${pc.count})`));
  }
  lines.push(kv("confusion", JSON.stringify(r.confusion)));
  if (data.synthetic) {
    lines.push(kv("data", "SYNTHETIC (plumbing test only; these numbers say nothing about model quality)"));
  } else if (data.sample) {
    lines.push(kv("data", "SAMPLE (data/sample, for trying the tool; NOT a measure of model quality)"));
  }
  return lines;
}

/**
 * How far the headline accuracy could be from the truth on this many images (95% Wilson), and for
 * screening the positive class's recall on its few images: "bin_acc ±0.021 (n=439); sensitivity ±0.16 (n=31)".
 */
function intervalNote(r: EvalResult): string {
  const head = r.task === "waste" ? "val_accuracy" : TASK_METRICS[r.task].columns[0]!;
  const at = (k: string, n: number) => `${k} ±${interval95(r.metrics[k] ?? 0, n).toFixed(3)} (n=${n})`;
  const notes = [at(head, r.n)];
  if (r.task === "screening") {
    const positives = Math.round((r.metrics.prevalence ?? 0) * r.n);
    notes.push(at("sensitivity", positives), at("specificity", r.n - positives));
  }
  return notes.join("; ");
}

export function printFooter(r: EvalResult, facts: RunFacts, data: DataFlags = { synthetic: false }): void {
  for (const l of footerLines(r, facts, data)) console.log(l);
}

/** `key: value` lines after the last `---`: what the loop reads to see that a run finished. */
export function parseFooter(text: string): Record<string, string> {
  const at = text.lastIndexOf("\n---\n");
  const tail = at >= 0 ? text.slice(at + 5) : text.startsWith("---\n") ? text.slice(4) : "";
  const out: Record<string, string> = {};
  for (const line of tail.split("\n")) {
    const m = /^([a-z0-9_]+):\s+(.*)$/.exec(line.trim());
    if (m) out[m[1]!] = m[2]!;
  }
  return out;
}

/** Peak resident memory of this process in MB. */
export function peakMemoryMb(): number {
  return process.resourceUsage().maxRSS / 1024;
}

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

const PrepareFlags = type({
  "+": "delete",
  task: Task, source: "string", "positive?": "string", "yields?": "string", force: "boolean", "sizes?": "string",
  "hubUrl?": "string", "cifarUrl?": "string",
});

async function prepareCommand(raw: Record<string, unknown>): Promise<void> {
  const task = raw.task;
  const source = raw.source ?? (task === "cifar100" ? "cifar" : "hf");
  // cac leaves unset options as undefined; arktype's optional keys mean "absent", so drop them.
  // cac reads `--sizes 96` as a number and `--sizes 64,96` as a string: a string either way.
  const sizeList = raw.sizes === undefined ? undefined : String(raw.sizes);
  const given = Object.entries({ ...raw, task, source, sizes: sizeList, force: raw.force === true })
    .filter(([, v]) => v !== undefined);
  const flags = PrepareFlags(Object.fromEntries(given));
  if (flags instanceof type.errors) throw new Error(`prepare.ts: ${flags.summary}`);
  const sizes = flags.sizes?.split(",").map((w) => Number(w.trim()));
  if (sizes?.some((n) => !Number.isInteger(n) || n <= 0)) {
    throw new Error(`prepare.ts: --sizes ${flags.sizes}: expected whole numbers separated by commas, e.g. 64,96`);
  }
  await prepareData({
    task: flags.task, source: flags.source, positive: flags.positive, yieldsCsv: flags.yields, force: flags.force,
    hubUrl: flags.hubUrl, cifarUrl: flags.cifarUrl, sizes,
  });
}

const EvaluateFlags = type({ model: "string", split: "'val' | 'test'" });

/** Re-measure a checkpoint: the footer, then one eval_json line with the whole EvalResult. */
async function evaluateCommand(raw: Record<string, unknown>): Promise<void> {
  const flags = EvaluateFlags({ model: String(raw.model), split: String(raw.split) });
  if (flags instanceof type.errors) throw new Error(`prepare.ts evaluate: ${flags.summary}`);
  const dir = flags.model;
  const { initBackend, backendLabel } = await import("./lib/backend.ts");
  const { loadCheckpoint, predictorFor, readMeta } = await import("./lib/checkpoint.ts");
  await initBackend();
  // The checkpoint says the image side it was trained at: the active dataset at that side is measured.
  const ds = await loadCacheAtSize((await readMeta(dir)).imageSize);
  const ckpt = await loadCheckpoint(dir, ds);
  const t0 = performance.now();
  const result = await evaluate(predictorFor(ckpt, ds), ds, { split: flags.split });
  const facts: RunFacts = {
    training_seconds: 0, total_seconds: (performance.now() - t0) / 1000, peak_memory_mb: peakMemoryMb(),
    num_steps: 0, num_params: ckpt.numParams, backend: backendLabel(),
  };
  printFooter(result, facts, ds.manifest);
  console.log(`eval_json: ${JSON.stringify(result)}`);
}

/**
 * Download a frozen backbone and cache its features of every image of the active dataset, with
 * progress lines: the loop runs this before train.ts, so the training deadline never covers it.
 */
async function featuresCommand(raw: Record<string, unknown>): Promise<void> {
  if (typeof raw.backbone !== "string" || raw.backbone === "") {
    throw new Error("prepare.ts features: give --backbone NAME");
  }
  const size = raw.size === undefined ? undefined : Number(raw.size);
  if (size !== undefined && !Number.isInteger(size)) {
    throw new Error(`prepare.ts features: --size ${String(raw.size)} is not a whole number`);
  }
  const unfreezeBlocks = raw.unfreeze === undefined ? undefined : Number(raw.unfreeze);
  if (unfreezeBlocks !== undefined && !Number.isInteger(unfreezeBlocks)) {
    throw new Error(`prepare.ts features: --unfreeze ${String(raw.unfreeze)} is not a whole number`);
  }
  const { initBackend } = await import("./lib/backend.ts");
  const { backboneWithFeatures, describeBackbone } = await import("./lib/backbones.ts");
  await initBackend();
  const ds = await loadCache();
  const mirrored = raw.mirrored === true;
  const ready = await backboneWithFeatures(ds, raw.backbone, { inputSize: size, unfreezeBlocks, mirrored });
  console.log(describeBackbone(ready.backbone));
  for (const f of [ready.features, ...(ready.mirrored ? [ready.mirrored] : [])]) {
    const per = (f.extractSeconds * 1000) / Math.max(f.n, 1);
    const when = f.reused ? " (as recorded when cached)" : "";
    console.log(`features ready: ${f.n} rows of ${ready.backbone.id} (${f.view}) in ${f.path}; cold extraction `
      + `${f.extractSeconds.toFixed(1)} s, ${per.toFixed(1)} ms per image${when}`);
  }
}

async function main(): Promise<void> {
  const cli = cac("prepare.ts");
  cli.command("[...args]", "prepare the data cache")
    .option("--task <task>", "waste | cifar100 | screening", { default: process.env.AR_TASK ?? "waste" })
    .option("--source <source>", "hf | cifar | sample | synthetic | an ImageFolder path", {
      default: process.env.AR_SOURCE,
    })
    .option("--positive <class>", "screening: the positive class", { default: process.env.AR_POSITIVE })
    .option("--yields <csv>", "waste: measured per-image yields (path,yield)")
    .option("--force", "rebuild the cache even if it is fresh", { default: false })
    .option("--sizes <list>", `image sides to cache, e.g. ${IMAGE_SIZE},96 (train.ts HP.imageSize picks one)`)
    .option("--hub-url <url>", "HuggingFace endpoint (tests point it at 127.0.0.1)")
    .option("--cifar-url <url>", "CIFAR-100 archive URL")
    .action((_args: string[], raw: Record<string, unknown>) => prepareCommand(raw));
  cli.command("evaluate", "re-measure a saved checkpoint on the active dataset's val (or test) split")
    .option("--model <dir>", "checkpoint folder", { default: "checkpoints/latest" })
    .option("--split <split>", "val (what keep decisions read) | test (held out from every decision)", {
      default: "val",
    })
    .action((raw: Record<string, unknown>) => evaluateCommand(raw));
  cli.command("features", "download a frozen backbone and cache its features of the active dataset")
    .option("--backbone <name>", "backbone name (lib/backbones.ts BACKBONE_NAMES)")
    .option("--size <pixels>", "backbone input side (default: the backbone's own)")
    .option("--unfreeze <k>", "fine-tuning: cache the frozen part's feature maps, k blocks short of the end")
    .option("--mirrored", "also cache the features of every photo mirrored (train.ts's HP.flip)")
    .action((raw: Record<string, unknown>) => featuresCommand(raw));
  cli.help();
  cli.parse(process.argv, { run: false });
  await cli.runMatchedCommand();
}

if (import.meta.main) {
  main().catch((err: unknown) => {
    console.error(`error: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  });
}
