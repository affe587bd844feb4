"""Loading and saving models safely; the architecture registry; the specs that let any model be rebuilt.

Weights are always read with ``torch.load(weights_only=True)``, which refuses to run code. A whole
pickled ``nn.Module`` needs code to run, so it is loaded only when the caller says the file is
trusted. Everything PruneScope writes itself is architecture name + state dict (+ pruning history),
so it reloads without pickle.
"""
from __future__ import annotations

import io
import json
import math
import pickle
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .architectures import SAMPLE_ARCHITECTURES
from .custom_code import build_from_code, import_code_file, parse_model_args, source_of
from .errors import (CODE_CONTROL, TRUST_CONTROL, ArchitectureMismatchError, ModelLoadError, SettingsError,
                     UntrustedPickleError, one_line)
from .preprocess import match_first_layer

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO_ROOT / "sample_models"
MAX_INPUT_SIDE = 4096  # pixels per side; larger inputs do not fit a review tool's memory
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Keys under which training scripts commonly nest the state dict, in the order they are tried.
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net", "ema", "state_dict_ema", "model_ema")
# Torchvision builders whose auxiliary classifiers only matter for training; we build them without.
_AUX_ARCHS = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}
# said when weights do not fit the chosen architecture (the interface fills in where its own control is)
OWN_ARCHITECTURE_HINT = f"If the model is defined in a Python file of your own (e.g. a published resnet.py), {CODE_CONTROL}."


@dataclass
class InputSpec:
    """What the model expects: the tool resizes, converts and normalises images to this."""

    height: int = 224
    width: int = 224
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    colour_order: str = "RGB"

    def shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        return (batch, self.channels, self.height, self.width)

    def validate(self) -> None:
        """Refuse a size or normalisation no model can take, before any work starts (a negative size
        otherwise fails deep inside torch, a zero std divides by zero). 0x0 is the open size of a model
        that does not fix it (:func:`open_input_spec`): the data set's images decide it later."""
        if (self.height, self.width) != (0, 0):
            check_input_size(self.height, self.width)
        if self.channels not in (1, 3):
            raise SettingsError(f"The model input must have 1 (grey) or 3 (colour) channels; got {self.channels}.")
        for what, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != self.channels or not all(math.isfinite(v) for v in values):
                raise SettingsError(f"The normalisation {what} must be {self.channels} finite number(s), one per "
                                    f"channel; got {list(values)}.")
        if not all(v > 0 for v in self.std):
            raise SettingsError(f"The normalisation std must be positive (it divides the pixels); got {list(self.std)}.")

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def check_input_size(height: int, width: int) -> None:
    """Refuse an input size no model can take (a negative one otherwise fails deep inside torch)."""
    if not all(isinstance(v, int) and 1 <= v <= MAX_INPUT_SIDE for v in (height, width)):
        raise SettingsError(f"The input size must be two whole numbers from 1 to {MAX_INPUT_SIDE} pixels; "
                            f"got {height}×{width}.")


@dataclass
class ModelSpec:
    """How to rebuild a model without pickle: architecture + number of classes (+ where its weights are)."""

    arch: str
    num_classes: int
    input: InputSpec = field(default_factory=InputSpec)
    class_names: list[str] | None = None
    source: str = ""
    checkpoint_key: str | None = None
    pickled: bool = False
    # A custom architecture: the Python file that defines it (an absolute path when loaded; a file name
    # inside the run folder once a run has copied it), the class or factory called, and its arguments.
    code_file: str | None = None
    code_name: str | None = None
    code_args: Any = None
    # A whole pickled model whose classes come from the user's Python file (a training script run as __main__,
    # or a module that cannot be imported here): that file, as ``code_file`` (absolute, then the run's copy).
    pickle_code: str | None = None
    # The name of the file the user uploaded the weights in (labels only: the bytes are kept elsewhere).
    upload_name: str = ""

    @property
    def custom(self) -> bool:
        return self.code_file is not None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        d = dict(d)
        d["input"] = InputSpec.from_dict(d.get("input") or {})
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class LoadedModel:
    """A model with its spec and the loader's notes. ``code_bytes``: the exact bytes of the user's Python file
    that ran to build it (custom code, or the classes of a pickle); ``pickle_bytes``: the exact bytes of a
    pickled model that was unpickled. A run keeps and trusts these bytes, never the file read again by name."""

    model: nn.Module
    spec: ModelSpec
    notes: list[str] = field(default_factory=list)
    code_bytes: bytes | None = None
    pickle_bytes: bytes | None = None


