/**
 * A session: one autoresearch/<tag> branch, its journal (.autoresearch/state.json) and its
 * results.tsv. Starting a new one archives the previous session's files; resuming an older one
 * swaps its files back in, and finds the repository as the session left it (or says what to do).
 * recordDecision is the journal's bookkeeping once a row is logged; the rest are the lines the
 * loop says about the session.
 */
import { existsSync, mkdirSync, readFileSync, readdirSync, renameSync, rmSync } from "node:fs";
import { basename, join } from "node:path";
import { TASK_METRICS, TIME_BUDGET, trivialScore, type Task } from "../prepare.ts";
import { writeAtomic } from "./atomic.ts";
import { changedFiles, restoreModel } from "./best_model.ts";
import { killGroup } from "./child.ts";
import { EXIT, Stop } from "./exit.ts";
import { currentBranch, git } from "./git.ts";
import { cacheFiles, cacheFingerprint, parseManifest } from "./dataset.ts";
import { protectedHashes, sameCache } from "./integrity.ts";
import {
  RESULTS_BACKUP, SESSIONS_DIR, SET_ASIDE_DIR, STATE_FILE, acquireLock, pidAlive, readState, saveState,
  type Experiment, type Kind, type MeasuredRun, type State,
} from "./journal.ts";
import { DEFAULTS, type Flags } from "./loop_flags.ts";
import { STRUCTURE_AXES, describeMove, direction } from "./proposer.ts";
import { RESULTS_FILE, countRows, oneLine, type ResultRow } from "./results.ts";
import { checkPrimary, computeNoise, loadWarning, meanMetrics, num, signed, trivialWarning } from "./verdict.ts";
import {
  branchExists, dirtyPaths, readText, repositoryProblem, rev, setAsideUnknown, shortOf,
} from "./worktree.ts";

type Log = (line: string) => void;

/** The files that make up a session, relative to the repository. */
const SESSION_FILES = [STATE_FILE, RESULTS_FILE, RESULTS_BACKUP];
const SUMMARIZER = "summarize_results.ts";
const SUMMARIZE_TIMEOUT_S = 120;

/**
 * Let the loop run in `root`: the top of a git repository that ignores `loopFiles`, and no other
 * loop running there. Returns the release of the lock.
 */
export function claimRepository(root: string, loopFiles: string[], log: Log): () => void {
  const unfit = repositoryProblem(root, loopFiles);
  if (unfit !== null) throw new Stop(EXIT.refused, unfit);
  try {
    return acquireLock(root, log);
  } catch (err) {
    throw new Stop(EXIT.refused, err instanceof Error ? err.message : String(err));
  }
}

interface OpenArgs {
  root: string;
  flags: Flags;
  cacheRoot: string;
  log: Log;
  /** run.md's answer before a new session: a False switch must not even create a branch. */
  mayStart: () => boolean;
}

/** Which session to run: resume the named (or journaled) one, or start a new branch. */
export async function openSession(a: OpenArgs): Promise<{ st: State; resumed: boolean }> {
  const { root, flags } = a;
  const live = readState(join(root, STATE_FILE));
  const head = currentBranch(root);
  const onSession = head?.startsWith("autoresearch/") ? head : null;
  const wanted = flags.tag !== undefined ? `autoresearch/${flags.tag}` : null;
  let target: string | null = null;
  if (flags.resume) {
    target = wanted ?? live?.branch ?? onSession;
    if (target === null) {
      throw new Stop(EXIT.refused,
        "--resume: no session to resume (no journal in .autoresearch/ and not on an autoresearch/ branch)");
    }
  } else if (flags.once) {
    // An agent calls --once again and again: the session of the branch it is on continues.
    target = wanted ?? onSession;
  }
  if (target !== null) {
    const st = journalFor(root, target, a.log);
    if (st) return { st, resumed: true };
    if (flags.resume) {
      const why = "nothing to resume (start a new session with another --tag)";
      throw new Stop(EXIT.refused, `no journal for ${target}: ${why}`);
    }
  }
  if (!a.mayStart()) throw new Stop(EXIT.ok, "");
  return { st: await startSession(a, wanted ?? `autoresearch/${dateTag()}`), resumed: false };
}

