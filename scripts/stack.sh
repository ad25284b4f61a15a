#!/usr/bin/env bash
# The production topology on one machine, in the foreground:
#
#   clients -> nginx :$PORT (deploy/nginx.conf) -> $REPLICAS x the Procfile's gunicorn on loopback
#                                                   -> one private redis-server (sessions)
#
#   PORT=8080 REPLICAS=2 WEB_CONCURRENCY=1 bash scripts/stack.sh      # Ctrl-C stops everything
#
# Any other setting the service reads (MODEL_DIR, SESSION_TTL_SECONDS, ...) passes through to
# every replica. Runtime files (rendered nginx config, logs, pid files) live in a temp dir that
# is removed on exit (STACK_KEEP=1 keeps it). A component that dies is restarted.
# The script's own knobs: STACK_RESERVED_THREADS (8), STACK_READY_TIMEOUT (180 s),
# STACK_STOP_TIMEOUT (40 s), STACK_KEEP (0).
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-8080}
REPLICAS=${REPLICAS:-2}
export WEB_CONCURRENCY=${WEB_CONCURRENCY:-1}
# Behind nginx a thread only ever holds a whole request, never a slow client: enough threads for
# a full batch of streams (MAX_BATCH, 64) plus the reserve nginx keeps for everything else.
export GUNICORN_THREADS=${GUNICORN_THREADS:-72}
# Threads per worker that generations never get (nginx's max_conns), for /health, /ready and
# sessions. Exact with one worker per replica; with several, the kernel spreads a replica's
# connections over its workers unevenly, so scale with REPLICAS rather than WEB_CONCURRENCY.
RESERVED_THREADS=${STACK_RESERVED_THREADS:-8}
READY_TIMEOUT=${STACK_READY_TIMEOUT:-180}
STOP_TIMEOUT=${STACK_STOP_TIMEOUT:-40}  # > gunicorn's graceful_timeout (30 s) for streams in flight

say() { printf 'stack.sh: %s\n' "$*"; }
die() {
  printf 'stack.sh: %s\n' "$*" >&2
  exit 1
}
need() {
  command -v "$1" >/dev/null 2>&1 && return
  printf 'stack.sh: %s was not found on PATH. %s\n' "$1" "$2" >&2
  exit 3
}

need nginx "Install it with \`sudo apt-get install nginx\` (Debian/Ubuntu) or \`brew install nginx\` (macOS)."
need redis-server "Install it with \`sudo apt-get install redis-server\` (Debian/Ubuntu) or \`brew install redis\` (macOS)."
if [ -x .venv/bin/gunicorn ]; then export PATH="$PWD/.venv/bin:$PATH"; fi
need gunicorn "Run \`bash scripts/setup.sh\` first: it creates .venv with the service installed."
need python3 "Python 3.11 is required."
WEB=$(sed -n 's/^web:[[:space:]]*//p' Procfile)
[ -n "$WEB" ] || die "Procfile has no web: command"
case $REPLICAS in '' | *[!0-9]* | 0) die "REPLICAS must be a positive integer, not '$REPLICAS'" ;; esac
case $WEB_CONCURRENCY in '' | *[!0-9]* | 0) die "WEB_CONCURRENCY must be a positive integer, not '$WEB_CONCURRENCY'" ;; esac
# The replicas share this machine's cores: each worker gets cores / (replicas x workers) threads
# for its decode step, not cores / workers as a lone gunicorn would take (measured: 3 replicas of
# one worker at 2 BLAS threads each on 2 cores deliver a fifth of one replica's rate, as their
# spinning BLAS threads preempt one another).
CORES=$(nproc)
PER_WORKER=$((CORES / (REPLICAS * WEB_CONCURRENCY)))
[ "$PER_WORKER" -ge 1 ] || PER_WORKER=1
export BLAS_THREADS=${BLAS_THREADS:-$PER_WORKER} TORCH_THREADS=${TORCH_THREADS:-$PER_WORKER}

RUN=$(mktemp -d "${TMPDIR:-/tmp}/lstm-lm-stack.XXXXXX")
# free loopback ports, all bound at once so they differ: redis, then one per replica
read -r -a PORTS <<<"$(python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' $((REPLICAS + 1)))"
REDIS_PORT=${PORTS[0]}
REDIS_PID=
NGINX_PID=
SLEEP_PID=
REPLICA_PIDS=()

