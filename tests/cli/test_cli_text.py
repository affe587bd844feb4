"""The CLI's human-readable output (without ``--json``): both tasks print a model's cost in the same
lines, and export prints its bundle the same way (``core.cli_common.print_costs`` / ``print_bundle``)."""
from __future__ import annotations

import pytest

from core import cli
from core.cli_common import print_bundle
from core.evaluate import count_macs_params
from core.models import load_model


def _evaluate_lines(capsys, *args: str) -> list[str]:
    assert cli.main(["evaluate", *args, "--no-latency"]) == 0
    return capsys.readouterr().out.splitlines()


def test_evaluate_prints_macs_and_parameters_of_a_classifier(capsys):
    loaded = load_model("sample:vgg_digits")
    macs, params = count_macs_params(loaded.model, loaded.spec.input)
    lines = _evaluate_lines(capsys, "--model", "sample:vgg_digits", "--data", "sample:vgg_digits")
    assert lines[0].startswith("accuracy   ") and lines[0].endswith("images")
    assert lines[1:3] == [f"MACs       {macs / 1e6:.2f} M", f"params     {params / 1e6:.3f} M"]
    assert not any(line.startswith("latency") for line in lines), "no latency line when it was not measured"


@pytest.mark.slow
def test_evaluate_prints_the_same_cost_lines_for_a_detector(capsys):
    lines = _evaluate_lines(capsys, "--task", "detection", "--model", "sample:ssd_counting", "--data", "sample:counting")
    assert lines[0].startswith("mAP@0.5    ")
    assert lines[1].startswith("MACs       ") and lines[1].endswith(" M")
    assert lines[2].startswith("params     ") and lines[2].endswith(" M")
    assert float(lines[2].split()[1]) > 0


def test_a_bundle_is_printed_with_its_verification_and_every_ncs2_problem(capsys):
    result = {"bundle": "/b", "zip": "/b.zip", "step": 3, "ncs_compatible": False, "verified": True,
              "ncs2_problems": ["layer x: op Foo-1 is not supported", "layer y: dynamic shape"]}
    print_bundle(result, "agreement 99.50%")
    assert capsys.readouterr().out.splitlines() == [
        "bundle: /b  (zip: /b.zip)", "step 3: NCS2 NOT compatible; verified: True (agreement 99.50%)",
        "  NCS2 problem: layer x: op Foo-1 is not supported", "  NCS2 problem: layer y: dynamic shape"]
