/**
 * The offline COCO backbone (CenterNet/MobileNetV3 from @vladmandic/human) and fine-tuning the last
 * blocks of a layers backbone (HP.unfreezeBlocks): features, caches, checkpoints, predictions.
 * Real photos from data/sample only (a few per class, small inputs): fast, and no full set needed.
 */
import { beforeAll, describe, expect, test } from "bun:test";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import * as tf from "@tensorflow/tfjs";
import { evaluate, loadCache, parseFooter, prepareData, type Dataset } from "../prepare.ts";
import { initBackend } from "../lib/backend.ts";
import {
  BACKBONE_COMBOS, BACKBONES, datasetFeatures, featureCachePath, featureRows, fineTunable, loadBackbone,
  type Backbone,
} from "../lib/backbones.ts";
import { inputSizeFor, loadCheckpoint, predictorFor } from "../lib/checkpoint.ts";
import { decodeToRgb, mirrorRgb } from "../lib/images.ts";
import { featureStats, Standardize } from "../lib/standardize.ts";
import { runScript, sliceOf, tempDir } from "./helpers.ts";

const COCO = "coco-centernet-mobilenetv3";
const SIZE = 64; // a multiple of the model's stride 32, and small: fast on the wasm backend
const quiet = () => {};
const SLOW = 180_000;

/** A data/sample photo decoded at `size` (mirrored: left and right swapped), a [1, size, size, 3] batch in [0, 1]. */
async function photo(ds: Dataset, row: number, size: number, mirrored = false): Promise<tf.Tensor4D> {
  const decoded = await decodeToRgb(join(ds.manifest.source, ds.manifest.items[row]!.path), size);
  const px = mirrored ? mirrorRgb(decoded, size) : decoded;
  return tf.tensor4d(Float32Array.from(px, (v) => v / 255), [1, size, size, 3]);
}

let ds: Dataset;
let cache: string;
beforeAll(async () => {
  await initBackend({ prefer: "wasm" });
  cache = tempDir();
  await prepareData({ task: "waste", source: sliceOf("sample", 4), cacheRoot: cache, log: quiet });
  ds = await loadCache(undefined, cache);
}, SLOW);

