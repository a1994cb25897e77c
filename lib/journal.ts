/**
 * The loop's journal and lock, both in .autoresearch/ (gitignored, so `git reset --hard` never
 * touches them).
 *
 * state.json is rewritten atomically (temp file, fsync, rename) at every phase of an experiment,
 * so after a SIGKILL or a power loss `bun loop.ts --resume` knows exactly how far the interrupted
 * experiment got. summarize_results.ts reads it too (noise floor, best, baseline): the field
 * names below are a contract, change them only with a version bump.
 *
 * lock holds the pid of the one loop allowed to run in this repository.
 */
import { existsSync, mkdirSync, readFileSync, unlinkSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { type } from "arktype";
import { Task } from "../prepare.ts";
import { writeAtomic } from "./atomic.ts";
import { ResultRow } from "./results.ts";

export const AR_DIR = ".autoresearch";
export const STATE_FILE = join(AR_DIR, "state.json");
const LOCK_FILE = join(AR_DIR, "lock");
/** Earlier sessions' state.json and results.tsv, one folder per session. */
export const SESSIONS_DIR = join(AR_DIR, "sessions");
/** The loop's own copy of results.tsv: restores it if someone deletes it. */
export const RESULTS_BACKUP = join(AR_DIR, "results.backup.tsv");
/** Each experiment's full training output (<n>-<commit>.log), kept for crash reasons. */
export const LOGS_DIR = join(AR_DIR, "logs");
/** Where a resume moves the changes it did not make, one folder per resume. */
export const SET_ASIDE_DIR = join(AR_DIR, "set-aside");

// ---------------------------------------------------------------------------
// Schema
// ---------------------------------------------------------------------------

/**
 * Phases of one experiment, in order. proposing/committed/training are rolled back on resume
 * (nothing measured yet); evaluating is finished (the checkpoint is on disk); confirming is
 * finished from its journaled runs (a run cut short is trained again); logging/logged are
 * finished without writing a second row; decided is done.
 */
const Phase = type(
  "'proposing' | 'committed' | 'training' | 'evaluating' | 'confirming' | 'logging' | 'logged' | 'decided'",
);
export type Phase = typeof Phase.infer;

/** Phases before anything was measured: a resume or an abort rolls them back, with no row. */
export function unmeasured(phase: Phase): boolean {
  return phase === "proposing" || phase === "committed" || phase === "training";
}

export const HpValue = type("number | boolean | string");
export type HpValue = typeof HpValue.infer;

/** One built-in proposer move: HP[axis] went from `from` to `to`. */
export const Move = type({ axis: "string", from: HpValue, to: HpValue });
export type Move = typeof Move.infer;

/** A move already measured from a given base commit (the built-in proposer never repeats it). */
export const TriedMove = type({ base: "string", axis: "string", value: HpValue, status: "string" });
export type TriedMove = typeof TriedMove.infer;

/** What the training child did, before the checkpoint is measured. */
const TrainOutcome = type({
  ok: "boolean", reason: "string", memoryGb: "number >= 0", trainSeconds: "number >= 0",
  /** Training throughput train.ts reported (null: it printed none). */
  "imagesPerSecond?": "number >= 0 | null",
});

/**
 * What an experiment is: a change of the best (experiment), a repeat of the session's first commit
 * (baseline), a repeat of a kept commit that changed the model's structure, to measure its noise
 * (rebaseline), or the best run again after a streak of crashes, to tell a broken environment
 * from bad ideas (check).
 */
export const Kind = type("'baseline' | 'experiment' | 'rebaseline' | 'check'");
export type Kind = typeof Kind.infer;

/**
 * One measured training run of the experiment's code: its first run or a confirmation run with
 * another seed (AR_HP). `seed` is the seed it trained with (null: train.ts's HP has none).
 * `test` holds its metrics on the test split once the experiment is kept; no decision reads it.
 */
export const MeasuredRun = type({
  seed: "number.integer | null",
  metrics: "Record<string, number>",
  imagesPerSecond: "number >= 0 | null",
  "test?": "Record<string, number> | null",
});
export type MeasuredRun = typeof MeasuredRun.infer;

export const Experiment = type({
  /** 1-based over the session, baselines included; a rolled-back experiment's number is reused. */
  n: "number.integer >= 1",
  kind: Kind,
  phase: Phase,
  /** Full hash of the last kept commit when the experiment started: where a discard resets to. */
  base: "string",
  /** Full hash of the commit being measured, once there is one. */
  candidate: "string | null",
  description: "string",
  move: Move.or("null"),
  /** Process group of the training child while it runs: a resumed loop kills an orphan. */
  trainPid: "number.integer | null",
  outcome: TrainOutcome.or("null"),
  /** The row decided for results.tsv (written to the journal before it is appended). */
  row: ResultRow.or("null"),
  /** Whole data rows in results.tsv when the experiment started: tells if the row is there. */
  rowsBefore: "number.integer >= 0",
  /** Lines of train.ts at the candidate (the simplicity tie-break). */
  trainLines: "number.integer >= 0",
  startedAt: "string",
  /**
   * The first training run's seed: 0 runs HP as train.ts has it, k > 0 runs HP.seed + k (AR_HP).
   * Baseline and re-baseline repeats differ in seed, so the noise floor includes the seed's share.
   */
  seedOffset: type("number.integer >= 0").default(0),
  /** The measured runs, first run first; more than one while it is being confirmed. */
  runs: MeasuredRun.array().default(() => []),
});
export type Experiment = typeof Experiment.infer;

/**
 * The last kept run, what candidates are compared with. While it is the baseline, `metrics` is the
 * mean over the baseline repeats: a candidate's single run against the baseline's expected value.
 */
const Best = type({
  n: "number.integer >= 1",
  commit: "string",
  short: "string",
  metrics: "Record<string, number>",
  trainLines: "number.integer >= 0",
  description: "string",
  /** Mean training throughput of the runs behind `metrics` (null: train.ts printed none). */
  "imagesPerSecond?": "number >= 0 | null",
});
type Best = typeof Best.infer;

/** The kept model's folder, the loop's copy of it, and each file's sha256 (see lib/best_model.ts). */
const KeptModel = type({ dir: "string", copy: "string", files: "Record<string, string>" });
export type KeptModel = typeof KeptModel.infer;

/** Spread of the primary metric over the baseline repeats; improvements below `floor` are noise. */
export const Noise = type({
  metric: "string",
  runs: "number[]",
  mean: "number",
  /** Sample standard deviation (n − 1); 0 with a single baseline run. */
  sigma: "number >= 0",
  /** The --noise-sigmas multiplier. */
  sigmas: "number >= 0",
  /** sigmas · sigma: a keep needs a primary gain strictly above this. */
  floor: "number >= 0",
});
export type Noise = typeof Noise.infer;

/**
 * Every training run the session measured, in order (baseline repeats, first runs, confirmation
 * runs, re-baseline repeats, checks): its score next to its throughput, for the summary.
 */
export const RunRecord = type({
  n: "number.integer >= 1",
  kind: Kind,
  /** Short hash of the commit trained. */
  commit: "string",
  seed: "number.integer | null",
  metrics: "Record<string, number>",
  imagesPerSecond: "number >= 0 | null",
});
export type RunRecord = typeof RunRecord.infer;

/**
 * A kept (or baseline) model measured on the test split: never read by a keep decision. A keep
 * gives one entry per run of its code (first run and confirmation runs), a baseline one per
 * repeat; a re-baseline repeat of a kept commit is recorded as "keep" with that commit.
 */
export const TestRun = type({
  n: "number.integer >= 1",
  kind: "'baseline' | 'keep'",
  commit: "string",
  metrics: "Record<string, number>",
});
export type TestRun = typeof TestRun.infer;

/** Repeats of a kept commit that changed the model's structure: its own noise floor. */
export const Rebaseline = type({
  /** Full hash of the kept commit, and the move that made it (e.g. backbone none -> mobilenet). */
  commit: "string",
  move: "string",
  /** Repeats wanted after the keep, repeats done, and the metrics of all its runs (the keep's own first). */
  wanted: "number.integer >= 0",
  done: "number.integer >= 0",
  metrics: type("Record<string, number>").array(),
});
export type Rebaseline = typeof Rebaseline.infer;

export const State = type({
  version: "1",
  branch: "string",
  tag: "string",
  task: Task,
  primary: "string",
  secondary: "string",
  startedAt: "string",
  updatedAt: "string",
  /** pid of the loop that last wrote this file. */
  pid: "number.integer",
  /** The commit the session started from (the baseline's code). */
  sessionStart: "string",
  settings: {
    budgetSeconds: "number > 0",
    baselineRuns: "number.integer >= 1",
    noiseSigmas: "number >= 0",
    seed: "number.integer",
    /** Extra runs, with other seeds, that confirm a candidate before it is kept (absent: none). */
    "confirmRuns?": "number.integer >= 0",
  },
  /** sha256 of every tracked file except train.ts and run.md, at session start. */
  protected: "Record<string, string>",
  /** The prepared dataset the session measures on; it must not change under the loop. */
  cache: { dir: "string", images: "string", manifest: "string" },
  /** The baseline repeats measured so far (their primary, and all their metrics). */
  baselines: { wanted: "number.integer >= 1", primaries: "number[]", metrics: "Record<string, number>[]" },
  /**
   * The unmodified train.ts: per-metric mean over the baseline repeats once they are all in
   * (the first run's metrics before that). "best vs baseline" in summaries.
   */
  baseline: type({ commit: "string", metrics: "Record<string, number>" }).or("null"),
  noise: Noise.or("null"),
  best: Best.or("null"),
  /** The files of the best model as kept (absent in older journals): checked after every run. */
  "bestModel?": KeptModel.or("null"),
  nextN: "number.integer >= 1",
  counts: {
    experiments: "number.integer >= 0", keeps: "number.integer >= 0",
    discards: "number.integer >= 0", crashes: "number.integer >= 0",
  },
  crashStreak: "number.integer >= 0",
  tried: TriedMove.array(),
  /** The last kept built-in move: tried again in the same direction first. */
  lastKeptMove: type({ axis: "string", direction: "1 | -1" }).or("null"),
  /** Wall-clock sums over finished experiments: loop overhead = wall − train. */
  timing: { runs: "number.integer >= 0", trainSeconds: "number >= 0", wallSeconds: "number >= 0" },
  current: Experiment.or("null"),
  /**
   * What a model that ignores its input scores on the primary (screening: bin_acc of always
   * answering the majority side), from the baseline's metrics; null for tasks without one.
   */
  trivial: type({ metric: "string", value: "number" }).or("null").default(null),
  testRuns: TestRun.array().default(() => []),
  runs: RunRecord.array().default(() => []),
  /** The re-baseline of the last structure-changing keep (null: none yet). */
  rebaseline: Rebaseline.or("null").default(null),
  /** Built-in axes left alone after a streak of crashes on them (backing off instead of pausing). */
  skipAxes: type("string[]").default(() => []),
});
export type State = typeof State.infer;

// ---------------------------------------------------------------------------
// Reading and writing
// ---------------------------------------------------------------------------

export function saveState(root: string, st: State): void {
  st.updatedAt = new Date().toISOString();
  st.pid = process.pid;
  writeAtomic(join(root, STATE_FILE), `${JSON.stringify(st, null, 2)}\n`);
}

/** The journal at `path`, null when there is none; a corrupt one is an error, not a fresh start. */
export function readState(path: string): State | null {
  if (!existsSync(path)) return null;
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(path, "utf8"));
  } catch {
    throw new Error(`${path}: not valid JSON; move it away to start a new session`);
  }
  const st = State(raw);
  if (st instanceof type.errors) throw new Error(`${path}: not a loop journal: ${st.summary.replace(/\n+/g, "; ")}`);
  return st;
}

