"""The Triton kernels compile for real GPUs, and torch.compile traces the ops without graph breaks.

1. Every kernel configuration the dispatcher can launch (tile sizes, dtypes, constexpr flags;
   listed by each kernel module's `compile_configs`) is compiled to cubin for sm_80 and sm_90
   with `triton.compile(..., target=GPUTarget("cuda", cc, 32))`. No GPU is needed, but the
   interpreter must be off (it replaces the JIT functions), so this file re-runs itself as a
   script in a subprocess without TRITON_INTERPRET. Every pointer is marked 16-byte aligned, as
   Triton's JIT marks fresh allocations and offset-0 contiguous tensors (the only other variant,
   an unaligned view, takes the plainer code path). Integer arguments are `do_not_specialize`d
   in the kernels, so no value-specialised variant exists.
2. The launches the ops actually make, recorded for model-like shapes, are all in that list.
3. `torch.compile(fullgraph=True)` of a function calling each op with backend="triton" compiles
   and matches eager, forward and backward (see test_torch_compile_fullgraph for what runs on CPU).
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from dvp_fast.ops import _backend

CAPABILITIES = (80, 90)
# num_mix values compiled for the DML kernels: every preset uses 10; 1 and 3 are the tests' odd sizes.
DML_MIXES = {("fp32", "bf16", "fp16"): (10,), ("fp32",): (1, 3)}


def kernel_configs():
    """[(module, index, kernel, signature, constexprs, num_warps)] over all kernel modules."""
    from dvp_fast.kernels import dct, dml, gaussian_kl

    listed = [(dct, list(dct.compile_configs())), (gaussian_kl, list(gaussian_kl.compile_configs()))]
    listed.append((dml, [c for dtypes, mixes in DML_MIXES.items() for c in dml.compile_configs(dtypes, mixes)]))
    return [(mod.__name__, i, *cfg) for mod, cfgs in listed for i, cfg in enumerate(cfgs)]


def _compile_one(job):
    """Compile one (config, capability) job; returns an error string or None."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    number, cc = job
    module, index, kernel, sig, consts, num_warps = kernel_configs()[number]
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names) if sig[name].startswith("*")}
    try:
        src = ASTSource(kernel, sig, consts, attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps})
        assert compiled.asm.get("cubin"), "no cubin produced"
    except Exception as exc:  # report every failure, not just the first
        return f"{module}.{kernel.__name__} {consts} {sig} sm_{cc}: {type(exc).__name__}: {exc}"[:2000]
    return None


def _compile_all() -> dict:
    jobs = [(n, cc) for n in range(len(kernel_configs())) for cc in CAPABILITIES]
    workers = max(1, min(len(os.sched_getaffinity(0)), 8))
    with ProcessPoolExecutor(workers) as pool:
        errors = [e for e in pool.map(_compile_one, jobs, chunksize=4) if e]
    return {"jobs": len(jobs), "errors": errors}


@pytest.mark.slow  # about 130 compilations; a minute or two on 2 cores
def test_every_kernel_configuration_compiles_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["TRITON_HOME"] = str(tmp_path)
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["jobs"] == len(CAPABILITIES) * len(kernel_configs()) > 0
    assert not result["errors"], "\n".join(result["errors"])


# --- the dispatcher only launches listed configurations ------------------------------------------------
def _type_of(arg) -> str:
    if isinstance(arg, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                      torch.int64: "i64", torch.int32: "i32"}[arg.dtype]
    if isinstance(arg, bool):
        return "i1"
    if isinstance(arg, int):
        return "i32" if -2 ** 31 <= arg < 2 ** 31 else "i64"
    if isinstance(arg, float):
        return "fp32"
    raise TypeError(type(arg))


def _listed_keys():
    return {(kernel.__name__, json.dumps(sig, sort_keys=True), json.dumps(consts, sort_keys=True), warps)
            for _, _, kernel, sig, consts, warps in kernel_configs()}


