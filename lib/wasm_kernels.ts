/**
 * Gradient kernels that @tensorflow/tfjs-backend-wasm 4.22 does not ship
 * (tensorflow/tfjs#8474): without them any conv net fails on the first backward
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
 * - Conv2DBackpropInput: wasm ships it as a scalar C++ loop, several times
 *   slower than the forward conv; we run it as an XNNPACK conv instead.
 * - the FusedBatchNorm gradient (tfjs-core, all backends): same math without
 *   a full-size tf.tile, a large share of a wasm step.
 *
 * Only NHWC with dilation 1 is handled for the depthwise kernels (that is all
 * tfjs' own gradient functions ever request); Conv2DBackpropFilter also takes
 * NCHW by transposing, Conv2DBackpropInput hands NCHW to the native kernel.
 *
 * For CPU training speed, each found in the per-kernel profile of
 * bench/train_step.ts (figures in bench/README.md), most on top of
 * lib/wasm_simd (SIMD C kernels that run inside tfjs-wasm's own heap, split
 * across threads when tfjs-wasm runs threaded: lib/backend.ts):
 * - direct SIMD conv gradients: the filter gradient (any stride, co % 4 == 0)
 *   and the input gradient (stride 1, ci % 4 == 0) as register-blocked GEMMs,
 *   and the depthwise filter gradient (multiplier 1); the XNNPACK composites
 *   above remain for every other case; filter gradients are summed over parts
 *   of the batch, a fixed number of them, so threads never share an output
 *   cache line and the bits do not depend on the thread count;
 * - ArAdam: tfjs' Adam update of one variable as one kernel (lib/adam.ts);
 * - MaxPoolGrad in SIMD with tfjs-cpu's tie rule (tfjs-wasm's is a scalar loop);
 * - Sum/Mean over leading axes without tfjs-wasm's full transpose, and
 *   FusedBatchNorm in SIMD: bit-identical to tfjs-wasm's own (inference path);
 * - zero-copy Identity and same-dtype Cast (the engine clones every tensor it
 *   saves for backprop; tfjs-wasm copied each one);
 * - Add/Sub/Multiply/RealDiv, Square, Sqrt, Relu and ClipByValue on the calling
 *   thread: bit-identical to XNNPACK's, without a round trip through tfjs'
 *   thread pool per call (what kept a second thread from helping);
 * - gradients: batchnorm from two per-channel sums in one pass, the Mean
 *   gradient written in one pass;
 * - withoutInputGradients(): no input gradient for the first conv (the fused
 *   conv's customGrad always computed it, for the image batch).
 * setSimdKernelsEnabled(false) turns all of that off (tfjs' own kernels).
 */
import * as tf from "@tensorflow/tfjs";
import { isWasmBackend, simdKernels, type Simd, type WasmBackendLike } from "./wasm_simd/index.ts";
import { splitRange, taperedRanges } from "./wasm_simd/pool.ts";
import type { FnName } from "./wasm_simd/pool_layout.ts";

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

