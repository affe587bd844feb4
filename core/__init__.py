"""PruneScope core: all logic of the tool, with no Streamlit import, usable from the CLI and tests."""

__version__ = "0.1.0"
