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
 * One experiment:
 *   run.md says True → the proposer edits train.ts → commit → `bun train.ts` (output live, killed
 *   at the deadline) → `bun prepare.ts evaluate` re-measures the checkpoint in another process
 *   (the loop never trusts what train.ts prints) → one row in results.tsv → keep (the branch
 *   advances) or `git reset --hard` to the last kept commit → summarize_results.ts.
 * A candidate that clears the noise floor is confirmed first: re-trained with other seeds, kept
 * only if the mean over its runs still clears the floor (and its runs trained at a comparable
 * speed). The baseline is repeated with different seeds to measure the noise; a kept change of the
 * model's structure (backbone) is repeated too, for its own noise. Kept and baseline models are
 * measured on the test split, which no decision reads. A streak of crashes backs off the axes that
 * crashed and re-runs the best; only a best that crashes too pauses the loop.
 * Every phase is journaled in .autoresearch/state.json, so `--resume` after a SIGKILL finishes or
 * rolls back the interrupted experiment. Everything but train.ts is protected: other changes are
 * reverted and the experiment is logged as a crash. The kept model is hashed and copied when it is
 * kept, and restored from the copy if a run changes it. A resume rolls back only what the loop
 * wrote; any other change it finds (the person may have worked while the loop was down) is moved
 * to .autoresearch/set-aside/, never deleted.
 *
 * The pieces live in lib/: the keep rule and noise floor (verdict.ts), training and evaluating a
 * commit (trial.ts, child.ts), the proposers (proposer.ts, agent.ts), what may change
 * (integrity.ts), git (worktree.ts, git.ts), the journal and sessions (journal.ts, session.ts),
 * the command line and exit codes (loop_flags.ts, exit.ts).
 *
 * Exit codes: 0 stopped normally (run.md False, --max-experiments, Ctrl-C after logging, --once
 * done), 1 an error the loop did not expect, such as its own files not writable (one line naming
 * the file; `--resume` once it is fixed), 2 refused (dirty tree, existing branch, lock held, bad run.md or
 * flags, nothing to measure), 3 paused (the baseline crashed, the best crashed again after a crash streak,
 * a crash streak under --once, the prepared data changed), 130 aborted by a second Ctrl-C (the
 * interrupted experiment is rolled back, no row).
 *
 * Test-only environment: AR_TEST_KILL_AT=<point> makes the loop SIGKILL itself right after that
 * point (proposing, proposed, committed, training, evaluating, confirming, confirm-training, logging,
 * appended, logged, decided);
 * AR_TEST_ALLOWANCE_S replaces the fixed startup/evaluation allowance of the training deadline;
 * AR_TEST_FEATURES_STALL_S the silence that ends `bun prepare.ts features` (a stuck download);
 * AR_TEST_LINGER_S how long a child that printed its result may take to exit.
 */
