/**
 * The kept model is the night's product, and train.ts runs with the same permissions as the loop:
 * an experiment could overwrite checkpoints/best-<branch>/ and predict.ts would serve a broken
 * model under the old val_accuracy. So when the loop keeps a model it
 *   - writes content.sha256 into the folder (`sha256sum -c` format: one `<sha256>  <file>` line per
 *     file), which predict.ts checks before it uses the model;
 *   - records every file's sha256 in the journal (state.bestModel), checked after every run;
 *   - keeps a full copy (not hardlinks: a write through a link would change both) in
 *     .autoresearch/best-models/, the loop's own folder, from which a changed model is restored.
 */
import { cpSync, existsSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";
import { replaceDirAtomic } from "./atomic.ts";
import { sha256File } from "./images.ts";
import { AR_DIR, type KeptModel } from "./journal.ts";

/** The hash file in a kept model's folder. */
export const DIGEST_FILE = "content.sha256";
/** Where the loop keeps its copies of the best models, one folder per branch. */
const BEST_COPIES = join(AR_DIR, "best-models");

/** sha256 of every file in `dir` (a checkpoint folder is flat), by name. */
async function hashFiles(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const e of readdirSync(dir, { withFileTypes: true }).sort((a, b) => (a.name < b.name ? -1 : 1))) {
    out[e.name] = e.isFile() ? await sha256File(join(dir, e.name)) : "not a file";
  }
  return out;
}

/** How the files of `dir` differ from `files`: `weights.bin changed`, `x deleted`, `y added`; empty if not at all. */
export async function changedFiles(dir: string, files: Record<string, string>): Promise<string[]> {
  if (!existsSync(dir)) return ["deleted"];
  const now = await hashFiles(dir);
  const names = [...new Set([...Object.keys(files), ...Object.keys(now)])].sort();
  return names.flatMap((n) => {
    if (now[n] === files[n]) return [];
    return [`${n} ${now[n] === undefined ? "deleted" : files[n] === undefined ? "added" : "changed"}`];
  });
}

/**
 * Make the checkpoint `latest` the kept model `dir`: copied with its content.sha256, then copied
 * again into the loop's own folder. Returns what the journal records.
 */
export async function keepModel(latest: string, dir: string): Promise<KeptModel> {
  await replaceDirAtomic(dir, async (tmp) => {
    cpSync(latest, tmp, { recursive: true });
    const lines = Object.entries(await hashFiles(tmp)).filter(([n]) => n !== DIGEST_FILE).map(([n, h]) => `${h}  ${n}`);
    writeFileSync(join(tmp, DIGEST_FILE), `${lines.join("\n")}\n`);
  });
  const copy = join(BEST_COPIES, basename(dir));
  await replaceDirAtomic(copy, (tmp) => cpSync(dir, tmp, { recursive: true }));
  return { dir, copy, files: await hashFiles(dir) };
}

/**
 * Put the kept model back from the loop's copy (a run changed it) and say so. Returns null when
 * done, else why the loop cannot go on: the copy is missing or changed too.
 */
export async function restoreModel(m: KeptModel, log: (line: string) => void): Promise<string | null> {
  const bad = await changedFiles(m.copy, m.files);
  if (bad.length > 0) {
    return `the best model ${m.dir}/ was changed and cannot be restored: the loop's copy does not match either `
      + `(${bad.join(", ")})`;
  }
  await replaceDirAtomic(m.dir, (tmp) => cpSync(m.copy, tmp, { recursive: true }));
  log(`restored the best model ${m.dir}/ from the loop's copy in ${m.copy}/`);
  return null;
}

/**
 * For predict.ts: the files of a checkpoint folder that no longer match its content.sha256
 * (empty when they all do, or when the folder has no content.sha256: not a model the loop kept).
 */
export async function digestProblems(dir: string): Promise<string[]> {
  const path = join(dir, DIGEST_FILE);
  if (!existsSync(path)) return [];
  const problems: string[] = [];
  for (const line of readFileSync(path, "utf8").split("\n").filter(Boolean)) {
    const m = /^([0-9a-f]{64}) {2}(.+)$/.exec(line);
    if (!m) return [`${DIGEST_FILE} is not a list of sha256 lines`];
    const file = join(dir, m[2]!);
    if (!existsSync(file)) problems.push(`${m[2]} is missing`);
    else if (await sha256File(file) !== m[1]) problems.push(`${m[2]} changed`);
  }
  return problems;
}
