package sim

import (
	"errors"
	"fmt"
	"math"
	"math/bits"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"sigs.k8s.io/yaml"

	"github.com/xenferry/xenferry/pkg/xenmem"
)

// Profile says how a domain's memory is built and how its workload runs.
type Profile struct {
	// Zero is the fraction of zero pages.
	Zero float64 `json:"zero"`
	// Disk is the fraction of pages copied from distinct 4 KiB-aligned blocks
	// of the domain's first disk (the guest's page cache).
	Disk float64 `json:"disk"`
	// DirtyMiBps is the workload write rate (pages written per second × 4 KiB).
	DirtyMiBps float64 `json:"dirtyMiBps"`
	// HotFraction is the hot set size as a fraction of memory (0 = uniform).
	HotFraction float64 `json:"hotFraction"`
	// HotWriteShare is the share of writes (and reads) landing in the hot set.
	HotWriteShare float64 `json:"hotWriteShare"`
	// ReadMiBps is the workload read rate (pages touched per second × 4 KiB).
	ReadMiBps float64 `json:"readMiBps"`
	// Seed makes memory contents and the workload reproducible.
	Seed int64 `json:"seed"`
}

// DiskSpec is one virtual disk. The image is created with random content
// (from the seed of the domain's profile) if it is absent and Size is set.
type DiskSpec struct {
	ID   string `json:"id"`
	Path string `json:"path"`
	Size string `json:"size,omitempty"`
}

// DomainSpec describes one simulated domain.
type DomainSpec struct {
	Name      string            `json:"name"`
	Namespace string            `json:"namespace,omitempty"`
	Labels    map[string]string `json:"labels,omitempty"`
	// Memory is the guest memory size, a multiple of 4 KiB ("256Mi").
	Memory string     `json:"memory"`
	VCPUs  int        `json:"vcpus"`
	Disks  []DiskSpec `json:"disks,omitempty"`
	// Profile builds memory and drives the workload.
	Profile Profile `json:"profile"`
	// Image is a raw memory image used instead of the profile's zero/disk
	// fractions (copied in, streamed); the profile's rates still apply.
	Image string `json:"image,omitempty"`
}

// Config describes a simulated host and the domains it starts with.
type Config struct {
	Name string `json:"name"`
	// Memory is the host capacity for guest memory ("8Gi").
	Memory string `json:"memory"`
	CPUs   int    `json:"cpus"`
	// StateDir holds generated disk images given by relative paths.
	StateDir string       `json:"stateDir"`
	Domains  []DomainSpec `json:"domains"`
}

// MaxVCPUs is the most vCPUs a simulated domain may have (control page size).
const MaxVCPUs = 32

// LoadConfig reads a YAML or JSON host configuration and validates it.
func LoadConfig(path string) (Config, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("sim config %s: %w", path, err)
	}
	var cfg Config
	if err := yaml.UnmarshalStrict(raw, &cfg); err != nil {
		return Config{}, fmt.Errorf("sim config %s: %w", path, err)
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, fmt.Errorf("sim config %s: %w", path, err)
	}
	return cfg, nil
}

var nameRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$`)

// Validate checks a configuration and returns every problem found.
func (c Config) Validate() error {
	var errs []error
	if c.Name == "" {
		errs = append(errs, errors.New("name: must be set"))
	}
	capacity, err := ParseBytes(c.Memory)
	if err != nil {
		errs = append(errs, fmt.Errorf("memory: %w", err))
	}
	if c.CPUs < 1 {
		errs = append(errs, fmt.Errorf("cpus: %d, must be at least 1", c.CPUs))
	}
	seen := map[string]bool{}
	var total uint64
	for i, d := range c.Domains {
		if err := d.Validate(); err != nil {
			errs = append(errs, fmt.Errorf("domains[%d]: %w", i, err))
			continue
		}
		if seen[d.Name] {
			errs = append(errs, fmt.Errorf("domains[%d]: name %q used twice", i, d.Name))
		}
		seen[d.Name] = true
		m, _ := ParseBytes(d.Memory)
		// Saturate: domains of 2^63 bytes each must not wrap to a total
		// that fits.
		if sum, carry := bits.Add64(total, m, 0); carry != 0 {
			total = math.MaxUint64
		} else {
			total = sum
		}
	}
	if err == nil && total > capacity {
		errs = append(errs, fmt.Errorf("domains need %d bytes of memory, host memory is %d (%s)", total, capacity, c.Memory))
	}
	return errors.Join(errs...)
}

// Validate checks one domain specification.
func (d DomainSpec) Validate() error {
	var errs []error
	if !nameRE.MatchString(d.Name) || len(d.Name) > 63 {
		errs = append(errs, fmt.Errorf("name %q: must be 1-63 lower-case letters, digits, '-' or '.'", d.Name))
	}
	if m, err := ParseBytes(d.Memory); err != nil {
		errs = append(errs, fmt.Errorf("memory: %w", err))
	} else if m == 0 || m%xenmem.PageSize != 0 {
		errs = append(errs, fmt.Errorf("memory %q: must be a positive multiple of 4 KiB", d.Memory))
	}
	if d.VCPUs < 1 || d.VCPUs > MaxVCPUs {
		errs = append(errs, fmt.Errorf("vcpus %d: must be 1..%d", d.VCPUs, MaxVCPUs))
	}
	ids := map[string]bool{}
	for i, disk := range d.Disks {
		if disk.ID == "" || disk.Path == "" {
			errs = append(errs, fmt.Errorf("disks[%d]: id and path must be set", i))
		}
		if ids[disk.ID] {
			errs = append(errs, fmt.Errorf("disks[%d]: id %q used twice", i, disk.ID))
		}
		ids[disk.ID] = true
		if disk.Size != "" {
			if s, err := ParseBytes(disk.Size); err != nil {
				errs = append(errs, fmt.Errorf("disks[%d].size: %w", i, err))
			} else if s == 0 || s%xenmem.PageSize != 0 {
				errs = append(errs, fmt.Errorf("disks[%d].size %q: must be a positive multiple of 4 KiB", i, disk.Size))
			}
		}
	}
	p := d.Profile
	for _, f := range []struct {
		name string
		v    float64
	}{{"zero", p.Zero}, {"disk", p.Disk}, {"hotFraction", p.HotFraction}, {"hotWriteShare", p.HotWriteShare}} {
		if math.IsNaN(f.v) || f.v < 0 || f.v > 1 {
			errs = append(errs, fmt.Errorf("profile.%s %v: must be within [0,1]", f.name, f.v))
		}
	}
	if p.Zero+p.Disk > 1+1e-9 {
		errs = append(errs, fmt.Errorf("profile: zero (%v) + disk (%v) exceed 1", p.Zero, p.Disk))
	}
	for _, f := range []struct {
		name string
		v    float64
	}{{"dirtyMiBps", p.DirtyMiBps}, {"readMiBps", p.ReadMiBps}} {
		if math.IsNaN(f.v) || math.IsInf(f.v, 0) || f.v < 0 {
			errs = append(errs, fmt.Errorf("profile.%s %v: must be a finite rate >= 0", f.name, f.v))
		}
	}
	if p.Disk > 0 && len(d.Disks) == 0 && d.Image == "" {
		errs = append(errs, fmt.Errorf("profile.disk %v: the domain has no disk to copy pages from", p.Disk))
	}
	if d.Image != "" && (p.Zero != 0 || p.Disk != 0) {
		errs = append(errs, errors.New("image and profile.zero/profile.disk are exclusive: an image defines the memory contents"))
	}
	return errors.Join(errs...)
}

// ParseBytes parses a byte quantity: a plain number, or one with a binary
// (Ki, Mi, Gi, Ti) or decimal (k, K, M, G, T) suffix.
func ParseBytes(s string) (uint64, error) {
	t := strings.TrimSpace(s)
	if t == "" {
		return 0, errors.New("empty quantity")
	}
	mult := uint64(1)
	for _, u := range []struct {
		suf string
		m   uint64
	}{{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"Ti", 1 << 40}, {"k", 1e3}, {"K", 1e3}, {"M", 1e6}, {"G", 1e9}, {"T", 1e12}} {
		if strings.HasSuffix(t, u.suf) {
			t, mult = strings.TrimSuffix(t, u.suf), u.m
			break
		}
	}
	n, err := strconv.ParseUint(t, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("quantity %q: want an integer with an optional Ki/Mi/Gi/Ti or k/M/G/T suffix", s)
	}
	if n > math.MaxUint64/mult {
		return 0, fmt.Errorf("quantity %q: too large", s)
	}
	return n * mult, nil
}

// diskPath resolves a disk path against the host's state directory and
// makes it absolute, so a migrated domain's disk path means the same on a
// destination agent started elsewhere.
func (c Config) diskPath(p string) string {
	if !filepath.IsAbs(p) && c.StateDir != "" {
		p = filepath.Join(c.StateDir, p)
	}
	if abs, err := filepath.Abs(p); err == nil {
		p = abs
	}
	return p
}
