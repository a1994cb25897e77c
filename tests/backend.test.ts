/**
 * lib/backend.ts and lib/wasm_kernels.ts: the wasm gradient kernels must agree
 * with the cpu backend's reference kernels on the real gradient path
 * (tf.grads of conv2d / depthwiseConv2d), a small conv net must train on wasm
 * without leaking tensors, and backend selection must honour AR_BACKEND.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import * as tf from "@tensorflow/tfjs";
import { backendLabel, initBackend, nodeBackendLabel, nodeDevice } from "../lib/backend.ts";
import { evaluate, imageBatch, trainBatches, type Dataset, type Manifest } from "../prepare.ts";
import { augmentedBatch, flipAndShift } from "../lib/augment.ts";
import { adam } from "../lib/adam.ts";
import { batchNorm, bnReluPool } from "../lib/batchnorm.ts";
import { BUN } from "./helpers.ts";
import { claimParts, CTRL } from "../lib/wasm_simd/pool_layout.ts";
import { SimdPool, taperedRanges } from "../lib/wasm_simd/pool.ts";
import { KERNELS_WASM_SHARED } from "../lib/wasm_simd/binary.ts";
import {
  WASM_GRAD_KERNEL_NAMES, filledTensor, inputConvFilters, setSimdKernelsEnabled, setSimdSplit,
  withoutInputGradients,
} from "../lib/wasm_kernels.ts";

const savedEnv = process.env.AR_BACKEND;
/** Starting wasm, and training or differentiating a net on one shared core, can outlast Bun's 5 s default. */
const SLOW = 180_000;

beforeAll(async () => {
  delete process.env.AR_BACKEND;
  await initBackend();
}, SLOW);

afterAll(() => {
  if (savedEnv == null) delete process.env.AR_BACKEND;
  else process.env.AR_BACKEND = savedEnv;
});

const sizeOfShape = (shape: number[]) => shape.reduce((a, b) => a * b, 1);

/** Deterministic data that does not depend on which backend is active. */
function seeded(n: number, seed: number): Float32Array {
  let s = seed >>> 0;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = s / 2 ** 32 - 0.5;
  }
  return out;
}

type Pad = "same" | "valid" | number | tf.backend_util.ExplicitPadding;
type Shape4 = [number, number, number, number];

interface Case {
  op: "conv2d" | "depthwise";
  x: Shape4;
  /** [kh, kw, ci, co] for conv2d, [kh, kw, ci, multiplier] for depthwise. */
  filter: Shape4;
  strides: number | [number, number];
  pad: Pad;
  rounding?: "floor" | "round" | "ceil";
}

/** Gradients of sum(op(x, w) * r) w.r.t. x and w on the given backend. */
async function gradsOn(backend: string, c: Case): Promise<{ dx: Float32Array; dw: Float32Array }> {
  await tf.setBackend(backend);
  return tf.tidy(() => {
    const x = tf.tensor4d(seeded(c.x.reduce((a, b) => a * b), 1), c.x);
    const w = tf.tensor4d(seeded(c.filter.reduce((a, b) => a * b), 2), c.filter);
    const f = (xt: tf.Tensor, wt: tf.Tensor): tf.Scalar => {
      const x4 = xt as tf.Tensor4D;
      const w4 = wt as tf.Tensor4D;
      const y =
        c.op === "conv2d"
          ? tf.conv2d(x4, w4, c.strides, c.pad, "NHWC", 1, c.rounding)
          : tf.depthwiseConv2d(x4, w4, c.strides, c.pad, "NHWC", 1, c.rounding);
      // A non-uniform upstream gradient catches index mix-ups that ones would hide.
      const r = tf.tensor(seeded(y.size, 3), y.shape);
      return tf.sum(tf.mul(y, r));
    };
    const [dx, dw] = tf.grads(f)([x, w]);
    return { dx: dx.dataSync() as Float32Array, dw: dw.dataSync() as Float32Array };
  });
}

function relErr(ref: Float32Array, got: Float32Array): number {
  expect(got.length).toBe(ref.length);
  let maxDiff = 0;
  let scale = 1e-6;
  for (let i = 0; i < ref.length; i++) {
    maxDiff = Math.max(maxDiff, Math.abs(ref[i] - got[i]));
    scale = Math.max(scale, Math.abs(ref[i]));
  }
  return maxDiff / scale;
}

const explicit: tf.backend_util.ExplicitPadding = [[0, 0], [1, 2], [0, 1], [0, 0]];
// Pads larger than the kernel: the backprop-input composites must crop.
const wide: tf.backend_util.ExplicitPadding = [[0, 0], [2, 0], [1, 3], [0, 0]];

const CASES: Case[] = [
  { op: "conv2d", x: [2, 7, 9, 3], filter: [3, 3, 3, 4], strides: 1, pad: "same" },
  { op: "conv2d", x: [2, 7, 9, 3], filter: [3, 3, 3, 4], strides: 2, pad: "same" },
  { op: "conv2d", x: [2, 7, 9, 3], filter: [3, 3, 3, 4], strides: 2, pad: "valid" },
  { op: "conv2d", x: [2, 8, 8, 3], filter: [3, 3, 3, 4], strides: 2, pad: "valid" },
  { op: "conv2d", x: [2, 7, 9, 3], filter: [5, 5, 3, 4], strides: 2, pad: "same" },
  { op: "conv2d", x: [2, 7, 9, 3], filter: [5, 5, 3, 4], strides: 1, pad: "valid" },
  { op: "conv2d", x: [2, 7, 9, 3], filter: [1, 1, 3, 4], strides: 1, pad: "same" },
  { op: "conv2d", x: [2, 7, 9, 3], filter: [1, 1, 3, 4], strides: 2, pad: "valid" },
  { op: "conv2d", x: [3, 8, 6, 5], filter: [3, 3, 5, 6], strides: [2, 1], pad: "same" },
  { op: "conv2d", x: [2, 7, 9, 3], filter: [3, 3, 3, 4], strides: 2, pad: 1, rounding: "ceil" },
  { op: "conv2d", x: [2, 7, 9, 3], filter: [3, 3, 3, 4], strides: 2, pad: explicit },
  { op: "conv2d", x: [2, 7, 9, 3], filter: [1, 1, 3, 4], strides: 2, pad: wide },
  // more images than filter-gradient parts: uneven parts, added in order
  { op: "conv2d", x: [11, 6, 5, 4], filter: [3, 3, 4, 8], strides: 1, pad: "same" },
  // Channel counts the direct SIMD kernels take (input grad: stride 1, ci % 4 == 0; filter grad: co % 4 == 0),
  // with their 8-wide main loops and 4-wide tails, every padding kind, and the fallbacks beside them.
  { op: "conv2d", x: [2, 7, 9, 4], filter: [3, 3, 4, 8], strides: 1, pad: "same" },
  { op: "conv2d", x: [2, 7, 9, 8], filter: [3, 3, 8, 4], strides: 1, pad: "valid" },
  { op: "conv2d", x: [2, 7, 9, 4], filter: [5, 5, 4, 12], strides: 1, pad: explicit },
  { op: "conv2d", x: [2, 6, 6, 12], filter: [1, 1, 12, 8], strides: 1, pad: wide },
  { op: "conv2d", x: [2, 7, 9, 4], filter: [3, 3, 4, 6], strides: 1, pad: "same" },
  { op: "conv2d", x: [1, 5, 4, 20], filter: [3, 2, 20, 36], strides: 1, pad: "same" },
  { op: "conv2d", x: [2, 9, 9, 5], filter: [3, 3, 5, 16], strides: 2, pad: "same" },
  { op: "depthwise", x: [2, 7, 9, 3], filter: [3, 3, 3, 1], strides: 1, pad: "same" },
  { op: "depthwise", x: [2, 9, 8, 20], filter: [3, 3, 20, 1], strides: 2, pad: "same" },
  { op: "depthwise", x: [2, 7, 9, 3], filter: [3, 3, 3, 1], strides: 2, pad: "same" },
  { op: "depthwise", x: [2, 7, 9, 3], filter: [3, 3, 3, 2], strides: 2, pad: "same" },
  { op: "depthwise", x: [2, 8, 8, 3], filter: [3, 3, 3, 1], strides: 2, pad: "valid" },
  { op: "depthwise", x: [2, 7, 9, 3], filter: [5, 5, 3, 3], strides: 2, pad: "valid" },
  { op: "depthwise", x: [2, 7, 9, 3], filter: [5, 5, 3, 1], strides: 1, pad: "same" },
  { op: "depthwise", x: [2, 7, 9, 3], filter: [1, 1, 3, 1], strides: 2, pad: "valid" },
  { op: "depthwise", x: [3, 6, 5, 4], filter: [3, 3, 4, 1], strides: 1, pad: "valid" },
  { op: "depthwise", x: [2, 7, 9, 3], filter: [3, 3, 3, 2], strides: 2, pad: explicit },
  { op: "depthwise", x: [2, 7, 9, 3], filter: [1, 1, 3, 2], strides: 1, pad: wide },
  { op: "depthwise", x: [11, 6, 5, 8], filter: [3, 3, 8, 1], strides: 1, pad: "same" },
];

