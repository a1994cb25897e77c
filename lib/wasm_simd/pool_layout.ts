/** Shared between pool.ts (main thread) and worker.ts (helpers): the pool's one control block. */

/**
 * Int32 slots of the control block. SEQ: bumped once per call (helpers wait on it); NEXT: the next
 * unclaimed part (claimed with Atomics.add); COUNT: parts in this call; FINISHED: parts done; READY:
 * helpers started; STATUS: non-zero when a part failed on a helper. The parts' arguments follow from
 * ARGS_BYTE as float64, MAX_ARGS per part, MAX_PARTS parts.
 */
export const CTRL = {
  SEQ: 0, NEXT: 1, COUNT: 2, FINISHED: 3, READY: 4, FN: 5, NARGS: 6, STATUS: 7,
  ARGS_BYTE: 64, MAX_ARGS: 32, MAX_PARTS: 64,
} as const;

/** NEXT between calls: any claim fails until the next call resets it to 0. */
export const CLOSED = 1 << 30;

/** Kernels a helper can run, by index. */
export const FN_NAMES = [
  "sum_rows", "maxpool_grad", "batchnorm", "bn_grad_sums", "broadcast_rows", "conv2d_filter_grad", "conv2d_input_grad",
  "depthwise_filter_grad", "binary_f32", "relu_f32", "sqrt_f32", "clip_f32", "conv2d_forward",
  "bn_backward", "relu_grad_f32", "channel_sums", "bn_relu_pool", "bn_relu_pool_sums", "bn_relu_pool_backward",
] as const;
export type FnName = (typeof FN_NAMES)[number];
