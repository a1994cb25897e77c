/**
 * Benchmark: images/s for one training step (forward + backward + Adam) of
 * the baseline CNN (train.ts's model) and of a MobileNet-style depthwise
 * model, at batch 32 and 64×64, on every tfjs backend that loads. On demand:
 *
 *   bun bench/train_step.ts [--models baseline,mobilenet] [--backends wasm,cpu]
 *                           [--steps 10] [--warmup 3] [--cpu-steps 1]
 *                           [--batch 32] [--size 64] [--no-profile] [--profile-steps 5] [--top 12] [--by-shape]
 *                           [--before] [--spec-json] [--poll-ab 0,2000]
 *
 * Prints one line per (model, backend):
 *   train_step model=baseline backend=wasm batch=32 size=64 ms_per_step=... images_per_s=...
 * and a per-kernel breakdown of wasm steps per model (top kernels by time, each the median over
 * --profile-steps profiled steps; with --by-shape one line per kernel and shape of its first input).
 * Thread count of the wasm backend: AR_WASM_THREADS (default: all cores).
 * --before runs with the CPU speed work switched off (tfjs' own kernels plus
 * the XNNPACK gradient composites, input gradients of the first conv kept):
 * with AR_WASM_THREADS=1, the "before" column of bench/README.md.
 * --poll-ab A,B times how long our pool's threads poll before they sleep (lib/wasm_simd/pool_layout.ts
 * POLL_US), A against B microseconds, in one process: the timed steps alternate between the two in
 * blocks of 4 (A B B A ...), and a line `poll_ab` gives each one's median ms per step and B's over A's.
 *
 * The models are plain data (ModelSpec; print them with --spec-json), so
 * bench/torch_peer.py builds the very same layers in PyTorch, and
 * bench/compare.ts times both sides interleaved in one invocation through
 * --serve (a line protocol on stdin/stdout: "run K" -> "ms t1 t2 ... tK").
 */
import * as tf from "@tensorflow/tfjs";
import { adam } from "../lib/adam.ts";
import { batchNorm, bnReluPool } from "../lib/batchnorm.ts";
import { backendLabel, initBackend, parseBackendName, type BackendName, type WasmPool } from "../lib/backend.ts";
import {
  inputConvFilters, registerWasmGradKernels, setSimdKernelsEnabled, withoutInputGradients,
} from "../lib/wasm_kernels.ts";
import { setSimdPoolPoll } from "../lib/wasm_simd/index.ts";

// ---------------------------------------------------------------------------
// The workloads, as data.

type LayerSpec =
  | { type: "conv"; filters: number; kernel: number; stride: number }
  | { type: "dwconv"; kernel: number; stride: number }
  | { type: "bn" }
  | { type: "relu" }
  | { type: "maxpool"; size: number };

interface ModelSpec {
  name: string;
  batch: number;
  /** Square input images, size x size x 3, channels last. */
  size: number;
  /** Convs are 'same'-padded without bias; batchnorm eps 1e-3. Then global average pooling. */
  layers: LayerSpec[];
  /** Hidden dense units (relu) after global average pooling. */
  dense: number;
  /** Classification head width (softmax cross-entropy) + a 1-unit regression head (MSE); losses summed. */
  classes: number;
  lr: number;
}

const block = (filters: number): LayerSpec[] => [
  { type: "conv", filters, kernel: 3, stride: 1 }, { type: "bn" }, { type: "relu" }, { type: "maxpool", size: 2 },
];
const separable = (filters: number, stride: number): LayerSpec[] => [
  { type: "dwconv", kernel: 3, stride }, { type: "bn" }, { type: "relu" },
  { type: "conv", filters, kernel: 1, stride: 1 }, { type: "bn" }, { type: "relu" },
];

/** train.ts's default CNN (width 16, depth 3): 3 x [conv3x3 -> batchnorm -> relu -> maxpool], ~28k parameters. */
const BASELINE: ModelSpec = {
  name: "baseline", batch: 32, size: 64, layers: [...block(16), ...block(32), ...block(64)],
  dense: 64, classes: 3, lr: 1e-3,
};

/** MobileNet-v1 style: a strided stem, then depthwise-separable blocks. */
const MOBILENET: ModelSpec = {
  name: "mobilenet", batch: 32, size: 64,
  layers: [
    { type: "conv", filters: 16, kernel: 3, stride: 2 }, { type: "bn" }, { type: "relu" },
    ...separable(32, 1), ...separable(64, 2), ...separable(64, 1), ...separable(128, 2), ...separable(128, 1),
  ],
  dense: 64, classes: 3, lr: 1e-3,
};

