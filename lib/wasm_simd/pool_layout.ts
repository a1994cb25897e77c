/** Shared between pool.ts (main thread) and worker.ts (helpers): the control block of one helper. */

/** Int32 slots of the control block; the kernel arguments follow as float64 from ARGS_BYTE. */
export const CTRL = { SEQ: 0, DONE: 1, READY: 2, FN: 3, NARGS: 4, STATUS: 5, ARGS_BYTE: 64, MAX_ARGS: 32 } as const;

/** Kernels a helper can run, by index. */
export const FN_NAMES = [
  "sum_rows", "maxpool_grad", "batchnorm", "bn_grad_sums", "broadcast_rows", "conv2d_filter_grad", "conv2d_input_grad",
  "depthwise_filter_grad",
] as const;
export type FnName = (typeof FN_NAMES)[number];
