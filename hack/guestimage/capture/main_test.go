package main

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

func TestParseEvent(t *testing.T) {
	for _, tc := range []struct {
		line   string
		ok     bool
		name   string
		fields map[string]string
	}{
		{line: "XF idle uptime=56.27 memfree=862MiB\r\n", ok: true, name: "idle", fields: map[string]string{"uptime": "56.27", "memfree": "862MiB"}},
		{line: "XF error msg=compile failed: no gcc", ok: true, name: "error", fields: map[string]string{"msg": "compile failed: no gcc"}},
		{line: "XF", ok: false},
		{line: "XF ", ok: false},
		{line: "[   24.2] xf-workload: boot", ok: false},
	} {
		ev, ok := parseEvent(tc.line)
		if ok != tc.ok {
			t.Fatalf("parseEvent(%q) ok = %v, want %v", tc.line, ok, tc.ok)
		}
		if !ok {
			continue
		}
		if ev.Name != tc.name {
			t.Errorf("parseEvent(%q) name = %q, want %q", tc.line, ev.Name, tc.name)
		}
		for k, v := range tc.fields {
			if ev.Fields[k] != v {
				t.Errorf("parseEvent(%q) field %s = %q, want %q", tc.line, k, ev.Fields[k], v)
			}
		}
	}
}

func TestSparseCopy(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	// 3.5 MiB: data, a zero MiB, data, a half MiB of zeros at the end.
	data := make([]byte, 7<<19)
	for i := 0; i < 1<<20; i++ {
		data[i] = byte(i*7 + 1)
		data[2<<20+i] = byte(i*13 + 5)
	}
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "dst")
	n, err := sparseCopy(src, dst)
	if err != nil {
		t.Fatal(err)
	}
	if n != 2<<20 {
		t.Errorf("written = %d, want %d (zero chunks must be skipped)", n, 2<<20)
	}
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("copy differs from source (len %d vs %d)", len(got), len(data))
	}

	// A file with real holes: 1 MiB of data at 5 MiB in a 16 MiB file.
	holey := filepath.Join(dir, "holey")
	f, err := os.Create(holey)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(data[:1<<20], 5<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(16 << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	want, _ := os.ReadFile(holey)
	if n, err = sparseCopy(holey, dst); err != nil {
		t.Fatal(err)
	}
	if n != 1<<20 {
		t.Errorf("holey: written = %d, want %d", n, 1<<20)
	}
	if got, _ = os.ReadFile(dst); !bytes.Equal(got, want) {
		t.Fatalf("holey: copy differs from source (len %d vs %d)", len(got), len(want))
	}

	if _, err := sparseCopy(filepath.Join(dir, "missing"), dst); err == nil {
		t.Fatal("missing source: no error")
	}
}
