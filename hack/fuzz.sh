#!/usr/bin/env bash
# hack/fuzz.sh runs every native Go fuzz target of the repository, one at a
# time (go test -fuzz takes one target of one package per run), each for a
# fixed budget. Targets are found by grepping the tracked *_test.go files
# for `func FuzzXxx(f *testing.F)`, so a new target is picked up without
# editing this script. Each target starts from its committed corpus
# (testdata/fuzz/FuzzXxx) plus the inputs it found in earlier runs on this
# machine (go's fuzz cache, $(go env GOCACHE)/fuzz).
#
# A failing input is written by go test to the package's
# testdata/fuzz/FuzzXxx/ (commit it with the fix: it becomes a regression
# test of `go test`). The script runs every target, then exits 1 if any
# failed, naming them.
#
#   FUZZTIME=10s         budget per target (go's -fuzztime: 30s, 1m, 5000x)
#   FUZZ_MATCH=regexp    only targets whose "package/FuzzName" matches
#   FUZZ_PARALLEL=n      fuzz workers per target (default: GOMAXPROCS)
#   FUZZ_LIST=1          print the targets and exit
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export GOTOOLCHAIN=local
FUZZTIME=${FUZZTIME:-10s}
FUZZ_MATCH=${FUZZ_MATCH:-.}

# "dir Target" lines, sorted.
targets=$(git ls-files -z --cached --others --exclude-standard -- '*_test.go' |
	xargs -0 grep -HoE '^func Fuzz[A-Za-z0-9_]+\(f \*testing\.F\)' |
	sed -E 's#^(.*)/[^/]+_test\.go:func (Fuzz[A-Za-z0-9_]+)\(.*#\1 \2#' |
	sort -u | while read -r dir name; do
		if [[ "$dir/$name" =~ $FUZZ_MATCH ]]; then echo "$dir $name"; fi
	done)
if [[ -z "$targets" ]]; then
	echo "fuzz: no targets match $FUZZ_MATCH" >&2
	exit 1
fi
if [[ -n "${FUZZ_LIST:-}" ]]; then
	echo "$targets"
	exit 0
fi

parallel=()
if [[ -n "${FUZZ_PARALLEL:-}" ]]; then parallel=(-parallel "$FUZZ_PARALLEL"); fi
n=$(echo "$targets" | wc -l)
echo "fuzz: $n targets, $FUZZTIME each"
failed=()
out=$(mktemp)
trap 'rm -f "$out"' EXIT
start=$SECONDS
while read -r dir name; do
	t0=$SECONDS
	echo "fuzz: ./$dir $name"
	# -fuzzminimizetime bounds the minimisation of each new input: at go's
	# default (60s) a short budget is spent minimising large seeds instead
	# of fuzzing.
	corpus="$dir/testdata/fuzz/$name"
	before=$(ls "$corpus" 2>/dev/null || true)
	set +e
	go test -run '^$' -fuzz "^${name}\$" -fuzztime "$FUZZTIME" -fuzzminimizetime 100x \
		"${parallel[@]}" "./$dir" 2>&1 | sed 's#^#  #' | tee "$out"
	rc=${PIPESTATUS[0]}
	set -e
	after=$(ls "$corpus" 2>/dev/null || true)
	if ((rc != 0)); then
		# go1.26's coordinator may report its own -fuzztime deadline as a
		# failure ("context deadline exceeded", no input written:
		# golang/go#75804, fixed in go1.27). Anything else fails, a new
		# input under testdata/fuzz above all.
		# Under load the same race can end with another message of the
		# coordinator; what makes a failure is an input: a new file in
		# the corpus, a panic, a failing seed or a test's own report.
		if [[ "$before" == "$after" ]] && ! grep -qE 'panic:|Failing input|seed corpus|\.go:[0-9]+: ' "$out"; then
			echo "fuzz: ./$dir $name: ignored a coordinator failure with no failing input (golang/go#75804): $(grep -E '^      [^ ]' "$out" | head -n 2 | tr -s ' ' | tr '\n' ' ')"
		else
			failed+=("./$dir $name")
		fi
	fi
	echo "fuzz: ./$dir $name: $((SECONDS - t0))s"
done <<<"$targets"
echo "fuzz: $n targets in $((SECONDS - start))s"
if ((${#failed[@]} > 0)); then
	echo "fuzz: FAILED (inputs under each package's testdata/fuzz/):" >&2
	printf '  %s\n' "${failed[@]}" >&2
	exit 1
fi
