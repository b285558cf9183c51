"""vsc.child_process.process_tree / reap: what a server started goes with it, even a process that
outlives it in another session (as a Ray head's workers would). ServerProcess.stop uses them."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from vsc.child_process import _stat, process_tree, reap

# a child that starts a grandchild in its own session (no signal to the group reaches it), then waits
PARENT = ("import subprocess, sys, time\n"
          "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
          "time.sleep(120)\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_reap_kills_what_outlived_its_parent_and_only_that():
    parent = subprocess.Popen([sys.executable, "-c", PARENT])
    try:
        deadline = time.monotonic() + 20
        while not (tree := process_tree(parent.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        (grandchild,) = tree
        assert tree[grandchild] == _stat(grandchild)[1]       # noted with its start time
        parent.kill()
        parent.wait()
        assert process_tree(parent.pid) == {}                 # re-parented: no longer found below it
        assert _stat(grandchild) is not None                  # ... and still running
        assert reap(tree, timeout=0.5) == [grandchild]
        deadline = time.monotonic() + 10
        while _stat(grandchild) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _stat(grandchild) is None
        # a snapshot whose processes are gone (or whose pids were reused: another start time) kills nothing
        assert reap({grandchild: tree[grandchild]}, timeout=0) == []
        assert reap({parent.pid: 0}, timeout=0) == []
    finally:
        if parent.poll() is None:
            parent.kill()
