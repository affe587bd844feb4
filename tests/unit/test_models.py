"""Model loading: every supported checkpoint form loads, every bad input gets its own clear error."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from core.errors import ModelLoadError, UntrustedPickleError
from core.models import build_architecture, load_model


def _save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def resnet18_sd():
    torch.manual_seed(0)
    return build_architecture("resnet18", 7).state_dict()


def test_plain_state_dict_infers_classes(resnet18_sd):
    loaded = load_model(_save(resnet18_sd), arch="resnet18")
    assert loaded.spec.num_classes == 7
    assert loaded.model.fc.out_features == 7
    assert torch.equal(loaded.model.fc.weight, resnet18_sd["fc.weight"])


@pytest.mark.parametrize("wrap", ["state_dict", "model", "net", "model_state_dict"])
def test_nested_checkpoint(resnet18_sd, wrap):
    ckpt = {wrap: resnet18_sd, "epoch": 90, "best_prec1": 71.2, "arch": "resnet18"}
    loaded = load_model(_save(ckpt), arch="resnet18")
    assert loaded.spec.checkpoint_key == wrap
    assert any(wrap in n for n in loaded.notes)


def test_dataparallel_prefix_and_half(resnet18_sd):
    sd = {"module." + k: (v.half() if v.is_floating_point() else v) for k, v in resnet18_sd.items()}
    loaded = load_model(_save({"state_dict": sd}), arch="resnet18")
    assert loaded.model.conv1.weight.dtype == torch.float32
    assert any("module." in n for n in loaded.notes)


def test_sample_architecture_from_file(tmp_path):
    m = build_architecture("sample_resnet", 5)
    path = tmp_path / "w.pth"
    torch.save(m.state_dict(), path)
    loaded = load_model(path, arch="sample_resnet")
    assert loaded.spec.num_classes == 5
    assert loaded.model(torch.zeros(1, 3, 32, 32)).shape == (1, 5)


def test_torchscript_is_refused_specifically():
    m = torch.jit.script(build_architecture("sample_vgg", 3))
    buf = io.BytesIO()
    torch.jit.save(m, buf)
    with pytest.raises(ModelLoadError, match="TorchScript"):
        load_model(buf.getvalue(), arch="sample_vgg")


def test_onnx_is_refused_specifically():
    from core.ov_runtime import export_onnx_bytes

    data = export_onnx_bytes(build_architecture("sample_vgg", 3), (1, 3, 32, 32))
    with pytest.raises(ModelLoadError, match="ONNX"):
        load_model(data, arch="sample_vgg")


def test_random_bytes_refused():
    with pytest.raises(ModelLoadError, match="not a PyTorch checkpoint"):
        load_model(os.urandom(4096), arch="resnet18")


def test_empty_file_refused(tmp_path):
    p = tmp_path / "empty.pt"
    p.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        load_model(p, arch="resnet18")


def test_wrong_architecture_names_mismatched_keys():
    sd = build_architecture("sample_vgg", 10).state_dict()
    sd["features.0.weight"] = torch.zeros(8, 3, 3, 3)
    with pytest.raises(ModelLoadError, match=r"features\.0\.weight is \(8, 3, 3, 3\)"):
        load_model(_save(sd), arch="sample_vgg")
    with pytest.raises(ModelLoadError, match="do not fit architecture 'resnet18'"):
        load_model(_save(build_architecture("resnet34", 10).state_dict()), arch="resnet18")


def test_unknown_architecture():
    with pytest.raises(ModelLoadError, match="Unknown architecture"):
        load_model(_save(build_architecture("sample_vgg", 10).state_dict()), arch="not_a_net")


def test_state_dict_without_arch_asks_for_it():
    with pytest.raises(ModelLoadError, match="choose its architecture"):
        load_model(_save(build_architecture("sample_vgg", 10).state_dict()))


class _Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_untrusted_pickle_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = tmp_path / "evil.pt"
    torch.save({"model": _Evil(str(marker))}, payload)
    with pytest.raises(UntrustedPickleError, match="would run code"):
        load_model(payload, arch="resnet18")
    with pytest.raises(UntrustedPickleError):
        load_model(payload)
    assert not marker.exists(), "the untrusted pickle ran its payload"
    # Prove the payload is real: an unsafe load in a child process does create the file.
    code = f"import torch; torch.load({str(payload)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True)
    assert marker.exists()


def test_trusted_pickled_module_loads(tmp_path):
    m = build_architecture("sample_vgg", 4)
    path = tmp_path / "whole.pt"
    torch.save(m, path)
    with pytest.raises(UntrustedPickleError):
        load_model(path)
    loaded = load_model(path, trusted=True)
    assert loaded.spec.pickled and loaded.spec.num_classes == 4
    assert isinstance(loaded.model, nn.Module)


def test_truncated_checkpoint(resnet18_sd):
    data = _save(resnet18_sd)
    with pytest.raises(ModelLoadError):
        load_model(data[: len(data) // 2], arch="resnet18")


def _training_checkpoint(sd: dict) -> dict:
    """A checkpoint as training scripts write it: weights next to the optimizer's state and bookkeeping."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1, momentum=0.9)
    opt.state[opt.param_groups[0]["params"][0]] = {"momentum_buffer": torch.ones(3)}
    return {"epoch": 1, "state_dict": sd, "optimizer": opt.state_dict(), "arch": "resnet18",
            "best_prec1": torch.tensor(91.0)}


