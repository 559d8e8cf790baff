#!/usr/bin/env bash
# MVSA-Multiple and HFM from text caches (their images are not shipped): the probe on text, the text-only
# head and SPP-SCL on text (--modalities text), seeds 1-5, 150 epochs with --patience 10, each data set's
# own defaults (docs/method.md, "Training"). HFM selects on dev macro F1, MVSA on weighted F1.
#   python pipeline.py extract --dataset mvsa_m --text-only && python pipeline.py extract --dataset hfm --text-only
#   bash results/text-caches.sh
#   python pipeline.py results results/mvsa_m-text --against probe
#   python pipeline.py results results/hfm-text --against probe
set -euo pipefail
cd "$(dirname "$0")/.."
lines() {
  for ds in mvsa_m hfm; do
    echo "--dataset $ds --patience 10 --protocol-check --head probe --modalities text --out results/$ds-text/probe"
    echo "--dataset $ds --patience 10 --protocol-check --head text_only --out results/$ds-text/text_only"
  done
  for ds in mvsa_m hfm; do
    echo "--dataset $ds --patience 10 --protocol-check --head spp_scl --modalities text --out results/$ds-text/spp_scl"
  done
}
lines | bash results/queue.sh
