import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import * as tf from "@tensorflow/tfjs";
import { evaluate, loadCache, parseFooter, prepareData, type Dataset } from "../prepare.ts";
import { initBackend } from "../lib/backend.ts";
import {
  BACKBONES, datasetFeatures, ensureUrlModel, featureCachePath, loadBackbone, parseBackboneId,
  type Backbone, type BackboneSpec,
} from "../lib/backbones.ts";
import { inputSizeFor, loadCheckpoint, predictorFor } from "../lib/checkpoint.ts";
import { decodeToRgb, sha256Hex } from "../lib/images.ts";
import { HAVE_DATASETS, runScript, sliceOf, tempDir } from "./helpers.ts";

const SIZE = 96; // small input: fast on one wasm thread
const quiet = () => {};
/** Loading a backbone, extracting features or running train.ts outlasts Bun's 5 s default per test. */
const SLOW = 180_000;

beforeAll(async () => { await initBackend({ prefer: "wasm" }); }, SLOW);

describe("backbone registry", () => {
  test("ids parse as NAME or NAME@SIZE; unknown names fail with the list", async () => {
    expect(parseBackboneId("nsfwjs-mobilenetv2@128")).toEqual({ name: "nsfwjs-mobilenetv2", inputSize: 128 });
    expect(parseBackboneId("mobilenet-v1-imagenet")).toEqual({ name: "mobilenet-v1-imagenet", inputSize: null });
    expect(() => parseBackboneId("a b")).toThrow(/NAME@SIZE/);
    await expect(loadBackbone("resnet-999")).rejects.toThrow(/unknown backbone "resnet-999".*nsfwjs-mobilenetv2/);
    // Which weights are ImageNet is part of the registry, not folklore.
    expect(BACKBONES["nsfwjs-mobilenetv2"].imagenet).toBe(false);
    expect(BACKBONES["mobilenet-v2-imagenet"].imagenet).toBe(true);
  }, SLOW);
});

describe("offline backbone (nsfwjs MobileNetV2) and the feature cache", () => {
  let ds: Dataset;
  let bb: Backbone;
  beforeAll(async () => {
    const cache = tempDir();
    await prepareData({ task: "waste", source: sliceOf("sample", 6), cacheRoot: cache, log: quiet });
    ds = await loadCache(undefined, cache);
    bb = await loadBackbone("nsfwjs-mobilenetv2", { inputSize: SIZE });
  }, SLOW);

  test("loads with no network, cut at out_relu: 1280-d features, deterministic", async () => {
    expect(bb.id).toBe(`nsfwjs-mobilenetv2@${SIZE}`);
    expect(bb.featureDim).toBe(1280);
    const x = tf.randomUniform([3, SIZE, SIZE, 3], 0, 1, "float32", 7) as tf.Tensor4D;
    const a = bb.features(x), b = bb.features(x);
    expect(a.shape).toEqual([3, 1280]);
    expect(Array.from(await a.data())).toEqual(Array.from(await b.data()));
    // At 224 the model is cut as loaded; rebuilt from its JSON for 224 (layer-by-layer weight
    // copy, the path every other size takes) it gives the very same features.
    const x224 = tf.image.resizeBilinear(x, [224, 224]);
    const native = await loadBackbone("nsfwjs-mobilenetv2@224");
    const asIfResized = { ...BACKBONES["nsfwjs-mobilenetv2"], nativeSize: 999 };
    const rebuilt = await loadBackbone("nsfwjs-mobilenetv2@224", { spec: asIfResized });
    const n = native.features(x224), r = rebuilt.features(x224);
    expect(n.shape).toEqual([3, 1280]);
    expect(Array.from(await r.data())).toEqual(Array.from(await n.data()));
    rebuilt.dispose();
    tf.dispose([x, x224, a, b, n, r]);
  }, SLOW);

  const featuresCase =
    "dataset features: [N, 1280] from the source photos, cached, reused, recomputed when the key changes";
  test(featuresCase, async () => {
    const logs: string[] = [];
    const cold = await datasetFeatures(ds, bb, { log: (l) => logs.push(l) });
    expect(cold.reused).toBe(false);
    expect([cold.n, cold.dim]).toEqual([ds.manifest.items.length, 1280]);
    expect(cold.data.every(Number.isFinite)).toBe(true);
    expect(cold.data.some((v) => v !== 0)).toBe(true);
    expect(logs.some((l) => /\d+\/\d+ images/.test(l))).toBe(true); // progress
    const warm = await datasetFeatures(ds, bb, { log: quiet });
    expect(warm.reused).toBe(true);
    expect(warm.data).toEqual(cold.data);

    // Row 0 by hand: decodeToRgb of the original file at the backbone size, then the backbone.
    const item = ds.manifest.items[0]!;
    const px = await decodeToRgb(join(ds.manifest.source, item.path), SIZE);
    const f = bb.features(tf.tensor4d(Float32Array.from(px, (v) => v * (1 / 255)), [1, SIZE, SIZE, 3]));
    const row = await f.data();
    f.dispose();
    for (let k = 0; k < 1280; k += 97) expect(row[k]!).toBeCloseTo(cold.data[k]!, 4);

    // A change of any key part recomputes: here the dataset fingerprint in the JSON.
    const path = featureCachePath(ds, bb);
    const meta = JSON.parse(readFileSync(`${path}.json`, "utf8")) as Record<string, unknown>;
    writeFileSync(`${path}.json`, JSON.stringify({ ...meta, datasetFingerprint: "something-else" }));
    const again = await datasetFeatures(ds, bb, { log: quiet });
    expect(again.reused).toBe(false);
    expect(again.data).toEqual(cold.data); // same inputs, same features
    // A truncated .f32 is not trusted either.
    writeFileSync(path, readFileSync(path).subarray(0, 100));
    expect((await datasetFeatures(ds, bb, { log: quiet })).reused).toBe(false);
    // Another input size is another cache file.
    expect(featureCachePath(ds, { spec: bb.spec, inputSize: 128 })).not.toBe(path);
  }, SLOW);
});

