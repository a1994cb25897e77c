/**
 * A small vision transformer as tfjs layers, for train.ts's `HP.family = "vit"`: patch embedding (a conv
 * whose kernel and stride are the patch), a learned position embedding, pre-norm blocks
 * (x + attention(norm(x)), then x + mlp(norm(x))), a final norm and a mean over the patches. train.ts
 * puts its heads on the pooled vector, as on the CNN's.
 *
 * The tokens are kept as a [batch, patches, 1, dim] image and every per-token dense layer is a 1×1
 * conv: the same arithmetic, but on wasm the conv's gradients run as the SIMD kernels of
 * lib/wasm_kernels.ts, where a dense layer's gradients go through tfjs-wasm's BatchMatMul with a
 * transposed operand, which took several times longer in a profiled training step.
 *
 * tfjs-layers has no attention layer, so small custom layers do what it lacks: PositionEmbedding
 * (one learned [patches, 1, dim] weight), SelfAttention (the multi-head attention arithmetic between
 * the q/k/v projection and the output projection, both 1×1 convs) and TokenNorm (layer
 * normalization over the channels: tfjs-layers' own tiles its statistics and scale to the input's
 * shape, and the gradient of that tile is one slice per token, which made a training step take
 * seconds on wasm). All are registered with tfjs' serialization, so a checkpoint of a ViT loads like
 * any layers model wherever this module has been imported (lib/checkpoint.ts imports it).
 */
import * as tf from "@tensorflow/tfjs";

type LayerArgs = NonNullable<ConstructorParameters<typeof tf.layers.Layer>[0]>;
type Shape = (number | null)[];

function single(inputs: tf.Tensor | tf.Tensor[]): tf.Tensor {
  return Array.isArray(inputs) ? inputs[0]! : inputs;
}

function singleShape(s: Shape | Shape[]): Shape {
  return Array.isArray(s[0]) ? (s[0] as Shape) : (s as Shape);
}

/** Adds a learned [patches, 1, dim] embedding to every example: where each patch sits in the image. */
export class PositionEmbedding extends tf.layers.Layer {
  static className = "ArPositionEmbedding";
  private embedding: tf.LayerVariable | null = null;

  constructor(args: LayerArgs = {}) {
    super(args);
  }

  override build(inputShape: Shape | Shape[]): void {
    const [, n, one, d] = singleShape(inputShape);
    // Small like the patch embedding's output at the start, so neither drowns the other (ViT's 0.02).
    const initializer = tf.initializers.truncatedNormal({ stddev: 0.02 });
    this.embedding = this.addWeight("embedding", [n!, one!, d!], "float32", initializer);
    this.built = true;
  }

  override call(inputs: tf.Tensor | tf.Tensor[]): tf.Tensor {
    return tf.tidy(() => tf.add(single(inputs), this.embedding!.read()));
  }
}

/** Layer normalization over the last axis, with a learned scale and offset per channel, by broadcasting. */
export class TokenNorm extends tf.layers.Layer {
  static className = "ArTokenNorm";
  private gamma: tf.LayerVariable | null = null;
  private beta: tf.LayerVariable | null = null;
  // The epsilon of the reference ViT's norm layers.
  private readonly epsilon = 1e-6;

  constructor(args: LayerArgs = {}) {
    super(args);
  }

  override build(inputShape: Shape | Shape[]): void {
    const d = singleShape(inputShape).at(-1)!;
    this.gamma = this.addWeight("gamma", [d], "float32", tf.initializers.ones());
    this.beta = this.addWeight("beta", [d], "float32", tf.initializers.zeros());
    this.built = true;
  }

  override call(inputs: tf.Tensor | tf.Tensor[]): tf.Tensor {
    return tf.tidy(() => {
      const x = single(inputs);
      const { mean, variance } = tf.moments(x, -1, true);
      const normed = tf.mul(tf.sub(x, mean), tf.rsqrt(tf.add(variance, this.epsilon)));
      return tf.add(tf.mul(normed, this.gamma!.read()), this.beta!.read());
    });
  }
}

export interface SelfAttentionArgs extends LayerArgs { numHeads: number }

/**
 * Multi-head scaled dot-product self-attention over [batch, patches, 1, 3·dim] inputs holding q, k and v
 * side by side (one projection makes all three): [batch, patches, 1, dim] out.
 */
