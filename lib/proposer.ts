/**
 * The built-in proposer: hyperparameter search with no LLM, so an unattended night is useful
 * out of the box.
 *
 * train.ts declares `export const HP = { … }` and `export const HP_SPACE` (the allowed values of
 * each key, in order). One proposal moves one key of the current best to a neighbouring value in
 * its list, e.g. `lr 0.003 -> 0.005`, and writes it by rewriting that one literal in the HP block,
 * so the line keeps its comment and the diff is one line.
 *
 * Choice order (all deterministic for a seed):
 *   1. the last kept move's key, again in the same direction (a step that helped may help twice);
 *   2. keys never tried this session;
 *   3. keys tried least from the current best, then moves that lost least often, then least tried;
 *   4. a seeded hash of (seed, tries from this base, move), so equal candidates are not always taken
 *      in file order.
 * A (key, value) already measured from the same base commit is never proposed again; when every
 * neighbour is used up the radius grows (two steps away, …). Some keys are never moved: `seed`
 * (another seed re-rolls the noise, it improves nothing), keys the session's task never reads,
 * and keys the loop backed off from after a streak of crashes on them.
 */
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { type } from "arktype";
import type { Task } from "../prepare.ts";
import { EXIT, Stop } from "./exit.ts";
import type { HpValue, Move, State, TriedMove } from "./journal.ts";
import { oneLine } from "./results.ts";
import { TRAIN, rev } from "./worktree.ts";

/** What a proposer did to train.ts; a `failure` is logged as a crash without training. */
export interface Proposal { description: string; move: Move | null; failure: string | null }

/** What `bun train.ts --print-hp` prints. */
export const HpDump = type({
  HP: "Record<string, number | boolean | string>",
  HP_SPACE: "Record<string, (number | boolean | string)[]>",
});
export type HpDump = typeof HpDump.infer;

/** HP and HP_SPACE as train.ts itself reports them (a child process: train.ts is the authority). */
export function readHp(cwd: string, bun: string): HpDump | { error: string } {
  const r = Bun.spawnSync([bun, TRAIN, "--print-hp"], { cwd, stdout: "pipe", stderr: "pipe", timeout: 120_000 });
  const last = r.stdout.toString().trim().split("\n").at(-1) ?? "";
  let raw: unknown = null;
  try { raw = JSON.parse(last); } catch { /* reported below */ }
  const dump = HpDump(raw);
  if (r.exitCode === 0 && !(dump instanceof type.errors)) return dump;
  const why = r.exitCode !== 0
    ? oneLine(r.stderr.toString().trim().split("\n").at(-1) ?? `exit ${r.exitCode}`)
    : dump instanceof type.errors ? oneLine(dump.summary) : "";
  const need = "the built-in proposer needs train.ts to print {HP, HP_SPACE} as JSON";
  return { error: `\`bun train.ts --print-hp\` failed (${why}): ${need}` };
}

/**
 * HP.seed of the commit checked out in `cwd`, null when train.ts has no whole-number seed: the
 * literal in the HP block, or what `--print-hp` reports when it is not a plain literal (asked once
 * per commit: `known` keeps the answers by commit).
 */
export function hpSeed(cwd: string, bun: string, known: Map<string, number | null>): number | null {
  const isSeed = (v: unknown): v is number => typeof v === "number" && Number.isInteger(v);
  try {
    const lit = findLiteral(readFileSync(join(cwd, TRAIN), "utf8"), "seed");
    if (lit && isSeed(lit.value)) return lit.value;
  } catch { /* no HP block: ask train.ts */ }
  const head = rev(cwd, "HEAD");
  if (!known.has(head)) {
    const dump = readHp(cwd, bun);
    const seed = "error" in dump ? undefined : dump.HP.seed;
    known.set(head, isSeed(seed) ? seed : null);
  }
  return known.get(head) ?? null;
}

/**
 * The seed of a run `offset` seeds after HP's own (`base`), and the environment that sets it:
 * offset 0 runs HP as train.ts has it; a train.ts without a seed runs as it is (its repeats differ
 * only by timing).
 */
export function seedFor(base: number | null, offset: number): { seed: number | null; env: Record<string, string> } {
  if (base === null) return { seed: null, env: {} };
  const seed = base + offset;
  return { seed, env: offset === 0 ? {} : { AR_HP: JSON.stringify({ seed }) } };
}

/**
 * Keys a move of which changes the model's structure: a keep re-measures the noise floor. Another
 * family (CNN or ViT) or input size is another model, with its own run-to-run noise, as a backbone is.
 */
export const STRUCTURE_AXES: readonly string[] = ["backbone", "family", "imageSize"];