const MODELS: Record<string, ModelSpec> = { baseline: BASELINE, mobilenet: MOBILENET };

/** Functional model with two outputs: [class logits, regression]. */
/**
 * `before`: tfjs' own batchnorm, ReLU and max-pool layers, as before the speed work (else lib/batchnorm.ts's,
 * as train.ts: bnReluPool for a batchnorm → ReLU → 2×2 max-pool run).
 */
function buildModel(spec: ModelSpec, before: boolean): tf.LayersModel {
  const input = tf.input({ shape: [spec.size, spec.size, 3] });
  let h: tf.SymbolicTensor = input;
  const apply = (layer: tf.layers.Layer) => { h = layer.apply(h) as tf.SymbolicTensor; };
  for (let i = 0; i < spec.layers.length; i++) {
    const l = spec.layers[i]!;
    const [next, after] = [spec.layers[i + 1], spec.layers[i + 2]];
    if (!before && l.type === "bn" && next?.type === "relu" && after?.type === "maxpool" && after.size === 2) {
      apply(bnReluPool({ epsilon: 1e-3 })); // as train.ts: the block's tail as one layer
      i += 2;
      continue;
    }
    switch (l.type) {
      case "conv":
        apply(tf.layers.conv2d({
          filters: l.filters, kernelSize: l.kernel, strides: l.stride, padding: "same", useBias: false,
        }));
        break;
      case "dwconv":
        apply(tf.layers.depthwiseConv2d({ kernelSize: l.kernel, strides: l.stride, padding: "same", useBias: false }));
        break;
      case "bn": apply((before ? tf.layers.batchNormalization : batchNorm)({ epsilon: 1e-3 })); break;
      case "relu": apply(tf.layers.reLU()); break;
      case "maxpool": apply(tf.layers.maxPooling2d({ poolSize: l.size })); break;
    }
  }
  apply(tf.layers.globalAveragePooling2d({}));
  apply(tf.layers.dense({ units: spec.dense, activation: "relu" }));
  const features = h;
  const logits = tf.layers.dense({ units: spec.classes, name: "class_logits" }).apply(features) as tf.SymbolicTensor;
  const reg = tf.layers.dense({ units: 1, name: "regression" }).apply(features) as tf.SymbolicTensor;
  return tf.model({ inputs: input, outputs: [logits, reg] });
}

interface Batch {
  x: tf.Tensor4D;
  yClass: tf.Tensor2D;
  yReg: tf.Tensor2D;
}

/** Synthetic batch; content does not matter for timing, only shapes. */
function syntheticBatch(spec: ModelSpec): Batch {
  const labels = Array.from({ length: spec.batch }, (_, i) => i % spec.classes);
  return tf.tidy(() => ({
    x: tf.randomUniform([spec.batch, spec.size, spec.size, 3], 0, 1, "float32", 1) as tf.Tensor4D,
    yClass: tf.oneHot(tf.tensor1d(labels, "int32"), spec.classes).toFloat() as tf.Tensor2D,
    yReg: tf.randomNormal([spec.batch, 1], 0, 1, "float32", 2) as tf.Tensor2D,
  }));
}

/**
 * Returns a closure doing one full step (forward, both losses, backward,
 * Adam update) and returning the loss as a number, which also forces the
 * step to complete on asynchronous backends.
 */
function makeTrainStep(
  model: tf.LayersModel, spec: ModelSpec, batch: Batch, opts: { skipInputGrad?: boolean } = {},
): () => number {
  const optimizer = adam(spec.lr); // tfjs' Adam, fused where the SIMD kernels run (not in --before)
  const vars = model.trainableWeights.map((w) => w.read());
  const isVariable = (t: tf.Tensor): t is tf.Variable => t instanceof tf.Variable;
  const varList = vars.filter(isVariable);
  // no input gradient for the first conv (its input is the image batch), as train.ts does
  const skip = opts.skipInputGrad ?? true ? inputConvFilters(model) : [];
  return () => {
    const cost = withoutInputGradients(skip, () => optimizer.minimize(
      () => {
        const out = model.apply(batch.x, { training: true });
        if (!Array.isArray(out) || out.length !== 2) throw new Error("bench model must have two outputs");
        const [logits, reg] = out;
        if (!(logits instanceof tf.Tensor) || !(reg instanceof tf.Tensor)) {
          throw new Error("model.apply returned symbolic tensors");
        }
        const classLoss = tf.losses.softmaxCrossEntropy(batch.yClass, logits);
        return tf.add(classLoss, tf.losses.meanSquaredError(batch.yReg, reg)) as tf.Scalar;
      },
      true,
      varList,
    ));
    if (cost == null) throw new Error("optimizer.minimize returned no cost");
    const loss = cost.dataSync()[0];
    cost.dispose();
    return loss;
  };
}

