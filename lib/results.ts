/**
 * results.tsv: one row per finished experiment, tab-separated, header once.
 *   commit  <task metric columns…>  memory_gb  status  description
 * e.g. waste: commit accuracy yield_mse combined_score memory_gb status description.
 * Row metrics are keyed by the footer's names (val_accuracy, …), whatever the column is called.
 * The loop writes this order; parseResults reads the same columns in any order (the seeds' files).
 * loop.ts appends; summarize_results.ts and the tests read. Crashes log 0 for every number.
 */
import { appendFile, readFile, truncate } from "node:fs/promises";
import { existsSync } from "node:fs";
import { type } from "arktype";
import { TASK_METRICS, type Task } from "../prepare.ts";

/** Where the loop writes it: the repository's top folder (gitignored). */
export const RESULTS_FILE = "results.tsv";

export const Status = type("'keep' | 'discard' | 'crash' | 'baseline'");
export type Status = typeof Status.infer;

export const ResultRow = type({
  commit: /^[0-9a-f]{7,40}$|^-$/,
  metrics: "Record<string, number>",
  memory_gb: "number >= 0",
  status: Status,
  description: "string",
});
export type ResultRow = typeof ResultRow.infer;

/** The seeds' results.tsv calls the footer's val_accuracy plain "accuracy". */
const TSV_NAME: Record<string, string> = { val_accuracy: "accuracy" };

function resultsColumns(task: Task): string[] {
  return ["commit", ...TASK_METRICS[task].columns.map((c) => TSV_NAME[c] ?? c), "memory_gb", "status", "description"];
}

/** Tabs and newlines in a description would break the row: they become spaces. */
export function formatRow(task: Task, row: ResultRow): string {
  const nums = TASK_METRICS[task].columns.map((c) => (row.metrics[c] ?? 0).toFixed(6));
  const description = row.description.replace(/[\t\r\n]+/g, " ");
  return [row.commit, ...nums, row.memory_gb.toFixed(1), row.status, description].join("\t");
}

/** The row of a run that produced no metrics: every number 0. */
export function crashRow(task: Task, commit: string, description: string): ResultRow {
  const metrics = Object.fromEntries(TASK_METRICS[task].columns.map((c) => [c, 0]));
  return { commit, metrics, memory_gb: 0, status: "crash", description: oneLine(description) };
}

/**
 * The row of a measured experiment. A primary that is not a results.tsv column (balanced_bin_acc)
 * is shown in the description, before the verdict's `note`.
 */
export function measuredRow(task: Task, primary: string, a: {
  commit: string; description: string; note: string; metrics: Record<string, number>; memoryGb: number;
  status: "keep" | "discard" | "baseline";
}): ResultRow {
  const shown = TASK_METRICS[task].columns.includes(primary) ? ""
    : ` (${primary} ${(a.metrics[primary] ?? 0).toFixed(4)})`;
  const description = oneLine(`${a.description}${shown}${a.note ? ` ${a.note}` : ""}`);
  const memoryGb = Number(a.memoryGb.toFixed(3));
  return { commit: a.commit, metrics: a.metrics, memory_gb: memoryGb, status: a.status, description };
}

/** A description as one line of at most `max` characters (whitespace folded). */
export function oneLine(text: string, max = 200): string {
  const s = text.replace(/\s+/g, " ").trim();
  return s.length > max ? `${s.slice(0, max - 1)}…` : s;
}

/** The text up to its last newline: a half line left by a killed writer is not part of the file yet. */
function wholeText(text: string): string {
  return text.slice(0, text.lastIndexOf("\n") + 1);
}

/** Whole data rows in results.tsv text (the header and a half line do not count). */
export function countRows(text: string): number {
  return Math.max(0, wholeText(text).split("\n").filter((l) => l.trim() !== "").length - 1);
}

/** The last whole non-empty line of results.tsv text. */
export function lastWholeLine(text: string): string {
  return wholeText(text).split("\n").filter((l) => l.trim() !== "").at(-1) ?? "";
}

export interface ParsedResults {
  task: Task | null;
  columns: string[];
  rows: ResultRow[];
  /** The 1-based line number of each row in `rows` (same order). */
  lines?: number[];
  /** Lines that are not rows, with their 1-based line number: reported, never fatal. */
  errors: { line: number; message: string }[];
}

/**
 * The task whose columns the header holds, in any order: the seeds write the same columns in their
 * own order (the screening seed: commit mc_acc bin_acc memory_gb status description).
 */
function taskOfHeader(columns: string[]): Task | null {
  const names = [...columns].sort().join("\t");
  return (Object.keys(TASK_METRICS) as Task[]).find((t) => [...resultsColumns(t)].sort().join("\t") === names) ?? null;
}

/** Parse results.tsv text. The task is recognised from the header's column names, cells are read by name. */
export function parseResults(text: string): ParsedResults {
  const lines = text.split("\n");
  const header = (lines[0] ?? "").trim();
  const out: ParsedResults = { task: null, columns: [], rows: [], lines: [], errors: [] };
  if (header === "") return out;
  out.columns = header.split("\t");
  out.task = taskOfHeader(out.columns);
  if (out.task === null) {
    out.errors.push({ line: 1, message: `header "${header}" matches no task's columns` });
    return out;
  }
  const at = new Map(out.columns.map((c, i) => [c, i]));
  const cell = (cells: string[], column: string) => cells[at.get(column) ?? -1];
  const metricCols = TASK_METRICS[out.task].columns;
  lines.slice(1).forEach((line, i) => {
    if (line.trim() === "") return;
    const cells = line.split("\t");
    const error = (message: string) => out.errors.push({ line: i + 2, message });
    if (cells.length !== out.columns.length) {
      error(`expected ${out.columns.length} tab-separated fields, got ${cells.length}`);
      return;
    }
    const metrics: Record<string, number> = {};
    for (const c of metricCols) metrics[c] = Number(cell(cells, TSV_NAME[c] ?? c));
    const row = ResultRow({
      commit: cell(cells, "commit"), metrics, memory_gb: Number(cell(cells, "memory_gb")),
      status: cell(cells, "status"), description: cell(cells, "description"),
    });
    if (row instanceof type.errors) error(row.summary.split("\n")[0] ?? "invalid row");
    else if (Object.values(row.metrics).some((v) => !Number.isFinite(v))) error("a metric is not a number");
    else { out.rows.push(row); out.lines?.push(i + 2); }
  });
  return out;
}

export async function readResults(path: string): Promise<ParsedResults> {
  if (!existsSync(path)) return { task: null, columns: [], rows: [], errors: [] };
  return parseResults(await readFile(path, "utf8"));
}

/**
 * Append one row (writing the header first on a new or empty file). A half line left by a
 * killed writer is cut off first, so the file only ever holds whole rows.
 */
export async function appendResult(path: string, task: Task, row: ResultRow): Promise<void> {
  const checked = ResultRow(row);
  if (checked instanceof type.errors) throw new Error(`${path}: refusing to write an invalid row: ${checked.summary}`);
  const header = resultsColumns(task).join("\t");
  let text = existsSync(path) ? await readFile(path, "utf8") : "";
  if (text !== "" && !text.endsWith("\n")) {
    text = wholeText(text);
    await truncate(path, Buffer.byteLength(text));
  }
  if (text.trim() === "") {
    await truncate(path, 0).catch(() => {});
    await appendFile(path, `${header}\n`);
  } else if (text.split("\n")[0] !== header) {
    throw new Error(`${path}: its header is for another task (expected "${header}")`);
  }
  await appendFile(path, `${formatRow(task, row)}\n`);
}
