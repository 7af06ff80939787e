"""Model files: one self-describing `torch.save` of plain data, loaded without running any code from the file.

A model file holds a single dict of tensors and JSON-like primitives, never a pickled object:

    {"format": "restoration-model", "format_version": 1, "kind": "restorer",
     "config": dataclasses.asdict(config), "state_dict": {name: tensor}, "meta": {...}}

Loading uses `torch.load(..., map_location="cpu", weights_only=True)`, whose unpickler only rebuilds tensors and
primitive containers and refuses any other global, so a crafted file cannot execute code. The module is then rebuilt
from `MODELS[kind]` and the config, and its weights are checked against the file before they are copied in.
Paths are local; callers resolve remote URIs (s3://...) themselves and pass the bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

from restoration.errors import UserError
from restoration.models import MODELS

FORMAT = "restoration-model"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "kind", "config", "state_dict", "meta")
# Config fields added after files were written without them, per kind, with the value such a file means (a VAE file
# from before sampling priors samples from N(0, I), one from before class guidance decodes the class vector as trained;
# a DCGAN file from before labels is unconditional). Any other absent field makes the file invalid.
ADDED_FIELDS: dict[str, dict[str, Any]] = {
    "vae": {"prior_components": 0, "labels": [], "class_guidance": 0.0},
    "dcgan": {"labels": []},
}


class ModelFileError(UserError):
    """A model file that cannot be used: missing, unreadable, unsafe, or not matching its own config."""


@dataclass(frozen=True)
class LoadedModel:
    kind: str
    config: Any  # the config dataclass instance, e.g. RestorerConfig
    module: nn.Module  # built from MODELS[kind], weights loaded, in eval() mode, on CPU
    sha256: str  # weights_sha256 of the file's state_dict
    meta: dict


def weights_sha256(state_dict: dict[str, Tensor]) -> str:
    """Hash the weights themselves, not the file that holds them.

    Every tensor contributes its name, dtype, shape and raw bytes, in sorted name order, so the digest does not depend
    on the container (file format, zip layout, pickle protocol), on dict order, or on the device the tensors are on.

    Args:
        state_dict: parameter name -> tensor.
    Returns:
        The hex sha256 digest.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(tensor).__name__}, expected a torch.Tensor")
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        # NUL-separated header: no name/dtype/shape combination can be confused with another.
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0{nbytes}\0".encode())
        if nbytes:
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_model(
    dest: str | os.PathLike | BinaryIO, kind: str, config: Any, module: nn.Module, meta: dict | None = None
) -> str:
    """Write a model file.

    Args:
        dest: a local path (written atomically through a temporary file beside it) or a writable binary stream.
        kind: a key of `MODELS`, e.g. "restorer".
        config: an instance of that kind's config dataclass; the module's weights must match what it builds.
        module: the model; its state_dict is copied to CPU, so a GPU model saves fine.
        meta: JSON-serialisable extras (training preset, metrics, ...); stored after a JSON round trip.
    Returns:
        weights_sha256 of the saved weights.
    """
    payload = _payload(kind, config, module, meta)
    if isinstance(dest, (str, os.PathLike)):
        path = os.fspath(dest)
        tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        torch.save(payload, dest)
    return weights_sha256(payload["state_dict"])


def model_to_bytes(kind: str, config: Any, module: nn.Module, meta: dict | None = None) -> bytes:
    """Serialise a model to the bytes of a model file (same checks and layout as `save_model`).

    Args:
        kind, config, module, meta: as for `save_model`.
    Returns:
        The file's bytes.
    """
    buffer = io.BytesIO()
    save_model(buffer, kind, config, module, meta)
    return buffer.getvalue()


