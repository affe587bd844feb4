"""What the tool advises when the threshold and the selection images stop a run (issue 27, items 1 and 7)."""
from __future__ import annotations

from core.advice import coarser_threshold, no_kept_step, resolution_remedies
from core.stats import resolution_points


def test_remedies_name_what_this_upload_can_give_and_what_it_costs():
    lines = resolution_remedies(1.0, 400, 0.86, n_images=2000, val_fraction=0.2, layout="unsplit", eval_seconds=0.8)
    assert len(lines) == 3
    assert lines[0].startswith("More selection images: a selection share of 50% on the Load page gives 1,000 of the "
                               "2,000 images in this upload (now 20%: 400), resolving about")
    assert f"{resolution_points(1000, 0.86 * 0.14):.1f} points" in lines[0]
    assert "would need a larger upload" in lines[0], "1,000 images do not resolve 1 point at 86 %"
    assert lines[1].startswith(f"A coarser threshold: {coarser_threshold(resolution_points(400, 0.86 * 0.14)):.1f}")
    assert "about 37 s instead of 0.8 s on this machine" in lines[2]
    # a share that suffices is named as such, rounded up to the widget's 5 % steps
    enough = resolution_remedies(3.0, 400, 0.86, n_images=20000, val_fraction=0.2, layout="unsplit")
    assert "a selection share of 15% on the Load page gives 3,000" in enough[0] and "larger upload" not in enough[0]
    assert "as long" in enough[2], "without a measured evaluation the cost is a ratio"
    assert "split is fixed" in resolution_remedies(1.0, 359, 0.99, layout="sample")[0]
    assert "val/ folder" in resolution_remedies(1.0, 200, 0.86, layout="presplit")[0]
    assert resolution_remedies(10.0, 400, 0.86) == [], "a resolved threshold needs no remedy"


def test_no_kept_step_says_why_and_what_to_change():
    status = {"state": "done", "message": "the next clusters would exceed the 1-point accuracy threshold",
              "closest_rejected": {"step": 2, "clusters": "3 clusters (a, b, c)", "drop_points": 1.75, "max_drop": 1.0}}
    advice = no_kept_step(status, {"max_drop": 1.0, "recover_epochs": 2, "finetune_steps": 40}, 400, 0.86,
                          {"lr": 0.005, "tried": [{"lr": 0.01, "selection_drop_points": 3.0},
                                                  {"lr": 0.005, "selection_drop_points": 1.5}]}, recovered=True)
    assert advice.headline == ("The run finished without keeping a pruning step: it stopped because the next "
                               "clusters would exceed the 1-point accuracy threshold.")
    text = "\n".join(advice.lines())
    assert "Its recorded step is the original after a recovery fine-tune" in text
    assert "The closest candidate, 3 clusters (a, b, c) at step 2, lost 1.75 points" in text
    assert "Fine-tuning alone (learning rate 0.005, nothing removed) cost the original 1.50 of those points." in text
    assert "A coarser threshold: 1.8 points would have kept that candidate" in text
    assert "with 400 one image is 0.25 points" in text
    assert "more than 2 per recovery" in text
    off = no_kept_step({"state": "done", "message": "x"}, {"max_drop": 1.0, "recover_epochs": 0})
    assert "No candidate was measured" in "\n".join(off.lines()) and "with recovery when stalled" in off.changes[-1]
    cli = no_kept_step(status, {"max_drop": 1.0, "recover_epochs": 0}, 400, 0.86, interface="cli")
    assert "(--max-drop)" in cli.changes[0] and "--val-fraction" in cli.changes[1] and "--recover-epochs 2" in cli.changes[2]
    cancelled = no_kept_step({"state": "cancelled", "message": "Cancelled by the user"}, {"max_drop": 1.0})
    assert cancelled.headline.startswith("The run ended (cancelled) before it kept a pruning step")


def test_coarser_threshold_rounds_up_to_the_settings_grid():
    assert coarser_threshold(1.26) == 1.3 and coarser_threshold(1.3) == 1.3 and coarser_threshold(0.01) == 0.1
