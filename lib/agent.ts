/**
 * A coding agent as the proposer: any command line that edits train.ts, called once per
 * experiment with a prompt (program.md plus this session's state and latest results) on stdin
 * and in $AR_PROMPT_FILE. The loop checks and commits what it did.
 */
import { join, resolve } from "node:path";
import { TASK_METRICS } from "../prepare.ts";
import { writeAtomic } from "./atomic.ts";
import { runChild, type ChildHooks } from "./child.ts";
import { git } from "./git.ts";
import { AR_DIR, type State } from "./journal.ts";
import type { Proposal } from "./proposer.ts";
import { RESULTS_FILE, oneLine } from "./results.ts";
import { num } from "./verdict.ts";
import { TRAIN, readText, rev } from "./worktree.ts";

const PROGRAM = "program.md";
const ANALYSIS = "analysis_summary.json";
const PROMPT_FILE = join(AR_DIR, "prompt.md");

/** The fixed part of every call's prompt: the rules of one call (line by line as the agent reads it). */
const INSTRUCTIONS = [
  "You are called once per experiment. Make ONE focused change to train.ts — the only file you may edit — "
    + "and exit.",
  "Do NOT run train.ts or loop.ts and do not touch any other file: the loop commits your change, trains, "
    + "re-measures the",
  "checkpoint on the validation split, and keeps or reverts it. Changes to other files are reverted and the "
    + "experiment counts as a crash.",
  "End your output with one line describing the change (e.g. `lr 0.003 -> 0.005` or `add mixup`): it goes into "
    + "results.tsv.",
];

/** program.md, then what this call is for, the session's numbers, the latest rows and the analysis. */
export function buildPrompt(cwd: string, st: State, resultsText: string): string {
  const m = TASK_METRICS[st.task];
  const dir = (k: string) => (m.lowerIsBetter.includes(k) ? "lower is better" : "higher is better");
  const results = resultsText.trim().split("\n");
  const recent = results.length > 21 ? [results[0], "…", ...results.slice(-20)] : results;
  const n = st.current?.n ?? st.nextN;
  const confirmRuns = st.settings.confirmRuns ?? 0;
  const confirm = confirmRuns > 0
    ? ` A first run that clears it is trained again with ${confirmRuns} other seed(s) and kept only if the mean `
      + "over its runs still clears it."
    : "";
  return [
    readText(join(cwd, PROGRAM)) ?? "(program.md is missing)",
    "",
    "---",
    "# This call (from `bun loop.ts --agent`)",
    "",
    ...INSTRUCTIONS,
    "",
    `Experiment #${n} on branch ${st.branch}. Task ${st.task}: primary ${st.primary} (${dir(st.primary)}), `
      + `secondary ${st.secondary} (${dir(st.secondary)}).`,
    st.best
      ? `Best so far: ${st.primary} ${st.best.metrics[st.primary]} at ${st.best.short} (${st.best.description}).`
      : "",
    st.noise
      ? `Noise floor: a keep needs ${st.primary} to improve by more than ${num(st.noise.floor)} `
        + `(${st.noise.sigmas}σ, σ = ${num(st.noise.sigma)}).${confirm}`
      : "",
    `Training budget: ${st.settings.budgetSeconds} s per run.`,
    "",
    `## Last results (${RESULTS_FILE})`,
    "",
    ...recent.map((l) => l ?? ""),
    "",
    `## ${ANALYSIS}`,
    "",
    readText(join(cwd, ANALYSIS)) ?? "(none yet)",
    "",
  ].join("\n");
}

interface AgentCall extends ChildHooks {
  cwd: string;
  command: string;
  timeoutS: number;
  prompt: string;
  /** The commit the agent starts from: a new HEAD means it committed by itself. */
  base: string;
}

/** Run the agent; its change is described by its own commit message, else by its last line of output. */
export async function proposeWithAgent(a: AgentCall): Promise<Proposal> {
  writeAtomic(join(a.cwd, PROMPT_FILE), a.prompt);
  a.log(`agent: ${a.command} (timeout ${a.timeoutS}s)`);
  const r = await runChild(["sh", "-c", a.command], {
    cwd: a.cwd, timeoutS: a.timeoutS, echo: true, logs: a.logs, stdin: new Blob([a.prompt]),
    env: { AR_PROMPT_FILE: resolve(a.cwd, PROMPT_FILE) }, onSpawn: a.onSpawn, log: a.log,
  });
  const lastLine = oneLine(r.stdout.split("\n").map((l) => l.trim()).filter(Boolean).at(-1) ?? "");
  const committed = rev(a.cwd, "HEAD") !== a.base
    && git(["status", "--porcelain", "--", TRAIN], { cwd: a.cwd }) === "";
  const subject = () => oneLine(git(["log", "-1", "--format=%s"], { cwd: a.cwd }));
  const description = committed ? subject() : lastLine || "agent change";
  const failure = r.timedOut ? `agent timed out after ${a.timeoutS}s`
    : r.code !== 0 ? `agent exited with code ${r.code}` : null;
  return { description, move: null, failure };
}