describe("wasm gradient kernels vs cpu", () => {
  test("are registered for wasm", () => {
    for (const name of WASM_GRAD_KERNEL_NAMES) expect(tf.getKernel(name, "wasm")).toBeDefined();
  });

  for (const c of CASES) {
    const pad = `${JSON.stringify(c.pad)}${c.rounding ? ` ${c.rounding}` : ""}`;
    const name = `${c.op} x=[${c.x}] f=[${c.filter}] s=${JSON.stringify(c.strides)} pad=${pad}`;
    test(name, async () => {
      // IS_TEST turns on the engine's per-kernel leak check (data ids created
      // inside a kernel but not returned), which is what we want to catch.
      tf.env().set("IS_TEST", true);
      try {
        const ref = await gradsOn("cpu", c);
        const before = tf.memory().numTensors;
        const got = await gradsOn("wasm", c);
        expect(tf.memory().numTensors).toBe(before);
        expect(relErr(ref.dx, got.dx)).toBeLessThan(1e-4);
        expect(relErr(ref.dw, got.dw)).toBeLessThan(1e-4);
      } finally {
        tf.env().set("IS_TEST", false);
        await tf.setBackend("wasm");
      }
    }, SLOW);
  }
});

describe("NCHW kernel calls (wasm's forward conv is NHWC-only, so only direct calls reach these)", () => {
  for (const kernelName of ["Conv2DBackpropFilter", "Conv2DBackpropInput"]) {
    test(kernelName, async () => {
      const x: Shape4 = [2, 3, 7, 9];
      const dy: Shape4 = [2, 4, 4, 5]; // stride 2, same
      const filterShape: Shape4 = [3, 3, 3, 4];
      const attrs = { strides: [2, 2], pad: "same", dataFormat: "NCHW" };
      const run = async (backend: string) => {
        await tf.setBackend(backend);
        return tf.tidy(() => {
          const dyT = tf.tensor4d(seeded(2 * 4 * 4 * 5, 31), dy);
          const xT = tf.tensor4d(seeded(2 * 3 * 7 * 9, 32), x);
          const filter = tf.tensor4d(seeded(3 * 3 * 3 * 4, 33), filterShape);
          const out =
            kernelName === "Conv2DBackpropFilter"
              ? tf.engine().runKernel(kernelName, { x: xT, dy: dyT }, { ...attrs, filterShape })
              : tf.engine().runKernel(kernelName, { dy: dyT, filter }, { ...attrs, inputShape: x });
          return (out as tf.Tensor).dataSync() as Float32Array;
        });
      };
      const ref = await run("cpu");
      const got = await run("wasm");
      expect(relErr(ref, got)).toBeLessThan(1e-4);
    }, SLOW);
  }
});

describe("FusedBatchNorm gradient (tile-free replacement)", () => {
  // Gradients are global, so cpu runs our replacement too; the reference is
  // autodiff through the same formula written with elementary ops.
  for (const meanShape of [[5], [1, 1, 1, 5]] as const) {
    test(`matches elementary-op autodiff on wasm, mean shape [${meanShape}]`, async () => {
      await tf.setBackend("wasm");
      const shape: Shape4 = [3, 4, 6, 5];
      const eps = 1e-3;
      const make = () => {
        const n = meanShape.reduce((a: number, b: number) => a * b, 1);
        return [
          tf.tensor4d(seeded(3 * 4 * 6 * 5, 11), shape),
          tf.tensor(seeded(n, 12), [...meanShape]),
          tf.add(tf.tensor(seeded(n, 13), [...meanShape]), 1), // variance > 0
          tf.tensor(seeded(n, 14), [...meanShape]),
          tf.tensor(seeded(n, 15), [...meanShape]),
        ];
      };
      const r = tf.tensor(seeded(3 * 4 * 6 * 5, 16), shape);
      const fused = (x: tf.Tensor, m: tf.Tensor, v: tf.Tensor, s: tf.Tensor, o: tf.Tensor) =>
        tf.sum(tf.mul(tf.batchNorm(x as tf.Tensor4D, m, v, o, s, eps), r));
      const plain = (x: tf.Tensor, m: tf.Tensor, v: tf.Tensor, s: tf.Tensor, o: tf.Tensor) =>
        tf.sum(tf.mul(tf.add(tf.mul(tf.mul(tf.sub(x, m), tf.rsqrt(tf.add(v, eps))), s), o), r));
      const before = tf.memory().numTensors;
      type Five = (x: tf.Tensor, m: tf.Tensor, v: tf.Tensor, s: tf.Tensor, o: tf.Tensor) => tf.Tensor;
      const gradsOf = (g: Five) => tf.tidy(() => {
        const grads = tf.grads((...a: tf.Tensor[]) => g(a[0], a[1], a[2], a[3], a[4]))(make());
        return grads.map((t) => t.dataSync() as Float32Array);
      });
      const got = gradsOf(fused);
      const ref = gradsOf(plain);
      expect(tf.memory().numTensors).toBe(before);
      r.dispose();
      for (let i = 0; i < 5; i++) expect(relErr(ref[i], got[i])).toBeLessThan(1e-4);
    }, SLOW);
  }

  test("is the registered FusedBatchNorm gradient and uses no Tile", async () => {
    await tf.setBackend("wasm");
    const x = tf.tensor4d(seeded(2 * 4 * 4 * 3, 21), [2, 4, 4, 3]);
    const m = tf.tensor1d([0.1, 0.2, 0.3]);
    const v = tf.tensor1d([1, 2, 3]);
    // With scale and offset: tf.profile of this gradient without them crashes
    // inside tfjs 4.22 on every backend, with or without our replacement.
    const prof = await tf.profile(() => {
      tf.grad((t: tf.Tensor) => tf.sum(tf.batchNorm(t as tf.Tensor4D, m, v, m, v)))(x).dispose();
    });
    tf.dispose([x, m, v]);
    expect(prof.kernels.map((k) => k.name)).not.toContain("Tile");
  });
});

/** Bits of a float32 result, for exact comparisons (NaN-safe, -0 aware). */
function bits(a: Float32Array): Uint32Array {
  return new Uint32Array(a.buffer.slice(a.byteOffset, a.byteOffset + a.byteLength));
}

/** Runs f on wasm twice, with the SIMD/zero-copy replacements off (tfjs' own kernels) and on. */
function nativeVsOurs(f: () => tf.Tensor): { native: Float32Array; ours: Float32Array } {
  const run = () => tf.tidy(() => f().dataSync() as Float32Array);
  setSimdKernelsEnabled(false);
  let native: Float32Array;
  try {
    native = run();
  } finally {
    setSimdKernelsEnabled(true);
  }
  return { native, ours: run() };
}

