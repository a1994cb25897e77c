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
 * reverted and the experiment is logged as a crash.
 *
 * Exit codes: 0 stopped normally (run.md False, --max-experiments, Ctrl-C after logging, --once
 * done), 1 unexpected error, 2 refused (dirty tree, existing branch, lock held, bad run.md or flags,
 * nothing to measure), 3 paused (crash streak, the baseline crashed, the prepared data changed),
 * 130 aborted by a second Ctrl-C (the interrupted experiment is rolled back, no row).
 *
 * Test-only environment: AR_TEST_KILL_AT=<point> makes the loop SIGKILL itself right after that
 * point (proposing, proposed, committed, training, evaluating, logging, appended, logged, decided);
 * AR_TEST_ALLOWANCE_S replaces the fixed startup/evaluation allowance of the training deadline;
 * AR_TEST_SETUP_STALL_S the silence that ends a backbone download or feature extraction.
 */
import { closeSync, cpSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync, writeSync, appendFileSync } from "node:fs";
import { basename, join, resolve } from "node:path";
import { type } from "arktype";
import { cac } from "cac";
import { CACHE_ROOT, Manifest, TASK_METRICS, TIME_BUDGET, Task, parseFooter } from "./prepare.ts";
import { LATEST_CHECKPOINT_DIR, bestCheckpointDir } from "./lib/checkpoint.ts";
import { appendResult, formatRow, type ResultRow, type Status } from "./lib/results.ts";
import {
  AR_DIR, SESSIONS_DIR, STATE_FILE, acquireLock, pidAlive, readState, saveState, writeAtomic,
  type Move, type Noise, type State,
} from "./lib/journal.ts";
import { HpDump, applyMove, describeMove, direction, editableKeys, proposeMove } from "./lib/proposer.ts";

// ---------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------

/** The repository the loop runs in: the folder of this file (tests copy it into temp repos). */
const ROOT = import.meta.dir;
const BUN = process.execPath;
const TRAIN = "train.ts";
const RUN_MD = "run.md";
const RESULTS = "results.tsv";
const RUN_LOG = "run.log";
const PROGRAM = "program.md";
const SUMMARIZER = "summarize_results.ts";
const ANALYSIS = "analysis_summary.json";
/** The loop's own copy of results.tsv: restores it if someone deletes it. */
const RESULTS_BACKUP = join(AR_DIR, "results.backup.tsv");
/** Each experiment's full training output (<n>-<commit>.log), kept for crash reasons. */
const LOGS_DIR = join(AR_DIR, "logs");
const PROMPT_FILE = join(AR_DIR, "prompt.md");
/** Seconds on top of budget + grace for startup, the uncounted warm-up steps, train.ts's own eval and the save. */
const ALLOWANCE_S = Number(process.env.AR_TEST_ALLOWANCE_S ?? 60);
const EVAL_TIMEOUT_S = 600;
/**
 * A cold backbone (download, then features of every image) is prepared by train.ts before its
 * training timer starts: minutes for a few thousand photos on a CPU, an hour for CIFAR-size sets.
 * That time is added to the deadline (up to --setup-allowance) for as long as train.ts keeps
 * printing `features …`/`backbone …` progress; this much silence while preparing is a hang.
 */
const SETUP_STALL_S = Number(process.env.AR_TEST_SETUP_STALL_S ?? 300);
/** train.ts's lines while it prepares a backbone, and the line that starts training. */
const SETUP_BEGINS = /^(features|backbone) /;
const SETUP_ENDS = /^backend: /;
/**
 * A child that printed what the loop needs (train.ts its footer, evaluate its eval_json line) but
 * does not exit (a leftover thread or timer) is killed this long after, and its result stands.
 */
const LINGER_S = Number(process.env.AR_TEST_LINGER_S ?? 15);
const SUMMARIZE_TIMEOUT_S = 120;
/** Metric differences below this are float noise in the same counts, i.e. "equal". */
const EQUAL = 1e-9;
const EXIT = { ok: 0, error: 1, refused: 2, paused: 3, aborted: 130 } as const;

/** Ctrl-C / SIGTERM state: the first asks to stop after the current experiment, the second aborts it. */
const control = { stop: false, abort: false, /** process group of the running child */ child: null as number | null };

/** Ends the run with an exit code and a message; thrown from deep inside, caught in main. */
class Stop extends Error {
  constructor(readonly code: number, message: string) { super(message); }
}

// ---------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------

const Flags = type({
  "tag?": "/^[A-Za-z0-9._-]+$/",
  resume: "boolean",
  once: "boolean",
  "agent?": "string > 0",
  agentTimeout: "number > 0",
  "budget?": "number > 0",
  grace: "number >= 0",
  setupAllowance: "number >= 0",
  "baselineRuns?": "1 <= number.integer <= 100",
  "noiseSigmas?": "number >= 0",
  maxCrashStreak: "number.integer >= 1",
  "maxExperiments?": "number.integer >= 0",
  "seed?": "number.integer",
  summarize: "boolean",
});
type Flags = typeof Flags.infer;

const DEFAULTS = { baselineRuns: 2, noiseSigmas: 2, seed: 0 } as const;

function parseFlags(argv: string[]): Flags {
  const cli = cac("loop.ts");
  let raw: Record<string, unknown> | null = null;
  cli.command("", "run the research loop")
    .option("--tag <tag>", "session name: branch autoresearch/<tag> (default: today, e.g. nov23)")
    .option("--resume", "continue the session of --tag (or of the journal), recovering an interrupted experiment", { default: false })
    .option("--once", "measure the commit at HEAD as one experiment, then exit (no proposer)", { default: false })
    .option("--agent <command>", "shell command of a coding agent that edits train.ts (prompt on stdin and in $AR_PROMPT_FILE)")
    .option("--agent-timeout <seconds>", "kill the agent after this long", { default: 900 })
    .option("--budget <seconds>", `training budget passed to train.ts (default ${TIME_BUDGET}, prepare.TIME_BUDGET)`)
    .option("--grace <seconds>", `train.ts is killed at budget + grace + ${ALLOWANCE_S}s`, { default: 30 })
    .option("--setup-allowance <seconds>", "at most this much more for train.ts to download a backbone and extract features before training", { default: 3600 })
    .option("--baseline-runs <k>", `baseline repeats that measure the noise (default ${DEFAULTS.baselineRuns})`)
    .option("--noise-sigmas <x>", `a keep needs a gain above x·σ of the baseline (default ${DEFAULTS.noiseSigmas})`)
    .option("--max-crash-streak <n>", "pause after this many crashes in a row", { default: 3 })
    .option("--max-experiments <n>", "stop after this many experiments (default: never)")
    .option("--seed <n>", `seed of the built-in proposer (default ${DEFAULTS.seed})`)
    .option("--no-summarize", "do not run summarize_results.ts after each experiment")
    .action((options: Record<string, unknown>) => { raw = options; });
  cli.help();
  try {
    cli.parse(argv, { run: false });
    cli.runMatchedCommand();
  } catch (err) {
    throw new Stop(EXIT.refused, `loop.ts: ${err instanceof Error ? err.message : String(err)}`);
  }
  if (raw === null) throw new Stop(EXIT.ok, ""); // --help printed
  const r: Record<string, unknown> = raw;
  const toNum = (v: unknown) => (v === undefined ? undefined : Number(v));
  // cac leaves unset options undefined; arktype's optional keys mean "absent", so drop them.
  const given = Object.fromEntries(Object.entries({
    tag: r.tag === undefined ? undefined : String(r.tag), // cac turns `--tag 1123` into a number
    resume: r.resume === true, once: r.once === true,
    agent: r.agent === undefined ? undefined : String(r.agent),
    agentTimeout: toNum(r.agentTimeout), budget: toNum(r.budget), grace: toNum(r.grace), setupAllowance: toNum(r.setupAllowance),
    baselineRuns: toNum(r.baselineRuns), noiseSigmas: toNum(r.noiseSigmas), maxCrashStreak: toNum(r.maxCrashStreak),
    maxExperiments: toNum(r.maxExperiments), seed: toNum(r.seed), summarize: r.summarize !== false,
  }).filter(([, v]) => v !== undefined));
  const flags = Flags(given);
  if (flags instanceof type.errors) throw new Stop(EXIT.refused, `loop.ts: ${flags.summary}`);
  if (flags.once && flags.agent !== undefined) throw new Stop(EXIT.refused, "loop.ts: --once measures HEAD without a proposer; it cannot be combined with --agent");
  return flags;
}

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
  return `${Math.floor(s / 3600)}:${String(Math.floor(s / 60) % 60).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`;
}

