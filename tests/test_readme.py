"""Every command in README.md and docs/*.md runs as written from a fresh clone: each
``mapdet`` command parses with the real CLI, names configs that exist and config keys that
exist; each ``python benchmarks/...`` / ``experiments/...`` script exists and accepts the
flags given; each Python block compiles, imports names that exist, and the loss block runs.
README's test command is the one CI runs (``.ci/run``). Cheap: nothing trains."""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

from mapdet.cli import build_parser
from mapdet.config import load_config

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _blocks(page: Path, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", page.read_text(), re.S | re.M)


def _commands(block: str) -> list[list[str]]:
    """The shell commands of a block: continuations joined, comments dropped, split at
    ``&&`` and ``;``."""
    text = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in text.splitlines():
        tokens = shlex.split(line, comments=True)
        cmd: list[str] = []
        for tok in [*tokens, "&&"]:
            if tok in ("&&", ";") or tok.endswith(";"):
                if tok.endswith(";") and tok != ";":
                    cmd.append(tok[:-1])
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(tok)
    return out


def _inline(page: Path) -> list[str]:
    """Commands quoted inline (`mapdet ...`, `python benchmarks/...`), except those
    abbreviated with "..." or placeholders in capitals."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    spans = re.findall(r"`((?:mapdet|python|bash) [^`]+)`", text.replace("\n", " "))
    return spans


def _all_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        for block in _blocks(page, "bash"):
            found += [(page.name, c) for c in _commands(block)]
    return found


COMMANDS = _all_commands()


def _mapdet_argv(cmd: list[str]) -> list[str] | None:
    """The arguments after ``mapdet`` (also ``.venv/bin/mapdet`` and ``torchrun ... -m
    mapdet``), or None."""
    for i, tok in enumerate(cmd):
        if tok.endswith("mapdet") and (i == 0 or cmd[i - 1] == "-m"):
            return cmd[i + 1:]
    return None


MAPDET = [(page, argv) for page, c in COMMANDS if (argv := _mapdet_argv(c)) is not None]
SCRIPTS = [(page, c) for page, c in COMMANDS
           if c[0] in ("python", "python3", "bash") and len(c) > 1
           and c[1].startswith(("benchmarks/", "experiments/"))]


def test_the_pages_have_commands():
    assert len(MAPDET) >= 15 and len(SCRIPTS) >= 10
    assert {page for page, _ in MAPDET} >= {"README.md", "usage.md", "own-data.md", "scale.md"}


@pytest.mark.parametrize("page, argv", MAPDET, ids=[f"{p}:{' '.join(a)[:60]}" for p, a in MAPDET])
def test_mapdet_command_parses_and_its_config_keys_exist(page, argv):
    args = build_parser().parse_args(argv)  # unknown flags or subcommands: SystemExit
    config = getattr(args, "config", None)
    if args.command == "demo" or config is None:
        overrides = list(getattr(args, "overrides", []) or [])
        if config is None and overrides:  # mode 2 eval takes no overrides
            pytest.fail(f"{page}: overrides without a config: {argv}")
        return
    if isinstance(config, Path):
        config = str(config)
    assert (REPO / config).is_file(), f"{page}: no config {config}"
    load_config(REPO / config, args.overrides)  # unknown keys or bad values: ConfigError


INLINE = [(page.name, c) for page in PAGES for span in _inline(page)
          for c in _commands(span.replace("...", ""))]


def _subcommand_flags() -> dict[str, set[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "train" in a.choices)
    return {name: {o for a in p._actions for o in a.option_strings}
            for name, p in sub.choices.items()}


@pytest.mark.parametrize("page, cmd", INLINE, ids=[f"{p}:{' '.join(c)[:60]}" for p, c in INLINE])
def test_inline_command_names_a_subcommand_flags_and_script_that_exist(page, cmd):
    """`mapdet eval --blame K` in running text: the subcommand and its flags exist; a script
    quoted inline exists and takes the flags quoted."""
    flags = {t for t in cmd if t.startswith("--")}
    if cmd[0] == "mapdet":
        known = _subcommand_flags()
        assert len(cmd) > 1 and cmd[1] in known, f"{page}: {cmd}"
        assert flags <= known[cmd[1]], f"{page}: {sorted(flags - known[cmd[1]])}"
        return
    script = REPO / cmd[1]
    assert script.is_file(), f"{page}: no {cmd[1]}"
    if script.suffix == ".py":
        assert flags <= _flags_of(script), f"{page}: {sorted(flags - _flags_of(script))}"


def _flags_of(script: Path) -> set[str]:
    return set(re.findall(r"""["'](--[a-z][a-z0-9-]*)["']""", script.read_text()))


@pytest.mark.parametrize("page, cmd", SCRIPTS, ids=[f"{p}:{' '.join(c)[:60]}" for p, c in SCRIPTS])
def test_script_exists_and_takes_its_flags(page, cmd):
    script = REPO / cmd[1]
    assert script.is_file(), f"{page}: no {cmd[1]}"
    if script.suffix != ".py":
        return
    unknown = {t.split("=")[0] for t in cmd[2:] if t.startswith("--")} - _flags_of(script)
    assert not unknown, f"{page}: {cmd[1]} has no {sorted(unknown)}"


def test_readme_test_command_is_what_ci_runs():
    install = _blocks(REPO / "README.md", "bash")[0]
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install -e ".[dev]"' in install and 'pip install -e ".[dev]"' in ci
    assert "python -m pytest -q -n 2" in install and "python -m pytest -q -n 2" in ci
    assert "pip install . && .venv/bin/mapdet demo" in install  # the plain install


PYTHON = [(page.name, i, b) for page in PAGES for i, b in enumerate(_blocks(page, "python"))]


@pytest.mark.parametrize("page, i, block", PYTHON, ids=[f"{p}:{i}" for p, i, _ in PYTHON])
def test_python_block_compiles_and_imports_exist(page, i, block):
    tree = ast.parse(block)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{page}: {node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)


def test_readme_loss_block_runs():
    """The ten lines of "MAPLoss in any detector", with a small detector's outputs."""
    torch = pytest.importorskip("torch")
    block = next(b for b in _blocks(REPO / "README.md", "python") if "MAPLoss(" in b)
    gen = torch.Generator().manual_seed(0)
    n, k = 40, 3
    corner = torch.rand(n, k, 2, generator=gen) * 50
    scope = {
        "class_logits": torch.randn(n, k + 1, generator=gen, requires_grad=True),
        "boxes": torch.cat([corner, corner + 5 + 20 * torch.rand(n, k, 2, generator=gen)], 2),
        "image_ids": torch.arange(n) % 2,
        "targets": [{"boxes": torch.tensor([[0.0, 0.0, 30.0, 30.0]]),
                     "labels": torch.tensor([b]), "difficult": torch.tensor([False])}
                    for b in range(2)],
    }
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102
    assert scope["loss"].ndim == 0 and 0.0 <= float(scope["loss"]) <= 1.0
    assert scope["class_logits"].grad is not None
