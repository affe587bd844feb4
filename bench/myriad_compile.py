"""Compile time, blob size and stage count of every bundled sample under Intel's MYRIAD compiler (issue 24).

    python bench/myriad_compile.py            # each sample's ONNX export, compiled twice without the cache
    python bench/myriad_compile.py --json

Each sample goes the export route (ONNX opset 13, as ``core.export`` writes it) and is compiled by
``core.ncs2_compiler`` for the MA2480 (NCS2), twice, with the cache off: the seconds of both compiles, the
blob's size and stage count from its checked header, and whether the two blobs are byte-identical. Then a
third call shows what the cache (by the ONNX file's sha256) costs. Needs ``make setup`` to have built
.venv-myriad; says so in one line when it could not.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, parser, table  # the repo on sys.path

SAMPLES = ("vgg_digits", "resnet_shapes", "cifar10", "ssd_counting")


def export(name: str, out: Path) -> str:
    from core.export import convert_to_ir, export_model
    from core.models import load_model

    if name == "ssd_counting":
        from core.tasks.detection.sample_model import load_sample_detector

        model, entry = load_sample_detector(name)
        return convert_to_ir(model, (1, 3, *entry["input_size"][-2:]), out)["onnx"]
    loaded = load_model(f"sample:{name}")
    return export_model(loaded.model, loaded.spec, out)["onnx"]


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from core.ncs2_compiler import compile_onnx, compiler_status

    ready, why = compiler_status()
    if not ready:
        print(f"error: the NCS2 compiler is not set up here: {why}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PRUNESCOPE_WORKSPACE"] = str(Path(tmp) / "workspace")  # a fresh, empty cache
        for name in SAMPLES:
            folder = Path(tmp) / name
            onnx = export(name, folder)
            a = compile_onnx(onnx, folder / "a.blob", use_cache=False)
            b = compile_onnx(onnx, folder / "b.blob", use_cache=False)
            compile_onnx(onnx, folder / "c.blob")  # fills the cache
            start = time.perf_counter()
            cached = compile_onnx(onnx, folder / "d.blob")
            cache_s = time.perf_counter() - start
            same = a.compiled and (folder / "a.blob").read_bytes() == (folder / "b.blob").read_bytes()
            rows.append({"sample": name, "compiled": a.compiled, "compile_s": round(a.seconds, 2),
                         "again_s": round(b.seconds, 2), "cached_s": round(cache_s, 3), "cache_hit": cached.cached,
                         "blob_kb": round(a.blob_bytes / 1e3, 1), "stages": a.stages, "identical": same,
                         "verdict": a.verdict})
    if args.json:
        print(json.dumps({"machine": machine(), "rows": rows}))
    else:
        print(machine())
        print(table(rows, ["sample", "compiled", "compile_s", "again_s", "cached_s", "cache_hit", "blob_kb", "stages",
                           "identical"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
