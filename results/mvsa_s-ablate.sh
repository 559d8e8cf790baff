#!/usr/bin/env bash
# The evidence behind the README's ablation tables on MVSA-Single: every row of SPP-SCL's Tables 4-7
# (plus the full model and the linear probe), then CLIP-CA-CG's and hybrid fusion's ablation rows, each
# 5 seeds at the default schedule (150 epochs, --patience 10), the batch-scope heads with --protocol-check.
# Two lanes of one-thread processes (results/queue.sh); resumable: run it again after a stop.
# Last, the alpha curve (alpha = 2/3 is the full model) and the label-blind variants (--cmf-scope sample, the
# audited split) in results/mvsa_s-ablate-spp_scl-variants. --robustness scores every seed's selected weights
# without its text, without its image and with noise (robustness.json).
# Then: python pipeline.py results results/mvsa_s-ablate-spp_scl --against full
set -euo pipefail
cd "$(dirname "$0")/.."
S="--dataset mvsa_s --patience 10 --robustness --head spp_scl --protocol-check --out results/mvsa_s-ablate-spp_scl"
A="--dataset mvsa_s --patience 10 --robustness --head spp_scl --protocol-check --out results/mvsa_s-ablate-spp_scl-variants"
C="--dataset mvsa_s --patience 10 --robustness --head clip_ca_cg --out results/mvsa_s-ablate-clip_ca_cg"
H="--dataset mvsa_s --patience 10 --robustness --head hybrid_fusion --out results/mvsa_s-ablate-hybrid_fusion"
bash results/queue.sh <<LINES
$S/full
--dataset mvsa_s --patience 10 --robustness --head probe --out results/mvsa_s-ablate-spp_scl/linear-probe
$S/one-step --one-step
$S/wo-clm --no-clm
$S/wo-cmf --no-cmf
$S/ha-last-1 --text-layers 1
$S/wo-intra --no-intra
$S/no-ha --no-ha
$S/ha-last-2 --text-layers 2
$S/ha-last-3 --text-layers 3
$S/text-only --modalities text
$S/image-only --modalities image
$C/full
$C/wo-clip --set clip=false
$C/wo-ca --set ca=false
$C/wo-cg --set cg=false
$H/full
$H/wo-self-attention --set self_attention=false
$H/wo-cross-attention --set cross_attention=false
$H/wo-birau --set birau=false
$H/equal-decision-weights --set dynamic_weights=false
$H/wo-decision-fusion --set decision_fusion=false
$A/alpha-0.5 --alpha 0.5
$A/alpha-0.6 --alpha 0.6
$A/alpha-0.75 --alpha 0.75
$A/alpha-0.9 --alpha 0.9
$A/cmf-sample --cmf-scope sample
$A/clean-split --splits splits/mvsa_s_clean
LINES
