"""The fusion rules and profile arithmetic as pure tensor functions, without files."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kifmerge.fusion.rules import blend, important_units, kif_adaptive, kif_static, linear
from kifmerge.profiles import accumulate, normalise

scores = st.lists(st.floats(0, 1, allow_nan=False), min_size=2, max_size=64).map(lambda v: torch.tensor(v))


def test_static_rule_four_cases_with_defaults():
    # 10 units; top 0.2 → the two highest of each profile are important
    p_old = torch.tensor([0.9, 1.0, 0.1, 0.2, 0.0, 0.3, 0.1, 0.2, 0.0, 0.1])
    p_new = torch.tensor([1.0, 0.0, 0.9, 0.2, 0.1, 0.3, 0.1, 0.2, 0.0, 0.1])
    c_new, c_old = kif_static(p_old, p_new)
    assert c_new[:4].tolist() == [0.30000001192092896, 0.0, 1.0, 0.5]
    assert c_old[:4].tolist() == [0.699999988079071, 1.0, 0.0, 0.5]


@given(scores)
def test_constant_profile_marks_nothing_important(values):
    flat = torch.full_like(values, 0.5)
    assert not important_units(flat, 0.2).any()
    assert torch.equal(normalise(flat), torch.zeros_like(flat))


@settings(max_examples=50)
@given(scores, st.floats(0.05, 1.0))
def test_top_fraction_bounds_the_important_units(values, top):
    hot = important_units(values, top)
    assert int(hot.sum()) <= max(1, round(top * len(values))) + 1
    if hot.any():
        assert values[hot].min() > values[~hot].max() if (~hot).any() else True


@given(scores, st.floats(0.05, 2.0))
def test_adaptive_coefficients_are_a_softmax(values, tau):
    other = values.flip(0)
    c_new, c_old = kif_adaptive(other, values, tau=tau)
    torch.testing.assert_close(c_new + c_old, torch.ones_like(c_new))
    assert bool((c_new[values > other] >= 0.5).all()) and bool((c_new[values < other] <= 0.5).all())


def test_blend_broadcasts_along_the_unit_axis():
    old, new = torch.zeros(3, 4), torch.ones(3, 4)
    rows = blend(old, new, torch.tensor([0.0, 0.5, 1.0]), torch.tensor([1.0, 0.5, 0.0]), axis=0)
    assert rows[:, 0].tolist() == [0.0, 0.5, 1.0]
    cols = blend(old, new, torch.tensor([0.0, 0.25, 0.5, 1.0]), torch.tensor([1.0, 0.75, 0.5, 0.0]), axis=1)
    assert cols[0].tolist() == [0.0, 0.25, 0.5, 1.0]
    whole = blend(old.half(), new.half(), torch.tensor([0.3]), torch.tensor([0.7]), axis=None)
    assert whole.dtype == torch.float16 and torch.allclose(whole.float(), torch.full((3, 4), 0.3), atol=1e-3)


@given(scores)
def test_accumulated_profile_is_normalised(values):
    acc = accumulate(values, values.flip(0))
    assert not torch.isnan(acc).any()
    assert acc.min() >= 0 and acc.max() <= 1


def test_engine_streams_blends_and_refuses_overflow(tmp_path):
    """The streaming engine over real files: per-tensor blend, output in the inputs' dtype,
    and a non-finite result refused with the tensor's name."""
    import pytest
    from safetensors.torch import load_file, save_file

    from kifmerge.errors import InvalidInputError
    from kifmerge.fusion.engine import TensorSource, UnitBlend, stream_fused
    from kifmerge.fusion.writer import StreamingShardWriter, TensorSpec
    from kifmerge.units import tensor_layout

    old = {"a": torch.full((4, 4), 1.0, dtype=torch.float16), "b": torch.full((8,), 60000.0, dtype=torch.float16)}
    new = {"a": torch.full((4, 4), 3.0, dtype=torch.float16), "b": torch.full((8,), 60000.0, dtype=torch.float16)}
    save_file(old, str(tmp_path / "old.safetensors"))
    save_file(new, str(tmp_path / "new.safetensors"))
    layout = tensor_layout({k: tuple(v.shape) for k, v in new.items()})
    readers = [TensorSource({"f": tmp_path / f"{n}.safetensors"}, {k: "f" for k in new}) for n in ("old", "new")]
    out = tmp_path / "out"
    out.mkdir()
    specs = {k: TensorSpec("F16", tuple(v.shape)) for k, v in new.items()}
    writer = StreamingShardWriter(out, specs, max_shard_bytes=20)
    stream_fused(UnitBlend(*readers, layout, torch.tensor([0.25, 0.5]), torch.tensor([0.75, 0.5])), writer)
    files, weight_map = writer.finish()
    assert len([f for f in files if f.endswith(".safetensors")]) == 2 and set(weight_map) == {"a", "b"}
    fused = {k: v for f in files if f.endswith(".safetensors") for k, v in load_file(files[f]).items()}
    assert fused["a"].dtype == torch.float16 and torch.all(fused["a"] == 1.5) and torch.all(fused["b"] == 60000.0)

    writer = StreamingShardWriter(out / "..", specs, filename_pattern="x{suffix}.safetensors", index_name=None)
    with pytest.raises(InvalidInputError, match="fused tensor b is not finite"):
        stream_fused(UnitBlend(*readers, layout, torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])), writer)
    writer.abort()
    assert not list(tmp_path.glob(".x*.partial")), "a refused output leaves no partial shard"


