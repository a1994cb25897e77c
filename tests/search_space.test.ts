/**
 * What train.ts's HP_SPACE offers the proposer for each kind of model: only the keys that change the
 * run. train.ts is the file the agent rewrites, so it is read through `--print-hp` only, on copies
 * whose HP block names another model (written next to it, so its imports resolve, and removed after).
 */
import { afterAll, describe, expect, test } from "bun:test";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { HpDump } from "../lib/proposer.ts";
import { ROOT, runScript } from "./helpers.ts";

const STARTUP = 60_000;
const written: string[] = [];
afterAll(() => { for (const f of written) rmSync(f, { force: true }); });

/** HP_SPACE of train.ts with these HP lines rewritten (`key: value` as they appear in the HP block). */
function spaceWith(edits: Record<string, string>): Record<string, unknown[]> {
  let text = readFileSync(join(ROOT, "train.ts"), "utf8");
  for (const [key, value] of Object.entries(edits)) {
    const line = new RegExp(`^(  ${key}: )[^,]+,`, "m");
    if (!line.test(text)) throw new Error(`train.ts has no HP line for ${key}`);
    text = text.replace(line, `$1${value},`);
  }
  const file = join(ROOT, `.search-space-${process.pid}-${written.length}.ts`);
  written.push(file);
  writeFileSync(file, text);
  const r = runScript([file, "--print-hp"], {});
  expect(r.code).toBe(0);
  return HpDump.assert(JSON.parse(r.out.trim().split("\n").at(-1)!)).HP_SPACE;
}
const moves = (space: Record<string, unknown[]>) => Object.keys(space).filter((k) => space[k]!.length > 1).sort();

describe("HP_SPACE offers only the keys that matter for the model HP names", () => {
  // imageSize lists the sizes the active cache holds, so it is not asserted here (tests/vit_sizes.test.ts).
  test("the scratch CNN: width and depth, no ViT keys, no backbone keys", () => {
    const m = moves(spaceWith({}));
    expect(m).toEqual(expect.arrayContaining(["width", "depth", "shift", "family", "lr"]));
    for (const k of ["patch", "embedDim", "numHeads", "vitDepth", "mlpRatio", "backboneSize", "standardize"]) {
      expect(m).not.toContain(k);
    }
  }, STARTUP);

  test("the ViT: its own keys, not the CNN's width and depth", () => {
    const m = moves(spaceWith({ family: '"vit" as Family' }));
    expect(m).toEqual(expect.arrayContaining(["patch", "embedDim", "numHeads", "vitDepth", "mlpRatio"]));
    expect(m).not.toContain("width");
    expect(m).not.toContain("depth");
  }, STARTUP);

  test("a graph backbone (COCO): head and feature keys; nothing of the pixel models, no fine-tuning", () => {
    const m = moves(spaceWith({ backbone: '"coco-centernet-mobilenetv3" as Backbone' }));
    const keys = ["backboneSize", "featureDropout", "standardize", "hidden", "flip", "lr"];
    expect(m).toEqual(expect.arrayContaining(keys));
    for (const k of ["width", "depth", "shift", "imageSize", "patch", "unfreezeBlocks", "backboneLrScale"]) {
      expect(m).not.toContain(k);
    }
  }, STARTUP);

  test("a layers backbone: unfreezeBlocks; backboneLrScale only once blocks are unfrozen", () => {
    const frozen = moves(spaceWith({ backbone: '"nsfwjs-mobilenetv2" as Backbone' }));
    expect(frozen).toContain("unfreezeBlocks");
    expect(frozen).not.toContain("backboneLrScale");
    const tuned = moves(spaceWith({ backbone: '"nsfwjs-mobilenetv2" as Backbone', unfreezeBlocks: "1" }));
    expect(tuned).toEqual(expect.arrayContaining(["unfreezeBlocks", "backboneLrScale"]));
  }, STARTUP);
});
