#!/usr/bin/env bash
# Every continual-benchmark table rebuilt from the committed cells, in the checkout: the ruler
# (benchmarks/results: order 4 over seeds 42 and 43, orders 5 and 6, the summary over orders 4-6) and
# the lr 1e-3 archive (benchmarks/results/lr1e-3). Cheap: no training, no evaluation; run it after a cell
# lands. Orders 5 and 6 are assembled after order 4: their linear-best carries order 4's alpha.
#   scripts/reassemble_results.sh
set -euo pipefail
cd "$(dirname "$0")/.."
B="${PYTHON:-.venv/bin/python} benchmarks/continual.py"
R=benchmarks/results
$B --order 4 --seeds 42,43 --assemble > /dev/null
$B --order 5 --assemble > /dev/null
$B --order 6 --assemble > /dev/null
$B --summary > /dev/null
$B --summary --reference linear-0.5 > /dev/null  # the question the project started from: importance vs averaging
$B --summary --reference magmax > /dev/null      # the data-free rules against each other (the default's fallback)
# the archive: every row at lr 1e-3 (bf16), with issue 21's screens and the held-out sequence
A=$R/lr1e-3
$B --results $A --order 4 --seeds 42,43 --assemble > /dev/null
$B --results $A --order 4 --seeds 42 --assemble --out $A/order4-seed42 > /dev/null
for order in 4 5 6; do
    [ "$order" = 4 ] || $B --results $A --order "$order" --assemble > /dev/null
    $B --results $A --order "$order" --seeds 42,43 --assemble --out "$A/order$order-seeds42-43" > /dev/null
done
$B --results $A --sequence examples/data/heldout/sequence.json --assemble > /dev/null
$B --results $A --summary > /dev/null
$B --results $A --summary --suffix seeds42-43 > /dev/null
$B --results $A --summary --reference magmax > /dev/null
$B --results $A --screen --suffix seed42 > /dev/null
echo "reassembled: $R/{order4,order5,order6,summary}.* and $A/*"
