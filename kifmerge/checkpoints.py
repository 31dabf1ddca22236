"""Open and validate Hugging Face model folders and PEFT LoRA adapters, lazily.

Only safetensors are read. Pickle weights (`*.bin`) are refused unless the caller allows
them (`--allow-pickle`); then they are loaded with `torch.load(weights_only=True)` — which
rebuilds only tensors and plain containers, never runs code — and converted to safetensors
in a scratch folder before anything else reads them. Tensor shapes and dtypes come from the
file headers, so validating a checkpoint against its base touches no weights except for the
streaming finite-value check.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from kifmerge.errors import InvalidInputError, NotFoundError
from kifmerge.units import UnitLayout, layout_for, lora_module_of

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_WEIGHTS = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"
PEFT_PREFIX = "base_model.model."
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
PICKLE_WEIGHTS = {"adapter_model.bin": ADAPTER_WEIGHTS, "pytorch_model.bin": MODEL_WEIGHTS}
PICKLE_INDEX = "pytorch_model.bin.index.json"


@dataclass
class TensorFiles:
    """The safetensors files of a checkpoint and the header of every tensor in them."""

    files: dict[str, Path]
    weight_map: dict[str, str]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)

    def iter_tensors(self) -> Iterator[tuple[str, "torch.Tensor"]]:  # noqa: F821
        """Yield (name, tensor) one at a time, one file open at a time."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name, file in self.weight_map.items():
            by_file.setdefault(file, []).append(name)
        for file, names in sorted(by_file.items()):
            with safe_open(self.files[file], framework="pt") as handle:
                for name in sorted(names):
                    yield name, handle.get_tensor(name)