// ---------------------------------------------------------------------------
// URL backbones against a local server
// ---------------------------------------------------------------------------

interface Served {
  files: Map<string, Uint8Array<ArrayBuffer>>;
  hits: Map<string, number>;
  truncate: Map<string, number>;
}

/** The nsfwjs model as an online layers model would be laid out: model.json + two binary shards. */
async function nsfwjsAsFiles(): Promise<Map<string, Uint8Array<ArrayBuffer>>> {
  const { MobileNetV2Model } = await import("nsfwjs/models/mobilenet_v2");
  const json = (await MobileNetV2Model.modelJson()).default;
  const weights = new Uint8Array(Buffer.from((await MobileNetV2Model.weightBundles[0]!()).default, "base64"));
  const half = Math.floor(weights.length / 2);
  const paths = ["group1-shard1of2", "group1-shard2of2"];
  const modelJson = { ...json, weightsManifest: [{ ...json.weightsManifest[0]!, paths }] };
  return new Map<string, Uint8Array<ArrayBuffer>>([
    ["model.json", new TextEncoder().encode(JSON.stringify(modelJson))],
    ["group1-shard1of2", weights.slice(0, half)],
    ["group1-shard2of2", weights.slice(half)],
  ]);
}

describe("offline backbone (nsfwjs InceptionV3)", () => {
  const caseName = "loads with no network: 768-d pooled mixed4, deterministic; its last blocks split off exactly";
  test(caseName, async () => {
    const side = 128; // InceptionV3's valid-padded stem needs at least 75; at 128 mixed3 is 6×6, mixed2 13×13
    const whole = await loadBackbone(`nsfwjs-inceptionv3@${side}`, { reload: true });
    expect(whole.featureDim).toBe(768);
    expect(BACKBONES["nsfwjs-inceptionv3"].imagenet).toBe(false);
    const x = tf.randomUniform([2, side, side, 3], 0, 1, "float32", 11) as tf.Tensor4D;
    const a = whole.features(x), b = whole.features(x);
    expect(a.shape).toEqual([2, 768]);
    const ref = Array.from(await a.data());
    expect(Array.from(await b.data())).toEqual(ref);
    // Fine-tuning k blocks: the frozen part's maps (cached in training) through the trainable blocks
    // must be the whole network's features, bit for bit.
    for (const [k, dim] of [[1, 6 * 6 * 768], [2, 13 * 13 * 288]] as const) {
      const cut = await loadBackbone(`nsfwjs-inceptionv3@${side}`, { unfreezeBlocks: k, reload: true });
      expect(cut.featureDim).toBe(dim);
      const maps = cut.features(x);
      const blocks = await cut.trainableBlocks();
      const y = blocks.predict(maps) as tf.Tensor;
      expect(Array.from(await y.data())).toEqual(ref);
      tf.dispose([maps, y]);
      blocks.dispose();
      cut.dispose();
    }
    // Several layers pooled in one pass: each one's columns are what that layer alone gives.
    const two = { ...BACKBONES["nsfwjs-inceptionv3"], name: "inception-two-layers", featureNode: ["mixed2", "mixed4"],
      featureDim: 288 + 768 };
    const both = await loadBackbone(`inception-two-layers@${side}`, { spec: two, reload: true });
    const f = both.features(x);
    expect(f.shape).toEqual([2, 288 + 768]);
    const cols = tf.slice(f, [0, 288], [2, 768]);
    expect(Array.from(await cols.data())).toEqual(ref);
    both.dispose();
    const backwards = { ...two, featureNode: ["mixed4", "mixed2"] };
    await expect(loadBackbone(`inception-two-layers@${side}`, { spec: backwards, reload: true }))
      .rejects.toThrow(/layer "mixed4" is not before "mixed2"/);
    tf.dispose([x, a, b, f, cols]);
    whole.dispose();
  }, SLOW);
});

