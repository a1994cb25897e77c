/*
 * SIMD kernels that run inside tfjs-backend-wasm's own linear memory.
 *
 * This file is compiled (by lib/wasm_simd/build.ts, clang --target=wasm32
 * -msimd128) into a tiny standalone module that IMPORTS the memory of the
 * tfjs wasm backend, so every pointer below is a byte offset into the tfjs
 * heap: kernels read their inputs and write their outputs in place, with no
 * copy in or out and no trip through JavaScript per element.
 *
 * Rules that keep the module safe inside someone else's memory:
 * - no static data, no globals, no stack (no local arrays, no calls): the
 *   build checks that the module has no data section and never touches
 *   __stack_pointer; all scratch space is passed in by the caller;
 * - no -ffast-math: every floating-point operation happens in the written
 *   order, which is what makes sum_rows and batchnorm bit-identical to the
 *   tfjs-wasm kernels they replace (tests/backend.test.ts checks this).
 *
 * All tensors are float32, channels-last (NHWC), densely packed.
 *
 * Every kernel takes a part of the work (a range of images, rows or
 * channels) so that lib/wasm_simd/pool.ts can run the parts on several
 * threads. Parts never write the same element and each element is computed
 * with the same operations in the same order whatever the split, so the
 * results are bit-identical for any thread count.
 */
#include <wasm_simd128.h>

#define EXPORT(name) __attribute__((export_name(#name)))

/* Rows per block in the reductions: a block of x (and dy) stays in L1 while
 * every channel group walks it, so each tensor is read from memory once. */
static inline int block_rows(int cols) {
  const int b = 2048 / (cols > 0 ? cols : 1);
  return b < 8 ? 8 : b;
}

/*
 * out[c] = sum over r of x[r * cols + c], for 0 <= c < cols; divided by rows
 * when `mean` is non-zero.
 *
 * Reducing a NHWC tensor over N, H and W is this with rows = N*H*W and
 * cols = C. tfjs-wasm's Sum/Mean only reduce innermost axes, so for that
 * case it first transposes the whole tensor to [C, N*H*W]; here each SIMD
 * lane accumulates one column sequentially, in row order, in float32 (the
 * running total is carried across row blocks in `out`): the very same
 * additions in the very same order as tfjs-wasm's scalar loop over the
 * transposed data, and `sum / rows` like its Mean, hence bit-identical
 * results without the transpose.
 */
EXPORT(sum_rows)
void sum_rows(const float* x, float* out, int rows, int cols, int c_begin, int c_end, int mean) {
  // Part: columns [c_begin, c_end) of the [rows, cols] matrix.
  __builtin_memset(out + c_begin, 0, (unsigned long)(c_end - c_begin) * sizeof(float));
  const int br = block_rows(cols);
  for (int r0 = 0; r0 < rows; r0 += br) {
    const int r1 = r0 + br < rows ? r0 + br : rows;
    int c = c_begin;
    for (; c + 16 <= c_end; c += 16) {
      v128_t a0 = wasm_v128_load(out + c), a1 = wasm_v128_load(out + c + 4);
      v128_t a2 = wasm_v128_load(out + c + 8), a3 = wasm_v128_load(out + c + 12);
      const float* p = x + (long)r0 * cols + c;
      for (int r = r0; r < r1; ++r, p += cols) {
        a0 = wasm_f32x4_add(a0, wasm_v128_load(p));
        a1 = wasm_f32x4_add(a1, wasm_v128_load(p + 4));
        a2 = wasm_f32x4_add(a2, wasm_v128_load(p + 8));
        a3 = wasm_f32x4_add(a3, wasm_v128_load(p + 12));
      }
      wasm_v128_store(out + c, a0);
      wasm_v128_store(out + c + 4, a1);
      wasm_v128_store(out + c + 8, a2);
      wasm_v128_store(out + c + 12, a3);
    }
    for (; c + 4 <= c_end; c += 4) {
      v128_t a = wasm_v128_load(out + c);
      const float* p = x + (long)r0 * cols + c;
      for (int r = r0; r < r1; ++r, p += cols) a = wasm_f32x4_add(a, wasm_v128_load(p));
      wasm_v128_store(out + c, a);
    }
    for (; c < c_end; ++c) {
      float a = out[c];
      const float* p = x + (long)r0 * cols + c;
      for (int r = r0; r < r1; ++r, p += cols) a += *p;
      out[c] = a;
    }
  }
  if (mean) {
    const float n = (float)rows;
    for (int c = c_begin; c < c_end; ++c) out[c] = out[c] / n;
  }
}

/*
 * Gradient of a 2-D max pool (NHWC), with tfjs-cpu's semantics exactly: in
 * each window the gradient goes to the FIRST position (row-major window
 * order) holding the maximum, found with a strict `>` starting from -inf
 * (so a window of only NaN/-inf passes no gradient); positions in the
 * padding are skipped; overlapping windows add up.
 *
 * x: [B,H,W,C] pool input, dy: [B,OH,OW,C], dx: [B,H,W,C] (written whole).
 * Four channels per SIMD step: running max and its element offset per lane,
 * then a scalar scatter-add of the four dy values.
 */
EXPORT(maxpool_grad)
void maxpool_grad(const float* x, const float* dy, float* dx, int B, int H, int W, int C, int OH, int OW,
                  int fh, int fw, int sh, int sw, int pad_top, int pad_left, int b_begin, int b_end) {
  // Part: images [b_begin, b_end) (B is the whole batch).
  __builtin_memset(dx + (long)b_begin * H * W * C, 0, (unsigned long)(b_end - b_begin) * H * W * C * sizeof(float));
  const v128_t lane = wasm_i32x4_make(0, 1, 2, 3);
  const v128_t neg_inf = wasm_f32x4_splat(-__builtin_inff());
  const v128_t none = wasm_i32x4_splat(-1);
  for (int b = b_begin; b < b_end; ++b) {
    const int img = b * H * W * C;
    for (int oh = 0; oh < OH; ++oh) {
      const int r0 = oh * sh - pad_top;
      const int rmin = r0 < 0 ? 0 : r0;
      const int rmax = r0 + fh > H ? H : r0 + fh;
      for (int ow = 0; ow < OW; ++ow) {
        const int c0 = ow * sw - pad_left;
        const int cmin = c0 < 0 ? 0 : c0;
        const int cmax = c0 + fw > W ? W : c0 + fw;
        const float* g = dy + ((b * OH + oh) * OW + ow) * C;
        int ch = 0;
        for (; ch + 4 <= C; ch += 4) {
          v128_t best = neg_inf, at = none;
          for (int r = rmin; r < rmax; ++r) {
            for (int cc = cmin; cc < cmax; ++cc) {
              const int off = img + (r * W + cc) * C + ch;
              const v128_t v = wasm_v128_load(x + off);
              const v128_t gt = wasm_f32x4_gt(v, best);
              best = wasm_v128_bitselect(v, best, gt);
              at = wasm_v128_bitselect(wasm_i32x4_add(wasm_i32x4_splat(off), lane), at, gt);
            }
          }
          const int i0 = wasm_i32x4_extract_lane(at, 0), i1 = wasm_i32x4_extract_lane(at, 1);
          const int i2 = wasm_i32x4_extract_lane(at, 2), i3 = wasm_i32x4_extract_lane(at, 3);
          if (i0 >= 0) dx[i0] += g[ch];
          if (i1 >= 0) dx[i1] += g[ch + 1];
          if (i2 >= 0) dx[i2] += g[ch + 2];
          if (i3 >= 0) dx[i3] += g[ch + 3];
        }
        for (; ch < C; ++ch) {
          float best = -__builtin_inff();
          int at = -1;
          for (int r = rmin; r < rmax; ++r) {
            for (int cc = cmin; cc < cmax; ++cc) {
              const int off = img + (r * W + cc) * C + ch;
              if (x[off] > best) {
                best = x[off];
                at = off;
              }
            }
          }
          if (at >= 0) dx[at] += g[ch];
        }
      }
    }
  }
}

