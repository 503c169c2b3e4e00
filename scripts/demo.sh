#!/usr/bin/env bash
# End-to-end DynaMight on the built-in synthetic data set:
# simulate -> optimize-deformations -> optimize-inverse-deformations -> deformable-backprojection -> explore.
# Usage: bash scripts/demo.sh [OUTPUT_PROJECT_DIR]   (default: ./demo; an existing directory is refused)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-demo}"
python3 -c "import relion_dynamight, torch" 2>/dev/null || bash "$here/scripts/install.sh"
if [ -e "$out" ]; then echo "ERROR: $out exists; give a new directory: bash scripts/demo.sh NEW_DIR" >&2; exit 1; fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
rd() { python3 -m relion_dynamight.launcher "$@"; }
rd simulate --o "$out" --n-particles 2000 --box 40 --pixel-size 4.5 --snr 0.5 --motion hinge --seed 1
cd "$out"
job=DynaMight/job002/
mkdir -p "$job"
rd optimize-deformations  --refinement-star-file Refine3D/job001/run_data.star --output-directory $job \
   --initial-model Refine3D/job001/run_class001.mrc --n-gaussians 600 --regularization-factor 1 --n-threads 2 --batch-size 16 \
   --gpu-id "" --n-epochs 25 --pipeline-control $job >> ${job}run.out 2>> ${job}run.err
rd optimize-inverse-deformations $job --n-epochs 20 --pipeline-control $job >> ${job}run.out 2>> ${job}run.err
rd deformable-backprojection $job --batch-size 64 --pipeline-control $job >> ${job}run.out 2>> ${job}run.err
rd explore-latent-space $job --half-set 1 --no-gui --pipeline-control $job >> ${job}run.out 2>> ${job}run.err
python3 - "$job" <<'PY'
import sys, numpy as np, mrcfile
job = sys.argv[1]
truth = mrcfile.read("truth/map_reference.mrc").astype(float).ravel()
for h in (1, 2):
    cc = {k: np.corrcoef(mrcfile.read(f"{job}backprojection/{k}_half{h}.mrc").astype(float).ravel(), truth)[0, 1]
          for k in ("map", "standard")}
    print(f"half {h}: correlation with the true reference map: improved {cc['map']:.4f}, standard {cc['standard']:.4f}")
PY
echo "Done. Log: $out/${job}run.out"
echo "Improved half maps: $out/${job}backprojection/map_half1.mrc, map_half2.mrc (FSC: backprojection/fsc.png)"
echo "Latent space and report: $out/${job}report.html, $out/${job}forward_deformations/"
echo "Ground truth for comparison: $out/truth/"
