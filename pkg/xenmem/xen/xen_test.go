package xen

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/xenferry/xenferry/pkg/xenmem"
)

// fakeXL answers xl commands from files in testdata/DIR: info.txt,
// list.txt and list-l.json.
func fakeXL(t *testing.T, dir string) Runner {
	t.Helper()
	return func(_ context.Context, name string, args ...string) ([]byte, error) {
		file := map[string]string{"info": "info.txt", "list": "list.txt", "list -l": "list-l.json"}[strings.Join(args, " ")]
		if file == "" {
			return nil, fmt.Errorf("unexpected command %s %v", name, args)
		}
		return os.ReadFile(filepath.Join("testdata", dir, file))
	}
}

func TestInventoryFromLabCaptures(t *testing.T) {
	// Captured in the xenlab (hack/xenlab): dom0 of host b with the PV
	// domU "xlab" running, and dom0 of host a with no guest.
	cases := []struct {
		name    string
		dir     string
		host    string
		domains []xenmem.DomainInfo
	}{
		{
			name: "a host with one running PV domU on a shared disk lists it with its disk",
			dir:  "lab-b-xlab",
			host: "xenlab-b",
			domains: []xenmem.DomainInfo{{
				Name: "xlab", MemoryBytes: 128 << 20, VCPUs: 1, State: xenmem.StateRunning,
				Disks: []xenmem.Disk{{ID: "xvda", Path: "/dev/vdb"}},
				// xl list's Time(s) column of the captured output.
				CPUTime: 10200 * time.Millisecond,
			}},
		},
		{
			name:    "a host with only dom0 lists no domain",
			dir:     "lab-a-empty",
			host:    "xenlab-a",
			domains: []xenmem.DomainInfo{},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := os.Stat(filepath.Join("testdata", tc.dir)); err != nil {
				t.Fatalf("capture missing: %v", err)
			}
			h, err := Open(context.Background(), Options{Run: fakeXL(t, tc.dir), Capabilities: "-"})
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			info, err := h.Info(context.Background())
			if err != nil {
				t.Fatalf("Info: %v", err)
			}
			if info.Name != tc.host || info.Backend != "xen" || !strings.HasPrefix(info.Version, "4.17") ||
				info.CPUs < 1 || info.TotalMemoryBytes <= info.FreeMemoryBytes || info.FreeMemoryBytes == 0 {
				t.Errorf("host info %+v: want host %s, backend xen, version 4.17.x, cpus, total > free > 0", info, tc.host)
			}
			doms, err := h.Domains(context.Background())
			if err != nil {
				t.Fatalf("Domains: %v", err)
			}
			if len(doms) != len(tc.domains) {
				t.Fatalf("got %d domains %+v, want %d", len(doms), doms, len(tc.domains))
			}
			uuid := regexp.MustCompile(`^[0-9a-f-]{36}$`)
			for i, want := range tc.domains {
				got := doms[i]
				if got.ID <= 0 || !uuid.MatchString(got.UUID) || len(got.Config) == 0 {
					t.Errorf("domain %d: id %d, uuid %q, %d bytes of config: want id > 0, a UUID, the config", i, got.ID, got.UUID, len(got.Config))
				}
				got.ID, got.UUID, got.Config = 0, "", nil
				if !reflect.DeepEqual(got, want) {
					t.Errorf("domain %d:\n got %+v\nwant %+v", i, got, want)
				}
			}
		})
	}
}