def read_text(path: str | Path, what: str, limit: int | None = None) -> str:
    """A user-supplied text file (data, plan): missing → exit 3, not UTF-8 → exit 4, one line each.
    A `.gz` file is decompressed first (a corrupt or truncated one → exit 4, one line); the
    byte offset of a UTF-8 error is then one in the decompressed text. Newlines are read as by
    `open()`: CRLF and a lone CR become LF. At most `limit` bytes (after decompression) are
    read: a larger file is refused (exit 4) as soon as the limit is passed, so a small gzip
    bomb never becomes gigabytes in memory. Default limit: a data file's (kifmerge/limits.py)."""
    from kifmerge.limits import max_data_bytes

    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{what} not found: {path}")
    limit = max_data_bytes() if limit is None else limit
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as handle:
                raw = _read_capped(handle, limit, path, what, "decompressed ")
        except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; EOFError: truncated
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise InvalidInputError(f"{path} is not a valid gzip file ({reason})") from None
    else:
        with open(path, "rb") as handle:
            raw = _read_capped(handle, limit, path, what, "")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_capped(handle, limit: int, path: Path, what: str, how: str) -> bytes:
    """All of `handle`'s bytes, read in 1 MiB chunks; InvalidInputError once past `limit`."""
    chunks, size = [], 0
    while chunk := handle.read(min(1024 * 1024, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            hint = "; $KIFMERGE_MAX_DATA_BYTES raises it" if what == "data file" else ""
            raise InvalidInputError(f"{path}: the {what} holds more than {limit:,} bytes{' ' + how.strip() if how else ''}, "
                                    f"kifmerge's limit (README: Limits{hint})")
    return b"".join(chunks)


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise NotFoundError(f"{what} not found: {path}")
    from kifmerge.limits import MAX_CONFIG_BYTES

    text = read_text(path, what, MAX_CONFIG_BYTES)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{path} is not valid JSON ({exc})") from None
    except RecursionError:
        raise InvalidInputError(f"{path} is not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path} must hold a JSON object")
    return data


def read_headers(files: dict[str, Path], weight_map: dict[str, str] | None = None) -> TensorFiles:
    """Shapes and dtypes of every tensor, from headers only. Builds the weight map when absent."""
    from safetensors import SafetensorError, safe_open

    shapes, dtypes, found = {}, {}, {}
    for file, path in files.items():
        try:
            with safe_open(path, framework="pt") as handle:
                for name in handle.keys():
                    if name in found:
                        raise InvalidInputError(f"tensor {name} appears in both {found[name]} and {file}")
                    piece = handle.get_slice(name)
                    shapes[name], dtypes[name], found[name] = tuple(piece.get_shape()), piece.get_dtype(), file
        except SafetensorError as exc:
            raise InvalidInputError(f"{path} is not a readable safetensors file ({exc})") from None
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(found))
        if missing:
            raise InvalidInputError(f"index names tensor {missing[0]} but no shard holds it ({len(missing)} missing)")
    return TensorFiles(files=files, weight_map=found, shapes=shapes, dtypes=dtypes)


def model_tensor_files(folder: Path) -> TensorFiles:
    """The safetensors of a full model folder, single-file or sharded with an index."""
    index = folder / MODEL_INDEX
    if index.is_file():
        weight_map = read_json(index, "index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InvalidInputError(f"{index} has no weight_map")
        files = {}
        for name in sorted(set(weight_map.values())):
            if not (folder / name).is_file():
                raise NotFoundError(f"shard {name} named in {index} is missing")
            files[name] = folder / name
        return read_headers(files, weight_map)
    if (folder / MODEL_WEIGHTS).is_file():
        return read_headers({MODEL_WEIGHTS: folder / MODEL_WEIGHTS})
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return read_headers({p.name: p for p in shards})
    if any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir()):
        raise InvalidInputError(f"{folder} has no safetensors weights; pickle-based files are never read by default "
                                f"({PICKLE_ADVICE})")
    raise NotFoundError(f"no model weights in {folder}")


@dataclass
class BaseModel:
    """A local Hugging Face model folder as the registry records it."""

    path: Path
    config: dict
    tensors: TensorFiles

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or [self.config.get("model_type", "unknown")])[0]

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "unknown")

    @property
    def fingerprint(self) -> str:
        """sha256 of the config plus every tensor's name, dtype and shape (not the values)."""
        digest = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for name in sorted(self.tensors.shapes):
            digest.update(f"{name}|{self.tensors.dtypes[name]}|{self.tensors.shapes[name]}\n".encode())
        return digest.hexdigest()


def open_model(folder: str | Path, *, allow_pickle: bool = False, scratch: Path | None = None) -> BaseModel:
    folder = Path(folder)
    if not folder.is_dir():
        raise NotFoundError(f"model folder not found: {folder}")
    folder = safetensors_folder(folder, allow_pickle, scratch)
    config = read_json(folder / "config.json", "config.json of the model")
    return BaseModel(path=folder.resolve(), config=config, tensors=model_tensor_files(folder))


@dataclass
class Checkpoint:
    """A task checkpoint: a LoRA adapter (`kind='lora'`) or a full fine-tuned model (`'full'`)."""

    path: Path
    kind: str
    tensors: TensorFiles
    adapter_config: dict | None
    layout: UnitLayout


def open_checkpoint(folder: str | Path, *, allow_pickle: bool = False, scratch: Path | None = None) -> Checkpoint:
    folder = Path(folder)
    if not folder.is_dir():
        raise NotFoundError(f"checkpoint folder not found: {folder}")
    folder = safetensors_folder(folder, allow_pickle, scratch)
    if (folder / ADAPTER_CONFIG).exists():
        config = read_json(folder / ADAPTER_CONFIG, "adapter config")
        if not (folder / ADAPTER_WEIGHTS).is_file():
            raise NotFoundError(f"{folder / ADAPTER_WEIGHTS} not found")
        tensors = read_headers({ADAPTER_WEIGHTS: folder / ADAPTER_WEIGHTS})
        _check_lora_config(folder, config, tensors)
        return Checkpoint(folder, "lora", tensors, config, layout_for("lora", tensors.shapes))
    if (folder / "config.json").exists():
        model = open_model(folder)
        return Checkpoint(folder, "full", model.tensors, None, layout_for("full", model.tensors.shapes))
    raise NotFoundError(f"{folder} is neither a PEFT adapter ({ADAPTER_CONFIG}) nor a model folder (config.json)")


