/**
 * tf.layers.batchNormalization with a cheaper training step. Same layer, same weights, same config
 * and class name (a checkpoint loads as a plain BatchNormalization), the same inference pass bit for
 * bit; only training mode differs, and only in float rounding (tests/backend.test.ts).
 *
 * In training the layer normalises by the batch's own mean and variance, computed by tf.moments
 * (Mean, Sub, Square, Mean); tfjs' autodiff then walks back through those ops and their broadcasts:
 * about ten passes over the activations per layer, plus ~30 small kernel calls. The gradient has a
 * closed form (kernels.c bn_backward states it) that needs two passes: on wasm with the SIMD kernels
 * one ArBnBackward call, elsewhere the same formula in a dozen tf ops. On wasm the statistics too
 * take two parallel passes (ArBnMoments); elsewhere they are tf.moments', the same bits as tf.layers.
 */
import * as tf from "@tensorflow/tfjs";
import { hasFusedBatchNormGrad } from "./wasm_kernels.ts";

type BatchNormArgs = Parameters<typeof tf.layers.batchNormalization>[0];
type LayerVariable = tf.layers.Layer["weights"][number];

/** A tf.layers.batchNormalization layer whose training-mode call uses the closed-form gradient. */
export function batchNorm(args: BatchNormArgs = {}): tf.layers.Layer {
  const layer = tf.layers.batchNormalization(args);
  const config = layer.getConfig(); // fixed at construction; read once, not on every step
  const plainCall = layer.call.bind(layer);
  // The instance's call, not a subclass: tfjs' class keeps its weights private, and its className and
  // getConfig stay untouched, so nothing about saving or loading changes.
  layer.call = (inputs, kwargs) => {
    const x = Array.isArray(inputs) ? (inputs.length === 1 ? inputs[0] : undefined) : inputs;
    const fast = kwargs.training === true && x != null && fastPathFits(config, x);
    return fast ? trainingCall(layer, config, x) : plainCall(inputs, kwargs);
  };
  return layer;
}

/** The closed form covers the usual case: channels last, float32, with scale and offset. */
function fastPathFits(c: tf.serialization.ConfigDict, x: tf.Tensor): boolean {
  const axis = typeof c.axis === "number" ? c.axis : NaN;
  return (axis === -1 || axis === x.rank - 1) && x.dtype === "float32" && c.scale === true && c.center === true
    && x.rank >= 2;
}

function weightOf(layer: tf.layers.Layer, suffix: string): LayerVariable {
  // originalName: `name` gets a "_1" when a variable of that name existed before (another model, a test).
  const w = layer.weights.find((v) => v.originalName.endsWith(`/${suffix}`));
  if (w == null) throw new Error(`batchNorm: layer ${layer.name} has no weight ${suffix}`);
  return w;
}

/** tf.layers' BatchNormalization.call in training mode, with the statistics and the gradient below. */
function trainingCall(layer: tf.layers.Layer, config: tf.serialization.ConfigDict, x: tf.Tensor): tf.Tensor {
  const { momentum, epsilon } = config;
  if (typeof momentum !== "number" || typeof epsilon !== "number") {
    throw new Error(`batchNorm: layer ${layer.name} has no numeric momentum/epsilon`);
  }
  const [gamma, beta, movingMean, movingVariance] = ["gamma", "beta", "moving_mean", "moving_variance"]
    .map((s) => weightOf(layer, s));
  return tf.tidy(() => {
    let stats: tf.Tensor[] = [];
    const normalize = tf.customGrad((...args: (tf.Tensor | ((ts: tf.Tensor[]) => void))[]) => {
      const [xs, g, b, save] = args as [tf.Tensor, tf.Tensor, tf.Tensor, (ts: tf.Tensor[]) => void];
      const [mean, variance] = batchMoments(xs);
      const value = tf.batchNorm(xs, mean, variance, b, g, epsilon);
      save([xs, mean, variance, g]);
      stats = [tf.keep(mean), tf.keep(variance)];
      const gradFunc = (dy: tf.Tensor, saved: tf.Tensor[]) => batchNormGrad(dy, saved, epsilon);
      return { value, gradFunc };
    });
    const y = normalize(x, gamma!.read(), beta!.read());
    // tf.layers' doMovingAverage, operation for operation.
    for (const [variable, value] of [[movingMean!, stats[0]!], [movingVariance!, stats[1]!]] as const) {
      tf.tidy(() => {
        const orig = variable.read();
        variable.write(tf.sub(orig, tf.mul(tf.sub(orig, value), 1 - momentum)));
      });
    }
    tf.dispose(stats);
    return y;
  });
}

/** The batch's mean and variance per channel: tf.moments (what tf.layers runs), or on wasm ArBnMoments. */
function batchMoments(x: tf.Tensor): [tf.Tensor, tf.Tensor] {
  if (hasFusedBatchNormGrad()) {
    const [mean, variance] = tf.engine().runKernel("ArBnMoments", { x }, {}) as tf.Tensor[];
    return [mean!, variance!];
  }
  const { mean, variance } = tf.moments(x, [...Array(x.rank - 1).keys()]);
  return [mean, variance];
}

/** [dx, dgamma, dbeta] of y = gamma * (x - mean(x)) / sqrt(var(x) + eps) + beta, per channel (last axis). */
function batchNormGrad(dy: tf.Tensor, saved: tf.Tensor[], eps: number): tf.Tensor[] {
  const [x, mean, variance, gamma] = saved as [tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor];
  if (hasFusedBatchNormGrad()) {
    const inputs = { x, dy, mean, variance, scale: gamma };
    return tf.engine().runKernel("ArBnBackward", inputs, { varianceEpsilon: eps }) as tf.Tensor[];
  }
  const axes = [...Array(x.rank - 1).keys()];
  const n = x.size / mean.size;
  const inv = tf.rsqrt(tf.add(variance, eps));
  const centered = tf.sub(x, mean);
  const s1 = tf.sum(dy, axes);
  const s2 = tf.sum(tf.mul(dy, centered), axes);
  const k = tf.mul(gamma, inv);
  const a = tf.div(tf.mul(k, s1), n);
  const b = tf.div(tf.mul(tf.mul(k, tf.mul(inv, inv)), s2), n);
  const dx = tf.sub(tf.mul(k, dy), tf.add(a, tf.mul(centered, b)));
  return [dx, tf.mul(s2, inv), s1];
}
