"""A seconds-long tour without any download, on the default registry (./registry, or
$KIFMERGE_REGISTRY): `python examples/quickstart_tiny.py`.

Builds a tiny Llama-style model and two LoRA adapters with importance profiles (no network),
then drives the real `kifmerge` command line: init → base add → add-task ×2 → fuse ×2 →
history → export (adapter and merged) → load the export with peft and transformers.
Safe to run repeatedly: each run uses a fresh line and task names.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
WORK = HERE / "out" / "tiny"
KIFMERGE = [sys.executable, "-m", "kifmerge"]


def kifmerge(*args: str) -> dict | list:
    """Run one CLI command, echo it, return its --json result."""
    print("$ kifmerge " + " ".join(args), flush=True)
    done = subprocess.run([*KIFMERGE, *args, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"demo failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def build_models() -> tuple[Path, list[Path]]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base = WORK / "tiny-llama"
    if not (base / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        LlamaForCausalLM(config).save_pretrained(base)
    adapters = []
    for seed, name in ((1, "task-a"), (2, "task-b")):
        out = WORK / name
        model = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        generator = torch.Generator().manual_seed(seed)
        scores = {}
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        model.save_pretrained(out)
        # a profile in the interchange format: one raw score per rank unit of each adapted module
        for param_name, _ in model.named_parameters():
            if param_name.endswith("lora_A.default.weight"):
                module = param_name[: -len(".lora_A.default.weight")]
                scores[module] = torch.rand(4, generator=generator)
        save_file(scores, str(out / "profile.safetensors"),
                  metadata={"format": "kifmerge-profile", "version": "1", "unit": "lora-rank"})
        adapters.append(out)
    return base, adapters


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base, (adapter_a, adapter_b) = build_models()
    run = time.strftime("%Y%m%d-%H%M%S")
    line, task_a, task_b = f"demo-{run}", f"a-{run}", f"b-{run}"

    kifmerge("init")
    if not any(b["name"] == "tiny-llama" for b in kifmerge("list", "bases")):
        kifmerge("base", "add", "tiny-llama", str(base))
    kifmerge("add-task", task_a, str(adapter_a), "--base", "tiny-llama", "--profile", str(adapter_a / "profile.safetensors"))
    kifmerge("add-task", task_b, str(adapter_b), "--base", "tiny-llama", "--profile", str(adapter_b / "profile.safetensors"),
             "--line", line)
    print(json.dumps(kifmerge("fuse", task_a, "--into", line), indent=1))
    print(json.dumps(kifmerge("fuse", task_b, "--into", line), indent=1))
    for version in kifmerge("history", line):
        print(f"  {version['version']}: task {version['task']} by {version['method']} {version['params']}")
    adapter_out, merged_out = WORK / f"{line}-adapter", WORK / f"{line}-merged"
    kifmerge("export", line, str(adapter_out))
    kifmerge("export", line, str(merged_out), "--merged")

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        via_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_out).eval()(ids).logits
        via_merged = AutoModelForCausalLM.from_pretrained(merged_out).eval()(ids).logits
    gap = (via_peft - via_merged).abs().max().item()
    print(f"exported {line}: adapter → {adapter_out}, merged → {merged_out}; max logit gap {gap:.2e}")
    print(f"demo finished in {time.perf_counter() - started:.1f} s")
    if gap > 1e-4:
        sys.exit("demo failed: adapter and merged exports disagree")


if __name__ == "__main__":
    main()
