/**
 * train.ts — the one file the research loop edits. Model, optimizer, schedule, augmentation, training loop.
 *
 *   bun train.ts                 # train for prepare.TIME_BUDGET seconds on the active dataset
 *   bun train.ts --budget 20     # a short run
 *   bun train.ts --print-hp      # print HP and HP_SPACE as JSON (the built-in proposer reads it)
 *   bun train.ts --help          # the flags
 *   AR_HP='{"backbone":"nsfwjs-mobilenetv2"}' bun train.ts   # override HP keys for one run (validated)
 *
 * HP.backbone picks the model: "none" trains a model from scratch on the cached pixels (HP.family: the CNN
 * below or a small vision transformer, lib/vit.ts) at HP.imageSize (one of the sizes prepare cached);
 * a backbone name (lib/backbones.ts) trains a small head on that frozen pretrained network's
 * features, computed once from the original photos at HP.backboneSize and cached next to the image
 * cache (before the training timer starts; `feature_seconds:` says how long that took); with HP.flip
 * the mirrored photos' features too, and each batch row reads one of the two at random. With
 * HP.unfreezeBlocks k > 0 the backbone's last k blocks train too (at HP.backboneLrScale × lr): what is
 * cached is the frozen part's feature maps, and run.blocks runs on them inside the gradient tape.
 * Everything around the research (flags, data, evaluation, checkpoint, footer) is lib/run.ts.
 * It ends with the footer (val_accuracy: … backend: …) and a checkpoint in checkpoints/latest/
 * (or --checkpoint DIR). The loop does not trust the footer: it re-measures the checkpoint with
 * prepare.ts's evaluate().
 */
import * as tf from "@tensorflow/tfjs";
import { cachedImageSizes, trainBatches } from "./prepare.ts";
import { backendLabel } from "./lib/backend.ts";
import { inputConvFilters, withoutInputGradients } from "./lib/wasm_kernels.ts";
import {
  BACKBONE_COMBOS, BACKBONE_NAMES, featureRows, fineTunable, type BackboneCombo, type BackboneName,
} from "./lib/backbones.ts";
import { augmentedBatch } from "./lib/augment.ts";
import { adam } from "./lib/adam.ts";
import { bnReluPool } from "./lib/batchnorm.ts";
import { vitTrunk } from "./lib/vit.ts";
import { featureStats, Standardize } from "./lib/standardize.ts";
import { finishRun, hpSpace, startRun } from "./lib/run.ts";

// ---------------------------------------------------------------------------
// Hyperparameters (edit these directly, no CLI flags needed)
// ---------------------------------------------------------------------------

type Backbone = "none" | BackboneName | BackboneCombo;
type Family = "cnn" | "vit";

export const HP = {
  backbone: "none" as Backbone, // "none" (a model from scratch, see family) or a frozen pretrained backbone
  backboneSize: 224, // backbone input side in pixels (features are computed once per size and cached)
  featureDropout: 0.2, // backbone only: dropout on the input features (feature-space augmentation)
  standardize: false, // frozen backbone: the head first standardizes each feature (train split's mean and std)
  unfreezeBlocks: 0, // backbone only: fine-tune its last 0, 1 or 2 blocks (a layers-model backbone, see HP_SPACE)
  backboneLrScale: 0.1, // fine-tuning only: the unfrozen blocks' lr, as a fraction of lr (pretrained weights move less)
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
  classWeight: 0, // class c's loss weight ∝ (1 / its train count)^classWeight: 0 plain, 0.5 sqrt, 1 balanced
  yieldLossWeight: 1.0,
  flip: true, // random horizontal flips (with a backbone: the features of the mirrored photo, also cached)
  shift: 4, // random translation of up to this many pixels (per batch)
  seed: 0, // not in HP_SPACE: another seed is a re-roll of the noise, not an improvement
  // From scratch: which model, at which input size (the CNN ignores the vit keys; the ViT width and depth).
  family: "cnn" as Family, // "cnn": the conv blocks below; "vit": a small vision transformer (lib/vit.ts)
  imageSize: 0, // input side in pixels: 0 = the size prepared by default (64; CIFAR-100 32), or one added by --sizes
  patch: 8, // vit: side of the square patches, in pixels (imageSize must be a multiple)
  embedDim: 64, // vit: width of each patch's token (a multiple of numHeads)
  numHeads: 4, // vit: attention heads per block
  vitDepth: 4, // vit: transformer blocks
  mlpRatio: 2, // vit: each block's MLP width, in multiples of embedDim
};

