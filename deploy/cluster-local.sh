#!/usr/bin/env bash
# A local shopkeep cluster on one machine, for trying replication and failover: nodes 1..3 on
# 127.0.0.1:7001..7003 (node N listens on 7000+N), each with its own data directory. Not for production:
# see deploy/shopkeep@.service and deploy/compose.yaml for real machines.
#
#   deploy/cluster-local.sh build          cargo build --release (into $CARGO_TARGET_DIR if set)
#   deploy/cluster-local.sh start          build if missing, start the nodes, wait until every one is ready
#   deploy/cluster-local.sh status         each node's view of GET /v1/cluster, one line per node
#   deploy/cluster-local.sh kill 1         SIGKILL node 1 (the shop goes on with 2 of 3)
#   deploy/cluster-local.sh restart 1      start it again (after kill) or stop + start it; it rejoins
#   deploy/cluster-local.sh stop           SIGTERM every node and wait for it to exit
#   deploy/cluster-local.sh wipe           stop, then delete the directory (data, logs, secrets)
#   deploy/cluster-local.sh add 4          start a 4th node that waits to be added through the admin API
#
# Run with --help for every command and option.
set -euo pipefail

readonly HOST=127.0.0.1
DEFAULT_BASE_PORT=7000
readonly DEFAULT_DIR=./shopkeep-cluster
# SIGTERM drains for at most --shutdown-timeout (30 s by default); give it a margin.
readonly STOP_SECONDS=45

# The repository this script lives in (through symlinks), for target/release/shopkeep and cargo.
SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}" 2>/dev/null) || SCRIPT_PATH=${BASH_SOURCE[0]}
SCRIPT_DIR=$(cd "$(dirname "$SCRIPT_PATH")" && pwd -P)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd -P)
readonly SCRIPT_PATH SCRIPT_DIR REPO_DIR

usage() {
  cat <<EOF
Usage: $0 [--dir DIR] [--timeout SECONDS] COMMAND [NODE]

A local shopkeep cluster: node N listens on $HOST:BASE+N (7001, 7002, 7003), keeps its data in
DIR/node-N, logs to DIR/node-N.log and its pid in DIR/node-N.pid. DIR defaults to $DEFAULT_DIR.

Commands:
  build           cargo build --release (the binary is \$CARGO_TARGET_DIR/release/shopkeep, else
                  target/release/shopkeep). Nothing else ever rebuilds a binary that exists: start
                  and restart run it as it is and only say when it is older than the sources.
  start           Build the binary if it is missing (never when it exists), create
                  DIR/cluster.env (cluster secret and tokens, mode 0600) if absent, start every node
                  that is not running (1, 2, 3 and any added one) and wait until /readyz is 200 on each.
  start N         Start node N only and wait until it is ready.
  status          GET /v1/cluster on every node: the shards it leads, follows or learns, the unhealthy
                  ones, and how many entries its slowest follower lags (on the shards it leads; "?": not
                  known yet, no write since it became leader).
  kill N          SIGKILL node N (an abrupt crash: try the shop on the other nodes).
  restart N       Stop node N (SIGTERM) if it runs, start it again, wait until it is ready.
  stop [N]        SIGTERM every node (or node N) and wait until it has exited.
  wipe            stop, then delete DIR.
  add N           Start a NEW node N (4, 5, ...) that joins the running cluster; it waits until an admin
                  adds it (POST /v1/admin/cluster/nodes), which the command prints.
  remove N        After DELETE /v1/admin/cluster/nodes/N: stop node N, delete DIR/node-N and forget it.

Options:
  --dir DIR          Where the cluster lives (default $DEFAULT_DIR).
  --timeout SECONDS  How long start/restart wait for readiness (default 60).
  --base-port BASE   Node N listens on BASE+N (default $DEFAULT_BASE_PORT); give every command the same one.
  -h, --help         This help.

Environment:
  SHOPKEEP_BIN       The binary to run instead of target/release/shopkeep (then nothing is built).
  CARGO_TARGET_DIR   Where cargo builds (the binary is its release/shopkeep), as for cargo itself.
  RUST_LOG           Passed to the nodes (default info).
Nodes see no other SHOPKEEP_* variable of your shell: their settings are the flags this script passes
and DIR/cluster.env, so every node, and every restart, gets the same ones. Settings all members must share
(e.g. SHOPKEEP_SHARDS=4) go into DIR/cluster.env; those fixed at creation must be there before the
first start (create the file yourself, with SHOPKEEP_CLUSTER_SECRET and SHOPKEEP_ADMIN_TOKEN at least).
EOF
}

