#!/usr/bin/env bash
# A one-node SLURM cluster on this (Debian) machine, for the tests and for trying the SLURM launchers on a laptop.
#
#   bash launchers/slurm_cluster.sh start [--install]   # start munged, slurmctld, slurmd; wait until a job runs
#   bash launchers/slurm_cluster.sh status              # the daemons' pids and `sinfo`
#   bash launchers/slurm_cluster.sh stop                # stop the daemons (by their pid files)
#
# Needs root (the daemons, /etc/slurm, /etc/munge) and the Debian packages `slurm-wlm munge`; `--install` runs
# `apt-get update && apt-get install -y slurm-wlm munge` first, otherwise nothing is installed.
# The node is this host (`hostname -s`) reached over 127.0.0.1, in two partitions over the same node: `debug`
# (the default, low priority: its jobs are preempted and requeued) and `urgent` (high priority, never preempted).
# A job in `urgent` that needs CPUs held by `debug` jobs preempts them as a real cluster does: SLURM sends them
# SIGCONT+SIGTERM, gives them GraceTime (60 s) to save, then kills and requeues them (PreemptType=
# preempt/partition_prio, PreemptMode=REQUEUE; a job that exits by itself within GraceTime is not requeued by
# SLURM 22.05: prime_scale's TrainJob requeues itself). A running cluster whose configuration lacks that is
# restarted with it. The scheduler starts jobs as soon as an event allows (SchedulerParameters=batch_sched_delay=0);
# a running cluster that lacks only that is reconfigured in place (`scontrol reconfigure`), its jobs untouched.
# There is no accounting storage, so `sacct` fails (submitit logs "Bypassing sacct error").
# Environment: SLURM_CLUSTER_TIMEOUT (seconds to wait for the node and the test job, default 60).
#
# It runs the daemons directly rather than through systemd: containers and CI machines often have no systemd.
set -euo pipefail

PACKAGES="slurm-wlm munge"
TIMEOUT="${SLURM_CLUSTER_TIMEOUT:-60}"
PARTITION=debug
# High-priority partition over the same node: its jobs preempt (requeue) those of $PARTITION.
URGENT_PARTITION=urgent
# Seconds a preempted job has between SIGTERM and SIGKILL: room for a checkpoint save (see docs/launching.md).
GRACE_TIME=60
# The scheduler's settings (slurm.conf SchedulerParameters); `scontrol reconfigure` applies a change of them.
SCHED_PARAMS=batch_sched_delay=0
SLURM_CONF=/etc/slurm/slurm.conf
SLURM_LOG_DIR=/var/log/slurm
SLURMCTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_KEY=/etc/munge/munge.key
MUNGED_PID=/run/munge/munged.pid
MUNGED_LOG=/var/log/munge/munged.log
# The first line of a slurm.conf written here: another slurm.conf is kept as a backup before it is replaced.
CONF_MARKER="# Written by prime_scale launchers/slurm_cluster.sh (one-node test cluster)."

# The daemons live in /usr/sbin, which a non-login shell may lack on its PATH.
export PATH="$PATH:/usr/sbin:/sbin"

say() { echo "[slurm_cluster] $*"; }
die() { echo "[slurm_cluster] error: $*" >&2; exit 1; }

