/**
 * summarize_results.ts — read a night of experiments at a glance.
 *
 * Usage:
 *   bun summarize_results.ts              # results.tsv -> ./analysis_summary.{json,md}, ./progress.{svg,png}
 *   bun summarize_results.ts --results other.tsv --out-dir reports --plateau 8
 *   bun summarize_results.ts --no-chart   # only the JSON and the Markdown
 *   bun summarize_results.ts --exclude 7,3f2a1c9              # leave runs off the chart (number or commit)
 *   bun summarize_results.ts --chart-only --results X.tsv --out DIR   # only progress.{svg,png}, no journal
 *
 * analysis_summary.json (schema: AnalysisSummary, below) is for an agent choosing the next
 * experiment: warnings (sample data, a best no better than the trivial model), baseline, best and
 * its commit, baseline vs best on the held-out test split next to the val gain, min/avg/max of each
 * metric, the keep rate, the top hits by gain, the frontier, the noise floor, crash reasons, near
 * misses worth combining, what each hyperparameter move did, regions that lost repeatedly,
 * plateau detection and a short list of suggestions. analysis_summary.md is the same for a person.
 * progress.svg/.png plot every run over its run number (Vega-Lite, rendered headless by vega,
 * rasterised by sharp).
 *
 * Inputs: results.tsv (lib/results.ts's columns, in any order; lines that are not rows are
 * reported with their line number, never fatal), the loop's journal `.autoresearch/state.json`
 * (lib/journal.ts's State plus its optional testRuns and trivial, validated: a journal that does
 * not match is an error) for its noise floor once the baseline repeats are in (else: the same
 * noise computation over the `baseline` rows plus the first `keep`), its best (the branch tip),
 * its test-split measurements and the trivial model's score; the manifest of the journal's dataset
 * (cache.dir) for the sample flag and the split sizes; and run logs in `.autoresearch/logs/` (any
 * file whose name holds a crashed run's commit) for crash reasons. The noise floor and, without a
 * journal, the order of runs come from lib/verdict.ts, as the loop's do. The loop runs this after
 * every experiment.
 */
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { type } from "arktype";
import { cac } from "cac";
import type { TopLevelSpec } from "vega-lite";
import { interval95, TASK_METRICS, Task } from "./prepare.ts";
import { writeAtomic } from "./lib/atomic.ts";
import { cacheFiles } from "./lib/dataset.ts";
import { LOGS_DIR, STATE_FILE, readState, type State } from "./lib/journal.ts";
import { RESULTS_FILE, Status, readResults, type ParsedResults, type ResultRow } from "./lib/results.ts";
import { computeNoise, meanMetrics, outranks, type Ranking } from "./lib/verdict.ts";

// ---------------------------------------------------------------------------
// The summary's schema (writeSummary and the tests validate against it)
// ---------------------------------------------------------------------------

/** One results.tsv row with its run number (1-based, file order) and line number. */
const RunSummary = type({
  run: "number.integer >= 1",
  line: "number.integer >= 2",
  commit: "string",
  status: Status,
  primary: "number",
  secondary: "number",
  metrics: "Record<string, number>",
  memory_gb: "number >= 0",
  description: "string",
});
type RunSummary = typeof RunSummary.infer;

/** `lr 0.003 -> 0.006`: one hyperparameter move as the built-in proposer describes it. */
const HpMove = type({ axis: "string", from: "string", to: "string", direction: "'up' | 'down' | 'same' | 'change'" });
type HpMove = typeof HpMove.infer;

const Suggestion = type({
  kind: "'structural' | 'fix-crash' | 'combine' | 'continue' | 'opposite' | 'retry'",
  text: "string",
  "axis?": "string",
});
type Suggestion = typeof Suggestion.infer;

export const AnalysisSummary = type({
  version: "'1'",
  generatedAt: "string",
  /** The results file read. */
  results: "string",
  task: Task.or("null"),
  primary: "string | null",
  secondary: "string | null",
  /** Lines of results.tsv that are not rows: reported, skipped. */
  parseErrors: type({ line: "number.integer >= 1", message: "string" }).array(),
  counts: {
    runs: "number.integer >= 0", baseline: "number.integer >= 0", keep: "number.integer >= 0",
    discard: "number.integer >= 0", crash: "number.integer >= 0",
  },
  /** The first `baseline` or `keep` row: the session's starting point. */
  baseline: RunSummary.or("null"),
  /**
   * The loop's best (its journal's, the branch tip) when that is a row here; while it is the
   * unmodified train.ts its numbers are the baseline repeats' mean, as the loop compares with them.
   * Without a journal: the baseline/keep row with the highest primary, then secondary
   * (lib/verdict.ts's order); on a full tie the later run.
   */
  best: RunSummary.or("null"),
  /**
   * best − reference on the primary metric (relative: over |reference|, null when it is 0). The
   * reference is the mean of the baseline measurements when there are several (noiseFloor.mean),
   * else the baseline row: one lucky or unlucky baseline run should not set the gain.
   */
  improvement: type({ absolute: "number", relative: "number | null", reference: "number", basis: "string" }).or("null"),
  /** Each row that raised the running best (baseline first), with its gain over the previous best. */
  frontier: RunSummary.merge({ gain: "number | null" }).array(),
  /**
   * Spread of repeated baseline measurements. threshold = k·σ: an improvement smaller than this
   * is noise. source: "state" (the loop's .autoresearch/state.json), "results" (baseline rows +
   * the first keep), "none" (fewer than two measurements). k is the loop's --noise-sigmas with
   * "state" (0 is allowed there), else --noise-k.
   */
  noiseFloor: {
    mean: "number | null", sigma: "number | null", k: "number >= 0", threshold: "number | null",
    n: "number.integer >= 0", source: "'state' | 'results' | 'none'",
  },
  /**
   * reason: the loop's own "(crash: …)" note when the description has one, else the run log's
   * last error line.
   */
  crashes: type({
    run: "number.integer >= 1", commit: "string", description: "string", reason: "string",
    from: "'log' | 'description' | 'unknown'",
    /** The last error-like line of the run's log (.autoresearch/logs/*<commit>*), when there is one. */
    logLine: "string | null",
  }).array(),
  /** Crash reasons grouped (numbers ignored), most frequent first. */
  crashReasons: type({ reason: "string", count: "number.integer >= 1", runs: "number.integer[]" }).array(),
  /**
   * Discarded runs that nearly made it: primary within the tolerance of the best they were
   * measured against (deltaToParent ≥ −tolerance), or a secondary metric above that best's.
   */
  nearMisses: RunSummary.merge({
    deltaToParent: "number", gapToBest: "number", why: "string[]", moves: HpMove.array(),
  }).array(),
  nearMissTolerance: { value: "number >= 0", basis: "string" },
  /** Per hyperparameter axis (from `axis old -> new` descriptions): what each move did. */
  hpAxes: type({
    axis: "string",
    tried: "number.integer >= 1", wins: "number.integer >= 0", losses: "number.integer >= 0",
    crashes: "number.integer >= 0",
    /** The axis's value in the current best, as far as the descriptions tell. */
    current: "string | null",
    moves: type({
      run: "number.integer >= 1", from: "string", to: "string", direction: HpMove.get("direction"), status: Status,
      delta: "number | null",
    }).array(),
  }).array(),
  /**
   * Moves that lost (discard or crash) at least twice and never won: the same axis, direction and
   * starting value (`lr up from 0.005`), or, for non-numeric values, the same target. Avoid them.
   */
  lostRegions: type({
    axis: "string", direction: HpMove.get("direction"), from: "string | null", region: "string",
    values: "string[]", losses: "number.integer >= 2", runs: "number.integer[]",
  }).array(),
  plateau: {
    window: "number.integer >= 1", runsSinceLastKeep: "number.integer >= 0", detected: "boolean",
    suggestion: "string | null",
  },
  suggestions: Suggestion.array(),
  /** Every run, for the chart: crashes have no score (null). */
  series: type({
    run: "number.integer >= 1", status: Status, primary: "number | null", secondary: "number | null",
    runningBest: "number | null", description: "string", label: "string | null",
  }).array(),
  /** Runs left off the chart (--exclude); every other section still counts them. */
  excluded: "number.integer[]",
  /**
   * Lines a person must read before any number: sample or synthetic data, a best no better than
   * the trivial model. analysis_summary.md opens with them.
   */
  warnings: "string[]",
  /** The session's primary as the loop's journal records it (null without a journal). */
  sessionPrimary: "string | null",
  /** Why the runs are ranked by another metric than the session's primary, when they are. */
  primaryNote: "string | null",
  /**
   * Where `best` comes from: the loop's journal (its best, the branch tip) when the journal's best
   * is a row of this file, else the keep rule's order over the rows.
   */
  bestSource: "'journal' | 'results'",
  bestNote: "string | null",
  /** What the session's dataset manifest says (state.cache.dir/manifest.json); null where unknown. */
  data: {
    manifest: "string | null", sample: "boolean | null", synthetic: "boolean | null",
    splits: "Record<string, number> | null",
  },
  /** min/avg/max of each metric over the runs that have a score (crashes left out). */
  metricStats: type({
    metric: "string", n: "number.integer >= 1", min: "number", avg: "number", max: "number",
  }).array(),
  /** Kept experiments over all experiments; baseline measurements are neither. */
  keepRate: { keeps: "number.integer >= 0", experiments: "number.integer >= 0", rate: "number | null" },
  /** Experiments ranked by their gain over the baseline reference (improvement.reference), best 5. */
  topHits: RunSummary.merge({ rank: "number.integer >= 1", delta: "number" }).array(),
  /**
   * The trivial model (always the majority side) on val, from the journal, against the best on the
   * same metric: withinNoise when the best is above it by no more than the noise threshold.
   */
  trivial: type({
    metric: "string", value: "number", compared: "string", best: "number | null", margin: "number | null",
    threshold: "number >= 0", withinNoise: "boolean", warning: "string | null",
  }).or("null"),
  /**
   * The held-out test split, which no keep decision reads: the baseline runs' mean (and spread) and
   * the best's measurement, next to the val gain. lines: the same in words (analysis_summary.md).
   */
  test: {
    metric: "string | null",
    images: "number.integer >= 0 | null",
    runs: "number.integer >= 0",
    baseline: type({
      mean: "number", min: "number", max: "number", sigma: "number | null", n: "number.integer >= 1",
    }).or("null"),
    best: type({ n: "number.integer >= 1", commit: "string", value: "number" }).or("null"),
    valGain: "number | null",
    testGain: "number | null",
    /** testGain / valGain, when the val gain is positive. */
    held: "number | null",
    /** Wilson 95% half-width (prepare.ts interval95) of an accuracy near p measured on `images` test images. */
    interval: type({ metric: "string", p: "number", halfWidth: "number >= 0" }).or("null"),
    lines: "string[]",
  },
});
export type AnalysisSummary = typeof AnalysisSummary.infer;