# ----------------------------------------------------------------------------- architecture registry


def torchvision_classifiers() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_architectures() -> list[str]:
    return sorted(SAMPLE_ARCHITECTURES) + torchvision_classifiers()


def build_architecture(arch: str, num_classes: int) -> nn.Module:
    """A freshly initialised model of a registered architecture, with ``num_classes`` outputs."""
    if arch in SAMPLE_ARCHITECTURES:
        return SAMPLE_ARCHITECTURES[arch](num_classes=num_classes)
    import torchvision

    if arch not in torchvision_classifiers():
        raise ModelLoadError(
            f"Unknown architecture '{arch}'. Choose one of the sample architectures "
            f"({', '.join(sorted(SAMPLE_ARCHITECTURES))}) or a torchvision classification model (e.g. resnet18)."
        )
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if arch in _AUX_ARCHS:
        kwargs.update(aux_logits=False, init_weights=False)
    return torchvision.models.get_model(arch, **kwargs)


def default_input_spec(arch: str) -> InputSpec:
    if arch == "inception_v3":
        return InputSpec(height=299, width=299)
    return InputSpec()


# ----------------------------------------------------------------------------- reading files


def _sniff(data: bytes) -> str:
    """Tell file kinds apart before unpickling anything, so each gets a specific message."""
    if not data:
        return "empty"
    if data[:4] == b"PK\x03\x04":
        try:
            names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except Exception:  # a torch.save archive with a damaged directory: the reader then says it is damaged
            return "torch_zip"
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("/data.pkl") for n in names):
            return "torch_zip"
        return "zip"
    if data[:1] == b"\x80" and len(data) > 1 and data[1] in range(2, 6):
        return "pickle"
    if _looks_like_onnx(data):
        return "onnx"
    return "unknown"


def _looks_like_onnx(data: bytes) -> bool:
    if b"onnx" not in data[:4096].lower() and b"ir_version" not in data[:64]:
        # ONNX files start with field 1 (ir_version, varint) = 0x08; producer names usually follow.
        if data[:1] != b"\x08":
            return False
    try:
        import onnx

        proto = onnx.load_model_from_string(data)
        return len(proto.graph.node) > 0
    except Exception:
        return False


def read_checkpoint(data: bytes, trusted: bool = False, classes: ModuleType | None = None) -> tuple[Any, list[str]]:
    """The object stored in a PyTorch file, loaded without running code unless ``trusted``.

    ``classes``: the module made from the user's model file; a trusted pickle's references to classes of the
    script that saved it (``__main__``) are resolved there (see :func:`_main_resolving_pickle`).
    """
    kind = _sniff(data)
    if kind == "empty":
        raise ModelLoadError("The model file is empty (0 bytes). Upload the .pt/.pth file again.")
    if kind == "torchscript":
        raise ModelLoadError(
            "This is a TorchScript archive (torch.jit.save), not a state dict. TorchScript graphs cannot be "
            "pruned structurally; save the model's state_dict() with torch.save and choose its architecture."
        )
    if kind == "onnx":
        raise ModelLoadError(
            "This is an ONNX model. PruneScope prunes PyTorch models: upload the PyTorch state dict (.pt/.pth) "
            "the ONNX file was exported from, and choose its architecture."
        )
    if kind in ("unknown", "zip"):
        raise ModelLoadError(
            "This file is not a PyTorch checkpoint (no torch.save header found). Expected a .pt/.pth file "
            "written by torch.save(model.state_dict(), path)."
        )
    notes: list[str] = []
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trusted:
            raise UntrustedPickleError(
                "This file is a pickled Python object, not plain weights "
                f"({_unsupported_global(exc)}). Loading it would run code from the file, so it was not "
                f"loaded. Save model.state_dict() instead, or {TRUST_CONTROL} if you made it yourself."
            ) from None
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False,
                             pickle_module=_main_resolving_pickle(classes))
        except Exception as exc2:  # a trusted pickle can still fail to import its classes
            raise ModelLoadError(_missing_class_message(exc2, classes)) from None
        notes.append("Loaded as a trusted pickle (code in the file was allowed to run).")
    except Exception as exc:  # the weights-only reader runs no code from the file: any failure means a damaged file
        raise ModelLoadError(f"The checkpoint is damaged or truncated and cannot be read ({one_line(exc)}).") from None
    return obj, notes