/** The loop's own lines: `[loop] …` on the terminal and in run.log, between train.ts's output. */
function say(msg: string): void {
  const line = `[loop] ${msg}`;
  console.log(line);
  try { appendFileSync(RUN_LOG, `${line}\n`); } catch { /* run.log is a convenience */ }
}

/** Numbers for humans: enough digits to see a noise-sized difference. */
function num(v: number): string {
  return Number(v.toPrecision(3)).toString();
}
function signed(v: number): string {
  return `${v >= 0 ? "+" : ""}${num(v)}`;
}

function killGroup(pid: number): void {
  // The children run in their own process group (detached): this reaches their children too.
  try { process.kill(-pid, "SIGKILL"); } catch { /* already gone */ }
}

function lineCount(text: string): number {
  return text === "" ? 0 : text.split("\n").length - (text.endsWith("\n") ? 1 : 0);
}

/** Whole data rows in results.tsv text; a half line left by a killed writer does not count. */
export function countRows(text: string): number {
  const whole = text.endsWith("\n") ? text : text.slice(0, text.lastIndexOf("\n") + 1);
  return Math.max(0, whole.split("\n").filter((l) => l.trim() !== "").length - 1);
}

function lastWholeLine(text: string): string {
  const whole = text.endsWith("\n") ? text : text.slice(0, text.lastIndexOf("\n") + 1);
  return whole.split("\n").filter((l) => l.trim() !== "").at(-1) ?? "";
}

function readText(path: string): string | null {
  return existsSync(path) ? readFileSync(path, "utf8") : null;
}

/** A description is one line in a TSV cell. */
function oneLine(text: string, max = 200): string {
  const s = text.replace(/\s+/g, " ").trim();
  return s.length > max ? `${s.slice(0, max - 1)}…` : s;
}

export function dateTag(d = new Date()): string {
  return `${d.toLocaleString("en-US", { month: "short" }).toLowerCase()}${d.getDate()}`;
}

/** Test-only: AR_TEST_KILL_AT=<point> SIGKILLs the loop here, to test --resume from every phase. */
function killPoint(point: string): void {
  if (process.env.AR_TEST_KILL_AT === point) process.kill(process.pid, "SIGKILL");
}

// ---------------------------------------------------------------------------
// Git
// ---------------------------------------------------------------------------

let gitIdentity: string[] | null = null;

function git(args: string[], allowFail = false): string {
  const r = Bun.spawnSync(["git", ...args], { cwd: ROOT, stdout: "pipe", stderr: "pipe" });
  if (r.exitCode !== 0 && !allowFail) throw new Error(`git ${args.join(" ")}: ${r.stderr.toString().trim() || `exit ${r.exitCode}`}`);
  return r.stdout.toString().trimEnd();
}

function gitOk(args: string[]): boolean {
  return Bun.spawnSync(["git", ...args], { cwd: ROOT, stdout: "ignore", stderr: "ignore" }).exitCode === 0;
}

const rev = (ref: string) => git(["rev-parse", "--verify", "-q", `${ref}^{commit}`]);
const shortOf = (commit: string) => git(["rev-parse", "--short=7", commit]);
const currentBranch = () => git(["symbolic-ref", "--short", "-q", "HEAD"], true);
const branchExists = (b: string) => gitOk(["rev-parse", "--verify", "-q", `refs/heads/${b}`]);

function commit(message: string, paths: string[]): void {
  // Commits are the loop's, not the person's: hooks would slow every experiment (or fail it).
  gitIdentity ??= git(["config", "user.email"], true) === "" ? ["-c", "user.name=autoresearch", "-c", "user.email=autoresearch@localhost"] : [];
  git([...gitIdentity, "commit", "-q", "--no-verify", "-m", message, "--", ...paths]);
}

/** Changes in the working tree, untracked files included, ignored files not; run.md is the person's switch. */
function dirtyPaths(): string[] {
  return git(["status", "--porcelain", "--untracked-files=all"]).split("\n").filter(Boolean).map((l) => l.slice(3)).filter((p) => p !== RUN_MD);
}

/** New files git would show (not ignored); run.md too may be untracked and is never removed. */
function untrackedFiles(): string[] {
  return git(["ls-files", "--others", "--exclude-standard"]).split("\n").filter((p) => p !== "" && p !== RUN_MD);
}

/**
 * `git reset --hard`, except that run.md keeps what it says now: a person who wrote False while
 * an experiment ran must not see the discard switch it back to True.
 */
function resetTo(commitish: string): void {
  const runMd = existsSync(RUN_MD) ? readFileSync(RUN_MD) : null;
  git(["reset", "-q", "--hard", commitish]);
  const after = existsSync(RUN_MD) ? readFileSync(RUN_MD) : null;
  if (runMd === null && after !== null) rmSync(RUN_MD);
  else if (runMd !== null && (after === null || !after.equals(runMd))) writeFileSync(RUN_MD, runMd);
}

// ---------------------------------------------------------------------------
// run.md: the person's on/off switch
// ---------------------------------------------------------------------------

const RunMdFirstLine = type("'True' | 'False'");

/** The first non-empty line must be exactly True or False; anything else stops the loop (fail closed). */
export function parseRunMd(text: string | null): "True" | "False" | { error: string } {
  if (text === null) return { error: `${RUN_MD} is missing: create it with the first line True to let the loop run (fail closed)` };
  const first = text.split(/\r?\n/).map((l) => l.trim()).find((l) => l !== "") ?? "";
  const v = RunMdFirstLine(first);
  if (v instanceof type.errors) return { error: `${RUN_MD}: the first non-empty line must be exactly True or False, not "${oneLine(first, 40)}" (fail closed)` };
  return v;
}

/** True: go on. False: say so and return false. Missing or garbage: refuse. */
function runMdSaysGo(): boolean {
  const v = parseRunMd(readText(RUN_MD));
  if (typeof v === "object") throw new Stop(EXIT.refused, v.error);
  if (v === "False") say(`${RUN_MD} says False: stopping. Set its first line to True and run \`bun loop.ts --resume\` to continue.`);
  return v === "True";
}

// ---------------------------------------------------------------------------
// Integrity: everything except train.ts is byte-identical to the session start
// ---------------------------------------------------------------------------

const ActivePointer = type({ dir: "string" });

async function sha256File(path: string): Promise<string> {
  const hasher = new Bun.CryptoHasher("sha256");
  const reader = Bun.file(path).stream().getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    hasher.update(value);
  }
  return hasher.digest("hex");
}

async function protectedHashes(): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const p of git(["ls-files", "-z"]).split("\0").filter(Boolean).sort()) {
    if (p === TRAIN || p === RUN_MD) continue;
    out[p] = existsSync(p) ? await sha256File(p) : "missing";
  }
  return out;
}

/**
 * The active prepared dataset: images.u8 bytes and the manifest without createdAt (re-running
 * prepare.ts on the same source rebuilds the same content with a new timestamp).
 */
async function cacheFingerprint(): Promise<State["cache"] & { task: Task | null }> {
  const missing = { dir: "missing", images: "missing", manifest: "missing", task: null };
  const json = (path: string): unknown => {
    try { return JSON.parse(readFileSync(path, "utf8")); } catch { return null; }
  };
  const pointer = join(CACHE_ROOT, "active.json");
  const p = ActivePointer(json(pointer));
  if (p instanceof type.errors) return missing;
  const imagesPath = join(p.dir, "images.u8");
  const m = Manifest(json(join(p.dir, "manifest.json")));
  if (m instanceof type.errors || !existsSync(imagesPath)) return { ...missing, dir: p.dir };
  const { createdAt: _createdAt, ...content } = m;
  const manifest = new Bun.CryptoHasher("sha256").update(JSON.stringify(content)).digest("hex");
  return { dir: p.dir, images: await sha256File(imagesPath), manifest, task: m.task };
}

