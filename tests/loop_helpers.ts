/**
 * Helpers for the tests that run loop.ts end to end: a git repository in a temp folder with the
 * project's fixed files and a given train.ts, the loop run in it as a child process on a prepared
 * synthetic cache with a 1-second budget, and what it left behind (results.tsv rows, the journal).
 */
import { expect } from "bun:test";
import { cpSync, existsSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { prepareData, type Task } from "../prepare.ts";
import { readState, type State } from "../lib/journal.ts";
import { parseResults, type ResultRow } from "../lib/results.ts";
import { BUN, ROOT, tempDir } from "./helpers.ts";

/**
 * The limit for a test (or hook) that runs loop.ts in child processes (train, evaluate, git):
 * declared with each test so a plain `bun test` needs no --timeout, and generous for a busy machine.
 */
export const E2E_MS = 180_000;

/** Temp folders a test file made: its afterAll calls cleanUp. */
export const made: string[] = [];

/** The prepared cache loop runs read (AR_CACHE) unless a run names another. */
export const fixture = { cache: "" };

/** A synthetic cache for `task` in a temp folder (removed by cleanUp). */
export async function syntheticCache(task: Task): Promise<string> {
  const dir = tempDir("arv-loop-cache-");
  made.push(dir);
  await prepareData({ task, source: "synthetic", cacheRoot: dir, log: () => {} });
  return dir;
}

export function cleanUp(): void {
  for (const d of made.splice(0)) rmSync(d, { recursive: true, force: true });
}

export function sh(dir: string, cmd: string): string {
  const r = Bun.spawnSync(["sh", "-c", cmd], { cwd: dir, stdout: "pipe", stderr: "pipe" });
  if (r.exitCode !== 0) throw new Error(`${cmd}: ${r.stderr.toString()}`);
  return r.stdout.toString().trim();
}

/** A git repository with the project's fixed files, `train` as train.ts, and one commit. */
export function makeRepo(train: string, opts: { runMd?: string | null; files?: Record<string, string> } = {}): string {
  const dir = tempDir("arv-loop-");
  made.push(dir);
  for (const f of ["prepare.ts", "loop.ts", "program.md", "lib", "package.json", "tsconfig.json", ".gitignore"]) {
    cpSync(join(ROOT, f), join(dir, f), { recursive: true });
  }
  symlinkSync(join(ROOT, "node_modules"), join(dir, "node_modules"));
  writeFileSync(join(dir, "train.ts"), train);
  if (opts.runMd !== null) writeFileSync(join(dir, "run.md"), opts.runMd ?? "True\n");
  for (const [name, text] of Object.entries(opts.files ?? {})) writeFileSync(join(dir, name), text);
  // node_modules is a symlink here, which the `node_modules/` ignore pattern (a folder) misses.
  sh(dir, "git init -q && echo node_modules >> .git/info/exclude && git config user.name test "
    + "&& git config user.email test@example.com && git add -A && git commit -qm init");
  return dir;
}

export interface LoopRun { code: number | null; signal: string | null; out: string }

/** `bun loop.ts` in `dir` with a 1 s budget; --no-summarize unless asked for. */
export function loop(dir: string, args: string[], env: Record<string, string> = {}, summarize = false): LoopRun {
  const quiet = summarize ? [] : ["--no-summarize"];
  const r = Bun.spawnSync([BUN, "loop.ts", "--budget", "1", "--grace", "0", ...quiet, ...args], {
    cwd: dir, stdout: "pipe", stderr: "pipe",
    env: { ...process.env, AR_CACHE: fixture.cache, AR_BACKEND: "wasm", AR_TEST_ALLOWANCE_S: "30", ...env },
  });
  const signal = r.signalCode == null ? null : String(r.signalCode);
  return { code: r.exitCode, signal, out: r.stdout.toString() + r.stderr.toString() };
}

/** results.tsv's rows (every line must parse). */
export function rows(dir: string): ResultRow[] {
  const path = join(dir, "results.tsv");
  if (!existsSync(path)) return [];
  const parsed = parseResults(readFileSync(path, "utf8"));
  expect(parsed.errors).toEqual([]);
  return parsed.rows;
}

export function state(dir: string): State {
  const st = readState(join(dir, ".autoresearch", "state.json"));
  if (!st) throw new Error("no state.json");
  return st;
}

/** Replace text in train.ts and commit it (what an agent following program.md does). */
export function commitTrain(dir: string, from: string | RegExp, to: string, message: string): void {
  const path = join(dir, "train.ts");
  const before = readFileSync(path, "utf8");
  const after = before.replace(from, to);
  expect(after).not.toBe(before);
  writeFileSync(path, after);
  sh(dir, `git commit -qam '${message}'`);
}

export const head = (dir: string) => sh(dir, "git rev-parse HEAD");
export const clean = (dir: string) => sh(dir, "git status --porcelain");
export const last = <T>(xs: T[]): T => xs[xs.length - 1]!;
