"""A run's folder on the worker: inputs written or fetched, an empty outputs folder, the
per-queue job cache, and the outputs collected afterwards."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..model.jobs import DataRefType, JobDefinition
from .transfer import Transfers

log = logging.getLogger(__name__)

#: With ``--container-user image`` a job runs as whatever uid its image names, not the
#: worker's: the folders it writes (its ``/inputs`` and ``/outputs``, the queue's
#: ``/job-cache``) are opened to every uid, and so are the input files (per-run copies it may
#: overwrite). That is safe because only containers reach them: the folders that hold them
#: (``runs/`` and ``job-cache/`` of the data dir) are the worker's own and closed (0700), so
#: no other user of this machine can get through to them, while a container gets them as its
#: mounts (the engine mounts them; the folders above are not in the container's path).
#: (The data dir itself is made with the default mode, usually 0755: it is not what keeps
#: others out.)
ANY_UID_DIR = 0o777
ANY_UID_FILE = 0o666
CLOSED_DIR = 0o700


@dataclass
class RunFolder:
    """Where one run's files live on the worker."""

    root: Path
    #: Absolute configFiles: the host file that is mounted read-only at that container path.
    single_files: dict[str, Path] = field(default_factory=dict)

    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    def remove(self) -> None:
        """Remove the folder (after upload); files a container made read-only are removed too."""
        shutil.rmtree(self.root, onerror=_force_remove)


def _force_remove(function: object, path: str, exc_info: object) -> None:
    # Removing an entry needs a writable folder around it. Never chmod through a symlink: the
    # container may have pointed one at any host file (os.chmod follows links).
    os.chmod(os.path.dirname(path), 0o700)
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, 0o700)
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.unlink(path)


async def prepare(
    runs_dir: Path,
    run_id: str,
    definition: JobDefinition,
    blobs: dict[str, str],
    transfers: Transfers,
    host_api: str,
    any_uid: bool = False,
) -> RunFolder:
    """Make the run's folder and put every input in place (fetching key and url inputs);
    ``any_uid``: open ``inputs/`` and ``outputs/`` to the container's uid, whatever it is.

    Key and url inputs are the run's own copies of the worker's cached files, never hard links
    to them: ``/inputs`` is writable, and a root job ignores the cache's read-only mode.
    """
    folder = RunFolder(runs_dir / run_id)
    if folder.root.exists():
        folder.remove()  # a leftover of an earlier attempt of this run on this worker
    folder.inputs.mkdir(parents=True)
    folder.outputs.mkdir()
    configs = folder.root / "config"
    for index, (field_name, path, ref) in enumerate(definition.data_refs()):
        if field_name == "configFiles" and path.startswith("/"):
            configs.mkdir(exist_ok=True)
            dest = configs / str(index)
            folder.single_files[path] = dest
        else:
            dest = folder.inputs / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        data = ref.inline_bytes()
        if data is not None:
            dest.write_bytes(data)
        elif ref.type is DataRefType.KEY:
            key = str(ref.value)
            url = blobs.get(key) or f"{host_api}f/{key}"
            await transfers.fetch(url, dest, sha256=key, copy=True)
        else:
            await transfers.fetch(str(ref.value), dest, copy=True)
    if any_uid:
        _open_to_any_uid(folder)
    return folder


def _open_to_any_uid(folder: RunFolder) -> None:
    """Let a container of any uid write the run's ``/inputs`` (its files included) and
    ``/outputs`` (see ``ANY_UID_DIR``: ``runs/`` above them is closed)."""
    folder.root.parent.chmod(CLOSED_DIR)
    # Only what ``prepare`` just wrote (the container has not started): no links to follow.
    for root, dirs, files in os.walk(folder.inputs):
        for name in dirs:
            os.chmod(os.path.join(root, name), ANY_UID_DIR)
        for name in files:
            os.chmod(os.path.join(root, name), ANY_UID_FILE)
    folder.inputs.chmod(ANY_UID_DIR)
    folder.outputs.chmod(ANY_UID_DIR)


def job_cache(cache_root: Path, queue: str, cap_bytes: int, any_uid: bool = False) -> Path:
    """The queue's shared ``/job-cache`` folder, pruned oldest-first to stay under the cap;
    ``any_uid``: writable by a container of any uid (``cache_root`` above it closed)."""
    folder = cache_root / queue
    folder.mkdir(parents=True, exist_ok=True)
    if any_uid:
        cache_root.chmod(CLOSED_DIR)
        folder.chmod(ANY_UID_DIR)
    entries = []
    total = 0
    for entry in folder.iterdir():
        size = tree_size(entry)
        total += size
        entries.append((entry.lstat().st_mtime, size, entry))  # a job's link may dangle
    for _, size, entry in sorted(entries):
        if total <= cap_bytes:
            break
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, onerror=_force_remove)
            else:
                entry.unlink(missing_ok=True)
        except OSError as exc:  # a worker that is not root, and a folder of a job's uid
            log.warning("compute-queue worker: cannot prune %s from the job cache: %s", entry, exc)
        total -= size
    return folder


def tree_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symlinks not followed)."""
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size if path.is_file() and not path.is_symlink() else 0
    # scandir rather than os.walk: the entry types come with the listing, so only regular
    # files cost a stat (the worker measures run folders and job caches while jobs run).
    total = 0
    folders = [str(path)]
    while folders:
        try:
            with os.scandir(folders.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            folders.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue  # removed while we looked
        except OSError:
            continue  # a folder removed while we looked
    return total


def output_files(outputs: Path) -> Iterator[tuple[str, Path]]:
    """Every regular file under ``outputs`` as (relative path, path); symlinks are skipped."""
    for root, _dirs, files in os.walk(outputs, followlinks=False):
        for name in sorted(files):
            path = Path(root) / name
            if path.is_symlink() or not path.is_file():
                continue
            yield path.relative_to(outputs).as_posix(), path
