"""PruneScope sends nothing anywhere: OpenVINO's usage telemetry is switched off for the process.

``import openvino`` (its ``tools.ovc``) and every ``ov.convert_model`` send usage events through
``openvino_telemetry``'s GA4 backend by default (no consent file: consent assumed), each from a forked process that
the interpreter joins at exit. On a machine without internet that child waits in ``getaddrinfo``, so a CLI process
that converted a model did not exit: ``python -m core export`` hung for 15 minutes after its work was done in the
test suite (2026-12-05). Called from ``core/__init__`` so that it runs before any ``import openvino``.
"""
from __future__ import annotations


def no_telemetry() -> None:
    """Make ``openvino_telemetry``'s GA4 backend send nothing (no process, no connection); a no-op without it."""
    try:
        from openvino_telemetry.backend import backend_ga4
    except ImportError:  # no telemetry package: nothing would be sent
        return
    backend_ga4.GA4Backend.send = lambda self, *args, **kwargs: None
