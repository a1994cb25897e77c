import { describe, expect, test } from "bun:test";
import {
  closeSync, cpSync, existsSync, mkdirSync, openSync, readFileSync, rmSync, symlinkSync, writeFileSync, writeSync,
} from "node:fs";
import { join } from "node:path";
import sharp from "sharp";
import * as tf from "@tensorflow/tfjs";
import {
  activeCacheDir, cacheFiles, cacheFingerprint, computeMetrics, evaluate, footerLines, hashSplit, interval95,
  loadCache, METRIC_HELP, parseFooter, prepareData, splitByHash, TASK_METRICS, trivialScore, type Manifest,
  type Predictor, type Split, type Task,
} from "../prepare.ts";
import { decodeFailure, decodeToRgb, sha256Hex } from "../lib/images.ts";
import { SAMPLE_DIR } from "../lib/sources.ts";
import { BUN, HAVE_DATASETS, ROOT, runScript, sliceOf, tempDir } from "./helpers.ts";

const quiet = () => {};
/** Decoding real photos, building a 12000×12000 PNG or starting `bun prepare.ts` outlasts Bun's 5 s default. */
const SLOW = 180_000;
const FACTS = {
  training_seconds: 1, total_seconds: 2, peak_memory_mb: 3, num_steps: 4, num_params: 5, backend: "wasm",
};

describe("prepare on real images", () => {
  test("a slice of the sample: counts, split, reuse, stable split when files are added", async () => {
    const src = sliceOf("sample", 12);
    const cache = tempDir();
    const lines: string[] = [];
    const first = await prepareData({ task: "waste", source: src, cacheRoot: cache, log: (l) => lines.push(l) });
    expect(first.reused).toBe(false);
    const m = first.manifest;
    expect(m.classes).toEqual(["ewaste", "recyclable", "organic"]);
    expect(m.items.length).toBe(12 + 12 + 8); // organic has only 8 photos, in waste3 and in the sample
    expect(m.skipped).toBe(0);
    // every class is measured at all: at least one val and one test image each, and one to train on
    for (let c = 0; c < 3; c++) {
      for (const split of ["train", "val", "test"]) {
        expect(m.items.some((it) => it.label === c && it.split === split)).toBe(true);
      }
    }
    expect(lines.some((l) => l.includes("only 8 images"))).toBe(true);
    // A copy of the photos in a folder of one's own: the yields note, but not the waste3 caveat (that is
    // about ../shared's waste3 and data/sample, not about a person's own photos).
    expect(lines.some((l) => l.includes("caveat"))).toBe(false);
    expect(lines.some((l) => l.includes("yields are ASSUMED"))).toBe(true);
    expect(lines.some((l) => /^split: train \d+ +val \d+ .* test \d+/.test(l))).toBe(true);
    expect(lines.some((l) => /95% interval of an accuracy, at worst: ±0\.\d{3} on \d+ val images/.test(l))).toBe(true);
    const ds = await loadCache(undefined, cache);
    expect(ds.images.length).toBe(32 * 64 * 64 * 3);
    expect(ds.train.length + ds.val.length + ds.test.length).toBe(32);
    expect(ds.yields[ds.train[0]!]).toBeGreaterThan(0);

    const again = await prepareData({ task: "waste", source: src, cacheRoot: cache, log: quiet });
    expect(again.reused).toBe(true);

    // Adding files re-prepares; an existing file keeps its side unless the small-class floor had put
    // it there (then it may go back), and nothing learned before moves to val or test.
    const before = new Map(m.items.map((it) => [it.sha256, it.split]));
    cpSync(join(SAMPLE_DIR, "recyclable"), join(src, "recyclable"), { recursive: true });
    const grown = await prepareData({ task: "waste", source: src, cacheRoot: cache, log: quiet });
    expect(grown.reused).toBe(false);
    expect(grown.manifest.items.length).toBeGreaterThan(m.items.length);
    for (const it of grown.manifest.items) {
      const was = before.get(it.sha256);
      if (was === undefined || was !== hashSplit(it.sha256)) continue;
      expect(it.split).toBe(was);
    }
    for (const it of grown.manifest.items) if (before.get(it.sha256) === "train") expect(it.split).toBe("train");
  }, SLOW);

  test("--source sample: no ../shared, any cwd, says it is a sample; its files are those of manifest.tsv", async () => {
    const cache = tempDir();
    const env = { AR_CACHE: cache, AR_DATASETS: join(tempDir(), "no-such-folder") };
    const r = runScript([join(ROOT, "prepare.ts"), "--source", "sample"], env, tempDir());
    expect(r.code).toBe(0);
    expect(r.out).toContain("NOT a measure of model quality");
    expect(r.out).toContain("--source hf");
    expect(r.out).toMatch(/class organic .*only 8 images/);
    const ds = await loadCache(undefined, cache);
    expect(ds.manifest.sample).toBe(true);
    expect(ds.manifest.source).toBe(SAMPLE_DIR);
    expect(ds.manifest.skipped).toBe(0);
    // manifest.tsv lists exactly the files prepared, each with the sha256 of its bytes, source and licence.
    const [header, ...lines] = readFileSync(join(SAMPLE_DIR, "manifest.tsv"), "utf8").trim().split("\n");
    expect(header).toBe("path\tclass\tsource\tlicence\toriginal_path\tsha256");
    const rows = lines.map((l) => l.split("\t"));
    const listed = new Map(rows.map(([path, cls, , , , sha]) => [path, { cls, sha }]));
    expect(ds.manifest.items.map((it) => it.path).sort()).toEqual([...listed.keys()].sort());
    for (const it of ds.manifest.items) {
      const got = { path: it.path, cls: ds.manifest.classes[it.label], sha: it.sha256 };
      expect(got).toEqual({ path: it.path, ...listed.get(it.path)! });
    }
    const count = (cls: string) => rows.filter((row) => row[1] === cls).length;
    const prepared = ds.manifest.classes.map((_, c) => ds.manifest.items.filter((it) => it.label === c).length);
    expect(prepared).toEqual(ds.manifest.classes.map(count));
    expect(count("organic")).toBe(8);
    for (const row of rows) {
      const licence = /^(trashnet MIT \(Copyright \(c\) 2017 Gary Thung\)|ecoera CC BY 4\.0|wastedetect CC BY 4\.0)$/;
      expect(`${row[2]} ${row[3]}`).toMatch(licence);
    }
    expect(existsSync(join(SAMPLE_DIR, "LICENSE.trashnet.MIT"))).toBe(true);
    const cifar = prepareData({ task: "cifar100", source: "sample", cacheRoot: cache, log: quiet });
    await expect(cifar).rejects.toThrow(/--source sample holds waste photos/);
  }, SLOW);

  test.skipIf(!HAVE_DATASETS)("screening on trashnet6 needs a known positive class", async () => {
    const src = sliceOf("trashnet6", 4);
    const cache = tempDir();
    const wrong = prepareData({ task: "screening", source: src, positive: "nope", cacheRoot: cache, log: quiet });
    await expect(wrong).rejects.toThrow(/positive class "nope"/);
    const r = await prepareData({ task: "screening", source: src, positive: "trash", cacheRoot: cache, log: quiet });
    expect(r.manifest.classes).toEqual(["cardboard", "glass", "metal", "paper", "plastic", "trash"]);
    expect(r.manifest.positiveClass).toBe("trash");
  }, SLOW);
});

