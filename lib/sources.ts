/**
 * Dataset sources: where training images come from.
 *
 * - `downloadHfDataset`: a Hugging Face dataset repo (parquet shards or image
 *   folders) materialized as a local ImageFolder `destDir/<class>/<file>` whose
 *   class folders are the three waste classes (see `WASTE_LABEL_MAP`).
 * - `downloadCifar100` / `parseCifar100Bin` / `loadCifar100`: the official
 *   CIFAR-100 binary release.
 * - `listImageFolder`: a local ImageFolder (`root/<class>/**\/<image>`).
 * - `sampleFolder`: data/sample, the few dozen credited waste photos that ship with the
 *   repository, so the pipeline runs with no network and no ../shared.
 *
 * Every download is atomic: it is written to a sibling temp dir and renamed
 * into place only when complete (lib/atomic.ts), so a failed run leaves no half
 * dataset, and a completed one (marked by a marker file) is reused with no
 * network access. Hub requests that fail for a moment are retried (lib/download.ts).
 */
import { downloadFile, listFiles, type RepoId } from "@huggingface/hub";
import { type } from "arktype";
import { replaceDirAtomic } from "./atomic.ts";
import { httpError, oneLine, withRetry } from "./download.ts";
import { IMAGE_EXTENSIONS, isImagePath } from "./images.ts";
import {
  asyncBufferFromFile,
  parquetMetadataAsync,
  parquetReadObjects,
  parquetSchema,
  type FileMetaData,
  type SchemaTree,
} from "hyparquet";
import { existsSync, readdirSync, readFileSync, readlinkSync, realpathSync, statSync } from "node:fs";
import { mkdir, open, readFile, rename, rm, rmdir, stat, writeFile } from "node:fs/promises";
import { dirname, extname, join, posix, relative, resolve, sep } from "node:path";

// ---------------------------------------------------------------------------
// Waste classes and the label mapping table
// ---------------------------------------------------------------------------

export const WASTE_CLASSES = ["ewaste", "recyclable", "organic"] as const;
export type WasteClass = (typeof WASTE_CLASSES)[number];

/**
 * THE table mapping source label names onto the three waste classes.
 *
 * Keys are normalized with `normalizeLabel` (lowercase, trimmed, runs of
 * spaces/underscores turned into "-"), so "Brown Glass", "brown_glass" and
 * "brown-glass" all hit the key "brown-glass".
 *
 * Sources of the names:
 * - NeoAivara/Waste_Classification_data (HF, apache-2.0): its card tags and a
 *   public script that reads it (label 0 = battery, 12 labels, config
 *   "default", split "train") match the 12-class "Garbage Classification"
 *   set, whose alphabetical ClassLabel names are: battery, biological,
 *   brown-glass, cardboard, clothes, green-glass, metal, paper, plastic, shoes,
 *   trash, white-glass. The actual names are read at download time from the
 *   parquet `huggingface` metadata or the README; check the `unmapped` report.
 * - TrashNet (cardboard, glass, metal, paper, plastic, trash), RealWaste
 *   ("Food Organics", "Vegetation", "Textile Trash", "Miscellaneous Trash"…),
 *   the Kaggle "waste-classification-data" set (folders O = organic,
 *   R = recyclable), and common e-waste folder names.
 *
 * Deliberately NOT mapped (they are none of the three classes, so they are
 * dropped and reported as unmapped rather than guessed): trash, clothes,
 * shoes, textile(-trash), miscellaneous-trash, wood, hazardous, medical.
 */
export const WASTE_LABEL_MAP: Record<string, WasteClass> = {
  // --- e-waste: batteries and electronic devices
  battery: "ewaste",
  batteries: "ewaste",
  "e-waste": "ewaste",
  ewaste: "ewaste",
  "electronic-waste": "ewaste",
  electronic: "ewaste",
  electronics: "ewaste",
  phone: "ewaste",
  phones: "ewaste",
  "mobile-phone": "ewaste",
  smartphone: "ewaste",
  keyboard: "ewaste",
  mouse: "ewaste",
  laptop: "ewaste",
  computer: "ewaste",
  monitor: "ewaste",
  television: "ewaste",
  tv: "ewaste",
  pcb: "ewaste",
  "circuit-board": "ewaste",
  printer: "ewaste",
  // --- recyclable: plastic, glass, metal, paper, cardboard
  recyclable: "recyclable",
  recyclables: "recyclable",
  recycle: "recyclable",
  r: "recyclable", // Kaggle waste-classification-data: TRAIN/R
  plastic: "recyclable",
  plastics: "recyclable",
  "other-plastics": "recyclable",
  "plastic-bottles": "recyclable",
  pet: "recyclable",
  hdpe: "recyclable",
  glass: "recyclable",
  "brown-glass": "recyclable",
  "green-glass": "recyclable",
  "white-glass": "recyclable",
  "glass-bottles": "recyclable",
  metal: "recyclable",
  cans: "recyclable",
  can: "recyclable",
  "aluminium-cans": "recyclable",
  "aluminum-cans": "recyclable",
  aluminium: "recyclable",
  aluminum: "recyclable",
  paper: "recyclable",
  cardboard: "recyclable",
  carton: "recyclable",
  "paper-and-cardboard": "recyclable",
  newspaper: "recyclable",
  // --- organic: food and biological waste
  organic: "organic",
  organics: "organic",
  "organic-waste": "organic",
  o: "organic", // Kaggle waste-classification-data: TRAIN/O
  food: "organic",
  "food-waste": "organic",
  "food-organics": "organic",
  biological: "organic",
  biodegradable: "organic",
  compost: "organic",
  vegetable: "organic",
  vegetables: "organic",
  vegetation: "organic",
  fruit: "organic",
  fruits: "organic",
  "garden-waste": "organic",
};

