#!/usr/bin/env bash
# hack/prometheus-check.sh: `promtool check rules` and `promtool test rules`
# on config/prometheus. promtool reads plain rule files, so the spec of the
# PrometheusRule in rules.yaml is extracted first (python3-yaml). promtool
# comes from Debian's prometheus package, installed when missing.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
log() { printf '[prometheus-check] %s\n' "$*"; }

need=()
command -v promtool >/dev/null || need+=(prometheus)
python3 -c 'import yaml' 2>/dev/null || need+=(python3-yaml)
if ((${#need[@]})); then
	[ "$(id -u)" = 0 ] || { log "need root to install ${need[*]} (or install them yourself)"; exit 1; }
	log "installing ${need[*]} from Debian"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - config/prometheus/rules.yaml "$work/xenferry.rules.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
rules = [d for d in docs if d.get("kind") == "PrometheusRule"]
if len(rules) != 1:
    sys.exit(f"{sys.argv[1]}: want one PrometheusRule, found {len(rules)}")
yaml.safe_dump(rules[0]["spec"], open(sys.argv[2], "w"), sort_keys=False)
PY
cp config/prometheus/rules_test.yaml "$work/"
promtool check rules "$work/xenferry.rules.yaml"
promtool test rules "$work/rules_test.yaml"
# Every xenferry metric the rules and the dashboard read must be one the
# code defines (histograms by their base name).
missing=0
for m in $(grep -ohE 'xenferry_[a-z_]+' config/prometheus/rules.yaml config/grafana/*.json | grep -v '_$' | sed -E 's/_(bucket|sum|count)$//' | sort -u); do
	if ! grep -rqs "\"$m\"" --include='*.go' controllers node-agent internal; then
		log "$m is read by config/prometheus or config/grafana but defined nowhere in the code"
		missing=1
	fi
done
[ "$missing" = 0 ] || exit 1
log "ok: rules valid, their unit tests pass, every metric they and the dashboard read exists"
