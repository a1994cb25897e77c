/**
 * Writing a file so that a reader (or a process killed halfway) sees the old content or the new,
 * never half of either: write a temporary sibling, fsync it, rename it over the target.
 */
import { closeSync, fsyncSync, mkdirSync, openSync, renameSync, rmSync, writeSync } from "node:fs";
import { dirname } from "node:path";

/** The temporary sibling a write goes through: same folder (rename never crosses filesystems). */
export function tempSibling(path: string): string {
  return `${path}.tmp-${process.pid}`;
}

/** Replace `path` with `data` atomically; the data is on disk before the rename (a power loss keeps one of the two). */
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
 * removed first): readers see the old folder, no folder, or the complete new one.
 */
export async function replaceDirAtomic(dir: string, fill: (tmp: string) => Promise<void> | void): Promise<void> {
  const tmp = tempSibling(dir);
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { recursive: true });
  try {
    await fill(tmp);
  } catch (err) {
    rmSync(tmp, { recursive: true, force: true });
    throw err;
  }
  rmSync(dir, { recursive: true, force: true });
  renameSync(tmp, dir);
}
