/**
 * train.ts — the one file the research loop edits. Model, optimizer, augmentation, training loop.
 *
 *   bun train.ts                 # train for prepare.TIME_BUDGET seconds on the active dataset
 *   bun train.ts --budget 20     # a short run
 *   bun train.ts --print-hp      # print HP and HP_SPACE as JSON (the built-in proposer reads it)
 *   AR_HP='{"backbone":"nsfwjs-mobilenetv2"}' bun train.ts   # override HP keys for one run (validated)
 *
 * HP.backbone picks the model: "none" trains the CNN below from scratch on the cached 64×64 pixels;
 * a backbone name (lib/backbones.ts) trains a small head on that frozen pretrained network's
 * features, computed once from the original photos at HP.backboneSize and cached next to the image
 * cache (before the training timer starts; `feature_seconds:` says how long that took).
 * It ends with the footer (val_accuracy: … backend: …) and a checkpoint in checkpoints/latest/
 * (or --checkpoint DIR). The loop does not trust the footer: it re-measures the checkpoint with
 * prepare.ts's evaluate().
 */
import { type } from "arktype";
import { cac } from "cac";
import * as tf from "@tensorflow/tfjs";
import {
  TIME_BUDGET, describeDataset, evaluate, imageBatch, loadCache, peakMemoryMb, printFooter, trainBatches,
  type Dataset, type Predictor,
} from "./prepare.ts";
import { initBackend, backendLabel } from "./lib/backend.ts";
import { inputConvFilters, withoutInputGradients } from "./lib/wasm_kernels.ts";
import { saveCheckpoint } from "./lib/checkpoint.ts";
import {
  BACKBONE_NAMES, backbonePredictor, datasetFeatures, describeBackbone, featureRows, loadBackbone, type FeatureCache,
} from "./lib/backbones.ts";

// ---------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------

/**
 * A small VGG-style CNN: [conv3x3 → batchnorm → relu → maxpool] × depth, then two heads. With
 * `featureDim` (a frozen backbone) the input is that feature vector instead: dropout → the heads.
 */
export function buildModel(ds: Dataset, hp: HyperParams, featureDim: number | null): { train: tf.LayersModel; infer: tf.LayersModel } {
  const input = tf.input({ shape: featureDim === null ? [ds.imageSize, ds.imageSize, 3] : [featureDim] });
  let x: tf.SymbolicTensor = input;
  if (featureDim === null) {
    for (let block = 0; block < hp.depth; block++) {
      const filters = hp.width * 2 ** block;
      // useBias: false — batchnorm's beta does the bias's job, one less gradient per layer.
      x = tf.layers.conv2d({ filters, kernelSize: 3, padding: "same", useBias: false, kernelInitializer: "heNormal" }).apply(x) as tf.SymbolicTensor;
      x = tf.layers.batchNormalization({ momentum: 0.9 }).apply(x) as tf.SymbolicTensor;
      x = tf.layers.reLU().apply(x) as tf.SymbolicTensor;
      x = tf.layers.maxPooling2d({ poolSize: 2 }).apply(x) as tf.SymbolicTensor;
    }
    x = tf.layers.globalAveragePooling2d({}).apply(x) as tf.SymbolicTensor;
  } else {
    x = tf.layers.dropout({ rate: hp.featureDropout }).apply(x) as tf.SymbolicTensor;
  }
  x = tf.layers.dense({ units: hp.hidden, activation: "relu" }).apply(x) as tf.SymbolicTensor;
  x = tf.layers.dropout({ rate: hp.dropout }).apply(x) as tf.SymbolicTensor;
  const logits = tf.layers.dense({ units: ds.numClasses, name: "logits" }).apply(x) as tf.SymbolicTensor;
  const probs = tf.layers.softmax({ name: "probs" }).apply(logits) as tf.SymbolicTensor;
  const outputs = [logits];
  const inferOutputs = [probs];
  if (ds.task === "waste") {
    // Yields are fractions in [0, 1]: a sigmoid keeps the estimate in range.
    const yieldHead = tf.layers.dense({ units: 1, activation: "sigmoid", name: "yield" }).apply(x) as tf.SymbolicTensor;
    outputs.push(yieldHead);
    inferOutputs.push(yieldHead);
  }
  // Two views of the same layers: logits for a stable loss, probabilities for evaluate/predict.
  return { train: tf.model({ inputs: input, outputs }), infer: tf.model({ inputs: input, outputs: inferOutputs }) };
}

// ---------------------------------------------------------------------------
// Optimizer
// ---------------------------------------------------------------------------

function makeOptimizer(hp: HyperParams): tf.Optimizer & { learningRate: number } {
  // Adam reads `learningRate` on every step, so the schedule below can move it.
  return tf.train.adam(hp.lr) as unknown as tf.Optimizer & { learningRate: number };
}

