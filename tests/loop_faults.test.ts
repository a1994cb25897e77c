/**
 * Faults the loop must survive without losing anything of the person's or of the night's work,
 * each made by the test itself in a temp repository (tests/loop_fixtures.ts): a resume after a
 * kill with the person's edits in the tree, a train.ts that writes over the kept model, a backbone
 * the harness prepares before train.ts (and one it cannot), the loop's own files made unwritable,
 * and the messages that tell the person what to do.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import {
  existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, rmdirSync, writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { describeDataset, prepareData } from "../prepare.ts";
import { BACKBONE_NAMES } from "../lib/backbones.ts";
import { bestCheckpointDir } from "../lib/checkpoint.ts";
import { runChild } from "../lib/child.ts";
import { SAMPLE_DIR } from "../lib/sources.ts";
import {
  E2E_MS, WASM_ENV, clean, commitTrain, head, last, loop, made, makeRepo, prepareCache, removeTemps, rows, sh, state,
  stub,
} from "./loop_fixtures.ts";
import { sliceOf, tempDir } from "./helpers.ts";

const BUN = process.execPath;
/** Moves for the built-in proposer (so that a resumed loop has something to try). */
const SPACE = `{ cls: [0, 1, 2], yieldValue: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], mode: ["ok"], seed: [0] }`;
let CACHE = "";

beforeAll(async () => {
  CACHE = await prepareCache();
}, E2E_MS);
afterAll(removeTemps, E2E_MS); // many temp repositories: seconds on a busy machine

// ---------------------------------------------------------------------------
// --resume rolls back only what the loop wrote
// ---------------------------------------------------------------------------

describe("--resume after a kill, with the person's edits in the tree", () => {
  let dir = "";
  beforeAll(() => {
    dir = makeSession("res");
  }, E2E_MS);

  for (const [point, measured] of [["training", false], ["evaluating", true]] as const) {
    const then = measured ? "the experiment is measured, not a crash" : "the experiment is rolled back, no row";
    test(`killed while ${point}: a README.md edit and a new notes.txt are moved aside, not lost; ${then}`, () => {
      const n = rows(dir).length;
      expect(loop(dir, ["--resume", "--max-experiments", "1"], { AR_TEST_KILL_AT: point }).signal).toBe("SIGKILL");
      writeFileSync(join(dir, "README.md"), "# readme\nmy edit\n");
      writeFileSync(join(dir, "notes.txt"), "my notes\n");
      const r = loop(dir, ["--resume", "--max-experiments", "0"]);
      expect(r.code).toBe(0);
      const said = new RegExp("^\\[loop\\] resume: README\\.md, notes\\.txt differ from what the loop committed "
        + "\\(changed while it was stopped, or by the interrupted run\\): moved to (\\S+)/, nothing deleted; "
        + "copy back what is yours$", "m").exec(r.out);
      expect(said).not.toBeNull();
      const aside = join(dir, said![1]!);
      expect(aside.startsWith(join(dir, ".autoresearch", "set-aside"))).toBe(true);
      expect(readFileSync(join(aside, "README.md"), "utf8")).toBe("# readme\nmy edit\n");
      expect(readFileSync(join(aside, "notes.txt"), "utf8")).toBe("my notes\n");
      expect(rows(dir)).toHaveLength(measured ? n + 1 : n);
      if (measured) expect(last(rows(dir)).status).not.toBe("crash");
      expect(head(dir)).toBe(state(dir).best!.commit);
      expect(clean(dir)).toBe("");
    }, E2E_MS);
  }

  test("killed right after the proposal: its uncommitted train.ts is set aside too (the loop cannot prove it wrote it)",
    () => {
      const n = rows(dir).length;
      expect(loop(dir, ["--resume", "--max-experiments", "1"], { AR_TEST_KILL_AT: "proposed" }).signal).toBe("SIGKILL");
      const proposed = readFileSync(join(dir, "train.ts"), "utf8");
      const r = loop(dir, ["--resume", "--max-experiments", "0"]);
      expect(r.code).toBe(0);
      const said = /^\[loop\] resume: train\.ts differs from what the loop committed .*: moved to (\S+)\/,/m;
      const moved = said.exec(r.out);
      expect(moved).not.toBeNull();
      expect(readFileSync(join(dir, moved![1]!, "train.ts"), "utf8")).toBe(proposed);
      expect(rows(dir)).toHaveLength(n);
      expect(clean(dir)).toBe("");
    }, E2E_MS);
});

