/**
 * Gradient kernels that @tensorflow/tfjs-backend-wasm 4.22 does not ship
 * (tfjs issue #8474): without them any conv net fails on the first backward
 * pass with "Kernel 'Conv2DBackpropFilter' not registered for backend 'wasm'".
 *
 * Each kernel is written as a composition of ops that the wasm backend runs
 * natively (XNNPACK convolutions, native transpose / pad / reverse / sum), so
 * there is no round trip through the cpu backend and no per-element JS loop:
 *
 * - Conv2DBackpropFilter: dW[kh,kw,ci,co] = sum_{b,oh,ow} x[b, oh*s+kh-p, ow*s+kw-p, ci] * dy[b,oh,ow,co]
 *   is itself a stride-1 convolution with dilation s of the input seen as
 *   [ci, h, w, b] (ci as batch, b as channels) by dy seen as a filter
 *   [oh, ow, b, co]; its output is [ci, kh, kw, co]. This does exactly the
 *   FLOPs of the forward conv and runs through XNNPACK's igemm.
 * - DepthwiseConv2dNativeBackpropFilter: the same trick with a depthwise conv,
 *   where every (b, c) pair becomes one channel, followed by a sum over b.
 * - DepthwiseConv2dNativeBackpropInput: a full correlation of the
 *   zero-inserted (stride) dy with the spatially flipped filter, done as a
 *   stride-1 depthwise conv with explicit padding.
 *
 * Two more replacements, found by profiling a training step (bench/train_step.ts):
 * - Conv2DBackpropInput: wasm ships it as a scalar C++ loop (4-11x slower than
 *   the forward conv); we run it as an XNNPACK conv instead.
 * - the FusedBatchNorm gradient (tfjs-core, all backends): same math without
 *   a full-size tf.tile, which alone took a third of a wasm step.
 *
 * Only NHWC with dilation 1 is handled for the depthwise kernels (that is all
 * tfjs' own gradient functions ever request); Conv2DBackpropFilter also takes
 * NCHW by transposing, Conv2DBackpropInput hands NCHW to the native kernel.
 */
import * as tf from "@tensorflow/tfjs";

type Pad = "same" | "valid" | number | tf.backend_util.ExplicitPadding;
type Rounding = "floor" | "round" | "ceil" | undefined;
type Shape4 = [number, number, number, number];
type KernelArgs = Parameters<tf.KernelFunc>[0];

// ---------------------------------------------------------------------------
// Attribute narrowing. Attrs arrive as tf.NamedAttrMap (a loose union); we
// check the shapes we rely on instead of casting.

function isNumberArray(v: unknown): v is number[] {
  return Array.isArray(v) && v.every((e) => typeof e === "number");
}

function readPair(attrs: tf.NamedAttrMap, name: string, fallback?: number): [number, number] {
  const v: unknown = attrs[name];
  if (v == null && fallback != null) return [fallback, fallback];
  if (typeof v === "number") return [v, v];
  if (isNumberArray(v) && v.length === 2) return [v[0], v[1]];
  // tfjs sometimes passes 4-element NHWC strides/dilations; take H and W.
  if (isNumberArray(v) && v.length === 4) return [v[1], v[2]];
  throw new Error(`wasm grad kernel: attr '${name}' has unexpected value ${JSON.stringify(v)}`);
}

function readPad(attrs: tf.NamedAttrMap): Pad {
  const v: unknown = attrs.pad;
  if (v === "same" || v === "valid" || typeof v === "number") return v;
  if (Array.isArray(v) && v.length === 4 && v.every((p) => isNumberArray(p) && p.length === 2)) {
    return v as tf.backend_util.ExplicitPadding;
  }
  throw new Error(`wasm grad kernel: attr 'pad' has unexpected value ${JSON.stringify(v)}`);
}

function readRounding(attrs: tf.NamedAttrMap): Rounding {
  const v: unknown = attrs.dimRoundingMode;
  if (v == null) return undefined;
  if (v === "floor" || v === "round" || v === "ceil") return v;
  throw new Error(`wasm grad kernel: attr 'dimRoundingMode' has unexpected value ${JSON.stringify(v)}`);
}

