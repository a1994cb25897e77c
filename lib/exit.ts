/**
 * How loop.ts ends: its exit codes, the error that carries one up from deep inside a phase, what
 * Ctrl-C does, and the one line it prints for an error it did not expect.
 */
import { relative, resolve } from "node:path";
import { killGroup } from "./child.ts";

export const EXIT = { ok: 0, error: 1, refused: 2, paused: 3, aborted: 130 } as const;

/** Ends the loop with an exit code and a message (empty: nothing more to say); caught in loop.ts's main. */
export class Stop extends Error {
  constructor(readonly code: number, message: string) { super(message); }
}

/** What Ctrl-C / SIGTERM asked so far, and the process group of the running child (a second one kills it). */
export interface Interrupts { stop: boolean; abort: boolean; child: number | null }

/** Ctrl-C / SIGTERM: the first asks to stop after the current experiment, the second aborts it. */
export function catchSignals(c: Interrupts, log: (line: string) => void): void {
  const onSignal = (sig: string) => {
    if (!c.stop) {
      c.stop = true;
      log(`${sig}: the current experiment will finish and be logged, then the loop stops (${sig} again aborts it)`);
      return;
    }
    c.abort = true;
    log(`${sig} again: aborting the current experiment`);
    if (c.child !== null) killGroup(c.child);
  };
  process.on("SIGINT", () => onSignal("SIGINT"));
  process.on("SIGTERM", () => onSignal("SIGTERM"));
}

const FS_CAUSES: Record<string, string> = {
  EACCES: "permission denied", EPERM: "operation not permitted", EROFS: "read-only file system",
  ENOSPC: "no space left on device", EDQUOT: "disk quota exceeded", EISDIR: "a folder is in the way",
  ENOTDIR: "part of its path is a file, not a folder", EEXIST: "a file of that name is in the way",
  ENOENT: "no such file or folder", EIO: "input/output error",
};

interface FailureContext {
  /** The repository: a file is named relative to it. */
  root: string;
  /** The session has a journal: `--resume` carries on (before that: the same command again). */
  journaled: boolean;
  /** The loop's arguments, for "the same command again". */
  argv: string[];
  /** Where the loop wrote the error's trace (named for an error that is not a file's). */
  runLog: string;
}

/**
 * One line for an error the loop did not expect, most often one of its own writes failing (a full
 * disk, a read-only folder, a file where a folder should be): the file, the cause, and what to run
 * once it is fixed. Every phase is journaled before it starts, so `--resume` then carries on.
 */
export function failureLine(err: unknown, o: FailureContext): string {
  const then = o.journaled ? "fix that, then run `bun loop.ts --resume` (the interrupted experiment is journaled)"
    : `fix that, then run \`${["bun", "loop.ts", ...o.argv].join(" ")}\` again`;
  const e = err as Partial<NodeJS.ErrnoException> & { dest?: string };
  if (err instanceof Error && typeof e.code === "string" && (e.path ?? e.dest) !== undefined) {
    // A write through a temporary sibling (lib/atomic.ts) fails under the temporary name: name the real file.
    const file = relative(o.root, resolve(o.root, e.dest ?? e.path!)).replace(/\.tmp-\d+-\d+$/, "");
    const verb = e.syscall === "read" || e.syscall === "scandir" ? "read" : "write";
    return `cannot ${verb} ${file}: ${FS_CAUSES[e.code] ?? e.code} (${e.code}); ${then}`;
  }
  const msg = err instanceof Error ? (err.message.split("\n")[0] ?? "") : String(err);
  return `${msg} (details in ${o.runLog}); ${then}`;
}