interface Integrity { problems: string[]; untracked: string[]; cacheChanged: boolean }

/**
 * What changed besides train.ts since `base` (and since the session start, by hash): tracked
 * files, new files, results.tsv (against the loop's copy) and the prepared data.
 */
async function checkIntegrity(ctx: Ctx, base: string, allowTrain: boolean): Promise<Integrity> {
  const problems = new Map<string, string>();
  for (const p of git(["diff", "--name-only", "--no-renames", base]).split("\n").filter(Boolean)) {
    if (p !== RUN_MD && !(allowTrain && p === TRAIN)) problems.set(p, `${p} changed`);
  }
  const untracked = untrackedFiles();
  for (const p of untracked) problems.set(p, `${p} added`);
  for (const [p, h] of Object.entries(ctx.st.protected)) {
    const now = existsSync(p) ? await sha256File(p) : "missing";
    if (now !== h) problems.set(p, `${p} ${now === "missing" ? "deleted" : "changed"}`);
  }
  const results = readText(RESULTS);
  if (results === null && ctx.resultsText !== "") problems.set(RESULTS, `${RESULTS} deleted`);
  else if (results !== null && results !== ctx.resultsText) problems.set(RESULTS, `${RESULTS} changed`);
  const cache = await cacheFingerprint();
  const cacheChanged = cache.dir !== ctx.st.cache.dir || cache.images !== ctx.st.cache.images || cache.manifest !== ctx.st.cache.manifest;
  if (cacheChanged) problems.set("cache", `prepared data changed (${ctx.st.cache.dir})`);
  return { problems: [...problems.values()], untracked, cacheChanged };
}

/** Put everything but the data back: tracked files to `base`, new files removed, results.tsv rewritten. */
function repair(ctx: Ctx, base: string, integ: Integrity): void {
  resetTo(base);
  if (integ.untracked.length > 0) git(["clean", "-fdq", "--", ...integ.untracked]);
  restoreResults(ctx);
  if (integ.cacheChanged) {
    ctx.fatal = `the prepared data in ${ctx.st.cache.dir} changed during the session, and the loop cannot restore it: re-run \`bun prepare.ts\` with the session's source, then \`bun loop.ts --resume\` (or start a new session)`;
  }
}

function restoreResults(ctx: Ctx): void {
  const now = readText(RESULTS);
  if (now === ctx.resultsText || (now === null && ctx.resultsText === "")) return;
  writeAtomic(RESULTS, ctx.resultsText);
  say(`restored ${RESULTS} from the loop's copy (${countRows(ctx.resultsText)} rows)`);
}

/** results.tsv at start-up: restored from the backup if it is missing or has lost rows. */
function loadResultsText(): string {
  const file = readText(RESULTS);
  const backup = readText(RESULTS_BACKUP);
  if (backup !== null && (file === null || countRows(file) < countRows(backup))) {
    writeAtomic(RESULTS, backup);
    say(`restored ${RESULTS} from ${RESULTS_BACKUP} (${countRows(backup)} rows)`);
    return backup;
  }
  return file ?? "";
}

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

interface Ran {
  code: number; timedOut: boolean;
  /** It printed its result (`finished`) but did not exit within LINGER_S, and was killed. */
  lingered: boolean;
  stdout: string; all: string; seconds: number; maxRss: number | null;
  /** Seconds added to the deadline while it prepared a backbone (`setup`), and whether that stalled. */
  setupSeconds: number; stalled: boolean;
}

/**
 * Run a command in its own process group. With `echo`, every chunk of its output reaches the
 * terminal as it is printed (a reader on the pipe, not after the end) and the given log files.
 * At `timeoutS` the whole group is SIGKILLed: a hang ends as a timeout, never as a stuck loop.
 * Once `finished(stdout so far)` holds, it has LINGER_S to exit before it is killed.
 * With `setup`, the time from a stdout line matching `begins` to one matching `ends` is added to
 * the deadline (at most `maxS`), provided `begins` lines keep coming at least every `stallS`.
 */
async function runChild(argv: string[], opts: {
  timeoutS: number; echo: boolean; logs?: number[]; stdin?: Blob; env?: Record<string, string>;
  onSpawn?: (pid: number) => void; finished?: (stdout: string) => boolean;
  setup?: { begins: RegExp; ends: RegExp; stallS: number; maxS: number };
}): Promise<Ran> {
  const t0 = performance.now();
  const proc = Bun.spawn(argv, {
    cwd: ROOT, stdin: opts.stdin ?? "ignore", stdout: "pipe", stderr: "pipe", detached: true,
    env: { ...process.env, ...opts.env },
  });
  control.child = proc.pid;
  opts.onSpawn?.(proc.pid);
  let timedOut = false;
  let lingered = false;
  let lingerTimer: ReturnType<typeof setTimeout> | null = null;
  // The deadline: timeoutS after the start, plus the time spent in setup (capped).
  let setupMs = 0;
  let setupSince: number | null = null;
  let lastSetupLine = 0;
  let stalled = false;
  const setupSoFar = (now: number) => Math.min(setupMs + (setupSince === null ? 0 : now - setupSince), (opts.setup?.maxS ?? 0) * 1000);
  const timer = setInterval(() => {
    const now = performance.now();
    if (opts.setup && setupSince !== null && now - lastSetupLine > opts.setup.stallS * 1000) stalled = true;
    if (stalled || now - t0 > opts.timeoutS * 1000 + setupSoFar(now)) {
      timedOut = true;
      clearInterval(timer);
      killGroup(proc.pid);
    }
  }, 100);
  let scanned = 0;
  const scanSetup = (text: string) => {
    if (!opts.setup) return;
    const end = text.lastIndexOf("\n") + 1;
    for (const line of text.slice(scanned, end).split("\n")) {
      const now = performance.now();
      if (opts.setup.ends.test(line) && setupSince !== null) {
        setupMs += now - setupSince;
        setupSince = null;
      } else if (opts.setup.begins.test(line)) {
        setupSince ??= now;
        lastSetupLine = now;
      }
    }
    scanned = Math.max(scanned, end);
  };
  let out = "";
  const all: string[] = [];
  const pump = async (stream: ReadableStream<Uint8Array>, sink: NodeJS.WriteStream, keep: boolean) => {
    const reader = stream.getReader();
    const dec = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done || !value) break;
      if (opts.echo) sink.write(value);
      for (const fd of opts.logs ?? []) writeSync(fd, value);
      const s = dec.decode(value, { stream: true });
      all.push(s);
      if (!keep) continue;
      out += s;
      scanSetup(out);
      if (lingerTimer === null && opts.finished?.(out)) {
        lingerTimer = setTimeout(() => { lingered = true; killGroup(proc.pid); }, LINGER_S * 1000);
      }
    }
  };
  const pumps = Promise.all([pump(proc.stdout, process.stdout, true), pump(proc.stderr, process.stderr, false)]);
  const code = await proc.exited;
  clearInterval(timer);
  if (lingerTimer !== null) clearTimeout(lingerTimer);
  killGroup(proc.pid); // grandchildren that outlive the command would hold the pipes open
  await Promise.race([pumps, Bun.sleep(2000)]);
  control.child = null;
  if (lingered) say(`${argv.slice(1, 3).join(" ")} printed its result but did not exit within ${LINGER_S}s: killed it, the result stands`);
  return { code, timedOut: timedOut && !lingered, lingered, stdout: out, all: all.join(""), seconds: (performance.now() - t0) / 1000, maxRss: proc.resourceUsage()?.maxRSS ?? null,
    setupSeconds: setupSoFar(performance.now()) / 1000, stalled };
}

// ---------------------------------------------------------------------------
// Proposers: who edits train.ts
// ---------------------------------------------------------------------------

interface Proposal { description: string; move: Move | null; failure: string | null }

