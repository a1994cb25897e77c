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
 * the file; `--resume` once it is fixed), 2 refused (dirty tree, existing branch, lock held, bad run.md or flags,
 * nothing to measure), 3 paused (crash streak, the baseline crashed, the prepared data changed),
 * 130 aborted by a second Ctrl-C (the interrupted experiment is rolled back, no row).
 *
 * Test-only environment: AR_TEST_KILL_AT=<point> makes the loop SIGKILL itself right after that
 * point (proposing, proposed, committed, training, evaluating, logging, appended, logged, decided);
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
import { cacheFingerprint } from "./lib/dataset.ts";
import {
  AR_DIR, LOGS_DIR, RESULTS_BACKUP, acquireLock, pidAlive, saveState, type Phase, type State,
} from "./lib/journal.ts";
import { parseFlags, type Flags } from "./lib/loop_flags.ts";
import { describeMove, nextMove, readHp, type Proposal } from "./lib/proposer.ts";
import {
  RESULTS_FILE, appendResult, countRows, crashRow, formatRow, lastWholeLine, oneLine, type Status,
} from "./lib/results.ts";
import {
  loadResultsText, newExperiment, openSession, recordDecision, restoreResults, resumeSettings, sessionReport,
} from "./lib/session.ts";
import { evaluateCheckpoint, prepareFeatures, trainOnce } from "./lib/trial.ts";
import { decide, num } from "./lib/verdict.ts";
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
  if (cur.kind === "baseline") return { description: cur.description, move: null, failure: null };
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

/** Phase committed → training → evaluating (or a crash row, phase logging). */
async function trainPhase(ctx: Ctx): Promise<void> {
  const st = ctx.st;
  const cur = st.current!;
  const budget = st.settings.budgetSeconds;
  const deadlineS = budget + ctx.flags.grace + ALLOWANCE_S;
  const short = shortOf(ROOT, cur.candidate!);
  rmSync(LATEST_CHECKPOINT_DIR, { recursive: true, force: true }); // a stale model must not pass for this run's
  mkdirSync(LOGS_DIR, { recursive: true });
  const expLog = openSync(join(LOGS_DIR, `${cur.n}-${short}.log`), "w"); // summarize finds crash logs by commit
  const runLog = openSync(RUN_LOG, "a");
  let t: Awaited<ReturnType<typeof trainOnce>> | null = null;
  let verdict: { ok: boolean; reason: string };
  try {
    const featureFailure = await featureStep(ctx, [expLog, runLog]);
    if (control.abort) throw new Stop(EXIT.aborted, "aborted while preparing the backbone's features");
    if (featureFailure !== null) {
      verdict = { ok: false, reason: `features: ${featureFailure}` };
    } else {
      status(ctx, `training ${short}: ${cur.description} (budget ${budget}s, killed at ${deadlineS}s)`);
      t = await trainOnce({
        cwd: ROOT, bun: BUN, task: st.task, budgetS: budget, deadlineS, checkpointDir: LATEST_CHECKPOINT_DIR,
        lingerS: LINGER_S, logs: [expLog, runLog], log: say,
        onSpawn: (pid) => {
          track(pid);
          cur.trainPid = pid;
          enter(ctx, "training");
        },
      });
      verdict = { ok: t.ok, reason: t.reason };
    }
  } finally {
    control.child = null;
    closeSync(expLog);
    closeSync(runLog);
  }
  if (control.abort) throw new Stop(EXIT.aborted, "aborted during training");
  // train.ts runs with the repository's permissions: it must not have changed anything either.
  const integ = await integrity(ctx, cur.candidate!, false);
  if (integ.problems.length > 0) {
    await repair(ctx, cur.candidate!, integ);
    verdict = { ok: false, reason: `reverted after training: ${integ.problems.join(", ")}` };
  }
  cur.trainPid = null;
  const memoryGb = t?.ran.maxRss != null ? t.ran.maxRss / 1024 ** 3 : 0;
  cur.outcome = { ok: verdict.ok, reason: verdict.reason, memoryGb, trainSeconds: t?.ran.seconds ?? 0 };
  if (!verdict.ok) cur.row = crashRow(st.task, short, `${cur.description} (crash: ${verdict.reason})`);
  enter(ctx, verdict.ok ? "evaluating" : "logging");
}