die() {
  printf 'cluster-local: %s\n' "$*" >&2
  exit 1
}

say() {
  printf '%s\n' "$*"
}

# --- arguments -------------------------------------------------------------------------------------------

DIR=$DEFAULT_DIR
DIR_GIVEN=0
WAIT_SECONDS=60
BASE_PORT=$DEFAULT_BASE_PORT
COMMAND=
NODE=

while (($# > 0)); do
  case $1 in
    --dir)
      (($# >= 2)) || die "--dir needs a directory"
      DIR=$2
      DIR_GIVEN=1
      shift 2
      ;;
    --dir=*)
      DIR=${1#--dir=}
      DIR_GIVEN=1
      shift
      ;;
    --timeout)
      (($# >= 2)) || die "--timeout needs a number of seconds"
      WAIT_SECONDS=$2
      shift 2
      ;;
    --timeout=*)
      WAIT_SECONDS=${1#--timeout=}
      shift
      ;;
    --base-port)
      (($# >= 2)) || die "--base-port needs a port number"
      BASE_PORT=$2
      shift 2
      ;;
    --base-port=*)
      BASE_PORT=${1#--base-port=}
      shift
      ;;
    -h | --help | help)
      usage
      exit 0
      ;;
    -*)
      printf 'cluster-local: unknown option %s\n\n' "$1" >&2
      usage >&2
      exit 2
      ;;
    *)
      if [[ -z $COMMAND ]]; then
        COMMAND=$1
      elif [[ -z $NODE ]]; then
        NODE=$1
      else
        die "unexpected argument '$1' (see --help)"
      fi
      shift
      ;;
  esac
done

[[ -n $COMMAND ]] || {
  usage >&2
  exit 2
}
[[ -n $DIR ]] || die "--dir must not be empty"
[[ $BASE_PORT =~ ^[1-9][0-9]*$ ]] && ((BASE_PORT + 99 <= 65535)) ||
  die "--base-port must be a port number below 65437, got '$BASE_PORT'"
readonly BASE_PORT
[[ $WAIT_SECONDS =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a whole number of seconds, got '$WAIT_SECONDS'"

# node ids are small positive integers: node N listens on BASE_PORT + N
valid_node() {
  [[ $1 =~ ^[1-9][0-9]?$ ]]
}

case $COMMAND in
  start | stop)
    [[ -z $NODE ]] || valid_node "$NODE" || die "$COMMAND: the node is a number from 1 to 99, got '$NODE'"
    ;;
  kill | restart | add | remove)
    [[ -n $NODE ]] || die "$COMMAND needs a node id, e.g. '$COMMAND 1'"
    valid_node "$NODE" || die "$COMMAND: the node is a number from 1 to 99, got '$NODE'"
    ;;
  status | wipe | build)
    [[ -z $NODE ]] || die "$COMMAND takes no node id"
    ;;
  *)
    printf "cluster-local: unknown command '%s'\n\n" "$COMMAND" >&2
    usage >&2
    exit 2
    ;;
esac

command -v curl >/dev/null 2>&1 || die "curl is required"

# Absolute paths: the nodes, their pid files and the hints printed below must not depend on the cwd.
if [[ $COMMAND == build ]]; then
  : # builds the binary only: no cluster directory needed
elif [[ -d $DIR ]]; then
  DIR=$(cd "$DIR" && pwd)
elif [[ $COMMAND == start ]]; then
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd)
else
  die "no cluster in $DIR (nothing to $COMMAND)"
fi
readonly DIR
readonly ENV_FILE=$DIR/cluster.env
readonly NODES_FILE=$DIR/nodes

