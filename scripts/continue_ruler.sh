#!/bin/bash
# Continue the lr 3e-3 ruler (issue 19; benchmarks/results/README.md item 8) in the background, on a
# fresh machine or a warm one: prepares SmolLM2 if it is missing, freezes a copy of HEAD in
# /tmp/bench-src (editing the checkout cannot reach the running process), and runs what is left of
# order 4 (seeds 42 and 43, float32). Finished cells are skipped; a row cut short by the end of a
# session is rerun. Log: /tmp/ruler-o4.log; cells land in benchmarks/results/lr3e-3/runs/order4/.
#
#   bash scripts/continue_ruler.sh            # start it
#   pkill -STOP -f benchmarks/continual.py    # hold it (e.g. for the test suite); -CONT resumes
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if pgrep -f benchmarks/continual.py >/dev/null; then
    echo "a benchmark is running already (pgrep -af benchmarks/continual.py)" >&2
    exit 1
fi
test -d "$HOME/.cache/kifmerge/models/smollm2-135m-instruct" || make smollm2
"$ROOT/.venv/bin/python" -c "import torch; print('CPU capability:', torch.backends.cpu.get_cpu_capability())"
git worktree prune
rm -rf /tmp/bench-src
git worktree add -f /tmp/bench-src HEAD >/dev/null
source "$ROOT/scripts/ruler_methods.sh"
cd /tmp/bench-src
PYTHONPATH=/tmp/bench-src nohup nice -n 5 "$ROOT/.venv/bin/python" benchmarks/continual.py --lr 0.003 --precision fp32 \
    --results "$ROOT/benchmarks/results/lr3e-3" --order 4 --seeds 42,43 --methods "$RULER_METHODS" \
    --work "$ROOT/benchmarks/work/probe-o4-lr3e-3-fp32" > /tmp/ruler-o4.log 2>&1 &
echo "started (pid $!): tail -f /tmp/ruler-o4.log"