/** A new branch from HEAD and a new journal: the tree must be clean and a dataset prepared. */
async function startSession(a: OpenArgs, branch: string): Promise<State> {
  const { root, flags } = a;
  if (branchExists(root, branch)) {
    const tag = branch.slice("autoresearch/".length);
    throw new Stop(EXIT.refused,
      `branch ${branch} already exists: continue it with \`bun loop.ts --resume --tag ${tag}\`, or pick another --tag`);
  }
  const dirty = dirtyPaths(root);
  if (dirty.length > 0) {
    const shown = `${dirty.slice(0, 5).join(", ")}${dirty.length > 5 ? ", …" : ""}`;
    throw new Stop(EXIT.refused, `the working tree is not clean (${shown}): commit or remove these first; `
      + "the loop resets the tree between experiments");
  }
  const cache = await cacheFingerprint(a.cacheRoot);
  if (cache.task === null) {
    throw new Stop(EXIT.refused,
      `no prepared dataset under ${a.cacheRoot} (or it is unreadable): run \`bun prepare.ts --source …\` first`);
  }
  const primary = checkPrimary(cache.task, flags.primary);
  if ("error" in primary) throw new Stop(EXIT.refused, `loop.ts: ${primary.error}`);
  archiveSession(root, readState(join(root, STATE_FILE)), a.log);
  git(["checkout", "-q", "-b", branch], { cwd: root });
  const head = rev(root, "HEAD");
  const st = newState({
    branch, task: cache.task, head, protected: await protectedHashes(root), primary: primary.primary,
    cache: { dir: cache.dir, images: cache.images, manifest: cache.manifest },
    settings: {
      budgetSeconds: flags.budget ?? TIME_BUDGET, baselineRuns: flags.baselineRuns ?? DEFAULTS.baselineRuns,
      noiseSigmas: flags.noiseSigmas ?? DEFAULTS.noiseSigmas, seed: flags.seed ?? DEFAULTS.seed,
      confirmRuns: flags.confirmRuns ?? DEFAULTS.confirmRuns,
    },
  });
  saveState(root, st);
  const confirm = st.settings.confirmRuns ? `, keeps confirmed over ${st.settings.confirmRuns} more seed(s)` : "";
  a.log(`new session on ${branch} from ${shortOf(root, head)}: task ${st.task}, keep on ${st.primary} `
    + `(then ${st.secondary}), budget ${st.settings.budgetSeconds}s, ${st.baselines.wanted} baseline run(s)${confirm}`);
  if (st.baselines.wanted === 1) {
    a.log("warning: one baseline run measures no spread: σ is unknown and the noise floor is 0, so any gain "
      + "counts (--baseline-runs 3 or more estimates it)");
  }
  return st;
}

/** How an agent following program.md makes the tree clean: the loop only measures commits. */
export const COMMIT_FIRST = `commit your change to train.ts first (\`git commit -am "<what you tried>"\`)`;

/** Refusal of a dirty tree (`dirty`, the first few shown) and what to do about it. */
export function notClean(dirty: string[], what: string): Stop {
  return new Stop(EXIT.refused, `the working tree is not clean (${dirty.slice(0, 5).join(", ")}): ${what}`);
}

/** A resumed session's branch checked out; a dirty tree is refused (the switch would carry its changes). */
export function checkoutSession(root: string, st: State): void {
  if (currentBranch(root) === st.branch) return;
  const dirty = dirtyPaths(root);
  if (dirty.length > 0) throw notClean(dirty, `cannot switch to ${st.branch}`);
  git(["checkout", "-q", st.branch], { cwd: root });
}

/**
 * What a killed loop leaves besides its journal: git's index lock (a git command killed with it;
 * no other loop can hold it, the loop's own lock says so), an orphaned child still writing, and
 * changes the loop did not make (set aside, see setAsideUnknown).
 */
