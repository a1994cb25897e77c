/**
 * Experiments as jobs on a BullMQ queue in Redis: the contract between the loop (producer, the only
 * keeper of git, results.tsv and the journal) and its workers (lib/worker.ts, one per GPU or host).
 *
 * A job is one training run of one train.ts: its whole source, the seed's environment, the budget
 * and deadline, and what the worker must match before it trains: the harness files' hashes and the
 * prepared data's key. Its result is what the loop would have learnt running it itself: the
 * training verdict, `prepare.ts evaluate`'s metrics, the log's tail and the checkpoint's files
 * (base64 in Redis: a checkpoint of this project is kilobytes to a few MB).
 *
 * Job ids are `<tag>-<seq>-<seed offset>`: adding a job whose id exists is a no-op in BullMQ, so a
 * resumed loop that asks again for what it asked before gets the same job, never a second one.
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { RedisClient } from "bun";
import { type } from "arktype";
import { Queue, createBunRedisClient } from "bullmq";
import { Task } from "../prepare.ts";
import { activeCacheDir, cacheFiles, parseManifest, prepareCommandFor } from "./dataset.ts";
import { sha256File } from "./images.ts";
import { writeAtomic } from "./atomic.ts";
import { AR_DIR, Kind, Move } from "./journal.ts";

/** One queue for every session on a Redis: a job carries its session. */
export const QUEUE_NAME = "autoresearch";
/** Live workers announce themselves here (value: their concurrency), refreshed well within the expiry. */
const WORKER_KEY = "autoresearch:worker:";
export const HEARTBEAT_MS = 5000;
const HEARTBEAT_TTL_MS = 15_000;

/**
 * The files a training run executes besides train.ts: a worker whose copy of any differs from the
 * loop's would measure another harness.
 */
export function isHarness(path: string): boolean {
  return path === "prepare.ts" || path.startsWith("lib/") || ["package.json", "tsconfig.json", "bunfig.toml"]
    .includes(path);
}

/** The harness hashes a job carries: the session's protected hashes of the files a run executes. */
export function harnessOf(protectedHashes: Record<string, string>): Record<string, string> {
  return Object.fromEntries(Object.entries(protectedHashes).filter(([p]) => isHarness(p)));
}

export const JobData = type({
  session: "string",
  seq: "number.integer >= 0",
  offset: "number.integer >= 0",
  label: "string",
  trainTs: "string",
  env: "Record<string, string>",
  budgetS: "number > 0",
  deadlineS: "number > 0",
  task: Task,
  primary: "string",
  harness: "Record<string, string>",
  data: { key: "string", prepare: "string" },
});
export type JobData = typeof JobData.infer;

export const JobResult = type({
  worker: "string",
  ok: "boolean",
  reason: "string",
  memoryGb: "number >= 0",
  trainSeconds: "number >= 0",
  imagesPerSecond: "number >= 0 | null",
  /** `prepare.ts evaluate` on val, or why it gave none (null when training failed). */
  eval: type({ metrics: "Record<string, number>" }).or({ error: "string" }).or("null"),
  /** File name → base64 content of the checkpoint folder (null: training failed). */
  checkpoint: "Record<string, string> | null",
  log: "string",
});
export type JobResult = typeof JobResult.infer;

/** A BullMQ connection on Bun's own Redis client (reconnects by itself when Redis restarts). */
export function connection(url: string): ReturnType<typeof createBunRedisClient> {
  return createBunRedisClient(new RedisClient(url));
}

/** A plain client for the loop's and workers' own keys (heartbeats). */
export function plainClient(url: string): RedisClient {
  return new RedisClient(url, { autoReconnect: true, maxRetries: 1_000_000 });
}

export function jobId(session: string, seq: number, offset: number): string {
  return `${session}-${seq}-${offset}`;
}

// ---------------------------------------------------------------------------
// Workers' heartbeats
// ---------------------------------------------------------------------------

export async function heartbeat(c: RedisClient, id: string, slots: number): Promise<void> {
  await c.send("SET", [`${WORKER_KEY}${id}`, String(slots), "PX", String(HEARTBEAT_TTL_MS)]);
}

export async function dropHeartbeat(c: RedisClient, id: string): Promise<void> {
  await c.send("DEL", [`${WORKER_KEY}${id}`]);
}

/** Job slots of the workers alive now (the sum of their concurrency). */
export async function liveSlots(q: LoopQueue): Promise<number> {
  return untilRedis(q, "counting workers", async () => {
    const keys = (await q.plain.send("KEYS", [`${WORKER_KEY}*`])) as string[];
    if (keys.length === 0) return 0;
    const values = (await q.plain.send("MGET", keys)) as (string | null)[];
    return values.reduce((s, v) => s + (Number(v) || 0), 0);
  });
}