/** The named inputs of a kernel call, in the order asked, each one required. */
function inputsOf(args: KernelArgs, ...names: string[]): tf.TensorInfo[] {
  return names.map((n) => requireInput(args.inputs, n));
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

/**
 * The input gradient as a stride-1 correlation: dy with stride-1 zeros inserted, then padded by
 * (top, bottom, left, right). Only negative pads need an explicit (JS-side) crop; positive ones
 * go straight into the conv's explicit padding.
 */
function dilateAndPad(
  dy: tf.Tensor4D, sH: number, sW: number, top: number, bottom: number, left: number, right: number,
): { z: tf.Tensor4D; pad: tf.backend_util.ExplicitPadding } {
  let z = zeroInsert(dy, sH, sW);
  if (top < 0 || bottom < 0 || left < 0 || right < 0) {
    z = crop4(z, Math.max(0, -top), Math.max(0, -bottom), Math.max(0, -left), Math.max(0, -right));
  }
  const pad = spatialPadding(Math.max(0, top), Math.max(0, bottom), Math.max(0, left), Math.max(0, right));
  return { z, pad };
}

/** NHWC explicit padding of the two spatial axes. */
function spatialPadding(top: number, bottom: number, left: number, right: number): tf.backend_util.ExplicitPadding {
  return [[0, 0], [top, bottom], [left, right], [0, 0]];
}

// ---------------------------------------------------------------------------
// Conv2D / FusedConv2D forward, stride 1

/**
 * The forward convolution on our thread pool (kernels.c conv2d_forward: XNNPACK's accumulation order,
 * so the same bits as tfjs-wasm's own): stride 1, dilation 1, NHWC, co % 4 == 0, a linear fused
 * activation, at most a bias, when our pool has the threads. Anything else (the backbones' strided and relu6
 * convs) is tfjs-wasm's.
 */
function conv2DForward(name: "Conv2D" | "FusedConv2D", args: KernelArgs): tf.TensorInfo | tf.TensorInfo[] {
  const attrs = args.attrs ?? {};
  const [x, filter] = inputsOf(args, "x", "filter");
  const bias = args.inputs.bias as tf.TensorInfo | undefined;
  const activation = attrs.activation ?? "linear";
  const plain = activation === "linear" && args.inputs.preluActivationWeights == null && attrs.dataFormat !== "NCHW";
  const [dH, dW] = readPair(attrs, "dilations", 1);
  const [sH, sW] = readPair(attrs, "strides");
  const ours = plain && dH === 1 && dW === 1 && sH === 1 && sW === 1 ? simdFor(args.backend, x, filter, bias) : null;
  // Where XNNPACK's pool has the threads (a backbone), its convs stay there: waking our pool between its
  // calls made a backbone's forward pass slower on two threads, not faster.
  const s = ours != null && (ours.ownsThreads || ours.threads === 1 || ours.forced === true) ? ours : null;
  const filterShape = shape4(filter, "filter");
  const biasFits = bias == null || sizeOf(bias.shape) === filterShape[3];
  if (s == null || filterShape[3] % 4 !== 0 || x.shape.length !== 4 || !biasFits) return delegate(name, args);
  const info = tf.backend_util.computeConv2DInfo(
    shape4(x, "x"), filterShape, [1, 1], 1, readPad(attrs), readRounding(attrs), false,
  );
  const { batchSize, inHeight: h, inWidth: w, inChannels: ci, outHeight: oh, outWidth: ow, outChannels: co } = info;
  const y = s.b.makeOutput([batchSize, oh, ow, co], "float32");
  const work = (batchSize * oh * ow * co * info.filterHeight * info.filterWidth * ci) / 8;
  const parts = imageParts(s, batchSize, work);
  s.run("conv2d_forward", parts.map(([b0, b1]) => [
    at(s.b, x), at(s.b, filter), bias == null ? 0 : at(s.b, bias), at(s.b, y), h, w, ci, oh, ow, co,
    info.filterHeight, info.filterWidth, info.padInfo.top, info.padInfo.left, b0, b1,
  ]));
  return y;
}

// ---------------------------------------------------------------------------
// Conv2DBackpropFilter

function conv2DBackpropFilter(args: KernelArgs): tf.TensorInfo {
  const backend = requireBackend(args.backend);
  const attrs = args.attrs ?? {};
  const [x, dy] = inputsOf(args, "x", "dy");
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

  // direct SIMD filter gradient: a register-blocked GEMM over the output
  // pixels (kernels.c), faster than the XNNPACK formulation below, whose
  // 'filter' is the whole dy (repacked on every call).
  const s = channelsLast && info.outChannels % 4 === 0 ? simdFor(backend, x, dy) : null;
  if (s != null) {
    const { batchSize, inChannels: ci, outChannels: co } = info;
    const work = (sizeOf(dy.shape) * kh * kw * ci) / 8;
    return filterGradOverImages(s, "conv2d_filter_grad", batchSize, filterShape, work, (b0, b1, dw) => [
      at(s.b, x), at(s.b, dy), dw, h, w, ci, oh, ow, co, kh, kw, sH, sW, top, left, b0, b1,
    ]);
  }

  return runComposite(backend, [x, dy], (xt, dyt) => {
    // [ci, h, w, b]: input channels become the batch, the batch the channels.
    const xT = tf.transpose(xt, channelsLast ? [3, 1, 2, 0] : [1, 2, 3, 0]) as tf.Tensor4D;
    // [oh, ow, b, co]: dy becomes a (huge, dilated) filter.
    const dyF = tf.transpose(dyt, channelsLast ? [1, 2, 0, 3] : [2, 3, 0, 1]) as tf.Tensor4D;
    const pad = spatialPadding(top, Math.max(0, bottom), left, Math.max(0, right));
    let r = tf.conv2d(xT, dyF, 1, pad, "NHWC", [sH, sW]);
    if (bottom < 0 || right < 0) r = tf.slice(r, [0, 0, 0, 0], [info.inChannels, kh, kw, info.outChannels]);
    return tf.transpose(r, [1, 2, 0, 3]); // -> [kh, kw, ci, co]
  });
}

/**
 * Images per filter-gradient part: the batch is cut into this many parts (fewer for a smaller batch), each
 * part sums its images into its own buffer, and the buffers are added in part order (sum_rows). The count
 * never depends on the threads, so neither do the bits: 1 and 2 threads give the same gradient.
 */
const FILTER_GRAD_PARTS = 8;

/** Runs a filter-gradient kernel over parts of the batch and adds the parts' results in order. */
function filterGradOverImages(
  s: SimdCall, fn: "conv2d_filter_grad" | "depthwise_filter_grad", batch: number, filterShape: Shape4, work: number,
  args: (b0: number, b1: number, dw: number) => number[],
): tf.TensorInfo {
  const size = sizeOf(filterShape);
  const dw = s.b.makeOutput([...filterShape], "float32");
  const images = splitRange(batch, Math.min(batch, FILTER_GRAD_PARTS));
  if (images.length === 1) {
    s.run(fn, [args(0, batch, at(s.b, dw))]);
    return dw;
  }
  const partial = s.b.makeOutput([images.length, size], "float32");
  const base = at(s.b, partial);
  const parts = images.map(([b0, b1], i) => args(b0, b1, base + 4 * i * size));
  runFixedParts(s, fn, parts, work);
  s.run("sum_rows", splitRange(size, partsFor(s, images.length * size), LINE).map(([c0, c1]) => [
    base, at(s.b, dw), images.length, size, c0, c1, 0,
  ]));
  s.b.disposeData(partial.dataId);
  return dw;
}

// ---------------------------------------------------------------------------
// DepthwiseConv2dNativeBackpropFilter

/** The geometry of a depthwise gradient call; only dilation 1 (all that tfjs' own gradients request). */
function depthwiseInfo(attrs: tf.NamedAttrMap, kernel: string, inShape: Shape4, filterShape: Shape4) {
  const [dH, dW] = readPair(attrs, "dilations", 1);
  if (dH !== 1 || dW !== 1) {
    throw new Error(`wasm ${kernel}: dilations other than 1 are not supported (got ${dH},${dW})`);
  }
  const strides = readPair(attrs, "strides");
  return tf.backend_util.computeConv2DInfo(inShape, filterShape, strides, 1, readPad(attrs), readRounding(attrs), true);
}

function depthwiseBackpropFilter(args: KernelArgs): tf.TensorInfo {
  const backend = requireBackend(args.backend);
  const attrs = args.attrs ?? {};
  const [x, dy] = inputsOf(args, "x", "dy");
  const filterShape = readShape4(attrs, "filterShape");
  const info = depthwiseInfo(attrs, "DepthwiseConv2dNativeBackpropFilter", shape4(x, "x"), filterShape);
  const { batchSize: b, inHeight: h, inWidth: w, inChannels: c, outHeight: oh, outWidth: ow } = info;
  const { filterHeight: kh, filterWidth: kw, strideHeight: sH, strideWidth: sW } = info;
  const mult = filterShape[3];
  const top = info.padInfo.top;
  const left = info.padInfo.left;
  const bottom = kh + (oh - 1) * sH - h - top;
  const right = kw + (ow - 1) * sW - w - left;

  // direct SIMD depthwise filter gradient (multiplier 1): products along
  // channels accumulated over each row (kernels.c), instead of a depthwise
  // conv over batch*channels with the whole dy as filter.
  const s = mult === 1 ? simdFor(backend, x, dy) : null;
  if (s != null) {
    const work = (sizeOf(dy.shape) * kh * kw) / 4;
    return filterGradOverImages(s, "depthwise_filter_grad", b, filterShape, work, (b0, b1, dw) => [
      at(s.b, x), at(s.b, dy), dw, h, w, c, oh, ow, kh, kw, sH, sW, top, left, b0, b1,
    ]);
  }

  return runComposite(backend, [x, dy], (xt, dyt) => {
    // Every (b, c) pair is one depthwise channel: input [1, h, w, b*c],
    // filter [oh, ow, b*c, mult] (dy's channel index is c*mult + m).
    const xT = tf.reshape(tf.transpose(xt, [1, 2, 0, 3]), [1, h, w, b * c]) as tf.Tensor4D;
    const dyF = tf.reshape(tf.transpose(dyt, [1, 2, 0, 3]), [oh, ow, b * c, mult]) as tf.Tensor4D;
    const pad = spatialPadding(top, Math.max(0, bottom), left, Math.max(0, right));
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
  const [dy, filter] = inputsOf(args, "dy", "filter");
  const inputShape = readShape4(attrs, "inputShape");
  const fShape = shape4(filter, "filter");
  const info = depthwiseInfo(attrs, "DepthwiseConv2dNativeBackpropInput", inputShape, fShape);
  if (skipsInputGrad(filter)) {
    const z = zerosLike(args, inputShape);
    if (z != null) return z;
  }
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
    const { z, pad } = dilateAndPad(dyt as tf.Tensor4D, sH, sW, top, bottom, left, right);
    const flipped = tf.reshape(tf.reverse(ft, [0, 1]), [kh, kw, c * mult, 1]) as tf.Tensor4D;
    const full = tf.depthwiseConv2d(z, flipped, 1, pad); // [b, h, w, c*mult]
    if (mult === 1) return full;
    return tf.sum(tf.reshape(full, [b, h, w, c, mult]), 4);
  });
}

// ---------------------------------------------------------------------------
// Conv2DBackpropInput (replacement)
//
// wasm does ship this kernel, but as a plain C++ loop, several times slower
// than the forward conv on our shapes. As a stride-1 XNNPACK conv of the
// zero-inserted dy with the flipped, in/out-swapped filter it costs about one
// forward conv (stride 1) or one full-resolution conv (stride 2, 3/4 of the
// taps hit zeros).

function conv2DBackpropInput(args: KernelArgs): tf.TensorInfo | tf.TensorInfo[] {
  const attrs = args.attrs ?? {};
  if (skipsInputGrad(requireInput(args.inputs, "filter"))) {
    const z = zerosLike(args, readShape4(attrs, "inputShape"));
    if (z != null) return z;
  }
  if (attrs.dataFormat === "NCHW") return delegate("Conv2DBackpropInput", args);
  const backend = requireBackend(args.backend);
  const [dy, filter] = inputsOf(args, "dy", "filter");
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

  // direct SIMD input gradient (stride 1): register-blocked like the filter
  // gradient (kernels.c); skips the flip and the XNNPACK operator set-up.
  const s = sH === 1 && sW === 1 && info.inChannels % 4 === 0 ? simdFor(backend, dy, filter) : null;
  if (s != null) {
    const ft = runComposite(backend, [filter], (f) => tf.transpose(f, [0, 1, 3, 2])); // [kh, kw, co, ci]
    try {
      const dx = s.b.makeOutput([...inputShape], "float32");
      const { batchSize, inChannels: ci, outChannels: co } = info;
      const parts = imageParts(s, batchSize, (sizeOf(inputShape) * kh * kw * co) / 8);
      s.run("conv2d_input_grad", parts.map(([b0, b1]) => [
        at(s.b, dy), at(s.b, ft), at(s.b, dx), batchSize, h, w, ci, oh, ow, co, kh, kw,
        info.padInfo.top, info.padInfo.left, b0, b1,
      ]));
      return dx;
    } finally {
      ft.dispose();
    }
  }

  return runComposite(backend, [dy, filter], (dyt, ft) => {
    const { z, pad } = dilateAndPad(dyt as tf.Tensor4D, sH, sW, top, bottom, left, right);
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
// Tile is a generic per-element index loop, many times slower than the same
// multiply with broadcasting. This is the same math without the tile.
// Gradients are global (not per backend), which is fine: the results are
// identical.

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
  const invStd = tf.rsqrt(tf.add(variance, tf.scalar(eps)));
  const k = tf.mul(scaleValue, invStd); // d out / d x along the direct path
  // Every parameter gradient is a per-channel scaling of two sums:
  //   s1 = sum(dy), s2 = sum(dy * (x - mean))
  // bn-grad sums in one pass: one SIMD kernel reads x and dy once on wasm,
  // instead of four full-size products and four reductions.
  let s1: tf.Tensor, s2: tf.Tensor;
  const c = x.shape[x.rank - 1];
  const channelsLast = axes.length === x.rank - 1 && axes.every((a, i) => a === i) && mean.size === c;
  if (channelsLast && x.dtype === "float32" && onSimdWasm()) {
    const both = tf.engine().runKernel("ArBnGradSums", { x, dy, mean: tf.reshape(mean, [c]) }, {}) as tf.Tensor;
    [s1, s2] = tf.unstack(both).map((t) => tf.reshape(t, mean.shape));
  } else {
    const reduce = (t: tf.Tensor): tf.Tensor => tf.reshape(axes.length > 0 ? tf.sum(t, axes) : t, mean.shape);
    s1 = reduce(dy);
    s2 = reduce(tf.mul(dy, tf.sub(x, mean)));
  }
  return {
    x: () => tf.reshape(tf.mul(dy, k), x.shape),
    mean: () => tf.reshape(tf.neg(tf.mul(k, s1)), mean.shape),
    variance: () => {
      const invStd3 = tf.mul(tf.mul(invStd, invStd), invStd);
      return tf.reshape(tf.mul(tf.mul(s2, scaleValue), tf.mul(invStd3, tf.scalar(-0.5))), mean.shape);
    },
    scale: () => tf.reshape(tf.mul(s2, invStd), mean.shape),
    offset: () => tf.reshape(s1, mean.shape),
  };
}

/** tf.registerGradient without tfjs' "Overriding the gradient" warning (the override is intended). */
function quietRegisterGradient(config: tf.GradConfig): void {
  const env = tf.env();
  const prod = env.getBool("PROD");
  env.set("PROD", true);
  try {
    tf.registerGradient(config);
  } finally {
    env.set("PROD", prod);
  }
}

function registerFastBatchNormGrad(): void {
  const current = tf.getGradient("FusedBatchNorm");
  if (current != null && current.gradFunc === fusedBatchNormGrad) return;
  const inputsToSave = ["x", "mean", "variance", "scale"];
  quietRegisterGradient({ kernelName: "FusedBatchNorm", inputsToSave, gradFunc: fusedBatchNormGrad });
}

// ---------------------------------------------------------------------------
// Replacements backed by the in-heap SIMD kernels (lib/wasm_simd/kernels.c),
// found by profiling the baseline training step (bench/train_step.ts). Each
// one handles the common case and hands everything else to the kernel tfjs
// registered (kept in `native`), so behaviour outside the fast path is
// unchanged. The inference-path ones (Identity, Cast, Sum, Mean,
// FusedBatchNorm) are exact: same bits as tfjs-wasm's own kernels (tested),
// so evaluate() numbers cannot move.

/** The kernels tfjs-wasm registered, for the cases we delegate. */
const native = new Map<string, tf.KernelConfig>();

function delegate(name: string, args: KernelArgs): tf.TensorInfo | tf.TensorInfo[] {
  const k = native.get(name);
  if (k == null) throw new Error(`wasm ${name}: no native kernel to delegate to`);
  return k.kernelFunc(args);
}

/** The SIMD kernels bound to one call: `b` is the backend whose heap they work in. */
type SimdCall = Simd & { b: WasmBackendLike };

/** The SIMD kernels and the backend, when this call can use them. */
function simdFor(backend: unknown, ...infos: (tf.TensorInfo | undefined)[]): SimdCall | null {
  if (!isWasmBackend(backend)) return null;
  for (const t of infos) if (t != null && t.dtype !== "float32") return null;
  const simd = simdKernels(backend);
  return simd == null ? null : { k: simd.k, run: simd.run, threads: simd.threads, forced: simd.forced,
    ownsThreads: simd.ownsThreads, b: backend };
}

const sizeOf = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1);

/**
 * Parts to split a kernel call into: a few per thread, claimed by whichever thread is free (pool.ts),
 * so a helper that starts late costs only its last part; but only for calls with at least ~0.1 ms of
 * work (`work` ~ elements touched, or multiply-adds / 8): below that, waking a helper thread costs
 * more than it saves.
 */
function partsFor(s: { threads: number; forced?: boolean }, work: number): number {
  if (s.forced === true) return s.threads;
  return s.threads > 1 && work >= 1 << 18 ? s.threads * PARTS_PER_THREAD : 1;
}
const PARTS_PER_THREAD = 4;

/**
 * Image ranges of a convolution split by image, whose bits do not depend on the split: tapered shares
 * (taperedRanges), so that a thread done early waits for one small part of the other's, not a quarter of its
 * share. A forced split (tests) keeps its count.
 */
function imageParts(s: { threads: number; forced?: boolean }, batch: number, work: number): [number, number][] {
  const parts = partsFor(s, work);
  return parts > 1 && s.forced !== true ? taperedRanges(batch, s.threads) : splitRange(batch, parts);
}
/**
 * Floats per cache line: kernels that split columns (sum_rows, bn_grad_sums) write their running totals
 * many times per call, so two threads must never share a line of them; 16-column parts (one 64-byte line)
 * keep them apart. A narrower tensor is not split.
 */
const LINE = 16;

/**
 * Runs a fixed number of parts (their count keeps the bits the same on any thread count): across the pool
 * when the call has the work for it (`work` as for partsFor), else one after the other on this thread.
 */
function runFixedParts(s: SimdCall, fn: FnName, parts: number[][], work: number): void {
  if (partsFor(s, work) > 1) s.run(fn, parts);
  else for (const p of parts) s.run(fn, [p]); // too small to wake a helper
}

/** Byte offset of a tensor in the wasm heap. */
function at(b: WasmBackendLike, t: tf.TensorInfo): number {
  return b.getMemoryOffset(t.dataId);
}

// zero-copy Identity/Cast: tfjs-wasm copies the whole buffer for Identity and
// for a Cast to the same dtype; the engine clones (Identity) every tensor it
// saves for the backward pass, dozens of full-size copies per step. Tensors
// are immutable, so sharing the buffer (refcounted, like Reshape already does)
// is exact.
function identity(args: KernelArgs): tf.TensorInfo | tf.TensorInfo[] {
  const x = requireInput(args.inputs, "x");
  const s = x.dtype === "string" ? null : simdFor(args.backend);
  if (s == null) return delegate("Identity", args);
  s.b.incRef(x.dataId);
  return { dataId: x.dataId, shape: [...x.shape], dtype: x.dtype };
}

function cast(args: KernelArgs): tf.TensorInfo | tf.TensorInfo[] {
  const x = requireInput(args.inputs, "x");
  const s = args.attrs?.dtype !== x.dtype || x.dtype === "string" ? null : simdFor(args.backend);
  if (s == null) return delegate("Cast", args);
  s.b.incRef(x.dataId);
  return { dataId: x.dataId, shape: [...x.shape], dtype: x.dtype };
}

/** n when `axes` are exactly the leading axes 0, 1, .., n-1 of a rank-r tensor, with 0 < n < r; else 0. */
function leadingAxes(axis: unknown, shape: number[]): number {
  if (!(typeof axis === "number" || isNumberArray(axis))) return 0;
  // In the given order: tfjs-wasm sums in the order the axes are listed, and
  // only ascending order is the row-major order sum_rows uses (same bits).
  const axes = tf.util.parseAxisParam(axis, shape);
  if (axes.length === 0 || axes.length >= shape.length) return 0;
  return axes.every((a, i) => a === i) ? axes.length : 0;
}

// channel reduction without transpose: a per-channel Sum/Mean of NHWC data
// (batchnorm statistics and every bias/batchnorm gradient) makes tfjs-wasm
// transpose the whole tensor to [C, N*H*W] first; sum_rows reads it in place.
function reduceLeading(name: "Sum" | "Mean", args: KernelArgs): tf.TensorInfo | tf.TensorInfo[] {
  const x = requireInput(args.inputs, "x");
  const s = simdFor(args.backend, x);
  const n = s == null ? 0 : leadingAxes(args.attrs?.axis, x.shape);
  if (s == null || n === 0 || sizeOf(x.shape) === 0) return delegate(name, args);
  const rows = sizeOf(x.shape.slice(0, n));
  const cols = sizeOf(x.shape.slice(n));
  const outShape = args.attrs?.keepDims === true ? x.shape.map((d, i) => (i < n ? 1 : d)) : x.shape.slice(n);
  const out = s.b.makeOutput(outShape, "float32");
  // threads split the columns: each column is still summed in row order (same bits)
  const mean = name === "Mean" ? 1 : 0;
  const parts = splitRange(cols, partsFor(s, rows * cols), LINE);
  s.run("sum_rows", parts.map(([c0, c1]) => [at(s.b, x), at(s.b, out), rows, cols, c0, c1, mean]));
  return out;
}

// MaxPoolGrad in SIMD: tfjs-wasm's own is a scalar loop many times slower than
// the forward pool (the largest item of a baseline step). Same semantics as
// tfjs-cpu: first maximum of each window gets the gradient (see kernels.c).
function maxPoolGrad(args: KernelArgs): tf.TensorInfo | tf.TensorInfo[] {
  const [dy, x] = inputsOf(args, "dy", "input");
  const s = simdFor(args.backend, dy, x);
  if (s == null || x.shape.length !== 4 || sizeOf(x.shape) === 0) return delegate("MaxPoolGrad", args);
  const attrs = args.attrs ?? {};
  const info = tf.backend_util.computePool2DInfo(
    shape4(x, "input"), readPair(attrs, "filterSize"), readPair(attrs, "strides"), 1, readPad(attrs),
    readRounding(attrs),
  );
  const dx = s.b.makeOutput([...x.shape], "float32");
  const { batchSize, inHeight, inWidth, inChannels, outHeight, outWidth, filterHeight, filterWidth } = info;
  s.run("maxpool_grad", splitRange(batchSize, partsFor(s, sizeOf(x.shape))).map(([b0, b1]) => [
    at(s.b, x), at(s.b, dy), at(s.b, dx), batchSize, inHeight, inWidth, inChannels, outHeight, outWidth,
    filterHeight, filterWidth, info.strideHeight, info.strideWidth, info.padInfo.top, info.padInfo.left, b0, b1,
  ]));
  return dx;
}

// batchnorm in SIMD: tfjs-wasm's FusedBatchNorm is a scalar loop with four
// modulo counters and a float64 division per element; same expression, same
// precision, same order, 4 lanes at a time (bit-identical: tested).
function fusedBatchNorm(args: KernelArgs): tf.TensorInfo | tf.TensorInfo[] {
  const { x, mean, variance, offset, scale } = args.inputs;
  const eps = args.attrs?.varianceEpsilon;
  if (x == null || mean == null || variance == null || typeof eps !== "number") return delegate("FusedBatchNorm", args);
  const s = simdFor(args.backend, x, mean, variance, offset, scale);
  const size = sizeOf(x.shape);
  const c = x.shape[x.shape.length - 1] ?? 0;
  const params = [mean, variance, scale, offset];
  const ok = (t: tf.TensorInfo | undefined) => t == null || sizeOf(t.shape) === c || sizeOf(t.shape) === 1;
  if (s == null || size === 0 || c === 0 || !params.every(ok)) return delegate("FusedBatchNorm", args);
  const out = s.b.makeOutput([...x.shape], "float32");
  const parts = splitRange(size / c, partsFor(s, size));
  const scratch = s.b.wasm._malloc(24 * c * parts.length); // 8-byte aligned; one region per part
  try {
    // Each parameter as (address, element count); an absent scale or offset is (0, 1).
    const refs = params.flatMap((t) => (t == null ? [0, 1] : [at(s.b, t), sizeOf(t.shape)]));
    s.run("batchnorm", parts.map(([r0, r1], p) => [
      at(s.b, x), at(s.b, out), size / c, c, ...refs, eps, scratch + 24 * c * p, r0, r1,
    ]));
  } finally {
    s.b.wasm._free(scratch);
  }
  return out;
}

// Element-wise Add/Sub/Multiply/RealDiv, Square, Sqrt, Relu, ClipByValue without the thread pool:
// tfjs-wasm runs each through XNNPACK on its pthreadpool, and in the threaded build every one of a
// step's hundreds of such calls, mostly tiny (Adam, batchnorm gradients), wakes the pool and waits for it:
// with two threads the wake-ups ate the second core's gain. The same operations per element as
// XNNPACK's, so the same bits (tested). Never split, whatever their size: they are bound by memory
// bandwidth, which a second thread adds little to, while a part on a helper that the OS parks (a busy
// machine) can hold the whole step for a scheduler slice.

const BINARY_OPS = { Add: 0, Sub: 1, Multiply: 2, RealDiv: 3 } as const;

function binary(name: keyof typeof BINARY_OPS, args: KernelArgs): tf.TensorInfo | tf.TensorInfo[] {
  const [a, b] = inputsOf(args, "a", "b");
  const s = simdFor(args.backend, a, b);
  if (s == null) return delegate(name, args);
  const [na, nb] = [sizeOf(a.shape), sizeOf(b.shape)];
  let out: number[];
  try {
    out = tf.backend_util.assertAndGetBroadcastShape(a.shape, b.shape);
  } catch {
    return delegate(name, args);
  }
  const n = sizeOf(out);
  const c = out[out.length - 1] ?? 1;
  /** A row of C values broadcast over every leading axis: [.., 1, C] against the output. */
  const isRow = (shape: number[], size: number) => size === c && shape[shape.length - 1] === c && n % c === 0;
  const mode = na === n && nb === n && a.shape.length === b.shape.length ? 0
    : na === n && nb === 1 ? 1 : nb === n && na === 1 ? 2
    : na === n && isRow(b.shape, nb) ? 3 : nb === n && isRow(a.shape, na) ? 4 : -1;
  if (mode < 0 || n === 0) return delegate(name, args);
  const result = s.b.makeOutput(out, "float32");
  const unit = mode >= 3 ? c : 4;
  s.run("binary_f32", splitRange(n, 1, unit).map(([i0, i1]) => [
    BINARY_OPS[name], at(s.b, a), at(s.b, b), at(s.b, result), mode, c, i0, i1,
  ]));
  return result;
}

/** ClipByValue (relu6 in the backbones) the way XNNPACK's clamp computes it (kernels.c). */
function clip(args: KernelArgs): tf.TensorInfo | tf.TensorInfo[] {
  const x = requireInput(args.inputs, "x");
  const [lo, hi] = [args.attrs?.clipValueMin, args.attrs?.clipValueMax];
  const s = simdFor(args.backend, x);
  const n = sizeOf(x.shape);
  const bounds = typeof lo === "number" && typeof hi === "number";
  if (s == null || n === 0 || !bounds) return delegate("ClipByValue", args);
  const out = s.b.makeOutput([...x.shape], "float32");
  s.run("clip_f32", splitRange(n, 1, 4).map(([i0, i1]) => [at(s.b, x), at(s.b, out), lo, hi, i0, i1]));
  return out;
}

/** Square as x * x: one IEEE multiply, what XNNPACK's square computes. */
function square(args: KernelArgs): tf.TensorInfo | tf.TensorInfo[] {
  const x = requireInput(args.inputs, "x");
  const s = simdFor(args.backend, x);
  const n = sizeOf(x.shape);
  if (s == null || n === 0) return delegate("Square", args);
  const out = s.b.makeOutput([...x.shape], "float32");
  s.run("binary_f32", splitRange(n, 1, 4).map(([i0, i1]) => [
    BINARY_OPS.Multiply, at(s.b, x), at(s.b, x), at(s.b, out), 0, 1, i0, i1,
  ]));
  return out;
}

/** Unary float32 kernels of kernels.c over the elements, split like the binary ones. */
function unary(name: string, fn: "relu_f32" | "sqrt_f32", args: KernelArgs): tf.TensorInfo | tf.TensorInfo[] {
  const x = requireInput(args.inputs, "x");
  const s = simdFor(args.backend, x);
  const n = sizeOf(x.shape);
  if (s == null || n === 0) return delegate(name, args);
  const out = s.b.makeOutput([...x.shape], "float32");
  s.run(fn, splitRange(n, 1, 4).map(([i0, i1]) => [at(s.b, x), at(s.b, out), i0, i1]));
  return out;
}


// Two helper kernels of our own, called from the gradients below.

/**
 * ArBroadcastRows: x [G * C] -> [...shape], seen as [G, group, C] rows of C, with out[g, r, c] = x[g, c] / group:
 * the gradient of a mean over the `group` rows of each of G groups (attrs columns = C, group).
 */
function broadcastRowsKernel(args: KernelArgs): tf.TensorInfo {
  const x = requireInput(args.inputs, "x");
  const { shape, columns: c, group } = args.attrs ?? {};
  if (!isNumberArray(shape) || typeof c !== "number" || typeof group !== "number") {
    throw new Error("ArBroadcastRows: attrs shape, columns and group are required");
  }
  const s = simdFor(args.backend, x);
  if (s == null) throw new Error("ArBroadcastRows: needs the wasm SIMD kernels");
  const rows = sizeOf(shape) / c;
  if (sizeOf(x.shape) * group !== sizeOf(shape)) {
    throw new Error(`ArBroadcastRows: [${x.shape}] does not fit [${shape}]`);
  }
  const out = s.b.makeOutput([...shape], "float32");
  const parts = splitRange(rows, partsFor(s, rows * c));
  s.run("broadcast_rows", parts.map(([r0, r1]) => [at(s.b, x), at(s.b, out), r0, r1, c, group]));
  return out;
}

/** ArReluGrad: dy, x (same shape) -> dy * step(x), ReLU's gradient in one pass (kernels.c relu_grad_f32). */
function reluGradKernel(args: KernelArgs): tf.TensorInfo {
  const [dy, x] = inputsOf(args, "dy", "x");
  const s = simdFor(args.backend, dy, x);
  if (s == null) throw new Error("ArReluGrad: needs the wasm SIMD kernels");
  const n = sizeOf(x.shape);
  if (sizeOf(dy.shape) !== n) throw new Error(`ArReluGrad: dy ${dy.shape} and x ${x.shape} differ in size`);
  const out = s.b.makeOutput([...x.shape], "float32");
  s.run("relu_grad_f32", splitRange(n, 1, 4).map(([i0, i1]) => [at(s.b, dy), at(s.b, x), at(s.b, out), i0, i1]));
  return out;
}

/** ArBnGradSums: x, dy [..., C], mean [C] -> [2, C]: sum(dy) and sum(dy * (x - mean)) per channel. */
function bnGradSumsKernel(args: KernelArgs): tf.TensorInfo {
  const [x, dy, mean] = inputsOf(args, "x", "dy", "mean");
  const s = simdFor(args.backend, x, dy, mean);
  if (s == null) throw new Error("ArBnGradSums: needs the wasm SIMD kernels");
  const c = sizeOf(mean.shape);
  const out = s.b.makeOutput([2, c], "float32");
  s.run("bn_grad_sums", splitRange(c, partsFor(s, 2 * sizeOf(x.shape)), LINE).map(([c0, c1]) => [
    at(s.b, x), at(s.b, dy), at(s.b, mean), at(s.b, out), sizeOf(x.shape) / c, c, c0, c1,
  ]));
  return out;
}

/**
 * Row parts of ArBnMoments: fixed, like FILTER_GRAD_PARTS, so the statistics' bits do not depend on the
 * thread count.
 */
const MOMENT_PARTS = 8;

/**
 * ArBnMoments: x [..., C] -> [mean, variance] per channel (the last axis), as tf.moments over every other
 * axis computes them, in two parallel passes (kernels.c channel_sums) instead of four kernels. The sums
 * run in a different order than tfjs' Mean: the same values to float rounding, not the same bits.
 */
function bnMomentsKernel(args: KernelArgs): tf.TensorInfo[] {
  const x = requireInput(args.inputs, "x");
  const s = simdFor(args.backend, x);
  if (s == null) throw new Error("ArBnMoments: needs the wasm SIMD kernels");
  const c = x.shape[x.shape.length - 1] ?? 1;
  const rows = sizeOf(x.shape) / c;
  const ranges = splitRange(rows, Math.min(rows, MOMENT_PARTS));
  const partial = s.b.makeOutput([ranges.length, c], "float32");
  const [mean, variance] = [s.b.makeOutput([c], "float32"), s.b.makeOutput([c], "float32")];
  for (const [stat, centre] of [[mean, 0], [variance, at(s.b, mean)]] as const) {
    const parts = ranges.map(([r0, r1], i) => [at(s.b, x), centre, at(s.b, partial) + 4 * i * c, c, r0, r1]);
    runFixedParts(s, "channel_sums", parts, sizeOf(x.shape));
    s.k.sum_parts(at(s.b, partial), at(s.b, stat), ranges.length, c, rows);
  }
  s.b.disposeData(partial.dataId);
  return [mean, variance];
}

/**
 * ArBnBackward: x, dy [..., C], mean, variance, scale [C] (this batch's statistics) -> [dx, dscale, doffset]:
 * batchnorm's whole training gradient, mean and variance paths included, in two passes over x and dy
 * (kernels.c bn_backward; lib/batchnorm.ts calls it).
 */
function bnBackwardKernel(args: KernelArgs): tf.TensorInfo[] {
  const [x, dy, mean, variance, scale] = inputsOf(args, "x", "dy", "mean", "variance", "scale");
  const s = simdFor(args.backend, x, dy, mean, variance, scale);
  if (s == null) throw new Error("ArBnBackward: needs the wasm SIMD kernels");
  const eps = epsilonOf("ArBnBackward", args);
  const c = sizeOf(mean.shape);
  const rows = sizeOf(x.shape) / c;
  const sums = s.b.makeOutput([2, c], "float32");
  s.run("bn_grad_sums", splitRange(c, partsFor(s, 2 * sizeOf(x.shape)), LINE).map(([c0, c1]) => [
    at(s.b, x), at(s.b, dy), at(s.b, mean), at(s.b, sums), rows, c, c0, c1,
  ]));
  const coef = s.b.makeOutput([3, c], "float32");
  const dscale = s.b.makeOutput([c], "float32");
  const doffset = s.b.makeOutput([c], "float32");
  s.k.bn_backward_coef(
    at(s.b, variance), at(s.b, scale), at(s.b, sums), at(s.b, coef), at(s.b, dscale), at(s.b, doffset), c, eps, rows,
  );
  const dx = s.b.makeOutput([...x.shape], "float32");
  s.run("bn_backward", splitRange(rows, partsFor(s, 2 * sizeOf(x.shape))).map(([r0, r1]) => [
    at(s.b, x), at(s.b, dy), at(s.b, mean), at(s.b, coef), at(s.b, dx), c, r0, r1,
  ]));
  s.b.disposeData(sums.dataId);
  s.b.disposeData(coef.dataId);
  return [dx, dscale, doffset];
}

/** Fixed parts of ArBnReluPoolGrad's sums, like MOMENT_PARTS: their bits do not depend on the thread count. */
const BLOCK_PARTS = 8;

/** The attr varianceEpsilon of a batchnorm kernel. */
function epsilonOf(name: string, args: KernelArgs): number {
  const eps = args.attrs?.varianceEpsilon;
  if (typeof eps !== "number") throw new Error(`${name}: attr varianceEpsilon must be a number`);
  return eps;
}

/**
 * ArBnReluPool: x [B, H, W, C], mean, variance, scale, offset [C] -> y [B, H/2, W/2, C] (floor), batchnorm →
 * ReLU → 2×2 max-pool in one pass (kernels.c bn_relu_pool): with the bits of the three kernels (inference), or
 * with attr `winners` (training) in float32 throughout, and also win (int32, y's shape), which element of each
 * window the gradient reaches. lib/batchnorm.ts's bnReluPool layer calls it.
 */
function bnReluPoolKernel(args: KernelArgs): tf.TensorInfo[] {
  const [x, mean, variance, scale, offset] = inputsOf(args, "x", "mean", "variance", "scale", "offset");
  const s = simdFor(args.backend, x, mean, variance, scale, offset);
  if (s == null) throw new Error("ArBnReluPool: needs the wasm SIMD kernels");
  const eps = epsilonOf("ArBnReluPool", args);
  const [b, h, w, c] = shape4(x, "x");
  if ([mean, variance, scale, offset].some((t) => sizeOf(t.shape) !== c)) {
    throw new Error(`ArBnReluPool: mean, variance, scale and offset need ${c} entries each`);
  }
  const [oh, ow] = [Math.floor(h / 2), Math.floor(w / 2)];
  const y = s.b.makeOutput([b, oh, ow, c], "float32");
  const win = args.attrs?.winners === true ? s.b.makeOutput([b, oh, ow, c], "int32") : null;
  const parts = splitRange(b, partsFor(s, sizeOf(x.shape)));
  const scratch = s.b.wasm._malloc(24 * c * parts.length); // 8-byte aligned; one region per part
  try {
    s.run("bn_relu_pool", parts.map(([b0, b1], p) => [
      at(s.b, x), at(s.b, mean), at(s.b, variance), at(s.b, scale), at(s.b, offset), eps, win == null ? 1 : 0,
      scratch + 24 * c * p, at(s.b, y), win == null ? 0 : at(s.b, win), h, w, c, oh, ow, b0, b1,
    ]));
  } finally {
    s.b.wasm._free(scratch);
  }
  return win == null ? [y] : [y, win];
}

/**
 * ArBnReluPoolGrad: x, dy (ArBnReluPool's input and output gradient), win (its winners), mean, variance, scale
 * -> [dx, dscale, doffset]: the block's whole training gradient in two passes, one over the pooled gradient and
 * one writing dx (kernels.c bn_relu_pool_sums, bn_relu_pool_backward), where the three layers' gradients take
 * about eight full-size passes.
 */
function bnReluPoolGradKernel(args: KernelArgs): tf.TensorInfo[] {
  const [x, dy, win, mean, variance, scale] = inputsOf(args, "x", "dy", "win", "mean", "variance", "scale");
  const s = simdFor(args.backend, x, dy, mean, variance, scale);
  if (s == null || win.dtype !== "int32") throw new Error("ArBnReluPoolGrad: needs the wasm SIMD kernels");
  const eps = epsilonOf("ArBnReluPoolGrad", args);
  const [b, h, w, c] = shape4(x, "x");
  const [, oh, ow] = shape4(dy, "dy");
  const rows = b * oh * ow;
  const ranges = splitRange(rows, Math.min(rows, BLOCK_PARTS));
  const partial = s.b.makeOutput([ranges.length, 2 * c], "float32");
  const parts = ranges.map(([r0, r1], i) => [
    at(s.b, x), at(s.b, dy), at(s.b, win), at(s.b, mean), at(s.b, partial) + 8 * i * c, c, r0, r1,
  ]);
  runFixedParts(s, "bn_relu_pool_sums", parts, 2 * sizeOf(dy.shape));
  const sums = s.b.makeOutput([2, c], "float32");
  s.k.sum_parts(at(s.b, partial), at(s.b, sums), ranges.length, 2 * c, 1);
  const coef = s.b.makeOutput([3, c], "float32");
  const dscale = s.b.makeOutput([c], "float32");
  const doffset = s.b.makeOutput([c], "float32");
  s.k.bn_backward_coef(
    at(s.b, variance), at(s.b, scale), at(s.b, sums), at(s.b, coef), at(s.b, dscale), at(s.b, doffset), c, eps,
    b * h * w,
  );
  const dx = s.b.makeOutput([b, h, w, c], "float32");
  s.run("bn_relu_pool_backward", splitRange(b, partsFor(s, 2 * sizeOf(x.shape))).map(([b0, b1]) => [
    at(s.b, x), at(s.b, dy), at(s.b, win), at(s.b, mean), at(s.b, coef), at(s.b, dx), h, w, c, oh, ow, b0, b1,
  ]));
  for (const t of [partial, sums, coef]) s.b.disposeData(t.dataId);
  return [dx, dscale, doffset];
}

/**
 * ArAdam: x, m, v, g (one variable, its two moments, its gradient) and c1, c2 (the scalars 1 - beta1^t and
 * 1 - beta2^t) -> [x', m', v'], one Adam step in one pass (kernels.c adam_f32; lib/adam.ts calls it).
 */
function adamKernel(args: KernelArgs): tf.TensorInfo[] {
  const [x, m, v, g, c1, c2] = inputsOf(args, "x", "m", "v", "g", "c1", "c2");
  const s = simdFor(args.backend, x, m, v, g, c1, c2);
  if (s == null) throw new Error("ArAdam: needs the wasm SIMD kernels");
  const a = args.attrs ?? {};
  const [beta1, beta2, epsilon, lr] = [a.beta1, a.beta2, a.epsilon, a.learningRate];
  if (typeof beta1 !== "number" || typeof beta2 !== "number" || typeof epsilon !== "number" || typeof lr !== "number") {
    throw new Error("ArAdam: attrs beta1, beta2, epsilon and learningRate must be numbers");
  }
  const outs = [x, m, v].map((t) => s.b.makeOutput([...t.shape], "float32"));
  // 1 - beta and -lr are computed in float64 and then rounded, as tfjs does when it makes them scalars.
  s.k.adam_f32(
    at(s.b, x), at(s.b, m), at(s.b, v), at(s.b, g), at(s.b, outs[0]!), at(s.b, outs[1]!), at(s.b, outs[2]!),
    at(s.b, c1), at(s.b, c2), beta1, 1 - beta1, beta2, 1 - beta2, epsilon, -lr, 0, sizeOf(x.shape),
  );
  return outs;
}

/** Whether the current backend runs ArAdam (wasm with the SIMD kernels on). */
export function hasFusedAdam(): boolean {
  return runsHere("ArAdam");
}

/** Whether the current backend runs ArBnBackward (wasm with the SIMD kernels on). */
export function hasFusedBatchNormGrad(): boolean {
  return runsHere("ArBnBackward");
}

/** Whether the current backend runs ArBnReluPool and its gradient (wasm with the SIMD kernels on). */
export function hasFusedBnReluPool(): boolean {
  return runsHere("ArBnReluPool");
}

function runsHere(kernel: string): boolean {
  return tf.getKernel(kernel, tf.getBackend()) != null && simdFor(tf.engine().backend) != null;
}

// Skipping input gradients nobody reads. tfjs' fused conv2d (what tf.layers'
// Conv2D runs) computes its gradient in a customGrad that always produces
// dx, even for the first layer, whose input is the image batch: a full
// Conv2DBackpropInput per step thrown away. Inside withoutInputGradients()
// the input-gradient kernels return zeros for the listed filters instead.

let skipInputGradFor: readonly tf.Variable[] = [];

function skipsInputGrad(filter: tf.TensorInfo): boolean {
  for (const v of skipInputGradFor) if (!v.isDisposed && v.dataId === filter.dataId) return true;
  return false;
}

function zerosLike(args: KernelArgs, shape: number[]): tf.TensorInfo | null {
  const s = simdFor(args.backend);
  if (s == null) return null;
  const out = s.b.makeOutput([...shape], "float32");
  s.k.zero_fill(at(s.b, out), sizeOf(shape));
  return out;
}

/**
 * Runs fn (a training step) with the input gradient of the given conv
 * filters skipped: the Conv2DBackpropInput / DepthwiseConv2dNativeBackpropInput
 * kernels return zeros when called with one of these variables as filter.
 * Only for layers whose input needs no gradient (a model's first conv, fed
 * by the images); the filter gradients are unaffected. Relies on the
 * zero-copy Identity above (the saved filter shares the variable's buffer),
 * and is a no-op on other backends.
 */
export function withoutInputGradients<T>(filters: readonly tf.Variable[], fn: () => T): T {
  const before = skipInputGradFor;
  skipInputGradFor = [...before, ...filters];
  try {
    return fn();
  } finally {
    skipInputGradFor = before;
  }
}

/**
 * The kernel variables of the conv layers fed directly by a model input
 * (the ones whose input gradient nobody needs), for withoutInputGradients.
 */
export function inputConvFilters(model: tf.LayersModel): tf.Variable[] {
  const out: tf.Variable[] = [];
  for (const layer of model.layers) {
    const cls = layer.getClassName();
    if (cls !== "Conv2D" && cls !== "DepthwiseConv2D") continue;
    const nodes = layer.inboundNodes;
    const fromInput = (n: (typeof nodes)[number]) => n.inboundLayers.every((l) => l.getClassName() === "InputLayer");
    const fedByInput = nodes.length > 0 && nodes.every(fromInput);
    if (!fedByInput) continue;
    for (const w of layer.trainableWeights) {
      if (w.shape.length === 4 && /kernel$/.test(w.originalName)) {
        const v = w.read();
        if (v instanceof tf.Variable) out.push(v);
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------
// Tensors filled in place

/**
 * A float32 tensor of `shape` whose values `fill` writes (every one of them). On wasm `fill` writes
 * straight into the tensor's memory in tfjs' heap; elsewhere into a new array that becomes the tensor.
 * A training step's image batch was a fresh 1.5 MB array per step, copied into the heap: the copy was
 * cheap, but the allocation made Bun's garbage collector run about once a step (bench/README.md).
 */
export function filledTensor<R extends tf.Rank>(
  shape: tf.ShapeMap[R], fill: (out: Float32Array) => void,
): tf.Tensor<R> {
  const backend = tf.engine().backend;
  const n = sizeOf(shape);
  if (!isWasmBackend(backend) || n === 0) {
    const out = new Float32Array(n);
    fill(out);
    return tf.tensor(out, shape, "float32") as tf.Tensor<R>;
  }
  const info = backend.makeOutput([...shape], "float32");
  try {
    // A view of the heap as it is now: `fill` runs no wasm code, so the heap cannot grow under it.
    const memory = backend.wasm.HEAPU8.buffer;
    fill(new Float32Array(memory, at(backend, info), n));
  } catch (e) {
    backend.disposeData(info.dataId);
    throw e;
  }
  return tf.engine().makeTensorFromTensorInfo(info, backend) as tf.Tensor<R>;
}

// ---------------------------------------------------------------------------
// Gradients (global, not per backend): the wasm fast path when the SIMD
// kernels can run, tfjs' own formulation otherwise.

function onSimdWasm(): boolean {
  const b = tf.engine().backend;
  return isWasmBackend(b) && simdKernels(b) != null;
}

// Mean gradient in one pass: tfjs-core's materialises ones(x.shape) in JavaScript, then runs a full-size
// multiply and divide; for a mean over a run of axes before the last (batchnorm's statistics over the
// leading ones, global average pooling over the spatial ones) ArBroadcastRows writes (dy * 1) / n directly:
// the same values.
let originalMeanGrad: tf.GradConfig | undefined;

/** For `axes` a run a..b of consecutive axes that ends before the last: [product of, after] the run. */
function axisRun(axis: unknown, shape: number[]): [number, number] | null {
  if (!(typeof axis === "number" || isNumberArray(axis))) return null;
  const axes = [...new Set(tf.util.parseAxisParam(axis, shape))].sort((a, b) => a - b);
  const [a, b] = [axes[0], axes[axes.length - 1]];
  if (a == null || b == null || b >= shape.length - 1 || b - a + 1 !== axes.length) return null;
  return [sizeOf(shape.slice(a, b + 1)), sizeOf(shape.slice(b + 1))];
}

function meanGrad(dy: tf.Tensor | tf.Tensor[], saved: tf.Tensor[], attrs: tf.NamedAttrMap): GradientMap {
  const [x] = saved;
  const run = x?.dtype === "float32" ? axisRun(attrs.axis, x.shape) : null;
  if (!Array.isArray(dy) && run != null && onSimdWasm()) {
    const [group, columns] = run;
    const attrs = { shape: x!.shape, columns, group };
    return { x: () => tf.engine().runKernel("ArBroadcastRows", { x: tf.reshape(dy, [-1]) }, attrs) as tf.Tensor };
  }
  if (originalMeanGrad?.gradFunc == null) throw new Error("Mean gradient: tfjs' own gradient was not captured");
  return originalMeanGrad.gradFunc(dy, saved, attrs);
}

// ReLU's gradient in one pass: tfjs-core's runs Step, then Multiply, over the whole activation.
let originalReluGrad: tf.GradConfig | undefined;

function reluGrad(dy: tf.Tensor | tf.Tensor[], saved: tf.Tensor[], attrs: tf.NamedAttrMap): GradientMap {
  const [x] = saved;
  if (!Array.isArray(dy) && x != null && x.dtype === "float32" && dy.dtype === "float32" && onSimdWasm()) {
    return { x: () => tf.engine().runKernel("ArReluGrad", { dy, x }, {}) as tf.Tensor };
  }
  if (originalReluGrad?.gradFunc == null) throw new Error("Relu gradient: tfjs' own gradient was not captured");
  return originalReluGrad.gradFunc(dy, saved, attrs);
}

// ---------------------------------------------------------------------------

const KERNELS: tf.KernelConfig[] = [
  { kernelName: "Conv2DBackpropFilter", backendName: "wasm", kernelFunc: conv2DBackpropFilter },
  { kernelName: "DepthwiseConv2dNativeBackpropFilter", backendName: "wasm", kernelFunc: depthwiseBackpropFilter },
  { kernelName: "DepthwiseConv2dNativeBackpropInput", backendName: "wasm", kernelFunc: depthwiseBackpropInput },
  { kernelName: "ArBroadcastRows", backendName: "wasm", kernelFunc: broadcastRowsKernel },
  { kernelName: "ArBnGradSums", backendName: "wasm", kernelFunc: bnGradSumsKernel },
  { kernelName: "ArAdam", backendName: "wasm", kernelFunc: adamKernel },
  { kernelName: "ArBnBackward", backendName: "wasm", kernelFunc: bnBackwardKernel },
  { kernelName: "ArReluGrad", backendName: "wasm", kernelFunc: reluGradKernel },
  { kernelName: "ArBnMoments", backendName: "wasm", kernelFunc: bnMomentsKernel },
  { kernelName: "ArBnReluPool", backendName: "wasm", kernelFunc: bnReluPoolKernel },
  { kernelName: "ArBnReluPoolGrad", backendName: "wasm", kernelFunc: bnReluPoolGradKernel },
];

/** tfjs-wasm kernels we replace; each falls back to the native one outside its fast path. */
const REPLACEMENTS: Record<string, tf.KernelFunc> = {
  Conv2D: (args) => conv2DForward("Conv2D", args),
  FusedConv2D: (args) => conv2DForward("FusedConv2D", args),
  Conv2DBackpropInput: conv2DBackpropInput,
  Identity: identity,
  Cast: cast,
  Sum: (args) => reduceLeading("Sum", args),
  Mean: (args) => reduceLeading("Mean", args),
  MaxPoolGrad: maxPoolGrad,
  FusedBatchNorm: fusedBatchNorm,
  Add: (args) => binary("Add", args),
  Sub: (args) => binary("Sub", args),
  Multiply: (args) => binary("Multiply", args),
  RealDiv: (args) => binary("RealDiv", args),
  Relu: (args) => unary("Relu", "relu_f32", args),
  Sqrt: (args) => unary("Sqrt", "sqrt_f32", args),
  Square: square,
  ClipByValue: clip,
};
const ours = new Set<tf.KernelFunc>(Object.values(REPLACEMENTS));

function replaceKernel(name: string, fn: tf.KernelFunc): void {
  const current = tf.getKernel(name, "wasm");
  if (current != null && ours.has(current.kernelFunc)) return;
  if (current != null) {
    native.set(name, current);
    tf.unregisterKernel(name, "wasm");
  }
  // Keep the native setupFunc: it cwraps the C++ function we delegate to,
  // and the engine runs it when the wasm backend initializes.
  const { setupFunc, disposeFunc } = current ?? {};
  tf.registerKernel({ kernelName: name, backendName: "wasm", kernelFunc: fn, setupFunc, disposeFunc });
}

function restoreKernel(name: string): void {
  const current = tf.getKernel(name, "wasm");
  const orig = native.get(name);
  if (current == null || !ours.has(current.kernelFunc) || orig == null) return;
  tf.unregisterKernel(name, "wasm");
  tf.registerKernel(orig);
}

export interface WasmGradKernelOptions {
  /**
   * Also replace wasm's own (slow, scalar C++) Conv2DBackpropInput with the
   * XNNPACK-based composite above. Default true; false restores the native one.
   */
  fastConv2DBackpropInput?: boolean;
  /**
   * Replace Identity, Cast, Sum, Mean, MaxPoolGrad and FusedBatchNorm with
   * the versions above (SIMD kernels in tfjs' heap, zero-copy identity).
   * Default true; false restores tfjs' own. (setSimdKernelsEnabled(false)
   * turns their fast paths off without unregistering anything.)
   */
  simdKernels?: boolean;
  /**
   * Also replace tfjs-core's FusedBatchNorm, Mean and Relu gradients with the ones
   * above (global, all backends; off wasm they compute what tfjs' own do).
   * Default true; once replaced they stay for the process (tfjs has no
   * unregisterGradient).
   */
  fastBatchNormGrad?: boolean;
}

/**
 * Registers the missing wasm gradient kernels and (by default) swaps in the
 * faster kernels and gradients above. Idempotent; a missing-kernel slot
 * that is already filled for wasm (by us earlier, or by a future tfjs release
 * that ships its own) is left alone. Works before or after
 * tf.setBackend("wasm"), but @tensorflow/tfjs-backend-wasm must have been
 * imported first.
 */
export function registerWasmGradKernels(opts: WasmGradKernelOptions = {}): void {
  for (const k of KERNELS) {
    if (tf.getKernel(k.kernelName, k.backendName) == null) tf.registerKernel(k);
  }
  if (opts.fastConv2DBackpropInput ?? true) replaceKernel("Conv2DBackpropInput", conv2DBackpropInput);
  else restoreKernel("Conv2DBackpropInput");
  for (const [name, fn] of Object.entries(REPLACEMENTS)) {
    if (name === "Conv2DBackpropInput") continue;
    if (opts.simdKernels ?? true) replaceKernel(name, fn);
    else restoreKernel(name);
  }
  if (opts.fastBatchNormGrad ?? true) {
    registerFastBatchNormGrad();
    const mean = tf.getGradient("Mean");
    if (mean != null && mean.gradFunc !== meanGrad) {
      originalMeanGrad = mean;
      quietRegisterGradient({ kernelName: "Mean", inputsToSave: mean.inputsToSave ?? ["x"], gradFunc: meanGrad });
    }
    const relu = tf.getGradient("Relu");
    if (relu != null && relu.gradFunc !== reluGrad) {
      originalReluGrad = relu;
      quietRegisterGradient({ kernelName: "Relu", inputsToSave: relu.inputsToSave ?? ["x"], gradFunc: reluGrad });
    }
  }
}

export { setSimdKernelsEnabled, setSimdSplit } from "./wasm_simd/index.ts";

/** Kernel names this module provides or replaces on wasm (for tests and diagnostics). */
export const WASM_GRAD_KERNEL_NAMES: readonly string[] = [
  ...KERNELS.map((k) => k.kernelName), ...Object.keys(REPLACEMENTS),
];