// ---------------------------------------------------------------------------
// Lock: one loop per repository
// ---------------------------------------------------------------------------

const LockFile = type({ pid: "number.integer > 0", startedAt: "string" });

/**
 * Whether `pid` is a running process. A zombie (exited, never reaped: what an orphaned child
 * becomes under an init that does not reap, as in some containers) counts as dead.
 */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    // EPERM: the process exists but belongs to someone else.
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z";
  } catch {
    return true; // no /proc (macOS): kill(pid, 0) is all we have
  }
}

/**
 * Take the lock or explain who holds it. A lock left by a dead pid (a SIGKILLed loop) is taken
 * over, with a message. Returns a function that releases it.
 */
export function acquireLock(root: string, log: (line: string) => void): () => void {
  const path = join(root, LOCK_FILE);
  mkdirSync(dirname(path), { recursive: true });
  const body = JSON.stringify({ pid: process.pid, startedAt: new Date().toISOString() });
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      writeFileSync(path, body, { flag: "wx" }); // wx: fails if another process created it first
      return () => {
        try {
          const held = LockFile(JSON.parse(readFileSync(path, "utf8")));
          if (!(held instanceof type.errors) && held.pid === process.pid) unlinkSync(path);
        } catch { /* already gone */ }
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
    }
    let holder: number | null = null;
    try {
      const held = LockFile(JSON.parse(readFileSync(path, "utf8")));
      if (!(held instanceof type.errors)) holder = held.pid;
    } catch { /* unreadable: treated as stale */ }
    if (holder !== null && holder !== process.pid && pidAlive(holder)) {
      throw new Error(`another loop (pid ${holder}) is running in this repository (${path}); stop it first`);
    }
    log(`taking over a stale lock ${path} (pid ${holder ?? "unknown"} is not running)`);
    try { unlinkSync(path); } catch { /* raced with another taker: the next wx decides */ }
  }
  throw new Error(`${path}: could not take the lock`);
}
