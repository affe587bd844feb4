"""SSD detectors: raw-output contract, anchors, box coding, loss, the trained sample, ONNX/OpenVINO parity."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from core.tasks.detection.evaluate import EvalSettings, evaluate_map, normalize_images
from core.tasks.detection.loss import cxcywh_to_xyxy, box_iou, encode, encode_batch, multibox_loss
from core.tasks.detection.models import DETECTION_ARCHITECTURES, build_detector, rebuild_detector
from core.tasks.detection.postprocess import decode, postprocess
from core.errors import ModelLoadError

SMALL_SIZES = {"ssdlite320_mobilenet_v3_large": (320, 320), "ssd_mobilenet_v2": (160, 160), "sample_ssd": (96, 128)}


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_boxes(rng, k):
    xy = rng.uniform(0, 0.7, (k, 2))
    return np.concatenate([xy, xy + rng.uniform(0.08, 0.3, (k, 2))], 1).astype(np.float32)


# ----------------------------------------------------------------------------- architectures


@pytest.mark.parametrize("arch", list(DETECTION_ARCHITECTURES))
def test_forward_gives_one_raw_tensor_with_a_row_per_anchor(arch):
    torch.manual_seed(0)
    size = SMALL_SIZES[arch]
    model = build_detector(arch, num_classes=5, input_size=size).eval()
    anchors = model.anchors()
    with torch.no_grad():
        raw = model(torch.randn(2, 3, *size))
    assert isinstance(raw, torch.Tensor) and raw.shape == (2, len(anchors), 4 + 5)
    assert anchors.shape == (len(anchors), 4) and anchors.dtype == np.float32
    assert np.isfinite(raw.numpy()).all()
    cx, cy, w, h = anchors.T
    assert (0 < cx).all() and (cx < 1).all() and (0 < cy).all() and (cy < 1).all()
    assert (w > 0).all() and (h > 0).all() and (w <= 1).all() and (h <= 1).all()
    # every feature map's anchor centres lie on its grid; the first anchor sits half a cell from the corner
    grid = model.feature_grid(size)
    assert abs(cx[0] - 0.5 / grid[0][1]) < 1e-6 and abs(cy[0] - 0.5 / grid[0][0]) < 1e-6
    per_loc = model.anchor_generator.num_anchors_per_location()
    assert len(anchors) == sum(gh * gw * a for (gh, gw), a in zip(grid, per_loc))


def test_anchors_depend_on_input_size_and_are_cached_copies():
    model = build_detector("sample_ssd", 4)
    a = model.anchors()
    a[:] = 0  # a caller scribbling on its copy must not corrupt the model's anchors
    assert model.anchors().max() > 0
    assert len(model.anchors((256, 256))) == 4 * len(model.anchors((128, 128)))


def test_ssdlite_loads_torchvision_weights_and_matches_torchvision_detections():
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large as tv_ssdlite

    torch.manual_seed(0)
    tv = tv_ssdlite(weights=None, weights_backbone=None, num_classes=4)
    _calibrate_batchnorm(tv, torch.rand(4, 3, 320, 320) * 2 - 1)
    ours = build_detector("ssdlite320_mobilenet_v3_large", 4).eval()
    ours.load_state_dict(tv.state_dict())  # same module names: a torchvision checkpoint loads as it is
    x = torch.rand(1, 3, 320, 320)
    with torch.no_grad():
        expected = tv([x[0]])[0]  # torchvision's own transform (mean/std 0.5), anchors, decoding and NMS
        raw = ours((x - 0.5) / 0.5).numpy()
    # anchors: torchvision's pixel x1y1x2y2 default boxes are ours, normalised
    tv_anchors = tv.anchor_generator(_image_list(x), list(tv.backbone(x).values()))[0].numpy() / 320
    np.testing.assert_allclose(cxcywh_to_xyxy(torch.from_numpy(ours.anchors())).numpy(), tv_anchors, atol=1e-6)
    got = postprocess(raw, ours.anchors(), score_thresh=tv.score_thresh, nms_iou=tv.nms_thresh,
                      max_det=tv.detections_per_img, topk_per_class=tv.topk_candidates)[0]
    assert len(got.boxes) == len(expected["boxes"]) > 50
    np.testing.assert_allclose(got.boxes * 320, expected["boxes"].numpy(), atol=2e-3)
    np.testing.assert_allclose(got.scores, expected["scores"].numpy(), rtol=1e-4)
    assert got.labels.tolist() == expected["labels"].tolist()


def _calibrate_batchnorm(tv, x):
    """Set BN statistics from one batch: untrained, the net's activations fade to ~0 and every score ties."""
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
            m.reset_running_stats()
    tv.train()
    with torch.no_grad():
        tv.head(list(tv.backbone(x).values()))
    tv.eval()


