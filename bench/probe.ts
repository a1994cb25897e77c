/**
 * Benchmark: which backbone features separate the active dataset's classes, by a linear probe. On demand:
 *
 *   bun bench/probe.ts [--backbones coco-centernet-mobilenetv3@224,nsfwjs-mobilenetv2@224] [--steps 300]
 *                      [--layers mixed2:288,mixed3:768,...]
 *
 * For each backbone: its features of every image (lib/backbones.ts's cache: computed once, cold time
 * printed, then reused by train.ts), then a softmax regression on the train split (standardized
 * features, Adam, full batch, L2), scored on val. A backbone whose features concatenate several
 * nodes (spec.featureNode is a list) is also probed on each node alone and on each pair, so the
 * nodes in the registry are chosen by these figures. `--layers NAME:CHANNELS,...` (layers-model
 * backbones) pools those layers instead of the registry's, in one pass per photo (their own cache file,
 * `features-NAME.layers-…`), each probed alone and in pairs: which depth of a network describes the
 * dataset best. Prints one `key=value` line per figure:
 *   extract_ms_per_image  the cold extraction's wall time per image (from the cache's record when reused)
 *   probe_val_acc         val accuracy of the probe on those features
 */
import * as tf from "@tensorflow/tfjs";
import { cac } from "cac";
import { type } from "arktype";
import { loadCache } from "../prepare.ts";
import { initBackend } from "../lib/backend.ts";
import { BACKBONES, datasetFeatures, loadBackbone, parseBackboneId, type BackboneName } from "../lib/backbones.ts";

const Flags = type({
  backbones: "string", steps: "1 <= number.integer <= 10000", l2: "number >= 0",
  layers: /^([\w/]+:[1-9]\d*)(,[\w/]+:[1-9]\d*)*$|^$/,
});
const cli = cac("bench/probe.ts");
cli.option("--backbones <list>", "backbone ids, comma-separated",
  { default: "coco-centernet-mobilenetv3@224,nsfwjs-mobilenetv2@224" })
  .option("--steps <n>", "Adam steps of the probe", { default: 300 })
  .option("--l2 <x>", "L2 penalty on the probe's weights", { default: 1e-3 })
  .option("--layers <list>", "layers-model backbones: pool these layers (NAME:CHANNELS, network order)",
    { default: "" });
const raw = cli.parse(process.argv, { run: false }).options;
const parsed = Flags({
  backbones: String(raw.backbones), steps: Number(raw.steps), l2: Number(raw.l2), layers: String(raw.layers),
});
if (parsed instanceof type.errors) throw new Error(`bench/probe.ts: ${parsed.summary}`);
const flags: typeof Flags.infer = parsed;

await initBackend();
const ds = await loadCache();

/** Val accuracy of a softmax regression on columns [from, to) of each subset of the features. */
function probe(data: Float32Array, dim: number, cols: number[]): number {
  const pick = (rows: Int32Array) => tf.tidy(() => {
    const all = tf.tensor2d(data.subarray(0, ds.manifest.items.length * dim), [ds.manifest.items.length, dim]);
    return tf.gather(tf.gather(all, tf.tensor1d(rows, "int32")), tf.tensor1d(cols, "int32"), 1) as tf.Tensor2D;
  });
  const xTrain = pick(ds.train), xVal = pick(ds.val);
  const { mean, variance } = tf.moments(xTrain, 0);
  const std = tf.add(tf.sqrt(variance), 1e-6);
  const norm = (x: tf.Tensor2D) => tf.div(tf.sub(x, mean), std) as tf.Tensor2D;
  const [nTrain, nVal] = [norm(xTrain), norm(xVal)];
  const yTrain = tf.oneHot(tf.tensor1d(Array.from(ds.train, (i) => ds.labels[i]!), "int32"), ds.numClasses);
  const w = tf.variable(tf.zeros([cols.length, ds.numClasses]));
  const b = tf.variable(tf.zeros([ds.numClasses]));
  const opt = tf.train.adam(0.01);
  for (let s = 0; s < flags.steps; s++) {
    tf.tidy(() => { opt.minimize(() => tf.add(
      tf.losses.softmaxCrossEntropy(yTrain, tf.add(tf.matMul(nTrain, w), b)),
      tf.mul(flags.l2, tf.sum(tf.square(w)))) as tf.Scalar); });
  }
  const pred = tf.tidy(() => tf.argMax(tf.add(tf.matMul(nVal, w), b), 1).dataSync());
  const acc = Array.from(ds.val).filter((i, k) => pred[k] === ds.labels[i]).length / ds.val.length;
  tf.dispose([xTrain, xVal, mean, variance, std, nTrain, nVal, yTrain, w, b]);
  opt.dispose();
  return acc;
}

const range = (a: number, b: number) => Array.from({ length: b - a }, (_, i) => a + i);
const layers = flags.layers === "" ? [] : flags.layers.split(",").map((l) => l.split(":") as [string, string]);
for (const id of flags.backbones.split(",").map((s) => s.trim()).filter(Boolean)) {
  const registered = BACKBONES[parseBackboneId(id).name as BackboneName];
  const spec = layers.length === 0 || !registered ? registered : {
    ...registered, name: `${registered.name}.layers-${layers.map(([n]) => n).join("-")}`.replaceAll("/", "_"),
    featureNode: layers.map(([n]) => n), featureDim: layers.reduce((s, [, c]) => s + Number(c), 0),
  };
  const bb = await loadBackbone(id, spec ? { spec } : {});
  const fc = await datasetFeatures(ds, bb, { log: (l) => console.error(l) });
  console.log(`backbone=${bb.id} dataset=${ds.dir} n=${fc.n} dim=${fc.dim} cold_extract_seconds=${
    fc.extractSeconds.toFixed(1)} extract_ms_per_image=${((fc.extractSeconds * 1000) / fc.n).toFixed(1)}${
    fc.reused ? " (from the cache's record)" : ""}`);
  const nodes = [bb.spec.featureNode].flat();
  // Column ranges of each node, in the registry's order.
  const known = nodes.length === 1 ? [fc.dim]
    : layers.length > 0 ? layers.map(([, c]) => Number(c)) : nodeWidths(bb.spec.name, fc.dim, nodes.length);
  const starts = known.map((_, k) => known.slice(0, k).reduce((s, x) => s + x, 0));
  const subsets: number[][] = nodes.length === 1 ? [[0]]
    : [...nodes.map((_, k) => [k]), ...pairs(nodes.length), range(0, nodes.length)];
  for (const subset of subsets) {
    const cols = subset.flatMap((k) => range(starts[k]!, starts[k]! + known[k]!));
    const acc = probe(fc.data, fc.dim, cols);
    const names = subset.map((k) => nodes[k]!).join("+");
    console.log(`backbone=${bb.id} nodes=${names} dim=${cols.length} probe_val_acc=${acc.toFixed(4)}`);
  }
}

function pairs(n: number): number[][] {
  const out: number[][] = [];
  for (let i = 0; i < n; i++) for (let j = i + 1; j < n; j++) out.push([i, j]);
  return out;
}

/** The registry's per-node widths for the multi-node backbones (their sum is checked against the cache). */
function nodeWidths(name: string, dim: number, n: number): number[] {
  const widths: Record<string, number[]> = { "coco-centernet-mobilenetv3": [480, 128, 80] };
  const w = widths[name];
  if (!w || w.length !== n || w.reduce((a, b) => a + b, 0) !== dim) {
    throw new Error(`bench/probe.ts: no node widths for ${name} adding up to ${dim}`);
  }
  return w;
}
