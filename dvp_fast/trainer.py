"""The optimisation step: Adamax with warm-up and cosine schedule, clipping, the non-finite-step
guard, the EMA of the weights, the training precision and the block-wise torch.compile.

`Trainer.step` never waits on the device: metrics accumulate there (`StepState`) and are
read by `read_metrics`, one sync per logging interval; a step whose loss or gradient is not
finite is undone on the device (weights, moments, EMA), so the loop never branches on a value.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from .config import TrainConfig
from .model import DVPVAE

# --- schedule, optimiser, EMA ------------------------------------------------------------------------
def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup_epochs`, times a cosine from lr to eta_min over `cosine_epochs`."""
    warmup = max(1.0, cfg.warmup_epochs * steps_per_epoch)
    period = max(1.0, cfg.cosine_epochs * steps_per_epoch)
    floor = cfg.eta_min / cfg.lr
    cosine = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(step / period, 1.0)))
    return min(1.0, (step + 1) / warmup) * cosine


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adamax (coupled weight decay) over the trainable weights, with its state created up front.

    Creating the moments before the first step lets a skipped first step be undone like
    any other; on CUDA the step counters live on the device (capturable) so nothing syncs.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    capturable = params[0].is_cuda
    opt = torch.optim.Adamax(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, foreach=True, capturable=capturable)
    for p in params:
        step = torch.zeros((), dtype=torch.float32, device=p.device if capturable else "cpu")
        opt.state[p] = {"step": step, "exp_avg": torch.zeros_like(p), "exp_inf": torch.zeros_like(p)}
    return opt


def _foreach_lerp_takes_a_tensor() -> bool:
    """Whether this torch has a _foreach_lerp_ overload whose weight is one tensor (no host sync).

    Calling it is no test: a 0-dim tensor also binds to the Scalar overload, through an
    `.item()` (a host sync on CUDA). So the schemas are read instead.
    """
    schemas = torch._C._jit_get_schemas_for_operator("aten::_foreach_lerp_")
    return any(arg.name == "weight" and str(arg.type) == "Tensor" for schema in schemas for arg in schema.arguments)


_FOREACH_LERP_TAKES_A_TENSOR = _foreach_lerp_takes_a_tensor()