/*
 * Batch norm over the last axis, bit-identical to tfjs-wasm's FusedBatchNorm,
 * which computes (FusedBatchNorm.cc, tfjs 4.22)
 *   nf  = (double) sqrtf(variance + eps)
 *   out = (float) ((double) offset + (double) ((x - mean) * scale) / nf)
 * i.e. the subtraction and product in float32, the division and the addition
 * in float64. Same operations here, 4 lanes at a time (2 in float64).
 * Each parameter has C entries (one per channel) or 1 (broadcast); a null
 * scale/offset means 1/0. `scratch` is caller-provided, 8-byte aligned, 24*C
 * bytes: the per-channel values, expanded once.
 */
EXPORT(batchnorm)
void batchnorm(const float* x, float* out, int rows, int C, const float* mean, int mean_n, const float* var,
               int var_n, const float* scale, int scale_n, const float* offset, int offset_n, float eps, void* scratch,
               int r_begin, int r_end) {
  // Part: rows [r_begin, r_end) (`rows` is the whole count); scratch is this part's own.
  double* nf = (double*)scratch;
  double* o = nf + C;
  float* m = (float*)(o + C);
  float* s = m + C;
  for (int c = 0; c < C; ++c) {
    nf[c] = (double)__builtin_sqrtf(var[var_n == 1 ? 0 : c] + eps);
    m[c] = mean[mean_n == 1 ? 0 : c];
    s[c] = scale ? scale[scale_n == 1 ? 0 : c] : 1.f;
    o[c] = (double)(offset ? offset[offset_n == 1 ? 0 : c] : 0.f);
  }
  for (int r = r_begin; r < r_end; ++r) {
    const float* xr = x + (long)r * C;
    float* yr = out + (long)r * C;
    int c = 0;
    for (; c + 4 <= C; c += 4) {
      const v128_t t = wasm_f32x4_mul(wasm_f32x4_sub(wasm_v128_load(xr + c), wasm_v128_load(m + c)), wasm_v128_load(s + c));
      const v128_t t_lo = wasm_f64x2_promote_low_f32x4(t);
      const v128_t t_hi = wasm_f64x2_promote_low_f32x4(wasm_i32x4_shuffle(t, t, 2, 3, 0, 1));
      const v128_t r_lo = wasm_f64x2_add(wasm_v128_load(o + c), wasm_f64x2_div(t_lo, wasm_v128_load(nf + c)));
      const v128_t r_hi = wasm_f64x2_add(wasm_v128_load(o + c + 2), wasm_f64x2_div(t_hi, wasm_v128_load(nf + c + 2)));
      const v128_t lo = wasm_f32x4_demote_f64x2_zero(r_lo), hi = wasm_f32x4_demote_f64x2_zero(r_hi);
      wasm_v128_store(yr + c, wasm_i32x4_shuffle(lo, hi, 0, 1, 4, 5));
    }
    for (; c < C; ++c) yr[c] = (float)(o[c] + (double)((xr[c] - m[c]) * s[c]) / nf[c]);
  }
}

/*
 * The two per-channel sums a batch-norm gradient needs, in one pass:
 *   s1[c] = sum_r dy[r,c]
 *   s2[c] = sum_r dy[r,c] * (x[r,c] - mean[c])
 * (mean has C entries). out receives s1 in [0, C) and s2 in [C, 2C).
 */
EXPORT(bn_grad_sums)
void bn_grad_sums(const float* x, const float* dy, const float* mean, float* out, int rows, int C, int c_begin, int c_end) {
  // Part: channels [c_begin, c_end).
  float* o1 = out;
  float* o2 = out + C;
  __builtin_memset(o1 + c_begin, 0, (unsigned long)(c_end - c_begin) * sizeof(float));
  __builtin_memset(o2 + c_begin, 0, (unsigned long)(c_end - c_begin) * sizeof(float));
  const int br = block_rows(2 * C);
  for (int r0 = 0; r0 < rows; r0 += br) {
    const int r1 = r0 + br < rows ? r0 + br : rows;
    int c = c_begin;
    for (; c + 8 <= c_end; c += 8) {
      v128_t s1a = wasm_v128_load(o1 + c), s1b = wasm_v128_load(o1 + c + 4);
      v128_t s2a = wasm_v128_load(o2 + c), s2b = wasm_v128_load(o2 + c + 4);
      const v128_t ma = wasm_v128_load(mean + c), mb = wasm_v128_load(mean + c + 4);
      const float* px = x + (long)r0 * C + c;
      const float* pg = dy + (long)r0 * C + c;
      for (int r = r0; r < r1; ++r, px += C, pg += C) {
        const v128_t ga = wasm_v128_load(pg), gb = wasm_v128_load(pg + 4);
        s1a = wasm_f32x4_add(s1a, ga);
        s1b = wasm_f32x4_add(s1b, gb);
        s2a = wasm_f32x4_add(s2a, wasm_f32x4_mul(ga, wasm_f32x4_sub(wasm_v128_load(px), ma)));
        s2b = wasm_f32x4_add(s2b, wasm_f32x4_mul(gb, wasm_f32x4_sub(wasm_v128_load(px + 4), mb)));
      }
      wasm_v128_store(o1 + c, s1a);
      wasm_v128_store(o1 + c + 4, s1b);
      wasm_v128_store(o2 + c, s2a);
      wasm_v128_store(o2 + c + 4, s2b);
    }
    for (; c < c_end; ++c) {
      float s1 = o1[c], s2 = o2[c];
      const float m = mean[c];
      for (int r = r0; r < r1; ++r) {
        const float g = dy[(long)r * C + c];
        s1 += g;
        s2 += g * (x[(long)r * C + c] - m);
      }
      o1[c] = s1;
      o2[c] = s2;
    }
  }
}

/*
 * out[r,c] = v[r / group, c] / group for every row: the gradient of a mean over a run of axes before the last
 * (the leading ones, batchnorm's statistics: one group of all the rows; the spatial ones, global average
 * pooling: one group per image) in one write pass, where tfjs-core's gradient materialises ones(x.shape)
 * in JavaScript and runs two full-size ops; the same (v * 1) / group per element.
 */
EXPORT(broadcast_rows)
void broadcast_rows(const float* v, float* out, int r_begin, int r_end, int C, int group) {
  // Part: rows [r_begin, r_end). The mean's divisor is the group's row count.
  const float d = (float)group;
  const v128_t dv = wasm_f32x4_splat(d);
  for (int r = r_begin; r < r_end; ++r) {
    float* o = out + (long)r * C;
    const float* vg = v + (long)(r / group) * C;
    int c = 0;
    for (; c + 4 <= C; c += 4) wasm_v128_store(o + c, wasm_f32x4_div(wasm_v128_load(vg + c), dv));
    for (; c < C; ++c) o[c] = vg[c] / d;
  }
}

/*
 * Per-channel sums over rows [r_begin, r_end) of x [rows, C] into this part's own out [C]: of x itself
 * (mean == 0), or of (x - mean)^2. Batchnorm's training statistics in two such passes (mean, then
 * variance), where tf.moments runs Mean, Sub, Square and Mean. The caller cuts the rows into a fixed
 * number of parts and adds the parts' sums in part order (sum_parts), so the bits never depend on the
 * thread count.
 */