/** HP and HP_SPACE as train.ts itself reports them (a child process: train.ts is the authority). */
function readHp(): HpDump {
  const r = Bun.spawnSync([BUN, TRAIN, "--print-hp"], { cwd: ROOT, stdout: "pipe", stderr: "pipe", timeout: 120_000 });
  const last = r.stdout.toString().trim().split("\n").at(-1) ?? "";
  let raw: unknown = null;
  try { raw = JSON.parse(last); } catch { /* reported below */ }
  const dump = HpDump(raw);
  if (r.exitCode !== 0 || dump instanceof type.errors) {
    const why = r.exitCode !== 0 ? oneLine(r.stderr.toString().trim().split("\n").at(-1) ?? `exit ${r.exitCode}`) : dump instanceof type.errors ? oneLine(dump.summary) : "";
    throw new Stop(EXIT.paused, `\`bun train.ts --print-hp\` failed (${why}): the built-in proposer needs train.ts to print {HP, HP_SPACE} as JSON`);
  }
  return dump;
}

/** Built-in: one single-axis move of the current best, written into the HP block. */
function proposeBuiltin(ctx: Ctx): Proposal | null {
  const st = ctx.st;
  const dump = readHp();
  const src = readFileSync(TRAIN, "utf8");
  const move = proposeMove({
    hp: dump.HP, space: dump.HP_SPACE, editable: editableKeys(src, dump.HP), base: st.current!.base,
    tried: st.tried, seed: st.settings.seed, lastKept: st.lastKeptMove,
  });
  if (!move) return null;
  writeFileSync(TRAIN, applyMove(src, move));
  return { description: describeMove(move), move, failure: null };
}

function buildPrompt(ctx: Ctx): string {
  const st = ctx.st;
  const m = TASK_METRICS[st.task];
  const dir = (k: string) => (m.lowerIsBetter.includes(k) ? "lower is better" : "higher is better");
  const results = ctx.resultsText.trim().split("\n");
  const recent = results.length > 21 ? [results[0], "…", ...results.slice(-20)] : results;
  const analysis = readText(ANALYSIS);
  return [
    readText(PROGRAM) ?? "(program.md is missing)",
    "",
    "---",
    "# This call (from `bun loop.ts --agent`)",
    "",
    "You are called once per experiment. Make ONE focused change to train.ts — the only file you may edit — and exit.",
    "Do NOT run train.ts or loop.ts and do not touch any other file: the loop commits your change, trains, re-measures the",
    "checkpoint, and keeps or reverts it. Changes to other files are reverted and the experiment counts as a crash.",
    "End your output with one line describing the change (e.g. `lr 0.003 -> 0.005` or `add mixup`): it goes into results.tsv.",
    "",
    `Experiment #${st.current?.n ?? st.nextN} on branch ${st.branch}. Task ${st.task}: primary ${st.primary} (${dir(st.primary)}), secondary ${st.secondary} (${dir(st.secondary)}).`,
    st.best ? `Best so far: ${st.primary} ${st.best.metrics[st.primary]} at ${st.best.short} (${st.best.description}).` : "",
    st.noise ? `Noise floor: a keep needs ${st.primary} to improve by more than ${num(st.noise.floor)} (${st.noise.sigmas}σ, σ = ${num(st.noise.sigma)}).` : "",
    `Training budget: ${st.settings.budgetSeconds} s per run.`,
    "",
    `## Last results (${RESULTS})`,
    "",
    ...recent.map((l) => l ?? ""),
    "",
    `## ${ANALYSIS}`,
    "",
    analysis ?? "(none yet)",
    "",
  ].join("\n");
}

/** --agent: any CLI that edits train.ts, run with the prompt on stdin and in $AR_PROMPT_FILE. */
async function proposeWithAgent(ctx: Ctx, command: string): Promise<Proposal> {
  const base = ctx.st.current!.base;
  const prompt = buildPrompt(ctx);
  writeAtomic(PROMPT_FILE, prompt);
  say(`agent: ${command} (timeout ${ctx.flags.agentTimeout}s)`);
  const runLog = openSync(RUN_LOG, "a");
  let r: Ran;
  try {
    r = await runChild(["sh", "-c", command], {
      timeoutS: ctx.flags.agentTimeout, echo: true, logs: [runLog], stdin: new Blob([prompt]), env: { AR_PROMPT_FILE: resolve(PROMPT_FILE) },
    });
  } finally {
    closeSync(runLog);
  }
  if (control.abort) throw new Stop(EXIT.aborted, "aborted while the agent ran");
  const lastLine = oneLine(r.stdout.split("\n").map((l) => l.trim()).filter(Boolean).at(-1) ?? "");
  // An agent that committed by itself described its change in the commit message.
  const committed = rev("HEAD") !== base && git(["status", "--porcelain", "--", TRAIN]) === "";
  const description = committed ? oneLine(git(["log", "-1", "--format=%s"])) : lastLine || "agent change";
  const failure = r.timedOut ? `agent timed out after ${ctx.flags.agentTimeout}s` : r.code !== 0 ? `agent exited with code ${r.code}` : null;
  return { description, move: null, failure };
}

/**
 * Phase proposing → committed: get a change, check that nothing but train.ts changed, commit.
 * A refused proposal becomes a crash row straight away (phase logging), with the tree repaired.
 */
async function proposeAndCommit(ctx: Ctx): Promise<void> {
  const st = ctx.st;
  const cur = st.current!;
  let p: Proposal = { description: cur.description, move: null, failure: null };
  if (cur.kind === "experiment") {
    if (ctx.mode === "builtin") {
      const got = proposeBuiltin(ctx);
      if (!got) {
        st.current = null;
        save(ctx);
        throw new Stop(EXIT.ok, "the built-in search has measured every value of HP_SPACE reachable from the current best: nothing left to try (widen HP_SPACE in train.ts, or use --agent)");
      }
      p = got;
    } else if (ctx.mode === "agent") {
      p = await proposeWithAgent(ctx, ctx.flags.agent ?? "");
    } else {
      p = { description: oneLine(git(["log", "-1", "--format=%s"])), move: null, failure: null };
    }
  }
  killPoint("proposed");
  const head = rev("HEAD");
  const integ = await checkIntegrity(ctx, cur.base, true);
  let failure = p.failure;
  if (integ.problems.length > 0) failure = `reverted: ${integ.problems.join(", ")}`;
  else if (cur.kind === "experiment" && gitOk(["diff", "--quiet", cur.base, "--", TRAIN])) failure = "no change to train.ts";
  if (failure !== null) {
    // Nothing of this proposal is measured: back to the last kept commit, one crash row.
    const commitCol = head !== cur.base ? shortOf(head) : "-";
    repair(ctx, cur.base, integ);
    say(`#${cur.n} ${p.description}: ${failure}`);
    cur.description = p.description;
    cur.row = crashRow(ctx, commitCol, `${p.description} (${failure})`);
    cur.phase = "logging";
    save(ctx);
    killPoint("logging");
    return;
  }
  if (cur.kind === "experiment" && git(["status", "--porcelain", "--", TRAIN]) !== "") commit(p.description, [TRAIN]);
  cur.candidate = rev("HEAD");
  cur.description = p.description;
  cur.move = p.move;
  cur.trainLines = lineCount(readFileSync(TRAIN, "utf8"));
  cur.phase = "committed";
  save(ctx);
  killPoint("committed");
}

// ---------------------------------------------------------------------------
// Training: bun train.ts in a child, live, with a deadline
// ---------------------------------------------------------------------------

/** train.ts has printed its whole footer: the task's metrics and the line that ends it. */
function footerComplete(stdout: string, columns: readonly string[]): boolean {
  if (!stdout.includes("---\n")) return false;
  const footer = parseFooter(stdout);
  return columns.every((c) => footer[c] !== undefined) && footer.confusion !== undefined && stdout.endsWith("\n");
}

/** Why a training run is a crash, or ok. Pure: the tests feed it made-up output. */
export function classifyTrain(a: {
  code: number; timedOut: boolean; deadlineS: number; stdout: string; all: string; columns: readonly string[]; checkpointOk: boolean;
  setupSeconds?: number; stalledS?: number | null;
}): { ok: boolean; reason: string } {
  if (a.timedOut && a.stalledS != null) return { ok: false, reason: `timeout: no progress for ${a.stalledS}s while preparing the backbone or its features` };
  if (a.timedOut && (a.setupSeconds ?? 0) >= 1) {
    return { ok: false, reason: `timeout: killed after ${Math.round(a.deadlineS + a.setupSeconds!)}s (${a.deadlineS}s + ${Math.round(a.setupSeconds!)}s preparing the backbone)` };
  }
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
  if (missing.length > 0) return { ok: false, reason: `no footer: train.ts printed no \`---\` summary with ${missing.join(", ")}` };
  if (!a.checkpointOk) return { ok: false, reason: "no checkpoint: train.ts saved no model" };
  return { ok: true, reason: "" };
}

