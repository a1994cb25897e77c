/**
 * Verdicts a person can trust: the confirmation of a keep over other seeds (and its resume after a
 * kill), load-affected runs, the primary a session keeps on, the trivial-rate warning, the test
 * split that no decision reads, the re-baseline of a structure change, the proposer's axes, and a
 * loop that backs off a crash streak instead of pausing the night.
 *
 * The end-to-end runs use SEEDED as train.ts: a model whose predictions follow from HP exactly
 * (a constant class, or with HP.see a dense layer that reads the synthetic images' class hue),
 * that applies AR_HP itself (so the loop's seeds reach it), predicts HP.otherCls instead of HP.cls
 * for any seed but 0 (a "lucky seed"), shifts its yield by HP.jitter · seed (noise across seeds),
 * throws when HP.boomA/boomB/boomC is not 0 or when the file $STUB_FAIL_FILE exists, and reports
 * the throughput $STUB_IPS gives its seed ("seed:img/s,…"). On the synthetic waste val split
 * (10 ewaste, 5 recyclable, 8 organic) class 0 scores accuracy 10/23, class 2 8/23, class 1 5/23.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { type } from "arktype";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { tempDir } from "./helpers.ts";
import {
  E2E_MS, removeTemps, clean, commitTrain, fixture, head, last, loop, made, makeRepo, rows, sh, state, syntheticCache,
} from "./loop_fixtures.ts";
import { State, pidAlive } from "../lib/journal.ts";
import { irrelevantAxes, nextMove, streakAxes } from "../lib/proposer.ts";
import { newState } from "../lib/session.ts";
import { imagesPerSecond } from "../lib/trial.ts";
import {
  checkPrimary, clearsFloor, confirmVerdict, steadyRuns, trivialWarning,
} from "../lib/verdict.ts";
import { trivialScore } from "../prepare.ts";

let SCREENING = "";

beforeAll(async () => {
  fixture.cache = await syntheticCache("waste");
  SCREENING = await syntheticCache("screening");
}, E2E_MS);
afterAll(removeTemps, E2E_MS); // many temp repositories: seconds on a busy machine

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

interface SeededHp {
  cls?: number; otherCls?: number; yieldValue?: number; jitter?: number; see?: boolean; backbone?: string;
}

/** A train.ts whose metrics follow from HP and the seed (see the file comment). */
function seeded(hp: SeededHp = {}, space = "{}"): string {
  return `/** Test stub of train.ts: metrics that follow from HP and the seed. */
import { existsSync } from "node:fs";
import type { SymbolicTensor, Tensor } from "@tensorflow/tfjs";
import type { Predictor } from "./prepare.ts";

export const HP = {
  cls: ${hp.cls ?? 2}, // the class predicted with seed 0
  otherCls: ${hp.otherCls ?? hp.cls ?? 2}, // the class predicted with any other seed
  yieldValue: ${hp.yieldValue ?? 0.5},
  jitter: ${hp.jitter ?? 0}, // yield shift per seed
  see: ${hp.see ?? false}, // read the class hue of the image instead of a constant class
  // Any backbone predicts class 0 whatever the seed; the loop first caches its features (a real
  // one, at a small size, so that harness step runs for real).
  backbone: "${hp.backbone ?? "none"}",
  backboneSize: 32,
  boomA: 0, // not 0: throw
  boomB: 0,
  boomC: 0,
  yieldLossWeight: 1,
  seed: 0,
};

export const HP_SPACE = ${space};

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  if (args.includes("--print-hp")) {
    const space = Object.fromEntries(Object.entries(HP).map(([k, v]) => [k, (HP_SPACE as any)[k] ?? [v]]));
    console.log(JSON.stringify({ HP, HP_SPACE: space }));
    return;
  }
  // Loaded after --print-hp, which the loop asks before every run: it needs none of them.
  const tf = await import("@tensorflow/tfjs");
  const { evaluate, loadCache, printFooter } = await import("./prepare.ts");
  const { saveCheckpoint } = await import("./lib/checkpoint.ts");
  const hp = { ...HP, ...JSON.parse(process.env.AR_HP || "{}") };
  const at = args.indexOf("--checkpoint");
  const ckpt = at >= 0 ? args[at + 1]! : "checkpoints/latest";
  console.log("seeded train.ts: " + JSON.stringify(hp));
  const fail = process.env.STUB_FAIL_FILE;
  if (fail && existsSync(fail)) throw new Error("the environment is broken");
  if (hp.boomA !== 0 || hp.boomB !== 0 || hp.boomC !== 0) throw new Error("boom " + JSON.stringify(hp));
  const ds = await loadCache();
  const input = tf.input({ shape: [ds.imageSize, ds.imageSize, 3] });
  const pooled = tf.layers.globalAveragePooling2d({}).apply(input) as SymbolicTensor;
  const cls = tf.layers.dense({ units: ds.numClasses, activation: "softmax" });
  const yld = tf.layers.dense({ units: 1 });
  const outputs = [cls.apply(pooled) as SymbolicTensor, yld.apply(pooled) as SymbolicTensor];
  const model = tf.model({ inputs: input, outputs });
  const c = hp.backbone !== "none" ? 0 : hp.seed === 0 ? hp.cls : hp.otherCls;
  // The synthetic images draw class k in a hue whose channel k is bright: the channel means tell the class.
  const C = ds.numClasses;
  const hue = Array.from({ length: 3 * C }, (_, i) => (i % C === Math.floor(i / C) ? 100 : 0));
  const bias = Array.from({ length: ds.numClasses }, (_, k) => (k === c ? 5 : 0));
  cls.setWeights(hp.see ? [tf.tensor2d(hue, [3, C]), tf.zeros([C])] : [tf.zeros([3, C]), tf.tensor1d(bias)]);
  yld.setWeights([tf.zeros([3, 1]), tf.tensor1d([hp.yieldValue + hp.jitter * hp.seed])]);
  const predict: Predictor = (images) => {
    const [probs, yields] = model.predict(images) as Tensor[];
    return { probs: probs!, yields };
  };
  const result = await evaluate(predict, ds);
  await saveCheckpoint(ckpt, model, {
    version: "1", task: ds.task, classes: ds.manifest.classes, positiveClass: ds.manifest.positiveClass,
    imageSize: ds.imageSize, preprocessing: ds.manifest.preprocessing, backbone: null, hasYieldHead: true,
    numParams: model.countParams(), metrics: result.metrics, commit: null, createdAt: new Date().toISOString(),
    synthetic: ds.manifest.synthetic,
  });
  const ips = Object.fromEntries((process.env.STUB_IPS ?? "").split(",").filter(Boolean).map((p) => p.split(":")));
  console.log("checkpoint: " + ckpt + "  (epochs: 1, " + Number(ips[hp.seed] ?? 200).toFixed(1) + " img/s)");
  const facts = {
    training_seconds: 1, total_seconds: 1, peak_memory_mb: 1, num_steps: 1, num_params: 1, backend: "stub",
  };
  printFooter(result, facts, ds.manifest.synthetic);
}
main().catch((err: unknown) => {
  console.error("error: " + (err instanceof Error ? err.message : String(err)));
  process.exit(1);
});
`;
}

