/**
 * Our training step vs PyTorch's on the same model, batch and thread count, timed INTERLEAVED in
 * one invocation (the machine may be shared: alternating blocks of steps gives both sides the same
 * background load, and the spread across rounds says how noisy it was). On demand:
 *
 *   bun bench/compare.ts [--models baseline,mobilenet] [--threads 1,2] [--rounds 6] [--block 5] [--warmup 40]
 *                        [--before] [--channels-last] [--features 1,8] [--no-ceiling] [--vs DIR]
 *
 * The first line names the machine: CPU model, cores, the BLAS PyTorch runs on, PyTorch's version,
 * the thread counts compared, `two_copies=` (bench/ceiling.ts: one single-threaded SIMD loop alone
 * vs two copies at once, the most any second thread can give here) and `two_copies_memory=` (the same
 * for a pass that streams memory, as batchnorm, ReLU and max-pool do: the memory bus is shared).
 *
 * For each model and thread count it starts one process per side, lets each run `--warmup` untimed
 * training steps (a training run takes thousands of steps, and the time to compare is theirs: Bun's JIT
 * compiles the step's JavaScript for the first few dozen, on a thread that takes a core from a two-thread
 * side and an idle one from a one-thread side), and then, round after round, asks each side in turn for
 * `--block` steps:
 *   ours    bun bench/train_step.ts --serve   (tfjs wasm, AR_WASM_THREADS=N)
 *   torch   /usr/bin/python3 bench/torch_peer.py --serve   (torch.set_num_threads(N))
 *   before  (with --before, threads 1 only) ours with the SIMD kernels and skipped input gradients off
 * and prints per side the median ms/step over all timed steps, and the ratio ours/PyTorch as
 * SPEED (images/s ours ÷ images/s PyTorch: 1.0 = parity, 0.5 = half as fast), the median of the
 * per-round ratios with their min..max. Every line ends with the per-thread speed-up of each side
 * (`ours_2t_over_1t=`) once both thread counts of a model have run.
 *
 * --vs DIR adds our sides run from another checkout of the project (e.g. `git worktree add DIR COMMIT`
 * for the commit before a change), as `vs@N`, with `speedup_vs_other_checkout=` (ours ÷ theirs speed).
 *
 * --features 1,8 adds the frozen backbone's forward pass at those batch sizes, 224 px: our nsfwjs
 * MobileNetV2 (bench/features.ts --serve) vs torchvision's MobileNetV2 (torch_peer.py --features),
 * same protocol, reported as ms per image.
 *
 * PyTorch is Debian's python3-torch (1.13, CPU) on OpenBLAS: with Debian's default reference BLAS
 * it is several times slower and a ratio against it means little. If /usr/bin/python3 cannot import
 * torch and torchvision, or libblas.so.3 is not OpenBLAS, this runs `apt-get update` and
 * `apt-get install -y python3-torch python3-torchvision libopenblas0-pthread` (needs root; otherwise
 * it says what to run and compares nothing).
 */
import { existsSync } from "node:fs";
import { join, resolve } from "node:path";
import { median } from "./train_step.ts";

const ROOT = resolve(import.meta.dir, "..");
const PYTHON = "/usr/bin/python3";

interface Args {
  models: string[];
  threads: number[];
  rounds: number;
  block: number;
  /** Untimed training steps each side runs before the first round. */
  warmup: number;
  before: boolean;
  channelsLast: boolean;
  /** Backbone forward batch sizes (empty: no backbone groups). */
  features: number[];
  ceiling: boolean;
  /** Another checkout of this project (e.g. the commit before a change): its sides run as "vs@N". */
  vs?: string;
}

function parseArgs(argv: string[]): Args {
  const a: Args = {
    models: ["baseline", "mobilenet"], threads: [1, 2], rounds: 6, block: 5, warmup: 40, before: false,
    channelsLast: false,
    features: [], ceiling: true,
  };
  for (let i = 0; i < argv.length; i++) {
    const v = argv[i + 1] ?? "";
    switch (argv[i]) {
      case "--models": a.models = v.split(",").filter((m) => m !== "" && m !== "none"); i++; break;
      case "--threads": a.threads = v.split(",").map(Number).filter((n) => Number.isInteger(n) && n > 0); i++; break;
      case "--rounds": a.rounds = Math.max(1, Number(v)); i++; break;
      case "--block": a.block = Math.max(1, Number(v)); i++; break;
      case "--warmup": a.warmup = Math.max(0, Number(v)); i++; break;
      case "--before": a.before = true; break;
      case "--channels-last": a.channelsLast = true; break;
      case "--features": a.features = v.split(",").map(Number).filter((n) => Number.isInteger(n) && n > 0); i++; break;
      case "--no-ceiling": a.ceiling = false; break;
      case "--vs": a.vs = resolve(v); i++; break;
      default: throw new Error(`unknown argument ${argv[i]}`);
    }
  }
  return a;
}