_SCRIPT_MODULES = ("__main__", "__mp_main__")


class _NotInCode(Exception):
    """A pickle names a class of a module that cannot be imported here, and the model code lacks it too."""

    def __init__(self, module: str, name: str, code: str):
        super().__init__(f"{module}.{name}")
        self.module, self.name, self.code = module, name, code


def _main_resolving_pickle(classes: ModuleType | None) -> ModuleType:
    """A ``pickle`` look-alike for ``torch.load`` whose unpickler finds the pickled classes in the user's file.

    ``torch.save(model)`` records each class by module and name: ``__main__.Net`` from a script run as
    ``python train.py`` (elsewhere ``__main__`` is another program, here ``core.__main__``), or
    ``models_def.Up`` from the user's own module, which is not importable here. With ``classes`` (the module
    made from the file given as model code), a name looked up in a module that file stands for (``__main__``,
    or a module named like the file) comes from the file; so does one of any module that cannot be imported
    here. Other lookups are pickle's own. Nothing is added to ``sys.modules`` under the pickled names.
    """
    if classes is None:
        return pickle
    stem = Path(getattr(classes, "__file__", "") or "").stem

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            found = _attribute(classes, name)
            if found is not None and _stands_for(module, stem):
                return found
            try:
                return super().find_class(module, name)
            except ModuleNotFoundError:
                if found is not None:
                    return found
                raise _NotInCode(module, name, Path(getattr(classes, "__file__", "") or "").name) from None

    shim = ModuleType("prunescope_script_pickle")
    shim.__dict__.update({k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
    shim.Unpickler = Unpickler
    shim.load = lambda f, **kw: Unpickler(f, **kw).load()
    return shim


def _stands_for(module: str, stem: str) -> bool:
    """Whether a pickled module name means the user's file: the script's ``__main__``, or the file's own name
    (``models_def`` for ``models_def.py``). A dotted name (``pkg.models_def``) is left to the import, so an
    installed package is never shadowed; when it cannot be imported the file answers."""
    return module in _SCRIPT_MODULES or module.endswith(".__main__") or (bool(stem) and module == stem)


def _attribute(module: ModuleType, qualname: str):
    """``module``'s object of a (possibly dotted, protocol-4) qualified name, else None."""
    obj: Any = module
    for part in qualname.split("."):
        obj = vars(obj).get(part) if hasattr(obj, "__dict__") else None
        if obj is None:
            return None
    return obj


def _missing_class_message(exc: Exception, classes: ModuleType | None) -> str:
    """Which class the pickle needs that cannot be found, and how to supply it."""
    if isinstance(exc, _NotInCode):
        return (f"The pickled model needs class '{exc.name}' from module '{exc.module}', which cannot be imported "
                f"here, and the file given as model code ({exc.code}) does not define '{exc.name}'. Give the Python "
                f"file that defines it (--model-code FILE with --trusted), or save model.state_dict() instead.")
    text = str(exc)
    found = re.search(r"Can't get attribute '([^']+)' on <module '([^']+)'", text)
    if found:
        name, module = found.groups()
        if module in _SCRIPT_MODULES or module.endswith(".__main__"):
            where = (f"the file given as model code does not define '{name}'" if classes is not None else
                     "that script is not available here")
            return (f"The pickled model needs class '{name}' from the script that saved it (it was run as __main__), "
                    f"and {where}. Give the Python file that defines '{name}' as the model code (command line: "
                    "--model-code FILE with --trusted; Load page: 'Custom architecture (Python file) + weights' with "
                    f"that file and '{name}'); or save model.state_dict() instead.")
        return f"The pickled model needs '{name}' from module '{module}', which does not define it."
    if isinstance(exc, ModuleNotFoundError) and getattr(exc, "name", None):
        return (f"The pickled model needs module '{exc.name}', which cannot be imported here. Give the Python file "
                "that defines the model's classes as the model code (--model-code FILE with --trusted), or install "
                "that module.")
    return f"The trusted pickle could not be loaded: {type(exc).__name__}: {text[:300]}"


def _unsupported_global(exc: Exception) -> str:
    text = str(exc)
    for line in text.splitlines():
        if "Unsupported global" in line or "GLOBAL" in line:
            return line.strip().rstrip(".")[:200]
    return "it references Python classes or functions"


def extract_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], str | None, list[str]]:
    """The state dict inside a checkpoint, however it was nested; names the key it used."""
    notes: list[str] = []
    if isinstance(obj, nn.Module):
        return obj.state_dict(), None, notes
    inner, key_used = _nested_state_dict(obj) if isinstance(obj, dict) else (None, None)
    if inner is not None:
        obj = inner
        notes.append(f"Weights read from the checkpoint's '{key_used}' entry.")
    if not isinstance(obj, dict) or not _is_state_dict(obj):
        keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
        raise ModelLoadError(
            f"No state dict found in the checkpoint (top-level entries: {keys}). Expected tensors by "
            f"parameter name, possibly under one of: {', '.join(CHECKPOINT_KEYS)}."
        )
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    others = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if others:  # training metadata beside the weights (epoch, arch, optimizer): said, never silently dropped
        notes.append(f"Ignored {len(others)} checkpoint entr{'y' if len(others) == 1 else 'ies'} that "
                     f"{'is' if len(others) == 1 else 'are'} not weights: {', '.join(others[:8])}"
                     f"{' …' if len(others) > 8 else ''}.")
    sd = _strip_wrapper_prefixes(sd, notes)
    sd = _to_float32(sd, notes)
    return sd, key_used, notes


