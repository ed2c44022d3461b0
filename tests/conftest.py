from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mergekit_lab.cli.app import _quiet_libraries  # noqa: E402
from tests.factories import SHARED, make_glue_cola, make_glue_sst2, make_tiny_bert  # noqa: E402

_quiet_libraries()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("glue")
    make_glue_sst2(d)
    make_glue_cola(d)
    return d


@pytest.fixture()
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"real data folder {SHARED} is absent (integration test)")
    return SHARED