usage() {
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# ------------------------------------------------------------------------------------------------ helpers

# The pid in a pid file if that process is alive *and* is the expected program: a stale file may name a pid that
# has since been reused by an unrelated process, which must never be signalled.
live_pid() {  # live_pid PIDFILE COMM
  local pidfile=$1 comm=$2 pid
  [[ -r $pidfile ]] || return 1
  pid=$(tr -dc '0-9' <"$pidfile")
  [[ -n $pid && -r /proc/$pid/comm ]] || return 1
  [[ $(cat "/proc/$pid/comm") == "$comm" ]] || return 1
  echo "$pid"
}

# The node's state as SLURM reports it (idle, mixed, allocated, down*, drained, unknown, ...), or "" if unreachable.
node_state() {
  timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1 || true
}

munge_works() {
  timeout 10 munge -n 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1
}

check_installed() {
  local missing=() cmd
  for cmd in munged munge unmunge slurmctld slurmd sinfo sbatch srun scontrol; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
  done
  if ((${#missing[@]})); then
    die "missing ${missing[*]}: install the Debian packages with
    apt-get update && apt-get install -y $PACKAGES
or run: bash $0 start --install"
  fi
}

log_tails() {
  local f
  for f in "$SLURM_LOG_DIR/slurmctld.log" "$SLURM_LOG_DIR/slurmd.log" "$MUNGED_LOG"; do
    echo "----- last lines of $f" >&2
    tail -n 25 "$f" >&2 2>/dev/null || echo "(no such file)" >&2
  done
  echo "----- sinfo -R (reasons for down/drained nodes)" >&2
  timeout 10 sinfo -R >&2 2>/dev/null || echo "(sinfo failed)" >&2
}

stop_daemon() {  # stop_daemon NAME PIDFILE: SIGTERM, up to 10 s of grace, then SIGKILL
  local name=$1 pidfile=$2 pid i
  if ! pid=$(live_pid "$pidfile" "$name"); then
    rm -f "$pidfile"
    return 0
  fi
  say "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    [[ -d /proc/$pid ]] || break
    sleep 0.2
  done
  if [[ -d /proc/$pid ]]; then
    say "$name (pid $pid) ignored SIGTERM for 10 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

# A daemon that runs but is not the one in its pid file (a second slurmctld that failed on the busy port still
# overwrites the file; so do unserialized starts): record it, so that start restarts it and stop can stop it,
# instead of leaving it to hold the ports behind the back of the new daemons.
adopt_stray() {  # adopt_stray NAME PIDFILE
  local name=$1 pidfile=$2 pids i
  live_pid "$pidfile" "$name" >/dev/null && return 0
  # For a few seconds after a start, the daemon's forking parent shows up too: wait for it to go.
  for ((i = 0; i < 10; i++)); do
    pids=$(pgrep -x -u root "$name" || true)
    [[ $pids == *[!0-9]* ]] || break
    sleep 0.5
  done
  [[ -n $pids ]] || return 0
  [[ $pids != *[!0-9]* ]] || die "several $name processes run ($(echo $pids)) and none is in $pidfile; stop them"
  say "found $name (pid $pids) not recorded in $pidfile; restarting it"
  echo "$pids" >"$pidfile"
}

# ------------------------------------------------------------------------------------------------ munge

start_munge() {
  # munged refuses to run unless its folders belong to its user and are not writable by others.
  install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge /var/lib/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [[ ! -s $MUNGE_KEY ]]; then
    say "writing a new munge key: $MUNGE_KEY"
    (umask 077 && dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none)
  fi
  chown munge:munge "$MUNGE_KEY"
  chmod 0400 "$MUNGE_KEY"

  if munge_works; then
    return 0  # already running (ours, or a system service): leave it
  fi
  # Stale pid/socket files left by a killed munged make a new one refuse to start; --force removes the socket.
  if live_pid "$MUNGED_PID" munged >/dev/null; then
    die "munged runs (pid $(cat "$MUNGED_PID")) but 'munge -n | unmunge' fails; see $MUNGED_LOG"
  fi
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged --force 9>&-
  local i
  for ((i = 0; i < 50; i++)); do
    munge_works && return 0
    sleep 0.2
  done
  tail -n 20 "$MUNGED_LOG" >&2 2>/dev/null || true
  die "munged started but 'munge -n | unmunge' still fails after 10 s"
}

# ------------------------------------------------------------------------------------------------ slurm.conf

# The machine's CPUs: nproc also honours OMP_NUM_THREADS (the tests run with OMP_NUM_THREADS=1), which would make a
# one-CPU node on which no 2-task job ever starts (Reason=PartitionConfig).
machine_cpus() {
  env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc
}

write_slurm_conf() {
  local cpus mem_kb mem_mb tmp
  cpus=$(machine_cpus)
  mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
  # slurmd drains a node that has less memory than its RealMemory says; 90% leaves room for rounding and for
  # what the kernel reserves, so the node always registers.
  mem_mb=$((mem_kb / 1024 * 9 / 10))

  tmp=$(mktemp)
  cat >"$tmp" <<EOF
$CONF_MARKER
# Host $NODE, $cpus CPUs (nproc without OMP_NUM_THREADS), RealMemory ${mem_mb} MB (90% of MemTotal). Regenerated by each start.
ClusterName=localcluster
# Loopback addresses: the node talks only to itself and needs no DNS entry for its name.
SlurmctldHost=$NODE(127.0.0.1)
AuthType=auth/munge
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
# No cgroups: containers (and WSL, many laptops) cannot delegate them. linuxproc tracks jobs by process tree.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
# No mail on a test cluster (quiets "Configured MailProg is invalid").
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
# Schedule at each event that may let a job start (a submission, a job's end, a job made eligible by
# scontrol update) instead of batching such events for up to batch_sched_delay seconds (default 3): on a default
# configuration every round of a job array and every restart of a requeued job waits up to 3 s for nothing.
SchedulerParameters=$SCHED_PARAMS
# Cores are the consumable resource; memory is checked against RealMemory but not reserved, so a few small
# tasks that each ask for several GB still run side by side.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# A node that went down (e.g. the daemons were killed) comes back as soon as its slurmd registers again.
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$SLURMCTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$SLURM_LOG_DIR/slurmctld.log
SlurmdLogFile=$SLURM_LOG_DIR/slurmd.log
# Preemption as on a shared cluster: a job in a partition of higher PriorityTier that needs the resources of
# running jobs in a lower one preempts them: SIGCONT+SIGTERM to their tasks, GraceTime seconds to save, then
# SIGCONT+SIGTERM, KillWait, SIGKILL and a requeue (same job id, SLURM_RESTART_COUNT + 1) of a job still running.
# JobRequeue=1: batch jobs may be requeued (also what submitit needs for its scontrol requeue after SIGUSR2).
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
JobRequeue=1
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME
PartitionName=$URGENT_PARTITION Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
  install -d -m 0755 /etc/slurm
  if [[ -e $SLURM_CONF ]] && ! head -n1 "$SLURM_CONF" | grep -qF "$CONF_MARKER"; then
    local backup
    backup="$SLURM_CONF.bak.$(date +%Y%m%d-%H%M%S)"
    say "keeping the existing $SLURM_CONF (not written by this script) as $backup"
    cp -p "$SLURM_CONF" "$backup"
  fi
  install -m 0644 "$tmp" "$SLURM_CONF"
  rm -f "$tmp"
}

# ------------------------------------------------------------------------------------------------ commands

# Whether the running slurmctld has the configuration this script writes: preemption by partition priority with
# requeue, both partitions with their tiers and grace time, and the scheduler's parameters. A cluster started from
# an older slurm.conf (one partition, no preemption) lacks it and is restarted from a fresh one. Sets
# CONFIG_MISSING to what is missing (one item each) and prints it.
CONFIG_MISSING=()
config_current() {
  local config part want line sched
  CONFIG_MISSING=()
  config=$(timeout 10 scontrol show config 2>/dev/null) || {
    CONFIG_MISSING=("scontrol show config failed")
    echo "${CONFIG_MISSING[*]}"
    return 1
  }
  for want in "PreemptType=preempt/partition_prio" "PreemptMode=REQUEUE" "JobRequeue=1"; do
    # `scontrol show config` prints `Key                     = value`
    line=$(grep -E "^${want%%=*} +=" <<<"$config" | head -n1 | tr -d ' ')
    [[ $line == "$want" ]] || CONFIG_MISSING+=("$want (running: ${line:-none})")
  done
  # SchedulerParameters as written ("(null)" when unset)
  sched=$(grep -E "^SchedulerParameters +=" <<<"$config" | head -n1 | sed 's/^[^=]*= *//' | tr -d ' ')
  [[ $sched == "$SCHED_PARAMS" ]] || CONFIG_MISSING+=("SchedulerParameters=$SCHED_PARAMS (running: ${sched:-none})")
  part=$(timeout 10 scontrol show partition "$PARTITION" 2>/dev/null | tr -s ' \n' '\n\n' || true)
  for want in Default=YES PriorityTier=1 PreemptMode=REQUEUE "GraceTime=$GRACE_TIME"; do
    grep -qx -- "$want" <<<"$part" || CONFIG_MISSING+=("$PARTITION: $want")
  done
  part=$(timeout 10 scontrol show partition "$URGENT_PARTITION" 2>/dev/null | tr -s ' \n' '\n\n' || true)
  for want in PriorityTier=10 PreemptMode=OFF; do
    grep -qx -- "$want" <<<"$part" || CONFIG_MISSING+=("$URGENT_PARTITION: $want")
  done
  line=$(timeout 10 scontrol show node "$NODE" 2>/dev/null | grep -o 'CPUTot=[0-9]*' | head -n1 || true)
  [[ $line == "CPUTot=$(machine_cpus)" ]] ||
    CONFIG_MISSING+=("node $NODE: CPUTot=$(machine_cpus) (running: ${line:-none})")
  ((${#CONFIG_MISSING[@]} == 0)) && return 0
  echo "${CONFIG_MISSING[*]}"
  return 1
}

daemons_up() {  # munged, slurmctld and slurmd run (ours, by their pid files)
  live_pid "$SLURMCTLD_PID" slurmctld >/dev/null && live_pid "$SLURMD_PID" slurmd >/dev/null && munge_works
}

# The daemons run with this script's configuration and the node accepts jobs. When the configuration is not
# current, CONFIG_MISSING says what differs (empty when the daemons are not even up).
cluster_ready() {
  CONFIG_MISSING=()
  daemons_up || return 1
  config_current >/dev/null || return 1
  # A node running earlier jobs is mixed/allocated: still a working cluster, so `start` leaves it alone.
  case "$(node_state)" in
    idle | mixed | allocated | completing) return 0 ;;
    *) return 1 ;;
  esac
}

# A running cluster that differs only in what `scontrol reconfigure` applies (SchedulerParameters): write the
# slurm.conf and have the running daemons re-read it. Jobs, queued or running (other test sessions' too), are not
# touched, as they would be by a restart. Fails (and start restarts the daemons) if anything else differs or the
# change does not take.
reconfigure_in_place() {
  local item i
  ((${#CONFIG_MISSING[@]})) || return 1
  for item in "${CONFIG_MISSING[@]}"; do
    [[ $item == SchedulerParameters=* ]] || return 1
  done
  daemons_up || return 1
  say "the running cluster lacks ${CONFIG_MISSING[*]}: reconfiguring it in place (scontrol reconfigure)"
  write_slurm_conf
  timeout 30 scontrol reconfigure >/dev/null 2>&1 || { say "scontrol reconfigure failed"; return 1; }
  for ((i = 0; i < 50; i++)); do
    config_current >/dev/null && break
    sleep 0.2
  done
  config_current >/dev/null || { say "the reconfigured cluster still lacks ${CONFIG_MISSING[*]}"; return 1; }
  wait_node_up "$TIMEOUT" || return 1
  say "reconfigured: node $NODE $(node_state) in partitions $PARTITION and $URGENT_PARTITION ($SCHED_PARAMS)"
}

wait_node_up() {  # up to $1 seconds
  local deadline=$((SECONDS + $1)) state resumed=0
  while ((SECONDS < deadline)); do
    state=$(node_state)
    case "$state" in
      # Usually idle; mixed/allocated when jobs recovered from StateSaveLocation (or just submitted) run on it.
      idle | mixed | allocated | completing) return 0 ;;
      drain* | down*)
        # A node marked down/drained by an earlier run (e.g. state recovered from StateSaveLocation): resume it
        # once; if it falls back, the reason shows in `sinfo -R` below.
        if ((!resumed)) && live_pid "$SLURMD_PID" slurmd >/dev/null; then
          timeout 10 scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
          resumed=1
        fi
        ;;
    esac
    sleep 1
  done
  echo "[slurm_cluster] node $NODE is '${state:-unreachable}', not idle, after $1 s" >&2
  return 1
}

cmd_start() {
  local install=0 arg
  for arg in "$@"; do
    case "$arg" in
      --install) install=1 ;;
      *) echo "[slurm_cluster] unknown argument: $arg" >&2; usage ;;
    esac
  done
  ((EUID == 0)) || die "start needs root (it writes /etc/slurm and /etc/munge and runs the daemons)"
  if ((install)); then
    say "installing $PACKAGES"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y $PACKAGES
  fi
  check_installed

  NODE=$(hostname -s)
  if cluster_ready; then
    say "already running: node $NODE is $(node_state) in partitions $PARTITION and $URGENT_PARTITION"
    return 0
  fi
  if reconfigure_in_place; then
    return 0
  fi
  if ((${#CONFIG_MISSING[@]})); then
    say "the running cluster lacks this script's configuration (${CONFIG_MISSING[*]}): restarting it with a fresh" \
      "slurm.conf"
  fi

  start_munge
  # Half-started or wedged slurm daemons (e.g. the node is down): restart both from a fresh config.
  adopt_stray slurmd "$SLURMD_PID"
  adopt_stray slurmctld "$SLURMCTLD_PID"
  stop_daemon slurmd "$SLURMD_PID"
  stop_daemon slurmctld "$SLURMCTLD_PID"
  write_slurm_conf
  install -d -m 0755 /var/spool/slurmctld /var/spool/slurmd "$SLURM_LOG_DIR"

  local started=$SECONDS
  say "starting slurmctld and slurmd on $NODE"
  # Both fork into the background and write their pid files; their errors go to the log files.
  # (9>&-: the daemons must not inherit the lock's file descriptor, or they would hold the lock for good.)
  slurmctld 9>&- || { log_tails; die "slurmctld did not start"; }
  slurmd 9>&- || { log_tails; stop_daemon slurmctld "$SLURMCTLD_PID"; die "slurmd did not start"; }

  # Bounded wait: first for the node to register and come up, then for a real job to run through srun.
  # (slurmd and slurmctld log mpi/pmix errors at start: the PMIx library is not installed; harmless here.)
  local left out
  if wait_node_up "$TIMEOUT"; then
    left=$((TIMEOUT - (SECONDS - started)))
    ((left > 10)) || left=10
    if out=$(timeout "$left" srun -p "$PARTITION" -N1 -n1 -t 1 -J slurm_cluster_check echo slurm-ok 2>&1) \
      && [[ $out == *slurm-ok* ]]; then
      # The daemons took the configuration: a slurmctld that ignored a line of it would be restarted by every start.
      if ! out=$(config_current); then
        log_tails
        stop_daemon slurmd "$SLURMD_PID"
        stop_daemon slurmctld "$SLURMCTLD_PID"
        die "slurmctld runs but not with the preemption configuration of $SLURM_CONF: $out"
      fi
      say "ready in $((SECONDS - started)) s: node $NODE ($(machine_cpus) CPUs) $(node_state) in partitions $PARTITION" \
        "(default, preempted with GraceTime=$GRACE_TIME s) and $URGENT_PARTITION (preempts it)"
      return 0
    fi
    echo "[slurm_cluster] the test job (srun echo) failed or timed out after $left s:" >&2
    echo "$out" >&2
  fi
  log_tails
  # Leave nothing half-working behind: the next start begins from stopped daemons.
  stop_daemon slurmd "$SLURMD_PID"
  stop_daemon slurmctld "$SLURMCTLD_PID"
  die "the cluster did not become ready within ${TIMEOUT} s (logs above)"
}

cmd_stop() {
  ((EUID == 0)) || die "stop needs root"
  # Running job steps (slurmstepd) survive their slurmd; a later start recovers them from StateSaveLocation.
  stop_daemon slurmd "$SLURMD_PID"
  stop_daemon slurmctld "$SLURMCTLD_PID"
  stop_daemon munged "$MUNGED_PID"
  say "stopped"
}

cmd_status() {
  local name pidfile pid ok=0
  NODE=$(hostname -s)
  for name in munged slurmctld slurmd; do
    case $name in
      munged) pidfile=$MUNGED_PID ;;
      slurmctld) pidfile=$SLURMCTLD_PID ;;
      slurmd) pidfile=$SLURMD_PID ;;
    esac
    if pid=$(live_pid "$pidfile" "$name"); then
      echo "$name: running (pid $pid)"
    else
      echo "$name: not running"
      ok=1
    fi
  done
  command -v sinfo >/dev/null 2>&1 || die "sinfo not found; install with: apt-get install -y $PACKAGES"
  timeout 10 sinfo || ok=1
  return $ok
}

# Two test sessions may start the cluster at the same moment: one start at a time, the second then finds
# the cluster ready. The lock is released when this script exits.
take_lock() {
  exec 9>/run/slurm_cluster.lock  # the daemons are started with 9>&- so that they do not inherit it
  flock -w 120 9 || die "another slurm_cluster.sh start has held /run/slurm_cluster.lock for 120 s"
}

case "${1:-}" in
  start) shift; ((EUID != 0)) || take_lock; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) usage ;;
esac