EXPORT(channel_sums)
void channel_sums(const float* x, const float* mean, float* out, int C, int r_begin, int r_end) {
  __builtin_memset(out, 0, (unsigned long)C * sizeof(float));
  const int br = block_rows(C);
  for (int r0 = r_begin; r0 < r_end; r0 += br) {
    const int r1 = r0 + br < r_end ? r0 + br : r_end;
    int c = 0;
    for (; c + 8 <= C; c += 8) {
      v128_t sa = wasm_v128_load(out + c), sb = wasm_v128_load(out + c + 4);
      const float* px = x + (long)r0 * C + c;
      if (mean != 0) {
        const v128_t ma = wasm_v128_load(mean + c), mb = wasm_v128_load(mean + c + 4);
        for (int r = r0; r < r1; ++r, px += C) {
          const v128_t da = wasm_f32x4_sub(wasm_v128_load(px), ma), db = wasm_f32x4_sub(wasm_v128_load(px + 4), mb);
          sa = wasm_f32x4_add(sa, wasm_f32x4_mul(da, da));
          sb = wasm_f32x4_add(sb, wasm_f32x4_mul(db, db));
        }
      } else {
        for (int r = r0; r < r1; ++r, px += C) {
          sa = wasm_f32x4_add(sa, wasm_v128_load(px));
          sb = wasm_f32x4_add(sb, wasm_v128_load(px + 4));
        }
      }
      wasm_v128_store(out + c, sa);
      wasm_v128_store(out + c + 4, sb);
    }
    for (; c < C; ++c) {
      float acc = out[c];
      const float m = mean != 0 ? mean[c] : 0.0f;
      for (int r = r0; r < r1; ++r) {
        const float v = x[(long)r * C + c];
        acc += mean != 0 ? (v - m) * (v - m) : v;
      }
      out[c] = acc;
    }
  }
}

/* out[c] = (sum over p of parts[p * C + c], in part order) / n. */
EXPORT(sum_parts)
void sum_parts(const float* parts, float* out, int P, int C, float n) {
  for (int c = 0; c < C; ++c) {
    float acc = 0.0f;
    for (int p = 0; p < P; ++p) acc += parts[(long)p * C + c];
    out[c] = acc / n;
  }
}

/*
 * Batchnorm's gradient when the layer normalised by this batch's own mean and variance (training),
 * the paths through the mean and the variance included, in closed form:
 *   dx = k*dy - k*s1/n - (x - mean) * k*s2/(n*(var+eps)),   k = gamma/sqrt(var+eps),
 *   dgamma = s2/sqrt(var+eps),   dbeta = s1,
 * with s1 = sum(dy), s2 = sum(dy*(x - mean)) per channel (bn_grad_sums) and n rows. tfjs' autodiff
 * reaches the same through the moments' ops: about ten full-size passes per layer instead of two.
 * bn_backward_coef (one thread, per channel) writes coef = [k, k*s1/n, k*s2/(n*(var+eps))], dgamma
 * (skipped when gamma is 0, no scale) and dbeta; bn_backward applies coef to rows [r_begin, r_end).
 */
EXPORT(bn_backward_coef)
void bn_backward_coef(const float* var, const float* gamma, const float* sums, float* coef, float* dgamma,
                      float* dbeta, int C, float eps, float n) {
  for (int c = 0; c < C; ++c) {
    const float inv = 1.0f / __builtin_sqrtf(var[c] + eps);
    const float k = gamma != 0 ? gamma[c] * inv : inv;
    const float s1 = sums[c], s2 = sums[C + c];
    coef[c] = k;
    coef[C + c] = k * s1 / n;
    coef[2 * C + c] = k * inv * inv * s2 / n;
    if (gamma != 0) dgamma[c] = s2 * inv;
    dbeta[c] = s1;
  }
}

EXPORT(bn_backward)
void bn_backward(const float* x, const float* dy, const float* mean, const float* coef, float* dx, int C,
                 int r_begin, int r_end) {
  const float* k = coef;
  const float* a = coef + C;
  const float* b = coef + 2 * C;
  for (int r = r_begin; r < r_end; ++r) {
    const float* px = x + (long)r * C;
    const float* pg = dy + (long)r * C;
    float* o = dx + (long)r * C;
    int c = 0;
    for (; c + 4 <= C; c += 4) {
      const v128_t xc = wasm_f32x4_sub(wasm_v128_load(px + c), wasm_v128_load(mean + c));
      const v128_t kdy = wasm_f32x4_mul(wasm_v128_load(k + c), wasm_v128_load(pg + c));
      const v128_t t = wasm_f32x4_add(wasm_v128_load(a + c), wasm_f32x4_mul(xc, wasm_v128_load(b + c)));
      wasm_v128_store(o + c, wasm_f32x4_sub(kdy, t));
    }
    for (; c < C; ++c) o[c] = k[c] * pg[c] - (a[c] + (px[c] - mean[c]) * b[c]);
  }
}

/*
 * A conv block's batchnorm, ReLU and 2x2 max-pool (stride 2, no padding) in one pass over x [B,H,W,C]:
 *   y[b,oh,ow,c] = max over the window of relu(bn(x))   (mean, var, scale and offset: C entries each).
 * exact != 0 (inference): each bn value computed as batchnorm() computes it, so y has the bits of the
 * three kernels run one after another. exact == 0 (training): bn(x) = x * k + (offset - mean * k) with
 * k = scale / sqrt(var + eps) in float32, the same values to float rounding without batchnorm()'s two
 * float64 divisions per element, which made this pass several times slower than the memory it reads.
 * Where win is not 0 (training) it receives, per output element, the index into x of the window's first
 * maximum when that maximum is > 0, else -1: the one element of the window that the gradient reaches
 * (max-pool gives it to the first maximum, ReLU passes it only above 0). Rows and columns beyond 2*OH,
 * 2*OW (odd sizes) are not pooled, as a valid pool drops them. scratch: 24*C bytes of this part's own,
 * as batchnorm's. Part: images [b_begin, b_end).
 */
#define BRP_WINDOW(ZVEC)                                                         \
  for (int i = 0; i < 2; ++i) {                                                  \
    for (int j = 0; j < 2; ++j) {                                                \
      const int off = ((b * H + 2 * oh + i) * W + 2 * ow + j) * C + c;           \
      const v128_t xv = wasm_v128_load(x + off);                                 \
      const v128_t z = ZVEC;                                                     \
      const v128_t gt = wasm_f32x4_gt(z, best);                                  \
      best = wasm_v128_bitselect(z, best, gt);                                   \
      at = wasm_v128_bitselect(wasm_i32x4_add(wasm_i32x4_splat(off), lane), at, gt); \
    }                                                                            \
  }

/* batchnorm()'s lanes: (x - m) * s in float32, / nf and + o in float64. */
static inline v128_t bn_exact4(v128_t xv, const float* m, const float* s, const double* o, const double* nf) {
  const v128_t t = wasm_f32x4_mul(wasm_f32x4_sub(xv, wasm_v128_load(m)), wasm_v128_load(s));
  const v128_t t_lo = wasm_f64x2_promote_low_f32x4(t);
  const v128_t t_hi = wasm_f64x2_promote_low_f32x4(wasm_i32x4_shuffle(t, t, 2, 3, 0, 1));
  const v128_t r_lo = wasm_f64x2_add(wasm_v128_load(o), wasm_f64x2_div(t_lo, wasm_v128_load(nf)));
  const v128_t r_hi = wasm_f64x2_add(wasm_v128_load(o + 2), wasm_f64x2_div(t_hi, wasm_v128_load(nf + 2)));
  const v128_t lo = wasm_f32x4_demote_f64x2_zero(r_lo), hi = wasm_f32x4_demote_f64x2_zero(r_hi);
  return wasm_i32x4_shuffle(lo, hi, 0, 1, 4, 5);
}

