"""Every code block of README.md and of the documentation pages (docs/*.md) runs as written.

Python blocks run in order in one namespace; bash blocks run line by line through the entry
points' own `main` functions. Both run in a temporary folder that holds a tiny trained run at
runs/mnist-embedded, where the README's main job would have left one. Three kinds of line are
covered elsewhere and skipped here: `pip install` (CI installs exactly so), `pytest` (this
suite), and the main job itself (tests/test_main_job.py runs it as written). Slow commands run
at small sizes: a dvp-train line gets --max-steps 2 instead of its length, a dvp-eval line
--limit 4, a dvp-distill line 2 iterations on 64 teacher samples.
"""
import os
import re
import shlex

import pytest

import numpy as np

from dvp_fast.cli import eval_main, sample_main
from dvp_fast.data import load_images
from dvp_fast.distill_cli import distill_main
from dvp_fast.export import export_main
from dvp_fast.figures_cli import figures_main
from dvp_fast.train_cli import main as train_main

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")
PAGES = [README, *(os.path.join(DOCS, name) for name in sorted(os.listdir(DOCS)) if name.endswith(".md"))]
ENTRY_POINTS = {"dvp-train": train_main, "dvp-sample": sample_main, "dvp-eval": eval_main, "dvp-export": export_main,
                "dvp-distill": distill_main, "dvp-figures": figures_main}


def code_blocks(language: str, page: str = README) -> list[str]:
    with open(page) as f:
        text = f.read()
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def bash_commands() -> list[str]:
    """Commands of the bash blocks of every page, each once (a page may repeat the README's): comments
    dropped, backslash continuations joined."""
    commands = []
    for block in (b for page in PAGES for b in code_blocks("bash", page)):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return list(dict.fromkeys(commands))


def _smaller(argv: list[str]) -> list[str]:
    """The same command at a test's size."""
    name, args = argv[0], argv[1:]
    if name == "dvp-train":
        for flag in ("--epochs", "--max-steps"):
            if flag in args:
                i = args.index(flag)
                del args[i:i + 2]
        args += ["--max-steps", "2", "--no-progress"]
    if name == "dvp-eval" and "--limit" not in args:
        args += ["--limit", "4"]
    if name == "dvp-distill":
        args += ["--iterations", "2", "--batch-size", "16", "--teacher-samples", "64", "--no-progress"]
    if name == "dvp-figures":
        args += ["--n", "2", "--steps", "4", "--images", "2", "--draws", "2", "--au-images", "50"]
    return args


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with runs/mnist-embedded, a 2-step run of the main job's preset, and my_digits.npy,
    a user's (N, 28, 28) uint8 digits (600 of the embedded ones)."""
    folder = tmp_path_factory.mktemp("readme")
    np.save(folder / "my_digits.npy", load_images("embedded", "train")[:600, 0].numpy())
    run = str(folder / "runs" / "mnist-embedded")
    assert train_main(["--preset", "mnist", "--out", run, "--max-steps", "2", "--batch-size", "50",
                       "--no-progress"]) == 0
    return folder


def test_every_relative_link_of_the_readme_and_the_docs_exists():
    """A moved or archived file breaks no link: every relative link target (pictures included) exists."""
    broken = []
    for page in PAGES:
        with open(page) as f:
            for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", f.read()):
                if "://" not in target and not os.path.exists(os.path.join(os.path.dirname(page), target)):
                    broken.append(f"{os.path.basename(page)}: {target}")
    assert len(PAGES) > 1 and not broken, broken


def test_the_readme_has_code_to_run():
    assert code_blocks("python") and bash_commands()


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if code_blocks("python", p)], ids=os.path.basename)
def test_python_blocks_run_as_written(page, workdir, monkeypatch):
    """A page's Python blocks, in order, in one namespace."""
    monkeypatch.chdir(workdir)
    namespace = {"__name__": "__readme__"}
    for block in code_blocks("python", page):
        exec(compile(block, os.path.basename(page), "exec"), namespace)


@pytest.mark.slow
@pytest.mark.parametrize("command", bash_commands())
def test_bash_lines_run(command, workdir, monkeypatch):
    argv = shlex.split(command)
    if argv[0] == "pip" or argv[0] == "pytest":
        pytest.skip(f"{argv[0]}: run by .ci/run itself")
    if argv[0] == "dvp-train" and "runs/mnist-embedded" in argv:
        pytest.skip("the main job: tests/test_main_job.py runs it as written")
    assert argv[0] in ENTRY_POINTS, f"README bash line with a command no test runs: {command}"
    monkeypatch.chdir(workdir)
    assert ENTRY_POINTS[argv[0]](_smaller(argv)) == 0, command
