/**
 * Benchmark: experiments per hour of the loop alone vs the loop with local workers (`--queue`), on
 * the same data, budget and proposer seed. On demand (it starts its own redis-server):
 *
 *   bun bench/queue.ts [--budget 20] [--window 270] [--workers 2] [--threads 1] [--source DIR]
 *
 * It copies the project (node_modules linked) into two temp git repositories, prepares --source
 * (default ../shared/datasets/waste3; SYNTHETIC data when that is absent, and it says so) into one
 * temp cache, then runs, one after the other, each for --window seconds of wall time:
 *   A: bun loop.ts --tag benchA --budget B --seed 0 --baseline-runs 2 --no-summarize
 *   B: the same with --queue redis://127.0.0.1:PORT, and --workers × `bun loop.ts worker` with
 *      AR_WASM_THREADS=--threads each
 * and counts the rows results.tsv holds when the window closes (then kills everything). Prints
 *   queue loop_alone rows=R1 per_hour=X1 | workers=2x1 rows=R2 per_hour=X2 | ratio=X2/X1
 * and both runs' rows side by side.
 */
import { cpSync, existsSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { cpus, tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { prepareData } from "../prepare.ts";
import { git } from "../lib/git.ts";
import { parseResults, type ResultRow } from "../lib/results.ts";
import { redisMissing, startRedis } from "../tests/redis_fixture.ts";

const ROOT = resolve(import.meta.dir, "..");
const BUN = process.execPath;

function arg(argv: string[], name: string, dflt: string): string {
  const i = argv.indexOf(name);
  return i >= 0 && argv[i + 1] !== undefined ? argv[i + 1]! : dflt;
}

/** The project's tracked files in a fresh git repository (node_modules linked), run.md True. */
function copyProject(): string {
  const dir = mkdtempSync(join(tmpdir(), "arv-bench-queue-"));
  for (const f of git(["ls-files"], { cwd: ROOT }).split("\n").filter(Boolean)) {
    cpSync(join(ROOT, f), join(dir, f), { recursive: true });
  }
  symlinkSync(join(ROOT, "node_modules"), join(dir, "node_modules"));
  writeFileSync(join(dir, "run.md"), "True\n");
  const sh = (cmd: string) => Bun.spawnSync(["sh", "-c", cmd], { cwd: dir });
  sh("git init -q && echo node_modules >> .git/info/exclude && git config user.name bench "
    + "&& git config user.email bench@example.com && git add -A && git commit -qm init");
  return dir;
}

function rowsOf(dir: string): ResultRow[] {
  const p = join(dir, "results.tsv");
  return existsSync(p) ? parseResults(readFileSync(p, "utf8")).rows : [];
}

async function window(procs: ReturnType<typeof Bun.spawn>[], dir: string, seconds: number): Promise<ResultRow[]> {
  await Bun.sleep(seconds * 1000);
  const rows = rowsOf(dir);
  for (const p of procs) {
    try { process.kill(-p.pid, "SIGKILL"); } catch { /* gone */ }
    try { p.kill("SIGKILL"); } catch { /* gone */ }
  }
  return rows;
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  const budget = Number(arg(argv, "--budget", "20"));
  const seconds = Number(arg(argv, "--window", "270"));
  const nWorkers = Number(arg(argv, "--workers", "2"));
  const threads = arg(argv, "--threads", "1");
  const why = redisMissing();
  if (why) {
    console.log(`queue skipped: ${why}`);
    return;
  }
  const wanted = resolve(arg(argv, "--source", join(ROOT, "..", "shared", "datasets", "waste3")));
  const source = existsSync(wanted) ? wanted : "synthetic";
  if (source === "synthetic") {
    console.log(`*** ${wanted} is absent: SYNTHETIC data (plumbing only, no model quality) ***`);
  }
  const cache = mkdtempSync(join(tmpdir(), "arv-bench-queue-cache-"));
  await prepareData({ task: "waste", source, cacheRoot: cache, log: () => {} });
  const env = { ...process.env, AR_CACHE: cache };
  const common = ["--budget", String(budget), "--seed", "0", "--baseline-runs", "2", "--no-summarize"];
  const spawn = (dir: string, args: string[], extra: Record<string, string> = {}) =>
    Bun.spawn([BUN, "loop.ts", ...args], {
      cwd: dir, stdout: "ignore", stderr: "ignore", env: { ...env, ...extra }, detached: true,
    });
  console.log(`queue: ${cpus().length} cores (${cpus()[0]?.model ?? "?"}), budget ${budget}s, window ${seconds}s, `
    + `source ${source}`);

  const a = copyProject();
  const rowsA = await window([spawn(a, ["--tag", "benchA", ...common])], a, seconds);

  const redis = await startRedis();
  const b = copyProject();
  const procs = Array.from({ length: nWorkers }, (_, i) =>
    spawn(b, ["worker", "--queue", redis.url, "--id", `bench${i + 1}`], { AR_WASM_THREADS: threads }));
  await Bun.sleep(2000);
  procs.push(spawn(b, ["--tag", "benchB", "--queue", redis.url, ...common]));
  const rowsB = await window(procs, b, seconds);
  await redis.stop();
  redis.cleanup();

  const perHour = (n: number) => (n * 3600) / seconds;
  console.log(`queue loop_alone rows=${rowsA.length} per_hour=${perHour(rowsA.length).toFixed(1)} | `
    + `workers=${nWorkers}x${threads} rows=${rowsB.length} per_hour=${perHour(rowsB.length).toFixed(1)} | `
    + `ratio=${rowsA.length > 0 ? (rowsB.length / rowsA.length).toFixed(2) : "n/a"}`);
  const cell = (r: ResultRow | undefined) => (r
    ? `${r.commit} ${r.status.padEnd(8)} ${(r.metrics.combined_score ?? NaN).toFixed(4)} ${r.description}`.slice(0, 70)
    : "").padEnd(70);
  console.log(`${"loop alone".padEnd(70)} | loop + ${nWorkers} workers`);
  for (let i = 0; i < Math.max(rowsA.length, rowsB.length); i++) console.log(`${cell(rowsA[i])} | ${cell(rowsB[i])}`);
  for (const d of [a, b, cache]) rmSync(d, { recursive: true, force: true });
}

await main();