EXPORT(bn_relu_pool)
void bn_relu_pool(const float* x, const float* mean, const float* var, const float* scale, const float* offset,
                  float eps, int exact, void* scratch, float* y, int* win, int H, int W, int C, int OH, int OW,
                  int b_begin, int b_end) {
  double* nf = (double*)scratch;
  double* o = nf + C;
  float* m = (float*)(o + C);
  float* s = m + C;
  for (int c = 0; c < C; ++c) {
    nf[c] = (double)__builtin_sqrtf(var[c] + eps);
    m[c] = mean[c];
    s[c] = scale[c];
    o[c] = (double)offset[c];
  }
  // training: m holds k and s holds offset - mean * k
  if (!exact) {
    for (int c = 0; c < C; ++c) {
      const float k = scale[c] / __builtin_sqrtf(var[c] + eps);
      m[c] = k;
      s[c] = offset[c] - mean[c] * k;
    }
  }
  const v128_t zero = wasm_f32x4_splat(0.0f), none = wasm_i32x4_splat(-1);
  const v128_t lane = wasm_i32x4_make(0, 1, 2, 3);
  for (int b = b_begin; b < b_end; ++b) {
    for (int oh = 0; oh < OH; ++oh) {
      for (int ow = 0; ow < OW; ++ow) {
        const long out = ((long)(b * OH + oh) * OW + ow) * C;
        int c = 0;
        for (; c + 4 <= C; c += 4) {
          v128_t best = wasm_f32x4_splat(-__builtin_inff()), at = none;
          if (exact) {
            BRP_WINDOW(bn_exact4(xv, m + c, s + c, o + c, nf + c))
          } else {
            const v128_t k = wasm_v128_load(m + c), d = wasm_v128_load(s + c);
            BRP_WINDOW(wasm_f32x4_add(wasm_f32x4_mul(xv, k), d))
          }
          // relu_f32's rule: keep where > 0 or NaN
          const v128_t pos = wasm_f32x4_gt(best, zero);
          wasm_v128_store(y + out + c, wasm_v128_and(best, wasm_v128_or(pos, wasm_f32x4_ne(best, best))));
          if (win) wasm_v128_store(win + out + c, wasm_v128_bitselect(at, none, pos));
        }
        for (; c < C; ++c) {
          float best = -__builtin_inff();
          int at = -1;
          for (int i = 0; i < 2; ++i) {
            for (int j = 0; j < 2; ++j) {
              const int off = ((b * H + 2 * oh + i) * W + 2 * ow + j) * C + c;
              const float z = exact ? (float)(o[c] + (double)((x[off] - m[c]) * s[c]) / nf[c]) : x[off] * m[c] + s[c];
              if (z > best) {
                best = z;
                at = off;
              }
            }
          }
          y[out + c] = (best > 0.0f || best != best) ? best : 0.0f;
          if (win) win[out + c] = best > 0.0f ? at : -1;
        }
      }
    }
  }
}

/*
 * bn_relu_pool's gradient, first pass: the two per-channel sums of bn_grad_sums, of the gradient that
 * max-pool and ReLU hand to the batchnorm, without writing that gradient out: it is dy at each window's
 * winner (win >= 0) and 0 elsewhere. Over pooled rows [r_begin, r_end) (a row: one (b, oh, ow)), into
 * this part's own out: s1 in [0, C), s2 = sum of dy * (x[win] - mean) in [C, 2C). The caller adds the
 * parts in part order (sum_parts), a fixed number of them, so the bits never depend on the thread count.
 */
EXPORT(bn_relu_pool_sums)
void bn_relu_pool_sums(const float* x, const float* dy, const int* win, const float* mean, float* out, int C,
                       int r_begin, int r_end) {
  float* o1 = out;
  float* o2 = out + C;
  __builtin_memset(out, 0, (unsigned long)(2 * C) * sizeof(float));
  const v128_t zero = wasm_i32x4_splat(0);
  const int br = block_rows(3 * C);
  for (int r0 = r_begin; r0 < r_end; r0 += br) {
    const int r1 = r0 + br < r_end ? r0 + br : r_end;
    int c = 0;
    // Branch-free: a loser's lane adds dy & 0 = 0 and 0 * (x[0] - mean), which leaves the sums' values as they are.
    for (; c + 4 <= C; c += 4) {
      v128_t s1 = wasm_v128_load(o1 + c), s2 = wasm_v128_load(o2 + c);
      const v128_t m = wasm_v128_load(mean + c);
      for (long r = r0; r < r1; ++r) {
        const v128_t w = wasm_v128_load(win + r * C + c);
        const v128_t pos = wasm_i32x4_ge(w, zero);
        const v128_t g = wasm_v128_and(wasm_v128_load(dy + r * C + c), pos);
        const v128_t i = wasm_v128_and(w, pos);
        const v128_t xw = wasm_f32x4_make(x[wasm_i32x4_extract_lane(i, 0)], x[wasm_i32x4_extract_lane(i, 1)],
                                          x[wasm_i32x4_extract_lane(i, 2)], x[wasm_i32x4_extract_lane(i, 3)]);
        s1 = wasm_f32x4_add(s1, g);
        s2 = wasm_f32x4_add(s2, wasm_f32x4_mul(g, wasm_f32x4_sub(xw, m)));
      }
      wasm_v128_store(o1 + c, s1);
      wasm_v128_store(o2 + c, s2);
    }
    for (; c < C; ++c) {
      float s1 = o1[c], s2 = o2[c];
      for (long r = r0; r < r1; ++r) {
        const int at = win[r * C + c];
        const float g = at >= 0 ? dy[r * C + c] : 0.0f;
        s1 += g;
        s2 += g * (x[at >= 0 ? at : 0] - mean[c]);
      }
      o1[c] = s1;
      o2[c] = s2;
    }
  }
}

/*
 * bn_relu_pool's gradient, second pass: dx for images [b_begin, b_end), with coef from bn_backward_coef.
 * bn_backward's formula, k*g - (a + (x - mean)*b), with g = dy at the winners and 0 elsewhere (the very
 * operations bn_backward runs on the zeros it is handed), window by window: every dx element is written
 * once, without branches. The rows and columns no window covers (odd sizes) get g = 0.
 */
#define BRP_TAIL(off, c, g) dx[off] = k[c] * (g) - (a[c] + (x[off] - mean[c]) * bc[c])

EXPORT(bn_relu_pool_backward)
void bn_relu_pool_backward(const float* x, const float* dy, const int* win, const float* mean, const float* coef,
                           float* dx, int H, int W, int C, int OH, int OW, int b_begin, int b_end) {
  const float* k = coef;
  const float* a = coef + C;
  const float* bc = coef + 2 * C;
  const v128_t lane = wasm_i32x4_make(0, 1, 2, 3);
  for (int b = b_begin; b < b_end; ++b) {
    for (int oh = 0; oh < OH; ++oh) {
      for (int ow = 0; ow < OW; ++ow) {
        const long r = ((long)(b * OH + oh) * OW + ow) * C;
        int c = 0;
        for (; c + 4 <= C; c += 4) {
          const v128_t g = wasm_v128_load(dy + r + c), w = wasm_v128_load(win + r + c);
          const v128_t kc = wasm_v128_load(k + c), ac = wasm_v128_load(a + c), bcc = wasm_v128_load(bc + c);
          const v128_t m = wasm_v128_load(mean + c);
          for (int i = 0; i < 2; ++i) {
            for (int j = 0; j < 2; ++j) {
              const int off = ((b * H + 2 * oh + i) * W + 2 * ow + j) * C + c;
              const v128_t gi = wasm_v128_and(g, wasm_i32x4_eq(w, wasm_i32x4_add(wasm_i32x4_splat(off), lane)));
              const v128_t t = wasm_f32x4_add(ac, wasm_f32x4_mul(wasm_f32x4_sub(wasm_v128_load(x + off), m), bcc));
              wasm_v128_store(dx + off, wasm_f32x4_sub(wasm_f32x4_mul(kc, gi), t));
            }
          }
        }
        for (; c < C; ++c) {
          for (int i = 0; i < 2; ++i) {
            for (int j = 0; j < 2; ++j) {
              const int off = ((b * H + 2 * oh + i) * W + 2 * ow + j) * C + c;
              BRP_TAIL(off, c, win[r + c] == off ? dy[r + c] : 0.0f);
            }
          }
        }
      }
    }
    // Not pooled: the last row and column of an odd side.
    for (int h = 0; h < H; ++h) {
      for (int w = h < 2 * OH ? 2 * OW : 0; w < W; ++w) {
        for (int c = 0; c < C; ++c) BRP_TAIL(((b * H + h) * W + w) * C + c, c, 0.0f);
      }
    }
  }
}

