/**
 * git, run as a child process in an explicit repository folder. The loop, train.ts's checkpoint
 * metadata and predict.ts's best-model lookup all ask git through here.
 */

export interface GitOptions {
  /** The repository's working tree (default: the process's current folder). */
  cwd?: string;
  /** Return the output even when git fails, instead of throwing. */
  allowFail?: boolean;
  /** Extra environment (GIT_INDEX_FILE: a commit made beside the index). */
  env?: Record<string, string | undefined>;
}

/** git's stdout (trailing newline trimmed); a failure throws `git <args>: <stderr>` unless allowFail. */
export function git(args: string[], o: GitOptions = {}): string {
  const r = Bun.spawnSync(["git", ...args], { cwd: o.cwd, stdout: "pipe", stderr: "pipe", env: o.env });
  if (r.exitCode !== 0 && !o.allowFail) {
    throw new Error(`git ${args.join(" ")}: ${r.stderr.toString().trim() || `exit ${r.exitCode}`}`);
  }
  return r.stdout.toString().trimEnd();
}

/** Whether git succeeds (output discarded). */
export function gitOk(args: string[], cwd?: string): boolean {
  return Bun.spawnSync(["git", ...args], { cwd, stdout: "ignore", stderr: "ignore" }).exitCode === 0;
}

/** The branch HEAD names (also one with no commit yet); null on a detached HEAD or outside a repository. */
export function currentBranch(cwd?: string): string | null {
  const name = git(["symbolic-ref", "--short", "-q", "HEAD"], { cwd, allowFail: true });
  return name === "" ? null : name;
}

/** HEAD's short hash; null outside a repository or before the first commit. */
export function headCommit(cwd?: string): string | null {
  const r = git(["rev-parse", "--short=7", "HEAD"], { cwd, allowFail: true });
  return /^[0-9a-f]{7,}$/.test(r) ? r : null;
}
