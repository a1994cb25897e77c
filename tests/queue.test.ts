/**
 * The loop with workers (`--queue`, lib/queue.ts, lib/worker.ts) against a real redis-server on
 * 127.0.0.1 (tests/redis_fixture.ts), in temp repositories with the stub train.ts of
 * tests/loop_fixtures.ts on SYNTHETIC data, 1-second budgets: rows complete and never doubled,
 * the branch at the best, when a worker is SIGKILLed mid-job, Redis restarts, a worker's harness
 * or data differs, the loop is SIGKILLed with runs in flight, and run.md says False.
 */
import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { writeFileSync, appendFileSync } from "node:fs";
import { join } from "node:path";
import {
  E2E_MS, WASM_ENV, clean, fixture, head, makeRepo, prepareCache, removeTemps, rows, state, stub, syntheticCache,
} from "./loop_fixtures.ts";
import { redisMissing, startRedis, type RedisServer } from "./redis_fixture.ts";
import { threadsPerRun } from "../lib/worker.ts";

const BUN = process.execPath;
const SPACE = `{ cls: [0, 1, 2], yieldValue: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], mode: ["ok"], seed: [0] }`;
const missing = redisMissing();
if (missing) console.warn(`\n*** SKIPPING tests/queue.test.ts: ${missing} ***\n`);
const maybe = missing ? describe.skip : describe;

let redis: RedisServer | null = null;
const procs: Proc[] = [];

interface Proc { proc: ReturnType<typeof Bun.spawn>; out: () => string; exited: Promise<number> }

/** A child whose output is collected as it comes (the tests watch it to time their faults). */
function spawn(dir: string, args: string[], env: Record<string, string> = {}): Proc {
  const proc = Bun.spawn([BUN, "loop.ts", ...args], {
    cwd: dir, stdout: "pipe", stderr: "pipe",
    env: { ...process.env, AR_CACHE: fixture.cache, ...WASM_ENV, AR_TEST_ALLOWANCE_S: "30", AR_TEST_LOCK_MS: "5000",
      ...env },
  });
  let text = "";
  const pump = async (s: ReadableStream<Uint8Array>) => {
    const reader = s.getReader();
    const dec = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done || !value) break;
      text += dec.decode(value, { stream: true });
    }
  };
  const pumps = Promise.all([pump(proc.stdout), pump(proc.stderr)]);
  const p: Proc = { proc, out: () => text, exited: proc.exited.then(async (c) => { await pumps; return c; }) };
  procs.push(p);
  return p;
}

const loopQ = (dir: string, args: string[], env: Record<string, string> = {}) =>
  spawn(dir, ["--budget", "1", "--grace", "0", "--no-summarize", "--queue", redis!.url, ...args], env);
const worker = (dir: string, id: string, env: Record<string, string> = {}) =>
  spawn(dir, ["worker", "--queue", redis!.url, "--id", id], env);

