/**
 * The ViT family (lib/vit.ts, train.ts HP.family) and the image size as an HP (prepare --sizes,
 * train.ts HP.imageSize): the ViT's gradients on wasm agree with cpu, it trains on wasm and its
 * checkpoint predicts the same after reload and through evaluate(); a second size is cached with the
 * same split and measured at that size; an uncached size is a one-line error naming the fix; a ViT
 * trains on a CIFAR-format file written here. Real photos: data/sample (a plumbing check, not quality).
 */
import { beforeAll, describe, expect, test } from "bun:test";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import * as tf from "@tensorflow/tfjs";
import { initBackend } from "../lib/backend.ts";
import {
  activePointerPath, cacheFingerprint, cachedImageSizes, evaluate, imageBatch, loadCache, loadCacheAtSize,
  parseFooter, prepareData,
} from "../prepare.ts";
import { checkpointMeta, layersPredictor, loadCheckpoint, predictorFor, saveCheckpoint } from "../lib/checkpoint.ts";
import { vitTrunk, type VitShape } from "../lib/vit.ts";
import { inputConvFilters, withoutInputGradients } from "../lib/wasm_kernels.ts";
import { runScript, tempDir } from "./helpers.ts";

const SLOW = 300_000;
const quiet = () => {};

beforeAll(async () => {
  await initBackend({ prefer: "wasm" });
}, SLOW);

