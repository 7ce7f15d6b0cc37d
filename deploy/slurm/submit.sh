#!/bin/bash
# Plan once, run an array of WORLD_SIZE ranks, wait for it, pack (the array again: every rank
# packs its part of the shards), print the status.
#
#   deploy/slurm/submit.sh CONFIG WORLD_SIZE [extra sbatch options...]
#   deploy/slurm/submit.sh pipeline.toml 64 --partition=cpu --time=08:00:00
#
# No job dependencies: `safepipe plan` runs here, synchronously, and the array is only submitted
# once it has succeeded. On clusters that forbid work on login nodes set
#   PLAN_LAUNCHER="srun --ntasks=1 --cpus-per-task=2 --time=00:30:00"
# Other knobs (environment): SAFEPIPE_BIN (binary or container launcher), LOG_DIR (default logs),
# MAX_CONCURRENT (array throttle, "%N"), RUN_FLAGS (extra `safepipe run` flags, e.g. "--force score"),
# SAFEPIPE_MAX_REQUEUES (auto-requeue of exit code 3, see the sbatch file), NO_WAIT=1 (submit only),
# PACK_RANKS (ranks of the pack step, default WORLD_SIZE; 1 packs in one process on this node).
set -euo pipefail

if (( $# < 2 )); then
  echo "usage: $0 CONFIG WORLD_SIZE [sbatch options...]" >&2
  exit 2
fi
CONFIG=$1 WORLD_SIZE=$2
shift 2
[[ "$WORLD_SIZE" =~ ^[1-9][0-9]*$ ]] || { echo "WORLD_SIZE must be a positive integer" >&2; exit 2; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LOG_DIR=${LOG_DIR:-logs}
read -r -a SAFEPIPE <<< "${SAFEPIPE_BIN:-safepipe}"
read -r -a LAUNCHER <<< "${PLAN_LAUNCHER:-}"
read -r -a RUN_ARGS <<< "${RUN_FLAGS:-}"

# 1. Plan (idempotent from the user's point of view: an existing plan is never re-split).
"${LAUNCHER[@]}" "${SAFEPIPE[@]}" plan "$CONFIG"

# 2. Array: index = rank, world size pinned so resubmitted subsets keep their ranks.
mkdir -p "$LOG_DIR"
ARRAY="0-$(( WORLD_SIZE - 1 ))${MAX_CONCURRENT:+%$MAX_CONCURRENT}"
WAIT=(--wait)
[[ -n "${NO_WAIT:-}" ]] && WAIT=()
echo "submitting array ${ARRAY} (world size ${WORLD_SIZE}), logs in ${LOG_DIR}/"
set +e
sbatch "${WAIT[@]}" --array="$ARRAY" \
  --output="${LOG_DIR}/%x_%A_%a.out" --error="${LOG_DIR}/%x_%A_%a.err" \
  --export="ALL,SAFEPIPE_WORLD_SIZE=${WORLD_SIZE}" \
  "$@" "$HERE/pipeline-array.sbatch" "$CONFIG" "${RUN_ARGS[@]}"
rc=$?
set -e

# 3. Global stages (pack): the array once more, now that every unit is tokenized. Every committed
#    unit is skipped; each rank packs its part of the shards (byte-identical to one process), and
#    the last to finish writes the manifest (a no-op for configs without [pack]).
PACK_RANKS=${PACK_RANKS:-$WORLD_SIZE}
if (( rc == 0 )) && [[ -z "${NO_WAIT:-}" ]]; then
  if (( PACK_RANKS > 1 )); then
    echo "submitting the pack array 0-$(( PACK_RANKS - 1 ))"
    sbatch --wait --array="0-$(( PACK_RANKS - 1 ))" \
      --output="${LOG_DIR}/%x_pack_%A_%a.out" --error="${LOG_DIR}/%x_pack_%A_%a.err" \
      --export="ALL,SAFEPIPE_WORLD_SIZE=${PACK_RANKS}" \
      "$@" "$HERE/pipeline-array.sbatch" "$CONFIG" || rc=$?
  else
    "${LAUNCHER[@]}" "${SAFEPIPE[@]}" run "$CONFIG" --world-size 1 --rank 0 || rc=$?
  fi
fi

# 4. Status of the whole run (all ranks), whatever the array's outcome.
"${SAFEPIPE[@]}" status "$CONFIG"
if (( rc != 0 )); then
  echo "some array tasks failed (sbatch exit ${rc}); find them with: sacct -X -n -j JOBID -o JobID,State,ExitCode | grep -v COMPLETED" >&2
  echo "then resubmit those indices (committed units are skipped):" >&2
  echo "  sbatch --array=I,J --export=ALL,SAFEPIPE_WORLD_SIZE=${WORLD_SIZE} $HERE/pipeline-array.sbatch $CONFIG" >&2
fi
exit "$rc"
