#!/usr/bin/env bash
# After a benchmark cell lands: every table rebuilt from the committed cells, in the checkout (a frozen
# copy assembles with its own default method as the reference row). Cheap: no training, no evaluation.
#   scripts/reassemble_results.sh
set -euo pipefail
cd "$(dirname "$0")/.."
B="${PYTHON:-.venv/bin/python} benchmarks/continual.py"
# order 4 has every issue-19 row on seeds 42 and 43: order4.json holds those; order4-seed42 every row of
# seed 42 (issue 21's one-seed candidates too), which the screen reads
$B --order 4 --seeds 42,43 --assemble > /dev/null
$B --order 4 --seeds 42 --assemble --out benchmarks/results/order4-seed42 > /dev/null
for order in 4 5 6; do
    [ "$order" = 4 ] || $B --order "$order" --assemble > /dev/null
    $B --order "$order" --seeds 42,43 --assemble --out "benchmarks/results/order$order-seeds42-43" > /dev/null
done
$B --sequence examples/data/heldout/sequence.json --assemble --work benchmarks/work/heldout > /dev/null
$B --summary > /dev/null
$B --summary --suffix seeds42-43 > /dev/null
$B --summary --reference magmax > /dev/null
$B --screen --suffix seed42 > /dev/null
echo "reassembled: benchmarks/results/{order4,order4-seed42,order5,order6,heldout}*, summary*, screen-order4"