// ---------------------------------------------------------------------------
// The kept model: hashed, copied, checked after every run and by predict.ts
// ---------------------------------------------------------------------------

describe("the kept model", () => {
  let dir = "";
  let best = "";
  let weights = Buffer.alloc(0);
  const predict = (photo: string) => {
    const r = Bun.spawnSync([BUN, "predict.ts", photo], {
      cwd: dir, stdout: "pipe", stderr: "pipe", env: { ...process.env, AR_CACHE: CACHE, ...WASM_ENV },
    });
    return { code: r.exitCode, out: r.stdout.toString(), err: r.stderr.toString() };
  };
  const photo = () => {
    const cls = join(SAMPLE_DIR, "ewaste");
    return join(cls, readdirSync(cls).sort()[0]!);
  };

  beforeAll(() => {
    dir = keptSession("kept");
    best = join(dir, bestCheckpointDir("autoresearch/kept"));
    weights = readFileSync(join(best, "weights.bin"));
  }, E2E_MS);

  test("a keep writes content.sha256 next to the model, a copy under .autoresearch/ and the hashes in the journal",
    () => {
      const digest = readFileSync(join(best, "content.sha256"), "utf8");
      const line = (file: string) => `[0-9a-f]{64} {2}${file.replace(".", "\\.")}\n`;
      expect(digest).toMatch(new RegExp(`^${line("meta.json")}${line("model.json")}${line("weights.bin")}$`));
      const m = state(dir).bestModel!;
      expect(m.dir).toBe(bestCheckpointDir("autoresearch/kept"));
      expect(readFileSync(join(dir, m.copy, "weights.bin")).equals(weights)).toBe(true);
      expect(digest).toContain(`${m.files["weights.bin"]}  weights.bin\n`);
    }, E2E_MS);

  test("a train.ts that writes over the best model's weights: a crash row that says so, the model restored", () => {
    commitTrain(dir, `mode: "ok",`, `mode: "scribble",`, "scribble");
    const r = loop(dir, ["--once"]);
    expect(r.code).toBe(0);
    expect(last(rows(dir))).toMatchObject({
      status: "crash",
      description: "scribble (crash: reverted after training: checkpoints/best-autoresearch_kept/weights.bin changed)",
    });
    expect(r.out).toContain("[loop] restored the best model checkpoints/best-autoresearch_kept/ from the loop's copy "
      + "in .autoresearch/best-models/best-autoresearch_kept/");
    expect(readFileSync(join(best, "weights.bin")).equals(weights)).toBe(true);
  }, E2E_MS);

  test("predict.ts refuses a kept model whose files do not match content.sha256, in one line that says how to "
    + "restore it; the advice works", () => {
    writeFileSync(join(best, "weights.bin"), new Uint8Array(weights.length)); // zeros: loads, predicts 1/3 everywhere
    const bad = predict(photo());
    expect(bad.code).toBe(2);
    expect(bad.err.trim()).toBe("predict.ts: checkpoints/best-autoresearch_kept: weights.bin changed since it was "
      + "saved (checked against its content.sha256): its predictions cannot be trusted; "
      + "`bun loop.ts --resume --tag kept --max-experiments 0` restores the loop's copy");
    const r = loop(dir, ["--resume", "--tag", "kept", "--max-experiments", "0"]);
    expect(r.code).toBe(0);
    expect(r.out).toContain("[loop] resume: the best model checkpoints/best-autoresearch_kept/ changed since it was "
      + "kept (weights.bin changed)");
    expect(readFileSync(join(best, "weights.bin")).equals(weights)).toBe(true);
    const good = predict(photo());
    expect(good.code).toBe(0);
    expect(good.err).toContain("best kept model of branch autoresearch/kept");
  }, E2E_MS);


  test("a footer that claims 0.99: the row has what `prepare.ts evaluate` measured on the checkpoint", () => {
    commitTrain(dir, `mode: "ok",`, `mode: "fakefooter",`, "fake footer");
    const r = loop(dir, ["--once"]);
    expect(r.code).toBe(0);
    expect(r.out).toContain("val_accuracy:     0.990000");
    const row = last(rows(dir));
    expect(row.status).toBe("discard");
    expect(row.metrics.val_accuracy).toBeCloseTo(10 / 23, 6); // cls 0: the 10 ewaste of 23 val images
  }, E2E_MS);
});

