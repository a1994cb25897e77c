/**
 * The keep rule and the numbers it rests on: which of two measured runs is better, the noise
 * floor of the baseline repeats, their mean, the confirmation of a candidate over other seeds,
 * and which runs of one code ran at a comparable speed. loop.ts decides with these and
 * summarize_results.ts reports with them, so a summary never disagrees with what the loop did.
 */
import { TASK_METRICS, type Task } from "../prepare.ts";
import type { Noise, State } from "./journal.ts";

/** The session's primary, or why `wanted` cannot be one for `task`. */
export function checkPrimary(task: Task, wanted: string | undefined): { primary: string } | { error: string } {
  // TASK_METRICS (prepare.ts) lists what a task may keep on, its default first.
  const choices = TASK_METRICS[task].primaries;
  if (wanted === undefined) return { primary: TASK_METRICS[task].primary };
  if (choices.includes(wanted)) return { primary: wanted };
  return { error: `--primary ${wanted}: task ${task} keeps on one of ${choices.join(", ")}` };
}

/** A baseline whose primary is no more than the noise floor above the trivial score has learned nothing visible. */
export function atTrivial(baseline: number, trivial: number, floor: number): boolean {
  return baseline - trivial <= floor + EQUAL;
}

/**
 * The loop's warning when the baseline is within the noise floor of the trivial score, or null.
 * `positive` names the screened class and `prevalence` its share, to say what the constant is.
 */
export function trivialWarning(a: {
  primary: string; baseline: number; trivial: number; floor: number; positive: string | null; prevalence?: number;
}): string | null {
  if (!atTrivial(a.baseline, a.trivial, a.floor)) return null;
  const v = (x: number) => x.toFixed(4);
  const head = `WARNING: the baseline's ${a.primary} ${v(a.baseline)} is the trivial rate`;
  if (a.primary === "balanced_bin_acc") {
    return `${head} (any constant answer scores ${v(a.trivial)}): the model does not tell the positive class `
      + "from the rest yet";
  }
  const side = a.positive === null || a.prevalence === undefined ? "the majority side"
    : a.prevalence < 0.5 ? `'not ${a.positive}'` : `'${a.positive}'`;
  const why = `${a.primary} cannot tell a real screen from a constant`;
  const hint = a.primary === "bin_acc" ? "; consider --primary balanced_bin_acc" : "";
  return `${head} (always ${side} scores ${v(a.trivial)}): ${why}${hint}`;
}

/** Metric differences below this are float noise in the same counts, i.e. "equal". */
const EQUAL = 1e-9;

/** Which metric decides, which breaks a tie, and which count down (a task's TASK_METRICS entry). */
export interface Ranking {
  primary: string;
  secondary: string;
  lowerIsBetter: readonly string[];
}

type Metrics = Record<string, number>;

/** How much better `candidate` is than `reference` on `metric`: positive is an improvement. */
export function gain(candidate: Metrics, reference: Metrics, metric: string, lowerIsBetter: readonly string[]): number {
  return (lowerIsBetter.includes(metric) ? -1 : 1) * ((candidate[metric] ?? 0) - (reference[metric] ?? 0));
}

/** `a` beats `b`: a better primary, or an equal primary and a better secondary (no noise floor). */
export function outranks(a: Metrics, b: Metrics, r: Ranking): boolean {
  const g1 = gain(a, b, r.primary, r.lowerIsBetter);
  return g1 > EQUAL || (g1 >= -EQUAL && gain(a, b, r.secondary, r.lowerIsBetter) > EQUAL);
}

/** Lines of train.ts's source: on equal metrics the keep rule prefers the shorter. */
export function lineCount(text: string): number {
  return text === "" ? 0 : text.split("\n").length - (text.endsWith("\n") ? 1 : 0);
}

interface KeepArgs extends Ranking {
  candidate: Record<string, number>;
  best: Record<string, number>;
  /** A primary gain must be strictly above this (noise-sigmas · σ of the baseline). */
  noiseFloor: number;
  candidateLines: number;
  bestLines: number;
}

/**
 * The keep rule: the primary metric strictly better by more than the noise floor; on an equal
 * primary, a better secondary; on both equal, a shorter train.ts (simplicity). Otherwise discard.
 * `note` explains the non-obvious outcomes in the results.tsv description.
 */