describe("SIMD kernels on the inference path are bit-identical to tfjs-wasm's own", () => {
  // These run in evaluate()/predict: identical bits mean identical metrics.
  const shape: Shape4 = [3, 5, 7, 20];
  const n = 3 * 5 * 7 * 20;
  const cases: [string, () => tf.Tensor][] = [
    ["Sum over N,H,W", () => tf.sum(tf.tensor4d(seeded(n, 41), shape), [0, 1, 2])],
    ["Mean over N,H,W keepDims", () => tf.mean(tf.tensor4d(seeded(n, 42), shape), [0, 1, 2], true)],
    ["Mean over N,H,W listed out of order (delegated)", () => tf.mean(tf.tensor4d(seeded(n, 42), shape), [2, 0, 1])],
    ["Mean over N (2-D, bias-style)", () => tf.mean(tf.tensor2d(seeded(96 * 13, 43), [96, 13]), 0)],
    ["Sum over N,H (odd channel count)", () => tf.sum(tf.tensor4d(seeded(2 * 9 * 4 * 7, 44), [2, 9, 4, 7]), [0, 1])],
    ["FusedBatchNorm, [C] params", () => {
      const c = (seed: number, off = 0) => tf.add(tf.tensor1d(seeded(20, seed)), off);
      return tf.batchNorm(tf.tensor4d(seeded(n, 45), shape), c(46), c(47, 1), c(48), c(49), 1e-3);
    }],
    ["FusedBatchNorm, [1,1,1,C] mean, no scale/offset", () => {
      const m = tf.tensor4d(seeded(20, 50), [1, 1, 1, 20]);
      const v = tf.add(tf.tensor4d(seeded(20, 52), [1, 1, 1, 20]), 1);
      return tf.batchNorm(tf.tensor4d(seeded(n, 51), shape), m, v, undefined, undefined, 1e-5);
    }],
    ["Identity/Cast float32 (clone, cast)", () => tf.cast(tf.clone(tf.tensor4d(seeded(n, 53), shape)), "float32")],
    // the forward conv on our pool: XNNPACK's bits (evaluate() and the backbones' features run it)
    ...([
      [[4, 9, 11, 3], [3, 3, 3, 16], "same"], [[3, 8, 8, 16], [3, 3, 16, 32], "same"],
      [[2, 7, 6, 20], [1, 1, 20, 8], "valid"], [[2, 9, 7, 5], [5, 5, 5, 12], "valid"], [[2, 6, 6, 8], [3, 3, 8, 4], 1],
      [[2, 10, 9, 64], [3, 3, 64, 36], "same"],
    ] as [number[], number[], "same" | "valid" | number][]).map(([xs, fs, pad], i): [string, () => tf.Tensor] => [
      `Conv2D ${xs.join("x")} * ${fs.join("x")} ${pad}`,
      () => tf.conv2d(
        tf.tensor4d(seeded(sizeOfShape(xs), 60 + i), xs as Shape4),
        tf.tensor4d(seeded(sizeOfShape(fs), 70 + i), fs as Shape4), 1, pad,
      ),
    ]),
    ["FusedConv2D with a bias", () => tf.fused.conv2d({
      x: tf.tensor4d(seeded(3 * 8 * 8 * 16, 80), [3, 8, 8, 16]),
      filter: tf.tensor4d(seeded(9 * 16 * 24, 81), [3, 3, 16, 24]), strides: 1, pad: "same",
      bias: tf.tensor1d(seeded(24, 82)),
    })],
    ["FusedConv2D with relu6 (tfjs-wasm's own)", () => tf.fused.conv2d({
      x: tf.tensor4d(seeded(2 * 8 * 8 * 8, 83), [2, 8, 8, 8]), filter: tf.tensor4d(seeded(9 * 8 * 8, 84), [3, 3, 8, 8]),
      strides: 1, pad: "same", activation: "relu6",
    })],
    ...(["add", "sub", "mul", "div"] as const).flatMap((op): [string, () => tf.Tensor][] => {
      const x = () => tf.tensor4d(seeded(n, 60), shape);
      const row = (rank: number) => tf.tensor(seeded(20, 61), [...new Array<number>(rank - 1).fill(1), 20]);
      return [
        [`${op}: same shape`, () => tf[op](x(), tf.tensor4d(seeded(n, 62), shape))],
        [`${op}: tensor and scalar`, () => tf[op](x(), tf.scalar(0.37))],
        [`${op}: scalar and tensor`, () => tf[op](tf.scalar(-1.5), x())],
        [`${op}: [N,H,W,C] and a [C] row`, () => tf[op](x(), row(1))],
        [`${op}: a [1,1,1,C] row and [N,H,W,C]`, () => tf[op](row(4), x())],
        [`${op}: odd length, odd row`, () => tf[op](tf.tensor2d(seeded(77, 63), [11, 7]), tf.tensor1d(seeded(7, 64)))],
        [`${op}: [N,1] column (delegated)`, () => tf[op](tf.tensor2d(seeded(77, 65), [11, 7]), tf.ones([11, 1]))],
      ];
    }),
    ["square (odd length)", () => tf.square(tf.tensor1d(seeded(n - 3, 67)))],
    ["sqrt (odd length, with 0 and a negative: NaN)", () => {
      const v = seeded(n - 3, 68).map(Math.abs);
      v.set([0, -1, Infinity], 0);
      return tf.sqrt(tf.tensor1d(v));
    }],
    ["clipByValue 0..6 (relu6; with NaN, -0, +-Infinity, the bounds, odd length)", () => {
      const v = seeded(n - 1, 69).map((e) => 20 * e);
      v.set([NaN, -0, Infinity, -Infinity, 0, 6, 5.999], 0);
      return tf.clipByValue(tf.tensor1d(v), 0, 6);
    }],
    ["relu (with -0, +-Infinity, odd length)", () => {
      const v = seeded(n - 1, 66);
      v.set([-0, Infinity, -Infinity, 0], 0);
      return tf.relu(tf.tensor1d(v));
    }],
  ];
  for (const [name, f] of cases) {
    test(name, async () => {
      await initBackend({ prefer: "wasm" });
      const { native, ours } = nativeVsOurs(f);
      expect(bits(ours)).toEqual(bits(native));
    });
  }

  test("a training-mode forward pass of the baseline's block gives the same bits", async () => {
    await initBackend({ prefer: "wasm" });
    const f = () => {
      const x = tf.tensor4d(seeded(4 * 8 * 8 * 3, 54), [4, 8, 8, 3]);
      const w = tf.tensor4d(seeded(3 * 3 * 3 * 8, 55), [3, 3, 3, 8]);
      const y = tf.conv2d(x, w, 1, "same");
      const { mean, variance } = tf.moments(y, [0, 1, 2]);
      const normed = tf.relu(tf.batchNorm(y, mean, variance, undefined, undefined, 1e-3)) as tf.Tensor4D;
      return tf.maxPool(normed, 2, 2, "valid");
    };
    const { native, ours } = nativeVsOurs(f);
    expect(bits(ours)).toEqual(bits(native));
  });
});

describe("the fused Adam update", () => {
  /** Weights and both moments after `steps` steps of a conv + dense net from fixed weights and data. */
  function train(makeOptimizer: (lr: number) => tf.Optimizer, steps: number): Float32Array[] {
    const w1 = tf.variable(tf.tensor4d(seeded(3 * 3 * 3 * 8, 71), [3, 3, 3, 8]));
    const w2 = tf.variable(tf.tensor2d(seeded(8 * 5, 72), [8, 5]));
    const b2 = tf.variable(tf.tensor1d(seeded(5, 73)));
    const x = tf.tensor4d(seeded(4 * 6 * 6 * 3, 74), [4, 6, 6, 3]);
    const y = tf.oneHot(tf.tensor1d([0, 3, 1, 4], "int32"), 5);
    const opt = makeOptimizer(0.01);
    for (let i = 0; i < steps; i++) {
      opt.minimize(() => {
        const h = tf.mean(tf.relu(tf.conv2d(x, w1, 1, "same")), [1, 2]) as tf.Tensor2D;
        return tf.losses.softmaxCrossEntropy(y, tf.add(tf.matMul(h, w2), b2)) as tf.Scalar;
      });
    }
    const out = [w1, w2, b2].map((v) => v.dataSync() as Float32Array);
    const state = (opt as unknown as { accumulatedFirstMoment: { variable: tf.Variable }[] }).accumulatedFirstMoment
      .concat((opt as unknown as { accumulatedSecondMoment: { variable: tf.Variable }[] }).accumulatedSecondMoment)
      .map((s) => s.variable.dataSync() as Float32Array);
    tf.dispose([w1, w2, b2, x, y]);
    opt.dispose();
    return [...out, ...state];
  }

  test("gives tfjs' Adam's weights and moments bit for bit on wasm, in one kernel per variable", async () => {
    await initBackend({ prefer: "wasm" });
    const theirs = train((lr) => tf.train.adam(lr), 5);
    const ours = train(adam, 5);
    expect(ours.length).toBe(9);
    for (let i = 0; i < ours.length; i++) expect(bits(ours[i]!)).toEqual(bits(theirs[i]!));
    // and the update really ran as ArAdam: 3 variables -> 3 calls in a profiled step
    const w = tf.variable(tf.ones([4]));
    const opt = adam(0.1);
    const info = await tf.profile(() => { opt.minimize(() => tf.sum(tf.square(w)) as tf.Scalar); });
    expect(info.kernels.filter((k) => k.name === "ArAdam").length).toBe(1);
    expect(info.kernels.filter((k) => k.name === "Sqrt").length).toBe(0);
    opt.dispose();
    w.dispose();
  });

  test("is tfjs' own Adam where the backend has no fused kernel (cpu)", async () => {
    await initBackend({ prefer: "cpu" });
    try {
      const theirs = train((lr) => tf.train.adam(lr), 3);
      const ours = train(adam, 3);
      for (let i = 0; i < ours.length; i++) expect(bits(ours[i]!)).toEqual(bits(theirs[i]!));
    } finally {
      await initBackend({ prefer: "wasm" });
    }
  });
});