/* out[0..n) = 0 (memory.fill). */
EXPORT(zero_fill)
void zero_fill(float* out, int n) { __builtin_memset(out, 0, (unsigned long)n * sizeof(float)); }

/*
 * Filter gradient of a 2-D convolution (NHWC input, HWIO filter):
 *   dw[kh,kw,ci,co] = sum over b,oh,ow of x[b, oh*sh+kh-pt, ow*sw+kw-pl, ci] * dy[b,oh,ow,co]
 * (positions in the padding contribute nothing). A register-blocked GEMM:
 * for each output row (b, oh) and tap (kh, kw), a tile of 4 input channels
 * by 8 output channels (8 accumulator vectors) runs along the row, one
 * broadcast x value times one dy vector per step. The rows involved stay in
 * L1; dw (the accumulators' home) is read and written once per row and tile.
 * Requires co % 4 == 0 (the caller falls back otherwise).
 *
 * Part: images [b_begin, b_end), summed into this part's own dw, which it
 * zeroes first. Splitting the output channels instead made two threads write
 * into the same cache lines (dw rows of a few channels) on every row, and a
 * second core then gave nothing; the caller adds the parts' dw in part order.
 */
#define FG_STEP(N_CI)                                                         \
  for (int ow = ow0; ow < ow1; ++ow) {                                        \
    const float* xp = xrow + (ow * sw + kw - pl) * CI + ci0;                  \
    const float* gp = grow + ow * CO + co0;                                   \
    const v128_t g0 = wasm_v128_load(gp), g1 = wasm_v128_load(gp + 4);        \
    v128_t s;                                                                 \
    s = wasm_f32x4_splat(xp[0]);                                              \
    a00 = wasm_f32x4_add(a00, wasm_f32x4_mul(s, g0));                         \
    a01 = wasm_f32x4_add(a01, wasm_f32x4_mul(s, g1));                         \
    if (N_CI > 1) {                                                           \
      s = wasm_f32x4_splat(xp[1]);                                            \
      a10 = wasm_f32x4_add(a10, wasm_f32x4_mul(s, g0));                       \
      a11 = wasm_f32x4_add(a11, wasm_f32x4_mul(s, g1));                       \
    }                                                                         \
    if (N_CI > 2) {                                                           \
      s = wasm_f32x4_splat(xp[2]);                                            \
      a20 = wasm_f32x4_add(a20, wasm_f32x4_mul(s, g0));                       \
      a21 = wasm_f32x4_add(a21, wasm_f32x4_mul(s, g1));                       \
    }                                                                         \
    if (N_CI > 3) {                                                           \
      s = wasm_f32x4_splat(xp[3]);                                            \
      a30 = wasm_f32x4_add(a30, wasm_f32x4_mul(s, g0));                       \
      a31 = wasm_f32x4_add(a31, wasm_f32x4_mul(s, g1));                       \
    }                                                                         \
  }

#define FG_STEP4(N_CI)                                                        \
  for (int ow = ow0; ow < ow1; ++ow) {                                        \
    const float* xp = xrow + (ow * sw + kw - pl) * CI + ci0;                  \
    const v128_t g0 = wasm_v128_load(grow + ow * CO + co0);                   \
    a00 = wasm_f32x4_add(a00, wasm_f32x4_mul(wasm_f32x4_splat(xp[0]), g0));   \
    if (N_CI > 1) a10 = wasm_f32x4_add(a10, wasm_f32x4_mul(wasm_f32x4_splat(xp[1]), g0)); \
    if (N_CI > 2) a20 = wasm_f32x4_add(a20, wasm_f32x4_mul(wasm_f32x4_splat(xp[2]), g0)); \
    if (N_CI > 3) a30 = wasm_f32x4_add(a30, wasm_f32x4_mul(wasm_f32x4_splat(xp[3]), g0)); \
  }

EXPORT(conv2d_filter_grad)
void conv2d_filter_grad(const float* x, const float* dy, float* dw, int H, int W, int CI, int OH, int OW, int CO,
                        int KH, int KW, int sh, int sw, int pt, int pl, int b_begin, int b_end) {
  const int co_begin = 0, co_end = CO;
  __builtin_memset(dw, 0, (unsigned long)KH * KW * CI * CO * sizeof(float));
  for (int b = b_begin; b < b_end; ++b) {
    for (int oh = 0; oh < OH; ++oh) {
      const float* grow = dy + (long)(b * OH + oh) * OW * CO;
      for (int kh = 0; kh < KH; ++kh) {
        const int r = oh * sh + kh - pt;
        if (r < 0 || r >= H) continue;
        const float* xrow = x + (long)(b * H + r) * W * CI;
        for (int kw = 0; kw < KW; ++kw) {
          // ow such that 0 <= ow*sw + kw - pl < W
          int ow0 = pl - kw > 0 ? (pl - kw + sw - 1) / sw : 0;
          int ow1 = (W - 1 + pl - kw) >= 0 ? (W - 1 + pl - kw) / sw + 1 : 0;
          if (ow1 > OW) ow1 = OW;
          if (ow0 >= ow1) continue;
          float* wtap = dw + (long)(kh * KW + kw) * CI * CO;
          for (int ci0 = 0; ci0 < CI; ci0 += 4) {
            const int nci = CI - ci0 < 4 ? CI - ci0 : 4;
            float* w0 = wtap + (long)ci0 * CO;
            int co0 = co_begin;
            for (; co0 + 8 <= co_end; co0 += 8) {
              float* p = w0 + co0;
              v128_t a00 = wasm_v128_load(p), a01 = wasm_v128_load(p + 4);
              v128_t a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
              if (nci > 1) { a10 = wasm_v128_load(p + CO); a11 = wasm_v128_load(p + CO + 4); }
              if (nci > 2) { a20 = wasm_v128_load(p + 2 * CO); a21 = wasm_v128_load(p + 2 * CO + 4); }
              if (nci > 3) { a30 = wasm_v128_load(p + 3 * CO); a31 = wasm_v128_load(p + 3 * CO + 4); }
              if (nci == 4) { FG_STEP(4) } else if (nci == 3) { FG_STEP(3) } else if (nci == 2) { FG_STEP(2) } else { FG_STEP(1) }
              wasm_v128_store(p, a00); wasm_v128_store(p + 4, a01);
              if (nci > 1) { wasm_v128_store(p + CO, a10); wasm_v128_store(p + CO + 4, a11); }
              if (nci > 2) { wasm_v128_store(p + 2 * CO, a20); wasm_v128_store(p + 2 * CO + 4, a21); }
              if (nci > 3) { wasm_v128_store(p + 3 * CO, a30); wasm_v128_store(p + 3 * CO + 4, a31); }
            }
            for (; co0 + 4 <= co_end; co0 += 4) {
              float* p = w0 + co0;
              v128_t a00 = wasm_v128_load(p), a10 = a00, a20 = a00, a30 = a00;
              if (nci > 1) a10 = wasm_v128_load(p + CO);
              if (nci > 2) a20 = wasm_v128_load(p + 2 * CO);
              if (nci > 3) a30 = wasm_v128_load(p + 3 * CO);
              if (nci == 4) { FG_STEP4(4) } else if (nci == 3) { FG_STEP4(3) } else if (nci == 2) { FG_STEP4(2) } else { FG_STEP4(1) }
              wasm_v128_store(p, a00);
              if (nci > 1) wasm_v128_store(p + CO, a10);
              if (nci > 2) wasm_v128_store(p + 2 * CO, a20);
              if (nci > 3) wasm_v128_store(p + 3 * CO, a30);
            }
          }
        }
      }
    }
  }
}