describe("folders and caches that must not be trusted as they are", () => {
  test("links in a folder: loops and second paths are named and not followed; each photo is read once", async () => {
    const src = sliceOf("sample", 4); // 12 real photos, 4 per class
    symlinkSync("..", join(src, "ewaste", "loop"));
    symlinkSync("..", join(src, "organic", "loop"));
    symlinkSync("../organic", join(src, "recyclable", "more"));
    const cache = tempDir();
    // Its own process with a time limit: following such loops never ends.
    const r = Bun.spawnSync([BUN, join(ROOT, "prepare.ts"), "--source", src], {
      env: { ...process.env, AR_CACHE: cache }, stdout: "pipe", stderr: "pipe", timeout: 60_000,
    });
    const out = r.stdout.toString() + r.stderr.toString();
    expect(r.exitCode).toBe(0);
    const m = (await loadCache(undefined, cache)).manifest;
    expect(m.items.length).toBe(12);
    for (const it of m.items) {
      expect(it.path.split("/").length).toBe(2); // class/photo: no path through a link
      expect(m.classes[it.label]).toBe(it.path.split("/")[0]!); // labelled by its own folder
    }
    expect(out).toContain(`warning: ${src}/ewaste/loop: link not followed: a loop: it leads back to ${src}, which`);
    expect(out).toContain(`warning: ${src}/organic/loop: link not followed: a loop`);
    expect(out).toContain(`warning: ${src}/recyclable/more: link not followed: a second path to ${src}/organic`);
    expect(out).toContain(`warning: 3 link(s) in ${src} not followed (above)`);
  }, SLOW);

  test("a cache changed after prepare: loadCache refuses it, prepare rebuilds it and says why", async () => {
    const src = sliceOf("sample", 3);
    const cache = tempDir();
    const first = await prepareData({ task: "waste", source: src, cacheRoot: cache, log: quiet });
    const session = await cacheFingerprint(cache); // what the loop records at the start of a session
    const { images, manifest } = cacheFiles(first.dir);
    const command = `bun prepare.ts --task waste --source ${src}`;
    const prepareAgain = async () => {
      const lines: string[] = [];
      const r = await prepareData({ task: "waste", source: src, cacheRoot: cache, log: (l) => lines.push(l) });
      return { reused: r.reused, said: lines.filter((l) => l.endsWith("; rebuilding it")) };
    };

    // One byte of images.u8 written in place, as a train.ts writing into the cache would.
    const fd = openSync(images, "r+");
    writeSync(fd, Uint8Array.of(7), 0, 1, 5);
    closeSync(fd);
    expect((await cacheFingerprint(cache)).images).not.toBe(session.images); // the loop sees it…
    const changed = `${images} does not match the sha256 recorded in ${manifest}: it was changed after prepare`;
    await expect(loadCache(undefined, cache)).rejects.toThrow(`${changed}; rebuild it: \`${command}\``);
    const rebuilt = await prepareAgain(); // …and its advice, re-running prepare with the same source, works
    expect(rebuilt).toEqual({ reused: false, said: [`cache: ${changed}; rebuilding it`] });
    expect(await cacheFingerprint(cache)).toEqual(session);
    expect(await prepareAgain()).toEqual({ reused: true, said: [] });

    // A label edited in manifest.json.
    const edited = JSON.parse(readFileSync(manifest, "utf8")) as Manifest;
    edited.items[0]!.label = (edited.items[0]!.label + 1) % 3;
    writeFileSync(manifest, JSON.stringify(edited));
    await expect(loadCache(undefined, cache)).rejects.toThrow(`${manifest} does not match the sha256 it recorded`);
    expect(await prepareAgain()).toEqual({
      reused: false, said: [`cache: ${manifest} does not match the sha256 it recorded: it was edited after prepare; ` +
        "rebuilding it"],
    });
    expect(await cacheFingerprint(cache)).toEqual(session);

    // A cache from before the checksums: it still loads; prepare rebuilds it once, then reuses it.
    const { checksums: _checksums, ...older } = JSON.parse(readFileSync(manifest, "utf8")) as Manifest;
    writeFileSync(manifest, JSON.stringify(older));
    expect((await loadCache(undefined, cache)).manifest.checksums).toBeUndefined();
    const upgraded = await prepareAgain();
    expect(upgraded.reused).toBe(false);
    expect(upgraded.said).toEqual([`cache: ${manifest} records no checksums (an older prepare.ts wrote it), ` +
      "so its content cannot be verified; rebuilding it"]);
    expect(await prepareAgain()).toEqual({ reused: true, said: [] });

    rmSync(images);
    expect((await prepareAgain()).said).toEqual([`cache: ${images} is missing, but ${manifest} lists 9 images ` +
      `(${9 * 64 * 64 * 3} bytes); rebuilding it`]);
  }, SLOW);

  test("a dataset a classifier cannot learn is refused at prepare, with the reason", async () => {
    const cache = tempDir();
    const only = sliceOf("sample", 3, ["ewaste"]);
    const screening = prepareData({ task: "screening", source: only, positive: "ewaste", cacheRoot: cache });
    await expect(screening).rejects.toThrow(`${only}: screening needs negatives, but the positive class "ewaste" ` +
      "is the only class with images (ewaste 3); add folders of other classes");
    const waste = prepareData({ task: "waste", source: only, cacheRoot: cache, log: quiet });
    await expect(waste).rejects.toThrow(`${only}: only ewaste 3 has images; a classifier needs images of at least ` +
      "2 classes (of ewaste, recyclable, organic)");
    // A positive class whose folder is empty, or whose files all fail to decode.
    const two = sliceOf("sample", 2, ["organic", "recyclable"]);
    mkdirSync(join(two, "ewaste"));
    const empty = prepareData({ task: "screening", source: two, positive: "ewaste", cacheRoot: cache, log: quiet });
    await expect(empty).rejects.toThrow(`${two}/ewaste: the positive class's folder holds no images ` +
      "(classes with images: organic, recyclable)");
    writeFileSync(join(two, "ewaste", "broken.jpg"), "not a photo");
    const broken = prepareData({ task: "screening", source: two, positive: "ewaste", cacheRoot: cache, log: quiet });
    await expect(broken).rejects.toThrow(`${two}: the positive class "ewaste" has no usable images ` +
      "(classes with images: organic 2, recyclable 2)");
    expect(existsSync(join(cache, "active.json"))).toBe(false); // nothing was prepared
    // Two classes are enough.
    const ok = await prepareData({ task: "screening", source: two, positive: "organic", cacheRoot: cache, log: quiet });
    expect(ok.manifest.classes).toEqual(["ewaste", "organic", "recyclable"]);
  }, SLOW);
});