// ---------------------------------------------------------------------------
// Hyperparameters (edit these directly, no CLI flags needed)
// ---------------------------------------------------------------------------

export const HP = {
  backbone: "none" as Backbone, // "none" (CNN from scratch) or a frozen pretrained backbone, see HP_SPACE
  backboneSize: 224, // backbone input side in pixels (features are computed once per size and cached)
  featureDropout: 0.2, // backbone only: dropout on the input features (feature-space augmentation)
  width: 16, // channels of the first conv block; each block doubles it
  depth: 3, // conv blocks
  hidden: 64, // units of the dense layer before the heads
  dropout: 0.2,
  batchSize: 32,
  lr: 0.003,
  weightDecay: 0, // decoupled (AdamW-style) decay per step, times lr
  warmupFrac: 0.05, // share of the budget with a linear LR warm-up
  cooldownFrac: 0.3, // share of the budget with a linear LR decay to zero at the end
  labelSmoothing: 0.1,
  yieldLossWeight: 1.0,
  flip: true, // random horizontal flips
  shift: 4, // random translation of up to this many pixels (per batch)
  seed: 0,
};

/** What the built-in proposer in loop.ts may try: a single value moves to a neighbour in its list. */
export const HP_SPACE: Record<keyof typeof HP, readonly (number | boolean | string)[]> = {
  backbone: ["none", ...BACKBONE_NAMES],
  // One value while training from scratch: these axes do nothing then, so the proposer skips them.
  backboneSize: HP.backbone === "none" ? [HP.backboneSize] : [96, 128, 160, 224],
  featureDropout: HP.backbone === "none" ? [HP.featureDropout] : [0, 0.1, 0.2, 0.3, 0.5],
  width: [8, 12, 16, 24, 32],
  depth: [2, 3, 4],
  hidden: [32, 64, 128],
  dropout: [0, 0.1, 0.2, 0.3, 0.5],
  batchSize: [16, 32, 64],
  lr: [0.0005, 0.001, 0.002, 0.003, 0.005, 0.008, 0.012],
  weightDecay: [0, 0.0001, 0.0005, 0.001],
  warmupFrac: [0, 0.05, 0.1],
  cooldownFrac: [0, 0.15, 0.3, 0.5],
  labelSmoothing: [0, 0.05, 0.1, 0.2],
  yieldLossWeight: [0.3, 1, 3],
  flip: [false, true],
  shift: [0, 2, 4, 8],
  seed: [0, 1, 2],
};

type Backbone = "none" | (typeof BACKBONE_NAMES)[number];
const HyperParams = type({
  "+": "reject", // a misspelt AR_HP key is an error, not a silent no-op
  backbone: type.enumerated("none", ...BACKBONE_NAMES), backboneSize: "32 <= number.integer <= 512", featureDropout: "0 <= number < 1",
  width: "1 <= number.integer <= 256", depth: "1 <= number.integer <= 6", hidden: "1 <= number.integer <= 1024",
  dropout: "0 <= number < 1", batchSize: "1 <= number.integer <= 1024", lr: "0 < number < 1", weightDecay: "0 <= number < 1",
  warmupFrac: "0 <= number <= 1", cooldownFrac: "0 <= number <= 1", labelSmoothing: "0 <= number < 1",
  yieldLossWeight: "number >= 0", flip: "boolean", shift: "0 <= number.integer <= 32", seed: "number.integer",
});
type HyperParams = typeof HyperParams.infer;

// ---------------------------------------------------------------------------
// Schedules (functions of progress = training_time / budget)
// ---------------------------------------------------------------------------

function learningRate(hp: HyperParams, progress: number): number {
  if (progress < hp.warmupFrac) return hp.lr * (progress / hp.warmupFrac);
  const decayStart = 1 - hp.cooldownFrac;
  if (progress > decayStart) return hp.lr * Math.max(0, (1 - progress) / hp.cooldownFrac);
  return hp.lr;
}

// ---------------------------------------------------------------------------
// Augmentation (one index map over the whole batch: no re-decoding, no per-image kernels)
// ---------------------------------------------------------------------------