function readShape4(attrs: tf.NamedAttrMap, name: string): Shape4 {
  const v: unknown = attrs[name];
  if (isNumberArray(v) && v.length === 4) return [v[0], v[1], v[2], v[3]];
  throw new Error(`wasm grad kernel: attr '${name}' must be a rank-4 shape, got ${JSON.stringify(v)}`);
}

function shape4(info: tf.TensorInfo, what: string): Shape4 {
  const s = info.shape;
  if (s.length !== 4) throw new Error(`wasm grad kernel: ${what} must be rank 4, got [${s.join(",")}]`);
  return [s[0], s[1], s[2], s[3]];
}

function requireInput(inputs: tf.NamedTensorInfoMap, name: string): tf.TensorInfo {
  const t = inputs[name];
  if (t == null) throw new Error(`wasm grad kernel: missing input '${name}'`);
  return t;
}

function requireBackend(backend: unknown): tf.KernelBackend {
  if (!(backend instanceof tf.KernelBackend)) throw new Error("wasm grad kernel: backend is not a KernelBackend");
  return backend;
}

// ---------------------------------------------------------------------------
// Running tf ops inside a kernel.
//
// A kernel receives bare TensorInfos. To use ops on them we wrap each in a
// Tensor that shares the dataId; makeTensorFromTensorInfo does not bump the
// backend's refcount, so we do it ourselves, and disposing the wrapper at the
// end of the tidy gives the reference back without freeing the caller's data.
// The result tensor is returned from the tidy (so it survives) and handed to
// the engine as-is: the engine accepts a Tensor as kernel output (it has a
// rank) and tracks it in the caller's scope, exactly like a fresh TensorInfo.
//
// While the nested ops run we switch the engine's profiling flag off so that
// tf.profile() reports one entry per gradient kernel (with its full time)
// instead of also listing its internal Conv2D/Transpose calls, which would
// count the same milliseconds twice.

function runComposite(
  backend: tf.KernelBackend,
  inputs: tf.TensorInfo[],
  body: (...ts: tf.Tensor[]) => tf.Tensor,
): tf.Tensor {
  const engine = tf.engine();
  const wasProfiling = engine.state.profiling;
  engine.state.profiling = false;
  try {
    return tf.tidy(() => {
      const wrapped = inputs.map((info) => {
        backend.incRef(info.dataId);
        return engine.makeTensorFromTensorInfo(info, backend);
      });
      return body(...wrapped);
    });
  } finally {
    engine.state.profiling = wasProfiling;
  }
}

/** Drops rows/cols from the edges of an NHWC tensor (counts >= 0). */
function crop4(t: tf.Tensor4D, top: number, bottom: number, left: number, right: number): tf.Tensor4D {
  const [n, h, w, c] = t.shape;
  return tf.slice(t, [0, top, left, 0], [n, h - top - bottom, w - left - right, c]);
}

/**
 * Zero-inserts between rows/cols (stride sH, sW): [B,OH,OW,C] ->
 * [B,OH*sH,OW*sW,C] with dy[b,i,j] at (i*sH, j*sW) and zeros elsewhere.
 * Done natively as reshape -> pad on two size-1 axes -> reshape.
 */
function zeroInsert(dy: tf.Tensor4D, sH: number, sW: number): tf.Tensor4D {
  if (sH === 1 && sW === 1) return dy;
  const [b, oh, ow, c] = dy.shape;
  const six = tf.reshape(dy, [b, oh, 1, ow, 1, c]);
  const padded = tf.pad(six, [[0, 0], [0, 0], [0, sH - 1], [0, 0], [0, sW - 1], [0, 0]]);
  return tf.reshape(padded, [b, oh * sH, ow * sW, c]);
}

// ---------------------------------------------------------------------------
// Conv2DBackpropFilter

