"""The fine-tuning learning rate is checked on the unpruned model before the first step: a rate that
costs a converged model accuracy with nothing removed is halved (real CIFAR-10 ResNet-20, bundled)."""
from __future__ import annotations

import threading

import torch

from core.models import load_model
from core.prune import PruneConfig
from core.sources import load_dataset
from core.tasks.classification.task import LR_HALVINGS, ClassificationTask


def test_a_harmful_finetuning_rate_is_halved_on_a_converged_model(one_thread):
    loaded = load_model("sample:cifar10")
    data = load_dataset("sample:cifar10", loaded.spec.input)
    config = PruneConfig(finetune_lr=0.05, finetune_steps=20, max_drop=1.0, latency=False, device="cpu")
    task = ClassificationTask(loaded.spec.input, data, config)
    base = task.measure(loaded.model)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    record = task.check_finetune_lr(loaded.model, base, threading.Event(), lambda f, m: None)
    first = record["tried"][0]
    assert first["lr"] == 0.05 and first["ci_low_points"] > record["allowed_drop_points"], \
        "0.05 for 20 batches harms this one-cycle-trained model beyond noise (the case the check exists for)"
    assert record["lr"] < 0.05 and task.finetune_lr == record["lr"]
    assert record["tried"][-1]["lr"] == record["lr"], "the rate used is the last one tried"
    if len(record["tried"]) <= LR_HALVINGS:  # stopped before the last halving: the rate used was within the allowance
        assert record["tried"][-1]["selection_drop_points"] <= record["allowed_drop_points"]
    assert all(t["selection_drop_points"] > record["allowed_drop_points"] for t in record["tried"][:-1]), \
        "every rate halved cost more than the allowance (its point estimate decides)"
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items()), "the check used a copy"
    last = record["tried"][-1]
    assert all(t["batches"] == 20 and t["seconds"] > 0 for t in record["tried"])
    assert task.finetune_batch_seconds == last["seconds"] / 20, \
        "the original's mini-batch rate, measured here, is what the control's fine-tuning is estimated at"
