/**
 * The JSON Lines that `bun predict.ts --json` prints: one PredictionLine per input, in input
 * order. A script reading them can validate each line with `PredictionLine(JSON.parse(line))`.
 */
import { type } from "arktype";
import { Task } from "./dataset.ts";

const ClassProbability = type({ class: "string", index: "number.integer >= 0", probability: "0 <= number <= 1" });

const YieldEstimate = type({
  /** Estimated recoverable fraction of the item's mass, from the model's yield head. */
  estimate: "0 <= number <= 1",
  /** "assumed": trained on the per-class placeholder table; "measured": on supplied yield labels. */
  basis: "'assumed' | 'measured'",
  note: "string",
});

export const Prediction = type({
  ok: "true",
  file: "string",
  class: "string",
  index: "number.integer >= 0",
  confidence: "0 <= number <= 1",
  /** The --top-k most probable classes, best first (the predicted class included). */
  top: ClassProbability.array().atLeastLength(1),
  task: Task,
  model: "string",
  "yield?": YieldEstimate,
  /** screening: the positive class and whether this image was predicted as it. */
  "screening?": { positiveClass: "string", positive: "boolean", probability: "0 <= number <= 1" },
});
export type Prediction = typeof Prediction.infer;

export const PredictionFailure = type({ ok: "false", file: "string", error: "string" });
export type PredictionFailure = typeof PredictionFailure.infer;

export const PredictionLine = Prediction.or(PredictionFailure);
export type PredictionLine = typeof PredictionLine.infer;
