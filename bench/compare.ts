/**
 * Our training step vs PyTorch's on the same model, batch and thread count, timed INTERLEAVED in
 * one invocation (the machine may be shared: alternating blocks of steps gives both sides the same
 * background load, and the spread across rounds says how noisy it was). On demand:
 *
 *   bun bench/compare.ts [--models baseline,mobilenet] [--threads 1,2] [--rounds 6] [--block 5]
 *                        [--before] [--channels-last]
 *
 * For each model and thread count it starts one warm process per side and then, round after round,
 * asks each side in turn for `--block` steps:
 *   ours    bun bench/train_step.ts --serve   (tfjs wasm, AR_WASM_THREADS=N)
 *   torch   /usr/bin/python3 bench/torch_peer.py --serve   (torch.set_num_threads(N))
 *   before  (with --before, threads 1 only) ours with the SIMD kernels and skipped input gradients off
 * and prints per side the median ms/step over all timed steps, and the ratio ours/PyTorch as
 * SPEED (images/s ours ÷ images/s PyTorch: 1.0 = parity, 0.5 = half as fast), the median of the
 * per-round ratios with their min..max.
 *
 * PyTorch is Debian's python3-torch (1.13, CPU). If /usr/bin/python3 cannot import torch, this
 * runs `apt-get update` and `apt-get install -y python3-torch` (needs root; otherwise it says what
 * to run and compares nothing).
 */
import { join, resolve } from "node:path";
import { median } from "./train_step.ts";

const ROOT = resolve(import.meta.dir, "..");
const PYTHON = "/usr/bin/python3";

interface Args {
  models: string[];
  threads: number[];
  rounds: number;
  block: number;
  before: boolean;
  channelsLast: boolean;
}

function parseArgs(argv: string[]): Args {
  const a: Args = {
    models: ["baseline", "mobilenet"], threads: [1, 2], rounds: 6, block: 5, before: false, channelsLast: false,
  };
  for (let i = 0; i < argv.length; i++) {
    const v = argv[i + 1] ?? "";
    switch (argv[i]) {
      case "--models": a.models = v.split(",").filter(Boolean); i++; break;
      case "--threads": a.threads = v.split(",").map(Number).filter((n) => Number.isInteger(n) && n > 0); i++; break;
      case "--rounds": a.rounds = Math.max(1, Number(v)); i++; break;
      case "--block": a.block = Math.max(1, Number(v)); i++; break;
      case "--before": a.before = true; break;
      case "--channels-last": a.channelsLast = true; break;
      default: throw new Error(`unknown argument ${argv[i]}`);
    }
  }
  return a;
}

function torchAvailable(): boolean {
  return Bun.spawnSync([PYTHON, "-c", "import torch"], { stdout: "ignore", stderr: "ignore" }).exitCode === 0;
}

function ensureTorch(): boolean {
  if (torchAvailable()) return true;
  if (process.getuid?.() !== 0) {
    console.log("compare: PyTorch missing; run as root: apt-get update && apt-get install -y python3-torch");
    return false;
  }
  console.log("compare: installing Debian's python3-torch (apt-get update; apt-get install -y python3-torch) ...");
  for (const cmd of [["apt-get", "update"], ["apt-get", "install", "-y", "python3-torch"]]) {
    const env = { ...process.env, DEBIAN_FRONTEND: "noninteractive" };
    const r = Bun.spawnSync(cmd, { stdout: "ignore", stderr: "pipe", env });
    if (r.exitCode !== 0) {
      console.log(`compare: ${cmd.join(" ")} failed: ${r.stderr.toString().trim().split("\n").at(-1)}`);
      return false;
    }
  }
  return torchAvailable();
}

/** A warm benchmark process speaking "run K" -> "ms t1 .. tK". */
class Side {
  private proc: ReturnType<typeof Bun.spawn<"pipe", "pipe", "inherit">>;
  private lines: AsyncGenerator<string>;
  label = "";
  samples: number[] = [];
  blockMedians: number[] = [];

  constructor(readonly name: string, cmd: string[], env: Record<string, string | undefined>) {
    this.proc = Bun.spawn(cmd, { cwd: ROOT, env, stdin: "pipe", stdout: "pipe", stderr: "inherit" });
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

async function compareGroup(model: string, threads: number, a: Args, withTorch: boolean): Promise<void> {
  const trainStep = [process.execPath, join("bench", "train_step.ts")];
  const specRun = Bun.spawnSync([...trainStep, "--spec-json", "--models", model], { cwd: ROOT });
  const specJson = specRun.stdout.toString().trim();
  const spec = JSON.parse(specJson) as { batch: number };
  const ours = (before: boolean) => new Side(
    before ? "before" : "ours",
    [...trainStep, "--serve", "--models", model, "--backends", "wasm", ...(before ? ["--before"] : [])],
    { ...process.env, AR_WASM_THREADS: String(threads) },
  );
  const sides: Side[] = [ours(false)];
  if (withTorch) {
    const peer = [PYTHON, join("bench", "torch_peer.py"), "--spec", specJson, "--threads", String(threads), "--serve"];
    sides.push(new Side("torch", [...peer, ...(a.channelsLast ? ["--channels-last"] : [])], { ...process.env }));
  }
  if (a.before && threads === 1) sides.push(ours(true));
  try {
    await Promise.all(sides.map((s) => s.ready()));
    for (let r = 0; r < a.rounds; r++) {
      // Rotate who goes first, so no side always follows the same neighbour.
      for (let i = 0; i < sides.length; i++) await sides[(i + r) % sides.length]!.run(a.block);
    }
  } finally {
    await Promise.all(sides.map((s) => s.quit().catch(() => {})));
  }
  const our = sides[0]!;
  const ms = (s: Side) => median(s.samples);
  const imagesPerS = (s: Side) => fmt((spec.batch * 1000) / ms(s));
  const parts = sides.map((s) => `${s.name}_ms=${fmt(ms(s))} ${s.name}_images_per_s=${imagesPerS(s)}`);
  let line = `compare model=${model} threads=${threads} ${parts.join(" ")}`;
  /** Their ms per step over ours, round by round: median, then the range in brackets. */
  const ratio = (other: Side) => {
    const perRound = our.blockMedians.map((m, i) => other.blockMedians[i]! / m);
    return [fmt(median(perRound), 2), `(rounds ${fmt(Math.min(...perRound), 2)}..${fmt(Math.max(...perRound), 2)})`];
  };
  const torch = sides.find((s) => s.name === "torch");
  if (torch != null) {
    const [mid, range] = ratio(torch);
    line += ` ratio_ours_over_torch=${mid} ${range}`;
  }
  const before = sides.find((s) => s.name === "before");
  if (before != null) {
    const [mid, range] = ratio(before);
    line += ` speedup_vs_before=${mid}x ${range}`;
  }
  console.log(line);
  const labels = sides.map((s) => `${s.name} = ${s.label}`).join("; ");
  console.log(`  sides: ${labels}; ${a.rounds} rounds x ${a.block} steps each, ms per step median over all`);
}

async function main(): Promise<void> {
  const a = parseArgs(process.argv.slice(2));
  const withTorch = ensureTorch();
  for (const model of a.models) {
    for (const threads of a.threads) await compareGroup(model, threads, a, withTorch);
  }
}

if (import.meta.main) await main();
