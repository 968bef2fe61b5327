# shellcheck shell=bash
# Sourced (not run) by jobs/*.sbatch: launches "hpcnoise ARGS" once over the job's allocation, one rank
# per task (= one per GPU), with the launcher, CPU binding, container and Horovod/NCCL settings below.
#
# Variables (all optional; export them before `sbatch`, which passes the environment on):
#   HPCNOISE_CMD             the hpcnoise command, split on spaces      (default: hpcnoise, from PATH;
#                            e.g. /path/to/.venv/bin/hpcnoise or "python -m hpcnoise.cli")
#   HPCNOISE_LAUNCHER        srun | mpirun | horovodrun                  (default: srun)
#                            srun starts the ranks itself (PMIx); mpirun and horovodrun get a hostfile
#                            built from SLURM_JOB_NODELIST and SLURM_TASKS_PER_NODE (Open MPI syntax).
#   HPCNOISE_SRUN_MPI        srun's --mpi plugin; it must be one the MPI inside Horovod speaks
#                            (Open MPI 4/5: pmix)                        (default: pmix)
#   HPCNOISE_CPU_BIND        cores: pin each rank to its --cpus-per-task cores; none: no pinning
#                                                                        (default: cores)
#   HPCNOISE_LAUNCHER_ARGS   more words for the launcher, split on spaces (default: none;
#                            e.g. "--mca btl_tcp_if_include ib0" for mpirun)
#   HPCNOISE_CONTAINER       apptainer | singularity: run every rank in `$HPCNOISE_CONTAINER exec --nv IMAGE`
#                                                                        (default: unset, run on the host)
#   HPCNOISE_IMAGE           the image (.sif) for HPCNOISE_CONTAINER     (required with it)
#   HPCNOISE_CONTAINER_ARGS  more words for `exec`, split on spaces      (default: none; e.g. "--bind /scratch")
#   HPCNOISE_REQUEUE         1: when the ranks stop on SIGUSR1/SIGTERM after a checkpoint (exit status 75),
#                            requeue this job so that it resumes; 0: just exit 75   (default: 1)
# Horovod and NCCL, exported to every rank (the defaults are the libraries' own, written out here):
#   HOROVOD_FUSION_THRESHOLD bytes of Horovod's tensor-fusion buffer; hpcnoise reduces one flat buffer
#                            per step, so this rarely matters         (default: 134217728 = 128 MiB)
#   HOROVOD_CYCLE_TIME       ms Horovod's background thread waits between cycles     (default: 1)
#   NCCL_IB_DISABLE          1: NCCL does not use InfiniBand/RoCE, only TCP sockets  (default: 0)
#   NCCL_SOCKET_IFNAME       interface(s) for NCCL's sockets, e.g. ib0, eth0 or ^lo,docker
#                                                                        (default: unset, NCCL picks)
#   NCCL_DEBUG               WARN | INFO (INFO prints the transport NCCL chose)  (default: WARN)
#   OMP_NUM_THREADS          CPU threads per rank                       (default: SLURM_CPUS_PER_TASK, else 1)

: "${HOROVOD_FUSION_THRESHOLD:=134217728}"
: "${HOROVOD_CYCLE_TIME:=1}"
: "${NCCL_IB_DISABLE:=0}"
: "${NCCL_DEBUG:=WARN}"
: "${OMP_NUM_THREADS:=${SLURM_CPUS_PER_TASK:-1}}"
export HOROVOD_FUSION_THRESHOLD HOROVOD_CYCLE_TIME NCCL_IB_DISABLE NCCL_DEBUG OMP_NUM_THREADS
if [ -n "${NCCL_SOCKET_IFNAME:-}" ]; then export NCCL_SOCKET_IFNAME; fi

# The exit status with which hpcnoise stops after writing a checkpoint on SIGUSR1/SIGTERM (EX_TEMPFAIL).
HPCNOISE_EXIT_PREEMPTED=75

hpcnoise_die() {
  echo "hpcnoise job: error: $*" >&2
  exit 2
}

