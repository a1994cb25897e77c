/** summarize_results.ts on hand-written results.tsv files, and the progress chart. */
import { describe, expect, test } from "bun:test";
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { type } from "arktype";
import sharp from "sharp";
import type { State } from "../lib/journal.ts";
import { parseResults } from "../lib/results.ts";
import { newState } from "../lib/session.ts";
import {
  AnalysisSummary, CHART, crashReasonFromDescription, crashReasonFromLog, noiseFromState, parseHpMoves, renderChart,
  renderMarkdown, summarize, writeSummary,
} from "../summarize_results.ts";
import { ROOT, runScript, tempDir } from "./helpers.ts";

/** Tests that run a child process or render the chart: slow on a busy machine. */
const SLOW_MS = 120_000;

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
  });

  test("plateau: no keep in the last N runs suggests a structural change first", async () => {
    const s = await summaryOf(NIGHT, { plateau: 3 });
    expect(s.plateau.detected).toBe(true);
    expect(s.suggestions[0]!.kind).toBe("structural");
    expect(renderMarkdown(s)).toContain("Plateau: **yes**");
  });

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
  });

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
  });

  test("a header that matches no task is reported as line 1", async () => {
    const s = await summaryOf("commit\tfoo\tstatus\ndeadbee\t1\tkeep\n");
    expect(s.task).toBeNull();
    expect(s.parseErrors[0]!.line).toBe(1);
  });

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
  });

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
  });

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
  });
});