import {
  appendFileSync, closeSync, existsSync, mkdirSync, openSync, readFileSync, rmSync, writeFileSync,
} from "node:fs";
import { join, relative, resolve } from "node:path";
import { CACHE_ROOT, TASK_METRICS } from "./prepare.ts";
import { buildPrompt, proposeWithAgent } from "./lib/agent.ts";
import { writeAtomic } from "./lib/atomic.ts";
import { changedFiles, keepModel, restoreModel } from "./lib/best_model.ts";
import { LATEST_CHECKPOINT_DIR, bestCheckpointDir } from "./lib/checkpoint.ts";
import { killGroup } from "./lib/child.ts";
import { EXIT, Stop } from "./lib/exit.ts";
import { currentBranch, git, gitOk } from "./lib/git.ts";
import { checkIntegrity, sameCache, type Integrity } from "./lib/integrity.ts";
import { cacheFiles, cacheFingerprint, parseManifest } from "./lib/dataset.ts";
import {
  AR_DIR, LOGS_DIR, RESULTS_BACKUP, acquireLock, pidAlive, saveState, type Kind, type MeasuredRun, type Phase,
  type State,
} from "./lib/journal.ts";
import { parseFlags, type Flags } from "./lib/loop_flags.ts";
import { describeMove, findLiteral, nextMove, readHp, streakAxes, type Proposal } from "./lib/proposer.ts";
import {
  RESULTS_FILE, appendResult, countRows, crashRow, formatRow, lastWholeLine, oneLine, type Status,
} from "./lib/results.ts";
import {
  bestImagesPerSecond, loadResultsText, newExperiment, openSession, recordDecision, restoreResults, resumeSettings,
  sessionReport,
} from "./lib/session.ts";
import { evaluateCheckpoint, prepareFeatures, trainOnce } from "./lib/trial.ts";
import { confirmVerdict, decide, num, signed, steadyRuns, trivialWarning, LOAD_RATIO } from "./lib/verdict.ts";
import {
  RUN_MD, TRAIN, commitPaths, dirtyPaths, moveAside, parseRunMd, readText, removeFiles, repositoryProblem, resetTo, rev,
  shortOf, unknownChanges, untrackedFiles,
} from "./lib/worktree.ts";

// ---------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------

/** The repository the loop runs in: the folder of this file (tests copy it into temp repos). */
const ROOT = import.meta.dir;
const BUN = process.execPath;
const RUN_LOG = "run.log";
const SUMMARIZER = "summarize_results.ts";
/** Seconds on top of budget + grace for startup, the uncounted warm-up steps, train.ts's own eval and the save. */
const ALLOWANCE_S = Number(process.env.AR_TEST_ALLOWANCE_S ?? 60);
/** Silence of `bun prepare.ts features` (it prints progress every few seconds) that counts as a stalled download. */
const FEATURES_STALL_S = Number(process.env.AR_TEST_FEATURES_STALL_S ?? 300);
/** Where a resume moves the changes it did not make, one folder per resume. */
const SET_ASIDE_DIR = join(AR_DIR, "set-aside");
/**
 * A child that printed what the loop needs (train.ts its footer, evaluate its eval_json line) but
 * does not exit (a leftover thread or timer) is killed this long after, and its result stands.
 */
const LINGER_S = Number(process.env.AR_TEST_LINGER_S ?? 15);
const SUMMARIZE_TIMEOUT_S = 120;
/** Checkpoints of a candidate's confirmation runs, one folder per run: the first run's stays in latest/. */
const CONFIRM_DIR = join("checkpoints", "confirm");

/** Ctrl-C / SIGTERM: the first asks to stop after the current experiment, the second aborts it. */
const control = { stop: false, abort: false, /** process group of the running child */ child: null as number | null };

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

