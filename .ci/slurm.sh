#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the CI test (workflow_tests/test_slurm.py) and
# for anyone who wants to try profiles/slurm-ci before going to a real cluster.
#
#   .ci/slurm.sh up   <workdir>   install the packages if missing, start munged, slurmctld and
#                                 slurmd, wait until the node is idle
#   .ci/slurm.sh down <workdir>   cancel all jobs, stop the daemons this script started (by PID)
#
# Requirements: root, Debian/Ubuntu (apt-get + dpkg; only used when a package is missing:
# slurmctld slurmd slurm-client munge, SLURM 22.05 on Debian 12), nothing listening on
# 127.0.0.1:6817/6818. No systemd and no cgroups are needed: the daemons run as plain background
# processes (setsid, all fds redirected so they never hold a CI pipe open); their PIDs are kept
# in <workdir>/{munged,slurmctld,slurmd}.pid and `down` stops exactly those PIDs (checked
# against /proc/PID/comm, so a reused PID is never hit), never anything by name. A munged that
# was already running and healthy is used but left alone by `down`. `up` calls `down` first, so
# it can be repeated; use a fixed <workdir> (a cluster started from another workdir makes `up`
# refuse: its ports are taken). Logs: <workdir>/log/.
#
# What the cluster is: partition `debug` (default) with one node, named after `hostname -s`,
# whose CPUs/sockets/cores come from `slurmd -C` (at least 4 CPUs are advertised, see
# write_conf; memory: 85 % of what it detects);
# ProctrackType=proctrack/linuxproc and TaskPlugin=task/none (no cgroups in containers);
# SelectType=select/cons_tres with CR_CPU_Memory (several jobs share the node); one fake GPU:
# GresTypes=gpu, Gres=gpu:1 on the node and gres.conf `Name=gpu File=/dev/null`, so jobs that ask
# for `--gpus=1` / `--gres=gpu:1` are accepted and scheduled one at a time, exactly as the GPU
# rules are routed on a real cluster (the job sees CUDA_VISIBLE_DEVICES=0; there is no GPU).
#
# Why these settings (each one was needed; see profiles/slurm-ci/config.yaml):
# - No accounting (accounting_storage/none: no slurmdbd, no database) so `sacct` cannot
#   answer. snakemake-executor-plugin-slurm polls with sacct by default and, when sacct fails,
#   loses track of the job and waits forever. The CI profile therefore sets
#   `slurm-status-command: squeue`. squeue only sees finished jobs for MinJobAge seconds, and the
#   plugin keeps squeue only while MinJobAge >= 3 x slurm-init-seconds-before-status-checks
#   (it reads MinJobAge from `scontrol show config`), hence MinJobAge=300 here.
# - The config must be found at the default path: /etc/slurm/slurm.conf and
#   /etc/slurm/gres.conf are symlinks to <workdir>/slurm.conf and <workdir>/gres.conf (created by
#   `up`, removed by `down`; `up` refuses to replace a file it did not create). Exporting
#   SLURM_CONF is not enough: inside each job the plugin's jobstep part
#   (snakemake-executor-plugin-slurm-jobstep 0.6.1) removes every SLURM_* variable but the job
#   ids before it calls `srun`, and srun then fails with "Could not establish a configuration
#   source". With the symlinks, callers need no environment variable at all.
# - DefMemPerCPU=1024: an sbatch without --mem would otherwise take the whole node's memory and
#   serialise the queue (Snakemake always passes --mem; hand-submitted jobs may not).
# - The state directory is wiped on every `up`: a stale DRAIN/INVAL node state survives restarts.
#
# Besides <workdir>, `up` writes /etc/munge/munge.key (created if missing), /run/munge,
# /var/{lib,log}/munge, the two /etc/slurm symlinks, and installs the packages. apt runs with a
# temporary /usr/sbin/policy-rc.d (exit 101) so the packages' own services are not started.
set -euo pipefail

