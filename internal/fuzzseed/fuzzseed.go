// Package fuzzseed writes seed corpus files for native Go fuzz targets, in
// the format `go test` reads from testdata/fuzz/FuzzXxx/ ("go test fuzz
// v1"). The seeds are generated from the encoders' real output by tests
// that run only when asked:
//
//	XENFERRY_FUZZ_SEEDS=write go test -run '^TestWriteFuzzSeeds$' ./pkg/...
//
// Only test code imports this package.
package fuzzseed

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// Env is the environment variable that turns the seed writers on.
const Env = "XENFERRY_FUZZ_SEEDS"

// MaxFile bounds one seed file: the corpora are committed, and a fuzz
// target mutates small inputs far faster than large ones.
const MaxFile = 128 << 10

// Writer writes the seeds of one package's fuzz targets.
type Writer struct {
	t testing.TB
	// Root is the corpus directory, testdata/fuzz by default; a writer
	// for inputs that fail today points it elsewhere.
	Root string
}

// New returns a Writer, or skips the test unless Env is "write".
func New(t testing.TB) *Writer {
	t.Helper()
	if os.Getenv(Env) != "write" {
		t.Skipf("writes the committed fuzz seeds; run with %s=write", Env)
	}
	return &Writer{t: t, Root: filepath.Join("testdata", "fuzz")}
}

// Clear removes the committed seeds of target, so that a generator run
// leaves exactly what it writes (found crashers are kept: their names are
// hashes, not seed names, and a fixed crasher stays a regression test).
func (w *Writer) Clear(target string) {
	w.t.Helper()
	files, _ := filepath.Glob(filepath.Join(w.Root, target, "seed-*"))
	for _, f := range files {
		if err := os.Remove(f); err != nil {
			w.t.Fatal(err)
		}
	}
}

// Add writes <Root>/<target>/seed-<name> holding vals, which must
// match the target's f.Fuzz arguments in order and type.
func (w *Writer) Add(target, name string, vals ...any) {
	w.t.Helper()
	b := Marshal(vals...)
	if len(b) > MaxFile {
		w.t.Fatalf("seed %s/%s is %d bytes (limit %d)", target, name, len(b), MaxFile)
	}
	dir := filepath.Join(w.Root, target)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		w.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "seed-"+name), b, 0o644); err != nil {
		w.t.Fatal(err)
	}
}

// Marshal encodes vals as a corpus file. It supports the argument types
// the project's targets use.
func Marshal(vals ...any) []byte {
	var b bytes.Buffer
	b.WriteString("go test fuzz v1\n")
	for _, v := range vals {
		switch v := v.(type) {
		case []byte:
			fmt.Fprintf(&b, "[]byte(%q)\n", v)
		case string:
			fmt.Fprintf(&b, "string(%q)\n", v)
		case byte:
			fmt.Fprintf(&b, "byte(%q)\n", v)
		case uint16, uint32, uint64, int, int64, bool:
			fmt.Fprintf(&b, "%T(%v)\n", v, v)
		default:
			panic(fmt.Sprintf("fuzzseed: unsupported type %T", v))
		}
	}
	return b.Bytes()
}
