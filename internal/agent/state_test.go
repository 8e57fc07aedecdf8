package agent

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Records round-trip, a bad UID never reaches the file system, an
// oversized or mislabelled file is refused, and the directory stays
// bounded without dropping a record that still holds a committed domain.
func TestInflightRecords(t *testing.T) {
	dir := t.TempDir()
	rec := inflight{UID: "3f6c-11aa", Namespace: "ns", Name: "m", Role: roleSourceName, Domain: "web", Committed: true, Phase: "PostCopy", Updated: time.Now().UTC()}
	if err := writeInflight(dir, rec); err != nil {
		t.Fatal(err)
	}
	got, err := readInflight(dir, rec.UID)
	if err != nil || got == nil || got.Domain != "web" || !got.Committed || got.Phase != "PostCopy" {
		t.Fatalf("read back %+v, %v", got, err)
	}
	if got, err := readInflight(dir, "absent"); got != nil || err != nil {
		t.Fatalf("absent record: %+v, %v", got, err)
	}
	for _, bad := range []string{"../etc/passwd", "a/b", "", strings.Repeat("x", 65)} {
		if err := writeInflight(dir, inflight{UID: bad}); err == nil {
			t.Errorf("UID %q accepted", bad)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "big.json"), make([]byte, maxInflightBytes+1), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := readInflight(dir, "big"); err == nil {
		t.Error("an oversized record was read")
	}
	if err := os.WriteFile(filepath.Join(dir, "other.json"), []byte(`{"uid":"someone-else"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := readInflight(dir, "other"); err == nil {
		t.Error("a record naming another UID was accepted")
	}
	for i := range maxInflight + 20 {
		r := inflight{UID: "u" + strings.Repeat("0", 4) + string(rune('a'+i%26)) + "-" + strconv.Itoa(i), Role: roleSourceName, Phase: phaseReleased, Committed: true}
		if err := writeInflight(dir, r); err != nil {
			t.Fatal(err)
		}
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) > maxInflight {
		t.Errorf("%d records kept, want at most %d", len(ents), maxInflight)
	}
	if got, err := readInflight(dir, rec.UID); err != nil || got == nil {
		t.Fatalf("the unresolved committed record was pruned: %v", err)
	}
}