export function augment(x: tf.Tensor4D, hp: Pick<HyperParams, "flip" | "shift">, rand: () => number): tf.Tensor4D {
  if (!hp.flip && hp.shift === 0) return x;
  // Augmentation as one index map on the batch's pixels (speed, issue 7): a random horizontal flip per
  // image, then one random translation per batch with mirrored ("symmetric") edges. Same values, bit
  // for bit, as where(mask, reverse(x)) → mirrorPad → slice (tests/backend.test.ts), but those kernels
  // took ~47 ms per 32×64×64 batch on wasm (Tile, Reverse, Slice are generic per-element loops there)
  // and this copy takes ~2 ms. Draws rand() in the same order: one per image, then dy, dx.
  const [n, h, w, c] = x.shape;
  const flips = hp.flip ? Array.from({ length: n }, () => rand() < 0.5) : null;
  let dy = hp.shift, dx = hp.shift; // offsets into the padded image: `shift` means no translation
  if (hp.shift > 0) { dy = Math.floor(rand() * (2 * hp.shift + 1)); dx = Math.floor(rand() * (2 * hp.shift + 1)); }
  const mirror = (k: number, size: number) => (k < 0 ? -k - 1 : k >= size ? 2 * size - k - 1 : k);
  const src = x.dataSync() as Float32Array;
  const out = new Float32Array(src.length);
  const cols = new Int32Array(w);
  for (let b = 0, o = 0; b < n; b++) {
    for (let j = 0; j < w; j++) { const q = mirror(j + dx - hp.shift, w); cols[j] = flips?.[b] ? w - 1 - q : q; }
    for (let i = 0; i < h; i++) {
      const row = (b * h + mirror(i + dy - hp.shift, h)) * w;
      for (let j = 0; j < w; j++, o += c) for (let k = 0, at = (row + cols[j]!) * c; k < c; k++) out[o + k] = src[at + k]!;
    }
  }
  return tf.tensor4d(out, [n, h, w, c]);
}

// ---------------------------------------------------------------------------
// Setup
// ---------------------------------------------------------------------------

const Flags = type({ budget: "number > 0", checkpoint: "string", printHp: "boolean" });

/** AR_HP='{"key": value, …}': HP keys to override for one run (HyperParams still validates them). */
function envOverrides(): object {
  try {
    const o: unknown = JSON.parse(process.env.AR_HP || "{}");
    if (typeof o === "object" && o !== null && !Array.isArray(o)) return o;
  } catch { /* reported below */ }
  throw new Error(`AR_HP must be a JSON object of HP keys, got: ${process.env.AR_HP}`);
}

