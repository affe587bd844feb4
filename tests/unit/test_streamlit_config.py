"""The app's Streamlit settings (``.streamlit/config.toml``), as ``streamlit run`` reads them from the project root."""
from __future__ import annotations

import gc
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _config() -> dict:
    return tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text(encoding="utf-8"))


def test_the_app_listens_on_this_machine_only_and_sends_nothing():
    config = _config()
    assert config["server"]["address"] == "127.0.0.1"
    assert config["browser"]["gatherUsageStats"] is False


def test_no_forced_garbage_collection_after_each_script_run():
    """Streamlit's default (``runner.postScriptGC``) runs ``gc.collect(2)`` after every script run, and a running
    job's progress fragments rerun every second. With torch loaded a full collection holds the GIL for a long
    while (measured here, not asserted: timings are the benches'), and the job's Python work waits for it: the
    cifar10 sample's prune job took 17 s a step with its page open, 7 s without the forced collection."""
    assert _config()["runner"]["postScriptGC"] is False
    import torch  # noqa: F401  (what the app's process holds)

    t0 = time.perf_counter()
    gc.collect(2)
    print(f"one full collection with torch loaded: {(time.perf_counter() - t0) * 1000:.0f} ms")
