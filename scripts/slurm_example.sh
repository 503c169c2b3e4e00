#!/bin/bash
# Sample SLURM submission script for relion_dynamight (also usable as RELION's queue template:
# RELION replaces the XXX...XXX words when "Submit to queue?" is Yes).
#
# Ranks: one MPI rank per GPU.  With 2+ ranks, training runs the two half sets on different ranks and
# deformable backprojection splits the particles; each rank uses the GPU of its local rank unless
# --gpu-id says otherwise.  Only rank 0 writes files and RELION's exit files; a failure on any rank
# ends all ranks with RELION_JOB_EXIT_FAILURE written.
#
#SBATCH --job-name=XXXnameXXX
#SBATCH --output=XXXoutfileXXX
#SBATCH --error=XXXerrfileXXX
#SBATCH --partition=XXXqueueXXX
#SBATCH --nodes=1
#SBATCH --ntasks=XXXmpinodesXXX
#SBATCH --cpus-per-task=XXXthreadsXXX
#SBATCH --gres=gpu:XXXmpinodesXXX
#SBATCH --time=48:00:00

set -euo pipefail
# Activate the environment that has relion_dynamight (adapt to your site):
# source /opt/conda/etc/profile.d/conda.sh && conda activate relion-dynamight

export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

# RELION puts the whole DynaMight command line here (it already ends with --pipeline-control DIR/):
srun --mpi=pmi2 XXXcommandXXX

# Used by hand instead of from RELION, the line looks like:
# srun --mpi=pmi2 relion_dynamight optimize-deformations --refinement-star-file Refine3D/job010/run_data.star \
#     --initial-model Refine3D/job010/run_class001.mrc --n-gaussians 10000 --n-threads "$OMP_NUM_THREADS" \
#     --output-directory DynaMight/job012/
# or, with the MPI launcher of your mpi4py build:  mpirun -n 2 relion_dynamight ...