const run = (cmd: string[]) => Bun.spawnSync(cmd, { stdout: "pipe", stderr: "ignore" });

function torchAvailable(): boolean {
  return run([PYTHON, "-c", "import torch, torchvision"]).exitCode === 0;
}

/** The library behind libblas.so.3 (Debian's alternatives), e.g. ".../openblas-pthread/libblas.so.3". */
function systemBlas(): string {
  const q = run(["update-alternatives", "--query", "libblas.so.3-x86_64-linux-gnu"]);
  return /^Value: (.*)$/m.exec(q.stdout.toString())?.[1]?.trim() ?? "unknown";
}

function ensureTorch(): boolean {
  if (torchAvailable() && systemBlas().includes("openblas")) return true;
  const pkgs = ["python3-torch", "python3-torchvision", "libopenblas0-pthread"];
  if (process.getuid?.() !== 0) {
    const how = `apt-get update && apt-get install -y ${pkgs.join(" ")}`;
    console.log(`compare: PyTorch or OpenBLAS missing; run as root: ${how}`);
    return torchAvailable();
  }
  console.log(`compare: installing ${pkgs.join(" ")} (apt-get update; apt-get install -y ...) ...`);
  for (const cmd of [["apt-get", "update"], ["apt-get", "install", "-y", ...pkgs]]) {
    const env = { ...process.env, DEBIAN_FRONTEND: "noninteractive" };
    const r = Bun.spawnSync(cmd, { stdout: "ignore", stderr: "pipe", env });
    if (r.exitCode !== 0) {
      console.log(`compare: ${cmd.join(" ")} failed: ${r.stderr.toString().trim().split("\n").at(-1)}`);
      return false;
    }
  }
  return torchAvailable();
}

/** CPU model name and logical core count, from /proc/cpuinfo. */
function cpuModel(): string {
  const info = run(["cat", "/proc/cpuinfo"]).stdout.toString();
  const name = /^model name\s*:\s*(.*)$/m.exec(info)?.[1]?.trim() ?? "unknown CPU";
  const flags = /^flags\s*:\s*(.*)$/m.exec(info)?.[1]?.split(" ") ?? [];
  const simd = flags.includes("avx512f") ? "AVX-512" : flags.includes("avx2") ? "AVX2" : "no AVX2";
  return `"${name}" (${simd}) cores=${navigator.hardwareConcurrency}`;
}

/** PyTorch's version and the BLAS its build says it uses (Debian's: "generic" = libblas.so.3). */
function torchFacts(): string {
  const py = "import torch,re; " +
    "print(torch.__version__, re.search(r'BLAS_INFO=(\\w+)', torch.__config__.show()).group(1))";
  const [version, blasInfo] = run([PYTHON, "-c", py]).stdout.toString().trim().split(" ");
  return `torch=${version ?? "missing"} torch_blas_info=${blasInfo ?? "?"}`;
}

/** A warm benchmark process speaking "run K" -> "ms t1 .. tK". */
class Side {
  private proc: ReturnType<typeof Bun.spawn<"pipe", "pipe", "inherit">>;
  private lines: AsyncGenerator<string>;
  label = "";
  samples: number[] = [];
  blockMedians: number[] = [];

  constructor(readonly name: string, cmd: string[], env: Record<string, string | undefined>, cwd = ROOT) {
    this.proc = Bun.spawn(cmd, { cwd, env, stdin: "pipe", stdout: "pipe", stderr: "inherit" });
    this.lines = Side.readLines(this.proc.stdout);
  }

