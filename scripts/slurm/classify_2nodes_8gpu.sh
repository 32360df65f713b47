#!/bin/bash
# Two nodes x 4 GPUs: srun starts one torchrun per node; torchrun starts one process per GPU.
#SBATCH --job-name=cryo-drvae-2x4gpu
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=32
#SBATCH --gres=gpu:4
#SBATCH --mem=128G
#SBATCH --time=02:00:00
set -euo pipefail
# the first node of the allocation hosts the rendezvous; all nodes must see $OUT (shared filesystem)
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_id="$SLURM_JOB_ID" \
    --rdzv_endpoint="$head_node:29500" -m cryo_drvae classify \
    --i "$PARTICLES" --o "$OUT" --K "${K:-100}" --j 8 --gpu "0,1,2,3" \
    --scratch_dir "${TMPDIR:-/tmp}/cryo-drvae-$SLURM_JOB_ID"
