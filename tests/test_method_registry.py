"""The fusion-method registry (kifmerge/fusion/methods.py): everything reads it, so a new rule is
one pure function plus one entry."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from test_plans import inputs, write_plan  # noqa: F401  (the module-scoped fixture)


def test_every_reader_takes_its_methods_and_parameters_from_the_registry():
    from kifmerge.fusion.methods import METHODS, help_text
    from kifmerge.options import FuseParams, cli_fields

    assert set(cli_fields(FuseParams)) == set(FuseParams.model_fields) - {"profile_weights"}, "a plan and the CLI set every fuse parameter"
    for name, entry in METHODS.items():
        assert set(entry.parameters) <= set(FuseParams.model_fields), name
        assert set(FuseParams(method=name).recorded()) == {*entry.parameters, "profile_weights"}, name
        assert name in help_text()


def test_fuse_help_lists_every_registered_method(cli):
    from kifmerge.fusion.methods import METHODS

    shown = " ".join(cli("fuse", "--help").stdout.split())
    assert all(name in shown for name in METHODS)


def test_a_toy_rule_is_one_function_and_one_entry_and_fuses_from_the_cli_and_a_plan(cli, tmp_path, inputs, monkeypatch):
    """A unit rule `toy` (c_new = alpha / 2 everywhere), registered with `register`, is accepted by
    `fuse --method toy` and by a plan's fuse step, and recorded with the parameters it reads."""
    from kifmerge.fusion import methods

    def toy(params, p_old, p_new):  # the "pure function"
        return torch.full_like(p_new, params.alpha / 2), torch.full_like(p_new, 1 - params.alpha / 2)

    monkeypatch.setitem(methods.METHODS, "toy", methods.FusionMethod("toy", methods.UNIT, "half of linear", ("alpha",),
                                                                        coefficients=toy))
    cli("base", "add", "llama", inputs["base"])
    for n in (1, 2):
        cli("add-task", f"t{n}", inputs[f"t{n}"], "--base", "llama", "--profile", inputs[f"p{n}"])
    cli("fuse", "t1", "--into", "main")
    version = cli.json("fuse", "t2", "--into", "main", "--method", "toy", "--alpha", "0.8")
    assert version["method"] == "toy" and version["params"]["alpha"] == 0.8
    cli("export", "main", tmp_path / "out")
    old = load_file(inputs["t1"] / "adapter_model.safetensors")
    new = load_file(inputs["t2"] / "adapter_model.safetensors")
    fused = load_file(tmp_path / "out" / "adapter_model.safetensors")
    for name, tensor in fused.items():  # 0.4·new + 0.6·old
        torch.testing.assert_close(tensor, 0.4 * new[name] + 0.6 * old[name], msg=name)

    plan = write_plan(tmp_path, inputs, line="planned", steps=[
        {"fuse": {"task": "t1"}}, {"fuse": {"task": "t2", "fuse": {"method": "toy", "alpha": 0.8}}}])
    cli("run", plan)
    assert cli.json("show", "planned@v2")["weights"] == cli.json("show", "main@v2")["weights"]


def test_a_plan_step_with_scores_rank_runs_as_it_validates(cli, tmp_path, inputs):
    """`{method: kif-adaptive, scores: rank}` passed validation and --dry-run, then failed when the
    step ran (the plan's fuse keys missed `scores`)."""
    plan = write_plan(tmp_path, inputs, steps=[
        {"add-task": {"task": "t1", "checkpoint": str(inputs["t1"]), "profile": str(inputs["p1"])}},
        {"fuse": {"task": "t1"}},
        {"add-task": {"task": "t2", "checkpoint": str(inputs["t2"]), "profile": str(inputs["p2"])}},
        {"fuse": {"task": "t2", "fuse": {"method": "kif-adaptive", "scores": "rank"}}}])
    cli("run", plan, "--dry-run")
    cli("run", plan)
    assert cli.json("show", "main@v2")["params"]["scores"] == "rank"
