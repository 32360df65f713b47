#!/bin/bash
# Four GPUs on one node: torchrun starts one process per GPU (NCCL); rank 0 writes the outputs.
#SBATCH --job-name=cryo-drvae-4gpu
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --gres=gpu:4
#SBATCH --mem=128G
#SBATCH --time=02:00:00
set -euo pipefail
# each process takes the GPU of its local rank from --gpu "0,1,2,3" and 8 cores for its DataLoader
torchrun --standalone --nproc_per_node=4 -m cryo_drvae classify \
    --i "$PARTICLES" --o "$OUT" --K "${K:-100}" --j 8 --gpu "0,1,2,3" \
    --scratch_dir "${TMPDIR:-/tmp}/cryo-drvae-$SLURM_JOB_ID"