const runsOf = (dir: string, n: number) => state(dir).runs.filter((r) => r.n === n);

// ---------------------------------------------------------------------------
// Pure rules
// ---------------------------------------------------------------------------

describe("confirmation rule", () => {
  const ranking = { primary: "combined_score", secondary: "val_accuracy", lowerIsBetter: ["yield_mse"] };
  const best = { combined_score: 0.9, val_accuracy: 0.9 };
  const run = (seed: number, score: number, ips: number | null = 200) =>
    ({ seed, metrics: { combined_score: score, val_accuracy: 0.9 }, imagesPerSecond: ips });
  const args = { ...ranking, best, noiseFloor: 0.012, wanted: 2 };

  test("clearsFloor: only a primary gain strictly above the floor is confirmed", () => {
    const a = { ...ranking, best, noiseFloor: 0.012 };
    expect(clearsFloor({ ...a, candidate: { combined_score: 0.913, val_accuracy: 0.9 } })).toBe(true);
    expect(clearsFloor({ ...a, candidate: { combined_score: 0.911, val_accuracy: 0.9 } })).toBe(false);
    // Exactly the floor is not "above" it (values exact in binary).
    const exact = { ...ranking, best: { combined_score: 0.5 }, noiseFloor: 0.25, candidate: { combined_score: 0.75 } };
    expect(clearsFloor(exact)).toBe(false);
    // A keep on the secondary (equal primary) is not a gain on the primary.
    expect(clearsFloor({ ...a, candidate: { combined_score: 0.9, val_accuracy: 0.95 } })).toBe(false);
  });

  test("the mean over the runs still clears the floor: keep, the row's metrics are the mean", () => {
    const v = confirmVerdict({ ...args, runs: [run(0, 0.93), run(1, 0.92)] });
    expect(v).toEqual({
      more: false, status: "keep", metrics: { combined_score: 0.925, val_accuracy: 0.9 },
      note: "(confirmed over seeds 0,1: mean 0.9250, +0.025 > floor 0.012)",
    });
  });

  test("a lucky first run that another seed does not reproduce: discard, with the first run's gain", () => {
    const v = confirmVerdict({ ...args, runs: [run(0, 0.93), run(1, 0.89)] });
    expect(v).toMatchObject({ more: false, status: "discard" });
    if (v.more) throw new Error("unreachable");
    expect(v.note).toBe("(not confirmed over seeds 0,1: mean 0.9100, +0.01 <= floor 0.012; first run +0.03)");
    expect(v.metrics.combined_score).toBeCloseTo(0.91, 12);
  });

  test("too few runs: train another; unknown seeds are counted as runs", () => {
    expect(confirmVerdict({ ...args, runs: [run(0, 0.93)] })).toEqual({ more: true });
    const unknown = { ...run(0, 0.93), seed: null };
    const unseeded = confirmVerdict({ ...args, runs: [unknown, unknown] });
    expect(unseeded)
      .toMatchObject({ status: "keep", note: "(confirmed over 2 runs: mean 0.9300, +0.03 > floor 0.012)" });
  });

  test("a load-affected run is replaced by one more run; still unsteady: discard as load-affected", () => {
    expect(steadyRuns([200, 139, null, 140])).toEqual([true, false, true, true]);
    expect(steadyRuns([null, null])).toEqual([true, true]);
    const slow = [run(0, 0.93, 200), run(1, 0.8, 90)];
    expect(confirmVerdict({ ...args, runs: slow })).toEqual({ more: true });
    const replaced = confirmVerdict({ ...args, runs: [...slow, run(2, 0.92, 190)] });
    expect(replaced).toMatchObject({
      status: "keep",
      note: "(confirmed over seeds 0,2: mean 0.9250, +0.025 > floor 0.012; 1 load-affected run(s) left out)",
    });
    const unsteady = confirmVerdict({ ...args, runs: [...slow, run(2, 0.92, 80)] });
    expect(unsteady).toMatchObject({ more: false, status: "discard" });
    if (unsteady.more) throw new Error("unreachable");
    expect(unsteady.note).toStartWith("(load-affected: its runs trained at 200, 90, 80 img/s;");
  });
});