PKGS=(slurmctld slurmd slurm-client munge)
T=5   # timeout for client calls (seconds)

die() {
    echo "slurm.sh: ERROR: $*" >&2
    show_logs >&2 || true
    exit 1
}

log() { echo "slurm.sh: $*" >&2; }

show_logs() {
    [[ -n "${W:-}" ]] || return 0
    local f
    for f in "$W/log/slurmctld.log" "$W/log/slurmd.log" "$W/log/slurmctld.out" "$W/log/slurmd.out" /var/log/munge/munged.log; do
        [[ -s "$f" ]] || continue
        echo "----- tail $f -----"
        tail -n 25 "$f"
    done
}

# --- PID helpers -----------------------------------------------------------
# alive PID: process exists and is not a zombie
alive() {
    local pid=$1 st
    [[ -n "$pid" && -r /proc/$pid/stat ]] || return 1
    st=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ "$st" != Z && "$st" != X ]]
}

# is PID alive and running the expected program name?
is_ours() {
    local pid=$1 name=$2
    alive "$pid" || return 1
    [[ "$(cat /proc/$pid/comm 2>/dev/null)" == "$name" ]]
}

# stop_pidfile <pidfile> <comm-name>: SIGTERM, wait up to 15 s, then SIGKILL
stop_pidfile() {
    local pf=$1 name=$2 pid i
    [[ -f "$pf" ]] || return 0
    pid=$(cat "$pf" 2>/dev/null || true)
    if is_ours "$pid" "$name"; then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do
            alive "$pid" || break
            sleep 0.1
        done
        if alive "$pid"; then
            log "$name (pid $pid) ignored SIGTERM, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do alive "$pid" || break; sleep 0.1; done
        fi
        alive "$pid" && log "WARNING: $name (pid $pid) still alive"
    fi
    rm -f "$pf"
}

# --- install ---------------------------------------------------------------
install_pkgs() {
    local missing=() p
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && { log "packages already installed"; return 0; }
    log "installing ${missing[*]}"
    local prc=/usr/sbin/policy-rc.d had_prc=0
    [[ -e $prc ]] && had_prc=1
    if [[ $had_prc == 0 ]]; then
        printf '#!/bin/sh\nexit 101\n' > $prc
        chmod 755 $prc
    fi
    local rc=0
    {
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq &&
            apt-get install -y -qq --no-install-recommends "${missing[@]}"
    } >"$W/log/apt.log" 2>&1 || rc=$?
    [[ $had_prc == 0 ]] && rm -f $prc
    if [[ $rc != 0 ]]; then
        tail -n 30 "$W/log/apt.log" >&2
        die "apt-get failed (rc=$rc), see $W/log/apt.log"
    fi
}

# --- munge -----------------------------------------------------------------
start_munge() {
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/log/munge /etc/munge
    install -d -o munge -g munge -m 711 /var/lib/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1 ||
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key

    if timeout $T bash -c 'munge -n | unmunge' >/dev/null 2>&1; then
        log "munged already running and healthy (not started by us, will not stop it)"
        return 0
    fi
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged --force >"$W/log/munged.out" 2>&1 ||
        die "munged failed to start: $(cat "$W/log/munged.out")"
    local i pid=""
    for ((i = 0; i < 50; i++)); do
        pid=$(cat /run/munge/munged.pid 2>/dev/null || true)
        [[ -n "$pid" ]] && timeout $T bash -c 'munge -n | unmunge' >/dev/null 2>&1 && break
        sleep 0.1
    done
    is_ours "$pid" munged || die "munged not running"
    timeout $T bash -c 'munge -n | unmunge' >/dev/null 2>&1 || die "munge health check failed"
    echo "$pid" >"$W/munged.pid"
    log "munged up (pid $pid)"
}

