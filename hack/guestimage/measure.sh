#!/usr/bin/env bash
# Measures the guest-image dumps: memscan fractions (zero / on disk at 4 KiB
# alignment / extra at 512-byte alignment / other) and, with MIGBENCH=1, the
# wire bytes of hack/migbench's precopy and precopy+dedup on the same pair.
# Prints a Markdown table on stdout. Raw JSON lines go to .work/measure.jsonl.
#
# Usage: hack/guestimage/measure.sh [NAME=MEM,DISK ...]
#   Without arguments it measures every pair under .work/variants/ (from
#   `build.sh variants`), or else .work/{mem,disk}.raw and the idle pair.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
W="$HERE/.work"
MIGBENCH=${MIGBENCH:-0}
log() { printf '[measure %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

pairs=("$@")
if ((${#pairs[@]} == 0)); then
	if compgen -G "$W/variants/*/mem.raw" >/dev/null; then
		for d in "$W"/variants/*/; do
			n=$(basename "$d")
			[[ -f $d/mem.raw ]] && pairs+=("$n=$d/mem.raw,$d/disk.raw")
			[[ -f $d/mem-idle.raw ]] && pairs+=("$n-idle=$d/mem-idle.raw,$d/disk-idle.raw")
		done
	else
		[[ -f $W/mem.raw ]] || die "no dumps: run hack/guestimage/build.sh (or make guest-image) first"
		pairs+=("workload=$W/mem.raw,$W/disk.raw")
		[[ -f $W/mem-idle.raw ]] && pairs+=("idle=$W/mem-idle.raw,$W/disk-idle.raw")
	fi
fi

cd "$ROOT"
mkdir -p "$W/bin"
go build -o "$W/bin/memscan" ./hack/memscan || die "go build ./hack/memscan failed"
if [[ $MIGBENCH == 1 ]]; then
	go build -o "$W/bin/migbench" ./hack/migbench || die "go build ./hack/migbench failed"
fi
out="$W/measure.jsonl"
: >"$out"

if [[ $MIGBENCH == 1 ]]; then
	echo "| dump | zero | on disk (4 KiB-aligned) | more at 512 B | other | wire precopy | wire precopy+dedup | saved |"
	echo "|---|---|---|---|---|---|---|---|"
else
	echo "| dump | zero | on disk (4 KiB-aligned) | more at 512 B | other |"
	echo "|---|---|---|---|---|"
fi
for p in "${pairs[@]}"; do
	name=${p%%=*}
	files=${p#*=}
	mem=$(realpath "${files%%,*}")
	disk=$(realpath "${files#*,}")
	log "$name: memscan"
	ms=$("$W/bin/memscan" -q -fine 512 -json -mem "$mem" -disk "$disk") || die "memscan $name failed"
	echo "{\"name\":\"$name\",\"memscan\":$ms}" >>"$out"
	row=$(python3 -c '
import json, sys
r = json.loads(sys.argv[1])
pct = lambda k: "%.1f%%" % (100 * r[k] / r["pages"])
print("| %s | %s | %s | %d pages | %s |" % (sys.argv[2], pct("zero"), pct("disk4k"), r["diskFine"], pct("other")), end="")
' "$ms" "$name")
	if [[ $MIGBENCH == 1 ]]; then
		log "$name: migbench precopy, precopy+dedup (1 GiB each, nice -n 10)"
		mb=$(nice -n 10 "$W/bin/migbench" -scenario "image:$mem,$disk" -strategy precopy,precopy+dedup \
			-memory "$(stat -c %s "$mem")" -json 2>"$W/migbench-$name.log") || die "migbench $name failed; see $W/migbench-$name.log"
		echo "{\"name\":\"$name\",\"migbench\":[$(echo "$mb" | paste -sd,)]}" >>"$out"
		row+=$(python3 -c '
import json, sys
runs = {r["strategy"]: r for r in map(json.loads, sys.argv[1].splitlines())}
a, b = runs["precopy"]["wireBytes"], runs["precopy+dedup"]["wireBytes"]
ok = all(r["verified"] for r in runs.values())
print(" %.1f MB | %.1f MB | %.1f%%%s |" % (a / 1e6, b / 1e6, 100 * (a - b) / a, "" if ok else " (NOT verified)"), end="")
' "$mb")
	fi
	echo "$row"
done
log "raw results: $out"
