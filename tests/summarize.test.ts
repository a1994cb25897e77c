/** summarize_results.ts on hand-written results.tsv files and loop journals, and the progress chart. */
import { describe, expect, test } from "bun:test";
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { type } from "arktype";
import sharp from "sharp";
import type { State } from "../lib/journal.ts";
import { interval95 } from "../prepare.ts";
import { parseResults } from "../lib/results.ts";
import { newState } from "../lib/session.ts";
import {
  AnalysisSummary, CHART, crashReasonFromDescription, crashReasonFromLog, type Journal, noiseFromState,
  parseHpMoves, readDataFacts, renderChart, renderMarkdown, summarize, writeSummary,
} from "../summarize_results.ts";
import { ROOT, runScript, tempDir } from "./helpers.ts";

/** Tests that run a child process or render the chart: slow on a busy machine. */
const SLOW_MS = 120_000;
/** The rest compute in memory; the limit only allows for a machine shared by several people. */
const QUICK_MS = 30_000;

const HEADER = "commit\taccuracy\tyield_mse\tcombined_score\tmemory_gb\tstatus\tdescription";
/** One waste row: combined_score is given, not computed, so ties are exact. */
const row = (commit: string, acc: number, combined: number, status: string, description: string) =>
  [commit, acc.toFixed(6), "0.040000", combined.toFixed(6), status === "crash" ? "0.0" : "0.4", status, description]
    .join("\t");

/** Keeps, discards, crashes, a tie on the primary metric and a full tie. */
const NIGHT = [
  HEADER,
  row("aaaaaaa", 0.70, 0.695, "baseline", "baseline (repeat 1)"),
  row("bbbbbbb", 0.71, 0.705, "keep", "baseline"),
  row("ccccccc", 0.75, 0.746, "keep", "lr 0.003 -> 0.005"),
  row("ddddddd", 0.74, 0.736, "discard", "width 16 -> 24"),
  row("eeeeeee", 0, 0, "crash", "lr 0.005 -> 0.012 (crash: loss is NaN at step 3)"),
  row("fffffff", 0.76, 0.746, "keep", "depth 3 -> 4"), // same primary, higher secondary: raises the best
  row("1111111", 0.76, 0.746, "keep", "dropout 0.2 -> 0.1 (simpler, same score)"), // full tie: becomes the tip
  row("2222222", 0.73, 0.726, "discard", "lr 0.005 -> 0.008"),
  row("3333333", 0.72, 0.716, "discard", "lr 0.005 -> 0.008 (again)"),
  row("4444444", 0, 0, "crash", "shift 4 -> 8"),
].join("\n") + "\n";

const summaryOf = (text: string, extra: Partial<Parameters<typeof summarize>[1]> = {}) =>
  summarize(parseResults(text), { results: "results.tsv", now: new Date("2026-01-01T00:00:00Z"), ...extra });

/** A waste-task loop journal (lib/journal.ts's State) whose baseline repeats are in, with this noise. */
function journal(noise: State["noise"]): State {
  const st = newState({
    branch: "autoresearch/test", task: "waste", head: "a".repeat(40), protected: {},
    settings: { budgetSeconds: 300, baselineRuns: 2, noiseSigmas: noise?.sigmas ?? 2, seed: 0 },
    cache: { dir: "/nowhere", images: "0", manifest: "0" },
  });
  return { ...st, noise };
}
const NOISE = { metric: "combined_score", runs: [0.698, 0.702], mean: 0.7, sigma: 0.002, sigmas: 2, floor: 0.004 };