# How to call this script again, for the hints (with --dir when it is not the default).
SELF=$0
if ((DIR_GIVEN)); then
  SELF="$SELF --dir $DIR"
fi
if ((BASE_PORT != DEFAULT_BASE_PORT)); then
  SELF="$SELF --base-port $BASE_PORT"
fi
readonly SELF

# --- nodes -----------------------------------------------------------------------------------------------

port_of() { printf '%s' "$((BASE_PORT + $1))"; }
addr_of() { printf '%s:%s' "$HOST" "$(port_of "$1")"; }
url_of() { printf 'http://%s' "$(addr_of "$1")"; }
log_of() { printf '%s/node-%s.log' "$DIR" "$1"; }
pidfile_of() { printf '%s/node-%s.pid' "$DIR" "$1"; }
datadir_of() { printf '%s/node-%s' "$DIR" "$1"; }

# The nodes this script manages, one id a line: 1 2 3, plus the added ones, minus the removed ones.
node_ids() {
  if [[ -f $NODES_FILE ]]; then
    sort -n -u "$NODES_FILE"
  else
    printf '%s\n' 1 2 3
  fi
}

is_managed() {
  node_ids | grep -qx "$1"
}

save_nodes() {
  local tmp=$NODES_FILE.tmp
  printf '%s\n' "$@" | sort -n -u >"$tmp"
  mv "$tmp" "$NODES_FILE"
}

# --peers for node $1: every managed node plus itself ("1=127.0.0.1:7001,2=...").
peers_for() {
  local id list=()
  while read -r id; do
    list+=("$id=$(addr_of "$id")")
  done < <({
    node_ids
    printf '%s\n' "$1"
  } | sort -n -u)
  local IFS=,
  printf '%s' "${list[*]}"
}

# The pid of node $1 if it runs (the pid file names a live shopkeep process serving as that node).
running_pid() {
  local pidfile pid args
  pidfile=$(pidfile_of "$1")
  [[ -f $pidfile ]] || return 1
  pid=$(<"$pidfile")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # guard against a recycled pid: the process must be the node this file is about
  args=$(ps -p "$pid" -o args= 2>/dev/null) || return 1
  [[ $args == *" serve "*"--node-id $1 "* ]] || return 1
  printf '%s' "$pid"
}