describe("primary, trivial rate, throughput", () => {
  test("--primary: the task's default, or balanced_bin_acc for screening; anything else is refused", () => {
    expect(checkPrimary("screening", undefined)).toEqual({ primary: "bin_acc" });
    expect(checkPrimary("screening", "balanced_bin_acc")).toEqual({ primary: "balanced_bin_acc" });
    expect(checkPrimary("waste", "combined_score")).toEqual({ primary: "combined_score" });
    expect(checkPrimary("waste", "balanced_bin_acc"))
      .toEqual({ error: "--primary balanced_bin_acc: task waste keeps on one of combined_score" });
    expect(checkPrimary("cifar100", "top5")).toEqual({ error: "--primary top5: task cifar100 keeps on one of top1" });
  });

  test("the trivial score: trivial_bin_acc for bin_acc, 0.5 for balanced_bin_acc, none for other tasks", () => {
    const m = { bin_acc: 0.93, trivial_bin_acc: 0.929385 };
    expect(trivialScore(m, "screening", "bin_acc")).toBe(0.929385);
    expect(trivialScore({ bin_acc: 0.93 }, "screening", "bin_acc")).toBeNull(); // evaluate did not report it
    expect(trivialScore(m, "screening", "balanced_bin_acc")).toBe(0.5);
    expect(trivialScore({ combined_score: 0.7 }, "waste", "combined_score")).toBeNull();
  });

  test("the warning: only within the noise floor of the trivial score, naming the constant", () => {
    const a = { primary: "bin_acc", trivial: 0.929385, floor: 0.01, positive: "trash", prevalence: 31 / 439 };
    expect(trivialWarning({ ...a, baseline: 0.929385 })).toBe("WARNING: the baseline's bin_acc 0.9294 is the trivial "
      + "rate (always 'not trash' scores 0.9294): bin_acc cannot tell a real screen from a constant; "
      + "consider --primary balanced_bin_acc");
    expect(trivialWarning({ ...a, baseline: 0.939 })).toContain("trivial rate"); // +0.0096 is within the floor
    expect(trivialWarning({ ...a, baseline: 0.95 })).toBeNull();
    const balanced = trivialWarning({ ...a, primary: "balanced_bin_acc", trivial: 0.5, baseline: 0.5 });
    expect(balanced).toStartWith("WARNING: the baseline's balanced_bin_acc 0.5000 is the trivial rate (any constant");
    expect(trivialWarning({ ...a, positive: null, baseline: 0.929385 })).toContain("(always the majority side scores");
  });

  test("imagesPerSecond: the checkpoint line, else the last progress line; never feature extraction", () => {
    const progress = "step 0010 | loss 1.2 | lr 3.00e-3 | 150.2 img/s | 20s left\nstep 0020 | 160.5 img/s | 10s left\n";
    expect(imagesPerSecond(progress)).toBe(160.5);
    expect(imagesPerSecond(`${progress}checkpoint: checkpoints/latest  (epochs: 3, 155.0 img/s)\n---\n`)).toBe(155);
    expect(imagesPerSecond("features mobilenet: 100/400 images, 35.0 img/s\nbackend: wasm\n")).toBeNull();
    expect(imagesPerSecond("")).toBeNull();
  });
});