// ---------------------------------------------------------------------------
// Reading the inputs: HP moves, the loop's journal, crash logs
// ---------------------------------------------------------------------------

const MOVE = /([A-Za-z_][\w.]*)\s+([^\s,;()]+)\s*->\s*([^\s,;()]+)/g;

/**
 * The moves in a description: `lr 0.003 -> 0.006`, optionally followed by ` (notes)`; several
 * moves separated by commas, semicolons or `+` are all returned. Notes in parentheses are ignored.
 */
export function parseHpMoves(description: string): HpMove[] {
  const withoutNotes = description.replace(/\([^()]*\)/g, " ");
  return [...withoutNotes.matchAll(MOVE)].map((m) => {
    const [from, to] = [m[2] ?? "", m[3] ?? ""];
    const a = Number(from), b = Number(to);
    const numeric = from !== "" && to !== "" && Number.isFinite(a) && Number.isFinite(b);
    const direction = numeric ? (b > a ? "up" : b < a ? "down" : "same") : from === to ? "same" : "change";
    return { axis: m[1] ?? "", from, to, direction };
  });
}

type NoiseFloor = AnalysisSummary["noiseFloor"];

/** One held-out test measurement the loop made: every baseline run and every keep, never used to decide. */
/** The loop's journal (lib/journal.ts's State is the contract). */
export type Journal = State;

type DataFacts = AnalysisSummary["data"];
const UNKNOWN_DATA: DataFacts = { manifest: null, sample: null, synthetic: null, splits: null };
/** Just what the summary needs from a dataset manifest: its flags and how many images each split holds. */
const ManifestFacts = type({
  "sample?": "boolean", "synthetic?": "boolean", "items?": type({ split: "string" }).array(),
});

/**
 * The session's dataset as its manifest describes it (the journal's cache.dir). The cache may be
 * on another machine or re-prepared since: an absent or unreadable manifest is "unknown", not an error.
 */
export function readDataFacts(cacheDir: string): DataFacts {
  const path = cacheFiles(cacheDir).manifest;
  if (!existsSync(path)) return UNKNOWN_DATA;
  let raw: unknown;
  try { raw = JSON.parse(readFileSync(path, "utf8")); } catch { return UNKNOWN_DATA; }
  const m = ManifestFacts(raw);
  if (m instanceof type.errors) return UNKNOWN_DATA;
  const splits: Record<string, number> = {};
  for (const it of m.items ?? []) splits[it.split] = (splits[it.split] ?? 0) + 1;
  const flags = { sample: m.sample === true, synthetic: m.synthetic === true };
  return { manifest: path, ...flags, splits: m.items ? splits : null };
}

/** The loop's noise floor from its journal; null until the baseline repeats are all measured. */
export function noiseFromState(st: State | null): NoiseFloor | null {
  const n = st?.noise;
  if (!n) return null;
  return { mean: n.mean, sigma: n.sigma, k: n.sigmas, threshold: n.floor, n: n.runs.length, source: "state" };
}

/**
 * The noise floor as the loop computes it (lib/verdict.ts), over what results.tsv shows of the
 * baseline repeats: the loop writes the first as a `keep` and the others as `baseline` rows.
 */
function noiseFromRuns(runs: RunSummary[], primary: string, k: number): NoiseFloor {
  const firstKeep = runs.find((r) => r.status === "keep");
  const repeats = [...runs.filter((r) => r.status === "baseline"), ...(firstKeep ? [firstKeep] : [])];
  const samples = repeats.map((r) => r.primary);
  const n = samples.length;
  if (n < 2) return { mean: samples[0] ?? null, sigma: null, k, threshold: null, n, source: "none" };
  const noise = computeNoise(primary, samples, k);
  return { mean: noise.mean, sigma: noise.sigma, k, threshold: noise.floor, n, source: "results" };
}

const ERROR_LINE = new RegExp(String.raw`^(?:error:|FAIL:|.*\b(?:[A-Z]\w*Error|Exception)\b`
  + String.raw`|.*\b(?:out of memory|OOM|Killed|timed out|timeout|NaN)\b).*$`, "gm");

/** The last line of a run log that reads like the reason it died, or null. */
export function crashReasonFromLog(text: string): string | null {
  const hits = [...text.matchAll(ERROR_LINE)].map((m) => m[0].trim()).filter((l) => l !== "");
  return hits.at(-1)?.slice(0, 200) ?? null;
}

/** `lr 0.003 -> 0.012 (crash: loss is NaN at step 12)` → `loss is NaN at step 12`. */
export function crashReasonFromDescription(description: string): string | null {
  const note = /\(([^()]*)\)\s*$/.exec(description)?.[1] ?? (/crash(?:ed)?:\s*(.+)$/i.exec(description)?.[1] ?? null);
  if (note === null) return null;
  return note.replace(/^\s*crash(?:ed)?\s*[:\-–]?\s*/i, "").trim() || null;
}

/** Logs in a folder, looked up by commit (any file whose name holds the commit). */
function logFinder(dir: string): (commit: string) => Promise<string | null> {
  const names = existsSync(dir) ? readdirSync(dir) : [];
  return async (commit) => {
    if (commit === "-" || commit.length < 7) return null;
    const name = names.find((n) => n.includes(commit.slice(0, 7)));
    return name ? await readFile(join(dir, name), "utf8").catch(() => null) : null;
  };
}

// ---------------------------------------------------------------------------
// The analysis (pure: parsed rows in, summary out)
// ---------------------------------------------------------------------------

interface SummarizeOptions {
  results: string;
  /** The loop's journal (.autoresearch/state.json, validated), or null. */
  state?: Journal | null;
  /** The session's dataset as its manifest describes it (readDataFacts of the journal's cache.dir). */
  data?: DataFacts;
  /** Run log text for a commit, or null. */
  logFor?: (commit: string) => Promise<string | null>;
  /** No keep in this many runs = a plateau. */
  plateau?: number;
  /** Noise threshold in σ when the loop does not say. */
  noiseK?: number;
  /** Runs to leave off the chart: run numbers or commit prefixes (each may be a comma list). */
  exclude?: readonly string[];
  now?: Date;
}

const DEFAULT_PLATEAU = 10;
const DEFAULT_NOISE_K = 2;
/** Near-miss tolerance when there is no noise estimate: this share of |best|. */
const FALLBACK_TOLERANCE = 0.005;
const LABEL_CHARS = 30;
const TOP_HITS = 5;
const PLATEAU_ADVICE = "single hyperparameter moves around the best look used up; try a structural change in "
  + "train.ts (another architecture such as residual or depthwise blocks, a wider or deeper net, another optimizer or "
  + "schedule, stronger augmentation, or a pretrained backbone)";
/** The loop's descriptions of its baseline runs: "baseline", "baseline 1/3", "baseline repeat 2/3". */
const BASELINE_DESCRIPTION = /^baseline(?: \d+\/\d+| repeat \d+\/\d+)?(?:\s*\(.*\))?$/;
/** Metrics that are a share of the evaluated images: their 95% interval follows from the split's size. */
const PROPORTIONS = new Set(["val_accuracy", "accuracy", "top1", "top5", "bin_acc", "mc_acc", "balanced_bin_acc"]);

/**
 * How the running best moves. "verdict" (no journal): lib/verdict.ts's order, primary then
 * secondary. "loop" (the journal's best is a row here): as the loop decided, every keep became the
 * best, and while the best was the unmodified train.ts candidates were measured against the mean
 * of the baseline repeats, which `baseline` turns the first baseline row into.
 */
type BestRule =
  | { kind: "verdict"; ranking: Ranking | null }
  | { kind: "loop"; baseline: (first: RunSummary) => RunSummary };