describe("summarize", () => {
  test("keeps, discards, crashes and ties: baseline, best, frontier, noise, near misses, axes", async () => {
    const s = await summaryOf(NIGHT);
    expect(AnalysisSummary(s) instanceof type.errors).toBe(false);
    expect(s.task).toBe("waste");
    expect(s.primary).toBe("combined_score");
    expect(s.counts).toEqual({ runs: 10, baseline: 1, keep: 4, discard: 3, crash: 2 });
    expect(s.baseline?.commit).toBe("aaaaaaa");
    // The full tie at run 7 is the branch tip, so it is the current best; run 6 raised the secondary.
    expect(s.best?.commit).toBe("1111111");
    expect(s.best?.run).toBe(7);
    expect(s.frontier.map((f) => f.run)).toEqual([1, 2, 3, 6]);
    expect(s.frontier[3]!.gain).toBe(0);
    // The gain is over the mean of the baseline measurements (0.695 and 0.705), not one of them.
    expect(s.improvement!.reference).toBeCloseTo(0.7, 9);
    expect(s.improvement!.basis).toBe("mean of 2 baseline runs");
    expect(s.improvement!.absolute).toBeCloseTo(0.746 - 0.7, 9);
    // Noise: the baseline row plus the first keep.
    expect(s.noiseFloor.source).toBe("results");
    expect(s.noiseFloor.n).toBe(2);
    expect(s.noiseFloor.mean).toBeCloseTo(0.7, 9);
    expect(s.noiseFloor.sigma).toBeCloseTo(Math.SQRT2 * 0.005, 9);
    expect(s.noiseFloor.threshold).toBeCloseTo(2 * Math.SQRT2 * 0.005, 9);
    // width 16 -> 24 lost by 0.010 < 0.0141: a near miss; the lr discards lost by 0.02 and 0.03.
    expect(s.nearMisses.map((n) => n.run)).toEqual([4]);
    expect(s.nearMisses[0]!.moves).toEqual([{ axis: "width", from: "16", to: "24", direction: "up" }]);
    const lr = s.hpAxes.find((a) => a.axis === "lr")!;
    expect({ tried: lr.tried, wins: lr.wins, losses: lr.losses, crashes: lr.crashes, current: lr.current })
      .toEqual({ tried: 4, wins: 1, losses: 2, crashes: 1, current: "0.005" });
    expect(s.lostRegions).toEqual([{
      axis: "lr", direction: "up", from: "0.005", region: "up from 0.005", values: ["0.012", "0.008"], losses: 3,
      runs: [5, 8, 9],
    }]);
    expect(s.crashes.map((c) => [c.run, c.reason, c.from])).toEqual([
      [5, "loss is NaN at step 3", "description"],
      [10, "unknown (no run log, and the description gives no reason)", "unknown"],
    ]);
    expect(s.series.map((p) => p.runningBest))
      .toEqual([0.695, 0.705, 0.746, 0.746, 0.746, 0.746, 0.746, 0.746, 0.746, 0.746]);
    expect(s.series[4]!.primary).toBeNull(); // a crash has no score
    expect(s.plateau).toMatchObject({ runsSinceLastKeep: 3, detected: false });
    const md = renderMarkdown(s);
    expect(md).toContain("**Best combined_score: 0.7460** at run 7, commit `1111111`");
    expect(md).toContain("lr up from 0.005: lost 3×");
  }, QUICK_MS);

  test("plateau: no keep in the last N runs suggests a structural change first", async () => {
    const s = await summaryOf(NIGHT, { plateau: 3 });
    expect(s.plateau.detected).toBe(true);
    expect(s.suggestions[0]!.kind).toBe("structural");
    expect(renderMarkdown(s)).toContain("Plateau: **yes**");
  }, QUICK_MS);

  test("empty file, header only, and a missing file give an empty summary, not a crash", async () => {
    for (const text of ["", `${HEADER}\n`, HEADER]) {
      const s = await summaryOf(text);
      expect(AnalysisSummary(s) instanceof type.errors).toBe(false);
      expect(s.counts.runs).toBe(0);
      expect(s.best).toBeNull();
      expect(s.parseErrors).toEqual([]);
      expect(renderMarkdown(s)).toContain("No runs yet");
    }
    expect((await summaryOf(`${HEADER}\n`)).task).toBe("waste");
    const dir = tempDir();
    const { summary } = await writeSummary({ results: join(dir, "absent.tsv"), outDir: dir, chart: false });
    expect(summary.counts.runs).toBe(0);
  }, QUICK_MS);

  test("a garbage line is reported with its line number; the rows around it keep theirs", async () => {
    const lines = NIGHT.trimEnd().split("\n");
    lines.splice(3, 0, "this is not a row at all");
    lines.splice(6, 0, "ccccccc\tnot-a-number\t0.04\t0.7\t0.4\tdiscard\tx 1 -> 2");
    const s = await summaryOf(`${lines.join("\n")}\n`);
    expect(s.parseErrors.map((e) => e.line)).toEqual([4, 7]);
    expect(s.parseErrors[0]!.message).toContain("expected 7 tab-separated fields");
    expect(s.counts.runs).toBe(10);
    expect(s.series.length).toBe(10);
    const ddd = [s.baseline, ...s.nearMisses].find((r) => r?.commit === "ddddddd");
    expect(ddd?.line).toBe(6); // header 1, rows 2-3, garbage 4, row 5, row 6 (ddddddd)
    expect(renderMarkdown(s)).toContain("- line 4: expected 7 tab-separated fields, got 1");
  }, QUICK_MS);

  test("a header that matches no task is reported as line 1", async () => {
    const s = await summaryOf("commit\tfoo\tstatus\ndeadbee\t1\tkeep\n");
    expect(s.task).toBeNull();
    expect(s.parseErrors[0]!.line).toBe(1);
  }, QUICK_MS);

  test("descriptions: HP moves, crash notes; logs and the loop's journal", () => {
    expect(parseHpMoves("lr 0.003 -> 0.006")).toEqual([{ axis: "lr", from: "0.003", to: "0.006", direction: "up" }]);
    expect(parseHpMoves("lr 0.003 -> 0.006 (below the noise floor 0.004)"))
      .toEqual([{ axis: "lr", from: "0.003", to: "0.006", direction: "up" }]);
    expect(parseHpMoves("flip true -> false")[0]!.direction).toBe("change");
    expect(parseHpMoves("width 16 -> 12, lr 0.003->0.002").map((m) => [m.axis, m.direction]))
      .toEqual([["width", "down"], ["lr", "down"]]);
    expect(parseHpMoves("baseline")).toEqual([]);
    expect(parseHpMoves("use residual blocks")).toEqual([]);
    expect(crashReasonFromDescription("lr 1 -> 2 (crash: loss is NaN)")).toBe("loss is NaN");
    expect(crashReasonFromDescription("timeout")).toBeNull();
    expect(crashReasonFromLog("step 00001 | loss 2.3\nstep 00002 | loss NaN\nFAIL: loss is NaN at step 2\n"))
      .toBe("FAIL: loss is NaN at step 2");
    expect(crashReasonFromLog("all fine\n---\nval_accuracy: 0.5\n")).toBeNull();
    // The journal's Noise, field for field: k is the loop's --noise-sigmas (0 allowed), n its baseline repeats.
    const noise = { metric: "combined_score", runs: [0.69, 0.7, 0.71], mean: 0.7, sigma: 0.01, sigmas: 3, floor: 0.03 };
    expect(noiseFromState(journal(noise)))
      .toEqual({ mean: 0.7, sigma: 0.01, k: 3, threshold: 0.03, n: 3, source: "state" });
    expect(noiseFromState(journal({ ...noise, sigmas: 0, floor: 0 }))).toMatchObject({ k: 0, threshold: 0 });
    // Until the baseline repeats are all in, the journal has no noise: the summary computes its own.
    expect(noiseFromState(journal(null))).toBeNull();
    expect(noiseFromState(null)).toBeNull();
  }, QUICK_MS);

  test("the journal's noise is the summary's, and the loop's own noise computation is used without it", async () => {
    const s = await summaryOf(NIGHT, { state: journal(NOISE) });
    expect(AnalysisSummary(s) instanceof type.errors).toBe(false);
    expect(s.noiseFloor).toEqual({ mean: 0.7, sigma: 0.002, k: 2, threshold: 0.004, n: 2, source: "state" });
    expect(s.nearMissTolerance.basis).toBe("noise threshold (2σ, from the loop's state.json)");
    // --noise-sigmas 0: the loop keeps any gain; the summary says so instead of failing its schema.
    const zero = await summaryOf(NIGHT, { state: journal({ ...NOISE, sigmas: 0, floor: 0 }) });
    expect(AnalysisSummary(zero) instanceof type.errors).toBe(false);
    expect(zero.noiseFloor).toMatchObject({ k: 0, threshold: 0, source: "state" });
    expect((await summaryOf(NIGHT, { state: journal(null) })).noiseFloor.source).toBe("results");
  }, QUICK_MS);

  test("the command line: flags, state.json, crash logs, files written and valid", () => {
    const dir = tempDir();
    writeFileSync(join(dir, "results.tsv"), NIGHT);
    mkdirSync(join(dir, "logs"));
    // Named as loop.ts names them: <n>-<commit>.log.
    const kernel = "error: kernel 'Conv2DBackpropFilter' not registered";
    writeFileSync(join(dir, "logs", "10-4444444.log"), `step 00001 | loss 1.0\n${kernel}\n`);
    writeFileSync(join(dir, "logs", "5-eeeeeee.log"), "step 00003 | loss NaN\nFAIL: loss is NaN at step 3\n");
    // The loop's journal, as lib/journal.ts's State.
    writeFileSync(join(dir, "state.json"), JSON.stringify(journal(NOISE)));
    const out = join(dir, "out");
    const args = (state: string) => ["summarize_results.ts", "--results", join(dir, "results.tsv"), "--out-dir", out,
      "--plateau", "5", "--state", state, "--logs", join(dir, "logs"), "--no-chart"];
    const r = runScript(args(join(dir, "state.json")), {});
    expect(r.code).toBe(0);
    expect(r.out).toContain("10 runs (4 keep, 3 discard, 2 crash)");
    const s = AnalysisSummary(JSON.parse(readFileSync(join(out, "analysis_summary.json"), "utf8")));
    if (s instanceof type.errors) throw new Error(s.summary);
    expect(s.noiseFloor).toMatchObject({ source: "state", threshold: 0.004 });
    expect(s.nearMisses).toEqual([]); // 0.010 below is beyond a 0.004 threshold
    expect(s.crashes.find((c) => c.run === 10)).toMatchObject({ from: "log", reason: kernel });
    // The loop's own "(crash: …)" note wins over the log; the log line is kept beside it.
    expect(s.crashes.find((c) => c.run === 5))
      .toMatchObject({ from: "description", reason: "loss is NaN at step 3", logLine: "FAIL: loss is NaN at step 3" });
    expect(s.plateau.window).toBe(5);
    expect(readFileSync(join(out, "analysis_summary.md"), "utf8")).toContain("# Research summary — waste task");
    expect(existsSync(join(out, "progress.png"))).toBe(false);
    const bad = runScript(["summarize_results.ts", "--plateau", "0"], {});
    expect(bad.code).toBe(1);
    expect(bad.out).toContain("plateau");
    // A state.json that is not the loop's journal is an error naming the file, not a guess at its fields.
    writeFileSync(join(dir, "other.json"), JSON.stringify({ phase: "idle", noise: { floor: 0.004 } }));
    const guess = runScript(args(join(dir, "other.json")), {});
    expect(guess.code).toBe(1);
    expect(guess.out).toContain(`${join(dir, "other.json")}: not a loop journal`);
  }, SLOW_MS);

  test("the chart: a PNG of the expected size that changes when a run is added", async () => {
    const s1 = await summaryOf(NIGHT);
    const c1 = await renderChart(s1);
    expect(c1.svg.startsWith("<svg")).toBe(true);
    expect(c1.svg).toContain(`width="${CHART.width}" height="${CHART.height}"`);
    expect(c1.svg).toContain("lr 0.003 -&gt; 0.005"); // a kept run's label
    const meta = await sharp(c1.png).metadata();
    expect([meta.format, meta.width, meta.height])
      .toEqual(["png", CHART.width * CHART.scale, CHART.height * CHART.scale]);
    const s2 = await summaryOf(`${NIGHT}${row("5555555", 0.8, 0.79, "keep", "width 16 -> 32")}\n`);
    const c2 = await renderChart(s2);
    expect(Buffer.from(c2.png).equals(Buffer.from(c1.png))).toBe(false);
    expect(c2.svg).toContain("width 16 -&gt; 32");
    // An empty results file still draws (an empty chart that says so).
    const c0 = await renderChart(await summaryOf(""));
    expect(c0.svg).toContain("no runs yet");
    expect((await sharp(c0.png).metadata()).width).toBe(CHART.width * CHART.scale);
  }, SLOW_MS);

  test("the checked-in 31-run fixture summarises without errors", async () => {
    const s = await summaryOf(readFileSync(join(ROOT, "tests", "fixtures", "results-night-FIXTURE.tsv"), "utf8"));
    expect(s.parseErrors).toEqual([]);
    expect(s.counts).toEqual({ runs: 31, baseline: 2, keep: 6, discard: 20, crash: 3 });
    // The loop writes the first baseline run as a keep ("baseline 1/2") and the repeats as
    // baseline rows: the starting point is the first of them, the gain is over their mean.
    expect(s.baseline?.run).toBe(1);
    expect(s.improvement!.reference).toBeCloseTo(s.noiseFloor.mean!, 9);
    expect(s.plateau.detected).toBe(true);
    expect(s.crashReasons.map((c) => c.reason)).toContain("loss is NaN at step 41");
  }, QUICK_MS);

  test("the journal's best is the summary's best, even when it is below the first baseline row", async () => {
    // --noise-sigmas 0: run 3 beat the baseline mean (0.70), not the first baseline row (0.72).
    const gap = [
      HEADER,
      row("aaaaaaa", 0.73, 0.72, "keep", "baseline 1/2"),
      row("aaaaaaa", 0.69, 0.68, "baseline", "baseline repeat 2/2"),
      row("ccccccc", 0.72, 0.71, "keep", "lr 0.003 -> 0.005"),
      row("ddddddd", 0.71, 0.705, "discard", "width 16 -> 24"),
    ].join("\n") + "\n";
    const noise = { metric: "combined_score", runs: [0.72, 0.68], mean: 0.7, sigma: 0.0283, sigmas: 0, floor: 0 };
    const st: State = {
      ...journal(noise),
      baseline: { commit: "a".repeat(40), metrics: { val_accuracy: 0.71, yield_mse: 0.04, combined_score: 0.7 } },
      best: {
        n: 3, commit: "c".repeat(40), short: "ccccccc", trainLines: 100, description: "lr 0.003 -> 0.005",
        metrics: { val_accuracy: 0.72, yield_mse: 0.04, combined_score: 0.71 },
      },
    };
    // Without the journal the keep rule's order over the rows puts the first baseline row first.
    const alone = await summaryOf(gap);
    expect([alone.best?.run, alone.bestSource]).toEqual([1, "results"]);
    const s = await summaryOf(gap, { state: st });
    expect(AnalysisSummary(s) instanceof type.errors).toBe(false);
    expect([s.best?.run, s.best?.commit, s.bestSource]).toEqual([3, "ccccccc", "journal"]);
    expect(s.improvement!.absolute).toBeCloseTo(0.01, 9);
    // The running best is what the loop compared with: the baseline mean, then the keep.
    expect(s.series.map((p) => p.runningBest)).toEqual([0.7, 0.7, 0.71, 0.71]);
    expect(s.frontier.map((f) => [f.run, f.gain === null ? null : Number(f.gain.toFixed(6))]))
      .toEqual([[1, null], [3, 0.01]]);
    expect(renderMarkdown(s)).toContain("**Best combined_score: 0.7100** at run 3, commit `ccccccc`");
    expect((await renderChart(s)).svg).toContain("best 0.7100");
    // A journal whose best is not in this file: the rows decide, and the summary says why.
    const other = await summaryOf(gap, { state: { ...st, best: { ...st.best!, n: 9, short: "9999999",
      commit: "9".repeat(40) } } });
    expect([other.best?.run, other.bestSource]).toEqual([1, "results"]);
    expect(other.bestNote).toContain("is not a kept row of this results file");
    // No keep yet: the best is the baseline, at its mean, and nothing is gained.
    const none = await summaryOf(gap.split("\n").slice(0, 3).join("\n"), {
      state: {
        ...st, best: { ...st.best!, n: 1, commit: st.sessionStart, short: "aaaaaaa", metrics: st.baseline!.metrics },
      },
    });
    expect([none.best?.run, none.best?.primary, none.improvement?.absolute]).toEqual([1, 0.7, 0]);
  }, SLOW_MS);

  test("min/avg/max of each metric, the keep rate and the top hits by gain over the baseline", async () => {
    const s = await summaryOf(NIGHT);
    // Crashes (runs 5 and 10) have no score: 8 runs count.
    const acc = s.metricStats.find((m) => m.metric === "val_accuracy")!;
    expect(acc.n).toBe(8);
    expect([acc.min, acc.max]).toEqual([0.7, 0.76]);
    expect(acc.avg).toBeCloseTo(5.87 / 8, 9);
    expect(s.metricStats.map((m) => m.metric)).toEqual(["val_accuracy", "yield_mse", "combined_score"]);
    // Runs 1 and 2 are the baseline measurements; runs 3-10 are experiments, 3 of them kept.
    expect(s.keepRate).toEqual({ keeps: 3, experiments: 8, rate: 3 / 8 });
    expect(s.topHits.map((h) => [h.rank, h.run])).toEqual([[1, 3], [2, 6], [3, 7], [4, 4], [5, 8]]);
    expect(s.topHits[3]!.delta).toBeCloseTo(0.736 - 0.7, 9);
    const md = renderMarkdown(s);
    expect(md).toContain("- Keep rate: 3 of 8 experiments kept (38%)");
    expect(md).toContain("| val_accuracy | 0.7000 | 0.7338 | 0.7600 |");
    expect(md).toContain("| 4 | 4 | `ddddddd` | discard | 0.7360 | +0.0360 | width 16 -> 24 |");
    // Near the top: before the frontier and the per-axis tables.
    expect(md.indexOf("## Top 5 by gain")).toBeLessThan(md.indexOf("## Frontier"));
    expect(md.indexOf("## Metrics over the 8 scored runs")).toBeLessThan(md.indexOf("## Frontier"));
  }, QUICK_MS);

  test("the screening seed's column order reads, cells by name", async () => {
    const seed = [
      "commit\tmc_acc\tbin_acc\tmemory_gb\tstatus\tdescription",
      "aaaaaaa\t0.610000\t0.920000\t0.4\tkeep\tbaseline",
      "bbbbbbb\t0.650000\t0.934000\t0.5\tkeep\tlr 0.003 -> 0.005",
      "ccccccc\t0.700000\t0.910000\t0.5\tdiscard\twidth 16 -> 24",
    ].join("\n") + "\n";
    const parsed = parseResults(seed);
    expect(parsed.errors).toEqual([]);
    expect(parsed.task).toBe("screening");
    expect(parsed.rows[1]).toEqual({
      commit: "bbbbbbb", metrics: { bin_acc: 0.934, mc_acc: 0.65 }, memory_gb: 0.5, status: "keep",
      description: "lr 0.003 -> 0.005",
    });
    const s = await summaryOf(seed);
    expect([s.primary, s.best?.commit, s.best?.primary]).toEqual(["bin_acc", "bbbbbbb", 0.934]);
    // The same columns with one missing or doubled still match no task.
    expect(parseResults("commit\tmc_acc\tmemory_gb\tstatus\tdescription\n").errors[0]!.message)
      .toContain("matches no task's columns");
    expect(parseResults("commit\tmc_acc\tbin_acc\tbin_acc\tmemory_gb\tstatus\tdescription\n").task).toBeNull();
  }, QUICK_MS);

  test("test vs val: the baseline runs' mean and spread, the best's test score, how much val gain held", async () => {
    const dir = tempDir();
    const st = screeningJournal(dir, { sample: false });
    const s = await summaryOf(SCREEN_NIGHT, { state: st, data: readDataFacts(dir) });
    expect(AnalysisSummary(s) instanceof type.errors).toBe(false);
    expect(s.test.metric).toBe("bin_acc");
    expect(s.test.images).toBe(439);
    expect(s.test.baseline!.mean).toBeCloseTo(0.915, 9);
    expect([s.test.baseline!.min, s.test.baseline!.max, s.test.baseline!.n]).toEqual([0.91, 0.92, 3]);
    expect(s.test.baseline!.sigma).toBeCloseTo(0.005, 9);
    expect(s.test.best).toEqual({ n: 4, commit: "ccccccc", value: 0.92 });
    expect(s.test.valGain).toBeCloseTo(0.014, 9);
    expect(s.test.testGain).toBeCloseTo(0.005, 9);
    expect(s.test.held).toBeCloseTo(0.005 / 0.014, 9);
    // The harness's Wilson half-width for the best's bin_acc on 439 test images (≈ 1.96·sqrt(p(1−p)/n) here).
    expect(s.test.interval!.halfWidth).toBe(interval95(0.92, 439));
    expect(s.test.interval!.halfWidth).toBeCloseTo(1.96 * Math.sqrt((0.92 * 0.08) / 439), 3);
    const md = renderMarkdown(s);
    expect(md).toContain("- Test split (439 images; ±0.026 at 95% for bin_acc near 0.92): baseline 0.9150 "
      + "(mean of 3 runs, 0.9100–0.9200, σ 0.0050), best 0.9200 (run 4, `ccccccc`).");
    expect(md).toContain("**val +0.0140, test +0.0050: 36% of the val gain held**");
    expect(md).toContain("The test gain is inside ±0.026: on 439 images it cannot be told from no change.");
    // Right under the best, before the run counts.
    expect(md.indexOf("- Test split")).toBeLessThan(md.indexOf("- Runs:"));
    // No testRuns, no journal: one line says so.
    const none = await summaryOf(SCREEN_NIGHT, { state: { ...st, testRuns: [] } });
    expect(none.test.lines)
      .toEqual(["Test split: not measured (no testRuns in the journal): the val gain is unchecked."]);
    expect((await summaryOf(SCREEN_NIGHT)).test.lines).toEqual(
      ["Test split: no loop journal, so no test measurements to report."]);
    // The interval does not vanish at a perfect score on a handful of images.
    expect(interval95(1, 10)).toBeGreaterThan(0.1);
  }, QUICK_MS);

  test("a best within the noise floor of the trivial model is a warning at the top, in the json and on the chart",
    async () => {
      const dir = tempDir();
      const st = screeningJournal(dir, { sample: false });
      const s = await summaryOf(SCREEN_NIGHT, { state: st, data: readDataFacts(dir) });
      // 0.934 − 0.9294 = 0.0046, inside the 0.01 floor.
      expect(s.trivial).toMatchObject({ metric: "trivial_bin_acc", value: 0.9294, compared: "bin_acc", best: 0.934,
        threshold: 0.01, withinNoise: true });
      expect(s.warnings).toHaveLength(1);
      const md = renderMarkdown(s).split("\n");
      expect(md[4]).toStartWith("> **WARNING: the best bin_acc 0.9340 is within the noise floor (0.0100) of the "
        + "trivial model's 0.9294 (always the majority side)");
      const chart = await renderChart(s);
      expect(chart.svg).toContain("trivial (always majority) 0.9294");
      expect(chart.svg).toContain('stroke="#d1342f"');
      // Clear of the floor: no warning, and no red line far below the runs.
      const far = await summaryOf(SCREEN_NIGHT, {
        state: { ...st, trivial: { metric: "trivial_bin_acc", value: 0.8 } },
      });
      expect([far.trivial?.withinNoise, far.warnings]).toEqual([false, []]);
      expect((await renderChart(far)).svg).not.toContain("trivial (always majority)");
      // Below the trivial model says "below".
      const below = await summaryOf(SCREEN_NIGHT, { state: { ...st, trivial: { metric: "bin_acc", value: 0.95 } } });
      expect(below.warnings[0]).toContain("the best bin_acc 0.9340 is below the trivial model's 0.9500");
    }, SLOW_MS);

  test("sample data: the first line after the title says it is no measure of model quality", async () => {
    const dir = tempDir();
    const st = screeningJournal(dir, { sample: true });
    const s = await summaryOf(SCREEN_NIGHT, { state: { ...st, trivial: null }, data: readDataFacts(dir) });
    expect(s.data).toMatchObject({ sample: true, synthetic: false, splits: { train: 100, val: 60, test: 439 } });
    const md = renderMarkdown(s).split("\n");
    expect(md[4])
      .toBe("> **WARNING: SAMPLE data: not a measure of model quality (the session trained on data/sample).**");
    // A cache that is gone (another machine) is unknown, not an error.
    expect(readDataFacts(join(dir, "gone"))).toEqual({ manifest: null, sample: null, synthetic: null, splits: null });
    expect((await summaryOf(SCREEN_NIGHT, { state: st })).warnings.some((w) => w.includes("SAMPLE"))).toBe(false);
  }, QUICK_MS);

  test("--exclude leaves runs off the chart only; a name that matches no run is an error", async () => {
    const all = await summaryOf(SCREEN_NIGHT);
    expect((await renderChart(all)).svg).toContain("lr 0.003 -&gt; 0.005");
    const s = await summaryOf(SCREEN_NIGHT, { exclude: ["ccccccc", "7"] });
    expect(s.excluded).toEqual([4, 7]);
    expect(s.counts.runs).toBe(7); // every other section still counts them
    const svg = (await renderChart(s)).svg;
    expect(svg).not.toContain("lr 0.003 -&gt; 0.005");
    expect(svg).toContain("not drawn: runs 4, 7");
    expect(summaryOf(SCREEN_NIGHT, { exclude: ["4,99"] })).rejects.toThrow("--exclude 99: no run has that number");
  }, SLOW_MS);

  test("the command line: a journal with test runs and the trivial model; --chart-only needs no journal", () => {
    const dir = tempDir();
    writeFileSync(join(dir, "results.tsv"), SCREEN_NIGHT);
    const cache = join(dir, "cache");
    mkdirSync(cache);
    writeFileSync(join(dir, "state.json"), JSON.stringify(screeningJournal(cache, { sample: true })));
    const out = join(dir, "out");
    const r = runScript(["summarize_results.ts", "--results", join(dir, "results.tsv"),
      "--state", join(dir, "state.json"), "--out", out, "--exclude", "5"], {});
    expect(r.code).toBe(0);
    expect(r.out).toContain("WARNING: SAMPLE data");
    const s = AnalysisSummary(JSON.parse(readFileSync(join(out, "analysis_summary.json"), "utf8")));
    if (s instanceof type.errors) throw new Error(s.summary);
    expect([s.test.best?.value, s.trivial?.withinNoise, s.excluded, s.bestSource])
      .toEqual([0.92, true, [5], "journal"]);
    expect(existsSync(join(out, "progress.png"))).toBe(true);
    writeFileSync(join(dir, "bad.json"), JSON.stringify({ ...screeningJournal(cache, { sample: true }),
      trivial: { metric: 3 } }));
    const bad = runScript(["summarize_results.ts", "--results", join(dir, "results.tsv"), "--state",
      join(dir, "bad.json"), "--out", out, "--no-chart"], {});
    expect([bad.code, bad.out.includes(`${join(dir, "bad.json")}: not a loop journal`)]).toEqual([1, true]);
    // --chart-only in a folder whose journal is not one: it is not read, and only the chart is written.
    mkdirSync(join(dir, ".autoresearch"));
    writeFileSync(join(dir, ".autoresearch", "state.json"), "{ not json");
    const charts = join(dir, "charts");
    const c = runScript([join(ROOT, "summarize_results.ts"), "--chart-only", "--results", "results.tsv", "--out",
      charts, "--exclude", "4"], {}, dir);
    expect(c.code).toBe(0);
    expect(readdirSync(charts).sort()).toEqual(["progress.png", "progress.svg"]);
    expect(readFileSync(join(charts, "progress.svg"), "utf8")).toContain("not drawn: run 4");
  }, SLOW_MS);
});