describe("bad and unusual files", () => {
  test("each is skipped or converted, and counted", async () => {
    const root = tempDir();
    const dir = join(root, "recyclable");
    mkdirSync(dir, { recursive: true });
    mkdirSync(join(root, "ewaste"), { recursive: true });
    const rgb = { width: 40, height: 30, channels: 3 as const, background: { r: 200, g: 30, b: 30 } };
    const plain = (width: number, height: number, background: { r: number; g: number; b: number; alpha?: number }) =>
      sharp({ create: { width, height, channels: background.alpha === undefined ? 3 : 4, background } });
    const jpeg = await sharp({ create: rgb }).jpeg().toBuffer();
    writeFileSync(join(dir, "good.jpg"), jpeg);
    writeFileSync(join(dir, "truncated.jpg"), jpeg.subarray(0, Math.floor(jpeg.length / 3)));
    writeFileSync(join(dir, "empty.jpg"), new Uint8Array(0));
    writeFileSync(join(dir, "text.jpg"), "this is not an image\n");
    writeFileSync(join(dir, "cmyk.jpg"), await sharp({ create: rgb }).toColourspace("cmyk").jpeg().toBuffer());
    writeFileSync(join(dir, "deep.png"), await sharp({ create: rgb }).toColourspace("rgb16").png().toBuffer());
    writeFileSync(join(dir, "alpha.png"), await plain(20, 20, { r: 0, g: 0, b: 0, alpha: 0 }).png().toBuffer());
    writeFileSync(join(dir, "grey.png"), await sharp({ create: rgb }).greyscale().png().toBuffer());
    writeFileSync(join(dir, "anim.gif"), await sharp({ create: rgb }).gif().toBuffer());
    writeFileSync(join(dir, "photo.webp"), await sharp({ create: rgb }).webp().toBuffer());
    const huge = await plain(12000, 12000, { r: 10, g: 200, b: 10 }).png({ compressionLevel: 9 }).toBuffer();
    writeFileSync(join(dir, "huge.png"), huge);
    // EXIF orientation 6: stored landscape (left red, right blue), displayed portrait (top red).
    const red = await plain(30, 30, { r: 255, g: 0, b: 0 }).png().toBuffer();
    const halves = await plain(60, 30, { r: 0, g: 0, b: 255 })
      .composite([{ input: red, left: 0, top: 0 }]).png().toBuffer();
    const rotated = await sharp(halves).jpeg({ quality: 95 }).withMetadata({ orientation: 6 }).toBuffer();
    writeFileSync(join(dir, "rotated.jpg"), rotated);
    writeFileSync(join(root, "ewaste", "one.jpg"), jpeg);

    const cache = tempDir();
    const r = await prepareData({ task: "waste", source: root, cacheRoot: cache, log: quiet });
    const paths = r.manifest.items.map((it) => it.path).sort();
    expect(r.manifest.skipped).toBe(3);
    const skippedTsv = readFileSync(join(r.dir, "skipped.tsv"), "utf8");
    for (const bad of ["truncated.jpg", "empty.jpg", "text.jpg"]) {
      expect(paths).not.toContain(`recyclable/${bad}`);
      expect(skippedTsv).toContain(`recyclable/${bad}`);
    }
    const converted = ["good.jpg", "cmyk.jpg", "deep.png", "alpha.png", "grey.png", "anim.gif", "photo.webp"];
    for (const ok of [...converted, "huge.png", "rotated.jpg"]) expect(paths).toContain(`recyclable/${ok}`);
    // good.jpg and one.jpg have the same bytes: one duplicate, on one side of the split.
    expect(r.manifest.duplicates).toBe(1);
    const ds = await loadCache(undefined, cache);
    const pixel = (path: string, x: number, y: number) => {
      const i = ds.manifest.items.findIndex((it) => it.path === path);
      const o = i * 64 * 64 * 3 + (y * 64 + x) * 3;
      return [ds.images[o]!, ds.images[o + 1]!, ds.images[o + 2]!];
    };
    expect(pixel("recyclable/alpha.png", 10, 10)).toEqual([255, 255, 255]); // alpha flattened onto white
    const grey = pixel("recyclable/grey.png", 5, 5);
    expect(grey[0]).toBe(grey[1]!);
    const cmyk = pixel("recyclable/cmyk.jpg", 5, 5);
    expect(cmyk[0]!).toBeGreaterThan(150); // still red after CMYK → sRGB
    expect(cmyk[2]!).toBeLessThan(90);
    expect(pixel("recyclable/deep.png", 5, 5)[0]).toBeGreaterThan(190); // 16-bit → 8-bit, not 0..65535 clipped
    const top = pixel("recyclable/rotated.jpg", 2, 2), bottom = pixel("recyclable/rotated.jpg", 2, 61);
    expect(top[0]!).toBeGreaterThan(200); // EXIF applied: red on top…
    expect(bottom[2]!).toBeGreaterThan(200); // …blue below
  }, SLOW);

  test("decodeToRgb throws a readable error for non-images", async () => {
    await expect(decodeToRgb(new TextEncoder().encode("hello"), 8)).rejects.toThrow(/unsupported|input/i);
  });

  test("a cut-short JPEG or PNG is named as truncated, even when libvips only says 'Unknown error'", async () => {
    const image = () => sharp({ create: { width: 40, height: 30, channels: 3, background: { r: 200, g: 30, b: 90 } } });
    const jpeg = await image().jpeg().toBuffer();
    const png = await image().png().toBuffer();
    const cutJpeg = new Uint8Array(jpeg.subarray(0, Math.floor(jpeg.length / 2)));
    const cutPng = new Uint8Array(png.subarray(0, Math.floor(png.length / 2)));
    // libvips' error text is process-wide; concurrent decodes can leave only "Unknown error".
    expect(decodeFailure(cutJpeg, "Unknown error"))
      .toMatch(/^truncated JPEG: .*end-of-image marker \(\d+ bytes; libvips: Unknown error\)$/);
    expect(decodeFailure(cutPng, "")).toMatch(/^truncated PNG: .*IEND.*libvips: no reason given/);
    // Whole files and non-images keep libvips' / sharp's own words, on one line.
    expect(decodeFailure(new Uint8Array(jpeg), "VipsJpeg: bad Huffman\ntable")).toBe("VipsJpeg: bad Huffman; table");
    const unsupported = "Input buffer contains unsupported image format";
    expect(decodeFailure(new TextEncoder().encode("hello"), unsupported)).toBe(unsupported);
    // And through decodeToRgb itself, from bytes and from a path.
    await expect(decodeToRgb(cutJpeg, 8)).rejects.toThrow(/truncated JPEG/);
    const file = join(tempDir(), "cut.png");
    writeFileSync(file, cutPng);
    await expect(decodeToRgb(file, 8)).rejects.toThrow(/truncated PNG/);
  });
});

