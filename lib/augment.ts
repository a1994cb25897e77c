/**
 * Image-batch augmentation as one index map over the pixels: one copy, no re-decoding, no per-image
 * kernels. train.ts decides whether and how much to augment; this is the fast way to move the pixels.
 */
import * as tf from "@tensorflow/tfjs";
import { imageBatch, type Dataset } from "./dataset.ts";
import { filledTensor } from "./wasm_kernels.ts";

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
  const bases = Int32Array.from({ length: n }, (_, b) => b * h * w * c);
  const src = x.dataSync() as Float32Array;
  return filledTensor<tf.Rank.R4>([n, h, w, c], (out) => remap(src, bases, [h, w, c], 1, o, rand, out));
}

/**
 * flipAndShift(imageBatch(ds, indices), o, rand), bit for bit and with the same rand() draws, in one
 * pass from the uint8 image cache: no intermediate tensor and no read-back from the backend (on wasm
 * a read-back copies the whole batch out of its heap).
 */
export function augmentedBatch(
  ds: Dataset, indices: ArrayLike<number>, o: { flip: boolean; shift: number },
  rand: () => number,
): tf.Tensor4D {
  if (!o.flip && o.shift === 0) return imageBatch(ds, indices);
  const s = ds.imageSize, n = indices.length;
  const bases = Int32Array.from({ length: n }, (_, b) => indices[b]! * s * s * 3);
  // × (1/255): the very expression pixelsToFloat32 (lib/images.ts) applies, so the same float32 values.
  return filledTensor<tf.Rank.R4>([n, s, s, 3], (out) => remap(ds.images, bases, [s, s, 3], 1 / 255, o, rand, out));
}

/**
 * The index map of both, into `out`: image b starts at src[bases[b]]; every value is multiplied by `scale`
 * (exact for 1).
 */
function remap(
  src: ArrayLike<number>, bases: Int32Array, [h, w, c]: [number, number, number], scale: number,
  o: { flip: boolean; shift: number }, rand: () => number, out: Float32Array,
): void {
  const n = bases.length;
  const flips = o.flip ? Array.from({ length: n }, () => rand() < 0.5) : null;
  let dy = o.shift, dx = o.shift; // offsets into the padded image: `shift` means no translation
  if (o.shift > 0) {
    dy = Math.floor(rand() * (2 * o.shift + 1));
    dx = Math.floor(rand() * (2 * o.shift + 1));
  }
  const mirror = (k: number, size: number) => (k < 0 ? -k - 1 : k >= size ? 2 * size - k - 1 : k);
  const cols = new Int32Array(w);
  for (let b = 0, at = 0; b < n; b++) {
    for (let j = 0; j < w; j++) {
      const q = mirror(j + dx - o.shift, w);
      cols[j] = flips?.[b] ? w - 1 - q : q;
    }
    for (let i = 0; i < h; i++) {
      const row = bases[b]! + mirror(i + dy - o.shift, h) * w * c;
      for (let j = 0; j < w; j++, at += c) {
        for (let k = 0, from = row + cols[j]! * c; k < c; k++) out[at + k] = src[from + k]! * scale;
      }
    }
  }
}