# --- config ----------------------------------------------------------------
write_conf() {
    local line node cpus sockets cores threads mem
    line=$(slurmd -C | head -n1) || die "slurmd -C failed"
    node=$(hostname -s)
    get() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$line"; }
    cpus=$(get CPUs); sockets=$(get SocketsPerBoard); cores=$(get CoresPerSocket)
    threads=$(get ThreadsPerCore); mem=$(get RealMemory)
    [[ -n "$cpus" && -n "$mem" ]] || die "cannot parse slurmd -C: $line"
    mem=$((mem * 85 / 100))
    # Advertise at least 4 CPUs (SlurmdParameters=config_overrides lets slurmd accept more than it
    # detects): a test job is mostly two Python start-ups, so 4 of them on 2 real CPUs finish sooner
    # than 2 at a time, and profiles/slurm-ci's `jobs: 4` is then really 4 at once.
    if ((cpus < 4)); then cpus=4 sockets=1 cores=4 threads=1; fi
    cat >"$W/slurm.conf" <<EOF
# generated by slurm.sh -- one-node CI cluster
ClusterName=ci
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# jobs without --mem would otherwise get the whole node and serialise everything
DefMemPerCPU=1024
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=300
SchedulerType=sched/backfill
# a job waiting for the GPU blocks the jobs behind it in the main scheduler; only backfill starts
# them, every bf_interval seconds (default 30): check every second
SchedulerParameters=bf_interval=1
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
GresTypes=gpu
StateSaveLocation=$W/state
SlurmdSpoolDir=$W/spool
SlurmctldPidFile=$W/run/slurmctld.pid
SlurmdPidFile=$W/run/slurmd.pid
SlurmctldLogFile=$W/log/slurmctld.log
SlurmdLogFile=$W/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    # fake GPU: without File= the node goes INVAL
    echo "NodeName=$node Name=gpu File=/dev/null" >"$W/gres.conf"
    NODE=$node
    link_etc
}

# /etc/slurm/{slurm,gres}.conf -> $W/... (see header for why)
link_etc() {
    local f tgt
    mkdir -p /etc/slurm
    for f in slurm.conf gres.conf; do
        if [[ -e /etc/slurm/$f || -L /etc/slurm/$f ]]; then
            tgt=$(readlink /etc/slurm/$f || true)
            # ours (any slurm.sh workdir, marked by .slurm-sh-workdir) or dangling: replace
            [[ -L /etc/slurm/$f && ( ! -e "$tgt" || -f "$(dirname "$tgt")/.slurm-sh-workdir" ) ]] ||
                die "/etc/slurm/$f exists and is not managed by slurm.sh; remove it or move it away"
        fi
        ln -sfn "$W/$f" /etc/slurm/$f
    done
    touch "$W/.slurm-sh-workdir"
}

unlink_etc() {
    local f
    for f in slurm.conf gres.conf; do
        [[ -L /etc/slurm/$f && "$(readlink /etc/slurm/$f)" == "$W/$f" ]] && rm -f /etc/slurm/$f
    done
    return 0
}

