"""Presets and the shipped sample must work from an installed wheel, not only from a checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_presets_and_sample(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"could not build a wheel here (needs hatchling from PyPI): {proc.stderr[-300:]}")
    wheel = next(tmp_path.glob("mergekit_lab-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {p.name for p in (REPO / "presets").glob("*.yaml")}
    assert presets and all(f"mergekit_lab/presets/{p}" in names for p in presets)
    assert "mergekit_lab/data/sample/glue/SST-2/train.tsv" in names
    assert "mergekit_lab/data/sample/NOTICE.md" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mklab = mergekit_lab.cli.app:main" in zipfile.ZipFile(wheel).read(entry).decode()
