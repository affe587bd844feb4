"""Why the app turns off Streamlit's forced garbage collection: a prune job with and without it, side by side.

    python bench/app_gc.py [--steps 2] [--rounds 2] [--threads 2]

Streamlit runs ``gc.collect(2)`` after every script run by default (``runner.postScriptGC``), and a running
job's page reruns its progress fragments every second (the Prune page's progress and the sidebar's jobs: two a
second). A full collection with torch loaded holds the GIL, and the job thread's Python work waits for it.
This bench runs the same prune job of the bundled ``cifar10`` sample (``--steps`` steps, the defaults
otherwise, no analysis, latency, recovery or control) in a job thread, once with a thread that does what the
page's fragments do to the GIL (two full collections a second) and once without, alternating ``--rounds``
times, and prints the seconds of each and their ratio. No real data needed: the sample is bundled.
"""
from __future__ import annotations

import gc
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from _common import parser

from core.jobs import JobRegistry, prune_job
from core.models import load_model
from core.prune import PruneConfig
from core.sources import load_dataset


def run_job(loaded, data, config, out: Path, collect_every: float | None) -> float:
    """Seconds of one prune job; ``collect_every``: a thread runs ``gc.collect(2)`` this often while it runs."""
    shutil.rmtree(out, ignore_errors=True)
    stop = threading.Event()

    def fragments() -> None:
        while not stop.wait(collect_every):
            gc.collect(2)

    poller = threading.Thread(target=fragments, daemon=True) if collect_every else None
    t0 = time.perf_counter()
    job = JobRegistry().start("prune", prune_job(loaded, data, config, out), run_dir=out)
    if poller:
        poller.start()
    while job.running:
        time.sleep(0.2)
    seconds = time.perf_counter() - t0
    stop.set()
    if job.state != "done":
        raise SystemExit(f"the job ended {job.state}: {job.error}")
    return seconds


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("sample:cifar10")
    data = load_dataset("sample:cifar10", loaded.spec.input)
    config = PruneConfig(max_steps=args.steps, analyse_car=False, latency=False, recover_epochs=0, control=False)
    t0 = time.perf_counter()
    gc.collect(2)
    print(f"one full collection here: {(time.perf_counter() - t0) * 1000:.0f} ms; {args.threads} threads")
    with tempfile.TemporaryDirectory(prefix="prunescope-gc-") as tmp:
        times = {"forced collections (Streamlit's default)": [], "none (the app's setting)": []}
        for r in range(args.rounds):
            for name, every in (("none (the app's setting)", None), ("forced collections (Streamlit's default)", 0.5)):
                times[name].append(run_job(loaded, data, config, Path(tmp) / f"run{r}", every))
                print(f"round {r + 1}: {name}: {times[name][-1]:.1f} s", flush=True)
    slow, fast = (min(v) for v in times.values())
    print(f"best of {args.rounds}: {slow:.1f} s with two full collections a second, {fast:.1f} s without: "
          f"{slow / fast:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