# --- up / down -------------------------------------------------------------
cmd_up() {
    local t0=$SECONDS i st
    mkdir -p "$W/log"
    # idempotency: stop anything a previous 'up' on this workdir left behind
    cmd_down_quiet
    # anything still listening on the SLURM ports is not ours: refuse before touching anything
    local port
    for port in 6817 6818; do
        if timeout 2 bash -c "</dev/tcp/127.0.0.1/$port" 2>/dev/null; then
            echo "slurm.sh: ERROR: port $port is in use: another SLURM cluster is running (not started for $W); run 'slurm.sh down <its workdir>' first" >&2
            exit 1
        fi
    done
    install_pkgs
    rm -rf "$W/state" "$W/spool" "$W/run"   # stale DRAIN/INVAL state survives restarts
    mkdir -p "$W/state" "$W/spool" "$W/run" "$W/log"
    rm -f "$W"/log/slurm*.log "$W"/log/slurm*.out
    start_munge
    write_conf
    export SLURM_CONF="$W/slurm.conf"

    # slurmctld in foreground (-D) as our own background process; setsid so it
    # leaves our session; all fds redirected so CI pipes are not held open.
    setsid /usr/sbin/slurmctld -D -i -f "$SLURM_CONF" </dev/null >"$W/log/slurmctld.out" 2>&1 &
    echo $! >"$W/slurmctld.pid"
    for ((i = 0; i < 100; i++)); do
        alive "$(cat "$W/slurmctld.pid")" || die "slurmctld exited"
        timeout $T scontrol ping 2>/dev/null | grep -q 'is UP' && break
        sleep 0.2
    done
    timeout $T scontrol ping 2>/dev/null | grep -q 'is UP' || die "slurmctld did not come up"
    sleep 0.3   # a second controller that lost the port race dies right after start
    alive "$(cat "$W/slurmctld.pid")" || die "slurmctld exited"
    log "slurmctld up (pid $(cat "$W/slurmctld.pid"))"

    setsid /usr/sbin/slurmd -D -N "$NODE" -f "$SLURM_CONF" </dev/null >"$W/log/slurmd.out" 2>&1 &
    echo $! >"$W/slurmd.pid"
    local resumed=0
    for ((i = 0; i < 150; i++)); do
        alive "$(cat "$W/slurmd.pid")" || die "slurmd exited"
        st=$(timeout $T sinfo -h -N -n "$NODE" -o %T 2>/dev/null || true)
        case "$st" in
            idle) break ;;
            down* | drain* | inval*)
                if [[ $resumed == 0 ]]; then
                    log "node state '$st', resuming"
                    timeout $T scontrol update nodename="$NODE" state=resume || true
                    resumed=1
                fi ;;
        esac
        sleep 0.2
    done
    [[ "$st" == idle ]] || die "node $NODE not idle (state '$st')"
    alive "$(cat "$W/slurmd.pid")" || die "slurmd exited"
    alive "$(cat "$W/slurmctld.pid")" || die "slurmctld exited"
    timeout $T sinfo -h -N -o '%N %T %c %m %G' >&2
    log "slurmd up (pid $(cat "$W/slurmd.pid")), node $NODE idle after $((SECONDS - t0)) s"
}

cmd_down_quiet() {
    local pf
    export SLURM_CONF="$W/slurm.conf"
    if [[ -f "$W/slurmctld.pid" ]] && is_ours "$(cat "$W/slurmctld.pid")" slurmctld; then
        timeout $T scancel -u root 2>/dev/null || true
        # give slurmd a moment to kill job processes
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            [[ -z "$(timeout $T squeue -h -t R,CG,PD 2>/dev/null)" ]] && break
            sleep 0.5
        done
    fi
    stop_pidfile "$W/slurmd.pid" slurmd
    stop_pidfile "$W/slurmctld.pid" slurmctld
    stop_pidfile "$W/munged.pid" munged
    unlink_etc
    # slurmstepd leftovers of cancelled jobs, children of our slurmd, die with it;
    # report (never kill blindly) anything left
    for pf in $(pgrep -x slurmstepd || true); do
        alive "$pf" && log "WARNING: slurmstepd still running: pid $pf"
    done
    return 0
}

cmd_down() {
    [[ -d "$W" ]] || { log "no workdir $W, nothing to stop"; return 0; }
    cmd_down_quiet
    log "down"
}

usage() { echo "usage: $0 up|down <workdir>" >&2; exit 2; }

[[ $# -eq 2 ]] || usage
[[ $EUID -eq 0 ]] || { echo "slurm.sh: must run as root" >&2; exit 1; }
[[ $1 == up ]] && mkdir -p "$2"
if [[ -d "$2" ]]; then W=$(cd "$2" && pwd); else W=$2; fi
case "$1" in
    up) cmd_up ;;
    down) cmd_down ;;
    *) usage ;;
esac