  private static async *readLines(stream: ReadableStream<Uint8Array>): AsyncGenerator<string> {
    const decoder = new TextDecoder();
    let buf = "";
    const reader = stream.getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      let nl: number;
      while ((nl = buf.indexOf("\n")) >= 0) {
        yield buf.slice(0, nl);
        buf = buf.slice(nl + 1);
      }
    }
  }

  private async expect(prefix: string): Promise<string> {
    for (;;) {
      const { value, done } = await this.lines.next();
      if (done) throw new Error(`${this.name}: process ended before answering '${prefix}'`);
      if (value.startsWith(prefix)) return value.slice(prefix.length).trim();
    }
  }

  async ready(): Promise<void> {
    this.label = await this.expect("ready ");
  }

  async run(k: number): Promise<void> {
    this.proc.stdin.write(`run ${k}\n`);
    this.proc.stdin.flush();
    const ms = (await this.expect("ms ")).split(/\s+/).map(Number);
    this.samples.push(...ms);
    this.blockMedians.push(median(ms));
  }

  async quit(): Promise<void> {
    this.proc.stdin.write("quit\n");
    this.proc.stdin.end();
    await this.proc.exited;
  }
}

const fmt = (x: number, d = 1) => x.toFixed(d);

/** Side b's ms per step over side a's, round by round: "median (rounds min..max)"; > 1 = a is faster. */
function speedRatio(a: Side, b: Side): string {
  const perRound = a.blockMedians.map((m, i) => b.blockMedians[i]! / m);
  return `${fmt(median(perRound), 2)} (rounds ${fmt(Math.min(...perRound), 2)}..${fmt(Math.max(...perRound), 2)})`;
}

/**
 * Times the sides round-robin (the first side of each round rotates, so none always follows the same
 * neighbour) and returns them; every process is started first and told to quit at the end.
 */
/** Pause before each side's block of steps, for the previous side's threads to go to sleep. */
const SETTLE_MS = 500;

async function interleave(sides: Side[], a: Args): Promise<Side[]> {
  try {
    await Promise.all(sides.map((s) => s.ready()));
    for (let r = 0; r < a.rounds; r++) {
      for (let i = 0; i < sides.length; i++) {
        // The side before may leave threads spinning (OpenMP and OpenBLAS wait actively for a while after
        // their last op): a side timed during that spin would lose a core it should have.
        await Bun.sleep(SETTLE_MS);
        await sides[(i + r) % sides.length]!.run(a.block);
      }
    }
  } finally {
    await Promise.all(sides.map((s) => s.quit().catch(() => {})));
  }
  return sides;
}

/**
 * One model (or backbone batch), every thread count, both sides, all in one interleaved set of rounds:
 * the per-thread-count lines (ours vs PyTorch) and the 1 -> N thread scaling of each side come from the
 * same rounds. `perStep` images per timed step.
 */
function report(kind: string, what: string, sides: Side[], threads: number[], perStep: number): void {
  const ms = (s: Side) => median(s.samples);
  const find = (name: string, t: number) => sides.find((s) => s.name === `${name}@${t}`);
  for (const t of threads) {
    const our = find("ours", t)!;
    const mine = sides.filter((s) => s.name.endsWith(`@${t}`));
    const parts = mine.map((s) => {
      const n = s.name.split("@")[0];
      return `${n}_ms=${fmt(ms(s))} ${n}_images_per_s=${fmt((perStep * 1000) / ms(s))}` +
        (perStep > 1 && kind === "features" ? ` ${n}_ms_per_image=${fmt(ms(s) / perStep)}` : "");
    });
    let line = `${kind} ${what} threads=${t} ${parts.join(" ")}`;
    const torch = find("torch", t);
    if (torch != null) line += ` ratio_ours_over_torch=${speedRatio(our, torch)}`;
    const before = find("before", t);
    if (before != null) line += ` speedup_vs_before=${speedRatio(our, before)}`;
    const vs = find("vs", t);
    if (vs != null) line += ` speedup_vs_other_checkout=${speedRatio(our, vs)}`;
    console.log(line);
  }
  const t1 = threads[0]!;
  for (const t of threads.slice(1)) {
    const scale = ["ours", "torch", "vs"].flatMap((n) => {
      const [a, b] = [find(n, t1), find(n, t)];
      return a == null || b == null ? [] : [`${n}_${t}t_over_${t1}t=${speedRatio(b, a)}`];
    });
    console.log(`  scaling ${what}: ${scale.join(" ")}`);
  }
  const labels = sides.map((s) => `${s.name} = ${s.label}`).join("; ");
  console.log(`  sides: ${labels}; ms per step median over all`);
}

