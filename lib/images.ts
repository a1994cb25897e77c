/**
 * The one image preprocessing path. prepare.ts uses it to fill the cache and predict.ts uses it
 * on a user's photo, so a model sees the same pixels at training and at prediction time.
 */
import sharp, { type OutputInfo } from "sharp";

/** Bumped whenever decodeToRgb changes its output: caches and checkpoints record it. */
export const PREPROCESSING = "sharp-srgb8-rotate-flattenwhite-cover-centre-v1";

/** Files whose extension says "image". The decoder still checks the bytes themselves. */
export const IMAGE_EXTENSIONS = [
  ".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp", ".avif", ".heic",
] as const;

export function isImagePath(path: string): boolean {
  const lower = path.toLowerCase();
  return IMAGE_EXTENSIONS.some((ext) => lower.endsWith(ext));
}

/**
 * A 12000×12000 photo is 144 Mpx: fine to shrink, but a decompression bomb beyond this limit is
 * refused rather than allowed to take the machine's memory.
 */
const MAX_INPUT_PIXELS = 200_000_000;

/**
 * Decode any still image (JPEG, PNG incl. 16-bit/alpha/grey, WebP, GIF first frame, TIFF, CMYK)
 * into `size`×`size`×3 uint8 sRGB, HWC order.
 * - EXIF orientation is applied (phones store rotated pixels plus a flag);
 * - alpha is flattened onto white (cut-out product photos have transparent backgrounds);
 * - grey, CMYK and 16-bit inputs all come out as 8-bit sRGB;
 * - the centre square is kept ("cover"), so objects keep their aspect ratio.
 * Throws an Error whose message names the problem; callers add the file name.
 */
export async function decodeToRgb(input: string | Uint8Array, size: number): Promise<Uint8Array> {
  const source = typeof input === "string" ? input : Buffer.from(input.buffer, input.byteOffset, input.byteLength);
  let decoded: { data: Buffer; info: OutputInfo };
  try {
    decoded = await sharp(source, { limitInputPixels: MAX_INPUT_PIXELS, failOn: "error" })
      .rotate()
      .flatten({ background: { r: 255, g: 255, b: 255 } })
      .toColourspace("srgb")
      .resize(size, size, { fit: "cover", position: "centre", kernel: "lanczos3" })
      .removeAlpha()
      .raw({ depth: "uchar" })
      .toBuffer({ resolveWithObject: true });
  } catch (err) {
    const bytes = typeof input === "string"
      ? new Uint8Array(await Bun.file(input).arrayBuffer().catch(() => new ArrayBuffer(0)))
      : input;
    throw new Error(decodeFailure(bytes, err instanceof Error ? err.message : String(err)));
  }
  const { data, info } = decoded;
  if (info.channels !== 3 || info.width !== size || info.height !== size || data.length !== size * size * 3) {
    throw new Error(`decoded to ${info.width}x${info.height}x${info.channels}, expected ${size}x${size}x3`);
  }
  return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

/** How resizeRgb scales (recorded in the preprocessing of a cache made with it). */
export const RESIZED = "resized-lanczos3-v1";

/**
 * `from`×`from`×3 uint8 RGB pixels (CIFAR's 32×32, synthetic images) scaled to `to`×`to`×3: what a
 * cache at another size holds for a source that comes as pixels rather than as image files.
 */
export async function resizeRgb(pixels: Uint8Array, from: number, to: number): Promise<Uint8Array> {
  const raw = { width: from, height: from, channels: 3 as const };
  const data = await sharp(Buffer.from(pixels.buffer, pixels.byteOffset, pixels.byteLength), { raw })
    .resize(to, to, { kernel: "lanczos3" }).raw().toBuffer();
  if (data.length !== to * to * 3) throw new Error(`resized to ${data.length} bytes, expected ${to}x${to}x3`);
  return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

/**
 * The reason a decode failed, in words a person can act on. libvips keeps its error text in one
 * process-wide buffer, so when several images decode at once (predict.ts, prepare.ts) a failing
 * one can come back as just "Unknown error"; the two commonest causes, a download or copy cut
 * short, are therefore recognised from the bytes themselves and named whatever libvips said.
 */
export function decodeFailure(bytes: Uint8Array, libvipsMessage: string): string {
  const said = libvipsMessage.split("\n").map((l) => l.trim()).filter((l) => l !== "").join("; ") || "no reason given";
  const tail = (n: number): Uint8Array => bytes.subarray(Math.max(0, bytes.length - n));
  const isJpeg = bytes.length >= 3 && bytes[0] === 0xff && bytes[1] === 0xd8 && bytes[2] === 0xff;
  // A JPEG ends with the end-of-image marker FF D9; some writers pad a few bytes after it.
  if (isJpeg && !Buffer.from(tail(64)).includes(Buffer.from([0xff, 0xd9]))) {
    return `truncated JPEG: the file ends before its end-of-image marker (${bytes.length} bytes; libvips: ${said})`;
  }
  const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  const isPng = bytes.length >= 8 && Buffer.from(bytes.subarray(0, 8)).equals(PNG_SIGNATURE);
  if (isPng && !Buffer.from(tail(64)).includes(Buffer.from("IEND"))) {
    return `truncated PNG: the file ends before its IEND chunk (${bytes.length} bytes; libvips: ${said})`;
  }
  return said;
}

/** sha256 of a file's bytes, hex: the identity of an image in the cache and the split. */
export function sha256Hex(bytes: Uint8Array): string {
  return new Bun.CryptoHasher("sha256").update(bytes).digest("hex");
}

/** sha256 of the file at `path`, hex, read as a stream (a cache's images.u8 need not fit twice in memory). */
export async function sha256File(path: string): Promise<string> {
  const hasher = new Bun.CryptoHasher("sha256");
  const reader = Bun.file(path).stream().getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    hasher.update(value);
  }
  return hasher.digest("hex");
}

/** Run `fn` over `items` with at most `limit` in flight, keeping input order in the result. */
export async function mapPool<T, R>(
  items: readonly T[], limit: number, fn: (item: T, index: number) => Promise<R>,
): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i] as T, i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}

/**
 * A batch of decoded images (each `size`×`size`×3 uint8, HWC, as decodeToRgb returns) as the
 * float32 values in [0, 1] the model is fed, batch-major: byte × (1/255) rounded to float32 once.
 * Training and evaluate() (imageBatch, lib/dataset.ts) and predict.ts all go through it, and a test
 * checks that a cached image and the same file decoded for prediction give byte-equal tensors.
 */
/** A size×size RGB image with left and right swapped (a horizontal flip), as a new array. */
export function mirrorRgb(pixels: Uint8Array, size: number): Uint8Array {
  if (pixels.length !== size * size * 3) throw new Error(`mirrorRgb: ${pixels.length} bytes is not ${size}x${size}x3`);
  const out = new Uint8Array(pixels.length);
  for (let y = 0; y < size; y++) {
    const row = y * size * 3;
    for (let x = 0; x < size; x++) out.set(pixels.subarray(row + x * 3, row + x * 3 + 3), row + (size - 1 - x) * 3);
  }
  return out;
}

export function pixelsToFloat32(images: readonly Uint8Array[], size: number): Float32Array {
  const px = size * size * 3;
  const out = new Float32Array(images.length * px);
  images.forEach((src, b) => {
    if (src.length !== px) throw new Error(`image ${b} has ${src.length} bytes, expected ${size}x${size}x3 = ${px}`);
    const o = b * px;
    for (let k = 0; k < px; k++) out[o + k] = src[k]! * (1 / 255);
  });
  return out;
}