def _nested_state_dict(ckpt: dict) -> tuple[dict | None, str | None]:
    """The state dict under a known key (or the only one among the entries), else None.

    Nested entries win over the top level: a training checkpoint such as
    ``{'state_dict': ..., 'best_prec1': tensor(91.2)}`` is half tensors itself, yet its weights are inside.
    """
    candidates = {}
    for key, value in ckpt.items():
        if isinstance(value, nn.Module):
            value = value.state_dict()
        if isinstance(value, dict) and _is_state_dict(value):
            candidates[key] = value
    for key in CHECKPOINT_KEYS:
        if key in candidates:
            return candidates[key], key
    if len(candidates) == 1 and not _is_state_dict(ckpt):
        key = next(iter(candidates))
        return candidates[key], str(key)
    return None, None


# Prefixes that wrappers add to every parameter name: DataParallel/DDP, torch.compile, Lightning-style modules.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
# Of those, the ones that only wrappers produce; a checkpoint mixing them with bare names is stripped key by key.
_MIXABLE_PREFIXES = ("module.", "_orig_mod.")


MAX_EXTRA_ENTRIES = 8  # scalar entries beside a checkpoint's weights (epoch, best_acc1, step) set aside at most


def _extra_entry(key: str, value: torch.Tensor) -> bool:
    """A checkpoint entry that looks like training metadata, not a layer's weight: a top-level name (no '.')
    holding at most one number (``epoch``, ``best_prec1``)."""
    return "." not in key and value.numel() <= 1


