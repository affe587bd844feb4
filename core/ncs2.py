"""Static NCS2 readiness check of an OpenVINO IR against the 2022.3 LTS MYRIAD plugin.

OpenVINO dropped the MYRIAD plugin after 2022.3 LTS, so an IR made with a current OpenVINO cannot be
tried on the stick from here. Instead the IR XML is read and every layer is checked against a table of
what the 2022.3 runtime can read and the MYRIAD plugin can compile (``ncs2_support.json``, compiled
from the 2022.x OpenVINO sources and docs it cites):

* op type and ``version="opsetN"``: 2022.3 reads opset1..opset10 only, so version drift such as
  MaxPool-14 (what ``ov.convert_model`` on a torch module writes today) is caught;
* per-op restrictions the XML lets us see (MaxPool-8 indices, Interpolate mode, MVN eps mode, ranks);
* weights stored as FP16 (the only model format the VPU takes), static shapes, batch 1.

Nothing here runs on a device; ops whose support is unconfirmed count as problems by default
(``strict=True``), so "compatible" means "every op is known to work on the 2022.3 MYRIAD plugin".
"""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from .errors import PruneScopeError

TABLE_PATH = Path(__file__).with_name("ncs2_support.json")
OK_STATUSES = {"yes", "yes_code"}
# f32 constants with at most this many elements are attributes (HardSigmoid alpha, a clamp bound), not weights.
MAX_F32_SCALAR_ELEMENTS = 1
INDEX_TYPES = {"i64", "i32"}
ALLOWED_INPUT_TYPES = {"f32", "f16", "u8"}
# Convert pairs the MYRIAD Convert stage implements, after i64/u64/u32/boolean are retyped to i32
# and f32 is computed as f16 (S1, S13 convert).
_CONVERT_RETYPE = {"i64": "i32", "u64": "i32", "u32": "i32", "boolean": "i32", "f32": "f16"}
_CONVERT_OK = {("u8", "f16"), ("f16", "f16"), ("i32", "f16"), ("f16", "i32"), ("i32", "u8"), ("i32", "i32")}


class Ncs2CheckError(PruneScopeError):
    """The IR file cannot be read for the NCS2 check (missing, not an OpenVINO IR XML)."""


@dataclass
class Ncs2Issue:
    layer: str
    type: str
    version: str
    reason: str
    severity: str = "error"  # error | unconfirmed | warning
    layer_id: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        where = f"layer '{self.layer}' ({self.type}, {self.version})" if self.type else self.layer
        return f"{where}: {self.reason}"


@dataclass
class Ncs2Report:
    xml_path: str
    compatible: bool
    problems: list[Ncs2Issue] = field(default_factory=list)
    warnings: list[Ncs2Issue] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)  # "Type-opsetN" -> count
    ir_version: str = ""
    inputs: dict[str, list] = field(default_factory=dict)
    constant_types: dict[str, int] = field(default_factory=dict)
    strict: bool = True
    target: str = ""

    def to_dict(self) -> dict:
        return {
            "xml_path": self.xml_path,
            "compatible": self.compatible,
            "problems": [p.to_dict() for p in self.problems],
            "warnings": [w.to_dict() for w in self.warnings],
            "ops": self.ops,
            "ir_version": self.ir_version,
            "inputs": self.inputs,
            "constant_types": self.constant_types,
            "strict": self.strict,
            "target": self.target,
        }

    def summary(self) -> str:
        if self.compatible:
            head = f"NCS2 (MYRIAD, OpenVINO 2022.3): compatible, {sum(self.ops.values())} layers checked"
            return head + (f", {len(self.warnings)} warning(s)." if self.warnings else ".")
        lines = [f"NCS2 (MYRIAD, OpenVINO 2022.3): NOT compatible, {len(self.problems)} problem(s):"]
        lines += [f"  - {p}" for p in self.problems[:20]]
        if len(self.problems) > 20:
            lines.append(f"  ... and {len(self.problems) - 20} more")
        return "\n".join(lines)


@lru_cache(maxsize=1)
def load_support_table() -> dict:
    """The MYRIAD 2022.3 support table shipped with the product."""
    return json.loads(TABLE_PATH.read_text(encoding="utf-8"))


