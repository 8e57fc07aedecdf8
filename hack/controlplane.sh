#!/usr/bin/env bash
# hack/controlplane.sh runs a local Kubernetes control plane for the demo:
# bin/etcd and bin/kube-apiserver (built by hack/tools.sh) on loopback, with
# a static admin token and a kubeconfig in .xenferry/controlplane/.
#
#   hack/controlplane.sh up      start (idempotent: a running plane is reused)
#   hack/controlplane.sh down    stop exactly the processes it started, remove state
#   hack/controlplane.sh status  say whether it runs
#   hack/controlplane.sh env     print `export KUBECONFIG=...`
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN="$ROOT/bin"
CP="$ROOT/.xenferry/controlplane"
KUBECONFIG_FILE="$CP/kubeconfig"
export GOTOOLCHAIN=local

log() { printf '[controlplane] %s\n' "$*"; }

free_port() {
	python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()' 2>/dev/null ||
		echo $(( 20000 + RANDOM % 20000 ))
}

# alive PIDFILE BINARY: the pid in PIDFILE runs BINARY (so we never signal a
# recycled pid that belongs to someone else).
# A binary rebuilt while it runs shows as "PATH (deleted)": still ours.
alive() {
	local pid exe
	[ -f "$1" ] || return 1
	pid=$(cat "$1")
	[ -n "$pid" ] && exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
	[ "${exe% (deleted)}" = "$(readlink -f "$2")" ]
}

stop_one() { # NAME BINARY
	local pidf="$CP/$1.pid" pid
	if alive "$pidf" "$2"; then
		pid=$(cat "$pidf")
		kill "$pid" 2>/dev/null || true
		for _ in $(seq 50); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -9 "$pid" 2>/dev/null || true
		log "stopped $1 (pid $pid)"
	fi
	rm -f "$pidf"
}

down() {
	stop_one kube-apiserver "$BIN/kube-apiserver"
	stop_one etcd "$BIN/etcd"
	rm -rf "$CP"
}

ready() {
	[ -f "$CP/token" ] && [ -f "$CP/port" ] &&
		curl -fsSk -H "Authorization: Bearer $(cat "$CP/token")" "https://127.0.0.1:$(cat "$CP/port")/readyz" >/dev/null 2>&1
}

up() {
	for b in etcd kube-apiserver; do
		[ -x "$BIN/$b" ] || { log "bin/$b is missing: run hack/tools.sh (or make tools) first"; exit 1; }
	done
	if alive "$CP/kube-apiserver.pid" "$BIN/kube-apiserver" && alive "$CP/etcd.pid" "$BIN/etcd" && ready; then
		log "already running; KUBECONFIG=$KUBECONFIG_FILE"
		return
	fi
	down
	mkdir -p "$CP/certs" "$CP/etcd-data"
	local t0 eport pport aport token
	t0=$(date +%s)
	eport=$(free_port); pport=$(free_port); aport=$(free_port)
	token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
	echo "$token" >"$CP/token"
	echo "$aport" >"$CP/port"
	echo "$token,xenferry-admin,xenferry-admin,system:masters" >"$CP/tokens.csv"
	(cd "$ROOT/hack/tools" && go build -o "$BIN/sakey" ./sakey) || { log "cannot build hack/tools/sakey"; exit 1; }
	"$BIN/sakey" "$CP/sa.key" "$CP/sa.pub"

	# Each daemon runs in a session of its own (setsid execs it: a background
	# child of this script is no group leader, so $! stays its pid): a
	# Ctrl-C in the terminal reaches the demo script, which stops the plane
	# last, after the agents and the controller that talk to it.
	# etcd reads every ETCD_* variable as a flag: run it with a clean set.
	setsid env -u ETCD_NAME "$BIN/etcd" --name xenferry --data-dir "$CP/etcd-data" \
		--listen-client-urls "http://127.0.0.1:$eport" --advertise-client-urls "http://127.0.0.1:$eport" \
		--listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
		--initial-cluster "xenferry=http://127.0.0.1:$pport" --log-level warn \
		>"$CP/etcd.log" 2>&1 &
	echo $! >"$CP/etcd.pid"
	log "etcd on 127.0.0.1:$eport (pid $(cat "$CP/etcd.pid"), log $CP/etcd.log)"

	setsid "$BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$eport" \
		--bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$aport" \
		--cert-dir "$CP/certs" --token-auth-file "$CP/tokens.csv" --authorization-mode RBAC \
		--service-account-key-file "$CP/sa.pub" --service-account-signing-key-file "$CP/sa.key" \
		--service-account-issuer https://kubernetes.default.svc.cluster.local \
		--service-cluster-ip-range 10.96.0.0/24 --endpoint-reconciler-type none \
		--disable-admission-plugins ServiceAccount --allow-privileged=true \
		>"$CP/kube-apiserver.log" 2>&1 &
	echo $! >"$CP/kube-apiserver.pid"
	log "kube-apiserver on https://127.0.0.1:$aport (pid $(cat "$CP/kube-apiserver.pid"), log $CP/kube-apiserver.log)"

	cat >"$KUBECONFIG_FILE" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: xenferry
  cluster:
    server: https://127.0.0.1:$aport
    insecure-skip-tls-verify: true
users:
- name: xenferry-admin
  user:
    token: $token
contexts:
- name: xenferry
  context: {cluster: xenferry, user: xenferry-admin, namespace: default}
current-context: xenferry
EOF
	chmod 600 "$KUBECONFIG_FILE"
	# 120 s: on a loaded 2-core machine the first start took 19 s.
	for i in $(seq 240); do
		if ready; then
			log "ready in $(( $(date +%s) - t0 ))s; export KUBECONFIG=$KUBECONFIG_FILE"
			return
		fi
		if ! alive "$CP/kube-apiserver.pid" "$BIN/kube-apiserver" || ! alive "$CP/etcd.pid" "$BIN/etcd"; then
			log "a control-plane process exited; last lines of its log:"
			tail -n 20 "$CP/etcd.log" "$CP/kube-apiserver.log" >&2 || true
			down
			exit 1
		fi
		[ $((i % 10)) -eq 0 ] && log "waiting for /readyz ($((i / 2))s)"
		sleep 0.5
	done
	log "kube-apiserver not ready after 120s; see $CP/kube-apiserver.log"
	tail -n 20 "$CP/kube-apiserver.log" >&2 || true
	down
	exit 1
}

case "${1:-}" in
up) up ;;
down) down; log "down" ;;
status)
	if ready; then log "running; KUBECONFIG=$KUBECONFIG_FILE"; else log "not running"; exit 1; fi ;;
env) echo "export KUBECONFIG=$KUBECONFIG_FILE" ;;
*) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