/** Switches the CPU speed work off ("before") or on again ("after"), for A/B runs in one process. */
function setSpeedWork(on: boolean): void {
  setSimdKernelsEnabled(on);
  registerWasmGradKernels({ simdKernels: on });
}

// ---------------------------------------------------------------------------
// Timing and reporting, independent of the framework.

interface StepStats {
  msPerStep: number;
  imagesPerS: number;
  samplesMs: number[];
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 === 1 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** Runs warmup untimed steps, then `steps` timed ones; median ms per step. */
async function measureSteps(
  step: () => unknown | Promise<unknown>,
  opts: { warmup: number; steps: number; batch: number },
): Promise<StepStats> {
  for (let i = 0; i < opts.warmup; i++) await step();
  const samplesMs: number[] = [];
  for (let i = 0; i < opts.steps; i++) {
    const t0 = performance.now();
    await step();
    samplesMs.push(performance.now() - t0);
  }
  const msPerStep = median(samplesMs);
  return { msPerStep, imagesPerS: (opts.batch * 1000) / msPerStep, samplesMs };
}

/** --poll-ab: `steps` timed steps alternating between two poll times in blocks of 4, after `warmup` untimed. */
async function pollAb(step: () => unknown, [a, b]: [number, number], warmup: number, steps: number): Promise<void> {
  for (let i = 0; i < warmup; i++) step();
  const ms: [number[], number[]] = [[], []];
  for (let i = 0; i < steps; i++) {
    const side = [0, 1, 1, 0][Math.floor(i / 4) % 4]!; // A B B A: neither side is always the later one
    setSimdPoolPoll(side === 0 ? a : b);
    const t0 = performance.now();
    step();
    ms[side]!.push(performance.now() - t0);
  }
  setSimdPoolPoll(undefined);
  const [ma, mb] = [median(ms[0]), median(ms[1])];
  console.log(`poll_ab steps=${steps} poll_${a}us_ms=${ma.toFixed(2)} poll_${b}us_ms=${mb.toFixed(2)} ` +
    `b_over_a=${(mb / ma).toFixed(3)}`);
}

function formatLine(model: string, backend: string, spec: ModelSpec, s: StepStats): string {
  return `train_step model=${model} backend=${backend} batch=${spec.batch} size=${spec.size} ` +
    `ms_per_step=${s.msPerStep.toFixed(1)} images_per_s=${s.imagesPerS.toFixed(1)}`;
}

/** Kernel time per kernel name for one step, largest first. */
export interface KernelTime { name: string; ms: number; calls: number }

/**
 * Times one step kernel by kernel: every kernel registered for the active backend is wrapped with a clock
 * for the length of the step, then restored. tf.profile is not used: it reads back every kernel's output,
 * which on wasm costs more than many of the kernels it times. A kernel that runs other kernels (the
 * composite gradients) counts once, with everything inside it; the step's wall time minus the kernels'
 * is JS and engine overhead.
 */
export async function profileStep(
  step: () => unknown, byShape = false,
): Promise<{ wallMs: number; kernels: KernelTime[] }> {
  const backend = tf.getBackend();
  const byName = new Map<string, { ms: number; calls: number }>();
  const originals = tf.getKernelsForBackend(backend);
  let depth = 0;
  for (const k of originals) {
    tf.unregisterKernel(k.kernelName, backend);
    tf.registerKernel({
      ...k,
      kernelFunc: (args) => {
        if (depth > 0) return k.kernelFunc(args);
        depth++;
        const t0 = performance.now();
        try {
          return k.kernelFunc(args);
        } finally {
          depth--;
          const first = Object.values(args.inputs)[0];
          const key = byShape ? `${k.kernelName} ${first?.shape.join("x")}` : k.kernelName;
          const e = byName.get(key) ?? { ms: 0, calls: 0 };
          e.ms += performance.now() - t0;
          e.calls += 1;
          byName.set(key, e);
        }
      },
    });
  }
  const t0 = performance.now();
  try {
    await step();
  } finally {
    for (const k of originals) {
      tf.unregisterKernel(k.kernelName, backend);
      tf.registerKernel(k);
    }
  }
  const wallMs = performance.now() - t0;
  const kernels = [...byName].map(([name, e]) => ({ name, ...e })).sort((a, b) => b.ms - a.ms);
  return { wallMs, kernels };
}

/**
 * profileStep over `steps` steps, each kernel's time the median over the steps: one step's profile is
 * at the mercy of one garbage-collection pause or one late thread, which lands on a random kernel.
 */
export async function profileSteps(
  step: () => unknown, steps: number, byShape = false,
): Promise<{ wallMs: number; kernelMs: number; kernels: KernelTime[] }> {
  const runs: Awaited<ReturnType<typeof profileStep>>[] = [];
  for (let i = 0; i < steps; i++) runs.push(await profileStep(step, byShape));
  const names = new Set(runs.flatMap((r) => r.kernels.map((k) => k.name)));
  const kernels = [...names].map((name) => {
    const per = runs.map((r) => r.kernels.find((k) => k.name === name) ?? { name, ms: 0, calls: 0 });
    return { name, ms: median(per.map((k) => k.ms)), calls: median(per.map((k) => k.calls)) };
  }).sort((a, b) => b.ms - a.ms);
  const kernelMs = median(runs.map((r) => r.kernels.reduce((s, k) => s + k.ms, 0)));
  return { wallMs: median(runs.map((r) => r.wallMs)), kernelMs, kernels };
}

// ---------------------------------------------------------------------------
// CLI

interface Args {
  models: string[];
  backends: BackendName[];
  steps: number;
  warmup: number;
  cpuSteps: number;
  profile: boolean;
  /** Steps profiled (each kernel's median over them) and kernels listed. */
  profileSteps: number;
  top: number;
  /** Profile lines per kernel and shape of its first input. */
  byShape: boolean;
  specJson: boolean;
  serve: boolean;
  before: boolean;
  /** Pool poll times (µs) to time against each other in one process: [A, B]. */
  pollAb?: [number, number];
  batch?: number;
  size?: number;
}

function parseArgs(argv: string[]): Args {
  const a: Args = {
    models: ["baseline", "mobilenet"], backends: ["wasm", "cpu"], steps: 10, warmup: 3, cpuSteps: 1, profile: true,
    profileSteps: 5, top: 12, byShape: false, specJson: false, serve: false, before: false,
  };
  const num = (i: number): number => {
    const v = Number(argv[i + 1]);
    if (!Number.isFinite(v) || v < 0) throw new Error(`${argv[i]} needs a non-negative number`);
    return v;
  };
  for (let i = 0; i < argv.length; i++) {
    switch (argv[i]) {
      case "--models":
      case "--model":
        a.models = (argv[++i] ?? "").split(",").filter(Boolean);
        for (const m of a.models) {
          if (MODELS[m] == null) throw new Error(`unknown model '${m}' (${Object.keys(MODELS).join(", ")})`);
        }
        break;
      case "--backends":
        a.backends = (argv[++i] ?? "").split(",").map((s) => {
          const b = parseBackendName(s);
          if (b == null) throw new Error(`unknown backend '${s}'`);
          return b;
        });
        break;
      case "--steps": a.steps = num(i++); break;
      case "--warmup": a.warmup = num(i++); break;
      case "--cpu-steps": a.cpuSteps = num(i++); break;
      case "--batch": a.batch = num(i++); break;
      case "--size": a.size = num(i++); break;
      case "--no-profile": a.profile = false; break;
      case "--profile-steps": a.profileSteps = Math.max(1, num(i++)); break;
      case "--top": a.top = num(i++); break;
      case "--by-shape": a.byShape = true; break;
      case "--poll-ab": {
        const us = (argv[++i] ?? "").split(",").map(Number);
        if (us.length !== 2 || !us.every((u) => Number.isInteger(u) && u >= 0)) {
          throw new Error("--poll-ab needs two whole numbers of microseconds, e.g. 0,2000");
        }
        a.pollAb = [us[0]!, us[1]!];
        break;
      }
      case "--spec-json": a.specJson = true; break;
      case "--serve": a.serve = true; break;
      case "--before": a.before = true; break;
      default: throw new Error(`unknown argument ${argv[i]}`);
    }
  }
  return a;
}

function specFor(args: Args, name: string): ModelSpec {
  const base = MODELS[name]!;
  return { ...base, batch: args.batch ?? base.batch, size: args.size ?? base.size };
}

/** The pool train.ts uses from scratch (lib/run.ts); tfjs' own kernels (--before) keep tfjs' pool. */
function poolFor(args: Args): WasmPool {
  return args.before ? "xnnpack" : "simd";
}

/**
 * --serve: one model on one backend, kept warm; reads "run K" lines and
 * answers "ms t1 ... tK" (per-step wall ms). "info" answers the backend label.
 */
async function serve(args: Args): Promise<void> {
  const backend = args.backends[0] ?? "wasm";
  await initBackend({ prefer: backend, wasmPool: poolFor(args) });
  if (args.before) setSpeedWork(false);
  const spec = specFor(args, args.models[0] ?? "baseline");
  const model = buildModel(spec, args.before);
  const batch = syntheticBatch(spec);
  const step = makeTrainStep(model, spec, batch, { skipInputGrad: !args.before });
  for (let i = 0; i < 1 + args.warmup; i++) step(); // Adam's slots, kernel set-up
  console.log(`ready ${backendLabel()}${args.before ? " before" : ""}`);
  for await (const line of console) {
    const [cmd, arg] = line.trim().split(/\s+/);
    if (cmd === "run") {
      const k = Math.max(1, Number(arg) || 1);
      const ms: number[] = [];
      for (let i = 0; i < k; i++) {
        const t0 = performance.now();
        step();
        ms.push(performance.now() - t0);
      }
      console.log(`ms ${ms.map((m) => m.toFixed(2)).join(" ")}`);
    } else if (cmd === "quit") {
      break;
    } else if (cmd !== "") {
      console.log(`error unknown command ${cmd}`);
    }
  }
  process.exit(0);
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  if (args.specJson) {
    const specs = args.models.map((m) => specFor(args, m));
    console.log(JSON.stringify(specs.length === 1 ? specs[0] : specs));
    return;
  }
  if (args.serve) return serve(args);
  for (const b of args.backends) {
    try {
      await initBackend({ prefer: b, wasmPool: poolFor(args) });
    } catch (e) {
      console.log(`train_step backend=${b} skipped: ${e instanceof Error ? e.message : String(e)}`);
      continue;
    }
    if (args.before && b === "wasm") setSpeedWork(false);
    for (const name of args.models) {
      // cpu is so slow (bench/README.md) that warm-up is pointless and one
      // timed step is already a long wait.
      const slow = b === "cpu";
      const steps = slow ? args.cpuSteps : args.steps;
      if (steps === 0) continue;
      const spec = specFor(args, name);
      const model = buildModel(spec, args.before);
      const batch = syntheticBatch(spec);
      const trainStep = makeTrainStep(model, spec, batch, { skipInputGrad: !args.before });
      const losses: number[] = [];
      const step = (): void => {
        losses.push(trainStep());
      };
      // The first step also creates Adam's slot variables: never time it, except
      // on cpu where one step is so long that this overhead is noise.
      if (!slow) step();
      if (args.pollAb != null && b === "wasm") await pollAb(step, args.pollAb, args.warmup, steps);
      const stats = await measureSteps(step, { warmup: slow ? 0 : args.warmup, steps, batch: spec.batch });
      const lossInfo = `loss ${losses[0].toFixed(3)} -> ${losses[losses.length - 1].toFixed(3)}`;
      const range = `min ${Math.min(...stats.samplesMs).toFixed(0)} max ${Math.max(...stats.samplesMs).toFixed(0)}`;
      const label = `${backendLabel()}${args.before ? ", before" : ""}`;
      console.log(`${formatLine(name, b, spec, stats)}  (${label}; ms ${range}; ${lossInfo})`);
      if (args.profile && b === "wasm") {
        const p = await profileSteps(step, args.profileSteps, args.byShape);
        const total = p.kernelMs;
        console.log(`profile model=${name} backend=wasm steps=${args.profileSteps} wall_ms=${p.wallMs.toFixed(1)} ` +
          `kernel_ms=${total.toFixed(1)} js_ms=${(p.wallMs - total).toFixed(1)} (medians over the steps)`);
        for (const k of p.kernels.slice(0, args.top)) {
          const [ms, calls] = [k.ms.toFixed(1).padStart(8), String(k.calls).padStart(4)];
          const share = ((100 * k.ms) / total).toFixed(1).padStart(5);
          console.log(`  ${k.name.padEnd(36)} ${ms} ms  ${calls} calls  ${share}%`);
        }
      }
      tf.dispose([batch.x, batch.yClass, batch.yReg]);
      model.dispose();
    }
    if (args.before && b === "wasm") setSpeedWork(true);
  }
}

if (import.meta.main) await main();
