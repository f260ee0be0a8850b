"""Triton kernels for the discretized mixture of logistics over 8-bit RGB, in the reference form of
dvp_fast/ops/dml.py: log-scales hard-clamped to [-8, 1], interior bins log(max(mass, 1e-10)), the
first and last level the whole left and right tail.

`params` is (B, 10 M, H, W): channels [0, M) are the mixture logits, then for
each colour channel ch in (R, G, B) a block of 3 M channels starting at
M + 3 M ch: means [0, M), raw log-scales [M, 2 M), raw coefficients [2 M, 3 M).
A program owns BLOCK_P pixels of one image and all M components, as a
(M_PAD, BLOCK_P) tile whose rows are contiguous pixel runs (coalesced loads).

dml_log_prob_kernel reads `params` once and writes per-program partial sums of
log p(x) (summed afterwards on the host side of the graph, deterministically)
and, when WANT_GRAD, d log p / d params for every element: the backward pass of
the op is then a scale of that tensor by the incoming per-image gradient.
"""
import contextlib
import os

import triton
import triton.language as tl

# tl.constexpr so that @triton.jit functions may read them (the interpreter does not enforce this).
LOG_SCALE_MIN = tl.constexpr(-8.0)
LOG_SCALE_MAX = tl.constexpr(1.0)
HALF_BIN = tl.constexpr(1.0 / 255.0)
EDGE = tl.constexpr(0.999)  # |x| above this is the first or last of the 256 levels
MASS_FLOOR = tl.constexpr(1e-10)  # interior bins: log(max(mass, MASS_FLOOR)), no gradient below it
# Integer arguments are never specialised (a 1-pixel image or a single block would otherwise be a
# separate variant of Triton's JIT), so `compile_configs` lists every variant.
_jit = triton.jit(do_not_specialize=["num_pixels", "num_blocks"])
_jit_sample = triton.jit(do_not_specialize=["num_pixels"])
# Launch configurations, "pixels per program x warps". Registers of dml_log_prob_kernel with the
# gradient (M = 10, fp32) in the sm_90 cubin, read with Triton's cuobjdump, no local memory (spills)
# in any: triton 3.6: 64x4 179, 64x8 143, 32x4 141; triton 3.8: 168, 139, 108
# (tests/test_kernels_compile.py measures and checks it). At 179 registers 64x4 fits two
# 4-warp programs per SM, 32x4 three: the default stays until a GPU measurement (the "triton 32x4"
# and "triton 64x8" rows of bench/run.py's dml_log_prob case) picks; DVP_FAST_DML_CONFIG picks one
# for a process. Every configuration here is compiled by tests/test_kernels_compile.py.
CONFIGS = {"64x4": (64, 4), "64x8": (64, 8), "32x4": (32, 4)}
DEFAULT_CONFIG = "64x4"
BLOCK_P_CHOICES = tuple(sorted({block for block, _ in CONFIGS.values()}))


_chosen: list[str] = []  # use_config's stack


def launch_config() -> tuple[int, int]:
    """(pixels per program, warps): use_config's choice, else DVP_FAST_DML_CONFIG, else DEFAULT_CONFIG."""
    name = _chosen[-1] if _chosen else os.environ.get("DVP_FAST_DML_CONFIG", DEFAULT_CONFIG)
    if name not in CONFIGS:
        raise ValueError(f"DVP_FAST_DML_CONFIG={name!r}: expected one of {sorted(CONFIGS)}")
    return CONFIGS[name]