/** Phase evaluating → logging: measure the checkpoint and decide the row. */
async function measureAndDecide(ctx: Ctx): Promise<void> {
  const st = ctx.st;
  const cur = st.current!;
  const short = shortOf(ROOT, cur.candidate!);
  let m: Awaited<ReturnType<typeof evaluateCheckpoint>>;
  try {
    m = await evaluateCheckpoint({
      cwd: ROOT, bun: BUN, task: st.task, checkpointDir: LATEST_CHECKPOINT_DIR, lingerS: LINGER_S, onSpawn: track,
      log: say,
    });
  } finally {
    control.child = null;
  }
  // The journal stays at "evaluating": --resume measures the checkpoint again.
  if (control.abort) {
    throw new Stop(EXIT.aborted, "aborted during evaluation; `bun loop.ts --resume` measures it again");
  }
  if ("error" in m) {
    cur.row = crashRow(ctx.st.task, short, `${cur.description} (crash: evaluate: ${m.error})`);
  } else {
    const metrics = Object.fromEntries(TASK_METRICS[st.task].columns.map((c) => [c, m.metrics[c] ?? 0]));
    const { status, note } = decide(st, metrics);
    const description = note ? `${cur.description} ${note}` : cur.description;
    const memoryGb = Number((cur.outcome?.memoryGb ?? 0).toFixed(3));
    cur.row = { commit: short, metrics, memory_gb: memoryGb, status, description: oneLine(description) };
  }
  enter(ctx, "logging");
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

async function experiment(ctx: Ctx, kind: "baseline" | "experiment"): Promise<Status> {
  const st = ctx.st;
  const cur = newExperiment(st, kind, countRows(ctx.resultsText));
  st.current = cur;
  save(ctx);
  const proposer = ctx.mode === "builtin" ? "built-in search" : ctx.mode === "agent" ? "agent" : "HEAD";
  status(ctx, kind === "baseline" ? cur.description : `proposing (${proposer})`);
  killPoint("proposing");
  await proposeAndCommit(ctx);
  if (cur.phase === "committed") await trainPhase(ctx);
  if (cur.phase === "evaluating") await measureAndDecide(ctx);
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
  if (cur.phase === "evaluating") {
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
  }
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
  if (!runMdSaysGo()) return EXIT.ok;
  await experiment(ctx, "experiment");
  checkStreak(ctx);
  return EXIT.ok;
}

async function runLoop(ctx: Ctx): Promise<number> {
  const { exit, ran } = await baselines(ctx);
  if (exit !== null) return exit;
  if (ctx.mode === "once") return once(ctx, ran);
  for (let started = 0; ; started++) {
    if (control.stop) return stopped(ctx);
    if (ctx.flags.maxExperiments !== undefined && started >= ctx.flags.maxExperiments) {
      say(`--max-experiments ${ctx.flags.maxExperiments} reached: stopping`);
      return EXIT.ok;
    }
    if (!runMdSaysGo()) return EXIT.ok;
    await experiment(ctx, "experiment");
    checkStreak(ctx);
  }
}

/** A streak of crashes pauses the loop instead of letting it spin. */
function checkStreak(ctx: Ctx): void {
  if (ctx.st.crashStreak < ctx.flags.maxCrashStreak) return;
  throw new Stop(EXIT.paused, `paused: ${ctx.st.crashStreak} crashes in a row `
    + `(last: ${ctx.st.current?.row?.description ?? "?"}). Look at run.log and ${LOGS_DIR}/, fix the cause, `
    + "then `bun loop.ts --resume`.");
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
      st, resultsText: "", fatal: null, warnedNoSummarizer: false,
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