# ---- starting each part ----------------------------------------------------------------------

start_redis() {
  # no persistence: this Redis lives and dies with the stack
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$RUN" \
    --maxmemory 256mb --maxmemory-policy volatile-lru </dev/null >>"$RUN/redis.log" 2>&1 &
  REDIS_PID=$!
}

start_replica() { # $1: replica number, 1-based
  local i=$1
  # the Procfile's command exactly; BIND_HOST keeps it on loopback, PROXY_HOPS=1 trusts nginx's
  # X-Forwarded-For for the client address
  PORT=${PORTS[i]} BIND_HOST=127.0.0.1 REPLICA_NAME="replica-$i" REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" \
    PROXY_HOPS=${PROXY_HOPS:-1} PROMETHEUS_MULTIPROC_DIR="$RUN/metrics-$i" \
    bash -c "exec $WEB" </dev/null >>"$RUN/replica-$i.log" 2>&1 &
  REPLICA_PIDS[i - 1]=$!
}

render_nginx() {
  # the listen port, and the replicas' addresses in the two upstream files nginx.conf includes
  sed "s/^\([[:space:]]*listen[[:space:]]\{1,\}\)8080;/\1$PORT;/" deploy/nginx.conf >"$RUN/nginx.conf"
  grep -q "listen $PORT;" "$RUN/nginx.conf" || die "deploy/nginx.conf has no 'listen 8080;' line to render"
  local i max_conns=$((WEB_CONCURRENCY * (GUNICORN_THREADS - RESERVED_THREADS)))
  [ "$max_conns" -ge 1 ] || max_conns=1
  : >"$RUN/upstream.conf"
  : >"$RUN/upstream-generate.conf"
  for ((i = 1; i <= REPLICAS; i++)); do
    echo "server 127.0.0.1:${PORTS[i]} max_fails=3 fail_timeout=5s;" >>"$RUN/upstream.conf"
    echo "server 127.0.0.1:${PORTS[i]} max_fails=3 fail_timeout=5s max_conns=$max_conns;" >>"$RUN/upstream-generate.conf"
  done
  NGINX_ARGS=(-p "$RUN/" -c "$RUN/nginx.conf")
  # -e (nginx >= 1.19.5): no attempt to open the packaged error log before the config is read
  if nginx -h 2>&1 | grep -q -- '-e filename'; then NGINX_ARGS+=(-e stderr); fi
  # run as whoever runs this; nginx only switches users when started as root
  if [ "$(id -u)" = 0 ]; then NGINX_ARGS+=(-g "user root;"); fi
  nginx -t -q "${NGINX_ARGS[@]}" 2>>"$RUN/nginx.log" || die "nginx rejected the config: $(tail -3 "$RUN/nginx.log")"
}

start_nginx() {
  nginx "${NGINX_ARGS[@]}" </dev/null >>"$RUN/nginx.log" 2>&1 &
  NGINX_PID=$!
}

write_pids() {
  {
    echo "redis $REDIS_PID"
    for ((i = 1; i <= REPLICAS; i++)); do echo "replica-$i ${REPLICA_PIDS[i - 1]}"; done
    if [ -n "$NGINX_PID" ]; then echo "nginx $NGINX_PID"; fi
  } >"$RUN/stack.pids"
}

# ---- probes, without curl: bash's /dev/tcp ---------------------------------------------------

http_ok() { # $1 port, $2 path: answers 200
  local line=
  { exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null || return 1
  printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$2" >&3
  IFS= read -r -t 5 line <&3 || true
  exec 3<&- 3>&-
  case $line in "HTTP/1."?" 200"*) return 0 ;; *) return 1 ;; esac
}

redis_ok() {
  local line=
  { exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT"; } 2>/dev/null || return 1
  printf 'PING\r\n' >&3
  IFS= read -r -t 5 line <&3 || true
  exec 3<&- 3>&-
  case $line in "+PONG"*) return 0 ;; *) return 1 ;; esac
}