/*
 * One register tile shared by the convolutions below: NP pixels (1..4) by NV vectors of 4 channels
 * (1..2). D: the first pixel's accumulators (pixels DS floats apart), loaded, accumulated, stored back;
 * A: the first pixel's broadcast values (AS floats apart); F: the first filter vector, FS floats per
 * step of K. One mul and one add per product, in k order: the order each kernel's comment states.
 */
#define GEMM_TILE(NP, NV, D, DS, A, AS, F, FS, K)                                                       \
  {                                                                                                     \
    float* d = (D);                                                                                     \
    v128_t c00 = wasm_v128_load(d), c01 = NV > 1 ? wasm_v128_load(d + 4) : c00;                         \
    v128_t c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;                            \
    if (NP > 1) { c10 = wasm_v128_load(d + (DS)); if (NV > 1) c11 = wasm_v128_load(d + (DS) + 4); }     \
    if (NP > 2) { c20 = wasm_v128_load(d + 2 * (DS)); if (NV > 1) c21 = wasm_v128_load(d + 2 * (DS) + 4); } \
    if (NP > 3) { c30 = wasm_v128_load(d + 3 * (DS)); if (NV > 1) c31 = wasm_v128_load(d + 3 * (DS) + 4); } \
    const float* a = (A);                                                                               \
    const float* f = (F);                                                                               \
    for (int k = 0; k < (K); ++k, f += (FS)) {                                                          \
      const v128_t f0 = wasm_v128_load(f), f1 = NV > 1 ? wasm_v128_load(f + 4) : f0;                    \
      v128_t s = wasm_f32x4_splat(a[k]);                                                                \
      c00 = wasm_f32x4_add(c00, wasm_f32x4_mul(s, f0));                                                 \
      if (NV > 1) c01 = wasm_f32x4_add(c01, wasm_f32x4_mul(s, f1));                                     \
      if (NP > 1) {                                                                                     \
        s = wasm_f32x4_splat(a[(AS) + k]);                                                              \
        c10 = wasm_f32x4_add(c10, wasm_f32x4_mul(s, f0));                                               \
        if (NV > 1) c11 = wasm_f32x4_add(c11, wasm_f32x4_mul(s, f1));                                   \
      }                                                                                                 \
      if (NP > 2) {                                                                                     \
        s = wasm_f32x4_splat(a[2 * (AS) + k]);                                                          \
        c20 = wasm_f32x4_add(c20, wasm_f32x4_mul(s, f0));                                               \
        if (NV > 1) c21 = wasm_f32x4_add(c21, wasm_f32x4_mul(s, f1));                                   \
      }                                                                                                 \
      if (NP > 3) {                                                                                     \
        s = wasm_f32x4_splat(a[3 * (AS) + k]);                                                          \
        c30 = wasm_f32x4_add(c30, wasm_f32x4_mul(s, f0));                                               \
        if (NV > 1) c31 = wasm_f32x4_add(c31, wasm_f32x4_mul(s, f1));                                   \
      }                                                                                                 \
    }                                                                                                   \
    wasm_v128_store(d, c00); if (NV > 1) wasm_v128_store(d + 4, c01);                                   \
    if (NP > 1) { wasm_v128_store(d + (DS), c10); if (NV > 1) wasm_v128_store(d + (DS) + 4, c11); }     \
    if (NP > 2) { wasm_v128_store(d + 2 * (DS), c20); if (NV > 1) wasm_v128_store(d + 2 * (DS) + 4, c21); } \
    if (NP > 3) { wasm_v128_store(d + 3 * (DS), c30); if (NV > 1) wasm_v128_store(d + 3 * (DS) + 4, c31); } \
  }

/*
 * Input gradient of a stride-1 2-D convolution (NHWC, HWIO filter):
 *   dx[b,h,w,ci] = sum over kh,kw,co of dy[b, h+pt-kh, w+pl-kw, co] * f[kh,kw,ci,co]
 * (dy positions outside [0,OH) x [0,OW) contribute nothing). `ft` is the
 * filter transposed to [KH,KW,CO,CI] so that input channels are contiguous.
 * Register-blocked like conv2d_filter_grad: for each input row (b, h) and
 * tap, tiles of 4 pixels by 8 input channels (8 accumulators) run over the
 * output channels, one broadcast dy value times one filter vector per step;
 * dx is the accumulators' home. Requires ci % 4 == 0.
 */
#define IG_TILE(NP, NV) \
  GEMM_TILE(NP, NV, dxrow + w * CI + ci0, CI, dyrow + (w + pl - kw) * CO, CO, ftap + ci0, CI, CO)

EXPORT(conv2d_input_grad)
void conv2d_input_grad(const float* dy, const float* ft, float* dx, int B, int H, int W, int CI, int OH, int OW, int CO,
                       int KH, int KW, int pt, int pl, int b_begin, int b_end) {
  // Part: images [b_begin, b_end).
  __builtin_memset(dx + (long)b_begin * H * W * CI, 0, (unsigned long)(b_end - b_begin) * H * W * CI * sizeof(float));
  for (int b = b_begin; b < b_end; ++b) {
    for (int h = 0; h < H; ++h) {
      float* dxrow = dx + (long)(b * H + h) * W * CI;
      for (int kh = 0; kh < KH; ++kh) {
        const int r = h + pt - kh;
        if (r < 0 || r >= OH) continue;
        const float* dyrow = dy + (long)(b * OH + r) * OW * CO;
        for (int kw = 0; kw < KW; ++kw) {
          // w such that 0 <= w + pl - kw < OW
          const int w0 = kw - pl > 0 ? kw - pl : 0;
          const int w1 = OW + kw - pl < W ? OW + kw - pl : W;
          if (w0 >= w1) continue;
          const float* ftap = ft + (long)(kh * KW + kw) * CO * CI;
          int ci0 = 0;
          for (; ci0 + 8 <= CI; ci0 += 8) {
            int w = w0;
            for (; w + 4 <= w1; w += 4) IG_TILE(4, 2)
            for (; w < w1; ++w) IG_TILE(1, 2)
          }
          for (; ci0 + 4 <= CI; ci0 += 4) {
            int w = w0;
            for (; w + 4 <= w1; w += 4) IG_TILE(4, 1)
            for (; w < w1; ++w) IG_TILE(1, 1)
          }
        }
      }
    }
  }
}

/*
 * Filter gradient of a depthwise 2-D convolution with channel multiplier 1
 * (NHWC input, filter [KH,KW,C,1]):
 *   dw[kh,kw,c] = sum over b,oh,ow of x[b, oh*sh+kh-pt, ow*sw+kw-pl, c] * dy[b,oh,ow,c]
 * For each output row and tap, 16 channels (4 accumulators) run along the
 * row. Part: images [b_begin, b_end) into this part's own dw, which it zeroes
 * first (as conv2d_filter_grad, and for the same reason).
 */
