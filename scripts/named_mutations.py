"""Issue 22's named mutations, each applied to a fresh copy of HEAD's kifmerge/ and run against the
tests that must catch it; prints the failing tests per mutation (every one must fail some).

`python -P` keeps the working tree's kifmerge off sys.path, so the copy on PYTHONPATH is what the
tests import (plain `python -m pytest` from the repository would import the unmutated tree).

    python scripts/named_mutations.py
"""
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
MUTS = [
 ("alpha swapped in rules.linear", "kifmerge/fusion/rules.py",
  "return torch.full(p_new.shape, alpha, dtype=torch.float32), torch.full(p_new.shape, 1.0 - alpha, dtype=torch.float32)",
  "return torch.full(p_new.shape, 1.0 - alpha, dtype=torch.float32), torch.full(p_new.shape, alpha, dtype=torch.float32)",
  ["tests/test_rules.py", "tests/test_rule_selection.py"]),
 ("alpha swapped in the task-vector weights (services/fusing.py, both sites)", "kifmerge/services/fusing.py",
  "vector_weights=[1 - params.alpha, params.alpha]", "vector_weights=[params.alpha, 1 - params.alpha]",
  ["tests/test_rules.py", "tests/test_fuse_export.py"]),
 ("DARE's 1/density rescale dropped", "kifmerge/fusion/rules.py",
  "return delta.mul_(keep).div_(density)", "return delta.mul_(keep)",
  ["tests/test_rules.py", "tests/test_merge_rules.py"]),
 ("TIES' division by the kept weights dropped (two-input path)", "kifmerge/fusion/rules.py",
  "return mixed.div_(divisor).mul_(lam).add_(reference).to(out_dtype or tensors[-1].dtype)",
  "return mixed.mul_(lam).add_(reference).to(out_dtype or tensors[-1].dtype)",
  ["tests/test_rules.py", "tests/test_merge_rules.py"]),
 ("TIES' division dropped (general path)", "kifmerge/fusion/rules.py",
  "    if normalize:\n        mixed.div_(divisor)\n", "",
  ["tests/test_rules.py", "tests/test_merge_rules.py"]),
 ("90 % for 95 %", "kifmerge/stats.py", "level: float = 0.95", "level: float = 0.90", ["tests/test_stats.py"]),
]
for title, path, old, new, tests in MUTS:
    root = pathlib.Path(tempfile.mkdtemp(prefix="mutation-"))
    subprocess.run(f"git -C {REPO} archive HEAD kifmerge | tar -x -C {root}", shell=True, check=True)
    source = root / path
    text = source.read_text()
    n = text.count(old)
    assert n >= 1, f"{title}: the line to mutate is no longer in {path}"
    source.write_text(text.replace(old, new))
    r = subprocess.run([sys.executable, "-P", "-m", "pytest", *tests, "-q", "-p", "no:randomly", "-p", "no:cacheprovider", "-m", "not slow"],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    shutil.rmtree(root, ignore_errors=True)
    failed = [l.split(" - ")[0].replace("FAILED ", "") for l in r.stdout.splitlines() if l.startswith("FAILED")]
    print(f"## {title} ({n} site(s)): exit {r.returncode}, {len(failed)} failed")
    for t in failed: print("   ", t)
    sys.stdout.flush()
    if not failed:
        sys.exit(f"{title}: no test failed")
