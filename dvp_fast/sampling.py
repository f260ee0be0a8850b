"""Fast sampling: the whole sampler as one CUDA graph, or torch.compile'd pieces off-GPU.

The sampler (`DVPVAE._sample`) has no host syncs: the diffusion coefficients are a
precomputed table indexed per step, noise is drawn on device, and the decoder's
generative pass is a pure function of pre-drawn noise. That makes two fast paths:
  * CUDA: capture `_sample` once per (n, steps, temperature, sampler) in a CUDA graph
    and replay it: one launch instead of ~50 x (UNet kernels) + decoder kernels;
  * elsewhere: torch.compile the per-step diffusion update and the generative pass.
"""
from __future__ import annotations

from collections import OrderedDict

import torch


class GraphedSampler:
    """`model._sample(n, temperature, steps, sampler)` captured as a CUDA graph.

    Replays read the current weights (they are captured by address), so training steps
    and load_state_dict are seen; a moved or replaced tensor is not, so the cache key holds
    every weight's and buffer's address (and the autocast state). Random draws differ at
    every replay.
    """

    def __init__(self, model, n: int, temperature: float, steps: int, sampler: str, warmup: int = 2):
        run = lambda: model._sample(n, temperature, steps, sampler)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: cuDNN plans, lazily built tables and bases
            for _ in range(warmup):
                run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = run()

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.output.clone()


MAX_GRAPHS = 4  # each captured graph keeps a private memory pool: an LRU bounds what they hold


def graph_key(model, n: int, temperature: float, steps: int, sampler: str) -> tuple:
    """Everything a captured sampler depends on: its arguments, the mode, the autocast state, and the
    address of every weight and buffer (a graph reads them by address; a moved or replaced tensor
    needs a new capture)."""
    device = model.device.type
    autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) if device in ("cuda", "cpu") \
        else None
    addresses = tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))
    return (n, float(temperature), steps, sampler, model.device, model.training, autocast, addresses)


def graphed_sampler(model, n: int, temperature: float, steps: int, sampler: str) -> GraphedSampler:
    """The cached capture for these arguments (least recently used evicted beyond MAX_GRAPHS)."""
    cache = model.__dict__.setdefault("_graph_cache", OrderedDict())
    key = graph_key(model, n, temperature, steps, sampler)
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    while len(cache) >= MAX_GRAPHS:
        cache.popitem(last=False)  # frees that graph and its memory pool
    cache[key] = GraphedSampler(model, n, temperature, steps, sampler)
    return cache[key]


def compiled_functions(model) -> dict:
    """torch.compile'd diffusion step and generative pass, made once per model."""
    cache = model.__dict__.get("_compiled_sampling")
    if cache is None:
        cache = {"prior_pass": torch.compile(model._top_down_prior, dynamic=False)}
        cache["diffusion_step"] = (torch.compile(model.u_prior.denoise_step, dynamic=False)
                                   if hasattr(model.u_prior, "denoise_step") else None)
        model.__dict__["_compiled_sampling"] = cache
    return cache
