"""PruneScope core: all logic of the tool, with no Streamlit import, usable from the CLI and tests."""

__version__ = "0.1.0"

from .offline import no_telemetry  # noqa: E402

no_telemetry()  # before any ``import openvino``: importing it already sends an event (core.offline)
