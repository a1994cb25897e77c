/**
 * What an experiment may change: train.ts, nothing else. Every other tracked file is hashed at
 * the session start, the prepared dataset is fingerprinted and the kept model's files are hashed
 * when it is kept, so any change by an agent or by train.ts itself is seen (and reverted where the
 * loop can).
 */
import { existsSync } from "node:fs";
import { join } from "node:path";
import { changedFiles } from "./best_model.ts";
import { cacheFingerprint } from "./dataset.ts";
import { sha256File } from "./images.ts";
import { git } from "./git.ts";
import type { KeptModel, State } from "./journal.ts";
import { RUN_MD, TRAIN, readText, untrackedFiles } from "./worktree.ts";

type CacheFingerprint = State["cache"];

/** sha256 of every tracked file but train.ts and run.md ("missing" for a deleted one). */
export async function protectedHashes(cwd: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const p of git(["ls-files", "-z"], { cwd }).split("\0").filter(Boolean).sort()) {
    if (p === TRAIN || p === RUN_MD) continue;
    out[p] = existsSync(join(cwd, p)) ? await sha256File(join(cwd, p)) : "missing";
  }
  return out;
}

export function sameCache(a: CacheFingerprint, b: CacheFingerprint): boolean {
  return a.dir === b.dir && a.images === b.images && a.manifest === b.manifest;
}

export interface Integrity { problems: string[]; untracked: string[]; cacheChanged: boolean; bestChanged: boolean }

interface IntegrityCheck {
  cwd: string;
  /** The commit the tree should match (besides train.ts when `allowTrain`). */
  base: string;
  allowTrain: boolean;
  /** Hashes taken at the session start. */
  protected: Record<string, string>;
  cache: CacheFingerprint;
  cacheRoot: string;
  /** results.tsv's path (relative to cwd) and its text as the loop last wrote it. */
  results: { path: string; expected: string };
  /** The best model as kept (its folder relative to cwd), if there is one. */
  best?: KeptModel | null;
}

/**
 * What changed besides train.ts since `base` (and since the session start, by hash): tracked
 * files, new files, results.tsv (against the loop's copy) and the prepared data.
 */
export async function checkIntegrity(c: IntegrityCheck): Promise<Integrity> {
  const problems = new Map<string, string>();
  const changed = git(["diff", "--name-only", "--no-renames", c.base], { cwd: c.cwd }).split("\n").filter(Boolean);
  for (const p of changed) {
    if (p !== RUN_MD && !(c.allowTrain && p === TRAIN)) problems.set(p, `${p} changed`);
  }
  const untracked = untrackedFiles(c.cwd);
  for (const p of untracked) problems.set(p, `${p} added`);
  for (const [p, h] of Object.entries(c.protected)) {
    const now = existsSync(join(c.cwd, p)) ? await sha256File(join(c.cwd, p)) : "missing";
    if (now !== h) problems.set(p, `${p} ${now === "missing" ? "deleted" : "changed"}`);
  }
  const { path, expected } = c.results;
  const results = readText(join(c.cwd, path));
  if (results === null && expected !== "") problems.set(path, `${path} deleted`);
  else if (results !== null && results !== expected) problems.set(path, `${path} changed`);
  const cacheChanged = !sameCache(await cacheFingerprint(c.cacheRoot), c.cache);
  if (cacheChanged) problems.set("cache", `prepared data changed (${c.cache.dir})`);
  const best = c.best ? await changedFiles(join(c.cwd, c.best.dir), c.best.files) : [];
  for (const b of best) problems.set(`best ${b}`, b === "deleted" ? `${c.best!.dir}/ deleted` : `${c.best!.dir}/${b}`);
  return { problems: [...problems.values()], untracked, cacheChanged, bestChanged: best.length > 0 };
}
