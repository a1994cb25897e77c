/**
 * loop.ts — the overnight research loop. A person runs it at night and finds, in the morning, a
 * branch whose commits are the kept improvements, a complete results.tsv, and nothing broken.
 *
 *   bun loop.ts                          # new session on branch autoresearch/<date>, built-in proposer
 *   bun loop.ts --agent "claude -p"      # a coding agent proposes each change to train.ts
 *   bun loop.ts --resume                 # continue the session (recovers a killed loop first)
 *   bun loop.ts --once                   # measure the commit at HEAD (an agent following program.md)
 *   bun loop.ts --budget 60 --max-experiments 10 --tag quick
 *
 * This file is the cycle: propose → commit → train → measure → decide → log → apply, each phase
 * journaled first so that `--resume` finishes or rolls back an interrupted experiment. What it
 * does before it believes a gain, and how it survives faults, is in README.md ("Verdicts",
 * "Reliability"); the pieces it uses are in lib/ (README's layout table).
 *
 * Exit codes: 0 stopped normally (run.md False, --max-experiments, Ctrl-C after logging, --once
 * done), 1 an error the loop did not expect, such as its own files not writable (one line naming
 * the file; `--resume` once it is fixed), 2 refused (dirty tree, existing branch, lock held, bad
 * run.md or flags, nothing to measure), 3 paused (the baseline crashed, the best crashed again
 * after a crash streak, a crash streak under --once, the prepared data changed), 130 aborted by a
 * second Ctrl-C (the interrupted experiment is rolled back, no row).
 *
 * Test-only environment: AR_TEST_KILL_AT=<point> makes the loop SIGKILL itself right after that
 * point (proposing, proposed, committed, training, evaluating, confirming, confirm-training,
 * logging, appended, logged, decided); AR_TEST_ALLOWANCE_S replaces the fixed startup/evaluation
 * allowance of the training deadline; AR_TEST_FEATURES_STALL_S the silence that ends
 * `bun prepare.ts features` (a stuck download); AR_TEST_LINGER_S how long a child that printed
 * its result may take to exit.
 */
