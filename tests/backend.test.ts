/**
 * lib/backend.ts and lib/wasm_kernels.ts: the wasm gradient kernels must agree
 * with the cpu backend's reference kernels on the real gradient path
 * (tf.grads of conv2d / depthwiseConv2d), a small conv net must train on wasm
 * without leaking tensors, and backend selection must honour AR_BACKEND.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import * as tf from "@tensorflow/tfjs";
import { backendLabel, initBackend } from "../lib/backend.ts";
import { WASM_GRAD_KERNEL_NAMES } from "../lib/wasm_kernels.ts";

const savedEnv = process.env.AR_BACKEND;

beforeAll(async () => {
  delete process.env.AR_BACKEND;
  await initBackend();
});

afterAll(() => {
  if (savedEnv == null) delete process.env.AR_BACKEND;
  else process.env.AR_BACKEND = savedEnv;
});

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
  { op: "depthwise", x: [2, 7, 9, 3], filter: [3, 3, 3, 1], strides: 1, pad: "same" },
  { op: "depthwise", x: [2, 7, 9, 3], filter: [3, 3, 3, 1], strides: 2, pad: "same" },
  { op: "depthwise", x: [2, 7, 9, 3], filter: [3, 3, 3, 2], strides: 2, pad: "same" },
  { op: "depthwise", x: [2, 8, 8, 3], filter: [3, 3, 3, 1], strides: 2, pad: "valid" },
  { op: "depthwise", x: [2, 7, 9, 3], filter: [5, 5, 3, 3], strides: 2, pad: "valid" },
  { op: "depthwise", x: [2, 7, 9, 3], filter: [5, 5, 3, 1], strides: 1, pad: "same" },
  { op: "depthwise", x: [2, 7, 9, 3], filter: [1, 1, 3, 1], strides: 2, pad: "valid" },
  { op: "depthwise", x: [3, 6, 5, 4], filter: [3, 3, 4, 1], strides: 1, pad: "valid" },
  { op: "depthwise", x: [2, 7, 9, 3], filter: [3, 3, 3, 2], strides: 2, pad: explicit },
  { op: "depthwise", x: [2, 7, 9, 3], filter: [1, 1, 3, 2], strides: 1, pad: wide },
];

describe("wasm gradient kernels vs cpu", () => {
  test("are registered for wasm", () => {
    for (const name of WASM_GRAD_KERNEL_NAMES) expect(tf.getKernel(name, "wasm")).toBeDefined();
  });

  for (const c of CASES) {
    const name = `${c.op} x=[${c.x}] f=[${c.filter}] s=${JSON.stringify(c.strides)} pad=${JSON.stringify(c.pad)}${c.rounding ? ` ${c.rounding}` : ""}`;
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
    });
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
          const out =
            kernelName === "Conv2DBackpropFilter"
              ? tf.engine().runKernel(kernelName, { x: tf.tensor4d(seeded(2 * 3 * 7 * 9, 32), x), dy: dyT }, { ...attrs, filterShape })
              : tf.engine().runKernel(kernelName, { dy: dyT, filter: tf.tensor4d(seeded(3 * 3 * 3 * 4, 33), filterShape) }, { ...attrs, inputShape: x });
          return (out as tf.Tensor).dataSync() as Float32Array;
        });
      };
      const ref = await run("cpu");
      const got = await run("wasm");
      expect(relErr(ref, got)).toBeLessThan(1e-4);
    });
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
      const got = tf.tidy(() => tf.grads((...a: tf.Tensor[]) => fused(a[0], a[1], a[2], a[3], a[4]))(make()).map((g) => g.dataSync() as Float32Array));
      const ref = tf.tidy(() => tf.grads((...a: tf.Tensor[]) => plain(a[0], a[1], a[2], a[3], a[4]))(make()).map((g) => g.dataSync() as Float32Array));
      expect(tf.memory().numTensors).toBe(before);
      r.dispose();
      for (let i = 0; i < 5; i++) expect(relErr(ref[i], got[i])).toBeLessThan(1e-4);
    });
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
  });
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
