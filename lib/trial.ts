/**
 * One trial of a commit, in child processes: `bun prepare.ts features` when it trains on a frozen
 * backbone (the harness's download and extraction, on its own clock), `bun train.ts` live with one
 * fixed deadline, then `bun prepare.ts evaluate` re-measuring the checkpoint it saved (what
 * train.ts prints is never trusted). None touches git or the journal: the loop decides what a
 * trial's outcome means.
 */
import { closeSync, existsSync, mkdirSync, openSync, rmSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { type } from "arktype";
import { TASK_METRICS, Task, parseFooter } from "../prepare.ts";
import { runChild, type ChildHooks, type Ran } from "./child.ts";
import { readHp } from "./proposer.ts";
import { oneLine } from "./results.ts";

/** How long `prepare.ts evaluate` may take: one forward pass over the validation split. */
const EVAL_TIMEOUT_S = 600;

/** train.ts has printed its whole footer: the task's metrics and the line that ends it. */
function footerComplete(stdout: string, columns: readonly string[]): boolean {
  if (!stdout.includes("---\n")) return false;
  const footer = parseFooter(stdout);
  const complete = columns.every((c) => footer[c] !== undefined) && footer.confusion !== undefined;
  return complete && stdout.endsWith("\n");
}

/** Why a training run is a crash, or ok. Pure: the tests feed it made-up output. */
export function classifyTrain(a: {
  code: number; timedOut: boolean; deadlineS: number; stdout: string; all: string; columns: readonly string[];
  checkpointOk: boolean;
}): { ok: boolean; reason: string } {
  if (a.timedOut) return { ok: false, reason: `timeout: killed after ${a.deadlineS}s` };
  const lines = a.all.split("\n").map((l) => l.trim()).filter(Boolean);
  const nan = lines.find((l) => /^FAIL: loss is (NaN|-?Infinity)/.test(l));
  if (nan) return { ok: false, reason: oneLine(nan, 80) };
  if (a.code !== 0) {
    const err = lines.filter((l) => /^(error|Error|\w*Error)\b|^FAIL\b/.test(l)).at(-1) ?? lines.at(-1) ?? "";
    return { ok: false, reason: oneLine(`exit ${a.code}${err ? `: ${err}` : ""}`, 160) };
  }
  const footer = parseFooter(a.stdout);
  const missing = a.columns.filter((c) => footer[c] === undefined);
  if (missing.length > 0) {
    return { ok: false, reason: `no footer: train.ts printed no \`---\` summary with ${missing.join(", ")}` };
  }
  if (!a.checkpointOk) return { ok: false, reason: "no checkpoint: train.ts saved no model" };
  return { ok: true, reason: "" };
}

/**
 * Training throughput a run reported: the `checkpoint: … (epochs: E, X img/s)` line train.ts prints
 * at the end, else its last `| X img/s |` progress line. Backbone feature extraction prints img/s
 * too (`features …`); that is not training and never matches. Null: it printed neither.
 */
export function imagesPerSecond(stdout: string): number | null {
  const footer = [...stdout.matchAll(/^checkpoint: .*\(epochs: [^,]*, ([\d.]+) img\/s\)\s*$/gm)].at(-1);
  const progress = [...stdout.matchAll(/\| *([\d.]+) img\/s *\|/g)].at(-1);
  const v = Number((footer ?? progress)?.[1]);
  return Number.isFinite(v) && v >= 0 ? v : null;
}

interface TrainOptions extends ChildHooks {
  cwd: string;
  bun: string;
  task: Task;
  budgetS: number;
  /** Extra environment for train.ts (AR_HP: another seed for a repeat or a confirmation run). */
  env?: Record<string, string>;
  /** train.ts is killed this long after its start, whatever it prints. */
  deadlineS: number;
  checkpointDir: string;
  lingerS: number;
}

/** `bun train.ts` for one budget, live, and whether it produced a footer and a checkpoint. */
async function trainOnce(o: TrainOptions): Promise<{
  ran: Ran; ok: boolean; reason: string; imagesPerSecond: number | null;
}> {
  const columns = TASK_METRICS[o.task].columns;
  const ran = await runChild([o.bun, "train.ts", "--budget", String(o.budgetS), "--checkpoint", o.checkpointDir], {
    cwd: o.cwd, timeoutS: o.deadlineS, echo: true, logs: o.logs, onSpawn: o.onSpawn, log: o.log, env: o.env,
    finished: { when: (out) => footerComplete(out, columns), lingerS: o.lingerS },
  });
  const verdict = classifyTrain({
    code: ran.lingered ? 0 : ran.code, timedOut: ran.timedOut, deadlineS: o.deadlineS, stdout: ran.stdout, all: ran.all,
    columns, checkpointOk: existsSync(join(resolve(o.cwd, o.checkpointDir), "meta.json")),
  });
  return { ran, ...verdict, imagesPerSecond: imagesPerSecond(ran.stdout) };
}

interface CandidateOptions extends Omit<TrainOptions, "logs"> {
  /** The run's own log (written anew; summarize finds crash logs by commit) and run.log (appended to). */
  logFile: string;
  runLog: string;
  /** `bun prepare.ts features`: its timeout, and the silence that counts as a stalled download. */
  featuresTimeoutS: number;
  featuresStallS: number;
  /** What the status line calls this run (`abc1234: lr 0.003 -> 0.005 with seed 43`). */
  label: string;
  /** The loop's status line: what is about to run. */
  announce: (what: string) => void;
  onFeaturesSpawn: (pid: number) => void;
  /** Runs once the features are ready, before train.ts starts; may throw to end the run there. */
  afterFeatures: () => void;
}

/**
 * One training run of a candidate: its backbone's features when it needs them, then `bun train.ts`
 * into `checkpointDir`, emptied first (a stale model must not pass for this run's). `ran` is null
 * when train.ts never started (the features failed: `reason`).
 */
export async function trainCandidate(o: CandidateOptions): Promise<{
  ran: Ran | null; ok: boolean; reason: string; imagesPerSecond: number | null;
}> {
  rmSync(resolve(o.cwd, o.checkpointDir), { recursive: true, force: true });
  mkdirSync(dirname(resolve(o.cwd, o.logFile)), { recursive: true });
  const logs = [openSync(resolve(o.cwd, o.logFile), "w"), openSync(resolve(o.cwd, o.runLog), "a")];
  try {
    const failure = await backboneFeatures({
      cwd: o.cwd, bun: o.bun, timeoutS: o.featuresTimeoutS, silenceS: o.featuresStallS, logs, log: o.log,
      announce: o.announce, onSpawn: o.onFeaturesSpawn,
    });
    o.afterFeatures();
    if (failure !== null) return { ran: null, ok: false, reason: `features: ${failure}`, imagesPerSecond: null };
    o.announce(`training ${o.label} (budget ${o.budgetS}s, killed at ${o.deadlineS}s)`);
    return await trainOnce({ ...o, logs });
  } finally {
    for (const fd of logs) closeSync(fd);
  }
}

/**
 * `bun prepare.ts features`: download a frozen backbone and cache its features of every image, so
 * that train.ts finds them ready. Its own timeout, and a silence that counts as a stall.
 */
async function prepareFeatures(o: ChildHooks & {
  cwd: string; bun: string; backbone: string; size: number | null; unfreeze: number; mirrored: boolean;
  timeoutS: number; silenceS: number;
}): Promise<{ ok: boolean; reason: string; seconds: number }> {
  const size = o.size === null ? [] : ["--size", String(o.size)];
  const unfreeze = o.unfreeze > 0 ? ["--unfreeze", String(o.unfreeze)] : [];
  const mirrored = o.mirrored ? ["--mirrored"] : [];
  const args = ["features", "--backbone", o.backbone, ...size, ...unfreeze, ...mirrored];
  const ran = await runChild([o.bun, "prepare.ts", ...args], {
    cwd: o.cwd, timeoutS: o.timeoutS, silenceS: o.silenceS, echo: true, logs: o.logs, onSpawn: o.onSpawn, log: o.log,
  });
  const seconds = ran.seconds;
  if (ran.silent) return { ok: false, reason: `stalled: no output for ${o.silenceS}s`, seconds };
  if (ran.timedOut) return { ok: false, reason: `timeout after ${o.timeoutS}s (--features-timeout)`, seconds };
  if (ran.code === 0) return { ok: true, reason: "", seconds };
  const lines = ran.all.split("\n").map((l) => l.trim()).filter(Boolean);
  const err = lines.filter((l) => l.startsWith("error")).at(-1) ?? lines.at(-1) ?? `exit ${ran.code}`;
  return { ok: false, reason: oneLine(err, 160), seconds };
}

/**
 * A frozen backbone's download and feature extraction are the harness's work, not the experiment's:
 * when the candidate's HP names a backbone, `bun prepare.ts features` does them before train.ts
 * starts, on its own timeout, and train.ts then finds the features cached. So train.ts has one
 * fixed deadline, whatever it prints. Null when the candidate needs no backbone or its features are
 * ready; else why they could not be made. `announce` hears what is about to run.
 */
async function backboneFeatures(o: ChildHooks & {
  cwd: string; bun: string; timeoutS: number; silenceS: number; announce: (what: string) => void;
}): Promise<string | null> {
  const dump = readHp(o.cwd, o.bun);
  // A train.ts that cannot print its HP fails on its own when it runs, and says why.
  if ("error" in dump) return null;
  const name = dump.HP.backbone;
  if (typeof name !== "string" || name === "none") return null;
  const size = typeof dump.HP.backboneSize === "number" ? dump.HP.backboneSize : null;
  const unfreeze = typeof dump.HP.unfreezeBlocks === "number" ? dump.HP.unfreezeBlocks : 0;
  const part = unfreeze > 0 ? ` (frozen part: all but the last ${unfreeze} blocks)` : "";
  // train.ts flips cached features by reading the mirrored photos' features (lib/run.ts).
  const mirrored = dump.HP.flip === true;
  o.announce(`features of backbone ${name}${size === null ? "" : ` at ${size}px`}${part}: \`bun prepare.ts features\` `
    + `(killed after ${o.timeoutS}s, or after ${o.silenceS}s without output)`);
  const r = await prepareFeatures({ ...o, backbone: name, size, unfreeze, mirrored });
  return r.ok ? null : r.reason;
}

const EvalJson = type({ task: Task, n: "number.integer >= 0", metrics: "Record<string, number>", primary: "string" });

/**
 * `bun prepare.ts evaluate` on a checkpoint: every metric it reports (the task's columns, and
 * `need`, e.g. a primary that is not a column, must be among them), or why there are none.
 * `split` "test" measures the held-out split no keep decision reads; the default is val.
 */
export async function evaluateCheckpoint(o: Omit<ChildHooks, "logs"> & {
  cwd: string; bun: string; task: Task; checkpointDir: string; lingerS: number; split?: "val" | "test";
  need?: readonly string[];
}): Promise<{ metrics: Record<string, number> } | { error: string }> {
  const split = o.split === "test" ? ["--split", "test"] : [];
  const ran = await runChild([o.bun, "prepare.ts", "evaluate", "--model", o.checkpointDir, ...split], {
    cwd: o.cwd, timeoutS: EVAL_TIMEOUT_S, echo: false, onSpawn: o.onSpawn, log: o.log,
    finished: { when: (out) => /^eval_json: .*\n/m.test(out), lingerS: o.lingerS },
  });
  const fail = (error: string) => ({ error });
  if (ran.timedOut) return fail(`timeout after ${EVAL_TIMEOUT_S}s`);
  const lines = ran.all.split("\n").map((l) => l.trim()).filter(Boolean);
  if (ran.code !== 0 && !ran.lingered) {
    return fail(oneLine(lines.filter((l) => l.startsWith("error")).at(-1) ?? lines.at(-1) ?? `exit ${ran.code}`, 160));
  }
  const line = ran.stdout.split("\n").reverse().find((l) => l.startsWith("eval_json: "));
  if (!line) return fail("no eval_json line");
  let raw: unknown;
  try { raw = JSON.parse(line.slice("eval_json: ".length)); } catch { return fail("eval_json is not JSON"); }
  const ev = EvalJson(raw);
  // NaN becomes null in JSON, so a NaN metric fails the schema here.
  if (ev instanceof type.errors) return fail(`eval_json: ${oneLine(ev.summary, 120)}`);
  if (ev.task !== o.task) return fail(`evaluated task ${ev.task}, the session's is ${o.task}`);
  const missing = [...new Set([...TASK_METRICS[o.task].columns, ...(o.need ?? [])])]
    .filter((c) => !Number.isFinite(ev.metrics[c]));
  if (missing.length > 0) return fail(`eval_json lacks ${missing.join(", ")}`);
  return { metrics: ev.metrics };
}
