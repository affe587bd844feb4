"""How right is the whole-job ETA of a prune? A real prune job of the cifar10 sample with the Prune page's defaults.

Runs ``core.jobs.prune_job`` in a ``JobRegistry`` exactly as the Prune page does (the pre-run estimate timed at
the job's start, then ``core.eta.RunEta`` fed by the run's progress) and reads the job's snapshot every second,
as the page's polling does. At the end it compares, at 20 / 40 / 60 / 80 % of the job's actual duration, the ETA
the page showed with the time that was actually left (issue 27: within +-30 % after 20 % of the job).

    .venv/bin/python bench/eta_whole_job.py [--threads 2] [--time-budget MIN] [--out bench/results/eta_whole_job.json]
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from _common import ROOT, load_sample, machine, parser


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--time-budget", type=float, default=None, help="the run's time budget in minutes (default none)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "eta_whole_job.json"))
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import tempfile

    from core import eta as eta_module
    from core.jobs import JobRegistry, prune_job
    from core.prune import PruneConfig

    # what the ETA was fed, with when, so that its model can be replayed on this very run (``replay``)
    fed: list = []
    event, record = eta_module.RunEta.event, eta_module.RunEta.record

    def logged_event(self, phase, step, part="", part_fraction=None):
        fed.append([time.monotonic(), "event", phase, step, part, part_fraction])
        if getattr(self, "estimate", None) is not None and not any(f[1] == "estimate" for f in fed):
            est = self.estimate
            fed.append([time.monotonic(), "estimate", {k: list(v) for k, v in est.breakdown.items()},
                        list(est.steps), list(est.rates.train_step) if est.rates else None])
        return event(self, phase, step, part, part_fraction)

    def logged_record(self, rec):
        keep = ("step", "metric", "test_metric", "macs", "seconds", "recovered_from", "paired")
        fed.append([time.monotonic(), "record", {**{k: rec.get(k) for k in keep}, "removed": bool(rec.get("removed"))}])
        return record(self, rec)

    eta_module.RunEta.event, eta_module.RunEta.record = logged_event, logged_record

    loaded, data = load_sample("cifar10")
    config = PruneConfig.app_defaults()  # what the Prune page starts from
    if args.time_budget:
        config.time_budget = args.time_budget
    run_dir = Path(tempfile.mkdtemp(prefix="eta-bench-")) / "run"
    registry = JobRegistry()
    t0 = time.time()
    job = registry.start("prune", prune_job(loaded, data, config, run_dir, data_source="sample:cifar10"),
                         run_dir=run_dir, total_steps=config.max_steps + 1)
    seen = []  # (seconds since start, the ETA the page shows, what it is, the running part)
    while job.running:
        s = job.snapshot()
        seen.append((time.time() - t0, s.eta, s.eta_kind, (s.part or {}).get("phase"), s.message))
        time.sleep(1.0)
    job.wait()
    total = time.time() - t0
    snap = job.snapshot()
    if snap.state != "done":
        print(f"the job ended {snap.state}: {snap.error}", file=sys.stderr)
        return 1
    rows = []
    for share in (0.2, 0.4, 0.6, 0.8):
        t, eta, kind, part, _ = max((r for r in seen if r[0] <= share * total), key=lambda r: r[0])
        left = total - t
        err = None if eta is None else (eta - left) / left
        rows.append({"share": share, "at_s": round(t, 1), "eta_s": None if eta is None else round(eta, 1),
                     "actual_left_s": round(left, 1), "error": None if err is None else round(err, 3),
                     "within_30pct": err is not None and abs(err) <= 0.3, "kind": kind, "part": part})
    steps = [r for r in snap.steps if r.get("step")]
    result = {"machine": machine(), "config": asdict(config), "total_s": round(total, 1),
              "kept_steps": sum(1 for r in steps if r.get("removed")),
              "recoveries": sum(1 for r in steps if r.get("recovered_from") is not None),
              "stop": (json.loads((run_dir / "status.json").read_text()) or {}).get("message"),
              "checkpoints": rows, "trace": [[round(t, 1), None if e is None else round(e, 1), k, p]
                                             for t, e, k, p, _ in seen],
              "fed": [[round(f[0] - fed[0][0], 3), *f[1:]] for f in fed] if fed else []}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"cifar10 sample, Prune page defaults: {total:.0f} s, {result['kept_steps']} kept step(s), "
          f"{result['recoveries']} recovery(ies); stopped: {result['stop']}")
    for r in rows:
        print(f"  at {r['share']:.0%} ({r['at_s']:.0f} s): ETA {r['eta_s']} s, actually {r['actual_left_s']} s left, "
              f"error {r['error']} ({'within' if r['within_30pct'] else 'OUTSIDE'} +-30 %), in {r['part']}")
    return 0 if rows[0]["within_30pct"] else 2


if __name__ == "__main__":
    raise SystemExit(main())