# One line per node of the allocation: the number of tasks on it (expands "2(x3),1" to 2 2 2 1).
hpcnoise_tasks_per_node() {
  local item count reps i
  local IFS=,
  for item in ${SLURM_TASKS_PER_NODE:?not inside a Slurm allocation}; do
    if [[ $item =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
      count=${BASH_REMATCH[1]} reps=${BASH_REMATCH[2]}
    else
      count=$item reps=1
    fi
    for ((i = 0; i < reps; i++)); do echo "$count"; done
  done
}

# Write an Open MPI / horovodrun hostfile ("host slots=N" per node) for this allocation to FILE.
hpcnoise_hostfile() {
  local file=$1
  paste -d' ' <(scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a Slurm allocation}") \
              <(hpcnoise_tasks_per_node | sed 's/^/slots=/') > "$file"
  if grep -q -v ' slots=[0-9]' "$file"; then
    hpcnoise_die "could not pair the nodes of $SLURM_JOB_NODELIST with SLURM_TASKS_PER_NODE=$SLURM_TASKS_PER_NODE"
  fi
}

# Run "hpcnoise ARGS..." under the chosen launcher on every task of the allocation, then exit with its
# status; a run stopped for preemption or the time limit (status 75) requeues the job (HPCNOISE_REQUEUE).
hpcnoise_launch() {
  local launcher=${HPCNOISE_LAUNCHER:-srun} bind=${HPCNOISE_CPU_BIND:-cores}
  local cpus=${SLURM_CPUS_PER_TASK:-1} ntasks=${SLURM_NTASKS:?not inside a Slurm allocation}
  local -a cmd container launch extra
  read -r -a cmd <<< "${HPCNOISE_CMD:-hpcnoise}"
  read -r -a extra <<< "${HPCNOISE_LAUNCHER_ARGS:-}"

  container=()
  case "${HPCNOISE_CONTAINER:-}" in
    "") ;;
    apptainer | singularity)
      [ -n "${HPCNOISE_IMAGE:-}" ] || hpcnoise_die "HPCNOISE_CONTAINER=$HPCNOISE_CONTAINER needs HPCNOISE_IMAGE (a .sif file)"
      local -a cargs
      read -r -a cargs <<< "${HPCNOISE_CONTAINER_ARGS:-}"
      container=("$HPCNOISE_CONTAINER" exec --nv ${cargs[@]+"${cargs[@]}"} "$HPCNOISE_IMAGE")
      ;;
    *) hpcnoise_die "HPCNOISE_CONTAINER must be apptainer or singularity, got '$HPCNOISE_CONTAINER'" ;;
  esac

  case "$bind" in
    cores | none) ;;
    *) hpcnoise_die "HPCNOISE_CPU_BIND must be cores or none, got '$bind'" ;;
  esac

  local hostfile=""
  case "$launcher" in
    srun)
      # srun (Slurm >= 22.05) does not inherit --cpus-per-task from sbatch: pass it on explicitly.
      launch=(srun "--mpi=${HPCNOISE_SRUN_MPI:-pmix}" "--ntasks=$ntasks" "--cpus-per-task=$cpus"
              "--cpu-bind=$bind" --kill-on-bad-exit=1)
      ;;
    mpirun | horovodrun)
      hostfile=$(mktemp "${TMPDIR:-/tmp}/hpcnoise-hosts.XXXXXX")
      # shellcheck disable=SC2064  # expand now: the trap must remove this very file
      trap "rm -f '$hostfile'" EXIT
      hpcnoise_hostfile "$hostfile"
      local -a binding=(--bind-to none)
      if [ "$bind" = cores ]; then binding=(--map-by "slot:PE=$cpus" --bind-to core); fi
      if [ "$launcher" = mpirun ]; then
        launch=(mpirun -np "$ntasks" --hostfile "$hostfile" "${binding[@]}")
        local var
        for var in HOROVOD_FUSION_THRESHOLD HOROVOD_CYCLE_TIME NCCL_IB_DISABLE NCCL_DEBUG NCCL_SOCKET_IFNAME \
                   OMP_NUM_THREADS PATH LD_LIBRARY_PATH PYTHONPATH HPCNOISE_DATA; do
          if [ -n "${!var:-}" ]; then launch+=(-x "$var"); fi
        done
      else
        launch=(horovodrun -np "$ntasks" --hostfile "$hostfile" "--binding-args=${binding[*]}")
      fi
      ;;
    *) hpcnoise_die "HPCNOISE_LAUNCHER must be srun, mpirun or horovodrun, got '$launcher'" ;;
  esac

  local -a full=("${launch[@]}" ${extra[@]+"${extra[@]}"} ${container[@]+"${container[@]}"} "${cmd[@]}" "$@")
  echo "hpcnoise job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}," \
       "$ntasks tasks: ${full[*]}"
  local rc=0
  "${full[@]}" || rc=$?
  if [ "$rc" = "$HPCNOISE_EXIT_PREEMPTED" ] && [ "${HPCNOISE_REQUEUE:-1}" = 1 ]; then
    echo "hpcnoise job: stopped after a checkpoint; requeueing job ${SLURM_JOB_ID} to resume"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit "$rc"
}
