package sim

import (
	"strings"
	"testing"
)

func TestLoadConfigYAML(t *testing.T) {
	dir := t.TempDir()
	p := writeFile(t, dir, "host.yaml", `
name: node-a
memory: 8Gi
cpus: 2
stateDir: /var/lib/xenferry-sim
domains:
- name: web-1
  namespace: prod
  labels: {app: web}
  memory: 256Mi
  vcpus: 2
  disks:
  - {id: xvda, path: web-1.img, size: 1Gi}
  profile: {zero: 0.15, disk: 0.45, dirtyMiBps: 30, hotFraction: 0.0625, hotWriteShare: 0.9, readMiBps: 50, seed: 7}
`)
	cfg, err := LoadConfig(p)
	if err != nil {
		t.Fatalf("LoadConfig: %v", err)
	}
	if cfg.Name != "node-a" || len(cfg.Domains) != 1 {
		t.Fatalf("got %+v", cfg)
	}
	d := cfg.Domains[0]
	if d.Profile.HotWriteShare != 0.9 || d.Profile.Seed != 7 || d.Disks[0].Size != "1Gi" || d.Labels["app"] != "web" {
		t.Fatalf("domain parsed wrong: %+v", d)
	}
	if got := cfg.diskPath(d.Disks[0].Path); got != "/var/lib/xenferry-sim/web-1.img" {
		t.Fatalf("relative disk path resolved to %q", got)
	}
}

func TestLoadConfigJSON(t *testing.T) {
	p := writeFile(t, t.TempDir(), "host.json", `{"name":"h","memory":"1Gi","cpus":1,"domains":[{"name":"a","memory":"4Mi","vcpus":1,"profile":{"zero":1}}]}`)
	if _, err := LoadConfig(p); err != nil {
		t.Fatalf("LoadConfig: %v", err)
	}
}

func TestLoadConfigRejectsBadInput(t *testing.T) {
	base := "name: h\nmemory: 1Gi\ncpus: 1\n"
	cases := []struct {
		name, yaml, want string
	}{
		{"unknown field is an error, not silently ignored", base + "memroy: 1Gi\n", "unknown field"},
		{"host memory must parse", "name: h\nmemory: lots\ncpus: 1\n", "memory: quantity \"lots\""},
		{"host needs a name", "memory: 1Gi\ncpus: 1\n", "name: must be set"},
		{"domain memory must be page aligned", base + "domains: [{name: a, memory: \"5000\", vcpus: 1}]\n", "multiple of 4 KiB"},
		{"vcpus are bounded", base + "domains: [{name: a, memory: 4Mi, vcpus: 99}]\n", "vcpus 99"},
		{"fractions stay within [0,1]", base + "domains: [{name: a, memory: 4Mi, vcpus: 1, profile: {zero: 1.5}}]\n", "profile.zero 1.5"},
		{"zero and disk fractions cannot exceed 1", base + "domains: [{name: a, memory: 4Mi, vcpus: 1, disks: [{id: x, path: p}], profile: {zero: 0.6, disk: 0.6}}]\n", "exceed 1"},
		{"disk pages need a disk", base + "domains: [{name: a, memory: 4Mi, vcpus: 1, profile: {disk: 0.5}}]\n", "no disk"},
		{"rates are not negative", base + "domains: [{name: a, memory: 4Mi, vcpus: 1, profile: {dirtyMiBps: -1}}]\n", "dirtyMiBps -1"},
		{"domain names are unique", base + "domains: [{name: a, memory: 4Mi, vcpus: 1}, {name: a, memory: 4Mi, vcpus: 1}]\n", "used twice"},
		{"domains fit the host", "name: h\nmemory: 4Mi\ncpus: 1\ndomains: [{name: a, memory: 8Mi, vcpus: 1}]\n", "host memory is"},
		{"image excludes profile fractions", base + "domains: [{name: a, memory: 4Mi, vcpus: 1, image: /x, profile: {zero: 0.5}}]\n", "exclusive"},
		{"domain names are DNS-like", base + "domains: [{name: A_b, memory: 4Mi, vcpus: 1}]\n", "name \"A_b\""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := writeFile(t, t.TempDir(), "c.yaml", tc.yaml)
			_, err := LoadConfig(p)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("LoadConfig error = %v, want it to mention %q", err, tc.want)
			}
			if !strings.Contains(err.Error(), p) {
				t.Fatalf("error %q does not name the file", err)
			}
		})
	}
}

func TestParseBytes(t *testing.T) {
	for in, want := range map[string]uint64{"4096": 4096, "256Mi": 256 << 20, "1Gi": 1 << 30, "2K": 2000, "1G": 1e9, " 8Ki ": 8192} {
		got, err := ParseBytes(in)
		if err != nil || got != want {
			t.Errorf("ParseBytes(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "Mi", "-1", "1.5Gi", "99999999999999999999Ti"} {
		if _, err := ParseBytes(in); err == nil {
			t.Errorf("ParseBytes(%q) succeeded", in)
		}
	}
}

func TestGenerateDiskIsIdempotent(t *testing.T) {
	p := t.TempDir() + "/d.img"
	if err := GenerateDisk(p, 1<<20, 3); err != nil {
		t.Fatal(err)
	}
	a := diskIndex(t, p)
	if len(a) != 256 {
		t.Fatalf("random disk has %d distinct blocks of 256", len(a))
	}
	if err := GenerateDisk(p, 1<<20, 99); err != nil {
		t.Fatalf("second GenerateDisk with same size: %v", err)
	}
	b := diskIndex(t, p)
	for k := range a {
		if !b[k] {
			t.Fatal("GenerateDisk rewrote an existing image")
		}
	}
	if err := GenerateDisk(p, 2<<20, 3); err == nil || !strings.Contains(err.Error(), "exists with size") {
		t.Fatalf("GenerateDisk over an image of another size: %v", err)
	}
	if err := GenerateDisk(p+"x", 1000, 3); err == nil {
		t.Fatal("GenerateDisk accepted a size that is not a multiple of 4096")
	}
}
