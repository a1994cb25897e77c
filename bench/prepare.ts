/**
 * Benchmark: prepare.ts on the real photo sets in ../shared/datasets (waste3, trashnet6): images/s
 * decoding + resizing into a fresh cache in a temp folder, the re-run that finds the cache fresh,
 * and loadCache() time (what every train.ts run pays before its first step). On demand:
 *
 *   bun bench/prepare.ts [--sets waste3,trashnet6] [--runs 2]
 *
 * Prints per set:
 *   prepare set=waste3 images=1164 decode_s=... images_per_s=... reuse_s=... load_cache_ms=... cache_mb=...
 * decode figures are the median of --runs fresh builds (each into its own empty cache); AR_DATASETS
 * overrides where the sets are.
 */
import { mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { cacheFiles, loadCache, prepareData, type Task } from "../prepare.ts";
import { median } from "./train_step.ts";

const DATASETS = resolve(process.env.AR_DATASETS ?? join(import.meta.dir, "..", "..", "shared", "datasets"));

/** The task each set is prepared as (trashnet6 has no waste mapping: a screening task on "trash"). */
const SETS: Record<string, { task: Task; positive?: string }> = {
  waste3: { task: "waste" },
  trashnet6: { task: "screening", positive: "trash" },
};

function parseArgs(argv: string[]): { sets: string[]; runs: number } {
  const a = { sets: Object.keys(SETS), runs: 2 };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--sets") a.sets = (argv[++i] ?? "").split(",").filter(Boolean);
    else if (argv[i] === "--runs") a.runs = Math.max(1, Number(argv[++i]));
    else throw new Error(`unknown argument ${argv[i]}`);
  }
  return a;
}

async function main(): Promise<void> {
  const a = parseArgs(process.argv.slice(2));
  for (const name of a.sets) {
    const cfg = SETS[name];
    if (cfg == null) throw new Error(`unknown set ${name} (${Object.keys(SETS).join(", ")})`);
    const source = join(DATASETS, name);
    const decode: number[] = [];
    let images = 0, reuse = 0, loadMs: number[] = [], mb = 0;
    for (let r = 0; r < a.runs; r++) {
      const cacheRoot = mkdtempSync(join(tmpdir(), "arv-bench-prepare-"));
      try {
        const t0 = performance.now();
        const res = await prepareData({ task: cfg.task, source, positive: cfg.positive, cacheRoot, log: () => {} });
        decode.push((performance.now() - t0) / 1000);
        images = res.manifest.items.length;
        mb = statSync(cacheFiles(res.dir).images).size / 1e6;
        const t1 = performance.now();
        const again = await prepareData({ task: cfg.task, source, positive: cfg.positive, cacheRoot, log: () => {} });
        if (!again.reused) throw new Error("second prepare did not reuse the cache");
        reuse = (performance.now() - t1) / 1000;
        for (let k = 0; k < 3; k++) {
          const t2 = performance.now();
          await loadCache(res.dir);
          loadMs.push(performance.now() - t2);
        }
      } finally {
        rmSync(cacheRoot, { recursive: true, force: true });
      }
    }
    const d = median(decode);
    const runs = decode.map((s) => s.toFixed(2)).join(" ");
    console.log(
      `prepare set=${name} task=${cfg.task} images=${images} decode_s=${d.toFixed(2)} ` +
      `images_per_s=${(images / d).toFixed(1)} reuse_s=${reuse.toFixed(2)} ` +
      `load_cache_ms=${median(loadMs).toFixed(1)} cache_mb=${mb.toFixed(1)}  (runs: ${runs} s)`,
    );
  }
}

if (import.meta.main) await main();