describe("the wasm thread pool (wasmPool)", () => {
  // A process initializes wasm once, so each pool runs in a child: same net, same data, its gradients' bits.
  const script = (pool: string) => `
    import * as tf from "@tensorflow/tfjs";
    import { backendLabel, initBackend } from ${JSON.stringify(`${import.meta.dir}/../lib/backend.ts`)};
    await initBackend({ prefer: "wasm", wasmPool: ${JSON.stringify(pool)} });
    const r = (n, k) => tf.tensor1d(Array.from({ length: n }, (_, i) => Math.sin(i * 12.9898 + k) * 0.5));
    const x = r(32 * 16 * 16 * 8, 1).reshape([32, 16, 16, 8]);
    const w = tf.variable(r(3 * 3 * 8 * 16, 2).reshape([3, 3, 8, 16]));
    const { grads } = tf.variableGrads(() => tf.sum(tf.square(tf.relu(tf.conv2d(x, w, 1, "same")))), [w]);
    const g = grads[w.name].dataSync();
    const bits = Array.from(new Uint32Array(g.buffer, g.byteOffset, g.length));
    console.log(JSON.stringify({ label: backendLabel(), bits }));
  `;
  function run(pool: string): { label: string; bits: number[] } {
    const r = Bun.spawnSync([BUN, "-e", script(pool)], {
      env: { ...process.env, AR_WASM_THREADS: "2", AR_WASM_POOL: "" }, stderr: "pipe",
    });
    const out = r.stdout.toString().trim().split("\n").at(-1) ?? "";
    if (r.exitCode !== 0) throw new Error(`child (${pool}) failed: ${r.stderr.toString()}`);
    return JSON.parse(out) as { label: string; bits: number[] };
  }

  test("simd: every thread in our pool, tfjs single-threaded; the same gradient bits as tfjs' pool", () => {
    const ours = run("simd");
    const theirs = run("xnnpack");
    expect(ours.label).toBe("wasm (threads: 2 in the SIMD pool, simd: true)");
    expect(theirs.label).toBe("wasm (threads: 2, simd: true)");
    expect(ours.bits.length).toBe(3 * 3 * 8 * 16);
    expect(ours.bits).toEqual(theirs.bits);
  }, 60_000);

  test("claimParts: own share first, then what is left; every part once; nothing from a call that moved on", () => {
    const ctrl = new Int32Array(CTRL.ARGS_BYTE / 4);
    const open = (n: number, threads: number) => {
      const gen = ctrl[CTRL.GEN]! + 1;
      [ctrl[CTRL.GEN], ctrl[CTRL.COUNT], ctrl[CTRL.THREADS]] = [gen, n, threads];
      for (let t = 0; t < threads; t++) ctrl[CTRL.NEXT0 + t] = gen << 16;
    };
    // Alone: its own share [0, 4), then the late helper's [4, 8).
    open(8, 2);
    const alone: number[] = [];
    claimParts(ctrl, 0, (i) => alone.push(i));
    expect(alone).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
    // The helper starts on its share; the main thread comes in during the helper's first part (as if at the same
    // time) and takes its own share, then what the helper has not claimed yet.
    open(8, 2);
    const ran: [string, number][] = [];
    let mainIn = false;
    claimParts(ctrl, 1, (i) => {
      ran.push(["helper", i]);
      if (!mainIn) {
        mainIn = true;
        claimParts(ctrl, 0, (j) => ran.push(["main", j]));
      }
    });
    expect(ran.map(([, i]) => i).sort((a, b) => a - b)).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
    expect(ran.filter(([who]) => who === "main").map(([, i]) => i)).toEqual([0, 1, 2, 3, 5, 6, 7]);
    // A claim that lands on a call after the next one has begun (a preempted helper) takes nothing of either.
    open(8, 2);
    const late: number[] = [];
    claimParts(ctrl, 1, (i) => {
      late.push(i);
      if (late.length === 1) ctrl[CTRL.GEN]! += 1; // the next call's number, before its counters reopen
    });
    expect(late).toEqual([4]);
    // A call whose parts have all run gives nothing more.
    open(4, 2);
    claimParts(ctrl, 0, () => {});
    const more: number[] = [];
    claimParts(ctrl, 1, (i) => more.push(i));
    expect(more).toEqual([]);
  });

  test("taperedRanges: every image once, one contiguous share per thread, parts shrinking to one image", () => {
    for (const [n, threads] of [[32, 2], [33, 2], [8, 2], [7, 3], [32, 8], [256, 8], [1, 2]] as const) {
      const r = taperedRanges(n, threads);
      expect(r[0]![0]).toBe(0);
      expect(r.at(-1)![1]).toBe(n);
      r.forEach(([b, e], i) => {
        expect(e).toBeGreaterThan(b);
        if (i > 0) expect(b).toBe(r[i - 1]![1]);
      });
      expect(r.length).toBeLessThanOrEqual(CTRL.MAX_PARTS);
      if (n < threads || r.length === threads * 4) continue; // equal parts instead
      // claimParts deals parts [t·len/threads, (t+1)·len/threads) to thread t: that is its share of the images.
      const per = r.length / threads;
      expect(Number.isInteger(per)).toBe(true);
      for (let t = 0; t < threads; t++) {
        const mine = r.slice(t * per, (t + 1) * per);
        expect(mine[0]![0]).toBe(Math.floor((t * n) / threads));
        expect(mine.at(-1)![1]).toBe(Math.floor(((t + 1) * n) / threads));
        const sizes = mine.map(([b, e]) => e - b);
        expect(sizes.at(-1)).toBe(1);
        for (let i = 1; i < sizes.length; i++) expect(sizes[i]!).toBeLessThanOrEqual(sizes[i - 1]!);
      }
    }
    expect(taperedRanges(32, 2).map(([b, e]) => e - b)).toEqual([6, 4, 2, 2, 1, 1, 6, 4, 2, 2, 1, 1]);
    expect(taperedRanges(256, 8).length).toBe(64);
  });

  test("SimdPool: a polling helper takes parts, falls asleep when idle, and a call wakes it", async () => {
    const memory = new WebAssembly.Memory({ initial: 512, maximum: 1024, shared: true });
    const bytes = new Uint8Array(Buffer.from(KERNELS_WASM_SHARED, "base64"));
    const k = new WebAssembly.Instance(new WebAssembly.Module(bytes), { env: { memory } }).exports;
    const relu = k.relu_f32 as (x: number, out: number, begin: number, end: number) => void;
    const pool = new SimdPool(memory, bytes, 1, 20_000); // polls for 20 ms
    for (let i = 0; i < 500 && pool.threads < 2; i++) await Bun.sleep(10);
    expect(pool.threads).toBe(2);
    const n = 1 << 21; // two arrays of 8 MB: parts long enough for a helper to join
    const [x, out] = [1 << 20, (1 << 20) + 4 * n];
    const heap = new Float32Array(memory.buffer);
    heap.subarray(x / 4, x / 4 + n).forEach((_, i, a) => { a[i] = i % 3 === 0 ? -i : i; });
    const parts = Array.from({ length: 8 }, (_, p) => [x, out, (p * n) / 8, ((p + 1) * n) / 8]);
    const calls = async (count: number) => {
      const before = pool.helperStats.parts;
      for (let c = 0; c < count && pool.helperStats.parts === before; c++) {
        heap.fill(-1, out / 4, out / 4 + n);
        pool.run("relu_f32", parts, relu);
        expect(heap[out / 4 + n - 1]).toBe(n - 1); // every part ran, on whichever thread
        expect(heap[out / 4 + 3]).toBe(0);
      }
      return pool.helperStats.parts - before;
    };
    expect(await calls(50)).toBeGreaterThan(0);
    // Idle for longer than the poll: the helper sleeps; the next calls wake it and it takes parts again.
    let asleep = false;
    for (let i = 0; i < 200 && !asleep; i++) {
      await Bun.sleep(5);
      asleep = pool.helperStats.sleeping === 1;
    }
    expect(asleep).toBe(true);
    expect(await calls(50)).toBeGreaterThan(0);
  }, 30_000);

  test("AR_WASM_POOL names a pool or is refused in one line", async () => {
    const r = Bun.spawnSync([BUN, "-e", script("xnnpack")], {
      env: { ...process.env, AR_WASM_THREADS: "2", AR_WASM_POOL: "both" }, stderr: "pipe",
    });
    expect(r.exitCode).not.toBe(0);
    expect(r.stderr.toString()).toContain("AR_WASM_POOL must be xnnpack or simd, got 'both'");
  }, 60_000);
});

describe("SIMD kernels split across threads", () => {
  test("any split of the work gives the same bits (forward and all gradients of a conv/bn/pool net)", async () => {
    await initBackend({ prefer: "wasm" });
    const run = () => tf.tidy(() => {
      const x = tf.tensor4d(seeded(6 * 10 * 10 * 4, 95), [6, 10, 10, 4]);
      const w1 = tf.tensor4d(seeded(3 * 3 * 4 * 24, 96), [3, 3, 4, 24]);
      const dw = tf.tensor4d(seeded(3 * 3 * 24, 97), [3, 3, 24, 1]);
      const f = (xt: tf.Tensor, a: tf.Tensor, b: tf.Tensor) => {
        let h: tf.Tensor = tf.conv2d(xt as tf.Tensor4D, a as tf.Tensor4D, 1, "same");
        const { mean, variance } = tf.moments(h, [0, 1, 2]);
        // (with scale and offset: tfjs 4.22 cannot differentiate batchNorm without them, on any backend)
        h = tf.relu(tf.batchNorm(h, mean, variance, tf.onesLike(mean), tf.onesLike(mean), 1e-3));
        h = tf.depthwiseConv2d(h as tf.Tensor4D, b as tf.Tensor4D, 1, "same");
        h = tf.maxPool(h as tf.Tensor4D, 2, 2, "valid");
        return tf.sum(tf.mul(h, tf.tensor(seeded(h.size, 98), h.shape)));
      };
      return tf.grads(f)([x, w1, dw]).map((g) => g.dataSync() as Float32Array);
    });
    const one = (() => { setSimdSplit(1); try { return run(); } finally { setSimdSplit(undefined); } })();
    for (const parts of [2, 3, 7]) {
      setSimdSplit(parts);
      try {
        const got = run();
        for (let i = 0; i < one.length; i++) expect(bits(got[i]!)).toEqual(bits(one[i]!));
      } finally {
        setSimdSplit(undefined);
      }
    }
  }, SLOW);
});

