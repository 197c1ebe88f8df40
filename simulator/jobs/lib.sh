# bbr-sim shared helpers, installed on the VM as /var/vcap/packages/bbr-sim/lib.sh.
#
# Sourced by every bbr script of every simulated VM, the director's and a deployment's
# alike. The caller sets ROOT to the VM root it derived from its own path (empty or "/"
# on a real VM), so nothing here depends on the environment bbrx passes: the same tree
# works under a simulator root and when bind-mounted on a real /var/vcap.

SIM_ROOT="${ROOT%/}"
# Parameter expansion, not basename/dirname: every fork costs, and a deployment runs
# hundreds of these scripts at once. $0 is .../jobs/JOB/bin/bbr/SCRIPT.
case "$0" in
  */*/*/*/*)
    SIM_SCRIPT="${0##*/}"
    SIM_JOB="${0%/*/*/*}"
    SIM_JOB="${SIM_JOB##*/}"
    ;;
  *)
    SIM_SCRIPT="$(basename -- "$0")"
    SIM_JOB="$(basename -- "$(dirname -- "$(dirname -- "$(dirname -- "$0")")")")"
    ;;
esac
SIM_VCAP="$SIM_ROOT/var/vcap"
SIM_STORE="$SIM_VCAP/store"
SIM_RUN_DIR="$SIM_VCAP/sys/run/bbr-sim"
SIM_LOCK_FILE="$SIM_RUN_DIR/locks/$SIM_JOB"
SIM_CALL_LOG="$SIM_VCAP/sys/log/bbr-sim/calls.log"
SIM_CONFIG_DIR="$SIM_VCAP/jobs/$SIM_JOB/config"