describe("split", () => {
  const sha = (text: string) => sha256Hex(new TextEncoder().encode(text));
  const made = (prefix: string, n: number, classes = 3) =>
    Array.from({ length: n }, (_, i) => ({ sha: sha(`${prefix}${i}`), label: i % classes }));
  const share = (splits: Split[], s: Split) => splits.filter((x) => x === s).length / splits.length;

  test("train/val/test by content hash: 60/20/20, each image on its own hash's side, additions move nothing", () => {
    const items = made("img", 3000);
    const a = splitByHash(items);
    expect(share(a, "val")).toBeGreaterThan(0.17);
    expect(share(a, "val")).toBeLessThan(0.23);
    expect(share(a, "test")).toBeGreaterThan(0.17);
    expect(share(a, "test")).toBeLessThan(0.23);
    expect(a).toEqual(items.map((it) => hashSplit(it.sha))); // large classes: no floor needed
    const grown = splitByHash([...items, ...made("new", 500)]);
    expect(grown.slice(0, 3000)).toEqual(a);
    // CIFAR carves val alone from its train set.
    expect(splitByHash(items, { val: 0.2, test: 0 })).not.toContain("test");
  });

  test("small classes: a val image from 2 images on, a test image from 3; growth moves only lent images", () => {
    // 400 classes of 1..7 images: every arrangement of sides a small class can have.
    let k = 0;
    const classes = Array.from({ length: 400 }, (_, label) =>
      Array.from({ length: 1 + (label % 7) }, () => ({ sha: sha(`small${k++}`), label })));
    const items = classes.flat();
    const a = splitByHash(items);
    let gaps = 0;
    for (const cls of classes) {
      const sides = new Set(cls.map((it) => a[items.indexOf(it)]));
      // The floor lends training images only: a class that hashes nothing to train keeps its gap.
      const noTrain = !cls.some((it) => hashSplit(it.sha) === "train");
      const missing = (cls.length >= 2 && !sides.has("val")) || (cls.length >= 3 && !sides.has("test"));
      if (missing) expect(noTrain).toBe(true);
      if (missing) gaps++;
    }
    expect(gaps).toBeLessThan(12); // 2 · 0.2^n of classes of n images
    // Add 1..3 images to every class: val and test images stay; in a class that had 3+ images only a
    // lent image moves, and no training image becomes a val or test image.
    const added = classes.flatMap((cls, label) =>
      Array.from({ length: 1 + (label % 3) }, () => ({ sha: sha(`more${k++}`), label })));
    const b = splitByHash([...items, ...added]);
    let lent = 0;
    items.forEach((it, i) => {
      const own = hashSplit(it.sha);
      if (own !== "train") expect(b[i]).toBe(own);
      if (a[i] !== own) lent++;
      if ((classes[it.label]?.length ?? 0) < 3) return;
      if (a[i] === own) expect(b[i]).toBe(a[i]!);
    });
    expect(lent).toBeGreaterThan(0); // the floor was exercised
  });

  test("identical files never straddle, within a class or across two", () => {
    const [x, y, z, w] = ["x", "y", "z", "w"].map(sha);
    const items = [
      { sha: x!, label: 0 }, { sha: x!, label: 0 }, { sha: y!, label: 0 }, { sha: z!, label: 0 },
      { sha: x!, label: 1 }, { sha: w!, label: 1 }, { sha: y!, label: 1 },
    ];
    const out = splitByHash(items);
    for (const s of [x, y]) expect(new Set(items.flatMap((it, i) => (it.sha === s ? [out[i]] : []))).size).toBe(1);
    expect(new Set(out.slice(0, 4))).toContain("val");
    expect(new Set(out.slice(0, 4))).toContain("test");
  });

  test("a cache split by the old rule is re-prepared, and reading it without prepare is a clear error", async () => {
    const cache = tempDir();
    const first = await prepareData({ task: "waste", source: "synthetic", cacheRoot: cache, log: quiet });
    const path = cacheFiles(first.dir).manifest;
    const old = JSON.parse(readFileSync(path, "utf8")) as { version: string; items: { split: string }[] };
    old.version = "1";
    for (const it of old.items) if (it.split === "test") it.split = "train";
    writeFileSync(path, JSON.stringify(old));
    await expect(loadCache(undefined, cache)).rejects.toThrow(/manifest version "1", .*re-run prepare\.ts/);
    const again = await prepareData({ task: "waste", source: "synthetic", cacheRoot: cache, log: quiet });
    expect(again.reused).toBe(false);
    expect((await loadCache(undefined, cache)).test.length).toBeGreaterThan(0);
  });
});

