"""Writing files whole or not at all: the one place that stages and renames.

A run writes every output into a hidden staging folder next to the output
folder and moves the files into place only when all of them are written
(:func:`output_directory`); a single file is written under a temporary name
and renamed (:func:`atomic_file`), so a reader never sees half a file.
Outputs, model cards, ONNX exports, training checkpoints, the sample scan and
Slicer's STL export all write through here. Only the standard library and
:mod:`~KneeBoneSegLib.errors` are imported, so any module may use it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import uuid
from pathlib import Path

from .errors import OutputError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary sibling path to write; on success it replaces ``path``.

    The temporary name keeps ``path``'s full suffix (writers that pick the
    format from it still work). On an exception it is deleted and ``path``
    is left as it was.
    """
    path = Path(path)
    temporary = path.with_name(f".{uuid.uuid4().hex[:12]}.{path.name}")
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as error:
        raise OutputError(
            f"{path} cannot be written ({error.strerror or error}); check the folder and free disk space"
        ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


@contextlib.contextmanager
def output_directory(outdir, overwrite: bool = False, inputs=()):
    """Collect a run's outputs in a staging folder; put them in ``outdir`` only if the run succeeds.

    Parameters
    ----------
    outdir : str or Path
        The output folder; missing parent folders are created.
    overwrite : bool
        Allow an ``outdir`` that already holds files. Only the files this run
        writes are replaced, each in one rename; other files in ``outdir``,
        including outputs of an earlier run that this run does not write
        (e.g. ``patella.stl`` when no patella is found now), are left alone.
    inputs : iterable of str or Path
        The run's input files and folders; the outputs never replace them.

    Yields
    ------
    Path
        The staging folder to write into, with the same relative names the
        files will have in ``outdir``. It is hidden, next to a new ``outdir``
        (which then appears in one rename) or inside an existing one (whose
        files are then replaced one rename each).

    Raises
    ------
    OutputError
        ``outdir`` is a file, is not empty (without ``overwrite``), cannot be
        created or written, or an output would replace an input. On any
        exception in the ``with`` block the staging folder is removed and
        ``outdir`` is untouched.
    """
    outdir = Path(outdir).absolute()
    check_output_folder(outdir, overwrite)
    staging = _make_staging_folder(outdir)
    try:
        yield staging
        _publish(staging, outdir, inputs, overwrite)
    finally:
        # After a first publication the staging folder has become outdir and is gone.
        shutil.rmtree(staging, ignore_errors=True)


def check_output_folder(outdir, overwrite: bool = False) -> None:
    """Refuse, in one line, an output folder this run could not publish into; writes nothing.

    Front ends call it before reading the scan, so that a folder that holds
    files (without ``overwrite``), is a file, or cannot be written is
    refused in a second, not after minutes of network. :func:`output_directory`
    checks again when the run publishes, for a folder filled meanwhile.

    Raises
    ------
    OutputError
    """
    outdir = Path(outdir).absolute()
    if outdir.exists() and not outdir.is_dir():
        raise OutputError(f"{outdir} is a file; give a folder for the outputs")
    home = next(folder for folder in (outdir, *outdir.parents) if folder.exists())
    if not home.is_dir():
        raise OutputError(f"{outdir} cannot be made: {home} is a file; choose another output folder")
    if not os.access(home, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write in {home} (permission denied); choose an output folder you can write to")
    if outdir.is_dir() and not overwrite:
        try:
            # Other runs' staging folders are not outputs (yet): two runs may start in one new folder.
            occupied = any(not path.name.startswith(_staging_prefix(outdir)) for path in outdir.iterdir())
        except OSError as error:
            raise OutputError(f"{outdir} cannot be read ({error.strerror}); choose a folder you can write to") from None
        if occupied:
            raise _occupied(outdir)


def _occupied(outdir: Path) -> OutputError:
    return OutputError(
        f"{outdir} already holds files; choose a new or empty folder, or pass --overwrite to replace this run's outputs in it (overwrite=True in Python)"
    )


def _staging_prefix(outdir: Path) -> str:
    return f".{outdir.name}.partial-"


def _make_staging_folder(outdir: Path) -> Path:
    """A hidden folder on ``outdir``'s file system: inside ``outdir`` if it exists (then only it
    must be writable), else next to it (so the finished folder appears in one rename)."""
    home = outdir if outdir.is_dir() else outdir.parent
    staging = home / f"{_staging_prefix(outdir)}{uuid.uuid4().hex[:12]}"
    try:
        home.mkdir(parents=True, exist_ok=True)
        # mkdir, not tempfile.mkdtemp: the folder may become outdir and must get the umask's mode, not 0o700
        staging.mkdir()
    except OSError as error:
        raise OutputError(
            f"cannot write in {home} ({error.strerror}); choose an output folder you can write to"
        ) from None
    return staging


def _publish(staging: Path, outdir: Path, inputs, overwrite: bool) -> None:
    """Move the staged files into ``outdir``, after checking that none would replace an input or a folder.

    Without ``overwrite``, ``outdir`` is checked again here, at the end of
    the run: another run that started into the same new or empty folder may
    have finished first, and its outputs are not replaced. A new folder
    appears in one rename, which fails if it has appeared meanwhile with
    files in it; in an existing empty folder, a run that publishes between
    this check and the moves (microseconds) is not detected.
    """
    if not overwrite:
        check_output_folder(outdir, overwrite=False)
    sources = sorted(path for path in staging.rglob("*") if not path.is_dir())
    moves = [(source, outdir / source.relative_to(staging)) for source in sources]
    protected = [Path(path).resolve() for path in inputs if path is not None]
    for _, target in moves:
        if target.is_dir():
            raise OutputError(
                f"{target} is a folder and cannot be replaced by an output file; remove it or choose another output folder"
            )
        if target.exists():
            resolved = target.resolve()
            replaced_input = next((p for p in protected if p == resolved or p in resolved.parents), None)
            if replaced_input is not None:
                raise OutputError(
                    f"{target} is an input of this run ({replaced_input}); write the outputs to another folder"
                )
    try:
        if not outdir.exists():
            try:
                staging.rename(outdir)
            except OSError as error:
                if error.errno in (errno.EEXIST, errno.ENOTEMPTY) and not overwrite:
                    raise _occupied(outdir) from None
                raise
        else:
            for source, target in moves:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
    except OSError as error:
        raise OutputError(
            f"the outputs cannot be moved into {outdir} ({error.strerror}); check the folder and free disk space"
        ) from None
    log.info("Wrote %d files to %s", len(moves), outdir)
