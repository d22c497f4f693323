"""`source auto_convert.sh` in a subprocess bash.

The pip install itself is what `.ci/run` exercises on a fresh machine; here a stand-in environment
(`bin/activate` + a `python` shim that records `-m pip` calls and otherwise runs the real
interpreter) checks the logic: install once, skip while version + setup.py hash match the stamp,
reinstall when setup.py changes, create and activate `.venv` when no environment is active, export
PYTHONPATH / MS_MM_DEVICE_TARGET, and never exit the calling shell (even under `set -e`).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SHIM = """#!/bin/bash
# stand-in python: records pip calls; a successful "install" registers ms-mm's metadata
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
    echo "$*" >> "{calls}"
    if [ -n "${{FAIL_PIP:-}}" ]; then echo "pip: simulated failure" >&2; exit 1; fi
    version=$(sed -n 's/.*version="\\([^"]*\\)".*/\\1/p' "{repo}/setup.py")
    rm -rf "{site}"/ms_mm-*.dist-info
    mkdir -p "{site}/ms_mm-$version.dist-info"
    printf 'Metadata-Version: 2.1\\nName: ms-mm\\nVersion: %s\\n' "$version" > "{site}/ms_mm-$version.dist-info/METADATA"
    exit 0
fi
PYTHONPATH="{site}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{real}" "$@"
"""


def _make_env(root: Path, repo: Path, calls: Path) -> Path:
    """A fake virtual environment at `root` whose python is the shim."""
    (root / "bin").mkdir(parents=True)
    site = root / "site"
    site.mkdir()
    (root / "bin" / "python").write_text(SHIM.format(calls=calls, repo=repo, site=site, real=sys.executable))
    (root / "bin" / "python").chmod(0o755)
    (root / "bin" / "activate").write_text(
        f'export VIRTUAL_ENV="{root}"\nexport PATH="{root}/bin:$PATH"\n')
    return root


@pytest.fixture()
def repo_copy(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "auto_convert.sh", repo)
    shutil.copy(REPO / "setup.py", repo)
    return repo


def _bash(script: str, env_extra=None, cwd=None):
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "ASCEND_HOME_PATH", "MS_MM_DEVICE_TARGET", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)
    env.update(env_extra or {})
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def test_installs_once_then_fast_path(repo_copy, tmp_path):
    calls = tmp_path / "pip_calls"
    venv = _make_env(tmp_path / "venv", repo_copy, calls)
    run = (f'source "{venv}/bin/activate"; source "{repo_copy}/auto_convert.sh"; echo "rc=$?"; '
           f'echo "DEVICE=$MS_MM_DEVICE_TARGET"; echo "PYTHONPATH=$PYTHONPATH"; echo ALIVE')
    first = _bash(run)
    assert "rc=0" in first.stdout and "ALIVE" in first.stdout, first.stdout + first.stderr
    assert calls.read_text().count("pip install") == 1 and f"-e {repo_copy}[test]" in calls.read_text()
    assert "DEVICE=CPU" in first.stdout and f"PYTHONPATH={repo_copy}" in first.stdout
    assert "mindspore" in first.stdout and "device        CPU" in first.stdout

    second = _bash(run)
    assert "rc=0" in second.stdout and "already installed" in second.stdout
    assert calls.read_text().count("pip install") == 1          # skipped

    (repo_copy / "setup.py").write_text((repo_copy / "setup.py").read_text() + "\n# changed\n")
    third = _bash(run)
    assert "rc=0" in third.stdout
    assert calls.read_text().count("pip install") == 2          # setup.py changed: reinstalled


def test_failure_never_exits_the_shell(repo_copy, tmp_path):
    calls = tmp_path / "pip_calls"
    venv = _make_env(tmp_path / "venv", repo_copy, calls)
    res = _bash(f'source "{venv}/bin/activate"; source "{repo_copy}/auto_convert.sh"; echo "rc=$?"; echo ALIVE',
                {"FAIL_PIP": "1"})
    assert "ALIVE" in res.stdout and "rc=1" in res.stdout
    assert "pip install -e" in res.stdout and "failed" in res.stdout
    assert not (venv / ".ms_mm_install_stamp").exists()         # a failed install leaves no stamp
    # a caller running with `set -e` keeps its shell too
    strict = _bash(f'set -e; source "{venv}/bin/activate"; source "{repo_copy}/auto_convert.sh"; echo ALIVE',
                   {"FAIL_PIP": "1"})
    assert "ALIVE" in strict.stdout, strict.stdout + strict.stderr


def test_creates_and_activates_repo_venv_when_none_is_active(repo_copy, tmp_path):
    calls = tmp_path / "pip_calls"
    # `python3 -m venv DIR` is answered by a shim that lays out the fake environment
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").write_text(
        f'#!/bin/bash\nif [ "$1" = "-m" ] && [ "$2" = "venv" ]; then\n'
        f'  exec "{sys.executable}" -c "import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); '
        f'from pathlib import Path; import test_auto_convert as t; '
        f't._make_env(Path(sys.argv[1]), Path({str(repo_copy)!r}), Path({str(calls)!r}))" "$3"\n'
        f'fi\nexec "{sys.executable}" "$@"\n')
    (bindir / "python3").chmod(0o755)
    res = _bash(f'source "{repo_copy}/auto_convert.sh"; echo "rc=$?"; echo "VENV=$VIRTUAL_ENV"; '
                f'command -v python; echo ALIVE', {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"})
    assert "rc=0" in res.stdout, res.stdout + res.stderr
    assert f"VENV={repo_copy}/.venv" in res.stdout and f"{repo_copy}/.venv/bin/python" in res.stdout
    assert calls.read_text().count("pip install") == 1


def test_ascend_detected_from_ascend_home_path(repo_copy, tmp_path):
    calls = tmp_path / "pip_calls"
    venv = _make_env(tmp_path / "venv", repo_copy, calls)
    res = _bash(f'source "{venv}/bin/activate"; source "{repo_copy}/auto_convert.sh"; '
                f'echo "DEVICE=$MS_MM_DEVICE_TARGET"', {"ASCEND_HOME_PATH": str(tmp_path)})
    assert "DEVICE=Ascend" in res.stdout
