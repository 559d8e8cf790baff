#!/usr/bin/env bash
# The evidence behind the README's MVSA-Single heads table: every head, seeds 1-5, the default
# schedule (150 epochs) with --patience 10, and test also scored in file order after every epoch
# (--protocol-check: what the authors' protocol would report; never used for selection).
# Resumable: a finished seed (seed-<s>.json) is never trained again, an unfinished one continues.
# Then: python pipeline.py results results/mvsa_s-heads --against probe
set -euo pipefail
cd "$(dirname "$0")/.."
for spec in probe spp_scl "spp_scl-official:spp_scl --official" late_concat text_only image_only clip_ca_cg hybrid_fusion; do
  name=${spec%%:*}
  head=${spec#*:}
  # shellcheck disable=SC2086  # $head may carry a flag (--official)
  python pipeline.py train --dataset mvsa_s --head $head --patience 10 --protocol-check \
    --out "results/mvsa_s-heads/$name" "$@"
done
