"""Models and data as users really have them (issue 13, items 1-4 and 6): old checkpoints, models that do not
say their input size or read grey images, 16-bit images, whole models pickled from a training script.

Every model and image here is made by the test; each test asserts the value that is right.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from core.sources import load_dataset
from core.errors import ModelLoadError, UntrustedRunError
from core.evaluate import evaluate_accuracy, predict_logits
from core.models import InputSpec, load_model

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cifar_resnet.py"

# A grey-scale "model" whose answer is the image's brightness: class 0 = dark, class 1 = bright.
GREY_CODE = textwrap.dedent('''
    import torch
    from torch import nn

    class GreyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    def brightness_net():
        net = GreyNet()
        with torch.no_grad():
            net.conv.weight.zero_()
            net.conv.weight[:, 0, 1, 1] = 1.0
            net.conv.bias.copy_(torch.tensor([5.0, 5.0, 5.0, 5.0]))
            net.fc.weight.copy_(torch.tensor([[-1.0, 0, 0, 0], [1.0, 0, 0, 0]]))
            net.fc.bias.copy_(torch.tensor([5.0, -5.0]))
        return net
''')


def write_images(root: Path, classes: dict[str, list[np.ndarray]]) -> Path:
    """An ImageFolder of PNGs; each array's dtype and shape choose the PNG kind (uint16 = 16-bit grey)."""
    for cls, arrays in classes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i, arr in enumerate(arrays):
            Image.fromarray(arr).save(root / cls / f"{i:03d}.png")
    return root


def brightness_images(n: int, size: int, dark: int, bright: int, seed: int = 0, dtype=np.uint8, scale: int = 1):
    rng = np.random.default_rng(seed)

    def one(level):
        return (np.clip(level + rng.integers(-20, 21, (size, size)), 0, 255) * scale).astype(dtype)

    return {"0_dark": [one(dark) for _ in range(n)], "1_bright": [one(bright) for _ in range(n)]}


@pytest.fixture()
def grey_model(tmp_path):
    code = tmp_path / "grey.py"
    code.write_text(GREY_CODE)
    weights = tmp_path / "grey.pt"
    namespace: dict = {}
    exec(GREY_CODE, namespace)
    torch.save(namespace["brightness_net"]().state_dict(), weights)
    return weights, code


# ----------------------------------------------------------------------------- 1. pre-0.4.1 checkpoints


def test_checkpoint_without_num_batches_tracked_loads_as_pytorch_loads_it(tmp_path):
    model = torchvision.models.resnet18(num_classes=4).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(old) < len(model.state_dict())
    path = tmp_path / "old.pth"
    torch.save(old, path)

    loaded = load_model(path, arch="resnet18")
    reference = torchvision.models.resnet18(num_classes=4)
    reference.load_state_dict(dict(old), strict=True)  # PyTorch's own rule: no metadata, legacy BatchNorm
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), reference.eval()(x))


def test_keys_pytorch_refuses_are_still_explained(tmp_path):
    sd = torchvision.models.resnet18(num_classes=4).state_dict()
    del sd["layer1.0.conv1.weight"]
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(ModelLoadError, match="1 missing key.*layer1.0.conv1.weight"):
        load_model(path, arch="resnet18")


# ----------------------------------------------------------------------------- 2. input size from the data


def test_input_size_comes_from_the_data_when_the_model_does_not_fix_it(tmp_path):
    weights = tmp_path / "r20.pth"
    namespace: dict = {}
    exec(FIXTURE.read_text(), namespace)
    torch.save(namespace["resnet20"](num_classes=2).state_dict(), weights)
    data_dir = write_images(tmp_path / "data", {c: [np.stack([a] * 3, -1) for a in arrays]
                                                for c, arrays in brightness_images(6, 32, 60, 190).items()})
    loaded = load_model(weights, code_path=FIXTURE, code_name="resnet20", code_args={"num_classes": 2}, trusted=True)
    data = load_dataset(data_dir, loaded.spec.input, expected_classes=2)
    assert (data.input.height, data.input.width) == (32, 32)
    assert tuple(data.val.images.shape[2:]) == (32, 32)
    assert any("32×32 taken from the data (all 12 images" in n for n in data.report.notes)


def test_mixed_sizes_take_the_most_common_one_and_say_so(tmp_path):
    rng = np.random.default_rng(0)
    classes = {"a": [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(5)]
               + [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)],
               "b": [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(4)]}
    data = load_dataset(write_images(tmp_path / "d", classes), InputSpec(height=0, width=0))
    assert (data.input.height, data.input.width) == (40, 48)
    assert any("most common size (9 of 10 images; 2 different sizes)" in n for n in data.report.notes)