describe("proposer axes and the journal", () => {
  const SRC = `export const HP = {\n  lr: 0.003,\n  yieldLossWeight: 1,\n  classWeight: 0,\n  seed: 0,\n};\n`;
  const dump = {
    HP: { lr: 0.003, yieldLossWeight: 1, classWeight: 0, seed: 0 },
    HP_SPACE: { lr: [0.001, 0.003, 0.005], yieldLossWeight: [0.3, 1, 3], classWeight: [0, 0.5, 1], seed: [0, 1, 2] },
  };
  const base = { tried: [], settings: { seed: 0 }, lastKeptMove: null, skipAxes: [] as string[] };

  /** Every axis nextMove proposes from one base until it has nothing left. */
  function axesProposed(st: Parameters<typeof nextMove>[2]): Set<string> {
    const tried = [...st.tried];
    const axes = new Set<string>();
    for (let m = nextMove(SRC, dump, { ...st, tried }, "b"); m; m = nextMove(SRC, dump, { ...st, tried }, "b")) {
      axes.add(m.move.axis);
      tried.push({ base: "b", axis: m.move.axis, value: m.move.to, status: "discard" });
    }
    return axes;
  }

  test("seed never moves; yieldLossWeight only for waste; classWeight for every task; backed-off axes skipped", () => {
    expect([...irrelevantAxes("screening")].sort()).toEqual(["seed", "yieldLossWeight"]);
    expect([...axesProposed({ ...base, task: "screening" as const })].sort())
      .toEqual(["classWeight", "lr"]);
    expect([...axesProposed({ ...base, task: "waste" as const })].sort())
      .toEqual(["classWeight", "lr", "yieldLossWeight"]);
    expect([...axesProposed({ ...base, task: "waste" as const, skipAxes: ["lr"] })].sort())
      .toEqual(["classWeight", "yieldLossWeight"]);
  });

  test("streakAxes: the axes of the trailing crashes, no further back than the streak", () => {
    const t = (axis: string, status: string) => ({ base: "b", axis, value: 1, status });
    const tried = [t("lr", "crash"), t("width", "discard"), t("depth", "crash"), t("lr", "crash"), t("lr", "crash")];
    expect(streakAxes(tried, 3)).toEqual(["depth", "lr"]);
    expect(streakAxes(tried, 1)).toEqual(["lr"]);
    expect(streakAxes(tried, 0)).toEqual([]);
  });

  test("a journal written before these fields loads with their defaults", () => {
    const st = newState({
      branch: "autoresearch/old", task: "waste", head: "a".repeat(40), protected: {},
      settings: { budgetSeconds: 60, baselineRuns: 2, noiseSigmas: 2, seed: 0 },
      cache: { dir: "/nowhere", images: "0", manifest: "0" },
    });
    const old: Record<string, unknown> = JSON.parse(JSON.stringify(st));
    for (const k of ["trivial", "testRuns", "runs", "rebaseline", "skipAxes"]) delete old[k];
    old.current = {
      n: 1, kind: "baseline", phase: "evaluating", base: "b", candidate: "c", description: "baseline", move: null,
      trainPid: null, outcome: { ok: true, reason: "", memoryGb: 0, trainSeconds: 1 }, row: null, rowsBefore: 0,
      trainLines: 10, startedAt: "now",
    };
    const loaded = State(old);
    if (loaded instanceof type.errors) throw new Error(loaded.summary);
    expect(loaded).toMatchObject({ trivial: null, testRuns: [], runs: [], rebaseline: null, skipAxes: [] });
    expect(loaded.current).toMatchObject({ seedOffset: 0, runs: [] });
    expect(loaded.settings.confirmRuns).toBeUndefined();
  });
});

