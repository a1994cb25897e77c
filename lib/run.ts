/**
 * What every training run does around the research, so that train.ts holds only the model, optimizer,
 * schedule, augmentation and loop: train.ts calls startRun() before its first step and finishRun()
 * after its last.
 *
 *   startRun   the command line (--budget, --checkpoint, --print-hp, --help), HP with AR_HP's overrides
 *              (checked against what HP and HP_SPACE declare), the backend, the prepared dataset (at
 *              hp.imageSize when train.ts has that key), and, when hp.backbone names a frozen backbone,
 *              its features of every image, and with hp.flip of every image mirrored (cached next to
 *              the image cache, computed before the budget starts; under the loop, by
 *              `bun prepare.ts features` before train.ts even starts). With hp.unfreezeBlocks k > 0 the
 *              frozen part stops k blocks early: its feature maps are what is cached, and the last k
 *              blocks come back as a trainable model (run.blocks) for train.ts to fine-tune.
 *   finishRun  evaluate() on the val split, the checkpoint (its meta built from the dataset's manifest),
 *              the footer the loop reads.
 */
import { type } from "arktype";
import { cac } from "cac";
import type * as tf from "@tensorflow/tfjs";
import {
  TIME_BUDGET, describeDataset, evaluate, loadCache, loadCacheAtSize, peakMemoryMb, printFooter, type Dataset,
} from "../prepare.ts";
import { backendLabel, initBackend } from "./backend.ts";
import { LATEST_CHECKPOINT_DIR, checkpointMeta, layersPredictor, saveCheckpoint } from "./checkpoint.ts";
import {
  backbonePredictor, backboneWithFeatures, blocksAndHead, describeBackbone, type Backbone, type FeatureCache,
} from "./backbones.ts";
import { headCommit } from "./git.ts";
import type { HpValue } from "./journal.ts";

// ---------------------------------------------------------------------------
// HP and HP_SPACE: train.ts declares each key once, in HP
// ---------------------------------------------------------------------------

export type HpRecord = Record<string, HpValue>;

/** Each HP key's candidate values, in order: what `--print-hp` prints and the built-in proposer walks. */
export type HpSpace<T extends HpRecord> = { [K in keyof T]: readonly T[K][] };

/**
 * HP_SPACE from the candidate lists train.ts gives: a key it lists nothing for has HP's value alone
 * (the proposer leaves such a key alone), so a new HP key needs no entry here.
 */
export function hpSpace<T extends HpRecord>(hp: T, lists: { [K in keyof T]?: readonly T[K][] }): HpSpace<T> {
  return Object.fromEntries(Object.keys(hp).map((k) => [k, lists[k] ?? [hp[k]]])) as HpSpace<T>;
}

/**
 * HP with the overrides applied, checked against what train.ts declares for each key (HP's value and
 * HP_SPACE's list): exactly HP's keys (a misspelt AR_HP key is an error, not a silent no-op); a boolean
 * stays a boolean; a string is one of its declared values; a number is a number, whole when every
 * declared value is whole, and not negative when no declared value is.
 */
export function checkHp<T extends HpRecord>(HP: T, space: HpSpace<T>, overrides: object, origin: string): T {
  const stray = Object.keys(space).filter((k) => !(k in HP));
  if (stray.length > 0) throw new Error(`train.ts HP_SPACE: ${stray.join(", ")} not in HP`);
  const schema: Record<string, unknown> = { "+": "reject" };
  for (const [key, value] of Object.entries(HP)) {
    const declared: unknown[] = [value, ...(space[key] ?? [])];
    if (typeof value === "boolean") schema[key] = "boolean";
    else if (typeof value === "string") schema[key] = type.enumerated(...new Set(declared));
    else {
      const nums = declared.filter((v): v is number => typeof v === "number");
      const whole = nums.every(Number.isInteger), nonNegative = nums.every((v) => v >= 0);
      schema[key] = `${whole ? "number.integer" : "number"}${nonNegative ? " >= 0" : ""}`;
    }
  }
  const hp: unknown = type.raw(schema)({ ...HP, ...overrides });
  if (hp instanceof type.errors) throw new Error(`${origin}: ${hp.summary}`);
  return hp as T;
}

