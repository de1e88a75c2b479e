#!/bin/bash
# SLURM: FSDP2 training on 2 nodes x 8 GPUs, requeued on preemption and resumed from the newest checkpoint.
#   sbatch configs/accelerate/slurm_fsdp.sh configs/sdxl/dpo.yaml train.output_dir=/shared/runs/sdxl-dpo
# One task per node starts `accelerate launch`, which starts one process per GPU. SIGTERM (preemption,
# scancel, time limit: --signal) reaches the trainer, which saves a checkpoint and exits 143; the job is
# requeued and `--resume latest` continues from it. train.output_dir must be on shared storage.
#SBATCH --job-name=diffalign-fsdp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:TERM@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail
CONFIG=${1:?usage: sbatch slurm_fsdp.sh CONFIG.yaml [overrides...]}
shift
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
NUM_PROCESSES=$((SLURM_NNODES * 8))
# forward the batch script's SIGTERM to the launchers, which pass it to the training processes
trap 'kill -TERM "$SRUN_PID"' TERM
srun --kill-on-bad-exit=1 bash -c "accelerate launch \
  --config_file configs/accelerate/fsdp_multinode.yaml \
  --num_machines $SLURM_NNODES --num_processes $NUM_PROCESSES \
  --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_HOST --main_process_port 29500 \
  -m diffalign train $CONFIG checkpoint.on_sigterm=true $* --resume latest" &
SRUN_PID=$!
status=0
wait "$SRUN_PID" || status=$?
if kill -0 "$SRUN_PID" 2>/dev/null; then  # the trap interrupted the wait: wait for the checkpoint and exit
  status=0
  wait "$SRUN_PID" || status=$?
fi
if [ "$status" -eq 143 ]; then  # stopped by SIGTERM after saving a checkpoint: run again from it
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