// ---------------------------------------------------------------------------
// The prepared data, as a worker must match it
// ---------------------------------------------------------------------------

/**
 * What the data a run trains and is measured on is, independent of where it was prepared: the
 * images' bytes, each item's label, split and yield, the classes and preprocessing. Two machines
 * that prepared the same source agree; null when nothing is prepared.
 */
export async function dataKey(cacheRoot: string): Promise<string | null> {
  let dir: string;
  try { dir = activeCacheDir(cacheRoot); } catch { return null; }
  const files = cacheFiles(dir);
  if (!existsSync(files.manifest) || !existsSync(files.images)) return null;
  let m: ReturnType<typeof parseManifest>;
  try { m = parseManifest(readFileSync(files.manifest, "utf8"), dir); } catch { return null; }
  const content = {
    task: m.task, classes: m.classes, positive: m.positiveClass, size: m.imageSize, pre: m.preprocessing,
    items: m.items.map((i) => [i.sha256, i.label, i.split, i.yield]),
  };
  const h = new Bun.CryptoHasher("sha256").update(JSON.stringify(content)).update(await sha256File(files.images));
  return h.digest("hex");
}

/** The loop's data as jobs carry it: its key, and the command that prepares it on a worker. */
export async function loopData(cacheRoot: string): Promise<JobData["data"]> {
  const dir = activeCacheDir(cacheRoot);
  const m = parseManifest(readFileSync(cacheFiles(dir).manifest, "utf8"), dir);
  return { key: (await dataKey(cacheRoot)) ?? "none", prepare: prepareCommandFor(m) };
}

// ---------------------------------------------------------------------------
// Checkpoints through Redis
// ---------------------------------------------------------------------------

export function packCheckpoint(dir: string): Record<string, string> | null {
  if (!existsSync(join(dir, "meta.json"))) return null;
  const out: Record<string, string> = {};
  for (const f of readdirSync(dir).sort()) out[f] = readFileSync(join(dir, f)).toString("base64");
  return out;
}

export function unpackCheckpoint(files: Record<string, string>, dir: string): void {
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  for (const [f, b64] of Object.entries(files)) {
    if (f.includes("/") || f.startsWith(".")) throw new Error(`checkpoint file name ${f} from a worker: refused`);
    writeFileSync(join(dir, f), Buffer.from(b64, "base64"));
  }
}

// ---------------------------------------------------------------------------
// The loop's side: candidates in flight, journaled
// ---------------------------------------------------------------------------

/** A run dispatched ahead of its turn: decided in this order, each against the best of its turn. */
export const Pending = type({
  seq: "number.integer >= 0",
  kind: Kind,
  /** The best it was proposed from, and its commit (kept alive by a side ref). */
  base: "string",
  candidate: "string",
  description: "string",
  move: Move.or("null"),
  offset: "number.integer >= 0",
  /** The seed's environment of its run (AR_HP), fixed when it was dispatched. */
  env: "Record<string, string>",
  /** The experiment number it got when its turn came (set before that experiment is journaled). */
  "n?": "number.integer >= 1",
});
export type Pending = typeof Pending.infer;

/** .autoresearch/queue.json: what `--resume` finds in flight (its results are collected, or it is queued again). */
const QueueJournal = type({
  /** The session's tag: another session's runs are not this one's. */
  tag: "string",
  url: "string",
  nextSeq: "number.integer >= 0",
  /** The sequence number of the experiment being decided (its confirmation runs' jobs use it). */
  currentSeq: "number.integer >= 0 | null",
  pending: Pending.array(),
});
export type QueueJournal = typeof QueueJournal.infer;

export const QUEUE_FILE = join(AR_DIR, "queue.json");

/** The session `tag`'s queue journal (empty when there is none, it is another session's, or `fresh`). */
export function readQueueJournal(root: string, url: string, tag: string, fresh = false): QueueJournal {
  const path = join(root, QUEUE_FILE);
  const empty = { tag, url, nextSeq: 0, currentSeq: null, pending: [] };
  if (fresh || !existsSync(path)) return empty;
  let raw: unknown;
  try { raw = JSON.parse(readFileSync(path, "utf8")); } catch { throw new Error(`${path}: not valid JSON`); }
  const q = QueueJournal(raw);
  if (q instanceof type.errors) throw new Error(`${path}: not a queue journal: ${q.summary}`);
  return q.tag === tag ? { ...q, url } : empty;
}