// ---------------------------------------------------------------------------
// Confirmation end to end: a lucky seed is discarded, a real gain kept
// ---------------------------------------------------------------------------

describe("confirmation (seeded train.ts, --once)", () => {
  let dir = "";
  beforeAll(() => {
    dir = makeRepo(seeded({ cls: 2, jitter: 0.01 }));
  }, E2E_MS);

  test("three baseline repeats by default, each with its own seed: σ includes the seed's share", () => {
    const r = loop(dir, ["--once", "--tag", "confirm"]);
    expect(r.code).toBe(0);
    expect(rows(dir).map((x) => x.description)).toEqual(
      ["baseline 1/3", "baseline repeat 2/3", expect.stringMatching(/^baseline repeat 3\/3 \(noise: /)]);
    const st = state(dir);
    expect(st.settings).toMatchObject({ baselineRuns: 3, confirmRuns: 1 });
    expect(st.runs.map((x) => [x.kind, x.seed, x.imagesPerSecond])).toEqual([
      ["baseline", 0, 200], ["baseline", 1, 200], ["baseline", 2, 200]]);
    expect(st.noise!.sigma).toBeGreaterThan(0);
    // Every baseline repeat is measured on the held-out test split too, for the summary only.
    expect(r.out).not.toContain("test split: not measured");
    expect(st.testRuns.map((t) => [t.n, t.kind])).toEqual([[1, "baseline"], [2, "baseline"], [3, "baseline"]]);
    for (const t of st.testRuns) expect(t.metrics.val_accuracy).toBeGreaterThanOrEqual(0);
    expect(st.trivial).toBeNull();
  }, E2E_MS);

  test("a gain only seed 0 gives is discarded on confirmation, one row saying why", () => {
    const kept = head(dir);
    const n = rows(dir).length;
    commitTrain(dir, /cls: 2,(.*)\n {2}otherCls: 2,/, "cls: 0,$1\n  otherCls: 1,", "lucky");
    const r = loop(dir, ["--once"]);
    expect(r.code).toBe(0);
    expect(r.out).toContain("clears the noise floor");
    expect(rows(dir)).toHaveLength(n + 1);
    const row = last(rows(dir));
    expect(row.status).toBe("discard");
    const why = String.raw`not confirmed over seeds 0,1: mean 0\.3\d{3}, -0\.0\d+ <= floor [\d.e-]+; `
      + String.raw`first run \+0\.0\d+`;
    expect(row.description).toMatch(new RegExp(`^lucky \\(${why}\\)$`));
    // The row's numbers are the mean of the two runs: (10/23 + 5/23) / 2 accuracy.
    expect(row.metrics.val_accuracy).toBeCloseTo(7.5 / 23, 6);
    expect(runsOf(dir, state(dir).nextN - 1).map((x) => x.seed)).toEqual([0, 1]);
    expect(head(dir)).toBe(kept);
    expect(clean(dir)).toBe("");
  }, E2E_MS);

  test("a gain every seed gives is kept, confirmed over seeds 0,1", () => {
    commitTrain(dir, /cls: 2,(.*)\n {2}otherCls: 2,/, "cls: 0,$1\n  otherCls: 0,", "predict ewaste");
    const h = head(dir);
    expect(loop(dir, ["--once"]).code).toBe(0);
    const row = last(rows(dir));
    expect(row.status).toBe("keep");
    expect(row.description)
      .toMatch(/^predict ewaste \(confirmed over seeds 0,1: mean 0\.4\d{3}, \+0\.0\d+ > floor [\d.e-]+\)$/);
    expect(row.metrics.val_accuracy).toBeCloseTo(10 / 23, 6);
    expect(state(dir).best!.commit).toBe(h);
    expect(head(dir)).toBe(h);
  }, E2E_MS);
});

// ---------------------------------------------------------------------------
// Resume during confirmation; load-affected runs
// ---------------------------------------------------------------------------

describe("a kill during confirmation, then --resume; load-affected runs", () => {
  let dir = "";
  beforeAll(() => {
    dir = makeRepo(seeded({ cls: 2 }));
    const r = loop(dir, ["--once", "--tag", "resume", "--baseline-runs", "1"]);
    expect(r.code).toBe(0);
    expect(r.out).toContain("warning: one baseline run measures no spread: σ is unknown");
  }, E2E_MS);

  for (const [point, from, to] of [["confirm-training", "cls: 2,", "cls: 0,"], ["confirming", "yieldValue: 0.5,",
    "yieldValue: 0.52,"]] as const) {
    test(`killed at ${point}: the resumed loop finishes the confirmation, one row`, () => {
      const n = rows(dir).length;
      commitTrain(dir, from, to, `change at ${point}`);
      const killed = loop(dir, ["--once"], { AR_TEST_KILL_AT: point });
      expect(killed.signal).toBe("SIGKILL");
      const cur = state(dir).current!;
      expect(cur.phase).toBe("confirming");
      expect(cur.runs).toHaveLength(1);
      const orphan = cur.trainPid;
      if (point === "confirm-training") expect(orphan).not.toBeNull();
      const r = loop(dir, ["--resume", "--max-experiments", "0"]);
      expect(r.code).toBe(0);
      expect(r.out).toContain("was interrupted at phase confirming");
      expect(rows(dir)).toHaveLength(n + 1);
      expect(last(rows(dir))).toMatchObject({ status: "keep" });
      expect(last(rows(dir)).description).toMatch(new RegExp(`^change at ${point} \\(confirmed over seeds 0,1: `));
      const st = state(dir);
      expect(st.current!.phase).toBe("decided");
      expect(runsOf(dir, st.current!.n).map((x) => x.seed)).toEqual([0, 1]);
      expect(head(dir)).toBe(st.best!.commit);
      expect(clean(dir)).toBe("");
      if (orphan !== null) expect(pidAlive(orphan)).toBe(false);
    }, E2E_MS);
  }

  test("a confirmation run on a busier machine is replaced by one more; still unsteady: discarded", () => {
    commitTrain(dir, "yieldValue: 0.52,", "yieldValue: 0.5239,", "closer yield");
    const candidate = head(dir);
    expect(loop(dir, ["--once"], { STUB_IPS: "0:200,1:90,2:80" }).code).toBe(0);
    expect(last(rows(dir)).status).toBe("discard");
    expect(last(rows(dir)).description)
      .toStartWith("closer yield (load-affected: its runs trained at 200, 90, 80 img/s;");
    expect(head(dir)).not.toBe(candidate);
    commitTrain(dir, "yieldValue: 0.52,", "yieldValue: 0.5239,", "closer yield again");
    const r = loop(dir, ["--once"], { STUB_IPS: "0:200,1:90,2:190" });
    expect(r.code).toBe(0);
    expect(r.out).toMatch(/run 2\/2: combined_score [\d.]+ · 90\.0 img\/s \(0\.45× the best's\) · seed 1/);
    expect(last(rows(dir))).toMatchObject({ status: "keep" });
    expect(last(rows(dir)).description).toMatch(/\(confirmed over seeds 0,2: .* 1 load-affected run\(s\) left out\)$/);
  }, E2E_MS);
});

// ---------------------------------------------------------------------------
// Screening: --primary, the trivial rate, sensitivity, the test split
// ---------------------------------------------------------------------------

describe("screening (seeded train.ts, evaluate with the screening metrics)", () => {
  test("--primary is checked against the session's task before anything starts", () => {
    const dir = makeRepo(seeded());
    const wrong = loop(dir, ["--tag", "p", "--primary", "top1"], { AR_CACHE: SCREENING });
    expect(wrong.code).toBe(2);
    expect(wrong.out).toContain("--primary top1: task screening keeps on one of bin_acc, balanced_bin_acc");
    const waste = loop(dir, ["--tag", "p", "--primary", "balanced_bin_acc"]);
    expect(waste.code).toBe(2);
    expect(waste.out).toContain("task waste keeps on one of combined_score");
    expect(sh(dir, "git branch --list 'autoresearch/*'")).toBe("");
  }, E2E_MS);

  test("a constant model: the first lines after the baseline say it is the trivial rate; recall in progress "
    + "lines; test split measured for every baseline run", () => {
    const dir = makeRepo(seeded({ cls: 0 }));
    const r = loop(dir, ["--once", "--tag", "trivial", "--baseline-runs", "2"], { AR_CACHE: SCREENING });
    expect(r.code).toBe(0);
    const st = state(dir);
    const b = st.baseline!.metrics;
    expect(b.sensitivity).toBe(0);
    expect(b.bin_acc).toBeCloseTo(b.trivial_bin_acc!, 12);
    expect(st.trivial).toEqual({ metric: "bin_acc", value: b.trivial_bin_acc! });
    const v = b.bin_acc!.toFixed(4);
    expect(r.out).toContain(`WARNING: the baseline's bin_acc ${v} is the trivial rate (always 'not synthetic_positive' `
      + `scores ${v}): bin_acc cannot tell a real screen from a constant; consider --primary balanced_bin_acc`);
    expect(r.out).toMatch(/#1 measured: bin_acc [\d.]+ · sensitivity 0\.0000 · 200\.0 img\/s · seed 0/);
    expect(st.testRuns.map((t) => [t.n, t.kind, t.commit])).toEqual([[1, "baseline", rows(dir)[0]!.commit],
      [2, "baseline", rows(dir)[1]!.commit]]);
    expect(st.testRuns[0]!.metrics.sensitivity).toBe(0);
  }, E2E_MS);

  test("--primary balanced_bin_acc: recorded, in the descriptions; a seeing model is kept and measured on test", () => {
    const dir = makeRepo(seeded({ cls: 0 }));
    const r = loop(dir, ["--once", "--tag", "balanced", "--baseline-runs", "2", "--primary", "balanced_bin_acc"],
      { AR_CACHE: SCREENING });
    expect(r.code).toBe(0);
    expect(r.out).toContain("keep on balanced_bin_acc (then mc_acc)");
    expect(r.out).toContain("WARNING: the baseline's balanced_bin_acc 0.5000 is the trivial rate (any constant answer");
    expect(state(dir))
      .toMatchObject({ primary: "balanced_bin_acc", trivial: { metric: "balanced_bin_acc", value: 0.5 } });
    expect(rows(dir)[0]!.description).toBe("baseline 1/2 (balanced_bin_acc 0.5000)");
    commitTrain(dir, "see: false,", "see: true,", "read the hue");
    expect(loop(dir, ["--once"], { AR_CACHE: SCREENING }).code).toBe(0);
    const row = last(rows(dir));
    expect(row.status).toBe("keep");
    expect(row.description)
      .toMatch(/^read the hue \(balanced_bin_acc (0\.[89]\d{3}|1\.0000)\) \(confirmed over seeds 0,1: /);
    const st = state(dir);
    expect(st.best!.metrics.balanced_bin_acc).toBeGreaterThan(0.8);
    const keeps = st.testRuns.filter((t) => t.kind === "keep");
    expect(keeps.map((t) => [t.n, t.commit])).toEqual([[3, row.commit], [3, row.commit]]);
    expect(keeps[0]!.metrics.balanced_bin_acc).toBeGreaterThan(0.8);
  }, E2E_MS);
});

// ---------------------------------------------------------------------------
// A structure change re-measures the noise floor
// ---------------------------------------------------------------------------

describe("re-baseline after a kept backbone change", () => {
  test("the kept backbone is repeated with the next seeds; the noise floor becomes the new structure's", () => {
    const space = `{ backbone: ["none", "nsfwjs-mobilenetv2"], seed: [0, 1, 2] }`;
    const dir = makeRepo(seeded({ cls: 2, jitter: 0.01 }, space));
    const r = loop(dir, ["--tag", "rb", "--baseline-runs", "2", "--max-experiments", "1"]);
    expect(r.code).toBe(0);
    const rs = rows(dir);
    expect(rs.map((x) => x.status)).toEqual(["keep", "baseline", "keep", "baseline"]);
    expect(rs[2]!.description).toMatch(/^backbone none -> nsfwjs-mobilenetv2 \(confirmed over seeds 0,1: /);
    expect(rs[3]!.description).toMatch(new RegExp(`^re-baseline 1/1 of ${rs[2]!.commit} \\(new structure: backbone `
      + "none -> nsfwjs-mobilenetv2\\) \\(noise of the new structure over 3 runs: "
      + "mean [\\d.]+, σ [\\d.e-]+, floor [\\d.e-]+\\)$"));
    const st = state(dir);
    expect(st.runs.filter((x) => x.n === 4).map((x) => [x.kind, x.seed])).toEqual([["rebaseline", 2]]);
    expect(st.noise!.runs).toHaveLength(3);
    expect(st.rebaseline).toMatchObject({ wanted: 1, done: 1 });
    const scores = st.runs.filter((x) => x.commit === rs[2]!.commit).map((x) => x.metrics.combined_score!);
    expect(st.best!.metrics.combined_score).toBeCloseTo(scores.reduce((s, v) => s + v, 0) / 3, 9);
    expect(st.tried.map((t) => t.axis)).toEqual(["backbone"]);
    expect(head(dir)).toBe(st.best!.commit);
  }, E2E_MS);
});

// ---------------------------------------------------------------------------
// Never stop: back off a crash streak; pause only when the best itself crashes
// ---------------------------------------------------------------------------

describe("a crash streak", () => {
  test("backs off the axes that crashed, re-runs the best, and goes on with the others", () => {
    const space = `{ boomA: [0, 1], boomB: [0, 1], boomC: [0, 1], seed: [0, 1, 2] }`;
    const dir = makeRepo(seeded({ cls: 2 }, space));
    const args = ["--tag", "streak", "--baseline-runs", "1", "--max-crash-streak", "2", "--max-experiments", "9"];
    const r = loop(dir, args);
    expect(r.code).toBe(0);
    expect(r.out).toContain("nothing left to try");
    const rs = rows(dir);
    expect(rs.map((x) => x.status)).toEqual(["keep", "crash", "crash", "baseline", "crash"]);
    expect(rs[3]!.description).toBe(`check: the best ${rs[0]!.commit} again after 2 crashes in a row `
      + "(runs fine: the crashes were the changes)");
    const st = state(dir);
    const axes = st.tried.map((t) => t.axis);
    expect(st.skipAxes).toEqual(axes.slice(0, 2).sort());
    expect(new Set(axes)).toEqual(new Set(["boomA", "boomB", "boomC"])); // never seed
    expect(r.out).toContain(`2 crashes in a row (last: ${rs[2]!.description}): backing off ${st.skipAxes.join(", ")}; `
      + `re-running the best ${rs[0]!.commit}`);
    expect(head(dir)).toBe(st.best!.commit);
  }, E2E_MS);

  test("a best that crashes too pauses the loop, saying why in one line", () => {
    const fail = join(tempDir("arv-fail-"), "broken");
    made.push(join(fail, ".."));
    const dir = makeRepo(seeded({ cls: 2 }, `{ yieldValue: [0.4, 0.5, 0.6] }`));
    const env = { STUB_FAIL_FILE: fail };
    expect(loop(dir, ["--tag", "broken", "--baseline-runs", "1", "--max-experiments", "0"], env).code).toBe(0);
    writeFileSync(fail, "");
    const r = loop(dir, ["--resume", "--max-crash-streak", "2", "--max-experiments", "5"], env);
    expect(r.code).toBe(3);
    const best = rows(dir)[0]!.commit;
    expect(r.out).toContain(`PAUSED: paused: the best ${best} crashed too when run again (exit 1: error: the `
      + "environment is broken): the environment is broken, not the ideas.");
    expect(rows(dir).map((x) => x.status)).toEqual(["keep", "crash", "crash", "crash"]);
    expect(last(rows(dir)).description).toMatch(/^check: the best \w+ again after 2 crashes in a row \(crash: /);
    expect(clean(dir)).toBe("");
  }, E2E_MS);
});
