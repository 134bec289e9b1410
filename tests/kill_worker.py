"""Subprocess body for tests/test_kill_resume.py: train one config (resuming if a run exists).

With SEMIFER_TEST_SAVE_MARKER set, every torch.save writes its bytes in slow chunks after
touching the marker file, so the test can SIGKILL the process in the middle of a
checkpoint write (the real atomic_save around it is what is being tested).
"""
import io
import os
import sys
import time

import torch

marker = os.environ.get("SEMIFER_TEST_SAVE_MARKER")
if marker:
    _real_save = torch.save

    def _slow_save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        _real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        open(marker, "w").close()
        chunk = max(1, len(data) // 6)
        for i in range(0, len(data), chunk):
            f.write(data[i:i + chunk])
            f.flush()
            time.sleep(0.1)

    torch.save = _slow_save

from semifer.config import load_config  # noqa: E402
from semifer.engine import train  # noqa: E402

if __name__ == "__main__":
    train(load_config(sys.argv[1]))