/**
 * The running best over baseline and keep rows. Under the verdict order a baseline row after the
 * first best is a repeat of the same code (a noise sample), not progress; on a full tie the later
 * keep is the branch tip.
 */
function runningBest(runs: RunSummary[], rule: BestRule) {
  const beats = (a: RunSummary, b: RunSummary) =>
    rule.kind === "verdict" && rule.ranking !== null && outranks(a.metrics, b.metrics, rule.ranking);
  const bestBefore: (RunSummary | null)[] = [];
  const bestAfter: (RunSummary | null)[] = [];
  const frontier: (RunSummary & { gain: number | null })[] = [];
  let best: RunSummary | null = null;
  for (const r of runs) {
    bestBefore.push(best);
    if (rule.kind === "loop") {
      if (r.status === "keep" || (r.status === "baseline" && best === null)) {
        frontier.push({ ...r, gain: best === null ? null : r.primary - best.primary });
        best = best === null ? rule.baseline(r) : r;
      }
    } else if (r.status === "baseline" || r.status === "keep") {
      if (best === null || (r.status === "keep" && beats(r, best))) {
        frontier.push({ ...r, gain: best === null ? null : r.primary - best.primary });
        best = r;
      } else if (r.status === "keep" && !beats(best, r)) {
        best = r;
      }
    }
    bestAfter.push(best);
  }
  return { best, bestBefore, bestAfter, frontier };
}

/**
 * A session that keeps on a metric results.tsv has no column for (balanced_bin_acc) has the loop
 * write it into each row's description as `(<metric> <value>)`, the value its decision used: read
 * it back into the rows' metrics (a crash scores 0, as in every column), so they rank by it.
 */
function withSessionPrimary(parsed: ParsedResults, st: Journal | null): ParsedResults {
  const m = st?.primary;
  if (!m || parsed.rows.every((row) => m in row.metrics)) return parsed;
  const at = new RegExp(`\\(${m.replace(/[^\w]/g, "\\$&")} (-?[\\d.]+(?:e-?\\d+)?)\\)`);
  const rows = parsed.rows.map((row) => {
    const v = at.exec(row.description)?.[1];
    const value = v !== undefined ? Number(v) : row.status === "crash" ? 0 : undefined;
    return value === undefined ? row : { ...row, metrics: { ...row.metrics, [m]: value } };
  });
  return { ...parsed, rows };
}

/**
 * The session's primary (the journal's) when results.tsv has it as a column, else the task's
 * default, with a note: a session may decide on a metric that only the journal records.
 */
function rankingFor(
  task: Task | null, st: Journal | null, parsed: ParsedResults,
): { ranking: Ranking | null; note: string | null } {
  if (task === null) return { ranking: null, note: null };
  const r = TASK_METRICS[task];
  if (!st || st.task !== task || (st.primary === r.primary && st.secondary === r.secondary)) {
    return { ranking: r, note: null };
  }
  const has = (m: string) => parsed.rows.every((row) => m in row.metrics);
  if (has(st.primary) && has(st.secondary)) {
    return { ranking: { primary: st.primary, secondary: st.secondary, lowerIsBetter: r.lowerIsBetter }, note: null };
  }
  return {
    ranking: r,
    note: `the session's primary ${st.primary} is not a column of results.tsv: runs are ranked and charted by `
      + `${r.primary} (then ${r.secondary}) here`,
  };
}

/** The row of the journal's best (the branch tip): by its number and commit, else its commit's last keep. */
function journalBestRow(runs: RunSummary[], st: Journal | null): { row: RunSummary | null; note: string | null } {
  const b = st?.best;
  if (!b) return { row: null, note: null };
  const same = (r: RunSummary) => r.status === "keep" && r.commit.length >= 7
    && (r.commit === b.short || b.commit.startsWith(r.commit));
  const row = runs.find((r) => r.run === b.n && same(r)) ?? runs.filter(same).at(-1) ?? null;
  if (row) return { row, note: null };
  return {
    row: null,
    note: `the journal's best (experiment ${b.n}, \`${b.short}\`) is not a kept row of this results file: `
      + "the best here follows the keep rule's order over the rows",
  };
}

/** Runs named by number or commit prefix; a name that matches no run is an error. */
function excludedRuns(runs: RunSummary[], names: readonly string[], results: string): number[] {
  const out = new Set<number>();
  for (const name of names.flatMap((n) => n.split(",")).map((n) => n.trim()).filter((n) => n !== "")) {
    const hits = /^\d{1,6}$/.test(name)
      ? runs.filter((r) => r.run === Number(name))
      : runs.filter((r) => name.length >= 4 && r.commit !== "-"
        && (r.commit.startsWith(name) || name.startsWith(r.commit)));
    if (hits.length === 0) throw new Error(`${results}: --exclude ${name}: no run has that number or commit`);
    for (const h of hits) out.add(h.run);
  }
  return [...out].sort((a, b) => a - b);
}

/**
 * The trivial model's val score (journal) against the best on the same metric. The journal names
 * either the metric (bin_acc) or the footer field holding the score (trivial_bin_acc): both compare
 * on bin_acc; a metric the best lacks falls back to the primary.
 */
function trivialCheck(
  t: Journal["trivial"], best: Record<string, number> | null, primary: string | null, nf: NoiseFloor,
): AnalysisSummary["trivial"] {
  if (!t) return null;
  const bare = t.metric.replace(/^trivial_/, "");
  const metrics = best ?? {};
  const compared = bare in metrics ? bare : t.metric in metrics ? t.metric : primary ?? bare;
  const value = metrics[compared] ?? null;
  const threshold = nf.threshold ?? 0;
  const margin = value === null ? null : value - t.value;
  const withinNoise = margin !== null && margin <= threshold;
  const where = margin !== null && margin < 0 ? "below" : `within the noise floor (${fmt(threshold)}) of`;
  const hint = compared === "bin_acc" ? "; balanced_bin_acc is a primary that sees this" : "";
  const warning = withinNoise
    ? `the best ${compared} ${fmt(value)} is ${where} the trivial model's ${fmt(t.value)} (always the majority `
      + `side): it may have learned nothing a constant answer does not${hint}`
    : null;
  return { metric: t.metric, value: t.value, compared, best: value, margin, threshold, withinNoise, warning };
}

const commitsMatch = (a: string, b: string) => a.length >= 7 && b.length >= 7 && (a.startsWith(b) || b.startsWith(a));

/**
 * Baseline vs best on the held-out test split (the journal's testRuns), on the session's primary,
 * next to the val gain the loop decided on (journal best − journal baseline mean).
 */
function testReport(st: Journal | null, data: DataFacts, fallbackValGain: number | null): AnalysisSummary["test"] {
  const images = data.splits?.test ?? null;
  const base = {
    metric: st?.primary ?? null, images, runs: st?.testRuns?.length ?? 0, baseline: null, best: null,
    valGain: fallbackValGain, testGain: null, held: null, interval: null,
  };
  if (!st) return { ...base, lines: ["Test split: no loop journal, so no test measurements to report."] };
  const runs = st.testRuns ?? [];
  if (runs.length === 0) {
    return { ...base, lines: ["Test split: not measured (no testRuns in the journal): the val gain is unchecked."] };
  }
  const m = st.primary;
  const jb = st.best, jbase = st.baseline;
  const valGain = jb && jbase && m in jb.metrics && m in jbase.metrics
    ? (jb.metrics[m] ?? 0) - (jbase.metrics[m] ?? 0)
    : fallbackValGain;
  const values = (kind: "baseline" | "keep") =>
    runs.filter((r) => r.kind === kind).flatMap((r) => (m in r.metrics ? [r.metrics[m] ?? 0] : []));
  const bv = values("baseline");
  const baseline = bv.length === 0 ? null : {
    mean: bv.reduce((a, b) => a + b, 0) / bv.length, min: Math.min(...bv), max: Math.max(...bv),
    sigma: bv.length >= 2 ? computeNoise(m, bv, 1).sigma : null, n: bv.length,
  };
  const bestIsBaseline = !jb || jb.commit === st.sessionStart;
  const bestRun = bestIsBaseline ? undefined
    : runs.filter((r) => r.kind === "keep" && m in r.metrics && commitsMatch(r.commit, jb.commit)).at(-1);
  const best = bestRun ? { n: bestRun.n, commit: bestRun.commit.slice(0, 7), value: bestRun.metrics[m] ?? 0 } : null;
  const testGain = best && baseline ? best.value - baseline.mean : null;
  const held = testGain !== null && valGain !== null && valGain > 0 ? testGain / valGain : null;
  const pm = PROPORTIONS.has(m) ? m : TASK_METRICS[st.task].columns.find((c) => PROPORTIONS.has(c)) ?? null;
  const pOf = (r: typeof runs[number] | undefined) => (pm !== null && r && pm in r.metrics ? r.metrics[pm] : undefined);
  const baseP = runs.filter((r) => r.kind === "baseline").map(pOf).find((v) => v !== undefined);
  const p = pOf(bestRun) ?? baseP;
  const interval = pm !== null && p !== undefined && images !== null && images > 0
    ? { metric: pm, p, halfWidth: interval95(p, images) }
    : null;

  const size = images === null
    ? "size unknown: the session's dataset manifest is not readable here"
    : `${images} images${interval
      ? `; ±${fmt(interval.halfWidth, 3)} at 95% for ${interval.metric} near ${fmt(interval.p, 2)}`
      : ""}`;
  const spread = baseline === null ? "" : baseline.n === 1 ? "1 run"
    : `mean of ${baseline.n} runs, ${fmt(baseline.min)}–${fmt(baseline.max)}, σ ${fmt(baseline.sigma)}`;
  const baseText = baseline ? `baseline ${fmt(baseline.mean)} (${spread})` : `no baseline test run with ${m}`;
  const bestText = bestIsBaseline ? "no keep yet (the best is the baseline)"
    : best ? `best ${fmt(best.value)} (run ${best.n}, \`${best.commit}\`)`
    : `the best (run ${jb.n}, \`${jb.short}\`) has no test measurement`;
  const lines = [`Test split (${size}): ${baseText}, ${bestText}.`];
  if (testGain !== null && valGain !== null) {
    const heldText = held !== null ? `${Math.round(100 * held)}% of the val gain held`
      : "no val gain to hold";
    lines.push(`**val ${signed(valGain)}, test ${signed(testGain)}: ${heldText}** on images no decision read.`);
    if (interval && Math.abs(testGain) < interval.halfWidth) {
      lines.push(`The test gain is inside ±${fmt(interval.halfWidth, 3)}: on ${images} images it cannot be `
        + "told from no change.");
    }
  }
  return { metric: m, images, runs: runs.length, baseline, best, valGain, testGain, held, interval, lines };
}