function conv2DBackpropFilter(args: KernelArgs): tf.TensorInfo {
  const backend = requireBackend(args.backend);
  const attrs = args.attrs ?? {};
  const x = requireInput(args.inputs, "x");
  const dy = requireInput(args.inputs, "dy");
  const filterShape = readShape4(attrs, "filterShape");
  const dataFormat = tf.backend_util.convertConv2DDataFormat(
    attrs.dataFormat === "NCHW" ? "NCHW" : "NHWC",
  );
  const info = tf.backend_util.computeConv2DInfo(
    shape4(x, "x"), filterShape, readPair(attrs, "strides"), 1, readPad(attrs), readRounding(attrs), false, dataFormat,
  );
  const { inHeight: h, inWidth: w, outHeight: oh, outWidth: ow, filterHeight: kh, filterWidth: kw } = info;
  const { strideHeight: sH, strideWidth: sW } = info;
  const top = info.padInfo.top;
  const left = info.padInfo.left;
  // Pad after the input so that the transposed conv yields exactly kh rows;
  // a negative value means trailing input rows no output ever reads (valid
  // padding with a stride remainder) and we instead ask for extra output rows
  // and drop them, which is cheaper than cropping the input.
  const bottom = kh + (oh - 1) * sH - h - top;
  const right = kw + (ow - 1) * sW - w - left;
  const channelsLast = info.dataFormat === "channelsLast";

  return runComposite(backend, [x, dy], (xt, dyt) => {
    // [ci, h, w, b]: input channels become the batch, the batch the channels.
    const xT = tf.transpose(xt, channelsLast ? [3, 1, 2, 0] : [1, 2, 3, 0]) as tf.Tensor4D;
    // [oh, ow, b, co]: dy becomes a (huge, dilated) filter.
    const dyF = tf.transpose(dyt, channelsLast ? [1, 2, 0, 3] : [2, 3, 0, 1]) as tf.Tensor4D;
    const pad: tf.backend_util.ExplicitPadding = [[0, 0], [top, Math.max(0, bottom)], [left, Math.max(0, right)], [0, 0]];
    let r = tf.conv2d(xT, dyF, 1, pad, "NHWC", [sH, sW]);
    if (bottom < 0 || right < 0) r = tf.slice(r, [0, 0, 0, 0], [info.inChannels, kh, kw, info.outChannels]);
    return tf.transpose(r, [1, 2, 0, 3]); // -> [kh, kw, ci, co]
  });
}

// ---------------------------------------------------------------------------
// DepthwiseConv2dNativeBackpropFilter

function assertUnitDilation(attrs: tf.NamedAttrMap, kernel: string): void {
  const [dH, dW] = readPair(attrs, "dilations", 1);
  if (dH !== 1 || dW !== 1) throw new Error(`wasm ${kernel}: dilations other than 1 are not supported (got ${dH},${dW})`);
}

function depthwiseBackpropFilter(args: KernelArgs): tf.TensorInfo {
  const backend = requireBackend(args.backend);
  const attrs = args.attrs ?? {};
  const x = requireInput(args.inputs, "x");
  const dy = requireInput(args.inputs, "dy");
  assertUnitDilation(attrs, "DepthwiseConv2dNativeBackpropFilter");
  const filterShape = readShape4(attrs, "filterShape");
  const info = tf.backend_util.computeConv2DInfo(
    shape4(x, "x"), filterShape, readPair(attrs, "strides"), 1, readPad(attrs), readRounding(attrs), true,
  );
  const { batchSize: b, inHeight: h, inWidth: w, inChannels: c, outHeight: oh, outWidth: ow } = info;
  const { filterHeight: kh, filterWidth: kw, strideHeight: sH, strideWidth: sW } = info;
  const mult = filterShape[3];
  const top = info.padInfo.top;
  const left = info.padInfo.left;
  const bottom = kh + (oh - 1) * sH - h - top;
  const right = kw + (ow - 1) * sW - w - left;

  return runComposite(backend, [x, dy], (xt, dyt) => {
    // Every (b, c) pair is one depthwise channel: input [1, h, w, b*c],
    // filter [oh, ow, b*c, mult] (dy's channel index is c*mult + m).
    const xT = tf.reshape(tf.transpose(xt, [1, 2, 0, 3]), [1, h, w, b * c]) as tf.Tensor4D;
    const dyF = tf.reshape(tf.transpose(dyt, [1, 2, 0, 3]), [oh, ow, b * c, mult]) as tf.Tensor4D;
    const pad: tf.backend_util.ExplicitPadding = [[0, 0], [top, Math.max(0, bottom)], [left, Math.max(0, right)], [0, 0]];
    let r = tf.depthwiseConv2d(xT, dyF, 1, pad, "NHWC", [sH, sW]); // [1, kh', kw', b*c*mult]
    if (bottom < 0 || right < 0) r = tf.slice(r, [0, 0, 0, 0], [1, kh, kw, b * c * mult]);
    const summed = tf.sum(tf.reshape(r, [kh, kw, b, c * mult]), 2); // over the batch
    return tf.reshape(summed, [kh, kw, c, mult]);
  });
}

