/**
 * Benchmark: the frozen backbone's forward pass (what datasetFeatures and predict.ts pay per photo):
 * nsfwjs MobileNetV2 at 224×224, random pixels, on the wasm backend. On demand:
 *
 *   bun bench/features.ts [--batch 8] [--size 224] [--steps 10] [--backbone nsfwjs-mobilenetv2]
 *   bun bench/features.ts --serve --batch 8     # for bench/compare.ts --features 1,8
 *   bun bench/features.ts --profile --batch 8   # also a per-kernel breakdown of one batch (no read-backs)
 *
 * Prints `features backbone=... batch=8 size=224 ms_per_batch=... ms_per_image=...`. --serve speaks
 * train_step.ts's line protocol ("run K" -> "ms t1 .. tK", each a whole batch), so compare.ts times it
 * interleaved with torchvision's MobileNetV2 (bench/torch_peer.py --features). Threads: AR_WASM_THREADS.
 */
import * as tf from "@tensorflow/tfjs";
import { backendLabel, initBackend } from "../lib/backend.ts";
import { loadBackbone } from "../lib/backbones.ts";
import { median, profileStep } from "./train_step.ts";

const argv = process.argv.slice(2);
const opt = (name: string, fallback: string): string => {
  const i = argv.indexOf(name);
  return i >= 0 ? (argv[i + 1] ?? fallback) : fallback;
};
const batch = Number(opt("--batch", "8"));
const size = Number(opt("--size", "224"));
const steps = Number(opt("--steps", "10"));
const name = opt("--backbone", "nsfwjs-mobilenetv2");

await initBackend({ prefer: "wasm" });
const bb = await loadBackbone(name, { inputSize: size });
const x = tf.randomUniform([batch, size, size, 3], 0, 1, "float32", 1) as tf.Tensor4D;
/** One batch through the backbone, read back as the extraction does. */
const step = (): void => {
  const f = bb.features(x);
  f.dataSync();
  f.dispose();
};
for (let i = 0; i < 2; i++) step(); // kernel set-up, XNNPACK weight packing

const timeK = (k: number): number[] => Array.from({ length: k }, () => {
  const t0 = performance.now();
  step();
  return performance.now() - t0;
});

if (argv.includes("--serve")) {
  console.log(`ready ${backendLabel()} ${bb.id} batch ${batch}`);
  for await (const line of console) {
    const [cmd, arg] = line.trim().split(/\s+/);
    if (cmd === "run") console.log(`ms ${timeK(Math.max(1, Number(arg) || 1)).map((m) => m.toFixed(2)).join(" ")}`);
    else if (cmd === "quit") break;
  }
  process.exit(0);
}
const ms = median(timeK(steps));
if (argv.includes("--profile")) {
  const p = await profileStep(step);
  const total = p.kernels.reduce((sum, k) => sum + k.ms, 0);
  console.log(`profile batch=${batch} wall_ms=${p.wallMs.toFixed(1)} kernel_ms=${total.toFixed(1)}`);
  for (const k of p.kernels.slice(0, 10)) {
    console.log(`  ${k.name.padEnd(28)} ${k.ms.toFixed(1).padStart(7)} ms ${String(k.calls).padStart(4)} calls`);
  }
}
console.log(`features backbone=${bb.id} batch=${batch} size=${size} ms_per_batch=${ms.toFixed(1)} ` +
  `ms_per_image=${(ms / batch).toFixed(1)}  (${backendLabel()})`);
process.exit(0);