/** AR_HP='{"key": value, …}': HP keys to override for one run (checkHp still validates them). */
export function parseOverrides(json: string | undefined): object {
  try {
    const o: unknown = JSON.parse(json || "{}");
    if (typeof o === "object" && o !== null && !Array.isArray(o)) return o;
  } catch { /* reported below */ }
  throw new Error(`AR_HP must be a JSON object of HP keys, got: ${json}`);
}

// ---------------------------------------------------------------------------
// The command line
// ---------------------------------------------------------------------------

const Flags = type({ budget: "number > 0", checkpoint: "string", printHp: "boolean" });
type Flags = typeof Flags.infer;

/** The flags, or null after --help printed the usage. */
function parseFlags(argv: string[]): Flags | null {
  const cli = cac("train.ts");
  cli.usage("[options]\n\n  Trains the model of train.ts on the prepared dataset for a fixed wall-clock budget.\n"
    + "  AR_HP='{\"key\": value, …}' overrides HP keys for one run (checked against HP and HP_SPACE).")
    .option("--budget <seconds>", "training wall-clock budget", { default: TIME_BUDGET })
    .option("--checkpoint <dir>", "where to save the model", { default: LATEST_CHECKPOINT_DIR })
    .option("--print-hp", "print HP and HP_SPACE as JSON and exit", { default: false });
  cli.help();
  const o = cli.parse(argv, { run: false }).options;
  if (o.help === true) return null;
  const flags = Flags({ budget: Number(o.budget), checkpoint: String(o.checkpoint), printHp: o.printHp === true });
  if (flags instanceof type.errors) throw new Error(`train.ts: ${flags.summary}`);
  return flags;
}

// ---------------------------------------------------------------------------
// Before the first step, after the last
// ---------------------------------------------------------------------------

export interface Run<T extends HpRecord> {
  hp: T;
  ds: Dataset;
  /** Seconds of training: the loop stops when its own clock passes this. */
  budget: number;
  checkpointDir: string;
  /** The frozen backbone and its features of every dataset row; both null when training from pixels. */
  backbone: Backbone | null;
  features: FeatureCache | null;
  /** With hp.flip: the backbone's features of every image mirrored (left and right swapped); else null. */
  mirrored: FeatureCache | null;
  /**
   * Fine-tuning (hp.unfreezeBlocks > 0): the backbone's last blocks, pretrained and trainable,
   * [B, features.dim] → [B, headDim]; train.ts runs them on `features` inside its gradient tape.
   */
  blocks: tf.LayersModel | null;
  /** Width of the head's input: the pooled features (after `blocks` if any); null when training from pixels. */
  headDim: number | null;
  featureSeconds: number;
  startedAt: number;
}

/**
 * Everything before the first step. --help and --print-hp print and exit here; any error from here
 * to the end of the run is printed as one `error: …` line with exit code 1.
 */