// ---------------------------------------------------------------------------
// DepthwiseConv2dNativeBackpropInput

function depthwiseBackpropInput(args: KernelArgs): tf.TensorInfo {
  const backend = requireBackend(args.backend);
  const attrs = args.attrs ?? {};
  const dy = requireInput(args.inputs, "dy");
  const filter = requireInput(args.inputs, "filter");
  assertUnitDilation(attrs, "DepthwiseConv2dNativeBackpropInput");
  const inputShape = readShape4(attrs, "inputShape");
  const fShape = shape4(filter, "filter");
  const info = tf.backend_util.computeConv2DInfo(
    inputShape, fShape, readPair(attrs, "strides"), 1, readPad(attrs), readRounding(attrs), true,
  );
  const { batchSize: b, inHeight: h, inWidth: w, inChannels: c, outHeight: oh, outWidth: ow } = info;
  const { filterHeight: kh, filterWidth: kw, strideHeight: sH, strideWidth: sW } = info;
  const mult = fShape[3];
  // dx[i] = sum_k dyz[i + pT - k] * w[k] = correlation of the zero-inserted
  // dy with the flipped filter, padded by (k-1-pT) in front; the back pad
  // makes the output exactly h rows (negative = crop trailing zeros).
  const top = kh - 1 - info.padInfo.top;
  const left = kw - 1 - info.padInfo.left;
  const bottom = h + info.padInfo.top - oh * sH;
  const right = w + info.padInfo.left - ow * sW;

  return runComposite(backend, [dy, filter], (dyt, ft) => {
    let z = zeroInsert(dyt as tf.Tensor4D, sH, sW);
    // Only negative pads need an explicit (JS-side) crop; positive ones go
    // straight into the conv's explicit padding.
    if (top < 0 || bottom < 0 || left < 0 || right < 0) {
      z = crop4(z, Math.max(0, -top), Math.max(0, -bottom), Math.max(0, -left), Math.max(0, -right));
    }
    const pad: tf.backend_util.ExplicitPadding = [
      [0, 0], [Math.max(0, top), Math.max(0, bottom)], [Math.max(0, left), Math.max(0, right)], [0, 0],
    ];
    const flipped = tf.reshape(tf.reverse(ft, [0, 1]), [kh, kw, c * mult, 1]) as tf.Tensor4D;
    const full = tf.depthwiseConv2d(z, flipped, 1, pad); // [b, h, w, c*mult]
    if (mult === 1) return full;
    return tf.sum(tf.reshape(full, [b, h, w, c, mult]), 4);
  });
}

// ---------------------------------------------------------------------------
// Conv2DBackpropInput (replacement)
//
// wasm does ship this kernel, but as a plain C++ loop that measured 4-11x
// slower than the forward conv on our shapes (e.g. 150-190 ms vs 17 ms for
// [32,32,32,16]->32). As a stride-1 XNNPACK conv of the zero-inserted dy with
// the flipped, in/out-swapped filter it costs about one forward conv (stride
// 1) or one full-resolution conv (stride 2, 3/4 of the taps hit zeros).

/** The kernel wasm registered itself, kept for the cases we delegate (NCHW). */
let nativeConv2DBackpropInput: tf.KernelConfig | undefined;

