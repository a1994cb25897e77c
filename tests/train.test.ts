import { describe, expect, test } from "bun:test";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { evaluate, loadCache, parseFooter, prepareData } from "../prepare.ts";
import { initBackend } from "../lib/backend.ts";
import { loadCheckpoint, predictorFor } from "../lib/checkpoint.ts";
import { runScript, tempDir } from "./helpers.ts";

describe("train.ts end to end", () => {
  test("a short run on data/sample's photos ends with the footer and a checkpoint that predicts the same", async () => {
    const cache = tempDir();
    await prepareData({ task: "waste", source: "sample", cacheRoot: cache, log: () => {} });
    const ckpt = join(tempDir(), "ckpt");
    const r = runScript(["train.ts", "--budget", "12", "--checkpoint", ckpt], { AR_CACHE: cache });
    expect(r.out).toContain("step 00001");
    expect(r.code).toBe(0);
    const footer = parseFooter(r.out);
    for (const k of ["val_accuracy", "yield_mse", "combined_score", "training_seconds", "total_seconds", "peak_memory_mb", "num_steps", "num_params", "backend"]) {
      expect(footer[k]).toBeDefined();
    }
    expect(footer.backend).toContain("wasm");
    expect(Number(footer.num_steps)).toBeGreaterThan(2);
    expect(Number(footer.training_seconds)).toBeGreaterThanOrEqual(12);
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

    // A truncated weights file is a clear error naming the file.
    const w = readFileSync(join(ckpt, "weights.bin"));
    writeFileSync(join(ckpt, "weights.bin"), w.subarray(0, w.length - 8));
    await expect(loadCheckpoint(ckpt, ds)).rejects.toThrow(/weights\.bin.*truncated/);
  });

  test("train.ts --print-hp prints the HP block and its search space", () => {
    const r = runScript(["train.ts", "--print-hp"], {});
    expect(r.code).toBe(0);
    const parsed = JSON.parse(r.out.trim().split("\n").at(-1)!) as { HP: Record<string, unknown>; HP_SPACE: Record<string, unknown[]> };
    expect(Object.keys(parsed.HP).sort()).toEqual(Object.keys(parsed.HP_SPACE).sort());
    for (const [k, v] of Object.entries(parsed.HP)) expect(parsed.HP_SPACE[k]).toContain(v);
  });

  test("without a prepared dataset train.ts fails with a one-line reason", () => {
    const r = runScript(["train.ts", "--budget", "1"], { AR_CACHE: tempDir() });
    expect(r.code).not.toBe(0);
    expect(r.out).toContain("no prepared dataset");
  });
});