def op_support(op_type: str, opset: int) -> tuple[str, str] | None:
    """(status, note) of ``op_type`` read from ``opsetN``, or None when the type is not in the table.

    ``status`` is ``"not_in_opset"`` when the type exists but not in that opset.
    """
    table = load_support_table()
    name = table["ir_type_aliases"].get(op_type, op_type)
    entry = table["ops"].get(name)
    if entry is None:
        lower = {k.lower(): v for k, v in table["ops"].items()}
        entry = lower.get(name.lower())
    if entry is None:
        return None
    for v in entry["versions"]:
        lo, hi = v["opsets"]
        if lo <= opset <= hi:
            return v["status"], " ".join(x for x in (v.get("note", ""), entry.get("notes", "")) if x)
    return "not_in_opset", entry.get("notes", "")


# ----------------------------------------------------------------------------- XML helpers


def _port_dims(port: ET.Element) -> list[str]:
    return [(d.text or "").strip() for d in port.findall("dim")]


def _is_dynamic_dim(d: str) -> bool:
    return d in ("", "?", "-1") or ".." in d or d.startswith("-")


def _shape_attr(shape: str) -> list[str]:
    shape = shape.strip()
    if shape == "":
        return []
    return [s.strip() for s in shape.split(",")]


def _numel(shape: list[str]) -> int | None:
    n = 1
    for d in shape:
        if not d.isdigit():
            return None
        n *= int(d)
    return n


def _parse_version(version: str, table: dict) -> int | None:
    m = re.fullmatch(r"opset(\d+)", version or "")
    if m:
        return int(m.group(1))
    if version == "experimental":
        return int(table.get("experimental_version_maps_to", 6))
    return None


def _ints(text: str | None) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text or "")]


# ----------------------------------------------------------------------------- the check


def check_ncs2(xml_path: str | Path, strict: bool = True) -> Ncs2Report:
    """Check an OpenVINO IR (.xml) against the OpenVINO 2022.3 MYRIAD plugin (NCS2).

    ``strict``: ops whose MYRIAD support is unconfirmed (docs and code disagree, never device-tested)
    count as problems; with ``strict=False`` they are warnings.
    """
    xml_path = Path(xml_path)
    root = _read_ir_root(xml_path)
    table = load_support_table()
    found = _Findings()
    ir_version = root.get("version", "")
    if ir_version not in {str(v) for v in table["target"]["ir_versions"]}:
        found.problems.append(Ncs2Issue("<net>", "", "", f"IR version {ir_version or '?'} cannot be read by OpenVINO "
                                        f"2022.3 (it reads IR v10 and v11)."))
    layers = root.find("layers").findall("layer")
    by_id = {layer.get("id"): layer for layer in layers}
    consumers, producers = _edges(root)
    for layer in layers:
        _check_layer(layer, xml_path, table, strict, found, consumers, producers, by_id)
    _report_dynamic_shapes(found)
    if len(found.inputs) > 1:
        found.warnings.append(Ncs2Issue("<net>", "", "", f"{len(found.inputs)} inputs; the export is meant for one "
                                        "image input.", "warning"))
    return Ncs2Report(
        xml_path=str(xml_path), compatible=not found.problems, problems=found.problems, warnings=found.warnings,
        ops=dict(sorted(found.ops.items())), ir_version=ir_version, inputs=found.inputs,
        constant_types=dict(found.const_types), strict=strict,
        target=f"{table['target']['plugin']}; {table['target']['runtime']}",
    )


@dataclass
class _Findings:
    """What the walk over the IR's layers collects: the issues by severity, the op and constant-type
    counts and the inputs for the report, and the dynamic-shape layers, which are reported after the walk
    (grouped, because one dynamic input makes every layer after it dynamic)."""

    problems: list[Ncs2Issue] = field(default_factory=list)
    warnings: list[Ncs2Issue] = field(default_factory=list)
    ops: Counter = field(default_factory=Counter)
    const_types: Counter = field(default_factory=Counter)
    inputs: dict[str, list] = field(default_factory=dict)
    dynamic_layers: list[tuple[ET.Element, list[str]]] = field(default_factory=list)
    dynamic_inputs: bool = False

    def issue(self, layer: ET.Element, reason: str, severity: str = "error") -> None:
        """Record one issue of ``layer``; a ``warning`` does not make the IR incompatible, anything else does."""
        item = Ncs2Issue(layer.get("name", ""), layer.get("type", ""), layer.get("version", ""), reason, severity,
                         layer.get("id", ""))
        (self.warnings if severity == "warning" else self.problems).append(item)


