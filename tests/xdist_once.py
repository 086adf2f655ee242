"""Work that several pytest-xdist workers would each repeat (a module-scoped fixture runs once per
worker that gets one of the module's tests), done by one of them: the recipe of pytest-xdist's
documentation, a lock file in the temporary directory the workers share."""
from __future__ import annotations

import fcntl
import json
import os


def run_once(tmp_path_factory, name: str, fn):
    """``fn()`` (a JSON-able result) computed by the first worker to get here and read by the others;
    without xdist, just ``fn()``. A failure is not stored: the next worker tries again (and fails the
    same way, with its own message)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return fn()
    root = tmp_path_factory.getbasetemp().parent
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        done = root / f"{name}.json"
        if done.is_file():
            return json.loads(done.read_text())
        result = fn()
        done.write_text(json.dumps(result))
        return result