export async function cleanUpAfterKill(root: string, cur: Experiment, log: Log): Promise<void> {
  rmSync(join(root, ".git", "index.lock"), { force: true });
  if (cur.trainPid !== null && pidAlive(cur.trainPid)) {
    killGroup(cur.trainPid); // the orphaned train.ts would overwrite the next run's checkpoint
    for (let i = 0; i < 50 && pidAlive(cur.trainPid); i++) await Bun.sleep(100);
    log(`resume: killed the orphaned train.ts (pid ${cur.trainPid})`);
  }
  const stamp = new Date().toISOString().replace(/[:.]/g, "-");
  const commits = [cur.base, ...(cur.candidate ? [cur.candidate] : [])];
  setAsideUnknown(root, commits, join(SET_ASIDE_DIR, `${stamp}-exp${cur.n}`), log);
}

/**
 * A resumed session once its interrupted experiment is dealt with: the kept model as it was kept
 * (restored from the loop's copy if it changed), nothing uncommitted (`dirtyAdvice` says what to do
 * about it), and the prepared data the session measured on. Throws what to do otherwise.
 */
export async function checkResumed(root: string, st: State, a: {
  cacheRoot: string; dirtyAdvice: string; log: Log;
}): Promise<void> {
  const m = st.bestModel;
  const changed = m ? await changedFiles(m.dir, m.files) : [];
  if (m && changed.length > 0) {
    a.log(`resume: the best model ${m.dir}/ changed since it was kept (${changed.join(", ")})`);
    const why = await restoreModel(m, a.log);
    if (why !== null) throw new Stop(EXIT.paused, why);
  }
  const dirty = dirtyPaths(root);
  if (dirty.length > 0) throw notClean(dirty, a.dirtyAdvice);
  if (!sameCache(await cacheFingerprint(a.cacheRoot), st.cache)) {
    throw new Stop(EXIT.paused, `the prepared data is not the session's (${st.cache.dir}): re-run \`bun prepare.ts\` `
      + "with the session's source, or start a new session");
  }
}

/** The default session name: today, e.g. nov23. */
function dateTag(d = new Date()): string {
  return `${d.toLocaleString("en-US", { month: "short" }).toLowerCase()}${d.getDate()}`;
}

/** Move the previous session's journal and results out of the way (they are per session). */
function archiveSession(root: string, live: State | null, log: Log): void {
  const files = SESSION_FILES.filter((f) => existsSync(join(root, f)));
  if (files.length === 0) return;
  const branch = (live?.branch ?? "unknown").replace(/[^A-Za-z0-9._-]+/g, "_");
  const dir = join(SESSIONS_DIR, `${branch}-${new Date().toISOString().replace(/[:.]/g, "-")}`);
  mkdirSync(join(root, dir), { recursive: true });
  for (const f of files) renameSync(join(root, f), join(root, dir, basename(f)));
  log(`archived the previous session's ${files.map((f) => basename(f)).join(", ")} to ${dir}/`);
}

/** The journal of `branch`: the live state.json, or an archived one (swapped back in). */
function journalFor(root: string, branch: string, log: Log): State | null {
  const live = readState(join(root, STATE_FILE));
  if (live?.branch === branch) return live;
  if (!existsSync(join(root, SESSIONS_DIR))) return null;
  for (const d of readdirSync(join(root, SESSIONS_DIR)).sort().reverse()) {
    const dir = join(SESSIONS_DIR, d);
    let st: State | null = null;
    try { st = readState(join(root, dir, "state.json")); } catch { continue; }
    if (st?.branch !== branch) continue;
    archiveSession(root, live, log);
    for (const f of SESSION_FILES) {
      if (existsSync(join(root, dir, basename(f)))) renameSync(join(root, dir, basename(f)), join(root, f));
    }
    rmSync(join(root, dir), { recursive: true, force: true });
    log(`restored the journal of ${branch} from ${dir}/`);
    return st;
  }
  return null;
}