/** Phase committed → training → evaluating (or a crash row, phase logging). */
async function trainPhase(ctx: Ctx): Promise<void> {
  const st = ctx.st;
  const cur = st.current!;
  const budget = st.settings.budgetSeconds;
  const deadlineS = budget + ctx.flags.grace + ALLOWANCE_S;
  rmSync(LATEST_CHECKPOINT_DIR, { recursive: true, force: true }); // a stale model must not pass for this run's
  mkdirSync(LOGS_DIR, { recursive: true });
  status(ctx, `training ${cur.candidate ? shortOf(cur.candidate) : ""}: ${cur.description} (budget ${budget}s, killed at ${deadlineS}s, plus any backbone preparation)`);
  const expLog = openSync(join(LOGS_DIR, `${cur.n}-${shortOf(cur.candidate!)}.log`), "w"); // summarize finds crash logs by commit
  const runLog = openSync(RUN_LOG, "a");
  let r: Ran;
  try {
    r = await runChild([BUN, TRAIN, "--budget", String(budget), "--checkpoint", LATEST_CHECKPOINT_DIR], {
      timeoutS: deadlineS, echo: true, logs: [expLog, runLog],
      setup: { begins: SETUP_BEGINS, ends: SETUP_ENDS, stallS: SETUP_STALL_S, maxS: ctx.flags.setupAllowance },
      finished: (out) => footerComplete(out, TASK_METRICS[st.task].columns),
      onSpawn: (pid) => {
        cur.trainPid = pid;
        cur.phase = "training";
        save(ctx);
        killPoint("training");
      },
    });
  } finally {
    closeSync(expLog);
    closeSync(runLog);
  }
  if (control.abort) throw new Stop(EXIT.aborted, "aborted during training");
  let verdict = classifyTrain({
    code: r.lingered ? 0 : r.code, timedOut: r.timedOut, deadlineS, stdout: r.stdout, all: r.all,
    setupSeconds: r.setupSeconds, stalledS: r.stalled ? SETUP_STALL_S : null,
    columns: TASK_METRICS[st.task].columns, checkpointOk: existsSync(join(LATEST_CHECKPOINT_DIR, "meta.json")),
  });
  // train.ts runs with the repository's permissions: it must not have changed anything either.
  const integ = await checkIntegrity(ctx, cur.candidate!, false);
  if (integ.problems.length > 0) {
    repair(ctx, cur.candidate!, integ);
    verdict = { ok: false, reason: `reverted after training: ${integ.problems.join(", ")}` };
  }
  cur.trainPid = null;
  cur.outcome = { ok: verdict.ok, reason: verdict.reason, memoryGb: r.maxRss !== null ? r.maxRss / 1024 ** 3 : 0, trainSeconds: r.seconds };
  if (verdict.ok) {
    cur.phase = "evaluating";
  } else {
    cur.row = crashRow(ctx, shortOf(cur.candidate!), `${cur.description} (crash: ${verdict.reason})`);
    cur.phase = "logging";
  }
  save(ctx);
  killPoint(cur.phase);
}

// ---------------------------------------------------------------------------
// Measuring: prepare.ts's evaluate() in a separate process
// ---------------------------------------------------------------------------

const EvalJson = type({ task: Task, n: "number.integer >= 0", metrics: "Record<string, number>", primary: "string" });

async function measure(ctx: Ctx): Promise<{ metrics: Record<string, number> } | { error: string }> {
  const r = await runChild([BUN, "prepare.ts", "evaluate", "--model", LATEST_CHECKPOINT_DIR], {
    timeoutS: EVAL_TIMEOUT_S, echo: false, finished: (out) => /^eval_json: .*\n/m.test(out),
  });
  if (r.timedOut) return { error: `timeout after ${EVAL_TIMEOUT_S}s` };
  const lines = r.all.split("\n").map((l) => l.trim()).filter(Boolean);
  if (r.code !== 0 && !r.lingered) return { error: oneLine(lines.filter((l) => l.startsWith("error")).at(-1) ?? lines.at(-1) ?? `exit ${r.code}`, 160) };
  const line = r.stdout.split("\n").reverse().find((l) => l.startsWith("eval_json: "));
  if (!line) return { error: "no eval_json line" };
  let raw: unknown;
  try { raw = JSON.parse(line.slice("eval_json: ".length)); } catch { return { error: "eval_json is not JSON" }; }
  const ev = EvalJson(raw);
  // NaN becomes null in JSON, so a NaN metric fails the schema here.
  if (ev instanceof type.errors) return { error: `eval_json: ${oneLine(ev.summary, 120)}` };
  if (ev.task !== ctx.st.task) return { error: `evaluated task ${ev.task}, the session's is ${ctx.st.task}` };
  const missing = TASK_METRICS[ctx.st.task].columns.filter((c) => !Number.isFinite(ev.metrics[c]));
  if (missing.length > 0) return { error: `eval_json lacks ${missing.join(", ")}` };
  return { metrics: ev.metrics };
}

// ---------------------------------------------------------------------------
// Keep or discard
// ---------------------------------------------------------------------------

export interface KeepArgs {
  candidate: Record<string, number>;
  best: Record<string, number>;
  primary: string;
  secondary: string;
  lowerIsBetter: readonly string[];
  /** A primary gain must be strictly above this (noise-sigmas · σ of the baseline). */
  noiseFloor: number;
  candidateLines: number;
  bestLines: number;
}

/**
 * The keep rule: the primary metric strictly better by more than the noise floor; on an equal
 * primary, a better secondary; on both equal, a shorter train.ts (simplicity). Otherwise discard.
 * `note` explains the non-obvious outcomes in the results.tsv description.
 */
export function keepOrDiscard(a: KeepArgs): { status: "keep" | "discard"; note: string } {
  const gain = (k: string) => (a.lowerIsBetter.includes(k) ? -1 : 1) * ((a.candidate[k] ?? 0) - (a.best[k] ?? 0));
  const g1 = gain(a.primary);
  if (g1 > EQUAL) {
    if (g1 > a.noiseFloor) return { status: "keep", note: "" };
    return { status: "discard", note: `(${signed(g1)} < noise ${num(a.noiseFloor)})` };
  }
  if (g1 < -EQUAL) return { status: "discard", note: "" };
  const g2 = gain(a.secondary);
  if (g2 > EQUAL) return { status: "keep", note: `(same ${a.primary}, ${a.secondary} ${signed(g2)})` };
  if (g2 < -EQUAL) return { status: "discard", note: "" };
  if (a.candidateLines < a.bestLines) return { status: "keep", note: `(same metrics, train.ts ${a.bestLines} -> ${a.candidateLines} lines)` };
  return { status: "discard", note: "(same metrics, not simpler)" };
}

/** Mean and sample σ of the baseline repeats; the floor is sigmas · σ. */
export function computeNoise(metric: string, runs: number[], sigmas: number): Noise {
  const mean = runs.reduce((s, v) => s + v, 0) / runs.length;
  const sigma = runs.length > 1 ? Math.sqrt(runs.reduce((s, v) => s + (v - mean) ** 2, 0) / (runs.length - 1)) : 0;
  return { metric, runs: [...runs], mean, sigma, sigmas, floor: sigmas * sigma };
}

export function meanMetrics(runs: Record<string, number>[]): Record<string, number> {
  const keys = [...new Set(runs.flatMap((r) => Object.keys(r)))];
  return Object.fromEntries(keys.map((k) => [k, runs.reduce((s, r) => s + (r[k] ?? 0), 0) / runs.length]));
}

function crashRow(ctx: Ctx, commitCol: string, description: string): ResultRow {
  const metrics = Object.fromEntries(TASK_METRICS[ctx.st.task].columns.map((c) => [c, 0]));
  return { commit: commitCol, metrics, memory_gb: 0, status: "crash", description: oneLine(description) };
}