EXPORT(depthwise_filter_grad)
void depthwise_filter_grad(const float* x, const float* dy, float* dw, int H, int W, int C, int OH, int OW,
                           int KH, int KW, int sh, int sw, int pt, int pl, int b_begin, int b_end) {
  const int c_begin = 0, c_end = C;
  __builtin_memset(dw, 0, (unsigned long)KH * KW * C * sizeof(float));
  for (int b = b_begin; b < b_end; ++b) {
    for (int oh = 0; oh < OH; ++oh) {
      const float* grow = dy + (long)(b * OH + oh) * OW * C;
      for (int kh = 0; kh < KH; ++kh) {
        const int r = oh * sh + kh - pt;
        if (r < 0 || r >= H) continue;
        const float* xrow = x + (long)(b * H + r) * W * C;
        for (int kw = 0; kw < KW; ++kw) {
          int ow0 = pl - kw > 0 ? (pl - kw + sw - 1) / sw : 0;
          int ow1 = (W - 1 + pl - kw) >= 0 ? (W - 1 + pl - kw) / sw + 1 : 0;
          if (ow1 > OW) ow1 = OW;
          if (ow0 >= ow1) continue;
          float* wt = dw + (long)(kh * KW + kw) * C;
          int c = c_begin;
          for (; c + 16 <= c_end; c += 16) {
            v128_t a0 = wasm_v128_load(wt + c), a1 = wasm_v128_load(wt + c + 4);
            v128_t a2 = wasm_v128_load(wt + c + 8), a3 = wasm_v128_load(wt + c + 12);
            for (int ow = ow0; ow < ow1; ++ow) {
              const float* xp = xrow + (ow * sw + kw - pl) * C + c;
              const float* gp = grow + ow * C + c;
              a0 = wasm_f32x4_add(a0, wasm_f32x4_mul(wasm_v128_load(xp), wasm_v128_load(gp)));
              a1 = wasm_f32x4_add(a1, wasm_f32x4_mul(wasm_v128_load(xp + 4), wasm_v128_load(gp + 4)));
              a2 = wasm_f32x4_add(a2, wasm_f32x4_mul(wasm_v128_load(xp + 8), wasm_v128_load(gp + 8)));
              a3 = wasm_f32x4_add(a3, wasm_f32x4_mul(wasm_v128_load(xp + 12), wasm_v128_load(gp + 12)));
            }
            wasm_v128_store(wt + c, a0); wasm_v128_store(wt + c + 4, a1);
            wasm_v128_store(wt + c + 8, a2); wasm_v128_store(wt + c + 12, a3);
          }
          for (; c + 4 <= c_end; c += 4) {
            v128_t a = wasm_v128_load(wt + c);
            for (int ow = ow0; ow < ow1; ++ow)
              a = wasm_f32x4_add(a, wasm_f32x4_mul(wasm_v128_load(xrow + (ow * sw + kw - pl) * C + c), wasm_v128_load(grow + ow * C + c)));
            wasm_v128_store(wt + c, a);
          }
          for (; c < c_end; ++c) {
            float a = wt[c];
            for (int ow = ow0; ow < ow1; ++ow) a += xrow[(ow * sw + kw - pl) * C + c] * grow[ow * C + c];
            wt[c] = a;
          }
        }
      }
    }
  }
}

/*
 * Element-wise add (op 0), subtract (1), multiply (2) and divide (3) of float32 tensors, one IEEE operation per
 * element as tfjs-wasm's XNNPACK binary operators do (same bits), without their thread-pool
 * round trip: most of a training step's ~200 binary ops are small, and each XNNPACK call wakes
 * tfjs' pthreadpool. Modes: 0 same shape; 1 b is one value; 2 a is one value; 3 b is one row of C
 * values repeated (out[i] = a[i] op b[i % C]); 4 a is that row. Part: elements [begin, end), whole
 * rows of C in modes 3 and 4.
 */
#define BIN_LOOP(VOP, SOP)                                                              \
  switch (mode) {                                                                       \
    case 0: {                                                                           \
      int i = begin;                                                                    \
      for (; i + 4 <= end; i += 4)                                                      \
        wasm_v128_store(out + i, VOP(wasm_v128_load(a + i), wasm_v128_load(b + i)));    \
      for (; i < end; ++i) out[i] = a[i] SOP b[i];                                      \
      break;                                                                            \
    }                                                                                   \
    case 1: {                                                                           \
      const float s = b[0];                                                             \
      const v128_t sv = wasm_f32x4_splat(s);                                            \
      int i = begin;                                                                    \
      for (; i + 4 <= end; i += 4) wasm_v128_store(out + i, VOP(wasm_v128_load(a + i), sv)); \
      for (; i < end; ++i) out[i] = a[i] SOP s;                                         \
      break;                                                                            \
    }                                                                                   \
    case 2: {                                                                           \
      const float s = a[0];                                                             \
      const v128_t sv = wasm_f32x4_splat(s);                                            \
      int i = begin;                                                                    \
      for (; i + 4 <= end; i += 4) wasm_v128_store(out + i, VOP(sv, wasm_v128_load(b + i))); \
      for (; i < end; ++i) out[i] = s SOP b[i];                                         \
      break;                                                                            \
    }                                                                                   \
    case 3:                                                                             \
      for (int r = begin; r < end; r += C) {                                            \
        int c = 0;                                                                      \
        for (; c + 4 <= C; c += 4)                                                      \
          wasm_v128_store(out + r + c, VOP(wasm_v128_load(a + r + c), wasm_v128_load(b + c))); \
        for (; c < C; ++c) out[r + c] = a[r + c] SOP b[c];                              \
      }                                                                                 \
      break;                                                                            \
    default:                                                                            \
      for (int r = begin; r < end; r += C) {                                            \
        int c = 0;                                                                      \
        for (; c + 4 <= C; c += 4)                                                      \
          wasm_v128_store(out + r + c, VOP(wasm_v128_load(a + c), wasm_v128_load(b + r + c))); \
        for (; c < C; ++c) out[r + c] = a[c] SOP b[r + c];                              \
      }                                                                                 \
      break;                                                                            \
  }

EXPORT(binary_f32)
void binary_f32(int op, const float* a, const float* b, float* out, int mode, int C, int begin, int end) {
  if (op == 0) { BIN_LOOP(wasm_f32x4_add, +) }
  else if (op == 1) { BIN_LOOP(wasm_f32x4_sub, -) }
  else if (op == 2) { BIN_LOOP(wasm_f32x4_mul, *) }
  else { BIN_LOOP(wasm_f32x4_div, /) }
}

/*
 * ReLU's gradient, dy * step(x), in one pass: tfjs' gradient runs Step, then Multiply. step(x) is 1
 * for x > 0, NaN for NaN, else 0, so the products are the same bits. Part: elements [begin, end).
 */
EXPORT(relu_grad_f32)
void relu_grad_f32(const float* dy, const float* x, float* out, int begin, int end) {
  const v128_t zero = wasm_f32x4_splat(0.0f), one = wasm_f32x4_splat(1.0f);
  int i = begin;
  for (; i + 4 <= end; i += 4) {
    const v128_t v = wasm_v128_load(x + i);
    const v128_t step = wasm_v128_or(wasm_v128_and(wasm_f32x4_gt(v, zero), one), wasm_v128_and(wasm_f32x4_ne(v, v), v));
    wasm_v128_store(out + i, wasm_f32x4_mul(wasm_v128_load(dy + i), step));
  }
  for (; i < end; ++i) out[i] = dy[i] * (x[i] > 0.0f ? 1.0f : (x[i] != x[i] ? x[i] : 0.0f));
}

/* out = sqrt(x), IEEE-exact per element (Adam's sqrt(v)). Part: elements [begin, end). */
EXPORT(sqrt_f32)
void sqrt_f32(const float* x, float* out, int begin, int end) {
  int i = begin;
  for (; i + 4 <= end; i += 4) wasm_v128_store(out + i, wasm_f32x4_sqrt(wasm_v128_load(x + i)));
  for (; i < end; ++i) out[i] = __builtin_sqrtf(x[i]);
}

