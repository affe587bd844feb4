"""CAR on Ray workers: exact CAR time in this process vs on 1 and 2 (or --workers) local Ray workers.

All in one process, on the same model, images and filters: exact single-filter CAR of every filter
(``compute_car``, no per-class CAR, no sensitivity), first in this process with 1 thread and with all
cores' threads, then on a local Ray cluster the bench starts, with N workers of 1 thread each. Every
distributed result must equal the single-process one value for value (checked; the bench fails
otherwise). Two calls are timed per configuration, as the steps of a pruning run make them: the first
(on a fresh pool it includes sending the model and images to the workers and their first trace) and
the second (warm workers, the state already there). Each is repeated ``--repeats`` times in turn (the
median is printed); the pool's start-up (Ray and its workers, once per job) is printed apart. Ratios are to
this process with 1 thread. On a machine with C cores no ratio can pass C.

    python bench/ray_car.py [--samples cifar10 resnet_shapes] [--images 100] [--workers 1 2] [--repeats 2]
"""
from __future__ import annotations

import statistics
import time

import torch

from _common import load_sample, machine, parser, table


def exact_car(loaded, images, pool=None):
    from core.car import compute_car

    t0 = time.perf_counter()
    result = compute_car(loaded.model, loaded.spec.input, images, n_images=None, sensitivity=False, per_class=False,
                         pool=pool)
    return result, time.perf_counter() - t0


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--samples", nargs="+", default=["cifar10", "resnet_shapes"])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from core.device import available_cores
    from core.distributed import CarPool, WorkSetting

    cores = available_cores()
    print(f"machine: {machine()}; cores this process may use: {cores}")
    data = {name: load_sample(name) for name in args.samples}
    subsets = {name: data[name][1].val.subset(args.images) for name in args.samples}
    times: dict[tuple[str, str], list[float]] = {}
    startup: dict[str, float] = {}
    reference = {}

    def measure(label: str, threads: int | None, pool=None) -> None:
        if threads:
            torch.set_num_threads(threads)
        for name in args.samples:
            loaded = data[name][0]
            for call in ("first", "warm"):
                result, seconds = exact_car(loaded, subsets[name], pool)
                if name not in reference:
                    reference[name] = result
                elif result.car != reference[name].car or result.loss_up != reference[name].loss_up:
                    raise SystemExit(f"FAIL: {label} gave other CAR values than this process on {name}")
                times.setdefault((name, label, call), []).append(seconds)
                print(f"  {name:14s} {label:28s} {call:5s} {seconds:7.2f} s", flush=True)

    labels = ["this process, 1 thread", f"this process, {cores} threads"] + [
        f"Ray, {n} worker(s) x 1 thread" for n in args.workers]
    for r in range(args.repeats):
        print(f"round {r + 1} of {args.repeats}")
        measure(labels[0], 1)
        measure(labels[1], cores)
        for n, label in zip(args.workers, labels[2:]):
            torch.set_num_threads(1)  # the driver only waits and merges
            t0 = time.perf_counter()
            with CarPool(WorkSetting(workers=n)) as pool:
                startup.setdefault(label, time.perf_counter() - t0)
                measure(label, None, pool)
    rows = []
    for name in args.samples:
        base = {c: statistics.median(times[(name, labels[0], c)]) for c in ("first", "warm")}
        for label in labels:
            t = {c: statistics.median(times[(name, label, c)]) for c in ("first", "warm")}
            rows.append({"sample": name, "filters": sum(len(v) for v in reference[name].car.values()),
                         "images": len(subsets[name]), "where": label, "first_s": f"{t['first']:.2f}",
                         "warm_s": f"{t['warm']:.2f}", "warm_ratio": f"{base['warm'] / t['warm']:.2f}x",
                         "identical": "yes" if label != labels[0] else "ref"})
    print()
    print(table(rows, ["sample", "filters", "images", "where", "first_s", "warm_s", "warm_ratio", "identical"]))
    print("first_s: the first call on the configuration (a fresh pool: the model and images sent, traced there); "
          "warm_s: the next call; warm_ratio: warm time of this process with 1 thread / this one's.")
    print()
    for label, s in startup.items():
        print(f"start-up of {label} (Ray and its workers, once per job): {s:.1f} s")
    print(f"On this machine ({cores} cores) no ratio can exceed {cores}x; Ray's own processes share the same cores.")


if __name__ == "__main__":
    main()