// ---------------------------------------------------------------------------
// A frozen backbone's features: the harness's step, before train.ts
// ---------------------------------------------------------------------------

describe("backbone features before train.ts", () => {
  let dir = "";

  test("the loop runs `bun prepare.ts features` for the candidate's HP.backbone first; train.ts starts after", () => {
    dir = makeRepo(stub({ cls: 1, extra: { backbone: "nsfwjs-mobilenetv2", backboneSize: 32 } }));
    const r = loop(dir, ["--once", "--tag", "feat", "--baseline-runs", "1"]);
    expect(r.code).toBe(0);
    expect(r.out).toContain("features of backbone nsfwjs-mobilenetv2 at 32px: `bun prepare.ts features` (killed after "
      + "3600s, or after 300s without output)");
    const ready = r.out.indexOf("features ready: 120 rows of nsfwjs-mobilenetv2@32");
    expect(ready).toBeGreaterThan(-1);
    expect(ready).toBeLessThan(r.out.indexOf("stub train.ts:"));
    expect(existsSync(join(CACHE, "waste-synthetic-64", "features-nsfwjs-mobilenetv2-32.f32"))).toBe(true);
    expect(rows(dir).map((x) => x.status)).toEqual(["keep"]);
  }, E2E_MS);

  test("a backbone the harness cannot prepare: a crash row with the step's reason, and train.ts never runs", () => {
    commitTrain(dir, `backbone: "nsfwjs-mobilenetv2"`, `backbone: "nonesuch"`, "no such backbone");
    const kept = state(dir).best!.commit;
    const r = loop(dir, ["--once"]);
    expect(r.code).toBe(0);
    const row = last(rows(dir));
    expect(row.status).toBe("crash");
    // The step's reason, as far as a crash row keeps it (the list of names may be cut short with "…").
    const reason = `no such backbone (crash: features: error: unknown backbone "nonesuch": choose one of `
      + `${BACKBONE_NAMES.join(", ")})`;
    expect(row.description).toEndWith(")");
    const said = row.description.replace(/…?\)$/, "");
    expect(said.length).toBeGreaterThan(100);
    expect(reason).toStartWith(said);
    expect(r.out).not.toContain("stub train.ts:");
    expect(head(dir)).toBe(kept);
  }, E2E_MS);

  test("runChild: a child silent for longer than silenceS is killed long before its deadline", async () => {
    const t0 = performance.now();
    const argv = ["sh", "-c", "echo started; sleep 30"];
    const ran = await runChild(argv, { cwd: dir, timeoutS: 60, silenceS: 1, echo: false });
    expect(ran).toMatchObject({ timedOut: true, silent: true });
    expect(performance.now() - t0).toBeLessThan(10_000);
  }, E2E_MS);
});

// ---------------------------------------------------------------------------
// The loop's own writes failing
// ---------------------------------------------------------------------------

describe("the loop's own files cannot be written or read", () => {
  // As root, chmod blocks nothing: a file where the loop wants a folder (and the reverse) fails for anyone.
  let dir = "";
  beforeAll(() => {
    dir = makeSession("w");
  }, E2E_MS);

  test("its log folder is a file: one line naming it, the cause and `--resume`, exit 1, HEAD on the unlogged "
    + "candidate; once fixed, --resume carries on", () => {
    const logs = join(dir, ".autoresearch", "logs");
    rmSync(logs, { recursive: true });
    writeFileSync(logs, "in the way\n");
    const n = rows(dir).length;
    const r = loop(dir, ["--resume", "--max-experiments", "1"]);
    expect(r.code).toBe(1);
    expect(r.out.split("\n").filter((l) => l.includes("error"))).toEqual([
      "[loop] error: cannot write .autoresearch/logs: a file of that name is in the way (EEXIST); fix that, then run "
        + "`bun loop.ts --resume` (the interrupted experiment is journaled)",
    ]);
    expect(r.out).not.toMatch(/^\s+at /m); // no stack trace on the terminal
    const st = state(dir);
    expect(st.current!.phase).toBe("committed");
    expect(head(dir)).toBe(st.current!.candidate!);
    expect(head(dir)).not.toBe(st.best!.commit);
    rmSync(logs);
    const again = loop(dir, ["--resume", "--max-experiments", "1"]);
    expect(again.code).toBe(0);
    const [base, candidate] = [st.best!.commit.slice(0, 7), st.current!.candidate!.slice(0, 7)];
    expect(again.out).toContain(`resume: rolled back #${st.current!.n} to ${base} (its commit ${candidate} stays in `
      + "`git reflog`); nothing was measured, no row written");
    expect(rows(dir)).toHaveLength(n + 1);
    expect(head(dir)).toBe(state(dir).best!.commit);
    expect(clean(dir)).toBe("");
  }, E2E_MS);

  test("results.tsv is a folder when the loop resumes: one line naming it; once fixed, the row is logged", () => {
    const n = rows(dir).length;
    expect(loop(dir, ["--resume", "--max-experiments", "1"], { AR_TEST_KILL_AT: "evaluating" }).signal).toBe("SIGKILL");
    const results = join(dir, "results.tsv");
    renameSync(results, `${results}.moved`);
    mkdirSync(results);
    const r = loop(dir, ["--resume", "--max-experiments", "0"]);
    expect(r.code).toBe(1);
    expect(r.out).toContain("[loop] error: cannot read results.tsv: a folder is in the way (EISDIR); fix that, then "
      + "run `bun loop.ts --resume` (the interrupted experiment is journaled)");
    rmdirSync(results);
    renameSync(`${results}.moved`, results);
    const again = loop(dir, ["--resume", "--max-experiments", "0"]);
    expect(again.code).toBe(0);
    expect(rows(dir)).toHaveLength(n + 1);
    expect(state(dir).current!.phase).toBe("decided");
    expect(clean(dir)).toBe("");
  }, E2E_MS);
});

