/** loop.ts's command line: its flags, their defaults, and the checks a flag must pass. */
import { type } from "arktype";
import { cac } from "cac";
import { TIME_BUDGET } from "../prepare.ts";
import { EXIT, Stop } from "./exit.ts";

const Flags = type({
  "tag?": "/^[A-Za-z0-9._-]+$/",
  resume: "boolean",
  once: "boolean",
  "agent?": "string > 0",
  agentTimeout: "number > 0",
  "budget?": "number > 0",
  grace: "number >= 0",
  featuresTimeout: "number > 0",
  "baselineRuns?": "1 <= number.integer <= 100",
  "noiseSigmas?": "number >= 0",
  maxCrashStreak: "number.integer >= 1",
  "maxExperiments?": "number.integer >= 0",
  "seed?": "number.integer",
  summarize: "boolean",
});
export type Flags = typeof Flags.infer;

export const DEFAULTS = { baselineRuns: 2, noiseSigmas: 2, seed: 0 } as const;

/**
 * The flags, checked. `--help` prints the help and ends the loop (exit 0); a bad flag is refused.
 * `allowanceS` is the fixed part of train.ts's deadline, shown in the help.
 */
export function parseFlags(argv: string[], allowanceS: number): Flags {
  const cli = cac("loop.ts");
  let raw: Record<string, unknown> | null = null;
  cli.command("", "run the research loop")
    .option("--tag <tag>", "session name: branch autoresearch/<tag> (default: today, e.g. nov23)")
    .option("--resume", "continue the session of --tag (or of the journal), recovering an interrupted experiment",
      { default: false })
    .option("--once", "measure the commit at HEAD as one experiment, then exit (no proposer)", { default: false })
    .option("--agent <command>",
      "shell command of a coding agent that edits train.ts (prompt on stdin and in $AR_PROMPT_FILE)")
    .option("--agent-timeout <seconds>", "kill the agent after this long", { default: 900 })
    .option("--budget <seconds>", `training budget passed to train.ts (default ${TIME_BUDGET}, prepare.TIME_BUDGET)`)
    .option("--grace <seconds>", `train.ts is killed at budget + grace + ${allowanceS}s`, { default: 30 })
    .option("--features-timeout <seconds>",
      "kill `bun prepare.ts features` (backbone download and feature extraction, before train.ts) after this long",
      { default: 3600 })
    .option("--baseline-runs <k>", `baseline repeats that measure the noise (default ${DEFAULTS.baselineRuns})`)
    .option("--noise-sigmas <x>", `a keep needs a gain above x·σ of the baseline (default ${DEFAULTS.noiseSigmas})`)
    .option("--max-crash-streak <n>", "pause after this many crashes in a row", { default: 3 })
    .option("--max-experiments <n>", "stop after this many experiments (default: never)")
    .option("--seed <n>", `seed of the built-in proposer (default ${DEFAULTS.seed})`)
    .option("--no-summarize", "do not run summarize_results.ts after each experiment")
    .action((options: Record<string, unknown>) => { raw = options; });
  cli.help();
  try {
    cli.parse(argv, { run: false });
    cli.runMatchedCommand();
  } catch (err) {
    throw new Stop(EXIT.refused, `loop.ts: ${err instanceof Error ? err.message : String(err)}`);
  }
  if (raw === null) throw new Stop(EXIT.ok, ""); // --help printed
  const r: Record<string, unknown> = raw;
  const toNum = (v: unknown) => (v === undefined ? undefined : Number(v));
  // cac leaves unset options undefined; arktype's optional keys mean "absent", so drop them.
  const given = Object.fromEntries(Object.entries({
    tag: r.tag === undefined ? undefined : String(r.tag), // cac turns `--tag 1123` into a number
    resume: r.resume === true, once: r.once === true,
    agent: r.agent === undefined ? undefined : String(r.agent),
    agentTimeout: toNum(r.agentTimeout), budget: toNum(r.budget), grace: toNum(r.grace),
    featuresTimeout: toNum(r.featuresTimeout), baselineRuns: toNum(r.baselineRuns), noiseSigmas: toNum(r.noiseSigmas),
    maxCrashStreak: toNum(r.maxCrashStreak), maxExperiments: toNum(r.maxExperiments), seed: toNum(r.seed),
    summarize: r.summarize !== false,
  }).filter(([, v]) => v !== undefined));
  const flags = Flags(given);
  if (flags instanceof type.errors) throw new Stop(EXIT.refused, `loop.ts: ${flags.summary}`);
  if (flags.once && flags.agent !== undefined) {
    const why = "--once measures HEAD without a proposer; it cannot be combined with --agent";
    throw new Stop(EXIT.refused, `loop.ts: ${why}`);
  }
  return flags;
}
