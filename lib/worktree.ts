/**
 * The loop's repository as the loop changes it: commits, resets to a kept commit, what is dirty.
 * run.md is the person's on/off switch, not part of any experiment: a reset never changes it and
 * it never makes the tree dirty.
 */
import {
  existsSync, lstatSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync, type Stats,
} from "node:fs";
import { dirname, join, resolve } from "node:path";
import { type } from "arktype";
import { EXIT, Stop } from "./exit.ts";
import { git, gitOk } from "./git.ts";
import { oneLine } from "./results.ts";

export const RUN_MD = "run.md";
/** The one file an experiment edits. */
export const TRAIN = "train.ts";

const RunMdFirstLine = type("'True' | 'False'");

/** The first non-empty line must be exactly True or False; anything else stops the loop (fail closed). */
export function parseRunMd(text: string | null): "True" | "False" | { error: string } {
  if (text === null) {
    return { error: `${RUN_MD} is missing: create it with the first line True to let the loop run (fail closed)` };
  }
  const first = text.split(/\r?\n/).map((l) => l.trim()).find((l) => l !== "") ?? "";
  const v = RunMdFirstLine(first);
  if (v instanceof type.errors) {
    const shown = oneLine(first, 40);
    return { error: `${RUN_MD}: the first non-empty line must be exactly True or False, not "${shown}" (fail closed)` };
  }
  return v;
}

/**
 * Whether run.md in `cwd` lets the loop go on: True yes; False no, said with how to go on (`again`:
 * the command to run again, before a session exists; else `--resume`). Missing or garbage: refused.
 */
export function runMdSaysGo(cwd: string, log: (line: string) => void, again: string | null = null): boolean {
  const v = parseRunMd(readText(join(cwd, RUN_MD)));
  if (typeof v === "object") throw new Stop(EXIT.refused, v.error);
  if (v === "False") {
    log(again !== null
      ? `${RUN_MD} says False: not starting a session. Set its first line to True and run \`${again}\` again.`
      : `${RUN_MD} says False: stopping. Set its first line to True and run \`bun loop.ts --resume\` to continue.`);
  }
  return v === "True";
}

/**
 * Why `root` cannot host the loop, or null: it must be the top of a git repository, and the
 * loop's own files must be gitignored (`git reset --hard` and the clean-tree check must never see them).
 */
export function repositoryProblem(root: string, loopFiles: string[]): string | null {
  const inside = gitOk(["rev-parse", "--is-inside-work-tree"], root);
  const top = inside ? git(["rev-parse", "--show-toplevel"], { cwd: root }) : null;
  if (top === null || resolve(top) !== resolve(root)) {
    return `${root} is not the top of a git repository: the loop keeps and discards experiments as commits`;
  }
  const notIgnored = loopFiles.filter((p) => !gitOk(["check-ignore", "-q", "--no-index", p], root));
  if (notIgnored.length === 0) return null;
  return `${notIgnored.join(", ")} must be gitignored (see this repository's .gitignore): `
    + "the loop writes them and resets the tree";
}

/** The full hash of a commit-ish (throws if there is none). */
export function rev(cwd: string, ref: string): string {
  return git(["rev-parse", "--verify", "-q", `${ref}^{commit}`], { cwd });
}

export function shortOf(cwd: string, commit: string): string {
  return git(["rev-parse", "--short=7", commit], { cwd });
}

export function branchExists(cwd: string, branch: string): boolean {
  return gitOk(["rev-parse", "--verify", "-q", `refs/heads/${branch}`], cwd);
}

/** Commit `paths`. The commits are the loop's, not the person's: hooks would slow (or fail) every experiment. */
export function commitPaths(cwd: string, message: string, paths: string[]): void {
  const anonymous = git(["config", "user.email"], { cwd, allowFail: true }) === "";
  const identity = anonymous ? ["-c", "user.name=autoresearch", "-c", "user.email=autoresearch@localhost"] : [];
  git([...identity, "commit", "-q", "--no-verify", "-m", message, "--", ...paths], { cwd });
}

/**
 * A commit of `base` with `path` (relative to `cwd`) as it is in the working tree now, made
 * without moving HEAD, the branch or the index: a candidate dispatched to a worker ahead of its turn.
 * `tree` makes that tree a child of another commit (a candidate decided after a newer keep).
 */
export function commitAside(cwd: string, a: { base: string; path?: string; message: string; tree?: string }): string {
  const anonymous = git(["config", "user.email"], { cwd, allowFail: true }) === "";
  const identity = anonymous ? ["-c", "user.name=autoresearch", "-c", "user.email=autoresearch@localhost"] : [];
  let tree = a.tree;
  if (tree === undefined) {
    const index = resolve(cwd, git(["rev-parse", "--git-path", `aside-index-${process.pid}`], { cwd }));
    const env = { ...process.env, GIT_INDEX_FILE: index };
    try {
      git(["read-tree", a.base], { cwd, env });
      git(["add", "--", a.path ?? TRAIN], { cwd, env });
      tree = git(["write-tree"], { cwd, env });
    } finally {
      rmSync(index, { force: true });
    }
  }
  return git([...identity, "commit-tree", tree, "-p", a.base, "-m", a.message], { cwd });
}

