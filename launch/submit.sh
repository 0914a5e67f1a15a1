#!/usr/bin/env bash
# Submit a megatron_vlm SLURM script with its job log in LOG_DIR (default: logs, under the
# directory you submit from), creating LOG_DIR first:
#
#   bash launch/submit.sh [sbatch options] launch/slurm_train.sbatch CONFIG [key.sub=value ...]
#   bash launch/submit.sh --nodes=4 launch/slurm_grpo.sbatch
#
# Why a wrapper: sbatch opens the #SBATCH --output file when the job starts, before any line of
# the script runs, and SLURM does not create missing directories, so a script cannot mkdir its own
# job-log directory (the job would fail to start, or run with its log lost). A plain `sbatch
# launch/slurm_*.sbatch` still works: its --output is the submit directory itself, which exists.
# An --output given on the command line overrides the script's directive. LOG_DIR is exported to
# the job, whose per-node logs then go under LOG_DIR/<job id>/ too.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: bash launch/submit.sh [sbatch options] SCRIPT [args ...]" >&2; exit 2; }
export LOG_DIR=${LOG_DIR:-logs}
mkdir -p "$LOG_DIR"
exec sbatch --output="$LOG_DIR/%x-%j.out" "$@"
