/**
 * A head's first layer over cached backbone features: each feature standardized with the mean and
 * standard deviation it has on the train split. Backbone features come on very different scales
 * (the COCO backbone's pooled heatmaps lie in (0, 1), its hard-swish stage reaches tens), so without
 * it a few wide features dominate the head's first dense layer and dropout on the input.
 *
 * The statistics are two non-trainable weights of the layer: they are saved in the checkpoint and
 * applied the same way in training, evaluate() and predict.ts. Registered with tfjs' serialization
 * (lib/checkpoint.ts imports this module), so a checkpoint with it loads like any layers model.
 */
import * as tf from "@tensorflow/tfjs";

type LayerArgs = NonNullable<ConstructorParameters<typeof tf.layers.Layer>[0]>;
type Shape = (number | null)[];

/** Per-feature mean and 1/std of `rows` of an n × dim row-major matrix (std floored, so a constant feature is 0). */
export function featureStats(
  data: Float32Array, dim: number, rows: ArrayLike<number>,
): { mean: Float32Array; invStd: Float32Array } {
  if (rows.length === 0) throw new Error("featureStats: no rows to measure");
  const mean = new Float64Array(dim), sq = new Float64Array(dim);
  for (let r = 0; r < rows.length; r++) {
    const o = rows[r]! * dim;
    for (let d = 0; d < dim; d++) { const v = data[o + d]!; mean[d] += v; sq[d] += v * v; }
  }
  const invStd = new Float32Array(dim);
  for (let d = 0; d < dim; d++) {
    mean[d] /= rows.length;
    const variance = Math.max(0, sq[d]! / rows.length - mean[d]! ** 2);
    invStd[d] = 1 / Math.max(Math.sqrt(variance), 1e-6);
  }
  return { mean: Float32Array.from(mean), invStd };
}

/** (x − mean) · invStd per feature of [B, dim] inputs; both fixed, set from featureStats before training. */
export class Standardize extends tf.layers.Layer {
  static className = "ArStandardize";
  private mean: tf.LayerVariable | null = null;
  private invStd: tf.LayerVariable | null = null;
  private readonly stats: { mean: Float32Array; invStd: Float32Array } | null;

  /** `stats`: the initial values (a new head); a checkpoint being loaded has none and reads its weights. */
  constructor(args: LayerArgs & { stats?: { mean: Float32Array; invStd: Float32Array } } = {}) {
    super(args);
    this.stats = args.stats ?? null;
  }

  override build(inputShape: Shape | Shape[]): void {
    const shape = (Array.isArray(inputShape[0]) ? inputShape[0] : inputShape) as Shape;
    const d = shape.at(-1)!;
    this.mean = this.addWeight("mean", [d], "float32", tf.initializers.zeros(), undefined, false);
    this.invStd = this.addWeight("inv_std", [d], "float32", tf.initializers.ones(), undefined, false);
    if (this.stats) {
      const n = this.stats.mean.length;
      if (n !== d) throw new Error(`Standardize: statistics of ${n} features, the input has ${d}`);
      this.mean.write(tf.tensor1d(this.stats.mean));
      this.invStd.write(tf.tensor1d(this.stats.invStd));
    }
    this.built = true;
  }

  override call(inputs: tf.Tensor | tf.Tensor[]): tf.Tensor {
    return tf.tidy(() => {
      const x = Array.isArray(inputs) ? inputs[0]! : inputs;
      return tf.mul(tf.sub(x, this.mean!.read()), this.invStd!.read());
    });
  }
}

tf.serialization.registerClass(Standardize);
