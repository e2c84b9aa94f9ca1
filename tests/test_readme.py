"""README.md and docs/training.md are the user's manual: every command of their shell blocks and every Python
snippet runs as written, in order, in a fresh copy of the project (the files git tracks), as a new user would.

Only these change, and each says so when it runs: a training command gets ``--epochs 1`` (and ``--splits 2``
unless it names splits); ``MP_API_KEY`` and ``MP_API_ENDPOINT`` point at the local server of the Materials
Project API (tests/mp_server.py). Skipped, with the reason printed: the install commands (CI runs them before
the tests), the test command itself, and the scripts that train for hours or check out other commits (SKIPPED).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]
MANUALS = ("README.md", "docs/training.md")
SKIPPED = {  # the start of a command -> why it does not run here
    "pip install": "installs packages: CI runs the README's install before the tests",
    "python -m pytest": "the test suite itself",
    "python scripts/recipe_search.py --root runs/recipe_search --train": "trains the whole search (hours); "
    "tests/test_recipes.py runs its parts",
    "bash scripts/reproduce.sh": "the whole protocol at 300 epochs (days on a CPU); its train.py commands are the ones above",
    "AFLOW_EPOCHS=30 bash scripts/reproduce.sh": "the protocol with a 30-epoch AFLOW stage (hours)",
    "LAUNCH=": "the protocol under torchrun (days)",
    "python scripts/check_equivalence.py": "trains on two checked-out commits (about 15 min); run before a redesign lands",
}


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def without_comment(line: str) -> str:
    """``line`` as written, less a trailing ``# comment`` (a ``#`` inside quotes is kept)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip()
    return line.strip()


def commands(text: str) -> list[str]:
    """The commands of every ``bash`` block as written, comments dropped (a line ending in a backslash goes on)."""
    out = []
    for block in blocks(text, "bash"):
        out += [c for c in (without_comment(line) for line in block.replace("\\\n", " ").splitlines()) if c]
    return out


def quick(command: str) -> str:
    """A training command made short: one epoch, two splits unless it names its own."""
    if "train.py" not in command.split() or "--help" in command:
        return command
    extra = " --epochs 1" + ("" if "--splits" in command else " --splits 2")
    return command + extra


def skip_reason(command: str) -> str | None:
    return next((why for start, why in SKIPPED.items() if command.startswith(start)), None)


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory, shared) -> Path:
    """The files git tracks, copied to a new folder, with ``../shared`` beside it (as on a clean clone)."""
    base = tmp_path_factory.mktemp("readme")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (base / "project" / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, base / "project" / f)
    (base / "shared").symlink_to(SHARED)
    return base / "project"


def run_all(manual: str, folder: Path, env: dict[str, str]) -> list[str]:
    """Run the manual's commands, then its Python snippets, in ``folder``; the failures, each with its output."""
    text = (ROOT / manual).read_text()
    failures = []
    for command in commands(text):
        why = skip_reason(command)
        if why:
            print(f"{manual}: skipped `{command}`: {why}")
            continue
        if command.startswith("export "):
            name, _, value = command[len("export "):].partition("=")
            if name not in ("MP_API_KEY", "MP_API_ENDPOINT"):  # those stay the test server's
                env[name] = os.path.expandvars(value.strip("'\""))
            print(f"{manual}: `{command}`" + ("" if name not in ("MP_API_KEY",) else " (the test server's key instead)"))
            continue
        run = quick(command)
        print(f"{manual}: `{run}`")
        proc = subprocess.run(["bash", "-c", f"set -e; {run}"], cwd=folder, env=env, capture_output=True, text=True,
                              timeout=900)
        if proc.returncode != 0:
            failures.append(f"`{run}` exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    for i, snippet in enumerate(blocks(text, "python")):
        print(f"{manual}: Python snippet {i + 1}")
        proc = subprocess.run([sys.executable, "-c", snippet], cwd=folder, env=env, capture_output=True, text=True,
                              timeout=900)
        if proc.returncode != 0:
            failures.append(f"Python snippet {i + 1} exited {proc.returncode}:\n{snippet}\n{proc.stderr[-3000:]}")
    return failures


@pytest.mark.slow
def test_every_command_of_the_manuals_runs_as_written(fresh_copy):
    pytest.importorskip("mp_api.client", reason="the README's Materials Project commands need mp-api (in .[test])")
    from mp_server import KEY, FakeMP, material, serve

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "OMP_NUM_THREADS", "PYTHONPATH")}
    env |= {"PARAISITE_HOME": str(SHARED), "MEGNET_PT_HOME": str(SHARED), "MP_API_KEY": KEY,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    with serve(FakeMP([material(k) for k in range(7)])) as url:
        env["MP_API_ENDPOINT"] = url
        failures = [f for manual in MANUALS for f in run_all(manual, fresh_copy, env)]
    assert not failures, "\n\n".join(failures)
    # the headline command trained 2 x 2 models; scan.py screened the examples and MP with the shipped ensemble
    assert (fresh_copy / "runs" / "fe+af_togo15" / "summary.md").is_file()
    assert (fresh_copy / "runs" / "fe_aflow_agl" / "split2" / "final.pt").is_file()
    assert (fresh_copy / "mp_stable_ltc.csv").is_file()
    assert "ltc_fe_togo15_log10_clip10 (9 models, final)" in (fresh_copy / "examples_ltc.summary.md").read_text()


def test_commands_are_read_as_written():
    text = ('```bash\npython train.py --init fe   # step 2\nexport A=$B\nLAUNCH="a b" X= bash s.sh  # c\n'
            'python scan.py "a#b"\n```\n```python\nprint(1)\n```\n')
    assert commands(text) == ["python train.py --init fe", "export A=$B", 'LAUNCH="a b" X= bash s.sh', 'python scan.py "a#b"']
    assert quick("python train.py --init fe") == "python train.py --init fe --epochs 1 --splits 2"
    assert quick("python train.py --init fe --splits 4,") == "python train.py --init fe --splits 4, --epochs 1"
    assert quick("python train.py --help") == "python train.py --help"
    assert blocks(text, "python") == ["print(1)\n"]
    assert skip_reason("pip install -e .") and not skip_reason("python scan.py x")
