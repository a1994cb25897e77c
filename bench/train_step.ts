/**
 * Benchmark: images/s for one training step (forward + backward + Adam) of
 * the baseline CNN, on every tfjs backend that loads here. Run on demand:
 *
 *   bun bench/train_step.ts [--backends wasm,cpu] [--steps 10] [--warmup 3]
 *                           [--cpu-steps 1] [--batch 32] [--size 64]
 *                           [--no-profile] [--spec-json]
 *
 * Prints one line per backend:
 *   train_step backend=wasm batch=32 size=64 ms_per_step=... images_per_s=...
 * and a tf.profile breakdown of one wasm step (top kernels by time).
 *
 * The model is described by a plain BaselineSpec (print it with --spec-json)
 * and the timing/reporting (measureSteps, formatLine) takes any step closure,
 * so a PyTorch (or other) run of the same spec can be timed and printed the
 * same way.
 */
import * as tf from "@tensorflow/tfjs";
import { backendLabel, initBackend, parseBackendName, type BackendName } from "../lib/backend.ts";

// ---------------------------------------------------------------------------
// The workload, as data.

export interface BaselineSpec {
  batch: number;
  /** Square input images, size x size x 3. */
  size: number;
  /** One block per entry: conv3x3(same, no bias) + batchnorm + relu + maxpool2. */
  channels: number[];
  /** Hidden dense units after global average pooling. */
  dense: number;
  /** Classification head width (softmax cross-entropy). */
  classes: number;
  /** Regression head: 1 unit, MSE; the two losses are summed. */
  lr: number;
}

export const BASELINE: BaselineSpec = { batch: 32, size: 64, channels: [16, 32, 64], dense: 64, classes: 3, lr: 1e-3 };

/** Functional model with two outputs: [class logits, regression]. */
export function buildBaseline(spec: BaselineSpec): tf.LayersModel {
  const input = tf.input({ shape: [spec.size, spec.size, 3] });
  let h: tf.SymbolicTensor = input;
  for (const c of spec.channels) {
    h = tf.layers.conv2d({ filters: c, kernelSize: 3, padding: "same", useBias: false }).apply(h) as tf.SymbolicTensor;
    h = tf.layers.batchNormalization().apply(h) as tf.SymbolicTensor;
    h = tf.layers.reLU().apply(h) as tf.SymbolicTensor;
    h = tf.layers.maxPooling2d({ poolSize: 2 }).apply(h) as tf.SymbolicTensor;
  }
  h = tf.layers.globalAveragePooling2d({}).apply(h) as tf.SymbolicTensor;
  h = tf.layers.dense({ units: spec.dense, activation: "relu" }).apply(h) as tf.SymbolicTensor;
  const logits = tf.layers.dense({ units: spec.classes, name: "class_logits" }).apply(h) as tf.SymbolicTensor;
  const reg = tf.layers.dense({ units: 1, name: "regression" }).apply(h) as tf.SymbolicTensor;
  return tf.model({ inputs: input, outputs: [logits, reg] });
}

export interface Batch {
  x: tf.Tensor4D;
  yClass: tf.Tensor2D;
  yReg: tf.Tensor2D;
}

/** Synthetic batch; content does not matter for timing, only shapes. */
export function syntheticBatch(spec: BaselineSpec): Batch {
  return tf.tidy(() => ({
    x: tf.randomUniform([spec.batch, spec.size, spec.size, 3], 0, 1, "float32", 1) as tf.Tensor4D,
    yClass: tf.oneHot(tf.tensor1d(Array.from({ length: spec.batch }, (_, i) => i % spec.classes), "int32"), spec.classes).toFloat() as tf.Tensor2D,
    yReg: tf.randomNormal([spec.batch, 1], 0, 1, "float32", 2) as tf.Tensor2D,
  }));
}

/**
 * Returns a closure doing one full step (forward, both losses, backward,
 * Adam update) and returning the loss as a number, which also forces the
 * step to complete on asynchronous backends.
 */
export function makeTrainStep(model: tf.LayersModel, spec: BaselineSpec, batch: Batch): () => number {
  const optimizer = tf.train.adam(spec.lr);
  const vars = model.trainableWeights.map((w) => w.read());
  const isVariable = (t: tf.Tensor): t is tf.Variable => t instanceof tf.Variable;
  const varList = vars.filter(isVariable);
  return () => {
    const cost = optimizer.minimize(
      () => {
        const out = model.apply(batch.x, { training: true });
        if (!Array.isArray(out) || out.length !== 2) throw new Error("baseline model must have two outputs");
        const [logits, reg] = out;
        if (!(logits instanceof tf.Tensor) || !(reg instanceof tf.Tensor)) throw new Error("model.apply returned symbolic tensors");
        return tf.add(tf.losses.softmaxCrossEntropy(batch.yClass, logits), tf.losses.meanSquaredError(batch.yReg, reg)) as tf.Scalar;
      },
      true,
      varList,
    );
    if (cost == null) throw new Error("optimizer.minimize returned no cost");
    const loss = cost.dataSync()[0];
    cost.dispose();
    return loss;
  };
}

