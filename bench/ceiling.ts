/**
 * What a second thread CAN give on this machine: one single-threaded compute loop (our SIMD filter
 * gradient, the largest kernel of a training step, on tfjs-wasm's single-threaded build) timed alone
 * and as two copies in two processes at the same time. bench/compare.ts prints the ratio on its first
 * line as `two_copies=1.9x` (2.0 = two independent cores; ~1.2 = two hyper-threads of one core, or a
 * VM whose second vCPU is not a whole core). No multi-threaded code can scale past it.
 *
 * `--memory` times a pass that streams memory instead: ReLU's gradient over one activation of the
 * baseline's first block (32×64×64×32 floats, 16 MB per array, three arrays: far beyond the caches),
 * the kind of pass batchnorm, ReLU and max-pool make. Its two-copy ratio is what two threads can give
 * to those passes when both cores share the memory bus. On demand:
 *
 *   bun bench/ceiling.ts [--memory]   # stdin: "run K" -> "ms t1 .. tK" (each: one kernel call), "quit"
 */
import * as tf from "@tensorflow/tfjs";
import { initBackend } from "../lib/backend.ts";
import { isWasmBackend, simdKernels } from "../lib/wasm_simd/index.ts";

process.env.AR_WASM_THREADS = "1";
await initBackend({ prefer: "wasm" });
const backend = tf.engine().backend;
const simd = isWasmBackend(backend) ? simdKernels(backend) : null;
if (!isWasmBackend(backend) || simd == null) throw new Error("bench/ceiling.ts: needs the wasm SIMD kernels");
const memory = process.argv.includes("--memory");
const at = (t: tf.Tensor) => backend.getMemoryOffset(t.dataId);
const timed = (f: () => void) => (): number => {
  const t0 = performance.now();
  f();
  return performance.now() - t0;
};
let call: () => number;
if (memory) {
  const shape = [32, 64, 64, 32];
  const [dy, x, out] = [tf.randomNormal(shape), tf.randomNormal(shape), tf.zeros(shape)];
  call = timed(() => simd.k.relu_grad_f32(at(dy), at(x), at(out), 0, dy.size));
} else {
  // The baseline's second conv: x [32,32,32,16], dy [32,32,32,32], 3x3 filter.
  const [x, dy] = [tf.randomUniform([32, 32, 32, 16]), tf.randomUniform([32, 32, 32, 32])];
  const dw = tf.zeros([3, 3, 16, 32]);
  const args = [32, 32, 16, 32, 32, 32, 3, 3, 1, 1, 1, 1, 0, 32] as const;
  call = timed(() => simd.k.conv2d_filter_grad(at(x), at(dy), at(dw), ...args));
}
for (let i = 0; i < 5; i++) call();
console.log(`ready ceiling (${memory ? "relu_grad_f32 over 3 × 16 MB" : "conv2d_filter_grad"}, one thread)`);
for await (const line of console) {
  const [cmd, arg] = line.trim().split(/\s+/);
  if (cmd === "run") console.log(`ms ${Array.from({ length: Math.max(1, Number(arg) || 1) }, call).join(" ")}`);
  else if (cmd === "quit") break;
}
process.exit(0);