// ---------------------------------------------------------------------------
// Messages: advice that works, notes that apply
// ---------------------------------------------------------------------------

describe("messages", () => {
  test("run.md False before a new session: the advice is the same command again (not --resume), and it works", () => {
    const dir = makeRepo(stub(), { runMd: "False\n" });
    const r = loop(dir, ["--tag", "x", "--baseline-runs", "1", "--max-experiments", "0"]);
    expect(r.code).toBe(0);
    const again = "bun loop.ts --budget 1 --grace 0 --no-summarize --tag x --baseline-runs 1 --max-experiments 0";
    expect(r.out).toContain("[loop] run.md says False: not starting a session. Set its first line to True and run "
      + `\`${again}\` again.`);
    writeFileSync(join(dir, "run.md"), "True\n");
    const started = loop(dir, ["--tag", "x", "--baseline-runs", "1", "--max-experiments", "0"]);
    expect(started.code).toBe(0);
    // One baseline run measures no noise: said once, at the start, before anything runs.
    const warning = "[loop] warning: --baseline-runs 1 measures no noise (σ = 0): every gain, however small, is kept; "
      + "2 or more runs set a noise floor";
    expect(started.out).toContain(warning);
    expect(started.out.indexOf(warning)).toBeLessThan(started.out.indexOf("stub train.ts:"));
    expect(rows(dir)).toHaveLength(1);
  }, E2E_MS);

  test("the waste3 caveat is printed for waste3's photos (data/sample), not for a person's own folder", async () => {
    const own = sliceOf("sample", 2);
    made.push(own);
    const cache = tempDir("arv-note-");
    made.push(cache);
    const { manifest } = await prepareData({ task: "waste", source: own, cacheRoot: cache, log: () => {} });
    const lines = (m: typeof manifest) => {
      const out: string[] = [];
      describeDataset(m, (l) => out.push(l));
      return out.join("\n");
    };
    expect(lines(manifest)).not.toContain("waste3 caveat");
    expect(lines(manifest)).toContain("note: yields are ASSUMED per-class values");
    expect(lines({ ...manifest, source: SAMPLE_DIR, sample: true })).toContain("note: waste3 caveat:");
  }, E2E_MS);
});

// ---------------------------------------------------------------------------

/** A repository (with a README.md of the person's) whose session has measured its baseline. */
function makeSession(tag: string): string {
  const dir = makeRepo(stub({ cls: 1, yieldValue: 0.5 }, SPACE), { files: { "README.md": "# readme\n" } });
  expect(loop(dir, ["--tag", tag, "--baseline-runs", "1", "--max-experiments", "0"]).code).toBe(0);
  expect(sh(dir, "git status --porcelain")).toBe("");
  return dir;
}

/** A --once session whose baseline is the kept model. */
function keptSession(tag: string): string {
  const dir = makeRepo(stub({ cls: 0 }));
  expect(loop(dir, ["--once", "--tag", tag, "--baseline-runs", "1"]).code).toBe(0);
  return dir;
}