async function until(what: string, p: Proc, re: RegExp, ms = 120_000): Promise<void> {
  const t0 = Date.now();
  while (!re.test(p.out())) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}: ${p.out().slice(-3000)}`);
    await Bun.sleep(100);
  }
}

/** Its exit code, with its output's tail on the console when it is not `want`. */
async function exitOf(p: Proc, want = 0): Promise<number> {
  const code = await p.exited;
  if (code !== want) console.log(p.out().slice(-6000));
  return code;
}

async function stopAll(): Promise<void> {
  for (const p of procs.splice(0)) {
    try { p.proc.kill("SIGKILL"); } catch { /* gone */ }
    await p.exited;
  }
}

/** Workers up (each has announced itself, so the loop sees all their slots). */
async function workers(dir: string, ids: string[]): Promise<Proc[]> {
  const ws = ids.map((id) => worker(dir, id));
  for (const w of ws) await until("a worker to start", w, /taking jobs from/);
  return ws;
}

/** Every decided row once: each experiment's commit appears once, and the journal counted each. */
function expectConsistent(dir: string, wantRows: number, runMdChanged = false): void {
  const rs = rows(dir);
  expect(rs).toHaveLength(wantRows);
  const st = state(dir);
  expect(st.nextN).toBe(wantRows + 1);
  const start = st.sessionStart.slice(0, 7);
  const experiments = rs.filter((r) => r.commit !== start);
  expect(new Set(experiments.map((r) => r.commit)).size).toBe(experiments.length);
  expect(head(dir)).toBe(st.best!.commit);
  expect(clean(dir)).toBe(runMdChanged ? "M run.md" : ""); // the person's switch stays as they set it
}

function session(tag: string): string {
  return makeRepo(stub({}, SPACE), { files: { "notes.md": tag } });
}

describe("a worker's threads per run", () => {
  test("--threads, else the environment's AR_WASM_THREADS, else the cores shared out among the slots", () => {
    expect(threadsPerRun({ concurrency: 2 }, undefined, 2)).toBe("1");
    expect(threadsPerRun({ concurrency: 2 }, undefined, 8)).toBe("4");
    expect(threadsPerRun({ concurrency: 3 }, undefined, 2)).toBe("1"); // never 0
    expect(threadsPerRun({ concurrency: 1 }, undefined, 8)).toBeUndefined(); // one run: every core, as alone
    expect(threadsPerRun({ concurrency: 2, threads: 2 }, undefined, 2)).toBe("2");
    expect(threadsPerRun({ concurrency: 2 }, "2", 2)).toBeUndefined(); // inherited as the person set it
    expect(threadsPerRun({ concurrency: 2 }, " ", 2)).toBe("1");
  });
});

maybe("the loop with workers on Redis", () => {
  beforeAll(async () => {
    await prepareCache();
    redis = await startRedis();
  }, E2E_MS);
  afterEach(async () => {
    await stopAll();
    redis?.cli("flushall");
  }, E2E_MS);
  afterAll(async () => {
    await redis?.stop();
    redis?.cleanup();
    removeTemps();
  }, E2E_MS);

  test("two workers: one run per worker slot in flight, decided in order, every row once", async () => {
    const dir = session("two");
    await workers(dir, ["w1", "w2"]);
    const l = loopQ(dir, ["--tag", "two", "--baseline-runs", "2", "--max-experiments", "2"]);
    expect(await exitOf(l)).toBe(0);
    const out = l.out();
    expect(out).toMatch(/dispatched .*; 2 in flight, 2 worker slot\(s\)\)/);
    expect(out).toContain("trained on worker w1");
    expect(out).toContain("trained on worker w2");
    expectConsistent(dir, 4);
    expect(rows(dir).slice(0, 2).map((r) => r.status)).toEqual(["keep", "baseline"]);
  }, E2E_MS);

  test("a worker SIGKILLed mid-job: another takes the job over, no row lost or doubled", async () => {
    const dir = session("killw");
    const a = (await workers(dir, ["wa"]))[0]!;
    const l = loopQ(dir, ["--tag", "killw", "--baseline-runs", "1", "--max-experiments", "2", "--confirm-runs", "0"]);
    await until("worker wa to start a job", a, /job killw-\d+-\d+: /);
    const job = /job (killw-\d+-\d+): /.exec(a.out())![1]!;
    a.proc.kill("SIGKILL");
    const b = worker(dir, "wb");
    expect(await exitOf(l)).toBe(0);
    expect(b.out()).toContain(`job ${job} done`);
    expectConsistent(dir, 3);
  }, E2E_MS);

  test("Redis restarted mid-night: the loop and the workers reconnect, nothing duplicated", async () => {
    const dir = session("restart");
    await workers(dir, ["w1", "w2"]);
    const l = loopQ(dir, ["--tag", "restart", "--baseline-runs", "2", "--max-experiments", "1", "--confirm-runs", "0"]);
    await until("the first decision", l, /#1 .*\| \d+:\d\d:\d\d/);
    await redis!.restart();
    expect(await exitOf(l)).toBe(0);
    expectConsistent(dir, 3);
  }, E2E_MS);

  test("a worker whose harness or data differs refuses the job, says why, and stops", async () => {
    const dir = session("refuse");
    const other = makeRepo(stub({}, SPACE));
    appendFileSync(join(other, "prepare.ts"), "\n// another harness\n");
    const bad = worker(other, "wbad");
    const l = loopQ(dir, ["--tag", "refuse", "--baseline-runs", "1", "--max-experiments", "0"]);
    expect(await bad.exited).toBe(2);
    expect(bad.out()).toMatch(/refusing job refuse-0-0 .*: harness differs from the loop's: prepare\.ts differs/);
    const data = worker(dir, "wdata", { AR_CACHE: await syntheticCache("screening") });
    expect(await data.exited).toBe(2);
    expect(data.out()).toMatch(/refusing job refuse-0-0 .*: prepared data in \S+ differs from the loop's/);
    const good = worker(dir, "wgood");
    if (await exitOf(l) !== 0) console.log(bad.out(), data.out(), good.out());
    expect(await l.exited).toBe(0);
    expectConsistent(dir, 1);
  }, E2E_MS);

  test("the loop SIGKILLed with runs in flight: --resume collects them (or queues them again)", async () => {
    const dir = session("killl");
    await workers(dir, ["w1", "w2"]);
    const args = ["--tag", "killl", "--baseline-runs", "2", "--max-experiments", "1", "--confirm-runs", "0"];
    const l = loopQ(dir, args, { AR_TEST_KILL_AT: "training" });
    expect(await l.exited).not.toBe(0);
    expect(l.proc.signalCode).toBe("SIGKILL");
    const r = loopQ(dir, ["--resume", ...args]);
    expect(await exitOf(r)).toBe(0);
    expect(r.out()).toMatch(/resume: 2 run\(s\) were in flight: 2 found in Redis, 0 queued again/);
    expectConsistent(dir, 3);
    // Killed again, with Redis emptied meanwhile: the runs in flight are queued again.
    const k = loopQ(dir, ["--resume", "--max-experiments", "1"], { AR_TEST_KILL_AT: "training" });
    expect(await k.exited).not.toBe(0);
    redis!.cli("flushall");
    const r2 = loopQ(dir, ["--resume", "--max-experiments", "0"]);
    expect(await exitOf(r2)).toBe(0);
    expect(r2.out()).toMatch(/resume: 1 run\(s\) were in flight: 0 found in Redis, 1 queued again/);
    expectConsistent(dir, 4);
  }, E2E_MS);

  test("run.md False: nothing more is dispatched; the runs in flight finish and are logged", async () => {
    const dir = session("runmd");
    await workers(dir, ["w1", "w2"]);
    const l = loopQ(dir, ["--tag", "runmd", "--baseline-runs", "1", "--confirm-runs", "0"]);
    await until("two experiments in flight", l, /dispatched (?!baseline).*; 2 in flight/);
    writeFileSync(join(dir, "run.md"), "False\n");
    expect(await exitOf(l)).toBe(0);
    const out = l.out();
    const at = out.indexOf("run.md says False: stopping");
    expect(at).toBeGreaterThan(0);
    expect(out.slice(at)).not.toContain("[loop] dispatched ");
    const dispatched = (out.match(/\[loop\] dispatched /g) ?? []).length;
    expectConsistent(dir, dispatched, true);
  }, E2E_MS);
});
