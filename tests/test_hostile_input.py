"""Hostile and bad input (issue 6): malformed safetensors, dtype/shape mismatches, non-finite
weights, checkpoints for another base, bad profiles, pickles, hostile names, bad data files,
and a registry on a full or read-only disk. Each case is one line on stderr with its
documented exit code, and the registry is byte-for-byte unchanged: every file's sha256 (the
stat-stamp cache `stamps/` and SQLite's -wal/-shm excepted) and a dump of the catalog."""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import shutil
import sqlite3
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import LORA_TARGETS, Cli, make_full, make_lora, task_records, write_jsonl, write_profile
from test_fuse_export import designed_scores, unit_groups


# ---- the registry, before and after --------------------------------------------------------------
def registry_dump(root: Path) -> dict[str, str]:
    """Every file and folder under the registry with the sha256 of its bytes, plus the catalog
    as SQL. Left out: SQLite's -wal/-shm (transient) and `stamps/` (a cache of hash checks
    that any read may refresh)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("stamps") or rel.endswith(("-wal", "-shm")):
            continue
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    db = sqlite3.connect(f"file:{root / 'kifmerge.db'}?mode=ro", uri=True)
    out["<catalog>"] = "\n".join(db.iterdump())
    db.close()
    return out


# ---- building bad files ------------------------------------------------------------------------
def split_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def join_safetensors(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def variant(good: Path, out: Path, file: str, content: bytes | None = None, tensors: dict | None = None) -> Path:
    """A copy of checkpoint folder `good` whose `file` is replaced by raw bytes or by tensors."""
    shutil.copytree(good, out)
    if content is not None:
        (out / file).write_bytes(content)
    if tensors is not None:
        save_file(tensors, str(out / file))
    return out


class Evil:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def world(tmp_path_factory, llama_dir, t5_dir):
    """One registry (bases llama and t5, task t1 fused into line main, task t2 with a profile
    waiting) and every bad file the cases below feed it."""
    tmp = tmp_path_factory.mktemp("hostile")
    cli = Cli(tmp / "registry")
    cli("init")
    cli("base", "add", "llama", llama_dir)
    cli("base", "add", "t5", t5_dir)
    lora = make_lora(llama_dir, tmp / "lora", 1, LORA_TARGETS)
    groups = unit_groups(lora, "lora")
    scores = designed_scores(groups, {0, 1, 2}, 1.0)[0]
    profile = write_profile(tmp / "profile.safetensors", scores, "lora-rank")
    cli("add-task", "t1", lora, "--base", "llama", "--profile", profile)
    cli("fuse", "t1", "--into", "main")
    cli("add-task", "t2", make_lora(llama_dir, tmp / "lora2", 2, LORA_TARGETS), "--base", "llama", "--profile", profile)

    f = {"tmp": tmp, "lora": lora, "profile": profile}
    weights = "adapter_model.safetensors"
    header, data = split_safetensors(lora / weights)
    first = sorted(k for k in header if k != "__metadata__")[0]
    tensors = load_file(lora / weights)

    def bad_header(**change):
        return join_safetensors({**header, first: {**header[first], **change}}, data)

    f["st_truncated"] = variant(lora, tmp / "st-trunc", weights, (lora / weights).read_bytes()[: -len(data) // 3])
    f["st_header_length_huge"] = variant(lora, tmp / "st-hlen", weights, join_safetensors(header, data, length=2 ** 40))
    f["st_header_length_short"] = variant(lora, tmp / "st-hshort", weights, join_safetensors(header, data, length=7))
    f["st_tiny_file"] = variant(lora, tmp / "st-tiny", weights, b"\x05\x00\x00")
    f["st_empty_file"] = variant(lora, tmp / "st-empty", weights, b"")
    f["st_header_not_json"] = variant(lora, tmp / "st-json", weights, join_safetensors(b'{"a": [1, 2', data))
    f["st_header_not_object"] = variant(lora, tmp / "st-list", weights, join_safetensors(b"[1, 2, 3]", data))
    f["st_offsets_past_end"] = variant(lora, tmp / "st-past", weights,
                                       bad_header(data_offsets=[header[first]["data_offsets"][0], len(data) + 4096]))
    f["st_offsets_disagree_with_shape"] = variant(lora, tmp / "st-shape", weights, bad_header(shape=[3, 1]))
    f["st_unknown_dtype"] = variant(lora, tmp / "st-dtype", weights, bad_header(dtype="F99"))
    f["lora_int_factor"] = variant(lora, tmp / "int", weights, tensors={**tensors, first: torch.ones_like(tensors[first], dtype=torch.int64)})
    f["lora_rank_mismatch"] = variant(lora, tmp / "rank", weights, tensors={
        k: (v[:-1] if k.endswith("lora_A.weight") and k.startswith(first.rsplit(".lora_", 1)[0]) else v) for k, v in tensors.items()})
    f["lora_3d_factor"] = variant(lora, tmp / "3d", weights, tensors={**tensors, first: tensors[first].unsqueeze(0)})
    f["lora_missing_factor"] = variant(lora, tmp / "half", weights, tensors={k: v for k, v in tensors.items() if "lora_B" not in k or k != first.replace("lora_A", "lora_B")})
    f["lora_inf"] = variant(lora, tmp / "inf", weights, tensors={**tensors, first: tensors[first].clone().index_fill_(1, torch.tensor([0]), float("inf"))})
    f["lora_extra_tensor"] = variant(lora, tmp / "extra", weights, tensors={**tensors, "base_model.model.lm_head.weight": torch.zeros(4, 4)})
    f["adapter_config_not_json"] = variant(lora, tmp / "cfg-json", "adapter_config.json", b"{not json")
    config = json.loads((lora / "adapter_config.json").read_text())
    f["adapter_config_ia3"] = variant(lora, tmp / "cfg-ia3", "adapter_config.json", json.dumps({**config, "peft_type": "IA3"}).encode())
    f["adapter_config_dora"] = variant(lora, tmp / "cfg-dora", "adapter_config.json", json.dumps({**config, "use_dora": True}).encode())

    full = make_full(llama_dir, tmp / "full", 3)
    full_tensors = load_file(full / "model.safetensors")
    name = sorted(full_tensors)[0]
    square = next(k for k, v in sorted(full_tensors.items()) if v.dim() == 2 and v.shape[0] != v.shape[1])
    f["full_truncated"] = variant(full, tmp / "full-trunc", "model.safetensors", (full / "model.safetensors").read_bytes()[:-100])
    f["full_transposed_tensor"] = variant(full, tmp / "full-t", "model.safetensors",
                                         tensors={**full_tensors, square: full_tensors[square].T.contiguous()})
    f["full_missing_tensor"] = variant(full, tmp / "full-miss", "model.safetensors", tensors={k: v for k, v in full_tensors.items() if k != name})
    f["full_int_tensor"] = variant(full, tmp / "full-int", "model.safetensors", tensors={**full_tensors, name: full_tensors[name].to(torch.int32)})
    f["full_neg_inf_bf16"] = variant(full, tmp / "full-inf", "model.safetensors", tensors={
        **{k: v.to(torch.bfloat16) for k, v in full_tensors.items()}, name: torch.full_like(full_tensors[name], float("-inf"), dtype=torch.bfloat16)})
    f["full_nan"] = variant(full, tmp / "full-nan", "model.safetensors", tensors={**full_tensors, name: full_tensors[name].clone().fill_(float("nan"))})
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors" for k in full_tensors}}
    f["full_index_missing_shard"] = variant(full, tmp / "full-idx", "model.safetensors.index.json", json.dumps(index).encode())
    f["t5_full"] = make_full(t5_dir, tmp / "t5-full", 4)

    f["profile_negative"] = write_profile(tmp / "p-neg.safetensors", {**scores, groups[0][0]: [-0.5, 0.1, 0.2, 0.3]}, "lora-rank")
    f["profile_inf"] = write_profile(tmp / "p-inf.safetensors", {**scores, groups[0][0]: [float("inf"), 0.1, 0.2, 0.3]}, "lora-rank")
    save_file({**{k: torch.tensor(v) for k, v in scores.items()}, groups[0][0]: torch.tensor([1, 2, 3, 4])}, str(tmp / "p-int.safetensors"),
              metadata={"format": "kifmerge-profile", "version": "1", "unit": "lora-rank"})
    f["profile_int"] = tmp / "p-int.safetensors"
    save_file({**{k: torch.tensor(v) for k, v in scores.items()}, groups[0][0]: torch.ones(2, 2)}, str(tmp / "p-2d.safetensors"),
              metadata={"format": "kifmerge-profile", "version": "1", "unit": "lora-rank"})
    f["profile_2d"] = tmp / "p-2d.safetensors"
    save_file({k: torch.tensor(v) for k, v in scores.items()}, str(tmp / "p-nometa.safetensors"))
    f["profile_no_metadata"] = tmp / "p-nometa.safetensors"
    save_file({k: torch.tensor(v) for k, v in scores.items()}, str(tmp / "p-v2.safetensors"),
              metadata={"format": "kifmerge-profile", "version": "2", "unit": "lora-rank"})
    f["profile_version_2"] = tmp / "p-v2.safetensors"
    (tmp / "p-trunc.safetensors").write_bytes(profile.read_bytes()[:-5])
    f["profile_truncated"] = tmp / "p-trunc.safetensors"
    p_header, p_data = split_safetensors(profile)
    key = sorted(k for k in p_header if k != "__metadata__")[0]
    (tmp / "p-past.safetensors").write_bytes(join_safetensors({**p_header, key: {**p_header[key], "data_offsets": [0, len(p_data) + 64]}}, p_data))
    f["profile_offsets_past_end"] = tmp / "p-past.safetensors"

    f["marker"] = tmp / "pwned"
    for label, folder, file, obj in (("lora_pickle", lora, "adapter_model.bin", tensors),
                                     ("lora_evil_pickle", lora, "adapter_model.bin", {"x": Evil(f["marker"])}),
                                     ("lora_list_pickle", lora, "adapter_model.bin", list(tensors.values())),
                                     ("full_pickle", full, "pytorch_model.bin", full_tensors),
                                     ("base_pickle", llama_dir, "pytorch_model.bin", load_file(llama_dir / "model.safetensors")),
                                     ("base_evil_pickle", llama_dir, "pytorch_model.bin", {"x": Evil(f["marker"])})):
        out = tmp / label
        shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors"))
        torch.save(obj, out / file)
        f[label] = out
    (tmp / "lora_junk_pickle").mkdir()
    shutil.copy(lora / "adapter_config.json", tmp / "lora_junk_pickle")
    (tmp / "lora_junk_pickle" / "adapter_model.bin").write_bytes(b"\x80\x04 not a pickle at all")
    f["lora_junk_pickle"] = tmp / "lora_junk_pickle"

    good = task_records("parity", 4)
    (tmp / "latin1.jsonl").write_bytes('{"input": "caf\xe9", "output": "x"}\n'.encode("latin-1"))
    f["data_latin1"] = tmp / "latin1.jsonl"
    f["data_no_output"] = write_jsonl(tmp / "no-output.jsonl", [{"input": r["input"]} for r in good])
    f["data_not_object"] = write_jsonl(tmp / "not-object.jsonl", [good[0], ["a", "b"]])
    f["data_empty_answer"] = write_jsonl(tmp / "empty-answer.jsonl", [{**good[0], "output": ""}])
    (tmp / "empty.jsonl").write_text("")
    f["data_empty"] = tmp / "empty.jsonl"
    (tmp / "broken.jsonl").write_text(json.dumps(good[0]) + "\n{\"input\": \"x\", \n")
    f["data_invalid_json"] = tmp / "broken.jsonl"
    (tmp / "list.json").write_text(json.dumps(good)[:-2])
    f["data_unclosed_list"] = tmp / "list.json"
    f["data_good"] = write_jsonl(tmp / "good.jsonl", good)
    return cli, f


ADD = ["add-task", "x", "{%s}", "--base", "llama"]
PROFILE = ["add-task", "x", "{lora}", "--base", "llama", "--profile", "{%s}"]
TRAIN = ["train", "x", "--data", "{%s}", "--line", "main"]
NOT_SAFETENSORS = "not a readable safetensors file"

CASES = [
    # malformed safetensors
    ("truncated safetensors", ADD, "st_truncated", 4, NOT_SAFETENSORS),
    ("header length past the end", ADD, "st_header_length_huge", 4, NOT_SAFETENSORS),
    ("header length cuts the JSON", ADD, "st_header_length_short", 4, NOT_SAFETENSORS),
    ("file shorter than the header length", ADD, "st_tiny_file", 4, NOT_SAFETENSORS),
    ("empty safetensors", ADD, "st_empty_file", 4, NOT_SAFETENSORS),
    ("header is not JSON", ADD, "st_header_not_json", 4, NOT_SAFETENSORS),
    ("header is not an object", ADD, "st_header_not_object", 4, NOT_SAFETENSORS),
    ("offsets past the end", ADD, "st_offsets_past_end", 4, NOT_SAFETENSORS),
    ("offsets disagree with shape", ADD, "st_offsets_disagree_with_shape", 4, NOT_SAFETENSORS),
    ("unknown dtype", ADD, "st_unknown_dtype", 4, NOT_SAFETENSORS),
    ("truncated full model", ADD, "full_truncated", 4, NOT_SAFETENSORS),
    ("index names a missing shard", ADD, "full_index_missing_shard", 3, "is missing"),
    # dtype, shape, structure
    ("integer LoRA factor", ADD, "lora_int_factor", 4, "must be floating point"),
    ("LoRA ranks disagree", ADD, "lora_rank_mismatch", 4, "rank"),
    ("3-D LoRA factor", ADD, "lora_3d_factor", 4, "2-D"),
    ("LoRA factor missing", ADD, "lora_missing_factor", 4, "lacks its lora_B"),
    ("non-LoRA tensor in adapter", ADD, "lora_extra_tensor", 4, "not a LoRA factor"),
    ("adapter config not JSON", ADD, "adapter_config_not_json", 4, "not valid JSON"),
    ("adapter of another PEFT type", ADD, "adapter_config_ia3", 4, "only LORA"),
    ("DoRA adapter", ADD, "adapter_config_dora", 4, "DoRA"),
    ("full tensor transposed", ADD, "full_transposed_tensor", 4, "has shape"),
    ("full tensor missing", ADD, "full_missing_tensor", 4, "lacks tensor"),
    ("full tensor of integer dtype", ADD, "full_int_tensor", 4, "dtype I32"),
    # non-finite weights, another base
    ("Inf in LoRA weights", ADD, "lora_inf", 4, "NaN or infinite"),
    ("-Inf in bf16 full weights", ADD, "full_neg_inf_bf16", 4, "NaN or infinite"),
    ("NaN in full weights", ADD, "full_nan", 4, "NaN or infinite"),
    ("full checkpoint of another architecture", ["add-task", "x", "{t5_full}", "--base", "llama"], 4, "t5 model but base is llama"),
    ("adapter for another base", ["add-task", "x", "{lora}", "--base", "t5"], 4, "another architecture"),
    # profiles
    ("profile with negative scores", PROFILE, "profile_negative", 4, "negative scores"),
    ("profile with Inf", PROFILE, "profile_inf", 4, "NaN, infinite"),
    ("profile of integers", PROFILE, "profile_int", 4, "non-float"),
    ("profile 2-D scores", PROFILE, "profile_2d", 4, "expected 1-D"),
    ("profile without metadata", PROFILE, "profile_no_metadata", 4, "lacks metadata"),
    ("profile of a future version", PROFILE, "profile_version_2", 4, "lacks metadata"),
    ("truncated profile", PROFILE, "profile_truncated", 4, "not a safetensors"),
    ("profile offsets past the end", PROFILE, "profile_offsets_past_end", 4, "not a safetensors"),
    # pickles
    ("pickled adapter without the flag", ADD, "lora_pickle", 4, "--allow-pickle"),
    ("pickled full model without the flag", ADD, "full_pickle", 4, "--allow-pickle"),
    ("pickled base without the flag", ["base", "add", "b", "{base_pickle}"], 4, "--allow-pickle"),
    ("code-running pickle, allowed", [*ADD, "--allow-pickle"], "lora_evil_pickle", 4, "weights_only"),
    ("code-running base pickle, allowed", ["base", "add", "b", "{base_evil_pickle}", "--allow-pickle"], 4, "weights_only"),
    ("pickle that is not a state dict", [*ADD, "--allow-pickle"], "lora_list_pickle", 4, "not a state dict"),
    ("pickle that is junk", [*ADD, "--allow-pickle"], "lora_junk_pickle", 4, "weights_only"),
    # names
    ("task name with ..", ["add-task", "../evil", "{lora}", "--base", "llama"], 2, "invalid task name"),
    ("task name ..", ["add-task", "..", "{lora}", "--base", "llama"], 2, "invalid task name"),
    ("task name with NUL", ["add-task", "a\x00b", "{lora}", "--base", "llama"], 2, "invalid task name"),
    ("task name 300 long", ["add-task", "a" * 300, "{lora}", "--base", "llama"], 2, "invalid task name"),
    ("task name with newline", ["add-task", "a\nb", "{lora}", "--base", "llama"], 2, "invalid task name"),
    ("task name not ASCII", ["add-task", "t\u00e2che", "{lora}", "--base", "llama"], 2, "invalid task name"),
    ("base name with /", ["base", "add", "a/b", "{lora}"], 2, "invalid base name"),
    ("line name with ../", ["fuse", "t2", "--into", "../main"], 2, "invalid line name"),
    ("line name with NUL", ["fuse", "t2", "--into", "ma\x00in"], 2, "invalid line name"),
    ("data label with /", ["eval", "main", "--data", "a/b={data_good}"], 2, "invalid data label"),
    # data files
    ("training data not UTF-8", TRAIN, "data_latin1", 4, "not UTF-8"),
    ("training record without output", TRAIN, "data_no_output", 4, "lacks a non-empty string 'output'"),
    ("training record not an object", TRAIN, "data_not_object", 4, "must be an object"),
    ("training record with empty answer", TRAIN, "data_empty_answer", 4, "lacks a non-empty string 'output'"),
    ("empty training data", TRAIN, "data_empty", 4, "holds no records"),
    ("training JSONL broken", TRAIN, "data_invalid_json", 4, "invalid JSON"),
    ("training JSON list unclosed", TRAIN, "data_unclosed_list", 4, "invalid JSON"),
    ("missing training data", ["train", "x", "--data", "{tmp}/absent.jsonl", "--line", "main"], 3, "data file not found"),
    ("eval data not UTF-8", ["eval", "main", "--data", "a={data_latin1}"], 4, "not UTF-8"),
    ("eval record without output", ["eval", "main", "--data", "a={data_no_output}"], 4, "lacks"),
    ("calibration data without output", ["add-task", "x", "{lora}", "--base", "llama", "--calibrate", "{data_no_output}"], 4, "lacks"),
]


@pytest.mark.parametrize("label,args,file,code,message",
                         [(c[0], c[1], c[2], c[3], c[4]) if len(c) == 5 else (c[0], c[1], None, c[2], c[3]) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line_and_changes_nothing(world, label, args, file, code, message):
    cli, files = world
    values = {k: str(v) for k, v in files.items()}
    argv = [a % file if "%s" in a else a for a in args]
    before = registry_dump(cli.registry)
    result = cli(*[a.format(**values) for a in argv], code=code)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kifmerge: error:"), result.stderr
    assert message in lines[0], lines[0]
    assert registry_dump(cli.registry) == before
    assert not files["marker"].exists(), "a pickle ran code"


# ---- a registry on a read-only, full or forbidden disk -------------------------------------------
def failing_disk(monkeypatch, root: Path, code: int, *, data_only: bool = False) -> None:
    """Make every write under `root` fail with OSError(code), as a read-only (EROFS), full
    (ENOSPC) or forbidden (EACCES) file system would. `data_only`: folders and empty files can
    still be created, writing bytes fails (a disk that fills up mid-command). SQLite writes in
    C, below this; a failing command must not have reached the catalog anyway."""
    root = root.resolve()

    def under(path) -> bool:
        try:
            return Path(os.fsdecode(path)).resolve().is_relative_to(root)
        except (TypeError, ValueError):
            return False

    def fail(path):
        raise OSError(code, os.strerror(code), os.fsdecode(path))

    def guard(real, is_write):
        def wrapper(path, *args, **kwargs):
            if is_write(args, kwargs) and under(path):
                fail(path)
            return real(path, *args, **kwargs)
        return wrapper

    def writes_data(args, kwargs):
        mode = args[0] if args else kwargs.get("mode", "r")
        return isinstance(mode, str) and any(c in mode for c in "wax+")

    def open_flags(args, kwargs):
        flags = args[0] if args else kwargs.get("flags", 0)
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

    always = lambda args, kwargs: True  # noqa: E731
    monkeypatch.setattr(builtins, "open", guard(builtins.open, writes_data))
    monkeypatch.setattr(io, "open", guard(io.open, writes_data))
    real_copyfile = shutil.copyfile

    def copyfile(src, dst, *args, **kwargs):
        if under(dst):
            fail(dst)
        return real_copyfile(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", copyfile)
    if data_only:
        return
    monkeypatch.setattr(os, "open", guard(os.open, open_flags))
    for name in ("mkdir", "replace", "rename", "chmod", "unlink", "remove", "rmdir"):
        monkeypatch.setattr(os, name, guard(getattr(os, name), always))
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst, **kw: fail(dst) if under(dst) or under(src) else real_replace(src, dst, **kw))

STORAGE = [
    ("read-only: add-task", errno.EROFS, False, ["add-task", "x", "{lora2}", "--base", "llama", "--profile", "{profile}"], "read-only"),
    ("read-only: fuse", errno.EROFS, False, ["fuse", "t2", "--into", "main"], "read-only"),
    ("read-only: base add --copy", errno.EROFS, False, ["base", "add", "b", "{llama}", "--copy"], "read-only"),
    ("permission denied: add-task", errno.EACCES, False, ["add-task", "x", "{lora2}", "--base", "llama"], "permission denied"),
    ("disk full: add-task", errno.ENOSPC, True, ["add-task", "x", "{lora2}", "--base", "llama", "--profile", "{profile}"],
     "disk is full"),
    ("disk full: fuse", errno.ENOSPC, True, ["fuse", "t2", "--into", "main", "--method", "kif"], "disk is full"),
    ("disk full: base add --copy", errno.ENOSPC, True, ["base", "add", "b", "{llama}", "--copy"], "disk is full"),
]


@pytest.mark.parametrize("label,code,data_only,args,message", STORAGE,
                         ids=[s[0] for s in STORAGE])
def test_a_full_or_read_only_registry_is_one_line_and_changes_nothing(world, llama_dir, monkeypatch, label, code, data_only,
                                                                       args, message):
    """Exit 7 with one line saying what to do; nothing recorded, no leftovers in the registry."""
    cli, files = world
    values = {k: str(v) for k, v in files.items()} | {"lora2": str(files["tmp"] / "lora2"), "llama": str(llama_dir)}
    before = registry_dump(cli.registry)
    with monkeypatch.context() as patch:
        failing_disk(patch, cli.registry, code, data_only=data_only)
        result = cli(*[a.format(**values) for a in args], code=7)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kifmerge: error:") and message in lines[0], result.stderr
    assert "nothing was recorded" in lines[0]
    assert registry_dump(cli.registry) == before


# ---- --allow-pickle ------------------------------------------------------------------------------
def test_allowed_pickles_are_stored_as_safetensors(world, cli, llama_dir):
    """With --allow-pickle an adapter and a full model in *.bin are loaded with
    weights_only=True and stored as safetensors holding exactly their tensors; a pickled base
    is kept as a converted copy, and tasks register against it and fuse."""
    files = world[1]
    cli("base", "add", "llama", llama_dir)
    cli("add-task", "pickled-lora", files["lora_pickle"], "--base", "llama", "--allow-pickle", "--profile", files["profile"])
    cli("add-task", "pickled-full", files["full_pickle"], "--base", "llama", "--allow-pickle")
    base = cli.json("base", "add", "pickled-base", files["base_pickle"], "--allow-pickle")
    assert base["copied"] and base["path"] == str(files["base_pickle"].resolve())
    cli("add-task", "on-pickled-base", files["lora"], "--base", "pickled-base", "--profile", files["profile"])
    cli("fuse", "on-pickled-base", "--into", "from-pickle")
    cli("fuse", "pickled-lora", "--into", "main")
    for task, name, original in (("pickled-lora", "adapter_model.safetensors", files["lora"] / "adapter_model.safetensors"),
                                 ("pickled-full", "model.safetensors", files["tmp"] / "full" / "model.safetensors")):
        manifest = json.loads(_blob(cli, cli.json("show", task)["weights"]).read_text())
        assert not any(n.endswith(".bin") for n in manifest["files"])
        stored, expected = load_file(_blob(cli, manifest["files"][name])), load_file(original)
        assert stored.keys() == expected.keys() and all(torch.equal(stored[k], expected[k]) for k in expected)
    assert cli.json("verify", "--deep")["ok"]
    assert not files["marker"].exists()


def _blob(cli, sha: str) -> Path:
    return cli.registry / "blobs" / sha[:2] / sha[2:]