export function saveQueueJournal(root: string, q: QueueJournal): void {
  writeAtomic(join(root, QUEUE_FILE), `${JSON.stringify(q, null, 2)}\n`);
}

/** The side ref that keeps a dispatched candidate's commit until its turn. */
export function sideRef(seq: number): string {
  return `refs/autoresearch/queue/${seq}`;
}

/** The loop's handle on the queue: add a job once, wait for its result, remove it once decided. */
export interface LoopQueue {
  url: string;
  queue: Queue;
  plain: RedisClient;
  /** Said once per outage: Redis is unreachable, the loop waits for it. */
  log: (line: string) => void;
  close: () => Promise<void>;
}

export function openLoopQueue(url: string, log: (line: string) => void): LoopQueue {
  const queue = new Queue(QUEUE_NAME, { connection: connection(url) });
  queue.on("error", () => { /* an outage: the calls below wait it out */ });
  const plain = plainClient(url);
  return {
    url, queue, plain, log,
    close: async () => {
      await queue.close().catch(() => {});
      plain.close();
    },
  };
}

/**
 * `fn` until it succeeds: a Redis restarted mid-night is waited for (it says so once, and once
 * when it is back), never a reason to stop the loop. Gives up after `maxS` seconds.
 */
export async function untilRedis<T>(q: LoopQueue, what: string, fn: () => Promise<T>, maxS = 3600): Promise<T> {
  const t0 = Date.now();
  let said = false;
  for (;;) {
    try {
      const r = await fn();
      if (said) q.log(`Redis at ${q.url} is back`);
      return r;
    } catch (err) {
      const msg = err instanceof Error ? err.message : String(err);
      if ((Date.now() - t0) / 1000 > maxS) throw new Error(`Redis at ${q.url}: ${what}: ${msg} (for ${maxS} s)`);
      if (!said) q.log(`Redis at ${q.url} unreachable (${what}: ${msg}): waiting for it`);
      said = true;
      await Bun.sleep(1000);
    }
  }
}

/**
 * Add `data` as job `id` unless it is there. `first`: ahead of the queued ones (a confirmation run
 * or a check holds the loop up; the runs dispatched ahead do not).
 */
export async function ensureJob(q: LoopQueue, id: string, data: JobData, first: boolean): Promise<"added" | "there"> {
  return untilRedis(q, `adding job ${id}`, async () => {
    if (await q.queue.getJob(id)) return "there";
    await q.queue.add("train", data, {
      jobId: id, lifo: first, attempts: 3, backoff: { type: "fixed", delay: 2000 },
      removeOnComplete: { age: 7 * 24 * 3600 }, removeOnFail: { age: 7 * 24 * 3600 },
    });
    return "added";
  });
}

/**
 * The result of job `id`, polled (a Redis restart only delays it). A job that vanished (Redis lost
 * its data) is added again from `data`; one that failed every attempt is an error line.
 */
export async function awaitJob(q: LoopQueue, id: string, data: JobData, o: {
  log: (line: string) => void; aborted: () => boolean; pollMs?: number;
}): Promise<JobResult | { failed: string } | null> {
  for (;;) {
    if (o.aborted()) return null;
    const seen = await untilRedis(q, `reading job ${id}`, async () => {
      // The state first, then the job: BullMQ writes a result and moves the job to completed in one script,
      // so a job read after its state says completed has its result. Read the other way round, a job that
      // finished in between was "completed" with the result it had while active: none.
      const state = await q.queue.getJobState(id);
      const job = state === "unknown" ? undefined : await q.queue.getJob(id);
      return job ? { state, value: job.returnvalue as unknown, reason: job.failedReason } : null;
    });
    if (!seen) {
      o.log(`job ${id} is not in Redis (restarted without its data?): queued again`);
      await ensureJob(q, id, data, true);
    } else if (seen.state === "completed") {
      const r = JobResult(seen.value);
      if (r instanceof type.errors) return { failed: `its result is not a job result: ${r.summary}` };
      return r;
    } else if (seen.state === "failed") {
      return { failed: seen.reason || "failed" };
    }
    await Bun.sleep(o.pollMs ?? 500);
  }
}

export async function removeJobs(q: LoopQueue, ids: string[]): Promise<void> {
  await untilRedis(q, "removing decided jobs", async () => {
    for (const id of ids) {
      const job = await q.queue.getJob(id);
      await job?.remove().catch(() => {});
    }
  });
}