describe("URL backbone download, verification and cache (local HTTP server)", () => {
  let served: Served;
  let server: ReturnType<typeof Bun.serve>;
  let base: string;
  const spec = (over: Partial<BackboneSpec> = {}): BackboneSpec => ({
    ...BACKBONES["nsfwjs-mobilenetv2"], name: "served-mobilenetv2", title: "nsfwjs weights served over HTTP",
    source: { kind: "url", mirrors: [{ base }] }, ...over,
  });
  const opts = { attempts: 2, backoffMs: 5, timeoutMs: 10_000, log: quiet };

  beforeAll(async () => {
    served = { files: await nsfwjsAsFiles(), hits: new Map(), truncate: new Map() };
    server = Bun.serve({
      port: 0, hostname: "127.0.0.1",
      fetch(req) {
        const name = new URL(req.url).pathname.split("/").pop() ?? "";
        served.hits.set(name, (served.hits.get(name) ?? 0) + 1);
        const body = served.files.get(name);
        if (!body) return new Response("not found", { status: 404 });
        const cut = served.truncate.get(name) ?? 0;
        if (cut > 0) {
          served.truncate.set(name, cut - 1);
          return new Response(body.slice(0, Math.floor(body.length / 3))); // a short body, honestly labelled
        }
        return new Response(body);
      },
    });
    base = `http://127.0.0.1:${server.port}/m/`;
  }, SLOW);
  afterAll(() => server.stop(true));

  const leftovers = (root: string) => {
    const dir = join(root, "backbones");
    return existsSync(dir) ? readdirSync(dir).filter((d) => d.includes(".tmp-")) : [];
  };
  const mirror = (url: string): Partial<BackboneSpec> => ({ source: { kind: "url", mirrors: [{ base: url }] } });

  const onceCase =
    "downloads once, verifies, caches; later loads need no network and give the offline backbone's features";
  test(onceCase, async () => {
    const root = tempDir();
    served.hits.clear();
    const bb = await loadBackbone("served-mobilenetv2", { ...opts, spec: spec(), cacheRoot: root, inputSize: SIZE });
    const dir = join(root, "backbones", "served-mobilenetv2");
    for (const f of ["model.json", "group1-shard1of2", "group1-shard2of2", "files.json"]) {
      expect(existsSync(join(dir, f))).toBe(true);
    }
    expect(served.hits.get("group1-shard2of2")).toBe(1);
    expect(leftovers(root)).toEqual([]);
    const x = tf.randomUniform([2, SIZE, SIZE, 3], 0, 1, "float32", 3) as tf.Tensor4D;
    const offline = await loadBackbone("nsfwjs-mobilenetv2", { inputSize: SIZE });
    expect(Array.from(await bb.features(x).data())).toEqual(Array.from(await offline.features(x).data()));
    expect(bb.weightsId).toBe(offline.weightsId);

    served.hits.clear();
    const hits = () => [...served.hits.values()].reduce((a, b) => a + b, 0);
    const offlineSpec = spec(mirror("http://127.0.0.1:9/unreachable/"));
    const again = { ...opts, spec: offlineSpec, cacheRoot: root, inputSize: SIZE, reload: true };
    await loadBackbone("served-mobilenetv2", again);
    expect(hits()).toBe(0);
    x.dispose();
  }, SLOW);

  const retryCase =
    "a truncated shard is retried (group size from model.json), and a pinned file by its size and sha256";
  test(retryCase, async () => {
    const root = tempDir();
    served.truncate.set("group1-shard2of2", 1);
    served.hits.clear();
    const logs: string[] = [];
    await ensureUrlModel(spec(), { ...opts, cacheRoot: root, log: (l) => logs.push(l) });
    expect(logs.join("\n")).toMatch(/group 1.*needs \d+ \(truncated download\); retrying/);
    expect(served.hits.get("group1-shard2of2")).toBe(2);

    const pinned = [...served.files].map(([path, b]) => ({ path, size: b.length, sha256: sha256Hex(b) }));
    const root2 = tempDir();
    served.truncate.set("group1-shard1of2", 1);
    served.hits.clear();
    logs.length = 0;
    const pinnedSpec = spec({ source: { kind: "url", mirrors: [{ base }], pinned } });
    await ensureUrlModel(pinnedSpec, { ...opts, cacheRoot: root2, log: (l) => logs.push(l) });
    expect(logs.join("\n"))
      .toMatch(/group1-shard1of2: got \d+ bytes, expected \d+ \(truncated or wrong file\); retrying/);
    expect(served.hits.get("group1-shard1of2")).toBe(2);
    expect(leftovers(root2)).toEqual([]);
  }, SLOW);

  test("a shard that stays truncated is a clear error and leaves no cache behind", async () => {
    const root = tempDir();
    served.truncate.set("group1-shard2of2", 99);
    await expect(ensureUrlModel(spec(), { ...opts, cacheRoot: root }))
      .rejects.toThrow(/served-mobilenetv2: download failed, nothing was cached:[\s\S]*truncated download/);
    expect(existsSync(join(root, "backbones", "served-mobilenetv2"))).toBe(false);
    expect(leftovers(root)).toEqual([]);
    served.truncate.clear();
    // A missing file is not retried: 404 is the answer.
    const missing = spec(mirror(`${base}nothing-here/x`));
    await expect(ensureUrlModel(missing, { ...opts, cacheRoot: root })).rejects.toThrow(/HTTP 404/);
  }, SLOW);

  test("a damaged cache is detected on load, deleted, and downloaded again", async () => {
    const root = tempDir();
    const dir = await ensureUrlModel(spec(), { ...opts, cacheRoot: root });
    const shard = join(dir, "group1-shard1of2");
    const bytes = readFileSync(shard);
    bytes[100] = bytes[100]! ^ 0xff;
    writeFileSync(shard, bytes);
    const logs: string[] = [];
    served.hits.clear();
    await ensureUrlModel(spec(), { ...opts, cacheRoot: root, log: (l) => logs.push(l) });
    expect(logs.join("\n"))
      .toMatch(/group1-shard1of2: sha256 does not match files\.json \(corrupt\).*downloading again/);
    expect(served.hits.get("group1-shard1of2")).toBe(1);
    expect(readFileSync(shard)).toEqual(Buffer.from(served.files.get("group1-shard1of2")!));
    // Offline and damaged: a clear error, and the damaged copy is gone rather than trusted.
    writeFileSync(shard, bytes.subarray(0, 10));
    await expect(ensureUrlModel(spec(mirror("http://127.0.0.1:9/")), { ...opts, cacheRoot: root }))
      .rejects.toThrow(/download failed, nothing was cached/);
    expect(existsSync(dir)).toBe(false);
  }, SLOW);
});