/**
 * What the built-in proposer may try: a single value moves to a neighbour in its list. A key not listed
 * here keeps HP's value alone. AR_HP values must match what is declared for the key here and
 * in HP: same type, one of the listed strings, whole numbers where all are whole, ≥ 0 where all are.
 */
const fromScratch = HP.backbone === "none";
export const HP_SPACE = hpSpace(HP, {
  backbone: ["none", ...BACKBONE_NAMES, ...BACKBONE_COMBOS],
  // Axes that do nothing for the current model keep one value, and the proposer skips them.
  ...(fromScratch ? {} : {
    backboneSize: [96, 128, 160, 224, 320], featureDropout: [0, 0.1, 0.2, 0.3, 0.5], standardize: [false, true],
  }),
  ...(fineTunable(HP.backbone) ? { unfreezeBlocks: [0, 1, 2] } : {}),
  ...(fineTunable(HP.backbone) && HP.unfreezeBlocks > 0 ? { backboneLrScale: [0.03, 0.1, 0.3, 1] } : {}),
  ...(fromScratch && HP.family === "cnn" ? { width: [8, 12, 16, 24, 32], depth: [2, 3, 4] } : {}),
  hidden: [32, 64, 128, 256],
  dropout: [0, 0.1, 0.2, 0.3, 0.5],
  batchSize: [16, 32, 64],
  lr: [0.0005, 0.001, 0.002, 0.003, 0.005, 0.008, 0.012],
  weightDecay: [0, 0.0001, 0.0005, 0.001],
  warmupFrac: [0, 0.05, 0.1],
  cooldownFrac: [0, 0.15, 0.3, 0.5],
  labelSmoothing: [0, 0.05, 0.1, 0.2],
  classWeight: [0, 0.5, 1],
  yieldLossWeight: [0.3, 1, 3],
  flip: [false, true],
  // Only the sizes the active dataset is cached at: the proposer never picks one train.ts cannot load.
  family: ["cnn", "vit"],
  ...(fromScratch ? { shift: [0, 2, 4, 8], imageSize: cachedImageSizes(HP.imageSize) } : {}),
  ...(fromScratch && HP.family === "vit"
    ? { patch: [4, 8, 16], embedDim: [32, 64, 96, 128], numHeads: [2, 4, 8], vitDepth: [2, 4, 6], mlpRatio: [2, 4] }
    : {}),
});

// Flags, AR_HP, the dataset and (with a backbone) its cached features: lib/run.ts.
const run = await startRun(HP, HP_SPACE);
const { hp, ds, budget, features, mirrored, blocks } = run;

// ---------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------

/**
 * A small VGG-style CNN: [conv3x3 → batchnorm → relu → maxpool] × depth, or the ViT of lib/vit.ts
 * (HP.family), then two heads. With `featureDim` (a frozen backbone) the input is that feature vector
 * instead: standardized (HP.standardize) → dropout → the heads.
 */
