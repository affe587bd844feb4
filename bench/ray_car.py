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

With ``--gpu`` (a CUDA GPU present) the same calls run again on the GPU: in this process, then on N Ray workers
that share the one GPU (1/N of it each, ``--gpu-workers``). GPU results are checked against this process on the
GPU (same kernels), and how many CAR values differ from the CPU reference is printed apart (float sums on another
device may round differently; a CAR value is a count of changed predictions, so it rarely moves).

    python bench/ray_car.py [--samples cifar10 resnet_shapes] [--images 100] [--workers 1 2] [--repeats 2]
                            [--gpu] [--gpu-workers 1 4 8]
"""
from __future__ import annotations

import statistics
import time

import torch

from _common import load_sample, machine, parser, table


def exact_car(loaded, images, pool=None, device=None):
    from core.car import compute_car

    t0 = time.perf_counter()
    result = compute_car(loaded.model, loaded.spec.input, images, n_images=None, sensitivity=False, per_class=False,
                         pool=pool, device=device)
    return result, time.perf_counter() - t0


def differing(a, b) -> tuple[int, int, float]:
    """(CAR values that differ, CAR values, largest |loss increase difference|) between two results."""
    n = diff = 0
    worst = 0.0
    for gid, values in a.car.items():
        for x, y in zip(values, b.car[gid]):
            n += 1
            diff += x != y
        for x, y in zip(a.loss_up.get(gid, []), b.loss_up.get(gid, [])):
            worst = max(worst, abs(x - y))
    return diff, n, worst


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--samples", nargs="+", default=["cifar10", "resnet_shapes"])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gpu", action="store_true", help="also on the CUDA GPU: this process, then --gpu-workers")
    ap.add_argument("--gpu-workers", type=int, nargs="+", default=[1, 4, 8])
    args = ap.parse_args()
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: torch sees no CUDA GPU on this machine")
    from core.device import available_cores
    from core.distributed import CarPool, WorkSetting

    cores = available_cores()
    print(f"machine: {machine()}; cores this process may use: {cores}")
    data = {name: load_sample(name) for name in args.samples}
    subsets = {name: data[name][1].val.subset(args.images) for name in args.samples}
    times: dict[tuple[str, str], list[float]] = {}
    startup: dict[str, float] = {}
    reference = {}

    identical: dict[tuple[str, str], str] = {}

    def measure(label: str, threads: int | None, pool=None, device=None) -> None:
        if threads:
            torch.set_num_threads(threads)
        kind = "gpu" if device == "cuda" else "cpu"
        for name in args.samples:
            loaded = data[name][0]
            for call in ("first", "warm"):
                result, seconds = exact_car(loaded, subsets[name], pool, device)
                ref = reference.setdefault((name, kind), result)
                if ref is result:
                    mark = "ref"
                elif kind == "cpu":
                    if result.car != ref.car or result.loss_up != ref.loss_up:
                        raise SystemExit(f"FAIL: {label} gave other CAR values than this process on {name}")
                    mark = "yes"
                else:
                    diff, n, worst = differing(result, ref)
                    mark = "yes" if diff == 0 and worst == 0 else f"{diff}/{n} CAR, loss {worst:.1e}"
                if identical.get((name, label)) in (None, "yes"):  # "ref" stays; a difference stays shown
                    identical[(name, label)] = mark
                times.setdefault((name, label, call), []).append(seconds)
                print(f"  {name:14s} {label:34s} {call:5s} {seconds:7.2f} s", flush=True)

    labels = ["this process, 1 thread", f"this process, {cores} threads"] + [
        f"Ray, {n} worker(s) x 1 thread" for n in args.workers]
    gpu_labels = (["this process, GPU"] + [f"Ray, {n} worker(s) sharing the GPU" for n in args.gpu_workers]
                  if args.gpu else [])
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
        if args.gpu:
            torch.set_num_threads(1)
            measure(gpu_labels[0], None, device="cuda")
            for n, label in zip(args.gpu_workers, gpu_labels[1:]):
                t0 = time.perf_counter()
                with CarPool(WorkSetting(workers=n), gpus_per_worker=1.0 / n) as pool:
                    startup.setdefault(label, time.perf_counter() - t0)
                    measure(label, None, pool, device="cuda")
    rows = []
    for name in args.samples:
        base = {c: statistics.median(times[(name, labels[0], c)]) for c in ("first", "warm")}
        for label in labels + gpu_labels:
            t = {c: statistics.median(times[(name, label, c)]) for c in ("first", "warm")}
            rows.append({"sample": name, "filters": sum(len(v) for v in reference[(name, "cpu")].car.values()),
                         "images": len(subsets[name]), "where": label, "first_s": f"{t['first']:.2f}",
                         "warm_s": f"{t['warm']:.2f}", "warm_ratio": f"{base['warm'] / t['warm']:.2f}x",
                         "identical": identical[(name, label)]})
    print()
    print(table(rows, ["sample", "filters", "images", "where", "first_s", "warm_s", "warm_ratio", "identical"]))
    print("first_s: the first call on the configuration (a fresh pool: the model and images sent, traced there); "
          "warm_s: the next call; warm_ratio: warm time of this process with 1 thread / this one's.")
    print()
    if args.gpu:
        print("identical: GPU rows against this process on the GPU (ref); CPU rows against this process, 1 thread.")
        for name in args.samples:
            diff, n, worst = differing(reference[(name, "gpu")], reference[(name, "cpu")])
            print(f"{name}: GPU vs CPU in this process: {diff} of {n} CAR values differ; largest loss-increase "
                  f"difference {worst:.2e}")
    for label, s in startup.items():
        print(f"start-up of {label} (Ray and its workers, once per job): {s:.1f} s")
    print(f"On this machine ({cores} cores) no ratio can exceed {cores}x; Ray's own processes share the same cores.")


if __name__ == "__main__":
    main()
