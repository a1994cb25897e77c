/** Shared test helpers: where the real images are, temp folders, running the scripts. */
import { existsSync, mkdtempSync, cpSync, mkdirSync, readdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { SAMPLE_DIR } from "../lib/sources.ts";

export const ROOT = resolve(import.meta.dir, "..");
export const DATASETS = resolve(process.env.AR_DATASETS ?? join(ROOT, "..", "shared", "datasets"));
export const HAVE_DATASETS = existsSync(join(DATASETS, "waste3")) && existsSync(join(DATASETS, "trashnet6"));
if (!HAVE_DATASETS) {
  // Loud, not silent: the tests that need real photos are skipped, and this says why.
  console.warn(`\n*** SKIPPING the tests that need the full real sets: ${DATASETS} has no waste3/ and trashnet6/ `
    + `(set AR_DATASETS); the tests on data/sample still run ***\n`);
}

export function tempDir(prefix = "arv-"): string {
  return mkdtempSync(join(tmpdir(), prefix));
}

/**
 * A small ImageFolder copied from a real set: the first `perClass` files of each class folder.
 * "sample" is data/sample, the photos that ship with the repository: no ../shared needed.
 */
export function sliceOf(set: "waste3" | "trashnet6" | "sample", perClass: number, classes?: string[]): string {
  const src = set === "sample" ? SAMPLE_DIR : join(DATASETS, set);
  const dest = tempDir(`arv-${set}-`);
  const classFolders = () =>
    readdirSync(src, { withFileTypes: true }).filter((d) => d.isDirectory()).map((d) => d.name);
  for (const cls of classes ?? classFolders()) {
    mkdirSync(join(dest, cls), { recursive: true });
    for (const f of readdirSync(join(src, cls)).sort().slice(0, perClass)) {
      cpSync(join(src, cls, f), join(dest, cls, f));
    }
  }
  return dest;
}

export const BUN = process.execPath;

/** Run a project script with its own cache; returns exit code and the combined output. */
export function runScript(args: string[], env: Record<string, string>, cwd = ROOT): { code: number; out: string } {
  const r = Bun.spawnSync([BUN, ...args], {
    cwd, env: { ...process.env, AR_BACKEND: "wasm", ...env }, stdout: "pipe", stderr: "pipe",
  });
  return { code: r.exitCode ?? -1, out: r.stdout.toString() + r.stderr.toString() };
}
