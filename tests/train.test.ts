/**
 * train.ts through its command line only (it is the file the agent rewrites: its exports are not an
 * API), and the run plumbing it calls in lib/run.ts.
 */
import { describe, expect, test } from "bun:test";
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import sharp from "sharp";
import { evaluate, loadCache, parseFooter, prepareData } from "../prepare.ts";
import { initBackend } from "../lib/backend.ts";
import { loadCheckpoint, predictorFor, readMeta } from "../lib/checkpoint.ts";
import { HpDump } from "../lib/proposer.ts";
import { checkHp, hpSpace, parseOverrides } from "../lib/run.ts";
import { BUN, ROOT, runScript, tempDir } from "./helpers.ts";

/** A run of train.ts or predict.ts with start-up, a short budget, evaluation and a checkpoint. */
const SLOW = 180_000;
/** A process that only starts up (bun, tfjs, arktype) and exits: seconds, more on a busy machine. */
const STARTUP = 60_000;

describe("train.ts end to end", () => {
  test("a short run on data/sample's photos ends with the footer and a checkpoint that predicts the same", async () => {
    const cache = tempDir();
    await prepareData({ task: "waste", source: "sample", cacheRoot: cache, log: () => {} });
    const ckpt = join(tempDir(), "ckpt");
    // 4 s: enough for a few steps; nothing below depends on how long it trained.
    const r = runScript(["train.ts", "--budget", "4", "--checkpoint", ckpt], { AR_CACHE: cache });
    expect(r.out).toContain("step 00001");
    expect(r.code).toBe(0);
    const footer = parseFooter(r.out);
    const keys = [
      "val_accuracy", "yield_mse", "combined_score", "training_seconds", "total_seconds", "peak_memory_mb",
      "num_steps", "num_params", "backend",
    ];
    for (const k of keys) {
      expect(footer[k]).toBeDefined();
    }
    expect(footer.backend).toContain("wasm");
    expect(Number(footer.num_steps)).toBeGreaterThan(2);
    expect(Number(footer.training_seconds)).toBeGreaterThanOrEqual(4);
    expect(r.out).toContain("caveat");
    // The sample says what it is, before training and in the footer.
    expect(r.out).toMatch(/SAMPLE: \d+ photos, a small sample of real photos \(data\/sample\) for trying the tool/);
    expect(footer.data).toContain("NOT a measure of model quality");

    for (const f of ["model.json", "weights.bin", "meta.json"]) expect(existsSync(join(ckpt, f))).toBe(true);
    await initBackend();
    const ds = await loadCache(undefined, cache);
    const loaded = await loadCheckpoint(ckpt, ds);
    const again = await evaluate(predictorFor(loaded), ds);
    // The metrics measured before saving (meta.json) are reproduced exactly by the loaded model.
    expect(again.metrics).toEqual(loaded.meta.metrics);
    expect(Number(footer.val_accuracy)).toBeCloseTo(again.metrics.val_accuracy!, 6);
    expect(loaded.meta.task).toBe("waste");
    expect(loaded.meta.classes).toEqual(["ewaste", "recyclable", "organic"]);
    expect(loaded.meta.yieldSource).toBe("assumed-table");
    expect([footer.split, footer.val_images]).toEqual(["val", String(ds.val.length)]);

    // The same checkpoint re-measured on test, in another process: the footer says which split.
    const onTest = runScript(["prepare.ts", "evaluate", "--model", ckpt, "--split", "test"], { AR_CACHE: cache });
    expect(onTest.code).toBe(0);
    const testFooter = parseFooter(onTest.out.split("\neval_json")[0]!);
    expect([testFooter.split, testFooter.test_images]).toEqual(["test", String(ds.test.length)]);
    const json = JSON.parse(onTest.out.split("eval_json: ")[1]!.trim()) as { split: string; metrics: object };
    expect(json.split).toBe("test");
    expect(json.metrics).toEqual((await evaluate(predictorFor(loaded), ds, { split: "test" })).metrics);
    const bad = runScript(["prepare.ts", "evaluate", "--model", ckpt, "--split", "train"], { AR_CACHE: cache });
    expect(bad.code).toBe(1);
    expect(bad.out).toMatch(/split must be "test" or "val"|split must be "val" or "test"/);

    // A truncated weights file is a clear error naming the file.
    const w = readFileSync(join(ckpt, "weights.bin"));
    writeFileSync(join(ckpt, "weights.bin"), w.subarray(0, w.length - 8));
    await expect(loadCheckpoint(ckpt, ds)).rejects.toThrow(/weights\.bin.*truncated/);
  }, SLOW);

  test("trained on measured yields, the checkpoint says so and predict.ts does not call them assumed", async () => {
    // A tiny ImageFolder of flat-colour photos, one measured yield per photo.
    const src = tempDir("arv-yields-");
    const csv = ["path,yield"];
    for (const [c, cls] of ["ewaste", "recyclable", "organic"].entries()) {
      mkdirSync(join(src, cls));
      for (let i = 0; i < 8; i++) {
        const background = { r: 40 + 80 * c, g: 20 * i, b: 200 - 80 * c };
        const png = await sharp({ create: { width: 24, height: 24, channels: 3, background } }).png().toBuffer();
        writeFileSync(join(src, cls, `p${i}.png`), png);
        csv.push(`${cls}/p${i}.png,${(0.1 * c + 0.02 * i).toFixed(2)}`);
      }
    }
    const yieldsCsv = join(tempDir(), "yields.csv");
    writeFileSync(yieldsCsv, `${csv.join("\n")}\n`);
    const cache = tempDir();
    const prepared = await prepareData({ task: "waste", source: src, yieldsCsv, cacheRoot: cache, log: () => {} });
    expect(prepared.manifest.yieldSource).toStartWith("csv:");

    const ckpt = join(tempDir(), "ckpt");
    const r = runScript(["train.ts", "--budget", "1", "--checkpoint", ckpt], { AR_CACHE: cache });
    expect(r.code).toBe(0);
    const meta = await readMeta(ckpt);
    // Every fact of the data that the meta records is the manifest's, yieldSource included.
    const shared = [
      "task", "classes", "positiveClass", "imageSize", "preprocessing", "synthetic", "yieldSource",
    ] as const;
    for (const k of shared) expect(meta[k]).toEqual(prepared.manifest[k]);
    expect(meta.hasYieldHead).toBe(true);

    const photo = join(src, "organic", "p0.png");
    const env = { ...process.env, AR_BACKEND: "wasm" };
    const json = Bun.spawnSync([BUN, "predict.ts", photo, "--json", "--model", ckpt], { cwd: ROOT, env });
    expect(json.exitCode).toBe(0);
    const line = JSON.parse(json.stdout.toString().trim()) as { yield?: { basis: string; note: string } };
    expect(line.yield?.basis).toBe("measured");
    const table = runScript(["predict.ts", photo, "--model", ckpt], {});
    expect(table.code).toBe(0);
    expect(table.out).toContain("trained on measured yield labels");
    expect(table.out).not.toContain("ASSUMED");
  }, SLOW);

  test("train.ts --print-hp prints the HP block and its search space", () => {
    const r = runScript(["train.ts", "--print-hp"], {});
    expect(r.code).toBe(0);
    const parsed = HpDump.assert(JSON.parse(r.out.trim().split("\n").at(-1)!));
    expect(Object.keys(parsed.HP).sort()).toEqual(Object.keys(parsed.HP_SPACE).sort());
    for (const [k, v] of Object.entries(parsed.HP)) expect(parsed.HP_SPACE[k]).toContain(v);
    // Another seed is a re-roll of the noise, not a move; the class weighting is one.
    expect(parsed.HP_SPACE.seed).toEqual([parsed.HP.seed!]);
    expect(parsed.HP_SPACE.classWeight).toEqual([0, 0.5, 1]);
  }, STARTUP);

  test("classWeight 1 on a screening set: balanced weights, and the footer reports sensitivity", () => {
    const cache = tempDir();
    const prep = runScript(["prepare.ts", "--task", "screening", "--source", "synthetic"], { AR_CACHE: cache });
    expect(prep.code).toBe(0);
    const env = { AR_CACHE: cache, AR_HP: '{"classWeight": 1, "width": 8, "depth": 2}' };
    const r = runScript(["train.ts", "--budget", "2", "--checkpoint", join(tempDir(), "ckpt")], env);
    expect(r.code).toBe(0);
    // 40 synthetic images per class, ~24 of them in train by hash: inverse-frequency weights near 1.
    const weights = /class weights: synthetic_a (\S+), synthetic_b (\S+), synthetic_positive (\S+)/.exec(r.out);
    expect(weights).not.toBeNull();
    for (const w of weights!.slice(1)) expect(Math.abs(Number(w) - 1)).toBeLessThan(0.5);
    const footer = parseFooter(r.out);
    for (const k of ["bin_acc", "mc_acc", "sensitivity", "specificity", "balanced_bin_acc", "trivial_bin_acc"]) {
      expect(Number.isFinite(Number(footer[k]))).toBe(true);
    }
  }, SLOW);

  test("train.ts --help prints the flags and exits 0 without starting a run", () => {
    // No prepared dataset here: a run that started would fail with "no prepared dataset".
    const r = runScript(["train.ts", "--help"], { AR_CACHE: tempDir() });
    expect(r.code).toBe(0);
    for (const flag of ["--budget", "--checkpoint", "--print-hp", "AR_HP"]) expect(r.out).toContain(flag);
    expect(r.out).not.toContain("no prepared dataset");
  }, STARTUP);

  test("without a prepared dataset train.ts fails with a one-line reason", () => {
    const r = runScript(["train.ts", "--budget", "1"], { AR_CACHE: tempDir() });
    expect(r.code).not.toBe(0);
    expect(r.out).toContain("no prepared dataset");
    expect(r.out.trim().split("\n")).toHaveLength(1);
  }, STARTUP);

  test("a bad AR_HP value is refused before anything runs, naming the key", () => {
    const refused = [
      ['{"depth": 2.5}', /depth must be an integer/],
      ['{"flip": "yes"}', /flip must be boolean/],
      ["[3]", /AR_HP must be a JSON object/],
    ] as const;
    for (const [hp, why] of refused) {
      const r = runScript(["train.ts", "--budget", "1"], { AR_CACHE: tempDir(), AR_HP: hp });
      expect(r.code).toBe(1);
      expect(r.out).toMatch(why);
      expect(r.out).not.toContain("no prepared dataset");
    }
  }, STARTUP);
});

