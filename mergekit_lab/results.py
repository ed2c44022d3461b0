"""results.json and atomic output folders.

Every command writes ``results.json``: schema version, command, resolved settings, package
versions, git commit, start/end time, wall seconds, peak memory, metrics, rows (tables) and
artifact paths. The output folder is built in a temporary sibling (``.<name>.incomplete``) and
renamed into place on success, so a failed run never leaves a half-written folder where a
finished one is expected; the temporary sibling is kept for ``--resume``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from mergekit_lab import __version__
from mergekit_lab.errors import UserError

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
_PACKAGES = ("torch", "transformers", "datasets", "peft", "accelerate", "safetensors", "numpy")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return _jsonable(obj.item())
        except (TypeError, ValueError):
            pass
    return obj


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write JSON to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_jsonable(obj), f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results.json (or the one inside a run folder), refusing unknown schema versions."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no results file at {str(path)!r}", hint="give a finished run folder") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"unreadable results file {str(path)!r}: {e}") from None
    if not isinstance(data, dict) or "schema_version" not in data:
        raise UserError(f"{str(path)!r} is not an mklab results file (no schema_version)")
    if data["schema_version"] != SCHEMA_VERSION:
        raise UserError(
            f"{str(path)!r} has results schema version {data['schema_version']!r}; "
            f"this mklab {__version__} reads version {SCHEMA_VERSION}",
            hint="use the mklab version that wrote it",
        )
    return data


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"mergekit_lab": __version__}
    import platform

    out["python"] = platform.python_version()
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def is_finished(output_dir: str | Path) -> bool:
    return (Path(output_dir) / RESULTS_FILE).is_file()


class RunOutput:
    """Context manager for a run's output folder.

    Write artifacts into :attr:`tmp_dir`; set :attr:`metrics`, :attr:`rows`, :attr:`artifacts`
    and :attr:`extra`. On success, results.json is written and the folder renamed into place.
    With ``accelerator`` given, only the main process writes; all processes wait for it.
    """

    def __init__(
        self,
        output_dir: str | Path,
        command: str,
        settings: Any,
        *,
        overwrite: bool = False,
        resume: bool = False,
        accelerator: Any = None,
    ):
        self.final_dir = Path(output_dir).resolve()
        self.command = command
        self.settings = settings
        self.overwrite = overwrite
        self.resume = resume
        self.accelerator = accelerator
        self.tmp_dir = self.final_dir.parent / f".{self.final_dir.name}.incomplete"
        self.metrics: dict[str, Any] = {}
        self.rows: list[dict[str, Any]] = []
        self.artifacts: dict[str, str] = {}
        self.extra: dict[str, Any] = {}
        self.start = time.time()
        self.start_iso = ""

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def _wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def __enter__(self) -> RunOutput:
        if self.final_dir.exists() and not self.overwrite:
            if any(self.final_dir.iterdir()):
                raise UserError(
                    f"output folder {str(self.final_dir)!r} already exists",
                    hint="pass --overwrite to replace it or choose another --output-dir",
                )
        if self.is_main:
            if self.tmp_dir.exists() and not self.resume:
                shutil.rmtree(self.tmp_dir)
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._wait()
        self.start = time.time()
        self.start_iso = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        return self

    def results(self) -> dict[str, Any]:
        from mergekit_lab.runtime import peak_memory_mb

        end = time.time()
        data: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "command": self.command,
            "settings": self.settings,
            "versions": package_versions(),
            "git_commit": git_commit(),
            "start_time": self.start_iso,
            "end_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "wall_seconds": round(end - self.start, 3),
            "peak_memory_mb": peak_memory_mb(),
            "metrics": self.metrics,
            "rows": self.rows,
            "artifacts": self.artifacts,
        }
        data.update(self.extra)
        return data

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            # keep the temporary folder (checkpoints for --resume); the final folder is untouched
            return False
        self._wait()
        if self.is_main:
            write_json_atomic(self.tmp_dir / RESULTS_FILE, self.results())
            if self.final_dir.exists():
                trash = self.final_dir.parent / f".{self.final_dir.name}.old"
                if trash.exists():
                    shutil.rmtree(trash)
                os.replace(self.final_dir, trash)
                os.replace(self.tmp_dir, self.final_dir)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(self.tmp_dir, self.final_dir)
        self._wait()
        return False
