"""benchmarks/alignment_scale.py runs: the meta-training part, on one problem."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_alignment_scale_prints_every_lr_and_the_best(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location(
        "alignment_scale", ROOT / "benchmarks" / "alignment_scale.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["alignment_scale"] = module
    spec.loader.exec_module(module)
    module.problems(1, 777)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"^\s*\d\.\de-\d\d ", line)]
    assert len(rows) == 10  # the Adam grid of the meta-training references
    assert sum("<- best constant" in row for row in rows) == 1
    snr = [float(row.split()[3]) for row in rows]
    assert all(-1.0 <= v <= 1.0 for v in snr)
    assert snr[0] < snr[-1]  # far too low reads negative, far too high higher