/**
 * Keys the built-in proposer never moves for `task`: the seed (confirmation varies it on purpose),
 * and the weight of the yield head's loss, which only the waste task has.
 */
export function irrelevantAxes(task: Task): Set<string> {
  return new Set(["seed", ...(task === "waste" ? [] : ["yieldLossWeight"])]);
}

/**
 * The axes of the moves in the current crash streak (the last `streak` tried moves that crashed):
 * what the built-in search backs off from.
 */
export function streakAxes(tried: readonly TriedMove[], streak: number): string[] {
  const axes: string[] = [];
  for (let i = tried.length - 1; i >= 0 && tried.length - i <= streak && tried[i]!.status === "crash"; i--) {
    axes.push(tried[i]!.axis);
  }
  return [...new Set(axes)].sort();
}

/** What the search reads of the journal: the moves tried, the last kept one, the task, the axes backed off. */
type SearchState = Pick<State, "tried" | "lastKeptMove" | "task" | "skipAxes"> & {
  settings: Pick<State["settings"], "seed">;
};

/** The session's next single-axis move of the current best, and train.ts's source with it applied. */
export function nextMove(src: string, dump: HpDump, st: SearchState, base: string): { move: Move; src: string } | null {
  const skip = new Set([...irrelevantAxes(st.task), ...st.skipAxes]);
  const editable = new Set([...editableKeys(src, dump.HP)].filter((k) => !skip.has(k)));
  const move = proposeMove({
    hp: dump.HP, space: dump.HP_SPACE, editable, base,
    tried: st.tried, seed: st.settings.seed, lastKept: st.lastKeptMove,
  });
  return move ? { move, src: applyMove(src, move) } : null;
}

/**
 * The built-in proposer's next change, written into train.ts in `cwd`: null when every value of
 * HP_SPACE reachable from the current best (`base`) was measured. A train.ts that cannot print its
 * HP pauses the loop: the search has nothing to move.
 */
export function proposeBuiltin(cwd: string, bun: string, st: SearchState, base: string): Proposal | null {
  const dump = readHp(cwd, bun);
  if ("error" in dump) throw new Stop(EXIT.paused, dump.error);
  const path = join(cwd, TRAIN);
  const next = nextMove(readFileSync(path, "utf8"), dump, st, base);
  if (!next) return null;
  writeFileSync(path, next.src);
  return { description: describeMove(next.move), move: next.move, failure: null };
}

/**
 * Values `radius` steps from `value` in `space` (list order). A number missing from the list sits
 * between its numeric neighbours; a missing string or boolean has no neighbours but the others.
 */
export function neighbours(value: HpValue, space: readonly HpValue[], radius = 1): HpValue[] {
  const defined = (v: HpValue | undefined): v is HpValue => v !== undefined;
  const i = space.findIndex((v) => v === value);
  if (i >= 0) return [space[i - radius], space[i + radius]].filter(defined);
  if (typeof value !== "number") {
    return radius === 1 ? space.filter((v) => typeof v === typeof value && v !== value) : [];
  }
  const nums = space.filter((v): v is number => typeof v === "number").sort((a, b) => a - b);
  const below = nums.filter((v) => v < value);
  const above = nums.filter((v) => v > value);
  return [below[below.length - radius], above[radius - 1]].filter(defined);
}

/** Up or down: numeric for numbers and booleans, lexicographic for strings (used for "same again" only). */
export function direction(m: { from: HpValue; to: HpValue }): 1 | -1 {
  if (typeof m.from === "string" || typeof m.to === "string") return String(m.to) > String(m.from) ? 1 : -1;
  return Number(m.to) > Number(m.from) ? 1 : -1;
}

/** FNV-1a: a stable pseudo-random rank for tie-breaking. */
function rank(text: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) h = Math.imul(h ^ text.charCodeAt(i), 0x01000193) >>> 0;
  return h;
}

interface ProposeArgs {
  hp: Record<string, HpValue>;
  space: Record<string, readonly HpValue[]>;
  /** Keys whose value is a plain literal in the HP block (others cannot be rewritten safely). */
  editable: ReadonlySet<string>;
  /** The commit the move starts from (the current best). */
  base: string;
  tried: readonly TriedMove[];
  seed: number;
  lastKept: { axis: string; direction: 1 | -1 } | null;
}

