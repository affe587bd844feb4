"""Object detection (SSD) for cluster pruning of detectors.

Modules, and the conventions they share (so that pruning, export and deploy can be wired to them):

- ``models``: SSD detectors whose forward returns ONE raw tensor ``[N, A, 4 + C]``: box deltas
  ``(dx, dy, dw, dh)``, then class logits with the **background at index 0** (``num_classes``
  counts it, as torchvision does). ``model.anchors()`` gives ``[A, 4]`` numpy anchors, normalised
  ``(cx, cy, w, h)``; ``model.box_coder_weights`` is ``(10, 10, 5, 5)``; ``model.output_layers()``
  are the convs whose outputs must never be pruned.
- ``postprocess``: numpy-only decode, softmax, per-class NMS -> boxes normalised ``(x1, y1, x2, y2)``,
  scores, labels ``1..C-1``. Copied as it is into the deploy script, hence no torch import.
- ``loss``: training targets (SSD matching) and the MultiBox loss, in torch.
- ``metrics``: Pascal VOC mAP@0.5, numpy only.
- ``data``: Pascal VOC zips/folders -> ``DetectionData`` with a validation report; VOC zip writer.
- ``evaluate``: a detector's mAP on a ``DetectionSet`` (raw forward + the numpy steps above).
- ``sample`` / ``sample_model``: the generated counting set and the bundled sample detector.

This ``__init__`` imports nothing, so that ``core.tasks.detection.postprocess`` stays importable without torch.
"""