/** The journal of a session that has measured nothing yet (keeping on the task's primary unless told). */
export function newState(a: {
  branch: string; task: Task; head: string; settings: State["settings"];
  protected: State["protected"]; cache: State["cache"]; primary?: string;
}): State {
  const now = new Date().toISOString();
  const m = TASK_METRICS[a.task];
  const primary = a.primary ?? m.primary;
  // The tie-break must be another metric than the one that ties.
  const secondary = m.secondary !== primary ? m.secondary : m.primary;
  return {
    version: 1, branch: a.branch, tag: a.branch.slice("autoresearch/".length), task: a.task,
    primary, secondary, startedAt: now, updatedAt: now, pid: process.pid,
    sessionStart: a.head, settings: a.settings, protected: a.protected, cache: a.cache,
    baselines: { wanted: a.settings.baselineRuns, primaries: [], metrics: [] },
    baseline: null, noise: null, best: null, nextN: 1,
    counts: { experiments: 0, keeps: 0, discards: 0, crashes: 0 }, crashStreak: 0,
    tried: [], lastKeptMove: null, timing: { runs: 0, trainSeconds: 0, wallSeconds: 0 }, current: null,
    trivial: null, testRuns: [], runs: [], rebaseline: null, skipAxes: [],
  };
}

/**
 * Flags given to a resumed session: the budget and the primary cannot change (results would not be
 * comparable); a new seed, noise multiplier or number of confirmation runs applies from now on.
 */
export function resumeSettings(
  st: State, f: Pick<Flags, "budget" | "seed" | "noiseSigmas" | "primary" | "confirmRuns">,
): void {
  if (f.budget !== undefined && f.budget !== st.settings.budgetSeconds) {
    throw new Stop(EXIT.refused, `this session trains with --budget ${st.settings.budgetSeconds}; results with another `
      + "budget are not comparable: resume without --budget, or start a new session");
  }
  if (f.primary !== undefined && f.primary !== st.primary) {
    throw new Stop(EXIT.refused, `this session keeps on ${st.primary}; its verdicts on another primary would not `
      + "be comparable: resume without --primary, or start a new session");
  }
  if (f.seed !== undefined) st.settings.seed = f.seed;
  if (f.confirmRuns !== undefined) st.settings.confirmRuns = f.confirmRuns;
  if (f.noiseSigmas !== undefined && f.noiseSigmas !== st.settings.noiseSigmas) {
    st.settings.noiseSigmas = f.noiseSigmas;
    if (st.noise) st.noise = computeNoise(st.noise.metric, st.noise.runs, f.noiseSigmas);
  }
}

/**
 * The experiment about to start: a baseline repeat from the session start, a change of the best,
 * a re-baseline repeat of the best, or a check of the best after a crash streak. Repeats train
 * with the next seed, so their spread includes what another seed changes.
 */
export function newExperiment(st: State, kind: Kind, rowsBefore: number): Experiment {
  const done = st.baselines.primaries.length;
  const wanted = st.baselines.wanted;
  const repeat = done === 0 ? `baseline 1/${wanted}` : `baseline repeat ${done + 1}/${wanted}`;
  const rb = st.rebaseline;
  const description = kind === "experiment" ? ""
    : kind === "baseline" ? (wanted === 1 ? "baseline" : repeat)
    : kind === "rebaseline" ? `re-baseline ${(rb?.done ?? 0) + 1}/${rb?.wanted ?? 0} of ${st.best!.short} `
      + `(new structure: ${rb?.move ?? "?"})`
    : `check: the best ${st.best!.short} again after ${st.crashStreak} crashes in a row`;
  // A re-baseline continues the seeds after the kept runs (their metrics are rb.metrics).
  const seedOffset = kind === "baseline" ? done : kind === "rebaseline" ? (rb?.metrics.length ?? 0) : 0;
  return {
    n: st.nextN, kind, phase: "proposing",
    base: kind === "baseline" ? st.sessionStart : st.best!.commit,
    candidate: null, description, move: null, trainPid: null, outcome: null, row: null,
    rowsBefore, trainLines: 0, startedAt: new Date().toISOString(), seedOffset, runs: [],
  };
}