/** The next single-axis move, or null when every reachable value was measured from this base. */
export function proposeMove(a: ProposeArgs): Move | null {
  const axes = Object.keys(a.space).filter((k) => a.editable.has(k) && k in a.hp).sort();
  const longest = Math.max(1, ...axes.map((k) => a.space[k]?.length ?? 0));
  for (let radius = 1; radius < longest; radius++) {
    const scored: { move: Move; key: number[] }[] = [];
    for (const axis of axes) {
      const from = a.hp[axis]!;
      for (const to of neighbours(from, a.space[axis] ?? [], radius)) {
        if (a.tried.some((t) => t.base === a.base && t.axis === axis && t.value === to)) continue;
        const onAxis = a.tried.filter((t) => t.axis === axis);
        const fromBase = a.tried.filter((t) => t.base === a.base).length;
        const move = { axis, from, to };
        scored.push({
          move,
          key: [
            a.lastKept && a.lastKept.axis === axis && a.lastKept.direction === direction(move) ? 0 : 1,
            onAxis.length === 0 ? 0 : 1,
            onAxis.filter((t) => t.base === a.base).length,
            onAxis.filter((t) => t.value === to && t.status !== "keep").length,
            onAxis.length,
            // Not the commit hash: the same seed and history give the same choice in any repository.
            rank(`${a.seed}:${fromBase}:${axis}:${String(to)}`),
          ],
        });
      }
    }
    if (scored.length === 0) continue;
    scored.sort((x, y) => {
      for (let i = 0; i < x.key.length; i++) if (x.key[i] !== y.key[i]) return x.key[i]! - y.key[i]!;
      return 0;
    });
    return scored[0]!.move;
  }
  return null;
}

// ---------------------------------------------------------------------------
// Rewriting the HP block of train.ts
// ---------------------------------------------------------------------------

/** A number, true/false, or a one-line string (group 3 is the quote). */
const LITERAL = String.raw`-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|true|false|(["'])[^"'\n\\]*\3`;

/** [start, end) of the text between the braces of `export const HP = { … }`. */
function hpBlock(src: string): { start: number; end: number } {
  const m = /export\s+const\s+HP\s*(?::[^=]*)?=\s*\{/.exec(src);
  if (!m) throw new Error("train.ts has no `export const HP = {` block");
  const start = m.index + m[0].length;
  let depth = 1;
  for (let i = start; i < src.length; i++) {
    if (src[i] === "{") depth++;
    else if (src[i] === "}" && --depth === 0) return { start, end: i };
  }
  throw new Error("train.ts: the HP block is not closed");
}

function escapeRe(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

/**
 * Where the literal value of `key` sits in the HP block, or null if it is not a plain literal.
 * A type assertion after it (`"none" as Backbone`) is allowed and kept.
 */
export function findLiteral(
  src: string, key: string,
): { start: number; end: number; value: HpValue; quote: string } | null {
  const block = hpBlock(src);
  const body = src.slice(block.start, block.end);
  const keyThenValue = String.raw`(?<=^|[\s{,])(["']?)${escapeRe(key)}\1\s*:\s*(${LITERAL})`;
  const endOfValue = String.raw`(?=(?:\s+as\s+[\w.]+)?\s*(?:,|$|//|/\*))`;
  const re = new RegExp(keyThenValue + endOfValue, "m");
  const m = re.exec(body);
  if (!m || m[2] === undefined) return null;
  const text = m[2];
  const start = block.start + m.index + m[0].length - text.length;
  const quote = m[3] ?? "";
  const value = quote ? text.slice(1, -1) : text === "true" ? true : text === "false" ? false : Number(text);
  return { start, end: start + text.length, value, quote };
}

/** Keys of `hp` whose literal in the source holds exactly the value train.ts reports. */
export function editableKeys(src: string, hp: Record<string, HpValue>): Set<string> {
  return new Set(Object.keys(hp).filter((k) => findLiteral(src, k)?.value === hp[k]));
}

function formatValue(v: HpValue): string {
  return String(v); // 0.0005 stays 0.0005; booleans are true/false; strings bare (descriptions)
}

/** train.ts with the move applied: only the literal changes, comments and layout stay. */
export function applyMove(src: string, move: Move): string {
  const lit = findLiteral(src, move.axis);
  if (!lit) throw new Error(`train.ts: HP.${move.axis} is not a plain literal in the HP block`);
  if (lit.value !== move.from) {
    throw new Error(`train.ts: HP.${move.axis} is ${String(lit.value)}, expected ${String(move.from)}`);
  }
  if (typeof move.to === "string" && /["'\\\n]/.test(move.to)) {
    throw new Error(`HP_SPACE.${move.axis}: ${JSON.stringify(move.to)} cannot be written as a plain string literal`);
  }
  const quote = lit.quote || '"';
  const text = typeof move.to === "string" ? `${quote}${move.to}${quote}` : formatValue(move.to);
  return src.slice(0, lit.start) + text + src.slice(lit.end);
}

export function describeMove(m: Move): string {
  return `${m.axis} ${formatValue(m.from)} -> ${formatValue(m.to)}`;
}