/** min/avg/max of every metric over the runs that have a score. */
function metricStatsOf(runs: RunSummary[]): AnalysisSummary["metricStats"] {
  const scored = runs.filter((r) => r.status !== "crash");
  const names = [...new Set(scored.flatMap((r) => Object.keys(r.metrics)))];
  return names.flatMap((metric) => {
    const v = scored.flatMap((r) => (metric in r.metrics ? [r.metrics[metric] ?? 0] : []));
    if (v.length === 0) return [];
    const avg = v.reduce((a, b) => a + b, 0) / v.length;
    return [{ metric, n: v.length, min: Math.min(...v), avg, max: Math.max(...v) }];
  });
}

export async function summarize(parsed: ParsedResults, opts: SummarizeOptions): Promise<AnalysisSummary> {
  const k = opts.noiseK ?? DEFAULT_NOISE_K;
  const window = opts.plateau ?? DEFAULT_PLATEAU;
  const task = parsed.task;
  const st = opts.state ?? null;
  const data = opts.data ?? UNKNOWN_DATA;
  parsed = withSessionPrimary(parsed, st);
  const { ranking, note: primaryNote } = rankingFor(task, st, parsed);
  const primary = ranking?.primary ?? null;
  const secondary = ranking?.secondary ?? null;
  const runs = rowsToRuns(parsed, primary, secondary);
  const counts = { runs: runs.length, baseline: 0, keep: 0, discard: 0, crash: 0 };
  for (const r of runs) counts[r.status]++;
  const baseline = runs.find((r) => r.status === "baseline" || r.status === "keep") ?? null;
  const isBaselineRun = (r: RunSummary) =>
    r === baseline || r.status === "baseline" || BASELINE_DESCRIPTION.test(r.description);

  const noiseFloor = noiseFromState(st) ?? noiseFromRuns(runs, primary ?? "", k);
  const journal = journalBestRow(runs, st);
  // The loop compared candidates with the mean of the baseline repeats (its journal's baseline).
  const asBaseline = (first: RunSummary): RunSummary => {
    const mean = st?.baseline?.metrics
      ?? meanMetrics(runs.filter((r) => isBaselineRun(r) && r.status !== "crash").map((r) => r.metrics));
    return {
      ...first, metrics: { ...first.metrics, ...mean },
      primary: mean[primary ?? ""] ?? first.primary, secondary: mean[secondary ?? ""] ?? first.secondary,
    };
  };
  const rule: BestRule = journal.row ? { kind: "loop", baseline: asBaseline } : { kind: "verdict", ranking };
  const { best: ruleBest, bestBefore, bestAfter, frontier } = runningBest(runs, rule);
  const best = journal.row === null ? ruleBest : journal.row === baseline ? asBaseline(journal.row) : journal.row;

  const from = noiseFloor.source === "state" ? "the loop's state.json" : "baseline rows";
  const tolerance = noiseFloor.threshold !== null
    ? { value: noiseFloor.threshold, basis: `noise threshold (${noiseFloor.k}σ, from ${from})` }
    : {
      value: best ? Math.abs(best.primary) * FALLBACK_TOLERANCE : 0,
      basis: `${FALLBACK_TOLERANCE * 100}% of the best (no noise estimate: fewer than two baseline measurements)`,
    };

  const crashes = await Promise.all(runs.filter((r) => r.status === "crash").map(async (r) => {
    const log = opts.logFor ? await opts.logFor(r.commit) : null;
    const fromLog = log !== null ? crashReasonFromLog(log) : null;
    const fromDesc = crashReasonFromDescription(r.description);
    const reason = fromDesc ?? fromLog ?? "unknown (no run log, and the description gives no reason)";
    const from = fromDesc ? "description" as const : fromLog ? "log" as const : "unknown" as const;
    return { run: r.run, commit: r.commit, description: r.description, reason, from, logLine: fromLog };
  }));
  const crashReasons = groupCrashes(crashes);

  const nearMisses = runs.flatMap((r, i) => {
    const parent = bestBefore[i];
    if (r.status !== "discard" || !parent || !best) return [];
    const deltaToParent = r.primary - parent.primary;
    const why: string[] = [];
    if (deltaToParent >= -tolerance.value) {
      why.push(`${primary} within ${fmt(tolerance.value)} of the best it was measured against`);
    }
    if (r.secondary > parent.secondary) {
      why.push(`${secondary} ${fmt(r.secondary)} above that best's ${fmt(parent.secondary)}`);
    }
    if (why.length === 0) return [];
    return [{ ...r, deltaToParent, gapToBest: r.primary - best.primary, why, moves: parseHpMoves(r.description) }];
  }).sort((a, b) => b.deltaToParent - a.deltaToParent).slice(0, 8);

  const hpAxes = axisStats(runs, bestBefore);
  const lostRegions = findLostRegions(hpAxes);
  const lastKeep = runs.map((r) => r.status === "keep" || r.status === "baseline").lastIndexOf(true);
  const runsSinceLastKeep = lastKeep < 0 ? runs.length : runs.length - 1 - lastKeep;
  const detected = runs.length > 0 && runsSinceLastKeep >= window;
  const plateau = {
    window, runsSinceLastKeep, detected,
    suggestion: detected ? `no keep in the last ${runsSinceLastKeep} runs: ${PLATEAU_ADVICE}` : null,
  };

  const frontierRuns = new Set(frontier.map((f) => f.run));
  const withoutNote = (d: string) => d.replace(/\s*\([^()]*\)\s*$/, "") || d;
  const label = (r: RunSummary) => shorten(withoutNote(r.description), LABEL_CHARS);
  const series = runs.map((r, i) => ({
    run: r.run, status: r.status,
    primary: r.status === "crash" ? null : r.primary, secondary: r.status === "crash" ? null : r.secondary,
    runningBest: bestAfter[i]?.primary ?? null, description: r.description,
    label: frontierRuns.has(r.run) || r.status === "keep" ? label(r) : null,
  }));

  const improvement = best && baseline ? improvementOver(best.primary, baseline.primary, noiseFloor) : null;
  const experiments = runs.filter((r) => !isBaselineRun(r));
  const keeps = experiments.filter((r) => r.status === "keep").length;
  const rate = experiments.length ? keeps / experiments.length : null;
  const keepRate = { keeps, experiments: experiments.length, rate };
  const topHits = improvement === null ? [] : experiments.filter((r) => r.status !== "crash")
    .map((r) => ({ ...r, delta: r.primary - improvement.reference }))
    .sort((a, b) => b.delta - a.delta || a.run - b.run).slice(0, TOP_HITS).map((r, i) => ({ ...r, rank: i + 1 }));
  // The journal's best carries every metric the loop measured, the row only results.tsv's columns.
  const bestMetrics = best ? { ...(journal.row ? st?.best?.metrics : {}), ...best.metrics } : null;
  const trivial = trivialCheck(st?.trivial ?? null, bestMetrics, primary, noiseFloor);
  const baselineTrivial = trivialCheck(st?.trivial ?? null, st?.baseline?.metrics ?? null, primary, noiseFloor);
  const atTrivial = baselineTrivial?.withinNoise && !trivial?.withinNoise ? baselineTrivial : null;
  const warnings = [
    ...(data.synthetic ? ["SYNTHETIC data: a plumbing test, not a measure of model quality"]
      : data.sample ? ["SAMPLE data: not a measure of model quality (the session trained on data/sample)"] : []),
    ...(trivial?.warning ? [trivial.warning] : []),
    ...(atTrivial ? [`the baseline's ${atTrivial.compared} ${fmt(atTrivial.best)} was the trivial rate `
      + `(${fmt(atTrivial.value)}, always the majority side or any constant answer): the untouched train.ts `
      + "learned nothing a constant answer does not; every gain here is measured from that point"] : []),
  ];

  const summary: AnalysisSummary = {
    version: "1", generatedAt: (opts.now ?? new Date()).toISOString(), results: opts.results, task, primary, secondary,
    parseErrors: parsed.errors, counts, baseline, best, improvement,
    frontier, noiseFloor, crashes, crashReasons, nearMisses, nearMissTolerance: tolerance, hpAxes, lostRegions, plateau,
    suggestions: [], series, excluded: excludedRuns(runs, opts.exclude ?? [], opts.results),
    warnings, sessionPrimary: st?.primary ?? null, primaryNote,
    bestSource: journal.row ? "journal" : "results", bestNote: journal.note, data,
    metricStats: metricStatsOf(runs), keepRate, topHits, trivial,
    test: testReport(st, data, primary !== null && st?.primary === primary ? improvement?.absolute ?? null : null),
  };
  summary.suggestions = suggest(summary);
  return summary;
}