describe("a session that keeps on balanced_bin_acc (not a results.tsv column)", () => {
  test("rows rank by the value the loop wrote in each description; a baseline at the trivial rate is a warning",
    async () => {
      const dir = tempDir();
      const text = [
        SCREEN_HEADER,
        srow("aaaaaaa", 0.929, 0.4, "keep", "baseline 1/3 (balanced_bin_acc 0.5000)"),
        srow("aaaaaaa", 0.929, 0.41, "baseline", "baseline repeat 2/3 (balanced_bin_acc 0.5000)"),
        srow("aaaaaaa", 0.929, 0.42, "baseline", "baseline repeat 3/3 (balanced_bin_acc 0.5000)"),
        srow("bbbbbbb", 0.82, 0.45, "keep", "classWeight 0 -> 1 (balanced_bin_acc 0.7243) (confirmed over seeds 0,1: "
          + "mean 0.7243, +0.224 > floor 0)"),
        srow("ccccccc", 0.93, 0.44, "discard", "batchSize 32 -> 64 (balanced_bin_acc 0.5100)"),
      ].join("\n") + "\n";
      const st: Journal = {
        ...screeningJournal(dir, { sample: false }),
        primary: "balanced_bin_acc",
        noise: { metric: "balanced_bin_acc", runs: [0.5, 0.5, 0.5], mean: 0.5, sigma: 0, sigmas: 2, floor: 0 },
        baseline: { commit: "a".repeat(40), metrics: { bin_acc: 0.929, mc_acc: 0.41, balanced_bin_acc: 0.5 } },
        best: {
          n: 4, commit: "b".repeat(40), short: "bbbbbbb", trainLines: 100, description: "classWeight 0 -> 1",
          metrics: { bin_acc: 0.82, mc_acc: 0.45, balanced_bin_acc: 0.7243 },
        },
        trivial: { metric: "balanced_bin_acc", value: 0.5 },
      };
      const s = await summaryOf(text, { state: st });
      expect(s.primary).toBe("balanced_bin_acc");
      expect(s.primaryNote).toBeNull();
      expect(s.best).toMatchObject({ run: 4, primary: 0.7243 });
      const md = renderMarkdown(s);
      expect(md).toContain("**Best balanced_bin_acc: 0.7243** at run 4");
      expect(s.warnings.join("\n")).toContain("the baseline's balanced_bin_acc 0.5000 was the trivial rate (0.5000");
      // The best is far from the trivial rate: no warning about the best.
      expect(s.warnings.join("\n")).not.toContain("the best balanced_bin_acc");
    }, QUICK_MS);
});