describe("graph-model backbones (the TF Hub format)", () => {
  /** A hand-written tfjs graph model: features = mean over pixels of relu(conv1x1(x, w)). */
  function tinyGraphModel(w: Float32Array): Map<string, Uint8Array<ArrayBuffer>> {
    const dims = (...d: number[]) => ({ dim: d.map((size) => ({ size: String(size) })) });
    const f32 = { type: "DT_FLOAT" };
    const b64 = (t: string) => Buffer.from(t).toString("base64");
    const ones = { list: { i: ["1", "1", "1", "1"] } };
    const modelJson = {
      format: "graph-model", generatedBy: "hand", convertedBy: "tests/backbones.test.ts",
      modelTopology: {
        node: [
          { name: "images", op: "Placeholder", attr: { dtype: f32, shape: { shape: dims(-1, 32, 32, 3) } } },
          {
            name: "w", op: "Const",
            attr: { dtype: f32, value: { tensor: { dtype: "DT_FLOAT", tensorShape: dims(1, 1, 3, 4) } } },
          },
          {
            name: "axes", op: "Const",
            attr: { dtype: { type: "DT_INT32" }, value: { tensor: { dtype: "DT_INT32", tensorShape: dims(2) } } },
          },
          {
            name: "conv", op: "Conv2D", input: ["images", "w"],
            attr: {
              T: f32, strides: ones, dilations: ones, padding: { s: b64("VALID") }, data_format: { s: b64("NHWC") },
            },
          },
          { name: "relu", op: "Relu", input: ["conv"], attr: { T: f32 } },
          {
            name: "feat", op: "Mean", input: ["relu", "axes"],
            attr: { T: f32, Tidx: { type: "DT_INT32" }, keep_dims: { b: true } },
          },
          { name: "logits", op: "Identity", input: ["feat"], attr: { T: f32 } },
        ],
        library: {}, versions: {},
      },
      weightsManifest: [{
        paths: ["group1-shard1of1.bin"],
        weights: [{ name: "w", shape: [1, 1, 3, 4], dtype: "float32" }, { name: "axes", shape: [2], dtype: "int32" }],
      }],
    };
    const weights = new Uint8Array(w.byteLength + 8);
    weights.set(new Uint8Array(w.buffer, w.byteOffset, w.byteLength));
    weights.set(new Uint8Array(Int32Array.from([1, 2]).buffer), w.byteLength);
    return new Map<string, Uint8Array<ArrayBuffer>>([
      ["model.json", new TextEncoder().encode(JSON.stringify(modelJson))], ["group1-shard1of1.bin", weights],
    ]);
  }

  test("downloaded, cached and executed at its feature node; fixed input size is kept", async () => {
    const w = Float32Array.from({ length: 12 }, (_, i) => (i % 5) / 5 - 0.3);
    const files = tinyGraphModel(w);
    const serve = (req: Request) => {
      const b = files.get(new URL(req.url).pathname.split("/").pop() ?? "");
      return b ? new Response(b) : new Response("no", { status: 404 });
    };
    const server = Bun.serve({ port: 0, hostname: "127.0.0.1", fetch: serve });
    try {
      const spec: BackboneSpec = {
        name: "tiny-graph", title: "hand-written graph model", imagenet: false, weights: "test", license: "test",
        format: "graph", source: { kind: "url", mirrors: [{ base: `http://127.0.0.1:${server.port}/g/` }] },
        featureNode: "feat", featureDim: 4, nativeSize: 32, resizable: false, inputRange: [-1, 1],
      };
      const logs: string[] = [];
      const log = (l: string) => logs.push(l);
      const bb = await loadBackbone("tiny-graph", { spec, cacheRoot: tempDir(), inputSize: 64, log });
      expect(bb.inputSize).toBe(32); // a graph model keeps its own input size, and says so
      expect(logs.join("\n")).toContain("fixed 32×32 input");
      const x = tf.randomUniform([2, 32, 32, 3], 0, 1, "float32", 5) as tf.Tensor4D;
      const got = bb.features(x);
      const want = tf.tidy(() => {
        const scaled = tf.sub(tf.mul(x, 2), 1) as tf.Tensor4D; // inputRange [-1, 1]
        return tf.mean(tf.relu(tf.conv2d(scaled, tf.tensor4d(w, [1, 1, 3, 4]), 1, "valid")), [1, 2]);
      });
      expect(got.shape).toEqual([2, 4]);
      const [g, e] = [await got.data(), await want.data()];
      for (let k = 0; k < g.length; k++) expect(g[k]!).toBeCloseTo(e[k]!, 5);
      tf.dispose([x, got, want]);
    } finally {
      server.stop(true);
    }
  }, SLOW);
});