def _image_list(x):
    from torchvision.models.detection.image_list import ImageList

    return ImageList(x, [tuple(x.shape[-2:])])


def test_options_are_recorded_so_the_architecture_rebuilds():
    model = build_detector("ssd_mobilenet_v2", 3, 160, width_mult=0.5, head="ssd")
    again = rebuild_detector(model.config)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert again.config == model.config and model.config["width_mult"] == 0.5
    assert model.anchors().shape == again.anchors().shape


def test_channel_pruning_of_backbone_and_heads_keeps_the_raw_output_layout():
    import torch_pruning as tp

    torch.manual_seed(0)
    model = build_detector("sample_ssd", 4).eval()
    x = torch.randn(1, 3, 128, 128)
    before = model(x).shape
    convs_before = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.5, ignored_layers=model.output_layers(), round_to=8)
    pruner.step()
    convs_after = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    pruned = [n for n in convs_before if convs_after[n] < convs_before[n]]
    assert any(n.startswith("backbone.") for n in pruned) and len(pruned) > 10
    assert all(convs_after[n] == convs_before[n] for n, m in model.named_modules() if m in model.output_layers())
    with torch.no_grad():
        assert model(x).shape == before
    assert len(model.anchors()) == before[1]


def test_registry_refuses_unknown_architectures_and_too_few_classes():
    with pytest.raises(ModelLoadError, match="Unknown detection architecture 'yolo'"):
        build_detector("yolo", 3)
    with pytest.raises(ModelLoadError, match="at least 2 classes"):
        build_detector("sample_ssd", 1)
    with pytest.raises(ModelLoadError, match="Unknown SSD head"):
        build_detector("sample_ssd", 3, head="retina")


# ----------------------------------------------------------------------------- box coding and loss


def test_numpy_decode_inverts_torch_encode():
    rng = np.random.default_rng(0)
    anchors = build_detector("sample_ssd", 4).anchors()
    gt = _random_boxes(rng, 6)
    loc, cls = encode(gt, np.arange(1, 7) % 3 + 1, anchors)
    positive = cls.numpy() > 0
    decoded = decode(loc.numpy()[positive], anchors[positive])
    iou = box_iou(torch.from_numpy(decoded), torch.from_numpy(gt)).numpy()
    matched = iou.argmax(1)
    np.testing.assert_allclose(decoded, gt[matched], atol=1e-5)
    assert np.allclose(iou.max(1), 1, atol=1e-4)


def test_every_ground_truth_box_gets_its_best_anchor_and_all_anchors_over_half_iou():
    rng = np.random.default_rng(1)
    anchors = build_detector("sample_ssd", 4).anchors()
    gt = np.concatenate([_random_boxes(rng, 4), [[0.40, 0.40, 0.43, 0.47]]]).astype(np.float32)  # one tiny box
    _, cls = encode(gt, [1, 2, 3, 1, 2], anchors)
    iou = box_iou(torch.from_numpy(gt), cxcywh_to_xyxy(torch.from_numpy(anchors)))
    assert iou[4].max() < 0.5, "the tiny box overlaps no anchor by half"
    for k in range(len(gt)):
        assert cls[iou[k].argmax()] > 0, f"ground truth {k} has no positive anchor"
    over_half = (iou.max(0).values >= 0.5).numpy()
    assert (cls.numpy()[over_half] > 0).all()
    assert (cls.numpy()[~over_half] > 0).sum() <= len(gt), "below 0.5 only the forced best anchors are positive"


def test_postprocess_returns_the_ground_truth_for_perfect_raw_output():
    rng = np.random.default_rng(2)
    model = build_detector("sample_ssd", 4)
    anchors = model.anchors()
    gts = [_random_boxes(rng, 3), _random_boxes(rng, 1)]
    labels = [np.array([1, 3, 2]), np.array([2])]
    targets = encode_batch(gts, labels, anchors)
    logits = torch.nn.functional.one_hot(targets.cls, 4).float() * 20  # certain: softmax ~ 1 - 3e-9
    raw = torch.cat([targets.loc, logits], dim=2).numpy()
    for dets, gt, lab in zip(postprocess(raw, anchors, score_thresh=0.5), gts, labels):
        assert len(dets.boxes) == len(gt), "duplicates from several matched anchors are suppressed by NMS"
        order = np.argsort(dets.labels * 10 + dets.boxes[:, 0])
        want = np.argsort(lab * 10 + gt[:, 0])
        np.testing.assert_allclose(dets.boxes[order], gt[want], atol=1e-5)
        assert dets.labels[order].tolist() == lab[want].tolist()
        assert (dets.scores > 0.999).all()


