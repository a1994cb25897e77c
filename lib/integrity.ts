/**
 * What an experiment may change: train.ts, nothing else. Every other tracked file is hashed at
 * the session start, and the prepared dataset is fingerprinted, so any change by an agent or by
 * train.ts itself is seen (and reverted where the loop can).
 */
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { type } from "arktype";
import { Manifest, type Task } from "../prepare.ts";
import { git } from "./git.ts";
import type { State } from "./journal.ts";
import { RUN_MD, TRAIN, untrackedFiles } from "./worktree.ts";

type CacheFingerprint = State["cache"];

async function sha256File(path: string): Promise<string> {
  const hasher = new Bun.CryptoHasher("sha256");
  const reader = Bun.file(path).stream().getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    hasher.update(value);
  }
  return hasher.digest("hex");
}

/** sha256 of every tracked file but train.ts and run.md ("missing" for a deleted one). */
export async function protectedHashes(cwd: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const p of git(["ls-files", "-z"], { cwd }).split("\0").filter(Boolean).sort()) {
    if (p === TRAIN || p === RUN_MD) continue;
    out[p] = existsSync(join(cwd, p)) ? await sha256File(join(cwd, p)) : "missing";
  }
  return out;
}

const ActivePointer = type({ dir: "string" });

/**
 * The active prepared dataset's folder and its two files, or null when there is none.
 * prepare.ts owns this layout (<cache root>/active.json names a folder holding images.u8 and
 * manifest.json). To be replaced by prepare.ts's own helper for it once prepare.ts exports one.
 */
function activeCache(cacheRoot: string): { dir: string; images: string; manifest: string } | null {
  let raw: unknown = null;
  try { raw = JSON.parse(readFileSync(join(cacheRoot, "active.json"), "utf8")); } catch { return null; }
  const p = ActivePointer(raw);
  if (p instanceof type.errors) return null;
  return { dir: p.dir, images: join(p.dir, "images.u8"), manifest: join(p.dir, "manifest.json") };
}

/**
 * The active prepared dataset: images.u8 bytes and the manifest without createdAt (re-running
 * prepare.ts on the same source rebuilds the same content with a new timestamp).
 */
export async function cacheFingerprint(cacheRoot: string): Promise<CacheFingerprint & { task: Task | null }> {
  const missing = { dir: "missing", images: "missing", manifest: "missing", task: null };
  const files = activeCache(cacheRoot);
  if (files === null) return missing;
  let raw: unknown = null;
  try { raw = JSON.parse(readFileSync(files.manifest, "utf8")); } catch { /* reported as missing */ }
  const m = Manifest(raw);
  if (m instanceof type.errors || !existsSync(files.images)) return { ...missing, dir: files.dir };
  const { createdAt: _createdAt, ...content } = m;
  const manifest = new Bun.CryptoHasher("sha256").update(JSON.stringify(content)).digest("hex");
  return { dir: files.dir, images: await sha256File(files.images), manifest, task: m.task };
}

export function sameCache(a: CacheFingerprint, b: CacheFingerprint): boolean {
  return a.dir === b.dir && a.images === b.images && a.manifest === b.manifest;
}

export interface Integrity { problems: string[]; untracked: string[]; cacheChanged: boolean }

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
  const results = existsSync(join(c.cwd, path)) ? readFileSync(join(c.cwd, path), "utf8") : null;
  if (results === null && expected !== "") problems.set(path, `${path} deleted`);
  else if (results !== null && results !== expected) problems.set(path, `${path} changed`);
  const cacheChanged = !sameCache(await cacheFingerprint(c.cacheRoot), c.cache);
  if (cacheChanged) problems.set("cache", `prepared data changed (${c.cache.dir})`);
  return { problems: [...problems.values()], untracked, cacheChanged };
}