// ---------------------------------------------------------------------------
// train.ts with a frozen backbone
// ---------------------------------------------------------------------------

// On the full set's slice: data/sample's 19 val photos cannot carry the "beats chance widely" bar.
describe.skipIf(!HAVE_DATASETS)("train.ts with a frozen backbone", () => {
  const trainCase =
    "AR_HP selects the backbone; a short run on real waste photos beats chance widely; evaluate() reproduces it";
  test(trainCase, async () => {
    const cache = tempDir();
    await prepareData({ task: "waste", source: sliceOf("waste3", 40), cacheRoot: cache, log: quiet });
    const ckpt = join(tempDir(), "ckpt");
    // flip off: 10 s on 80 photos is too short for the mirrored view to pay (0.86 with it, 0.95 without)
    const hp = JSON.stringify({ backbone: "nsfwjs-mobilenetv2", backboneSize: SIZE, flip: false });
    const r = runScript(["train.ts", "--budget", "10", "--checkpoint", ckpt], { AR_CACHE: cache, AR_HP: hp });
    expect(r.code).toBe(0);
    expect(r.out).toContain("hp overrides from AR_HP");
    expect(r.out).toMatch(/features nsfwjs-mobilenetv2@96: \d+\/\d+ images/);
    expect(r.out).toMatch(/feature_seconds: +\d+\.\d \(extracted now/);
    const footer = parseFooter(r.out);
    expect(Number(footer.training_seconds)).toBeGreaterThanOrEqual(10);
    const ds = await loadCache(undefined, cache);
    const counts = ds.manifest.classes.map((_, c) => Array.from(ds.val).filter((i) => ds.labels[i] === c).length);
    const majority = Math.max(...counts) / ds.val.length;
    const acc = Number(footer.val_accuracy);
    expect(acc).toBeGreaterThanOrEqual(Math.max(0.85, majority + 0.25));

    const loaded = await loadCheckpoint(ckpt, ds);
    expect(loaded.meta.backbone).toBe(`nsfwjs-mobilenetv2@${SIZE}`);
    expect(loaded.meta.notes).toContain(`input ${SIZE}x${SIZE}`);
    expect(loaded.numParams).toBeLessThan(200_000); // the head only
    expect(inputSizeFor(loaded.meta)).toBe(SIZE);
    const again = await evaluate(predictorFor(loaded, ds), ds);
    expect(again.metrics).toEqual(loaded.meta.metrics);

    // New photos (predict.ts): no dataset, the backbone runs on the pixels, same answers.
    const val = Array.from(ds.val).slice(0, 8);
    const fileOf = (i: number) => join(ds.manifest.source, ds.manifest.items[i]!.path);
    const pixels = await Promise.all(val.map((i) => decodeToRgb(fileOf(i), SIZE)));
    const scaled = Float32Array.from(pixels.flatMap((p) => Array.from(p)), (v) => v * (1 / 255));
    const x = tf.tensor4d(scaled, [val.length, SIZE, SIZE, 3]);
    const fresh = await predictorFor(loaded)(x, new Int32Array(val.length));
    const cached = await predictorFor(loaded, ds)(x, Int32Array.from(val));
    const [a, b] = [await fresh.probs.data(), await cached.probs.data()];
    for (let k = 0; k < a.length; k++) expect(a[k]!).toBeCloseTo(b[k]!, 4);

    // The harness's evaluate subcommand on the same checkpoint, and a second run reusing the features.
    const ev = runScript(["prepare.ts", "evaluate", "--model", ckpt], { AR_CACHE: cache });
    expect(ev.code).toBe(0);
    const remeasured = Number(parseFooter(ev.out.split("\neval_json")[0]!).val_accuracy);
    expect(remeasured).toBeCloseTo(loaded.meta.metrics.val_accuracy!, 6);
    const r2 = runScript(["train.ts", "--budget", "2", "--checkpoint", ckpt], { AR_CACHE: cache, AR_HP: hp });
    expect(r2.code).toBe(0);
    expect(r2.out).toMatch(/feature_seconds: +\d+\.\d \(cached features/);
  }, SLOW);

  test("a misspelt AR_HP key is refused before anything runs", () => {
    const misspelt = JSON.stringify({ backbon: "nsfwjs-mobilenetv2" });
    const r = runScript(["train.ts", "--budget", "1"], { AR_CACHE: tempDir(), AR_HP: misspelt });
    expect(r.code).not.toBe(0);
    expect(r.out).toMatch(/AR_HP.*backbon/);
  }, SLOW);
});