/** Deterministic values that do not depend on the backend. */
function seeded(n: number, seed: number): Float32Array {
  let s = seed >>> 0;
  return Float32Array.from({ length: n }, () => (s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 32);
}

/** A ViT with train.ts's two heads (class probabilities, yield), weights drawn from a fixed seed. */
function vitModel(shape: VitShape, classes: number): tf.LayersModel {
  const input = tf.input({ shape: [shape.imageSize, shape.imageSize, 3] });
  const pooled = vitTrunk(input, shape);
  const probs = tf.layers.dense({ units: classes, activation: "softmax" }).apply(pooled) as tf.SymbolicTensor;
  const yields = tf.layers.dense({ units: 1, activation: "sigmoid" }).apply(pooled) as tf.SymbolicTensor;
  const model = tf.model({ inputs: input, outputs: [probs, yields] });
  const drawn = model.getWeights().map((w, i) => tf.tensor(seeded(w.size, i + 1).map((v) => (v - 0.5) * 0.2), w.shape));
  model.setWeights(drawn);
  return model;
}

const SHAPE: VitShape = { imageSize: 32, patch: 8, embedDim: 16, numHeads: 4, depth: 2, mlpRatio: 2 };

describe("ViT (lib/vit.ts)", () => {
  test("gradients of every weight on wasm match the cpu backend", async () => {
    const gradsOn = async (backend: string) => {
      await tf.setBackend(backend);
      const model = vitModel(SHAPE, 3);
      const x = tf.tensor4d(seeded(4 * 32 * 32 * 3, 7), [4, 32, 32, 3]);
      const labels = tf.oneHot(tf.tensor1d([0, 1, 2, 1], "int32"), 3);
      const vars = model.trainableWeights.map((w) => w.read() as tf.Variable);
      const { grads } = tf.variableGrads(() => {
        const [p, y] = model.apply(x, { training: true }) as tf.Tensor[];
        return tf.add(tf.losses.softmaxCrossEntropy(labels, tf.log(p!)), tf.mean(y!)) as tf.Scalar;
      }, vars);
      // By position in the model: layer names differ between the two builds.
      const out = vars.map((v) => grads[v.name]?.dataSync() ?? new Float32Array(0));
      model.dispose();
      return out;
    };
    const cpu = await gradsOn("cpu");
    const wasm = await gradsOn("wasm");
    // Every weight gets a gradient: patch conv 2, position 1, per block 12 (2 norms, qkv, out, MLP 2), norm 2, heads 4.
    expect(cpu.map((g) => g.length > 0)).toEqual(new Array(3 + 2 * 12 + 2 + 4).fill(true));
    cpu.forEach((g, k) => {
      const w = wasm[k]!;
      const scale = Math.max(...Array.from(g, Math.abs), 1e-6);
      const worst = Math.max(...Array.from(g, (v, i) => Math.abs(v - w[i]!)));
      expect(`weight ${k}: ${worst / scale < 1e-3 ? "ok" : `off by ${worst} of ${scale}`}`).toBe(`weight ${k}: ok`);
    });
  }, SLOW);

  test("trains on wasm, and its checkpoint predicts the same after reload and through evaluate()", async () => {
    await tf.setBackend("wasm");
    const cache = tempDir();
    await prepareData({ task: "waste", source: "sample", cacheRoot: cache, log: quiet, sizes: [32] });
    const ds = await loadCacheAtSize(32, cache);
    const model = vitModel(SHAPE, ds.numClasses);
    const optimizer = tf.train.adam(0.01);
    const rows = ds.train.subarray(0, 16);
    const labels = tf.oneHot(tf.tensor1d(Array.from(rows, (i) => ds.labels[i]!), "int32"), ds.numClasses);
    const losses: number[] = [];
    for (let step = 0; step < 4; step++) {
      const x = imageBatch(ds, rows);
      const loss = withoutInputGradients(inputConvFilters(model), () => optimizer.minimize(() => {
        const [p] = model.apply(x, { training: true }) as tf.Tensor[];
        return tf.losses.softmaxCrossEntropy(labels, tf.log(tf.add(p!, 1e-7))) as tf.Scalar;
      }, true))!;
      losses.push(loss.dataSync()[0]!);
      x.dispose();
    }
    expect(losses.every(Number.isFinite)).toBe(true);
    expect(losses.at(-1)!).toBeLessThan(losses[0]!);
    const before = await evaluate(layersPredictor(model), ds);
    const x = imageBatch(ds, ds.val);
    const [p1] = model.predict(x) as tf.Tensor[];
    const dir = join(cache, "ckpt");
    await saveCheckpoint(dir, model, checkpointMeta(ds.manifest, {
      backbone: null, hasYieldHead: true, numParams: model.countParams(), metrics: before.metrics, commit: null,
    }));
    const ckpt = await loadCheckpoint(dir, ds);
    expect(ckpt.meta.imageSize).toBe(32);
    const [p2] = ckpt.model.predict(x) as tf.Tensor[];
    expect(Array.from(p2!.dataSync())).toEqual(Array.from(p1!.dataSync()));
    const after = await evaluate(predictorFor(ckpt, ds), ds);
    expect(after).toEqual(before);
  }, SLOW);
});

describe("image size as an HP", () => {
  test("--sizes caches each size with the same images and split; without it nothing changes", async () => {
    const cache = tempDir();
    const plain = await prepareData({ task: "waste", source: "sample", cacheRoot: cache, log: quiet });
    expect(JSON.parse(readFileSync(activePointerPath(cache), "utf8"))).toEqual({ dir: plain.dir });
    expect(cachedImageSizes(64, cache)).toEqual([64]);
    const fingerprint = await cacheFingerprint(cache);
    const sized = await prepareData({ task: "waste", source: "sample", cacheRoot: cache, log: quiet, sizes: [64, 96] });
    expect(sized.dir).toBe(plain.dir);
    expect(sized.reused).toBe(true); // the 64 px cache is untouched by adding a size
    expect(cachedImageSizes(64, cache)).toEqual([64, 96]);
    // HP's default 0 is the prepared default size: listed once, loaded as the active cache.
    expect(cachedImageSizes(0, cache)).toEqual([0, 96]);
    expect((await loadCacheAtSize(0, cache)).imageSize).toBe(64);
    const at64 = await loadCache(undefined, cache);
    const at96 = await loadCacheAtSize(96, cache);
    expect(at96.imageSize).toBe(96);
    expect(at96.images.length).toBe(at64.manifest.items.length * 96 * 96 * 3);
    expect(at96.manifest.items).toEqual(at64.manifest.items);
    expect([at96.train, at96.val, at96.test]).toEqual([at64.train, at64.val, at64.test]);
    // The other size is part of the data the loop guards: its fingerprint moves when the size is added.
    const withSizes = await cacheFingerprint(cache);
    expect(withSizes.images).toBe(fingerprint.images);
    expect(withSizes.manifest).not.toBe(fingerprint.manifest);
    await expect(prepareData({ task: "waste", source: "sample", cacheRoot: cache, log: quiet, sizes: [100] }))
      .rejects.toThrow(/--sizes: 100 is not one of/);
  }, SLOW);

  test("train.ts at 96 px: a ViT checkpoint that evaluate() measures at 96; an uncached size names the fix", () => {
    const cache = tempDir();
    const prep = runScript(["prepare.ts", "--source", "sample", "--sizes", "64,96"], { AR_CACHE: cache });
    expect(prep.code).toBe(0);
    const ckpt = join(cache, "ckpt");
    const hp = JSON.stringify({ family: "vit", imageSize: 96, patch: 16, embedDim: 32, vitDepth: 1, batchSize: 16 });
    const train = runScript(["train.ts", "--budget", "2", "--checkpoint", ckpt], { AR_CACHE: cache, AR_HP: hp });
    expect(train.code).toBe(0);
    expect(JSON.parse(readFileSync(join(ckpt, "meta.json"), "utf8")).imageSize).toBe(96);
    const evaluated = runScript(["prepare.ts", "evaluate", "--model", ckpt], { AR_CACHE: cache });
    expect(evaluated.code).toBe(0);
    const [trained, measured] = [parseFooter(train.out), parseFooter(evaluated.out)];
    for (const k of ["val_accuracy", "yield_mse", "combined_score", "val_images"]) {
      expect(measured[k]).toBe(trained[k]!);
    }
    const uncached = runScript(["train.ts", "--budget", "1"], { AR_CACHE: cache, AR_HP: '{"imageSize":128}' });
    expect(uncached.code).toBe(1);
    const error = uncached.out.trim().split("\n").filter((l) => l.startsWith("error:"));
    expect(error).toHaveLength(1);
    expect(error[0]).toContain("not cached at 128 px (cached: 64, 96)");
    expect(error[0]).toContain("bun prepare.ts --task waste --source sample --sizes 64,96,128");
  }, SLOW);

  test("a ViT on a CIFAR-format file: 32 px native, 64 px an upsampling with the same split", async () => {
    const dir = join(tempDir(), "cifar-100-binary");
    mkdirSync(dir, { recursive: true });
    const names = Array.from({ length: 100 }, (_, i) => `class_${i}`);
    writeFileSync(join(dir, "fine_label_names.txt"), names.join("\n") + "\n");
    writeFileSync(join(dir, "coarse_label_names.txt"), Array.from({ length: 20 }, (_, i) => `s${i}`).join("\n"));
    // 60 train and 10 test records over 5 classes; class c's red plane is bright where the row is c mod 5.
    const records = (n: number, seed: number) => {
      const buf = new Uint8Array(n * 3074);
      const noise = seeded(n * 3072, seed);
      for (let r = 0; r < n; r++) {
        const fine = r % 5, o = r * 3074;
        buf[o + 1] = fine;
        for (let p = 0; p < 3072; p++) {
          const band = p < 1024 && Math.floor((p % 1024) / 32) % 5 === fine ? 150 : 0;
          buf[o + 2 + p] = band + Math.floor(noise[r * 3072 + p]! * 100);
        }
      }
      return buf;
    };
    writeFileSync(join(dir, "train.bin"), records(60, 1));
    writeFileSync(join(dir, "test.bin"), records(10, 2));
    const cache = tempDir();
    const r = await prepareData({ task: "cifar100", source: dir, cacheRoot: cache, log: quiet, sizes: [32, 64] });
    expect(r.manifest.imageSize).toBe(32);
    const [at32, at64] = [await loadCacheAtSize(32, cache), await loadCacheAtSize(64, cache)];
    expect(at64.manifest.items).toEqual(at32.manifest.items);
    expect(at64.manifest.preprocessing).toContain("resized");
    const ckpt = join(cache, "ckpt");
    // No imageSize: HP's default (0) trains CIFAR-100 at the 32 px it is prepared at.
    const hp = JSON.stringify({ family: "vit", patch: 8, embedDim: 32, vitDepth: 2, batchSize: 16 });
    const train = runScript(["train.ts", "--budget", "2", "--checkpoint", ckpt], { AR_CACHE: cache, AR_HP: hp });
    expect(train.code).toBe(0);
    const footer = parseFooter(train.out);
    expect(Number(footer.top1)).toBeGreaterThanOrEqual(0);
    expect(Number(footer.num_steps)).toBeGreaterThan(2);
    expect(JSON.parse(readFileSync(join(ckpt, "meta.json"), "utf8")).imageSize).toBe(32);
  }, SLOW);
});
