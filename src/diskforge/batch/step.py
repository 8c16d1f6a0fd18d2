"""One step of a batch job, in its own process: ``python -m diskforge.batch.step
RESULT_FD ARGV...`` runs ``diskforge ARGV`` and writes what happened to the file
descriptor RESULT_FD (a pipe from the runner) as JSON: exit status, error line, and
whether the error is worth a retry.

Why a separate process per step: a job's memory, file descriptors and signals stay its
own, and a worker killed mid-job takes the step with it (the parent-death signal set
by the runner), so its temporary output is removed and nothing half-written remains.
"""

from __future__ import annotations

import errno
import json
import sys

# errors no retry can mend
PERMANENT = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR,
             errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EEXIST, errno.EINVAL,
             errno.ENAMETOOLONG, errno.ELOOP}
ERROR_MAX = 8000  # characters of an error line reported


def main(argv: list[str]) -> int:
    result_fd, command = int(argv[0]), argv[1:]
    from ..cli.main import main as diskforge
    from ..errors import DiskforgeError, ImageIOError
    result: dict = {"transient": False, "error": None}
    try:
        # --debug: errors reach us as exceptions, so their kind decides on a retry
        result["code"] = diskforge(["--debug", *command])
    except ImageIOError as e:  # the OS or the network failed: another try may work,
        # unless the OS said something that stays true (no such file, no permission)
        result.update(code=1, error=str(e),
                      transient=getattr(e, "errno", None) not in PERMANENT)
    except DiskforgeError as e:  # the input or the request is wrong: it stays wrong
        result.update(code=1, error=str(e))
    except OSError as e:
        result.update(code=1, error=f"{e.filename + ': ' if e.filename else ''}"
                      f"{e.strerror or e}", transient=e.errno not in PERMANENT)
    except KeyboardInterrupt:
        result.update(code=130, error="interrupted", transient=True)
    except Exception as e:  # a bug: reported, not retried
        result.update(code=1, error=f"internal error: {type(e).__name__}: {e}")
    if result["error"] and len(result["error"]) > ERROR_MAX:  # the pipe is read at exit:
        result["error"] = result["error"][:ERROR_MAX] + "..."  # stay within its buffer
    with open(result_fd, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return result["code"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