function buildModel(featureDim: number | null): { train: tf.LayersModel; infer: tf.LayersModel } {
  const input = tf.input({ shape: featureDim === null ? [ds.imageSize, ds.imageSize, 3] : [featureDim] });
  const apply = (layer: tf.layers.Layer, x: tf.SymbolicTensor) => layer.apply(x) as tf.SymbolicTensor;
  let x = input;
  if (featureDim === null && hp.family === "vit") {
    const { patch, embedDim, numHeads, mlpRatio } = hp;
    x = vitTrunk(input, { imageSize: ds.imageSize, patch, embedDim, numHeads, depth: hp.vitDepth, mlpRatio });
  } else if (featureDim === null) {
    for (let block = 0; block < hp.depth; block++) {
      const filters = hp.width * 2 ** block;
      // useBias: false — batchnorm's beta does the bias's job, one less gradient per layer.
      const conv = { filters, kernelSize: 3, padding: "same", useBias: false, kernelInitializer: "heNormal" } as const;
      x = apply(tf.layers.conv2d(conv), x);
      // batchnorm → relu → 2×2 max-pool as one layer: on wasm one pass forward, two back, not ~8 (lib/batchnorm.ts);
      // to change one of the three, write them out: batchNorm(), tf.layers.reLU(), tf.layers.maxPooling2d().
      x = apply(bnReluPool({ momentum: 0.9 }), x);
    }
    x = apply(tf.layers.globalAveragePooling2d({}), x);
  } else {
    // Fine-tuning, the head reads the blocks' output, not the cached features: nothing to standardize by.
    if (hp.standardize && features && !blocks) {
      x = apply(new Standardize({ stats: featureStats(features.data, features.dim, ds.train) }), x);
    }
    x = apply(tf.layers.dropout({ rate: hp.featureDropout }), x);
  }
  x = apply(tf.layers.dense({ units: hp.hidden, activation: "relu" }), x);
  x = apply(tf.layers.dropout({ rate: hp.dropout }), x);
  const logits = apply(tf.layers.dense({ units: ds.numClasses, name: "logits" }), x);
  const outputs = [logits];
  const inferOutputs = [apply(tf.layers.softmax({ name: "probs" }), logits)];
  if (ds.task === "waste") {
    // Yields are fractions in [0, 1]: a sigmoid keeps the estimate in range.
    const yieldHead = apply(tf.layers.dense({ units: 1, activation: "sigmoid", name: "yield" }), x);
    outputs.push(yieldHead);
    inferOutputs.push(yieldHead);
  }
  // Two views of the same layers: logits for a stable loss, probabilities for evaluate/predict.
  return { train: tf.model({ inputs: input, outputs }), infer: tf.model({ inputs: input, outputs: inferOutputs }) };
}

const { train: model, infer } = buildModel(run.headDim);
const numParams = infer.countParams() + (blocks?.countParams() ?? 0);
console.log(`backend: ${backendLabel()}  params: ${numParams}  budget: ${budget}s  hp: ${JSON.stringify(hp)}`);

// ---------------------------------------------------------------------------
// Optimizer
// ---------------------------------------------------------------------------

// Adam reads `learningRate` on every step, so the schedule below can move it. tfjs' Adam, its update
// fused into one kernel per variable where the backend has one (same bits: lib/adam.ts).
type Adam = tf.Optimizer & { learningRate: number };
const optimizer = adam(hp.lr) as unknown as Adam;
const weights = model.trainableWeights.map((w) => w.read() as tf.Variable);
// Fine-tuned blocks get an optimizer of their own, at hp.backboneLrScale × the head's lr.
const blockOptimizer = adam(hp.lr * hp.backboneLrScale) as unknown as Adam;
const blockWeights = blocks?.trainableWeights.map((w) => w.read() as tf.Variable) ?? [];

/** One optimizer step on `lossFn`; returns the loss. */
function minimize(lossFn: () => tf.Scalar): tf.Scalar {
  if (blockWeights.length === 0) return optimizer.minimize(lossFn, true)!;
  const { value, grads } = tf.variableGrads(lossFn, [...weights, ...blockWeights]);
  const pick = (vs: tf.Variable[]) => Object.fromEntries(vs.map((v) => [v.name, grads[v.name]!]));
  optimizer.applyGradients(pick(weights));
  blockOptimizer.applyGradients(pick(blockWeights));
  return value;
}

// ---------------------------------------------------------------------------
// Schedule (a function of progress = training_time / budget)
// ---------------------------------------------------------------------------

function learningRate(progress: number): number {
  if (progress < hp.warmupFrac) return hp.lr * (progress / hp.warmupFrac);
  const decayStart = 1 - hp.cooldownFrac;
  if (progress > decayStart) return hp.lr * Math.max(0, (1 - progress) / hp.cooldownFrac);
  return hp.lr;
}

// ---------------------------------------------------------------------------
// Augmentation
// ---------------------------------------------------------------------------

let seed = hp.seed * 7919 + 17;
const rand = () => ((seed = (seed * 1664525 + 1013904223) >>> 0) / 2 ** 32);