describe("evaluate", () => {
  const probsOf = (rows: number[][]) => Float32Array.from(rows.flat());

  test("waste: accuracy, yield_mse, combined_score, per-class, confusion", () => {
    const r = computeMetrics({
      task: "waste", classes: ["ewaste", "recyclable", "organic"], positiveClass: null,
      labels: Int32Array.from([0, 0, 1, 2]),
      probs: probsOf([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]),
      predYields: Float32Array.from([0.3, 0.5, 0.85, 0.2]),
      trueYields: Float32Array.from([0.3, 0.3, 0.85, 0.6]),
    });
    expect(r.metrics.val_accuracy).toBeCloseTo(0.75, 6);
    expect(r.metrics.yield_mse).toBeCloseTo((0.04 + 0.16) / 4, 6);
    expect(r.metrics.combined_score).toBeCloseTo(0.75 - 0.1 * 0.05, 6);
    expect(r.confusion).toEqual([[1, 1, 0], [0, 1, 0], [0, 0, 1]]);
    expect(r.perClass.map((p) => p.accuracy)).toEqual([0.5, 1, 1]);
    expect(r.primary).toBe("combined_score");
  });

  test("a class with no val images has accuracy n/a, not NaN; an empty split does not divide by zero", () => {
    const abc = { task: "waste" as const, classes: ["a", "b", "c"], positiveClass: null };
    const r = computeMetrics({ ...abc, labels: Int32Array.from([0]), probs: probsOf([[1, 0, 0]]) });
    expect(r.perClass[2]!.accuracy).toBeNull();
    expect(footerLines(r, FACTS).join("\n")).toContain("class_acc_c:      n/a (n=0)");
    const empty = computeMetrics({ ...abc, labels: new Int32Array(0), probs: new Float32Array(0) });
    expect(empty.metrics.val_accuracy).toBe(0);
  });

  test("cifar100: top1 and top5", () => {
    const C = 10;
    const rows = [0, 1, 2, 3].map((i) => Array.from({ length: C }, (_, c) => (c === i ? 0.5 : c / 100)));
    // label 9 is 2nd highest for row 0 (top5 hit, top1 miss); row 1 label 1 (hit); row 2 label 0
    // (rank 10: miss); row 3 label 6 (4 classes above it: top5 hit)
    const classes = Array.from({ length: C }, (_, c) => `c${c}`);
    const r = computeMetrics({
      task: "cifar100", classes, positiveClass: null, labels: Int32Array.from([9, 1, 0, 6]), probs: probsOf(rows),
    });
    expect(r.metrics.top1).toBeCloseTo(0.25, 6);
    expect(r.metrics.top5).toBeCloseTo(0.75, 6);
  });

  const screening = (labels: number[], said: number[]) => computeMetrics({
    task: "screening", classes: ["glass", "paper", "trash"], positiveClass: "trash", labels: Int32Array.from(labels),
    probs: probsOf(said.map((c) => [0, 1, 2].map((k) => (k === c ? 0.8 : 0.1)))),
  });

  test("screening: sensitivity, specificity, balanced, prevalence and trivial rate of a known confusion", () => {
    // 4 trash (3 called trash, 1 glass) and 6 others (4 right, 1 paper↔glass swap: right side, 1 called trash).
    const r = screening([2, 2, 2, 2, 0, 0, 1, 1, 1, 0], [2, 2, 2, 0, 0, 1, 1, 1, 2, 0]);
    expect(r.metrics.sensitivity).toBe(3 / 4);
    expect(r.metrics.specificity).toBe(5 / 6);
    expect(r.metrics.balanced_bin_acc).toBe((3 / 4 + 5 / 6) / 2);
    expect(r.metrics.prevalence).toBe(4 / 10);
    expect(r.metrics.trivial_bin_acc).toBe(6 / 10);
    expect(r.metrics.bin_acc).toBe(8 / 10);
    expect(r.metrics.mc_acc).toBe(7 / 10);
    expect(trivialScore(r.metrics, "screening")).toBe(6 / 10);
    expect(trivialScore(r.metrics, "screening", "balanced_bin_acc")).toBe(0.5);
  });

  test("screening: the never-positive model scores exactly the trivial rate, and sensitivity 0", () => {
    // trashnet6's val split: 31 trash images of 439.
    const labels = Array.from({ length: 439 }, (_, i) => (i < 31 ? 2 : i % 2));
    const r = screening(labels, labels.map((c) => (c === 2 ? 0 : c)));
    expect(r.metrics.bin_acc).toBe(r.metrics.trivial_bin_acc!);
    expect(r.metrics.bin_acc).toBe(408 / 439);
    expect(r.metrics.sensitivity).toBe(0);
    expect(r.metrics.specificity).toBe(1);
    expect(r.metrics.balanced_bin_acc).toBe(0.5);
    expect(trivialScore(r.metrics, "screening", "balanced_bin_acc")).toBe(r.metrics.balanced_bin_acc!);
    // When positives are the majority, always saying positive is the trivial model.
    const always = screening([2, 2, 2, 0], [2, 2, 2, 2]);
    expect(always.metrics.bin_acc).toBe(always.metrics.trivial_bin_acc!);
    expect(always.metrics.sensitivity).toBe(1);
    expect(always.metrics.specificity).toBe(0);
  });

  test("screening footer: the new metrics after the columns, the split, and the intervals", () => {
    const r = screening([2, 2, 2, 2, 0, 0, 1, 1, 1, 0], [2, 2, 2, 0, 0, 1, 1, 1, 2, 0]);
    const lines = footerLines(r, FACTS);
    const keys = lines.map((l) => /^([a-z0-9_]+):/.exec(l)?.[1]).filter((k) => k !== undefined);
    expect(keys.slice(0, 8)).toEqual([
      "bin_acc", "mc_acc", "sensitivity", "specificity", "balanced_bin_acc", "prevalence", "trivial_bin_acc",
      "training_seconds",
    ]);
    const footer = parseFooter(`${lines.join("\n")}\n`);
    expect(footer.sensitivity).toBe("0.750000");
    expect(footer.split).toBe("val");
    expect(footer.val_images).toBe("10");
    expect(footer.ci95).toBe(`bin_acc ±${interval95(0.8, 10).toFixed(3)} (n=10); sensitivity ±` +
      `${interval95(0.75, 4).toFixed(3)} (n=4); specificity ±${interval95(5 / 6, 6).toFixed(3)} (n=6)`);
    const onTest = parseFooter(footerLines({ ...r, split: "test" }, FACTS).join("\n"));
    expect(onTest.split).toBe("test");
    expect(onTest.test_images).toBe("10");
    expect(onTest.val_images).toBeUndefined();
  });

  test("interval95: the Wilson half-width, not zero at 0% and wider on fewer images", () => {
    expect(interval95(0.5, 100)).toBeCloseTo(0.0962, 4);
    expect(interval95(0, 10)).toBeCloseTo(0.1388, 4); // Wilson's upper bound for 0/10 is 0.2775
    expect(interval95(0.9, 20)).toBeGreaterThan(interval95(0.9, 200));
  });

  test("TASK_METRICS: the default primary is the first choice; every metric has help; trivial names a metric", () => {
    const probs = (C: number) => probsOf([Array.from({ length: C }, (_, c) => (c === 0 ? 1 : 0))]);
    const classes: Record<Task, string[]> = {
      waste: ["ewaste", "recyclable", "organic"], cifar100: ["a", "b"], screening: ["a", "trash"],
    };
    for (const task of ["waste", "cifar100", "screening"] as const) {
      const m = TASK_METRICS[task];
      expect(m.primaries[0]).toBe(m.primary);
      const r = computeMetrics({
        task, classes: classes[task], positiveClass: "trash", labels: Int32Array.from([0]),
        probs: probs(classes[task].length),
      });
      for (const k of [...m.columns, ...m.extra, ...m.primaries]) {
        expect(r.metrics[k]).toBeNumber();
        expect(METRIC_HELP[k]).toBeString();
      }
      for (const t of Object.values(m.trivial)) if (typeof t === "string") expect(r.metrics[t]).toBeNumber();
    }
    expect(TASK_METRICS.screening.columns).toEqual(["bin_acc", "mc_acc"]);
    expect(TASK_METRICS.screening.primaries).toEqual(["bin_acc", "balanced_bin_acc"]);
    expect(trivialScore({ combined_score: 0.9 }, "waste")).toBeNull();
  });

  test("screening: binary accuracy of positive-vs-rest and multiclass accuracy", () => {
    const r = computeMetrics({
      task: "screening", classes: ["glass", "paper", "trash"], positiveClass: "trash",
      labels: Int32Array.from([0, 1, 2, 2]),
      // glass→paper (mc wrong, bin right), paper→paper, trash→trash, trash→glass (both wrong)
      probs: probsOf([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.6, 0.2, 0.2]]),
    });
    expect(r.metrics.mc_acc).toBeCloseTo(0.5, 6);
    expect(r.metrics.bin_acc).toBeCloseTo(0.75, 6);
    expect(r.primary).toBe("bin_acc");
  });

  test("evaluate() runs a predictor over the whole val split in order (synthetic data, plumbing only)", async () => {
    const cache = tempDir();
    await prepareData({ task: "waste", source: "synthetic", cacheRoot: cache, log: quiet });
    const ds = await loadCache(undefined, cache);
    expect(ds.manifest.synthetic).toBe(true);
    const seen: number[] = [];
    // An oracle that reads the true labels: accuracy must be exactly 1 and yield_mse exactly 0.
    const oracle: Predictor = (images, indices) => {
      seen.push(...indices);
      expect(images.shape).toEqual([indices.length, 64, 64, 3]);
      return {
        probs: tf.oneHot(tf.tensor1d(Array.from(indices, (i) => ds.labels[i]!), "int32"), 3).toFloat(),
        yields: tf.tensor1d(Array.from(indices, (i) => ds.yields[i]!)),
      };
    };
    const r = await evaluate(oracle, ds);
    expect(seen).toEqual(Array.from(ds.val));
    expect(r.split).toBe("val");
    expect(r.metrics.val_accuracy).toBe(1);
    expect(r.metrics.yield_mse).toBeLessThan(1e-12);
    const footer = parseFooter(`noise\n${footerLines(r, FACTS, { synthetic: true }).join("\n")}\n`);
    expect(footer.val_accuracy).toBe("1.000000");
    expect(footer.data).toContain("SYNTHETIC");
    // The test split only when asked, and the same predictor measured on it.
    seen.length = 0;
    const t = await evaluate(oracle, ds, { split: "test" });
    expect(seen).toEqual(Array.from(ds.test));
    expect([t.split, t.n]).toEqual(["test", ds.test.length]);
    expect(new Set([...ds.test, ...ds.val, ...ds.train]).size).toBe(ds.labels.length);
    const noTest = { ...ds, test: new Int32Array(0) };
    await expect(evaluate(oracle, noTest, { split: "test" })).rejects.toThrow(/the test split is empty/);
  }, SLOW);

  test("a missing cache is a clear error", async () => {
    const cache = tempDir();
    await expect(loadCache(undefined, cache)).rejects.toThrow(/no prepared dataset/);
    expect(existsSync(join(cache, "active.json"))).toBe(false);
  });
});

