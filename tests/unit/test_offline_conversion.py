"""OpenVINO sends usage telemetry on import and on every conversion by default; PruneScope never does
(``core.offline``). A CLI export hung for 15 minutes at exit on a machine without internet while the telemetry
child waited in DNS."""
from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import multiprocessing.process as mp
started = []
mp.BaseProcess.start = lambda self: started.append(self)
import torch
import core
import openvino
from core.ov_runtime import to_openvino
m = to_openvino(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).eval(), (1, 3, 8, 8))
print(list(m.outputs[0].get_partial_shape().to_shape()), len(started))
"""


def test_importing_openvino_and_converting_start_no_telemetry_process():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-5:] == ["[1,", "4,", "6,", "6]", "0"], out.stdout