def _read_ir_root(xml_path: Path) -> ET.Element:
    """The IR's ``<net>`` element; a missing, unreadable or non-IR file is an ``Ncs2CheckError`` that names it,
    so the page says what is wrong with the file rather than showing a parser trace."""
    if not xml_path.is_file():
        raise Ncs2CheckError(f"IR file not found: {xml_path}")
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise Ncs2CheckError(f"{xml_path.name} is not a readable OpenVINO IR XML ({exc}).") from None
    if root.tag != "net" or root.find("layers") is None:
        raise Ncs2CheckError(f"{xml_path.name} is not an OpenVINO IR XML (no <net><layers>).")
    return root


def _edges(root: ET.Element) -> tuple[dict[tuple[str, str], list[str]], dict[str, list[str]]]:
    """The IR's edges both ways: the layers fed by each (layer, output port), and the layers feeding each
    layer. Some per-op checks depend on neighbours (e.g. whether MaxPool-8's indices output is used)."""
    consumers: dict[tuple[str, str], list[str]] = {}
    producers: dict[str, list[str]] = {}
    edges = root.find("edges")
    if edges is not None:
        for e in edges.findall("edge"):
            consumers.setdefault((e.get("from-layer"), e.get("from-port")), []).append(e.get("to-layer"))
            producers.setdefault(e.get("to-layer"), []).append(e.get("from-layer"))
    return consumers, producers


def _check_layer(layer: ET.Element, xml_path: Path, table: dict, strict: bool, found: _Findings,
                 consumers, producers, by_id) -> None:
    """All checks of one layer: dynamic outputs (noted for later), opset and support-table status, the
    per-op checks of what the XML shows, and the constant / input checks."""
    ltype, version = layer.get("type", ""), layer.get("version", "")
    found.ops[f"{ltype}-{version}"] += 1
    data = layer.find("data")
    attrs = dict(data.attrib) if data is not None else {}
    in_ports = layer.find("input")
    in_dims = [_port_dims(p) for p in in_ports.findall("port")] if in_ports is not None else []
    out_ports = layer.find("output")
    out_list = out_ports.findall("port") if out_ports is not None else []

    # dynamic shapes anywhere in the graph (reported after the walk, grouped)
    for p in out_list:
        dims = _port_dims(p)
        if any(_is_dynamic_dim(d) for d in dims) and ltype != "Parameter":
            found.dynamic_layers.append((layer, dims))
            break

    opset = _parse_version(version, table)
    status = _check_support(layer, ltype, version, opset, table, strict, found.issue)
    if status is None:  # the layer cannot even be read by the 2022.3 runtime: nothing more to check
        return
    # per-op checks of what the XML shows
    _specific_checks(layer, ltype, opset, attrs, in_dims, out_list, consumers, producers, by_id, found.issue, status)
    if ltype == "Const":
        _check_const(layer, attrs, xml_path, found)
    elif ltype == "Parameter":
        _check_parameter(layer, attrs, found)


def _check_support(layer: ET.Element, ltype: str, version: str, opset: int | None, table: dict, strict: bool,
                   issue) -> str | None:
    """The layer's status in the MYRIAD support table, after recording why it fails or is doubtful; None
    when the 2022.3 runtime cannot create the layer at all (unknown opset, too new, not in the table)."""
    max_opset = int(table["target"]["max_opset"])
    if opset is None:
        issue(layer, f"version '{version}' is not a standard opset; the 2022.3 runtime cannot create it.")
        return None
    if opset > max_opset:
        issue(layer, f"{ltype} from opset{opset} cannot be read by OpenVINO 2022.3 (it knows opset1..opset{max_opset}), "
              "and no equivalent older op was written for it: this model cannot be made NCS2-ready as it is; "
              "replace that layer in the model, or deploy the fallback on a CPU.")
        return None
    support = op_support(ltype, opset)
    if support is None:
        issue(layer, f"op type {ltype} is not in the MYRIAD 2022.3 support table.")
        return None
    status, note = support
    if status == "not_in_opset":
        issue(layer, f"{ltype} does not exist in opset{opset}; the 2022.3 IR reader would refuse it.")
        return None
    if status == "no":
        issue(layer, f"not supported by the MYRIAD plugin. {note}".strip())
    elif status == "unconfirmed":
        issue(layer, f"MYRIAD support unconfirmed (never verified on a device). {note}".strip(),
              "unconfirmed" if strict else "warning")
    elif status == "folded_only":
        issue(layer, f"compiles only if constant-folded on the device. {note}".strip(), "warning")
    return status


