"""The optional IPEX venv: requirements-ipex.txt swaps torch for the 2.8 pair, everything else as pinned.

Nothing is installed (torch 2.8 is gigabytes): the derived requirements file is made for real by its
make rule, the install commands are read with ``make -n``, and the pins are checked with the same
function the pipeline uses to decide whether IPEX is used.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import types
from pathlib import Path

from dlrm import dist

REPO = Path(__file__).resolve().parent.parent
MAKE = shutil.which("make")


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MAKE, "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def make_n(*args: str) -> list[str]:
    """The commands ``make -n`` prints (trailing blanks from empty Makefile variables dropped)."""
    return [line.rstrip() for line in make("-n", *args).stdout.splitlines()]


def requirements(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def pin(reqs: list[str], name: str) -> str:
    versions = [m.group(1) for line in reqs if (m := re.fullmatch(rf"{re.escape(name)}==(\S+)", line))]
    assert len(versions) == 1, f"{name}: expected exactly one exact pin, found {versions}"
    return versions[0]


def test_ipex_requirements_pin_the_matching_torch_and_ipex(monkeypatch):
    reqs = requirements(REPO / "requirements-ipex.txt")
    torch_version, ipex_version = pin(reqs, "torch"), pin(reqs, "intel-extension-for-pytorch")
    assert ipex_version.startswith("2.8.") and torch_version.startswith("2.8.")
    # The pipeline's own check accepts this pair ...
    monkeypatch.setattr(dist.torch, "__version__", torch_version)
    fake_ipex = types.SimpleNamespace(__version__=ipex_version)
    assert dist.ipex_status(lambda name: fake_ipex) == (True, f"version {ipex_version} matches torch {torch_version}")
    # ... and rejects IPEX next to the main requirements' torch, which is why it needs its own venv.
    main_torch = pin(requirements(REPO / "requirements.txt"), "torch")
    monkeypatch.setattr(dist.torch, "__version__", main_torch)
    assert dist.ipex_status(lambda name: fake_ipex)[0] is False


def test_derived_requirements_replace_only_torch(tmp_path):
    venv = tmp_path / "venv-ipex"
    result = make(f"{venv}/requirements.txt", f"VENV_IPEX={venv}")
    assert result.returncode == 0, result.stdout + result.stderr
    derived = requirements(venv / "requirements.txt")
    main = requirements(REPO / "requirements.txt")
    ipex = requirements(REPO / "requirements-ipex.txt")
    assert pin(derived, "torch") == pin(ipex, "torch") != pin(main, "torch")
    assert pin(derived, "intel-extension-for-pytorch") == pin(ipex, "intel-extension-for-pytorch")
    assert [r for r in derived if r not in ipex] == [r for r in main if not r.startswith("torch==")]
    assert not list(venv.glob("*.tmp"))


def test_make_n_setup_ipex_installs_cpu_torch_into_its_own_venv_and_checks_ipex(tmp_path):
    venv = tmp_path / "venv-ipex"
    out = make_n("small-ipex", f"VENV_IPEX={venv}", "DAYS=2")
    assert f"{venv}/bin/pip install --quiet --disable-pip-version-check --extra-index-url " \
           f"https://download.pytorch.org/whl/cpu -r {venv}/requirements.txt" in out
    check = next(line for line in out if "ipex_status" in line)
    assert check.startswith(f"{venv}/bin/python -c ") and "sys.exit(not ok)" in check
    assert out.index(check) > out.index(f"{venv}/bin/pip install --quiet --disable-pip-version-check --extra-index-url "
                                        f"https://download.pytorch.org/whl/cpu -r {venv}/requirements.txt")
    assert re.fullmatch(rf"touch {venv}/\.installed-\d+", out[-2])
    assert out[-1] == f"{venv}/bin/python -m bench.pipeline --profile small --set data.days=2"
    # The default venv is left alone.
    assert not [line for line in out if ".venv/" in line]


def test_make_n_small_ipex_skips_the_install_once_set_up(tmp_path):
    venv = tmp_path / "venv-ipex"
    assert make(f"{venv}/requirements.txt", f"VENV_IPEX={venv}").returncode == 0
    stamp = make("-s", f"VENV_IPEX={venv}", "--eval", "print-stamp: ; @echo $(IPEX_STAMP)", "print-stamp").stdout.strip()
    Path(stamp).touch()
    assert make_n("small-ipex", f"VENV_IPEX={venv}") == [
        f"{venv}/bin/python -m bench.pipeline --profile small"]