@contextlib.contextmanager
def use_config(name: str):
    """Launch the DML kernels with configuration `name` inside the block (the benchmarks compare them)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown DML launch configuration {name!r}: expected one of {sorted(CONFIGS)}")
    _chosen.append(name)
    try:
        yield
    finally:
        _chosen.pop()


def padded_mix(num_mix: int) -> int:
    return max(2, triton.next_power_of_2(num_mix))


@triton.jit
def _bin_log_prob(x, mean, log_scale):
    """log P(bin of x | logistic(mean, e^log_scale)) and its derivatives (d/d mean, d/d log_scale).

    Branches as the fallback: left tail for bin 0, right tail for bin 255, elsewhere the bin mass
    floored at MASS_FLOOR (constant, so no derivatives, below it). Derivatives go through the
    selected branch only. The mass comes from the small tail sides sigmoid(-|plus|) and
    sigmoid(-|minus|), so a bin far in either tail keeps its digits; the three branches share one log.
    """
    centered = x - mean
    inv_s = tl.exp(-log_scale)
    plus = inv_s * (centered + HALF_BIN)
    minus = inv_s * (centered - HALF_BIN)
    e_plus = tl.exp(-tl.abs(plus))
    e_minus = tl.exp(-tl.abs(minus))
    t_plus = e_plus / (1.0 + e_plus)  # sigmoid(-|plus|)
    t_minus = e_minus / (1.0 + e_minus)  # sigmoid(-|minus|)
    mass = tl.where(minus >= 0.0, t_minus - t_plus, tl.where(plus <= 0.0, t_plus - t_minus, 1.0 - t_plus - t_minus))
    low = x < -EDGE
    high = x > EDGE
    use_mass = mass > MASS_FLOOR
    # log sigmoid(plus) = min(plus, 0) - log(1 + e^-|plus|) and log(1 - sigmoid(minus)) mirrored.
    log_arg = tl.where(low, 1.0 + e_plus, tl.where(high, 1.0 + e_minus, tl.maximum(mass, MASS_FLOOR)))
    log_val = tl.log(log_arg)
    lp = tl.where(low, tl.minimum(plus, 0.0) - log_val, tl.where(high, -tl.maximum(minus, 0.0) - log_val, log_val))
    # d log p / d plus and / d minus: sigmoid' / mass inside (sigmoid'(v) = t (1 - t) with t = sigmoid(-|v|)),
    # 1 - sigmoid(plus) on the left tail, -sigmoid(minus) on the right.
    inv_mass = 1.0 / tl.where(use_mass, mass, 1.0)
    g_plus = tl.where(use_mass, t_plus * (1.0 - t_plus) * inv_mass, 0.0)
    g_minus = tl.where(use_mass, -t_minus * (1.0 - t_minus) * inv_mass, 0.0)
    g_plus = tl.where(low, tl.where(plus >= 0.0, t_plus, 1.0 - t_plus), tl.where(high, 0.0, g_plus))
    g_minus = tl.where(low, 0.0, tl.where(high, -tl.where(minus >= 0.0, 1.0 - t_minus, t_minus), g_minus))
    # plus and minus are inv_s * (x - mean +- HALF_BIN): d / d mean = -inv_s, d / d log_scale = -self.
    d_mean = -inv_s * (g_plus + g_minus)
    d_log_scale = -plus * g_plus - minus * g_minus
    return lp, d_mean, d_log_scale


@triton.jit
def _load_rows(base_ptr, first_channel, ks, pix, mask, num_pixels):
    """params[first_channel + k, pix] for the tile's (k, pixel) grid, as fp32."""
    ptrs = base_ptr + (first_channel + ks[:, None]) * num_pixels + pix[None, :]
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_rows(base_ptr, first_channel, ks, pix, mask, num_pixels, value):
    tl.store(base_ptr + (first_channel + ks[:, None]) * num_pixels + pix[None, :], value, mask=mask)


