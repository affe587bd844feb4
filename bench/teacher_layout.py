"""The distilled recovery's teacher in the student's memory layout, or left contiguous: time per recovery epoch.

    python bench/teacher_layout.py [--depths 20 56] [--images 1280] [--rounds 3] [--threads 2]

A distilled recovery (``core.recovery.recover`` with KD, as the pruning loop's and the control's) runs the teacher's
forward pass on every mini-batch. Under bf16 the student trains in channels-last (``core.training.training_precision``);
``core.recovery.teacher_layout`` puts the teacher in the same layout for the recovery. This times one recovery epoch
of ``--images`` images both ways, side by side in this process, alternating, ``--rounds`` times, on the CIFAR ResNet
architectures (random weights and random pixels: the time of a convolution does not depend on either), and prints
the median seconds of each and their ratio. Needs no data.
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import sys
import time

import torch

from _common import machine, parser, table

from core import recovery  # noqa: E402
from core.architectures import cifar_resnet20, cifar_resnet56  # noqa: E402
from core.data import ImageSet  # noqa: E402
from core.models import InputSpec  # noqa: E402
from core.recovery import RecoveryConfig, recover  # noqa: E402

ARCHS = {20: cifar_resnet20, 56: cifar_resnet56}
SPEC = InputSpec(height=32, width=32, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))


@contextlib.contextmanager
def contiguous_teacher(teacher, precision):
    """The layout before ``teacher_layout``: the teacher as it came in."""
    yield


def one_epoch(student, teacher, train: ImageSet, layout) -> float:
    """Seconds of one distilled recovery epoch of ``student`` (a copy; bf16 where the CPU computes it natively) with
    ``recovery.teacher_layout`` replaced by ``layout``."""
    original, recovery.teacher_layout = recovery.teacher_layout, layout
    try:
        t0 = time.perf_counter()
        recover(copy.deepcopy(student), train, SPEC, RecoveryConfig(epochs=1, distill=True), lambda m: 0.0,
                teacher=teacher)
        return time.perf_counter() - t0
    finally:
        recovery.teacher_layout = original


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--depths", type=int, nargs="+", default=[20, 56], choices=sorted(ARCHS))
    ap.add_argument("--images", type=int, default=1280)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(machine(), flush=True)
    train = ImageSet(torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8),
                     torch.randint(0, 10, (args.images,)), [str(c) for c in range(10)])
    rows = []
    for depth in args.depths:
        student = ARCHS[depth](num_classes=10)
        teacher = copy.deepcopy(student).eval()
        one_epoch(student, teacher, train, recovery.teacher_layout)  # warm-up: oneDNN's kernels for both layouts
        times = {"contiguous": [], "channels-last": []}
        for _ in range(args.rounds):
            times["contiguous"].append(one_epoch(student, teacher, train, contiguous_teacher))
            times["channels-last"].append(one_epoch(student, teacher, train, recovery.teacher_layout))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"model": f"ResNet-{depth}", "images": args.images,
                     "teacher contiguous (s)": f"{med['contiguous']:.2f}",
                     "teacher channels-last (s)": f"{med['channels-last']:.2f}",
                     "ratio": f"{med['contiguous'] / med['channels-last']:.2f}x"})
        print(f"ResNet-{depth}: {times}", flush=True)
    print(table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
