"""Test-only fault injection for subprocesses of tests/faults (Python imports `sitecustomize` at start-up when this
folder is on PYTHONPATH). FAULT_KILL_ON_RENAME=NAME: SIGKILL the process at the moment a complete directory is being
renamed to NAME (utils/io.replace_dir's last step of a checkpoint save): the worst time for a crash during a save."""

import os
import signal

_target = os.environ.get("FAULT_KILL_ON_RENAME")
if _target:
    _rename = os.rename

    def _killing_rename(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(dst)) == _target:
            os.kill(os.getpid(), signal.SIGKILL)
        return _rename(src, dst, *args, **kwargs)

    os.rename = _killing_rename
