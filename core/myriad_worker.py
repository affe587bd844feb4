"""Worker run by core/ncs2_compiler.py inside .venv-myriad (Python 3.6-3.9, openvino 2021.4.2).

It is not imported by PruneScope (whose Python is 3.11): it runs as its own process, one job per
process, and prints exactly one JSON object on stdout.

    python myriad_worker.py compile MODEL.onnx OUT.blob [PLATFORM]
        Compile with the MYRIAD plugin for PLATFORM (default VPU_MYRIAD_2480, the Myriad X of the
        NCS2) without a device, and write the blob. {"ok": true, "seconds": s} or
        {"ok": false, "error": "<the compiler's words>"}.
    python myriad_worker.py cpu MODEL.onnx INPUTS.npy OUTPUTS.npy
        Run the ONNX file on the 2021.4 CPU plugin (ENFORCE_BF16=NO: f32 arithmetic), one input row
        at a time; write the outputs [N, ...] as float32. {"ok": true, ...} or {"ok": false, "error"}.
    python myriad_worker.py selftest
        Compile a small convolution network built in memory; what scripts/setup-myriad.sh runs to
        prove the set-up. {"ok": true, "compiler": ..., "blob_bytes": n, "stages": n, ...}.

Compiling needs core/myriad_shim.cpp built as <venv>/myriad_shim.so: it is loaded into the global
symbol scope before openvino is imported, so the binding's createInferRequests (which needs a
device) becomes a no-op. The cpu job does not load it (it needs its infer requests).
"""
import ctypes
import json
import os
import struct
import sys
import time

DEFAULT_PLATFORM = "VPU_MYRIAD_2480"


def _shim_path():
    return os.path.join(sys.prefix, "myriad_shim.so")


def _load_shim():
    path = _shim_path()
    if not os.path.isfile(path):
        raise RuntimeError("%s is missing; run scripts/setup-myriad.sh (make setup)" % path)
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def _openvino_version():
    from openvino.inference_engine import get_version
    return get_version()


def compile_network(net, blob_path, platform):
    from openvino.inference_engine import IECore

    ie = IECore()
    exec_net = ie.load_network(net, "MYRIAD", {"VPU_MYRIAD_PLATFORM": platform})
    tmp = blob_path + ".tmp%d" % os.getpid()
    exec_net.export(tmp)
    os.replace(tmp, blob_path)


def job_compile(onnx_path, blob_path, platform=DEFAULT_PLATFORM):
    _load_shim()
    from openvino.inference_engine import IECore

    start = time.time()
    try:
        net = IECore().read_network(onnx_path)
    except Exception as exc:
        return {"ok": False, "stage": "read", "error": str(exc)}
    try:
        compile_network(net, blob_path, platform)
    except Exception as exc:
        return {"ok": False, "stage": "compile", "error": str(exc), "seconds": time.time() - start}
    return {"ok": True, "seconds": time.time() - start, "openvino": _openvino_version(), "platform": platform}


def job_cpu(onnx_path, inputs_path, outputs_path):
    import numpy as np
    from openvino.inference_engine import IECore

    start = time.time()
    try:
        ie = IECore()
        net = ie.read_network(onnx_path)
        exec_net = ie.load_network(net, "CPU", {"ENFORCE_BF16": "NO"})
        in_name = next(iter(net.input_info))
        out_name = next(iter(net.outputs))
        inputs = np.load(inputs_path)
        rows = [np.array(exec_net.infer({in_name: inputs[i:i + 1]})[out_name], dtype=np.float32)
                for i in range(len(inputs))]
    except Exception as exc:
        return {"ok": False, "error": str(exc)}
    out = np.stack([r.reshape(r.shape[1:]) for r in rows]) if rows else np.zeros((0,), np.float32)
    np.save(outputs_path, out)
    return {"ok": True, "seconds": time.time() - start, "n": len(rows), "openvino": _openvino_version(),
            "device": "OpenVINO 2021.4 CPU plugin (ENFORCE_BF16=NO, f32 arithmetic)"}


def job_selftest():
    """Compile conv-relu-pool in memory; the blob's header must name 1 input, 1 output and its own size."""
    _load_shim()
    import numpy as np
    import ngraph as ng
    from ngraph.impl import Function
    from openvino.inference_engine import IENetwork

    x = ng.parameter([1, 3, 16, 16], np.float32, name="input")
    w = ng.constant(np.full((8, 3, 3, 3), 0.1, np.float32))
    y = ng.relu(ng.convolution(x, w, [1, 1], [1, 1], [1, 1], [1, 1]))
    y = ng.max_pool(y, [2, 2], [0, 0], [0, 0], [2, 2])
    net = IENetwork(Function.to_capsule(Function([y], [x], "prunescope_selftest")))
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "prunescope-myriad-selftest-%d.blob" % os.getpid())
    start = time.time()
    try:
        compile_network(net, path, DEFAULT_PLATFORM)
        with open(path, "rb") as f:
            data = f.read()
    except Exception as exc:
        return {"ok": False, "reason": "the test network did not compile: %s" % str(exc)[-300:]}
    finally:
        if os.path.exists(path):
            os.remove(path)
    magic, size, _, _, n_in, n_out, stages = struct.unpack_from("<7I", data, 52)
    if magic != 9709 or size != len(data) or (n_in, n_out) != (1, 1):
        return {"ok": False, "reason": "the test blob's header is wrong (magic %d, size %d of %d, %d in, %d out)"
                % (magic, size, len(data), n_in, n_out)}
    version = _openvino_version()
    return {"ok": True, "compiler": "OpenVINO %s MYRIAD compiler" % version.split("-")[0], "openvino": version,
            "python": sys.version.split()[0], "platform": DEFAULT_PLATFORM, "blob_bytes": len(data),
            "stages": stages, "seconds": round(time.time() - start, 2)}


def main(argv):
    # The plugins print warnings on the C stdout ("Deprecated option was used"): fd 1 goes to stderr
    # for the job, and the one JSON line goes to the real stdout.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    if not argv:
        out.write(json.dumps({"ok": False, "error": "usage: myriad_worker.py compile|cpu|selftest ..."}) + "\n")
        return 2
    cmd, args = argv[0], argv[1:]
    try:
        if cmd == "compile" and len(args) in (2, 3):
            result = job_compile(*args)
        elif cmd == "cpu" and len(args) == 3:
            result = job_cpu(*args)
        elif cmd == "selftest" and not args:
            result = job_selftest()
        else:
            result = {"ok": False, "error": "unknown job %r with %d argument(s)" % (cmd, len(args))}
    except Exception as exc:  # one JSON object whatever happens; the caller turns it into one line
        result = {"ok": False, "error": "%s: %s" % (type(exc).__name__, exc)}
    out.write(json.dumps(result) + "\n")
    out.flush()
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
