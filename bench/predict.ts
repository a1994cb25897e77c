/**
 * Benchmark: predict.ts cold start for one image, and throughput for 200 real images. On demand:
 *
 *   bun bench/predict.ts [--model DIR] [--runs 5] [--images 200] [--batch 32]
 *
 * Every figure is the wall-clock of a whole `bun predict.ts …` process (start-up, imports, backend,
 * model load, decoding, inference, output), as a person or the loop would see it:
 *   cold_start      bun predict.ts one.jpg --model DIR           median of --runs (after one unrecorded run)
 *   help_floor      bun predict.ts --help                        Bun + flag parsing only: the floor
 *   throughput      bun predict.ts <200 paths> --json --model DIR  images/s incl. start-up, and without it
 * Without --model it uses (and, if missing, trains in ~1 minute) a checkpoint in
 * $TMPDIR/arv-bench-predict/: waste3 from ../shared prepared into its own cache, `train.ts --budget 10`.
 * AR_BACKEND is passed through (default wasm).
 */
import { existsSync, readdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { type } from "arktype";
import { cac } from "cac";

const ROOT = resolve(import.meta.dir, "..");
const DATASETS = resolve(process.env.AR_DATASETS ?? join(ROOT, "..", "shared", "datasets"));
const BENCH_DIR = join(tmpdir(), "arv-bench-predict");
const ENV = { ...process.env, AR_BACKEND: process.env.AR_BACKEND ?? "wasm" };

const Flags = type({
  "model?": "string",
  runs: "1 <= number.integer <= 50",
  images: "1 <= number.integer <= 5000",
  batch: "1 <= number.integer <= 4096",
});

interface Run { seconds: number; code: number; stdout: string; stderr: string }

function run(args: string[], env: Record<string, string | undefined> = ENV): Run {
  const t0 = performance.now();
  const r = Bun.spawnSync([process.execPath, ...args], { cwd: ROOT, env, stdout: "pipe", stderr: "pipe" });
  const seconds = (performance.now() - t0) / 1000;
  return { seconds, code: r.exitCode ?? -1, stdout: r.stdout.toString(), stderr: r.stderr.toString() };
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)]!;
const list = (xs: number[]) => xs.map((x) => x.toFixed(3)).join(" ");

/** The first `n` image files of a dataset's class folders, taken round-robin so every class appears. */
function imagesFrom(set: string, n: number): string[] {
  const root = join(DATASETS, set);
  const classes = readdirSync(root, { withFileTypes: true }).filter((d) => d.isDirectory()).map((d) => d.name).sort();
  const photos = (c: string) => readdirSync(join(root, c)).filter((f) => /\.(jpe?g|png)$/i.test(f)).sort();
  const files = classes.map((c) => photos(c).map((f) => join(root, c, f)));
  const out: string[] = [];
  for (let i = 0; out.length < n && files.some((f) => i < f.length); i++) {
    for (const f of files) if (i < f.length && out.length < n) out.push(f[i]!);
  }
  return out;
}

async function ensureModel(): Promise<string> {
  const ckpt = join(BENCH_DIR, "ckpt");
  if (existsSync(join(ckpt, "meta.json"))) return ckpt;
  console.log(`no checkpoint at ${ckpt}: preparing waste3 and training one (train.ts --budget 10)…`);
  const { prepareData } = await import("../prepare.ts");
  const cache = join(BENCH_DIR, "cache");
  await prepareData({ task: "waste", source: join(DATASETS, "waste3"), cacheRoot: cache, log: () => {} });
  const r = run(["train.ts", "--budget", "10", "--checkpoint", ckpt], { ...ENV, AR_CACHE: cache });
  if (r.code !== 0) throw new Error(`train.ts failed:\n${(r.stdout + r.stderr).slice(-2000)}`);
  return ckpt;
}

async function main(): Promise<void> {
  const cli = cac("bench/predict.ts");
  cli.option("--model <dir>", "checkpoint (default: one trained for the bench)")
    .option("--runs <n>", "cold-start repetitions", { default: 5 })
    .option("--images <n>", "images for the throughput run", { default: 200 })
    .option("--batch <n>", "predict.ts --batch", { default: 32 });
  const o = cli.parse(process.argv, { run: false }).options;
  const given = o.model !== undefined ? { model: String(o.model) } : {};
  const flags = Flags({ runs: Number(o.runs), images: Number(o.images), batch: Number(o.batch), ...given });
  if (flags instanceof type.errors) throw new Error(`bench/predict.ts: ${flags.summary}`);
  if (!existsSync(join(DATASETS, "waste3"))) throw new Error(`${DATASETS}: no waste3/ here (set AR_DATASETS)`);
  const ckpt = flags.model ?? (await ensureModel());

  const one = imagesFrom("waste3", 1)[0]!;
  const half = flags.images / 2;
  const many = [...imagesFrom("waste3", Math.ceil(half)), ...imagesFrom("trashnet6", Math.floor(half))];
  const cores = navigator.hardwareConcurrency;
  console.log(`model: ${ckpt}   backend: AR_BACKEND=${ENV.AR_BACKEND}   cores: ${cores}   bun ${Bun.version}`);

  const coldArgs = ["predict.ts", one, "--model", ckpt];
  const first = run(coldArgs);
  if (first.code !== 0) throw new Error(`predict.ts failed:\n${first.stderr}`);
  const cold = Array.from({ length: flags.runs }, () => run(coldArgs).seconds);
  const help = Array.from({ length: flags.runs }, () => run(["predict.ts", "--help"]).seconds);
  console.log(`cold_start  bun ${coldArgs.join(" ")}`);
  const unrecorded = `(first, unrecorded: ${first.seconds.toFixed(3)} s)`;
  console.log(`            median ${median(cold).toFixed(3)} s over ${flags.runs} runs [${list(cold)}] ${unrecorded}`);
  console.log(`help_floor  bun predict.ts --help: median ${median(help).toFixed(3)} s [${list(help)}]`);

  const tpArgs = ["predict.ts", ...many, "--json", "--batch", String(flags.batch), "--model", ckpt];
  const tp = Array.from({ length: 3 }, () => {
    const r = run(tpArgs);
    const ok = r.stdout.trim().split("\n").filter((l) => l.startsWith('{"ok":true')).length;
    if (ok !== many.length) {
      throw new Error(`throughput run predicted ${ok} of ${many.length} images:\n${r.stderr.slice(-1000)}`);
    }
    return r.seconds;
  });
  const wall = median(tp);
  // Under load a many-photo run can take less than the median one-photo cold start: no steady rate then.
  const afterStart = wall - median(cold);
  const steady = afterStart > 0.05 * wall ? (many.length / afterStart).toFixed(1) : "n/a";
  const perS = (many.length / wall).toFixed(1);
  const n = many.length;
  const command = `bun predict.ts <${n} images: waste3 + trashnet6> --json --batch ${flags.batch} --model ${ckpt}`;
  console.log(`throughput  ${command}`);
  console.log(`            median wall ${wall.toFixed(3)} s over 3 runs [${list(tp)}]: ` +
    `${perS} images/s incl. start-up, ${steady} images/s after start-up`);
  console.log(`predict_bench cold_start_s=${median(cold).toFixed(3)} images_per_s=${perS} ` +
    `images_per_s_after_startup=${steady} n=${n} batch=${flags.batch}`);
}

if (import.meta.main) {
  main().catch((err: unknown) => {
    console.error(`error: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  });
}
