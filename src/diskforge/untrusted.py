"""Untrusted mode's resource limits: what a service converting uploaded images gets.

An uploaded image is hostile until proven otherwise. Its parsing is bounded by
construction (``limits.py``), but a service also wants a hard ceiling on the work
whatever bug is left, as OpenStack puts ``prlimit`` (oslo.concurrency's
``ProcessLimits``: address space and CPU time) around every ``qemu-img`` it runs on
an upload. Which files may be opened is the policy's business (``policy.py``,
``OpenPolicy.untrusted()``); this module holds what belongs to a *process*.

What each mode enforces:

- ``diskforge --untrusted ...`` or ``DISKFORGE_UNTRUSTED=1 diskforge ...`` (the command):
  ``OpenPolicy.untrusted()`` for every image (references confined to the image's
  directory, no raw or unnamed-format backing files, chains at most 8 deep), the
  per-command memory budget lowered from 256 to ``UNTRUSTED_MEMORY_BUDGET`` (64 MiB),
  and on the diskforge process itself ``RLIMIT_AS`` (address space,
  ``DISKFORGE_UNTRUSTED_ADDRESS_SPACE``, default 1 GiB, OpenStack's figure for
  qemu-img), ``RLIMIT_CPU`` (``DISKFORGE_UNTRUSTED_CPU_SECONDS``, default 600 s) and
  ``RLIMIT_CORE`` 0. Running out of either ends in one line naming the image and a
  non-zero exit: a MemoryError is reported as such, and the CPU limit's SIGXCPU is
  caught (no core dump, no traceback) and unwinds like an interrupt, so no partial
  output is left under the final name. Children diskforge starts (qemu for ``boot``)
  inherit the limits; long-running commands (``serve``, ``boot``) get the CPU limit
  too, so untrusted mode is for one-shot work.
- ``OpenPolicy.untrusted()`` in the Python API: the policy only — confinement,
  backing-format rules, chain depth. setrlimit would limit the caller's whole process
  (its other threads and work, for good), and lowering the memory budget is
  process-wide too, so the library does neither in-process. For the full set, run the
  operation in a child process under the limits with :func:`run`, which runs
  ``diskforge --untrusted ARGV`` and turns its one-line error into an exception.
  ``DISKFORGE_UNTRUSTED=1`` in a service's environment makes API calls given no
  policy use ``OpenPolicy.untrusted()``.
"""

from __future__ import annotations

import os
import sys

from . import limits
from .errors import DiskforgeError, LimitError, UsageError, printable

TYPE_CHECKING = False  # typing costs start-up time; type checkers know this idiom
if TYPE_CHECKING:
    import subprocess

UNTRUSTED_MEMORY_BUDGET = 64 << 20
DEFAULT_ADDRESS_SPACE = 1 << 30
DEFAULT_CPU_SECONDS = 600
# after the soft CPU limit's SIGXCPU, this many more CPU seconds to unwind and remove
# temporary outputs before the kernel's SIGKILL at the hard limit
CPU_GRACE_SECONDS = 5


class CpuTimeExceeded(BaseException):
    """RLIMIT_CPU's SIGXCPU, raised in the main thread. A BaseException, like
    KeyboardInterrupt, so that no ``except DiskforgeError``/``except Exception`` on the
    way up (a loop trying candidates, a server surviving bad images) swallows it."""


def address_space() -> int:
    """The untrusted mode's RLIMIT_AS in bytes (``DISKFORGE_UNTRUSTED_ADDRESS_SPACE``,
    with qemu-img's size suffixes)."""
    from .options import parse_size
    text = os.environ.get("DISKFORGE_UNTRUSTED_ADDRESS_SPACE", "").strip()
    return parse_size(text, "DISKFORGE_UNTRUSTED_ADDRESS_SPACE") if text \
        else DEFAULT_ADDRESS_SPACE


def cpu_seconds() -> int:
    """The untrusted mode's RLIMIT_CPU in seconds (``DISKFORGE_UNTRUSTED_CPU_SECONDS``)."""
    text = os.environ.get("DISKFORGE_UNTRUSTED_CPU_SECONDS", "").strip()
    if not text:
        return DEFAULT_CPU_SECONDS
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"invalid DISKFORGE_UNTRUSTED_CPU_SECONDS '{text}': use a whole"
                         " number of seconds, 1 or more")
    return int(text)


