"""Intel's own MYRIAD compiler (OpenVINO 2021.4.2) as PruneScope's judge of NCS2 readiness.

OpenVINO dropped the NCS2 after 2022.3 and the project's runtime (2026) has no MYRIAD plugin, but the
``openvino==2021.4.2`` wheel does, and it compiles an ONNX file into an NCS2 ``.blob`` offline, for the
MA2480 (Myriad X) named by ``VPU_MYRIAD_PLATFORM``, without a stick. That wheel needs Python <= 3.9, so it
lives in its own venv (``.venv-myriad``, built by ``scripts/setup-myriad.sh``) and runs in a worker
process (``core/myriad_worker.py``): one process per job, so the two models of a bundle compile in
parallel.

What this module gives:

* :func:`compile_onnx` / :func:`compile_many`: ONNX file(s) -> ``.blob`` with the compiler's verdict
  (:class:`CompileResult`): compiled with N stages, or refused with the failing layer and the compiler's
  words (``unsupported layer type "CumSum"``). Each blob's VPU header is checked (:func:`read_blob_header`).
  Results are cached by the sha256 of the ONNX bytes (plus platform and compiler version) under
  ``<workspace>/cache/myriad/``: the compiler is deterministic (the same input gives a byte-identical blob),
  and each compile costs ~5 s of a fixed device search.
* :func:`run_on_cpu_2021`: the same ONNX file on the 2021.4 CPU plugin (``ENFORCE_BF16=NO``), a second,
  older runtime to cross-check an export against PyTorch.
* :func:`compiler_status`: whether the compiler is set up here, and if not, the one line saying why.

``PRUNESCOPE_MYRIAD_VENV`` points at another venv (tests use a missing one to see the static-only path).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import PruneScopeError

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("myriad_worker.py")
PLATFORM = "VPU_MYRIAD_2480"  # Myriad X (MA2480), the NCS2's chip
CHIP = "NCS2 (Myriad X)"
BLOB_MAGIC = 9709
ELF_HEADER_BYTES = 52  # the VPU blob header follows a 32-bit ELF header
COMPILE_TIMEOUT_S = 900
STATIC_ONLY = "not verified by the NCS2 compiler (static check only)"


class CompilerUnavailable(PruneScopeError):
    """The MYRIAD compiler environment is not set up here (no Python <= 3.9, no wheel, ...)."""


class BlobError(PruneScopeError):
    """A file is not a well-formed MYRIAD blob (wrong magic, size, input or output count)."""


def venv_dir() -> Path:
    return Path(os.environ.get("PRUNESCOPE_MYRIAD_VENV") or ROOT / ".venv-myriad")


def compiler_status() -> tuple[bool, str]:
    """(ready, description): ``(True, "OpenVINO 2021.4.2 MYRIAD compiler")`` once the set-up proved it by
    compiling a test network, else ``(False, why not)`` in one line naming what to do."""
    venv = venv_dir()
    status_file = venv / "status.json"
    try:
        status = json.loads(status_file.read_text())
    except (OSError, ValueError):
        return False, f"the MYRIAD compiler environment ({venv.name}) is not set up; run `make setup`"
    if not status.get("ok"):
        return False, str(status.get("reason") or "the MYRIAD compiler set-up failed; rerun `make setup`")
    if not (venv / "bin" / "python").exists() or not (venv / "myriad_shim.so").is_file():
        return False, f"{venv.name} is incomplete; run `make clean-myriad setup`"
    return True, str(status.get("compiler") or "OpenVINO 2021.4.2 MYRIAD compiler")


def compiler_version() -> str:
    try:
        return str(json.loads((venv_dir() / "status.json").read_text()).get("openvino", "?"))
    except (OSError, ValueError):
        return "?"


# ----------------------------------------------------------------------------- the blob


@dataclass
class BlobHeader:
    """The VPU blob header (after the ELF header), as the MYRIAD plugin writes it."""
    magic: int
    file_size: int
    version: tuple[int, int]
    inputs: int
    outputs: int
    stages: int
    number_of_shaves: int
    has_hw_stage: bool
    has_shave_stage: bool


def read_blob_header(data: bytes) -> BlobHeader:
    """Parse and check a blob: magic 9709, its own size equal to the file's, one input, one output, >= 1 stage.

    Raises :class:`BlobError` naming what is wrong.
    """
    if len(data) < ELF_HEADER_BYTES + 4 * 16 or data[:4] != b"\x7felf":
        raise BlobError(f"not a MYRIAD blob ({len(data)} bytes, no VPU ELF header)")
    f = struct.unpack_from("<16I", data, ELF_HEADER_BYTES)
    header = BlobHeader(magic=f[0], file_size=f[1], version=(f[2], f[3]), inputs=f[4], outputs=f[5], stages=f[6],
                        number_of_shaves=f[12], has_hw_stage=bool(f[13]), has_shave_stage=bool(f[14]))
    if header.magic != BLOB_MAGIC:
        raise BlobError(f"blob magic is {header.magic}, not {BLOB_MAGIC}")
    if header.file_size != len(data):
        raise BlobError(f"blob header says {header.file_size} bytes, the file has {len(data)}")
    if (header.inputs, header.outputs) != (1, 1):
        raise BlobError(f"blob has {header.inputs} input(s) and {header.outputs} output(s), expected 1 and 1")
    if header.stages < 1:
        raise BlobError("blob has no stages")
    return header


# ----------------------------------------------------------------------------- compiling


@dataclass
class CompileResult:
    """The MYRIAD compiler's verdict on one ONNX file.

    ``compiled``: a blob was written and its header checked (``blob``, ``blob_bytes``, ``stages``).
    ``available`` False: the compiler is not set up here, so nothing was judged (``verdict`` says
    "not verified by the NCS2 compiler (static check only)"). Otherwise ``layer`` / ``layer_type`` /
    ``error`` carry the compiler's refusal.
    """
    compiled: bool
    available: bool
    verdict: str
    compiler: str = ""
    platform: str = PLATFORM
    blob: str | None = None
    blob_bytes: int = 0
    blob_sha256: str | None = None
    stages: int = 0
    has_hw_stage: bool = False
    layer: str | None = None
    layer_type: str | None = None
    error: str | None = None
    seconds: float = 0.0
    cached: bool = False
    onnx_sha256: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def clean_compiler_message(text: str) -> tuple[str, str | None, str | None]:
    """(one line of the compiler's words, failing layer, unsupported layer type) from an exception text.

    Drops the ``[ GENERAL_ERROR ]`` tag and the build machine's source paths (``/home/jenkins/...cpp:441``).
    """
    text = re.sub(r"\[\s*[A-Z_]+\s*\]", " ", text or "")
    text = re.sub(r"(/[\w.+-]+)+\.(cpp|hpp|h):\d+", " ", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    words = " ".join(lines) or "the compiler gave no reason"
    words = re.sub(r"\s+", " ", words)[:400]
    m = re.search(r'Failed to compile layer "([^"]+)"', words)
    layer = m.group(1) if m else None
    t = re.search(r'unsupported layer type "([^"]+)"', words)
    return words, layer, t.group(1) if t else None


def _onnx_digest(onnx_path: Path) -> str:
    """sha256 of what the compiler reads: the ONNX file (and its external data), or an IR's .xml and .bin."""
    h = hashlib.sha256()
    for p in (onnx_path, onnx_path.with_name(onnx_path.name + ".data"), onnx_path.with_suffix(".bin")):
        if p.is_file():
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    from .workspace import workspace_root

    return workspace_root() / "cache" / "myriad"


def _cache_key(onnx_digest: str, platform: str) -> str:
    return hashlib.sha256(f"{onnx_digest}|{platform}|{compiler_version()}".encode()).hexdigest()[:32]


def _size_text(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{max(1, round(n / 1e3))} KB"


def _verdict_ok(compiler: str, nbytes: int, stages: int) -> str:
    return f"compiled for {CHIP} by the {compiler}: {_size_text(nbytes)}, {stages} stages"


def _verdict_refused(compiler: str, words: str, layer: str | None, layer_type: str | None) -> str:
    if layer and layer_type:
        return f"the {compiler} refuses layer \"{layer}\": unsupported layer type \"{layer_type}\""
    return f"the {compiler} refuses it: {words}"


def _unavailable(reason: str) -> CompileResult:
    return CompileResult(compiled=False, available=False, verdict=f"{STATIC_ONLY}: {reason}")


def compile_onnx(onnx_path: str | Path, blob_path: str | Path, platform: str = PLATFORM,
                 use_cache: bool = True) -> CompileResult:
    """Compile one ONNX file into ``blob_path`` for the NCS2; see :func:`compile_many`."""
    return compile_many([(onnx_path, blob_path)], platform, use_cache)[0]


def compile_many(jobs: list[tuple[str | Path, str | Path]], platform: str = PLATFORM,
                 use_cache: bool = True) -> list[CompileResult]:
    """Compile each ``(onnx_path, blob_path)`` with the MYRIAD compiler, the uncached ones in parallel processes.

    Never raises for what the compiler says: a refusal is a result (``compiled=False``, the layer named).
    Without the compiler every result has ``available=False``. A blob written is left at ``blob_path``
    only when its header checks out; a refused model leaves no file there.
    """
    ready, description = compiler_status()
    if not ready:
        return [_unavailable(description) for _ in jobs]
    results: list[CompileResult | None] = [None] * len(jobs)
    running = []
    same: dict[int, int] = {}  # job -> an earlier job with the same input: compiled once, its blob copied
    first: dict[str, int] = {}
    for i, (onnx, blob) in enumerate(jobs):
        onnx, blob = Path(onnx), Path(blob)
        if not onnx.is_file():
            raise PruneScopeError(f"ONNX file not found for the MYRIAD compiler: {onnx}")
        digest = _onnx_digest(onnx)
        key = _cache_key(digest, platform)
        if key in first:
            same[i] = first[key]
            continue
        first[key] = i
        cached = _from_cache(key, blob, description) if use_cache else None
        if cached is not None:
            cached.onnx_sha256 = digest
            results[i] = cached
            continue
        blob.parent.mkdir(parents=True, exist_ok=True)
        tmp_blob = blob.with_name(f".{blob.name}.{uuid.uuid4().hex[:8]}.tmp")
        proc = subprocess.Popen([str(venv_dir() / "bin" / "python"), str(WORKER), "compile", str(onnx), str(tmp_blob),
                                 platform], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_worker_env())
        running.append((i, proc, tmp_blob, blob, key, digest, time.monotonic()))
    for i, proc, tmp_blob, blob, key, digest, start in running:
        try:
            out, err = proc.communicate(timeout=max(1.0, COMPILE_TIMEOUT_S - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            tmp_blob.unlink(missing_ok=True)
            results[i] = CompileResult(False, True, f"the {description} did not finish within {COMPILE_TIMEOUT_S} s",
                                       compiler=description, error="timed out", platform=platform)
            continue
        results[i] = _finish(out, err, proc.returncode, tmp_blob, blob, description, platform,
                             time.monotonic() - start)
        results[i].onnx_sha256 = digest
        if use_cache and results[i].error != "worker failed":
            _to_cache(key, results[i], blob)
    for i, j in same.items():
        results[i] = _copy_result(results[j], Path(jobs[i][1]))
    return [r for r in results if r is not None]


def _copy_result(result: CompileResult, blob: Path) -> CompileResult:
    """The result of compiling the same bytes again: the same verdict, the blob copied to ``blob``."""
    copy = CompileResult(**result.to_dict())
    if result.compiled and result.blob:
        blob.parent.mkdir(parents=True, exist_ok=True)
        tmp = blob.with_name(f".{blob.name}.{uuid.uuid4().hex[:8]}.tmp")
        shutil.copyfile(result.blob, tmp)
        os.replace(tmp, blob)
        copy.blob = str(blob)
    return copy


def _worker_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "LD_PRELOAD"))}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    return env


def _finish(out: str, err: str, returncode: int, tmp_blob: Path, blob: Path, compiler: str, platform: str,
            seconds: float) -> CompileResult:
    try:
        reply = json.loads((out or "").strip().splitlines()[-1])
    except (ValueError, IndexError):
        tmp_blob.unlink(missing_ok=True)
        words, _, _ = clean_compiler_message((err or "")[-600:] or f"exit code {returncode}")
        return CompileResult(False, True, f"the {compiler} worker failed: {words}", compiler=compiler,
                             error="worker failed", platform=platform, seconds=seconds)
    if not reply.get("ok"):
        tmp_blob.unlink(missing_ok=True)
        words, layer, layer_type = clean_compiler_message(str(reply.get("error", "")))
        verdict = (f"the {compiler} cannot read it: {words}" if reply.get("stage") == "read" else
                   _verdict_refused(compiler, words, layer, layer_type))
        return CompileResult(False, True, verdict, compiler=compiler,
                             layer=layer, layer_type=layer_type, error=words, platform=platform, seconds=seconds)
    try:
        data = tmp_blob.read_bytes()
        header = read_blob_header(data)
    except (OSError, BlobError) as exc:
        tmp_blob.unlink(missing_ok=True)
        return CompileResult(False, True, f"the {compiler} wrote no valid blob: {exc}", compiler=compiler,
                             error=str(exc), platform=platform, seconds=seconds)
    os.replace(tmp_blob, blob)
    return CompileResult(True, True, _verdict_ok(compiler, len(data), header.stages), compiler=compiler,
                         blob=str(blob), blob_bytes=len(data), blob_sha256=hashlib.sha256(data).hexdigest(),
                         stages=header.stages, has_hw_stage=header.has_hw_stage, platform=platform,
                         seconds=round(seconds, 2))


def _from_cache(key: str, blob: Path, compiler: str) -> CompileResult | None:
    folder = cache_dir()
    try:
        record = json.loads((folder / f"{key}.json").read_text())
        result = CompileResult(**{k: v for k, v in record.items() if k in CompileResult.__dataclass_fields__})
        if result.compiled:
            data = (folder / f"{key}.blob").read_bytes()
            if hashlib.sha256(data).hexdigest() != result.blob_sha256:
                return None  # a damaged cache entry is recompiled, never used
            read_blob_header(data)
            blob.parent.mkdir(parents=True, exist_ok=True)
            tmp = blob.with_name(f".{blob.name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, blob)
            result.blob = str(blob)
    except (OSError, ValueError, TypeError, BlobError):
        return None
    result.cached = True
    result.compiler = compiler
    return result


def _to_cache(key: str, result: CompileResult, blob: Path) -> None:
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if result.compiled:
            tmp = folder / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
            shutil.copyfile(blob, tmp)
            os.replace(tmp, folder / f"{key}.blob")
        record = {k: v for k, v in result.to_dict().items() if k not in ("blob", "cached")}
        tmp = folder / f".{key}.{uuid.uuid4().hex[:8]}.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, folder / f"{key}.json")
    except OSError:
        pass  # a cache that cannot be written only costs the next export a compile


# ----------------------------------------------------------------------------- the 2021.4 CPU plugin


def run_on_cpu_2021(onnx_path: str | Path, inputs: np.ndarray, timeout_s: float = 600) -> np.ndarray:
    """Outputs [N, ...] of the ONNX file on the OpenVINO 2021.4 CPU plugin (f32, ``ENFORCE_BF16=NO``).

    ``inputs``: float32 [N, C, H, W], already normalised. Raises :class:`CompilerUnavailable` when the
    2021.4 environment is not set up, :class:`PruneScopeError` (one line) when it cannot run the file.
    """
    ready, description = compiler_status()
    if not ready:
        raise CompilerUnavailable(description)
    with tempfile.TemporaryDirectory(prefix="prunescope-cpu2021-") as tmp:
        in_path, out_path = Path(tmp) / "inputs.npy", Path(tmp) / "outputs.npy"
        np.save(in_path, np.ascontiguousarray(inputs, dtype=np.float32))
        try:
            proc = subprocess.run([str(venv_dir() / "bin" / "python"), str(WORKER), "cpu", str(onnx_path), str(in_path),
                                   str(out_path)], capture_output=True, text=True, timeout=timeout_s, env=_worker_env())
        except subprocess.TimeoutExpired:
            raise PruneScopeError(f"the OpenVINO 2021.4 CPU plugin did not finish within {timeout_s:.0f} s") from None
        try:
            reply = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            reply = {"ok": False, "error": proc.stderr[-400:] or f"exit code {proc.returncode}"}
        if not reply.get("ok"):
            words, _, _ = clean_compiler_message(str(reply.get("error", "")))
            raise PruneScopeError(f"the OpenVINO 2021.4 CPU plugin could not run {Path(onnx_path).name}: {words}")
        return np.load(out_path)
