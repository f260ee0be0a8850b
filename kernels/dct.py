"""Triton kernels for the DCT pseudo-input pair (Algorithms 1 and 2 of the paper).

One program per (b, c) plane. With A_d the first d rows of the orthonormal
DCT-II matrix of D points (passed in as a (d, D) fp32 tensor):
  dct_crop: y = clamp(A_d X01 A_d^T / S, -1, 1),  X01 = (x + 1) / 2
            dx = 1/2 A_d^T (dy * mask / S) A_d,   mask: where the clamp passes
  idct_pad: x = 2 clamp(A_d^T (u S) A_d, 0, 1) - 1
            du = S * A_d (2 dx * mask) A_d^T
Backward kernels recompute the pre-clamp values rather than storing a mask.
Tiles are padded to powers of two (>= 16, the smallest tl.dot tile) with zeros,
which the zero rows/columns of the padded basis keep out of every product.
All math and all pointers are fp32 (the wrapper casts bf16/fp16 tensors); tl.dot
runs in IEEE fp32 (no TF32), because the DCT is an orthonormal change of basis
whose error budget is set by the fp32 fallback.
"""
import triton
import triton.language as tl

# Integer arguments are never specialised (Triton's JIT would otherwise compile a separate
# variant whenever one equals 1, e.g. channels = 1 for greyscale), so the compiled variants
# are exactly the ones `compile_configs` lists.
_jit = triton.jit(do_not_specialize=["channels", "d", "size"])

# Largest padded image side the dispatcher hands to these kernels (a 64 x 64
# fp32 tile per program); larger images go to the fallback with a clear error.
MAX_BLOCK = 64
NUM_WARPS = 4


def block_sizes(d: int, size: int) -> tuple[int, int]:
    """(BLOCK_d, BLOCK_D): the padded tile sides for pseudo-input side d and image side D."""
    block_small = max(16, triton.next_power_of_2(d))
    block_large = max(16, triton.next_power_of_2(size))
    if block_large > MAX_BLOCK:
        raise ValueError(f"the Triton DCT kernels support image sides up to {MAX_BLOCK}, got {size}")
    return block_small, block_large


def all_block_sizes() -> list[tuple[int, int]]:
    """Every (BLOCK_d, BLOCK_D) that `block_sizes` can return (d <= D)."""
    sides = [s for s in (16, 32, 64) if s <= MAX_BLOCK]
    return [(small, large) for large in sides for small in sides if small <= large]


