"""Run the ``kneeboneseg`` command line in a child process that a GUI can follow and stop.

Used by the 3D Slicer module, and free of Qt and Slicer so that it is tested
with real child processes outside the application. Three things make it fit
for Slicer:

- No reader thread. Slicer's PythonQt runs with thread support off, so a
  Python thread only gets time when the GUI runs Python; a pipe it should
  drain then fills and blocks the child. The child writes its output to a
  file in its work folder instead, and :meth:`WorkerProcess.poll`, called
  from a GUI timer, reads whatever was added since the last call.
- The whole process tree is stopped. ``PythonSlicer`` is a launcher that
  starts the real interpreter as its child, so killing the launcher alone
  leaves the worker running. The child starts in a process group of its own
  (a new session on POSIX, a new process group on Windows) and
  :meth:`WorkerProcess.cancel` kills the group.
- Output is decoded tolerantly: invalid UTF-8 becomes U+FFFD and never stops
  the reading.

The child speaks the ``--progress json`` protocol of
:mod:`KneeBoneSegLib.cli`: one JSON object per line, ``{"stage", "fraction"}``
while it works, then ``{"done": true, "outputs": [...]}`` or
``{"error": "..."}``. Any other line is kept; the last non-empty one is the
error shown when the child dies without saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

#: Environment that makes the worker behave the same whatever the user's setup.
#: The user's site-packages (``~/.local``) could shadow the packages checked at
#: install time; Keras (used only for ``--model x.keras``) reads its backend from
#: ``~/.keras/keras.json``, which may name one that is not installed.
WORKER_ENVIRONMENT = {
    "PYTHONUNBUFFERED": "1",
    "PYTHONIOENCODING": "utf-8",
    "PYTHONNOUSERSITE": "1",
    "KERAS_BACKEND": "tensorflow",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}

OUTPUT_LOG = "worker-output.log"


def worker_environment(base: Mapping[str, str], library_folder: str) -> dict:
    """The environment of a worker: ``base`` with the library first on the path and :data:`WORKER_ENVIRONMENT`.

    Parameters
    ----------
    base : mapping
        The parent's environment (``os.environ``).
    library_folder : str
        The folder that holds the ``KneeBoneSegLib`` package.
    """
    environment = dict(base)
    environment.update(WORKER_ENVIRONMENT)
    paths = [library_folder] + [path for path in base.get("PYTHONPATH", "").split(os.pathsep) if path]
    environment["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return environment


class WorkerProcess:
    """A running worker: its progress, its result and a Cancel that stops it and all its children.

    Parameters
    ----------
    command : sequence of str
        The program and its arguments, e.g. ``[PythonSlicer, "-m", "KneeBoneSegLib", "segment", ...]``.
    work_folder : str or Path
        An existing folder owned by this run: the output log goes there, and
        it is removed when the run is cancelled or fails.
    environment : mapping, optional
        The child's environment (default: the parent's).
    on_progress : callable, optional
        Called as ``on_progress(stage, fraction)`` from :meth:`poll`.

    Attributes
    ----------
    outputs : list of str or None
        The files the worker wrote, once it has said it is done.
    error : str or None
        The worker's message, or its last output line when it stopped without one.
    cancelled : bool
    seconds : float or None
        How long it ran, once it has ended.
    """

    def __init__(
        self,
        command: Sequence[str],
        work_folder,
        environment: Optional[Mapping[str, str]] = None,
        on_progress: Optional[Callable[[str, float], None]] = None,
    ):
        self.work_folder = Path(work_folder)
        self.on_progress = on_progress
        self.outputs = None
        self.error = None
        self.cancelled = False
        self.seconds = None
        self._start = time.monotonic()
        self._pending = b""
        self._other_lines = []
        log_path = self.work_folder / OUTPUT_LOG
        self._log_writer = open(log_path, "wb")
        self._log_reader = open(log_path, "rb")
        try:
            self._process = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=self._log_writer,
                stderr=subprocess.STDOUT,
                env=dict(environment) if environment is not None else None,
                **_own_process_group(),
            )
        except OSError:
            self._close_log()
            raise

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def output(self) -> str:
        """The lines the worker printed that were not protocol messages."""
        return "".join(self._other_lines)

    def poll(self) -> bool:
        """Handle what the worker printed since the last call; True while it runs.

        When it has ended: ``outputs`` is set, or ``error`` says why not
        (and the work folder is removed).
        """
        if self.seconds is not None:
            return False
        running = self._process.poll() is None
        self._read_lines(final=not running)
        if running:
            return True
        self.seconds = time.monotonic() - self._start
        self._close_log()
        if not self.cancelled and self.outputs is None and self.error is None:
            last = next((line.strip() for line in reversed(self._other_lines) if line.strip()), "no output")
            self.error = f"the segmentation process stopped (exit code {self._process.returncode}): {last}"
        if self.cancelled or self.error:
            shutil.rmtree(self.work_folder, ignore_errors=True)
        return False

    def wait(self, poll_interval: float = 0.1, on_idle: Optional[Callable[[], None]] = None) -> "WorkerProcess":
        """Poll until the worker ends, calling ``on_idle`` between polls (e.g. to keep a GUI drawing); returns self."""
        while self.poll():
            if on_idle is not None:
                on_idle()
            time.sleep(poll_interval)
        return self

    def cancel(self) -> None:
        """Stop the worker and every process it started, at once; nothing it wrote is kept."""
        if self.seconds is not None:
            return
        self.cancelled = True
        _kill_process_group(self._process)
        self._process.wait()
        self.poll()

    def _read_lines(self, final: bool) -> None:
        *complete, rest = (self._pending + self._log_reader.read()).split(b"\n")
        if final and rest:
            complete.append(rest)
        self._pending = b"" if final else rest
        for line in complete:
            self._handle_line(line.decode("utf-8", errors="replace") + "\n")

    def _handle_line(self, line: str) -> None:
        message = None
        if line.startswith("{"):
            try:
                message = json.loads(line)
            except ValueError:
                message = None
        if not isinstance(message, dict):
            self._other_lines.append(line)
        elif "stage" in message:
            if self.on_progress is not None and not self.cancelled:
                self.on_progress(str(message["stage"]), float(message.get("fraction", 0.0)))
        elif message.get("done"):
            self.outputs = [str(path) for path in message.get("outputs", [])]
        elif "error" in message:
            self.error = str(message["error"])

    def _close_log(self) -> None:
        self._log_writer.close()
        self._log_reader.close()


def _own_process_group() -> dict:
    """``Popen`` arguments that put the child at the head of a new process group, without a console window."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}


def _kill_process_group(process: subprocess.Popen) -> None:
    """Kill ``process`` and every process in its group (its children and theirs)."""
    if os.name == "nt":
        # taskkill /T walks the tree from the launcher down to the real interpreter.
        subprocess.run(
            ["taskkill", "/F", "/T", "/PID", str(process.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            creationflags=subprocess.CREATE_NO_WINDOW,
            check=False,
        )
        if process.poll() is None:
            process.kill()
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group has already gone
