#!/usr/bin/env bash
# A real single-node Slurm on this machine, everything on loopback, for the slow test
# tests/launchers/test_slurm.py::test_a_smoke_job_on_a_real_single_node_slurm.
# Debian 12 (bookworm) packages, run as root, no systemd needed (started by hand).
#
#   sudo bash benchmarks/slurm_local.sh          # idempotent: rerun at will
#   sinfo; srun hostname; sbatch --wrap hostname # then check
#
# Stop with: scancel -u "$USER"; kill "$(cat /run/slurm/slurmd.pid)" "$(cat /run/slurm/slurmctld.pid)";
#            kill "$(cat /run/munge/munged.pid)"
set -euo pipefail

[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }
HOST=$(hostname -s)

# 1. Packages (slurm-wlm: slurmctld + slurmd + the client commands; munge: Slurm's auth).
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge
fi

# 2. The node's name must resolve to 127.0.0.1, so that nothing Slurm sends (srun's
#    I/O connections included) goes to any other interface.
if [ "$(getent ahostsv4 "$HOST" | awk 'NR == 1 {print $1}')" != "127.0.0.1" ]; then
    sed -i "1i 127.0.0.1 $HOST" /etc/hosts
fi

# 3. munge: the package made /etc/munge/munge.key; munged listens on a unix socket only.
install -d -o munge -g munge -m 0755 /run/munge
if ! pidof munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged
fi

# 4. slurm.conf. RealMemory: what `slurmd -C` reports, less 10 % and 1 GiB for the
#    rest of the machine.
mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
mem=$((mem * 9 / 10 - 1024))
cpus=$(nproc)
install -d -o slurm -g slurm -m 0755 /var/lib/slurm/slurmctld /var/log/slurm /run/slurm
install -d -m 0755 /var/lib/slurm/slurmd
conf=$(cat <<EOF
# Written by benchmarks/slurm_local.sh: one node, controller and node on 127.0.0.1.
ClusterName=areal-local
# The controller on this host, addressed by loopback.
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
# slurmd, srun (NoInAddrAny) and slurmctld (NoCtldInAddrAny) bind to the address their
# host name resolves to (127.0.0.1 here), not to every interface (INADDR_ANY, the default).
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AuthType=auth/munge
MpiDefault=none
# No cgroups (a VM that runs everything as root, without a systemd to delegate them):
# processes tracked through /proc, no task binding or confinement.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Jobs get CPUs (cores), not whole nodes; memory is not a consumable resource.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# No accounting (no slurmdbd): sacct has nothing; the launcher reads scontrol.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# A node that was DOWN (the daemons restarted) comes back on its own once it registers.
ReturnToService=2
SchedulerType=sched/backfill
NodeName=$HOST NodeAddr=127.0.0.1 NodeHostname=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
)
changed=0
if [ ! -f /etc/slurm/slurm.conf ] || [ "$(cat /etc/slurm/slurm.conf)" != "$conf" ]; then
    printf '%s\n' "$conf" > /etc/slurm/slurm.conf
    changed=1
fi

# 5. The daemons (no systemd here: started directly; they daemonize themselves). A
#    changed conf restarts them (some settings, the bind addresses, need a restart).
if [ "$changed" = 1 ] && pidof slurmctld >/dev/null; then
    scontrol shutdown
    for _ in $(seq 30); do pidof slurmctld slurmd >/dev/null || break; sleep 1; done
fi
if ! pidof slurmctld >/dev/null; then
    /usr/sbin/slurmctld
fi
if ! pidof slurmd >/dev/null; then
    /usr/sbin/slurmd
fi

for _ in $(seq 30); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
        sinfo
        exit 0
    fi
    sleep 1
done
echo "the node is not idle after 30 s:" >&2
sinfo >&2 || true
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2
exit 1
