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
  "confirmRuns?": "0 <= number.integer <= 10",
  "primary?": "string > 0",
  maxCrashStreak: "number.integer >= 1",
  "maxExperiments?": "number.integer >= 0",
  "seed?": "number.integer",
  summarize: "boolean",
  "queue?": "string > 0",
});
export type Flags = typeof Flags.infer;

/**
 * Three baseline repeats at least: σ from two runs is itself very uncertain. One confirmation run
 * per keep: a gain that a second seed does not reproduce was luck.
 */
export const DEFAULTS = { baselineRuns: 3, noiseSigmas: 2, seed: 0, confirmRuns: 1 } as const;

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
    .option("--baseline-runs <k>", "baseline repeats (seeds 0…k−1) that measure the noise; a kept backbone change "
      + `is re-measured with k−1 more (default ${DEFAULTS.baselineRuns})`)
    .option("--noise-sigmas <x>", `a keep needs a gain above x·σ of the baseline (default ${DEFAULTS.noiseSigmas})`)
    .option("--confirm-runs <n>", "a candidate that clears the noise floor is re-run with n other seeds and kept "
      + `only if the mean still clears it; 0 keeps on one run (default ${DEFAULTS.confirmRuns})`)
    .option("--primary <metric>", "the metric keep decisions use: the task's default, or balanced_bin_acc for "
      + "screening (rare positives)")
    .option("--max-crash-streak <n>", "after this many crashes in a row, skip the axes that crashed and re-run the "
      + "best; pause only if the best itself crashes", { default: 3 })
    .option("--max-experiments <n>", "stop after this many experiments (default: never)")
    .option("--seed <n>", `seed of the built-in proposer (default ${DEFAULTS.seed})`)
    .option("--no-summarize", "do not run summarize_results.ts after each experiment")
    .option("--queue <url>", "train on workers (`bun loop.ts worker --queue <url>` on each machine) through "
      + "Redis at redis://HOST:PORT; the loop keeps git, results.tsv and the journal")
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
    confirmRuns: toNum(r.confirmRuns), primary: r.primary === undefined ? undefined : String(r.primary),
    maxCrashStreak: toNum(r.maxCrashStreak), maxExperiments: toNum(r.maxExperiments), seed: toNum(r.seed),
    summarize: r.summarize !== false, queue: r.queue === undefined ? undefined : String(r.queue),
  }).filter(([, v]) => v !== undefined));
  const flags = Flags(given);
  if (flags instanceof type.errors) throw new Stop(EXIT.refused, `loop.ts: ${flags.summary}`);
  if (flags.once && flags.agent !== undefined) {
    const why = "--once measures HEAD without a proposer; it cannot be combined with --agent";
    throw new Stop(EXIT.refused, `loop.ts: ${why}`);
  }
  if (flags.queue !== undefined) {
    const bad = checkUrl(flags.queue);
    if (bad) throw new Stop(EXIT.refused, `loop.ts: ${bad}`);
    if (flags.once || flags.agent !== undefined) {
      throw new Stop(EXIT.refused, "loop.ts: --queue runs the built-in search on workers; it cannot be combined "
        + "with --once or --agent yet");
    }
  }
  return flags;
}

/** `redis://HOST:PORT` checked: the one line a person sees for a typo. */
export function checkUrl(url: string): string | null {
  try {
    const u = new URL(url);
    if (u.protocol !== "redis:" && u.protocol !== "rediss:") return `--queue ${url}: not a redis:// URL`;
    return null;
  } catch {
    return `--queue ${url}: not a URL (redis://HOST:PORT)`;
  }
}