def test_cli_evaluates_a_cifar_model_at_the_inferred_size(tmp_path):
    weights = tmp_path / "r20.pth"
    namespace: dict = {}
    exec(FIXTURE.read_text(), namespace)
    torch.save(namespace["resnet20"](num_classes=2).state_dict(), weights)
    data_dir = write_images(tmp_path / "data", {c: [np.stack([a] * 3, -1) for a in arrays]
                                                for c, arrays in brightness_images(5, 32, 60, 190).items()})
    proc = subprocess.run([sys.executable, "-m", "core", "evaluate", "--model", str(weights), "--model-code",
                           str(FIXTURE), "--model-class", "resnet20", "--model-args", '{"num_classes": 2}',
                           "--trusted", "--data", str(data_dir), "--no-latency", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["input"]["height"] == 32 and result["input"]["width"] == 32
    assert "32×32 taken from the data" in proc.stderr


# ----------------------------------------------------------------------------- 3. grey-scale models


def test_grey_model_reads_one_channel_and_scores_what_it_should(tmp_path, grey_model):
    weights, code = grey_model
    classes = brightness_images(8, 20, 50, 200)
    classes["1_bright"] = [np.stack([a] * 3, -1) for a in classes["1_bright"]]  # RGB files are converted to grey
    loaded = load_model(weights, code_path=code, code_name="brightness_net", trusted=True)
    assert loaded.spec.input.channels == 1 and len(loaded.spec.input.mean) == len(loaded.spec.input.std) == 1
    assert any("reads 1 channel" in n for n in loaded.notes)
    data = load_dataset(write_images(tmp_path / "grey", classes), loaded.spec.input, expected_classes=2)
    assert data.val.images.shape[1] == 1
    assert evaluate_accuracy(loaded.model, data.val, data.input).accuracy == 1.0


# ----------------------------------------------------------------------------- 4. 16-bit images


def test_16bit_images_score_what_their_8bit_copies_score(tmp_path, grey_model):
    weights, code = grey_model
    loaded = load_model(weights, code_path=code, code_name="brightness_net", trusted=True)
    eight = load_dataset(write_images(tmp_path / "8", brightness_images(8, 20, 50, 200)), loaded.spec.input)
    sixteen_dir = write_images(tmp_path / "16", brightness_images(8, 20, 50, 200, dtype=np.uint16, scale=257))
    with Image.open(next((sixteen_dir / "0_dark").iterdir())) as probe:
        assert probe.mode.startswith("I")  # really a 16-bit file
    sixteen = load_dataset(sixteen_dir, loaded.spec.input)
    assert torch.equal(sixteen.val.images, eight.val.images)  # scaled by 65535 -> 255, not clipped
    acc8 = evaluate_accuracy(loaded.model, eight.val, eight.input).accuracy
    acc16 = evaluate_accuracy(loaded.model, sixteen.val, sixteen.input).accuracy
    assert acc8 == acc16 == 1.0
    said = " ".join(sixteen.report.notes)
    assert "16 image(s) with more than 8 bits per pixel" in said and "not clipped" in said


def test_16bit_rgb_model_gets_scaled_grey_in_rgb(tmp_path):
    """A 16-bit grey file read by an RGB model: scaled first, then copied to three channels."""
    arr = np.full((8, 8), 40000, dtype=np.uint16)
    data = load_dataset(write_images(tmp_path / "d", {"a": [arr, arr], "b": [arr, arr]}),
                        InputSpec(height=8, width=8))
    assert int(data.train.images.max()) == round(40000 * 255 / 65535) == int(data.train.images.min())
    assert data.train.images.shape[1] == 3


# ----------------------------------------------------------------------------- 6. pickles from a training script


TRAIN_SCRIPT = textwrap.dedent('''
    import sys
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    if __name__ == "__main__":
        torch.manual_seed(0)
        torch.save(Net(), sys.argv[1])
''')


@pytest.fixture()
def script_pickle(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    out = tmp_path / "net.pt"
    subprocess.run([sys.executable, str(script), str(out)], check=True, cwd=tmp_path, timeout=120)
    return out, script


def test_script_pickle_without_its_code_names_the_class_and_the_way_out(script_pickle):
    path, _ = script_pickle
    with pytest.raises(ModelLoadError) as info:
        load_model(path, trusted=True)
    message = str(info.value)
    assert "'Net'" in message and "--model-code" in message and "core.__main__" not in message


def test_script_pickle_loads_with_its_code(script_pickle):
    path, script = script_pickle
    loaded = load_model(path, trusted=True, code_path=script)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), _reference_net()(x))
    assert loaded.spec.pickled and loaded.spec.num_classes == 2


def test_script_pickle_as_weights_of_the_class_in_its_code(script_pickle):
    """The Load page's way: the script as custom architecture, its class named, the pickle as the weights."""
    path, script = script_pickle
    loaded = load_model(path, trusted=True, code_path=script, code_name="Net")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), _reference_net()(x))


def _reference_net(code: str = TRAIN_SCRIPT, name: str = "Net") -> torch.nn.Module:
    """The network the training script saved, rebuilt independently (same seed, same class)."""
    torch.manual_seed(0)
    namespace: dict = {"__name__": "reference"}
    exec(code, namespace)
    return namespace[name]().eval()