/** Lowercase, trim, and turn runs of spaces/underscores into "-". */
function normalizeLabel(name: string): string {
  return name.trim().toLowerCase().replace(/[\s_]+/g, "-");
}

/** The waste class of a source label, or null when the table has no entry (the caller reports it). */
export function mapWasteLabel(name: string): WasteClass | null {
  const key = normalizeLabel(name);
  return Object.hasOwn(WASTE_LABEL_MAP, key) ? WASTE_LABEL_MAP[key] : null;
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

type Log = (line: string) => void;
const noLog: Log = () => {};

/** Hub requests are small and many: a short first pause before a retry. */
const HUB_RETRY = { backoffMs: 200 };

/** Code-unit order: deterministic across locales. */
function byString(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/**
 * Runs fn over items with bounded concurrency; on failure, stops taking new items, waits for the
 * in-flight ones, rethrows.
 */
async function runPool<T>(
  items: readonly T[], concurrency: number, fn: (item: T, i: number) => Promise<void>,
): Promise<void> {
  let next = 0;
  let failed = false;
  const worker = async () => {
    while (!failed && next < items.length) {
      const i = next++;
      try {
        await fn(items[i], i);
      } catch (e) {
        failed = true;
        throw e;
      }
    }
  };
  const results = await Promise.allSettled(Array.from({ length: Math.min(concurrency, items.length) }, worker));
  for (const r of results) if (r.status === "rejected") throw r.reason;
}

/** Removes `from` and its parents up to and including `top` while they are empty (undoes a mkdir -p). */
async function removeEmptyDirs(from: string, top: string | undefined): Promise<void> {
  if (top === undefined) return;
  for (let d = from; d.startsWith(top); d = dirname(d)) {
    try {
      await rmdir(d); // fails on a non-empty dir: stop there
    } catch {
      return;
    }
    if (d === top) return;
  }
}

/** Logs "label: done/total" at most every ~5% (and at the end). */
function progress(log: Log, label: string, total: number): (done: number) => void {
  const step = Math.max(1, Math.floor(total / 20));
  return (done) => {
    if (done === total || done % step === 0) log(`${label}: ${done}/${total}`);
  };
}

/** Streams a byte stream to a file, reporting bytes written. */
async function streamToFile(
  body: ReadableStream<Uint8Array>,
  path: string,
  total: number | undefined,
  onBytes: (written: number, total: number | undefined) => void,
): Promise<number> {
  const fh = await open(path, "w");
  let written = 0;
  try {
    const reader = body.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      await fh.write(value);
      written += value.byteLength;
      onBytes(written, total);
    }
  } finally {
    await fh.close();
  }
  return written;
}

function byteProgress(log: Log, label: string): (written: number, total: number | undefined) => void {
  let nextPct = 10;
  let lastLog = Date.now();
  return (written, total) => {
    const mb = (written / 1e6).toFixed(1);
    if (total && total > 0) {
      const pct = Math.floor((written / total) * 100);
      if (pct >= nextPct) {
        log(`${label}: ${mb}/${(total / 1e6).toFixed(1)} MB (${pct}%)`);
        nextPct = Math.floor(pct / 10) * 10 + 10;
      }
    } else if (Date.now() - lastLog > 5000) {
      lastLog = Date.now();
      log(`${label}: ${mb} MB`);
    }
  };
}

/** Image type from magic bytes, or null. */
function sniffImageExt(b: Uint8Array): string | null {
  const at = (i: number) => (i < b.length ? b[i] : -1);
  if (at(0) === 0xff && at(1) === 0xd8 && at(2) === 0xff) return ".jpg";
  if (at(0) === 0x89 && at(1) === 0x50 && at(2) === 0x4e && at(3) === 0x47) return ".png";
  if (at(0) === 0x47 && at(1) === 0x49 && at(2) === 0x46) return ".gif";
  if (at(0) === 0x42 && at(1) === 0x4d) return ".bmp";
  const tiffLittle = at(0) === 0x49 && at(1) === 0x49 && at(2) === 0x2a;
  const tiffBig = at(0) === 0x4d && at(1) === 0x4d && at(3) === 0x2a;
  if (tiffLittle || tiffBig) return ".tiff";
  const ascii = (from: number, to: number) => String.fromCharCode(...b.subarray(from, to));
  if (b.length >= 12 && ascii(0, 4) === "RIFF" && ascii(8, 12) === "WEBP") return ".webp";
  if (b.length >= 12 && ascii(4, 8) === "ftyp") {
    const brand = ascii(8, 12);
    if (brand === "avif" || brand === "avis") return ".avif";
    if (brand.startsWith("hei") || brand === "mif1" || brand === "heix") return ".heic";
  }
  return null;
}

function safeName(s: string): string {
  return s.replace(/[^A-Za-z0-9._-]+/g, "_").replace(/^\.+/, "_");
}

// ---------------------------------------------------------------------------
// Hugging Face datasets
// ---------------------------------------------------------------------------

const TreeEntry = type({ type: "string", path: "string", "size?": "number" });

const HF_MARKER = ".hf-download.json";
const Marker = type({
  repo: "string",
  revision: "string",
  classes: "string[]",
  counts: { "[string]": "number" },
  unmapped: { "[string]": "number" },
});
type Marker = typeof Marker.infer;

/** HF `datasets` stores an Image as struct {bytes, path}. */
const ImageStruct = type({ bytes: type.instanceOf(Uint8Array).or("null"), "path?": "string | null" });
const LabelValue = type("number | bigint | string").or(type.instanceOf(Uint8Array));

/** `huggingface` key of parquet key-value metadata written by HF `datasets`. */
const HfParquetMeta = type({
  "info?": {
    "features?": {
      "[string]": { "_type?": "string", "names?": "string[]" },
    },
  },
});

/** README YAML front matter: `dataset_info.features[].dtype.class_label.names`. */
const ClassLabelNames = type("string[]").or({ "[string]": "string" });
const ReadmeFeature = type({
  name: "string",
  "dtype?": type("string").or({ "class_label?": { names: ClassLabelNames } }),
  "class_label?": { names: ClassLabelNames },
});
const ReadmeInfo = type({ "config_name?": "string", "features?": ReadmeFeature.array() });
const ReadmeYaml = type({ "dataset_info?": ReadmeInfo.or(ReadmeInfo.array()) });

export type HfDatasetResult = {
  root: string;
  classes: string[];
  counts: Record<string, number>;
  unmapped: Record<string, number>;
};

export type HfDatasetOptions = {
  repo: string;
  destDir: string;
  hubUrl?: string;
  revision?: string;
  accessToken?: string;
  log?: (l: string) => void;
};

/**
 * Key in `unmapped` for images with no label: no label folder (repo root or right under a split
 * folder), or a null / -1 label.
 */
const NO_LABEL = "(no label)";

/** Directory names that are splits, never labels (a file right under one has no label). */
const SPLIT_DIRS = new Set([
  "train", "test", "val", "valid", "validation", "dev", "eval", "evaluation", "data", "dataset", "images",
]);

/**
 * Downloads a Hugging Face dataset repo and materializes it as an ImageFolder at
 * `destDir/<waste class>/<file>`. Handles parquet shards (image struct column +
 * ClassLabel int or string label column) and image folders
 * (`[split/]<label>/<image>`). Labels go through `mapWasteLabel`; unmapped ones
 * are skipped and counted in `unmapped`. Reuses a completed download without
 * touching the network. Throws a one-line Error that suggests `--source`.
 */
export async function downloadHfDataset(opts: HfDatasetOptions): Promise<HfDatasetResult> {
  const log = opts.log ?? noLog;
  const dest = resolve(opts.destDir);
  const repoName = opts.repo.replace(/^datasets\//, "");
  const revision = opts.revision ?? "main";
  const fail = (why: string): Error =>
    new Error(
      `Hugging Face dataset ${repoName}@${revision} could not be downloaded to ${dest}: ${why}. ` +
        `To use a local folder instead, pass --source /path/to/ImageFolder (one subfolder per class).`,
    );

  // Reuse a completed download: no network.
  const markerPath = join(dest, HF_MARKER);
  if (existsSync(dest)) {
    if (!existsSync(markerPath)) {
      throw fail(`the destination exists but holds no completed download (${HF_MARKER} missing); ` +
        "remove it or point --source at it");
    }
    let json: unknown;
    try {
      json = JSON.parse(readFileSync(markerPath, "utf8"));
    } catch (e) {
      throw fail(`unreadable ${HF_MARKER} (${oneLine(e)}); remove ${dest} and retry`);
    }
    const parsed = Marker(json);
    if (parsed instanceof type.errors) throw fail(`corrupt ${HF_MARKER}: ${parsed.summary}`);
    if (parsed.repo !== repoName || parsed.revision !== revision) {
      throw fail(`the destination holds ${parsed.repo}@${parsed.revision}; choose another destination`);
    }
    log(`hf: reusing ${dest} (${Object.entries(parsed.counts).map(([c, n]) => `${c}=${n}`).join(" ")})`);
    return { root: dest, classes: parsed.classes, counts: parsed.counts, unmapped: parsed.unmapped };
  }

  const createdParent = await mkdir(dirname(dest), { recursive: true });
  try {
    const result = await replaceDirAtomic(dest, (tmp) => materializeHf(opts, repoName, revision, tmp, log));
    log(`hf: done: ${dest} (${result.classes.map((c) => `${c}=${result.counts[c]}`).join(" ")})`);
    return { root: dest, ...result };
  } catch (e) {
    await removeEmptyDirs(dirname(dest), createdParent);
    throw fail(oneLine(e));
  }
}

/** Lists the repo, writes its images as `tmp/<waste class>/<file>` and the completion marker. */
async function materializeHf(
  opts: HfDatasetOptions, repoName: string, revision: string, tmp: string, log: Log,
): Promise<Omit<HfDatasetResult, "root">> {
  const hubUrl = opts.hubUrl?.replace(/\/+$/, "");
  const ctx: HfCtx = {
    repo: { type: "dataset", name: repoName },
    revision,
    hubUrl,
    accessToken: opts.accessToken,
    log,
    tmp,
    counts: {},
    unmapped: {},
  };
  log(`hf: listing ${repoName}@${revision}`);
  const files = await withRetry("listing the repo", async () => {
    const out: { path: string; size: number }[] = [];
    const listing = listFiles({ repo: ctx.repo, revision, recursive: true, hubUrl, accessToken: opts.accessToken });
    for await (const entry of listing) {
      const e = TreeEntry(entry);
      if (e instanceof type.errors) throw new Error(`unexpected tree entry: ${e.summary}`);
      if (e.type === "file") out.push({ path: e.path, size: e.size ?? 0 });
    }
    return out;
  }, HUB_RETRY);
  files.sort((a, b) => byString(a.path, b.path));

  const parquet = files.filter((f) => f.path.toLowerCase().endsWith(".parquet"));
  const images = files.filter((f) => isImagePath(f.path));
  if (parquet.length > 0) {
    log(`hf: parquet layout, ${parquet.length} file(s)`);
    await materializeParquet(ctx, parquet, files.some((f) => f.path === "README.md"));
  } else if (images.length > 0) {
    log(`hf: image-folder layout, ${images.length} image(s)`);
    await materializeImageFolder(ctx, images);
  } else {
    const exts = [...new Set(files.map((f) => extname(f.path).toLowerCase() || f.path))].slice(0, 8);
    throw new Error(`no parquet or image files in the repo (found ${files.length} file(s): ${exts.join(", ")})`);
  }

  const classes = Object.keys(ctx.counts).filter((c) => ctx.counts[c] > 0).sort(byString);
  const counts = Object.fromEntries(classes.map((c) => [c, ctx.counts[c]]));
  const unmapped = Object.fromEntries(Object.keys(ctx.unmapped).sort(byString).map((l) => [l, ctx.unmapped[l]]));
  if (classes.length === 0) {
    throw new Error(`no label maps to a waste class (unmapped: ${JSON.stringify(unmapped)}); extend WASTE_LABEL_MAP`);
  }
  for (const c of WASTE_CLASSES) if (!ctx.counts[c]) log(`hf: warning: no images for class ${c}`);
  if (Object.keys(unmapped).length > 0) {
    const list = Object.entries(unmapped).map(([l, n]) => `${l}=${n}`).join(" ");
    log(`hf: skipped unmapped labels (not in WASTE_LABEL_MAP): ${list}`);
  }
  await rm(join(tmp, ".raw"), { recursive: true, force: true });
  const marker: Marker = { repo: repoName, revision, classes, counts, unmapped };
  await writeFile(join(tmp, HF_MARKER), JSON.stringify(marker, null, 2) + "\n");
  return { classes, counts, unmapped };
}

type HfCtx = {
  repo: RepoId;
  revision: string;
  hubUrl?: string;
  accessToken?: string;
  log: Log;
  tmp: string;
  counts: Record<string, number>;
  unmapped: Record<string, number>;
};

/** Percent-encodes each segment: the client puts `path` in the URL as is. */
function encodePath(p: string): string {
  return p.split("/").map(encodeURIComponent).join("/");
}

async function hfBlob(ctx: HfCtx, path: string): Promise<Blob> {
  const blob = await downloadFile({
    repo: ctx.repo,
    path: encodePath(path),
    revision: ctx.revision,
    hubUrl: ctx.hubUrl,
    accessToken: ctx.accessToken,
    // Plain HTTP GET of the resolve URL (the hub redirects to its CDN); no xet reconstruction.
    xet: false,
  });
  if (!blob) throw new Error(`${path} not found in the repo`);
  return blob;
}

/** `[split/]…/<label>/<image>`: the label is the image's parent folder (as HF imagefolder infers it). */
async function materializeImageFolder(ctx: HfCtx, images: { path: string; size: number }[]): Promise<void> {
  const jobs: { path: string; cls: WasteClass; out: string }[] = [];
  for (const f of images) {
    const parts = f.path.split("/");
    const label = parts.length >= 2 ? parts[parts.length - 2] : "";
    if (label === "" || SPLIT_DIRS.has(label.toLowerCase())) {
      ctx.unmapped[NO_LABEL] = (ctx.unmapped[NO_LABEL] ?? 0) + 1;
      continue;
    }
    const cls = mapWasteLabel(label);
    if (cls === null) {
      ctx.unmapped[label] = (ctx.unmapped[label] ?? 0) + 1;
      continue;
    }
    const flat = parts.map(safeName).join("__");
    jobs.push({ path: f.path, cls, out: join(ctx.tmp, cls, flat) });
  }
  const report = progress(ctx.log, "hf: files", jobs.length);
  let done = 0;
  for (const c of new Set(jobs.map((j) => j.cls))) await mkdir(join(ctx.tmp, c), { recursive: true });
  await runPool(jobs, 8, async (job) => {
    const fetchOne = async () => new Uint8Array(await (await hfBlob(ctx, job.path)).arrayBuffer());
    const bytes = await withRetry(`downloading ${job.path}`, fetchOne, HUB_RETRY);
    await writeFile(job.out, bytes);
    ctx.counts[job.cls] = (ctx.counts[job.cls] ?? 0) + 1;
    report(++done);
  });
}

/** Class names of an int label column: the parquet `huggingface` metadata, else the README YAML. */
function namesFromParquetMeta(meta: FileMetaData, column: string): string[] | null {
  const kv = meta.key_value_metadata?.find((k) => k.key === "huggingface");
  if (!kv?.value) return null;
  let json: unknown;
  try {
    json = JSON.parse(kv.value);
  } catch {
    return null;
  }
  const parsed = HfParquetMeta(json);
  if (parsed instanceof type.errors) return null;
  return parsed.info?.features?.[column]?.names ?? null;
}

function namesList(names: typeof ClassLabelNames.infer): string[] {
  if (Array.isArray(names)) return names;
  const out: string[] = [];
  for (const [k, v] of Object.entries(names)) out[Number(k)] = v;
  return out;
}

/** ClassLabel names of `column` from a dataset card's YAML front matter (`dataset_info.features`), or null. */
export function classNamesFromReadme(readme: string, column: string): string[] | null {
  const m = /^\uFEFF?---\r?\n([\s\S]*?)\r?\n---/.exec(readme);
  if (!m) return null;
  let yaml: unknown;
  try {
    yaml = Bun.YAML.parse(m[1]);
  } catch {
    return null;
  }
  const parsed = ReadmeYaml(yaml);
  if (parsed instanceof type.errors) return null;
  const info = parsed.dataset_info;
  const infos = info === undefined ? [] : Array.isArray(info) ? info : [info];
  for (const info of infos) {
    for (const f of info.features ?? []) {
      if (f.name !== column) continue;
      const names = typeof f.dtype === "object" ? f.dtype.class_label?.names : f.class_label?.names;
      if (names) return namesList(names);
    }
  }
  return null;
}

const LABEL_COLUMNS = ["label", "labels", "class", "category", "target", "class_name", "label_name", "fine_label"];

function pickColumns(tree: SchemaTree): { image: string; label: string } {
  const top = tree.children;
  const image = top.find((c) => c.children.some((g) => g.element.name === "bytes"));
  const names = () => top.map((c) => c.element.name).join(", ");
  if (!image) throw new Error(`no image column (struct with "bytes") among: ${names()}`);
  const scalars = top.filter((c) => c.children.length === 0);
  const label =
    LABEL_COLUMNS.map((n) => scalars.find((c) => c.element.name.toLowerCase() === n)).find((c) => c !== undefined) ??
    (scalars.length === 1 ? scalars[0] : undefined);
  if (!label) throw new Error(`no label column (one of ${LABEL_COLUMNS.join("/")}) among: ${names()}`);
  return { image: image.element.name, label: label.element.name };
}

async function materializeParquet(
  ctx: HfCtx, files: { path: string; size: number }[], hasReadme: boolean,
): Promise<void> {
  const rawDir = join(ctx.tmp, ".raw");
  await mkdir(rawDir, { recursive: true });
  let readme: string | null | undefined; // fetched at most once, only when a parquet lacks class names
  let skipped = 0;
  for (const [fi, f] of files.entries()) {
    ctx.log(`hf: parquet ${fi + 1}/${files.length}: ${f.path}`);
    const local = join(rawDir, `${fi}.parquet`);
    await withRetry(`downloading ${f.path}`, async () => {
      const blob = await hfBlob(ctx, f.path);
      const n = await streamToFile(blob.stream(), local, blob.size, byteProgress(ctx.log, `hf: ${f.path}`));
      if (blob.size > 0 && n !== blob.size) throw new Error(`short read (${n} of ${blob.size} bytes)`);
    }, HUB_RETRY);

    const file = await asyncBufferFromFile(local);
    const meta = await parquetMetadataAsync(file);
    const cols = pickColumns(parquetSchema(meta));
    let names = namesFromParquetMeta(meta, cols.label);
    const stem = safeName(f.path.replace(/\.parquet$/i, "").replaceAll("/", "__"));

    let rowStart = 0;
    const total = Number(meta.num_rows);
    const report = progress(ctx.log, `hf: rows of ${f.path}`, total);
    for (const rg of meta.row_groups) {
      const rowEnd = rowStart + Number(rg.num_rows);
      const columns = [cols.image, cols.label];
      const rows = await parquetReadObjects({ file, metadata: meta, columns, rowStart, rowEnd, utf8: false });
      for (const [k, row] of rows.entries()) {
        const idx = rowStart + k;
        const raw = row[cols.label];
        // null, or ClassLabel -1 (HF's "no label", e.g. an unlabeled test split)
        if (raw === null || raw === undefined || raw === -1 || raw === -1n) {
          ctx.unmapped[NO_LABEL] = (ctx.unmapped[NO_LABEL] ?? 0) + 1;
          continue;
        }
        const lv = LabelValue(raw);
        if (lv instanceof type.errors) throw new Error(`row ${idx}: label ${lv.summary}`);
        let label: string;
        if (typeof lv === "number" || typeof lv === "bigint") {
          if (names === null) {
            if (readme === undefined) {
              const fetchReadme = async () => (await hfBlob(ctx, "README.md")).text();
              readme = hasReadme ? await withRetry("downloading README.md", fetchReadme, HUB_RETRY) : null;
            }
            names = readme === null ? null : classNamesFromReadme(readme, cols.label);
            if (names === null) {
              throw new Error(`label column "${cols.label}" holds integers but no class names were found ` +
                '(parquet "huggingface" metadata or README dataset_info)');
            }
          }
          const name = names[Number(lv)];
          if (name === undefined) throw new Error(`row ${idx}: label ${lv} out of range (${names.length} class names)`);
          label = name;
        } else {
          label = typeof lv === "string" ? lv : new TextDecoder().decode(lv);
        }
        const cls = mapWasteLabel(label);
        if (cls === null) {
          ctx.unmapped[label] = (ctx.unmapped[label] ?? 0) + 1;
          continue;
        }
        const img = ImageStruct(row[cols.image]);
        if (img instanceof type.errors) throw new Error(`row ${idx}: image ${img.summary}`);
        const bytes = img.bytes;
        const pathExt = img.path ? extname(img.path).toLowerCase() : "";
        const ext = bytes ? (sniffImageExt(bytes) ?? (isImagePath(pathExt) ? pathExt : null)) : null;
        if (!bytes || bytes.length === 0 || ext === null) {
          skipped++;
          continue;
        }
        await mkdir(join(ctx.tmp, cls), { recursive: true });
        await writeFile(join(ctx.tmp, cls, `${stem}__${String(idx).padStart(6, "0")}${ext}`), bytes);
        ctx.counts[cls] = (ctx.counts[cls] ?? 0) + 1;
      }
      rowStart = rowEnd;
      report(rowStart);
    }
    await rm(local, { force: true });
  }
  if (skipped > 0) ctx.log(`hf: warning: skipped ${skipped} row(s) with no embedded image bytes of a known type`);
}

// ---------------------------------------------------------------------------
// CIFAR-100 (official binary release)
// ---------------------------------------------------------------------------

const CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz";
const CIFAR_DIR = "cifar-100-binary";
const CIFAR_FILES = ["train.bin", "test.bin", "fine_label_names.txt", "coarse_label_names.txt"] as const;
const CIFAR_MARKER = ".complete";
const CIFAR_RECORD = 2 + 32 * 32 * 3;

/**
 * Downloads and extracts the CIFAR-100 binary release into `destDir/cifar-100-binary/`
 * and returns that folder. Streams to disk with progress; atomic; reused when present.
 */
export async function downloadCifar100(opts: { destDir: string; url?: string; log?: Log }): Promise<string> {
  const log = opts.log ?? noLog;
  const url = opts.url ?? CIFAR100_URL;
  const root = resolve(opts.destDir);
  const out = join(root, CIFAR_DIR);
  if (existsSync(join(out, CIFAR_MARKER)) && CIFAR_FILES.every((f) => existsSync(join(out, f)))) {
    log(`cifar100: reusing ${out}`);
    return out;
  }
  if (existsSync(out)) {
    throw new Error(`CIFAR-100: ${out} exists but is not a completed download; remove it and retry, ` +
      "or pass --source /path/to/ImageFolder");
  }
  const createdRoot = await mkdir(root, { recursive: true });
  let ok = false;
  try {
    await replaceDirAtomic(out, (tmp) => fetchCifar100(url, tmp, log));
    log(`cifar100: done: ${out}`);
    ok = true;
    return out;
  } catch (e) {
    throw new Error(`CIFAR-100 download from ${url} failed: ${oneLine(e)}. ` +
      "To use a local folder instead, pass --source /path/to/ImageFolder");
  } finally {
    if (!ok) await removeEmptyDirs(root, createdRoot);
  }
}

/** Downloads the archive into `dir`, checks the four files it must hold, and keeps only them. */
async function fetchCifar100(url: string, dir: string, log: Log): Promise<void> {
  const tgz = join(dir, "cifar-100-binary.tar.gz");
  log(`cifar100: downloading ${url}`);
  const res = await fetch(url);
  if (!res.ok || !res.body) throw httpError(res);
  const len = Number(res.headers.get("content-length") ?? NaN);
  await streamToFile(res.body, tgz, Number.isFinite(len) ? len : undefined, byteProgress(log, "cifar100"));
  log("cifar100: extracting");
  const unpacked = join(dir, ".archive");
  await mkdir(unpacked);
  // The official archive holds only cifar-100-binary/ (entries may start with "./").
  await new Bun.Archive(await readFile(tgz)).extract(unpacked);
  await rm(tgz, { force: true });
  const extracted = join(unpacked, CIFAR_DIR);
  for (const f of CIFAR_FILES) {
    const p = join(extracted, f);
    if (!existsSync(p)) throw new Error(`the archive has no ${CIFAR_DIR}/${f}`);
    if (f.endsWith(".bin")) {
      const { size } = await stat(p);
      if (size === 0 || size % CIFAR_RECORD !== 0) {
        throw new Error(`${f} has ${size} bytes, not a multiple of ${CIFAR_RECORD}`);
      }
    }
    await rename(p, join(dir, f));
  }
  await rm(unpacked, { recursive: true, force: true });
  await writeFile(join(dir, CIFAR_MARKER), `${url}\n`);
}

/**
 * Parses the official CIFAR-100 binary layout: per record 1 byte coarse label,
 * 1 byte fine label, then 1024 R, 1024 G, 1024 B bytes (row-major 32x32).
 * Returns images as N*32*32*3 bytes in HWC RGB order.
 */
export function parseCifar100Bin(
  buf: Uint8Array,
): { images: Uint8Array; fine: Uint8Array; coarse: Uint8Array; n: number } {
  if (buf.length === 0 || buf.length % CIFAR_RECORD !== 0) {
    throw new Error(`CIFAR-100 binary has ${buf.length} bytes, not a positive multiple of the ${CIFAR_RECORD}-byte ` +
      "record (1 coarse + 1 fine label + 3072 pixels)");
  }
  const n = buf.length / CIFAR_RECORD;
  const images = new Uint8Array(n * 3072);
  const fine = new Uint8Array(n);
  const coarse = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    const off = i * CIFAR_RECORD;
    coarse[i] = buf[off];
    fine[i] = buf[off + 1];
    const px = off + 2;
    const o = i * 3072;
    for (let p = 0; p < 1024; p++) {
      images[o + p * 3] = buf[px + p];
      images[o + p * 3 + 1] = buf[px + 1024 + p];
      images[o + p * 3 + 2] = buf[px + 2048 + p];
    }
  }
  return { images, fine, coarse, n };
}

export type CifarSplit = { images: Uint8Array; labels: Uint8Array; n: number };

/**
 * Loads train/test (fine labels) and the fine class names from a
 * `cifar-100-binary` folder (or its parent).
 */
export function loadCifar100(dir: string): { train: CifarSplit; test: CifarSplit; classNames: string[] } {
  const inside = !existsSync(join(dir, "train.bin")) && existsSync(join(dir, CIFAR_DIR, "train.bin"));
  const d = inside ? join(dir, CIFAR_DIR) : dir;
  for (const f of CIFAR_FILES) {
    if (!existsSync(join(d, f))) {
      const expected = `expected the ${CIFAR_DIR} folder of the official binary release`;
      throw new Error(`CIFAR-100: ${join(d, f)} is missing (${expected})`);
    }
  }
  const classNames = readFileSync(join(d, "fine_label_names.txt"), "utf8")
    .split(/\r?\n/)
    .map((s) => s.trim())
    .filter((s) => s.length > 0);
  const split = (f: string): CifarSplit => {
    const { images, fine, n } = parseCifar100Bin(new Uint8Array(readFileSync(join(d, f))));
    for (let i = 0; i < n; i++) {
      if (fine[i] >= classNames.length) {
        const only = `only ${classNames.length} class names`;
        throw new Error(`CIFAR-100: ${f} record ${i} has fine label ${fine[i]} but ${only}`);
      }
    }
    return { images, labels: fine, n };
  };
  return { train: split("train.bin"), test: split("test.bin"), classNames };
}

// ---------------------------------------------------------------------------
// Local ImageFolder
// ---------------------------------------------------------------------------

function isDir(p: string): boolean {
  try {
    return statSync(p).isDirectory();
  } catch {
    return false;
  }
}

/** A link that was not followed, and why. */
export interface SkippedLink { path: string; reason: string }
/** A link followed to photos the walk would not reach otherwise: the link, its target, whether a folder. */
export interface FollowedLink { path: string; target: string; folder: boolean }

export interface ImageFolderListing {
  classes: string[];
  files: { path: string; className: string }[];
  /** Links not followed: a loop, a second path into the folder, or a broken link. */
  skippedLinks: SkippedLink[];
  /** Folder links followed (out of the folder, or into a hidden one) and file links out of the folder. */
  followedLinks: FollowedLink[];
}

interface Walk {
  root: string;
  /** The real path of the root: every link target is judged against it. */
  rootReal: string;
  /** Real paths of the folders walked so far: a folder reached twice (through links) is read once. */
  seen: Set<string>;
  skippedLinks: SkippedLink[];
  followedLinks: FollowedLink[];
}

/** True when `p` is `dir` or lies under it (both real, absolute paths). */
function within(dir: string, p: string): boolean {
  return p === dir || p.startsWith(dir.endsWith(sep) ? dir : dir + sep);
}

/**
 * Where the link `full` (in the folder whose real path is `here`) leads: a file to read, a folder to walk
 * (its real path), or null when it is not followed, with the reason recorded. A folder link is followed
 * only when it adds photos found nowhere else: never back up to a folder that contains it (a loop, whose
 * paths would repeat without end and label photos by the wrong class), never to a folder the walk reaches
 * on its own (the photos would be read twice, possibly under another class).
 */
function followLink(full: string, here: string, w: Walk): { folder: false } | { folder: true; real: string } | null {
  const skip = (reason: string) => {
    w.skippedLinks.push({ path: full, reason });
    return null;
  };
  let real: string;
  try {
    real = realpathSync(full);
  } catch {
    let to = "?";
    try { to = readlinkSync(full); } catch { /* unreadable link: the reason says enough */ }
    return skip(`a broken link (its target ${to} does not exist)`);
  }
  const show = (p: string) => (within(w.rootReal, p) ? join(w.root, relative(w.rootReal, p)) : p);
  if (!isDir(real)) {
    if (!within(w.rootReal, real)) w.followedLinks.push({ path: full, target: real, folder: false });
    return { folder: false };
  }
  if (within(real, here)) return skip(`a loop: it leads back to ${show(real)}, which contains it`);
  const inTree = within(w.rootReal, real);
  // Hidden folders are never walked, so a link into one is the only way to their photos.
  const hidden = inTree && relative(w.rootReal, real).split(sep).some((part) => part.startsWith("."));
  if (inTree && !hidden) return skip(`a second path to ${show(real)}, whose photos are listed there, once`);
  if (w.seen.has(real)) return skip(`it leads to ${real}, already listed through another link`);
  w.followedLinks.push({ path: full, target: real, folder: true });
  w.seen.add(real); // now, not when walked: two class links to one folder must not both be followed
  return { folder: true, real };
}

function walkImages(dir: string, real: string, rel: string, out: string[], w: Walk): void {
  w.seen.add(real);
  // Sorted: which of two links to one folder is followed must not depend on the file system's order.
  for (const ent of readdirSync(dir, { withFileTypes: true }).sort((a, b) => byString(a.name, b.name))) {
    if (ent.name.startsWith(".")) continue;
    const full = join(dir, ent.name);
    const r = rel ? posix.join(rel, ent.name) : ent.name;
    if (ent.isSymbolicLink()) {
      const to = followLink(full, real, w);
      if (to?.folder) walkImages(full, to.real, r, out, w);
      else if (to !== null && isImagePath(ent.name)) out.push(r);
    } else if (ent.isDirectory()) {
      const sub = join(real, ent.name);
      // Reached already through a link that pointed inside this outside folder: read once.
      if (!w.seen.has(sub)) walkImages(full, sub, r, out, w);
    } else if (isImagePath(ent.name)) {
      out.push(r);
    }
  }
}

/**
 * Lists `root/<class>/**\/<image>`: classes are the direct subfolders (hidden
 * ones skipped) holding at least one image, sorted; files are matched by image
 * extension, recursively, in deterministic sorted order. Links to files are read;
 * links to folders are followed only out of the folder (see followLink), and every
 * link not followed is reported, so no photo is listed twice or through a loop.
 */
export function listImageFolder(root: string): ImageFolderListing {
  const abs = resolve(root);
  if (!existsSync(abs)) throw new Error(`ImageFolder ${abs} does not exist`);
  if (!isDir(abs)) throw new Error(`ImageFolder ${abs} is not a directory`);
  const rootReal = realpathSync(abs);
  const w: Walk = { root: abs, rootReal, seen: new Set([rootReal]), skippedLinks: [], followedLinks: [] };
  const classDirs: { name: string; real: string }[] = [];
  const entries = readdirSync(abs, { withFileTypes: true }).sort((a, b) => byString(a.name, b.name));
  for (const e of entries) {
    if (e.name.startsWith(".")) continue;
    if (e.isDirectory()) classDirs.push({ name: e.name, real: join(rootReal, e.name) });
    else if (e.isSymbolicLink() && isDir(join(abs, e.name))) {
      const to = followLink(join(abs, e.name), rootReal, w);
      if (to?.folder) classDirs.push({ name: e.name, real: to.real });
    }
  }
  if (classDirs.length === 0) {
    const links = w.skippedLinks.map((l) => `${l.path}: ${l.reason}`).join("; ");
    const why = links === "" ? "" : `; links not followed: ${links}`;
    throw new Error(`ImageFolder ${abs} has no class folders (expected ${abs}/<class>/<image>)${why}`);
  }
  const classes: string[] = [];
  const files: { path: string; className: string }[] = [];
  for (const c of classDirs) {
    const rels: string[] = [];
    walkImages(join(abs, c.name), c.real, "", rels, w);
    if (rels.length === 0) continue;
    classes.push(c.name);
    for (const r of rels.sort(byString)) files.push({ path: join(abs, c.name, r), className: c.name });
  }
  if (classes.length === 0) {
    const exts = IMAGE_EXTENSIONS.join(" ");
    const names = classDirs.map((c) => c.name).join(", ");
    throw new Error(`ImageFolder ${abs} has class folders (${names}) but no image files (${exts})`);
  }
  return { classes, files, skippedLinks: w.skippedLinks, followedLinks: w.followedLinks };
}

/**
 * What prepare prints about links: one line per link not followed and per folder link followed, and one
 * line counting image files that are links to files outside the folder.
 */
export function linkReport(l: ImageFolderListing, root: string): string[] {
  const lines = l.skippedLinks.map((s) => `warning: ${s.path}: link not followed: ${s.reason}`);
  const n = l.skippedLinks.length;
  if (n > 0) lines.push(`warning: ${n} link(s) in ${root} not followed (above)`);
  for (const o of l.followedLinks) {
    if (o.folder) lines.push(`note: ${o.path}: a link to ${o.target}, a folder not listed otherwise: followed`);
  }
  const files = l.followedLinks.filter((o) => !o.folder);
  if (files.length > 0) {
    const eg = `${files[0]!.path} -> ${files[0]!.target}`;
    lines.push(`note: ${files.length} image file(s) in ${root} are links to files outside it (e.g. ${eg}): read`);
  }
  return lines;
}

// ---------------------------------------------------------------------------
// The sample shipped in the repository
// ---------------------------------------------------------------------------

/** data/sample, found from the project root (not the cwd): see its README.md for sources and licences. */
export const SAMPLE_DIR = resolve(import.meta.dir, "..", "data", "sample");

/** What every report about the sample says: it is for trying the tool, not for judging a model. */
export const SAMPLE_NOTE = "a small sample of real photos (data/sample) for trying the tool: "
  + "its numbers are NOT a measure of model quality";
export const REAL_SETS_HINT = "to measure a model, prepare a real set: --source hf (needs the network) "
  + "or a local ImageFolder, e.g. --source ../shared/datasets/waste3";

/** The folder behind `--source sample`. */
export function sampleFolder(): string {
  if (!isDir(SAMPLE_DIR)) throw new Error(`${SAMPLE_DIR}: the sample is missing from this checkout; ${REAL_SETS_HINT}`);
  return SAMPLE_DIR;
}