def _strip_wrapper_prefixes(sd: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        with_prefix = [k for k in sd if k.startswith(prefix)]
        if not with_prefix:
            continue
        rest = [k for k in sd if not k.startswith(prefix)]
        if rest and len(rest) <= MAX_EXTRA_ENTRIES and len(rest) < len(with_prefix) \
                and all(_extra_entry(k, sd[k]) for k in rest):
            # consistently prefixed weights beside a few scalars: the weights lose the prefix, the scalars stay as
            # they are (load_state_dict_strict sets them aside when the model has no such entry, and says so)
            sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
            notes.append(f"Removed the '{prefix}' prefix from parameter names.")
            continue
        if len(with_prefix) == len(sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
            notes.append(f"Removed the '{prefix}' prefix from parameter names.")
        elif prefix in _MIXABLE_PREFIXES and _strip_is_unambiguous(sd, prefix):
            sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
            notes.append(f"Removed the '{prefix}' prefix from {len(with_prefix)} of {len(sd)} parameter names "
                         "(the others had none).")
    return sd


def _strip_is_unambiguous(sd: dict[str, torch.Tensor], prefix: str) -> bool:
    """Stripping must not make two entries share a name (then the file holds two copies of a weight)."""
    stripped = [k[len(prefix):] if k.startswith(prefix) else k for k in sd]
    return len(set(stripped)) == len(stripped)


def _to_float32(sd: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    """Analysis and fine-tuning run in float32 on the CPU; other float types are converted once, here."""
    other = sorted({str(v.dtype).replace("torch.", "") for v in sd.values()
                    if v.is_floating_point() and v.dtype != torch.float32})
    if not other:
        return sd
    notes.append(f"Converted {', '.join(other)} weights to float32"
                 + (" (half precision)." if set(other) <= {"float16", "bfloat16"} else "."))
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _is_state_dict(d: dict) -> bool:
    tensors = [v for v in d.values() if isinstance(v, torch.Tensor)]
    return bool(tensors) and len(tensors) >= 0.5 * len(d) and all(isinstance(k, str) for k in d)


def classifier_keys(arch: str) -> list[str]:
    """State-dict keys of the output layer, found by building the model with an unlikely class count."""
    probe_classes = 7919
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation (matters for 600M-parameter models)
            probe = build_architecture(arch, probe_classes)
    except (NotImplementedError, RuntimeError):  # a constructor that computes with tensors (RegNet's widths)
        probe = build_architecture(arch, probe_classes)
    return [k for k, v in probe.state_dict().items() if v.ndim >= 1 and v.shape[0] == probe_classes]


def infer_num_classes(arch: str, sd: dict[str, torch.Tensor]) -> int:
    for key in classifier_keys(arch):
        if key in sd:
            return int(sd[key].shape[0])
    raise ArchitectureMismatchError(
        f"Cannot tell the number of classes: the checkpoint has no output layer of a '{arch}' "
        f"(looked for {', '.join(classifier_keys(arch)) or 'a final layer'}). Is it the right architecture? "
        f"{OWN_ARCHITECTURE_HINT}"
    )


def _with_version_metadata(sd: dict, own: dict) -> dict:
    """Weights as the loader found them (nested, prefixes stripped) lost the per-module version
    numbers a state dict carries; some modules refuse to load without them (torchvision's MNASNet).
    The file's own versions are kept when they fit this model, else the model's current ones."""
    from collections import OrderedDict

    meta = getattr(sd, "_metadata", None)
    own_meta = getattr(own, "_metadata", None)
    if own_meta is None or (meta is not None and set(meta) <= set(own_meta)):
        return sd
    out = OrderedDict(sd)
    out._metadata = own_meta
    return out


def load_state_dict_strict(model: nn.Module, sd: dict[str, torch.Tensor], arch: str,
                           notes: list[str] | None = None) -> None:
    """Load weights as PyTorch's ``load_state_dict(strict=True)`` does; when PyTorch refuses, say exactly which
    keys and shapes do not fit.

    PyTorch decides, never a stricter check of ours: e.g. checkpoints written before PyTorch 0.4.1 lack every
    BatchNorm's ``num_batches_tracked``, which PyTorch fills with its default (see :func:`_legacy_batchnorm`).
    The one thing set aside first: a few (at most :data:`MAX_EXTRA_ENTRIES`) scalar entries with top-level
    names the model does not have (``epoch``, ``best_acc1``), training metadata saved beside the weights;
    what was ignored is added to ``notes``. Everything else must fit exactly.
    """
    own = model.state_dict()
    drop = _AUX_ARCHS.get(arch, ())
    sd = {k: v for k, v in sd.items() if not k.startswith(drop)} if drop else sd
    extras = [k for k, v in sd.items() if k not in own and _extra_entry(k, v)]
    if extras and len(extras) <= MAX_EXTRA_ENTRIES and len(extras) < len(sd) - len(extras):
        sd = {k: v for k, v in sd.items() if k not in extras}
        if notes is not None:
            notes.append(f"Ignored {len(extras)} checkpoint entr{'y' if len(extras) == 1 else 'ies'} beside the "
                         f"weights that the model does not have: {', '.join(extras)}.")
    sd = _legacy_batchnorm(model, sd)
    try:
        model.load_state_dict(_with_version_metadata(sd, own), strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(_misfit_message(own, sd, arch, exc)) from None


def _legacy_batchnorm(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PyTorch's own rule for BatchNorm state dicts older than version 2 (PyTorch < 0.4.1): a missing
    ``num_batches_tracked`` takes the module's default. Applied here because the loader re-attaches current
    version numbers (which a plain dict has lost), and PyTorch would then no longer apply the rule itself."""
    missing = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            prefix = f"{name}." if name else ""
            if prefix + "num_batches_tracked" not in sd and prefix + "running_mean" in sd:
                missing[prefix + "num_batches_tracked"] = m.num_batches_tracked.clone()
    if not missing:
        return sd
    out = dict(sd)
    out.update(missing)
    return out


def _misfit_message(own: dict, sd: dict, arch: str, exc: RuntimeError) -> str:
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own if k in sd and sd[k].shape != own[k].shape]
    parts = []
    if mismatched:
        parts.append("shape mismatch: " + "; ".join(f"{k} is {a} in the file but {b} in {arch}" for k, a, b in mismatched[:3]))
    if missing:
        parts.append(f"{len(missing)} missing key(s), first: {', '.join(missing[:3])}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), first: {', '.join(unexpected[:3])}")
    if not parts:  # PyTorch refused for a reason the keys do not show (e.g. a module's own version check)
        parts.append(" ".join(str(exc).split())[:300])
    return f"The weights do not fit architecture '{arch}': " + "; ".join(parts) + "."


def load_model(
    path: str | Path | bytes,
    arch: str | None = None,
    trusted: bool = False,
    input_spec: InputSpec | None = None,
    class_names: list[str] | None = None,
    *,
    code_path: str | Path | None = None,
    code_name: str | None = None,
    code_args: Any = None,
    code_source: bytes | None = None,
) -> LoadedModel:
    """Load a model from a file: architecture name + state dict, a whole trusted pickled module, or a state
    dict + the user's own Python file that builds the architecture (``code_path``, trusted only).

    ``path`` may be ``sample:NAME`` for a bundled sample. ``code_args`` are the class's or factory's
    arguments: JSON text or already parsed (an object = keyword arguments, a list = positional ones).
    ``code_source``: the bytes to run as ``code_path`` when the caller already read and checked them (a run's
    trusted copy); otherwise the file is read once. The returned model carries the bytes that ran
    (``code_bytes``, ``pickle_bytes``).
    """
    if input_spec is not None:
        input_spec.validate()
    if isinstance(path, str) and path.startswith("sample:"):
        if input_spec is not None:
            raise SettingsError("A bundled sample fixes its own input size and normalisation; the input size, mean "
                                "and std settings apply to your own models only.")
        return load_sample_model(path.split(":", 1)[1])
    if code_name or (code_path is not None and arch is not None):
        return _with_first_layer(_load_custom(path, code_path, code_name, code_args, arch, trusted, input_spec,
                                              class_names, code_source))
    data = path if isinstance(path, bytes) else _read_file(Path(path))
    source = "upload" if isinstance(path, bytes) else str(path)
    # Model code without a class name: the file holds a pickled model whose classes are defined in that code.
    classes = import_code_file(code_path, trusted=trusted, source=code_source) if code_path is not None else None
    obj, notes = read_checkpoint(data, trusted=trusted, classes=classes)
    if isinstance(obj, nn.Module) and arch is None:
        model = obj.float().eval()
        num_classes = _output_features(model)
        spec = ModelSpec(arch=f"pickled:{type(obj).__name__}", num_classes=num_classes,
                         input=input_spec or open_input_spec(), class_names=class_names, source=source, pickled=True,
                         pickle_code=str(Path(code_path).resolve()) if code_path is not None else None)
        return _with_first_layer(LoadedModel(model, spec, notes, code_bytes=source_of(classes) if classes else None,
                                             pickle_bytes=data))
    if classes is not None:
        raise ModelLoadError("Name the class or factory function in the model code that builds the model "
                             "(--model-class): without one, the code only serves to unpickle a whole pickled model, "
                             "and this file holds weights.")
    if arch is None:
        raise ModelLoadError("This file holds only weights (a state dict): choose its architecture (e.g. --arch resnet18).")
    sd, key_used, more = extract_state_dict(obj)
    notes += more
    num_classes = infer_num_classes(arch, sd)
    model = build_architecture(arch, num_classes)
    try:
        load_state_dict_strict(model, sd, arch, notes)
    except ModelLoadError as exc:  # weights of another architecture: where a user's own one is given
        raise ArchitectureMismatchError(f"{exc} {OWN_ARCHITECTURE_HINT}") from None
    spec = ModelSpec(arch=arch, num_classes=num_classes, input=input_spec or default_input_spec(arch),
                     class_names=class_names, source=source, checkpoint_key=key_used)
    return _with_first_layer(LoadedModel(model.eval(), spec, notes))


def open_input_spec() -> InputSpec:
    """The input of a model that does not say its size (a Python file, a pickle): 0×0 until the data set's
    images give it (see :func:`core.preprocess.size_is_open`)."""
    return InputSpec(height=0, width=0)


def check_finite_weights(model: nn.Module) -> None:
    """Refuse (:class:`ModelLoadError`) a model whose weights or buffers hold NaN or inf, naming the first such
    tensor: it computes NaN, which every later figure would blame on something else ("near chance", FP16)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelLoadError(f"The model's weights hold NaN or infinite values ({bad} of {tensor.numel()} in "
                                 f"{name}); a model with them computes nothing meaningful, so it was not loaded.")


def _with_first_layer(loaded: LoadedModel) -> LoadedModel:
    """The model's spec with the channel count its first convolution reads (grey models read 1); a model with
    NaN or infinite weights is refused here, on every path a model loads through."""
    check_finite_weights(loaded.model)
    loaded.spec.input, notes = match_first_layer(loaded.spec.input, loaded.model)
    loaded.notes += notes
    return loaded


def _load_custom(path, code_path, code_name, code_args, arch, trusted, input_spec, class_names,
                 code_source: bytes | None = None) -> LoadedModel:
    """Weights into the model that the user's Python file builds; the file runs only when trusted."""
    if code_path is None:
        raise ModelLoadError(f"A model class or function ('{code_name}') was named without the Python file that "
                             "defines it: give the file too (--model-code).")
    if arch is not None:
        raise ModelLoadError(f"Both an architecture ('{arch}') and a Python file with the architecture were given; "
                             "give one of them.")
    args = parse_model_args(code_args)
    module = import_code_file(code_path, trusted=trusted, source=code_source)  # read once: the bytes that run
    model = build_from_code(code_path, code_name, args, trusted=trusted, module=module)
    name = f"custom:{code_name.strip()}"
    data = path if isinstance(path, bytes) else _read_file(Path(path))
    # A whole model pickled by a training script works too: its __main__ classes come from the same file.
    obj, notes = read_checkpoint(data, trusted=trusted, classes=module)
    sd, key_used, more = extract_state_dict(obj)
    notes += more
    _load_custom_weights(model, sd, name, notes)
    spec = ModelSpec(arch=name, num_classes=_output_features(model), input=input_spec or open_input_spec(),
                     class_names=class_names, source="upload" if isinstance(path, bytes) else str(path),
                     checkpoint_key=key_used, code_file=str(Path(code_path).resolve()), code_name=code_name.strip(),
                     code_args=args)
    return LoadedModel(model.float().eval(), spec, notes, code_bytes=source_of(module))


def _load_custom_weights(model: nn.Module, sd: dict[str, torch.Tensor], name: str,
                         notes: list[str] | None = None) -> None:
    """As :func:`load_state_dict_strict`, with a hint when only the output layer's size differs."""
    try:
        load_state_dict_strict(model, sd, name, notes)
    except ModelLoadError as exc:
        head = _output_layer_key(model)
        if head in sd and sd[head].shape != model.state_dict()[head].shape:
            raise ModelLoadError(f"{exc} The file's output layer has {sd[head].shape[0]} outputs: pass the number "
                                 f"of classes in the model arguments, e.g. {{\"num_classes\": {sd[head].shape[0]}}}."
                                 ) from None
        raise


def _output_layer_key(model: nn.Module) -> str | None:
    last = None
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last = name
    return f"{last}.weight" if last is not None else None


def _read_file(path: Path) -> bytes:
    """The model file's bytes: a regular file within :data:`core.integrity.MAX_WEIGHTS_BYTES` (a FIFO or
    ``/dev/zero`` named as the model is refused in one line, never read without end)."""
    from .integrity import MAX_WEIGHTS_BYTES, IntegrityError, read_bounded

    if not path.exists():
        raise ModelLoadError(f"Model file not found: {path}")
    if path.is_dir():
        raise ModelLoadError(f"Expected a model file, got a folder: {path}")
    try:
        return read_bounded(path.resolve(), MAX_WEIGHTS_BYTES, path.name)
    except IntegrityError as exc:
        raise ModelLoadError(str(exc)) from None


def _output_features(model: nn.Module) -> int:
    last = None
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last = m
    if last is None:
        raise ModelLoadError("The model has no Linear or Conv2d layer, so its number of classes is unknown: is it a classifier?")
    return last.out_features if isinstance(last, nn.Linear) else last.out_channels


# ----------------------------------------------------------------------------- bundled samples


def sample_manifest() -> dict:
    path = SAMPLE_DIR / "manifest.json"
    if not path.exists():
        raise ModelLoadError("The bundled sample models are missing (sample_models/manifest.json).")
    return json.loads(path.read_text())


def sample_names() -> list[str]:
    return [m["name"] for m in sample_manifest()["models"]]


def sample_entry(name: str) -> dict:
    for entry in sample_manifest()["models"]:
        if entry["name"] == name:
            return entry
    raise ModelLoadError(f"No bundled sample named '{name}'. Available: {', '.join(sample_names())}.")


def load_sample_model(name: str) -> LoadedModel:
    entry = sample_entry(name)
    spec_input = InputSpec(height=entry["input_size"][1], width=entry["input_size"][2], channels=entry["input_size"][0],
                           mean=tuple(entry["mean"]), std=tuple(entry["std"]))
    loaded = load_model(SAMPLE_DIR / entry["weights"], arch=entry["architecture"], input_spec=spec_input,
                        class_names=list(entry["class_names"]))
    loaded.spec.source = f"sample:{name}"
    return loaded


def rebuild_from_spec(spec: ModelSpec, state_dict: dict[str, torch.Tensor] | None = None,
                      code_path: str | Path | None = None, trusted: bool = False,
                      code_source: bytes | None = None) -> nn.Module:
    """A fresh model of ``spec``'s architecture, optionally with weights; never unpickles.

    A custom architecture is rebuilt by running its Python file (``code_path``, else ``spec.code_file``),
    so it needs ``trusted`` like the first load did; a run folder passes its own copy of the file and the
    bytes of it that it checked (``code_source``: exactly those run, the file is not read again).
    """
    if spec.pickled:
        raise ModelLoadError("A pickled model can only be rebuilt from its trusted file.")
    if spec.custom:
        path = code_path or spec.code_file
        module = import_code_file(path, trusted=trusted, source=code_source) if trusted else None
        model = build_from_code(path, spec.code_name, spec.code_args, trusted=trusted, module=module)
    else:
        model = build_architecture(spec.arch, spec.num_classes)
    if state_dict is not None:
        load_state_dict_strict(model, state_dict, spec.arch)
    return model.eval()