// ---------------------------------------------------------------------------
// Timing and reporting, independent of the framework.

export interface StepStats {
  msPerStep: number;
  imagesPerS: number;
  samplesMs: number[];
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 === 1 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** Runs warmup untimed steps, then `steps` timed ones; median ms per step. */
export async function measureSteps(
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

export function formatLine(backend: string, spec: BaselineSpec, s: StepStats): string {
  return `train_step backend=${backend} batch=${spec.batch} size=${spec.size} ms_per_step=${s.msPerStep.toFixed(1)} images_per_s=${s.imagesPerS.toFixed(1)}`;
}

/** Kernel time per kernel name for one step, largest first. */
export async function profileStep(step: () => unknown): Promise<{ wallMs: number; kernels: { name: string; ms: number; calls: number }[] }> {
  const t0 = performance.now();
  const info = await tf.profile(() => {
    step();
  });
  const wallMs = performance.now() - t0;
  const byName = new Map<string, { ms: number; calls: number }>();
  const backend = tf.getBackend();
  for (const k of info.kernels) {
    // tf.profile also lists customGrad scopes (e.g. "fusedConv2d__op") whose
    // time already includes the kernels they ran; keep real kernels only.
    if (tf.getKernel(k.name, backend) == null) continue;
    const ms = typeof k.kernelTimeMs === "number" ? k.kernelTimeMs : 0;
    const e = byName.get(k.name) ?? { ms: 0, calls: 0 };
    e.ms += ms;
    e.calls += 1;
    byName.set(k.name, e);
  }
  const kernels = [...byName].map(([name, e]) => ({ name, ...e })).sort((a, b) => b.ms - a.ms);
  return { wallMs, kernels };
}

// ---------------------------------------------------------------------------
// CLI

interface Args {
  backends: BackendName[];
  steps: number;
  warmup: number;
  cpuSteps: number;
  profile: boolean;
  specJson: boolean;
  spec: BaselineSpec;
}

function parseArgs(argv: string[]): Args {
  const a: Args = { backends: ["wasm", "cpu"], steps: 10, warmup: 3, cpuSteps: 1, profile: true, specJson: false, spec: { ...BASELINE } };
  const num = (i: number): number => {
    const v = Number(argv[i + 1]);
    if (!Number.isFinite(v) || v < 0) throw new Error(`${argv[i]} needs a non-negative number`);
    return v;
  };
  for (let i = 0; i < argv.length; i++) {
    switch (argv[i]) {
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
      case "--batch": a.spec.batch = num(i++); break;
      case "--size": a.spec.size = num(i++); break;
      case "--no-profile": a.profile = false; break;
      case "--spec-json": a.specJson = true; break;
      default: throw new Error(`unknown argument ${argv[i]}`);
    }
  }
  return a;
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  if (args.specJson) {
    console.log(JSON.stringify(args.spec));
    return;
  }
  for (const b of args.backends) {
    try {
      await initBackend({ prefer: b });
    } catch (e) {
      console.log(`train_step backend=${b} skipped: ${e instanceof Error ? e.message : String(e)}`);
      continue;
    }
    // cpu is so slow (~1 min per step here) that warm-up is pointless and
    // one timed step is already a long wait.
    const slow = b === "cpu";
    const steps = slow ? args.cpuSteps : args.steps;
    if (steps === 0) continue;
    const model = buildBaseline(args.spec);
    const batch = syntheticBatch(args.spec);
    const trainStep = makeTrainStep(model, args.spec, batch);
    const losses: number[] = [];
    const step = (): void => {
      losses.push(trainStep());
    };
    // The first step also creates Adam's slot variables: never time it, except
    // on cpu where one step is ~1 min and that overhead is noise.
    if (!slow) step();
    const stats = await measureSteps(step, { warmup: slow ? 0 : args.warmup, steps, batch: args.spec.batch });
    const lossInfo = `loss ${losses[0].toFixed(3)} -> ${losses[losses.length - 1].toFixed(3)}`;
    console.log(`${formatLine(b, args.spec, stats)}  (${backendLabel()}; samples ms: ${stats.samplesMs.map((m) => m.toFixed(0)).join(" ")}; ${lossInfo})`);
    if (args.profile && b === "wasm") {
      const p = await profileStep(step);
      const total = p.kernels.reduce((s, k) => s + k.ms, 0);
      console.log(`profile backend=wasm wall_ms=${p.wallMs.toFixed(1)} kernel_ms=${total.toFixed(1)} (rest is JS/engine overhead, incl. profiling itself)`);
      for (const k of p.kernels.slice(0, 15)) {
        console.log(`  ${k.name.padEnd(36)} ${k.ms.toFixed(1).padStart(8)} ms  ${String(k.calls).padStart(4)} calls  ${((100 * k.ms) / total).toFixed(1).padStart(5)}%`);
      }
    }
    tf.dispose([batch.x, batch.yClass, batch.yReg]);
    model.dispose();
  }
}

if (import.meta.main) await main();