function conv2DBackpropInput(args: KernelArgs): tf.TensorInfo | tf.TensorInfo[] {
  const attrs = args.attrs ?? {};
  if (attrs.dataFormat === "NCHW") {
    if (nativeConv2DBackpropInput == null) throw new Error("wasm Conv2DBackpropInput: NCHW needs the native kernel");
    return nativeConv2DBackpropInput.kernelFunc(args);
  }
  const backend = requireBackend(args.backend);
  const dy = requireInput(args.inputs, "dy");
  const filter = requireInput(args.inputs, "filter");
  const inputShape = readShape4(attrs, "inputShape");
  const info = tf.backend_util.computeConv2DInfo(
    inputShape, shape4(filter, "filter"), readPair(attrs, "strides"), 1, readPad(attrs), readRounding(attrs), false,
  );
  const { inHeight: h, inWidth: w, outHeight: oh, outWidth: ow } = info;
  const { filterHeight: kh, filterWidth: kw, strideHeight: sH, strideWidth: sW } = info;
  // Same geometry as in depthwiseBackpropInput above.
  const top = kh - 1 - info.padInfo.top;
  const left = kw - 1 - info.padInfo.left;
  const bottom = h + info.padInfo.top - oh * sH;
  const right = w + info.padInfo.left - ow * sW;

  return runComposite(backend, [dy, filter], (dyt, ft) => {
    let z = zeroInsert(dyt as tf.Tensor4D, sH, sW);
    if (top < 0 || bottom < 0 || left < 0 || right < 0) {
      z = crop4(z, Math.max(0, -top), Math.max(0, -bottom), Math.max(0, -left), Math.max(0, -right));
    }
    const pad: tf.backend_util.ExplicitPadding = [
      [0, 0], [Math.max(0, top), Math.max(0, bottom)], [Math.max(0, left), Math.max(0, right)], [0, 0],
    ];
    // [kh, kw, co, ci], spatially flipped.
    const flipped = tf.transpose(tf.reverse(ft, [0, 1]), [0, 1, 3, 2]) as tf.Tensor4D;
    return tf.conv2d(z, flipped, 1, pad);
  });
}

// ---------------------------------------------------------------------------
// FusedBatchNorm gradient (replacement, not a kernel)
//
// tfjs-core's gradient for FusedBatchNorm materialises 1/sqrt(var+eps) at
// the full activation size with tf.tile before multiplying by dy. wasm's
// Tile is a generic per-element index loop: 117 ms for [32,64,64,16], a
// third of a whole baseline training step, while the same multiply with
// broadcasting takes 7 ms. This is the same math without the tile. Gradients
// are global (not per backend), which is fine: the results are identical.

/** tfjs-core's NamedGradientMap (not re-exported by @tensorflow/tfjs). */
type GradientMap = { [inputName: string]: () => tf.Tensor };

function fusedBatchNormGrad(dy: tf.Tensor | tf.Tensor[], saved: tf.Tensor[], attrs: tf.NamedAttrMap): GradientMap {
  if (Array.isArray(dy)) throw new Error("FusedBatchNorm gradient: expected a single dy");
  const eps = attrs.varianceEpsilon;
  if (typeof eps !== "number") throw new Error("FusedBatchNorm gradient: varianceEpsilon must be a number");
  const [x, mean, variance, scale] = saved;
  const scaleValue: tf.Tensor = scale ?? tf.scalar(1);
  // Axes over which mean/variance were broadcast, i.e. those to sum over.
  const axes = tf.backend_util.getReductionAxes(mean.shape, x.shape);
  const reduce = (t: tf.Tensor): tf.Tensor => tf.reshape(axes.length > 0 ? tf.sum(t, axes) : t, mean.shape);
  const invStd = tf.rsqrt(tf.add(variance, tf.scalar(eps)));
  const xMinusMean = tf.sub(x, mean);
  const dyScaled = tf.mul(dy, scaleValue);
  return {
    x: () => tf.reshape(tf.mul(dyScaled, invStd), x.shape),
    mean: () => reduce(tf.mul(dyScaled, tf.neg(invStd))),
    variance: () => reduce(tf.mul(tf.mul(xMinusMean, dyScaled), tf.mul(tf.mul(tf.mul(invStd, invStd), invStd), tf.scalar(-0.5)))),
    scale: () => reduce(tf.mul(dy, tf.mul(xMinusMean, invStd))),
    offset: () => reduce(dy),
  };
}

