/**
 * `bun loop.ts worker --queue redis://HOST:PORT`: takes training jobs from the loop's queue and runs
 * each exactly as the loop runs one (lib/trial.ts: features, `bun train.ts` with its deadline, the
 * harness check, `bun prepare.ts evaluate` in its own process), in a work folder of its own: a
 * fresh copy of this checkout's harness files with the job's train.ts. It never touches git.
 *
 * A job whose harness hashes or data differ from this machine's is refused: the worker says why,
 * puts the job back for another worker and stops taking jobs (exit 2). With no data prepared, it
 * prepares it first with the loop's own `bun prepare.ts` command.
 *
 * Test-only environment: AR_TEST_LOCK_MS (a job's lock; a dead worker's job is taken over after it).
 */
import { cpSync, existsSync, mkdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { availableParallelism, hostname } from "node:os";
import { dirname, join } from "node:path";
import { type } from "arktype";
import { cac } from "cac";
import { DelayedError, Worker, type Job } from "bullmq";
import { CACHE_ROOT } from "../prepare.ts";
import { killGroup, runChild } from "./child.ts";
import { EXIT, Stop } from "./exit.ts";
import { checkUrl } from "./loop_flags.ts";
import { sha256File } from "./images.ts";
import {
  HEARTBEAT_MS, JobData, QUEUE_NAME, connection, dataKey, dropHeartbeat, heartbeat,
  packCheckpoint, plainClient, type JobResult,
} from "./queue.ts";
import { evaluateCheckpoint, trainCandidate } from "./trial.ts";

const BUN = process.execPath;
const CKPT = join("checkpoints", "latest");
const LINGER_S = Number(process.env.AR_TEST_LINGER_S ?? 15);
const LOG_TAIL = 32_000;

const WorkerFlags = type({
  queue: "string > 0", concurrency: "1 <= number.integer <= 64", "id?": "/^[A-Za-z0-9._-]+$/",
  "backend?": "string > 0", "threads?": "number.integer >= 1", featuresTimeout: "number > 0",
});
type WorkerFlags = typeof WorkerFlags.infer;

function parseWorkerFlags(argv: string[]): WorkerFlags {
  const cli = cac("loop.ts worker");
  let raw: Record<string, unknown> | null = null;
  cli.command("", "take training jobs from the loop's queue")
    .option("--queue <url>", "the loop's Redis, redis://HOST:PORT")
    .option("--concurrency <n>", "jobs at once (one per GPU, or cores / threads)", { default: 1 })
    .option("--id <name>", "this worker's name in the logs (default: host-pid)")
    .option("--backend <name>", "AR_BACKEND for its runs: gpu, node, wasm or cpu")
    .option("--threads <n>", "AR_WASM_THREADS for its runs (default: cores / concurrency)")
    .option("--features-timeout <seconds>", "kill `bun prepare.ts features` after this long", { default: 3600 })
    .action((o: Record<string, unknown>) => { raw = o; });
  cli.help();
  try {
    cli.parse(["bun", "worker", ...argv], { run: false });
    cli.runMatchedCommand();
  } catch (err) {
    throw new Stop(EXIT.refused, `loop.ts worker: ${err instanceof Error ? err.message : String(err)}`);
  }
  if (raw === null) throw new Stop(EXIT.ok, "");
  const r: Record<string, unknown> = raw;
  const f = WorkerFlags(Object.fromEntries(Object.entries({
    queue: r.queue === undefined ? undefined : String(r.queue), concurrency: Number(r.concurrency),
    id: r.id === undefined ? undefined : String(r.id), backend: r.backend === undefined ? undefined : String(r.backend),
    threads: r.threads === undefined ? undefined : Number(r.threads), featuresTimeout: Number(r.featuresTimeout),
  }).filter(([, v]) => v !== undefined)));
  if (f instanceof type.errors) throw new Stop(EXIT.refused, `loop.ts worker: ${f.summary}`);
  const bad = checkUrl(f.queue);
  if (bad) throw new Stop(EXIT.refused, `loop.ts worker: ${bad}`);
  return f;
}

/** Why this checkout cannot run `d` (harness files or data differ), or null. */
async function mismatch(root: string, d: JobData): Promise<string | null> {
  const differ: string[] = [];
  for (const [p, h] of Object.entries(d.harness)) {
    const now = existsSync(join(root, p)) ? await sha256File(join(root, p)) : "missing";
    if (now !== h) differ.push(now === "missing" ? `${p} missing` : `${p} differs`);
  }
  if (differ.length > 0) {
    return `harness differs from the loop's: ${differ.slice(0, 5).join(", ")}${differ.length > 5 ? ", …" : ""} `
      + "(check out the loop's commit here)";
  }
  const key = await dataKey(CACHE_ROOT);
  if (key !== d.data.key) {
    return `prepared data in ${CACHE_ROOT} differs from the loop's (${key === null ? "none" : "another set"}): `
      + `run \`${d.data.prepare}\` here`;
  }
  return null;
}

/** A fresh work folder: this checkout's harness files, node_modules linked, the job's train.ts. */
function workFolder(root: string, dir: string, d: JobData): void {
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  for (const p of Object.keys(d.harness)) {
    mkdirSync(join(dir, p, ".."), { recursive: true });
    cpSync(join(root, p), join(dir, p));
  }
  symlinkSync(join(root, "node_modules"), join(dir, "node_modules"));
  writeFileSync(join(dir, "train.ts"), d.trainTs);
}

/**
 * AR_WASM_THREADS for this worker's runs: --threads, else the environment's, else the cores shared out
 * among the job slots. Runs that each took every core would fight over them (our SIMD pool's threads poll
 * between kernels and would take a core from a thread that has work), so --concurrency 2 on 2 cores gives
 * each run 1 thread.
 */
export function threadsPerRun(f: { concurrency: number; threads?: number }, envThreads: string | undefined,
  cores: number): string | undefined {
  if (f.threads) return String(f.threads);
  if (envThreads != null && envThreads.trim() !== "") return undefined; // inherited as it is
  return f.concurrency > 1 ? String(Math.max(1, Math.floor(cores / f.concurrency))) : undefined;
}

export async function runWorker(root: string, argv: string[]): Promise<number> {
  const f = parseWorkerFlags(argv);
  const id = f.id ?? `${hostname()}-${process.pid}`;
  const say = (msg: string) => console.log(`[worker ${id}] ${msg}`);
  const env: Record<string, string> = {};
  if (f.backend) env.AR_BACKEND = f.backend;
  const threads = threadsPerRun(f, process.env.AR_WASM_THREADS, availableParallelism());
  if (threads) env.AR_WASM_THREADS = threads;
  const children = new Set<number>();
  const plain = plainClient(f.queue);
  let refused: string | null = null;

  /** Prepare the data with the loop's command when this machine has none. */
  const prepared = async (d: JobData): Promise<void> => {
    if ((await dataKey(CACHE_ROOT)) !== null) return;
    say(`no prepared data in ${CACHE_ROOT}: running \`${d.data.prepare}\``);
    const r = await runChild(["sh", "-c", d.data.prepare], {
      cwd: root, timeoutS: 7200, echo: true, env: { PATH: `${dirname(BUN)}:${process.env.PATH ?? ""}` },
    });
    if (r.code !== 0) say(`\`${d.data.prepare}\` failed (exit ${r.code})`);
  };

  const processJob = async (job: Job, token?: string): Promise<JobResult> => {
    const d = JobData(job.data);
    if (d instanceof type.errors) throw new Error(`job ${job.id}: not a training job: ${d.summary}`);
    await prepared(d);
    const why = await mismatch(root, d);
    if (why !== null) {
      refused = why;
      say(`refusing job ${job.id} (${d.label}): ${why}; it goes back to the queue, and this worker stops`);
      await job.log(`refused by worker ${id}: ${why}`);
      await job.moveToDelayed(Date.now() + 1000, token);
      setTimeout(() => void stop(EXIT.refused), 0);
      throw new DelayedError();
    }
    const slot = join(root, ".autoresearch", "worker", `${id}-${String(job.id)}`);
    workFolder(root, slot, d);
    say(`job ${job.id}: ${d.label} (budget ${d.budgetS}s)`);
    try {
      return await runJob(slot, d, id, { ...env, ...d.env }, f.featuresTimeout, say, children);
    } finally {
      rmSync(slot, { recursive: true, force: true });
    }
  };

  const lockMs = Number(process.env.AR_TEST_LOCK_MS ?? 30_000);
  const worker = new Worker(QUEUE_NAME, processJob, {
    connection: connection(f.queue), concurrency: f.concurrency, lockDuration: lockMs,
    stalledInterval: Math.max(500, Math.floor(lockMs / 2)), maxStalledCount: 3,
  });
  worker.on("error", (err) => say(`redis: ${err.message}`));
  worker.on("completed", (job) => say(`job ${job.id} done`));
  worker.on("failed", (job, err) => {
    if (!(err instanceof DelayedError)) say(`job ${job?.id} failed: ${err.message}`);
  });
  const beat = async () => { try { await heartbeat(plain, id, f.concurrency); } catch { /* Redis away: next beat */ } };
  await beat();
  const timer = setInterval(() => void beat(), HEARTBEAT_MS);
  say(`taking jobs from ${f.queue} (concurrency ${f.concurrency}${f.backend ? `, backend ${f.backend}` : ""}`
    + `${threads ? `, ${threads} thread(s) per run` : ""}); data ${CACHE_ROOT}`);

  let done: (code: number) => void = () => {};
  const finished = new Promise<number>((r) => { done = r; });
  let stopping = false;
  const stop = async (code: number) => {
    if (stopping) return;
    stopping = true;
    clearInterval(timer);
    if (code !== EXIT.refused) say("stopping: the running jobs finish first (again: kill them)");
    await worker.close();
    try { await dropHeartbeat(plain, id); } catch { /* gone */ }
    plain.close();
    if (refused !== null) console.error(`[worker ${id}] refused: ${refused}`);
    done(code);
  };
  let signals = 0;
  const onSignal = () => {
    if (++signals > 1) for (const pid of children) killGroup(pid);
    void stop(EXIT.ok);
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  return finished;
}

/** One job: train as the loop would, check the harness is untouched, evaluate, pack the result. */
async function runJob(slot: string, d: JobData, id: string, env: Record<string, string>, featuresTimeoutS: number,
  say: (m: string) => void, children: Set<number>): Promise<JobResult> {
  const track = (pid: number) => children.add(pid);
  const t = await trainCandidate({
    cwd: slot, bun: BUN, task: d.task, budgetS: d.budgetS, deadlineS: d.deadlineS, env, checkpointDir: CKPT,
    lingerS: LINGER_S, logFile: "train.log", runLog: "run.log", featuresTimeoutS,
    featuresStallS: Number(process.env.AR_TEST_FEATURES_STALL_S ?? 300), label: d.label,
    announce: (what) => say(what), log: say, onFeaturesSpawn: track, afterFeatures: () => {}, onSpawn: track,
  });
  let ok = t.ok;
  let reason = t.reason;
  // train.ts runs with the work folder's permissions: a harness it changed would measure itself.
  const changed: string[] = [];
  for (const [p, h] of Object.entries(d.harness)) {
    const now = existsSync(join(slot, p)) ? await sha256File(join(slot, p)) : "missing";
    if (now !== h) changed.push(`${p} ${now === "missing" ? "deleted" : "changed"}`);
  }
  if ((await dataKey(CACHE_ROOT)) !== d.data.key) changed.push("prepared data changed");
  if (changed.length > 0) {
    ok = false;
    reason = `reverted after training: ${changed.join(", ")}`;
  }
  const ev = ok ? await evaluateCheckpoint({
    cwd: slot, bun: BUN, task: d.task, checkpointDir: CKPT, lingerS: LINGER_S, onSpawn: track, log: say,
    need: [d.primary],
  }) : null;
  const log = existsSync(join(slot, "train.log")) ? readFileSync(join(slot, "train.log"), "utf8") : "";
  return {
    worker: id, ok, reason, memoryGb: t.ran?.maxRss != null ? t.ran.maxRss / 1024 ** 3 : 0,
    trainSeconds: t.ran?.seconds ?? 0, imagesPerSecond: t.imagesPerSecond, eval: ev,
    checkpoint: ok ? packCheckpoint(join(slot, CKPT)) : null, log: log.slice(-LOG_TAIL),
  };
}