async function main(): Promise<void> {
  const t0 = performance.now();
  const cli = cac("train.ts");
  cli.option("--budget <seconds>", "training wall-clock budget", { default: TIME_BUDGET })
    .option("--checkpoint <dir>", "where to save the model", { default: process.env.AR_CHECKPOINT_DIR ?? "checkpoints/latest" })
    .option("--print-hp", "print HP and HP_SPACE as JSON and exit", { default: false });
  const parsed = cli.parse(process.argv, { run: false }).options;
  const flags = Flags({ budget: Number(parsed.budget), checkpoint: String(parsed.checkpoint), printHp: parsed.printHp === true });
  if (flags instanceof type.errors) throw new Error(`train.ts: ${flags.summary}`);
  if (flags.printHp) { console.log(JSON.stringify({ HP, HP_SPACE })); return; }

  const hp = HyperParams({ ...HP, ...envOverrides() });
  if (hp instanceof type.errors) throw new Error(`train.ts HP block${process.env.AR_HP ? " + AR_HP" : ""}: ${hp.summary}`);
  if (process.env.AR_HP) console.log(`hp overrides from AR_HP: ${process.env.AR_HP}`);
  await initBackend();
  const ds = await loadCache();
  describeDataset(ds.manifest, (l) => console.log(l));

  // Frozen backbone: features of every image, cached next to the image cache (not in the budget).
  const tFeatures = performance.now();
  const backbone = hp.backbone === "none" ? null : await loadBackbone(hp.backbone, { inputSize: hp.backboneSize });
  const features: FeatureCache | null = backbone && await datasetFeatures(ds, backbone);
  const featureSeconds = (performance.now() - tFeatures) / 1000;
  if (backbone) console.log(describeBackbone(backbone));

  const { train: model, infer } = buildModel(ds, hp, backbone?.featureDim ?? null);
  const optimizer = makeOptimizer(hp);
  const numParams = infer.countParams();
  console.log(`backend: ${backendLabel()}  params: ${numParams}  budget: ${flags.budget}s  hp: ${JSON.stringify(hp)}`);

  // ---------------------------------------------------------------------------
  // Training loop
  // ---------------------------------------------------------------------------
  let seed = hp.seed * 7919 + 17;
  const rand = () => ((seed = (seed * 1664525 + 1013904223) >>> 0) / 2 ** 32);
  const batches = trainBatches(ds, hp.batchSize, hp.seed);
  const weights = model.trainableWeights.map((w) => w.read() as tf.Variable);
  const inputConvs = inputConvFilters(model);
  const WARMUP_STEPS = 2; // the first steps compile kernels and allocate: not counted in the budget
  let trainingSeconds = 0, step = 0, smoothLoss = 0, images = 0, epoch = 0, lastPrint = 0;
  while (trainingSeconds < flags.budget) {
    const stepStart = performance.now();
    const { indices, epoch: e } = batches.next().value!;
    epoch = e;
    const progress = Math.min(1, trainingSeconds / flags.budget);
    optimizer.learningRate = learningRate(hp, progress);
    const lossValue = tf.tidy(() => {
      const x = features ? featureRows(features, indices) : augment(imageBatch(ds, indices), hp, rand);
      const labels = tf.oneHot(tf.tensor1d(Array.from(indices, (i: number) => ds.labels[i]!), "int32"), ds.numClasses);
      const targetYields = tf.tensor2d(Array.from(indices, (i: number) => ds.yields[i]!), [indices.length, 1]);
      // No input gradient for the first conv: its input is the image batch (speed, issue 7).
      const loss = withoutInputGradients(inputConvs, () => optimizer.minimize(() => {
        const outs = model.apply(x, { training: true }) as tf.Tensor | tf.Tensor[];
        const [logits, yieldPred] = Array.isArray(outs) ? outs : [outs];
        let l = tf.losses.softmaxCrossEntropy(labels, logits!, undefined, hp.labelSmoothing);
        if (yieldPred) l = tf.add(l, tf.mul(hp.yieldLossWeight, tf.losses.meanSquaredError(targetYields, yieldPred)));
        return l as tf.Scalar;
      }, true))!;
      if (hp.weightDecay > 0) for (const w of weights) w.assign(tf.mul(w, 1 - hp.weightDecay * optimizer.learningRate));
      return loss.dataSync()[0]!; // one sync per step: the loss is printed anyway
    });
    if (!Number.isFinite(lossValue)) {
      console.log(`FAIL: loss is ${lossValue} at step ${step}`);
      process.exit(1);
    }
    const dt = (performance.now() - stepStart) / 1000;
    if (step >= WARMUP_STEPS) { trainingSeconds += dt; images += indices.length; }
    smoothLoss = step === 0 ? lossValue : 0.9 * smoothLoss + 0.1 * lossValue;
    step++;
    if (performance.now() - lastPrint > 5000 || step <= 3) {
      lastPrint = performance.now();
      const ips = trainingSeconds > 0 ? images / trainingSeconds : 0;
      console.log(`step ${String(step).padStart(5, "0")} | epoch ${epoch} | loss ${smoothLoss.toFixed(4)} | lr ${optimizer.learningRate.toExponential(2)} | ${ips.toFixed(1)} img/s | ${Math.max(0, flags.budget - trainingSeconds).toFixed(0)}s left`);
    }
  }

  // ---------------------------------------------------------------------------
  // Final evaluation and summary
  // ---------------------------------------------------------------------------
  const predict: Predictor = backbone ? backbonePredictor(infer, backbone, features ?? undefined) : (images) => {
    const outs = infer.predict(images);
    const [probs, yields] = Array.isArray(outs) ? outs : [outs];
    return { probs: probs!, yields };
  };
  const result = await evaluate(predict, ds);
  await saveCheckpoint(flags.checkpoint, infer, {
    version: "1", task: ds.task, classes: ds.manifest.classes, positiveClass: ds.manifest.positiveClass, imageSize: ds.imageSize,
    preprocessing: ds.manifest.preprocessing, backbone: backbone?.id ?? null, hasYieldHead: ds.task === "waste", numParams, metrics: result.metrics,
    commit: gitCommit(), createdAt: new Date().toISOString(), synthetic: ds.manifest.synthetic,
    ...(backbone ? { notes: describeBackbone(backbone) } : {}),
  });
  console.log(`checkpoint: ${flags.checkpoint}  (epochs: ${epoch + 1}, ${(images / Math.max(trainingSeconds, 1e-9)).toFixed(1)} img/s)`);
  if (features) console.log(`feature_seconds: ${featureSeconds.toFixed(1)} (${features.reused ? "cached features" : "extracted now"}; not part of training_seconds)`);
  printFooter(result, {
    training_seconds: trainingSeconds, total_seconds: (performance.now() - t0) / 1000, peak_memory_mb: peakMemoryMb(),
    num_steps: step, num_params: numParams, backend: backendLabel(),
  }, ds.manifest);
}

function gitCommit(): string | null {
  const r = Bun.spawnSync(["git", "rev-parse", "--short=7", "HEAD"], { stderr: "ignore" });
  return r.exitCode === 0 ? r.stdout.toString().trim() : null;
}

if (import.meta.main) {
  main().catch((err: unknown) => {
    console.error(`error: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  });
}
