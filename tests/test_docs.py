"""The documentation site: the command-line page is what the parsers print, and the site builds strictly."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "docs"))
import gen_cli  # noqa: E402  docs/gen_cli.py


def _options(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


def test_the_command_line_page_is_what_the_parsers_print():
    """Byte for byte under the Python the page was generated with; on another (argparse's layout changes
    between versions), every command and option is still there and nothing else is."""
    with open(gen_cli.PAGE) as f:
        page = f.read()
    generated = gen_cli.render()
    made_with = re.search(r"\(Python (\d+\.\d+)\)", page)
    if made_with and made_with.group(1) == f"{sys.version_info.major}.{sys.version_info.minor}":
        assert page == generated, "docs/cli.md is stale: run python docs/gen_cli.py"
    for name, module, function in gen_cli.COMMANDS:
        assert f"## {name}" in page
    assert _options(page) == _options(generated), "docs/cli.md is stale: run python docs/gen_cli.py"


def test_a_new_option_makes_the_page_stale(monkeypatch):
    """Seen failing: an option a parser gains and the page lacks."""
    real = gen_cli.help_text
    monkeypatch.setattr(gen_cli, "help_text", lambda m, f: real(m, f) + "  --a-new-option  NEW\n")
    with open(gen_cli.PAGE) as f:
        assert _options(f.read()) != _options(gen_cli.render())


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                    reason='mkdocs is not installed (pip install -e ".[docs]")')
def test_the_site_builds_strictly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("from_preset") > 0