describe("the cache layout other scripts read", () => {
  const missing = { dir: "missing", images: "missing", manifest: "missing", task: null };
  test("cacheFingerprint: absent parts say so; re-preparing one source keeps it; new pixels change it", async () => {
    const cache = tempDir();
    expect(await cacheFingerprint(cache)).toEqual(missing);
    const first = await prepareData({ task: "waste", source: "synthetic", cacheRoot: cache, log: quiet });
    const fp = await cacheFingerprint(cache);
    expect(fp.dir).toBe(first.dir);
    expect(activeCacheDir(cache)).toBe(first.dir);
    expect(fp.task).toBe("waste");
    expect(fp.images).toMatch(/^[0-9a-f]{64}$/);
    await prepareData({ task: "waste", source: "synthetic", cacheRoot: cache, log: quiet, force: true });
    expect(await cacheFingerprint(cache)).toEqual(fp); // a new createdAt, the same content
    const { images } = cacheFiles(first.dir);
    const bytes = readFileSync(images);
    bytes[0] = bytes[0]! ^ 1;
    writeFileSync(images, bytes);
    const touched = await cacheFingerprint(cache);
    expect(touched.images).not.toBe(fp.images);
    expect(touched.manifest).toBe(fp.manifest);
    writeFileSync(cacheFiles(first.dir).manifest, "{");
    expect(await cacheFingerprint(cache)).toEqual({ ...missing, dir: first.dir });
    writeFileSync(join(cache, "active.json"), "not json");
    expect(() => activeCacheDir(cache)).toThrow(/active\.json: not valid JSON/);
    await expect(loadCache(undefined, cache)).rejects.toThrow(/active\.json: not valid JSON/);
  });
});