/** The best's gain over the baseline: over the mean of the baseline repeats when there are several. */
function improvementOver(
  best: number, baselineRun: number, nf: NoiseFloor,
): NonNullable<AnalysisSummary["improvement"]> {
  const [reference, basis] = nf.mean !== null && nf.n >= 2
    ? [nf.mean, `mean of ${nf.n} baseline runs`]
    : [baselineRun, "the baseline run"];
  const relative = reference === 0 ? null : (best - reference) / Math.abs(reference);
  return { absolute: best - reference, relative, reference, basis };
}

function rowsToRuns(parsed: ParsedResults, primary: string | null, secondary: string | null): RunSummary[] {
  return parsed.rows.map((row: ResultRow, i) => ({
    run: i + 1, line: parsed.lines?.[i] ?? i + 2, commit: row.commit, status: row.status,
    primary: primary ? row.metrics[primary] ?? 0 : 0, secondary: secondary ? row.metrics[secondary] ?? 0 : 0,
    metrics: row.metrics, memory_gb: row.memory_gb, description: row.description,
  }));
}

function groupCrashes(crashes: AnalysisSummary["crashes"]): AnalysisSummary["crashReasons"] {
  const groups = new Map<string, { reason: string; count: number; runs: number[] }>();
  for (const c of crashes) {
    const key = c.reason.toLowerCase().replace(/[\d.]+(e-?\d+)?/g, "N").replace(/\s+/g, " ").trim();
    const g = groups.get(key) ?? { reason: c.reason, count: 0, runs: [] };
    g.count++;
    g.runs.push(c.run);
    groups.set(key, g);
  }
  return [...groups.values()].sort((a, b) => b.count - a.count || a.runs[0]! - b.runs[0]!);
}

function axisStats(runs: RunSummary[], bestBefore: (RunSummary | null)[]): AnalysisSummary["hpAxes"] {
  const axes = new Map<string, AnalysisSummary["hpAxes"][number]>();
  runs.forEach((r, i) => {
    if (r.status === "baseline") return;
    for (const m of parseHpMoves(r.description)) {
      const a = axes.get(m.axis)
        ?? { axis: m.axis, tried: 0, wins: 0, losses: 0, crashes: 0, current: null, moves: [] };
      const parent = bestBefore[i];
      a.tried++;
      if (r.status === "keep") a.wins++;
      else if (r.status === "crash") a.crashes++;
      else a.losses++;
      const delta = r.status === "crash" || !parent ? null : r.primary - parent.primary;
      a.moves.push({ run: r.run, from: m.from, to: m.to, direction: m.direction, status: r.status, delta });
      // The current value: a kept move sets it; any later move starts from it.
      a.current = r.status === "keep" ? m.to : m.from;
      axes.set(m.axis, a);
    }
  });
  return [...axes.values()].sort((a, b) => b.tried - a.tried || a.axis.localeCompare(b.axis));
}

function findLostRegions(axes: AnalysisSummary["hpAxes"]): AnalysisSummary["lostRegions"] {
  const out: AnalysisSummary["lostRegions"] = [];
  for (const a of axes) {
    const regions = new Map<string, {
      direction: HpMove["direction"]; from: string | null; won: boolean; values: Set<string>; runs: number[];
    }>();
    for (const m of a.moves) {
      const numeric = m.direction === "up" || m.direction === "down";
      const key = numeric ? `${m.direction} from ${m.from}` : `to ${m.to}`;
      const g = regions.get(key)
        ?? { direction: m.direction, from: numeric ? m.from : null, won: false, values: new Set<string>(), runs: [] };
      if (m.status === "keep") g.won = true;
      else { g.values.add(m.to); g.runs.push(m.run); }
      regions.set(key, g);
    }
    for (const [region, g] of regions) {
      if (g.won || g.runs.length < 2) continue;
      out.push({
        axis: a.axis, direction: g.direction, from: g.from, region, values: [...g.values], losses: g.runs.length,
        runs: g.runs,
      });
    }
  }
  return out.sort((x, y) => y.losses - x.losses);
}

/** A short list of next experiments, most useful first. */
function suggest(s: AnalysisSummary): Suggestion[] {
  const out: Suggestion[] = [];
  if (s.plateau.suggestion) out.push({ kind: "structural", text: s.plateau.suggestion });
  for (const c of s.crashReasons.filter((c) => c.count >= 2)) {
    const text = `${c.count} runs crashed with "${shorten(c.reason, 80)}" (runs ${c.runs.join(", ")}): `
      + "fix the cause or stop proposing those changes";
    out.push({ kind: "fix-crash", text });
  }
  const lost = (axis: string, dir: string, from: string | null) =>
    s.lostRegions.some((r) => r.axis === axis && r.direction === dir && r.from === from);
  // Combine near misses on different axes: each was nearly as good alone.
  const combos: { run: number; move: HpMove }[] = [];
  for (const n of s.nearMisses) {
    const m = n.moves[0];
    if (n.moves.length === 1 && m && !combos.some((c) => c.move.axis === m.axis)) combos.push({ run: n.run, move: m });
  }
  if (combos.length >= 2) {
    const [a, b] = combos as [typeof combos[number], typeof combos[number]];
    const text = `combine two near misses on the current best: ${a.move.axis} -> ${a.move.to} (run ${a.run}) `
      + `together with ${b.move.axis} -> ${b.move.to} (run ${b.run})`;
    out.push({ kind: "combine", text });
  } else if (combos.length === 1) {
    const [a] = combos as [typeof combos[number]];
    const text = `retry the near miss ${a.move.axis} -> ${a.move.to} (run ${a.run}) on the current best, `
      + "perhaps with another seed: it was within noise";
    out.push({ kind: "retry", axis: a.move.axis, text });
  }
  for (const a of s.hpAxes) {
    const last = a.moves.at(-1);
    const lastWin = [...a.moves].reverse().find((m) => m.status === "keep");
    if (!lastWin || last !== lastWin || (lastWin.direction !== "up" && lastWin.direction !== "down")) continue;
    if (lost(a.axis, lastWin.direction, lastWin.to)) continue;
    const delta = lastWin.delta !== null ? `, ${signed(lastWin.delta)}` : "";
    const won = `${lastWin.from} -> ${lastWin.to} won${delta}`;
    const text = `${a.axis}: continue ${lastWin.direction} from ${lastWin.to} (${won})`;
    out.push({ kind: "continue", axis: a.axis, text });
  }
  for (const a of s.hpAxes) {
    const dirs = new Set(a.moves.map((m) => m.direction));
    for (const [tried, other] of [["up", "down"], ["down", "up"]] as const) {
      // Only after a direction lost repeatedly, and never for the seed (it has no direction).
      if (dirs.has(tried) && !dirs.has(other) && lost(a.axis, tried, a.current) && a.current !== null
        && !/seed/i.test(a.axis) && !(other === "down" && Number(a.current) <= 0)) {
        const values = a.moves.filter((m) => m.direction === tried).map((m) => m.to).join(", ");
        const text = `${a.axis}: moving ${tried} lost repeatedly (${values}); try ${other} from ${a.current}`;
        out.push({ kind: "opposite", axis: a.axis, text });
      }
    }
  }
  return out.slice(0, 6);
}

// ---------------------------------------------------------------------------
// The Markdown brief
// ---------------------------------------------------------------------------

const fmt = (v: number | null | undefined, digits = 4) => (v === null || v === undefined ? "n/a" : v.toFixed(digits));
const signed = (v: number, digits = 4) => `${v >= 0 ? "+" : "−"}${Math.abs(v).toFixed(digits)}`;
/** One line, at most n characters, cut at a word where possible. */
function shorten(text: string, n: number): string {
  const t = text.replace(/\s+/g, " ").trim();
  if (t.length <= n) return t;
  const cut = t.slice(0, n - 1);
  const space = cut.lastIndexOf(" ");
  return `${space > n * 0.6 ? cut.slice(0, space) : cut}…`;
}
const cell = (text: string) => text.replace(/\|/g, "\\|");

