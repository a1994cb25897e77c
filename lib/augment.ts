/**
 * Image-batch augmentation as one index map over the pixels: one copy, no re-decoding, no per-image
 * kernels. train.ts decides whether and how much to augment; this is the fast way to move the pixels.
 */
import * as tf from "@tensorflow/tfjs";

/**
 * A random horizontal flip per image (when `flip`), then one random translation per batch of up to
 * `shift` pixels with mirrored ("symmetric") edges. The same values, bit for bit, as
 * where(mask, reverse(x)) → mirrorPad → slice (tests/backend.test.ts), and the same rand() draws in
 * the same order (one per image, then dy, dx); but one copy, where those are generic per-element
 * kernels on wasm. Returns `x` itself when there is nothing to do.
 */
export function flipAndShift(x: tf.Tensor4D, o: { flip: boolean; shift: number }, rand: () => number): tf.Tensor4D {
  if (!o.flip && o.shift === 0) return x;
  const [n, h, w, c] = x.shape;
  const flips = o.flip ? Array.from({ length: n }, () => rand() < 0.5) : null;
  let dy = o.shift, dx = o.shift; // offsets into the padded image: `shift` means no translation
  if (o.shift > 0) {
    dy = Math.floor(rand() * (2 * o.shift + 1));
    dx = Math.floor(rand() * (2 * o.shift + 1));
  }
  const mirror = (k: number, size: number) => (k < 0 ? -k - 1 : k >= size ? 2 * size - k - 1 : k);
  const src = x.dataSync() as Float32Array;
  const out = new Float32Array(src.length);
  const cols = new Int32Array(w);
  for (let b = 0, at = 0; b < n; b++) {
    for (let j = 0; j < w; j++) {
      const q = mirror(j + dx - o.shift, w);
      cols[j] = flips?.[b] ? w - 1 - q : q;
    }
    for (let i = 0; i < h; i++) {
      const row = (b * h + mirror(i + dy - o.shift, h)) * w;
      for (let j = 0; j < w; j++, at += c) {
        for (let k = 0, from = (row + cols[j]!) * c; k < c; k++) out[at + k] = src[from + k]!;
      }
    }
  }
  return tf.tensor4d(out, [n, h, w, c]);
}