/**
 * One training-mode pass of a model on 5 seeded [side, side, 3] images: its output, the gradients of a loss on
 * it, and every weight after (the moving statistics).
 */
function trainingPass(m: tf.LayersModel, side: number, seed: number) {
  return tf.tidy(() => {
    const x = tf.tensor4d(seeded(5 * side * side * 3, seed), [5, side, side, 3]).mul(3);
    const y = tf.oneHot(tf.tensor1d([0, 2, 1, 1, 0], "int32"), 3);
    const vs = m.trainableWeights.map((w) => w.read() as tf.Variable);
    let out: Float32Array = new Float32Array(0);
    const { grads } = tf.variableGrads(() => {
      const logits = m.apply(x, { training: true }) as tf.Tensor;
      out = logits.dataSync() as Float32Array;
      return tf.losses.softmaxCrossEntropy(y, logits) as tf.Scalar;
    }, vs);
    return {
      out, grads: vs.map((v) => grads[v.name]!.dataSync() as Float32Array),
      weights: m.getWeights().map((w) => w.dataSync() as Float32Array),
    };
  });
}

describe("batchNorm(): tf.layers' batchnorm with a closed-form training gradient", () => {
  /** conv -> batchnorm (ours or tf.layers') -> relu -> average pool -> dense, from fixed weights. */
  function net(ours: boolean): tf.LayersModel {
    const input = tf.input({ shape: [6, 6, 3] });
    const conv = tf.layers.conv2d({ filters: 12, kernelSize: 3, padding: "same", useBias: false }); // 8 + a tail
    const bn = ours ? batchNorm({ momentum: 0.9 }) : tf.layers.batchNormalization({ momentum: 0.9 });
    let h = bn.apply(conv.apply(input)) as tf.SymbolicTensor;
    h = tf.layers.globalAveragePooling2d({}).apply(tf.layers.reLU().apply(h)) as tf.SymbolicTensor;
    const m = tf.model({ inputs: input, outputs: tf.layers.dense({ units: 3 }).apply(h) as tf.SymbolicTensor });
    // Weights that do not depend on the layer kind: seeded, gamma and beta away from 1 and 0.
    m.setWeights(m.getWeights().map((w, i) => tf.add(tf.mul(tf.tensor(seeded(w.size, 40 + i), w.shape), 0.8), 1)));
    return m;
  }


  for (const backend of ["wasm", "cpu"] as const) {
    // cpu: tf.moments' statistics, so forward and moving averages keep their bits; wasm sums them in parts
    const sameBits = backend === "cpu";
    test(`${backend}: forward and moving averages ${sameBits ? "bit for bit" : "to float rounding"}, gradients `
      + "to float rounding", async () => {
      await initBackend({ prefer: backend });
      try {
        const [theirs, ours] = [trainingPass(net(false), 6, 50), trainingPass(net(true), 6, 50)];
        const same = (a: Float32Array, b: Float32Array) => {
          if (sameBits) expect(bits(a)).toEqual(bits(b));
          else expect(relErr(b, a)).toBeLessThan(1e-5);
        };
        same(ours.out, theirs.out);
        expect(ours.weights.length).toBe(theirs.weights.length);
        ours.weights.forEach((w, i) => same(w, theirs.weights[i]!));
        expect(ours.grads.length).toBe(5); // conv, gamma, beta, dense kernel and bias
        ours.grads.forEach((g, i) => expect(relErr(theirs.grads[i]!, g)).toBeLessThan(1e-5));
        // ... and the closed form really ran: on wasm one ArBnBackward call, no broadcast of the mean's gradient
        const info = await tf.profile(() => { trainingPass(net(true), 6, 50); });
        const calls = (name: string) => info.kernels.filter((k) => k.name === name).length;
        expect(calls("ArBnBackward")).toBe(backend === "wasm" ? 1 : 0);
        expect(calls("ArBnMoments")).toBe(backend === "wasm" ? 1 : 0);
        if (backend === "wasm") {
          expect(calls("Square")).toBe(0);
          expect(calls("ArBroadcastRows")).toBe(1); // the average pool's gradient; none for batchnorm's statistics
        }
      } finally {
        await initBackend({ prefer: "wasm" });
      }
    }, SLOW);
  }

  test("finds its weights when their names were taken before (tfjs then appends _1)", async () => {
    await initBackend({ prefer: "wasm" });
    for (let k = 0; k < 2; k++) {
      const input = tf.input({ shape: [4, 4, 3] });
      const m = tf.model({ inputs: input, outputs: batchNorm({ name: "bn_twice" }).apply(input) as tf.SymbolicTensor });
      expect(m.weights[0]!.name).toBe(k === 0 ? "bn_twice/gamma" : "bn_twice/gamma_1");
      const g = tf.tidy(() => tf.grad((x: tf.Tensor) => tf.sum(tf.square(m.apply(x, { training: true }) as tf.Tensor)))(
        tf.tensor4d(seeded(2 * 4 * 4 * 3, 52), [2, 4, 4, 3])).dataSync());
      expect(g.length).toBe(2 * 4 * 4 * 3);
      expect(g.every(Number.isFinite)).toBe(true);
    }
  }, SLOW);

  test("any split of the wasm kernels gives the same bits", async () => {
    await initBackend({ prefer: "wasm" });
    const m = net(true);
    const run = (parts: number) => {
      setSimdSplit(parts);
      try { return trainingPass(m, 6, 50).grads; } finally { setSimdSplit(undefined); }
    };
    const one = run(1);
    for (const parts of [2, 3]) run(parts).forEach((g, i) => expect(bits(g)).toEqual(bits(one[i]!)));
  }, SLOW);

  test("saves as tf.layers' BatchNormalization: class name, config, and the same inference output", async () => {
    await initBackend({ prefer: "wasm" });
    const [plain, ours] = [net(false), net(true)];
    const bnOf = (m: tf.LayersModel) => m.layers.find((l) => l.getClassName() === "BatchNormalization");
    expect(bnOf(ours)).toBeDefined();
    const { name: _a, ...oursConfig } = bnOf(ours)!.getConfig();
    const { name: _b, ...plainConfig } = bnOf(plain)!.getConfig();
    expect(oursConfig).toEqual(plainConfig);
    const x = tf.tensor4d(seeded(2 * 6 * 6 * 3, 51), [2, 6, 6, 3]);
    const [a, b] = [plain, ours].map((m) => (m.predict(x) as tf.Tensor).dataSync() as Float32Array);
    expect(bits(b!)).toEqual(bits(a!));
    expect(JSON.stringify(ours.toJSON(null, false))).toContain('"class_name":"BatchNormalization"');
    tf.dispose(x);
  }, SLOW);
});