/** Mean of the known throughputs, or null. */
function meanIps(values: readonly (number | null)[]): number | null {
  const known = values.filter((v): v is number => v !== null);
  return known.length === 0 ? null : known.reduce((s, v) => s + v, 0) / known.length;
}

/** Mean throughput of every run of the best's code: what a run's throughput is shown against. */
export function bestImagesPerSecond(st: State): number | null {
  return st.best ? meanIps(st.runs.filter((r) => r.commit === st.best!.short).map((r) => r.imagesPerSecond)) : null;
}

/**
 * One measured run of the current experiment in a line: the primary, the positive class's recall,
 * the throughput (against the best's, for a candidate), the seed.
 */
export function runLine(st: State, label: string, run: MeasuredRun): string {
  const parts = [`${st.primary} ${(run.metrics[st.primary] ?? 0).toFixed(6)}`];
  if (run.metrics.sensitivity !== undefined) parts.push(`sensitivity ${run.metrics.sensitivity.toFixed(4)}`);
  if (run.imagesPerSecond !== null) {
    const ref = bestImagesPerSecond(st);
    const ratio = ref ? run.imagesPerSecond / ref : null;
    const vs = ratio !== null && st.current?.kind === "experiment" ? ` (${ratio.toFixed(2)}× the best's)` : "";
    parts.push(`${run.imagesPerSecond.toFixed(1)} img/s${vs}`);
  }
  if (run.seed !== null) parts.push(`seed ${run.seed}`);
  return `#${st.current!.n} ${label}: ${parts.join(" · ")}`;
}

/** The logged verdict of the current experiment: status, primary (and the best's, if not kept), description. */
export function decisionLine(st: State, row: ResultRow): string {
  const isCrash = row.status === "crash";
  const p = row.metrics[st.primary] ?? 0;
  const vs = st.best && row.status !== "keep" && !isCrash ? ` (best ${num(st.best.metrics[st.primary] ?? 0)})` : "";
  return `#${st.current!.n} ${row.status.toUpperCase()} ${st.primary} ${isCrash ? "-" : p.toFixed(6)}${vs} | `
    + row.description;
}

/** Where a resumed session stands: its rows, its best and its noise floor. */
export function resumedLine(st: State, rows: number): string {
  const best = st.best
    ? `${st.primary} ${(st.best.metrics[st.primary] ?? 0).toFixed(6)} (${st.best.short})`
    : "none yet";
  const noise = st.noise ? `, noise floor ${num(st.noise.floor)}` : "";
  return `resumed ${st.branch}: ${rows} rows, best ${best}${noise}`;
}

/** The loop's status line: the experiment, the clock, the best so far, and what is happening. */
export function statusLine(st: State, clock: string, what: string): string {
  const best = st.best
    ? `best ${st.primary} ${(st.best.metrics[st.primary] ?? 0).toFixed(6)} (#${st.best.n} ${st.best.short})`
    : "no best yet";
  return `#${st.current?.n ?? st.nextN} | ${clock} | ${best} | ${what}`;
}

/**
 * What the loop says once the baseline repeats are in: the noise floor, repeats slowed by load, and
 * a baseline that scores no better than a constant answer.
 */
export function baselineReport(st: State): string[] {
  if (!st.noise) return [];
  const floor = `noise floor: ${st.primary} mean ${num(st.noise.mean)}, σ ${num(st.noise.sigma)} over `
    + `${st.noise.runs.length} run(s); a keep needs more than +${num(st.noise.floor)} over the mean`;
  const load = loadWarning(st.runs.filter((r) => r.kind === "baseline"), "baseline");
  const trivial = st.trivial && st.baseline && trivialWarning({
    primary: st.primary, baseline: st.baseline.metrics[st.primary] ?? 0, trivial: st.trivial.value,
    floor: st.noise.floor, positive: positiveClass(st), prevalence: st.baseline.metrics.prevalence,
  });
  return [floor, load, trivial].filter((l): l is string => typeof l === "string" && l !== "");
}