/*
 * out = max(x, 0) for float32, like tfjs-wasm's Relu (an XNNPACK clamp) minus its thread-pool
 * round trip. NaN stays NaN (x > 0 is false for NaN, so it is kept, as the clamp keeps it). Part:
 * elements [begin, end).
 */
EXPORT(relu_f32)
void relu_f32(const float* x, float* out, int begin, int end) {
  const v128_t zero = wasm_f32x4_splat(0.0f);
  int i = begin;
  for (; i + 4 <= end; i += 4) {
    const v128_t v = wasm_v128_load(x + i);
    // keep v where v > 0 or v is NaN (v != v); else 0
    const v128_t keep = wasm_v128_or(wasm_f32x4_gt(v, zero), wasm_f32x4_ne(v, v));
    wasm_v128_store(out + i, wasm_v128_and(v, keep));
  }
  for (; i < end; ++i) out[i] = (x[i] > 0.0f || x[i] != x[i]) ? x[i] : 0.0f;
}

/*
 * out = clamp(x, lo, hi) as XNNPACK's wasm SIMD clamp computes it (tfjs-wasm's ClipByValue; relu6
 * in MobileNet): pmax(lo, x) then pmin(hi, .), so a NaN becomes lo; without the thread-pool round
 * trip. Part: elements [begin, end).
 */
EXPORT(clip_f32)
void clip_f32(const float* x, float* out, float lo, float hi, int begin, int end) {
  const v128_t vlo = wasm_f32x4_splat(lo), vhi = wasm_f32x4_splat(hi);
  int i = begin;
  for (; i + 4 <= end; i += 4) {
    wasm_v128_store(out + i, wasm_f32x4_pmin(vhi, wasm_f32x4_pmax(vlo, wasm_v128_load(x + i))));
  }
  for (; i < end; ++i) {
    const float v = lo < x[i] ? x[i] : lo;
    out[i] = v < hi ? v : hi;
  }
}

/*
 * One Adam step for one variable, the very operations tfjs' AdamOptimizer runs as 14 separate
 * kernels (tfjs-core adam_optimizer.ts, 4.22), in the same order and each rounded to float32:
 *   m' = m*b1 + g*(1-b1);  v' = v*b2 + (g*g)*(1-b2)
 *   x' = ((m'/c1) / (sqrt(v'/c2) + eps)) * (-lr) + x,   c1 = 1 - b1^t, c2 = 1 - b2^t (read from memory)
 * hence the same bits (tests/backend.test.ts). Part: elements [begin, end).
 */
EXPORT(adam_f32)
void adam_f32(const float* x, const float* m, const float* v, const float* g, float* xo, float* mo, float* vo,
              const float* c1p, const float* c2p, float b1, float omb1, float b2, float omb2, float eps, float nlr,
              int begin, int end) {
  const float c1 = *c1p, c2 = *c2p;
  const v128_t B1 = wasm_f32x4_splat(b1), OB1 = wasm_f32x4_splat(omb1), B2 = wasm_f32x4_splat(b2);
  const v128_t OB2 = wasm_f32x4_splat(omb2), EPS = wasm_f32x4_splat(eps), NLR = wasm_f32x4_splat(nlr);
  const v128_t C1 = wasm_f32x4_splat(c1), C2 = wasm_f32x4_splat(c2);
  int i = begin;
  for (; i + 4 <= end; i += 4) {
    const v128_t gi = wasm_v128_load(g + i);
    const v128_t mi = wasm_f32x4_add(wasm_f32x4_mul(wasm_v128_load(m + i), B1), wasm_f32x4_mul(gi, OB1));
    const v128_t vi = wasm_f32x4_add(wasm_f32x4_mul(wasm_v128_load(v + i), B2), wasm_f32x4_mul(wasm_f32x4_mul(gi, gi), OB2));
    const v128_t den = wasm_f32x4_add(wasm_f32x4_sqrt(wasm_f32x4_div(vi, C2)), EPS);
    const v128_t step = wasm_f32x4_mul(wasm_f32x4_div(wasm_f32x4_div(mi, C1), den), NLR);
    wasm_v128_store(mo + i, mi);
    wasm_v128_store(vo + i, vi);
    wasm_v128_store(xo + i, wasm_f32x4_add(step, wasm_v128_load(x + i)));
  }
  for (; i < end; ++i) {
    const float gi = g[i];
    const float mi = m[i] * b1 + gi * omb1;
    const float vi = v[i] * b2 + (gi * gi) * omb2;
    mo[i] = mi;
    vo[i] = vi;
    xo[i] = ((mi / c1) / (__builtin_sqrtf(vi / c2) + eps)) * nlr + x[i];
  }
}

/*
 * Forward 2-D convolution, stride 1 (NHWC input, HWIO filter, optional bias):
 *   y[b,oh,ow,co] = bias[co] + sum over kh, kw, ci of x[b, oh+kh-pt, ow+kw-pl, ci] * f[kh,kw,ci,co]
 * accumulated from the bias in the order XNNPACK's igemm accumulates (taps row-major, then input
 * channels in order, one mul and one add per product), so the bits are XNNPACK's (tests/backend.test.ts):
 * tfjs-wasm runs this on its own thread pool, here it runs on ours. Padding taps are skipped, where
 * XNNPACK adds 0 * f: the same value. Tiles of 4 pixels by 8 output channels run over the input
 * channels; y is the accumulators' home across taps. Requires co % 4 == 0. Part: images [b_begin, b_end).
 */
#define FW_TILE(NP, NV) \
  GEMM_TILE(NP, NV, yrow + ow * CO + co0, CO, xrow + (ow + kw - pl) * CI, CI, ftap + co0, CO, CI)

EXPORT(conv2d_forward)
void conv2d_forward(const float* x, const float* f, const float* bias, float* y, int H, int W, int CI, int OH, int OW,
                    int CO, int KH, int KW, int pt, int pl, int b_begin, int b_end) {
  for (int b = b_begin; b < b_end; ++b) {
    for (int oh = 0; oh < OH; ++oh) {
      float* yrow = y + (long)(b * OH + oh) * OW * CO;
      for (int ow = 0; ow < OW; ++ow) {
        if (bias) __builtin_memcpy(yrow + ow * CO, bias, (unsigned long)CO * sizeof(float));
        else __builtin_memset(yrow + ow * CO, 0, (unsigned long)CO * sizeof(float));
      }
      for (int kh = 0; kh < KH; ++kh) {
        const int r = oh + kh - pt;
        if (r < 0 || r >= H) continue;
        const float* xrow = x + (long)(b * H + r) * W * CI;
        for (int kw = 0; kw < KW; ++kw) {
          // ow such that 0 <= ow + kw - pl < W
          const int ow0 = pl - kw > 0 ? pl - kw : 0;
          const int ow1 = W + pl - kw < OW ? W + pl - kw : OW;
          if (ow0 >= ow1) continue;
          const float* ftap = f + (long)(kh * KW + kw) * CI * CO;
          int co0 = 0;
          for (; co0 + 8 <= CO; co0 += 8) {
            int ow = ow0;
            for (; ow + 4 <= ow1; ow += 4) FW_TILE(4, 2)
            for (; ow < ow1; ++ow) FW_TILE(1, 2)
          }
          for (; co0 + 4 <= CO; co0 += 4) {
            int ow = ow0;
            for (; ow + 4 <= ow1; ow += 4) FW_TILE(4, 1)
            for (; ow < ow1; ++ow) FW_TILE(1, 1)
          }
        }
      }
    }
  }
}