@triton.jit
def _tile(ptr, rows, cols, n_rows, n_cols, row_stride, other):
    """Load ptr[rows, cols] (row-major, `row_stride`) as fp32, `other` outside n_rows x n_cols."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=other).to(tl.float32)


@triton.jit
def _store_tile(ptr, rows, cols, n_rows, n_cols, row_stride, value):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + rows[:, None] * row_stride + cols[None, :], value, mask=mask)


@triton.jit
def _bases(basis_ptr, d, size, BLOCK_d: tl.constexpr, BLOCK_D: tl.constexpr):
    """(A_d, A_d^T) as zero-padded (BLOCK_d, BLOCK_D) and (BLOCK_D, BLOCK_d) tiles."""
    r_small = tl.arange(0, BLOCK_d)
    r_large = tl.arange(0, BLOCK_D)
    a = _tile(basis_ptr, r_small, r_large, d, size, size, 0.0)
    # A_d^T[n, k] = A_d[k, n]: the same tile read with swapped strides.
    mask_t = (r_large[:, None] < size) & (r_small[None, :] < d)
    a_t = tl.load(basis_ptr + r_small[None, :] * size + r_large[:, None], mask=mask_t, other=0.0)
    return a, a_t.to(tl.float32)


@triton.jit
def _crop_coefficients(x_ptr, basis_ptr, plane, d, size, BLOCK_d: tl.constexpr, BLOCK_D: tl.constexpr):
    """A_d ((x + 1) / 2) A_d^T of one plane, (BLOCK_d, BLOCK_d), zero outside d x d."""
    r_large = tl.arange(0, BLOCK_D)
    a, a_t = _bases(basis_ptr, d, size, BLOCK_d, BLOCK_D)
    # Padding with -1 maps to 0 after the affine, so the padded tile stays zero.
    x = _tile(x_ptr + plane * size * size, r_large, r_large, size, size, size, -1.0)
    x01 = (x + 1.0) * 0.5
    rows = tl.dot(a, x01, input_precision="ieee")
    return tl.dot(rows, a_t, input_precision="ieee")


@_jit
def dct_crop_fwd_kernel(x_ptr, basis_ptr, scale_ptr, y_ptr, channels, d, size,
                        BLOCK_d: tl.constexpr, BLOCK_D: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)  # b * C + c
    r_small = tl.arange(0, BLOCK_d)
    raw = _crop_coefficients(x_ptr, basis_ptr, plane, d, size, BLOCK_d, BLOCK_D)
    scale = _tile(scale_ptr + (plane % channels) * d * d, r_small, r_small, d, d, d, 1.0)
    y = tl.minimum(tl.maximum(raw / scale, -1.0), 1.0)
    _store_tile(y_ptr + plane * d * d, r_small, r_small, d, d, d, y)


@_jit
def dct_crop_bwd_kernel(x_ptr, basis_ptr, scale_ptr, dy_ptr, dx_ptr, channels, d, size,
                        BLOCK_d: tl.constexpr, BLOCK_D: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    r_small = tl.arange(0, BLOCK_d)
    r_large = tl.arange(0, BLOCK_D)
    raw = _crop_coefficients(x_ptr, basis_ptr, plane, d, size, BLOCK_d, BLOCK_D)
    scale = _tile(scale_ptr + (plane % channels) * d * d, r_small, r_small, d, d, d, 1.0)
    ratio = raw / scale
    # torch.clamp passes the gradient on the closed interval [-1, 1]; match it.
    passes = (ratio >= -1.0) & (ratio <= 1.0)
    dy = _tile(dy_ptr + plane * d * d, r_small, r_small, d, d, d, 0.0)
    # The 1/2 is the derivative of (x + 1) / 2.
    g = tl.where(passes, dy / scale, 0.0) * 0.5
    a, a_t = _bases(basis_ptr, d, size, BLOCK_d, BLOCK_D)
    cols = tl.dot(a_t, g, input_precision="ieee")
    dx = tl.dot(cols, a, input_precision="ieee")
    _store_tile(dx_ptr + plane * size * size, r_large, r_large, size, size, size, dx)


@triton.jit
def _padded_image(u_ptr, scale_ptr, basis_ptr, plane, channels, d, size,
                  BLOCK_d: tl.constexpr, BLOCK_D: tl.constexpr):
    """A_d^T (u S) A_d of one plane in [0, 1] units before the clamp, (BLOCK_D, BLOCK_D)."""
    r_small = tl.arange(0, BLOCK_d)
    u = _tile(u_ptr + plane * d * d, r_small, r_small, d, d, d, 0.0)
    scale = _tile(scale_ptr + (plane % channels) * d * d, r_small, r_small, d, d, d, 0.0)
    a, a_t = _bases(basis_ptr, d, size, BLOCK_d, BLOCK_D)
    cols = tl.dot(a_t, u * scale, input_precision="ieee")
    return tl.dot(cols, a, input_precision="ieee")


@_jit
def idct_pad_fwd_kernel(u_ptr, scale_ptr, basis_ptr, out_ptr, channels, d, size,
                        BLOCK_d: tl.constexpr, BLOCK_D: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    r_large = tl.arange(0, BLOCK_D)
    image01 = _padded_image(u_ptr, scale_ptr, basis_ptr, plane, channels, d, size, BLOCK_d, BLOCK_D)
    out = 2.0 * tl.minimum(tl.maximum(image01, 0.0), 1.0) - 1.0
    _store_tile(out_ptr + plane * size * size, r_large, r_large, size, size, size, out)


@_jit
def idct_pad_bwd_kernel(u_ptr, scale_ptr, basis_ptr, dout_ptr, du_ptr, channels, d, size,
                        BLOCK_d: tl.constexpr, BLOCK_D: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    r_small = tl.arange(0, BLOCK_d)
    r_large = tl.arange(0, BLOCK_D)
    image01 = _padded_image(u_ptr, scale_ptr, basis_ptr, plane, channels, d, size, BLOCK_d, BLOCK_D)
    passes = (image01 >= 0.0) & (image01 <= 1.0)
    dout = _tile(dout_ptr + plane * size * size, r_large, r_large, size, size, size, 0.0)
    g = tl.where(passes, 2.0 * dout, 0.0)
    a, a_t = _bases(basis_ptr, d, size, BLOCK_d, BLOCK_D)
    rows = tl.dot(a, g, input_precision="ieee")
    dv = tl.dot(rows, a_t, input_precision="ieee")  # gradient w.r.t. V = u * S
    scale = _tile(scale_ptr + (plane % channels) * d * d, r_small, r_small, d, d, d, 0.0)
    _store_tile(du_ptr + plane * d * d, r_small, r_small, d, d, d, dv * scale)


KERNELS = (dct_crop_fwd_kernel, dct_crop_bwd_kernel, idct_pad_fwd_kernel, idct_pad_bwd_kernel)


def compile_configs():
    """Every (kernel, signature, constexprs, num_warps) the dispatcher can launch.

    All pointers are fp32: the wrapper casts bf16/fp16 inputs (and gradients) to
    fp32 around these tiny launches, which keeps one compiled variant per tile.
    """
    for kernel in KERNELS:
        for block_small, block_large in all_block_sizes():
            sig = {name: "i32" if name in ("channels", "d", "size") else
                   "constexpr" if name.startswith("BLOCK") else "*fp32" for name in kernel.arg_names}
            yield kernel, sig, {"BLOCK_d": block_small, "BLOCK_D": block_large}, NUM_WARPS
