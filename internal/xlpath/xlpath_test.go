package xlpath

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// Classify's table is xl 4.17's messages on each path (tools/xl/xl_migrate.c).
func TestClassify(t *testing.T) {
	for _, c := range []struct {
		exit      int
		msg       string
		committed bool
		want      Outcome
	}{
		{0, "migration sender: Target reports successful startup.\nMigration successful.\n", true, Migrated},
		{1, "migration sender: Trying to resume at our end.\nmigration sender: Resumed OK.\nMigration failed due to problems at target.\n", false, ResumedHere},
		{1, "Migration failed, resuming at sender.\n", false, Unknown},
		{1, "** Migration failed during final handshake **\nDomain state is now undefined !\n", true, Undecided},
		// The messages were lost (a restarted agent): the transport's
		// durable record decides.
		{1, "", true, Undecided},
		{1, "", false, Unknown},
		{1, "libxl: error: failed to suspend at sender\n", false, ResumedHere},
	} {
		if got := Classify(c.exit, c.msg, c.committed); got != c.want {
			t.Errorf("Classify(%d, %q, %v) = %s, want %s", c.exit, c.msg, c.committed, got, c.want)
		}
	}
}

func TestProgressFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "progress.json")
	if got, err := ReadProgress(p); err != nil || got != (Progress{}) {
		t.Fatalf("missing file: %+v, %v", got, err)
	}
	want := Progress{PID: 7, StreamBytes: 1 << 20, LinkBytes: 4096, ZeroPages: 200, StreamDone: true, Committed: true}
	if err := WriteProgress(p, want, true); err != nil {
		t.Fatal(err)
	}
	if got, err := ReadProgress(p); err != nil || got != want {
		t.Fatalf("read back %+v, %v; want %+v", got, err, want)
	}
	if err := os.WriteFile(p, bytes.Repeat([]byte(" "), maxProgressFile+1), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadProgress(p); err == nil {
		t.Fatal("an oversized progress file was read")
	}
	// Abort never signals a committed transport.
	if err := WriteProgress(p, Progress{PID: os.Getpid(), Committed: true}, false); err != nil {
		t.Fatal(err)
	}
	if asked, err := Abort(p); asked || err != nil {
		t.Fatalf("Abort of a committed transport: asked=%v err=%v", asked, err)
	}
}

func TestAuthFrame(t *testing.T) {
	var b bytes.Buffer
	a := Auth{Migration: "ns/m-1", Token: []byte("0123456789abcdef0123456789abcdef")}
	if err := WriteAuth(&b, a); err != nil {
		t.Fatal(err)
	}
	got, err := ReadAuth(&b)
	if err != nil || got.Migration != a.Migration || !bytes.Equal(got.Token, a.Token) {
		t.Fatalf("read back %+v, %v", got, err)
	}
	huge := append([]byte("XFA1"), binary.BigEndian.AppendUint32(nil, 1<<31)...)
	for name, in := range map[string][]byte{
		"empty":            nil,
		"standalone hello": []byte("XLS1\x00\x00\x00\x10xl migrate-receive"),
		"oversized body":   huge,
		"truncated body":   append([]byte("XFA1\x00\x00\x00\x10"), '{'),
		"no token":         append([]byte("XFA1\x00\x00\x00\x12"), []byte(`{"migration":"m"}`+" ")...),
	} {
		if _, err := ReadAuth(bytes.NewReader(in)); !errors.Is(err, ErrBadAuth) {
			t.Errorf("%s: err %v, want ErrBadAuth", name, err)
		}
	}
}