async function compareModel(model: string, a: Args, withTorch: boolean): Promise<void> {
  const trainStep = [process.execPath, join("bench", "train_step.ts")];
  const warmup = ["--warmup", String(a.warmup)];
  const serve = (...more: string[]) => [...trainStep, "--serve", "--models", model, ...more, ...warmup];
  const specRun = Bun.spawnSync([...trainStep, "--spec-json", "--models", model], { cwd: ROOT });
  const specJson = specRun.stdout.toString().trim();
  const spec = JSON.parse(specJson) as { batch: number };
  const sides: Side[] = [];
  for (const t of a.threads) {
    const env = { ...process.env, AR_WASM_THREADS: String(t) };
    sides.push(new Side(`ours@${t}`, serve("--backends", "wasm"), env));
    if (withTorch) {
      const peer = [PYTHON, join("bench", "torch_peer.py"), "--spec", specJson, "--threads", String(t), "--serve"];
      peer.push(...warmup);
      sides.push(new Side(`torch@${t}`, [...peer, ...(a.channelsLast ? ["--channels-last"] : [])], { ...process.env }));
    }
    if (a.before && t === 1) {
      sides.push(new Side(`before@${t}`, serve("--backends", "wasm", "--before"), env));
    }
    if (a.vs != null) sides.push(new Side(`vs@${t}`, serve(), env, a.vs));
  }
  report("compare", `model=${model}`, await interleave(sides, a), a.threads, spec.batch);
  console.log(`  ${a.rounds} rounds x ${a.block} steps of batch ${spec.batch} per side, after ${a.warmup} untimed`);
}

async function compareFeatures(batch: number, a: Args, withTorch: boolean): Promise<void> {
  const sides: Side[] = [];
  for (const t of a.threads) {
    const env = { ...process.env, AR_WASM_THREADS: String(t) };
    const ours = [process.execPath, join("bench", "features.ts"), "--serve", "--batch", String(batch)];
    sides.push(new Side(`ours@${t}`, ours, env));
    // (a checkout without bench/features.ts has no such side)
    if (a.vs != null && existsSync(join(a.vs, "bench", "features.ts"))) {
      sides.push(new Side(`vs@${t}`, ours, env, a.vs));
    }
    if (withTorch) {
      const peer = [PYTHON, join("bench", "torch_peer.py"), "--features", String(batch), "--threads", String(t)];
      peer.push("--serve");
      sides.push(new Side(`torch@${t}`, [...peer, ...(a.channelsLast ? ["--channels-last"] : [])], { ...process.env }));
    }
  }
  report("features", `mobilenetv2_224 batch=${batch}`, await interleave(sides, a), a.threads, batch);
  console.log(`  ${a.rounds} rounds x ${a.block} batches per side`);
}

/**
 * bench/ceiling.ts alone vs two copies at once, interleaved: what a second core can give here, to a
 * compute loop (`two_copies=`) and to a pass that streams memory (`two_copies_memory=`).
 */
async function twoCopies(a: Args, memory: boolean): Promise<string> {
  const cmd = [process.execPath, join("bench", "ceiling.ts"), ...(memory ? ["--memory"] : [])];
  const [x, y] = [new Side("one", cmd, { ...process.env }), new Side("two", cmd, { ...process.env })];
  const alone: number[] = [], both: number[] = [];
  try {
    await Promise.all([x.ready(), y.ready()]);
    for (let r = 0; r < Math.max(3, a.rounds); r++) {
      await x.run(20);
      alone.push(x.blockMedians.at(-1)!);
      await Promise.all([x.run(20), y.run(20)]);
      both.push((x.blockMedians.at(-1)! + y.blockMedians.at(-1)!) / 2);
    }
  } finally {
    await Promise.all([x.quit().catch(() => {}), y.quit().catch(() => {})]);
  }
  // Two copies' throughput over one's: 2 x (time alone / time each when both run).
  const perRound = alone.map((m, i) => (2 * m) / both[i]!);
  const range = `${fmt(Math.min(...perRound), 2)}..${fmt(Math.max(...perRound), 2)}`;
  return `two_copies${memory ? "_memory" : ""}=${fmt(median(perRound), 2)}x (rounds ${range})`;
}

async function main(): Promise<void> {
  const a = parseArgs(process.argv.slice(2));
  const withTorch = ensureTorch();
  const ceiling = a.ceiling ? `${await twoCopies(a, false)} ${await twoCopies(a, true)}` : "two_copies=not measured";
  const torch = withTorch ? torchFacts() : "torch=missing";
  console.log(`machine cpu=${cpuModel()} blas=${systemBlas()} ${torch} threads=${a.threads.join(",")} ${ceiling} ` +
    `bun=${Bun.version}`);
  for (const model of a.models) await compareModel(model, a, withTorch);
  for (const batch of a.features) await compareFeatures(batch, a, withTorch);
}

if (import.meta.main) await main();