def load_model(source: str | os.PathLike | bytes | BinaryIO, expected_kind: str | None = None) -> LoadedModel:
    """Load and check a model file, without executing anything stored in it.

    Args:
        source: a local path, the file's bytes, or a readable binary stream.
        expected_kind: when given, a file holding another kind is refused.
    Returns:
        A `LoadedModel` whose module is on CPU in eval() mode.
    Raises:
        ModelFileError: with one line naming the file and what is wrong.
    """
    if expected_kind is not None and expected_kind not in MODELS:
        raise ValueError(f"expected_kind={expected_kind!r}: expected one of {', '.join(MODELS)}")
    name, payload = _read(source)

    def invalid(reason: str) -> ModelFileError:
        return ModelFileError(f"{name} is not a valid model file: {reason}")

    # Envelope.
    if not isinstance(payload, dict):
        raise invalid(f"expected a dict at the top level, got {type(payload).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise invalid(f"missing key(s) {', '.join(map(repr, missing))}")
    if payload["format"] != FORMAT:
        raise invalid(f"format is {payload['format']!r}, expected {FORMAT!r}")
    version = payload["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise invalid(f"format_version is {version!r}, expected a positive int")
    if version > FORMAT_VERSION:
        raise invalid(f"format_version {version} is newer than this code reads ({FORMAT_VERSION})")
    kind, raw_config, state_dict, meta = (payload[k] for k in ("kind", "config", "state_dict", "meta"))
    if not isinstance(kind, str):
        raise invalid(f"kind is a {type(kind).__name__}, expected a str")
    if not isinstance(raw_config, dict):
        raise invalid(f"config is a {type(raw_config).__name__}, expected a dict")
    if not isinstance(meta, dict):
        raise invalid(f"meta is a {type(meta).__name__}, expected a dict")
    if not isinstance(state_dict, dict):
        raise invalid(f"state_dict is a {type(state_dict).__name__}, expected a dict")
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise invalid(f"state_dict entry {key!r} is a {type(value).__name__}, expected a tensor under a str name")

    # Kind and config.
    if expected_kind is not None and kind != expected_kind:
        raise ModelFileError(f"{name} holds a {kind} model, expected a {expected_kind}")
    if kind not in MODELS:
        raise ModelFileError(f"{name}: unknown model kind {kind!r}: expected one of {', '.join(MODELS)}")
    config_cls, module_cls = MODELS[kind]
    field_names = [f.name for f in dataclasses.fields(config_cls)]
    raw_config = {**ADDED_FIELDS.get(kind, {}), **raw_config}
    unexpected = [key for key in raw_config if key not in field_names]
    absent = [key for key in field_names if key not in raw_config]
    if unexpected or absent:
        problems = []
        if unexpected:
            problems.append(f"unexpected field(s) {_first_few(unexpected)}")
        if absent:
            problems.append(f"missing field(s) {_first_few(absent)}")
        raise ModelFileError(f"{name}: config does not match {config_cls.__name__}: {'; '.join(problems)}")
    try:
        config = config_cls(**raw_config)
    except (TypeError, ValueError) as err:
        raise ModelFileError(f"{name}: invalid {config_cls.__name__}: {err}") from None

    # Weights.
    module = module_cls(config)
    mismatch = _state_dict_mismatch(module.state_dict(), state_dict)
    if mismatch:
        raise ModelFileError(f"{name}: weights do not match the {kind} config: {mismatch}")
    module.load_state_dict(state_dict, strict=True)
    module.eval()
    return LoadedModel(kind=kind, config=config, module=module, sha256=weights_sha256(state_dict), meta=meta)


def _payload(kind: str, config: Any, module: nn.Module, meta: dict | None) -> dict:
    """Check the arguments of `save_model` and build the dict that is written."""
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}: expected one of {', '.join(MODELS)}")
    config_cls, module_cls = MODELS[kind]
    if type(config) is not config_cls:
        raise TypeError(f"config for a {kind} model must be a {config_cls.__name__}, got {type(config).__name__}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    raw_config = dataclasses.asdict(config)
    try:
        json.dumps(raw_config)
        meta = json.loads(json.dumps({} if meta is None else meta))
    except (TypeError, ValueError) as err:
        raise ValueError(f"config and meta must be JSON-serialisable: {err}") from None
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    # Copies on CPU: the file never references GPU storage or storage shared with a larger buffer.
    state_dict = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    mismatch = _state_dict_mismatch(module_cls(config).state_dict(), state_dict)
    if mismatch:
        raise ValueError(f"the module's weights do not match a {kind} built from its config: {mismatch}")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": raw_config,
        "state_dict": state_dict,
        "meta": meta,
    }


def _read(source: str | os.PathLike | bytes | BinaryIO) -> tuple[str, Any]:
    """Return (name for messages, unpickled payload), refusing anything the weights-only unpickler refuses."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        name, stream = "<bytes>", io.BytesIO(bytes(source))
        return name, _torch_load(name, stream)
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if isinstance(name, bytes):
            name = os.fsdecode(name)
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", name):
            raise ModelFileError(f"{name}: only local paths are read here; fetch remote files and pass their bytes")
        if not os.path.exists(name):
            raise ModelFileError(f"model file not found: {name}")
        if os.path.isdir(name):
            raise ModelFileError(f"{name} is not a valid model file: it is a directory")
        try:
            with open(name, "rb") as stream:
                return name, _torch_load(name, stream)
        except OSError as err:
            raise ModelFileError(f"cannot read model file {name}: {err.strerror or err}") from None
    if hasattr(source, "read"):
        name = str(getattr(source, "name", "<stream>"))
        stream = source if _seekable(source) else io.BytesIO(source.read())
        return name, _torch_load(name, stream)
    raise TypeError(f"model source must be a path, bytes or a binary stream, got {type(source).__name__}")


def _torch_load(name: str, stream: BinaryIO) -> Any:
    try:
        return torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError... on bad input
        raise ModelFileError(f"{name} is not a valid model file: {_short_reason(err)}") from None


def _short_reason(err: Exception) -> str:
    """One line out of torch's multi-paragraph load errors."""
    text = str(err)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n|$)", text, re.S)
    if found:
        return f"refused by the weights-only unpickler ({found.group(1).strip()})"
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    detail = f"{type(err).__name__}: {first_line}" if first_line else type(err).__name__
    return f"not a readable PyTorch file ({detail[:200]})"