describe("bnReluPool(): batchnorm → ReLU → 2×2 max-pool as one layer", () => {
  /** conv -> the block's tail (fused, or batchNorm + reLU + maxPooling2d) -> average pool -> dense, fixed weights. */
  function net(fused: boolean, side: number, channels: number): tf.LayersModel {
    const input = tf.input({ shape: [side, side, 3] });
    const conv = tf.layers.conv2d({ filters: channels, kernelSize: 3, padding: "same", useBias: false });
    let h = conv.apply(input) as tf.SymbolicTensor;
    const tail = fused ? [bnReluPool({ momentum: 0.9 })]
      : [batchNorm({ momentum: 0.9 }), tf.layers.reLU(), tf.layers.maxPooling2d({ poolSize: 2 })];
    for (const layer of tail) h = layer.apply(h) as tf.SymbolicTensor;
    h = tf.layers.globalAveragePooling2d({}).apply(h) as tf.SymbolicTensor;
    const m = tf.model({ inputs: input, outputs: tf.layers.dense({ units: 3 }).apply(h) as tf.SymbolicTensor });
    // The same weights in the same order for both: conv, gamma, beta, moving mean and variance, dense.
    m.setWeights(m.getWeights().map((w, i) => tf.add(tf.mul(tf.tensor(seeded(w.size, 60 + i), w.shape), 0.8), 1)));
    return m;
  }


  // 6x6 with 12 channels: three SIMD groups; 7x7 with 6: an odd side (the last row and column are not pooled
  // but still normalised) and a scalar channel tail.
  const shapes = [[6, 12], [7, 6]] as const;
  for (const backend of ["wasm", "cpu"] as const) {
    // cpu runs the three layers' own ops: every bit the same. On wasm the batch statistics, and so the moving
    // averages, keep their bits (the same kernel); the training forward pass normalises in float32 and the
    // gradient sums run in another order: the same values to float rounding.
    const cpu = backend === "cpu";
    test(`${backend}: the three layers' statistics bit for bit, forward pass and gradients `
      + `${cpu ? "bit for bit" : "to float rounding"}`, async () => {
      await initBackend({ prefer: backend });
      try {
        for (const [side, channels] of shapes) {
          const [theirs, ours] = [false, true].map((fused) => trainingPass(net(fused, side, channels), side, 70));
          const same = (a: Float32Array, b: Float32Array) => {
            if (cpu) expect(bits(b)).toEqual(bits(a));
            else expect(relErr(a, b)).toBeLessThan(1e-5);
          };
          same(theirs.out, ours.out);
          expect(ours.weights.length).toBe(theirs.weights.length);
          ours.weights.forEach((w, i) => expect(bits(w)).toEqual(bits(theirs.weights[i]!)));
          expect(ours.grads.length).toBe(5); // conv, gamma, beta, dense kernel and bias
          ours.grads.forEach((g, i) => same(theirs.grads[i]!, g));
        }
        // ... and on wasm the fused kernels really ran: one call each, no max-pool or ReLU kernels left
        const info = await tf.profile(() => { trainingPass(net(true, 6, 12), 6, 70); });
        const calls = (name: string) => info.kernels.filter((k) => k.name === name).length;
        const wasm = backend === "wasm";
        expect([calls("ArBnReluPool"), calls("ArBnReluPoolGrad")]).toEqual(wasm ? [1, 1] : [0, 0]);
        expect(calls("MaxPool") + calls("MaxPoolGrad") + calls("Relu") + calls("ArReluGrad")).toBe(wasm ? 0 : 3);
      } finally {
        await initBackend({ prefer: "wasm" });
      }
    }, SLOW);
  }

  test("any split of the wasm kernels gives the same bits", async () => {
    await initBackend({ prefer: "wasm" });
    const m = net(true, 7, 6);
    const run = (parts: number) => {
      setSimdSplit(parts);
      try { return trainingPass(m, 7, 70); } finally { setSimdSplit(undefined); }
    };
    const one = run(1);
    for (const parts of [2, 3]) {
      const split = run(parts);
      expect(bits(split.out)).toEqual(bits(one.out));
      split.grads.forEach((g, i) => expect(bits(g)).toEqual(bits(one.grads[i]!)));
    }
  }, SLOW);

  test("saves and loads as ArBnReluPool, with the three layers' inference output bit for bit", async () => {
    await initBackend({ prefer: "wasm" });
    const [plain, ours] = [net(false, 7, 6), net(true, 7, 6)];
    const x = tf.tensor4d(seeded(2 * 7 * 7 * 3, 71), [2, 7, 7, 3]);
    let artifacts: tf.io.ModelArtifacts | undefined;
    await ours.save(tf.io.withSaveHandler(async (a) => {
      artifacts = a;
      return { modelArtifactsInfo: { dateSaved: new Date(), modelTopologyType: "JSON" } };
    }));
    expect(JSON.stringify(artifacts!.modelTopology)).toContain('"class_name":"ArBnReluPool"');
    const loaded = await tf.loadLayersModel(tf.io.fromMemory(artifacts!));
    for (const backend of ["wasm", "cpu"] as const) {
      await initBackend({ prefer: backend });
      const [a, b, c] = [plain, ours, loaded].map((m) => (m.predict(x) as tf.Tensor).dataSync() as Float32Array);
      expect(bits(b!)).toEqual(bits(a!));
      expect(bits(c!)).toEqual(bits(a!));
    }
    await initBackend({ prefer: "wasm" });
    tf.dispose(x);
  }, SLOW);
});

describe("ReLU gradient (ArReluGrad)", () => {
  test("is tfjs' Step x Multiply bit for bit on wasm (zeros, negatives, NaN), in one kernel", async () => {
    await initBackend({ prefer: "wasm" });
    const values = seeded(103, 60).map((v, i) => (i % 7 === 0 ? 0 : i % 11 === 0 ? NaN : i % 13 === 0 ? -0 : v));
    const grad = () => tf.tidy(() => {
      const x = tf.tensor1d(values);
      const r = tf.tensor1d(seeded(103, 61));
      return tf.grad((t: tf.Tensor) => tf.sum(tf.mul(tf.relu(t), r)))(x).dataSync() as Float32Array;
    });
    const ours = grad();
    setSimdKernelsEnabled(false);
    let theirs: Float32Array;
    try { theirs = grad(); } finally { setSimdKernelsEnabled(true); }
    expect(bits(ours)).toEqual(bits(theirs));
    expect(Number.isNaN(ours[11])).toBe(true);
    const info = await tf.profile(() => { grad(); });
    expect(info.kernels.filter((k) => k.name === "ArReluGrad").length).toBe(1);
    expect(info.kernels.filter((k) => k.name === "Step").length).toBe(0);
  }, SLOW);
});

describe("MaxPoolGrad (SIMD) matches tfjs-cpu", () => {
  interface PoolCase { x: Shape4; size: number; stride: number; pad: "same" | "valid"; ties?: boolean }
  const cases: PoolCase[] = [
    { x: [2, 8, 8, 16], size: 2, stride: 2, pad: "valid" }, // the baseline's pool
    { x: [2, 7, 9, 6], size: 2, stride: 2, pad: "valid" }, // odd sizes: trailing rows in no window
    { x: [2, 7, 9, 6], size: 2, stride: 2, pad: "same" },
    { x: [2, 9, 8, 5], size: 3, stride: 2, pad: "same" }, // overlapping windows add up
    { x: [1, 6, 6, 8], size: 3, stride: 1, pad: "same" },
    { x: [2, 8, 8, 16], size: 2, stride: 2, pad: "valid", ties: true },
    { x: [2, 9, 8, 5], size: 3, stride: 2, pad: "same", ties: true },
  ];
  for (const c of cases) {
    const name = `x=[${c.x}] ${c.size}x${c.size} s${c.stride} ${c.pad}${c.ties ? " with ties" : ""}`;
    test(name, async () => {
      const size = c.x.reduce((a, b) => a * b);
      // Tie-free: distinct seeded values. With ties: relu'd and rounded values,
      // so most windows hold repeated maxima (zeros above all); the kernel
      // follows tfjs-cpu's rule (first maximum in window order), so still exact.
      const values = seeded(size, 61).map((v) => (c.ties ? Math.max(0, Math.round(v * 4)) : v));
      const run = async (backend: string) => {
        await tf.setBackend(backend);
        return tf.tidy(() => {
          const x = tf.tensor4d(values, c.x);
          const f = (t: tf.Tensor) => {
            const y = tf.maxPool(t as tf.Tensor4D, c.size, c.stride, c.pad);
            return tf.sum(tf.mul(y, tf.tensor(seeded(y.size, 62), y.shape)));
          };
          return tf.grad(f)(x).dataSync() as Float32Array;
        });
      };
      const ref = await run("cpu");
      const got = await run("wasm");
      // Which positions get a gradient must match exactly (ties included).
      expect(Array.from(got, (v) => v !== 0)).toEqual(Array.from(ref, (v) => v !== 0));
      if (c.stride >= c.size) {
        expect(Array.from(got)).toEqual(Array.from(ref));
      } else {
        // Overlapping windows: cpu adds the contributions in float64 and
        // rounds once, we add in float32; values agree to rounding.
        expect(relErr(ref, got)).toBeLessThan(1e-6);
      }
    });
  }
});