/** Phase evaluating → logging: measure the checkpoint and decide the row. */
async function measureAndDecide(ctx: Ctx): Promise<void> {
  const st = ctx.st;
  const cur = st.current!;
  const short = shortOf(cur.candidate!);
  const m = await measure(ctx);
  // The journal stays at "evaluating": --resume measures the checkpoint again.
  if (control.abort) throw new Stop(EXIT.aborted, "aborted during evaluation; `bun loop.ts --resume` measures it again");
  if ("error" in m) {
    cur.row = crashRow(ctx, short, `${cur.description} (crash: evaluate: ${m.error})`);
  } else {
    const metrics = Object.fromEntries(TASK_METRICS[st.task].columns.map((c) => [c, m.metrics[c] ?? 0]));
    let status: Status;
    let description = cur.description;
    if (cur.kind === "baseline") {
      status = st.best === null ? "keep" : "baseline";
      const runs = [...st.baselines.primaries, metrics[st.primary] ?? 0];
      if (runs.length === st.baselines.wanted && runs.length > 1) {
        const noise = computeNoise(st.primary, runs, st.settings.noiseSigmas);
        description += ` (noise: mean ${num(noise.mean)}, σ ${num(noise.sigma)}, floor ${num(noise.floor)})`;
      }
    } else {
      const d = keepOrDiscard({
        candidate: metrics, best: st.best!.metrics, primary: st.primary, secondary: st.secondary,
        lowerIsBetter: TASK_METRICS[st.task].lowerIsBetter, noiseFloor: st.noise?.floor ?? 0,
        candidateLines: cur.trainLines, bestLines: st.best!.trainLines,
      });
      status = d.status;
      if (d.note) description += ` ${d.note}`;
    }
    cur.row = { commit: short, metrics, memory_gb: Number((cur.outcome?.memoryGb ?? 0).toFixed(3)), status, description: oneLine(description) };
  }
  cur.phase = "logging";
  save(ctx);
  killPoint("logging");
}

// ---------------------------------------------------------------------------
// Logging the row and applying the decision (both idempotent: --resume may repeat them)
// ---------------------------------------------------------------------------

function copyCheckpoint(from: string, to: string): void {
  if (!existsSync(join(from, "meta.json"))) { say(`warning: no checkpoint in ${from} to keep as the best model`); return; }
  const tmp = `${to}.tmp-${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  cpSync(from, tmp, { recursive: true });
  rmSync(to, { recursive: true, force: true });
  renameSync(tmp, to);
}

/** Phase logging → logged → decided. */
async function logAndApply(ctx: Ctx): Promise<void> {
  const st = ctx.st;
  const cur = st.current!;
  const row = cur.row!;
  if (cur.phase === "logging") {
    // Exactly one row per experiment: the journal says how many rows there were before it.
    const text = readText(RESULTS) ?? "";
    const already = countRows(text) === cur.rowsBefore + 1 && lastWholeLine(text) === formatRow(st.task, row);
    if (!already) {
      if (countRows(text) !== cur.rowsBefore) say(`warning: ${RESULTS} has ${countRows(text)} rows, the journal expected ${cur.rowsBefore}; appending #${cur.n} anyway`);
      await appendResult(RESULTS, st.task, row);
    }
    killPoint("appended");
    ctx.resultsText = readFileSync(RESULTS, "utf8");
    writeAtomic(RESULTS_BACKUP, ctx.resultsText);
    cur.phase = "logged";
    save(ctx);
    killPoint("logged");
  }
  if (cur.phase === "logged") {
    if (row.status === "keep") {
      resetTo(cur.candidate!); // HEAD is there already; a resumed apply may find a half-reset tree
      copyCheckpoint(LATEST_CHECKPOINT_DIR, bestCheckpointDir(st.branch));
    } else {
      resetTo(cur.base);
    }
    const isCrash = row.status === "crash";
    if (cur.kind === "experiment") {
      st.counts.experiments++;
      if (row.status === "keep") st.counts.keeps++;
      else if (row.status === "discard") st.counts.discards++;
    }
    if (isCrash) st.counts.crashes++;
    st.crashStreak = isCrash ? st.crashStreak + 1 : 0;
    if (row.status === "keep") {
      st.best = { n: cur.n, commit: cur.candidate!, short: row.commit, metrics: row.metrics, trainLines: cur.trainLines, description: cur.description };
    }
    if (cur.move) {
      st.tried.push({ base: cur.base, axis: cur.move.axis, value: cur.move.to, status: row.status });
      if (row.status === "keep") st.lastKeptMove = { axis: cur.move.axis, direction: direction(cur.move) };
    }
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
      }
    }
    st.timing.runs++;
    st.timing.trainSeconds += cur.outcome?.trainSeconds ?? 0;
    st.timing.wallSeconds += Math.max(0, (Date.now() - Date.parse(cur.startedAt)) / 1000);
    st.nextN = cur.n + 1;
    cur.phase = "decided";
    save(ctx);
    killPoint("decided");
    const p = row.metrics[st.primary] ?? 0;
    const vs = st.best && row.status !== "keep" && !isCrash ? ` (best ${num(st.best.metrics[st.primary] ?? 0)})` : "";
    say(`#${cur.n} ${row.status.toUpperCase()} ${st.primary} ${isCrash ? "-" : p.toFixed(6)}${vs} | ${row.description} | ${elapsed()}`);
    summarize(ctx);
  }
}

function summarize(ctx: Ctx): void {
  if (!ctx.flags.summarize) return;
  if (!existsSync(SUMMARIZER)) {
    if (!ctx.warnedNoSummarizer) say(`note: no ${SUMMARIZER} in this repository: skipping the summary`);
    ctx.warnedNoSummarizer = true;
    return;
  }
  const r = Bun.spawnSync([BUN, SUMMARIZER], { cwd: ROOT, stdout: "pipe", stderr: "pipe", timeout: SUMMARIZE_TIMEOUT_S * 1000 });
  if (r.exitCode !== 0) {
    const last = (r.stderr.toString() + r.stdout.toString()).trim().split("\n").at(-1) ?? "";
    say(`warning: ${SUMMARIZER} failed (exit ${r.exitCode ?? "killed"}): ${oneLine(last, 160)}`);
  }
}

// ---------------------------------------------------------------------------
// One experiment, start to end
// ---------------------------------------------------------------------------

function save(ctx: Ctx): void {
  saveState(ROOT, ctx.st);
}

function status(ctx: Ctx, what: string): void {
  const st = ctx.st;
  const best = st.best ? `best ${st.primary} ${(st.best.metrics[st.primary] ?? 0).toFixed(6)} (#${st.best.n} ${st.best.short})` : "no best yet";
  say(`#${st.current?.n ?? st.nextN} | ${elapsed()} | ${best} | ${what}`);
}

