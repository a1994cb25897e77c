import * as tf from "@tensorflow/tfjs";
import { initBackend, backendLabel } from "../lib/backend.ts";
await initBackend({ prefer: "wasm" });
const a = tf.randomUniform([32, 32, 32, 16]) as tf.Tensor4D;
const w = tf.randomUniform([3, 3, 16, 32]) as tf.Tensor4D;
const busy = (ms: number) => { const t = performance.now(); while (performance.now() - t < ms); };
for (const [label, f] of [["conv", () => tf.conv2d(a, w, 1, "same").dispose()], ["mul", () => tf.mul(a, a).dispose()], ["relu", () => tf.relu(a).dispose()]] as const) {
  f();
  let conv = 0;
  const c0 = process.cpuUsage(), w0 = performance.now();
  for (let i = 0; i < 50; i++) { const t = performance.now(); f(); conv += performance.now() - t; busy(3); }
  const u = process.cpuUsage(c0), wall = performance.now() - w0;
  console.log(backendLabel(), label, "op ms total", conv.toFixed(0), "wall", wall.toFixed(0), "cpu", ((u.user + u.system) / 1000).toFixed(0), "=> extra cpu beyond wall+op", ((u.user + u.system) / 1000 - wall).toFixed(0));
}
process.exit(0);