/** The Markdown's opening lines: the best and its gain, runs, noise floor, plateau. */
function headline(s: AnalysisSummary): string[] {
  const L: string[] = [];
  const p = s.primary ?? "primary";
  const imp = s.improvement;
  if (s.best) {
    const relative = imp?.relative != null ? ` (${signed(100 * imp.relative, 1)}%)` : "";
    const over = imp ? `${signed(imp.absolute)} over the baseline ${fmt(imp.reference)} (${imp.basis})` : "";
    const gain = imp ? ` — ${over}${relative}` : "";
    const where = `at run ${s.best.run}, commit \`${s.best.commit}\` (“${shorten(s.best.description, 60)}”)`;
    L.push(`**Best ${p}: ${fmt(s.best.primary)}** ${where}${gain}.`, "");
  } else {
    L.push(`No run has been kept yet (no baseline or keep row).`, "");
  }
  for (const line of s.test.lines) L.push(`- ${line}`);
  const chosen = s.sessionPrimary === null ? "the task's default; no loop journal"
    : s.sessionPrimary === s.primary ? "the session's choice, from the loop's journal"
    : `the session's primary is ${s.sessionPrimary}`;
  L.push(`- Primary metric: ${p} (${chosen}), ties broken by ${s.secondary ?? "n/a"}.`);
  for (const note of [s.primaryNote, s.bestNote]) if (note !== null) L.push(`- Note: ${note}.`);
  const c = s.counts;
  L.push(`- Runs: ${c.runs} — ${c.keep} kept, ${c.discard} discarded, ${c.crash} crashed, ${c.baseline} baseline.`);
  const kr = s.keepRate;
  const rate = kr.rate !== null ? ` (${Math.round(100 * kr.rate)}%)` : "";
  L.push(`- Keep rate: ${kr.keeps} of ${kr.experiments} experiments kept${rate}; baseline runs are not experiments.`);
  const nf = s.noiseFloor;
  const sigma = nf.sigma !== null ? `σ ${fmt(nf.sigma)}` : "σ unknown";
  const threshold = nf.threshold !== null ? `, threshold ${fmt(nf.threshold)} (${nf.k}σ)` : "";
  const around = nf.mean !== null ? ` around ${fmt(nf.mean)}` : "";
  const source = nf.source === "state" ? "from the loop's state.json"
    : nf.source === "results" ? `from ${nf.n} baseline measurements`
    : "fewer than two baseline measurements: gains below ~0.5% may be noise";
  L.push(`- Noise floor: ${sigma}${threshold}${around} — ${source}.`);
  const since = s.plateau.runsSinceLastKeep;
  const plateau = s.plateau.detected
    ? `**yes** — no keep in the last ${since} runs`
    : `no (last keep ${since} run${since === 1 ? "" : "s"} ago, window ${s.plateau.window})`;
  L.push(`- Plateau: ${plateau}.`, "");
  return L;
}

/** What people look at first: each metric's range over the runs, and the experiments that gained most. */
function atAGlance(s: AnalysisSummary): string[] {
  const L: string[] = [];
  if (s.metricStats.length > 0) {
    const n = s.metricStats[0]!.n;
    L.push(`## Metrics over the ${n} scored run${n === 1 ? "" : "s"} (crashes left out)`, "",
      "| metric | min | avg | max |", "|---|---:|---:|---:|");
    for (const m of s.metricStats) L.push(`| ${m.metric} | ${fmt(m.min)} | ${fmt(m.avg)} | ${fmt(m.max)} |`);
    L.push("");
  }
  if (s.topHits.length > 0 && s.improvement) {
    const p = s.primary ?? "primary";
    L.push(`## Top ${s.topHits.length} by gain over the baseline (${fmt(s.improvement.reference)}, `
      + `${s.improvement.basis})`, "", `| # | run | commit | status | ${p} | Δ | description |`,
    "|---:|---:|---|---|---:|---:|---|");
    for (const h of s.topHits) {
      L.push(`| ${h.rank} | ${h.run} | \`${h.commit}\` | ${h.status} | ${fmt(h.primary)} | ${signed(h.delta)} | `
        + `${cell(shorten(h.description, 60))} |`);
    }
    L.push("");
  }
  return L;
}

export function renderMarkdown(s: AnalysisSummary): string {
  const L: string[] = [];
  L.push(`# Research summary${s.task ? ` — ${s.task} task` : ""}`, "");
  L.push(`_${s.results}, ${s.counts.runs} runs, generated ${s.generatedAt.slice(0, 16).replace("T", " ")} UTC._`, "");
  // What must be read before any number comes first.
  for (const w of s.warnings) L.push(`> **WARNING: ${w}.**`, ">");
  if (s.warnings.length > 0) L.splice(L.length - 1, 1, "");
  if (s.counts.runs === 0) {
    const empty = s.task === null && s.parseErrors.length === 0;
    L.push(empty ? "No runs yet: results.tsv is empty or missing." : "No runs yet.", "");
  } else {
    const p = s.primary ?? "primary";
    L.push(...headline(s));
    L.push(...atAGlance(s));
    if (s.frontier.length > 0) {
      L.push("## Frontier (each run that raised the best)", "", `| run | commit | ${p} | gain | description |`,
        "|---:|---|---:|---:|---|");
      for (const f of s.frontier) {
        const gain = f.gain === null ? "—" : signed(f.gain);
        L.push(`| ${f.run} | \`${f.commit}\` | ${fmt(f.primary)} | ${gain} | ${cell(shorten(f.description, 70))} |`);
      }
      L.push("");
    }
    if (s.nearMisses.length > 0) {
      const tol = s.nearMissTolerance;
      L.push(`## Near misses worth combining (tolerance ${fmt(tol.value)}: ${tol.basis})`, "");
      for (const n of s.nearMisses) {
        L.push(`- run ${n.run} \`${n.commit}\` ${fmt(n.primary)} (${signed(n.deltaToParent)} vs its best): `
          + `${cell(shorten(n.description, 60))} — ${n.why.join("; ")}`);
      }
      L.push("");
    }
    if (s.hpAxes.length > 0) {
      const header = "| axis | tried | won | lost | crashed | current | moves (run: from→to, Δ) |";
      L.push("## Hyperparameter moves", "", header, "|---|---:|---:|---:|---:|---|---|");
      const mark = (status: string) => (status === "keep" ? "✔" : status === "crash" ? "✖crash" : "✖");
      for (const a of s.hpAxes) {
        const delta = (d: number | null) => (d !== null ? ` ${signed(d, 3)}` : "");
        const moves = a.moves.slice(-6).map((m) => `${m.run}: ${m.from}→${m.to} ${mark(m.status)}${delta(m.delta)}`);
        const counts = `${a.tried} | ${a.wins} | ${a.losses} | ${a.crashes}`;
        L.push(`| ${a.axis} | ${counts} | ${a.current ?? "?"} | ${cell(moves.join("; "))} |`);
      }
      L.push("");
    }
    if (s.lostRegions.length > 0) {
      L.push("## Regions that lost repeatedly (avoid)", "");
      for (const r of s.lostRegions) {
        L.push(`- ${r.axis} ${r.region}: lost ${r.losses}× (tried ${r.values.join(", ")}; runs ${r.runs.join(", ")})`);
      }
      L.push("");
    }
    if (s.crashes.length > 0) {
      L.push("## Crashes", "");
      for (const c of s.crashReasons) {
        L.push(`- ${c.count}× ${cell(shorten(c.reason, 120))} (runs ${c.runs.join(", ")})`);
      }
      L.push("");
    }
    if (s.suggestions.length > 0) {
      L.push("## Suggested next experiments", "");
      s.suggestions.forEach((x, i) => L.push(`${i + 1}. ${x.text}`));
      L.push("");
    }
  }
  if (s.parseErrors.length > 0) {
    L.push("## Lines of results.tsv that are not rows (skipped)", "");
    for (const e of s.parseErrors) L.push(`- line ${e.line}: ${e.message}`);
    L.push("");
  }
  return `${L.join("\n").trimEnd()}\n`;
}

// ---------------------------------------------------------------------------
// The progress chart: Vega-Lite → vega's headless View → SVG → sharp → PNG
// ---------------------------------------------------------------------------

/** Size of progress.svg in CSS pixels; progress.png is CHART.scale times larger. */
export const CHART = { width: 1000, height: 560, scale: 2 } as const;
/** Fixed margins around the plot (autosize "none"), so the plot's pixel geometry is known here. */
const MARGIN = { left: 88, right: 24, top: 66, bottom: 84 };
const LABEL_FONT = 11;
/** DejaVu Sans averages about 0.6 em per character: enough to keep labels apart. */
const textWidth = (t: string) => t.length * LABEL_FONT * 0.62;

const STATUS_STYLE = {
  domain: ["baseline", "keep", "discard", "crash"],
  colors: ["#3b6fb6", "#2e9e44", "#9a9a9a", "#d1342f"],
  shapes: ["square", "circle", "diamond", "cross"],
};

interface Box { x0: number; y0: number; x1: number; y1: number; weight?: number }
const overlaps = (a: Box, b: Box) => a.x0 < b.x1 && b.x0 < a.x1 && a.y0 < b.y1 && b.y0 < a.y1;

/**
 * Place each kept run's label next to its point (pixel space of the plot): the first of a few
 * spots around the point that stays inside the plot and clear of points, the best-so-far line and
 * the labels already placed; else the spot with the fewest collisions.
 */