export function keepOrDiscard(a: KeepArgs): { status: "keep" | "discard"; note: string } {
  const g1 = gain(a.candidate, a.best, a.primary, a.lowerIsBetter);
  if (g1 > EQUAL) {
    if (g1 > a.noiseFloor) return { status: "keep", note: "" };
    return { status: "discard", note: `(${signed(g1)} < noise ${num(a.noiseFloor)})` };
  }
  if (g1 < -EQUAL) return { status: "discard", note: "" };
  const g2 = gain(a.candidate, a.best, a.secondary, a.lowerIsBetter);
  if (g2 > EQUAL) return { status: "keep", note: `(same ${a.primary}, ${a.secondary} ${signed(g2)})` };
  if (g2 < -EQUAL) return { status: "discard", note: "" };
  if (a.candidateLines < a.bestLines) {
    return { status: "keep", note: `(same metrics, train.ts ${a.bestLines} -> ${a.candidateLines} lines)` };
  }
  return { status: "discard", note: "(same metrics, not simpler)" };
}

/**
 * A keep that rests on the primary clearing the noise floor: what confirmation re-runs. Keeps on
 * an equal primary (secondary, simplicity) compare measured ties and are not confirmed.
 */
export function clearsFloor(a: Omit<KeepArgs, "candidateLines" | "bestLines">): boolean {
  const g = gain(a.candidate, a.best, a.primary, a.lowerIsBetter);
  return g > EQUAL && g > a.noiseFloor;
}

/**
 * A run of some code slower than this share of the fastest run of the same code ran on a busier
 * machine: the budget is wall-clock, so fewer steps fit and its score says more about the load
 * than about the code. Load only ever slows a run down, so the fastest run is the reference.
 */
export const LOAD_RATIO = 0.7;

/** Which runs of one code are not load-affected (a run with no throughput figure counts as fine). */
export function steadyRuns(imagesPerSecond: readonly (number | null)[]): boolean[] {
  const fastest = Math.max(0, ...imagesPerSecond.map((v) => v ?? 0));
  return imagesPerSecond.map((v) => v === null || fastest === 0 || v >= LOAD_RATIO * fastest);
}

/** Experiment number and throughput of one run. */
interface RunSpeed { n: number; imagesPerSecond: number | null }

/**
 * Repeats of one code that trained much slower than the fastest of them ran on a busier machine:
 * the warning that says so (null: none did). They stay in σ (a wider floor makes keeps rarer, not falser).
 */
export function loadWarning(runs: readonly RunSpeed[], what: string): string | null {
  const steady = steadyRuns(runs.map((r) => r.imagesPerSecond));
  const slow = runs.filter((_, i) => !steady[i]);
  if (slow.length === 0) return null;
  const fastest = Math.max(...runs.map((r) => r.imagesPerSecond ?? 0));
  const shown = slow.map((r) => `#${r.n} (${(r.imagesPerSecond ?? 0).toFixed(1)} img/s)`).join(", ");
  return `warning: ${what} run(s) ${shown} `
    + `trained under ${LOAD_RATIO}× the fastest (${fastest.toFixed(1)} img/s): the machine was busier, and the noise `
    + "floor includes that (fewer keeps, not false ones)";
}

/** One measured run of a candidate: its seed (null: unknown), metrics and throughput. */
export interface RunMeasure {
  seed: number | null;
  metrics: Record<string, number>;
  imagesPerSecond: number | null;
}

interface ConfirmArgs extends Ranking {
  /** The candidate's runs so far, the first run first. */
  runs: readonly RunMeasure[];
  best: Record<string, number>;
  noiseFloor: number;
  /** Runs a verdict needs: the first plus --confirm-runs. */
  wanted: number;
}

/**
 * The confirmation rule, for a candidate whose first run cleared the noise floor: keep only if the
 * mean over `wanted` runs with different seeds still clears it. Load-affected runs do not count;
 * when one is among them, one more run replaces it, and if the runs still disagree in speed the
 * candidate is discarded as load-affected. `more`: train another run first. The returned metrics
 * (the row's numbers) are the mean over the runs the verdict used.
 */