import { appendFileSync, closeSync, existsSync, openSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { CACHE_ROOT, TASK_METRICS } from "./prepare.ts";
import { buildPrompt, proposeWithAgent } from "./lib/agent.ts";
import { writeAtomic } from "./lib/atomic.ts";
import { keepModel, restoreModel } from "./lib/best_model.ts";
import { LATEST_CHECKPOINT_DIR, bestCheckpointDir } from "./lib/checkpoint.ts";
import { EXIT, Stop, catchSignals, failureLine, type Interrupts } from "./lib/exit.ts";
import { git, gitOk } from "./lib/git.ts";
import { checkIntegrity, type Integrity } from "./lib/integrity.ts";
import {
  LOGS_DIR, RESULTS_BACKUP, STATE_FILE, saveState, unmeasured, type Kind, type Phase, type State,
} from "./lib/journal.ts";
import { parseFlags, type Flags } from "./lib/loop_flags.ts";
import { hpSeed, proposeBuiltin, seedFor, streakAxes, type Proposal } from "./lib/proposer.ts";
import {
  RESULTS_FILE, appendResult, countRows, crashRow, formatRow, lastWholeLine, measuredRow, oneLine, type Status,
} from "./lib/results.ts";
import {
  COMMIT_FIRST, baselineReport, checkResumed, checkoutSession, claimRepository, cleanUpAfterKill, decisionLine,
  loadResultsText, newExperiment, notClean, openSession, rebaselineReport, recordDecision, restoreResults,
  resumeSettings, resumedLine, runLine, sessionReport, statusLine, summarize,
} from "./lib/session.ts";
import type { JobData, LoopQueue, Pending, QueueJournal } from "./lib/queue.ts";
import { evaluateCheckpoint, trainCandidate } from "./lib/trial.ts";
import { confirmVerdict, decide, lineCount, num, signed } from "./lib/verdict.ts";
import {
  TRAIN, commitAside, commitPaths, dirtyPaths, readText, removeFiles, resetTo, rev, runMdSaysGo, shortOf,
  untrackedFiles,
} from "./lib/worktree.ts";

// ---------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------

/** The repository the loop runs in: the folder of this file (tests copy it into temp repos). */
const ROOT = import.meta.dir;
const BUN = process.execPath;
const RUN_LOG = "run.log";
/** Seconds on top of budget + grace for startup, the uncounted warm-up steps, train.ts's own eval and the save. */
const ALLOWANCE_S = Number(process.env.AR_TEST_ALLOWANCE_S ?? 60);
/** Silence of `bun prepare.ts features` (it prints progress every few seconds) that counts as a stalled download. */
const FEATURES_STALL_S = Number(process.env.AR_TEST_FEATURES_STALL_S ?? 300);
/**
 * A child that printed what the loop needs (train.ts its footer, evaluate its eval_json line) but
 * does not exit (a leftover thread or timer) is killed this long after, and its result stands.
 */
const LINGER_S = Number(process.env.AR_TEST_LINGER_S ?? 15);
/** Checkpoints of a candidate's confirmation runs, one folder per run: the first run's stays in latest/. */
const CONFIRM_DIR = join("checkpoints", "confirm");

/** Ctrl-C / SIGTERM: the first asks to stop after the current experiment, the second aborts it. */
const control: Interrupts = { stop: false, abort: false, child: null };

/** What every phase works on: the flags, the journal (saved at each phase), and results.tsv. */
interface Ctx {
  flags: Flags;
  mode: "builtin" | "agent" | "once";
  st: State;
  /** results.tsv as the loop last wrote it: the reference for "someone changed it". */
  resultsText: string;
  /** Set when something the loop cannot repair happened (the data changed): pause after logging. */
  fatal: string | null;
  warnedNoSummarizer: boolean;
  /** Why the test split cannot be measured (said once; not tried again in this process), or null. */
  noTestSplit: string | null;
  /** HP.seed of a commit (null: train.ts has none), read once per commit. */
  hpSeeds: Map<string, number | null>;
  /** --queue: workers train, the loop decides (null: the loop trains itself). */
  queue: Queued | null;
}

/** What the loop holds while workers train: the queue, its journal, the data key, results awaiting decision. */
interface Queued {
  Q: typeof import("./lib/queue.ts");
  q: LoopQueue;
  journal: QueueJournal;
  data: JobData["data"];
  /** The dispatched run whose turn it is (null: the current experiment was not dispatched ahead). */
  head: Pending | null;
  /** `prepare.ts evaluate` on val as the worker measured it, by checkpoint folder, until the loop reads it. */
  measured: Map<string, { metrics: Record<string, number> } | { error: string }>;
  /** Jobs of the current experiment: removed from Redis once it is decided. */
  jobIds: string[];
}

// ---------------------------------------------------------------------------
// Output and small helpers
// ---------------------------------------------------------------------------

const T0 = performance.now();

function elapsed(): string {
  const s = Math.floor((performance.now() - T0) / 1000);
  const two = (n: number) => String(n).padStart(2, "0");
  return `${Math.floor(s / 3600)}:${two(Math.floor(s / 60) % 60)}:${two(s % 60)}`;
}

/** The loop's own lines: `[loop] …` on the terminal and in run.log, between train.ts's output. */
function say(msg: string): void {
  const line = `[loop] ${msg}`;
  console.log(line);
  try { appendFileSync(RUN_LOG, `${line}\n`); } catch { /* run.log is a convenience */ }
}

/** Test-only: AR_TEST_KILL_AT=<point> SIGKILLs the loop here, to test --resume from every phase. */
function killPoint(point: string): void {
  if (process.env.AR_TEST_KILL_AT === point) process.kill(process.pid, "SIGKILL");
}

function save(ctx: Ctx): void {
  saveState(ROOT, ctx.st);
}

/** Journal the current experiment at `phase` (where a test may have the loop killed). */
function enter(ctx: Ctx, phase: Phase): void {
  ctx.st.current!.phase = phase;
  save(ctx);
  killPoint(phase);
}

/** A child's pid becomes the one a second Ctrl-C kills. */
function track(pid: number): void {
  control.child = pid;
}

function status(ctx: Ctx, what: string): void {
  say(statusLine(ctx.st, elapsed(), what));
}

// ---------------------------------------------------------------------------
// Integrity: everything except train.ts is as it was at the session start
// ---------------------------------------------------------------------------

function integrity(ctx: Ctx, base: string, allowTrain: boolean): Promise<Integrity> {
  return checkIntegrity({
    cwd: ROOT, base, allowTrain, protected: ctx.st.protected, cache: ctx.st.cache, cacheRoot: CACHE_ROOT,
    results: { path: RESULTS_FILE, expected: ctx.resultsText }, best: ctx.st.bestModel,
  });
}

/**
 * Put everything but the data back: tracked files to `base`, new files removed, results.tsv
 * rewritten, the best model restored from the loop's copy.
 */
async function repair(ctx: Ctx, base: string, integ: Integrity): Promise<void> {
  resetTo(ROOT, base);
  removeFiles(ROOT, integ.untracked);
  restoreResults(ROOT, ctx.resultsText, say);
  if (integ.bestChanged) await restoreBest(ctx);
  if (integ.cacheChanged) {
    ctx.fatal = `the prepared data in ${ctx.st.cache.dir} changed during the session, and the loop cannot restore it: `
      + "re-run `bun prepare.ts` with the session's source, then `bun loop.ts --resume` (or start a new session)";
  }
}

// ---------------------------------------------------------------------------
// Propose and commit
// ---------------------------------------------------------------------------

/** The change to measure: the baseline as it is, HEAD's commit (--once), an agent's edit, or the next built-in move. */
async function propose(ctx: Ctx): Promise<Proposal> {
  const cur = ctx.st.current!;
  if (cur.kind !== "experiment") return { description: cur.description, move: null, failure: null };
  if (ctx.queue?.head) return adopt(ctx, ctx.queue.head);
  if (ctx.mode === "once") {
    return { description: oneLine(git(["log", "-1", "--format=%s"], { cwd: ROOT })), move: null, failure: null };
  }
  if (ctx.mode === "agent") {
    const runLog = openSync(RUN_LOG, "a");
    let p: Proposal;
    try {
      p = await proposeWithAgent({
        cwd: ROOT, command: ctx.flags.agent ?? "", timeoutS: ctx.flags.agentTimeout,
        prompt: buildPrompt(ROOT, ctx.st, ctx.resultsText), base: cur.base, logs: [runLog], onSpawn: track, log: say,
      });
    } finally {
      control.child = null;
      closeSync(runLog);
    }
    if (control.abort) throw new Stop(EXIT.aborted, "aborted while the agent ran");
    return p;
  }
  const p = proposeBuiltin(ROOT, BUN, ctx.st, cur.base);
  if (p) return p;
  ctx.st.current = null;
  save(ctx);
  throw new Stop(EXIT.ok, "the built-in search has measured every value of HP_SPACE reachable from the current best: "
    + "nothing left to try (widen HP_SPACE in train.ts, or use --agent)");
}

/**
 * Phase proposing → committed: get a change, check that nothing but train.ts changed, commit.
 * A refused proposal becomes a crash row straight away (phase logging), with the tree repaired.
 */
async function proposeAndCommit(ctx: Ctx): Promise<void> {
  const cur = ctx.st.current!;
  const p = await propose(ctx);
  killPoint("proposed");
  const head = rev(ROOT, "HEAD");
  const integ = await integrity(ctx, cur.base, true);
  let failure = p.failure;
  if (integ.problems.length > 0) failure = `reverted: ${integ.problems.join(", ")}`;
  else if (cur.kind === "experiment" && gitOk(["diff", "--quiet", cur.base, "--", TRAIN], ROOT)) {
    failure = "no change to train.ts";
  }
  cur.description = p.description;
  if (failure !== null) {
    // Nothing of this proposal is measured: back to the last kept commit, one crash row.
    const commitCol = head !== cur.base ? shortOf(ROOT, head) : "-";
    await repair(ctx, cur.base, integ);
    say(`#${cur.n} ${p.description}: ${failure}`);
    cur.row = crashRow(ctx.st.task, commitCol, `${p.description} (${failure})`);
    enter(ctx, "logging");
    return;
  }
  if (cur.kind === "experiment" && git(["status", "--porcelain", "--", TRAIN], { cwd: ROOT }) !== "") {
    commitPaths(ROOT, p.description, [TRAIN]);
  }
  cur.candidate = rev(ROOT, "HEAD");
  cur.move = p.move;
  cur.trainLines = lineCount(readFileSync(TRAIN, "utf8"));
  enter(ctx, "committed");
}

// ---------------------------------------------------------------------------
// Train and measure
// ---------------------------------------------------------------------------

/** The seed of a run `offset` seeds after HP's at HEAD, and the environment that sets it. */
function runSeed(ctx: Ctx, offset: number): { seed: number | null; env: Record<string, string> } {
  return seedFor(hpSeed(ROOT, BUN, ctx.hpSeeds), offset);
}

interface Trained {
  ok: boolean; reason: string; memoryGb: number; trainSeconds: number; imagesPerSecond: number | null;
}

/**
 * One `bun train.ts` of the current candidate into `checkpointDir`, seed `offset` seeds after HP's,
 * with its output in the experiment's log; then nothing but train.ts may have changed.
 */
async function trainRun(ctx: Ctx, o: {
  checkpointDir: string; offset: number; logName: string; what: string; onSpawn: (pid: number) => void;
}): Promise<Trained> {
  const st = ctx.st;
  const cur = st.current!;
  const budgetS = st.settings.budgetSeconds;
  const { seed, env } = runSeed(ctx, o.offset);
  const seeded = o.offset > 0 && seed !== null ? ` with seed ${seed}` : "";
  if (ctx.queue) return remoteRun(ctx, ctx.queue, { ...o, env, label: `${o.what}${seeded}` });
  let t: Awaited<ReturnType<typeof trainCandidate>>;
  try {
    t = await trainCandidate({
      cwd: ROOT, bun: BUN, task: st.task, budgetS, deadlineS: budgetS + ctx.flags.grace + ALLOWANCE_S, env,
      checkpointDir: o.checkpointDir, lingerS: LINGER_S, logFile: join(LOGS_DIR, o.logName), runLog: RUN_LOG,
      featuresTimeoutS: ctx.flags.featuresTimeout, featuresStallS: FEATURES_STALL_S, label: `${o.what}${seeded}`,
      announce: (what) => status(ctx, what), log: say,
      onFeaturesSpawn: (pid) => {
        track(pid);
        cur.trainPid = pid; // a resume kills an orphaned extraction too
        save(ctx);
      },
      afterFeatures: () => {
        control.child = null;
        if (control.abort) throw new Stop(EXIT.aborted, "aborted while preparing the backbone's features");
      },
      onSpawn: (pid) => {
        track(pid);
        cur.trainPid = pid;
        o.onSpawn(pid);
      },
    });
  } finally {
    control.child = null;
  }
  if (control.abort) {
    const again = cur.phase === "confirming" ? "; `bun loop.ts --resume` trains this confirmation run again" : "";
    throw new Stop(EXIT.aborted, `aborted during training${again}`);
  }
  let verdict = { ok: t.ok, reason: t.reason };
  // train.ts runs with the repository's permissions: it must not have changed anything either.
  const integ = await integrity(ctx, cur.candidate!, false);
  if (integ.problems.length > 0) {
    await repair(ctx, cur.candidate!, integ);
    verdict = { ok: false, reason: `reverted after training: ${integ.problems.join(", ")}` };
  }
  cur.trainPid = null;
  const memoryGb = t.ran?.maxRss != null ? t.ran.maxRss / 1024 ** 3 : 0;
  return { ...verdict, memoryGb, trainSeconds: t.ran?.seconds ?? 0, imagesPerSecond: t.imagesPerSecond };
}

/** Phase committed → training → evaluating (or a crash row, phase logging). */
async function trainPhase(ctx: Ctx): Promise<void> {
  const st = ctx.st;
  const cur = st.current!;
  const short = shortOf(ROOT, cur.candidate!);
  const t = await trainRun(ctx, {
    checkpointDir: LATEST_CHECKPOINT_DIR, offset: cur.seedOffset, logName: `${cur.n}-${short}.log`,
    what: `${short}: ${cur.description}`, onSpawn: () => enter(ctx, "training"),
  });
  cur.outcome = t;
  if (!t.ok) cur.row = crashRow(st.task, short, `${cur.description} (crash: ${t.reason})`);
  enter(ctx, t.ok ? "evaluating" : "logging");
}

/** `prepare.ts evaluate` of a checkpoint on val (decisions) or test (never decisions). */
async function measure(ctx: Ctx, checkpointDir: string, split: "val" | "test") {
  const st = ctx.st;
  const byWorker = split === "val" ? ctx.queue?.measured.get(checkpointDir) : undefined;
  if (byWorker) {
    ctx.queue!.measured.delete(checkpointDir);
    return byWorker;
  }
  let m: Awaited<ReturnType<typeof evaluateCheckpoint>>;
  try {
    m = await evaluateCheckpoint({
      cwd: ROOT, bun: BUN, task: st.task, checkpointDir, lingerS: LINGER_S, onSpawn: track, log: say, split,
      need: [st.primary],
    });
  } finally {
    control.child = null;
  }
  // The journal stays where it was: --resume measures the checkpoint again.
  if (control.abort) {
    throw new Stop(EXIT.aborted, "aborted during evaluation; `bun loop.ts --resume` measures it again");
  }
  return m;
}

/**
 * Phase evaluating → [confirming →] logging: measure the first run's checkpoint and decide; a
 * candidate whose primary clears the noise floor is confirmed over other seeds first. Each
 * confirmation run is journaled once measured, so --resume goes on from the runs it has.
 */
async function measureAndDecide(ctx: Ctx): Promise<void> {
  const st = ctx.st;
  const cur = st.current!;
  const short = shortOf(ROOT, cur.candidate!);
  const wanted = 1 + (st.settings.confirmRuns ?? 0);
  if (cur.phase === "evaluating") {
    const m = await measure(ctx, LATEST_CHECKPOINT_DIR, "val");
    if ("error" in m) {
      cur.row = crashRow(ctx.st.task, short, `${cur.description} (crash: evaluate: ${m.error})`);
      enter(ctx, "logging");
      return;
    }
    const imagesPerSecond = cur.outcome?.imagesPerSecond ?? null;
    const first = { seed: runSeed(ctx, cur.seedOffset).seed, metrics: m.metrics, imagesPerSecond };
    cur.runs = [first];
    say(runLine(st, cur.kind === "experiment" && wanted > 1 ? `run 1/${wanted}` : "measured", first));
    const d = decide(st, m.metrics);
    if (!d.confirm) {
      await finish(ctx, d.status, d.note, m.metrics);
      return;
    }
    const g = signed((m.metrics[st.primary] ?? 0) - (st.best!.metrics[st.primary] ?? 0));
    say(`#${cur.n} ${st.primary} ${g} clears the noise floor ${num(st.noise?.floor ?? 0)}: confirming over `
      + `${wanted - 1} more seed(s) before keeping`);
    enter(ctx, "confirming");
  }
  for (;;) {
    const v = confirmVerdict({
      primary: st.primary, secondary: st.secondary, lowerIsBetter: TASK_METRICS[st.task].lowerIsBetter,
      runs: cur.runs, best: st.best!.metrics, noiseFloor: st.noise?.floor ?? 0, wanted,
    });
    if (!v.more) {
      await finish(ctx, v.status, v.note, v.metrics);
      return;
    }
    const k = cur.runs.length;
    const dir = join(CONFIRM_DIR, String(k));
    const t = await trainRun(ctx, {
      checkpointDir: dir, offset: cur.seedOffset + k, logName: `${cur.n}-${short}-run${k + 1}.log`,
      what: `${short} again (run ${k + 1}/${Math.max(wanted, k + 1)})`,
      onSpawn: () => { save(ctx); killPoint("confirm-training"); },
    });
    const m = t.ok ? await measure(ctx, dir, "val") : { error: t.reason };
    if ("error" in m) {
      // It trained and measured once: a run that fails with another seed is a fragile change, not a crash row.
      const note = `(not confirmed: run ${k + 1} with another seed crashed: ${m.error})`;
      await finish(ctx, "discard", note, cur.runs[0]!.metrics);
      return;
    }
    const run = { seed: runSeed(ctx, cur.seedOffset + k).seed, metrics: m.metrics, imagesPerSecond: t.imagesPerSecond };
    cur.runs.push(run);
    say(runLine(st, `run ${k + 1}/${Math.max(wanted, k + 1)}`, run));
    save(ctx);
  }
}

/**
 * The row of a measured experiment, after the test split of a kept or baseline model is measured
 * (for the summary only: nothing decides on it). Phase → logging.
 */
async function finish(ctx: Ctx, status: "keep" | "discard" | "baseline", note: string,
  metrics: Record<string, number>): Promise<void> {
  const st = ctx.st;
  const cur = st.current!;
  if ((status === "keep" || status === "baseline") && cur.kind !== "check") {
    for (const [k, run] of cur.runs.entries()) {
      run.test = await measureTest(ctx, k === 0 ? LATEST_CHECKPOINT_DIR : join(CONFIRM_DIR, String(k)));
    }
  }
  cur.row = measuredRow(st.task, st.primary, {
    commit: shortOf(ROOT, cur.candidate!), description: cur.description, note, metrics, status,
    memoryGb: cur.outcome?.memoryGb ?? 0,
  });
  enter(ctx, "logging");
  rmSync(CONFIRM_DIR, { recursive: true, force: true });
}

/** A checkpoint's metrics on the test split, or null (said once) when it cannot be measured. */
async function measureTest(ctx: Ctx, checkpointDir: string): Promise<Record<string, number> | null> {
  if (ctx.noTestSplit !== null || !existsSync(join(checkpointDir, "meta.json"))) return null;
  const m = await measure(ctx, checkpointDir, "test");
  if (!("error" in m)) return m.metrics;
  ctx.noTestSplit = m.error;
  say(`test split: not measured (${m.error}); nothing recorded, and not tried again until the loop restarts`);
  return null;
}

// ---------------------------------------------------------------------------
// Log the row and apply the decision (both idempotent: --resume may repeat them)
// ---------------------------------------------------------------------------

/** Phase logging → logged → decided. */
async function logAndApply(ctx: Ctx): Promise<void> {
  const st = ctx.st;
  const cur = st.current!;
  const row = cur.row!;
  if (cur.phase === "logging") {
    // Exactly one row per experiment: the journal says how many rows there were before it.
    const text = readText(RESULTS_FILE) ?? "";
    const already = countRows(text) === cur.rowsBefore + 1 && lastWholeLine(text) === formatRow(st.task, row);
    if (!already) {
      if (countRows(text) !== cur.rowsBefore) {
        say(`warning: ${RESULTS_FILE} has ${countRows(text)} rows, the journal expected ${cur.rowsBefore}; `
          + `appending #${cur.n} anyway`);
      }
      await appendResult(RESULTS_FILE, st.task, row);
    }
    killPoint("appended");
    ctx.resultsText = readFileSync(RESULTS_FILE, "utf8");
    writeAtomic(RESULTS_BACKUP, ctx.resultsText);
    enter(ctx, "logged");
  }
  if (cur.phase === "logged") {
    if (row.status === "keep") {
      resetTo(ROOT, cur.candidate!); // HEAD is there already; a resumed apply may find a half-reset tree
      if (existsSync(join(LATEST_CHECKPOINT_DIR, "meta.json"))) {
        // Hashed and copied where the next experiments are not meant to write: see restoreBest.
        st.bestModel = await keepModel(LATEST_CHECKPOINT_DIR, bestCheckpointDir(st.branch));
      } else {
        say(`warning: no checkpoint in ${LATEST_CHECKPOINT_DIR} to keep as the best model`);
      }
    } else {
      resetTo(ROOT, cur.base);
    }
    recordDecision(st);
    save(ctx);
    killPoint("decided");
    say(`${decisionLine(st, row)} | ${elapsed()}`);
    const s = ctx.flags.summarize ? summarize(ROOT, BUN) : null;
    if (s && !(s.missing && ctx.warnedNoSummarizer)) say(s.line);
    if (s?.missing) ctx.warnedNoSummarizer = true;
  }
}

/** Put the kept model back from the loop's copy (a run changed it); pause if even the copy is damaged. */
async function restoreBest(ctx: Ctx): Promise<void> {
  if (ctx.st.bestModel) ctx.fatal = (await restoreModel(ctx.st.bestModel, say)) ?? ctx.fatal;
}

// ---------------------------------------------------------------------------
// One experiment, start to end
// ---------------------------------------------------------------------------

async function experiment(ctx: Ctx, kind: Kind): Promise<Status> {
  const st = ctx.st;
  const cur = newExperiment(st, kind, countRows(ctx.resultsText));
  if (ctx.queue) startQueued(ctx.queue, cur.n);
  st.current = cur;
  save(ctx);
  const proposer = ctx.mode === "builtin" ? "built-in search" : ctx.mode === "agent" ? "agent" : "HEAD";
  status(ctx, kind !== "experiment" ? cur.description : `proposing (${proposer})`);
  killPoint("proposing");
  await proposeAndCommit(ctx);
  if (cur.phase === "committed") await trainPhase(ctx);
  if (cur.phase === "evaluating" || cur.phase === "confirming") await measureAndDecide(ctx);
  await logAndApply(ctx);
  if (ctx.queue) await endQueued(ctx.queue);
  if (ctx.fatal) throw new Stop(EXIT.paused, ctx.fatal);
  return cur.row!.status;
}

// ---------------------------------------------------------------------------
// Recovery (--resume after a kill)
// ---------------------------------------------------------------------------

/** Finish or roll back the experiment a killed loop left behind. */
async function recover(ctx: Ctx): Promise<void> {
  const cur = ctx.st.current;
  if (!cur || cur.phase === "decided") return;
  say(`resume: experiment #${cur.n} "${cur.description}" was interrupted at phase ${cur.phase}`);
  await cleanUpAfterKill(ROOT, cur, say);
  if (unmeasured(cur.phase)) {
    rollBack(ctx);
    // The candidate may be a person's commit (--once): say where it went.
    const c = cur.candidate !== null && cur.candidate !== cur.base ? cur.candidate : null;
    const kept = c === null ? "" : ` (its commit ${shortOf(ROOT, c)} stays in \`git reflog\`)`;
    say(`resume: rolled back #${cur.n} to ${shortOf(ROOT, cur.base)}${kept}; nothing was measured, no row written`);
    return;
  }
  if (cur.phase === "evaluating" || cur.phase === "confirming") {
    resetTo(ROOT, cur.candidate!);
    const integ = await integrity(ctx, cur.candidate!, false);
    if (integ.problems.length > 0) {
      await repair(ctx, cur.candidate!, integ);
      const reason = `crash: reverted: ${integ.problems.join(", ")}`;
      cur.row = crashRow(ctx.st.task, shortOf(ROOT, cur.candidate!), `${cur.description} (${reason})`);
      cur.phase = "logging";
      save(ctx);
    } else {
      await measureAndDecide(ctx);
    }
  }
  await logAndApply(ctx);
  if (ctx.fatal) throw new Stop(EXIT.paused, ctx.fatal);
}

/**
 * Undo an experiment that was not measured (killed, or aborted by a second Ctrl-C): back to its
 * base, new files removed, no row. Its experiment number is used again.
 */
function rollBack(ctx: Ctx): void {
  resetTo(ROOT, ctx.st.current!.base);
  removeFiles(ROOT, untrackedFiles(ROOT));
  restoreResults(ROOT, ctx.resultsText, say);
  ctx.st.current = null;
  save(ctx);
}

// ---------------------------------------------------------------------------
// Sessions: a branch, a journal, a results.tsv
// ---------------------------------------------------------------------------

/** After loading a journal: same budget, on its branch, interrupted work recovered, clean tree. */
async function prepareResumed(ctx: Ctx): Promise<void> {
  const st = ctx.st;
  resumeSettings(st, ctx.flags);
  checkoutSession(ROOT, st);
  ctx.resultsText = loadResultsText(ROOT, say);
  await recover(ctx);
  const dirtyAdvice = ctx.mode === "once" ? COMMIT_FIRST : "commit or remove these first";
  await checkResumed(ROOT, st, { cacheRoot: CACHE_ROOT, dirtyAdvice, log: say });
  if (ctx.flags.resume) st.crashStreak = 0; // a person restarted a paused loop: a fresh streak (--once keeps counting)
  save(ctx);
  const h = rev(ROOT, "HEAD");
  if (st.best && ctx.mode !== "once" && h !== st.best.commit) {
    throw new Stop(EXIT.refused, `HEAD (${shortOf(ROOT, h)}) is not the last kept commit (${st.best.short}): `
      + `measure it with \`bun loop.ts --once\`, or \`git reset --hard ${st.best.short}\``);
  }
  say(resumedLine(st, countRows(ctx.resultsText)));
}

// ---------------------------------------------------------------------------
// The loop
// ---------------------------------------------------------------------------

/**
 * The baseline repeats first (they set the noise floor). `exit` when the loop must stop here;
 * `ran` when this call measured any.
 */
async function baselines(ctx: Ctx): Promise<{ exit: number | null; ran: boolean }> {
  const st = ctx.st;
  let ran = false;
  while (st.baselines.primaries.length < st.baselines.wanted) {
    if (control.stop) return { exit: stopped(ctx), ran };
    if (rev(ROOT, "HEAD") !== st.sessionStart) {
      const start = shortOf(ROOT, st.sessionStart);
      throw new Stop(EXIT.refused, `the baseline runs measure the session's first commit ${start}, but HEAD moved: `
        + `\`git reset --hard ${start}\` first`);
    }
    if (!runMdSaysGo(ROOT, say)) return { exit: EXIT.ok, ran };
    const s = await experiment(ctx, "baseline");
    ran = true;
    if (s === "crash") {
      const why = st.current?.row?.description ?? "";
      throw new Stop(EXIT.paused, `the baseline (the unmodified train.ts) crashed: ${why}. `
        + "Fix the cause (see run.log), then `bun loop.ts --resume`.");
    }
  }
  if (ran) baselineReport(st).forEach(say);
  return { exit: null, ran };
}

/** --once: the commit at HEAD, made by an agent following program.md, as one experiment. */
async function once(ctx: Ctx, baselinesRan: boolean): Promise<number> {
  const best = ctx.st.best!;
  const head = rev(ROOT, "HEAD");
  if (head === best.commit) {
    if (baselinesRan) {
      say("baseline measured. Now edit train.ts, commit, and run `bun loop.ts --once` to measure it.");
      return EXIT.ok;
    }
    throw new Stop(EXIT.refused, `nothing to measure: HEAD is the last kept commit (${best.short}); `
      + "commit a change to train.ts, then run `bun loop.ts --once`");
  }
  if (!gitOk(["merge-base", "--is-ancestor", best.commit, head], ROOT)) {
    throw new Stop(EXIT.refused, `HEAD does not descend from the last kept commit ${best.short}: `
      + `\`git reset --hard ${best.short}\`, re-apply your change and commit it`);
  }
  const dirty = dirtyPaths(ROOT);
  if (dirty.length > 0) throw notClean(dirty, COMMIT_FIRST);
  if (!runMdSaysGo(ROOT, say)) return EXIT.ok;
  await experiment(ctx, "experiment");
  const exit = await checkStreak(ctx);
  return exit ?? EXIT.ok;
}

async function runLoop(ctx: Ctx): Promise<number> {
  if (ctx.queue) return runQueued(ctx, ctx.queue);
  const { exit, ran } = await baselines(ctx);
  if (exit !== null) return exit;
  if (ctx.mode === "once") return once(ctx, ran);
  const st = ctx.st;
  for (let started = 0; ;) {
    if (control.stop) return stopped(ctx);
    const rb = st.rebaseline;
    // Repeats of a kept structure change are part of that keep: they run before anything is
    // compared with it, even when --max-experiments is reached.
    const rebaseline = rb !== null && rb.done < rb.wanted;
    if (!rebaseline && ctx.flags.maxExperiments !== undefined && started >= ctx.flags.maxExperiments) {
      say(`--max-experiments ${ctx.flags.maxExperiments} reached: stopping`);
      return EXIT.ok;
    }
    if (!runMdSaysGo(ROOT, say)) return EXIT.ok;
    if (rebaseline) {
      const s = await experiment(ctx, "rebaseline");
      if (s === "crash") say("the re-baseline crashed: the noise floor stays as it was");
      else rebaselineReport(st).forEach(say);
    } else {
      await experiment(ctx, "experiment");
      started++;
    }
    const exit = await checkStreak(ctx);
    if (exit !== null) return exit;
  }
}

/**
 * A streak of crashes does not end the night. The built-in search backs off the axes that
 * crashed, and the best is trained again to tell a broken environment (it crashes too: pause,
 * with its reason) from bad ideas (it runs: go on with other axes). Under --once an agent
 * chooses what to try next, so the streak pauses there as it always did.
 */
async function checkStreak(ctx: Ctx): Promise<number | null> {
  const st = ctx.st;
  if (st.crashStreak < ctx.flags.maxCrashStreak) return null;
  const last = st.current?.row?.description ?? "?";
  if (ctx.mode === "once") {
    throw new Stop(EXIT.paused, `paused: ${st.crashStreak} crashes in a row (last: ${last}). Look at run.log and `
      + `${LOGS_DIR}/, fix the cause, then \`bun loop.ts --resume\`.`);
  }
  const axes = streakAxes(st.tried, st.crashStreak).filter((a) => !st.skipAxes.includes(a));
  st.skipAxes.push(...axes);
  save(ctx);
  const best = st.best!.short;
  say(`${st.crashStreak} crashes in a row (last: ${last}): ${axes.length > 0 ? `backing off ${axes.join(", ")}; ` : ""}`
    + `re-running the best ${best} to tell a broken environment from bad ideas`);
  if (control.stop) return stopped(ctx);
  if (!runMdSaysGo(ROOT, say)) return EXIT.ok;
  if (await experiment(ctx, "check") === "crash") {
    const why = /\(crash: (.*)\)$/.exec(st.current?.row?.description ?? "")?.[1] ?? "?";
    throw new Stop(EXIT.paused, `paused: the best ${best} crashed too when run again (${why}): the environment is `
      + "broken, not the ideas. Fix it (see run.log), then `bun loop.ts --resume`.");
  }
  say(`the best ${best} still runs: the crashes came from the changes; going on`
    + `${st.skipAxes.length > 0 ? ` without ${st.skipAxes.join(", ")}` : ""}`);
  return null;
}

function stopped(ctx: Ctx): number {
  say(`stopped on request after experiment #${ctx.st.nextN - 1}`);
  return EXIT.ok;
}

// ---------------------------------------------------------------------------
// --queue: workers train, the loop decides (README, "More than one machine")
// ---------------------------------------------------------------------------

/** The queue, and its journal: a resumed session finds what it had in flight; a new one starts empty. */
async function openQueue(url: string, tag: string, resumed: boolean): Promise<Queued> {
  const Q = await import("./lib/queue.ts");
  const journal = Q.readQueueJournal(ROOT, url, tag, !resumed);
  Q.saveQueueJournal(ROOT, journal);
  return {
    Q, q: Q.openLoopQueue(url, say), journal, data: await Q.loopData(CACHE_ROOT), head: null, measured: new Map(),
    jobIds: [],
  };
}

/** Without --queue, the runs a queued session left in flight are not collected: say how. */
async function warnInFlight(st: State): Promise<void> {
  if (!existsSync(join(ROOT, ".autoresearch", "queue.json"))) return;
  const n = (await import("./lib/queue.ts")).readQueueJournal(ROOT, "", st.tag).pending.length;
  if (n > 0) say(`warning: ${n} run(s) of this session are in flight on workers: \`--queue <url>\` collects them`);
}

function saveJournal(qd: Queued): void {
  qd.Q.saveQueueJournal(ROOT, qd.journal);
}

/** An experiment starts: the jobs of its runs are numbered by the dispatched run it decides, or a new number. */
function startQueued(qd: Queued, n: number): void {
  const j = qd.journal;
  if (qd.head) {
    qd.head.n = n;
    j.currentSeq = qd.head.seq;
  } else {
    j.currentSeq = j.nextSeq++;
  }
  saveJournal(qd);
}

/** The experiment is decided: its jobs leave Redis, its side ref goes. */
async function endQueued(qd: Queued): Promise<void> {
  const j = qd.journal;
  if (qd.head) {
    j.pending = j.pending.filter((e) => e.seq !== qd.head!.seq);
    git(["update-ref", "-d", qd.Q.sideRef(qd.head.seq)], { cwd: ROOT, allowFail: true });
  }
  j.currentSeq = null;
  saveJournal(qd);
  await qd.Q.removeJobs(qd.q, qd.jobIds.splice(0));
}

/**
 * A dispatched candidate's turn: its commit becomes the branch's next one. Proposed from an older
 * best (a run decided before it was kept), the same tree is committed on top of the current best:
 * the code measured is the code kept, compared with the best of its turn.
 */
function adopt(ctx: Ctx, e: Pending): Proposal {
  const cur = ctx.st.current!;
  let c = e.candidate;
  let description = e.description;
  if (e.base !== cur.base) {
    description = `${e.description} (from ${shortOf(ROOT, e.base)})`;
    const tree = git(["rev-parse", `${c}^{tree}`], { cwd: ROOT });
    c = commitAside(ROOT, { base: cur.base, tree, message: description });
  }
  resetTo(ROOT, c);
  return { description, move: e.move, failure: null };
}

function jobData(ctx: Ctx, qd: Queued, commit: string, offset: number, env: Record<string, string>,
  label: string): JobData {
  const st = ctx.st;
  return {
    session: st.tag, seq: qd.journal.currentSeq ?? 0, offset, label, env,
    trainTs: git(["show", `${commit}:${TRAIN}`], { cwd: ROOT }),
    budgetS: st.settings.budgetSeconds, deadlineS: st.settings.budgetSeconds + ctx.flags.grace + ALLOWANCE_S,
    task: st.task, primary: st.primary, harness: qd.Q.harnessOf(st.protected), data: qd.data,
  };
}

/**
 * One training run of the current candidate on a worker (the job dispatched ahead, or a new one ahead
 * of the queued ones): its checkpoint and log land where a local run's would, and the worker's
 * `prepare.ts evaluate` is what measure() reads for it.
 */
async function remoteRun(ctx: Ctx, qd: Queued, o: {
  checkpointDir: string; offset: number; logName: string; label: string; env: Record<string, string>;
  onSpawn: (pid: number) => void;
}): Promise<Trained> {
  const st = ctx.st;
  const cur = st.current!;
  const seq = qd.journal.currentSeq!;
  const id = qd.Q.jobId(st.tag, seq, o.offset);
  const head = qd.head && qd.head.offset === o.offset ? qd.head : null;
  const data = { ...jobData(ctx, qd, cur.candidate!, o.offset, head?.env ?? o.env, o.label), seq };
  const how = await qd.Q.ensureJob(qd.q, id, data, true);
  qd.jobIds.push(id);
  o.onSpawn(0);
  status(ctx, `${o.label}: job ${id} ${how === "there" ? "(dispatched earlier)" : "queued"}`);
  const r = await qd.Q.awaitJob(qd.q, id, data, { log: say, aborted: () => control.abort });
  if (r === null) throw new Stop(EXIT.aborted, "aborted while a worker trained; `bun loop.ts --resume` collects it");
  rmSync(o.checkpointDir, { recursive: true, force: true });
  if ("failed" in r) {
    return { ok: false, reason: `worker: ${r.failed}`, memoryGb: 0, trainSeconds: 0, imagesPerSecond: null };
  }
  writeAtomic(join(LOGS_DIR, o.logName), r.log);
  try { appendFileSync(RUN_LOG, r.log); } catch { /* run.log is a convenience */ }
  if (r.checkpoint) qd.Q.unpackCheckpoint(r.checkpoint, o.checkpointDir);
  if (r.eval) qd.measured.set(o.checkpointDir, r.eval);
  const crash = r.ok ? "" : `, crash: ${r.reason}`;
  say(`${o.label}: trained on worker ${r.worker} (${r.trainSeconds.toFixed(0)} s${crash})`);
  const ok = r.ok && r.checkpoint !== null;
  const reason = r.ok && !ok ? "no checkpoint: the worker returned none" : r.reason;
  return { ok, reason, memoryGb: r.memoryGb, trainSeconds: r.trainSeconds, imagesPerSecond: r.imagesPerSecond };
}

/** What to dispatch next, or why nothing: "max" (--max-experiments), "none" (the search is exhausted from here). */
function nextRun(ctx: Ctx, qd: Queued, started: number):
  Omit<Pending, "seq" | "env"> & { front: boolean } | "max" | "none" {
  const st = ctx.st;
  const pending = qd.journal.pending;
  const count = (k: string) => pending.filter((e) => e.kind === k).length;
  const baseRun = { description: "", move: null, front: false };
  if (st.baselines.primaries.length + count("baseline") < st.baselines.wanted) {
    const offset = st.baselines.primaries.length + count("baseline");
    return { ...baseRun, kind: "baseline", base: st.sessionStart, candidate: st.sessionStart, offset };
  }
  const rb = st.rebaseline;
  if (rb && rb.done + count("rebaseline") < rb.wanted) {
    // Repeats of a kept structure change are part of that keep: decided before the runs in flight.
    const offset = rb.metrics.length + count("rebaseline");
    return { ...baseRun, kind: "rebaseline", base: rb.commit, candidate: rb.commit, offset, front: true };
  }
  if (ctx.flags.maxExperiments !== undefined && started >= ctx.flags.maxExperiments) return "max";
  const base = st.best?.commit ?? st.sessionStart;
  // Moves in flight count as tried: each worker gets another one.
  const inFlight = pending.flatMap((e) => (e.move
    ? [{ base: e.base, axis: e.move.axis, value: e.move.to, status: "queued" }] : []));
  const p = proposeBuiltin(ROOT, BUN, { ...st, tried: [...st.tried, ...inFlight] }, base);
  if (!p) return "none";
  const candidate = commitAside(ROOT, { base, message: p.description });
  resetTo(ROOT, base);
  return { kind: "experiment", base, candidate, description: p.description, move: p.move, offset: 0, front: false };
}

/** Dispatch runs until every live worker slot has one. "max" / "none": nothing more to dispatch now. */
async function fill(ctx: Ctx, qd: Queued, started: number): Promise<{ started: number; stop: "max" | "none" | null }> {
  const j = qd.journal;
  const slots = await qd.Q.liveSlots(qd.q);
  while (j.pending.length < slots) {
    const next = nextRun(ctx, qd, started);
    if (next === "max" || next === "none") return { started, stop: next };
    const { front, ...run } = next;
    // Repeats are seeds after HP's own: the seed of HEAD's train.ts (the session start or the best, as dispatched).
    const e: Pending = { ...run, seq: j.nextSeq++, env: runSeed(ctx, run.offset).env };
    if (front) j.pending.unshift(e);
    else j.pending.push(e);
    git(["update-ref", qd.Q.sideRef(e.seq), e.candidate], { cwd: ROOT });
    saveJournal(qd);
    const label = e.kind === "experiment" ? e.description : `${e.kind} run (seed offset ${e.offset})`;
    const data = { ...jobData(ctx, qd, e.candidate, e.offset, e.env, label), seq: e.seq };
    await qd.Q.ensureJob(qd.q, qd.Q.jobId(ctx.st.tag, e.seq, e.offset), data, front);
    say(`dispatched ${label} (job ${qd.Q.jobId(ctx.st.tag, e.seq, e.offset)}; ${j.pending.length} in flight, `
      + `${slots} worker slot(s))`);
    if (e.kind === "experiment") started++;
  }
  return { started, stop: null };
}

/**
 * The loop with workers: runs are dispatched ahead (one per live worker slot) and decided one at a
 * time in the order dispatched, each by experiment() as without workers. run.md False, Ctrl-C,
 * --max-experiments or an exhausted search stop the dispatching; the runs in flight are still
 * collected, decided and logged.
 */
async function runQueued(ctx: Ctx, qd: Queued): Promise<number> {
  const st = ctx.st;
  const j = qd.journal;
  const before = j.pending.length;
  j.pending = j.pending.filter((e) => e.n === undefined || e.n >= st.nextN); // decided before a kill
  if (before > 0) {
    let again = 0;
    for (const e of j.pending) {
      const data = { ...jobData(ctx, qd, e.candidate, e.offset, e.env, e.description || e.kind), seq: e.seq };
      if (await qd.Q.ensureJob(qd.q, qd.Q.jobId(st.tag, e.seq, e.offset), data, false) === "added") again++;
    }
    say(`resume: ${j.pending.length} run(s) were in flight: ${j.pending.length - again} found in Redis, ${again} `
      + "queued again");
  }
  saveJournal(qd);
  let started = 0;
  let stop: "max" | "none" | "runmd" | "signal" | null = null;
  let waiting = false;
  for (;;) {
    if (stop === null && control.stop) stop = "signal";
    if (stop === null && !runMdSaysGo(ROOT, say)) stop = "runmd";
    if (stop === null || (stop === "none" && j.pending.length > 0)) {
      const r = await fill(ctx, qd, started);
      started = r.started;
      if (r.stop === "max") say(`--max-experiments ${ctx.flags.maxExperiments} reached: no more runs dispatched`);
      if (r.stop !== null) stop = r.stop;
    }
    if (j.pending.length === 0) {
      if (stop === "signal") return stopped(ctx);
      if (stop === "none") {
        throw new Stop(EXIT.ok, "the built-in search has measured every value of HP_SPACE reachable from the "
          + "current best: nothing left to try (widen HP_SPACE in train.ts, or use --agent)");
      }
      if (stop !== null) return EXIT.ok;
      if (!waiting) {
        say(`no worker is taking jobs from ${qd.q.url}: waiting (\`bun loop.ts worker --queue ${qd.q.url}\`)`);
      }
      waiting = true;
      await Bun.sleep(1000);
      continue;
    }
    waiting = false;
    const e = j.pending[0]!;
    qd.head = e;
    let s: Status;
    try {
      s = await experiment(ctx, e.kind);
    } finally {
      qd.head = null;
    }
    if (e.kind === "baseline" && s === "crash") {
      const why = st.current?.row?.description ?? "";
      throw new Stop(EXIT.paused, `the baseline (the unmodified train.ts) crashed: ${why}. `
        + "Fix the cause (see run.log), then `bun loop.ts --resume --queue <url>`.");
    }
    if (e.kind === "baseline" && st.baselines.primaries.length === st.baselines.wanted) baselineReport(st).forEach(say);
    if (e.kind === "rebaseline") {
      if (s === "crash") say("the re-baseline crashed: the noise floor stays as it was");
      else rebaselineReport(st).forEach(say);
    }
    if (stop === "none" && s === "keep") stop = null; // a new best: new moves
    const exit = await checkStreak(ctx);
    if (exit !== null) return exit;
  }
}

// ---------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------

async function main(argv: string[]): Promise<number> {
  if (argv[2] === "worker") return (await import("./lib/worker.ts")).runWorker(ROOT, argv.slice(3));
  const flags = parseFlags(argv, ALLOWANCE_S);
  process.chdir(ROOT);
  const loopFiles = [RESULTS_FILE, RUN_LOG, STATE_FILE, join(LATEST_CHECKPOINT_DIR, "meta.json")];
  const release = claimRepository(ROOT, loopFiles, say);
  catchSignals(control, say);
  try {
    const again = ["bun", "loop.ts", ...argv.slice(2)].join(" ");
    const open = { root: ROOT, flags, cacheRoot: CACHE_ROOT, log: say, mayStart: () => runMdSaysGo(ROOT, say, again) };
    const { st, resumed } = await openSession(open);
    journaled = true;
    const ctx: Ctx = {
      flags, mode: flags.once ? "once" : flags.agent !== undefined ? "agent" : "builtin",
      st, resultsText: "", fatal: null, warnedNoSummarizer: false, noTestSplit: null, hpSeeds: new Map(),
      queue: flags.queue === undefined ? null : await openQueue(flags.queue, st.tag, resumed),
    };
    if (!ctx.queue && resumed) await warnInFlight(st);
    if (st.baselines.wanted === 1 && (!resumed || flags.resume)) {
      say("warning: --baseline-runs 1 measures no noise (σ = 0): every gain, however small, is kept; "
        + "2 or more runs set a noise floor");
    }
    try {
      if (resumed) await prepareResumed(ctx);
      else ctx.resultsText = loadResultsText(ROOT, say);
      return await runLoop(ctx);
    } catch (err) {
      if (err instanceof Stop && err.code === EXIT.aborted && ctx.st.current && unmeasured(ctx.st.current.phase)) {
        rollBack(ctx);
        say("aborted: the interrupted experiment was rolled back, no row written");
      }
      throw err;
    } finally {
      say(sessionReport(ctx.st));
      await ctx.queue?.q.close();
    }
  } finally {
    release();
  }
}

/** Set once the session has a journal: from then on `--resume` can finish whatever was interrupted. */
let journaled = false;

if (import.meta.main) {
  main(process.argv).then(
    (code) => process.exit(code),
    (err: unknown) => {
      if (err instanceof Stop) {
        const kind = err.code === EXIT.ok ? "" : err.code === EXIT.paused ? "PAUSED: " : "error: ";
        if (err.message) console.error(`[loop] ${kind}${err.message}`);
        process.exit(err.code);
      }
      // The trace is for a developer: run.log keeps it, the terminal gets one line.
      const trace = err instanceof Error ? (err.stack ?? err.message) : String(err);
      try { appendFileSync(RUN_LOG, `${trace}\n`); } catch { /* run.log may be what failed */ }
      const line = failureLine(err, { root: ROOT, journaled, argv: process.argv.slice(2), runLog: RUN_LOG });
      console.error(`[loop] error: ${line}`);
      process.exit(EXIT.error);
    },
  );
}
