package sim

import (
	"math/bits"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/xenferry/xenferry/internal/fuzzseed"
)

// FuzzLoadConfig loads arbitrary bytes as a host configuration. A refused
// one names the file; an accepted one validates, its domains fit the
// host's memory (summed without overflow), and it survives encode → load
// unchanged.
// Run: go test -run '^$' -fuzz '^FuzzLoadConfig$' ./pkg/xenmem/sim
func FuzzLoadConfig(f *testing.F) {
	for _, s := range configSeeds(f) {
		f.Add(s)
	}
	dir := f.TempDir()
	p := filepath.Join(dir, "host.yaml")
	again := filepath.Join(dir, "again.yaml")
	f.Fuzz(func(t *testing.T, b []byte) {
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		cfg, err := LoadConfig(p)
		if err != nil {
			if !strings.Contains(err.Error(), p) {
				t.Fatalf("error %q does not name the file", err)
			}
			return
		}
		if err := cfg.Validate(); err != nil {
			t.Fatalf("loaded configuration does not validate: %v", err)
		}
		capacity, err := ParseBytes(cfg.Memory)
		if err != nil {
			t.Fatalf("host memory %q: %v", cfg.Memory, err)
		}
		var total, carry uint64
		for _, d := range cfg.Domains {
			m, err := ParseBytes(d.Memory)
			if err != nil {
				t.Fatalf("domain %s memory %q: %v", d.Name, d.Memory, err)
			}
			total, carry = bits.Add64(total, m, carry)
		}
		if carry != 0 || total > capacity {
			t.Fatalf("domains need %d bytes (overflow %d), host memory is %d", total, carry, capacity)
		}
		enc, err := yaml.Marshal(cfg)
		if err != nil {
			t.Fatalf("encode %+v: %v", cfg, err)
		}
		if err := os.WriteFile(again, enc, 0o644); err != nil {
			t.Fatal(err)
		}
		cfg2, err := LoadConfig(again)
		if err != nil {
			t.Fatalf("encoded configuration %q does not load: %v", enc, err)
		}
		if !reflect.DeepEqual(cfg, cfg2) {
			t.Fatalf("configuration %+v loads back as %+v", cfg, cfg2)
		}
	})
}

// FuzzParseBytes: a quantity parses to a number that parses back from its
// decimal form, and a plain number is taken as bytes.
// Run: go test -run '^$' -fuzz '^FuzzParseBytes$' ./pkg/xenmem/sim
func FuzzParseBytes(f *testing.F) {
	for _, s := range []string{"4096", "256Mi", "1Gi", "2K", "1G", " 8Ki ", "18446744073709551615", "16777216Ti", "-1", "1.5Gi", "Mi"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseBytes(s)
		if err != nil {
			return
		}
		back, err := ParseBytes(strconv.FormatUint(n, 10))
		if err != nil || back != n {
			t.Fatalf("ParseBytes(%q) = %d, which reads back as %d, %v", s, n, back, err)
		}
	})
}

func configSeeds(t testing.TB) [][]byte {
	var out [][]byte
	files, _ := filepath.Glob(filepath.Join("..", "..", "..", "config", "samples", "sim", "*.yaml"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, b)
	}
	cfg := Config{Name: "h", Memory: "1Gi", CPUs: 1, StateDir: "/var/lib/x", Domains: []DomainSpec{
		{Name: "a", Namespace: "ns", Labels: map[string]string{"app": "a"}, Memory: "4Mi", VCPUs: 1,
			Disks:   []DiskSpec{{ID: "xvda", Path: "a.img", Size: "8Mi"}},
			Profile: Profile{Zero: 0.5, Disk: 0.25, DirtyMiBps: 1, HotFraction: 0.5, HotWriteShare: 0.5, ReadMiBps: 2, Seed: 1}},
		{Name: "b.img", Memory: "4096", VCPUs: MaxVCPUs, Image: "/images/b.raw"},
	}}
	j, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	out = append(out, j, []byte(`{"name":"h","memory":"1Gi","cpus":1,"domains":[{"name":"a","memory":"4Mi","vcpus":1,"profile":{"zero":1}}]}`))
	return out
}

// TestWriteFuzzSeeds writes testdata/fuzz for this package's fuzz targets
// (see internal/fuzzseed).
func TestWriteFuzzSeeds(t *testing.T) {
	w := fuzzseed.New(t)
	w.Clear("FuzzLoadConfig")
	w.Clear("FuzzParseBytes")
	for i, s := range configSeeds(t) {
		w.Add("FuzzLoadConfig", "config-"+strconv.Itoa(i), s)
	}
	// Near misses: each check of Validate has one.
	base := "name: h\nmemory: 1Gi\ncpus: 1\n"
	for i, s := range []string{
		base + "memroy: 1Gi\n",
		base + "domains: [{name: a, memory: \"5000\", vcpus: 1}]\n",
		base + "domains: [{name: a, memory: 4Mi, vcpus: 99}]\n",
		base + "domains: [{name: a, memory: 4Mi, vcpus: 1, profile: {zero: .nan}}]\n",
		base + "domains: [{name: a, memory: 4Mi, vcpus: 1, disks: [{id: x, path: p}, {id: x, path: q, size: 3}]}]\n",
		base + "domains: [{name: a, memory: 9223372036854775808, vcpus: 1}, {name: b, memory: 9223372036854775808, vcpus: 1}]\n",
		"name: h\nmemory: 4Mi\ncpus: 1\ndomains: [{name: a, memory: 8Mi, vcpus: 1}]\n",
		"a: &a [*a, *a]\n",
	} {
		w.Add("FuzzLoadConfig", "invalid-"+strconv.Itoa(i), []byte(s))
	}
	for i, s := range []string{"4096", "256Mi", "16777216Ti", "18446744073709551615", " 8Ki ", "1.5Gi"} {
		w.Add("FuzzParseBytes", "q-"+strconv.Itoa(i), s)
	}
}