def _check_const(layer: ET.Element, attrs: dict, xml_path: Path, found: _Findings) -> None:
    """A constant's element type: the NCS2 computes in FP16, so FP32 weights (beyond scalars) and quantized
    constants are problems; the hint says whether FP16 compression will do or the values are too large."""
    et = attrs.get("element_type", "?")
    found.const_types[et] += 1
    shape = _shape_attr(attrs.get("shape", ""))
    n = _numel(shape)
    if et in ("f32", "f64", "bf16"):
        if n is None or n > MAX_F32_SCALAR_ELEMENTS:
            peak = _const_peak(xml_path, attrs, et)
            hint = ("save with compress_to_fp16=True" if peak is None or peak < 1000 else
                    f"its values reach {peak:.4g}: OpenVINO keeps constants it judges unsafe in FP16 as FP32; "
                    "the NCS2 computes in FP16 (largest value 65504), so rescale the layer")
            found.issue(layer, f"constant stored as {et} with shape [{','.join(shape)}]; NCS2 weights must be FP16 "
                        f"({hint}).")
    elif et in ("i8", "u8", "i4", "u4", "u1", "nf4", "f8e4m3", "f8e5m2"):
        found.issue(layer, f"constant stored as {et}: quantized (INT8/low-bit) models are not supported on the NCS2.")
    elif et not in ("f16",) and et not in INDEX_TYPES and et != "boolean":
        found.issue(layer, f"constant element type {et} is not FP16 or an index type.")


def _check_parameter(layer: ET.Element, attrs: dict, found: _Findings) -> None:
    """An input: the NCS2 needs a static shape, batch 1, and an element type MYRIAD accepts. A dynamic
    input is remembered so the dynamic layers after it are reported as one problem with its cause."""
    shape = _shape_attr(attrs.get("shape", ""))
    found.inputs[layer.get("name", "")] = shape
    et = attrs.get("element_type", "?")
    if any(_is_dynamic_dim(d) for d in shape) or attrs.get("shape", "").strip() == "...":
        found.dynamic_inputs = True
        found.issue(layer, f"input shape [{','.join(shape)}] is not static; the NCS2 needs a fixed input shape.")
    elif len(shape) >= 2 and shape[0] != "1":
        found.issue(layer, f"batch is {shape[0]}; export with batch 1 for the NCS2.")
    if et not in ALLOWED_INPUT_TYPES:
        found.issue(layer, f"input element type {et} is not accepted by MYRIAD (f32, f16 or u8).")


def _report_dynamic_shapes(found: _Findings) -> None:
    """Dynamic output shapes: one problem naming the cause when the input is dynamic (every layer after it
    is), else one issue per layer for the first ten and a count of the rest, so the report stays readable."""
    if not found.dynamic_layers:
        return
    if found.dynamic_inputs:
        first, dims = found.dynamic_layers[0]
        found.problems.append(Ncs2Issue(
            first.get("name", ""), first.get("type", ""), first.get("version", ""),
            f"{len(found.dynamic_layers)} layer(s) have dynamic output shapes (e.g. [{','.join(dims)}]) because the "
            "input shape is dynamic; export with a static 1xCxHxW input.", "error", first.get("id", "")))
        return
    for lay, dims in found.dynamic_layers[:10]:
        found.issue(lay, f"output shape [{','.join(dims)}] is dynamic; MYRIAD needs static shapes.")
    if len(found.dynamic_layers) > 10:
        found.problems.append(Ncs2Issue("<net>", "", "", f"... and {len(found.dynamic_layers) - 10} more layers "
                                        "with dynamic shapes."))