def _calls_over_every_choice(dev):
    """Each op in every dtype and flag combination, at small shapes (the interpreter is slow; which
    tile a size gets is checked over all sizes below)."""
    from dvp_fast import ops
    from dvp_fast.ops.dct import dct_scale_bound

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for c, size, d in ((1, 12, 5), (2, 28, 7)):
            x = (torch.rand(1, c, size, size, device=dev) * 2 - 1).to(dtype).requires_grad_()
            scale = dct_scale_bound(c, d, size).to(dev)
            ops.dct_crop(x, scale, backend="triton").sum().backward()
            u = torch.rand(1, c, d, d, device=dev).to(dtype).requires_grad_()
            ops.idct_pad(u, scale, size, backend="triton").sum().backward()
        layers = [[torch.randn(1, ch, r, r, device=dev, dtype=dtype).requires_grad_() for _ in range(4)]
                  for ch, r in ((1, 4), (3, 16))]
        for layer in layers:
            for noise in (None, torch.randn_like(layer[0])):
                z, kl = ops.gaussian_sample_kl(*layer, noise, backend="triton")
                (z.float().sum() + kl.sum()).backward()
        for group in (layers[:1], layers):
            zs, kl = ops.gaussian_sample_kl_grouped([tuple(layer) for layer in group], backend="triton")
            (sum(z.float().sum() for z in zs) + kl.sum()).backward()
        for num_mix, size in ((10, 4), (3, 3), (1, 3)):
            if dtype != torch.float32 and num_mix != 10:
                continue
            params = torch.randn(1, 10 * num_mix, size, size, device=dev, dtype=dtype).requires_grad_()
            x = torch.randint(0, 256, (1, 3, size, size), device=dev).float() / 127.5 - 1
            ops.dml_log_prob(x, params, num_mix, backend="triton").sum().backward()
            with torch.no_grad():
                ops.dml_log_prob(x, params, num_mix, backend="triton")
            ops.dml_sample(params, 1.0, num_mix, backend="triton")