export async function startRun<T extends HpRecord>(HP: T, HP_SPACE: HpSpace<T>): Promise<Run<T>> {
  const startedAt = performance.now();
  const fail = (err: unknown) => {
    console.error(`error: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  };
  process.on("uncaughtException", fail);
  process.on("unhandledRejection", fail);
  const flags = parseFlags(process.argv);
  if (flags === null) process.exit(0);
  if (flags.printHp) {
    console.log(JSON.stringify({ HP, HP_SPACE }));
    process.exit(0);
  }
  const env = process.env.AR_HP;
  const hp = checkHp(HP, HP_SPACE, parseOverrides(env), `train.ts HP block${env ? " + AR_HP" : ""}`);
  if (env) console.log(`hp overrides from AR_HP: ${env}`);
  // From scratch every heavy kernel is ours: all threads to our SIMD pool. A backbone's convolutions are
  // XNNPACK's: tfjs' pool keeps the threads (lib/backend.ts, wasmPool).
  const name = typeof hp.backbone === "string" && hp.backbone !== "none" ? hp.backbone : null;
  await initBackend({ wasmPool: name === null ? "simd" : "xnnpack" });
  // hp.imageSize picks among the sizes prepare cached (`--sizes`); an uncached one is a one-line error.
  const ds = typeof hp.imageSize === "number" ? await loadCacheAtSize(hp.imageSize) : await loadCache();
  describeDataset(ds.manifest, (l) => console.log(l));

  // A frozen backbone: features of every image, cached next to the image cache (not in the budget).
  // Under the loop `bun prepare.ts features` has cached them already; run by hand, they are made here.
  const t = performance.now();
  const inputSize = typeof hp.backboneSize === "number" ? hp.backboneSize : undefined;
  const unfreezeBlocks = typeof hp.unfreezeBlocks === "number" ? hp.unfreezeBlocks : undefined;
  // Random flips over cached features: the mirrored photos' features are cached as well.
  const mirrored = hp.flip === true;
  const prepared = name === null ? null : await backboneWithFeatures(ds, name, { inputSize, unfreezeBlocks, mirrored });
  const backbone = prepared?.backbone ?? null;
  const features = prepared?.features ?? null;
  const blocks = backbone && backbone.unfrozenBlocks > 0 ? await backbone.trainableBlocks() : null;
  if (backbone) console.log(describeBackbone(backbone));
  const headDim = blocks ? Number(blocks.outputs[0]!.shape[1]) : features?.dim ?? null;
  return {
    hp, ds, budget: flags.budget, checkpointDir: flags.checkpoint, backbone, features, blocks, headDim,
    mirrored: prepared?.mirrored ?? null,
    featureSeconds: (performance.now() - t) / 1000, startedAt,
  };
}

/** What the training loop measured. */
export interface Trained { steps: number; epochs: number; images: number; trainingSeconds: number }

/**
 * Everything after the last step: evaluate `model` (output 0: class probabilities; output 1, if any:
 * yields) on the val split, save it as a checkpoint, print the footer.
 */
export async function finishRun(run: Run<HpRecord>, head: tf.LayersModel, t: Trained): Promise<void> {
  const { ds, backbone, features } = run;
  // Fine-tuned: the checkpoint is the trained blocks and the head as one model over the frozen part's features.
  const model = run.blocks ? blocksAndHead(run.blocks, head) : head;
  const predict = backbone ? backbonePredictor(model, backbone, features ?? undefined) : layersPredictor(model);
  const result = await evaluate(predict, ds);
  const numParams = model.countParams();
  await saveCheckpoint(run.checkpointDir, model, checkpointMeta(ds.manifest, {
    backbone: backbone?.id ?? null, hasYieldHead: model.outputs.length > 1, numParams, metrics: result.metrics,
    commit: headCommit(), ...(backbone ? { notes: describeBackbone(backbone) } : {}),
    ...(backbone && backbone.unfrozenBlocks > 0 ? { unfrozenBlocks: backbone.unfrozenBlocks } : {}),
  }));
  const ips = t.images / Math.max(t.trainingSeconds, 1e-9);
  console.log(`checkpoint: ${run.checkpointDir}  (epochs: ${t.epochs}, ${ips.toFixed(1)} img/s)`);
  if (features) {
    const how = features.reused && (run.mirrored?.reused ?? true) ? "cached features" : "extracted now";
    console.log(`feature_seconds: ${run.featureSeconds.toFixed(1)} (${how}; not part of training_seconds)`);
  }
  printFooter(result, {
    training_seconds: t.trainingSeconds, total_seconds: (performance.now() - run.startedAt) / 1000,
    peak_memory_mb: peakMemoryMb(), num_steps: t.steps, num_params: numParams, backend: backendLabel(),
  }, ds.manifest);
}