function placeLabels(
  labels: { x: number; y: number; text: string }[], obstacles: Box[], w: number, h: number,
): { x: number; y: number; text: string; lx: number; ly: number; align: "left" | "right" }[] {
  const placed: Box[] = [];
  const lh = LABEL_FONT + 3, gap = 7;
  return labels.map((l) => {
    const tw = textWidth(l.text);
    const spots: { lx: number; ly: number; align: "left" | "right" }[] = [];
    for (let level = 0; level < 6; level++) {
      for (const sign of [-1, 1]) {
        const ly = l.y + sign * (gap + (level + 0.5) * lh);
        spots.push({ lx: l.x + gap, ly, align: "left" }, { lx: l.x - gap, ly, align: "right" });
      }
    }
    const boxOf = (p: { lx: number; ly: number; align: "left" | "right" }): Box => ({
      x0: p.align === "left" ? p.lx : p.lx - tw, x1: p.align === "left" ? p.lx + tw : p.lx,
      y0: p.ly - lh / 2, y1: p.ly + lh / 2,
    });
    // Crossing another label or a caption is worst, the best-so-far line next, a point least.
    const cost = (b: Box) => (b.x0 < 0 || b.x1 > w || b.y0 < 0 || b.y1 > h ? 1000 : 0)
      + [...obstacles, ...placed].reduce((sum, o) => sum + (overlaps(b, o) ? o.weight ?? 10 : 0), 0);
    let best = spots[0]!, bestCost = Infinity;
    for (const spot of spots) {
      const c = cost(boxOf(spot));
      if (c < bestCost) { best = spot; bestCost = c; }
      if (c === 0) break;
    }
    placed.push(boxOf(best));
    return { ...l, ...best };
  });
}