@pytest.mark.slow
def test_dispatcher_launches_only_listed_configurations(monkeypatch):
    from dvp_fast import ops

    if not ops.backend_available("triton"):
        pytest.skip(f"triton backend not available: {_backend.availability('triton')[1]}")
    from dvp_fast.kernels import dct, dml, gaussian_kl
    from dvp_fast.ops import triton_launch

    launched = set()

    def recording_launch(kernel):
        def with_grid(grid):
            def call(*args, num_warps, **constexprs):
                sig = {name: _type_of(a) for name, a in zip(kernel.arg_names, args)}
                sig.update({name: "constexpr" for name in constexprs})
                launched.add((kernel.__name__, json.dumps(sig, sort_keys=True), json.dumps(constexprs, sort_keys=True),
                              num_warps))
                return kernel[grid](*args, num_warps=num_warps, **constexprs)
            return call
        return _Indexable(with_grid)

    monkeypatch.setattr(triton_launch, "launch", recording_launch)
    for config in dml.CONFIGS:  # every DML launch configuration a process can select
        monkeypatch.setenv("DVP_FAST_DML_CONFIG", config)
        _calls_over_every_choice("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("DVP_FAST_DML_CONFIG", "64x3")
    with pytest.raises(ValueError, match="DVP_FAST_DML_CONFIG='64x3': expected one of"):
        dml.launch_config()
    kernels_seen = {key[0] for key in launched}
    assert kernels_seen == {k.__name__ for k in (*dct.KERNELS, *gaussian_kl.KERNELS, *dml.KERNELS)}
    unlisted = launched - _listed_keys()
    assert not unlisted, f"launched but never compiled by the compile test: {sorted(unlisted)[:3]}"

    # The tile choosers, over every size, only return listed tiles.
    assert {dct.block_sizes(d, size) for size in range(1, dct.MAX_BLOCK + 1) for d in range(1, size + 1)} \
        == set(dct.all_block_sizes())
    assert {gaussian_kl.block_size(n) for n in range(1, 5000)} == set(gaussian_kl.BLOCK_CHOICES)
    assert dml.DEFAULT_CONFIG in dml.CONFIGS


def test_launches_run_on_their_tensors_device(monkeypatch):
    """Every launch is made inside torch.cuda.device(<its first tensor's device>): Triton launches on
    the current CUDA device, so a model on cuda:1 would otherwise launch on cuda:0. CUDA tensors on
    cuda:1 are fake tensors here (no GPU needed); CPU tensors (the interpreter) get no CUDA guard."""
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    from dvp_fast import ops

    if not ops.backend_available("triton"):
        pytest.skip(f"triton backend not available: {_backend.availability('triton')[1]}")
    from dvp_fast.ops import triton_launch

    current, entered, launched = [], [], []

    @contextlib.contextmanager
    def recording_device(device):
        entered.append(torch.device(device))
        current.append(torch.device(device))
        try:
            yield
        finally:
            current.pop()

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append((grid, current[-1] if current else None))

    monkeypatch.setattr(torch.cuda, "device", recording_device)
    monkeypatch.setattr(triton_launch, "wrap_triton", lambda kernel: kernel)  # the fake kernel is not a JITFunction
    with FakeTensorMode():
        x = torch.empty(4, device="cuda:1")
    triton_launch.launch(FakeKernel())[(2,)](x, 4, BLOCK=8, num_warps=4)
    assert launched == [((2,), torch.device("cuda:1"))], "the launch must be made inside torch.cuda.device(cuda:1)"
    assert current == []

    # CPU tensors (the interpreter): no CUDA guard, and the ops run as before.
    entered.clear()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        inputs = [torch.randn(2, 3, 4, 4).requires_grad_() for _ in range(4)]
        noise = torch.randn(2, 3, 4, 4)
        z, kl = ops.gaussian_sample_kl(*inputs, noise, backend="triton")
        grads = torch.autograd.grad(z.sum() + kl.sum(), inputs)
        z_fb, kl_fb = ops.gaussian_sample_kl(*inputs, noise, backend="torch")
        grads_fb = torch.autograd.grad(z_fb.sum() + kl_fb.sum(), inputs)
        for a, b in zip((z, kl, *grads), (z_fb, kl_fb, *grads_fb)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert entered == []


def test_auto_picks_triton_for_cuda_tensors():
    """The model calls every op with backend="auto": on CUDA that must be the kernels, even in a
    fresh process where nothing has imported the triton backend yet (registration is lazy)."""
    from dvp_fast import ops

    if not ops.backend_available("triton"):
        pytest.skip(f"triton backend not available: {_backend.availability('triton')[1]}")
    script = ("import torch\n"
              "from dvp_fast.ops._backend import choose_backend\n"
              "names = ['dct_crop', 'idct_pad', 'gaussian_sample_kl', 'gaussian_sample_kl_grouped',\n"
              "         'dml_log_prob', 'dml_sample']\n"
              "print(sorted({choose_backend(n, 'auto', torch.device('cuda')) for n in names}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "['triton']"


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    ("3.6.0", "2.4.0", True), ("3.6.0", "2.3.5", False), ("3.8.0", "2.4.6", False), ("3.10.1+git", "2.4.0", False),
    ("3.7.1", "3.0.0", True)])
def test_the_interpreter_skip_applies_only_to_triton_before_3_8_with_numpy_2_4(monkeypatch, triton_version,
                                                                               numpy_version, broken):
    import numpy
    import triton

    import conftest

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    problem = conftest._triton_interpreter_problem()
    assert bool(problem) == broken
    if broken:
        assert f"Triton {triton_version}'s interpreter fails with numpy {numpy_version}" in problem
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # compiled kernels on a GPU are not affected
    assert conftest._triton_interpreter_problem() is None


def test_the_installed_triton_runs_in_the_interpreter():
    """With the installed triton (3.8) and numpy nothing is skipped: the backend is available."""
    import numpy
    import triton

    import conftest

    if conftest._version(triton) < (3, 8) and conftest._version(numpy) >= (2, 4):
        pytest.skip(conftest.TRITON_INTERPRETER_PROBLEM or "old triton")
    assert conftest.TRITON_INTERPRETER_PROBLEM is None
    assert _backend.availability("triton") == (True, "")


class _Indexable:
    """kernel[grid] syntax for the recording launcher."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return self.fn(grid)


# --- torch.compile -----------------------------------------------------------------------------------
def _op_cases(dev):
    """name -> (fn of tensors returning a tuple of tensors, inputs that require grad or None)."""
    from dvp_fast import ops
    from dvp_fast.ops.dct import dct_scale_bound

    scale = dct_scale_bound(3, 5, 32).to(dev)
    layer = [torch.randn(2, 3, 8, 8, device=dev) for _ in range(4)]
    layers = [layer, [torch.randn(2, 3, 4, 4, device=dev) for _ in range(4)]]
    params = torch.randn(2, 100, 8, 8, device=dev)
    x8 = torch.randint(0, 256, (2, 3, 8, 8), device=dev).float() / 127.5 - 1
    return {
        "dct_crop": (lambda x: (ops.dct_crop(x, scale, backend="triton"),),
                     [torch.rand(2, 3, 32, 32, device=dev) * 2 - 1]),
        "idct_pad": (lambda u: (ops.idct_pad(u, scale, 32, backend="triton"),), [torch.rand(2, 3, 5, 5, device=dev)]),
        "gaussian_sample_kl": (lambda *t: ops.gaussian_sample_kl(*t, backend="triton"), layer),
        "gaussian_sample_kl_explicit_noise": (
            lambda *t: ops.gaussian_sample_kl(*t, torch.ones_like(t[0]), backend="triton"), layer),
        "gaussian_sample_kl_grouped": (
            lambda *t: (lambda zs, kl: (*zs, kl))(*ops.gaussian_sample_kl_grouped(
                [tuple(t[:4]), tuple(t[4:])], backend="triton")), layers[0] + layers[1]),
        "dml_log_prob": (lambda p: (ops.dml_log_prob(x8, p, 10, backend="triton"),), [params]),
        "dml_sample": (lambda p: (ops.dml_sample(p, 1.0, 10, backend="triton"),), [params]),
    }


# On a GPU the ops are triton_ops and inductor traces into the launches. On CPU (interpreter) they
# are opaque custom ops, so inductor would only add a C++ build of the glue around them:
# aot_eager exercises what matters here (Dynamo, fake tensors, AOTAutograd with register_autograd).
COMPILE_BACKEND = "inductor" if torch.cuda.is_available() else "aot_eager"


@pytest.mark.parametrize("name", ["dct_crop", "idct_pad", "gaussian_sample_kl", "gaussian_sample_kl_explicit_noise",
                                  "gaussian_sample_kl_grouped", "dml_log_prob", "dml_sample"])
def test_torch_compile_fullgraph(name):
    from dvp_fast import ops

    if not ops.backend_available("triton"):
        pytest.skip(f"triton backend not available: {_backend.availability('triton')[1]}")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    fn, inputs = _op_cases(dev)[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND)
    differentiable = name != "dml_sample"
    results = []
    # Inductor would draw the Philox seed (torch.randint) with its own RNG; use eager's so both runs match.
    with torch._inductor.config.patch(fallback_random=True):
        for f in (fn, compiled):
            leaves = [t.detach().clone().requires_grad_(differentiable) for t in inputs]
            torch.manual_seed(5)  # the same Philox seed for both runs
            outs = f(*leaves)
            grads = []
            if differentiable:
                weights = [torch.linspace(-1, 1, o.numel(), device=dev).view(o.shape).to(o.dtype) for o in outs]
                grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), leaves)
            results.append([t.detach() for t in (*outs, *grads)])
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)


def _dml_register_use() -> dict:
    """{config: (registers, local-memory bytes)} of dml_log_prob_kernel with the gradient, M = 10, fp32,
    on sm_90: the cubin Triton builds (with its own ptxas), read by the cuobjdump Triton ships. No GPU
    needed. Local memory is where spilled registers go."""
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dvp_fast.kernels import dml

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    kernel, usage = dml.dml_log_prob_kernel, {}
    for name, (block_p, num_warps) in dml.CONFIGS.items():
        sig, consts = next((sig, consts) for k, sig, consts, warps in dml.compile_configs(("fp32",), (10,))
                           if k is kernel and consts["WANT_GRAD"] and consts["BLOCK_P"] == block_p
                           and warps == num_warps)
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if sig[n].startswith("*")}
        compiled = triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps})
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(compiled.asm["cubin"])
        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        os.remove(f.name)
        usage[name] = (int(re.search(r"REG:(\d+)", text).group(1)), int(re.search(r"LOCAL:(\d+)", text).group(1)))
    return usage


@pytest.mark.slow
def test_no_dml_launch_configuration_spills_registers_on_sm90(tmp_path):
    """Issue 15 saw the DML gradient kernel at 255 registers with spills (triton 3.6). With the Triton
    installed here, no configuration the dispatcher may pick uses local memory (spills) on sm_90."""
    if not _backend.availability("triton")[0]:
        pytest.skip("triton is not importable")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, __file__, "--dml-registers"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    usage = json.loads(proc.stdout.strip().splitlines()[-1])
    print("dml_log_prob_kernel (gradient, M = 10) on sm_90, registers and local-memory bytes:", usage)
    assert usage and all(local == 0 for _, local in usage.values()), usage


if __name__ == "__main__":
    print(json.dumps(_dml_register_use() if "--dml-registers" in sys.argv else _compile_all()))
