/**
 * make_sample.ts — rebuilds data/sample/ (the small credited sample of waste3 that ships in the
 * repository) from ../shared/datasets/waste3. Reproducible: the same waste3 and the same sharp
 * give the same files, byte for byte.
 *
 *   bun data/sample/make_sample.ts                  # reads $AR_DATASETS/waste3 (default ../shared/datasets)
 *   bun data/sample/make_sample.ts --from DIR       # another copy of waste3 (it needs its manifest.tsv)
 *
 * Selection: within each stratum (class, source, and for TrashNet its material) the photos are
 * ordered by sha256("<SEED>:<path in waste3>") and the first QUOTA are taken; organic has only 8
 * photos in waste3, and all 8 are taken. Each chosen photo is checked against waste3's sha256,
 * shrunk to at most MAX_SIDE px on its longer side and re-encoded as JPEG (quality JPEG_QUALITY,
 * no metadata). data/sample/manifest.tsv lists every file with its source, licence, original path
 * and sha256; data/sample/README.md gives the attributions.
 */
import { copyFileSync, existsSync, readFileSync, writeFileSync } from "node:fs";
import { basename, join, resolve } from "node:path";
import { type } from "arktype";
import { cac } from "cac";
import sharp from "sharp";
import { writeAtomic, replaceDirAtomic } from "../../lib/atomic.ts";
import { sha256Hex } from "../../lib/images.ts";
import { WASTE_CLASSES } from "../../lib/sources.ts";

const HERE = import.meta.dir;
/** The shared real sets beside the clone (AR_DATASETS overrides), as the tests find them. */
const DATASETS_DIR = resolve(process.env.AR_DATASETS ?? join(HERE, "..", "..", "..", "shared", "datasets"));
const SEED = "autoresearch-vision-sample-v1";
const MAX_SIDE = 160;
const JPEG_QUALITY = 80;
/** Licence files of waste3 that travel with the photos (the attribution they require). */
const LICENCE_FILES = ["LICENSE.trashnet.MIT", "README.dataset.ecoera-e-waste.txt"];
const LICENCES: Record<string, string> = {
  trashnet: "MIT (Copyright (c) 2017 Gary Thung)",
  ecoera: "CC BY 4.0",
  wastedetect: "CC BY 4.0",
};

interface Stratum { cls: string; source: string; material?: string; quota: number | "all" }
const STRATA: Stratum[] = [
  { cls: "ewaste", source: "ecoera", quota: 40 },
  ...["cardboard", "glass", "metal", "paper", "plastic"]
    .map((material) => ({ cls: "recyclable", source: "trashnet", material, quota: 5 })),
  { cls: "recyclable", source: "ecoera", quota: 15 },
  { cls: "organic", source: "wastedetect", quota: "all" },
];

const Row = type({
  path: "string",
  class: type.enumerated(...WASTE_CLASSES),
  source: "string",
  sha256: /^[0-9a-f]{64}$/,
});
type Row = typeof Row.infer;

/** waste3's manifest.tsv (path, class, source, sha256), each row validated. */
function readManifest(file: string): Row[] {
  if (!existsSync(file)) throw new Error(`${file}: missing (point --from at a copy of waste3 with its manifest.tsv)`);
  const [header, ...lines] = readFileSync(file, "utf8").split(/\r?\n/).filter((l) => l !== "");
  if (header !== "path\tclass\tsource\tsha256") {
    throw new Error(`${file}: header is "${header}", expected path, class, source, sha256`);
  }
  return lines.map((line, i) => {
    const [path, cls, source, sha256] = line.split("\t");
    const row = Row({ path, class: cls, source, sha256 });
    if (row instanceof type.errors) throw new Error(`${file}:${i + 2}: ${row.summary}`);
    return row;
  });
}

/** TrashNet file names carry their material: trashnet_glass12.jpg. */
function materialOf(path: string): string | undefined {
  return /^trashnet_([a-z]+)\d/.exec(basename(path))?.[1];
}

/** The seeded order: a photo's rank depends only on the seed and its own path. */
function rank(path: string): string {
  return sha256Hex(new TextEncoder().encode(`${SEED}:${path}`));
}

export function select(rows: Row[]): Row[] {
  const chosen: Row[] = [];
  for (const s of STRATA) {
    const inStratum = (r: Row) => r.class === s.cls && r.source === s.source
      && (s.material === undefined || materialOf(r.path) === s.material);
    const pool = rows.filter(inStratum);
    const n = s.quota === "all" ? pool.length : s.quota;
    if (pool.length < n) {
      const name = `${s.cls}/${s.source}${s.material ? `/${s.material}` : ""}`;
      throw new Error(`waste3 has ${pool.length} ${name} photos, the sample wants ${n}`);
    }
    const sorted = pool
      .map((r) => ({ r, key: rank(r.path) }))
      .sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
    chosen.push(...sorted.slice(0, n).map((x) => x.r));
  }
  return chosen;
}

async function main(from: string): Promise<void> {
  const rows = select(readManifest(join(from, "manifest.tsv")));
  const out: string[] = ["path\tclass\tsource\tlicence\toriginal_path\tsha256"];
  let bytes = 0;
  for (const cls of WASTE_CLASSES) {
    await replaceDirAtomic(join(HERE, cls), async (tmp) => {
      for (const r of rows.filter((x) => x.class === cls).sort((a, b) => (a.path < b.path ? -1 : 1))) {
        const original = new Uint8Array(readFileSync(join(from, r.path)));
        if (sha256Hex(original) !== r.sha256) {
          throw new Error(`${join(from, r.path)}: sha256 differs from waste3's manifest.tsv`);
        }
        const jpeg = await sharp(original)
          .rotate()
          .resize(MAX_SIDE, MAX_SIDE, { fit: "inside", withoutEnlargement: true })
          .jpeg({ quality: JPEG_QUALITY })
          .toBuffer();
        const name = basename(r.path).replace(/\.[^.]+$/, ".jpg");
        writeFileSync(join(tmp, name), jpeg);
        bytes += jpeg.length;
        const licence = LICENCES[r.source] ?? "unknown";
        out.push([`${cls}/${name}`, cls, r.source, licence, `waste3/${r.path}`, sha256Hex(jpeg)].join("\t"));
      }
    });
  }
  writeAtomic(join(HERE, "manifest.tsv"), out.join("\n") + "\n");
  for (const f of LICENCE_FILES) copyFileSync(join(from, f), join(HERE, f));
  const counts = WASTE_CLASSES.map((c) => `${c} ${rows.filter((r) => r.class === c).length}`).join(", ");
  console.log(`data/sample: ${rows.length} photos (${counts}), ${(bytes / 1e3).toFixed(0)} kB of JPEG`);
}

if (import.meta.main) {
  const cli = cac("make_sample.ts");
  cli.option("--from <dir>", "the waste3 folder", { default: join(DATASETS_DIR, "waste3") });
  cli.help();
  const { options } = cli.parse();
  if (!options.help) {
    main(resolve(String(options.from))).catch((err: unknown) => {
      console.error(`error: ${err instanceof Error ? err.message : String(err)}`);
      process.exit(1);
    });
  }
}
