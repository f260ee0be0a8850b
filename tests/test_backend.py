"""The one dispatch point: what "auto" picks, explicit requests, and `use_backend`; the registry's table;
and the import structure of the package (no circles; nothing built at import).
"""
import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dvp_fast
from dvp_fast import ops
from dvp_fast.ops._backend import choose_backend


def test_use_backend_overrides_auto_only_inside_the_block():
    cpu = torch.device("cpu")
    default = choose_backend("dct_crop", "auto", cpu)
    assert default == ("cpp" if ops.backend_available("cpp") else "torch")
    with ops.use_backend("torch"):
        assert choose_backend("dct_crop", "auto", cpu) == "torch"
        with ops.use_backend("auto"):
            assert choose_backend("dct_crop", "auto", cpu) == default
        assert choose_backend("dct_crop", "auto", cpu) == "torch"
    assert choose_backend("dct_crop", "auto", cpu) == default


def test_use_backend_rejects_unknown_names_and_applies_explicit_checks():
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.use_backend("cuda"):
            pass
    cpu = torch.device("cpu")
    with ops.use_backend("triton"):
        if not ops.backend_available("triton"):
            with pytest.raises(RuntimeError, match="backend='triton' is not available"):
                choose_backend("dct_crop", "auto", cpu)
        elif ops._backend.triton_interpreting():  # the interpreter runs Triton on CPU tensors
            assert choose_backend("dct_crop", "auto", cpu) == "triton"
        else:
            with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors"):
                choose_backend("dct_crop", "auto", cpu)


def test_the_model_on_the_reference_path_matches_auto():
    from dvp_fast import DVPVAE

    model = DVPVAE.from_preset("mnist")
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    torch.manual_seed(3)
    auto = model(x).elbo
    torch.manual_seed(3)
    with ops.use_backend("torch"):
        reference = model(x).elbo
    torch.testing.assert_close(auto, reference, rtol=1e-4, atol=1e-2)


def test_the_models_gradients_on_auto_match_the_reference_path():
    """With cpp built, auto runs the fused conv1x1 (SiLU inside, recomputed in backward) and the other
    fused ops; every parameter's gradient must match the pure-PyTorch path."""
    from dvp_fast import DVPVAE
    from helpers import SMALL

    model = DVPVAE.from_preset("mnist", **SMALL)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    grads = {}
    for backend in ("auto", "torch"):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        with ops.use_backend(backend):
            model(x).loss.backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["auto"].keys() == grads["torch"].keys()
    for name, g in grads["torch"].items():
        torch.testing.assert_close(grads["auto"][name], g, rtol=1e-3, atol=1e-4 * (g.abs().max().item() + 1e-3),
                                   msg=lambda m: f"{name}: {m}")


# --- the registry and the import structure -----------------------------------------------------------------
PACKAGE_DIR = Path(dvp_fast.__file__).resolve().parent


def test_every_listed_implementation_exists_and_loads():
    """The table names real functions, <op>_<backend> in the op's own modules, for every public op."""
    from dvp_fast.ops import _backend

    ops_listed = set(_backend.IMPLEMENTATIONS["torch"])
    for backend, listing in _backend.IMPLEMENTATIONS.items():
        assert set(listing) <= ops_listed, backend
        if not ops.backend_available(backend):
            continue
        for op, target in listing.items():
            module, name = target.split(":")
            assert name == f"{op}_{backend}" and module.lstrip(".").split("_")[0] in op, target
            assert _backend.implementation(op, backend) is getattr(importlib.import_module(module, "dvp_fast.ops"), name)


def test_mark_unavailable_and_reset():
    from dvp_fast.ops import _backend

    cpu = torch.device("cpu")
    before = _backend.availability("cpp")
    with _backend.backend_unavailable("cpp", "pinned by the test"):
        assert _backend.availability("cpp") == (False, "pinned by the test")
        assert choose_backend("dml_log_prob", "auto", cpu) == "torch"
        with pytest.raises(RuntimeError, match="backend='cpp' is not available: pinned by the test"):
            choose_backend("dml_log_prob", "cpp", cpu)
    assert _backend.availability("cpp") == before
    with pytest.raises(ValueError, match="must be 'triton' or 'cpp'"):
        _backend.mark_unavailable("torch", "no")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_modules() -> dict[str, Path]:
    """Every module of the package as it is laid out now (symlinked kernels/ and csrc/ included)."""
    found = {}
    for root, dirs, files in os.walk(PACKAGE_DIR, followlinks=True):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                found[_module_name(Path(root) / name)] = Path(root) / name
    return found