/** Changes in the working tree, untracked files included, ignored files not. */
export function dirtyPaths(cwd: string): string[] {
  const lines = git(["status", "--porcelain", "--untracked-files=all"], { cwd }).split("\n").filter(Boolean);
  return lines.map((l) => l.slice(3)).filter((p) => p !== RUN_MD);
}

/** New files git would show (not ignored). */
export function untrackedFiles(cwd: string): string[] {
  const paths = git(["ls-files", "--others", "--exclude-standard"], { cwd }).split("\n");
  return paths.filter((p) => p !== "" && p !== RUN_MD);
}

export function removeFiles(cwd: string, paths: string[]): void {
  if (paths.length > 0) git(["clean", "-fdq", "--", ...paths], { cwd });
}

/**
 * `git reset --hard`, except that run.md keeps what it says now: a person who wrote False while
 * an experiment ran must not see the discard switch it back to True.
 */
export function resetTo(cwd: string, commitish: string): void {
  const path = join(cwd, RUN_MD);
  const runMd = existsSync(path) ? readFileSync(path) : null;
  git(["reset", "-q", "--hard", commitish], { cwd });
  const after = existsSync(path) ? readFileSync(path) : null;
  if (runMd === null && after !== null) rmSync(path);
  else if (runMd !== null && (after === null || !after.equals(runMd))) writeFileSync(path, runMd);
}

/** A file's text, or null when there is no such file. */
export function readText(path: string): string | null {
  if (!existsSync(path)) return null;
  try {
    return readFileSync(path, "utf8");
  } catch (err) {
    // Bun leaves `path` out of some read errors (a folder where the file should be): the loop's message needs it.
    if (err instanceof Error && !("path" in err)) Object.assign(err, { path });
    throw err;
  }
}

/**
 * Working-tree files whose content none of `commits` has at that path: changed tracked files and
 * untracked ones, symlinks always (deleted files are not listed: restoring one loses nothing).
 */
function unknownChanges(cwd: string, commits: string[]): string[] {
  const list = (args: string[]) => git(args, { cwd }).split("\0").filter((p) => p !== "" && p !== RUN_MD);
  const paths = [...new Set([
    ...list(["diff", "--name-only", "-z", "--no-renames", "HEAD"]),
    ...list(["ls-files", "-z", "--others", "--exclude-standard"]),
  ])].filter((p) => lstatOrNull(join(cwd, p)) !== null).sort();
  const files = paths.filter((p) => lstatOrNull(join(cwd, p))!.isFile());
  const blobs = new Map<string, string>();
  const hashes = files.length > 0 ? git(["hash-object", "--", ...files], { cwd }).split("\n") : [];
  files.forEach((p, i) => blobs.set(p, hashes[i] ?? ""));
  const known = new Set<string>();
  for (const c of commits) {
    for (const entry of git(["ls-tree", "-r", "-z", c], { cwd }).split("\0").filter(Boolean)) {
      const tab = entry.indexOf("\t");
      known.add(`${entry.slice(tab + 1)}\0${entry.slice(0, tab).split(" ")[2]}`);
    }
  }
  return paths.filter((p) => !blobs.has(p) || !known.has(`${p}\0${blobs.get(p)}`));
}

/**
 * What a resume may roll back is what the loop wrote: an experiment's `commits` (its base, and
 * train.ts at its candidate). Anything else in the tree (a file changed or added while the loop was
 * down, or by the killed train.ts: the loop cannot tell which) is moved to `dest`, never deleted,
 * and `log` says where. A normal run is different: there every change but train.ts is the
 * experiment's, and it is reverted (lib/integrity.ts).
 */
export function setAsideUnknown(cwd: string, commits: string[], dest: string, log: (line: string) => void): void {
  const head = rev(cwd, "HEAD");
  if (!commits.includes(head)) {
    const short = shortOf(cwd, head);
    log(`resume: HEAD was at ${short} (not this experiment's commit): the rollback leaves it in \`git reflog\`; `
      + `\`git branch <name> ${short}\` keeps it`);
  }
  const paths = unknownChanges(cwd, commits);
  if (paths.length === 0) return;
  moveAside(cwd, paths, resolve(cwd, dest));
  const shown = `${paths.slice(0, 5).join(", ")}${paths.length > 5 ? ` and ${paths.length - 5} more` : ""}`;
  const verb = paths.length === 1 ? "differs" : "differ";
  log(`resume: ${shown} ${verb} from what the loop committed (changed while it was stopped, or by the interrupted `
    + `run): moved to ${dest}/, nothing deleted; copy back what is yours`);
}

/** Move `paths` (relative to `cwd`) into `dest`, keeping their relative paths. */
function moveAside(cwd: string, paths: string[], dest: string): void {
  for (const p of paths) {
    mkdirSync(dirname(join(dest, p)), { recursive: true });
    renameSync(join(cwd, p), join(dest, p));
  }
}

function lstatOrNull(path: string): Stats | null {
  try { return lstatSync(path); } catch { return null; }
}