func TestParseListLong(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    []xenmem.DomainInfo
		wantErr bool
	}{
		{
			name: "an entry without a configuration keeps its id and leaves the rest to xl list",
			in:   `[{"domid": 0, "config": {}}]`,
			want: []xenmem.DomainInfo{{ID: 0, Config: []byte("{}")}},
		},
		{
			name: "memory comes from target_memkb, vCPUs from avail_vcpus, a cdrom is not a disk, readwrite 0 is read-only",
			in: `[{"domid": 7, "config": {"c_info": {"type": "hvm", "name": "web", "uuid": "0d3c9a4e-1f5b-4c1e-9e55-6a3f5b8d2c11"},
				"b_info": {"max_vcpus": 4, "avail_vcpus": [0, 1], "max_memkb": 2097152, "target_memkb": 1048576},
				"disks": [{"pdev_path": "/srv/web.img", "vdev": "xvda", "readwrite": 1},
				          {"pdev_path": "/srv/data.img", "vdev": "xvdb", "readwrite": 0},
				          {"pdev_path": "/srv/cd.iso", "vdev": "hdc", "is_cdrom": 1}]}}]`,
			want: []xenmem.DomainInfo{{
				ID: 7, Name: "web", UUID: "0d3c9a4e-1f5b-4c1e-9e55-6a3f5b8d2c11", MemoryBytes: 1 << 30, VCPUs: 2,
				Disks: []xenmem.Disk{{ID: "xvda", Path: "/srv/web.img"}, {ID: "xvdb", Path: "/srv/data.img", ReadOnly: true}},
			}},
		},
		{name: "empty output is no domain", in: "\n", want: nil},
		{name: "text that is not JSON is rejected", in: "libxl: error: cannot connect", wantErr: true},
		{name: "an entry without domid is rejected", in: `[{"config": {}}]`, wantErr: true},
		{name: "a configuration of the wrong shape is rejected", in: `[{"domid": 1, "config": {"b_info": {"max_memkb": "lots"}}}]`, wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseListLong([]byte(tc.in))
			if tc.wantErr {
				if !errors.Is(err, ErrBadOutput) {
					t.Fatalf("err = %v, want ErrBadOutput", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseListLong: %v", err)
			}
			for i := range got {
				if string(got[i].Config) != "{}" {
					got[i].Config = nil
				}
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("\n got %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

func TestParseList(t *testing.T) {
	rows, err := ParseList([]byte(`Name                                        ID   Mem VCPUs	State	Time(s)
Domain-0                                     0   512     1     r-----      41.3
my guest                                     3   256     2     -b----       2.0
web--incoming                                4   128     1     --p---       0.0
old                                          5   128     1     ---s--       9.1
`))
	if err != nil {
		t.Fatalf("ParseList: %v", err)
	}
	if len(rows) != 4 {
		t.Errorf("got %d rows, want 4", len(rows))
	}
	if want := (listRow{Name: "my guest", MemoryBytes: 256 << 20, VCPUs: 2, State: xenmem.StateRunning, CPUTime: 2 * time.Second}); rows[3] != want {
		t.Errorf("a name with a space: got %+v, want %+v", rows[3], want)
	}
	if rows[4].State != xenmem.StatePaused || rows[5].State != xenmem.StateShutdown {
		t.Errorf("states: got %s and %s, want Paused and Shutdown", rows[4].State, rows[5].State)
	}
	if rows[0].CPUTime != 41300*time.Millisecond || rows[5].CPUTime != 9100*time.Millisecond {
		t.Errorf("Time(s): got %v and %v, want 41.3s and 9.1s", rows[0].CPUTime, rows[5].CPUTime)
	}
	for _, bad := range []string{"xl: command not found\n", "Name ID Mem VCPUs State Time(s)\nbroken line\n", "",
		"Name ID Mem VCPUs State Time(s)\nvm 3 256 2 -b---- soon\n", "Name ID Mem VCPUs State Time(s)\nvm 3 256 2 -b---- -1.0\n"} {
		if _, err := ParseList([]byte(bad)); !errors.Is(err, ErrBadOutput) {
			t.Errorf("ParseList(%q) err = %v, want ErrBadOutput", bad, err)
		}
	}
}

func TestParseInfo(t *testing.T) {
	for _, bad := range []string{"release : 6.1\n", "host : h\nxen_version : 4.17.5\ntotal_memory : many\n"} {
		if _, err := ParseInfo([]byte(bad)); !errors.Is(err, ErrBadOutput) {
			t.Errorf("ParseInfo(%q) err = %v, want ErrBadOutput", bad, err)
		}
	}
	info, err := ParseInfo([]byte("host : h\nxen_major : 4\nxen_minor : 17\nxen_extra : .5\ntotal_memory : 1024\nfree_memory : 100\nnr_cpus : 2\n"))
	if err != nil {
		t.Fatalf("ParseInfo: %v", err)
	}
	if want := (xenmem.HostInfo{Name: "h", Backend: "xen", Version: "4.17.5", TotalMemoryBytes: 1 << 30, FreeMemoryBytes: 100 << 20, CPUs: 2, Capabilities: Capabilities}); !reflect.DeepEqual(info, want) {
		t.Errorf("got %+v, want %+v", info, want)
	}
}

func TestMigrationNames(t *testing.T) {
	if n, st := migrationName("web--incoming", xenmem.StatePaused); n != "web" || st != xenmem.StateIncoming {
		t.Errorf("web--incoming: got %s %s", n, st)
	}
	if n, st := migrationName("web--migratedaway", xenmem.StatePaused); n != "web" || st != xenmem.StateMigrating {
		t.Errorf("web--migratedaway: got %s %s", n, st)
	}
}

func TestOpenWithoutXen(t *testing.T) {
	tests := []struct {
		name string
		opts func(t *testing.T) Options
	}{
		{
			name: "no xl command means the backend is absent",
			opts: func(t *testing.T) Options { return Options{XL: "xl-not-installed-here"} },
		},
		{
			name: "no /proc/xen/capabilities means this is not Xen",
			opts: func(t *testing.T) Options {
				return Options{Run: fakeXL(t, "none"), Capabilities: filepath.Join(t.TempDir(), "capabilities")}
			},
		},
		{
			name: "a domU (capabilities without control_d) is not dom0",
			opts: func(t *testing.T) Options {
				p := filepath.Join(t.TempDir(), "capabilities")
				if err := os.WriteFile(p, nil, 0o644); err != nil {
					t.Fatal(err)
				}
				return Options{Run: fakeXL(t, "none"), Capabilities: p}
			},
		},
		{
			name: "a toolstack that does not answer is reported with its error",
			opts: func(t *testing.T) Options {
				run := func(context.Context, string, ...string) ([]byte, error) {
					return nil, errors.New("xl info: exit status 1: libxl: error: cannot open libxc handle")
				}
				return Options{Run: run, Capabilities: "-"}
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Open(context.Background(), tc.opts(t))
			if !errors.Is(err, xenmem.ErrBackendAbsent) {
				t.Fatalf("err = %v, want ErrBackendAbsent", err)
			}
			t.Log(err)
		})
	}
}

func TestDataPathIsXLMigrate(t *testing.T) {
	h := &Host{}
	if _, err := h.OpenSource(context.Background(), "web"); !errors.Is(err, xenmem.ErrNotSupported) || !strings.Contains(err.Error(), "xl-send") {
		t.Errorf("OpenSource err = %v, want ErrNotSupported naming xl-send", err)
	}
	if _, err := h.CreateTarget(context.Background(), xenmem.DomainInfo{Name: "web"}); !errors.Is(err, xenmem.ErrNotSupported) {
		t.Errorf("CreateTarget err = %v, want ErrNotSupported", err)
	}
}

// TestEarlyResumeIsOfferedOnlyWhereThePagerCanRun: a host publishes early
// resume (and the post-copy strategies) only when paging can be enabled.
func TestEarlyResumeIsOfferedOnlyWhereThePagerCanRun(t *testing.T) {
	for _, tc := range []struct {
		name  string
		probe func() error
		early bool
	}{
		{"hypervisor with memory paging", func() error { return nil }, true},
		{"stock hypervisor", func() error { return errors.New("no memory paging (ENOSYS)") }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dirs, _ := filepath.Glob("testdata/*")
			if len(dirs) == 0 {
				t.Fatal("no testdata")
			}
			h, err := Open(context.Background(), Options{Run: fakeXL(t, filepath.Base(dirs[0])), Capabilities: "-", ProbePaging: tc.probe})
			if err != nil {
				t.Fatal(err)
			}
			info, err := h.Info(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			c := info.Capabilities
			if c.EarlyResume != tc.early || slices.Contains(c.Strategies, "postcopy") != tc.early || !slices.Contains(c.Strategies, "precopy") {
				t.Fatalf("capabilities %+v, want early resume %v", c, tc.early)
			}
		})
	}
}