def limit_process(image: str | None = None) -> None:
    """Put the calling process under untrusted mode's limits, for good (the CLI calls
    this once, before opening anything; ``image`` is the file to name if the CPU limit
    must end the process at once). Never call it from a library caller's process."""
    import resource
    cpu, space = cpu_seconds(), address_space()
    where = f"{printable(image)}: " if image else ""
    _cpu_state["last_words"] = (f"diskforge: {where}CPU time limit of {cpu} s exceeded"
                                " (untrusted mode), and unwinding took too long\n").encode()
    if space < 32 << 20:
        raise UsageError(f"DISKFORGE_UNTRUSTED_ADDRESS_SPACE of {space} bytes is too small"
                         " to run Python at all (32M at least)")
    limits.MEMORY_BUDGET = min(limits.MEMORY_BUDGET, UNTRUSTED_MEMORY_BUDGET)
    import signal  # here, not at import: its enums cost every command's start-up
    signal.signal(signal.SIGXCPU, _on_sigxcpu)
    _lower(resource, resource.RLIMIT_CORE, 0, 0)
    _lower(resource, resource.RLIMIT_AS, space, space)
    used = resource.getrusage(resource.RUSAGE_SELF)
    spent = int(used.ru_utime + used.ru_stime)
    _lower(resource, resource.RLIMIT_CPU, spent + cpu, spent + cpu + CPU_GRACE_SECONDS)


def _lower(resource, which: int, soft: int, hard: int) -> None:
    """Set a limit, never raising one the process already has lower."""
    old_soft, old_hard = resource.getrlimit(which)
    if old_hard != resource.RLIM_INFINITY:
        hard = min(hard, old_hard)
    soft = min(soft, hard)
    resource.setrlimit(which, (soft, hard))


_cpu_state: dict = {}


def _on_sigxcpu(signum, frame):
    """The first SIGXCPU unwinds (outputs cleaned up on the way). The kernel repeats it
    each CPU second past the soft limit, until SIGKILL at the hard one; those are
    ignored while unwinding, except the last before SIGKILL, which says so in one line
    and leaves at once rather than die silently."""
    import resource
    if not _cpu_state.get("raised"):
        _cpu_state["raised"] = True
        # The kernel would repeat SIGXCPU every CPU second from here on, and once the
        # interpreter finalizes (after the one-line error), SIGXCPU is back at its
        # default action and kills: so the next one comes only a second before the
        # hard limit's SIGKILL, the whole grace is for unwinding and exiting.
        soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
        if hard != resource.RLIM_INFINITY and hard - 1 > soft:
            resource.setrlimit(resource.RLIMIT_CPU, (hard - 1, hard))
        raise CpuTimeExceeded(f"CPU time limit of {cpu_seconds()} s exceeded (untrusted"
                              " mode; DISKFORGE_UNTRUSTED_CPU_SECONDS sets it)")
    used = resource.getrusage(resource.RUSAGE_SELF)
    if used.ru_utime + used.ru_stime + 1.5 >= resource.getrlimit(resource.RLIMIT_CPU)[1]:
        os.write(2, _cpu_state.get("last_words", b"diskforge: CPU time limit exceeded\n"))
        os._exit(1)


def run(argv: "list[str]", *, ok: "tuple[int, ...]" = (0,), timeout: float | None = None,
        env: "dict[str, str] | None" = None) -> "subprocess.CompletedProcess[str]":
    """Run ``diskforge --untrusted ARGV`` in a child process under untrusted mode's
    limits; return the finished process when its exit status is in ``ok`` (``compare``
    uses 1 for "different"), else raise :class:`DiskforgeError` with the child's one
    line (:class:`LimitError` when a signal or ``timeout``, in wall-clock seconds, ended
    it). The Python API's way to get the resource limits without putting its own
    process under them."""
    import subprocess
    child_env = dict(os.environ if env is None else env)
    child_env["DISKFORGE_UNTRUSTED"] = "1"
    command = f"diskforge {argv[0]}" if argv else "diskforge"
    try:
        proc = subprocess.run([sys.executable, "-m", "diskforge", "--untrusted", *argv],
                              capture_output=True, text=True, timeout=timeout, env=child_env)
    except subprocess.TimeoutExpired:
        raise LimitError(f"{command} ran longer than {timeout} s (wall clock) and was"
                         " stopped") from None
    if proc.returncode in ok:
        return proc
    if proc.returncode < 0:
        import signal
        raise LimitError(f"{command} was killed by {signal.Signals(-proc.returncode).name}")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    raise DiskforgeError(lines[-1].removeprefix("diskforge: ") if lines
                         else f"{command} exited with status {proc.returncode}")
