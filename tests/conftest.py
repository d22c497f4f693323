"""Shared test configuration: where the reference fixtures live, and a clean working directory.

The reference fixtures are not copied into the repository; they sit beside it in `../shared/fixtures`
(the layout of the development machines and CI). `MS_MM_FIXTURES` overrides the location. A missing
fixture directory is an error, never a skip: a parity test that did not run proves nothing.
"""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _find_fixture_root() -> Path:
    candidates = []
    if os.environ.get("MS_MM_FIXTURES"):
        candidates.append(Path(os.environ["MS_MM_FIXTURES"]))
    candidates += [REPO_ROOT.parent / "shared" / "fixtures", Path("/work/shared/fixtures")]
    for c in candidates:
        if (c / "README.md").is_file():
            return c
    raise FileNotFoundError(
        "reference fixtures not found; looked in " + ", ".join(str(c) for c in candidates)
        + " (set MS_MM_FIXTURES to the shared/fixtures directory)")


FIXTURE_ROOT = _find_fixture_root()


@pytest.fixture(scope="session")
def fixture_root() -> Path:
    return FIXTURE_ROOT