def _module_level_imports(tree: ast.Module):
    """Import statements that run when the module is imported: not those inside functions (they run
    later) nor under `if TYPE_CHECKING:` or `if __name__ == "__main__":` (never run on import)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and ("TYPE_CHECKING" in ast.unparse(node.test)
                                           or ast.unparse(node.test) == "__name__ == '__main__'"):
            stack.extend(node.orelse)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))


def _import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports at module level (relative imports resolved)."""
    modules = _package_modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _module_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = package.split(".")
                base = base[:len(base) - node.level + 1] if node.level else []
                source = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                           for alias in node.names]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a name inside a.b
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def _a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert _a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _a_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_module_of_the_package_imports_itself_in_a_circle():
    """A circle of module-level imports works or breaks with the order of first imports (a partially
    initialised module); imports inside functions do not count."""
    graph = _import_graph()
    assert "dvp_fast.ops._backend" in graph and graph["dvp_fast.ops.dct"] >= {"dvp_fast.ops._backend"}
    assert not graph["dvp_fast.ops._backend"] & {m for m in graph if m.startswith("dvp_fast.ops.")}, \
        "the registry imports none of the op modules: it lists them as data"
    cycle = _a_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


FRESH_IMPORT = """
import importlib, sys, time
from pathlib import Path
started = time.perf_counter()
import dvp_fast.ops
took = time.perf_counter() - started
assert not {"dvp_fast.ops.cpp_build", "dvp_fast.ops.cpp_launch"} & set(sys.modules), "import dvp_fast.ops loaded cpp"
assert not any(Path(sys.argv[1]).iterdir()), "import dvp_fast.ops wrote to the (empty) cache"
print(f"import dvp_fast.ops: {took:.2f} s")
"""


def test_importing_the_ops_builds_nothing(tmp_path):
    """The C++ kernels are built at the first use of the cpp backend, not at import."""
    env = {**os.environ, "DVP_FAST_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", FRESH_IMPORT, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_every_ops_module_imports_first_in_a_fresh_interpreter():
    """Each module of dvp_fast.ops imports on its own (no order of first imports is needed). The
    backends' modules need their backend: cpp's load the C++ library (from the cache the tests use)."""
    names = sorted(n for n in _package_modules() if n.startswith("dvp_fast.ops."))
    needs = {"_triton": "triton", "triton_launch": "triton", "_cpp": "cpp", "cpp_launch": "cpp"}
    runnable = [n for n in names if all(ops.backend_available(b) for key, b in needs.items() if key in n)]
    assert "dvp_fast.ops.dct" in runnable
    procs = {}
    for name in runnable:  # two at a time: cheap on a small machine
        procs[name] = subprocess.Popen([sys.executable, "-c", f"import {name}"], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
        if len(procs) % 2 == 0:
            for p in procs.values():
                p.wait()
    failed = {name: p.communicate()[1][-1500:] for name, p in procs.items() if p.wait() != 0}
    assert not failed, failed


TRACE_TIME_LOAD = """
import torch
from dvp_fast import ops
from dvp_fast.ops import _backend
assert not _backend._REGISTRY, "nothing is loaded before the first call"
x, scale = torch.rand(2, 3, 8, 8) * 2 - 1, torch.ones(3, 4, 4)
fn = torch.compile(lambda x: ops.dct_crop(x, scale, backend="torch"), backend="eager", fullgraph=True)
torch.testing.assert_close(fn(x), ops.dct_crop(x, scale, backend="torch"))
print("ok")
"""


@pytest.mark.slow
def test_a_backend_first_asked_for_inside_torch_compile_loads_without_a_graph_break():
    proc = subprocess.run([sys.executable, "-c", TRACE_TIME_LOAD], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