await() { # $1 what, $2 pid, $3 log, then the probe command
  local what=$1 pid=$2 log=$3 deadline=$((SECONDS + READY_TIMEOUT))
  shift 3
  until "$@" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || die "$what exited while starting; the end of $log:
$(tail -20 "$log")"
    [ "$SECONDS" -lt "$deadline" ] || die "$what not ready after ${READY_TIMEOUT}s; the end of $log:
$(tail -20 "$log")"
    sleep 0.2
  done
}

# ---- stopping: nginx and the replicas drain, then Redis goes ---------------------------------

await_exit() { # pids: wait until they are gone, up to STOP_TIMEOUT, then SIGKILL them
  local pid deadline=$((SECONDS + STOP_TIMEOUT))
  for pid in "$@"; do
    while kill -0 "$pid" 2>/dev/null; do
      if [ "$SECONDS" -ge "$deadline" ]; then
        pkill -KILL -P "$pid" 2>/dev/null || true # its workers first: no orphans
        kill -KILL "$pid" 2>/dev/null || true
        break
      fi
      sleep 0.1
    done
  done
  wait "$@" 2>/dev/null || true
}

cleanup() {
  local status=$? front=()
  trap - EXIT
  trap '' INT TERM HUP # a second Ctrl-C must not cut the cleanup short
  if [ -n "$SLEEP_PID" ]; then kill "$SLEEP_PID" 2>/dev/null || true; fi
  say "stopping"
  # nginx QUIT: finish what is in flight, take nothing new; replicas TERM: gunicorn's graceful stop
  if [ -n "$NGINX_PID" ]; then
    kill -QUIT "$NGINX_PID" 2>/dev/null || true
    front+=("$NGINX_PID")
  fi
  if [ "${#REPLICA_PIDS[@]}" -gt 0 ]; then
    kill -TERM "${REPLICA_PIDS[@]}" 2>/dev/null || true
    front+=("${REPLICA_PIDS[@]}")
  fi
  if [ "${#front[@]}" -gt 0 ]; then await_exit "${front[@]}"; fi
  if [ -n "$REDIS_PID" ]; then # last: the replicas save sessions until they stop
    kill -TERM "$REDIS_PID" 2>/dev/null || true
    await_exit "$REDIS_PID"
  fi
  if [ "${STACK_KEEP:-0}" = 1 ]; then say "kept $RUN"; else rm -rf "$RUN"; fi
  say "stopped"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 0' INT TERM HUP # a deliberate stop is a clean exit; the EXIT trap does the work

# ---- up ---------------------------------------------------------------------------------------

start_redis
await "redis-server" "$REDIS_PID" "$RUN/redis.log" redis_ok
for ((i = 1; i <= REPLICAS; i++)); do start_replica "$i"; done
for ((i = 1; i <= REPLICAS; i++)); do
  await "replica-$i" "${REPLICA_PIDS[i - 1]}" "$RUN/replica-$i.log" http_ok "${PORTS[i]}" /ready
done
render_nginx
start_nginx
await "nginx" "$NGINX_PID" "$RUN/nginx.log" http_ok "$PORT" /ready
write_pids

replicas=
for ((i = 1; i <= REPLICAS; i++)); do replicas+=" replica-$i=127.0.0.1:${PORTS[i]}"; done
say "listening on http://127.0.0.1:$PORT (nginx, all addresses) ->$replicas -> redis=127.0.0.1:$REDIS_PORT"
say "runtime files and logs in $RUN; Ctrl-C stops everything"

# ---- supervise: restart whatever dies ---------------------------------------------------------

while :; do
  sleep 1 &
  SLEEP_PID=$!
  wait "$SLEEP_PID" || true # a signal interrupts this wait at once
  SLEEP_PID=
  if ! kill -0 "$REDIS_PID" 2>/dev/null; then
    say "redis-server exited; restarting it (sessions are lost)"
    start_redis
    write_pids
  fi
  for ((i = 1; i <= REPLICAS; i++)); do
    if ! kill -0 "${REPLICA_PIDS[i - 1]}" 2>/dev/null; then
      say "replica-$i exited; restarting it (see $RUN/replica-$i.log)"
      start_replica "$i"
      write_pids
    fi
  done
  if ! kill -0 "$NGINX_PID" 2>/dev/null; then
    say "nginx exited; restarting it (see $RUN/nginx.log)"
    start_nginx
    write_pids
  fi
done
