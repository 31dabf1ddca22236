"""The profile file's names, torch-free, so registry queries (`profile show`) read profiles
without importing torch. The format itself is described in kifmerge/profiles.py."""

FORMAT = "kifmerge-profile"
VERSION = "1"
ELEMENT = "element:"  # key prefix of element-level scores
GRAM = "gram:"  # key prefix of a LoRA module's input Gram matrix (RegMean)
GRAM_SHARED = "gram-shared"  # metadata: {module: the module whose stored Gram matrix it shares}
# metadata: the Gram matrices' products and sums were float32 whatever the training's precision;
# before 2026-12-06 a --bf16 training summed them in bfloat16 (kifmerge/importance.py, _gram_of)
GRAM_PRECISION = ("gram-precision", "float32")
NOT_UNITS = (ELEMENT, GRAM)  # key prefixes of a profile's tensors that are not unit scores
