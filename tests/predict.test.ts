/**
 * predict.ts on the real photos of data/sample with a freshly trained tiny checkpoint: predictions
 * and their JSON shape, every kind of bad input, the default model choice, and preprocessing that
 * is byte-identical to what prepare.ts caches and imageBatch feeds the model.
 */
import { beforeAll, describe, expect, test } from "bun:test";
import { cpSync, mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { type } from "arktype";
import { imageBatch, loadCache, prepareData, type Dataset } from "../prepare.ts";
import { decodeToRgb } from "../lib/images.ts";
import { decodeInput, inputTensor } from "../predict.ts";
import { PredictionLine, type Prediction } from "../lib/prediction.ts";
import { initBackend } from "../lib/backend.ts";
import { BUN, ROOT, runScript, sliceOf, tempDir } from "./helpers.ts";

let src = "";
let cache = "";
let ckpt = "";

/** Run predict.ts; stdin bytes optional. */
function predict(
  args: string[],
  opts: { cwd?: string; stdin?: Uint8Array } = {},
): { code: number; stdout: string; stderr: string } {
  const r = Bun.spawnSync([BUN, join(ROOT, "predict.ts"), ...args], {
    cwd: opts.cwd ?? ROOT, env: { ...process.env, AR_BACKEND: "wasm" }, stdin: opts.stdin ?? "ignore",
    stdout: "pipe", stderr: "pipe",
  });
  return { code: r.exitCode ?? -1, stdout: r.stdout.toString(), stderr: r.stderr.toString() };
}

function jsonLines(stdout: string): PredictionLine[] {
  return stdout.trim().split("\n").filter((l) => l !== "").map((l) => {
    const v = PredictionLine(JSON.parse(l));
    if (v instanceof type.errors) throw new Error(`not a PredictionLine: ${v.summary}\n${l}`);
    return v;
  });
}

const firstOf = (cls: string) => join(src, cls, readdirSync(join(src, cls)).sort()[0]!);

/** Each case starts `bun predict.ts` (bun, tfjs, a model) once or more: seconds, more on a busy machine. */
const SLOW = 120_000;

describe("predict.ts on real photos", () => {
  beforeAll(async () => {
    // A small real slice of the sample (all 3 classes), a private cache, and a 2-second model (no test here
    // asks how good it is).
    src = sliceOf("sample", 12);
    cache = tempDir();
    await prepareData({ task: "waste", source: src, cacheRoot: cache, log: () => {} });
    ckpt = join(tempDir(), "ckpt");
    const r = runScript(["train.ts", "--budget", "2", "--checkpoint", ckpt], { AR_CACHE: cache });
    if (r.code !== 0) throw new Error(`train.ts failed:\n${r.out.slice(-2000)}`);
  }, 240_000);

  test("files and a folder: class, index, confidence, top-k and the yield estimate, as valid JSON Lines", () => {
    const files = ["ewaste", "recyclable"].map(firstOf);
    const r = predict([...files, join(src, "organic"), "--json", "--model", ckpt, "--top-k", "2"]);
    expect(r.code).toBe(0);
    const lines = jsonLines(r.stdout);
    expect(lines.length).toBe(2 + readdirSync(join(src, "organic")).length);
    expect(lines.map((l) => l.file).slice(0, 2)).toEqual(files);
    for (const l of lines) {
      if (!l.ok) throw new Error(`unexpected failure: ${l.error}`);
      expect(["ewaste", "recyclable", "organic"]).toContain(l.class);
      expect(l.index).toBe(["ewaste", "recyclable", "organic"].indexOf(l.class));
      expect(l.top.length).toBe(2);
      expect(l.top[0]).toEqual({ class: l.class, index: l.index, probability: l.confidence });
      expect(l.top[0]!.probability).toBeGreaterThanOrEqual(l.top[1]!.probability);
      expect(l.task).toBe("waste");
      expect(l.model).toBe(ckpt);
      expect(l.yield?.basis).toBe("assumed");
      expect(l.yield?.note).toContain("assumption-based estimate");
      expect(l.yield!.estimate).toBeGreaterThanOrEqual(0);
      expect(l.yield!.estimate).toBeLessThanOrEqual(1);
    }
    expect(r.stderr).toContain(`model: ${ckpt} (--model)`);
  }, SLOW);

  test("a model trained on data/sample says so: its meta carries the manifest's flag, predict.ts warns", async () => {
    const { checkpointMeta } = await import("../lib/checkpoint.ts");
    const { manifest } = await loadCache(undefined, cache);
    const model = { backbone: null, hasYieldHead: true, numParams: 1, metrics: {}, commit: null };
    expect(checkpointMeta({ ...manifest, sample: true }, model).sample).toBe(true);
    expect(checkpointMeta({ ...manifest, sample: false }, model).sample).toBe(false);
    expect(Object.keys(checkpointMeta({ ...manifest, sample: undefined }, model))).not.toContain("sample");
    const warning = "WARNING: trained on data/sample: not a measure of quality";
    expect(predict([firstOf("ewaste"), "--model", ckpt]).stderr).not.toContain(warning); // a copy: not the sample
    const copy = join(tempDir(), "ckpt");
    cpSync(ckpt, copy, { recursive: true });
    const meta = JSON.parse(readFileSync(join(copy, "meta.json"), "utf8")) as Record<string, unknown>;
    writeFileSync(join(copy, "meta.json"), JSON.stringify({ ...meta, sample: true }));
    const r = predict([firstOf("ewaste"), "--model", copy]);
    expect(r.code).toBe(0);
    expect(r.stderr).toContain(warning);
  });

  test("the human table: one row per image with the yield column and the assumption note", () => {
    const file = firstOf("ewaste");
    const r = predict([file, "--model", ckpt]);
    expect(r.code).toBe(0);
    const out = r.stdout.split("\n");
    expect(out[0]).toMatch(/^file\s+prediction\s+conf\s+yield\*\s+others$/);
    expect(out[1]).toMatch(/(ewaste \(0\)|recyclable \(1\)|organic \(2\))\s+\d+\.\d%\s+0\.\d\d\s/);
    expect(r.stdout).toContain("* yield: estimated recoverable fraction");
    expect(r.stdout).toContain("ASSUMED");
  }, SLOW);

  test("stdin (-) and batching: the same predictions whatever the batch size", () => {
    const file = firstOf("recyclable");
    const fromStdin = jsonLines(predict(["-", "--json", "--model", ckpt], { stdin: readFileSync(file) }).stdout);
    const fromFile = jsonLines(predict([file, "--json", "--model", ckpt]).stdout);
    expect(fromStdin[0]).toMatchObject({ ok: true, file: "-" });
    expect({ ...fromStdin[0]!, file: file }).toEqual(fromFile[0]!);
    const small = jsonLines(predict([src, "--json", "--model", ckpt, "--batch", "5"]).stdout) as Prediction[];
    const big = jsonLines(predict([src, "--json", "--model", ckpt, "--batch", "64"]).stdout) as Prediction[];
    expect(small.length).toBe(big.length);
    expect(small.length).toBeGreaterThan(20);
    small.forEach((p, i) => {
      expect(p.file).toBe(big[i]!.file);
      expect(p.class).toBe(big[i]!.class);
      expect(p.confidence).toBeCloseTo(big[i]!.confidence, 4);
    });
  }, SLOW);

  test("bad inputs: one line each naming the file and problem, exit 1, the good image still predicted", () => {
    const dir = tempDir();
    const good = firstOf("ewaste");
    const truncated = join(dir, "truncated.jpg");
    writeFileSync(truncated, readFileSync(good).subarray(0, 2000));
    writeFileSync(join(dir, "empty.png"), "");
    writeFileSync(join(dir, "notes.jpg"), "this is text, not a JPEG\n");
    mkdirSync(join(dir, "no-images"));
    writeFileSync(join(dir, "no-images", "README.txt"), "nothing to see\n");
    const missing = join(dir, "missing.jpg");
    const bad: [string, RegExp][] = [
      [missing, /no such file or directory/],
      [
        truncated,
        /not a readable image: truncated JPEG: the file ends before its end-of-image marker \(2000 bytes; libvips: /,
      ],
      [join(dir, "empty.png"), /empty file/],
      [join(dir, "notes.jpg"), /not a readable image: .*unsupported image format/],
      [join(dir, "no-images"), /holds no image files/],
    ];
    const r = predict([...bad.map(([f]) => f), good, "--json", "--model", ckpt]);
    expect(r.code).toBe(1);
    const errLines = r.stderr.split("\n").filter((l) => l.startsWith("predict.ts: "));
    expect(errLines.length).toBe(bad.length);
    for (const [file, why] of bad) {
      const line = errLines.find((l) => l.startsWith(`predict.ts: ${file}: `));
      expect(line).toBeDefined();
      expect(line!).toMatch(why);
    }
    const lines = jsonLines(r.stdout);
    expect(lines.filter((l) => l.ok).map((l) => l.file)).toEqual([good]);
    expect(lines.filter((l) => !l.ok).length).toBe(bad.length);
    expect(r.stderr).toContain(`1 predicted, ${bad.length} failed`);
  }, SLOW);

  test("bad checkpoints: missing, corrupted, incompatible, not a checkpoint: one line naming it, exit 2", () => {
    const image = firstOf("ewaste");
    const variant = (edit: (dir: string) => void): string => {
      const dir = join(tempDir(), "ckpt");
      cpSync(ckpt, dir, { recursive: true });
      edit(dir);
      return dir;
    };
    const editMeta = (f: (m: Record<string, unknown>) => void) => (dir: string) => {
      const m = JSON.parse(readFileSync(join(dir, "meta.json"), "utf8")) as Record<string, unknown>;
      f(m);
      writeFileSync(join(dir, "meta.json"), JSON.stringify(m));
    };
    const truncateWeights = (d: string) =>
      writeFileSync(join(d, "weights.bin"), readFileSync(join(d, "weights.bin")).subarray(0, 100));
    const cases: [string, string, RegExp][] = [
      ["missing folder", join(tempDir(), "nope"), /no such checkpoint folder/],
      ["truncated weights", variant(truncateWeights), /weights\.bin: .*(corrupted or truncated)/],
      ["no weights", variant((d) => rmSync(join(d, "weights.bin"))), /weights\.bin: weights file missing/],
      [
        "garbage meta.json",
        variant((d) => writeFileSync(join(d, "meta.json"), "{not json")),
        /meta\.json: not valid JSON/,
      ],
      ["no meta.json", variant((d) => rmSync(join(d, "meta.json"))), /meta\.json missing/],
      ["unknown task", variant(editMeta((m) => { m.task = "birds"; })), /not a checkpoint meta file: task/],
      [
        "other image size",
        variant(editMeta((m) => { m.imageSize = 32; })),
        /incompatible checkpoint: the model takes input \[null,64,64,3\] but meta.json says 32x32x3/,
      ],
      [
        "other class count",
        variant(editMeta((m) => { m.classes = ["a", "b", "c", "d"]; })),
        /incompatible checkpoint: the model outputs 3 class probabilities for 4 classes/,
      ],
      [
        "other preprocessing",
        variant(editMeta((m) => { m.preprocessing = "pillow-bilinear-v0"; })),
        /incompatible checkpoint: trained on images preprocessed as "pillow-bilinear-v0"/,
      ],
    ];
    for (const [what, dir, why] of cases) {
      const r = predict([image, "--model", dir]);
      const lines = r.stderr.trim().split("\n");
      expect({ what, code: r.code }).toEqual({ what, code: 2 });
      expect({ what, last: lines.at(-1) }).toEqual({ what, last: expect.stringMatching(why) });
      expect(lines.at(-1)!).toContain(dir);
      expect(r.stdout).toBe("");
    }
  }, SLOW);

  test("default model: checkpoints/best-<branch> when it exists, else checkpoints/latest, and it says which", () => {
    const repo = tempDir();
    expect(Bun.spawnSync(["git", "init", "-q", "-b", "exp/night-1", repo]).exitCode).toBe(0);
    const image = firstOf("recyclable");
    const none = predict([image], { cwd: repo });
    expect(none.code).toBe(2);
    expect(none.stderr).toContain("checkpoints/latest: no such checkpoint folder");
    cpSync(ckpt, join(repo, "checkpoints", "latest"), { recursive: true });
    const latest = predict([image], { cwd: repo });
    expect(latest.code).toBe(0);
    expect(latest.stderr).toContain(
      "model: checkpoints/latest (the last train.ts run: branch exp/night-1 has no checkpoints/best-exp_night-1 yet)",
    );
    cpSync(ckpt, join(repo, "checkpoints", "best-exp_night-1"), { recursive: true });
    const best = predict([image], { cwd: repo });
    expect(best.code).toBe(0);
    expect(best.stderr).toContain("model: checkpoints/best-exp_night-1 (the best kept model of branch exp/night-1)");
  }, SLOW);

  const byteForByte = "preprocessing is prepare.ts's: cached pixels = decodeToRgb(file), "
    + "predict's tensor = imageBatch's, byte for byte";
  test(byteForByte, async () => {
    await initBackend({ prefer: "wasm" });
    const ds: Dataset = await loadCache(undefined, cache);
    const px = ds.imageSize * ds.imageSize * 3;
    // One item of each class, train and val alike.
    const picks = ds.manifest.classes
      .map((_, c) => ds.manifest.items.findIndex((it) => it.label === c))
      .filter((i) => i >= 0);
    expect(picks.length).toBe(3);
    for (const i of picks) {
      const file = join(src, ds.manifest.items[i]!.path);
      const cached = ds.images.subarray(i * px, (i + 1) * px);
      expect(Buffer.from(await decodeToRgb(readFileSync(file), ds.imageSize)).equals(Buffer.from(cached))).toBe(true);
      const decoded = await decodeInput({ name: file, path: file }, ds.imageSize);
      if (!("pixels" in decoded)) throw new Error(decoded.error);
      expect(Buffer.from(decoded.pixels).equals(Buffer.from(cached))).toBe(true);
      const ours = await inputTensor([decoded.pixels], ds.imageSize);
      const theirs = imageBatch(ds, [i]);
      expect(ours.shape).toEqual(theirs.shape);
      const a = ours.dataSync() as Float32Array, b = theirs.dataSync() as Float32Array;
      const bytesOf = (f: Float32Array) => Buffer.from(f.buffer, f.byteOffset, f.byteLength);
      expect(bytesOf(a).equals(bytesOf(b))).toBe(true);
      ours.dispose();
      theirs.dispose();
    }
  }, SLOW);
});

describe("predict.ts without a model or images", () => {
  test("no arguments and bad flags: a usage line and exit 2, fast", () => {
    const none = predict([]);
    expect(none.code).toBe(2);
    expect(none.stderr).toContain("give at least one image, folder or -");
    const k = predict(["x.jpg", "--top-k", "0"]);
    expect(k.code).toBe(2);
    expect(k.stderr).toContain("topK must be at least 1");
  }, SLOW);

  test("only missing files: exit 1 without loading any model", () => {
    const r = predict([join(tempDir(), "a.jpg"), "--model", join(tempDir(), "no-model")]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("a.jpg: no such file or directory");
    expect(r.stderr).not.toContain("no-model");
  }, SLOW);
});