def _check_lora_config(folder: Path, config: dict, tensors: TensorFiles) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidInputError(f"{folder}: peft_type {config.get('peft_type')} is not supported (only LORA)")
    if config.get("use_dora"):
        raise InvalidInputError(f"{folder}: DoRA adapters are not supported (their magnitude vectors are not rank units)")
    for name, dtype in sorted(tensors.dtypes.items()):
        if not is_float_dtype(dtype):
            raise InvalidInputError(f"{folder}: {name} has dtype {dtype}; LoRA factors must be floating point")
    others = sorted(n for n in tensors.shapes if lora_module_of(n) is None)
    if others:
        raise InvalidInputError(f"{folder}: tensor {others[0]} is not a LoRA factor (modules_to_save and "
                                f"trainable biases are not supported; {len(others)} such tensors)")
    by_module: dict[str, dict[int, tuple[int, ...]]] = {}
    for name, shape in tensors.shapes.items():
        module, axis = lora_module_of(name)
        if len(shape) != 2:
            raise InvalidInputError(f"{folder}: {name} has shape {list(shape)}; LoRA factors are 2-D")
        by_module.setdefault(module, {})[axis] = shape
    for module, factors in sorted(by_module.items()):
        if set(factors) != {0, 1}:
            raise InvalidInputError(f"{folder}: module {module} lacks its lora_{'B' if 0 in factors else 'A'} factor")
        if factors[0][0] != factors[1][1]:
            raise InvalidInputError(f"{folder}: {module} has lora_A rank {factors[0][0]} but lora_B rank {factors[1][1]}")


def validate_against_base(checkpoint: Checkpoint, base: BaseModel) -> None:
    """Refuse a checkpoint that cannot have been trained from `base` (names and shapes)."""
    if checkpoint.kind == "lora":
        fan_in_fan_out = bool(checkpoint.adapter_config.get("fan_in_fan_out"))
        for module in checkpoint.layout.groups:
            base_name = (module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module) + ".weight"
            if base_name not in base.tensors.shapes:
                raise InvalidInputError(
                    f"adapter module {module} does not exist in base {base.path.name} ({base.architecture}); "
                    "was the adapter trained for another architecture?")
            out_features, in_features = base.tensors.shapes[base_name][:2][:: -1 if fan_in_fan_out else 1]
            a_shape = checkpoint.tensors.shapes[module + ".lora_A.weight"]
            b_shape = checkpoint.tensors.shapes[module + ".lora_B.weight"]
            if a_shape[1] != in_features or b_shape[0] != out_features:
                raise InvalidInputError(
                    f"adapter module {module} has shape in={a_shape[1]} out={b_shape[0]} but base weight "
                    f"{base_name} has in={in_features} out={out_features}")
        return
    config = read_json(checkpoint.path / "config.json", "config.json")
    if config.get("model_type") != base.model_type:
        raise InvalidInputError(f"checkpoint is a {config.get('model_type')} model but base is {base.model_type}")
    ours, theirs = checkpoint.tensors.shapes, base.tensors.shapes
    for name in sorted(set(ours) | set(theirs)):
        if name not in theirs:
            raise InvalidInputError(f"checkpoint tensor {name} does not exist in the base model")
        if name not in ours:
            raise InvalidInputError(f"checkpoint lacks tensor {name} of the base model")
        if ours[name] != theirs[name]:
            raise InvalidInputError(f"tensor {name} has shape {list(ours[name])} but the base has {list(theirs[name])}")
        ours_dtype, theirs_dtype = checkpoint.tensors.dtypes[name], base.tensors.dtypes[name]
        if is_float_dtype(ours_dtype) != is_float_dtype(theirs_dtype):
            raise InvalidInputError(f"tensor {name} has dtype {ours_dtype} but the base has {theirs_dtype}")