async function experiment(ctx: Ctx, kind: "baseline" | "experiment"): Promise<Status> {
  const st = ctx.st;
  const done = st.baselines.primaries.length;
  st.current = {
    n: st.nextN, kind, phase: "proposing",
    base: kind === "baseline" ? st.sessionStart : st.best!.commit,
    candidate: null,
    description: kind === "experiment" ? "" : st.baselines.wanted === 1 ? "baseline" : done === 0 ? `baseline 1/${st.baselines.wanted}` : `baseline repeat ${done + 1}/${st.baselines.wanted}`,
    move: null, trainPid: null, outcome: null, row: null,
    rowsBefore: countRows(ctx.resultsText), trainLines: 0, startedAt: new Date().toISOString(),
  };
  save(ctx);
  status(ctx, kind === "baseline" ? st.current.description : `proposing (${ctx.mode === "builtin" ? "built-in search" : ctx.mode === "agent" ? "agent" : "HEAD"})`);
  killPoint("proposing");
  const cur = st.current;
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

/** Finish or roll back the experiment a killed loop left behind. */
async function recover(ctx: Ctx): Promise<void> {
  const st = ctx.st;
  const cur = st.current;
  if (!cur || cur.phase === "decided") return;
  say(`resume: experiment #${cur.n} "${cur.description}" was interrupted at phase ${cur.phase}`);
  // A git command killed with the loop leaves its lock behind; no other loop can hold it (our lock).
  rmSync(join(ROOT, ".git", "index.lock"), { force: true });
  if (cur.trainPid !== null && pidAlive(cur.trainPid)) {
    killGroup(cur.trainPid); // the orphaned train.ts would overwrite the next run's checkpoint
    for (let i = 0; i < 50 && pidAlive(cur.trainPid); i++) await Bun.sleep(100);
    say(`resume: killed the orphaned train.ts (pid ${cur.trainPid})`);
  }
  if (unmeasured(cur.phase)) {
    rollBack(ctx);
    say(`resume: rolled back #${cur.n} to ${shortOf(cur.base)}; nothing was measured, no row written`);
    return;
  }
  if (cur.phase === "evaluating") {
    resetTo(cur.candidate!);
    const integ = await checkIntegrity(ctx, cur.candidate!, false);
    if (integ.problems.length > 0) {
      repair(ctx, cur.candidate!, integ);
      cur.row = crashRow(ctx, shortOf(cur.candidate!), `${cur.description} (crash: reverted: ${integ.problems.join(", ")})`);
      cur.phase = "logging";
      save(ctx);
    } else {
      await measureAndDecide(ctx);
    }
  }
  await logAndApply(ctx);
  if (ctx.fatal) throw new Stop(EXIT.paused, ctx.fatal);
}

const unmeasured = (phase: string) => phase === "proposing" || phase === "committed" || phase === "training";

/**
 * Undo an experiment that was not measured (killed, or aborted by a second Ctrl-C): back to its
 * base, new files removed, no row. Its experiment number is used again.
 */
function rollBack(ctx: Ctx): void {
  const cur = ctx.st.current!;
  resetTo(cur.base);
  const untracked = untrackedFiles();
  if (untracked.length > 0) git(["clean", "-fdq", "--", ...untracked]);
  restoreResults(ctx);
  ctx.st.current = null;
  save(ctx);
}

// ---------------------------------------------------------------------------
// Sessions: a branch, a journal, a results.tsv
// ---------------------------------------------------------------------------

/** Move the previous session's journal and results out of the way (they are per session). */
function archiveSession(live: State | null): void {
  const files = [STATE_FILE, RESULTS, RESULTS_BACKUP].filter((f) => existsSync(f));
  if (files.length === 0) return;
  const name = `${(live?.branch ?? "unknown").replace(/[^A-Za-z0-9._-]+/g, "_")}-${new Date().toISOString().replace(/[:.]/g, "-")}`;
  const dir = join(SESSIONS_DIR, name);
  mkdirSync(dir, { recursive: true });
  for (const f of files) renameSync(f, join(dir, basename(f)));
  say(`archived the previous session's ${files.map((f) => basename(f)).join(", ")} to ${dir}/`);
}

/** The journal of `branch`: the live state.json, or an archived one (swapped back in). */
function journalFor(branch: string): State | null {
  const live = readState(STATE_FILE);
  if (live?.branch === branch) return live;
  if (!existsSync(SESSIONS_DIR)) return null;
  for (const d of readdirSync(SESSIONS_DIR).sort().reverse()) {
    const dir = join(SESSIONS_DIR, d);
    let st: State | null = null;
    try { st = readState(join(dir, "state.json")); } catch { continue; }
    if (st?.branch !== branch) continue;
    archiveSession(live);
    for (const f of [STATE_FILE, RESULTS, RESULTS_BACKUP]) if (existsSync(join(dir, basename(f)))) renameSync(join(dir, basename(f)), f);
    rmSync(dir, { recursive: true, force: true });
    say(`restored the journal of ${branch} from ${dir}/`);
    return st;
  }
  return null;
}

async function freshSession(flags: Flags, branch: string): Promise<State> {
  if (branchExists(branch)) throw new Stop(EXIT.refused, `branch ${branch} already exists: continue it with \`bun loop.ts --resume --tag ${branch.slice("autoresearch/".length)}\`, or pick another --tag`);
  const dirty = dirtyPaths();
  if (dirty.length > 0) throw new Stop(EXIT.refused, `the working tree is not clean (${dirty.slice(0, 5).join(", ")}${dirty.length > 5 ? ", …" : ""}): commit or remove these first; the loop resets the tree between experiments`);
  const cache = await cacheFingerprint();
  if (cache.task === null) throw new Stop(EXIT.refused, `no prepared dataset under ${CACHE_ROOT} (or it is unreadable): run \`bun prepare.ts --source …\` first`);
  const task = cache.task;
  archiveSession(readState(STATE_FILE));
  git(["checkout", "-q", "-b", branch]);
  const head = rev("HEAD");
  const now = new Date().toISOString();
  const st: State = {
    version: 1, branch, tag: branch.slice("autoresearch/".length), task,
    primary: TASK_METRICS[task].primary, secondary: TASK_METRICS[task].secondary,
    startedAt: now, updatedAt: now, pid: process.pid, sessionStart: head,
    settings: {
      budgetSeconds: flags.budget ?? TIME_BUDGET, baselineRuns: flags.baselineRuns ?? DEFAULTS.baselineRuns,
      noiseSigmas: flags.noiseSigmas ?? DEFAULTS.noiseSigmas, seed: flags.seed ?? DEFAULTS.seed,
    },
    protected: await protectedHashes(),
    cache: { dir: cache.dir, images: cache.images, manifest: cache.manifest },
    baselines: { wanted: flags.baselineRuns ?? DEFAULTS.baselineRuns, primaries: [], metrics: [] },
    baseline: null, noise: null, best: null, nextN: 1,
    counts: { experiments: 0, keeps: 0, discards: 0, crashes: 0 }, crashStreak: 0,
    tried: [], lastKeptMove: null, timing: { runs: 0, trainSeconds: 0, wallSeconds: 0 }, current: null,
  };
  saveState(ROOT, st);
  say(`new session on ${branch} from ${shortOf(head)}: task ${task}, keep on ${st.primary} (then ${st.secondary}), budget ${st.settings.budgetSeconds}s, ${st.baselines.wanted} baseline run(s)`);
  return st;
}

/** Which session to run: resume the named (or journaled) one, or start a new branch. */
async function openSession(flags: Flags): Promise<{ st: State; resumed: boolean }> {
  const live = readState(STATE_FILE);
  const head = currentBranch();
  const wanted = flags.tag !== undefined ? `autoresearch/${flags.tag}` : null;
  let target: string | null = null;
  if (flags.resume) {
    target = wanted ?? live?.branch ?? (head.startsWith("autoresearch/") ? head : null);
    if (target === null) throw new Stop(EXIT.refused, "--resume: no session to resume (no journal in .autoresearch/ and not on an autoresearch/ branch)");
  } else if (flags.once) {
    // An agent calls --once again and again: the session of the branch it is on continues.
    target = wanted ?? (head.startsWith("autoresearch/") ? head : null);
  }
  if (target !== null) {
    const st = journalFor(target);
    if (st) return { st, resumed: true };
    if (flags.resume) throw new Stop(EXIT.refused, `no journal for ${target}: nothing to resume (start a new session with another --tag)`);
  }
  if (!runMdSaysGo()) throw new Stop(EXIT.ok, ""); // a False switch must not even create a branch
  return { st: await freshSession(flags, wanted ?? `autoresearch/${dateTag()}`), resumed: false };
}

/** After loading a journal: same budget, on its branch, interrupted work recovered, clean tree. */
async function prepareResumed(ctx: Ctx): Promise<void> {
  const st = ctx.st;
  const f = ctx.flags;
  if (f.budget !== undefined && f.budget !== st.settings.budgetSeconds) {
    throw new Stop(EXIT.refused, `this session trains with --budget ${st.settings.budgetSeconds}; results with another budget are not comparable: resume without --budget, or start a new session`);
  }
  if (f.seed !== undefined) st.settings.seed = f.seed;
  if (f.noiseSigmas !== undefined && f.noiseSigmas !== st.settings.noiseSigmas) {
    st.settings.noiseSigmas = f.noiseSigmas;
    if (st.noise) st.noise = computeNoise(st.noise.metric, st.noise.runs, f.noiseSigmas);
  }
  if (currentBranch() !== st.branch) {
    const dirty = dirtyPaths();
    if (dirty.length > 0) throw new Stop(EXIT.refused, `the working tree is not clean (${dirty.slice(0, 5).join(", ")}): cannot switch to ${st.branch}`);
    git(["checkout", "-q", st.branch]);
  }
  ctx.resultsText = loadResultsText();
  await recover(ctx);
  const dirty = dirtyPaths();
  if (dirty.length > 0) {
    const hint = ctx.mode === "once" ? `commit your change to train.ts first (\`git commit -am "<what you tried>"\`)` : "commit or remove these first";
    throw new Stop(EXIT.refused, `the working tree is not clean (${dirty.slice(0, 5).join(", ")}): ${hint}`);
  }
  const cache = await cacheFingerprint();
  if (cache.dir !== st.cache.dir || cache.images !== st.cache.images || cache.manifest !== st.cache.manifest) {
    throw new Stop(EXIT.paused, `the prepared data is not the session's (${st.cache.dir}): re-run \`bun prepare.ts\` with the session's source, or start a new session`);
  }
  if (f.resume) st.crashStreak = 0; // a person restarted a paused loop: a fresh streak (--once keeps counting)
  save(ctx);
  const h = rev("HEAD");
  if (st.best && ctx.mode !== "once" && h !== st.best.commit) {
    throw new Stop(EXIT.refused, `HEAD (${shortOf(h)}) is not the last kept commit (${st.best.short}): measure it with \`bun loop.ts --once\`, or \`git reset --hard ${st.best.short}\``);
  }
  say(`resumed ${st.branch}: ${countRows(ctx.resultsText)} rows, best ${st.best ? `${st.primary} ${(st.best.metrics[st.primary] ?? 0).toFixed(6)} (${st.best.short})` : "none yet"}${st.noise ? `, noise floor ${num(st.noise.floor)}` : ""}`);
}

// ---------------------------------------------------------------------------
// The loop
// ---------------------------------------------------------------------------

async function runLoop(ctx: Ctx): Promise<number> {
  const st = ctx.st;
  let baselinesRan = 0;
  while (st.baselines.primaries.length < st.baselines.wanted) {
    if (control.stop) return stopped(ctx);
    if (rev("HEAD") !== st.sessionStart) throw new Stop(EXIT.refused, `the baseline runs measure the session's first commit ${shortOf(st.sessionStart)}, but HEAD moved: \`git reset --hard ${shortOf(st.sessionStart)}\` first`);
    if (!runMdSaysGo()) return EXIT.ok;
    const s = await experiment(ctx, "baseline");
    baselinesRan++;
    if (s === "crash") throw new Stop(EXIT.paused, `the baseline (the unmodified train.ts) crashed: ${st.current?.row?.description ?? ""}. Fix the cause (see run.log), then \`bun loop.ts --resume\`.`);
  }
  if (st.noise && baselinesRan > 0) say(`noise floor: ${st.primary} mean ${num(st.noise.mean)}, σ ${num(st.noise.sigma)} over ${st.noise.runs.length} run(s); a keep needs more than +${num(st.noise.floor)} over the mean`);

  if (ctx.mode === "once") {
    const head = rev("HEAD");
    if (head === st.best!.commit) {
      if (baselinesRan > 0) { say("baseline measured. Now edit train.ts, commit, and run `bun loop.ts --once` to measure it."); return EXIT.ok; }
      throw new Stop(EXIT.refused, `nothing to measure: HEAD is the last kept commit (${st.best!.short}); commit a change to train.ts, then run \`bun loop.ts --once\``);
    }
    if (!gitOk(["merge-base", "--is-ancestor", st.best!.commit, head])) throw new Stop(EXIT.refused, `HEAD does not descend from the last kept commit ${st.best!.short}: \`git reset --hard ${st.best!.short}\`, re-apply your change and commit it`);
    const dirty = dirtyPaths();
    if (dirty.length > 0) throw new Stop(EXIT.refused, `the working tree is not clean (${dirty.slice(0, 5).join(", ")}): commit your change to train.ts first (\`git commit -am "<what you tried>"\`)`);
    if (!runMdSaysGo()) return EXIT.ok;
    await experiment(ctx, "experiment");
    checkStreak(ctx);
    return EXIT.ok;
  }

  let started = 0;
  for (;;) {
    if (control.stop) return stopped(ctx);
    if (ctx.flags.maxExperiments !== undefined && started >= ctx.flags.maxExperiments) {
      say(`--max-experiments ${ctx.flags.maxExperiments} reached: stopping`);
      return EXIT.ok;
    }
    if (!runMdSaysGo()) return EXIT.ok;
    started++;
    await experiment(ctx, "experiment");
    checkStreak(ctx);
  }
}

/** A streak of crashes pauses the loop instead of letting it spin. */
function checkStreak(ctx: Ctx): void {
  if (ctx.st.crashStreak < ctx.flags.maxCrashStreak) return;
  throw new Stop(EXIT.paused, `paused: ${ctx.st.crashStreak} crashes in a row (last: ${ctx.st.current?.row?.description ?? "?"}). Look at run.log and ${LOGS_DIR}/, fix the cause, then \`bun loop.ts --resume\`.`);
}

function stopped(ctx: Ctx): number {
  say(`stopped on request after experiment #${ctx.st.nextN - 1}`);
  return EXIT.ok;
}

function finalReport(ctx: Ctx): void {
  const st = ctx.st;
  const t = st.timing;
  const overhead = t.runs > 0 ? (t.wallSeconds - t.trainSeconds) / t.runs : 0;
  const best = st.best ? (st.best.metrics[st.primary] ?? 0) : null;
  const base = st.baseline ? (st.baseline.metrics[st.primary] ?? 0) : null;
  say(`session ${st.branch}: ${st.counts.experiments} experiments, ${st.counts.keeps} kept, ${st.counts.discards} discarded, ${st.counts.crashes} crashed`
    + (best !== null && base !== null ? `; best ${st.primary} ${best.toFixed(6)} vs baseline ${base.toFixed(6)} (${signed(best - base)})` : "")
    + `; loop overhead ${overhead.toFixed(1)}s per run (time not spent in train.ts)`);
}

// ---------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------

async function main(argv: string[]): Promise<number> {
  const flags = parseFlags(argv);
  process.chdir(ROOT);
  if (!gitOk(["rev-parse", "--is-inside-work-tree"]) || resolve(git(["rev-parse", "--show-toplevel"])) !== resolve(ROOT)) {
    throw new Stop(EXIT.refused, `${ROOT} is not the top of a git repository: the loop keeps and discards experiments as commits`);
  }
  // `git reset --hard` and the clean-tree check must never see the loop's own files.
  const notIgnored = [RESULTS, RUN_LOG, join(AR_DIR, "state.json"), join(LATEST_CHECKPOINT_DIR, "meta.json")].filter((p) => !gitOk(["check-ignore", "-q", "--no-index", p]));
  if (notIgnored.length > 0) throw new Stop(EXIT.refused, `${notIgnored.join(", ")} must be gitignored (see this repository's .gitignore): the loop writes them and resets the tree`);
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
    const { st, resumed } = await openSession(flags);
    const ctx: Ctx = {
      flags, mode: flags.once ? "once" : flags.agent !== undefined ? "agent" : "builtin",
      st, resultsText: "", fatal: null, warnedNoSummarizer: false,
    };
    try {
      if (resumed) await prepareResumed(ctx);
      else ctx.resultsText = loadResultsText();
      return await runLoop(ctx);
    } catch (err) {
      if (err instanceof Stop && err.code === EXIT.aborted && ctx.st.current && unmeasured(ctx.st.current.phase)) {
        rollBack(ctx);
        say("aborted: the interrupted experiment was rolled back, no row written");
      }
      throw err;
    } finally {
      finalReport(ctx);
    }
  } finally {
    release();
  }
}

if (import.meta.main) {
  main(process.argv).then(
    (code) => process.exit(code),
    (err: unknown) => {
      if (err instanceof Stop) {
        if (err.message) console.error(err.code === EXIT.ok ? `[loop] ${err.message}` : `[loop] ${err.code === EXIT.paused ? "PAUSED" : "error"}: ${err.message}`);
        process.exit(err.code);
      }
      console.error(`[loop] error: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
      process.exit(EXIT.error);
    },
  );
}