function registerFastBatchNormGrad(): void {
  const current = tf.getGradient("FusedBatchNorm");
  if (current != null && current.gradFunc === fusedBatchNormGrad) return;
  // registerGradient warns "Overriding the gradient for 'FusedBatchNorm'" on
  // every process start; the override is intended, so mute tfjs' log briefly.
  const env = tf.env();
  const prod = env.getBool("PROD");
  env.set("PROD", true);
  try {
    tf.registerGradient({
      kernelName: "FusedBatchNorm",
      inputsToSave: ["x", "mean", "variance", "scale"],
      gradFunc: fusedBatchNormGrad,
    });
  } finally {
    env.set("PROD", prod);
  }
}

// ---------------------------------------------------------------------------

const KERNELS: tf.KernelConfig[] = [
  { kernelName: "Conv2DBackpropFilter", backendName: "wasm", kernelFunc: conv2DBackpropFilter },
  { kernelName: "DepthwiseConv2dNativeBackpropFilter", backendName: "wasm", kernelFunc: depthwiseBackpropFilter },
  { kernelName: "DepthwiseConv2dNativeBackpropInput", backendName: "wasm", kernelFunc: depthwiseBackpropInput },
];

export interface WasmGradKernelOptions {
  /**
   * Also replace wasm's own (slow, scalar C++) Conv2DBackpropInput with the
   * XNNPACK-based composite above. Default true; false restores the native one.
   */
  fastConv2DBackpropInput?: boolean;
  /**
   * Also replace tfjs-core's FusedBatchNorm gradient with the tile-free one
   * above (global, all backends, same results). Default true; once replaced
   * it stays for the process (tfjs has no unregisterGradient).
   */
  fastBatchNormGrad?: boolean;
}

/**
 * Registers the missing wasm gradient kernels and (by default) swaps in the
 * faster Conv2DBackpropInput and FusedBatchNorm gradient. Idempotent; a
 * missing-kernel slot that is already filled for wasm (by us earlier, or by
 * a future tfjs release that ships its own) is left alone. Works before or after tf.setBackend("wasm"),
 * but @tensorflow/tfjs-backend-wasm must have been imported first.
 */
export function registerWasmGradKernels(opts: WasmGradKernelOptions = {}): void {
  for (const k of KERNELS) {
    if (tf.getKernel(k.kernelName, k.backendName) == null) tf.registerKernel(k);
  }
  const want = opts.fastConv2DBackpropInput ?? true;
  const current = tf.getKernel("Conv2DBackpropInput", "wasm");
  const oursActive = current != null && current.kernelFunc === conv2DBackpropInput;
  if (want && !oursActive) {
    nativeConv2DBackpropInput = current ?? undefined;
    if (current != null) tf.unregisterKernel("Conv2DBackpropInput", "wasm");
    // Keep the native setupFunc: it cwraps the C++ function our NCHW path
    // delegates to, and the engine runs it when the wasm backend initializes.
    tf.registerKernel({
      kernelName: "Conv2DBackpropInput",
      backendName: "wasm",
      kernelFunc: conv2DBackpropInput,
      setupFunc: current?.setupFunc,
      disposeFunc: current?.disposeFunc,
    });
  } else if (!want && oursActive && nativeConv2DBackpropInput != null) {
    tf.unregisterKernel("Conv2DBackpropInput", "wasm");
    tf.registerKernel(nativeConv2DBackpropInput);
  }
  if (opts.fastBatchNormGrad ?? true) registerFastBatchNormGrad();
}

/** Kernel names this module provides (for tests and diagnostics). */
export const WASM_GRAD_KERNEL_NAMES: readonly string[] = [...KERNELS.map((k) => k.kernelName), "Conv2DBackpropInput"];