export class SelfAttention extends tf.layers.Layer {
  static className = "ArSelfAttention";
  readonly numHeads: number;

  constructor(args: SelfAttentionArgs) {
    super(args);
    this.numHeads = args.numHeads;
  }

  override computeOutputShape(inputShape: Shape | Shape[]): Shape {
    const [b, n, one, d3] = singleShape(inputShape);
    return [b ?? null, n ?? null, one ?? null, d3! / 3];
  }

  override call(inputs: tf.Tensor | tf.Tensor[]): tf.Tensor {
    return tf.tidy(() => {
      const qkv = single(inputs);
      const [b, n, , d3] = qkv.shape as [number, number, number, number];
      const d = d3 / 3, h = this.numHeads, dh = d / h;
      // [b, n, d] → [b, h, n, dh]: each head attends on its own slice of the channels.
      const heads = (t: tf.Tensor) => tf.transpose(tf.reshape(t, [b, n, h, dh]), [0, 2, 1, 3]);
      const [q, k, v] = tf.split(qkv, 3, 3).map(heads) as [tf.Tensor4D, tf.Tensor4D, tf.Tensor4D];
      const scores = tf.mul(tf.matMul(q, k, false, true), 1 / Math.sqrt(dh));
      const out = tf.matMul(tf.softmax(scores), v);
      return tf.reshape(tf.transpose(out, [0, 2, 1, 3]), [b, n, 1, d]);
    });
  }

  override getConfig(): tf.serialization.ConfigDict {
    return { ...super.getConfig(), numHeads: this.numHeads };
  }
}

tf.serialization.registerClass(PositionEmbedding);
tf.serialization.registerClass(SelfAttention);
tf.serialization.registerClass(TokenNorm);

export interface VitShape {
  imageSize: number;
  /** Side of the square patches; the image side must be a multiple of it. */
  patch: number;
  embedDim: number;
  numHeads: number;
  depth: number;
  /** The MLP's hidden width, in multiples of embedDim. */
  mlpRatio: number;
}

/** Why `s` cannot be built (one line), or null. */
export function vitShapeProblem(s: VitShape): string | null {
  if (s.imageSize % s.patch !== 0) return `image size ${s.imageSize} is not a multiple of the patch ${s.patch}`;
  if (s.embedDim % s.numHeads !== 0) return `embedDim ${s.embedDim} is not a multiple of numHeads ${s.numHeads}`;
  return null;
}

/** The ViT from images [S, S, 3] to one pooled [embedDim] vector per image. */
export function vitTrunk(input: tf.SymbolicTensor, s: VitShape): tf.SymbolicTensor {
  const problem = vitShapeProblem(s);
  if (problem !== null) throw new Error(`train.ts HP: ViT: ${problem}`);
  const apply = (layer: tf.layers.Layer, x: tf.SymbolicTensor | tf.SymbolicTensor[]) =>
    layer.apply(x) as tf.SymbolicTensor;
  const grid = s.imageSize / s.patch, d = s.embedDim;
  let x = apply(tf.layers.conv2d({ filters: d, kernelSize: s.patch, strides: s.patch, padding: "valid" }), input);
  x = apply(tf.layers.reshape({ targetShape: [grid * grid, 1, d] }), x);
  x = apply(new PositionEmbedding(), x);
  const norm = () => new TokenNorm();
  // A dense layer applied to each token alone (see the header for why a 1×1 conv).
  const dense = (units: number, activation?: "gelu") => tf.layers.conv2d({ filters: units, kernelSize: 1, activation });
  for (let block = 0; block < s.depth; block++) {
    let y = apply(norm(), x);
    y = apply(dense(3 * d), y);
    y = apply(new SelfAttention({ numHeads: s.numHeads }), y);
    y = apply(dense(d), y);
    x = apply(tf.layers.add(), [x, y]);
    y = apply(norm(), x);
    y = apply(dense(Math.round(d * s.mlpRatio), "gelu"), y);
    y = apply(dense(d), y);
    x = apply(tf.layers.add(), [x, y]);
  }
  x = apply(norm(), x);
  return apply(tf.layers.globalAveragePooling2d({}), x);
}
