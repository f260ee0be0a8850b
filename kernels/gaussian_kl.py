"""Triton kernels for the reparameterised Gaussian sample and its analytic KL.

Per element, with q = N(mu_q, e^lv_q) and p = N(mu_p, e^lv_p):
    z  = mu_q + e^(lv_q / 2) eps
    kl = 1/2 (lv_p - lv_q + (e^lv_q + (mu_q - mu_p)^2) e^-lv_p - 1)
and kl is summed per (row, segment). The inputs are viewed as (B, row_len);
a segment is the whole row for one layer, or one layer's columns of the
concatenated rows in the grouped form (`GROUPED`, column offsets in offs_ptr).
One program per (row, segment) loops over the segment, so the per-row sum is
deterministic (no atomics) and z and kl come out of one pass.

When `HAS_NOISE` is false, eps is drawn in-kernel with Philox keyed by a seed
read from seed_ptr (a device tensor, so drawing it needs no host sync) and
counter = the element's flat index; the backward kernel regenerates the same
eps from the same seed instead of reading a stored copy.
"""
import triton
import triton.language as tl

NUM_WARPS = 4
# Integer arguments are never specialised (num_segments is 1 for a single layer, which Triton's
# JIT would otherwise compile as a separate variant), so `compile_configs` lists every variant.
_jit = triton.jit(do_not_specialize=["row_len", "num_segments"])
# One tile for every layer width: the op is launch-bound at the model's sizes (rows of 49 to
# 3,072 elements), so a second tile would only double the compiled variants.
BLOCK_CHOICES = (512,)


def block_size(segment_len: int) -> int:
    """Columns per loop step of one program (independent of the width for now; a hook for tuning)."""
    return BLOCK_CHOICES[0]


@triton.jit
def _segment(offs_ptr, seg, row_len, GROUPED: tl.constexpr):
    """[start, end) columns of this program's segment."""
    if GROUPED:
        start = tl.load(offs_ptr + seg)
        end = tl.load(offs_ptr + seg + 1)
    else:
        start = 0
        end = row_len
    return start, end


@triton.jit
def _noise(noise_ptr, seed_ptr, idx, mask, HAS_NOISE: tl.constexpr):
    if HAS_NOISE:
        eps = tl.load(noise_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        eps = tl.randn(tl.load(seed_ptr), idx)
    return eps


@triton.jit
def _load4(mu_q_ptr, lv_q_ptr, mu_p_ptr, lv_p_ptr, idx, mask):
    mu_q = tl.load(mu_q_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    lv_q = tl.load(lv_q_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    mu_p = tl.load(mu_p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    lv_p = tl.load(lv_p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    return mu_q, lv_q, mu_p, lv_p


@_jit
def sample_kl_fwd_kernel(mu_q_ptr, lv_q_ptr, mu_p_ptr, lv_p_ptr, noise_ptr, seed_ptr, offs_ptr,
                         z_ptr, kl_ptr, row_len, num_segments,
                         HAS_NOISE: tl.constexpr, GROUPED: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    start, end = _segment(offs_ptr, seg, row_len, GROUPED)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for col in range(start, end, BLOCK):
        cols = col + tl.arange(0, BLOCK)
        mask = cols < end
        idx = row * row_len + cols
        mu_q, lv_q, mu_p, lv_p = _load4(mu_q_ptr, lv_q_ptr, mu_p_ptr, lv_p_ptr, idx, mask)
        eps = _noise(noise_ptr, seed_ptr, idx, mask, HAS_NOISE)
        tl.store(z_ptr + idx, mu_q + tl.exp(0.5 * lv_q) * eps, mask=mask)
        diff = mu_q - mu_p
        kl = 0.5 * (lv_p - lv_q + (tl.exp(lv_q) + diff * diff) * tl.exp(-lv_p) - 1.0)
        acc += tl.where(mask, kl, 0.0)
    tl.store(kl_ptr + row * num_segments + seg, tl.sum(acc, axis=0))


@_jit
def sample_kl_bwd_kernel(mu_q_ptr, lv_q_ptr, mu_p_ptr, lv_p_ptr, noise_ptr, seed_ptr, offs_ptr,
                         dz_ptr, dkl_ptr, dmu_q_ptr, dlv_q_ptr, dmu_p_ptr, dlv_p_ptr, row_len, num_segments,
                         HAS_NOISE: tl.constexpr, GROUPED: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    start, end = _segment(offs_ptr, seg, row_len, GROUPED)
    dkl = tl.load(dkl_ptr + row * num_segments + seg).to(tl.float32)
    for col in range(start, end, BLOCK):
        cols = col + tl.arange(0, BLOCK)
        mask = cols < end
        idx = row * row_len + cols
        mu_q, lv_q, mu_p, lv_p = _load4(mu_q_ptr, lv_q_ptr, mu_p_ptr, lv_p_ptr, idx, mask)
        eps = _noise(noise_ptr, seed_ptr, idx, mask, HAS_NOISE)
        dz = tl.load(dz_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        diff = mu_q - mu_p
        inv_var_p = tl.exp(-lv_p)
        var_q = tl.exp(lv_q)
        # d kl / d mu_q = (mu_q - mu_p) / var_p; d z / d mu_q = 1.
        tl.store(dmu_q_ptr + idx, dz + dkl * diff * inv_var_p, mask=mask)
        tl.store(dmu_p_ptr + idx, -dkl * diff * inv_var_p, mask=mask)
        # d z / d lv_q = eps e^(lv_q / 2) / 2; d kl / d lv_q = (var_q / var_p - 1) / 2.
        dlv_q = 0.5 * (dz * tl.exp(0.5 * lv_q) * eps + dkl * (var_q * inv_var_p - 1.0))
        tl.store(dlv_q_ptr + idx, dlv_q, mask=mask)
        dlv_p = 0.5 * dkl * (1.0 - (var_q + diff * diff) * inv_var_p)
        tl.store(dlv_p_ptr + idx, dlv_p, mask=mask)


KERNELS = (sample_kl_fwd_kernel, sample_kl_bwd_kernel)


def compile_configs(dtypes: tuple[str, ...] = ("fp32", "bf16", "fp16")):
    """Every (kernel, signature, constexprs, num_warps) the dispatcher can launch.

    The four inputs, the noise, z and the four input gradients share the inputs'
    common dtype; kl and its gradient are fp32, the seed int64, the offsets int32.
    """
    special = {"seed_ptr": "*i64", "offs_ptr": "*i32", "kl_ptr": "*fp32", "dkl_ptr": "*fp32",
               "row_len": "i32", "num_segments": "i32"}
    for kernel in KERNELS:
        for dtype in dtypes:
            for has_noise in (False, True):
                for grouped in (False, True):
                    for block in BLOCK_CHOICES:
                        sig = {name: special.get(name, f"*{dtype}") for name in kernel.arg_names}
                        consts = {"HAS_NOISE": has_noise, "GROUPED": grouped, "BLOCK": block}
                        sig.update({name: "constexpr" for name in consts})
                        yield kernel, sig, consts, NUM_WARPS