describe("gradients with SIMD helpers", () => {
  // Over the leading axes (batchnorm's statistics) and over the spatial ones (global average pooling).
  for (const axes of [[0, 1, 2], [1, 2]]) {
    test(`Mean over axes [${axes}]: gradient is tfjs' own bit for bit (cpu), in one kernel on wasm`, async () => {
      const run = async (backend: string) => {
        await tf.setBackend(backend);
        const f = () => tf.tidy(() => {
          const x = tf.tensor4d(seeded(2 * 3 * 4 * 6, 71), [2, 3, 4, 6]);
          const r = tf.tensor(seeded(axes.length === 3 ? 6 : 12, 72), axes.length === 3 ? [6] : [2, 6]);
          return tf.grad((t: tf.Tensor) => tf.sum(tf.mul(tf.mean(t, axes), r)))(x).dataSync() as Float32Array;
        });
        const info = await tf.profile(f);
        return { grad: f(), kernels: info.kernels.map((k) => k.name) };
      };
      const ref = await run("cpu");
      const got = await run("wasm");
      expect(bits(got.grad)).toEqual(bits(ref.grad));
      expect(got.kernels).toContain("ArBroadcastRows");
      expect(ref.kernels).not.toContain("ArBroadcastRows");
    });
  }

  test("withoutInputGradients: zero dx for the listed filters, same dw", async () => {
    await tf.setBackend("wasm");
    const x = tf.tensor4d(seeded(2 * 6 * 6 * 3, 81), [2, 6, 6, 3]);
    const w = tf.variable(tf.tensor4d(seeded(3 * 3 * 3 * 4, 82), [3, 3, 3, 4]));
    // tf.fused.conv2d is what tf.layers' Conv2D runs (a customGrad computing dx eagerly).
    const f = (xt: tf.Tensor, wt: tf.Tensor) =>
      tf.sum(tf.square(tf.fused.conv2d({ x: xt as tf.Tensor4D, filter: wt as tf.Tensor4D, strides: 1, pad: "same" })));
    const before = tf.memory().numTensors;
    const grads = () => tf.tidy(() => tf.grads(f)([x, w]).map((g) => g.dataSync() as Float32Array));
    const [dxRef, dwRef] = grads();
    const [dxSkip, dwSkip] = withoutInputGradients([w], grads);
    expect(tf.memory().numTensors).toBe(before);
    expect(dxRef.some((v) => v !== 0)).toBe(true);
    expect(dxSkip.every((v) => v === 0)).toBe(true);
    expect(Array.from(dwSkip)).toEqual(Array.from(dwRef));
    // Outside the scope nothing is skipped.
    const dxAfter = tf.tidy(() => tf.grads(f)([x, w])[0].dataSync() as Float32Array);
    expect(Array.from(dxAfter)).toEqual(Array.from(dxRef));
    tf.dispose([x, w]);
  });

  test("inputConvFilters picks the conv fed by the model input only", () => {
    const input = tf.input({ shape: [8, 8, 3] });
    const c1 = tf.layers.conv2d({ filters: 4, kernelSize: 3, useBias: false });
    const c2 = tf.layers.conv2d({ filters: 4, kernelSize: 3 });
    const out = c2.apply(c1.apply(input)) as tf.SymbolicTensor;
    const model = tf.model({ inputs: input, outputs: out });
    const picked = inputConvFilters(model);
    expect(picked.length).toBe(1);
    expect(picked[0]).toBe(c1.getWeights()[0] as tf.Variable);
    model.dispose();
  });
});

describe("training on wasm", () => {
  test("tiny conv net: loss decreases, tensor count flat", async () => {
    await initBackend({ prefer: "wasm" });
    expect(tf.getBackend()).toBe("wasm");
    const model = tf.sequential({
      layers: [
        tf.layers.conv2d({ inputShape: [16, 16, 3], filters: 8, kernelSize: 3, padding: "same", useBias: false }),
        tf.layers.batchNormalization(),
        tf.layers.reLU(),
        tf.layers.maxPooling2d({ poolSize: 2 }),
        tf.layers.depthwiseConv2d({ kernelSize: 3, padding: "same", strides: 2, depthMultiplier: 2 }),
        tf.layers.globalAveragePooling2d({}),
        tf.layers.dense({ units: 3, activation: "softmax" }),
      ],
    });
    model.compile({ optimizer: tf.train.adam(0.02), loss: "categoricalCrossentropy" });
    const n = 16;
    const x = tf.tensor4d(seeded(n * 16 * 16 * 3, 7), [n, 16, 16, 3]);
    const y = tf.oneHot(tf.tensor1d(Array.from({ length: n }, (_, i) => i % 3), "int32"), 3);
    const losses: number[] = [];
    const counts: number[] = [];
    for (let step = 0; step < 25; step++) {
      const out = await model.trainOnBatch(x, y);
      losses.push(typeof out === "number" ? out : out[0]);
      counts.push(tf.memory().numTensors);
    }
    tf.dispose([x, y]);
    model.dispose();
    // The optimizer creates its slot variables on the first step; from then
    // on every step must leave exactly as many tensors as it found.
    expect(new Set(counts.slice(2)).size).toBe(1);
    expect(losses.every(Number.isFinite)).toBe(true);
    const first = losses.slice(0, 3).reduce((a, b) => a + b) / 3;
    const last = losses.slice(-3).reduce((a, b) => a + b) / 3;
    expect(last).toBeLessThan(first * 0.8);
  }, SLOW);
});

describe("initBackend", () => {
  test("picks wasm here, idempotently, and labels it", async () => {
    delete process.env.AR_BACKEND;
    expect(await initBackend()).toBe("wasm");
    expect(await initBackend()).toBe("wasm");
    expect(tf.getBackend()).toBe("wasm");
    expect(backendLabel()).toMatch(/^wasm \(threads: \d+, simd: (true|false)\)$/);
  });

  test("AR_BACKEND=cpu gives cpu without a fallback warning, and back", async () => {
    const lines: string[] = [];
    process.env.AR_BACKEND = "cpu";
    try {
      expect(await initBackend({ log: (l) => lines.push(l) })).toBe("cpu");
      expect(tf.getBackend()).toBe("cpu");
      expect(backendLabel()).toBe("cpu");
      expect(lines.join("\n")).not.toContain("WARNING");
    } finally {
      delete process.env.AR_BACKEND;
    }
    expect(await initBackend()).toBe("wasm");
    expect(tf.getBackend()).toBe("wasm");
  });

  test("opts.prefer wins over AR_BACKEND", async () => {
    process.env.AR_BACKEND = "cpu";
    try {
      expect(await initBackend({ prefer: "wasm" })).toBe("wasm");
    } finally {
      delete process.env.AR_BACKEND;
    }
  });

  test("rejects unknown names and unloadable explicit choices", async () => {
    await expect(initBackend({ prefer: "tpu" })).rejects.toThrow(/unknown backend/);
    let gpuInstalled = true;
    try {
      Bun.resolveSync("@tensorflow/tfjs-node-gpu", import.meta.dir);
    } catch {
      gpuInstalled = false;
    }
    if (!gpuInstalled) await expect(initBackend({ prefer: "gpu" })).rejects.toThrow(/could not be loaded/);
    // A failed explicit request must not leave tfjs without a backend.
    expect(await initBackend()).toBe("wasm");
  });
});

describe("the native backend's label", () => {
  test("tfjs-node-gpu says whether TensorFlow computes on a GPU, as its backend object reports it", () => {
    // Shaped like tfjs-node's NodeJSKernelBackend once loaded: the flags its binding sets from TensorFlow's devices.
    const gpu = { isGPUPackage: true, isUsingGpuDevice: true };
    const noGpu = { isGPUPackage: true, isUsingGpuDevice: false }; // e.g. CUDA 12 without the 11.2 libraries
    expect(nodeBackendLabel("tensorflow-gpu", gpu)).toBe("tensorflow-gpu (GPU)");
    expect(nodeBackendLabel("tensorflow-gpu", noGpu))
      .toBe("tensorflow-gpu (NO GPU: running on CPU; libtensorflow 2.9 needs CUDA 11.2 + cuDNN 8.1)");
    for (const silent of [{ isGPUPackage: true }, { isUsingGpuDevice: "yes" }, undefined, null]) {
      const label = nodeBackendLabel("tensorflow-gpu", silent);
      expect(label).toBe("tensorflow-gpu (GPU use not reported by this tfjs-node-gpu)");
    }
    expect(nodeBackendLabel("tensorflow", noGpu)).toBe("tensorflow"); // tfjs-node is the CPU build: nothing to flag
    expect(nodeDevice(tf.backend())).toBe("unknown"); // a real backend object (wasm here) has no such flag
  });
});

// ---------------------------------------------------------------------------
// The pieces a training step is made of (lib/augment.ts, prepare.ts loaders, evaluate()).

/** An in-memory waste-task dataset of seeded pixels (no files): enough for evaluate() and the training step. */
function tinyDataset(n = 40, size = 16): Dataset {
  const px = size * size * 3;
  const images = new Uint8Array(n * px);
  let s = 12345;
  for (let i = 0; i < images.length; i++) images[i] = (s = (Math.imul(s, 1103515245) + 12345) >>> 0) >>> 24;
  const labels = Int32Array.from({ length: n }, (_, i) => i % 3);
  const items: Manifest["items"] = Array.from({ length: n }, (_, i) => ({
    path: `img${i}.raw`, label: i % 3, sha256: String(i), split: i % 4 === 0 ? "val" as const : "train" as const,
    yield: [0.3, 0.85, 0.6][i % 3]!,
  }));
  const manifest: Manifest = {
    version: "2", task: "waste", classes: ["ewaste", "recyclable", "organic"], positiveClass: null, imageSize: size,
    preprocessing: "test", source: "memory", synthetic: true, yieldSource: "table", fingerprint: "test", createdAt: "",
    skipped: 0, duplicates: 0, items,
  };
  const idx = (split: "train" | "val") => Int32Array.from(items.flatMap((it, i) => (it.split === split ? [i] : [])));
  return {
    dir: "(memory)", manifest, images, labels, yields: Float32Array.from(items, (it) => it.yield),
    train: idx("train"), val: idx("val"), test: new Int32Array(0),
    numClasses: 3, imageSize: size, task: "waste",
  };
}

/**
 * A model shaped like train.ts's baseline (conv/batchnorm/relu/pool blocks, class and yield heads):
 * tests build their own, since train.ts is the file the agent rewrites.
 */