def test_cli_script_pickle_with_model_code(script_pickle, tmp_path):
    path, script = script_pickle
    data = write_images(tmp_path / "d", {c: [np.stack([a] * 3, -1) for a in arrays]
                                         for c, arrays in brightness_images(4, 16, 60, 190).items()})
    base = [sys.executable, "-m", "core", "evaluate", "--model", str(path), "--data", str(data), "--no-latency"]
    missing = subprocess.run(base + ["--trusted"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert missing.returncode == 2 and "'Net'" in missing.stderr and "Traceback" not in missing.stderr
    ok = subprocess.run(base + ["--trusted", "--model-code", str(script), "--json"], capture_output=True, text=True,
                        cwd=ROOT, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["num_val"] == 2


def test_run_from_a_script_pickle_keeps_its_code_and_exports_without_the_script(script_pickle, tmp_path):
    """A run made from a __main__ pickle + --model-code copies the code, so export and Review rebuild it after the
    user's script is gone."""
    path, script = script_pickle
    data = write_images(tmp_path / "d", {c: [np.stack([a] * 3, -1) for a in arrays]
                                         for c, arrays in brightness_images(10, 16, 60, 190).items()})
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "core", "prune", "--model", str(path), "--trusted", "--model-code",
                           str(script), "--data", str(data), "--out", str(run_dir), "--max-steps", "1",
                           "--score-images", "16", "--finetune-steps", "1", "--no-latency", "--no-analysis",
                           "--criterion", "l1", "--cluster", "4"], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model_spec"]["pickle_code"] == "model_code.py"
    assert (run_dir / "model_code.py").read_bytes() == script.read_bytes()
    assert "model_code.py" in config["trust"]["files"]
    script.unlink()  # the user's script is gone

    from core.runs import Run

    run = Run(run_dir)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(run.original().model(x), _reference_net()(x))
    for trusted in ([], ["--trusted"]):
        out = tmp_path / f"bundle{len(trusted)}"
        ex = subprocess.run([sys.executable, "-m", "core", "export", "--run", str(run_dir), "--out", str(out)]
                            + trusted, capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert ex.returncode in (0, 3), ex.stderr
        assert "needs class" not in ex.stderr and "Traceback" not in ex.stderr
        if ex.returncode == 3:
            assert "NCS2" in ex.stderr or "ncs2" in ex.stderr.lower(), ex.stderr
        assert out.is_dir()
    code_copy = run_dir / "model_code.py"
    kept = code_copy.read_bytes()
    code_copy.write_text(TRAIN_SCRIPT.replace("nn.Linear(8, 2)", "nn.Linear(8, 2); open('ran', 'w')"))
    with pytest.raises(UntrustedRunError, match="model code"):  # a replaced copy is refused before anything runs
        Run(run_dir).original()
    assert not (ROOT / "ran").exists() and not Path("ran").exists()
    code_copy.write_bytes(kept)
    config["model_spec"]["pickle_code"] = None  # a run made without the code says how to make one that works
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="holds no copy of that code.*prune again"):
        Run(run_dir).original()


# A pickle whose classes live in the user's own module (not __main__): torch.save(models_def.Up(), 'up.pt').
MODULE_CODE = textwrap.dedent('''
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x))

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            return self.fc(self.block(x).mean((2, 3)))
''')


@pytest.fixture()
def module_pickle(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "models_def.py").write_text(MODULE_CODE)
    out = tmp_path / "up.pt"
    subprocess.run([sys.executable, "-c", "import sys, torch, models_def; torch.manual_seed(0); "
                    "torch.save(models_def.Up(), sys.argv[1])", str(out)], check=True, cwd=src, timeout=120)
    code = tmp_path / "models_def.py"  # the user's file, given beside the pickle; the saving folder is not importable
    code.write_text(MODULE_CODE)
    return out, code


def test_module_pickle_loads_with_its_file_and_leaves_sys_modules_alone(module_pickle, tmp_path):
    path, code = module_pickle
    with pytest.raises(ModelLoadError, match="module 'models_def'"):
        load_model(path, trusted=True)
    loaded = load_model(path, trusted=True, code_path=code)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), _reference_net(MODULE_CODE, "Up")(x))
    assert "models_def" not in sys.modules
    renamed = tmp_path / "my_net.py"  # the file may have another name: the module it stands for cannot be imported
    renamed.write_text(MODULE_CODE)
    with torch.no_grad():
        assert torch.equal(load_model(path, trusted=True, code_path=renamed).model(x), _reference_net(MODULE_CODE, "Up")(x))
    lacking = tmp_path / "other.py"
    lacking.write_text("import torch\n")
    with pytest.raises(ModelLoadError, match="needs class 'Up' from module 'models_def'.*other.py"):
        load_model(path, trusted=True, code_path=lacking)


def test_cli_module_pickle_with_model_code(module_pickle, tmp_path):
    path, code = module_pickle
    data = write_images(tmp_path / "d", {c: [np.stack([a] * 3, -1) for a in arrays]
                                         for c, arrays in brightness_images(4, 12, 60, 190).items()})
    proc = subprocess.run([sys.executable, "-m", "core", "evaluate", "--model", str(path), "--trusted", "--model-code",
                           str(code), "--data", str(data), "--no-latency", "--json"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["num_val"] == 2
