/**
 * The keep rule and the numbers it rests on: which of two measured runs is better, the noise
 * floor of the baseline repeats, and their mean. loop.ts decides with these and
 * summarize_results.ts reports with them, so a summary never disagrees with what the loop did.
 */
import { TASK_METRICS } from "../prepare.ts";
import type { Noise, State } from "./journal.ts";

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
function gain(candidate: Metrics, reference: Metrics, metric: string, lowerIsBetter: readonly string[]): number {
  return (lowerIsBetter.includes(metric) ? -1 : 1) * ((candidate[metric] ?? 0) - (reference[metric] ?? 0));
}

/** `a` beats `b`: a better primary, or an equal primary and a better secondary (no noise floor). */
export function outranks(a: Metrics, b: Metrics, r: Ranking): boolean {
  const g1 = gain(a, b, r.primary, r.lowerIsBetter);
  return g1 > EQUAL || (g1 >= -EQUAL && gain(a, b, r.secondary, r.lowerIsBetter) > EQUAL);
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
 * The status of the current experiment's measured run, and a note for its description: a baseline
 * run is the first best (keep) or a repeat of it (baseline; the last repeat notes the noise); an
 * experiment is kept or discarded against the best by keepOrDiscard.
 */
export function decide(st: State, metrics: Metrics): { status: "keep" | "discard" | "baseline"; note: string } {
  const cur = st.current!;
  if (cur.kind === "baseline") {
    const status = st.best === null ? "keep" : "baseline";
    const runs = [...st.baselines.primaries, metrics[st.primary] ?? 0];
    if (runs.length !== st.baselines.wanted || runs.length < 2) return { status, note: "" };
    const noise = computeNoise(st.primary, runs, st.settings.noiseSigmas);
    return { status, note: `(noise: mean ${num(noise.mean)}, σ ${num(noise.sigma)}, floor ${num(noise.floor)})` };
  }
  return keepOrDiscard({
    primary: st.primary, secondary: st.secondary, lowerIsBetter: TASK_METRICS[st.task].lowerIsBetter,
    candidate: metrics, best: st.best!.metrics, noiseFloor: st.noise?.floor ?? 0,
    candidateLines: cur.trainLines, bestLines: st.best!.trainLines,
  });
}

/** Numbers for humans: enough digits to see a noise-sized difference. */
export function num(v: number): string {
  return Number(v.toPrecision(3)).toString();
}

export function signed(v: number): string {
  return `${v >= 0 ? "+" : ""}${num(v)}`;
}
