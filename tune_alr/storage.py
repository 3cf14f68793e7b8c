"""Where an experiment's files go: folders and URIs checked up front, the saved spec.

Ray Tune writes each experiment into ``<storage>/<name>`` (a folder, or a URI such as
``s3://bucket/prefix`` that pyarrow reaches). Beside Ray's files this module saves the
experiment's spec (:data:`SPEC_FILE`), from which ``tune-alr resume`` rebuilds the run,
and copies a URI storage back to the output folder to build the tables.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import tracking

if TYPE_CHECKING:
    from .experiment import Experiment
    from .settings import Cell

#: Storage URI schemes Ray Tune reaches through pyarrow.
STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss", "file")

#: The file in a Ray Tune experiment folder that lets ``resume`` rebuild the Experiment.
SPEC_FILE = "tune_alr_experiment.json"


def check_writable(label: str, folder: Path) -> None:
    """Raise ``ValueError`` unless ``folder`` exists or can be created, and is writable."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"{label} folder {str(folder)!r} is inside a file ({str(probe)!r}).")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{label} folder {str(folder)!r} is not writable ({str(probe)!r}).")


def check_storage(exp: Experiment) -> None:
    """The storage URI's scheme, and the output, storage and sqlite folders writable."""
    if exp.storage_is_uri:
        scheme = str(exp.storage).split("://", 1)[0]
        if scheme not in STORAGE_SCHEMES:
            raise ValueError(
                f"storage URI {exp.storage!r} has scheme {scheme!r}; accepted: "
                f"{', '.join(STORAGE_SCHEMES)}, or a folder path."
            )
    for label, folder in (("output", exp.output_dir), ("storage", exp.storage_dir)):
        check_writable(label, folder)
    db = tracking.sqlite_path(exp.uri)
    if db is not None:
        check_writable("tracking store folder", db.parent)


def check_local_data(cells: Sequence[Cell]) -> None:
    """Every task's data can be had, before any trial loads it: local Parquet copies
    (files, columns, dtypes, sizes, labels), or the hub or its cache."""
    from trainables import hub

    seen: set[tuple[str, Path | None]] = set()
    for cell in cells:
        data_dir = hub.data_dir_from(cell.settings.get("data_dir"))
        if cell.task not in hub.SOURCES or (cell.task, data_dir) in seen:
            continue
        seen.add((cell.task, data_dir))
        hub.check_available(hub.SOURCES[cell.task], data_dir)


@contextlib.contextmanager
def exclusive(exp: Experiment) -> Iterator[None]:
    """Hold the experiment's folders for one run; a second run at once is refused.

    Two runs under one name into one output folder would share Ray Tune's experiment
    folder, its saved spec and the summary files. The output folder, and a local
    storage folder, are locked (``flock`` on the folders themselves: nothing is left
    behind, and a killed run's lock goes with its process); a run that finds one held
    raises ``ValueError`` at once, naming the folder.
    """
    import fcntl

    folders = [exp.output_dir]
    if not exp.storage_is_uri:
        folders.append(exp.storage_dir / exp.name)
    held: list[int] = []
    try:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder, os.O_RDONLY)
            held.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(
                    f"another run of experiment {exp.name!r} is using {str(folder)!r} right "
                    "now; give this one another --name or --output, or wait for it to end."
                ) from None
        yield
    finally:
        for fd in held:
            os.close(fd)  # closing releases the lock


def _filesystem(location: str) -> tuple[Any, str]:
    """pyarrow's filesystem and root for a folder path or a storage URI."""
    import pyarrow.fs

    uri = location if "://" in location else Path(location).resolve().as_uri()
    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    return fs, root.rstrip("/")


def write_spec(exp: Experiment, handle: tracking.Handle | None) -> None:
    """Save ``exp`` and its MLflow handle into its Ray Tune experiment folder."""
    import dataclasses

    spec = {
        "experiment": exp.to_dict(),
        "tracking": None if handle is None else dataclasses.asdict(handle),
    }
    fs, root = _filesystem(exp.storage_path)
    folder = f"{root}/{exp.name}"
    fs.create_dir(folder, recursive=True)
    with fs.open_output_stream(f"{folder}/{SPEC_FILE}") as out:
        out.write(json.dumps(spec, indent=2).encode())


def read_spec(path: str) -> tuple[dict[str, Any], tracking.Handle | None]:
    """The experiment fields and MLflow handle that ``run`` saved in its Ray Tune folder."""
    fs, root = _filesystem(path)
    try:
        with fs.open_input_stream(f"{root}/{SPEC_FILE}") as f:
            spec = json.loads(f.read().decode())
    except (FileNotFoundError, OSError) as err:
        raise ValueError(
            f"{path!r} is not a tune-alr experiment folder (no {SPEC_FILE}); give the "
            "folder Ray Tune wrote, e.g. results/<name>/ray/<name>."
        ) from err
    tracked = spec.get("tracking")
    return dict(spec["experiment"]), (tracking.Handle(**tracked) if tracked else None)


def local_copy(exp: Experiment, experiment_path: str) -> Path:
    """The experiment folder on this machine (copied from a storage URI)."""
    if not exp.storage_is_uri:
        return Path(experiment_path)
    import pyarrow.fs

    local = exp.storage_dir / exp.name
    local.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(experiment_path, str(local.resolve()))
    return local


__all__ = [
    "SPEC_FILE",
    "STORAGE_SCHEMES",
    "check_local_data",
    "check_storage",
    "check_writable",
    "exclusive",
    "local_copy",
    "read_spec",
    "write_spec",
]