def check_finite(tensors: TensorFiles, progress: Callable[[int], None] | None = None) -> None:
    """Stream every tensor once; refuse NaN or infinite values."""
    import torch

    for name, tensor in tensors.iter_tensors():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise InvalidInputError(f"tensor {name} holds {bad} NaN or infinite values")
        if progress:
            progress(1)


def is_float_dtype(dtype: str) -> bool:
    """A safetensors dtype name (F16, BF16, F32, F8_E4M3, I64, BOOL, …) of a floating-point type."""
    return dtype.startswith(("F", "BF"))


PICKLE_ADVICE = ("re-save it with save_pretrained(safe_serialization=True), or pass --allow-pickle to load it with "
                 "torch.load(weights_only=True) and store it as safetensors")


def pickle_files(folder: Path) -> list[str]:
    """The pickle weight files of a folder that holds no safetensors weights ([] otherwise)."""
    if (folder / ADAPTER_CONFIG).is_file():
        if (folder / ADAPTER_WEIGHTS).is_file():
            return []
        return ["adapter_model.bin"] if (folder / "adapter_model.bin").is_file() else []
    if any(folder.glob("*.safetensors")):
        return []
    if (folder / PICKLE_INDEX).is_file():
        weight_map = read_json(folder / PICKLE_INDEX, "index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InvalidInputError(f"{folder / PICKLE_INDEX} has no weight_map")
        return sorted(set(weight_map.values()))
    return ["pytorch_model.bin"] if (folder / "pytorch_model.bin").is_file() else []


def safetensors_folder(folder: Path, allow_pickle: bool, scratch: Path | None) -> Path:
    """`folder` itself, or — for pickle weights when allowed — a copy of it under `scratch`
    with every pickle file converted to safetensors."""
    pickles = pickle_files(folder)
    if not pickles:
        return folder
    if not allow_pickle:
        raise InvalidInputError(f"{folder} holds pickle weights ({pickles[0]}), which are never read by default; "
                                f"{PICKLE_ADVICE}")
    if scratch is None:
        raise ValueError("converting pickle weights needs a scratch folder")
    return convert_pickle(folder, pickles, scratch)


def _converted_name(name: str) -> str:
    if name in PICKLE_WEIGHTS:
        return PICKLE_WEIGHTS[name]
    stem = name[: -len(".bin")] if name.endswith(".bin") else name
    return (stem[len("pytorch_"):] if stem.startswith("pytorch_") else stem) + ".safetensors"


def convert_pickle(folder: Path, pickles: list[str], scratch: Path) -> Path:
    """Load each pickle file with `torch.load(weights_only=True)` (tensors and plain containers
    only: a pickle that asks for anything else is refused before it can run), check that it is a
    flat name → tensor mapping, and write it as safetensors next to copies of the folder's
    other (non-weight) files."""
    import shutil

    import torch
    from safetensors.torch import save_file

    out = Path(scratch) / "converted"
    out.mkdir(parents=True)
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix not in WEIGHT_SUFFIXES and path.name != PICKLE_INDEX:
            shutil.copyfile(path, out / path.name)
    weight_map = {}
    for name in pickles:
        source = folder / name
        if not source.is_file():
            raise NotFoundError(f"pickle shard {name} named in {folder / PICKLE_INDEX} is missing")
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for a forbidden global, EOFError, RuntimeError for junk …
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InvalidInputError(f"{source} cannot be loaded safely with torch.load(weights_only=True): {first}") from None
        if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                              for k, v in state.items()):
            raise InvalidInputError(f"{source} is not a state dict (a mapping of tensor names to tensors)")
        target = _converted_name(name)
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(out / target), metadata={"format": "pt"})
        weight_map.update({k: target for k in state})
    if (folder / PICKLE_INDEX).is_file():
        (out / MODEL_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    return out
