/**
 * Writing a file so that a reader (or a process killed halfway) sees the old content or the new,
 * never half of either: write a temporary sibling, fsync it, rename it over the target.
 */
import { closeSync, fsyncSync, mkdirSync, openSync, renameSync, rmSync, writeSync } from "node:fs";
import { dirname } from "node:path";

let tempCount = 0;

/**
 * The temporary sibling a write goes through: same folder (rename never crosses filesystems).
 * `<path>.tmp-<pid>-<n>`: the pid says whose it is (a leftover of a dead process can be removed), the
 * count keeps two writes of one process apart (two downloads of the same backbone at once).
 */
export function tempSibling(path: string): string {
  return `${path}.tmp-${process.pid}-${++tempCount}`;
}

/**
 * Replace `path` with `data` atomically; the data is on disk before the rename (a power loss keeps
 * one of the two).
 */
export function writeAtomic(path: string, data: string | Uint8Array): void {
  mkdirSync(dirname(path), { recursive: true });
  const tmp = tempSibling(path);
  const fd = openSync(tmp, "w");
  try {
    writeSync(fd, typeof data === "string" ? Buffer.from(data) : data);
    fsyncSync(fd);
  } catch (err) {
    closeSync(fd);
    rmSync(tmp, { force: true });
    throw err;
  }
  closeSync(fd);
  renameSync(tmp, path);
}

/**
 * Build a folder under a temporary name with `fill`, then swap it in for `dir` (the old one is
 * removed first): readers see the old folder, no folder, or the complete new one. Returns what
 * `fill` returned; if `fill` throws, the temporary folder is removed and `dir` is left as it was.
 */
export async function replaceDirAtomic<T>(dir: string, fill: (tmp: string) => Promise<T> | T): Promise<T> {
  const tmp = tempSibling(dir);
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { recursive: true });
  let result: T;
  try {
    result = await fill(tmp);
  } catch (err) {
    rmSync(tmp, { recursive: true, force: true });
    throw err;
  }
  rmSync(dir, { recursive: true, force: true });
  renameSync(tmp, dir);
  return result;
}