def _seekable(stream: Any) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _state_dict_mismatch(expected: dict[str, Tensor], found: dict[str, Tensor]) -> str:
    """Describe how `found` differs from `expected` (names and shapes), or return "" when it does not."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [
        f"{k} is {tuple(found[k].shape)}, expected {tuple(expected[k].shape)}"
        for k in expected
        if k in found and found[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {_first_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_first_few(unexpected)}")
    if reshaped:
        problems.append(f"shape mismatch: {_first_few(reshaped, quote=False)}")
    return "; ".join(problems)


def _first_few(items: list[str], n: int = 3, quote: bool = True) -> str:
    shown = ", ".join(repr(s) if quote else s for s in items[:n])
    return shown + (f" (+{len(items) - n} more)" if len(items) > n else "")


WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def model_source(name_or_path: str) -> str:
    """Resolve `--model`: a bundled name (restoration/weights/<name>.pt), a local model file, or an s3:// URI."""
    bundled = WEIGHTS_DIR / f"{name_or_path}.pt"
    if "/" not in name_or_path and bundled.is_file():
        return str(bundled)
    if name_or_path.startswith("s3://") or Path(name_or_path).is_file():
        return name_or_path
    names = sorted(p.stem for p in WEIGHTS_DIR.glob("*.pt"))
    raise ModelFileError(
        f"model {name_or_path!r} not found: expected a model file path, an s3:// URI, or a bundled name "
        f"({', '.join(names) or 'none bundled'})"
    )


def model_label(name_or_path: str) -> str:
    """How outputs name a model: the bundled name or file stem, or the URI for a model on S3."""
    source = model_source(name_or_path)
    return source if source.startswith("s3://") else Path(source).stem


def load_named(name_or_path: str, expected_kind: str | None = None) -> LoadedModel:
    """`load_model` for a bundled name, a local path or an s3:// URI."""
    from restoration import storage

    source = model_source(name_or_path)
    return load_model(storage.read_bytes(source) if source.startswith("s3://") else source, expected_kind)