def test_blockwise_engine_equals_the_whole_tensor_rules(tmp_path, monkeypatch):
    """With blocks of a few rows, every method streamed from sharded inputs gives exactly what
    the pure rule gives on whole tensors (TIES' threshold is found across blocks by the radix
    select), and the shard hashes the writer computed on the way are the files' sha256."""
    import hashlib

    from safetensors.torch import load_file, save_file

    from kifmerge.fusion import engine
    from kifmerge.fusion.engine import (
        TaskVectorFusion,
        TensorSource,
        UnitBlend,
        stream_fused,
    )
    from kifmerge.fusion.rules import TASK_VECTOR_CONFIGS, blend, task_vector_merge
    from kifmerge.fusion.writer import StreamingShardWriter, TensorSpec
    from kifmerge.units import tensor_layout

    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 40)
    generator = torch.Generator().manual_seed(0)
    shapes = {"emb": (37, 16), "mlp": (24, 9), "norm": (16,), "lone": (1, 130)}
    base = {k: torch.randn(s, generator=generator).to(torch.bfloat16) for k, s in shapes.items()}
    base["mlp"][3:7] = 0  # exact ties in the magnitudes
    tasks = [{k: (v.float() + 0.1 * torch.randn(v.shape, generator=generator)).to(torch.bfloat16) for k, v in base.items()}
             for _ in range(2)]
    for t in tasks:
        t["mlp"][3:7] = 0
    sources = []
    for label, tensors in (("base", base), ("old", tasks[0]), ("new", tasks[1])):
        names = sorted(tensors)
        save_file({k: tensors[k] for k in names[:2]}, str(tmp_path / f"{label}-1.safetensors"))
        save_file({k: tensors[k] for k in names[2:]}, str(tmp_path / f"{label}-2.safetensors"))
        files = {f"{label}-{i}": tmp_path / f"{label}-{i}.safetensors" for i in (1, 2)}
        sources.append(TensorSource(files, {k: f"{label}-{1 if k in names[:2] else 2}" for k in names}))
    specs = {k: TensorSpec("BF16", s) for k, s in shapes.items()}
    layout = tensor_layout(shapes)
    c_new, c_old = torch.tensor([0.2, 1.0, 0.0, 0.7]), torch.tensor([0.8, 0.0, 1.0, 0.3])
    cases = {"kif": (UnitBlend(sources[1], sources[2], layout, c_new, c_old), None)}
    for method in TASK_VECTOR_CONFIGS:
        cases[method] = (TaskVectorFusion(sources[1], sources[2], sources[0], method, vector_weights=[0.4, 0.6], density=0.3,
                                          lam=0.9, seed=5), method)
    for label, (fusion, method) in cases.items():
        out = tmp_path / label
        out.mkdir()
        writer = StreamingShardWriter(out, specs, max_shard_bytes=700)
        stream_fused(fusion, writer)
        files, _ = writer.finish()
        shards = {f for f in files if f.endswith(".safetensors")}
        assert len(shards) >= 3 and set(writer.hashes()) == shards
        for file, sha in writer.hashes().items():
            assert hashlib.sha256(files[file].read_bytes()).hexdigest() == sha
        fused = {k: v for f in files.values() if f.suffix == ".safetensors" for k, v in load_file(f).items()}
        for i, name in enumerate(layout.slots):
            if method is None:
                expected = blend(tasks[0][name], tasks[1][name], c_new[i:i + 1], c_old[i:i + 1], None)
            elif method.startswith("dare"):
                # random drops (seeded per tensor and block): each entry is base + λ·(0, a′, b′ or
                # a′ + b′) with a′ = 0.4·Δa/0.3 and b′ = 0.6·Δb/0.3 — dropped, or kept ×1/density —
                # rounded to bf16; about (1 − 0.3)² of the entries keep neither
                reference = base[name].float()
                a_kept = 0.4 * (tasks[0][name].float() - reference) / 0.3
                b_kept = 0.6 * (tasks[1][name].float() - reference) / 0.3
                got = fused[name].float()
                candidates = [(reference + 0.9 * c).to(torch.bfloat16).float()
                              for c in (torch.zeros_like(a_kept), a_kept, b_kept, a_kept + b_kept)]
                near = torch.stack([(got - c).abs() <= 2 ** -7 * c.abs() + 1e-6 for c in candidates]).any(0)
                assert bool(near.all()), (label, name, got[~near][:5])
                if name == "emb":
                    assert 0.3 < float((got == candidates[0]).float().mean()) < 0.7, (label, "share of entries left at base")
                continue
            else:
                expected = task_vector_merge(base[name], [tasks[0][name], tasks[1][name]], [0.4, 0.6], density=0.3, lam=0.9,
                                             **TASK_VECTOR_CONFIGS[method])
            assert torch.equal(fused[name], expected), (label, name)
    for source in sources:
        source.close()