function lineCount(text: string): number {
  return text === "" ? 0 : text.split("\n").length - (text.endsWith("\n") ? 1 : 0);
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

const COMMIT_FIRST = `commit your change to train.ts first (\`git commit -am "<what you tried>"\`)`;

function notClean(dirty: string[], what: string): Stop {
  return new Stop(EXIT.refused, `the working tree is not clean (${dirty.slice(0, 5).join(", ")}): ${what}`);
}

function status(ctx: Ctx, what: string): void {
  const st = ctx.st;
  const best = st.best
    ? `best ${st.primary} ${(st.best.metrics[st.primary] ?? 0).toFixed(6)} (#${st.best.n} ${st.best.short})`
    : "no best yet";
  say(`#${st.current?.n ?? st.nextN} | ${elapsed()} | ${best} | ${what}`);
}

/**
 * True: go on. False: say so and return false. Missing or garbage: refuse. Before a session exists
 * (`beforeSession`) there is nothing to resume: the advice is the same command again.
 */
function runMdSaysGo(beforeSession = false): boolean {
  const v = parseRunMd(readText(RUN_MD));
  if (typeof v === "object") throw new Stop(EXIT.refused, v.error);
  if (v === "False") {
    const again = ["bun", "loop.ts", ...process.argv.slice(2)].join(" ");
    say(beforeSession
      ? `${RUN_MD} says False: not starting a session. Set its first line to True and run \`${again}\` again.`
      : `${RUN_MD} says False: stopping. Set its first line to True and run \`bun loop.ts --resume\` to continue.`);
  }
  return v === "True";
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
  const dump = readHp(ROOT, BUN);
  if ("error" in dump) throw new Stop(EXIT.paused, dump.error);
  const next = nextMove(readFileSync(TRAIN, "utf8"), dump, ctx.st, cur.base);
  if (!next) {
    ctx.st.current = null;
    save(ctx);
    throw new Stop(EXIT.ok, "the built-in search has measured every value of HP_SPACE reachable from the current best: "
      + "nothing left to try (widen HP_SPACE in train.ts, or use --agent)");
  }
  writeFileSync(TRAIN, next.src);
  return { description: describeMove(next.move), move: next.move, failure: null };
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

/**
 * A frozen backbone's download and feature extraction are the harness's work, not the experiment's:
 * `bun prepare.ts features` does them before train.ts starts, on its own timeout, and train.ts then
 * finds the features cached. So train.ts has one fixed deadline, whatever it prints. Null when the
 * candidate needs no backbone or its features are ready; else why they could not be made.
 */
async function featureStep(ctx: Ctx, logs: number[]): Promise<string | null> {
  const cur = ctx.st.current!;
  const dump = readHp(ROOT, BUN);
  // A train.ts that cannot print its HP fails on its own when it runs, and says why.
  if ("error" in dump) return null;
  const name = dump.HP.backbone;
  if (typeof name !== "string" || name === "none") return null;
  const size = typeof dump.HP.backboneSize === "number" ? dump.HP.backboneSize : null;
  const timeoutS = ctx.flags.featuresTimeout;
  status(ctx, `features of backbone ${name}${size === null ? "" : ` at ${size}px`}: \`bun prepare.ts features\` `
    + `(killed after ${timeoutS}s, or after ${FEATURES_STALL_S}s without output)`);
  try {
    const r = await prepareFeatures({
      cwd: ROOT, bun: BUN, backbone: name, size, timeoutS, silenceS: FEATURES_STALL_S, logs, log: say,
      onSpawn: (pid) => {
        track(pid);
        cur.trainPid = pid; // a resume kills an orphaned extraction too
        save(ctx);
      },
    });
    return r.ok ? null : r.reason;
  } finally {
    control.child = null;
  }
}

/**
 * HP.seed at HEAD (the commit being measured), null when train.ts has no whole-number seed: the
 * literal in the HP block, or what `--print-hp` reports when it is not a plain literal.
 */
function hpSeed(ctx: Ctx): number | null {
  const isSeed = (v: unknown): v is number => typeof v === "number" && Number.isInteger(v);
  try {
    const lit = findLiteral(readFileSync(TRAIN, "utf8"), "seed");
    if (lit && isSeed(lit.value)) return lit.value;
  } catch { /* no HP block: ask train.ts */ }
  const head = rev(ROOT, "HEAD");
  if (!ctx.hpSeeds.has(head)) {
    const dump = readHp(ROOT, BUN);
    const seed = "error" in dump ? undefined : dump.HP.seed;
    ctx.hpSeeds.set(head, isSeed(seed) ? seed : null);
  }
  return ctx.hpSeeds.get(head) ?? null;
}

/**
 * The seed of a run `offset` seeds after HP's own, and the environment that sets it: offset 0 runs
 * HP as train.ts has it; a train.ts without a seed runs as it is (its repeats differ only by timing).
 */
function seedFor(ctx: Ctx, offset: number): { seed: number | null; env: Record<string, string> } {
  const base = hpSeed(ctx);
  if (base === null) return { seed: null, env: {} };
  const seed = base + offset;
  return { seed, env: offset === 0 ? {} : { AR_HP: JSON.stringify({ seed }) } };
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
  const budget = st.settings.budgetSeconds;
  const deadlineS = budget + ctx.flags.grace + ALLOWANCE_S;
  const { seed, env } = seedFor(ctx, o.offset);
  rmSync(o.checkpointDir, { recursive: true, force: true }); // a stale model must not pass for this run's
  mkdirSync(LOGS_DIR, { recursive: true });
  const seeded = o.offset > 0 && seed !== null ? ` with seed ${seed}` : "";
  const expLog = openSync(join(LOGS_DIR, o.logName), "w"); // summarize finds crash logs by commit
  const runLog = openSync(RUN_LOG, "a");
  let t: Awaited<ReturnType<typeof trainOnce>> | null = null;
  let notTrained = "";
  try {
    const featureFailure = await featureStep(ctx, [expLog, runLog]);
    if (control.abort) throw new Stop(EXIT.aborted, "aborted while preparing the backbone's features");
    if (featureFailure !== null) {
      notTrained = `features: ${featureFailure}`;
    } else {
      status(ctx, `training ${o.what}${seeded} (budget ${budget}s, killed at ${deadlineS}s)`);
      t = await trainOnce({
        cwd: ROOT, bun: BUN, task: st.task, budgetS: budget, deadlineS, checkpointDir: o.checkpointDir, env,
        lingerS: LINGER_S, logs: [expLog, runLog], log: say,
        onSpawn: (pid) => {
          track(pid);
          cur.trainPid = pid;
          o.onSpawn(pid);
        },
      });
    }
  } finally {
    control.child = null;
    closeSync(expLog);
    closeSync(runLog);
  }
  if (control.abort) {
    const again = cur.phase === "confirming" ? "; `bun loop.ts --resume` trains this confirmation run again" : "";
    throw new Stop(EXIT.aborted, `aborted during training${again}`);
  }
  let verdict = t === null ? { ok: false, reason: notTrained } : { ok: t.ok, reason: t.reason };
  // train.ts runs with the repository's permissions: it must not have changed anything either.
  const integ = await integrity(ctx, cur.candidate!, false);
  if (integ.problems.length > 0) {
    await repair(ctx, cur.candidate!, integ);
    verdict = { ok: false, reason: `reverted after training: ${integ.problems.join(", ")}` };
  }
  cur.trainPid = null;
  const memoryGb = t?.ran.maxRss != null ? t.ran.maxRss / 1024 ** 3 : 0;
  return { ...verdict, memoryGb, trainSeconds: t?.ran.seconds ?? 0, imagesPerSecond: t?.imagesPerSecond ?? null };
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

/** One run's figures on the terminal: the primary, the positive class's recall, the throughput. */
function runLine(ctx: Ctx, label: string, run: MeasuredRun): void {
  const st = ctx.st;
  const parts = [`${st.primary} ${(run.metrics[st.primary] ?? 0).toFixed(6)}`];
  if (run.metrics.sensitivity !== undefined) parts.push(`sensitivity ${run.metrics.sensitivity.toFixed(4)}`);
  if (run.imagesPerSecond !== null) {
    const ref = bestImagesPerSecond(st);
    const ratio = ref ? run.imagesPerSecond / ref : null;
    const vs = ratio !== null && st.current?.kind === "experiment" ? ` (${ratio.toFixed(2)}× the best's)` : "";
    parts.push(`${run.imagesPerSecond.toFixed(1)} img/s${vs}`);
  }
  if (run.seed !== null) parts.push(`seed ${run.seed}`);
  say(`#${st.current!.n} ${label}: ${parts.join(" · ")}`);
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
    const first = { seed: seedFor(ctx, cur.seedOffset).seed, metrics: m.metrics, imagesPerSecond };
    cur.runs = [first];
    runLine(ctx, cur.kind === "experiment" && wanted > 1 ? `run 1/${wanted}` : "measured", first);
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
    const run = { seed: seedFor(ctx, cur.seedOffset + k).seed, metrics: m.metrics, imagesPerSecond: t.imagesPerSecond };
    cur.runs.push(run);
    runLine(ctx, `run ${k + 1}/${Math.max(wanted, k + 1)}`, run);
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
  const columns = TASK_METRICS[st.task].columns;
  // A primary that is not a results.tsv column (balanced_bin_acc) is shown in the description.
  const primary = columns.includes(st.primary) ? "" : ` (${st.primary} ${(metrics[st.primary] ?? 0).toFixed(4)})`;
  const description = `${cur.description}${primary}${note ? ` ${note}` : ""}`;
  const memoryGb = Number((cur.outcome?.memoryGb ?? 0).toFixed(3));
  cur.row = { commit: shortOf(ROOT, cur.candidate!), metrics, memory_gb: memoryGb, status,
    description: oneLine(description) };
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
    const isCrash = row.status === "crash";
    const p = row.metrics[st.primary] ?? 0;
    const vs = st.best && row.status !== "keep" && !isCrash ? ` (best ${num(st.best.metrics[st.primary] ?? 0)})` : "";
    say(`#${cur.n} ${row.status.toUpperCase()} ${st.primary} ${isCrash ? "-" : p.toFixed(6)}${vs} | `
      + `${row.description} | ${elapsed()}`);
    summarize(ctx);
  }
}

/** Put the kept model back from the loop's copy (a run changed it); pause if even the copy is damaged. */
async function restoreBest(ctx: Ctx): Promise<void> {
  const m = ctx.st.bestModel;
  if (!m) return;
  const why = await restoreModel(m);
  if (why === null) say(`restored the best model ${m.dir}/ from the loop's copy in ${m.copy}/`);
  else ctx.fatal = `the best model ${m.dir}/ was changed and cannot be restored: ${why}`;
}

function summarize(ctx: Ctx): void {
  if (!ctx.flags.summarize) return;
  if (!existsSync(SUMMARIZER)) {
    if (!ctx.warnedNoSummarizer) say(`note: no ${SUMMARIZER} in this repository: skipping the summary`);
    ctx.warnedNoSummarizer = true;
    return;
  }
  const r = Bun.spawnSync([BUN, SUMMARIZER], {
    cwd: ROOT, stdout: "pipe", stderr: "pipe", timeout: SUMMARIZE_TIMEOUT_S * 1000,
  });
  if (r.exitCode !== 0) {
    const last = (r.stderr.toString() + r.stdout.toString()).trim().split("\n").at(-1) ?? "";
    say(`warning: ${SUMMARIZER} failed (exit ${r.exitCode ?? "killed"}): ${oneLine(last, 160)}`);
  }
}

// ---------------------------------------------------------------------------
// One experiment, start to end
// ---------------------------------------------------------------------------

async function experiment(ctx: Ctx, kind: Kind): Promise<Status> {
  const st = ctx.st;
  const cur = newExperiment(st, kind, countRows(ctx.resultsText));
  st.current = cur;
  save(ctx);
  const proposer = ctx.mode === "builtin" ? "built-in search" : ctx.mode === "agent" ? "agent" : "HEAD";
  status(ctx, kind !== "experiment" ? cur.description : `proposing (${proposer})`);
  killPoint("proposing");
  await proposeAndCommit(ctx);
  if (cur.phase === "committed") await trainPhase(ctx);
  if (cur.phase === "evaluating" || cur.phase === "confirming") await measureAndDecide(ctx);
  await logAndApply(ctx);
  if (ctx.fatal) throw new Stop(EXIT.paused, ctx.fatal);
  return cur.row!.status;
}

// ---------------------------------------------------------------------------
// Recovery (--resume after a kill)
// ---------------------------------------------------------------------------

const unmeasured = (phase: Phase) => phase === "proposing" || phase === "committed" || phase === "training";

/** Finish or roll back the experiment a killed loop left behind. */
async function recover(ctx: Ctx): Promise<void> {
  const cur = ctx.st.current;
  if (!cur || cur.phase === "decided") return;
  say(`resume: experiment #${cur.n} "${cur.description}" was interrupted at phase ${cur.phase}`);
  // A git command killed with the loop leaves its lock behind; no other loop can hold it (our lock).
  rmSync(join(ROOT, ".git", "index.lock"), { force: true });
  if (cur.trainPid !== null && pidAlive(cur.trainPid)) {
    killGroup(cur.trainPid); // the orphaned train.ts would overwrite the next run's checkpoint
    for (let i = 0; i < 50 && pidAlive(cur.trainPid); i++) await Bun.sleep(100);
    say(`resume: killed the orphaned train.ts (pid ${cur.trainPid})`);
  }
  setAsideUnknown(ctx);
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
 * What a resume may roll back is what the loop wrote: the experiment's commits (train.ts at the
 * candidate). Anything else in the tree (a file changed or added while the loop was down, or by the
 * killed train.ts: the loop cannot tell which) is moved to .autoresearch/set-aside/, never deleted,
 * and the loop says where. A normal run is different: there every change but train.ts is the
 * experiment's, and it is reverted (see integrity).
 */
function setAsideUnknown(ctx: Ctx): void {
  const cur = ctx.st.current!;
  const commits = [cur.base, ...(cur.candidate ? [cur.candidate] : [])];
  const head = rev(ROOT, "HEAD");
  if (!commits.includes(head)) {
    const short = shortOf(ROOT, head);
    say(`resume: HEAD was at ${short} (not this experiment's commit): the rollback leaves it in \`git reflog\`; `
      + `\`git branch <name> ${short}\` keeps it`);
  }
  const paths = unknownChanges(ROOT, commits);
  if (paths.length === 0) return;
  const dest = join(SET_ASIDE_DIR, `${new Date().toISOString().replace(/[:.]/g, "-")}-exp${cur.n}`);
  moveAside(ROOT, paths, dest);
  const shown = `${paths.slice(0, 5).join(", ")}${paths.length > 5 ? ` and ${paths.length - 5} more` : ""}`;
  const verb = paths.length === 1 ? "differs" : "differ";
  say(`resume: ${shown} ${verb} from what the loop committed (changed while it was stopped, or by the interrupted `
    + `run): moved to ${dest}/, nothing deleted; copy back what is yours`);
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
  if (currentBranch(ROOT) !== st.branch) {
    const dirty = dirtyPaths(ROOT);
    if (dirty.length > 0) throw notClean(dirty, `cannot switch to ${st.branch}`);
    git(["checkout", "-q", st.branch], { cwd: ROOT });
  }
  ctx.resultsText = loadResultsText(ROOT, say);
  await recover(ctx);
  const m = st.bestModel;
  const changed = m ? await changedFiles(m.dir, m.files) : [];
  if (changed.length > 0) {
    say(`resume: the best model ${m!.dir}/ changed since it was kept (${changed.join(", ")})`);
    await restoreBest(ctx);
    if (ctx.fatal) throw new Stop(EXIT.paused, ctx.fatal);
  }
  const dirty = dirtyPaths(ROOT);
  if (dirty.length > 0) {
    throw notClean(dirty, ctx.mode === "once" ? COMMIT_FIRST : "commit or remove these first");
  }
  if (!sameCache(await cacheFingerprint(CACHE_ROOT), st.cache)) {
    throw new Stop(EXIT.paused, `the prepared data is not the session's (${st.cache.dir}): re-run \`bun prepare.ts\` `
      + "with the session's source, or start a new session");
  }
  if (ctx.flags.resume) st.crashStreak = 0; // a person restarted a paused loop: a fresh streak (--once keeps counting)
  save(ctx);
  const h = rev(ROOT, "HEAD");
  if (st.best && ctx.mode !== "once" && h !== st.best.commit) {
    throw new Stop(EXIT.refused, `HEAD (${shortOf(ROOT, h)}) is not the last kept commit (${st.best.short}): `
      + `measure it with \`bun loop.ts --once\`, or \`git reset --hard ${st.best.short}\``);
  }
  const best = st.best
    ? `${st.primary} ${(st.best.metrics[st.primary] ?? 0).toFixed(6)} (${st.best.short})`
    : "none yet";
  const noise = st.noise ? `, noise floor ${num(st.noise.floor)}` : "";
  say(`resumed ${st.branch}: ${countRows(ctx.resultsText)} rows, best ${best}${noise}`);
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
    if (!runMdSaysGo()) return { exit: EXIT.ok, ran };
    const s = await experiment(ctx, "baseline");
    ran = true;
    if (s === "crash") {
      const why = st.current?.row?.description ?? "";
      throw new Stop(EXIT.paused, `the baseline (the unmodified train.ts) crashed: ${why}. `
        + "Fix the cause (see run.log), then `bun loop.ts --resume`.");
    }
  }
  if (st.noise && ran) {
    say(`noise floor: ${st.primary} mean ${num(st.noise.mean)}, σ ${num(st.noise.sigma)} over ${st.noise.runs.length} `
      + `run(s); a keep needs more than +${num(st.noise.floor)} over the mean`);
    loadWarning(st.runs.filter((r) => r.kind === "baseline"), "baseline");
    const warning = st.trivial && st.baseline && trivialWarning({
      primary: st.primary, baseline: st.baseline.metrics[st.primary] ?? 0, trivial: st.trivial.value,
      floor: st.noise.floor, positive: positiveClass(st), prevalence: st.baseline.metrics.prevalence,
    });
    if (warning) say(warning);
  }
  return { exit: null, ran };
}

/** The screened class of the session's dataset (null: not screening, or the manifest is unreadable). */
function positiveClass(st: State): string | null {
  try {
    return parseManifest(readFileSync(cacheFiles(st.cache.dir).manifest, "utf8"), st.cache.dir).positiveClass;
  } catch {
    return null;
  }
}

/**
 * Repeats of one code that trained much slower than the fastest of them ran on a busier machine:
 * said once. They stay in σ (a wider floor makes keeps rarer, not falser).
 */
function loadWarning(runs: readonly { n: number; imagesPerSecond: number | null }[], what: string): void {
  const steady = steadyRuns(runs.map((r) => r.imagesPerSecond));
  const slow = runs.filter((_, i) => !steady[i]);
  if (slow.length === 0) return;
  const fastest = Math.max(...runs.map((r) => r.imagesPerSecond ?? 0));
  say(`warning: ${what} run(s) ${slow.map((r) => `#${r.n} (${(r.imagesPerSecond ?? 0).toFixed(1)} img/s)`).join(", ")} `
    + `trained under ${LOAD_RATIO}× the fastest (${fastest.toFixed(1)} img/s): the machine was busier, and the noise `
    + "floor includes that (fewer keeps, not false ones)");
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
  if (!runMdSaysGo()) return EXIT.ok;
  await experiment(ctx, "experiment");
  const exit = await checkStreak(ctx);
  return exit ?? EXIT.ok;
}

async function runLoop(ctx: Ctx): Promise<number> {
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
    if (!runMdSaysGo()) return EXIT.ok;
    if (rebaseline) {
      const s = await experiment(ctx, "rebaseline");
      if (s === "crash") say("the re-baseline crashed: the noise floor stays as it was");
      else if (st.rebaseline!.done === st.rebaseline!.wanted && st.noise) {
        say(`noise floor of the new structure: ${st.primary} mean ${num(st.noise.mean)}, σ ${num(st.noise.sigma)} `
          + `over ${st.noise.runs.length} runs; a keep needs more than +${num(st.noise.floor)}`);
        loadWarning(st.runs.filter((r) => r.commit === st.best?.short), "re-baseline");
      }
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
  if (!runMdSaysGo()) return EXIT.ok;
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
// Main
// ---------------------------------------------------------------------------

async function main(argv: string[]): Promise<number> {
  const flags = parseFlags(argv, ALLOWANCE_S);
  process.chdir(ROOT);
  const loopFiles = [RESULTS_FILE, RUN_LOG, join(AR_DIR, "state.json"), join(LATEST_CHECKPOINT_DIR, "meta.json")];
  const unfit = repositoryProblem(ROOT, loopFiles);
  if (unfit !== null) throw new Stop(EXIT.refused, unfit);
  let release: () => void;
  try {
    release = acquireLock(ROOT, say);
  } catch (err) {
    throw new Stop(EXIT.refused, err instanceof Error ? err.message : String(err));
  }
  const onSignal = (sig: string) => {
    if (!control.stop) {
      control.stop = true;
      say(`${sig}: the current experiment will finish and be logged, then the loop stops (${sig} again aborts it)`);
      return;
    }
    control.abort = true;
    say(`${sig} again: aborting the current experiment`);
    if (control.child !== null) killGroup(control.child);
  };
  process.on("SIGINT", () => onSignal("SIGINT"));
  process.on("SIGTERM", () => onSignal("SIGTERM"));
  try {
    const open = { root: ROOT, flags, cacheRoot: CACHE_ROOT, log: say, mayStart: () => runMdSaysGo(true) };
    const { st, resumed } = await openSession(open);
    journaled = true;
    const ctx: Ctx = {
      flags, mode: flags.once ? "once" : flags.agent !== undefined ? "agent" : "builtin",
      st, resultsText: "", fatal: null, warnedNoSummarizer: false, noTestSplit: null, hpSeeds: new Map(),
    };
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
    }
  } finally {
    release();
  }
}

/** Set once the session has a journal: from then on `--resume` can finish whatever was interrupted. */
let journaled = false;

const FS_CAUSES: Record<string, string> = {
  EACCES: "permission denied", EPERM: "operation not permitted", EROFS: "read-only file system",
  ENOSPC: "no space left on device", EDQUOT: "disk quota exceeded", EISDIR: "a folder is in the way",
  ENOTDIR: "part of its path is a file, not a folder", EEXIST: "a file of that name is in the way",
  ENOENT: "no such file or folder", EIO: "input/output error",
};

/**
 * One line for an error the loop did not expect, most often one of its own writes failing (a full
 * disk, a read-only folder, a file where a folder should be): the file, the cause, and what to run
 * once it is fixed. Every phase is journaled before it starts, so `--resume` then carries on.
 */
function failureLine(err: unknown): string {
  const then = journaled ? "fix that, then run `bun loop.ts --resume` (the interrupted experiment is journaled)"
    : `fix that, then run \`${["bun", "loop.ts", ...process.argv.slice(2)].join(" ")}\` again`;
  const e = err as Partial<NodeJS.ErrnoException> & { dest?: string };
  if (err instanceof Error && typeof e.code === "string" && (e.path ?? e.dest) !== undefined) {
    // A write through a temporary sibling (lib/atomic.ts) fails under the temporary name: name the real file.
    const file = relative(ROOT, resolve(ROOT, e.dest ?? e.path!)).replace(/\.tmp-\d+-\d+$/, "");
    const verb = e.syscall === "read" || e.syscall === "scandir" ? "read" : "write";
    return `cannot ${verb} ${file}: ${FS_CAUSES[e.code] ?? e.code} (${e.code}); ${then}`;
  }
  const msg = err instanceof Error ? (err.message.split("\n")[0] ?? "") : String(err);
  return `${msg} (details in ${RUN_LOG}); ${then}`;
}

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
      console.error(`[loop] error: ${failureLine(err)}`);
      process.exit(EXIT.error);
    },
  );
}