/** The Vega-Lite spec of the progress chart. */
function chartSpec(s: AnalysisSummary): TopLevelSpec {
  const w = CHART.width - MARGIN.left - MARGIN.right, h = CHART.height - MARGIN.top - MARGIN.bottom;
  const nf = s.noiseFloor;
  const center = nf.mean ?? s.baseline?.primary ?? null;
  const band = center !== null && nf.threshold !== null
    ? { lo: center - nf.threshold, hi: center + nf.threshold }
    : null;
  const excluded = new Set(s.excluded);
  const shown = s.series.filter((p) => !excluded.has(p.run));
  const scored = shown.flatMap((p) => (p.primary === null ? [] : [p.primary]));
  const bests = shown.flatMap((p) => (p.runningBest === null ? [] : [p.runningBest]));
  // The trivial model's score, on the plotted metric: always drawn when the best is within noise of
  // it (the axis stretches to show it), else only when it falls among the runs anyway.
  const tv = s.trivial && s.trivial.compared === s.primary ? s.trivial.value : null;
  const inRange = tv !== null && scored.length > 0 && tv >= Math.min(...scored) && tv <= Math.max(...scored);
  const trivial = tv !== null && (s.trivial?.withinNoise === true || inRange) ? tv : null;
  const ys = [...scored, ...bests, ...(band ? [band.lo, band.hi] : []), ...(trivial !== null ? [trivial] : [])];
  const lo0 = ys.length ? Math.min(...ys) : 0, hi0 = ys.length ? Math.max(...ys) : 1;
  const span = Math.max(hi0 - lo0, Math.abs(hi0) * 0.02, 1e-3);
  // Room above for labels, and a floor below where crashes (no score) are drawn.
  const yLo = lo0 - span * 0.13, yHi = hi0 + span * 0.16;
  const crashY = lo0 - span * 0.075;
  const runsN = Math.max(1, s.series.length);
  // Enough decimals that neighbouring ticks (about 8 on the axis) never print the same.
  const raw = (yHi - yLo) / 8, mag = 10 ** Math.floor(Math.log10(raw)), norm = raw / mag;
  const step = (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
  const digits = Math.min(6, Math.max(2, Math.ceil(-Math.log10(step) - 1e-9)));
  const xPx = (run: number) => ((run - 0.5) / runsN) * w;
  const yPx = (v: number) => h * (1 - (v - yLo) / (yHi - yLo));
  const xRun = (px: number) => px / w * runsN + 0.5;
  const yVal = (px: number) => yLo + (1 - px / h) * (yHi - yLo);

  const points = shown.map((p) => ({
    ...p, y: p.primary ?? crashY, shown: p.status === "crash" ? "crashed (no score)" : fmt(p.primary),
  }));
  const best = shown.filter((p) => p.runningBest !== null).map((p) => ({ run: p.run, best: p.runningBest }));
  const lastBest = best.at(-1);

  // Obstacles for the labels: every point, the best-so-far line, the baseline and best captions.
  const obstacles: Box[] = points.map((p) => ({
    x0: xPx(p.run) - 6, x1: xPx(p.run) + 6, y0: yPx(p.y) - 6, y1: yPx(p.y) + 6, weight: 1,
  }));
  best.forEach((b, i) => {
    const next = best[i + 1];
    if (!next || b.best === null || next.best === null) return;
    obstacles.push({ x0: xPx(b.run), x1: xPx(next.run), y0: yPx(b.best) - 1.5, y1: yPx(b.best) + 1.5, weight: 3 });
    if (next.best !== b.best) {
      const nx = xPx(next.run);
      obstacles.push({ x0: nx - 1.5, x1: nx + 1.5, y0: yPx(next.best), y1: yPx(b.best), weight: 3 });
    }
  });
  const baselineText = center !== null ? `baseline ${fmt(center)}${band ? ` ± ${fmt(nf.threshold)}` : ""}` : "";
  if (center !== null) {
    obstacles.push({ x0: w - textWidth(baselineText) - 4, x1: w, y0: yPx(center), y1: yPx(center) + 16 });
  }
  const bestText = lastBest && lastBest.best !== null ? `best ${fmt(lastBest.best)}` : "";
  if (lastBest && lastBest.best !== null) {
    obstacles.push({ x0: w - textWidth(bestText) - 4, x1: w, y0: yPx(lastBest.best) - 16, y1: yPx(lastBest.best) });
  }

  const trivialText = trivial !== null ? `trivial (always majority) ${fmt(trivial)}` : "";
  if (trivial !== null) {
    obstacles.push({ x0: 0, x1: w, y0: yPx(trivial) - 1.5, y1: yPx(trivial) + 1.5, weight: 3 });
    obstacles.push({ x0: 0, x1: textWidth(trivialText) + 8, y0: yPx(trivial) - 16, y1: yPx(trivial) });
  }

  const wanted = shown.flatMap((p) => (p.label !== null && p.primary !== null
    ? [{ x: xPx(p.run), y: yPx(p.primary), text: p.label }]
    : []));
  const half = (LABEL_FONT + 3) / 2;
  const labels = placeLabels(wanted, obstacles, w, h).map((l) => ({
    run: xRun(l.x), y: yVal(l.y), lrun: xRun(l.lx + (l.align === "left" ? -2 : 2)),
    ly: yVal(l.y < l.ly ? l.ly - half : l.ly + half),
    textRun: xRun(l.lx), textY: yVal(l.ly), text: l.text, align: l.align,
  }));

  const runs = `${s.counts.runs} run${s.counts.runs === 1 ? "" : "s"}`;
  const bestAt = s.best ? ` at run ${s.best.run} (${s.best.commit})` : "";
  const reference = fmt(s.improvement?.reference ?? s.baseline?.primary);
  const gain = s.improvement ? ` · gain ${signed(s.improvement.absolute)}` : "";
  const dataTag = s.data.synthetic ? "SYNTHETIC data · "
    : s.data.sample ? "SAMPLE data (no measure of quality) · " : "";
  const title = s.counts.runs === 0
    ? { text: "autoresearch progress: no runs yet", subtitle: s.results }
    : {
      text: `${dataTag}${s.task ?? "?"} · ${s.primary ?? "primary"} over ${runs} (higher is better)`,
      subtitle: `best ${fmt(s.best?.primary)}${bestAt} · baseline ${reference}`
        + `${gain} · ${s.counts.keep} kept, ${s.counts.discard} discarded, ${s.counts.crash} crashed`
        + (band ? ` · band: baseline ± noise threshold (${nf.k}σ)` : ""),
    };
  // On the axis, where it has room: the subtitle is full.
  const notDrawn = s.excluded.length > 0
    ? ` (not drawn: run${s.excluded.length === 1 ? "" : "s"} ${shorten(s.excluded.join(", "), 60)})`
    : "";
  const x = {
    field: "run", type: "quantitative" as const, title: `run${notDrawn}`,
    scale: { domain: [0.5, runsN + 0.5], nice: false, zero: false }, axis: { tickMinStep: 1, format: "d", grid: false },
  };
  const y = {
    type: "quantitative" as const, scale: { domain: [yLo, yHi], nice: false, zero: false },
    axis: { title: s.primary ?? "primary metric", format: `.${digits}f`, tickCount: 8 },
  };
  // Captions at the right edge: the baseline's below its line, the best's above its line; the
  // trivial model's at the left edge, above its line.
  const caption = (text: string, value: number, color: string, below: boolean, left = false) => ({
    data: { values: [{ run: left ? 0.5 : runsN + 0.5, y: value, text }] },
    mark: {
      type: "text" as const, align: left ? "left" as const : "right" as const,
      baseline: below ? "top" as const : "bottom" as const,
      dx: left ? 4 : -4, dy: below ? 3 : -3, color, fontSize: 11,
      fontWeight: left ? "bold" as const : "normal" as const,
    },
    encoding: { x: { ...x, field: "run" }, y: { ...y, field: "y" }, text: { field: "text" } },
  });
  const labelLayer = (align: "left" | "right") => ({
    data: { values: labels.filter((l) => l.align === align) },
    mark: { type: "text" as const, align, baseline: "middle" as const, fontSize: LABEL_FONT, color: "#1d5e2a" },
    encoding: { x: { ...x, field: "textRun" }, y: { ...y, field: "textY" }, text: { field: "text" } },
  });
  return {
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    width: w, height: h,
    autosize: { type: "none" },
    padding: MARGIN,
    background: "white",
    title: {
      ...title, anchor: "start", fontSize: 17, subtitleFontSize: 12, subtitleColor: "#444", offset: 10, frame: "group",
    },
    config: {
      font: "DejaVu Sans, Helvetica, Arial, sans-serif",
      axis: { labelFontSize: 12, titleFontSize: 13, titleFontWeight: "normal" },
      legend: { labelFontSize: 12, labelLimit: 300 },
      view: { stroke: "#bbb" },
    },
    layer: [
      ...(band ? [{
        data: { values: [band] },
        mark: { type: "rect" as const, color: "#9aa7b8", opacity: 0.25 },
        encoding: { y: { ...y, field: "lo" }, y2: { field: "hi" } },
      }] : []),
      ...(center !== null ? [{
        data: { values: [{ y: center }] },
        mark: { type: "rule" as const, color: "#3b6fb6", strokeDash: [6, 4], strokeWidth: 1.5 },
        encoding: { y: { ...y, field: "y" } },
      }, caption(baselineText, center, "#3b6fb6", true)] : []),
      ...(trivial !== null ? [{
        data: { values: [{ y: trivial }] },
        mark: { type: "rule" as const, color: "#d1342f", strokeDash: [8, 4], strokeWidth: 2 },
        encoding: { y: { ...y, field: "y" } },
      }, caption(trivialText, trivial, "#b0221d", false, true)] : []),
      ...(best.length > 0 ? [{
        data: { values: best },
        mark: {
          type: "line" as const, interpolate: "step-after" as const, color: "#2e9e44", strokeWidth: 2.5, opacity: 0.8,
        },
        encoding: { x, y: { ...y, field: "best" } },
      }] : []),
      ...(lastBest && lastBest.best !== null ? [caption(bestText, lastBest.best, "#1d5e2a", false)] : []),
      {
        data: { values: labels },
        mark: { type: "rule" as const, color: "#8fbf98", strokeWidth: 0.8 },
        encoding: { x: { ...x, field: "run" }, y: { ...y, field: "y" }, x2: { field: "lrun" }, y2: { field: "ly" } },
      },
      {
        data: { values: points },
        mark: { type: "point" as const, filled: true, size: runsN > 80 ? 40 : 85, opacity: 0.95 },
        encoding: {
          x, y: { ...y, field: "y" },
          color: {
            field: "status", type: "nominal" as const,
            scale: { domain: STATUS_STYLE.domain, range: STATUS_STYLE.colors },
            legend: {
              title: null, orient: "bottom" as const, direction: "horizontal" as const, offset: 12, symbolSize: 90,
              labelLimit: 400,
              labelExpr: "datum.label == 'crash' ? 'crash (no score, drawn at the bottom)' : datum.label",
            },
          },
          shape: {
            field: "status", type: "nominal" as const,
            scale: { domain: STATUS_STYLE.domain, range: STATUS_STYLE.shapes },
          },
          tooltip: [
            { field: "run" }, { field: "status" }, { field: "shown", title: s.primary ?? "primary" },
            { field: "description" },
          ],
        },
      },
      labelLayer("left"),
      labelLayer("right"),
    ],
  };
}

/** Render the chart: SVG text (vega, headless, no canvas) and its PNG (sharp), CHART.scale× larger. */
export async function renderChart(s: AnalysisSummary): Promise<{ svg: string; png: Uint8Array }> {
  const [vega, vl, { default: sharp }] = await Promise.all([import("vega"), import("vega-lite"), import("sharp")]);
  const view = new vega.View(vega.parse(vl.compile(chartSpec(s)).spec), { renderer: "none" });
  const svg = await view.toSVG();
  view.finalize();
  const png = await sharp(Buffer.from(svg), { density: 72 * CHART.scale }).png({ compressionLevel: 9 }).toBuffer();
  return { svg, png: new Uint8Array(png.buffer, png.byteOffset, png.byteLength) };
}

// ---------------------------------------------------------------------------
// Writing everything
// ---------------------------------------------------------------------------

interface WriteOptions {
  results: string;
  outDir: string;
  plateau?: number;
  /**
   * The loop's journal (default .autoresearch/state.json, none with chartOnly): used when it
   * exists, an error when it is not one.
   */
  state?: string;
  logs?: string;
  chart?: boolean;
  /** Only progress.{svg,png}, from results.tsv alone unless `state` is given. */
  chartOnly?: boolean;
  /** Runs left off the chart: run numbers or commit prefixes. */
  exclude?: string[];
  noiseK?: number;
}

/** Read the inputs, write analysis_summary.{json,md} (and progress.{svg,png}); returns the summary. */
export async function writeSummary(o: WriteOptions): Promise<{ summary: AnalysisSummary; files: string[] }> {
  const parsed = await readResults(o.results);
  const statePath = o.state ?? (o.chartOnly ? null : STATE_FILE);
  const state = statePath === null ? null : readState(statePath);
  const summary = await summarize(parsed, {
    results: o.results, state, data: state ? readDataFacts(state.cache.dir) : UNKNOWN_DATA,
    logFor: logFinder(o.logs ?? LOGS_DIR), plateau: o.plateau, noiseK: o.noiseK, exclude: o.exclude,
  });
  const checked = AnalysisSummary(summary);
  if (checked instanceof type.errors) {
    throw new Error(`internal error: the summary does not match its schema: ${checked.summary}`);
  }
  const files: string[] = [];
  const put = (name: string, data: string | Uint8Array) => {
    const path = join(o.outDir, name);
    writeAtomic(path, data); // the loop's agent may read these while they are rewritten
    files.push(path);
  };
  if (!o.chartOnly) {
    put("analysis_summary.json", `${JSON.stringify(summary, null, 2)}\n`);
    put("analysis_summary.md", renderMarkdown(summary));
  }
  if (o.chart !== false || o.chartOnly) {
    const { svg, png } = await renderChart(summary);
    put("progress.svg", svg);
    put("progress.png", png);
  }
  return { summary, files };
}

const Flags = type({
  results: "string > 0", outDir: "string > 0", plateau: "number.integer >= 1", "state?": "string > 0",
  logs: "string > 0", chart: "boolean", chartOnly: "boolean", exclude: "string[]", noiseK: "number > 0",
});

async function main(): Promise<void> {
  const cli = cac("summarize_results.ts");
  cli.option("--results <file>", "results.tsv to read", { default: RESULTS_FILE })
    .option("--out-dir, --out <dir>", "where analysis_summary.{json,md} and progress.{svg,png} go", { default: "." })
    .option("--plateau <n>", "no keep in this many runs = plateau", { default: DEFAULT_PLATEAU })
    .option("--state <file>", `the loop's journal: noise floor, best, test runs, trivial model (default ${STATE_FILE}; `
      + "none with --chart-only)")
    .option("--logs <dir>", "run logs, found by commit in the file name", { default: LOGS_DIR })
    .option("--noise-k <k>", "noise threshold in σ when the loop's state does not say", { default: DEFAULT_NOISE_K })
    .option("--exclude <runs>", "leave these runs off the chart: run numbers or commits, comma-separated",
      { type: [String] })
    .option("--chart-only", "write only progress.{svg,png}, from any results.tsv (no journal needed)")
    .option("--no-chart", "skip progress.svg/.png");
  cli.help();
  const { options: o } = cli.parse(process.argv, { run: false });
  if (o.help === true) return;
  const exclude: unknown[] = Array.isArray(o.exclude) ? o.exclude : o.exclude === undefined ? [] : [o.exclude];
  const flags = Flags({
    results: String(o.results), outDir: String(o.outDir), plateau: Number(o.plateau),
    ...(o.state !== undefined ? { state: String(o.state) } : {}),
    logs: String(o.logs), chart: o.chart !== false, chartOnly: o.chartOnly === true, exclude: exclude.map(String),
    noiseK: Number(o.noiseK),
  });
  if (flags instanceof type.errors) throw new Error(`summarize_results.ts: ${flags.summary}`);
  if (!existsSync(flags.results)) console.error(`note: ${flags.results} does not exist yet: writing an empty summary`);
  const { summary: s, files } = await writeSummary(flags);
  for (const e of s.parseErrors) console.error(`${flags.results}:${e.line}: skipped: ${e.message}`);
  for (const w of s.warnings) console.log(`WARNING: ${w}`);
  const best = s.best
    ? `best ${s.primary} ${fmt(s.best.primary)} at run ${s.best.run} (${s.best.commit})`
    : "no kept run yet";
  const c = s.counts;
  console.log(`${c.runs} runs (${c.keep} keep, ${c.discard} discard, ${c.crash} crash); ${best}`
    + (s.plateau.detected ? "; PLATEAU" : ""));
  console.log(`wrote ${files.join(", ")}`);
}

if (import.meta.main) {
  main().catch((err: unknown) => {
    console.error(`error: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  });
}