const SCREEN_HEADER = "commit\tmc_acc\tbin_acc\tmemory_gb\tstatus\tdescription";
/** One screening row in the screening seed's column order. */
const srow = (commit: string, bin: number, mc: number, status: string, description: string) =>
  [commit, mc.toFixed(6), bin.toFixed(6), status === "crash" ? "0.0" : "0.3", status, description].join("\t");
/** Three baseline runs around the trivial rate, one keep, two discards, a crash. */
const SCREEN_NIGHT = [
  SCREEN_HEADER,
  srow("aaaaaaa", 0.915, 0.6, "keep", "baseline 1/3"),
  srow("aaaaaaa", 0.92, 0.61, "baseline", "baseline repeat 2/3"),
  srow("aaaaaaa", 0.925, 0.62, "baseline", "baseline repeat 3/3"),
  srow("ccccccc", 0.934, 0.64, "keep", "lr 0.003 -> 0.005"),
  srow("eeeeeee", 0, 0, "crash", "classWeight false -> true (crash: loss is NaN at step 3)"),
  srow("ddddddd", 0.926, 0.63, "discard", "width 16 -> 24"),
  srow("fffffff", 0.931, 0.62, "discard", "batch 32 -> 64"),
].join("\n") + "\n";

/**
 * A screening journal for SCREEN_NIGHT, with the fields the loop adds (test runs, the trivial
 * model), and a manifest in `cacheDir` with 439 test images.
 */