@triton.jit
def _channel(p_base, ch, x, shift, ks, pix, mask, num_pixels, M: tl.constexpr):
    """One colour channel: (log p, d/d mean, d/d raw log-scale) per (k, pixel); `shift` is the coupling."""
    first = M + 3 * M * ch
    mean = _load_rows(p_base, first, ks, pix, mask, num_pixels) + shift
    raw_ls = _load_rows(p_base, first + M, ks, pix, mask, num_pixels)
    lp, d_mean, d_ls = _bin_log_prob(x[None, :], mean, tl.minimum(tl.maximum(raw_ls, LOG_SCALE_MIN), LOG_SCALE_MAX))
    # A hard clamp: no gradient outside the range, nor on its bounds (as torch.clamp).
    return lp, d_mean, tl.where((raw_ls > LOG_SCALE_MIN) & (raw_ls < LOG_SCALE_MAX), d_ls, 0.0)


@triton.jit
def _coefficients(p_base, ks, pix, mask, num_pixels, M: tl.constexpr):
    """tanh of the three coupling coefficients, each (M_PAD, BLOCK_P)."""
    c0 = _tanh(_load_rows(p_base, M + 2 * M, ks, pix, mask, num_pixels))
    c1 = _tanh(_load_rows(p_base, M + 3 * M + 2 * M, ks, pix, mask, num_pixels))
    c2 = _tanh(_load_rows(p_base, M + 6 * M + 2 * M, ks, pix, mask, num_pixels))
    return c0, c1, c2


@triton.jit
def _tanh(v):
    """tanh |v| = -expm1(-2|v|) / (2 + expm1(-2|v|)), with expm1 by Kahan's (u - 1) y / log(u).

    2 sigmoid(2 v) - 1 would lose most digits to cancellation for small |v|, and
    tl.math has no expm1 (libdevice's does not run under the interpreter).
    """
    y = -2.0 * tl.minimum(tl.abs(v), 20.0)  # tanh(20) is 1 in fp32
    u = tl.exp(y)
    exact = u == 1.0
    em1 = tl.where(exact, y, (u - 1.0) * y / tl.log(tl.where(exact, 0.5, u)))
    t = -em1 / (2.0 + em1)
    return tl.where(v < 0.0, -t, t)