export function confirmVerdict(a: ConfirmArgs):
  { more: true } | { more: false; status: "keep" | "discard"; note: string; metrics: Record<string, number> } {
  if (a.runs.length < a.wanted) return { more: true };
  const steady = steadyRuns(a.runs.map((r) => r.imagesPerSecond));
  const used = a.runs.filter((_, i) => steady[i]);
  if (used.length < a.wanted) {
    if (a.runs.length === a.wanted) return { more: true };
    const speeds = a.runs.map((r) => (r.imagesPerSecond === null ? "?" : r.imagesPerSecond.toFixed(0))).join(", ");
    const note = `(load-affected: its runs trained at ${speeds} img/s; a run slower than ${LOAD_RATIO}× its fastest `
      + "says more about the machine than the change)";
    return { more: false, status: "discard", note, metrics: meanMetrics(a.runs.map((r) => r.metrics)) };
  }
  const mean = meanMetrics(used.map((r) => r.metrics));
  const g = gain(mean, a.best, a.primary, a.lowerIsBetter);
  const over = used.every((r) => r.seed !== null)
    ? `seeds ${used.map((r) => r.seed).join(",")}` : `${used.length} runs`;
  const value = (mean[a.primary] ?? 0).toFixed(4);
  const dropped = used.length < a.runs.length ? `; ${a.runs.length - used.length} load-affected run(s) left out` : "";
  if (g > EQUAL && g > a.noiseFloor) {
    return {
      more: false, status: "keep", metrics: mean,
      note: `(confirmed over ${over}: mean ${value}, ${signed(g)} > floor ${num(a.noiseFloor)}${dropped})`,
    };
  }
  const first = gain(a.runs[0]!.metrics, a.best, a.primary, a.lowerIsBetter);
  return {
    more: false, status: "discard", metrics: mean,
    note: `(not confirmed over ${over}: mean ${value}, ${signed(g)} <= floor ${num(a.noiseFloor)}; `
      + `first run ${signed(first)}${dropped})`,
  };
}

/** Mean and sample σ (n − 1; 0 for a single run) of the baseline repeats; the floor is sigmas · σ. */
export function computeNoise(metric: string, runs: readonly number[], sigmas: number): Noise {
  const mean = runs.reduce((s, v) => s + v, 0) / runs.length;
  const sigma = runs.length > 1 ? Math.sqrt(runs.reduce((s, v) => s + (v - mean) ** 2, 0) / (runs.length - 1)) : 0;
  return { metric, runs: [...runs], mean, sigma, sigmas, floor: sigmas * sigma };
}

/**
 * Per-metric mean over the baseline repeats: what candidates are compared with while the best is
 * still the unmodified train.ts (a single run against the baseline's expected value).
 */
export function meanMetrics(runs: readonly Record<string, number>[]): Record<string, number> {
  const keys = [...new Set(runs.flatMap((r) => Object.keys(r)))];
  return Object.fromEntries(keys.map((k) => [k, runs.reduce((s, r) => s + (r[k] ?? 0), 0) / runs.length]));
}

/**
 * The status of the current experiment's first measured run, and a note for its description: a
 * baseline run is the first best (keep) or a repeat of it (baseline; the last repeat notes the
 * noise); a re-baseline repeat or a check of the best is a baseline row; an experiment is kept or
 * discarded against the best by keepOrDiscard. `confirm`: a keep on the primary that must be
 * confirmed over other seeds before it stands.
 */
export function decide(st: State, metrics: Metrics):
  { status: "keep" | "discard" | "baseline"; note: string; confirm: boolean } {
  const cur = st.current!;
  if (cur.kind === "baseline") {
    const status = st.best === null ? "keep" : "baseline";
    const runs = [...st.baselines.primaries, metrics[st.primary] ?? 0];
    if (runs.length !== st.baselines.wanted || runs.length < 2) return { status, note: "", confirm: false };
    const noise = computeNoise(st.primary, runs, st.settings.noiseSigmas);
    const note = `(noise: mean ${num(noise.mean)}, σ ${num(noise.sigma)}, floor ${num(noise.floor)})`;
    return { status, note, confirm: false };
  }
  if (cur.kind === "rebaseline") {
    const rb = st.rebaseline!;
    if (rb.done + 1 < rb.wanted) return { status: "baseline", note: "", confirm: false };
    const runs = [...rb.metrics, metrics].map((m) => m[st.primary] ?? 0);
    const noise = computeNoise(st.primary, runs, st.settings.noiseSigmas);
    const note = `(noise of the new structure over ${runs.length} runs: mean ${num(noise.mean)}, `
      + `σ ${num(noise.sigma)}, floor ${num(noise.floor)})`;
    return { status: "baseline", note, confirm: false };
  }
  if (cur.kind === "check") {
    return { status: "baseline", note: "(runs fine: the crashes were the changes)", confirm: false };
  }
  const ranking = { primary: st.primary, secondary: st.secondary, lowerIsBetter: TASK_METRICS[st.task].lowerIsBetter };
  const args = { ...ranking, candidate: metrics, best: st.best!.metrics, noiseFloor: st.noise?.floor ?? 0 };
  const v = keepOrDiscard({ ...args, candidateLines: cur.trainLines, bestLines: st.best!.trainLines });
  const confirm = v.status === "keep" && (st.settings.confirmRuns ?? 0) > 0 && clearsFloor(args);
  return { ...v, confirm };
}

/** Numbers for humans: enough digits to see a noise-sized difference. */
export function num(v: number): string {
  return Number(v.toPrecision(3)).toString();
}

export function signed(v: number): string {
  return `${v >= 0 ? "+" : ""}${num(v)}`;
}
