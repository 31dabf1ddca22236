#!/usr/bin/env bash
# After a benchmark cell lands: every table rebuilt from the committed cells, in the checkout (a frozen
# copy assembles with its own default method as the reference row). Cheap: no training, no evaluation.
#   scripts/reassemble_results.sh
set -euo pipefail
cd "$(dirname "$0")/.."
B="${PYTHON:-.venv/bin/python} benchmarks/continual.py"
for order in 4 5 6; do
    $B --order "$order" --assemble > /dev/null
    $B --order "$order" --seeds 42,43 --assemble --out "benchmarks/results/order$order-seeds42-43" > /dev/null
done
$B --sequence examples/data/heldout/sequence.json --assemble --work benchmarks/work/heldout > /dev/null
$B --summary > /dev/null
$B --summary --suffix seeds42-43 > /dev/null
$B --summary --reference magmax > /dev/null
$B --screen > /dev/null
echo "reassembled: benchmarks/results/{order4,order5,order6,heldout}*, summary*, screen-order4"
