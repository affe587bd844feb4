"""core.ncs2_compiler without the compiler: the blob header check, the compiler's words, the static-only path."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from core.ncs2_compiler import (BLOB_MAGIC, STATIC_ONLY, BlobError, CompilerUnavailable, clean_compiler_message,
                                compile_onnx, compiler_status, read_blob_header, run_on_cpu_2021)

# What the 2021.4.2 MYRIAD plugin raised for a model with torch.cumsum in its forward (measured).
CUMSUM_ERROR = ('[ GENERAL_ERROR ] \n/home/jenkins/agent/workspace/private-ci/ie/build-linux-centos76/b/repos/openvino/'
                'inference-engine/src/vpu/graph_transformer/src/frontend/frontend.cpp:441 Failed to compile layer '
                '"/CumSum_output_0": unsupported layer type "CumSum"')


def blob_bytes(size: int = 512, magic: int = BLOB_MAGIC, inputs: int = 1, outputs: int = 1, stages: int = 5,
               declared: int | None = None) -> bytes:
    head = b"\x7felf" + bytes(48)
    fields = [magic, declared if declared is not None else size, 6, 0, inputs, outputs, stages] + [0] * 9
    body = head + struct.pack("<16I", *fields)
    return body + bytes(size - len(body))


def test_a_well_formed_blob_header_is_read():
    h = read_blob_header(blob_bytes(stages=37))
    assert (h.magic, h.file_size, h.inputs, h.outputs, h.stages, h.version) == (9709, 512, 1, 1, 37, (6, 0))


@pytest.mark.parametrize("data, needle", [
    (blob_bytes(magic=1234), "magic is 1234"),
    (blob_bytes(declared=999), "says 999 bytes, the file has 512"),
    (blob_bytes(outputs=2), "2 output(s)"),
    (blob_bytes(stages=0), "no stages"),
    (b"PK\x03\x04" + bytes(300), "not a MYRIAD blob"),
    (blob_bytes()[:200], "the file has 200"),
])
def test_a_wrong_blob_is_refused_saying_what_is_wrong(data, needle):
    with pytest.raises(BlobError, match=".*" + needle.replace("(", r"\(").replace(")", r"\)")):
        read_blob_header(data)


def test_the_compilers_refusal_is_one_line_naming_layer_and_type():
    words, layer, layer_type = clean_compiler_message(CUMSUM_ERROR)
    assert (layer, layer_type) == ("/CumSum_output_0", "CumSum")
    assert "\n" not in words and "jenkins" not in words and "GENERAL_ERROR" not in words
    assert words == 'Failed to compile layer "/CumSum_output_0": unsupported layer type "CumSum"'


def test_without_the_compiler_the_verdict_is_static_only(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESCOPE_MYRIAD_VENV", str(tmp_path / "no-venv"))
    ready, why = compiler_status()
    assert not ready and "make setup" in why
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not even onnx")
    result = compile_onnx(onnx, tmp_path / "m.blob")
    assert not result.compiled and not result.available and result.blob is None
    assert result.verdict.startswith(STATIC_ONLY) and "compatible" not in result.verdict
    assert not (tmp_path / "m.blob").exists()
    with pytest.raises(CompilerUnavailable):
        run_on_cpu_2021(onnx, np.zeros((1, 3, 8, 8), np.float32))


def test_a_set_up_that_found_no_python_says_why(tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    venv.mkdir()
    reason = "no Python 3.6-3.9 found (openvino 2021.4.2 ... needs one)"
    (venv / "status.json").write_text(json.dumps({"ok": False, "reason": reason}))
    monkeypatch.setenv("PRUNESCOPE_MYRIAD_VENV", str(venv))
    assert compiler_status() == (False, reason)