function baselineShaped(ds: Dataset): { train: tf.LayersModel; infer: tf.LayersModel } {
  const input = tf.input({ shape: [ds.imageSize, ds.imageSize, 3] });
  let x: tf.SymbolicTensor = input;
  for (const filters of [16, 32, 64]) {
    for (const layer of [
      tf.layers.conv2d({ filters, kernelSize: 3, padding: "same", useBias: false, kernelInitializer: "heNormal" }),
      tf.layers.batchNormalization({ momentum: 0.9 }), tf.layers.reLU(), tf.layers.maxPooling2d({ poolSize: 2 }),
    ]) x = layer.apply(x) as tf.SymbolicTensor;
  }
  const gap = tf.layers.globalAveragePooling2d({});
  for (const layer of [gap, tf.layers.dense({ units: 64, activation: "relu" }), tf.layers.dropout({ rate: 0.2 })]) {
    x = layer.apply(x) as tf.SymbolicTensor;
  }
  const logits = tf.layers.dense({ units: ds.numClasses }).apply(x) as tf.SymbolicTensor;
  const probs = tf.layers.softmax().apply(logits) as tf.SymbolicTensor;
  const yields = tf.layers.dense({ units: 1, activation: "sigmoid" }).apply(x) as tf.SymbolicTensor;
  return {
    train: tf.model({ inputs: input, outputs: [logits, yields] }),
    infer: tf.model({ inputs: input, outputs: [probs, yields] }),
  };
}

describe("training-step pieces", () => {
  test("filledTensor(): what `fill` writes, freed on dispose and when `fill` throws (wasm in place, cpu)", async () => {
    for (const backend of ["wasm", "cpu"] as const) {
      await initBackend({ prefer: backend });
      const ids = () => tf.engine().backend.numDataIds();
      const before = ids();
      const t = filledTensor<tf.Rank.R2>([2, 3], (out) => out.set([1, 2, 3, 4, 5, 6.5]));
      expect([t.shape, t.dtype]).toEqual([[2, 3], "float32"]);
      expect(Array.from(t.dataSync())).toEqual([1, 2, 3, 4, 5, 6.5]);
      expect(tf.tidy(() => tf.add(t, 1).dataSync()[5])).toBe(7.5); // a kernel reads what fill wrote
      t.dispose();
      expect(() => filledTensor([4], () => { throw new Error("bad row"); })).toThrow("bad row");
      expect(ids()).toBe(before);
    }
    await initBackend({ prefer: "wasm" });
  }, SLOW);


  /** The flip-and-shift augmentation written with tensor ops: the reference for the index-map version. */
  function augmentReference(x: tf.Tensor4D, hp: { flip: boolean; shift: number }, rand: () => number): tf.Tensor4D {
    return tf.tidy(() => {
      let out = x;
      if (hp.flip) {
        const flips = Array.from({ length: x.shape[0] }, () => (rand() < 0.5 ? 1 : 0));
        const mask = tf.tensor1d(flips, "bool").reshape([-1, 1, 1, 1]);
        out = tf.where(mask.broadcastTo(out.shape), tf.reverse(out, 2), out) as tf.Tensor4D;
      }
      if (hp.shift > 0) {
        const [, h, w] = out.shape;
        const dy = Math.floor(rand() * (2 * hp.shift + 1)), dx = Math.floor(rand() * (2 * hp.shift + 1));
        const padded = tf.mirrorPad(out, [[0, 0], [hp.shift, hp.shift], [hp.shift, hp.shift], [0, 0]], "symmetric");
        out = tf.slice(padded, [0, dy, dx, 0], [-1, h, w, -1]);
      }
      return out;
    });
  }

  test("flipAndShift() is bit-identical to the tensor-op formulation and draws the same random numbers", async () => {
    await initBackend({ prefer: "wasm" });
    const x = tf.tensor4d(seeded(5 * 9 * 7 * 3, 91), [5, 9, 7, 3]);
    const settings = [
      { flip: true, shift: 4 }, { flip: true, shift: 0 }, { flip: false, shift: 2 }, { flip: true, shift: 7 },
      { flip: false, shift: 0 },
    ];
    for (const hp of settings) {
      for (const seed of [1, 2, 3]) {
        const mk = () => {
          let st = seed;
          return () => ((st = (Math.imul(st, 1664525) + 1013904223) >>> 0) / 2 ** 32);
        };
        const r1 = mk(), r2 = mk();
        const got = tf.tidy(() => flipAndShift(x, hp, r1).dataSync() as Float32Array);
        const ref = tf.tidy(() => augmentReference(x, hp, r2).dataSync() as Float32Array);
        expect(bits(got)).toEqual(bits(ref));
        expect(r1()).toBe(r2()); // the generators are in the same state afterwards
      }
    }
    x.dispose();
  }, SLOW);

  test("augmentedBatch() from the uint8 cache equals flipAndShift(imageBatch()), bits and random draws", async () => {
    await initBackend({ prefer: "wasm" });
    const ds = tinyDataset();
    const indices = Int32Array.from([5, 0, 3, 3, 7, 1]);
    const settings = [
      { flip: true, shift: 4 }, { flip: false, shift: 2 }, { flip: true, shift: 0 }, { flip: false, shift: 0 },
    ];
    for (const hp of settings) {
      const mk = () => {
        let st = 11;
        return () => ((st = (Math.imul(st, 1664525) + 1013904223) >>> 0) / 2 ** 32);
      };
      const r1 = mk(), r2 = mk();
      const got = tf.tidy(() => augmentedBatch(ds, indices, hp, r1).dataSync() as Float32Array);
      const ref = tf.tidy(() => flipAndShift(imageBatch(ds, indices), hp, r2).dataSync() as Float32Array);
      expect(got.length).toBe(indices.length * ds.imageSize * ds.imageSize * 3);
      expect(bits(got)).toEqual(bits(ref));
      expect(r1()).toBe(r2());
    }
  });

  test("training steps of a baseline-shaped model (augmentation, batches, input-conv grads) leak nothing", async () => {
    await initBackend({ prefer: "wasm" });
    const ds = tinyDataset();
    const hp = { batchSize: 8, flip: true, shift: 4, labelSmoothing: 0.1 };
    const { train: model, infer } = baselineShaped(ds);
    const optimizer = tf.train.adam(1e-3);
    const inputConvs = inputConvFilters(model);
    expect(inputConvs.length).toBe(1);
    const batches = trainBatches(ds, hp.batchSize, 0);
    let seed = 7;
    const rand = () => ((seed = (seed * 1664525 + 1013904223) >>> 0) / 2 ** 32);
    const counts: number[] = [];
    for (let step = 0; step < 6; step++) {
      const { indices } = batches.next().value!;
      tf.tidy(() => {
        const x = flipAndShift(imageBatch(ds, indices), hp, rand);
        const classes = Array.from(indices, (i: number) => ds.labels[i]!);
        const labels = tf.oneHot(tf.tensor1d(classes, "int32"), ds.numClasses);
        const targetYields = tf.tensor2d(Array.from(indices, (i: number) => ds.yields[i]!), [indices.length, 1]);
        const loss = withoutInputGradients(inputConvs, () => optimizer.minimize(() => {
          const [logits, yieldPred] = model.apply(x, { training: true }) as tf.Tensor[];
          const classLoss = tf.losses.softmaxCrossEntropy(labels, logits!, undefined, hp.labelSmoothing);
          return tf.add(classLoss, tf.losses.meanSquaredError(targetYields, yieldPred!)) as tf.Scalar;
        }, true))!;
        expect(Number.isFinite(loss.dataSync()[0]!)).toBe(true);
      });
      counts.push(tf.memory().numTensors);
    }
    // Step 1 creates Adam's slots; after that every step leaves the count unchanged.
    expect(new Set(counts.slice(1)).size).toBe(1);
    optimizer.dispose();
    infer.dispose();
  }, SLOW);

  test("evaluate() numbers of a fixed model are identical with and without the SIMD kernels", async () => {
    await initBackend({ prefer: "wasm" });
    const ds = tinyDataset(48);
    const { infer } = baselineShaped(ds);
    // Fixed, non-trivial weights (moving statistics included): seeded values.
    const names = infer.weights.map((w) => w.originalName);
    infer.setWeights(infer.getWeights().map((w, i) => {
      const v = seeded(w.size, 100 + i);
      return tf.tensor(names[i]!.includes("variance") ? v.map((a) => a + 1) : v, w.shape);
    }));
    const predict = (images: tf.Tensor4D) => {
      const [probs, yields] = infer.predict(images) as tf.Tensor[];
      return { probs: probs!, yields };
    };
    setSimdKernelsEnabled(false);
    let before: Awaited<ReturnType<typeof evaluate>>;
    try {
      before = await evaluate(predict, ds);
    } finally {
      setSimdKernelsEnabled(true);
    }
    const after = await evaluate(predict, ds);
    expect(after).toEqual(before);
    infer.dispose();
  }, SLOW);
});