def _specific_checks(layer, ltype, opset, attrs, in_dims, out_list, consumers, producers, by_id, issue, status) -> None:
    rank = len(in_dims[0]) if in_dims else None
    if ltype == "MaxPool" and opset >= 8:
        dil = _ints(attrs.get("dilations"))
        if any(d != 1 for d in dil):
            issue(layer, f"MaxPool-8 with dilations {dil}: MYRIAD can only run it after downgrading to MaxPool-1, "
                  "which needs every dilation = 1.")
        if len(out_list) > 1 and consumers.get((layer.get("id"), out_list[1].get("id"))):
            issue(layer, "MaxPool-8 indices output is used; MYRIAD can only run MaxPool-8 as MaxPool-1 "
                  "(no indices output).")
    if ltype in ("Convolution", "AvgPool", "MaxPool") and rank == 5:
        issue(layer, f"3D {ltype} (5D input): docs say Not Supported, code has a SW path; unconfirmed.", "unconfirmed")
    if ltype in ("GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData") and rank == 5:
        issue(layer, f"3D {ltype} is not supported by MYRIAD (2D only).")
    if ltype == "Interpolate":
        mode = attrs.get("mode", "").lower()
        ok_modes = ("nearest", "linear", "linear_onnx") if opset >= 4 else ("nearest", "linear")
        if mode and mode not in ok_modes:
            issue(layer, f"Interpolate mode '{mode}' is not supported by MYRIAD (only {', '.join(ok_modes)}).")
        if any(_ints(attrs.get("pads_begin"))) or any(_ints(attrs.get("pads_end"))):
            issue(layer, "Interpolate with non-zero pads is not supported by MYRIAD.")
        if rank is not None and rank not in (3, 4):
            issue(layer, f"Interpolate on a {rank}D tensor; MYRIAD takes 3D/4D only.")
    if ltype == "MVN" and opset >= 6:
        if attrs.get("eps_mode", "outside_sqrt").lower() != "outside_sqrt":
            issue(layer, f"MVN eps_mode '{attrs.get('eps_mode')}': MYRIAD implements outside_sqrt only.")
        if rank is not None and rank not in (3, 4):
            issue(layer, f"MVN on a {rank}D tensor; MYRIAD takes 3D/4D only.")
    if ltype == "Pad" and rank is not None:
        if rank == 3:
            issue(layer, "Pad on a 3D tensor: the parser accepts it but the docs say 4D only.", "warning")
        elif rank != 4:
            issue(layer, f"Pad on a {rank}D tensor; MYRIAD takes 3D/4D only.")
    if ltype == "Gather" and opset >= 7 and int(attrs.get("batch_dims", "0") or 0) != 0:
        issue(layer, "Gather with batch_dims != 0 cannot be downgraded to Gather-1 for MYRIAD.")
    if ltype in ("MatMul",) and in_dims and any(len(d) > 4 for d in in_dims):
        issue(layer, "MatMul with an input of rank > 4; MYRIAD GEMM takes ranks 2-4.")
    if ltype == "Concat" and attrs.get("axis") in ("0",) and rank and rank > 1:
        issue(layer, "Concat over axis 0 (batch): the MYRIAD test for it is disabled.", "warning")
    if ltype == "Convert" and in_dims:
        # a Convert fed by a Const (FP16 weight decompression) is constant-folded: nothing runs on the device
        src = by_id.get((producers.get(layer.get("id")) or [None])[0])
        if src is not None and src.get("type") != "Const":
            in_prec = _precision_of(layer)
            dst = _CONVERT_RETYPE.get(attrs.get("destination_type", ""), attrs.get("destination_type", ""))
            if in_prec and (_CONVERT_RETYPE.get(in_prec, in_prec), dst) not in _CONVERT_OK:
                issue(layer, f"Convert {in_prec} -> {attrs.get('destination_type')}: the MYRIAD Convert stage only does "
                      "U8->FP16, FP16<->FP32, S32<->FP16, S32->U8.", "warning")
    if status == "partial" and ltype not in ("MaxPool", "Convert", "Interpolate", "MVN", "Pad", "Gather"):
        issue(layer, "supported with restrictions the static check cannot fully verify: "
              + (op_support(ltype, opset) or ("", ""))[1], "warning")


def _const_peak(xml_path: Path, attrs: dict, et: str) -> float | None:
    """Largest |value| of an f32/f64 constant, read from the IR's .bin; None when unreadable."""
    import numpy as np

    dtype = {"f32": np.float32, "f64": np.float64}.get(et)
    bin_path = xml_path.with_suffix(".bin")
    try:
        offset, size = int(attrs["offset"]), int(attrs["size"])
        if dtype is None or not bin_path.is_file():
            return None
        with open(bin_path, "rb") as f:
            f.seek(offset)
            values = np.frombuffer(f.read(size), dtype=dtype)
        return float(np.max(np.abs(values))) if values.size else None
    except (KeyError, ValueError, OSError):
        return None


_PRECISION_TO_ET = {"FP32": "f32", "FP16": "f16", "I64": "i64", "I32": "i32", "U8": "u8", "I8": "i8", "BOOL": "boolean",
                    "U32": "u32", "U64": "u64", "FP64": "f64", "BF16": "bf16"}


def _precision_of(layer: ET.Element) -> str | None:
    ports = layer.find("input")
    if ports is None:
        return None
    port = ports.find("port")
    if port is None:
        return None
    return _PRECISION_TO_ET.get((port.get("precision") or "").upper())