function screeningJournal(cacheDir: string, o: { sample: boolean }): Journal {
  const items = [...Array(100).fill("train"), ...Array(60).fill("val"), ...Array(439).fill("test")]
    .map((split: string, i) => ({ path: `x/${i}.jpg`, label: 0, sha256: "0", split, yield: 0 }));
  writeFileSync(join(cacheDir, "manifest.json"), JSON.stringify({ version: "2", sample: o.sample, synthetic: false,
    items }));
  const st = newState({
    branch: "autoresearch/screen", task: "screening", head: "a".repeat(40), protected: {},
    settings: { budgetSeconds: 120, baselineRuns: 3, noiseSigmas: 2, seed: 0 },
    cache: { dir: cacheDir, images: "0", manifest: "0" },
  });
  const base = { bin_acc: 0.92, mc_acc: 0.61 };
  return {
    ...st,
    noise: { metric: "bin_acc", runs: [0.915, 0.92, 0.925], mean: 0.92, sigma: 0.005, sigmas: 2, floor: 0.01 },
    baseline: { commit: "a".repeat(40), metrics: base },
    best: {
      n: 4, commit: "c".repeat(40), short: "ccccccc", trainLines: 100, description: "lr 0.003 -> 0.005",
      metrics: { bin_acc: 0.934, mc_acc: 0.64 },
    },
    trivial: { metric: "trivial_bin_acc", value: 0.9294 },
    testRuns: [
      { n: 1, kind: "baseline", commit: "a".repeat(40), metrics: { bin_acc: 0.91, mc_acc: 0.58 } },
      { n: 2, kind: "baseline", commit: "a".repeat(40), metrics: { bin_acc: 0.915, mc_acc: 0.59 } },
      { n: 3, kind: "baseline", commit: "a".repeat(40), metrics: { bin_acc: 0.92, mc_acc: 0.6 } },
      { n: 4, kind: "keep", commit: "c".repeat(40), metrics: { bin_acc: 0.92, mc_acc: 0.62 } },
    ],
  };
}

