/**
 * loop.ts: pure rules (keep/discard, noise, run.md, crash classification, the built-in proposer)
 * and end-to-end runs in real git repositories in temp folders with real child processes
 * (loop.ts, train.ts, prepare.ts evaluate), synthetic data and a 1-second budget.
 *
 * Most end-to-end runs use the stub train.ts of tests/loop_fixtures.ts (a constant model whose
 * metrics follow from HP exactly); one test runs the real train.ts with a tiny HP.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { prepareData } from "../prepare.ts";
import { countRows } from "../lib/results.ts";
import { bestCheckpointDir } from "../lib/checkpoint.ts";
import { pidAlive, type TriedMove } from "../lib/journal.ts";
import { applyMove, editableKeys, findLiteral, neighbours, proposeMove } from "../lib/proposer.ts";
import { classifyTrain } from "../lib/trial.ts";
import { computeNoise, keepOrDiscard } from "../lib/verdict.ts";
import { parseRunMd } from "../lib/worktree.ts";
import { ROOT, tempDir } from "./helpers.ts";
import {
  ACC, E2E_MS, WASM_ENV, clean, commitTrain, head, last, loop, made, makeRepo, prepareCache, removeTemps, rows, sh,
  state, stub,
} from "./loop_fixtures.ts";

const BUN = process.execPath;
let CACHE = "";

beforeAll(async () => {
  CACHE = await prepareCache();
}, E2E_MS);
afterAll(removeTemps, E2E_MS); // many temp repositories: seconds on a busy machine

// ---------------------------------------------------------------------------
// Pure rules
// ---------------------------------------------------------------------------

describe("keepOrDiscard", () => {
  const base = {
    primary: "combined_score", secondary: "val_accuracy", lowerIsBetter: ["yield_mse"], noiseFloor: 0,
    candidateLines: 100, bestLines: 100,
  };
  const best = { combined_score: 0.8, val_accuracy: 0.82 };

  test("a better primary keeps, a worse one discards", () => {
    const up = keepOrDiscard({ ...base, best, candidate: { combined_score: 0.81, val_accuracy: 0.7 } });
    expect(up).toEqual({ status: "keep", note: "" });
    expect(keepOrDiscard({ ...base, best, candidate: { combined_score: 0.79, val_accuracy: 0.9 } }).status)
      .toBe("discard");
  });

  test("a gain within the noise floor is a discard that says why; above it, a keep", () => {
    const floor = { ...base, best, noiseFloor: 0.004 };
    const d = keepOrDiscard({ ...floor, candidate: { combined_score: 0.802, val_accuracy: 0.82 } });
    expect(d).toEqual({ status: "discard", note: "(+0.002 < noise 0.004)" });
    expect(keepOrDiscard({ ...floor, candidate: { combined_score: 0.805, val_accuracy: 0.82 } }).status).toBe("keep");
    // Exactly the floor is not "more than" the floor.
    const exact = {
      ...base, best: { combined_score: 0.5, val_accuracy: 0.5 }, noiseFloor: 0.25,
      candidate: { combined_score: 0.75, val_accuracy: 0.5 },
    };
    expect(keepOrDiscard(exact).status).toBe("discard");
  });

  test("equal primary: the secondary decides", () => {
    const up = keepOrDiscard({ ...base, best, candidate: { combined_score: 0.8, val_accuracy: 0.83 } });
    expect(up.status).toBe("keep");
    expect(up.note).toContain("same combined_score, val_accuracy +0.01");
    expect(keepOrDiscard({ ...base, best, candidate: { combined_score: 0.8, val_accuracy: 0.81 } }).status)
      .toBe("discard");
  });

  test("both equal: a shorter train.ts keeps (simplicity), the same length or longer discards", () => {
    const shorter = keepOrDiscard({ ...base, best, candidate: { ...best }, candidateLines: 90 });
    expect(shorter).toEqual({ status: "keep", note: "(same metrics, train.ts 100 -> 90 lines)" });
    expect(keepOrDiscard({ ...base, best, candidate: { ...best } }).status).toBe("discard");
    expect(keepOrDiscard({ ...base, best, candidate: { ...best }, candidateLines: 101 }).status).toBe("discard");
  });

  test("a lower-is-better metric counts a decrease as a gain", () => {
    const low = { ...base, primary: "yield_mse", secondary: "val_accuracy" };
    const best05 = { ...low, best: { yield_mse: 0.05, val_accuracy: 0.5 } };
    expect(keepOrDiscard({ ...best05, candidate: { yield_mse: 0.04, val_accuracy: 0.5 } }).status).toBe("keep");
    expect(keepOrDiscard({ ...best05, candidate: { yield_mse: 0.06, val_accuracy: 0.9 } }).status).toBe("discard");
  });
});

describe("small rules", () => {
  test("computeNoise: mean, sample σ, floor = sigmas·σ; one run has no spread", () => {
    const n = computeNoise("top1", [0.8, 0.82], 2);
    expect(n.mean).toBeCloseTo(0.81, 12);
    expect(n.sigma).toBeCloseTo(0.02 / Math.SQRT2, 12);
    expect(n.floor).toBeCloseTo(2 * 0.02 / Math.SQRT2, 12);
    expect(computeNoise("top1", [0.7], 2)).toMatchObject({ sigma: 0, floor: 0 });
  });

  test("parseRunMd: the first non-empty line, exactly True or False; anything else fails closed", () => {
    expect(parseRunMd("True\nmore text")).toBe("True");
    expect(parseRunMd("\n\n  False  \nTrue")).toBe("False");
    for (const bad of [null, "", "true\n", "True, please\n", "yes"]) expect(typeof parseRunMd(bad)).toBe("object");
  });

  test("classifyTrain: timeout, NaN, exception, missing footer, missing checkpoint, ok", () => {
    const footer = "---\nval_accuracy:     0.5\nyield_mse:        0.1\ncombined_score:   0.49\n";
    const cols = ["val_accuracy", "yield_mse", "combined_score"];
    const base = {
      code: 0, timedOut: false, deadlineS: 9, stdout: footer, all: footer, columns: cols, checkpointOk: true,
    };
    expect(classifyTrain(base)).toEqual({ ok: true, reason: "" });
    expect(classifyTrain({ ...base, timedOut: true, code: 137 }).reason).toBe("timeout: killed after 9s");
    expect(classifyTrain({ ...base, code: 1, all: "step 1\nFAIL: loss is NaN at step 3\n" }).reason)
      .toBe("FAIL: loss is NaN at step 3");
    expect(classifyTrain({ ...base, code: 1, all: "step 1\nerror: boom\n" }).reason).toBe("exit 1: error: boom");
    expect(classifyTrain({ ...base, stdout: "step 1\n", all: "step 1\n" }).reason).toContain("no footer");
    expect(classifyTrain({ ...base, checkpointOk: false }).reason).toContain("no checkpoint");
  });

  test("countRows ignores the header and a half line", () => {
    expect(countRows("")).toBe(0);
    expect(countRows("h\n")).toBe(0);
    expect(countRows("h\na\nb\n")).toBe(2);
    expect(countRows("h\na\nb")).toBe(1);
  });
});

describe("built-in proposer", () => {
  const SRC = `import x from "y";
export const HP = {
  backbone: "none" as Backbone, // none or a pretrained one
  width: 16, // channels
  lr: 0.003,
  flip: true, // random flips
  computed: 3e-3 * 2,
};
const other = { lr: 0.1 };
`;
  const hp = { backbone: "none", width: 16, lr: 0.003, flip: true, computed: 0.006 };
  const space = {
    backbone: ["none", "mobilenet"], width: [8, 12, 16, 24, 32], lr: [0.001, 0.002, 0.003, 0.005], flip: [false, true],
    computed: [0.006, 0.01],
  };

  test("neighbours: adjacent in the list; between values when missing; the other boolean or string", () => {
    expect(neighbours(16, space.width)).toEqual([12, 24]);
    expect(neighbours(8, space.width)).toEqual([12]);
    expect(neighbours(16, space.width, 2)).toEqual([8, 32]);
    expect(neighbours(0.004, space.lr)).toEqual([0.003, 0.005]);
    expect(neighbours(true, space.flip)).toEqual([false]);
    expect(neighbours("none", space.backbone)).toEqual(["mobilenet"]);
  });

  test("applyMove rewrites one literal in the HP block and keeps the comment and type assertion", () => {
    const out = applyMove(SRC, { axis: "lr", from: 0.003, to: 0.005 });
    expect(out).toBe(SRC.replace("  lr: 0.003,", "  lr: 0.005,"));
    expect(out).toContain("const other = { lr: 0.1 };");
    expect(applyMove(SRC, { axis: "width", from: 16, to: 24 })).toContain("  width: 24, // channels\n");
    expect(applyMove(SRC, { axis: "flip", from: true, to: false })).toContain("  flip: false, // random flips\n");
    expect(applyMove(SRC, { axis: "backbone", from: "none", to: "mobilenet" }))
      .toContain(`  backbone: "mobilenet" as Backbone, // none`);
    expect(() => applyMove(SRC, { axis: "lr", from: 0.002, to: 0.005 })).toThrow(/expected 0.002/);
    // A computed value is not a literal: the proposer leaves it alone.
    expect(findLiteral(SRC, "computed")).toBeNull();
    expect([...editableKeys(SRC, hp)].sort()).toEqual(["backbone", "flip", "lr", "width"]);
  });

  const args = {
    hp, space, editable: editableKeys(SRC, hp), base: "b1", tried: [] as TriedMove[], seed: 0, lastKept: null,
  };

  test("deterministic for a seed; never repeats a move from the same base; prefers untried keys", () => {
    const first = proposeMove(args)!;
    expect(proposeMove(args)).toEqual(first);
    expect(first.axis).not.toBe("computed");
    const tried: TriedMove[] = [];
    const seen = new Set<string>();
    for (let i = 0; i < 7; i++) {
      const m = proposeMove({ ...args, tried })!;
      expect(m).not.toBeNull();
      const key = `${m.axis}=${String(m.to)}`;
      expect(seen.has(key)).toBe(false);
      seen.add(key);
      // The first four moves touch four different keys: untried keys come first.
      if (i < 4) expect(tried.some((t) => t.axis === m.axis)).toBe(false);
      tried.push({ base: "b1", axis: m.axis, value: m.to, status: "discard" });
    }
    // Radius 1 gave 2+2+1+1 = 6 moves; the 7th had to go two steps away.
    expect(seen.has("width=8") || seen.has("width=32") || seen.has("lr=0.001")).toBe(true);
    // From another base everything is allowed again.
    expect(proposeMove({ ...args, tried, base: "b2" })).not.toBeNull();
  });

  test("after a kept move, the same key in the same direction comes first; null when all is tried", () => {
    const m = proposeMove({ ...args, lastKept: { axis: "lr", direction: 1 } })!;
    expect(m).toEqual({ axis: "lr", from: 0.003, to: 0.005 });
    const everything: TriedMove[] = Object.entries(space)
      .flatMap(([axis, vals]) => vals.map((value) => ({ base: "b1", axis, value, status: "discard" })));
    expect(proposeMove({ ...args, tried: everything })).toBeNull();
  });
});

// ---------------------------------------------------------------------------
// Refusals: nothing runs, nothing changes
// ---------------------------------------------------------------------------

describe("refusals and run.md", () => {
  test("run.md False: stops before creating the branch (exit 0)", () => {
    const dir = makeRepo(stub(), { runMd: "False\n" });
    const r = loop(dir, ["--tag", "x"]);
    expect(r.code).toBe(0);
    expect(r.out).toContain("run.md says False");
    expect(sh(dir, "git branch --list 'autoresearch/*'")).toBe("");
    expect(existsSync(join(dir, "results.tsv"))).toBe(false);
  }, E2E_MS);

  test("run.md missing or garbage: fails closed (exit 2)", () => {
    const missing = loop(makeRepo(stub(), { runMd: null }), ["--tag", "x"]);
    expect(missing.code).toBe(2);
    expect(missing.out).toContain("run.md is missing");
    const garbage = loop(makeRepo(stub(), { runMd: "true\nplease run\n" }), ["--tag", "x"]);
    expect(garbage.code).toBe(2);
    expect(garbage.out).toContain("must be exactly True or False");
  }, E2E_MS);

  test("a dirty tree is refused (modified or untracked files); ignored files are fine", () => {
    const dir = makeRepo(stub());
    writeFileSync(join(dir, "run.log"), "ignored\n");
    writeFileSync(join(dir, "notes.txt"), "untracked\n");
    const r = loop(dir, ["--tag", "x"]);
    expect(r.code).toBe(2);
    expect(r.out).toContain("not clean (notes.txt)");
    rmSync(join(dir, "notes.txt"));
    writeFileSync(join(dir, "train.ts"), `${readFileSync(join(dir, "train.ts"), "utf8")}\n// edit\n`);
    expect(loop(dir, ["--tag", "x"]).out).toContain("not clean (train.ts)");
    expect(sh(dir, "git branch --list 'autoresearch/*'")).toBe("");
  }, E2E_MS);

  test("an existing branch is refused without --resume; --resume needs a journal", () => {
    const dir = makeRepo(stub());
    sh(dir, "git branch autoresearch/x");
    const r = loop(dir, ["--tag", "x"]);
    expect(r.code).toBe(2);
    expect(r.out).toContain("branch autoresearch/x already exists");
    const resumed = loop(dir, ["--tag", "x", "--resume"]);
    expect(resumed.code).toBe(2);
    expect(resumed.out).toContain("no journal for autoresearch/x");
  }, E2E_MS);

  test("one loop per repository: a live lock refuses, a stale one is taken over", () => {
    const dir = makeRepo(stub(), { runMd: "False\n" });
    const lock = join(dir, ".autoresearch", "lock");
    sh(dir, "mkdir -p .autoresearch");
    writeFileSync(lock, JSON.stringify({ pid: process.pid, startedAt: "now" }));
    const held = loop(dir, ["--tag", "x"]);
    expect(held.code).toBe(2);
    expect(held.out).toContain(`another loop (pid ${process.pid})`);
    const dead = Bun.spawnSync(["true"]).pid;
    expect(pidAlive(dead)).toBe(false);
    writeFileSync(lock, JSON.stringify({ pid: dead, startedAt: "then" }));
    const stale = loop(dir, ["--tag", "x"]);
    expect(stale.code).toBe(0);
    expect(stale.out).toContain(`taking over a stale lock`);
    expect(existsSync(lock)).toBe(false); // released on exit
  }, E2E_MS);

  test("bad flags are refused with the reason", () => {
    const dir = makeRepo(stub());
    expect(loop(dir, ["--baseline-runs", "0"]).out).toContain("baselineRuns");
    expect(loop(dir, ["--once", "--agent", "true"]).code).toBe(2);
    expect(loop(dir, ["--bogus"]).out).toContain("Unknown option");
  }, E2E_MS);
});

// ---------------------------------------------------------------------------
// The real train.ts
// ---------------------------------------------------------------------------

describe("the real train.ts", () => {
  test("built-in proposer: baseline, one single-axis move of the HP block, live output, tree at the best", () => {
    const real = readFileSync(join(ROOT, "train.ts"), "utf8")
      .replace(/^ {2}width: \d+,/m, "  width: 8,").replace(/^ {2}depth: \d+,/m, "  depth: 2,");
    const dir = makeRepo(real);
    const start = head(dir);
    const r = loop(dir, ["--tag", "real", "--baseline-runs", "1", "--max-experiments", "1"],
      { AR_TEST_ALLOWANCE_S: "120" });
    expect(r.code).toBe(0);
    expect(r.out).toContain("step 0000"); // train.ts's own progress lines reach the terminal
    expect(r.out).toMatch(/\[loop\] #2 \| \d:\d\d:\d\d \| best combined_score/);
    const rs = rows(dir);
    expect(rs.map((x) => x.status)[0]).toBe("keep");
    expect(rs).toHaveLength(2);
    expect(rs[1]!.description).toMatch(/^\w+ \S+ -> \S+/);
    expect(["keep", "discard", "crash"]).toContain(rs[1]!.status);
    const st = state(dir);
    expect(head(dir)).toBe(st.best!.commit);
    expect(clean(dir)).toBe("");
    // A kept move changed exactly one line of train.ts and nothing else.
    if (rs[1]!.status === "keep") expect(sh(dir, `git diff --numstat ${start} HEAD`)).toMatch(/^1\t1\ttrain\.ts$/);
    else expect(head(dir)).toBe(start);
    expect(existsSync(join(dir, bestCheckpointDir("autoresearch/real"), "meta.json"))).toBe(true);
    expect(existsSync(join(dir, ".autoresearch", "logs", `1-${rs[0]!.commit}.log`))).toBe(true);
  }, E2E_MS);
});

// ---------------------------------------------------------------------------
// --once: an agent edits and commits, the loop measures HEAD
// ---------------------------------------------------------------------------

describe("--once (stub train.ts)", () => {
  let dir = "";
  let prepareBytes = "";
  const once = (extra: string[] = [], env: Record<string, string> = {}) =>
    loop(dir, ["--once", "--max-crash-streak", "100", ...extra], env);

  beforeAll(() => {
    dir = makeRepo(stub({ cls: 1 }));
    prepareBytes = readFileSync(join(dir, "prepare.ts"), "utf8");
  }, E2E_MS);

  test("the first call sets up the session: branch, baseline row, noise over one run", () => {
    const r = loop(dir, ["--once", "--tag", "once", "--baseline-runs", "1"]);
    expect(r.code).toBe(0);
    expect(r.out).toContain("baseline measured");
    expect(sh(dir, "git rev-parse --abbrev-ref HEAD")).toBe("autoresearch/once");
    const rs = rows(dir);
    expect(rs).toHaveLength(1);
    expect(rs[0]).toMatchObject({ status: "keep", description: "baseline" });
    expect(rs[0]!.metrics.val_accuracy).toBeCloseTo(ACC.recyclable, 6);
    expect(state(dir).noise).toMatchObject({ sigma: 0, floor: 0 });
  }, E2E_MS);

  test("nothing new committed, or uncommitted changes: refused", () => {
    expect(once().code).toBe(2);
    writeFileSync(join(dir, "train.ts"), readFileSync(join(dir, "train.ts"), "utf8").replace("cls: 1,", "cls: 0,"));
    const dirty = once();
    expect(dirty.code).toBe(2);
    expect(dirty.out).toContain("commit your change");
    sh(dir, "git checkout train.ts");
  }, E2E_MS);

  test("a better commit is kept: the branch advances and the best checkpoint is copied", () => {
    commitTrain(dir, "cls: 1,", "cls: 0,", "predict ewaste");
    const h = head(dir);
    expect(once().code).toBe(0);
    const r = last(rows(dir));
    expect(r).toMatchObject({ status: "keep", commit: h.slice(0, 7) });
    expect(r.description).toMatch(/^predict ewaste \(confirmed over seeds 0,1: /);
    expect(r.metrics.val_accuracy).toBeCloseTo(ACC.ewaste, 6);
    expect(head(dir)).toBe(h);
    expect(state(dir).best!.commit).toBe(h);
    const metaPath = join(dir, bestCheckpointDir("autoresearch/once"), "meta.json");
    const meta = JSON.parse(readFileSync(metaPath, "utf8")) as { metrics: Record<string, number> };
    expect(meta.metrics.val_accuracy).toBeCloseTo(ACC.ewaste, 6);
  }, E2E_MS);

  test("a worse commit is discarded and the branch reset to the last kept commit", () => {
    const kept = head(dir);
    commitTrain(dir, "cls: 0,", "cls: 2,", "predict organic");
    expect(once().code).toBe(0);
    expect(last(rows(dir))).toMatchObject({ status: "discard", description: "predict organic" });
    expect(head(dir)).toBe(kept);
    expect(clean(dir)).toBe("");
  }, E2E_MS);

  test("same metrics: a shorter train.ts is kept (simplicity), a longer one discarded", () => {
    const kept = head(dir);
    commitTrain(dir, "// a line that a simplification may delete\n", "", "drop a line");
    expect(once().code).toBe(0);
    const r = last(rows(dir));
    expect(r.status).toBe("keep");
    expect(r.description).toMatch(/^drop a line \(same metrics, train\.ts (\d+) -> (\d+) lines\)$/);
    expect(sh(dir, "git rev-parse HEAD^")).toBe(kept);
    const shorter = head(dir);
    commitTrain(dir, "export const HP = {", "// one more line\nexport const HP = {", "add a line");
    expect(once().code).toBe(0);
    expect(last(rows(dir))).toMatchObject({ status: "discard", description: "add a line (same metrics, not simpler)" });
    expect(head(dir)).toBe(shorter);
  }, E2E_MS);

  test("a train.ts that prints feature progress past the deadline gets no extra time: a timeout", () => {
    const kept = head(dir);
    commitTrain(dir, `mode: "ok",`, `mode: "features",`, "features");
    // 8 progress lines 0.5 s apart: 4 s of "extraction" against a 1 + 0 + 2 = 3 s deadline.
    const t0 = performance.now();
    const r = once([], { AR_TEST_ALLOWANCE_S: "2", STUB_FEATURE_LINES: "8" });
    expect(r.code).toBe(0);
    expect(r.out).toContain("(budget 1s, killed at 3s)");
    const reason = "features (crash: timeout: killed after 3s)";
    expect(last(rows(dir))).toMatchObject({ status: "crash", description: reason });
    expect(performance.now() - t0).toBeLessThan(60_000);
    expect(head(dir)).toBe(kept);
  }, E2E_MS);

  test("a train.ts that prints its footer but never exits is killed after a grace; its result stands", () => {
    const kept = head(dir);
    commitTrain(dir, `mode: "ok",`, `mode: "linger",`, "linger");
    const t0 = performance.now();
    const r = once([], { AR_TEST_LINGER_S: "1" });
    expect(r.code).toBe(0);
    expect(performance.now() - t0).toBeLessThan(25_000);
    expect(r.out).toContain("printed its result but did not exit within 1s");
    // Same predictions as the kept commit, same length: measured, and discarded on the rules.
    expect(last(rows(dir))).toMatchObject({ status: "discard", description: "linger (same metrics, not simpler)" });
    expect(head(dir)).toBe(kept);
  }, E2E_MS);

  const faults: [string, string, RegExp, Record<string, string>?][] = [
    ["throw", "an exception", /^mode throw \(crash: exit 1: error: boom in train\.ts\)$/],
    ["nan", "a NaN loss", /^mode nan \(crash: FAIL: loss is NaN at step 3\)$/],
    // The stub hangs before it loads tfjs: the deadline leaves a busy machine seconds to start bun.
    ["hang", "a hang (killed at the deadline)", /^mode hang \(crash: timeout: killed after 5s\)$/,
      { AR_TEST_ALLOWANCE_S: "4" }],
    ["nofooter", "a missing footer", /^mode nofooter \(crash: no footer/],
    ["nockpt", "a missing checkpoint", /^mode nockpt \(crash: no checkpoint/],
    ["tamper", "a train.ts that changes prepare.ts (reverted)",
      /^mode tamper \(crash: reverted after training: prepare\.ts changed\)$/],
  ];
  for (const [mode, what, reason, env] of faults) {
    test(`crash: ${what} is logged as crash with the reason, and reset`, () => {
      const kept = head(dir);
      commitTrain(dir, `mode: "ok",`, `mode: "${mode}",`, `mode ${mode}`);
      const candidate = head(dir).slice(0, 7);
      const t0 = performance.now();
      expect(once([], env).code).toBe(0);
      const r = last(rows(dir));
      expect(r.status).toBe("crash");
      expect(r.commit).toBe(candidate);
      expect(r.description).toMatch(reason);
      expect(r.metrics).toEqual({ val_accuracy: 0, yield_mse: 0, combined_score: 0 });
      expect(head(dir)).toBe(kept);
      expect(clean(dir)).toBe("");
      expect(readFileSync(join(dir, "prepare.ts"), "utf8")).toBe(prepareBytes);
      if (mode === "hang") {
        expect(performance.now() - t0).toBeLessThan(45_000);
        // train.ts and its own child (the whole process group) are gone.
        const logPath = join(dir, ".autoresearch", "logs", `${state(dir).current!.n}-${candidate}.log`);
        const log = readFileSync(logPath, "utf8");
        const pids = /hanging: pids (\d+) (\d+)/.exec(log)!.slice(1).map(Number);
        expect(pids).toHaveLength(2);
        for (const pid of pids) expect(pidAlive(pid)).toBe(false);
      }
    }, E2E_MS);
  }

  test("Ctrl-C twice aborts the running experiment: killed, rolled back, no row (exit 130)", async () => {
    const kept = head(dir);
    const n = rows(dir).length;
    commitTrain(dir, `mode: "ok",`, `mode: "hang",`, "hang until aborted");
    const proc = Bun.spawn([BUN, "loop.ts", "--once", "--budget", "1", "--grace", "0", "--no-summarize"], {
      cwd: dir, stdout: "pipe", stderr: "pipe",
      env: { ...process.env, AR_CACHE: CACHE, ...WASM_ENV, AR_TEST_ALLOWANCE_S: "60" },
    });
    const reader = proc.stdout.getReader();
    let out = "";
    while (!out.includes("hanging: pids")) {
      const { value, done } = await reader.read();
      if (done) break;
      out += new TextDecoder().decode(value);
    }
    proc.kill("SIGINT");
    await Bun.sleep(300);
    proc.kill("SIGINT");
    expect(await proc.exited).toBe(130);
    const pids = /hanging: pids (\d+) (\d+)/.exec(out)!.slice(1).map(Number);
    for (const pid of pids) expect(pidAlive(pid)).toBe(false);
    expect(rows(dir)).toHaveLength(n);
    expect(head(dir)).toBe(kept);
    expect(clean(dir)).toBe("");
    expect(state(dir).current).toBeNull();
  }, E2E_MS);

  test("--once keeps counting crashes across calls: the streak pauses (exit 3)", () => {
    const streak = state(dir).crashStreak;
    expect(streak).toBe(faults.length);
    commitTrain(dir, `mode: "ok",`, `mode: "throw",`, "once more");
    const r = loop(dir, ["--once", "--max-crash-streak", String(streak + 1)]);
    expect(r.code).toBe(3);
    expect(r.out).toContain(`paused: ${streak + 1} crashes in a row`);
    expect(state(dir).crashStreak).toBe(streak + 1);
  }, E2E_MS);
});

// ---------------------------------------------------------------------------
// --agent: a command edits train.ts; anything else it touches is reverted
// ---------------------------------------------------------------------------

describe("--agent (stub train.ts, fake agents)", () => {
  let dir = "";
  let outside = "";
  let prepareBytes = "";
  const agent = (cmd: string, extra: string[] = []) =>
    loop(dir, ["--resume", "--max-experiments", "1", "--agent", cmd, ...extra]);

  beforeAll(() => {
    dir = makeRepo(stub({ cls: 1 }));
    outside = tempDir("arv-agent-");
    made.push(outside);
    prepareBytes = readFileSync(join(dir, "prepare.ts"), "utf8");
  }, E2E_MS);

  test("the agent gets the prompt on stdin and in AR_PROMPT_FILE; its last line is the description; kept", () => {
    const cmd = `cat > ${outside}/stdin.txt; cp "$AR_PROMPT_FILE" ${outside}/file.txt; `
      + `sed -i 's/cls: 1,/cls: 0,/' train.ts; echo thinking; echo "predict ewaste"`;
    const r = loop(dir, ["--tag", "ag", "--baseline-runs", "1", "--max-experiments", "1", "--agent", cmd], {}, true);
    expect(r.code).toBe(0);
    expect(r.out).toContain("no summarize_results.ts in this repository");
    expect(rows(dir).map((x) => [x.status, x.description]))
      .toEqual([["keep", "baseline"], ["keep", expect.stringMatching(/^predict ewaste \(confirmed over seeds 0,1: /)]]);
    expect(sh(dir, "git log -1 --format=%s")).toBe("predict ewaste");
    const prompt = readFileSync(join(outside, "stdin.txt"), "utf8");
    expect(readFileSync(join(outside, "file.txt"), "utf8")).toBe(prompt);
    expect(prompt).toContain("# autoresearch-vision: instructions for the research agent"); // program.md
    expect(prompt).toContain("Make ONE focused change to train.ts");
    expect(prompt).toContain("commit\taccuracy\tyield_mse\tcombined_score\tmemory_gb\tstatus\tdescription");
    expect(clean(dir)).toBe("");
  }, E2E_MS);

  test("an agent that edits prepare.ts: everything reverted, logged as crash, nothing trained", () => {
    const kept = head(dir);
    const r = agent(`echo '// cheat' >> prepare.ts; sed -i 's/cls: 0,/cls: 2,/' train.ts; echo "cheat"`);
    expect(r.code).toBe(0);
    expect(last(rows(dir)))
      .toMatchObject({ status: "crash", commit: "-", description: "cheat (reverted: prepare.ts changed)" });
    expect(readFileSync(join(dir, "prepare.ts"), "utf8")).toBe(prepareBytes);
    expect(head(dir)).toBe(kept);
    expect(clean(dir)).toBe("");
    expect(r.out).not.toContain("stub train.ts:");
  }, E2E_MS);

  test("an agent that deletes results.tsv: restored with every row, logged as crash", () => {
    const before = rows(dir);
    const r = agent(`rm results.tsv; touch newfile.ts; sed -i 's/cls: 0,/cls: 2,/' train.ts; echo "oops"`);
    expect(r.code).toBe(0);
    const after = rows(dir);
    expect(after.slice(0, before.length)).toEqual(before);
    expect(after).toHaveLength(before.length + 1);
    expect(last(after))
      .toMatchObject({ status: "crash", description: "oops (reverted: newfile.ts added, results.tsv deleted)" });
    expect(existsSync(join(dir, "newfile.ts"))).toBe(false);
    expect(clean(dir)).toBe("");
  }, E2E_MS);

  test("an agent that commits by itself: its commit message is the description", () => {
    const r = agent(`sed -i 's/yieldValue: 0.5,/yieldValue: 0.52,/' train.ts && git commit -qam "yield estimate 0.52" `
      + `&& echo "not this line"`);
    expect(r.code).toBe(0);
    expect(last(rows(dir))).toMatchObject({ status: "keep" });
    expect(last(rows(dir)).description).toMatch(/^yield estimate 0\.52 \(confirmed over seeds 0,1: /);
  }, E2E_MS);

  test("an agent that times out is killed: crash, reset", () => {
    const kept = head(dir);
    const t0 = performance.now();
    const r = agent(`sed -i 's/cls: 0,/cls: 2,/' train.ts; sleep 60`, ["--agent-timeout", "1"]);
    expect(r.code).toBe(0);
    expect(performance.now() - t0).toBeLessThan(30_000);
    expect(last(rows(dir))).toMatchObject({ status: "crash", description: "agent change (agent timed out after 1s)" });
    expect(head(dir)).toBe(kept);
    expect(clean(dir)).toBe("");
  }, E2E_MS);

  test("run.md set to False during an experiment: that one is logged, then the loop stops; "
    + "the reset keeps run.md", () => {
    const n = rows(dir).length;
    const cmd = `printf 'False\\n' > run.md; sed -i 's/cls: 0,/cls: 2,/' train.ts; echo worse`;
    const r = loop(dir, ["--resume", "--max-experiments", "5", "--agent", cmd]);
    expect(r.code).toBe(0);
    expect(r.out).toContain("run.md says False");
    expect(rows(dir)).toHaveLength(n + 1);
    expect(last(rows(dir))).toMatchObject({ status: "discard", description: "worse" });
    expect(readFileSync(join(dir, "run.md"), "utf8")).toBe("False\n");
    sh(dir, "git checkout run.md");
  }, E2E_MS);

  test("a streak of crashes does not spin or stop: the best is run again, then the loop goes on", () => {
    const n = rows(dir).length;
    const cmd = `sed -i 's/mode: "ok",/mode: "throw",/' train.ts; echo "throw"`;
    const r = loop(dir, ["--resume", "--max-experiments", "3", "--max-crash-streak", "2", "--agent", cmd]);
    expect(r.code).toBe(0);
    expect(r.out)
      .toContain("2 crashes in a row (last: throw (crash: exit 1: error: boom in train.ts)): re-running the best");
    expect(rows(dir).slice(n).map((x) => x.status)).toEqual(["crash", "crash", "baseline", "crash"]);
    expect(clean(dir)).toBe("");
  }, E2E_MS);

  test("the prepared data changing under the loop: crash row, then a pause (it cannot be restored)", async () => {
    const cache = tempDir("arv-loop-cache2-");
    made.push(cache);
    await prepareData({ task: "waste", source: "synthetic", cacheRoot: cache, log: () => {} });
    const d2 = makeRepo(stub({ cls: 1 }));
    const env = { AR_CACHE: cache };
    expect(loop(d2, ["--once", "--tag", "data", "--baseline-runs", "1"], env).code).toBe(0);
    const images = join(cache, "waste-synthetic-64", "images.u8");
    const poke = `printf 'x' | dd of=${images} bs=1 seek=5 conv=notrunc 2>/dev/null; `
      + `sed -i 's/cls: 1,/cls: 0,/' train.ts; echo poke`;
    const r = loop(d2, ["--resume", "--agent", poke], env);
    expect(r.code).toBe(3);
    expect(r.out).toContain("prepared data");
    expect(last(rows(d2))).toMatchObject({ status: "crash" });
    expect(last(rows(d2)).description).toContain("prepared data changed");
  }, E2E_MS);
});

// ---------------------------------------------------------------------------
// Noise floor
// ---------------------------------------------------------------------------

describe("noise floor", () => {
  test("the baseline repeats set the floor; a gain below 2σ is discarded with the reason; "
    + "summarize failures only warn", () => {
    const space = `{ cls: [1], yieldValue: [0.5, 0.52], mode: ["ok"], seed: [0] }`;
    const dir = makeRepo(stub({ cls: 1, yieldValue: 0.5 }, space), {
      files: { "summarize_results.ts": `console.error("summary is broken"); process.exit(1);\n` },
    });
    const counter = join(tempDir("arv-noise-"), "count");
    made.push(join(counter, ".."));
    // Baseline runs: yield 0.5 and 0.5 + 0.2 (different yield_mse); the experiment: 0.52, a tiny real gain.
    const r = loop(dir, ["--tag", "nf", "--baseline-runs", "2", "--max-experiments", "1"],
      { STUB_COUNTER: counter, STUB_OFFSETS: "0,0.2" }, true);
    expect(r.code).toBe(0);
    expect(r.out).toContain("warning: summarize_results.ts failed (exit 1): summary is broken");
    const rs = rows(dir);
    expect(rs.map((x) => x.status)).toEqual(["keep", "baseline", "discard"]);
    const st = state(dir);
    const runs = [rs[0]!.metrics.combined_score!, rs[1]!.metrics.combined_score!];
    expect(st.noise!.runs).toHaveLength(2);
    expect(st.noise!.sigma).toBeCloseTo(Math.abs(runs[0]! - runs[1]!) / Math.SQRT2, 6);
    expect(st.noise!.floor).toBeCloseTo(2 * st.noise!.sigma, 12);
    expect(rs[1]!.description).toMatch(/^baseline repeat 2\/2 \(noise: mean [\d.]+, σ [\d.e-]+, floor [\d.e-]+\)$/);
    // Candidates are compared with the mean of the baseline repeats.
    expect(st.best!.metrics.combined_score).toBeCloseTo((runs[0]! + runs[1]!) / 2, 6);
    expect(st.baseline!.metrics.combined_score).toBeCloseTo((runs[0]! + runs[1]!) / 2, 6);
    const gain = rs[2]!.metrics.combined_score! - st.best!.metrics.combined_score!;
    expect(gain).toBeGreaterThan(0);
    expect(gain).toBeLessThan(st.noise!.floor);
    expect(rs[2]!.description).toMatch(/^yieldValue 0\.5 -> 0\.52 \(\+[\d.e-]+ < noise [\d.e-]+\)$/);
    expect(head(dir)).toBe(st.sessionStart);
  }, E2E_MS);
});

// ---------------------------------------------------------------------------
// Crash safety: SIGKILL the loop at every phase, then --resume
// ---------------------------------------------------------------------------

describe("SIGKILL at each phase, then --resume", () => {
  let dir = "";
  const SPACE = `{ cls: [0, 1, 2], yieldValue: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], mode: ["ok"], `
    + `seed: [0, 1, 2, 3] }`;
  beforeAll(() => {
    dir = makeRepo(stub({ cls: 1, yieldValue: 0.5 }, SPACE));
    const r = loop(dir, ["--tag", "kill", "--baseline-runs", "1", "--max-experiments", "0"]);
    expect(r.code).toBe(0);
  }, E2E_MS);

  const unmeasured = ["proposing", "proposed", "committed", "training"];
  for (const point of [...unmeasured, "evaluating", "logging", "appended", "logged", "decided"]) {
    test(`killed at ${point}`, async () => {
      const before = readFileSync(join(dir, "results.tsv"), "utf8");
      const n = countRows(before);
      const killed = loop(dir, ["--resume", "--max-experiments", "1"], { AR_TEST_KILL_AT: point });
      expect(killed.signal).toBe("SIGKILL");
      const orphan = state(dir).current?.trainPid ?? null;
      const r = loop(dir, ["--resume", "--max-experiments", "1"]);
      expect(r.code).toBe(0);
      if (point !== "decided") expect(r.out).toContain(`was interrupted at phase`);
      const text = readFileSync(join(dir, "results.tsv"), "utf8");
      // The interrupted experiment has one row if it got as far as being measured, none if not;
      // then the resumed loop ran one more.
      expect(countRows(text)).toBe(n + (unmeasured.includes(point) ? 0 : 1) + 1);
      expect(text.startsWith(before)).toBe(true);
      expect(text.endsWith("\n")).toBe(true);
      const lines = text.trim().split("\n").slice(1);
      expect(new Set(lines).size).toBe(lines.length);
      rows(dir); // every line parses
      const st = state(dir);
      expect(st.current?.phase).toBe("decided");
      expect(head(dir)).toBe(st.best!.commit);
      expect(clean(dir)).toBe("");
      expect(sh(dir, "git log --format=%s").split("\n").every((s) => s === "init" || / -> /.test(s))).toBe(true);
      if (orphan !== null) expect(pidAlive(orphan)).toBe(false);
      if (point === "training") expect(orphan).not.toBeNull();
    }, E2E_MS);
  }

  test("SIGINT: the running experiment finishes and is logged, then the loop stops", async () => {
    const n = rows(dir).length;
    const argv = ["loop.ts", "--resume", "--budget", "1", "--grace", "0", "--no-summarize", "--max-experiments", "5"];
    const proc = Bun.spawn([BUN, ...argv], {
      cwd: dir, stdout: "pipe", stderr: "pipe",
      env: { ...process.env, AR_CACHE: CACHE, ...WASM_ENV, AR_TEST_ALLOWANCE_S: "30" },
    });
    const reader = proc.stdout.getReader();
    const dec = new TextDecoder();
    let out = "";
    while (!out.includes("stub train.ts:")) {
      const { value, done } = await reader.read();
      if (done) break;
      out += dec.decode(value);
    }
    proc.kill("SIGINT");
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      out += dec.decode(value);
    }
    expect(await proc.exited).toBe(0);
    expect(out).toContain("SIGINT: the current experiment will finish and be logged");
    expect(out).toContain("stopped on request");
    expect(rows(dir)).toHaveLength(n + 1);
    expect(head(dir)).toBe(state(dir).best!.commit);
    expect(clean(dir)).toBe("");
  }, E2E_MS);
});
