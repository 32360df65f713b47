#!/bin/bash
# One GPU: cryo-drvae on 1 GPU, 8 CPU cores for reading and preparing particles.
#SBATCH --job-name=cryo-drvae
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
#SBATCH --mem=32G
#SBATCH --time=02:00:00
set -euo pipefail
# PARTICLES, OUT and K come from the environment: sbatch --export=ALL,PARTICLES=...,OUT=...,K=100
cryo-drvae classify --i "$PARTICLES" --o "$OUT" --K "${K:-100}" --j "$SLURM_CPUS_PER_TASK" --gpu 0 \
    --scratch_dir "${TMPDIR:-/tmp}/cryo-drvae-$SLURM_JOB_ID"
