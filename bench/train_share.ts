/**
 * Where `bun train.ts`'s budget goes: kernel time vs data (batching, augmentation) vs the rest (JS:
 * the engine's bookkeeping, autodiff, layers, Adam's per-variable ops). On demand:
 *
 *   bun bench/train_share.ts [--budget 300]      # any further flags go to train.ts
 *
 * Runs train.ts unchanged as a child with this file preloaded (`bun --preload`), which times every
 * top-level tfjs kernel call (Engine.runKernelFunc; kernels a kernel runs inside itself count once)
 * and the steps train.ts reports, from its third progress line (the first two steps compile and
 * allocate and are not in its budget) to its last. The data share is timed in the same process
 * after training: train.ts's batch function (augmentedBatch, lib/augment.ts) on the same dataset,
 * batch size and augmentation, median of 50 calls, times the steps; interleaved with it, the
 * two-pass formulation it replaced (flipAndShift(imageBatch(..)): a tensor, read back, remapped).
 * Prints `train_share steps=.. ms_per_step=.. kernel=..% data=..% js=..%` after train.ts's output.
 */
import * as tf from "@tensorflow/tfjs";

if (import.meta.main) {
  const child = Bun.spawn([process.execPath, "--preload", import.meta.path, "train.ts", ...process.argv.slice(2)], {
    cwd: `${import.meta.dir}/..`, env: { ...process.env, AR_TRAIN_SHARE: "1" }, stdout: "inherit", stderr: "inherit",
  });
  process.exit(await child.exited);
} else if (process.env.AR_TRAIN_SHARE === "1") {
  const engine = tf.engine() as unknown as { runKernelFunc: (...a: unknown[]) => unknown };
  const original = engine.runKernelFunc;
  let depth = 0, kernelMs = 0;
  engine.runKernelFunc = function (this: unknown, ...a: unknown[]) {
    if (depth++ > 0) try { return original.apply(this, a); } finally { depth--; }
    const t0 = performance.now();
    try { return original.apply(this, a); } finally { kernelMs += performance.now() - t0; depth--; }
  };
  // Snapshots at train.ts's progress lines: "step 00003 | epoch 0 | ..."
  const marks: { step: number; t: number; kernelMs: number }[] = [];
  let batchSize = 32, hp: { flip: boolean; shift: number } = { flip: true, shift: 4 };
  const log = console.log;
  console.log = (...args: unknown[]) => {
    const line = args.map(String).join(" ");
    const m = /^step (\d+) \|/.exec(line);
    if (m != null && Number(m[1]) >= 3) marks.push({ step: Number(m[1]), t: performance.now(), kernelMs });
    const h = /hp: (\{.*\})$/.exec(line);
    if (h != null) {
      const parsed = JSON.parse(h[1]!) as { batchSize: number; flip: boolean; shift: number };
      batchSize = parsed.batchSize;
      hp = parsed;
    }
    log(...args);
    if (line.startsWith("training_seconds:")) void report();
  };
  const report = async () => {
    const [first, last] = [marks[0], marks.at(-1)];
    if (first == null || last == null || last.step === first.step) return log("train_share: too few steps to measure");
    const { imageBatch, loadCache } = await import("../prepare.ts");
    const { augmentedBatch, flipAndShift } = await import("../lib/augment.ts");
    const ds = await loadCache();
    let seed = 1;
    const rand = () => ((seed = (seed * 1664525 + 1013904223) >>> 0) / 2 ** 32);
    const ms: number[] = [], twoPass: number[] = [];
    for (let i = 0; i < 53; i++) {
      const rows = Array.from({ length: batchSize }, (_, k) => ds.train[(i * batchSize + k) % ds.train.length]!);
      const t0 = performance.now();
      tf.dispose(augmentedBatch(ds, rows, hp, rand));
      const t1 = performance.now();
      tf.dispose(flipAndShift(imageBatch(ds, rows), hp, rand));
      if (i >= 3) [ms.push(t1 - t0), twoPass.push(performance.now() - t1)];
    }
    [ms, twoPass].forEach((a) => a.sort((x, y) => x - y));
    const steps = last.step - first.step;
    const wall = last.t - first.t, kernel = last.kernelMs - first.kernelMs;
    const data = Math.min(wall - kernel, steps * ms[ms.length >> 1]!);
    const pct = (x: number) => `${((100 * x) / wall).toFixed(1)}%`;
    log(`train_share steps=${steps} ms_per_step=${(wall / steps).toFixed(1)} kernel=${pct(kernel)} ` +
      `data=${pct(data)} js=${pct(wall - kernel - data)} (data_ms_per_batch=${ms[ms.length >> 1]!.toFixed(2)}, ` +
      `two-pass formulation ${twoPass[twoPass.length >> 1]!.toFixed(2)}; ` +
      `from train.ts's progress lines ${first.step}..${last.step})`);
  };
}