def test_training_checkpoint_siblings_do_not_confuse(resnet18_sd):
    loaded = load_model(_save(_training_checkpoint(resnet18_sd)), arch="resnet18")
    assert loaded.spec.checkpoint_key == "state_dict"
    assert torch.equal(loaded.model.fc.weight, resnet18_sd["fc.weight"])


def test_nested_weights_win_over_a_half_tensor_top_level(resnet18_sd):
    """{'state_dict': ..., 'best_prec1': tensor} is itself 50 % tensors; the weights are still inside."""
    loaded = load_model(_save({"state_dict": resnet18_sd, "best_prec1": torch.tensor(91.2)}), arch="resnet18")
    assert loaded.spec.checkpoint_key == "state_dict"


def test_weights_under_an_unknown_key_are_found_when_alone(resnet18_sd):
    loaded = load_model(_save({"student": resnet18_sd, "epoch": 3, "acc": 71.0}), arch="resnet18")
    assert loaded.spec.checkpoint_key == "student"
    assert any("'student' entry" in n for n in loaded.notes)


def test_mixed_dataparallel_prefix_is_stripped_where_present(resnet18_sd):
    keys = list(resnet18_sd)
    sd = {("module." + k if i % 2 else k): v for i, (k, v) in enumerate(resnet18_sd.items())}
    loaded = load_model(_save(sd), arch="resnet18")
    assert torch.equal(loaded.model.fc.weight, resnet18_sd["fc.weight"])
    assert any(f"from {len(keys) // 2} of {len(keys)} parameter names" in n for n in loaded.notes)


def test_mixed_prefix_that_would_duplicate_names_is_left_alone(resnet18_sd):
    sd = dict(resnet18_sd)
    sd["module.fc.weight"] = torch.zeros_like(sd["fc.weight"])
    with pytest.raises(ModelLoadError, match=r"unexpected key\(s\), first: module\.fc\.weight"):
        load_model(_save(sd), arch="resnet18")


def test_half_model_state_dict(tmp_path):
    model = build_architecture("sample_resnet", 5)
    path = tmp_path / "half.pth"
    torch.save(model.half().state_dict(), path)
    loaded = load_model(path, arch="sample_resnet")
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert torch.equal(loaded.model.state_dict()["fc.weight"], model.state_dict()["fc.weight"].float())
    assert any("float16" in n and "half precision" in n for n in loaded.notes)


def test_versioned_modules_load_from_nested_prefixed_checkpoints(tmp_path):
    """MNASNet refuses weights without its version number, which nesting and prefix stripping drop."""
    import torchvision

    sd = torchvision.models.mnasnet0_5(num_classes=3).state_dict()
    path = tmp_path / "mnasnet.pt"
    torch.save({"epoch": 5, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    loaded = load_model(path, arch="mnasnet0_5")
    assert loaded.spec.num_classes == 3
    assert torch.equal(loaded.model.state_dict()["classifier.1.weight"], sd["classifier.1.weight"])


@pytest.mark.parametrize("arch", ["regnet_x_400mf", "mobilenet_v3_small"])
def test_class_count_is_inferred_for_every_builder(arch, tmp_path):
    """The class-count probe builds on the meta device where it can; RegNet's builder cannot."""
    path = tmp_path / "w.pt"
    torch.save(build_architecture(arch, 7).state_dict(), path)
    assert load_model(path, arch=arch).spec.num_classes == 7


def test_weights_of_another_architecture_say_where_a_python_file_goes():
    """Issue 27: both ways weights can misfit a named architecture end with the pointer to the user's own
    architecture, in the words of the interface that shows it."""
    from core.errors import ArchitectureMismatchError, user_message
    from core.models import SAMPLE_DIR, load_model, sample_entry

    cifar = (SAMPLE_DIR / sample_entry("cifar10")["weights"]).read_bytes()
    with pytest.raises(ArchitectureMismatchError) as no_head:
        load_model(cifar, arch="resnet18")
    assert "Cannot tell the number of classes" in str(no_head.value)
    assert "'Custom architecture (Python file) + weights'" in user_message(no_head.value, "app")
    assert "--model-code FILE.py --model-class NAME --trusted" in user_message(no_head.value, "cli")
    vgg = (SAMPLE_DIR / sample_entry("vgg_digits")["weights"]).read_bytes()
    with pytest.raises(ArchitectureMismatchError) as misfit:
        load_model(vgg, arch="sample_resnet")
    assert "Python file of your own" in str(misfit.value)