def test_multibox_loss_mines_three_negatives_per_positive():
    # Exact box deltas and all-zero logits: the box term is 0 and every anchor's cross-entropy is log(C).
    # With P positives in the batch, P + 3P anchors are counted, divided by P: loss = 4 log C exactly.
    rng = np.random.default_rng(3)
    anchors = build_detector("sample_ssd", 4).anchors()
    targets = encode_batch([_random_boxes(rng, 2), _random_boxes(rng, 5)], [[1, 2], [3, 3, 1, 2, 1]], anchors)
    raw = torch.cat([targets.loc, torch.zeros(*targets.cls.shape, 4)], dim=2)
    assert multibox_loss(raw, targets).item() == pytest.approx(4 * math.log(4), rel=1e-5)
    # ...and pushing the positive logits to certainty leaves only the mined negatives: 3 log C.
    raw[..., 4:] = torch.nn.functional.one_hot(targets.cls, 4).float() * 30 * (targets.cls > 0)[..., None]
    assert multibox_loss(raw, targets).item() == pytest.approx(3 * math.log(4), rel=1e-4)


def test_multibox_loss_trains_the_detector():
    torch.manual_seed(0)
    rng = np.random.default_rng(4)
    model = build_detector("sample_ssd", 3, 64)
    anchors = model.anchors()
    x = torch.randn(4, 3, 64, 64)
    targets = encode_batch([_random_boxes(rng, 2) for _ in range(4)], [[1, 2]] * 4, anchors)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = multibox_loss(model(x), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ----------------------------------------------------------------------------- the trained sample


@pytest.fixture(scope="module")
def sample():
    from core.tasks.detection.sample import load_sample_detection
    from core.tasks.detection.sample_model import load_sample_detector

    model, info = load_sample_detector("ssd_counting")
    data = load_sample_detection(info["dataset"], tuple(info["input_size"][1:]))
    return model, info, data


def test_sample_detector_reaches_its_manifest_map(sample):
    model, info, data = sample
    settings = EvalSettings(**info["eval"])
    result = evaluate_map(model, data.val, info["mean"], info["std"], settings)
    assert result.n_images == info["n_val"]
    assert result.map == pytest.approx(info["val_map"], abs=0.005)
    assert set(result.per_class) == set(info["class_names"])


def test_sample_detector_is_small(sample):
    model, info, _ = sample
    from core.tasks.detection.sample_model import SAMPLE_DIR

    assert (SAMPLE_DIR / info["weights"]).stat().st_size < 1.5e6
    assert info["macs"] < 50e6


@pytest.mark.parametrize("which", ["sample", "ssdlite320_mobilenet_v3_large"])
def test_raw_model_exports_to_onnx_and_openvino_gives_the_same_outputs(sample, which):
    import onnx
    import openvino as ov

    from core.ov_runtime import export_onnx_bytes

    if which == "sample":
        model, info, data = sample
        x = normalize_images(data.val.images[:1], info["mean"], info["std"])
    else:
        torch.manual_seed(0)
        model = build_detector(which, 4).eval()
        x = torch.rand(1, 3, 320, 320) * 2 - 1
    onnx_bytes = export_onnx_bytes(model, tuple(x.shape))
    graph = onnx.load_model_from_string(onnx_bytes).graph
    assert len(graph.output) == 1
    assert [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == [1, len(model.anchors()), 4 + model.num_classes]
    compiled = ov.Core().compile_model(ov.convert_model(io.BytesIO(onnx_bytes)), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled([x.numpy()])[compiled.output(0)]
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-3 * max(1.0, np.abs(want).max()))


def test_postprocess_and_metrics_run_without_torch():
    # They are copied into the deploy script, which runs where torch is not installed.
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np\n"
            "from core.tasks.detection.postprocess import postprocess\n"
            "from core.tasks.detection.metrics import mean_average_precision\n"
            "raw = np.zeros((1, 2, 6), np.float32); raw[0, :, 5] = 9\n"
            "d = postprocess(raw, np.array([[.5, .5, .2, .2], [.2, .2, .1, .1]], np.float32))[0]\n"
            "print(len(d.boxes), mean_average_precision([d.boxes], [d.scores], [d.labels], [d.boxes], [d.labels], None, 2)[0])\n")
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "1.0"]
