/** Shared between pool.ts (main thread) and worker.ts (helpers): the pool's one control block. */

/**
 * Int32 slots of the control block. SEQ: bumped once per call (helpers wait on it); GEN: the current
 * call's number (15 bits); THREADS: the threads a call's parts are dealt to; COUNT: parts in this call;
 * FINISHED: parts done; READY: helpers started; STATUS: non-zero when a part failed on a helper;
 * NEXT0 + t: thread t's share counter, GEN << 16 plus the next unclaimed part of its share (claimed with
 * Atomics.add), for t < MAX_THREADS. SLEEPERS: helpers asleep on SEQ; WAITING: 1 while the main thread
 * sleeps on FINISHED (a wake-up is a system call, so a thread notifies only one that sleeps); SPIN_US: how
 * long a thread polls before it sleeps (POLL_US); HELPER_PARTS: parts run by helpers so far. The parts'
 * arguments follow from ARGS_BYTE as float64, MAX_ARGS per part, MAX_PARTS parts.
 */
export const CTRL = {
  SEQ: 0, THREADS: 1, COUNT: 2, FINISHED: 3, READY: 4, FN: 5, NARGS: 6, STATUS: 7, NEXT0: 8, MAX_THREADS: 8,
  GEN: 16, SLEEPERS: 17, WAITING: 18, SPIN_US: 19, HELPER_PARTS: 20, ARGS_BYTE: 128, MAX_ARGS: 32, MAX_PARTS: 64,
} as const;

/** A call's number as its share counters carry it: 15 bits, so that GEN << 16 stays a positive int32. */
export const GEN_MASK = 0x7fff;

/** Kernels a helper can run, by index. */
export const FN_NAMES = [
  "sum_rows", "maxpool_grad", "batchnorm", "bn_grad_sums", "broadcast_rows", "conv2d_filter_grad", "conv2d_input_grad",
  "depthwise_filter_grad", "binary_f32", "relu_f32", "sqrt_f32", "clip_f32", "conv2d_forward",
  "bn_backward", "relu_grad_f32", "channel_sums", "bn_relu_pool", "bn_relu_pool_sums", "bn_relu_pool_backward",
] as const;
export type FnName = (typeof FN_NAMES)[number];

/**
 * How long a thread of a pool that owns the cores polls for the next call (or, on the main thread, for the
 * helpers' last parts) before it sleeps. Waking a thread from Atomics.wait costs the waker a system call and
 * the sleeper a trip through the scheduler: a few hundred microseconds each on a VM, as long as a whole
 * batchnorm pass. In a training step the next call usually opens within a millisecond. A poll holds a core,
 * though: where more threads want the cores than there are (two runs at once, each with every core), it
 * takes the core from a thread that has work. 0.5 ms is the compromise measured with bench/train_step.ts
 * --poll-ab (bench/README.md): alone, as fast as 2 or 10 ms; two runs at once, a third of 2 ms's loss.
 * Runs side by side should share the cores out (AR_WASM_THREADS = cores / runs). A pool that shares the
 * cores with XNNPACK's threads does not poll.
 */
export const POLL_US = 500;

/** Polls `slot` until it differs from `value` or the control block's SPIN_US pass; true if it changed. */
export function spinWhileEqual(ctrl: Int32Array, slot: number, value: number): boolean {
  const deadline = performance.now() + Atomics.load(ctrl, CTRL.SPIN_US) / 1000;
  for (;;) {
    for (let i = 0; i < 256; i++) if (Atomics.load(ctrl, slot) !== value) return true;
    if (performance.now() > deadline) return false;
  }
}

/** Thread t's own share of a call's n parts dealt to `threads` threads: parts [begin, end). */
function share(n: number, threads: number, t: number): [number, number] {
  return [Math.floor((t * n) / threads), Math.floor(((t + 1) * n) / threads)];
}

/**
 * Claims and runs parts of the current call until none is left: first thread `self`'s own share, then the
 * others' (a helper that wakes late leaves its share to whoever is free). Every batch-split kernel deals
 * the same images to the same thread, so what one kernel writes is still in that core's cache when the
 * next one reads it. A claim counts only if it carries the current call's number and that number did not
 * change while the call's size was read: a helper held up between its claim and its check (a preempted
 * thread) cannot take a part of the next call that another thread will also be handed.
 */
export function claimParts(ctrl: Int32Array, self: number, runPart: (i: number) => void): void {
  const threads = Math.min(CTRL.MAX_THREADS, Atomics.load(ctrl, CTRL.THREADS));
  for (let k = 0; k < threads; k++) {
    const t = (self + k) % threads;
    for (;;) {
      const claim = Atomics.add(ctrl, CTRL.NEXT0 + t, 1);
      const gen = claim >>> 16;
      if (gen !== Atomics.load(ctrl, CTRL.GEN)) break; // a call that has ended
      const [n, dealt] = [Atomics.load(ctrl, CTRL.COUNT), Atomics.load(ctrl, CTRL.THREADS)];
      if (gen !== Atomics.load(ctrl, CTRL.GEN)) break; // the next call began while its size was read
      const [begin, end] = share(n, dealt, t);
      if (begin + (claim & 0xffff) >= end) break;
      runPart(begin + (claim & 0xffff));
    }
  }
}