def test_kth_largest_equals_kthvalue():
    from kifmerge.fusion.rules import kth_largest

    generator = torch.Generator().manual_seed(1)
    for values in (torch.randn(1000, generator=generator).abs(), torch.zeros(50), torch.tensor([3.0, 1.0, 3.0, 0.0, 2.0]),
                   torch.randint(0, 4, (777,), generator=generator).float() * 1e-30):
        blocks = list(values.split(64))
        for k in (1, 2, values.numel() // 2, values.numel()):
            (found,) = kth_largest(lambda fn, blocks=blocks: [sum(counts) for counts in zip(*(fn([b]) for b in blocks))], [k])
            assert found == torch.kthvalue(values, values.numel() - k + 1).values, (values[:5], k)


def test_bracket_select_is_exact_or_declines():
    """The one-pass bracket either finds exactly the k-th largest or says it missed (then the
    radix select decides): narrow brackets at large magnitudes, ties, zeros, denormals."""
    from kifmerge.fusion.rules import bracket_pass, bracket_pick, sample_bracket

    generator = torch.Generator().manual_seed(2)
    cases = [torch.randn(5000, generator=generator).abs(), 1e30 + torch.arange(3000.0) * 1e24, torch.zeros(800),
             torch.tensor([1e-44, 0.0, 3e-45, 1e-44] * 100), torch.randint(0, 3, (2000,), generator=generator).float()]
    hits = 0
    for values in cases:
        for k in (1, 7, values.numel() // 3, values.numel() // 2, values.numel()):
            expected = torch.kthvalue(values, values.numel() - k + 1).values
            for sample in (values[::7], values[:50], values[-10:]):  # good and skewed samples
                lo, hi = sample_bracket(sample, k / values.numel())
                above, inside = 0, []
                for block in values.split(333):
                    n, c = bracket_pass(block, lo, hi)
                    above, inside = above + n, [*inside, c]
                found = bracket_pick(above, torch.cat(inside), k)
                assert found is None or found == expected, (values[:3], k, lo, hi)
                hits += found is not None
    assert hits > 40, "the bracket should find the value from most samples (75 tries)"


def test_streaming_writer_round_trips_any_order_and_dtype(tmp_path):
    from safetensors import safe_open

    from kifmerge.fusion.writer import (
        SAFETENSORS_DTYPES,
        StreamingShardWriter,
        TensorSpec,
    )

    tensors = {"w.bf16": torch.randn(3, 5).to(torch.bfloat16), "w.f32": torch.randn(7), "w.i64": torch.arange(6).reshape(2, 3),
               "w.bool": torch.tensor([True, False, True]), "w.scalar": torch.tensor(2.5), "w.t": torch.randn(4, 6).T}
    specs = {k: TensorSpec(SAFETENSORS_DTYPES[v.dtype], tuple(v.shape)) for k, v in tensors.items()}
    writer = StreamingShardWriter(tmp_path, specs, max_shard_bytes=64)
    for name in reversed(list(tensors)):
        writer.add(name, tensors[name])
    files, weight_map = writer.finish()
    assert set(weight_map) == set(tensors) and "model.safetensors.index.json" in files
    for name, tensor in tensors.items():
        with safe_open(files[weight_map[name]], "pt") as handle:
            assert torch.equal(handle.get_tensor(name), tensor), name


def test_task_vector_baselines_against_references():
    from kifmerge.fusion.rules import TASK_VECTOR_CONFIGS, task_vector_merge

    base = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    a = base + torch.tensor([0.5, -0.2, 0.0, 1.0, -1.0, 0.3])
    b = base + torch.tensor([-0.5, -0.4, 0.1, 2.0, 1.0, -0.1])
    w = [0.4, 0.6]
    ta = task_vector_merge(base, [a, b], w, lam=0.5, **TASK_VECTOR_CONFIGS["task-arithmetic"])
    torch.testing.assert_close(ta, base + 0.5 * (0.4 * (a - base) + 0.6 * (b - base)))

    # TIES, density 0.5: each task vector keeps its 3 largest-magnitude entries, then the sign is
    # elected by the weighted sum, a sum of exactly 0 counting as positive (entry 0 below)
    da = torch.tensor([0.5, 0.0, 0.0, 1.0, -1.0, 0.0])
    db = torch.tensor([-0.5, 0.0, 0.0, 2.0, 1.0, 0.0])
    weighted = torch.stack([0.5 * da, 0.5 * db])
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = weighted.sign() == majority
    divisor = (torch.tensor([[0.5], [0.5]]) * agree).sum(0)
    divisor[divisor == 0] = 1
    expected = base + (weighted * agree).sum(0) / divisor
    ties = task_vector_merge(base, [a, b], [0.5, 0.5], density=0.5, **TASK_VECTOR_CONFIGS["ties"])
    torch.testing.assert_close(ties, expected)
    assert ties[0] == base[0] + 0.5, "the sign tie is resolved towards +, keeping only the positive entry"

    def dare(seed):
        return task_vector_merge(base, [a, b], w, density=0.5, generator=torch.Generator().manual_seed(seed), **TASK_VECTOR_CONFIGS["dare-linear"])

    assert torch.equal(dare(3), dare(3)) and not torch.equal(dare(3), dare(4))
    kept = (dare(3) - base) != 0
    assert kept.any() and not kept.all()


def test_baselines_through_the_cli_use_the_base_as_reference(cli, tmp_path, llama_dir):
    """A full line fused with TIES: v2 = base + TIES(v1 − base, task − base), tensor by tensor;
    DARE on a LoRA line is reproducible under its seed."""
    from conftest import LORA_TARGETS, make_full, make_lora, write_profile
    from safetensors.torch import load_file
    from test_fuse_export import designed_scores, unit_groups

    from kifmerge.fusion.rules import TASK_VECTOR_CONFIGS, task_vector_merge

    cli("base", "add", "llama", llama_dir)
    for kind, make in (("full", lambda out, s: make_full(llama_dir, out, s)),
                       ("lora", lambda out, s: make_lora(llama_dir, out, s, LORA_TARGETS))):
        for seed in (1, 2):
            ckpt = make(tmp_path / f"{kind}{seed}", seed)
            scores = designed_scores(unit_groups(ckpt, kind), {0}, 1.0)[0]
            profile = write_profile(tmp_path / f"{kind}{seed}.safetensors", scores, "lora-rank" if kind == "lora" else "tensor")
            cli("add-task", f"{kind}{seed}", ckpt, "--base", "llama", "--profile", profile)
    cli("fuse", "full1", "--into", "full-line")
    assert cli.json("fuse", "full2", "--into", "full-line", "--method", "ties", "--density", "0.3")["params"] == {
        "alpha": 0.5, "density": 0.3, "lam": 1.0, "profile_weights": [0.3, 0.7], "reference": "base"}
    cli("export", "full-line", tmp_path / "ties")
    base = load_file(llama_dir / "model.safetensors")
    old, new = load_file(tmp_path / "full1" / "model.safetensors"), load_file(tmp_path / "full2" / "model.safetensors")
    fused = load_file(tmp_path / "ties" / "model.safetensors")
    for name, tensor in fused.items():
        torch.testing.assert_close(tensor, task_vector_merge(base[name], [old[name], new[name]], [0.5, 0.5], density=0.3,
                                                             **TASK_VECTOR_CONFIGS["ties"]), msg=name)

    shas = []
    for line, seed in (("d1", "7"), ("d2", "7"), ("d3", "8")):
        cli("fuse", "lora1", "--into", line)
        cli("fuse", "lora2", "--into", line, "--method", "dare-ties", "--merge-seed", seed)
        shas.append(cli.json("show", f"{line}@v2")["weights"])
    assert shas[0] == shas[1] != shas[2]


def test_task_vectors_on_a_lora_line_merge_the_products_against_the_base(cli, tmp_path, llama_dir):
    """A LoRA task fused into a line by TIES, DARE or MagMax: the line's head and the task are two
    task vectors against the base (whose adapter is zero), merged as the dense products ΔW = B·A
    (not factor by factor), then re-factored to the line's rank; the version records the cut."""
    from conftest import LORA_TARGETS, make_lora, write_profile
    from safetensors.torch import load_file
    from test_fuse_export import designed_scores, unit_groups

    from kifmerge.fusion.rules import TASK_VECTOR_CONFIGS, lora_product, task_vector_merge

    cli("base", "add", "llama", llama_dir)
    for seed in (1, 2):
        ckpt = make_lora(llama_dir, tmp_path / f"lora{seed}", seed, LORA_TARGETS)
        profile = write_profile(tmp_path / f"p{seed}.safetensors", designed_scores(unit_groups(ckpt, "lora"), {0}, 1.0)[0], "lora-rank")
        cli("add-task", f"lora{seed}", ckpt, "--base", "llama", "--profile", profile)
    head = load_file(tmp_path / "lora1" / "adapter_model.safetensors")
    new = load_file(tmp_path / "lora2" / "adapter_model.safetensors")
    modules = sorted({name.rsplit(".lora_", 1)[0] for name in head})
    for method, extra in (("ties", ["--density", "0.3", "--alpha", "0.7"]), ("dare-linear", ["--merge-seed", "3"]),
                          ("magmax", [])):
        line = f"tv-{method}"
        cli("fuse", "lora1", "--into", line)
        params = cli.json("fuse", "lora2", "--into", line, "--method", method, *extra)["params"]
        assert params["reference"] == "base"
        cli("export", line, tmp_path / line)
        fused = load_file(tmp_path / line / "adapter_model.safetensors")
        assert fused.keys() == head.keys()
        cut = total = 0.0
        for module in modules:
            a, b = (f"{module}.lora_{side}.weight" for side in "AB")
            products = [lora_product(w[a], w[b]) for w in (head, new)]
            zero = torch.zeros_like(products[0])
            if method == "ties":
                dense = task_vector_merge(zero, products, [0.3, 0.7], density=0.3, **TASK_VECTOR_CONFIGS["ties"])
            elif method == "magmax":
                dense = task_vector_merge(zero, products, [0.5, 0.5], **TASK_VECTOR_CONFIGS["magmax"])
            else:  # DARE's mask is drawn from a generator seeded by the module: check the rescale, not the draw
                dense = None
            rank = head[a].shape[0]
            got = lora_product(fused[a], fused[b])
            assert torch.linalg.matrix_rank(got) <= rank
            if dense is None:
                continue
            u, s, vh = torch.linalg.svd(dense)
            best = (u[:, :rank] * s[:rank]) @ vh[:rank]  # Eckart–Young: the best rank-r approximation
            torch.testing.assert_close(got, best, atol=1e-5, rtol=1e-4, msg=f"{method} {module}")
            cut, total = cut + float(s[rank:].pow(2).sum()), total + float(s.pow(2).sum())
        if method != "dare-linear":
            assert params["refactor"]["rank"] == head[f"{modules[0]}.lora_A.weight"].shape[0]
            assert params["refactor"]["relative_error"] == pytest.approx((cut / total) ** 0.5, rel=1e-3, abs=1e-6)
            assert 0 < params["refactor"]["relative_error"] <= params["refactor"]["worst_module_relative_error"] < 1


def test_magmax_and_the_rank_refactoring_on_hand_computed_tensors():
    """MagMax keeps, per entry, the task vector of largest magnitude with its sign; a rank-r
    re-factoring of a product of rank ≤ r is exact, and otherwise cuts the smallest singular values."""
    from kifmerge.fusion.rules import TASK_VECTOR_CONFIGS, refactor_to_rank, task_vector_merge

    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    line = torch.tensor([3.0, 0.0, 1.0, 1.5])    # τ_line = [ 2, −1, 0, 0.5]
    task = torch.tensor([0.0, 1.5, 2.0, 1.5])    # τ_task = [−1, 0.5, 1, 0.5]
    merged = task_vector_merge(base, [line, task], [0.5, 0.5], lam=0.5, **TASK_VECTOR_CONFIGS["magmax"])
    # per entry: |2|>|−1| → 2; |−1|>|0.5| → −1; |0|<|1| → 1; a tie keeps the first: 0.5; then 1 + 0.5·τ*
    torch.testing.assert_close(merged, torch.tensor([2.0, 0.5, 1.5, 1.25]))

    delta = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    a, b = refactor_to_rank(delta, 2)[:2]
    torch.testing.assert_close(b @ a, torch.diag(torch.tensor([3.0, 2.0, 0.0])))
    cut, total = refactor_to_rank(delta, 2)[2:]
    assert (cut, total) == pytest.approx((1.0, 14.0))           # 1² cut of 3² + 2² + 1²
    low_rank = torch.tensor([[1.0], [2.0]]) @ torch.tensor([[3.0, -1.0, 0.5]])
    a, b, cut, _ = refactor_to_rank(low_rank, 2)
    assert a.shape == (2, 3) and b.shape == (2, 2) and cut == pytest.approx(0.0, abs=1e-9)
    torch.testing.assert_close(b @ a, low_rank)


def test_rank_scores_make_the_adaptive_rule_adapt_on_skewed_profiles(cli, tmp_path, llama_dir):
    """Skewed min–max profiles (most units near 0) give softmax coefficients of ~0.5 everywhere;
    `--scores rank` spreads them: a unit ranked top by the new task and bottom by the line goes
    mostly to the new task. Recorded in params; ties share their rank."""
    from conftest import LORA_TARGETS, make_lora, write_profile
    from test_fuse_export import unit_groups

    from kifmerge.fusion.rules import rank_normalise

    torch.testing.assert_close(rank_normalise(torch.tensor([0.0, 5.0, 5.0, 1.0])), torch.tensor([0.0, 5 / 6, 5 / 6, 1 / 3]))
    skewed_old = torch.tensor([1.0, 0.004, 0.003, 0.002, 0.001, 0.0])
    skewed_new = torch.tensor([0.0, 0.001, 0.002, 0.003, 0.004, 1.0])
    c_minmax, _ = kif_adaptive(skewed_old, skewed_new, tau=0.25)
    c_rank, _ = kif_adaptive(rank_normalise(skewed_old), rank_normalise(skewed_new), tau=0.25)
    assert (c_minmax[1:5] - 0.5).abs().max() < 0.01, "min–max: the middle units all land at 0.5"
    assert c_rank[4] > 0.8 and c_rank[1] < 0.2 and c_rank.diff().gt(0).all(), "ranks: coefficients follow the ranking"

    cli("base", "add", "llama", llama_dir)
    for seed in (1, 2):
        ckpt = make_lora(llama_dir, tmp_path / f"lora{seed}", seed, LORA_TARGETS)
        groups = unit_groups(ckpt, "lora")
        scores = {g: [float((i * (7 if seed == 1 else 3) + j) % 5) ** 4 for j in range(n)] for i, (g, n) in enumerate(groups)}
        cli("add-task", f"t{seed}", ckpt, "--base", "llama", "--profile", write_profile(tmp_path / f"p{seed}.safetensors", scores, "lora-rank"))
    cli("fuse", "t1", "--into", "ranked")
    fused = cli.json("fuse", "t2", "--into", "ranked", "--method", "kif-adaptive", "--scores", "rank")
    assert fused["params"]["scores"] == "rank"
    cli("fuse", "t1", "--into", "plain")
    plain = cli.json("fuse", "t2", "--into", "plain", "--method", "kif-adaptive")
    assert plain["params"]["scores"] == "minmax"
    assert cli.json("show", "ranked@v2")["weights"] != cli.json("show", "plain@v2")["weights"]
    assert cli("fuse", "t2", "--into", "x", "--scores", "median", code=2).stderr.count("\n") == 1


def test_two_task_ties_path_equals_the_general_rule_bit_for_bit():
    """The two-input TIES path (every fuse of a task into a line) gives exactly the bits of the
    general running-sum rule, including entries trimmed to zero in both, signed zeros in the
    base, equal-and-opposite deltas (a sign tie) and unequal weights."""
    from kifmerge.fusion import rules

    generator = torch.Generator().manual_seed(0)
    n = 1 << 14
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        base = torch.randn(n, generator=generator).to(dtype)
        a = (base.float() + 0.01 * torch.randn(n, generator=generator)).to(dtype)
        b = (base.float() + 0.01 * torch.randn(n, generator=generator)).to(dtype)
        a[:100] = base[:100]
        b[50:150] = base[50:150]
        base[200:300], a[200:250], b[200:300] = -0.0, -0.0, 0.0
        b[400:500] = (2 * base[400:500].float() - a[400:500].float()).to(dtype)  # b − base = −(a − base)
        for weights, density, lam, thresholds in (([0.5, 0.5], 0.5, 1.0, None), ([0.3, 0.7], 0.2, 0.9, None),
                                                  ([0.7, 0.3], 1.0, 1.0, None),
                                                  ([0.5, 0.5], 0.5, 1.0, [torch.tensor(0.004), torch.tensor(0.009)])):
            options = dict(sparsify="magnitude", density=density, lam=lam, generator=None, thresholds=thresholds, out_dtype=None)
            fast = rules.consensus_pair(base, [a, b], weights, **options)
            general = rules._merge_each(base, [a, b], weights, consensus=True, normalize=True, **options)
            assert fast.dtype == general.dtype == dtype
            assert torch.equal(fast.view(torch.int16 if dtype != torch.float32 else torch.int32),
                               general.view(torch.int16 if dtype != torch.float32 else torch.int32)), (dtype, weights, density)


# ---- every rule pinned on hand-computed numbers (issue 22) -------------------------------------
# The expected values below are worked out by hand in the comments, not by calling the rules:
# a swapped α, a dropped rescale or a dropped division changes at least one written number.

def test_linear_rule_weights_the_new_side_by_alpha():
    # α = 0.25: c_new = 0.25, c_old = 0.75 everywhere (the profiles play no part)
    c_new, c_old = linear(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), alpha=0.25)
    assert c_new.tolist() == [0.25, 0.25] and c_old.tolist() == [0.75, 0.75]
    # W = 0.25·W_new + 0.75·W_old: 0.25·6 + 0.75·2 = 3, 0.25·8 + 0.75·(−4) = −1
    fused = blend(torch.tensor([2.0, -4.0]), torch.tensor([6.0, 8.0]), c_new, c_old, axis=0)
    assert fused.tolist() == [3.0, -1.0]


def test_static_rule_with_non_default_top_and_weights_by_hand():
    # 8 units, top 0.25: a unit is important above the 0.75 quantile of its profile. Both
    # profiles sort to 0, .1, .2, .3, .4, .5, .9, 1; the quantile at position 0.75·7 = 5.25 is
    # 0.5 + 0.25·(0.9 − 0.5) = 0.6, so old hot = units {0, 1}, new hot = units {0, 2}.
    p_old = torch.tensor([0.9, 1.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    p_new = torch.tensor([1.0, 0.0, 0.9, 0.1, 0.2, 0.3, 0.4, 0.5])
    c_new, c_old = kif_static(p_old, p_new, top=0.25, both=(0.2, 0.8), neither=0.4)
    # unit 0 both → (0.2, 0.8); unit 1 old only → (0, 1); unit 2 new only → (1, 0); rest → (0.4, 0.6)
    torch.testing.assert_close(c_new, torch.tensor([0.2, 0.0, 1.0, 0.4, 0.4, 0.4, 0.4, 0.4]))
    torch.testing.assert_close(c_old, torch.tensor([0.8, 1.0, 0.0, 0.6, 0.6, 0.6, 0.6, 0.6]))
    # W_old = 1, W_new = 11 per unit: 1 + 10·c_new = 3, 1, 11, then 5 for the "neither" units
    fused = blend(torch.ones(8, 2), torch.full((8, 2), 11.0), c_new, c_old, axis=0)
    torch.testing.assert_close(fused[:, 1], torch.tensor([3.0, 1.0, 11.0, 5.0, 5.0, 5.0, 5.0, 5.0]))


def test_adaptive_rule_is_a_sigmoid_of_the_score_gap_by_hand():
    # c_new = e^{Pn/τ} / (e^{Pn/τ} + e^{Po/τ}) = σ((Pn − Po)/τ); τ = 0.5: gaps/τ = 2, −2, 0, 1, −1
    # σ(2) = 0.8807970780, σ(−2) = 0.1192029220, σ(0) = 0.5, σ(1) = 0.7310585786, σ(−1) = 0.2689414214
    p_new = torch.tensor([1.0, 0.0, 0.5, 0.75, 0.25])
    p_old = torch.tensor([0.0, 1.0, 0.5, 0.25, 0.75])
    c_new, c_old = kif_adaptive(p_old, p_new, tau=0.5)
    expected = torch.tensor([0.8807970780, 0.1192029220, 0.5, 0.7310585786, 0.2689414214])
    torch.testing.assert_close(c_new, expected)
    torch.testing.assert_close(c_old, 1 - expected)
    # the default τ = 0.25 doubles the gaps: σ(4) = 0.9820137900 for a gap of 1
    torch.testing.assert_close(kif_adaptive(torch.tensor([0.0]), torch.tensor([1.0]))[0], torch.tensor([0.9820137900]))


def test_accumulated_profile_by_hand():
    # normalise(p_new) = [2, 0, 4] → [0.5, 0, 1]; 0.3·[0.5, 0, 1] + 0.7·[0, 0.5, 1] = [0.15, 0.35, 1]
    # → min–max: [0, 0.2/0.85, 1] = [0, 4/17, 1]
    acc = accumulate(torch.tensor([0.0, 0.5, 1.0]), torch.tensor([2.0, 0.0, 4.0]))
    torch.testing.assert_close(acc, torch.tensor([0.0, 4 / 17, 1.0]))
    # other weights (w_new, w_old) = (0.5, 0.5): [0.25, 0.25, 1] → [0, 0, 1]
    torch.testing.assert_close(accumulate(torch.tensor([0.0, 0.5, 1.0]), torch.tensor([2.0, 0.0, 4.0]), (0.5, 0.5)),
                               torch.tensor([0.0, 0.0, 1.0]))


def test_task_arithmetic_with_lambda_by_hand():
    from kifmerge.fusion.rules import TASK_VECTOR_CONFIGS, task_vector_merge

    base = torch.tensor([1.0, 2.0, 3.0])
    a = torch.tensor([2.0, 0.0, 3.0])   # Δa = [1, −2, 0]
    b = torch.tensor([1.0, 5.0, 7.0])   # Δb = [0, 3, 4]
    # base + λ·(0.25·Δa + 0.75·Δb) with λ = 2: 0.25·Δa + 0.75·Δb = [0.25, 1.75, 3] → ×2 = [0.5, 3.5, 6]
    merged = task_vector_merge(base, [a, b], [0.25, 0.75], lam=2.0, **TASK_VECTOR_CONFIGS["task-arithmetic"])
    assert merged.tolist() == [1.5, 5.5, 9.0]


# TIES: base + λ·Σ_kept w_i·trim(Δ_i) / Σ_kept w_i, density 0.5 of 8 entries → each task vector
# keeps its 4 largest magnitudes. Values are multiples of 1/16 or simple decimals (tolerance 1e-6).
TIES_BASE = torch.tensor([1.0, 2.0, -1.0, 0.0, 3.0, -2.0, 0.5, 4.0])
TIES_DA = torch.tensor([0.4, -0.1, 0.8, 0.6, 0.05, -0.2, 0.3, 0.0])   # keeps 0.8, 0.6, 0.4, 0.3 (entries 2, 3, 0, 6)
TIES_DB = torch.tensor([0.1, 0.6, -0.3, 0.5, -0.05, 0.9, -0.7, 0.02])  # keeps 0.9, 0.7, 0.6, 0.5 (entries 5, 6, 1, 3)


def test_ties_with_unequal_weights_divides_by_the_kept_weights_by_hand():
    from kifmerge.fusion.rules import TASK_VECTOR_CONFIGS, task_vector_merge

    # weights [0.5, 1.5]: w·trim(Δa) = [0.2, 0, 0.4, 0.3, 0, 0, 0.15, 0]
    #                     w·trim(Δb) = [0, 0.9, 0, 0.75, 0, 1.35, −1.05, 0]
    # sums [0.2, 0.9, 0.4, 1.05, 0, 1.35, −0.9, 0] → elected sign + except entry 6 (−)
    # entry 0: a only → 0.2/0.5 = 0.4      entry 1: b only → 0.9/1.5 = 0.6
    # entry 2: a only → 0.4/0.5 = 0.8      entry 3: both → (0.3 + 0.75)/(0.5 + 1.5) = 0.525
    # entry 4, 7: nothing kept → 0         entry 5: b → 1.35/1.5 = 0.9
    # entry 6: sign −, a's +0.15 dropped, b → −1.05/1.5 = −0.7
    # (no division: [0.2, 0.9, 0.4, 1.05, 0, 1.35, −1.05, 0]; dividing by Σw = 2 everywhere: half that)
    merged = task_vector_merge(TIES_BASE, [TIES_BASE + TIES_DA, TIES_BASE + TIES_DB], [0.5, 1.5], density=0.5,
                               **TASK_VECTOR_CONFIGS["ties"])
    torch.testing.assert_close(merged - TIES_BASE, torch.tensor([0.4, 0.6, 0.8, 0.525, 0.0, 0.9, -0.7, 0.0]),
                               atol=1e-6, rtol=0)
    # λ = 0.5 scales the merged vector: entry 3 → 0.2625
    half = task_vector_merge(TIES_BASE, [TIES_BASE + TIES_DA, TIES_BASE + TIES_DB], [0.5, 1.5], density=0.5, lam=0.5,
                             **TASK_VECTOR_CONFIGS["ties"])
    assert abs(float(half[3] - TIES_BASE[3]) - 0.2625) < 1e-6
    # swapped weights [1.5, 0.5]: entry 3 → (1.5·0.6 + 0.5·0.5)/2 = 0.575
    swapped = task_vector_merge(TIES_BASE, [TIES_BASE + TIES_DA, TIES_BASE + TIES_DB], [1.5, 0.5], density=0.5,
                                **TASK_VECTOR_CONFIGS["ties"])
    assert abs(float(swapped[3] - TIES_BASE[3]) - 0.575) < 1e-6


def test_ties_of_three_inputs_general_path_by_hand():
    from kifmerge.fusion.rules import TASK_VECTOR_CONFIGS, task_vector_merge

    # three inputs take the general running-sum path; density 1 (no trim), weights [1, 2, 1]
    base = torch.tensor([0.0, 1.0, -1.0])
    deltas = [torch.tensor([1.0, -1.0, 2.0]), torch.tensor([0.5, 1.0, -1.0]), torch.tensor([-2.0, 1.0, 1.0])]
    # weighted: [1, −1, 2], [1, 2, −2], [−2, 1, 1]; sums [0, 2, 1] → all elected + (0 counts as +)
    # entry 0: kept 1 + 1 over weights 1 + 2 → 2/3; entry 1: 2 + 1 over 2 + 1 → 1; entry 2: 2 + 1 over 1 + 1 → 1.5
    merged = task_vector_merge(base, [base + d for d in deltas], [1.0, 2.0, 1.0], density=1.0, **TASK_VECTOR_CONFIGS["ties"])
    torch.testing.assert_close(merged - base, torch.tensor([2 / 3, 1.0, 1.5]))


# DARE, density 0.5 (rescale ×2), one generator seeded 7 shared by the inputs in order: torch.rand(8)
# draws [.535 .199 .659 .657 .233 .425 .207 .630] for a → kept where < 0.5: [0 1 0 0 1 1 1 0], then
# [.365 .851 .855 .551 .287 .206 .445 .359] for b → [1 0 0 0 1 1 1 1]. Values are exact in binary.
DARE_BASE = torch.tensor([1.0, 2.0, -1.0, 0.0, 3.0, -2.0, 0.5, 4.0])
DARE_DA = torch.tensor([0.125, 0.25, 0.375, 0.5, -0.5, 0.75, -0.625, 1.0])
DARE_DB = torch.tensor([0.25, -0.5, 0.75, 1.0, 0.5, -0.25, -0.125, 0.375])


def _dare(method: str, **options) -> torch.Tensor:
    from kifmerge.fusion.rules import TASK_VECTOR_CONFIGS, task_vector_merge

    return task_vector_merge(DARE_BASE, [DARE_BASE + DARE_DA, DARE_BASE + DARE_DB], [0.25, 0.75], density=0.5,
                             generator=torch.Generator().manual_seed(7), **{**TASK_VECTOR_CONFIGS[method], **options})


def test_dare_keeps_the_seeded_entries_rescaled_by_one_over_density_by_hand():
    # a's kept entries ×2 ×0.25: entry 1 → 0.125, 4 → −0.25, 5 → 0.375, 6 → −0.3125
    # b's kept entries ×2 ×0.75: entry 0 → 0.375, 4 → 0.75, 5 → −0.375, 6 → −0.1875, 7 → 0.5625
    # dare-linear sums them: [0.375, 0.125, 0, 0, 0.5, 0, −0.5, 0.5625]
    assert (_dare("dare-linear") - DARE_BASE).tolist() == [0.375, 0.125, 0.0, 0.0, 0.5, 0.0, -0.5, 0.5625]
    # λ = 2 doubles it
    assert (_dare("dare-linear", lam=2.0) - DARE_BASE).tolist() == [0.75, 0.25, 0.0, 0.0, 1.0, 0.0, -1.0, 1.125]
    # dare-ties elects a sign per entry (no division): entry 4 sum +0.5 → b's 0.75 only; entry 5 sum
    # exactly 0 → + → a's 0.375 only; entry 6 both negative → −0.5
    assert (_dare("dare-ties") - DARE_BASE).tolist() == [0.375, 0.125, 0.0, 0.0, 0.75, 0.375, -0.5, 0.5625]


def test_unit_rules_through_the_cli_store_hand_weighted_tensors(cli, tmp_path, llama_dir):
    """linear (α = 0.25), kif (non-default weights) and kif-adaptive (τ = 0.5) through `kifmerge
    fuse` on a full line: each stored tensor is c_new·W_new + c_old·W_old with the coefficients
    written here by hand (one unit per tensor)."""
    from conftest import make_full, write_profile
    from safetensors.torch import load_file
    from test_fuse_export import unit_groups

    cli("base", "add", "llama", llama_dir)
    old_ckpt, new_ckpt = make_full(llama_dir, tmp_path / "old", 1), make_full(llama_dir, tmp_path / "new", 2)
    names = [name for name, _ in unit_groups(new_ckpt, "full")]  # one unit per tensor, sorted
    assert len(names) >= 16, "at least 80 % of the units score 0, so 'important' is exactly 'scores above 0'"
    # scores already min 0 / max 1, so normalising leaves them as they are (v1's profile = the old one)
    old_scores = {n: [0.0] for n in names} | {names[0]: [1.0], names[1]: [1.0], names[3]: [0.5]}
    new_scores = {n: [0.0] for n in names} | {names[1]: [1.0], names[2]: [1.0], names[4]: [0.5]}
    for task, ckpt, scores in (("old", old_ckpt, old_scores), ("new", new_ckpt, new_scores)):
        cli("add-task", task, ckpt, "--base", "llama", "--profile", write_profile(tmp_path / f"{task}.safetensors", scores, "tensor"))
    rest = (0.5, 0.5)
    expected = {  # c_new per unit (c_old = 1 − c_new in all three rules), units 0..4 then the rest
        # linear α = 0.25: 0.25 everywhere
        "linear": ([0.25] * 5, 0.25, ["--method", "linear", "--alpha", "0.25"]),
        # kif, top 0.2, weights both = (0.1, 0.9), neither = 0.25: old hot {0, 1, 3}, new hot {1, 2, 4}
        # → unit 0 old only 0, unit 1 both 0.1, unit 2 new only 1, unit 3 old only 0, unit 4 new only 1
        "kif": ([0.0, 0.1, 1.0, 0.0, 1.0], 0.25, ["--method", "kif", "--top", "0.2", "--weights", "0.1,0.9,0.25"]),
        # kif-adaptive τ = 0.5: σ((P_new − P_old)/0.5) = σ(−2), σ(0), σ(2), σ(−1), σ(1), then σ(0)
        "kif-adaptive": ([0.1192029220, 0.5, 0.8807970780, 0.2689414214, 0.7310585786], rest[0],
                         ["--method", "kif-adaptive", "--tau", "0.5"]),
    }
    old = load_file(old_ckpt / "model.safetensors")
    new = load_file(new_ckpt / "model.safetensors")
    for method, (first, others, options) in expected.items():
        line = method.replace("-", "")
        cli("fuse", "old", "--into", line)
        assert cli.json("fuse", "new", "--into", line, *options)["method"] == method
        cli("export", line, tmp_path / line)
        fused = {k: v for f in (tmp_path / line).glob("*.safetensors") for k, v in load_file(f).items()}
        assert set(fused) == set(names)
        for i, name in enumerate(names):
            c_new = first[i] if i < 5 else others
            want = c_new * new[name].double() + (1 - c_new) * old[name].double()
            torch.testing.assert_close(fused[name].double(), want, atol=1e-6, rtol=1e-5, msg=f"{method} {name}")