# Whether the process in node $1's pid file is alive (right after the launch, before it shows as a node).
pid_alive() {
  local pid
  pid=$(cat "$(pidfile_of "$1")" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

# HTTP status of a GET ("000" when nothing answers).
http_code() {
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" 2>/dev/null) || true
  printf '%s' "${code:-000}"
}

# The admin token, read from the env file (never printed).
admin_token() {
  [[ -f $ENV_FILE ]] || die "$ENV_FILE is missing"
  (
    set +u
    # shellcheck disable=SC1090
    . "$ENV_FILE"
    printf '%s' "${SHOPKEEP_ADMIN_TOKEN:-}"
  )
}

# GET with the admin token; the token goes to curl on stdin, never on its command line (ps shows that).
admin_get() {
  local token
  token=$(admin_token)
  printf 'header = "Authorization: Bearer %s"\n' "$token" |
    curl -s --max-time 5 -K - "$1"
}

# --- building and secrets --------------------------------------------------------------------------------

BIN=

# Where cargo puts its builds: $CARGO_TARGET_DIR (relative to the repository, where cargo runs) or target/.
target_dir() {
  local dir=${CARGO_TARGET_DIR:-target}
  [[ $dir == /* ]] || dir=$REPO_DIR/$dir
  printf '%s' "$dir"
}

# cargo build --release, saying so.
build_binary() {
  command -v cargo >/dev/null 2>&1 || die "$1 and cargo is not installed (https://rustup.rs)"
  say "$1: cargo build --release (into $(target_dir); a first build takes a few minutes)"
  (cd "$REPO_DIR" && cargo build --release) || die "cargo build --release failed"
}

# The binary to run. Built only when it is missing; a binary older than the sources is used as it is,
# with a warning (a restart must not turn into a rebuild): '$0 build' rebuilds it.
ensure_binary() {
  if [[ -n ${SHOPKEEP_BIN:-} ]]; then
    [[ -x $SHOPKEEP_BIN ]] || die "SHOPKEEP_BIN=$SHOPKEEP_BIN is not an executable"
    BIN=$SHOPKEEP_BIN
    return
  fi
  BIN=$(target_dir)/release/shopkeep
  if [[ ! -x $BIN ]]; then
    build_binary "$BIN is missing"
  elif [[ -n $(find "$REPO_DIR/Cargo.toml" "$REPO_DIR/Cargo.lock" "$REPO_DIR/src" "$REPO_DIR/raft" \
    "$REPO_DIR/faults" -newer "$BIN" -type f -print -quit 2>/dev/null) ]]; then
    say "note: $BIN is older than the sources; running it as it is ($SELF build rebuilds it)"
  fi
}

random_hex() {
  od -An -tx1 -N32 /dev/urandom | tr -d ' \n'
}

ensure_env_file() {
  if [[ -f $ENV_FILE ]]; then
    if ! grep -q '^SHOPKEEP_CLUSTER_SECRET=.' "$ENV_FILE" || ! grep -q '^SHOPKEEP_ADMIN_TOKEN=.' "$ENV_FILE"; then
      die "$ENV_FILE must set SHOPKEEP_CLUSTER_SECRET and SHOPKEEP_ADMIN_TOKEN"
    fi
    return
  fi
  (
    umask 077
    cat >"$ENV_FILE.tmp" <<EOF
# shopkeep local cluster: the secrets every node shares. Generated by deploy/cluster-local.sh; keep it private.
# Every node reads this file each time it starts. Settings all members must share go here too
# (e.g. SHOPKEEP_SHARDS=4 or SHOPKEEP_CURRENCY=USD, fixed when the data directories are created).
SHOPKEEP_CLUSTER_SECRET=$(random_hex)
SHOPKEEP_ADMIN_TOKEN=$(random_hex)
SHOPKEEP_SERVICE_TOKEN=$(random_hex)
SHOPKEEP_PSP_SECRET=$(random_hex)
EOF
    mv "$ENV_FILE.tmp" "$ENV_FILE"
  )
  chmod 600 "$ENV_FILE"
  say "generated the cluster secret and tokens into $ENV_FILE (mode 0600)"
}

# --- starting and stopping -------------------------------------------------------------------------------

log_tail() {
  local log
  log=$(log_of "$1")
  if [[ -s $log ]]; then
    printf -- '--- last lines of %s ---\n' "$log" >&2
    tail -n 25 "$log" >&2
    printf -- '---\n' >&2
  else
    printf '(%s is empty)\n' "$log" >&2
  fi
}

# Fail unless node $1 runs or its port is free (something else answering there would fake readiness).
check_port_free() {
  running_pid "$1" >/dev/null && return 0
  if (: <>"/dev/tcp/$HOST/$(port_of "$1")") 2>/dev/null; then
    die "port $(port_of "$1") (node $1) is taken by another process; stop it first"
  fi
}

# Start node $1 in the background unless it runs; returns at once.
launch_node() {
  local id=$1 pid log
  if pid=$(running_pid "$id"); then
    say "node $id already runs (pid $pid)"
    return
  fi
  check_port_free "$id"
  # the node's data dir is private (the shard files hold every wallet)
  [[ -d $(datadir_of "$id") ]] || mkdir -m 0700 "$(datadir_of "$id")"
  log=$(log_of "$id")
  printf '\n=== %s: node %s starting ===\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$id" >>"$log"
  (
    # Only cluster.env and the flags below configure a node, whatever the calling shell exports.
    while read -r name; do
      unset "$name"
    done < <(compgen -v SHOPKEEP_)
    set -a
    # shellcheck disable=SC1090
    . "$ENV_FILE"
    set +a
    cd "$DIR"
    # setsid (where there is one): a Ctrl-C in this terminal does not reach the nodes.
    launcher=()
    if command -v setsid >/dev/null 2>&1; then
      launcher=(setsid)
    fi
    exec ${launcher[@]+"${launcher[@]}"} "$BIN" serve --node-id "$id" \
      --listen "$(addr_of "$id")" \
      --data-dir "$(datadir_of "$id")" \
      --peers "$(peers_for "$id")"
  ) </dev/null >>"$log" 2>&1 &
  printf '%s\n' "$!" >"$(pidfile_of "$id")"
  say "node $id starting on $(url_of "$id") (pid $!, log $log)"
}

# Wait until GET $2 (a path) answers 200 on every node in $1 (a space-separated list), at most WAIT_SECONDS.
wait_for() {
  local ids=$1 path=$2 start now id code pending last=''
  start=$SECONDS
  while :; do
    pending=
    for id in $ids; do
      if ! pid_alive "$id"; then
        printf 'cluster-local: node %s exited while starting\n' "$id" >&2
        log_tail "$id"
        exit 1
      fi
      code=$(http_code "$(url_of "$id")$path")
      [[ $code == 200 ]] || pending+="$id:$code "
    done
    [[ -n $pending ]] || return 0
    now=$SECONDS
    if ((now - start >= WAIT_SECONDS)); then
      printf 'cluster-local: not ready after %ss; GET %s answered (node:status) %s\n' \
        "$WAIT_SECONDS" "$path" "$pending" >&2
      for id in $pending; do
        log_tail "${id%%:*}"
      done
      printf 'The nodes still run: see %s status, or %s stop.\n' "$SELF" "$SELF" >&2
      exit 1
    fi
    if [[ $pending != "$last" ]]; then
      say "waiting for $path (node:status $pending)"
      last=$pending
    fi
    sleep 0.5
  done
}

# SIGTERM (or $2) the nodes in $1 and wait until they have exited.
stop_nodes() {
  local ids=$1 signal=${2:-TERM} id pid stopping='' start
  for id in $ids; do
    if pid=$(running_pid "$id"); then
      kill "-$signal" "$pid" 2>/dev/null || true
      stopping+="$id "
      say "node $id: SIG$signal sent (pid $pid)"
    else
      rm -f "$(pidfile_of "$id")"
    fi
  done
  start=$SECONDS
  for id in $stopping; do
    while running_pid "$id" >/dev/null; do
      if ((SECONDS - start >= STOP_SECONDS)); then
        die "node $id still runs ${STOP_SECONDS}s after SIG$signal; see $(log_of "$id") (or: $SELF kill $id)"
      fi
      sleep 0.2
    done
    rm -f "$(pidfile_of "$id")"
    say "node $id stopped"
  done
}

print_hints() {
  local first second
  first=$(node_ids | head -n 1)
  second=$(node_ids | sed -n 2p)
  second=${second:-$first}
  cat <<EOF

The cluster secret and the admin, service and PSP tokens are in $ENV_FILE (mode 0600).
Try (any node takes any request; writes are forwarded to each shard's leader):

  set -a; . $(printf %q "$ENV_FILE"); set +a
  ADMIN="Authorization: Bearer \$SHOPKEEP_ADMIN_TOKEN"; SVC="Authorization: Bearer \$SHOPKEEP_SERVICE_TOKEN"
  curl -s $(url_of "$first")/v1/cluster -H "\$ADMIN"
  curl -s -X PUT $(url_of "$first")/v1/items/dragon-skin -H "\$ADMIN" -d '{"name":"Dragon Skin","kind":"skin","price":"4.99"}'
  curl -s -X POST $(url_of "$second")/v1/users -H "\$SVC" -H 'Idempotency-Key: user-1' -d '{"user_id":"player-42"}'

  $SELF status
  $SELF kill $first          # then retry the reads and writes on the other nodes
  $SELF restart $first
  $SELF stop
EOF
}

# --- commands --------------------------------------------------------------------------------------------

cmd_start() {
  local ids
  if [[ -n $NODE ]]; then
    is_managed "$NODE" || die "node $NODE is not part of this cluster (a new node: $SELF add $NODE)"
    ids=$NODE
  else
    ids=$(node_ids | tr '\n' ' ')
  fi
  ensure_binary
  ensure_env_file
  [[ -f $NODES_FILE ]] || save_nodes 1 2 3
  local id
  for id in $ids; do
    check_port_free "$id"
  done
  for id in $ids; do
    launch_node "$id"
  done
  wait_for "$ids" /readyz
  for id in $ids; do
    say "node $id ready on $(url_of "$id")"
  done
  print_hints
}

cmd_restart() {
  is_managed "$NODE" || die "node $NODE is not part of this cluster"
  ensure_binary
  ensure_env_file
  stop_nodes "$NODE"
  launch_node "$NODE"
  wait_for "$NODE" /readyz
  say "node $NODE is ready on $(url_of "$NODE")"
}

cmd_stop() {
  if [[ -n $NODE ]]; then
    is_managed "$NODE" || die "node $NODE is not part of this cluster"
    stop_nodes "$NODE"
  else
    stop_nodes "$(node_ids | tr '\n' ' ')"
  fi
}

cmd_kill() {
  is_managed "$NODE" || die "node $NODE is not part of this cluster"
  running_pid "$NODE" >/dev/null || die "node $NODE does not run"
  stop_nodes "$NODE" KILL
}

status_row() {
  printf '%-4s %-15s %-7s %-6s %-16s %-16s %-16s %-16s %s\n' "$@"
}

cmd_status() {
  local id pid code body view='' leader follower learner unhealthy lag mode
  if ! command -v jq >/dev/null 2>&1; then
    say "(install jq for a table; raw GET /v1/cluster follows)"
    for id in $(node_ids); do
      if pid=$(running_pid "$id"); then
        say "node $id $(addr_of "$id") pid $pid readyz $(http_code "$(url_of "$id")/readyz"):"
        say "  $(admin_get "$(url_of "$id")/v1/cluster" || true)"
      else
        say "node $id $(addr_of "$id"): down"
      fi
    done
    return
  fi
  status_row NODE ADDRESS PID READYZ LEADER-OF FOLLOWER-OF LEARNER UNHEALTHY MAX-LAG
  for id in $(node_ids); do
    if ! pid=$(running_pid "$id"); then
      printf '%-4s %-15s %-7s %s\n' "$id" "$(addr_of "$id")" - down
      continue
    fi
    code=$(http_code "$(url_of "$id")/readyz")
    body=$(admin_get "$(url_of "$id")/v1/cluster") || body=
    if ! jq -e '.shards | type == "array"' >/dev/null 2>&1 <<<"$body"; then
      status_row "$id" "$(addr_of "$id")" "$pid" "$code" "GET /v1/cluster: ${body:-no answer}"
      continue
    fi
    [[ -n $view ]] || view=$body
    IFS=$'\t' read -r leader follower learner unhealthy lag mode < <(jq -r '
      def list: if length == 0 then "-" else map(tostring) | join(",") end;
      def role(r): [.shards[] | select(.role == r) | .shard] | list;
      [role("leader"), role("follower"), role("learner"),
       ([.shards[] | select(.healthy != true) | .shard] | list),
       ([.shards[] | (.lag // {}) | to_entries[] | .value] as $lag
        | if ($lag | length) == 0 then "-" elif any($lag[]; . == null) then "?" else $lag | max | tostring end),
       (.mode // "-")] | @tsv' <<<"$body")
    if [[ $mode != cluster ]]; then
      lag+="  (mode: $mode)"
    fi
    status_row "$id" "$(addr_of "$id")" "$pid" "$code" "$leader" "$follower" "$learner" "$unhealthy" "$lag"
  done
  [[ -n $view ]] || return 0
  # Membership and leaders as the first answering node sees them (during a change, shards may differ).
  jq -r '
    def list: if length == 0 then "-" else map(tostring) | join(",") end;
    "members: " + ([.shards | group_by([.voters, .learners])[]
      | "voters \(.[0].voters | list), learners \(.[0].learners | list) (shards \(map(.shard) | list))"]
      | join("; ")),
    "leaders: " + ([.shards[] | "\(.shard):\(.leader // "none")"] | join(" "))
      + "  (shard:leader, as node \(.node_id) sees it)"' <<<"$view"
}

cmd_add() {
  ! is_managed "$NODE" || die "node $NODE is already part of this cluster (start it: $SELF start $NODE)"
  [[ ! -e $(datadir_of "$NODE") ]] ||
    die "$(datadir_of "$NODE") exists: node ids are never reused; pick another id"
  ensure_binary
  ensure_env_file
  local ids
  ids=$(node_ids)
  # shellcheck disable=SC2086
  save_nodes $ids "$NODE"
  launch_node "$NODE"
  wait_for "$NODE" /healthz
  cat <<EOF
node $NODE runs and waits to be added. Make it a learner of every shard (answers once it caught up),
then a voter:

  set -a; . $(printf %q "$ENV_FILE"); set +a; ADMIN="Authorization: Bearer \$SHOPKEEP_ADMIN_TOKEN"
  curl -s -X POST $(url_of "$(node_ids | head -n 1)")/v1/admin/cluster/nodes -H "\$ADMIN" -H 'Idempotency-Key: add-node-$NODE' \\
       -d '{"node_id":$NODE,"address":"$(addr_of "$NODE")"}'
  curl -s -X POST $(url_of "$(node_ids | head -n 1)")/v1/admin/cluster/nodes/$NODE/promote -H "\$ADMIN" -H 'Idempotency-Key: promote-node-$NODE'
EOF
}

cmd_remove() {
  is_managed "$NODE" || die "node $NODE is not part of this cluster"
  # Refuse while any shard still counts the node as a member: its data is then still needed.
  local id body found=0
  for id in $(node_ids); do
    [[ $id != "$NODE" ]] || continue
    running_pid "$id" >/dev/null || continue
    body=$(admin_get "$(url_of "$id")/v1/cluster") || continue
    if command -v jq >/dev/null 2>&1; then
      jq -e '.shards | type == "array"' >/dev/null 2>&1 <<<"$body" || continue
      found=1
      if jq -e --argjson n "$NODE" 'any(.shards[]; (.voters + .learners) | index($n))' >/dev/null <<<"$body"; then
        die "node $NODE is still a member (as node $id sees it); first:
  curl -s -X DELETE $(url_of "$id")/v1/admin/cluster/nodes/$NODE -H \"Authorization: Bearer \$SHOPKEEP_ADMIN_TOKEN\""
      fi
      break
    else
      die "remove needs jq to check that node $NODE is no longer a member"
    fi
  done
  ((found)) || die "no other node answers GET /v1/cluster: cannot check that node $NODE is no longer a member"
  stop_nodes "$NODE"
  rm -rf "$(datadir_of "$NODE")"
  rm -f "$(log_of "$NODE")" "$(pidfile_of "$NODE")"
  local rest
  rest=$(node_ids | grep -vx "$NODE" || true)
  # shellcheck disable=SC2086
  save_nodes $rest
  say "node $NODE removed: its data directory is deleted and this script no longer starts it"
}

cmd_wipe() {
  # Delete only what looks like a cluster made by this script.
  [[ -f $ENV_FILE || -f $NODES_FILE ]] || compgen -G "$DIR/node-*" >/dev/null ||
    die "$DIR does not look like a cluster directory (no cluster.env, nodes or node-N); not deleting it"
  [[ $DIR != / && $DIR != "$HOME" && $DIR != "$REPO_DIR" ]] || die "refusing to delete $DIR"
  stop_nodes "$(node_ids | tr '\n' ' ')"
  rm -rf "$DIR"
  say "deleted $DIR"
}

case $COMMAND in
  build) build_binary "asked to build" ;;
  start) cmd_start ;;
  status) cmd_status ;;
  kill) cmd_kill ;;
  restart) cmd_restart ;;
  stop) cmd_stop ;;
  wipe) cmd_wipe ;;
  add) cmd_add ;;
  remove) cmd_remove ;;
  *) die "unknown command $COMMAND" ;;
esac
