/**
 * Batchnorm layers with a cheaper training step.
 *
 * batchNorm(): tf.layers.batchNormalization with the same weights, config and class name (a checkpoint
 * loads as a plain BatchNormalization), the same inference pass bit for bit; only training mode differs,
 * and only in float rounding (tests/backend.test.ts).
 *
 * bnReluPool(): batchnorm → ReLU → 2×2 max-pool, a conv block's tail, as one layer (class ArBnReluPool,
 * registered for checkpoints). Its inference pass has the bits of the three tf.layers in a row; on wasm
 * with the SIMD kernels it is one pass over the activations (ArBnReluPool), and its training gradient two
 * (ArBnReluPoolGrad), where the three layers take about eight passes and ~20 kernel calls. Its training
 * forward pass normalises in float32 (x * k + d), not with batchnorm's float64 division: the same values
 * to float rounding. Elsewhere it runs the three layers' ops.
 *
 * In training a batchnorm normalises by the batch's own mean and variance, computed by tf.moments
 * (Mean, Sub, Square, Mean); tfjs' autodiff then walks back through those ops and their broadcasts:
 * about ten passes over the activations per layer, plus ~30 small kernel calls. The gradient has a
 * closed form (kernels.c bn_backward states it) that needs two passes: on wasm with the SIMD kernels
 * one ArBnBackward call, elsewhere the same formula in a dozen tf ops. On wasm the statistics too
 * take two parallel passes (ArBnMoments); elsewhere they are tf.moments', the same bits as tf.layers.
 */
import * as tf from "@tensorflow/tfjs";
import { hasFusedBatchNormGrad, hasFusedBnReluPool } from "./wasm_kernels.ts";

type BatchNormArgs = Parameters<typeof tf.layers.batchNormalization>[0];
type LayerVariable = tf.layers.Layer["weights"][number];
type Initializer = ReturnType<typeof tf.initializers.ones>;

/** A batchnorm layer's four variables and its two constants. */
interface BnState {
  gamma: LayerVariable;
  beta: LayerVariable;
  movingMean: LayerVariable;
  movingVariance: LayerVariable;
  momentum: number;
  epsilon: number;
}

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
    return fast ? trainingCall(stateOf(layer, config), x, false) : plainCall(inputs, kwargs);
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

function stateOf(layer: tf.layers.Layer, config: tf.serialization.ConfigDict): BnState {
  const { momentum, epsilon } = config;
  if (typeof momentum !== "number" || typeof epsilon !== "number") {
    throw new Error(`batchNorm: layer ${layer.name} has no numeric momentum/epsilon`);
  }
  const [gamma, beta, movingMean, movingVariance] = ["gamma", "beta", "moving_mean", "moving_variance"]
    .map((s) => weightOf(layer, s)) as [LayerVariable, LayerVariable, LayerVariable, LayerVariable];
  return { gamma, beta, movingMean, movingVariance, momentum, epsilon };
}

/**
 * tf.layers' BatchNormalization.call in training mode, with the statistics and the gradient below; with
 * `pool`, followed by ReLU and a 2×2 max-pool (bnReluPool), fused into one kernel where the backend has it.
 */