describe("sources through prepare", () => {
  test("cifar100: official binary layout → 32×32 cache, test is the test file, val carved from train", async () => {
    const dir = join(tempDir(), "cifar-100-binary");
    mkdirSync(dir, { recursive: true });
    const names = Array.from({ length: 100 }, (_, i) => `class_${i}`);
    writeFileSync(join(dir, "fine_label_names.txt"), names.join("\n") + "\n");
    const coarse = Array.from({ length: 20 }, (_, i) => `super_${i}`);
    writeFileSync(join(dir, "coarse_label_names.txt"), coarse.join("\n") + "\n");
    const records = (labels: number[]) => {
      const buf = new Uint8Array(labels.length * 3074);
      labels.forEach((fine, r) => {
        buf[r * 3074] = 0;
        buf[r * 3074 + 1] = fine;
        buf.fill(fine, r * 3074 + 2, r * 3074 + 2 + 1024); // R plane = label, G and B planes 0
      });
      return buf;
    };
    // 40 train images (label i; 5 is also in the test file, byte for byte) and 2 test images.
    const trainLabels = Array.from({ length: 40 }, (_, i) => i);
    writeFileSync(join(dir, "train.bin"), records(trainLabels));
    writeFileSync(join(dir, "test.bin"), records([5, 42]));
    const cache = tempDir();
    const r = await prepareData({ task: "cifar100", source: dir, cacheRoot: cache, log: quiet });
    expect(r.manifest.imageSize).toBe(32);
    expect(r.manifest.classes).toEqual(names);
    const ds = await loadCache(undefined, cache);
    expect(Array.from(ds.test, (i) => ds.labels[i])).toEqual([5, 42]);
    const learned = [...ds.train, ...ds.val].map((i) => ds.labels[i]).sort((a, b) => a! - b!);
    expect(learned).toEqual(trainLabels.filter((l) => l !== 5)); // train.bin#5 is left out: it is also a test image
    expect(ds.val.length).toBeGreaterThan(0);
    expect(r.manifest.skipped).toBe(1);
    expect(readFileSync(cacheFiles(r.dir).skipped, "utf8")).toContain("train.bin#5\tidentical to test.bin#0");
    const v = ds.test[1]! * 32 * 32 * 3;
    expect([ds.images[v], ds.images[v + 1], ds.images[v + 2]]).toEqual([42, 0, 0]); // HWC: R from the R plane
  });

  test("a failed hub download exits non-zero with the --source hint, and no synthetic fallback", () => {
    const cache = tempDir();
    const r = runScript(["prepare.ts", "--hub-url", "http://127.0.0.1:9"], { AR_CACHE: cache });
    expect(r.code).not.toBe(0);
    expect(r.out).toContain("--source");
    expect(r.out).not.toContain("SYNTHETIC");
    expect(existsSync(join(cache, "active.json"))).toBe(false);
  }, SLOW);

  test("synthetic data says so on every line it prints", () => {
    const cache = tempDir();
    const r = runScript(["prepare.ts", "--source", "synthetic"], { AR_CACHE: cache });
    expect(r.code).toBe(0);
    const lines = r.out.split("\n").filter((l) => l.trim() !== "");
    expect(lines.length).toBeGreaterThan(3);
    for (const l of lines) expect(l).toContain("SYNTHETIC");
  }, SLOW);
});