# One printf per line so concurrent scripts appending to the log never interleave.
sim_log_event() {
  local event="$1" extra="$2" line
  local now="${EPOCHREALTIME:-}"
  # bash's own clock (5.0 and later; a locale may spell its decimal point ','), else date.
  now="${now/,/.}"
  [[ -n $now ]] || now="$(date +%s.%N)"
  printf -v line '%s\t%s\t%s\t%s\t%s\t%s\n' \
    "$now" "$SIM_JOB" "$SIM_SCRIPT" "$event" "$$" "$extra"
  [[ -d ${SIM_CALL_LOG%/*} ]] || mkdir -p -- "${SIM_CALL_LOG%/*}"
  printf '%s' "$line" >>"$SIM_CALL_LOG"
}

sim_on_exit() {
  local rc=$?
  sim_log_event exit "rc=$rc" || true
  # kill-bbrx: a script that did its work asks its runner to die; the simulator, which
  # knows it is that runner, does the kill once it has reaped this script. A script ended
  # by a signal (rc > 0) asks nothing.
  if [[ -n ${SIM_KILL_RUNNER:-} ]] && ((rc == 0)); then
    mkdir -p -- "$SIM_RUN_DIR/kill-bbrx" && : >"$SIM_RUN_DIR/kill-bbrx/$$" || true
  fi
}

sim_err() {
  printf '%s/%s: %s\n' "$SIM_JOB" "$SIM_SCRIPT" "$*" >&2
}

sim_say() {
  printf '%s/%s: %s\n' "$SIM_JOB" "$SIM_SCRIPT" "$*"
}

# Faults are read from a file so tests and trainees can break one script of one job
# without touching the scripts themselves.
sim_apply_fault() {
  local fault_file="$SIM_RUN_DIR/faults/$SIM_JOB/$SIM_SCRIPT" line=""
  [[ -f $fault_file ]] || return 0
  IFS= read -r line <"$fault_file" || true
  local -a words=()
  read -r -a words <<<"$line" || true
  if [[ ${words[0]:-} == after ]]; then
    # `after SECONDS SPEC`: only calls that start SECONDS after the fault was set (its
    # file's mtime) see SPEC; earlier ones are neither affected nor counted.
    local set_at now="${EPOCHREALTIME:-}"
    now="${now/,/.}"
    [[ -n $now ]] || now="$(date +%s.%N)"
    set_at="$(stat -c %.9Y -- "$fault_file")" || return 0
    awk -v now="$now" -v due="$set_at" -v wait="${words[1]:-0}" \
      'BEGIN { exit !(now + 0 >= due + wait) }' || return 0
    words=("${words[@]:2}")
  fi
  if [[ ${words[0]:-} == call ]]; then
    # `call N SPEC`: SPEC on the Nth call since the fault was set, every other call clean.
    local calls_file="${fault_file%/*}/.$SIM_SCRIPT.calls" calls=0
    [[ -f $calls_file ]] && IFS= read -r calls <"$calls_file"
    calls=$((${calls:-0} + 1))
    printf '%s\n' "$calls" >"$calls_file"
    (( calls == ${words[1]:-0} )) || return 0
    words=("${words[@]:2}")
  fi
  case "${words[0]:-}" in
    "") ;;
    fail)
      local code="${words[1]:-1}" message="${words[*]:2}"
      printf '%s\n' "${message:-injected failure}" >&2
      exit "$code"
      ;;
    hang)
      sim_say "hanging (injected fault) until killed"
      # A loop of short sleeps rather than `exec sleep`, so the EXIT trap stays ours and
      # a SIGTERM to the process group ends both the sleep and this shell.
      while :; do sleep 1; done
      ;;
    sleep)
      sim_say "sleeping ${words[1]:-1}s (injected fault)"
      sleep "${words[1]:-1}"
      ;;
    kill-bbrx)
      # The simulator's own runs only (it names itself, our parent): anything else that
      # runs this script is refused, and nothing is ever signalled from here.
      if [[ -z ${BBR_SIM_RUNNER_PID:-} || $BBR_SIM_RUNNER_PID != "$PPID" ]]; then
        sim_err "kill-bbrx acts on the simulator's own runs only (BBR_SIM_RUNNER_PID is not this script's parent)"
        exit 70
      fi
      SIM_KILL_RUNNER=1
      ;;
    *)
      sim_err "unknown fault in $fault_file: $line"
      exit 70
      ;;
  esac
}

# First thing every script does: log the start, arrange the exit line, apply faults.
sim_begin() {
  local extra=""
  if [[ -n ${BBR_AFTER_BACKUP_SCRIPTS_SUCCESSFUL+x} ]]; then
    extra="BBR_AFTER_BACKUP_SCRIPTS_SUCCESSFUL=$BBR_AFTER_BACKUP_SCRIPTS_SUCCESSFUL"
  fi
  if [[ -n ${BBR_ARTIFACT_DIRECTORY+x} ]]; then
    extra="${extra:+$extra;}BBR_ARTIFACT_DIRECTORY=$BBR_ARTIFACT_DIRECTORY"
  fi
  sim_log_event start "$extra"
  trap sim_on_exit EXIT
  sim_apply_fault
}

sim_metadata() {
  cat -- "$SIM_CONFIG_DIR/metadata.yml"
}

sim_lock() {
  [[ -d ${SIM_LOCK_FILE%/*} ]] || mkdir -p -- "${SIM_LOCK_FILE%/*}"
  if [[ -f $SIM_LOCK_FILE ]]; then
    sim_say "already locked ($(cat -- "$SIM_LOCK_FILE")); taking the lock over"
  fi
  printf '%s %s\n' "$SIM_SCRIPT" "$$" >"$SIM_LOCK_FILE"
  sim_say "locked"
}

sim_unlock() {
  if [[ -n ${BBR_AFTER_BACKUP_SCRIPTS_SUCCESSFUL+x} ]]; then
    sim_say "BBR_AFTER_BACKUP_SCRIPTS_SUCCESSFUL=$BBR_AFTER_BACKUP_SCRIPTS_SUCCESSFUL"
  fi
  if [[ -f $SIM_LOCK_FILE ]]; then
    rm -f -- "$SIM_LOCK_FILE"
    sim_say "unlocked"
  else
    sim_say "was not locked; nothing to do"
  fi
}

# Backup and restore of a live (unlocked) job would copy or overwrite data in motion.
sim_require_lock() {
  if [[ ! -f $SIM_LOCK_FILE ]]; then
    sim_err "$SIM_JOB is not locked: $1"
    exit 1
  fi
}

# Prints the artifact directory after checking bbr's contract for it.
sim_artifact_dir() {
  local dir="${BBR_ARTIFACT_DIRECTORY:-}"
  if [[ -z $dir ]]; then
    sim_err "BBR_ARTIFACT_DIRECTORY is not set"
    return 1
  fi
  if [[ $dir != */ ]]; then
    sim_err "BBR_ARTIFACT_DIRECTORY must end with '/': $dir"
    return 1
  fi
  if [[ ! -d $dir ]]; then
    sim_err "BBR_ARTIFACT_DIRECTORY does not exist: $dir"
    return 1
  fi
  printf '%s' "$dir"
}

# Replaces a file atomically so a failed restore never leaves half a database.
sim_install_file() {
  local src="$1" dest="$2"
  mkdir -p -- "$(dirname -- "$dest")"
  cp -- "$src" "$dest.restoring"
  mv -f -- "$dest.restoring" "$dest"
}

# A database job's backup: a dump of one database (here a file) into the artifact. Such
# jobs (bbr-*db) take a consistent dump without a lock of their own, as the real ones do.
sim_backup_file() {
  local src="$1" name="$2" art
  art="$(sim_artifact_dir)"
  if [[ ! -f $src ]]; then
    sim_err "database not found: $src"
    exit 1
  fi
  sim_say "dumping $(basename -- "$src")"
  cp -- "$src" "${art}${name}"
  sim_say "wrote ${art}${name} ($(wc -c <"${art}${name}") bytes)"
}

# A database job's restore: loads the dump `name` of the artifact into `dest`, atomically.
sim_restore_file() {
  local name="$1" dest="$2" art
  art="$(sim_artifact_dir)"
  if [[ ! -f ${art}${name} ]]; then
    sim_err "no $name in $art"
    exit 1
  fi
  sim_install_file "${art}${name}" "$dest"
  sim_say "loaded $name into $(basename -- "$dest")"
}
