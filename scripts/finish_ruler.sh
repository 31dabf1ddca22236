#!/bin/bash
# Once every order-4 cell of the lr 3e-3 ruler has landed (issue 19; benchmarks/results/README.md item 8):
# assemble order 4 over seeds 42 and 43, reassemble orders 5 and 6 (their linear-best then carries order 4's
# α instead of choosing it on themselves), and write the summary over orders 4–6. Cheap: no training, no
# evaluation. Refuses, naming what is missing, while a cell of the chain is not there yet.
#
#   bash scripts/finish_ruler.sh              # then commit benchmarks/results/lr3e-3/{order4,order5,order6,summary}.*
#   RESULTS=/tmp/copy bash scripts/finish_ruler.sh   # on a copy of the folder
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS="${RESULTS:-benchmarks/results/lr3e-3}"
PY="${PYTHON:-.venv/bin/python}"
source scripts/ruler_methods.sh
missing=()
for seed in 42 43; do
    for method in ${RULER_METHODS//,/ }; do
        [ -f "$RESULTS/runs/order4/seed$seed/$method.json" ] || missing+=("order4/seed$seed/$method")
    done
done
for order in 5 6; do
    for method in ${RULER_METHODS//,/ }; do
        [ -f "$RESULTS/runs/order$order/seed42/$method.json" ] || missing+=("order$order/seed42/$method")
    done
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "finish_ruler: ${#missing[@]} cells not there yet under $RESULTS/runs: ${missing[*]}" >&2
    echo "finish_ruler: continue the chain first: bash scripts/continue_ruler.sh" >&2
    exit 1
fi
B="$PY benchmarks/continual.py"
$B --order 4 --seeds 42,43 --assemble --results "$RESULTS" > /dev/null
$B --order 5 --assemble --results "$RESULTS" > /dev/null
$B --order 6 --assemble --results "$RESULTS" > /dev/null
$B --summary --results "$RESULTS"
echo "finished: $RESULTS/{order4,order5,order6}.{json,md,png} and summary.{json,md}"
