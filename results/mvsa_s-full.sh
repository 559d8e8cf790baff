#!/usr/bin/env bash
# The full schedule with no early stop (--patience 0; train's default is 10): 150 epochs of every seed (1-5) for
# the heads that train in about a second per epoch, with --protocol-check. Two uses: the dev curves of 20
# full-length seeds let bench/patience.py say what --patience would change, and the file-order test of every one
# of the 150 epochs is what the authors' protocol (best or last of 150 epochs) reports.
#   bash results/mvsa_s-full.sh
#   python bench/patience.py results/mvsa_s-full/* --patience 5,10,20,30,50
#   python pipeline.py results results/mvsa_s-full --against probe
set -euo pipefail
cd "$(dirname "$0")/.."
for head in probe late_concat text_only image_only; do
  echo "--dataset mvsa_s --head $head --patience 0 --protocol-check --out results/mvsa_s-full/$head"
done | bash results/queue.sh
