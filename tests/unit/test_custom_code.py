"""Custom architectures from the user's Python file: a public-style CIFAR ResNet loads as distributed, its
run folders rebuild without the original file, and every mistake gets its own one-line message."""
from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.custom_code import (build_from_code, keep_uploaded_code, list_definitions, model_candidates, parse_model_args,
                              whole_models)
from core.errors import ModelLoadError, UntrustedCodeError, UntrustedPickleError
from core.models import InputSpec, ModelSpec, load_model, rebuild_from_spec
from core.runs import CODE_COPY, Run, RunWriter
from tests.helpers import quick_config, random_dataset

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cifar_resnet.py"
CIFAR = InputSpec(height=32, width=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def reference_module():
    """The fixture imported the ordinary way, independently of core.custom_code."""
    spec = importlib.util.spec_from_file_location("reference_cifar_resnet", FIXTURE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REF = reference_module()


def _bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def resnet20_4():
    torch.manual_seed(0)
    model = REF.resnet20(num_classes=4).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so a wrong load would show in the outputs
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def code_file(tmp_path) -> Path:
    """A private copy of the fixture, so a test may move or delete it."""
    path = tmp_path / "user_code" / "resnet.py"
    path.parent.mkdir()
    shutil.copyfile(FIXTURE, path)
    return path


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-5)


# ----------------------------------------------------------------------------- reading names without running


def test_list_definitions_puts_module_classes_first():
    classes, functions = list_definitions(FIXTURE.read_text(), "cifar_resnet.py")
    assert classes == ["LambdaLayer", "BasicBlock", "ResNet"]
    assert functions == ["_weights_init", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
                         "test"]


def test_list_definitions_orders_subclasses_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    source = f"""
import pathlib
pathlib.Path({str(marker)!r}).write_text("x")
class Config: pass
class Head(Base): pass
class Base(nn.Module): pass
class Seq(torch.nn.Sequential): pass
def build(): return Base()
"""
    classes, functions = list_definitions(source)
    assert classes == ["Head", "Base", "Seq", "Config"]  # Head derives from Module through Base, defined later
    assert functions == ["build"]
    assert not marker.exists()


FACTORIES = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202"]


def test_candidates_offer_whole_models_not_helpers():
    """Issue 16: the file's blocks, layers, init and test helpers are not offered beside the factories."""
    assert model_candidates(FIXTURE.read_bytes()) == FACTORIES + ["ResNet"]  # ResNet needs arguments: last


def test_candidates_leave_out_parts_of_any_layout(tmp_path):
    """torchvision-style files: a conv helper used in a block, a block passed to the model class, a private
    builder, an imported class, a config and a function returning nothing are not models."""
    source = """
import torch.nn as nn
from torchvision.models import AlexNet
class Config:
    depth = 18
def conv3x3(cin, cout):
    return nn.Conv2d(cin, cout, 3, padding=1)
class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = conv3x3(c, c)
class Net(nn.Module):
    def __init__(self, block, n=2):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.blocks = nn.Sequential(*[block(8) for _ in range(n)])
class WideNet(Net):
    pass
def _net(block, n):
    return Net(block, n)
def build_net(n=2):
    return _net(Block, n)
def make(depth):
    return Net(Block, depth)
def summary(model):
    print(model)
"""
    assert model_candidates(source) == ["build_net", "Net", "WideNet", "make"]


def test_candidates_fall_back_to_every_definition():
    assert model_candidates("def _build():\n    return 1\nclass Cfg:\n    pass\n") == ["Cfg", "_build"]


def test_whole_models_keeps_what_builds_a_network(code_file):
    """Trusted: each candidate is built without arguments and run on an image batch; the ResNet class,
    which needs a block and layer counts, is not a whole model by itself."""
    assert whole_models(code_file, model_candidates(code_file.read_bytes()), trusted=True) == FACTORIES
    assert whole_models(code_file, ["BasicBlock", "LambdaLayer", "test", "_weights_init", "resnet20"],
                        trusted=True) == ["resnet20"]


def test_whole_models_keeps_a_class_with_defaults_and_checks_the_input(tmp_path):
    path = write(tmp_path, "net.py", """
import torch.nn as nn
class Grey(nn.Module):  # an MNIST-style model: one channel, 28 x 28, flattened into a fixed Linear
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 26 * 26, 10)
    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))
class Block(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3)
    def forward(self, x):
        return self.conv(x)
""")
    assert whole_models(path, ["Grey", "Block"], trusted=True) == ["Grey"]
    assert whole_models(path, ["Grey"], shapes=((3, 32, 32),), trusted=True) == ["Grey"]  # none fits: all kept
    assert whole_models(path, ["Grey", "Block"], shapes=((1, 28, 28),), trusted=True) == ["Grey"]


def test_whole_models_runs_nothing_untrusted(tmp_path):
    marker = tmp_path / "ran"
    path = write(tmp_path, "net.py", f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n"
                                     "def build():\n    return 1\n")
    with pytest.raises(UntrustedCodeError):
        whole_models(path, ["build"])
    assert not marker.exists()


def test_scan_reports_syntax_error_with_line():
    with pytest.raises(ModelLoadError, match=r"net\.py has a syntax error at line 3 .*`def forward\(self x\):`"):
        list_definitions("import torch\n\ndef forward(self x):\n    pass\n", "net.py")


# ----------------------------------------------------------------------------- loading


def test_factory_with_keyword_args(tmp_path, resnet20_4, code_file):
    weights = tmp_path / "w.pth"
    torch.save(resnet20_4.state_dict(), weights)
    loaded = load_model(weights, code_path=code_file, code_name="resnet20", code_args='{"num_classes": 4}',
                        trusted=True, input_spec=CIFAR)
    assert loaded.spec.arch == "custom:resnet20" and loaded.spec.num_classes == 4
    assert loaded.spec.code_file == str(code_file.resolve()) and loaded.spec.code_args == {"num_classes": 4}
    assert same_outputs(loaded.model, resnet20_4)
    assert not any("224" in n for n in loaded.notes)  # the input size was given


def test_input_size_is_left_to_the_data(tmp_path, code_file):
    """A Python file does not say the input size: it stays open (0×0) until the data set's images give it."""
    loaded = load_model(_bytes(REF.resnet20().state_dict()), code_path=code_file, code_name="resnet20", trusted=True)
    assert loaded.spec.num_classes == 10 and (loaded.spec.input.height, loaded.spec.input.width) == (0, 0)


@pytest.mark.parametrize("args", ['{"num_classes": 3, "width": 4}', "[3, 4]", {"width": 4, "num_classes": 3}])
def test_class_with_keyword_or_positional_args(tmp_path, args):
    code = write(tmp_path, "net.py", """
import torch.nn as nn

class TinyNet(nn.Module):
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))
""")
    torch.manual_seed(0)
    reference = build_from_code(code, "TinyNet", {"num_classes": 3, "width": 4}, trusted=True)
    loaded = load_model(_bytes(reference.state_dict()), code_path=code, code_name="TinyNet", code_args=args,
                        trusted=True, input_spec=CIFAR)
    assert loaded.spec.num_classes == 3 and loaded.model.fc.in_features == 4
    assert same_outputs(loaded.model, reference)


def test_akamaster_style_checkpoint(tmp_path, resnet20_4, code_file):
    """As pytorch_resnet_cifar10's trainer saves it: DataParallel names under 'state_dict', with siblings."""
    sd = {"module." + k: v for k, v in resnet20_4.state_dict().items()}
    path = tmp_path / "resnet20-12fca82f.th"
    torch.save({"epoch": 200, "state_dict": sd, "best_prec1": 91.2}, path)
    loaded = load_model(path, code_path=code_file, code_name="resnet20", code_args={"num_classes": 4}, trusted=True)
    assert loaded.spec.checkpoint_key == "state_dict"
    assert any("'state_dict' entry" in n for n in loaded.notes)
    assert any("'module.' prefix" in n for n in loaded.notes)
    assert same_outputs(loaded.model, resnet20_4)


def test_half_precision_weights(resnet20_4, code_file):
    import copy

    half = copy.deepcopy(resnet20_4).half().state_dict()
    loaded = load_model(_bytes(half), code_path=code_file, code_name="resnet20", code_args={"num_classes": 4},
                        trusted=True)
    assert loaded.model.linear.weight.dtype == torch.float32
    assert any("float16" in n for n in loaded.notes)
    assert torch.equal(loaded.model.linear.weight, half["linear.weight"].float())


def test_same_file_name_in_two_folders_does_not_clash(tmp_path):
    template = "import torch.nn as nn\nclass Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n" \
               "        self.fc = nn.Linear(3, {n})\n    def forward(self, x):\n        return self.fc(x.mean((2, 3)))\n"
    a = write(tmp_path, "a/model.py", template.format(n=2))
    b = write(tmp_path, "b/model.py", template.format(n=5))
    path_before = list(sys.path)
    net_a = build_from_code(a, "Net", trusted=True)
    net_b = build_from_code(b, "Net", trusted=True)
    assert (net_a.fc.out_features, net_b.fc.out_features) == (2, 5)
    assert type(net_a).__module__ != type(net_b).__module__
    assert build_from_code(a, "Net", trusted=True).fc.out_features == 2  # a is not replaced by b
    assert sys.path == path_before


def test_main_guard_does_not_run(tmp_path):
    marker = tmp_path / "main_ran"
    code = write(tmp_path, "m.py", f"import torch.nn as nn\ndef net():\n    return nn.Linear(2, 3)\n"
                                   f"if __name__ == '__main__':\n    open({str(marker)!r}, 'w').write('x')\n")
    assert build_from_code(code, "net", trusted=True).out_features == 3
    assert not marker.exists()


# ----------------------------------------------------------------------------- trust


def test_untrusted_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    code = write(tmp_path, "evil.py", f"open({str(marker)!r}, 'w').write('x')\nimport torch.nn as nn\n"
                                      "def net():\n    return nn.Linear(2, 2)\n")
    with pytest.raises(UntrustedCodeError) as info:
        load_model(_bytes(torch.nn.Linear(2, 2).state_dict()), code_path=code, code_name="net")
    assert isinstance(info.value, UntrustedPickleError)  # the same switch handles both refusals
    message = str(info.value)  # the app's wording: it names the app's switch only
    assert "evil.py" in message and "I trust this file" in message and "--trusted" not in message
    cli = info.value.for_interface("cli")  # the CLI's wording names its flag only
    assert "--trusted" in cli and "I trust this file" not in cli
    assert "\n" not in message and "{" not in message
    assert not marker.exists()
    build_from_code(code, "net", trusted=True)
    assert marker.exists(), "the file's code is real: trusted, it runs"


def test_rebuild_from_spec_needs_trust(resnet20_4, code_file):
    spec = ModelSpec(arch="custom:resnet20", num_classes=4, code_file=str(code_file), code_name="resnet20",
                     code_args={"num_classes": 4})
    with pytest.raises(UntrustedCodeError):
        rebuild_from_spec(spec, resnet20_4.state_dict())
    assert same_outputs(rebuild_from_spec(spec, resnet20_4.state_dict(), trusted=True), resnet20_4)


# ----------------------------------------------------------------------------- errors


def load_with(code: Path, name: str, args=None, weights: bytes | None = None):
    weights = weights if weights is not None else _bytes(REF.resnet20(num_classes=4).state_dict())
    return load_model(weights, code_path=code, code_name=name, code_args=args, trusted=True)


def test_syntax_error_names_file_line_and_text(tmp_path):
    code = write(tmp_path, "broken.py", "import torch.nn as nn\n\nclass Net(nn.Module)\n    pass\n")
    with pytest.raises(ModelLoadError) as info:
        load_with(code, "Net")
    assert "broken.py has a syntax error at line 3" in str(info.value)
    assert "class Net(nn.Module)" in str(info.value)


def test_unknown_name_lists_what_the_file_defines(code_file):
    with pytest.raises(ModelLoadError) as info:
        load_with(code_file, "resnet18")
    message = str(info.value)
    assert "defines no 'resnet18'" in message
    assert "Classes in the file: LambdaLayer, BasicBlock, ResNet;" in message
    assert "resnet20, resnet32" in message and "_weights_init" in message


def test_name_that_is_not_callable(code_file):
    with pytest.raises(ModelLoadError, match=r"'__all__' in resnet\.py is a list, not a class or function"):
        load_with(code_file, "__all__")


def test_function_that_returns_no_module(code_file):
    with pytest.raises(ModelLoadError, match=r"_weights_init\(1\) in resnet\.py returned NoneType, not a torch\.nn\.Module"):
        load_with(code_file, "_weights_init", "[1]")


def test_constructor_failure_shows_type_and_message(code_file, tmp_path):
    with pytest.raises(ModelLoadError, match=r"resnet20\(depth=3\) failed: TypeError: .*unexpected keyword argument 'depth'"):
        load_with(code_file, "resnet20", '{"depth": 3}')
    code = write(tmp_path, "picky.py", "def net(width=8):\n    if width % 8:\n        raise ValueError('width must be a "
                                       "multiple of 8')\n")
    with pytest.raises(ModelLoadError, match=r"net\(width=5\) failed at line 3 of picky\.py: ValueError: width must be a multiple of 8"):
        load_with(code, "net", {"width": 5})


@pytest.mark.parametrize("text, expected", [('{"num_classes": 4', "not valid JSON"),
                                            ("num_classes=4", "not valid JSON"),
                                            ("4", "must be a JSON object")])
def test_bad_json_args(code_file, text, expected):
    with pytest.raises(ModelLoadError, match=expected):
        load_with(code_file, "resnet20", text)


def test_parse_model_args_forms():
    assert parse_model_args('{"num_classes": 4}') == {"num_classes": 4}
    assert parse_model_args("[4, true]") == [4, True]
    assert parse_model_args("  ") is None and parse_model_args(None) is None


def test_weights_that_do_not_fit_name_keys_and_shapes(code_file):
    with pytest.raises(ModelLoadError) as info:
        load_with(code_file, "resnet20", {"num_classes": 4}, weights=_bytes(REF.resnet32(num_classes=4).state_dict()))
    message = str(info.value)
    assert "do not fit architecture 'custom:resnet20'" in message and "unexpected key(s), first: layer1.3" in message


def test_class_count_mismatch_suggests_the_argument(code_file):
    with pytest.raises(ModelLoadError) as info:
        load_with(code_file, "resnet20")  # the weights have 4 classes, the factory's default is 10
    message = str(info.value)
    assert "linear.weight is (4, 64) in the file but (10, 64)" in message
    assert '{"num_classes": 4}' in message


def test_sibling_import_is_out_of_scope(tmp_path):
    write(tmp_path, "pkg/layers.py", "X = 1\n")
    relative = write(tmp_path, "pkg/net.py", "from .layers import X\n")
    sibling = write(tmp_path, "pkg/net2.py", "import layers\n")
    for code in (relative, sibling):
        with pytest.raises(ModelLoadError, match="must be self-contained"):
            load_with(code, "net")


def test_error_while_running_the_file_names_the_line(tmp_path):
    code = write(tmp_path, "typo.py", "import torch.nn as nn\n\nWIDTH = wdth * 2\n")
    with pytest.raises(ModelLoadError, match=r"Running typo\.py failed at line 3 of typo\.py: NameError"):
        load_with(code, "net")


def test_missing_pieces(tmp_path, code_file):
    with pytest.raises(ModelLoadError, match="without the Python file"):
        load_model(_bytes({}), code_name="resnet20", trusted=True)
    with pytest.raises(ModelLoadError, match="Name the class or factory function"):
        load_with(code_file, "")
    with pytest.raises(ModelLoadError, match="not found"):
        load_with(tmp_path / "nowhere.py", "resnet20")
    with pytest.raises(ModelLoadError, match="give one of them"):
        load_model(_bytes({}), arch="resnet18", code_path=code_file, code_name="resnet20", trusted=True)


def test_uploaded_code_is_kept_under_its_name_per_content():
    a = keep_uploaded_code(b"A = 1\n", "../../model.py")
    b = keep_uploaded_code(b"A = 2\n", "model.py")
    assert a.name == b.name == "model.py" and a != b
    assert a.read_bytes() == b"A = 1\n" and "uploads" in a.parts
    assert keep_uploaded_code(b"x", "weird name").name == "weird_name.py"


# ----------------------------------------------------------------------------- specs and run folders


def test_old_spec_dicts_still_load():
    old = {"arch": "resnet18", "num_classes": 7, "input": {"height": 224, "width": 224, "channels": 3,
                                                           "mean": [0.5] * 3, "std": [0.25] * 3}, "pickled": False}
    spec = ModelSpec.from_dict(old)
    assert not spec.custom and spec.code_file is None and spec.code_args is None
    custom = ModelSpec(arch="custom:resnet20", num_classes=4, code_file="model_code.py", code_name="resnet20",
                       code_args={"num_classes": 4})
    assert ModelSpec.from_dict(json.loads(json.dumps(custom.to_dict()))) == custom


def test_prune_run_keeps_the_code_and_rebuilds_without_the_original(tmp_path, resnet20_4, code_file):
    from core.prune import run_pruning

    weights = tmp_path / "w.pth"
    torch.save({"state_dict": resnet20_4.state_dict(), "epoch": 1}, weights)
    loaded = load_model(weights, code_path=code_file, code_name="resnet20", code_args={"num_classes": 4},
                        trusted=True, input_spec=CIFAR)
    run_dir = tmp_path / "run"
    run_pruning(loaded, random_dataset(4), quick_config(max_steps=1), run_dir)
    assert (run_dir / CODE_COPY).read_bytes() == FIXTURE.read_bytes()
    stored = json.loads((run_dir / "config.json").read_text())["model_spec"]
    assert stored["code_file"] == CODE_COPY and stored["code_name"] == "resnet20"
    assert loaded.spec.code_file == str(code_file.resolve()), "the loaded model's spec is left as it was"

    shutil.rmtree(code_file.parent)  # the user's file is gone
    run = Run(run_dir)
    assert same_outputs(run.original().model, resnet20_4)
    step1 = run.rebuild_step(1)
    saved = torch.load(run_dir / "steps" / "0001.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in step1.state_dict().items())
    assert sum(p.numel() for p in step1.parameters()) < sum(p.numel() for p in resnet20_4.parameters())
    assert step1(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_run_start_keeps_the_bytes_that_ran_even_when_the_file_vanished(tmp_path, resnet20_4, code_file):
    """Issue 28: the run keeps the code that ran at load (never the file read again by name), so a file moved or
    deleted since then changes nothing: the run starts and rebuilds its model from exactly those bytes."""
    ran = code_file.read_bytes()
    loaded = load_model(_bytes(resnet20_4.state_dict()), code_path=code_file, code_name="resnet20",
                        code_args={"num_classes": 4}, trusted=True)
    code_file.unlink()
    RunWriter(tmp_path / "run").start({}, loaded)
    assert (tmp_path / "run" / "model_code.py").read_bytes() == ran
    from core.runs import sha256_bytes, trusted_hashes

    assert trusted_hashes()[sha256_bytes(ran)]["calls"] == [{"name": "resnet20", "args": {"num_classes": 4}}]


# ----------------------------------------------------------------------------- command line


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def _data_zip(path: Path, classes: int = 4, per_class: int = 5) -> Path:
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as zf:
        for c in range(classes):
            for i in range(per_class):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB").save(buf, format="PNG")
                zf.writestr(f"c{c}/{i}.png", buf.getvalue())
    return path


def test_cli_evaluate_custom_model(tmp_path, resnet20_4):
    from core.sources import load_dataset
    from core.evaluate import evaluate_accuracy

    weights = tmp_path / "resnet20.th"
    torch.save({"state_dict": {"module." + k: v for k, v in resnet20_4.state_dict().items()}, "best_prec1": 91.2,
                "epoch": 200}, weights)
    data = _data_zip(tmp_path / "data.zip")
    res = _cli("evaluate", "--model", str(weights), "--model-code", str(FIXTURE), "--model-class", "resnet20",
               "--model-args", '{"num_classes": 4}', "--trusted", "--input-size", "32", "32",
               "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25",
               "--data", str(data), "--no-latency", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["arch"] == "custom:resnet20" and out["num_val"] == 4
    assert any("'state_dict' entry" in n for n in out["notes"])
    expected = evaluate_accuracy(resnet20_4, load_dataset(str(data), CIFAR, expected_classes=4).val, CIFAR)
    assert out["accuracy"] == pytest.approx(expected.accuracy)


def test_cli_model_code_needs_trust_and_class(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(REF.resnet20().state_dict(), weights)
    base = ["evaluate", "--model", str(weights), "--data", "sample:vgg_digits", "--no-latency"]
    untrusted = _cli(*base, "--model-code", str(FIXTURE), "--model-class", "resnet20")
    assert untrusted.returncode == 2 and "Traceback" not in untrusted.stderr
    assert len(untrusted.stderr.strip().splitlines()) == 1
    assert "runs the code in cifar_resnet.py" in untrusted.stderr and "--trusted" in untrusted.stderr
    no_code = _cli(*base, "--model-class", "resnet20", "--trusted")
    assert no_code.returncode == 2 and "--model-class needs --model-code" in no_code.stderr
    no_class = _cli(*base, "--model-code", str(FIXTURE), "--trusted")
    # Without a class the file must be a whole pickled model (whose classes the code defines); weights are not.
    assert no_class.returncode == 2 and "holds weights" in no_class.stderr and "--model-class" in no_class.stderr
