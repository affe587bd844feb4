"""Rewrites of a converted OpenVINO model into op versions the NCS2's runtime (OpenVINO 2022.3) can read.

Today's converters write every ``nn.Upsample`` / ``F.interpolate`` as Interpolate-11 (opset11), whichever
ONNX opset the model was exported at (measured with OpenVINO 2026.4 at ONNX opsets 10, 11 and 13, nearest
and bilinear alike); the 2022.3 runtime, the last with the MYRIAD plugin, only reads up to Interpolate-4.
With a static shape the two are the same operation: Interpolate-4 takes the output sizes *and* the scales
(Interpolate-11 one of them) and the same attributes, so each Interpolate-11 is replaced by an
Interpolate-4 with identical semantics. The export's verification against PyTorch then checks the result.
"""
from __future__ import annotations

import numpy as np


def interpolate11_to_4(ov_model) -> tuple[int, list[str]]:
    """Replace every Interpolate-11 of ``ov_model`` (in place) by the equivalent Interpolate-4.

    Returns (how many were replaced, a reason for each that could not be: dynamic shapes or
    non-constant sizes, which the NCS2 check then reports as unsupported).
    """
    from openvino import opset1, opset10  # opset10.interpolate builds the v4 operation

    replaced, problems = 0, []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() != "Interpolate" or op.get_type_info().version_id != "opset11":
            continue
        data = op.input_value(0)
        if not (data.get_partial_shape().is_static and op.get_output_partial_shape(0).is_static):
            problems.append(f"{op.get_friendly_name()}: dynamic shape")
            continue
        given = _constant(op.input_value(1))
        axes = _constant(op.input_value(2)) if op.get_input_size() > 2 else None
        if given is None or (op.get_input_size() > 2 and axes is None):
            problems.append(f"{op.get_friendly_name()}: sizes or scales are computed, not constant")
            continue
        in_shape = list(data.get_partial_shape().to_shape())
        out_shape = list(op.get_output_partial_shape(0).to_shape())
        axes = [int(a) % len(in_shape) for a in (axes if axes is not None else range(len(in_shape)))]
        attrs = op.get_attributes()
        sizes = [int(out_shape[a]) for a in axes]
        ratios = [out_shape[a] / in_shape[a] for a in axes]
        scales = [float(s) for s in given] if attrs["shape_calculation_mode"] == "scales" else ratios
        # Sizes mode whenever the scales are the exact size ratios (every integer upsampling): FP16 compression
        # turns a float scales constant into Constant + Convert, which would leave the output shape dynamic.
        calc = "sizes" if np.allclose(scales, ratios, rtol=0, atol=1e-6) else attrs["shape_calculation_mode"]
        new = opset10.interpolate(
            data, opset1.constant(np.array(sizes, np.int64)), opset1.constant(np.array(scales, np.float32)),
            mode=attrs["mode"], shape_calculation_mode=calc,
            pads_begin=list(attrs.get("pads_begin", [])), pads_end=list(attrs.get("pads_end", [])),
            coordinate_transformation_mode=attrs["coordinate_transformation_mode"],
            nearest_mode=attrs["nearest_mode"], antialias=bool(attrs["antialias"]), cube_coeff=attrs["cube_coeff"],
            axes=opset1.constant(np.array(axes, np.int64)), name=op.get_friendly_name())
        op.output(0).replace(new.output(0))
        replaced += 1
    if replaced:
        ov_model.validate_nodes_and_infer_types()
    return replaced, problems


def _constant(value) -> np.ndarray | None:
    node = value.get_node()
    if node.get_type_name() != "Constant":
        return None
    return np.array(node.get_data()).reshape(-1)