/** What the loop says once a kept structure change's repeats are in: its noise floor, and repeats slowed by load. */
export function rebaselineReport(st: State): string[] {
  const rb = st.rebaseline;
  if (!rb || rb.done !== rb.wanted || !st.noise) return [];
  const floor = `noise floor of the new structure: ${st.primary} mean ${num(st.noise.mean)}, σ ${num(st.noise.sigma)} `
    + `over ${st.noise.runs.length} runs; a keep needs more than +${num(st.noise.floor)}`;
  const load = loadWarning(st.runs.filter((r) => r.commit === st.best?.short), "re-baseline");
  return load ? [floor, load] : [floor];
}

/**
 * `bun summarize_results.ts` in `root` after a row is logged: null when it ran, else a line for the
 * person: why it did not finish, or (`missing`) that this repository has none.
 */
export function summarize(root: string, bun: string): { line: string; missing: boolean } | null {
  if (!existsSync(join(root, SUMMARIZER))) {
    return { line: `note: no ${SUMMARIZER} in this repository: skipping the summary`, missing: true };
  }
  const r = Bun.spawnSync([bun, SUMMARIZER], {
    cwd: root, stdout: "pipe", stderr: "pipe", timeout: SUMMARIZE_TIMEOUT_S * 1000,
  });
  if (r.exitCode === 0) return null;
  const last = (r.stderr.toString() + r.stdout.toString()).trim().split("\n").at(-1) ?? "";
  const line = `warning: ${SUMMARIZER} failed (exit ${r.exitCode ?? "killed"}): ${oneLine(last, 160)}`;
  return { line, missing: false };
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
 * The journal after the current experiment's row is logged: counts and crash streak, the new best
 * on a keep, the move as tried, the baseline repeats (the noise floor, the baseline mean and the
 * trivial score once they are all in), a structure change's re-baseline, every run's score and
 * throughput, the test-split measures of kept and baseline runs, timing, and the next
 * experiment's number. Phase logged → decided.
 */
export function recordDecision(st: State): void {
  const cur = st.current!;
  const row = cur.row!;
  const isCrash = row.status === "crash";
  if (cur.kind === "experiment") {
    st.counts.experiments++;
    if (row.status === "keep") st.counts.keeps++;
    else if (row.status === "discard") st.counts.discards++;
  }
  if (isCrash) st.counts.crashes++;
  st.crashStreak = isCrash ? st.crashStreak + 1 : 0;
  for (const r of cur.runs) {
    st.runs.push({
      n: cur.n, kind: cur.kind, commit: row.commit, seed: r.seed, metrics: r.metrics,
      imagesPerSecond: r.imagesPerSecond,
    });
    if (r.test && (row.status === "keep" || row.status === "baseline")) {
      const kind = cur.kind === "baseline" ? "baseline" : "keep";
      st.testRuns.push({ n: cur.n, kind, commit: row.commit, metrics: r.test });
    }
  }
  if (row.status === "keep") {
    st.best = {
      n: cur.n, commit: cur.candidate!, short: row.commit, metrics: row.metrics,
      trainLines: cur.trainLines, description: cur.description,
    };
  }
  if (cur.move) {
    st.tried.push({ base: cur.base, axis: cur.move.axis, value: cur.move.to, status: row.status });
    if (row.status === "keep") st.lastKeptMove = { axis: cur.move.axis, direction: direction(cur.move) };
  }
  if (cur.kind === "experiment" && row.status === "keep" && cur.move && STRUCTURE_AXES.includes(cur.move.axis)
    && st.baselines.wanted > 1) {
    // Another model (a pretrained backbone instead of pixels, a ViT, another input size) has another noise.
    st.rebaseline = {
      commit: cur.candidate!, move: describeMove(cur.move), wanted: st.baselines.wanted - 1, done: 0,
      metrics: cur.runs.map((r) => r.metrics),
    };
  }
  if (cur.kind === "rebaseline" && st.rebaseline) recordRebaseline(st, st.rebaseline, isCrash ? null : row.metrics);
  if (cur.kind === "baseline" && !isCrash) {
    st.baseline ??= { commit: cur.candidate!, metrics: row.metrics };
    st.baselines.primaries.push(row.metrics[st.primary] ?? 0);
    st.baselines.metrics.push(row.metrics);
    if (st.baselines.primaries.length === st.baselines.wanted) {
      st.noise = computeNoise(st.primary, st.baselines.primaries, st.settings.noiseSigmas);
      // Candidates are single runs; the baseline's best estimate of itself is its mean.
      const mean = meanMetrics(st.baselines.metrics);
      st.baseline.metrics = mean;
      if (st.best && st.best.commit === st.sessionStart) st.best.metrics = mean;
      const trivial = trivialScore(mean, st.task, st.primary);
      st.trivial = trivial === null ? null : { metric: st.primary, value: trivial };
    }
  }
  st.timing.runs++;
  st.timing.trainSeconds += cur.outcome?.trainSeconds ?? 0;
  st.timing.wallSeconds += Math.max(0, (Date.now() - Date.parse(cur.startedAt)) / 1000);
  st.nextN = cur.n + 1;
  cur.phase = "decided";
}

/**
 * One re-baseline repeat in (null: it crashed, and the re-baseline ends with what it has). Once
 * all are in, the noise floor is the new structure's and the best is its mean over every run.
 */
function recordRebaseline(
  st: State, rb: NonNullable<State["rebaseline"]>, metrics: Record<string, number> | null,
): void {
  if (metrics === null) rb.wanted = rb.done;
  else {
    rb.metrics.push(metrics);
    rb.done++;
  }
  if (rb.done < rb.wanted || rb.metrics.length < 2) return;
  st.noise = computeNoise(st.primary, rb.metrics.map((m) => m[st.primary] ?? 0), st.settings.noiseSigmas);
  if (st.best && st.best.commit === rb.commit) st.best.metrics = meanMetrics(rb.metrics);
}

/** results.tsv at start-up: restored from the loop's copy if it is missing or has lost rows. */
export function loadResultsText(root: string, log: Log): string {
  const file = readText(join(root, RESULTS_FILE));
  const backup = readText(join(root, RESULTS_BACKUP));
  if (backup !== null && (file === null || countRows(file) < countRows(backup))) {
    writeAtomic(join(root, RESULTS_FILE), backup);
    log(`restored ${RESULTS_FILE} from ${RESULTS_BACKUP} (${countRows(backup)} rows)`);
    return backup;
  }
  return file ?? "";
}

/** Put results.tsv back to `expected` (the text the loop last wrote) if anything changed it. */
export function restoreResults(root: string, expected: string, log: Log): void {
  const now = readText(join(root, RESULTS_FILE));
  if (now === expected || (now === null && expected === "")) return;
  writeAtomic(join(root, RESULTS_FILE), expected);
  log(`restored ${RESULTS_FILE} from the loop's copy (${countRows(expected)} rows)`);
}

/** The session in one line: counts, best against the baseline, and the loop's own overhead per run. */
export function sessionReport(st: State): string {
  const t = st.timing;
  const overhead = t.runs > 0 ? (t.wallSeconds - t.trainSeconds) / t.runs : 0;
  const best = st.best ? (st.best.metrics[st.primary] ?? 0) : null;
  const base = st.baseline ? (st.baseline.metrics[st.primary] ?? 0) : null;
  const vs = best !== null && base !== null
    ? `; best ${st.primary} ${best.toFixed(6)} vs baseline ${base.toFixed(6)} (${signed(best - base)})`
    : "";
  // With workers (--queue) runs train side by side: more training than wall time, no overhead to speak of.
  const time = overhead >= 0 ? `loop overhead ${overhead.toFixed(1)}s per run (time not spent in train.ts)`
    : `${(t.trainSeconds / t.runs).toFixed(1)}s of training per run, side by side on workers`;
  return `session ${st.branch}: ${st.counts.experiments} experiments, ${st.counts.keeps} kept, `
    + `${st.counts.discards} discarded, ${st.counts.crashes} crashed${vs}; ${time}`;
}