describe("COCO CenterNet backbone (offline, from @vladmandic/human)", () => {
  let bb: Backbone;

  test("loads from the installed package with no network at all", async () => {
    const realFetch = globalThis.fetch;
    let fetched = 0;
    globalThis.fetch = Object.assign(async () => { fetched++; throw new Error("no network in this test"); }, realFetch);
    try {
      bb = await loadBackbone(COCO, { inputSize: SIZE, reload: true });
    } finally {
      globalThis.fetch = realFetch;
    }
    expect(fetched).toBe(0);
    expect(bb.spec.source.kind).toBe("npm");
    expect(bb.id).toBe(`${COCO}@${SIZE}`);
    expect(bb.featureDim).toBe(480 + 128 + 80);
    expect(bb.weightsId).toMatch(/^[0-9a-f]{16}$/);
    expect(fineTunable(COCO)).toBe(false); // a graph model: only ever frozen
  }, SLOW);

  test("features of a photo are deterministic, at this size and after a reload", async () => {
    const x = await photo(ds, 0, SIZE);
    const [a, b] = [bb.features(x), bb.features(x)];
    const again = await loadBackbone(COCO, { inputSize: SIZE, reload: true });
    const c = again.features(x);
    const [va, vb, vc] = [await a.data(), await b.data(), await c.data()];
    expect(a.shape).toEqual([1, bb.featureDim]);
    expect(Array.from(vb)).toEqual(Array.from(va));
    expect(Array.from(vc)).toEqual(Array.from(va));
    // The 80 pooled class heatmaps are sigmoid outputs: in (0, 1), not all alike.
    const heat = Array.from(va.slice(608));
    expect(heat.every((v) => v > 0 && v < 1)).toBe(true);
    expect(Math.max(...heat)).toBeGreaterThan(Math.min(...heat) * 2);
    tf.dispose([x, a, b, c]);
    again.dispose();
  }, SLOW);

  test("the input is unscaled RGB: the same photo in [0, 1] would give other features", async () => {
    const x = await photo(ds, 0, SIZE);
    const unit = await loadBackbone(COCO, { inputSize: SIZE, spec: { ...BACKBONES[COCO], inputRange: [0, 1] } });
    const [a, b] = [bb.features(x), unit.features(x)];
    const diff = tf.tidy(() => tf.max(tf.abs(tf.sub(a, b))).dataSync()[0]!);
    expect(diff).toBeGreaterThan(0.01);
    tf.dispose([x, a, b]);
    unit.dispose();
  }, SLOW);

  test("another input side rewrites the graph's upsampling sizes; a side off the stride is refused", async () => {
    const x = await photo(ds, 1, 96);
    const bb96 = await loadBackbone(`${COCO}@96`);
    const f = bb96.features(x);
    expect(f.shape).toEqual([1, bb96.featureDim]);
    expect((await f.data()).every(Number.isFinite)).toBe(true);
    tf.dispose([x, f]);
    await expect(loadBackbone(`${COCO}@100`)).rejects.toThrow(/100 is not a multiple of 32.*try 96/);
    await expect(loadBackbone(COCO, { inputSize: SIZE, unfreezeBlocks: 1 }))
      .rejects.toThrow(/cannot unfreeze 1 blocks \(a graph model: it can only be used frozen/);
  }, SLOW);

  test("dataset features are cached: the second call reads the cache, a changed key recomputes", async () => {
    const cold = await datasetFeatures(ds, bb, { log: quiet });
    expect(cold.reused).toBe(false);
    expect([cold.n, cold.dim]).toEqual([ds.manifest.items.length, bb.featureDim]);
    const warm = await datasetFeatures(ds, bb, { log: quiet });
    expect(warm.reused).toBe(true);
    expect(warm.data).toEqual(cold.data);
    // Row 0 equals the features of that photo computed by hand.
    const x = await photo(ds, 0, SIZE);
    const f = bb.features(x);
    const row = await f.data();
    for (let k = 0; k < bb.featureDim; k += 37) expect(row[k]!).toBeCloseTo(cold.data[k]!, 4);
    tf.dispose([x, f]);
    // Other weights (the key's weightsId) recompute.
    const path = featureCachePath(ds, bb);
    const meta = JSON.parse(readFileSync(`${path}.json`, "utf8")) as Record<string, unknown>;
    writeFileSync(`${path}.json`, JSON.stringify({ ...meta, weightsId: "0000000000000000" }));
    const again = await datasetFeatures(ds, bb, { log: quiet });
    expect(again.reused).toBe(false);
    expect(again.data).toEqual(cold.data);
  }, SLOW);
});

describe("fine-tuning the last blocks of nsfwjs's MobileNetV2 (HP.unfreezeBlocks)", () => {
  test("the frozen part's feature maps are cached once and reused; the blocks start from the pretrained weights",
    async () => {
      const frozen = await loadBackbone("nsfwjs-mobilenetv2", { inputSize: SIZE, unfreezeBlocks: 1 });
      const whole = await loadBackbone("nsfwjs-mobilenetv2", { inputSize: SIZE });
      // 64 px: stride 32 → a 2×2 map of block_15_add's 160 channels, flattened.
      expect(frozen.featureDim).toBe(2 * 2 * 160);
      expect(featureCachePath(ds, frozen)).not.toBe(featureCachePath(ds, whole));
      const cold = await datasetFeatures(ds, frozen, { log: quiet });
      expect(cold.reused).toBe(false);
      expect((await datasetFeatures(ds, frozen, { log: quiet })).reused).toBe(true);
      // Frozen part + pretrained blocks = the whole frozen backbone's pooled features.
      const blocks = await frozen.trainableBlocks();
      const x = await photo(ds, 2, SIZE);
      const [map, pooled] = [frozen.features(x), whole.features(x)];
      const viaBlocks = blocks.predict(map) as tf.Tensor;
      const [a, b] = [await viaBlocks.data(), await pooled.data()];
      expect(a.length).toBe(1280);
      for (let k = 0; k < a.length; k += 31) expect(a[k]!).toBeCloseTo(b[k]!, 3);
      expect(blocks.trainableWeights.length).toBeGreaterThan(0);
      tf.dispose([x, map, pooled, viaBlocks]);
      blocks.dispose();
      await expect(whole.trainableBlocks()).rejects.toThrow(/frozen whole/);
    }, SLOW);

  test("train.ts fine-tunes 1 block; the checkpoint holds it and predicts the same after reload, through "
    + "evaluate() and on new photos", async () => {
    const ckpt = join(tempDir(), "ckpt");
    // flip false: the photos' own maps only (the mirrored ones would be a second extraction here).
    const hp = JSON.stringify({ backbone: "nsfwjs-mobilenetv2", backboneSize: SIZE, unfreezeBlocks: 1, flip: false });
    const r = runScript(["train.ts", "--budget", "4", "--checkpoint", ckpt], { AR_CACHE: cache, AR_HP: hp });
    expect(r.code).toBe(0);
    expect(r.out).toContain("partly fine-tuned backbone nsfwjs-mobilenetv2@64");
    // The frozen part's maps were cached by the test above: reused, not extracted again.
    expect(r.out).toMatch(/feature_seconds: +\d+\.\d \(cached features/);
    const footer = parseFooter(r.out);

    const loaded = await loadCheckpoint(ckpt, ds);
    expect(loaded.meta.unfrozenBlocks).toBe(1);
    expect(inputSizeFor(loaded.meta)).toBe(SIZE);
    // The fine-tuned block is in the checkpoint, and it moved away from the pretrained weights.
    const tuned = loaded.model.getLayer("block_16_project").getWeights()[0]!;
    const fresh = await (await loadBackbone("nsfwjs-mobilenetv2", { inputSize: SIZE, unfreezeBlocks: 1 }))
      .trainableBlocks();
    const pretrained = fresh.getLayer("block_16_project").getWeights()[0]!;
    expect(tuned.shape).toEqual(pretrained.shape);
    expect(tf.tidy(() => tf.max(tf.abs(tf.sub(tuned, pretrained))).dataSync()[0]!)).toBeGreaterThan(0);
    fresh.dispose();

    const again = await evaluate(predictorFor(loaded, ds), ds);
    expect(again.metrics).toEqual(loaded.meta.metrics);
    expect(again.metrics.val_accuracy).toBeCloseTo(Number(footer.val_accuracy), 6);
    const reloaded = await loadCheckpoint(ckpt, ds);
    expect((await evaluate(predictorFor(reloaded, ds), ds)).metrics).toEqual(loaded.meta.metrics);

    // New photos (predict.ts's path): frozen part + fine-tuned block + head on the pixels, same answers.
    const val = Array.from(ds.val).slice(0, 4);
    const xs = await Promise.all(val.map((i) => photo(ds, i, SIZE)));
    const x = tf.concat(xs, 0);
    const onPixels = await predictorFor(reloaded)(x, new Int32Array(val.length));
    const onCache = await predictorFor(loaded, ds)(x, Int32Array.from(val));
    const [a, b] = [await onPixels.probs.data(), await onCache.probs.data()];
    for (let k = 0; k < a.length; k++) expect(a[k]!).toBeCloseTo(b[k]!, 4);
    tf.dispose([x, ...xs]);

    const ev = runScript(["prepare.ts", "evaluate", "--model", ckpt], { AR_CACHE: cache });
    expect(ev.code).toBe(0);
    expect(Number(parseFooter(ev.out.split("\neval_json")[0]!).val_accuracy))
      .toBeCloseTo(loaded.meta.metrics.val_accuracy!, 6);
  }, SLOW);
});

describe("HP.standardize: the head's first layer standardizes features with the train split's statistics", () => {
  test("featureStats measures only the rows given; Standardize maps them to mean 0, std 1; a constant column to 0",
    async () => {
      // 4 rows × 3 features; rows 0..2 are "train": column 0 = 1, 2, 3; column 1 = 10, 30, 50; column 2 constant.
      const data = Float32Array.from([1, 10, 7, 2, 30, 7, 3, 50, 7, 100, 100, 100]);
      const { mean, invStd } = featureStats(data, 3, [0, 1, 2]);
      expect(Array.from(mean)).toEqual([2, 30, 7]);
      expect(invStd[0]!).toBeCloseTo(1 / Math.sqrt(2 / 3), 5);
      expect(invStd[1]!).toBeCloseTo(1 / Math.sqrt(800 / 3), 5);
      expect(() => featureStats(data, 3, [])).toThrow(/no rows/);
      const input = tf.input({ shape: [3] });
      const model = tf.model({
        inputs: input, outputs: new Standardize({ stats: { mean, invStd } }).apply(input) as tf.SymbolicTensor,
      });
      const y = model.predict(tf.tensor2d(data.subarray(0, 9), [3, 3])) as tf.Tensor;
      const { mean: m, variance: v } = tf.moments(y, 0);
      const [mv, vv, col2] = [await m.data(), await v.data(), await tf.slice(y, [0, 2], [3, 1]).data()];
      for (const k of [0, 1]) { expect(mv[k]!).toBeCloseTo(0, 5); expect(vv[k]!).toBeCloseTo(1, 4); }
      expect(Array.from(col2)).toEqual([0, 0, 0]);
      // Its statistics are weights, not trainable: saved with the head, never moved by the optimizer.
      expect(model.trainableWeights.length).toBe(0);
      expect(model.getWeights().length).toBe(2);
      tf.dispose([y, m, v]);
    });
});

describe("fine-tuned blocks learn at HP.backboneLrScale × lr", () => {
  test("backboneLrScale 0: the blocks keep their pretrained weights exactly while the head trains", async () => {
    const ckpt = join(tempDir(), "ckpt");
    const hp = JSON.stringify({
      backbone: "nsfwjs-mobilenetv2", backboneSize: SIZE, unfreezeBlocks: 1, backboneLrScale: 0, flip: false,
    });
    const r = runScript(["train.ts", "--budget", "2", "--checkpoint", ckpt], { AR_CACHE: cache, AR_HP: hp });
    expect(r.code).toBe(0);
    const loaded = await loadCheckpoint(ckpt, ds);
    const fresh = await (await loadBackbone("nsfwjs-mobilenetv2", { inputSize: SIZE, unfreezeBlocks: 1 }))
      .trainableBlocks();
    for (const name of ["block_16_project", "Conv_1"]) {
      const [tuned, pretrained] = [loaded.model.getLayer(name).getWeights()[0]!, fresh.getLayer(name).getWeights()[0]!];
      expect(tf.tidy(() => tf.max(tf.abs(tf.sub(tuned, pretrained))).dataSync()[0]!)).toBe(0);
    }
    fresh.dispose();
    // The head did train: its logits layer is not at its initial values in any checkpoint that learned.
    expect(r.out).toMatch(/num_steps: +([3-9]|\d{2,})/);
  }, SLOW);
});

describe("random flips over cached features (HP.flip): the mirrored photos' features", () => {
  test("mirrorRgb swaps left and right, and twice is the photo again", () => {
    expect(() => mirrorRgb(new Uint8Array(18), 2)).toThrow(/not 2x2x3/);
    const sq = Uint8Array.from({ length: 3 * 3 * 3 }, (_, k) => k);
    const m = mirrorRgb(sq, 3);
    expect(Array.from(m.subarray(0, 9))).toEqual([6, 7, 8, 3, 4, 5, 0, 1, 2]);
    expect(Array.from(mirrorRgb(m, 3))).toEqual(Array.from(sq));
  });

  test("cached apart from the photo's own; each row is the mirrored photo's features; featureRows mixes both",
    async () => {
      const bb = await loadBackbone(COCO, { inputSize: SIZE });
      const plain = await datasetFeatures(ds, bb, { log: quiet });
      const mirrored = await datasetFeatures(ds, bb, { log: quiet, view: "mirrored" });
      expect(mirrored.view).toBe("mirrored");
      expect(mirrored.path).not.toBe(plain.path);
      expect(mirrored.path).toBe(featureCachePath(ds, bb, "mirrored"));
      expect((await datasetFeatures(ds, bb, { log: quiet, view: "mirrored" })).reused).toBe(true);
      // Row 2 is the features of photo 2 mirrored, computed by hand, and not those of the photo itself.
      const x = await photo(ds, 2, SIZE, true);
      const f = bb.features(x);
      const row = await f.data();
      const at = (fc: typeof plain, k: number) => fc.data[2 * fc.dim + k]!;
      for (let k = 0; k < bb.featureDim; k += 37) expect(row[k]!).toBeCloseTo(at(mirrored, k), 4);
      const moved = Array.from({ length: bb.featureDim }, (_, k) => Math.abs(at(mirrored, k) - at(plain, k)));
      expect(Math.max(...moved)).toBeGreaterThan(1e-3);
      tf.dispose([x, f]);
      // featureRows with a mirror: each row comes whole from one of the two caches, as rand() says.
      const picks = [0.9, 0.1, 0.7, 0.2];
      const rows = featureRows(plain, [2, 2, 3, 3], { fc: mirrored, rand: () => picks.shift()! });
      const got = await rows.data();
      const want = [plain, mirrored, plain, mirrored].map((fc, b) => fc.data[[2, 2, 3, 3][b]! * fc.dim + 5]!);
      for (let b = 0; b < 4; b++) expect(got[b * plain.dim + 5]).toBe(want[b]!);
      rows.dispose();
    }, SLOW);
});

describe("two backbones' features concatenated (BACKBONE_COMBOS)", () => {
  const combo = BACKBONE_COMBOS[0];
  test("each part is loaded and cached on its own; the combination's rows are the parts' rows side by side",
    async () => {
      const bb = await loadBackbone(`${combo}@${SIZE}`);
      const parts = await Promise.all(combo.split("+").map((n) => loadBackbone(n, { inputSize: SIZE })));
      expect(bb.id).toBe(`${combo}@${SIZE}`);
      expect(bb.featureDim).toBe(parts[0]!.featureDim + parts[1]!.featureDim);
      expect(fineTunable(combo)).toBe(false);
      await expect(loadBackbone(combo, { inputSize: SIZE, unfreezeBlocks: 1 })).rejects.toThrow(/only be used frozen/);
      const fc = await datasetFeatures(ds, bb, { log: quiet });
      const a = await datasetFeatures(ds, parts[0]!, { log: quiet });
      const b = await datasetFeatures(ds, parts[1]!, { log: quiet });
      expect(a.reused && b.reused).toBe(true); // the combination's call cached them
      for (const i of [0, 5]) {
        expect(Array.from(fc.data.subarray(i * fc.dim, i * fc.dim + a.dim)))
          .toEqual(Array.from(a.data.subarray(i * a.dim, (i + 1) * a.dim)));
        expect(Array.from(fc.data.subarray(i * fc.dim + a.dim, (i + 1) * fc.dim)))
          .toEqual(Array.from(b.data.subarray(i * b.dim, (i + 1) * b.dim)));
      }
      // On new photos the combination runs both networks: the same features as the caches hold.
      const x = await photo(ds, 5, SIZE);
      const f = bb.features(x);
      const row = await f.data();
      for (let k = 0; k < fc.dim; k += 41) expect(row[k]!).toBeCloseTo(fc.data[5 * fc.dim + k]!, 4);
      tf.dispose([x, f]);
    }, SLOW);

  test("train.ts on the combination with flips; its checkpoint predicts the same through evaluate() and on new photos",
    async () => {
      const ckpt = join(tempDir(), "ckpt");
      const hp = JSON.stringify({ backbone: combo, backboneSize: SIZE, flip: true });
      const r = runScript(["train.ts", "--budget", "3", "--checkpoint", ckpt], { AR_CACHE: cache, AR_HP: hp });
      expect(r.code).toBe(0);
      expect(r.out).toContain(`frozen backbones ${combo}@${SIZE}`);
      const footer = parseFooter(r.out);
      const loaded = await loadCheckpoint(ckpt, ds);
      expect(loaded.meta.backbone).toBe(`${combo}@${SIZE}`);
      expect(inputSizeFor(loaded.meta)).toBe(SIZE);
      const again = await evaluate(predictorFor(loaded, ds), ds);
      expect(again.metrics.val_accuracy).toBeCloseTo(Number(footer.val_accuracy), 6);
      const val = Array.from(ds.val).slice(0, 3);
      const xs = await Promise.all(val.map((i) => photo(ds, i, SIZE)));
      const x = tf.concat(xs, 0);
      const onPixels = await predictorFor(await loadCheckpoint(ckpt))(x, new Int32Array(val.length));
      const onCache = await predictorFor(loaded, ds)(x, Int32Array.from(val));
      const [p, q] = [await onPixels.probs.data(), await onCache.probs.data()];
      for (let k = 0; k < p.length; k++) expect(p[k]!).toBeCloseTo(q[k]!, 4);
      tf.dispose([x, ...xs]);
    }, SLOW);
});