@_jit
def dml_log_prob_kernel(x_ptr, p_ptr, partial_ptr, grad_ptr, num_pixels, num_blocks,
                        M: tl.constexpr, M_PAD: tl.constexpr, BLOCK_P: tl.constexpr, WANT_GRAD: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    pix = blk * BLOCK_P + tl.arange(0, BLOCK_P)
    ks = tl.arange(0, M_PAD)
    pix_ok = pix < num_pixels
    mask = (ks[:, None] < M) & pix_ok[None, :]
    x_base = x_ptr + b * 3 * num_pixels
    x_r = tl.load(x_base + pix, mask=pix_ok, other=0.0).to(tl.float32)
    x_g = tl.load(x_base + num_pixels + pix, mask=pix_ok, other=0.0).to(tl.float32)
    x_b = tl.load(x_base + 2 * num_pixels + pix, mask=pix_ok, other=0.0).to(tl.float32)
    p_base = p_ptr + b * 10 * M * num_pixels
    c0, c1, c2 = _coefficients(p_base, ks, pix, mask, num_pixels, M)
    lp_r, dm_r, dls_r = _channel(p_base, 0, x_r, 0.0, ks, pix, mask, num_pixels, M)
    lp_g, dm_g, dls_g = _channel(p_base, 1, x_g, c0 * x_r[None, :], ks, pix, mask, num_pixels, M)
    lp_b, dm_b, dls_b = _channel(p_base, 2, x_b, c1 * x_r[None, :] + c2 * x_g[None, :], ks, pix, mask,
                                 num_pixels, M)
    # log-softmax of the logits, then log-sum-exp over components of the joint.
    # Padded components get -inf (only by k, so out-of-range pixels stay finite and are masked later).
    logits = tl.where(ks[:, None] < M, _load_rows(p_base, 0, ks, pix, mask, num_pixels), float("-inf"))
    logit_max = tl.max(logits, axis=0)
    log_norm = logit_max + tl.log(tl.sum(tl.exp(logits - logit_max[None, :]), axis=0))
    joint = tl.where(mask, lp_r + lp_g + lp_b, 0.0) + logits - log_norm[None, :]
    joint_max = tl.max(joint, axis=0)
    log_px = joint_max + tl.log(tl.sum(tl.exp(joint - joint_max[None, :]), axis=0))
    tl.store(partial_ptr + b * num_blocks + blk, tl.sum(tl.where(pix_ok, log_px, 0.0), axis=0))
    if WANT_GRAD:
        # Responsibilities w_k = p(k | x) weight every component's gradient.
        resp = tl.exp(joint - log_px[None, :])
        prior = tl.exp(logits - log_norm[None, :])
        g_base = grad_ptr + b * 10 * M * num_pixels
        _store_rows(g_base, 0, ks, pix, mask, num_pixels, resp - prior)
        _store_channel_grads(g_base, 0, resp * dm_r, resp * dls_r, ks, pix, mask, num_pixels, M)
        _store_channel_grads(g_base, 1, resp * dm_g, resp * dls_g, ks, pix, mask, num_pixels, M)
        _store_channel_grads(g_base, 2, resp * dm_b, resp * dls_b, ks, pix, mask, num_pixels, M)
        # mu_G = m_G + c0 x_R and mu_B = m_B + c1 x_R + c2 x_G; tanh' = 1 - tanh^2.
        _store_rows(g_base, M + 2 * M, ks, pix, mask, num_pixels, resp * dm_g * x_r[None, :] * (1.0 - c0 * c0))
        _store_rows(g_base, 4 * M + 2 * M, ks, pix, mask, num_pixels,
                    resp * dm_b * x_r[None, :] * (1.0 - c1 * c1))
        _store_rows(g_base, 7 * M + 2 * M, ks, pix, mask, num_pixels,
                    resp * dm_b * x_g[None, :] * (1.0 - c2 * c2))


@triton.jit
def _store_channel_grads(g_base, ch, d_mean, d_log_scale, ks, pix, mask, num_pixels, M: tl.constexpr):
    first = M + 3 * M * ch
    _store_rows(g_base, first, ks, pix, mask, num_pixels, d_mean)
    _store_rows(g_base, first + M, ks, pix, mask, num_pixels, d_log_scale)


@triton.jit
def _pick(values, chosen):
    """values[k*, pixel] per pixel, for the one-hot (M_PAD, BLOCK_P) `chosen`."""
    return tl.sum(tl.where(chosen, values, 0.0), axis=0)


@triton.jit
def _logistic(seed, counter, location, log_scale, temperature):
    u = tl.minimum(tl.maximum(tl.rand(seed, counter), 1e-5), 1.0 - 1e-5)
    return location + temperature * tl.exp(log_scale) * (tl.log(u) - tl.log(1.0 - u))


@triton.jit
def _clamp1(v):
    return tl.minimum(tl.maximum(v, -1.0), 1.0)


@triton.jit
def _to_level(v):
    """Round v in [-1, 1] to the nearest of the 256 levels k / 127.5 - 1 (ties have probability 0)."""
    return tl.floor((v + 1.0) * 127.5 + 0.5) / 127.5 - 1.0


@_jit_sample
def dml_sample_kernel(p_ptr, seed_ptr, out_ptr, num_pixels, temperature,
                      M: tl.constexpr, M_PAD: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pix = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    ks = tl.arange(0, M_PAD)
    pix_ok = pix < num_pixels
    mask = (ks[:, None] < M) & pix_ok[None, :]
    p_base = p_ptr + b * 10 * M * num_pixels
    seed = tl.load(seed_ptr)
    # Philox counters: M_PAD Gumbel draws then 3 logistic draws per pixel, all distinct.
    counter = (b * num_pixels + pix) * (M_PAD + 3)
    u = tl.rand(seed, counter[None, :] + ks[:, None])
    u = tl.minimum(tl.maximum(u, 1e-5), 1.0 - 1e-5)
    logits = tl.where(ks[:, None] < M, _load_rows(p_base, 0, ks, pix, mask, num_pixels), float("-inf"))
    # Gumbel-max: one component per pixel, shared by the three channels; at temperature 0 no noise,
    # the most probable component (the fallback's rule).
    gumbel = tl.where(temperature > 0.0, -tl.log(-tl.log(u)), 0.0)
    chosen_k = tl.argmax(logits + gumbel, axis=0)
    chosen = ks[:, None] == chosen_k[None, :]
    c0, c1, c2 = _coefficients(p_base, ks, pix, mask, num_pixels, M)
    # Sequential coupling on the clamped (not yet rounded) values, as the fallback.
    x_r = _clamp1(_channel_sample(p_base, 0, chosen, seed, counter + M_PAD, temperature, ks, pix, mask,
                                  num_pixels, M))
    x_g = _channel_sample(p_base, 1, chosen, seed, counter + M_PAD + 1, temperature, ks, pix, mask, num_pixels, M)
    x_g = _clamp1(x_g + _pick(c0, chosen) * x_r)
    x_b = _channel_sample(p_base, 2, chosen, seed, counter + M_PAD + 2, temperature, ks, pix, mask, num_pixels, M)
    x_b = _clamp1(x_b + _pick(c1, chosen) * x_r + _pick(c2, chosen) * x_g)
    out_base = out_ptr + b * 3 * num_pixels
    tl.store(out_base + pix, _to_level(x_r), mask=pix_ok)
    tl.store(out_base + num_pixels + pix, _to_level(x_g), mask=pix_ok)
    tl.store(out_base + 2 * num_pixels + pix, _to_level(x_b), mask=pix_ok)


@triton.jit
def _channel_sample(p_base, ch, chosen, seed, counter, temperature, ks, pix, mask, num_pixels, M: tl.constexpr):
    """An unclamped logistic draw from the chosen component of one channel (before coupling)."""
    first = M + 3 * M * ch
    mean = _pick(_load_rows(p_base, first, ks, pix, mask, num_pixels), chosen)
    raw_ls = _load_rows(p_base, first + M, ks, pix, mask, num_pixels)
    log_scale = _pick(tl.minimum(tl.maximum(raw_ls, LOG_SCALE_MIN), LOG_SCALE_MAX), chosen)
    return _logistic(seed, counter, mean, log_scale, temperature)


KERNELS = (dml_log_prob_kernel, dml_sample_kernel)


def compile_configs(dtypes: tuple[str, ...] = ("fp32", "bf16", "fp16"), num_mixes: tuple[int, ...] = (10,)):
    """Every (kernel, signature, constexprs, num_warps) the dispatcher can launch for these num_mix values
    (num_mix is a user choice, compiled per value; every preset uses 10).

    `params` and the gradient carry the params' dtype; x (cast to fp32 by the
    wrapper: the 256 levels are not all exact in bf16), partial sums and samples are fp32.
    """
    special = {"x_ptr": "*fp32", "partial_ptr": "*fp32", "out_ptr": "*fp32", "seed_ptr": "*i64", "num_pixels": "i32",
               "num_blocks": "i32", "temperature": "fp32"}
    for dtype in dtypes:
        for num_mix in num_mixes:
            for block_p, num_warps in CONFIGS.values():
                base = {"M": num_mix, "M_PAD": padded_mix(num_mix), "BLOCK_P": block_p}
                for kernel, flags in ((dml_log_prob_kernel, ({"WANT_GRAD": False}, {"WANT_GRAD": True})),
                                      (dml_sample_kernel, ({},))):
                    for extra in flags:
                        consts = {**base, **extra}
                        sig = {n: "constexpr" if n in consts else special.get(n, f"*{dtype}")
                               for n in kernel.arg_names}
                        yield kernel, sig, consts, num_warps