function trainingCall(w: BnState, x: tf.Tensor, pool: boolean): tf.Tensor {
  const eps = w.epsilon;
  const fused = pool && hasFusedBnReluPool() && x.rank === 4;
  return tf.tidy(() => {
    let stats: tf.Tensor[] = [];
    const normalize = tf.customGrad((...args: (tf.Tensor | ((ts: tf.Tensor[]) => void))[]) => {
      const [xs, g, b, save] = args as [tf.Tensor, tf.Tensor, tf.Tensor, (ts: tf.Tensor[]) => void];
      const [mean, variance] = batchMoments(xs);
      stats = [tf.keep(mean), tf.keep(variance)];
      if (fused) {
        const inputs = { x: xs, mean, variance, scale: g, offset: b };
        const [value, win] = tf.engine().runKernel("ArBnReluPool", inputs, { varianceEpsilon: eps, winners: true }) as
          tf.Tensor[];
        save([xs, mean, variance, g, win!]);
        const gradFunc = (dy: tf.Tensor, saved: tf.Tensor[]) => {
          const [sx, sMean, sVariance, sGamma, sWin] = saved;
          const grads = { x: sx!, dy, win: sWin!, mean: sMean!, variance: sVariance!, scale: sGamma! };
          return tf.engine().runKernel("ArBnReluPoolGrad", grads, { varianceEpsilon: eps }) as tf.Tensor[];
        };
        return { value: value!, gradFunc };
      }
      const value = tf.batchNorm(xs, mean, variance, b, g, eps);
      save([xs, mean, variance, g]);
      const gradFunc = (dy: tf.Tensor, saved: tf.Tensor[]) => batchNormGrad(dy, saved, eps);
      return { value, gradFunc };
    });
    const y = normalize(x, w.gamma.read(), w.beta.read());
    // tf.layers' doMovingAverage, operation for operation.
    for (const [variable, value] of [[w.movingMean, stats[0]!], [w.movingVariance, stats[1]!]] as const) {
      tf.tidy(() => {
        const orig = variable.read();
        variable.write(tf.sub(orig, tf.mul(tf.sub(orig, value), 1 - w.momentum)));
      });
    }
    tf.dispose(stats);
    return pool && !fused ? tf.maxPool(tf.relu(y as tf.Tensor4D), 2, 2, "valid") : y;
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

// ---------------------------------------------------------------------------
// bnReluPool

interface BnReluPoolArgs {
  momentum?: number;
  epsilon?: number;
  name?: string;
}

/** batchnorm (channels last, with scale and offset) → ReLU → 2×2 max-pool, stride 2, no padding. */
class BnReluPool extends tf.layers.Layer {
  static className = "ArBnReluPool";
  private readonly momentum: number;
  private readonly epsilon: number;
  private state?: BnState;

  constructor(args: BnReluPoolArgs = {}) {
    super(args);
    // tf.layers.batchNormalization's defaults.
    this.momentum = args.momentum ?? 0.99;
    this.epsilon = args.epsilon ?? 1e-3;
  }

  override build(inputShape: tf.Shape | tf.Shape[]): void {
    const shape = (Array.isArray(inputShape[0]) ? inputShape[0] : inputShape) as tf.Shape;
    const c = shape[shape.length - 1];
    if (shape.length !== 4 || c == null) throw new Error(`${this.name}: needs [batch, h, w, c] input, got [${shape}]`);
    const weight = (name: string, init: Initializer, trainable: boolean) =>
      this.addWeight(name, [c], "float32", init, undefined, trainable);
    const [ones, zeros] = [tf.initializers.ones(), tf.initializers.zeros()];
    this.state = {
      gamma: weight("gamma", ones, true), beta: weight("beta", zeros, true),
      movingMean: weight("moving_mean", zeros, false), movingVariance: weight("moving_variance", ones, false),
      momentum: this.momentum, epsilon: this.epsilon,
    };
    this.built = true;
  }

  override computeOutputShape(inputShape: tf.Shape | tf.Shape[]): tf.Shape {
    const [b, h, w, c] = (Array.isArray(inputShape[0]) ? inputShape[0] : inputShape) as tf.Shape;
    const half = (d: number | null | undefined) => (d == null ? null : Math.floor(d / 2));
    return [b ?? null, half(h), half(w), c ?? null];
  }

  override call(inputs: tf.Tensor | tf.Tensor[], kwargs: tf.serialization.ConfigDict): tf.Tensor {
    const x = Array.isArray(inputs) ? inputs[0] : inputs;
    const w = this.state;
    if (x == null || w == null) throw new Error(`${this.name}: called before it was built`);
    if (kwargs.training === true && x.dtype === "float32") return trainingCall(w, x, true);
    return tf.tidy(() => {
      const [mean, variance, scale, offset] = [w.movingMean, w.movingVariance, w.gamma, w.beta].map((v) => v.read());
      if (hasFusedBnReluPool() && x.dtype === "float32") {
        const inputs = { x, mean: mean!, variance: variance!, scale: scale!, offset: offset! };
        const [y] = tf.engine().runKernel("ArBnReluPool", inputs, { varianceEpsilon: this.epsilon }) as tf.Tensor[];
        return y!;
      }
      const y = tf.batchNorm(x as tf.Tensor4D, mean!, variance!, offset!, scale!, this.epsilon);
      return tf.maxPool(tf.relu(y as tf.Tensor4D), 2, 2, "valid");
    });
  }

  override getConfig(): tf.serialization.ConfigDict {
    return { ...super.getConfig(), momentum: this.momentum, epsilon: this.epsilon };
  }
}
tf.serialization.registerClass(BnReluPool);

/** The layer above: what a conv block's batchNorm, reLU and maxPooling2d({ poolSize: 2 }) compute, as one. */
export function bnReluPool(args: BnReluPoolArgs = {}): tf.layers.Layer {
  return new BnReluPool(args);
}