class EMA:
    """Exponential moving average of the trainable weights, updated with one foreach lerp.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates (the classic
    TensorFlow ExponentialMovingAverage rule, as in timm and ema-pytorch): at 0.999 from
    the start, the average of a short run would still be about the initial weights (96% of
    them after 36 steps); from about 9,000 updates on it is the plain 0.999 average.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.source = [p for p in model.parameters() if p.requires_grad]
        self.target = [p for p, q in zip(self.model.parameters(), model.parameters()) if q.requires_grad]
        self.updates = torch.zeros((), device=self.source[0].device)  # on the device: no host sync

    def current_decay(self) -> torch.Tensor:
        return torch.clamp((1.0 + self.updates) / (10.0 + self.updates), max=self.decay)

    @torch.no_grad()
    def update(self, weight: torch.Tensor) -> None:
        """ema += (1 - decay_n) * weight * (param - ema); weight is 0 for a skipped step, else 1."""
        rate = weight * (1.0 - self.current_decay())
        self.updates += weight
        if _FOREACH_LERP_TAKES_A_TENSOR:
            torch._foreach_lerp_(self.target, self.source, rate)  # one multi-tensor kernel
        else:  # older torch: the same update in three foreach kernels
            delta = torch._foreach_sub(self.source, self.target)
            torch._foreach_mul_(delta, rate)
            torch._foreach_add_(self.target, delta)

    def sync_buffers(self, model: torch.nn.Module) -> None:
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


# --- the step ----------------------------------------------------------------------------------------------
def _dense(p: torch.Tensor) -> bool:
    return p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))


def attach_flat_grads(params: list[torch.Tensor]) -> torch.Tensor | None:
    """Make every parameter's .grad a view, in its own memory layout, of one flat zeroed buffer.

    Backward then accumulates into those views in place (zero_grad keeps them: set_to_none=False),
    so the skip guard can zero all gradients with one fill on the buffer instead of a cat of
    reshaped copies and a copy back, which for channels_last weights cost about two kernels per
    tensor. Returns the buffer, or None (the per-tensor path) if dtypes or devices differ or a
    weight is neither contiguous nor channels_last.
    """
    if not params or any(p.dtype != params[0].dtype or p.device != params[0].device or not _dense(p)
                         or p.grad is not None for p in params):
        return None
    flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    offset = 0
    for p in params:
        p.grad = flat.as_strided(p.shape, p.stride(), offset)
        offset += p.numel()
    return flat


@dataclass
class StepState:
    """Device-side counters, read only when logging."""

    sums: torch.Tensor  # [loss_bpd, -elbo nats, recon, kl, finite steps] over the logging interval
    grad_norm: torch.Tensor
    skipped: torch.Tensor  # total skipped steps
    consecutive: torch.Tensor  # skipped steps in a row

    @classmethod
    def zeros(cls, device) -> "StepState":
        z = lambda *s: torch.zeros(*s, device=device)
        return cls(z(5), z(()), z(()), z(()))


class Trainer:
    def __init__(self, model: DVPVAE, cfg: TrainConfig, steps_per_epoch: int, precision: str = "fp32",
                 ddp_model: torch.nn.Module | None = None):
        self.model, self.cfg, self.steps_per_epoch = model, cfg, steps_per_epoch
        self.precision = precision  # "fp32" or "bf16" (autocast), for the forward of training and evaluation
        self.net = ddp_model if ddp_model is not None else model  # what the forward goes through
        self.device = model.device
        self.optimizer = make_optimizer(model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, steps_per_epoch, cfg))
        self.ema = EMA(model, cfg.ema_decay)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._flat_grad = attach_flat_grads(self.params)
        self.state = StepState.zeros(self.device)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        self._backup: list[torch.Tensor] | None = None

    def step(self, x: torch.Tensor) -> None:
        """One optimisation step on batch x, without a host sync."""
        self.optimizer.zero_grad(set_to_none=False)
        with self.autocast:
            out = self.net(x)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip, foreach=True)
        ok = torch.isfinite(out.loss.detach()) & torch.isfinite(grad_norm)
        self._sanitize_grads(ok)
        backup = self._snapshot()
        self.optimizer.step()
        self.scheduler.step()
        self._restore_if_skipped(backup, ok.float())
        self.model.project_parameters_()
        self.ema.update(ok.float())
        self._accumulate(out, grad_norm, ok.float())

    def _sanitize_grads(self, ok: torch.Tensor) -> None:
        """Zero every gradient of a non-finite step (NaN * 0 is NaN, hence a fill, not a product)."""
        if self._flat_grad is not None:  # every gradient is a view of it: one kernel, no copies
            self._flat_grad.masked_fill_(ok.logical_not(), 0.0)
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        flat = torch.where(ok, torch.cat([g.reshape(-1) for g in grads]), 0.0)
        torch._foreach_copy_(grads, [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in grads]), grads)])

    def _stateful_tensors(self) -> list[torch.Tensor]:
        """Weights and Adamax moments: what a skipped step must leave untouched."""
        out = list(self.params)
        for p in self.params:
            st = self.optimizer.state.get(p, {})
            out += [st[k] for k in ("exp_avg", "exp_inf") if k in st]
        return out

    @torch.no_grad()  # a copy from the weights with grad on makes the backup a graph node, which grew every step
    def _snapshot(self) -> list[torch.Tensor]:
        tensors = self._stateful_tensors()
        if self._backup is None:
            self._backup = [t.detach().clone() for t in tensors]
        else:
            torch._foreach_copy_(self._backup, tensors)
        return self._backup

    def _restore_if_skipped(self, backup: list[torch.Tensor], ok: torch.Tensor) -> None:
        tensors = self._stateful_tensors()
        with torch.no_grad():
            delta = torch._foreach_sub(tensors, backup)
            torch._foreach_mul_(delta, ok)
            torch._foreach_add_(backup, delta)  # ok ? new : old
            torch._foreach_copy_(tensors, backup)

    def _accumulate(self, out, grad_norm: torch.Tensor, ok: torch.Tensor) -> None:
        st = self.state
        metrics = torch.stack([out.loss.detach().float(), -out.elbo.detach().float().mean(),
                               out.recon.detach().float().mean(), out.kl.detach().float().sum(1).mean()])
        st.sums[:4] += torch.where(ok.bool(), metrics, 0.0)
        st.sums[4] += ok
        st.grad_norm = grad_norm.detach()
        st.skipped += 1.0 - ok
        st.consecutive = (st.consecutive + 1.0) * (1.0 - ok)

    def read_metrics(self) -> dict:
        """Host-side view of the interval's metrics (one sync), and reset of the interval sums."""
        st = self.state
        values = torch.cat([st.sums, st.grad_norm.view(1), st.skipped.view(1), st.consecutive.view(1)]).tolist()
        st.sums.zero_()
        count = values[4]  # finite steps in the interval; with none, the means are NaN, not 0
        mean = (lambda v: v / count) if count else (lambda v: math.nan)
        return dict(loss=mean(values[0]), elbo=-mean(values[1]), recon=mean(values[2]), kl=mean(values[3]),
                    steps=count, grad_norm=values[5], skipped=int(values[6]), consecutive=int(values[7]))

    def state_dict(self) -> dict:
        return dict(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                    ema=self.ema.model.state_dict(), ema_updates=self.ema.updates.item(),
                    skipped=self.state.skipped.item())

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])
        self.ema.model.load_state_dict(sd["ema"])
        # A checkpoint from before the warm-up existed continues with the full decay.
        self.ema.updates.fill_(sd.get("ema_updates", 1e9))
        self.state.skipped.fill_(sd.get("skipped", 0.0))


