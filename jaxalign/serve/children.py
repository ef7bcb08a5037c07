"""Child processes that die with the process that started them, and locks that keep two of them apart.

:func:`spawn` starts a command through this module (``python -m jaxalign.serve.children --parent PID -- cmd``),
which asks Linux to send the child SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``, kept across the
``exec`` into the command) and then becomes the command. The request is made in the child's own interpreter,
not in a ``preexec_fn``: the parent (a server with JAX's and uvicorn's threads) may hold a ``malloc`` lock at
the moment it forks, and Python code run between ``fork`` and ``exec`` could wait on it forever. Should the
parent already be gone by the time the request is made, the child exits at once instead.

A spawned child leads a process group of its own, so :func:`stop` reaches everything it started, and a Ctrl-C
in the parent's terminal reaches only the parent, which stops its children in order.

:class:`DirectoryLock` is an ``flock`` on a file that a spawned child inherits (``pass_fds``): the lock is held
as long as the child (or the command it became) lives, and released by the kernel when it exits, however it
exits. A second starter finds it held and knows which process holds it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_GONE = 75  # EX_TEMPFAIL: the parent died before the child could tie itself to it


def command_for(command: list[str], *, parent: int | None = None) -> list[str]:
    """``command`` run through this module, tied to ``parent`` (default: this process)."""
    return [sys.executable, "-m", "jaxalign.serve.children", "--parent", str(parent or os.getpid()), "--",
            *command]


def spawn(command: list[str], **popen) -> subprocess.Popen:
    """Start ``command`` as a child that gets SIGTERM when this process dies, in a process group of its own
    (further keyword arguments go to :class:`subprocess.Popen`)."""
    return subprocess.Popen(command_for(command), start_new_session=True, **popen)


def stop(process: subprocess.Popen, *, timeout: float = 30.0) -> None:
    """SIGTERM to ``process``'s group, SIGKILL to it after ``timeout`` seconds; returns once ``process`` exited.
    A process already reaped (``returncode`` set) is left alone: its id may belong to another process now."""
    if process.returncode is not None:
        return
    signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        signal_group(process.pid, signal.SIGKILL)
        process.wait()


def signal_group(pid: int, signum: int) -> None:
    """Send ``signum`` to the process group that ``pid`` leads (nothing if it is gone)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def tie_to_parent(parent: int, signum: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent dies; False if ``parent`` is already gone
    (this process was adopted by another). Elsewhere than Linux nothing is asked and it returns True."""
    if not sys.platform.startswith("linux"):
        return True
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    return os.getppid() == parent  # checked after the request: a death in between is seen either way


class DirectoryLock:
    """An exclusive ``flock`` on ``path`` (created if missing), for a child to hold while it works.

    :meth:`acquire` takes it without waiting (False while another process holds it; :attr:`holder` then says
    which, as far as it wrote its id). Pass :attr:`fd` to the child in ``pass_fds`` and call :meth:`hand_over`
    with its pid: the lock is then held by the child alone, for as long as it lives.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    @property
    def holder(self) -> int | None:
        """The process id written by the lock's holder, if any."""
        try:
            return int(self.path.read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def hand_over(self, pid: int) -> None:
        """Write the child's ``pid`` for others to see, and close this process's copy (the child keeps its own)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{pid}\n".encode(), 0)
        self.release()

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[0] != "--parent" or argv[2] != "--":
        print("usage: python -m jaxalign.serve.children --parent PID -- COMMAND...", file=sys.stderr)
        return 2
    parent, command = int(argv[1]), argv[3:]
    if not tie_to_parent(parent):
        print(f"jaxalign: not starting {command[0]}: its parent process {parent} has already exited",
              file=sys.stderr)
        return PARENT_GONE
    sys.stdout.flush()
    os.execvp(command[0], command)  # the signal request and the inherited lock survive the exec


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
