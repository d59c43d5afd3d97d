"""Shared fixtures: where the sample policies are."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT.parent / "shared" / "examples"


@pytest.fixture
def examples() -> list[Path]:
    paths = sorted(EXAMPLES.glob("*.policy"))
    if not paths:
        pytest.skip("the shared examples are not beside this checkout")
    return paths
