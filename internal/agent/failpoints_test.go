package agent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"

	"github.com/xenferry/xenferry/pkg/xenmem"
)

func TestParseFailpoints(t *testing.T) {
	cases := []struct {
		name, spec string
		want       map[string]failpointAction
		wantErr    string
	}{
		{"empty spec configures nothing", "", map[string]failpointAction{}, ""},
		{"sleep and mark, separated by ; and newlines", "savestate=sleep:3s;\nrelease=mark\n# comment",
			map[string]failpointAction{"savestate": {sleep: 3 * time.Second, mark: true}, "release": {mark: true}}, ""},
		{"off removes an earlier term", "pause=sleep:1s;pause=off", map[string]failpointAction{}, ""},
		{"unknown point is rejected", "stopandcopy=sleep:1s", nil, "want NAME=ACTION"},
		{"unknown action is rejected", "pause=panic", nil, "unknown action"},
		{"sleep beyond the cap is rejected", "pause=sleep:1h", nil, "sleep wants a duration"},
		{"negative sleep is rejected", "pause=sleep:-1s", nil, "sleep wants a duration"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := parseFailpoints(c.spec)
			if c.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), c.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, c.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(c.want) {
				t.Fatalf("got %v, want %v", got, c.want)
			}
			for k, v := range c.want {
				if got[k] != v {
					t.Fatalf("%s: got %+v, want %+v", k, got[k], v)
				}
			}
		})
	}
}

// fakeSource records the calls that reach the wrapped handle.
type fakeSource struct {
	xenmem.SourceDomain
	calls []string
}

func (f *fakeSource) Info() xenmem.DomainInfo { return xenmem.DomainInfo{Name: "vm-1"} }
func (f *fakeSource) NumPages() uint64        { f.calls = append(f.calls, "NumPages"); return 8 }
func (f *fakeSource) Pause() error            { f.calls = append(f.calls, "Pause"); return nil }
func (f *fakeSource) SaveState() ([]byte, error) {
	f.calls = append(f.calls, "SaveState")
	return nil, nil
}
func (f *fakeSource) Release() error { f.calls = append(f.calls, "Release"); return nil }
func (f *fakeSource) Resume() error  { f.calls = append(f.calls, "Resume"); return nil }

func TestFailpointSourceIsTheHandleItselfWhenUnconfigured(t *testing.T) {
	t.Setenv(envFailpoints, "")
	t.Setenv(envFailpointsFile, "")
	t.Setenv(envFailpointsDir, "")
	f := &fakeSource{}
	if got := failpointSource(f); got != xenmem.SourceDomain(f) {
		t.Fatalf("failpointSource wrapped the handle with no failpoint configured: %T", got)
	}
}

func TestFailpointSourceHoldsAndMarksEachPoint(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "fp")
	if err := os.WriteFile(file, []byte("savestate=sleep:200ms\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv(envFailpoints, "release=mark")
	t.Setenv(envFailpointsFile, file)
	t.Setenv(envFailpointsDir, dir)
	f := &fakeSource{}
	sd := failpointSource(f)

	sd.NumPages()
	sd.NumPages()
	if err := sd.Pause(); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if _, err := sd.SaveState(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(t0); d < 200*time.Millisecond {
		t.Fatalf("savestate=sleep:200ms held the call for %v", d)
	}
	// The file is read on every evaluation: a point switched off there no
	// longer holds anything.
	if err := os.WriteFile(file, []byte("savestate=off\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t0 = time.Now()
	if _, err := sd.SaveState(); err != nil || time.Since(t0) > 100*time.Millisecond {
		t.Fatalf("savestate after off: err %v, took %v", err, time.Since(t0))
	}
	if err := sd.Release(); err != nil {
		t.Fatal(err)
	}
	if err := sd.Resume(); err != nil { // not a failpoint: passes straight through
		t.Fatal(err)
	}
	want := "NumPages NumPages Pause SaveState SaveState Release Resume"
	if got := strings.Join(f.calls, " "); got != want {
		t.Fatalf("calls reaching the handle: %q, want %q", got, want)
	}
	for name, hits := range map[string]int{"start": 1, "pause": 1, "savestate": 2, "release": 1} {
		b, err := os.ReadFile(filepath.Join(dir, name+".hit"))
		if err != nil {
			t.Fatalf("marker of %s: %v", name, err)
		}
		if n := strings.Count(string(b), "\n"); n != hits {
			t.Fatalf("%s marked %d times, want %d: %q", name, n, hits, b)
		}
		if !strings.Contains(string(b), " vm-1 ") {
			t.Fatalf("%s marker does not name the domain: %q", name, b)
		}
	}
}

func TestFailpointBadConfigurationIsIgnored(t *testing.T) {
	t.Setenv(envFailpoints, "pause=explode")
	t.Setenv(envFailpointsFile, "")
	t.Setenv(envFailpointsDir, "")
	f := &fakeSource{}
	sd := failpointSource(f)
	var logged []string
	sd.(*fpSource).fp.log = funcr.New(func(prefix, args string) { logged = append(logged, args) }, funcr.Options{})
	if err := sd.Pause(); err != nil {
		t.Fatal(err)
	}
	if len(logged) != 1 || !strings.Contains(logged[0], "Ignoring the failpoint configuration") {
		t.Fatalf("logged %q, want one line saying the configuration is ignored", logged)
	}
}