describe("lib/run.ts: HP declared once", () => {
  const HP = { name: "a", size: 224, rate: 0.2, steps: 3, on: true, offset: -1 };
  const SPACE = hpSpace(HP, { name: ["a", "b"], rate: [0, 0.5], steps: [1, 2, 3] });

  test("hpSpace: listed keys keep their list, every other key gets HP's value alone", () => {
    expect(SPACE).toEqual({
      name: ["a", "b"], size: [224], rate: [0, 0.5], steps: [1, 2, 3], on: [true], offset: [-1],
    });
  });

  test("checkHp: overrides of the declared types pass, and the defaults stay", () => {
    expect(checkHp(HP, SPACE, { name: "b", size: 96, rate: 0.35, on: false, offset: -2 }, "test"))
      .toEqual({ name: "b", size: 96, rate: 0.35, steps: 3, on: false, offset: -2 });
  });

  test("checkHp: unknown keys, wrong types, undeclared strings, fractions and negatives are refused", () => {
    const refused: [object, RegExp][] = [
      [{ nme: "a" }, /nme must be removed/],
      [{ size: "96" }, /size must be a number/],
      [{ on: 1 }, /on must be boolean/],
      [{ name: "c" }, /name must be "a" or "b"/],
      [{ steps: 2.5 }, /steps must be an integer/],
      [{ size: -96 }, /size must be non-negative/],
    ];
    for (const [overrides, why] of refused) expect(() => checkHp(HP, SPACE, overrides, "AR_HP")).toThrow(why);
    const stray = { ...SPACE, extra: [1] } as typeof SPACE;
    expect(() => checkHp(HP, stray, {}, "train.ts")).toThrow(/HP_SPACE: extra not in HP/);
  });

  test("parseOverrides: a JSON object, or a one-line error", () => {
    expect(parseOverrides(undefined)).toEqual({});
    expect(parseOverrides('{"lr": 0.01}')).toEqual({ lr: 0.01 });
    for (const bad of ["[1]", "null", "{lr: 1}", "3"]) {
      expect(() => parseOverrides(bad)).toThrow(/AR_HP must be a JSON object/);
    }
  });
});
