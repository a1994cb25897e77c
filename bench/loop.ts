/**
 * Benchmark: seconds of loop overhead per experiment: everything `bun loop.ts` spends that is not
 * training (train.ts start-up, data loading, the final evaluation and checkpoint, the separate
 * `prepare.ts evaluate` re-measure, git, journaling, summarize_results.ts). On demand:
 *
 *   bun bench/loop.ts [--experiments 1] [--budget 2] [--summarize]
 *
 * It copies the project (not node_modules: a symlink) into a temp git repository, prepares the
 * SYNTHETIC set into a temp cache, runs
 *   bun loop.ts --max-experiments N --baseline-runs 1 --budget B --tag bench [--no-summarize]
 * and reads every experiment's training_seconds from the footers in .autoresearch/logs/. Prints
 *   loop experiments=2 wall_s=... training_s=... overhead_s_per_experiment=...
 * (the baseline run counts as an experiment: it is one train + evaluate like the others).
 */
import { cpSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseFooter, prepareData } from "../prepare.ts";

const ROOT = resolve(import.meta.dir, "..");

function sh(dir: string, cmd: string): void {
  const r = Bun.spawnSync(["sh", "-c", cmd], { cwd: dir, stdout: "pipe", stderr: "pipe" });
  if (r.exitCode !== 0) throw new Error(`${cmd}: ${r.stderr.toString()}`);
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  let experiments = 1, budget = 2, summarize = false;
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--experiments") experiments = Math.max(1, Number(argv[++i]));
    else if (argv[i] === "--budget") budget = Math.max(1, Number(argv[++i]));
    else if (argv[i] === "--summarize") summarize = true;
    else throw new Error(`unknown argument ${argv[i]}`);
  }
  if (!existsSync(join(ROOT, "loop.ts"))) {
    console.log("loop skipped: loop.ts does not exist yet");
    return;
  }
  const dir = mkdtempSync(join(tmpdir(), "arv-bench-loop-"));
  const cache = mkdtempSync(join(tmpdir(), "arv-bench-loop-cache-"));
  try {
    const skip = new Set(["node_modules", ".git", "checkpoints", "tests", "bench", ".autoresearch", "results.tsv"]);
    skip.add("run.log");
    for (const f of readdirSync(ROOT)) {
      if (!skip.has(f) && !f.startsWith(".autoresearch")) cpSync(join(ROOT, f), join(dir, f), { recursive: true });
    }
    symlinkSync(join(ROOT, "node_modules"), join(dir, "node_modules"));
    if (!existsSync(join(dir, "run.md"))) Bun.write(join(dir, "run.md"), "True\n");
    sh(dir, "git init -q && echo node_modules >> .git/info/exclude && git config user.name bench && " +
      "git config user.email bench@example.com && git add -A && git commit -qm init");
    await prepareData({ task: "waste", source: "synthetic", cacheRoot: cache, log: () => {} });
    const args = [
      "loop.ts", "--max-experiments", String(experiments), "--baseline-runs", "1", "--budget", String(budget),
      "--tag", "bench", ...(summarize ? [] : ["--no-summarize"]),
    ];
    const t0 = performance.now();
    const env = { ...process.env, AR_CACHE: cache };
    const r = Bun.spawnSync([process.execPath, ...args], { cwd: dir, stdout: "pipe", stderr: "pipe", env });
    const wall = (performance.now() - t0) / 1000;
    const out = r.stdout.toString() + r.stderr.toString();
    if (r.exitCode !== 0) {
      console.log(out.split("\n").slice(-30).join("\n"));
      throw new Error(`loop.ts exited with ${r.exitCode}`);
    }
    const logsDir = join(dir, ".autoresearch", "logs");
    const logs = existsSync(logsDir) ? readdirSync(logsDir).filter((f) => f.endsWith(".log")) : [];
    let training = 0;
    const per: string[] = [];
    for (const f of logs) {
      const footer = parseFooter(readFileSync(join(logsDir, f), "utf8"));
      const t = Number(footer.training_seconds ?? NaN);
      const total = Number(footer.total_seconds ?? NaN);
      if (Number.isFinite(t)) training += t;
      per.push(`${f}: training ${t.toFixed(1)} s, train.ts total ${total.toFixed(1)} s`);
    }
    const n = logs.length;
    if (n === 0) throw new Error("no experiment logs found under .autoresearch/logs");
    console.log(
      `loop experiments=${n} budget_s=${budget} wall_s=${wall.toFixed(1)} training_s=${training.toFixed(1)} ` +
      `overhead_s_per_experiment=${((wall - training) / n).toFixed(1)}` +
      (summarize ? " (with summarize)" : " (--no-summarize)"),
    );
    for (const p of per) console.log(`  ${p}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
    rmSync(cache, { recursive: true, force: true });
  }
}

if (import.meta.main) await main();
