#!/usr/bin/env bash
# A one-node Slurm cluster on this machine for the tests, then a command run against it:
#
#   scripts/slurm_local.sh COMMAND [ARGS...]
#
# Installs Slurm and munge from Debian's packages if they are missing, writes a slurm.conf for
# this host into a temporary directory, starts munged, slurmctld and slurmd, waits for the node
# to be idle, runs COMMAND with SLURM_CONF pointing at the cluster, and stops every daemon it
# started whatever happens (exit, error, Ctrl-C). Exit status: COMMAND's.
#
# Needs root (the daemons run as root here, and installing needs apt), or sudo. The cluster has
# one partition `local` whose node claims SAFEPIPE_SLURM_CPUS CPUs (default 8, more than this
# machine may have, so array tasks run side by side) and uses ports 16817/16818.
set -euo pipefail

(( $# >= 1 )) || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }

SUDO=()
if (( EUID != 0 )); then
  command -v sudo >/dev/null || { echo "slurm_local: needs root or sudo to install and run Slurm" >&2; exit 2; }
  SUDO=(sudo -E)
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  echo "slurm_local: installing slurm-wlm and munge from Debian's packages"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null \
    || { "${SUDO[@]}" apt-get update -q >/dev/null && \
         "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null; }
fi

DIR=$(mktemp -d "${TMPDIR:-/tmp}/safepipe-slurm.XXXXXX")
STARTED_MUNGE=""
stop() {
  local rc=$?
  for pid in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
    [[ -f "$pid" ]] && "${SUDO[@]}" kill "$(cat "$pid")" 2>/dev/null || true
  done
  [[ -n "$STARTED_MUNGE" ]] && "${SUDO[@]}" pkill -x munged 2>/dev/null || true
  sleep 1
  if (( rc != 0 )); then
    echo "slurm_local: exit $rc; the daemons' logs:" >&2
    tail -n 30 "$DIR"/log/*.log >&2 2>/dev/null || true
  fi
  "${SUDO[@]}" rm -rf "$DIR"
  exit "$rc"
}
trap stop EXIT
trap 'exit 130' INT TERM

# munge: the key and socket where Slurm's clients look for them.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  "${SUDO[@]}" mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    "${SUDO[@]}" dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  "${SUDO[@]}" chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  "${SUDO[@]}" chmod 400 /etc/munge/munge.key
  "${SUDO[@]}" su -s /bin/sh munge -c munged 2>/dev/null || "${SUDO[@]}" munged --force
  STARTED_MUNGE=1
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

HOST=$(hostname -s)
CPUS=${SAFEPIPE_SLURM_CPUS:-8}
MEM=$(awk '/MemTotal/ {print int($2 / 1024) - 1024}' /proc/meminfo)
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
cat > "$DIR/slurm.conf" <<EOF
ClusterName=safepipe-test
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$DIR/slurm.conf"
"${SUDO[@]}" env SLURM_CONF="$SLURM_CONF" slurmctld
"${SUDO[@]}" env SLURM_CONF="$SLURM_CONF" slurmd
for _ in $(seq 100); do
  [[ "$(sinfo -h -o %t 2>/dev/null)" == idle ]] && break
  sleep 0.2
done
[[ "$(sinfo -h -o %t 2>/dev/null)" == idle ]] || { echo "slurm_local: the node did not become idle" >&2; exit 1; }
echo "slurm_local: one-node cluster up (SLURM_CONF=$SLURM_CONF, $CPUS CPUs)"

"$@"