/** The training input of dataset rows `indices`: cached backbone features, or augmented pixels. */
function batchInput(indices: Int32Array): tf.Tensor {
  // Fine-tuned blocks keep their pretrained batchnorm statistics (training: false): a batch is too
  // small to re-estimate them; their weights still get gradients, as this runs inside the tape.
  // hp.flip over cached features: each row is the photo's or its mirror image's, at random.
  const rows = features && featureRows(features, indices, hp.flip && mirrored ? { fc: mirrored, rand } : undefined);
  if (rows && blocks) return blocks.apply(rows, { training: false }) as tf.Tensor;
  if (rows) return rows;
  // Flip and shift as one index map from the uint8 cache: no mirrorPad/reverse/slice kernels, no read-back.
  return augmentedBatch(ds, indices, hp, rand);
}

// ---------------------------------------------------------------------------
// Loss weights per class
// ---------------------------------------------------------------------------

// A rare class (screening's positive) otherwise counts for little: the model can score by never naming
// it. Scaled so the average training example weighs 1, so the loss scale and the effective lr stay put.
const trainCounts = new Array<number>(ds.numClasses).fill(0);
for (const i of ds.train) trainCounts[ds.labels[i]!]!++;
const rawWeights = trainCounts.map((n) => Math.max(n, 1) ** -hp.classWeight);
const meanWeight = trainCounts.reduce((s, n, c) => s + n * rawWeights[c]!, 0) / ds.train.length;
const classWeights = rawWeights.map((w) => w / meanWeight);
if (hp.classWeight > 0) {
  console.log(`class weights: ${ds.manifest.classes.map((c, k) => `${c} ${classWeights[k]!.toFixed(2)}`).join(", ")}`);
}

// ---------------------------------------------------------------------------
// Training loop
// ---------------------------------------------------------------------------

const batches = trainBatches(ds, hp.batchSize, hp.seed);
const inputConvs = inputConvFilters(model);
const WARMUP_STEPS = 2; // the first steps compile kernels and allocate: not counted in the budget
let trainingSeconds = 0, step = 0, smoothLoss = 0, images = 0, epoch = 0, lastPrint = 0;
while (trainingSeconds < budget) {
  const stepStart = performance.now();
  const { indices, epoch: e } = batches.next().value!;
  epoch = e;
  optimizer.learningRate = learningRate(Math.min(1, trainingSeconds / budget));
  blockOptimizer.learningRate = optimizer.learningRate * hp.backboneLrScale;
  const lossValue = tf.tidy(() => {
    const labels = tf.oneHot(tf.tensor1d(Array.from(indices, (i: number) => ds.labels[i]!), "int32"), ds.numClasses);
    const targetYields = tf.tensor2d(Array.from(indices, (i: number) => ds.yields[i]!), [indices.length, 1]);
    const exampleWeights = hp.classWeight > 0
      ? tf.tensor1d(Array.from(indices, (i: number) => classWeights[ds.labels[i]!]!)) : undefined;
    // No input gradient for the first conv: its input is the image batch, nothing upstream learns.
    const loss = withoutInputGradients(inputConvs, () => minimize(() => {
      const outs = model.apply(batchInput(indices), { training: true }) as tf.Tensor | tf.Tensor[];
      const [logits, yieldPred] = Array.isArray(outs) ? outs : [outs];
      let l = tf.losses.softmaxCrossEntropy(labels, logits!, exampleWeights, hp.labelSmoothing);
      if (yieldPred) l = tf.add(l, tf.mul(hp.yieldLossWeight, tf.losses.meanSquaredError(targetYields, yieldPred)));
      return l as tf.Scalar;
    }));
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
    const left = Math.max(0, budget - trainingSeconds);
    console.log(`step ${String(step).padStart(5, "0")} | epoch ${epoch} | loss ${smoothLoss.toFixed(4)} | `
      + `lr ${optimizer.learningRate.toExponential(2)} | ${ips.toFixed(1)} img/s | ${left.toFixed(0)}s left`);
  }
}

// Evaluate on the val split, save the checkpoint, print the footer: lib/run.ts.
await finishRun(run, infer, { steps: step, epochs: epoch + 1, images, trainingSeconds });