# --- precision and compilation ---------------------------------------------------------------------
def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" on a CUDA device with bf16 support, else "fp32"; others unchanged. A CPU stays
    at fp32: bf16 autocast has not been measured faster on one (docs/training.md), and one without
    native bf16 instructions runs it several times slower (bf16_is_slow_here warns)."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def bf16_is_slow_here(precision: str, device: torch.device) -> bool:
    """bf16 on a CPU that oneDNN cannot run bf16 convolutions on natively (no AVX512-BF16 or AMX):
    they fall back to aten's slow convolution, measured 8x slower than fp32 on such a CPU."""
    return precision == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def compile_blocks(model: DVPVAE, cuda_graphs: bool = False) -> None:
    """Compile the repeated blocks one by one: short compile times, one graph per block class.

    cuda_graphs=True uses mode="reduce-overhead": inductor records each block's kernels
    (forward and backward) as CUDA graphs and replays them, removing launch overhead.
    dynamic=False: another input shape (an epoch's last, smaller batch; evaluation) gets a
    graph of its own with static shapes, never a recompile with dynamic ones.
    """
    mode = "reduce-overhead" if cuda_graphs else None
    # Only modules the model enters through __call__: Module.compile replaces that, so a module
    # reached through its methods (as the blocks once were, block.prior(...)) would stay eager.
    resnets = [block.resnet for block in model.blocks if not block.last]  # the bulk of block.update
    for module in [*model.encoder.scales, *model.blocks, *resnets]:
        module.compile(mode=mode, dynamic=False)
    if model.u_prior is not None and hasattr(model.u_prior, "unet"):
        model.u_prior.unet.compile(mode=mode, dynamic=False)
