/**
 * tfjs' Adam with its update fused into one kernel per variable where the backend has one.
 *
 * tfjs' AdamOptimizer runs 14 element-wise kernels per variable and step (plus a scalar tensor for
 * each constant): for the baseline CNN about 200 tiny kernel calls per step, whose dispatch cost is
 * a large part of the step that no second thread can share. On wasm the ArAdam kernel
 * (lib/wasm_kernels.ts) does the same operations in the same order in one pass, so the variables
 * and moments come out with the same bits (tests/backend.test.ts); on a backend without it this is
 * tfjs' own Adam, unchanged. State, learningRate, getWeights/setWeights: tfjs' own.
 */
import * as tf from "@tensorflow/tfjs";
import { hasFusedAdam } from "./wasm_kernels.ts";

/** AdamOptimizer's state, private in its typings; the names are tfjs-core 4.x's. */
interface AdamState {
  learningRate: number;
  beta1: number;
  beta2: number;
  epsilon: number;
  accBeta1: tf.Variable;
  accBeta2: tf.Variable;
  accumulatedFirstMoment: ({ originalName: string; variable: tf.Variable } | undefined)[];
  accumulatedSecondMoment: ({ originalName: string; variable: tf.Variable } | undefined)[];
  incrementIterations(): void;
}

type Grads = Parameters<tf.AdamOptimizer["applyGradients"]>[0];

/** tf.train.adam(learningRate), with the fused update where the backend runs ArAdam. */
export function adam(learningRate: number): tf.AdamOptimizer {
  const opt = tf.train.adam(learningRate);
  const own = opt.applyGradients.bind(opt);
  opt.applyGradients = (grads: Grads) => {
    if (!hasFusedAdam()) return own(grads);
    fusedStep(opt as unknown as AdamState, grads);
  };
  return opt;
}

/** AdamOptimizer.applyGradients (tfjs-core 4.22) with its per-variable arithmetic as one ArAdam call. */
function fusedStep(st: AdamState, grads: Grads): void {
  const names = Array.isArray(grads) ? grads.map((g) => g.name) : Object.keys(grads);
  tf.tidy(() => {
    const c1 = tf.sub(1, st.accBeta1);
    const c2 = tf.sub(1, st.accBeta2);
    names.forEach((name, i) => {
      const value = tf.engine().registeredVariables[name];
      if (value == null) throw new Error(`adam: no variable named ${name}`);
      const slot = (suffix: string) => ({
        originalName: `${name}/${suffix}`,
        variable: tf.tidy(() => tf.zerosLike(value).variable(false)),
      });
      st.accumulatedFirstMoment[i] ??= slot("m");
      st.accumulatedSecondMoment[i] ??= slot("v");
      const g = Array.isArray(grads) ? grads[i]!.tensor : grads[name];
      if (g == null) return;
      const m = st.accumulatedFirstMoment[i]!.variable;
      const v = st.accumulatedSecondMoment[i]!.variable;
      const attrs = { beta1: st.beta1, beta2: st.beta2, epsilon: st.epsilon, learningRate: st.learningRate };
      const [x2, m2, v2] = tf.engine().runKernel("ArAdam", { x: value, m, v, g, c1, c2 }, attrs) as tf.Tensor[];
      m.assign(m2!);
      v.assign(v2!);
      value.assign(x2!);
    });
    st.accBeta1.assign(tf.mul(st.accBeta1, st.beta1));
    st.accBeta2.assign(tf.mul(st.accBeta2, st.beta2));
  });
  st.incrementIterations();
}
