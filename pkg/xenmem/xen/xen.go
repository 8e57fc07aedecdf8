// Package xen is the real-Xen backend of xenmem, for a node agent running
// in dom0 of a Xen host (xen-utils 4.17 and later).
//
// It publishes the host's inventory: the host from `xl info`, the domains
// from `xl list -l` (libxl's JSON domain configurations: name, UUID,
// memory, vCPUs, disks) and their run state from `xl list`. It talks to the
// toolstack through the xl command rather than libxenctrl/libxenlight via
// cgo, so that node-agent stays one static binary (CGO_ENABLED=0) that runs
// in any dom0 without libxen-dev, and because libxl's JSON is the one view
// of a domain that already carries its disks as configured; the price is a
// fork of xl per poll (tens of milliseconds), which the agent's heartbeat
// interval makes irrelevant.
//
// The data path of a migration on Xen is `xl migrate -s "node-agent
// xl-send"` (see node-agent's xl-send and package xlstream); this backend
// therefore does not implement OpenSource or CreateTarget, which return
// xenmem.ErrNotSupported. With no SourceDomain handle there is nothing to
// Commit or Reclaim here: on that path xl holds the point of no return
// itself (the source domain, renamed NAME--migratedaway, is paused and
// left so when the receiver does not confirm it runs; an operator resumes
// or destroys it with xl after checking the destination).
package xen

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/go-logr/logr"

	"github.com/xenferry/xenferry/pkg/xenmem"
	"github.com/xenferry/xenferry/pkg/xenmem/xen/paging"
)

// Runner runs a toolstack command and returns its standard output. The
// error of a command that ran and failed carries its standard error.
type Runner func(ctx context.Context, name string, args ...string) ([]byte, error)

// Options configure Open. The zero value is the real toolstack.
type Options struct {
	// XL is the xl command (default "xl", looked up in PATH).
	XL string
	// Run replaces the command runner (tests); nil runs XL for real.
	Run Runner
	// Capabilities is the file that tells a dom0 (default
	// /proc/xen/capabilities); "-" skips the check (tests).
	Capabilities string
	// HostName overrides the host name reported by xl info.
	HostName string
	// ProbePaging says whether this host can page domain memory (early
	// resume); nil asks the hypervisor (paging.Probe), once, at Open.
	ProbePaging func() error
	Log         logr.Logger
}

// Host is a Xen host seen from its dom0.
type Host struct {
	opts Options
	log  logr.Logger
	caps xenmem.Capabilities
}

var _ xenmem.Host = (*Host)(nil)

// Open checks that this is a Xen dom0 with a working toolstack and returns
// its Host. Every error that means "no Xen here" wraps
// xenmem.ErrBackendAbsent.
func Open(ctx context.Context, opts Options) (*Host, error) {
	if opts.XL == "" {
		opts.XL = "xl"
	}
	if opts.Capabilities == "" {
		opts.Capabilities = "/proc/xen/capabilities"
	}
	h := &Host{opts: opts, log: opts.Log, caps: Capabilities}
	if opts.ProbePaging == nil {
		opts.ProbePaging = paging.Probe
	}
	if err := opts.ProbePaging(); err == nil {
		h.caps = EarlyResumeCapabilities
	} else {
		h.log.Info("Early resume unavailable here: HVM/PVH domains migrate pre-copy", "reason", err.Error())
	}
	if opts.Run == nil {
		if _, err := exec.LookPath(opts.XL); err != nil {
			return nil, fmt.Errorf("xen: the toolstack command %q is not installed (xen-utils): %w", opts.XL, xenmem.ErrBackendAbsent)
		}
		h.opts.Run = runCommand
	}
	if opts.Capabilities != "-" {
		caps, err := os.ReadFile(opts.Capabilities)
		if err != nil {
			return nil, fmt.Errorf("xen: not running on Xen (%v; is xenfs mounted on /proc/xen?): %w", err, xenmem.ErrBackendAbsent)
		}
		if !strings.Contains(string(caps), "control_d") {
			return nil, fmt.Errorf("xen: %s does not say control_d: this is a domU, not dom0: %w", opts.Capabilities, xenmem.ErrBackendAbsent)
		}
	}
	if _, err := h.Info(ctx); err != nil {
		return nil, fmt.Errorf("xen: the toolstack does not answer (are xenstored and xen-init-dom0 done?): %w: %w", err, xenmem.ErrBackendAbsent)
	}
	return h, nil
}

func runCommand(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if len(msg) > 512 {
			msg = msg[:512] + "..."
		}
		if msg != "" {
			return out, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, msg)
		}
		return out, fmt.Errorf("%s %s: %w", name, strings.Join(args, " "), err)
	}
	return out, nil
}

// Info returns the host from `xl info`.
func (h *Host) Info(ctx context.Context) (xenmem.HostInfo, error) {
	out, err := h.opts.Run(ctx, h.opts.XL, "info")
	if err != nil {
		return xenmem.HostInfo{}, fmt.Errorf("xen: host info: %w", err)
	}
	info, err := ParseInfo(out)
	if err != nil {
		return xenmem.HostInfo{}, err
	}
	if h.opts.HostName != "" {
		info.Name = h.opts.HostName
	}
	info.Capabilities = h.caps
	return info, nil
}

// Domains returns the guest domains (dom0 left out), sorted by name.
func (h *Host) Domains(ctx context.Context) ([]xenmem.DomainInfo, error) {
	long, err := h.opts.Run(ctx, h.opts.XL, "list", "-l")
	if err != nil {
		return nil, fmt.Errorf("xen: list domains: %w", err)
	}
	short, err := h.opts.Run(ctx, h.opts.XL, "list")
	if err != nil {
		return nil, fmt.Errorf("xen: list domain states: %w", err)
	}
	doms, err := ParseListLong(long)
	if err != nil {
		return nil, err
	}
	states, err := ParseList(short)
	if err != nil {
		return nil, err
	}
	out := make([]xenmem.DomainInfo, 0, len(doms))
	for _, d := range doms {
		if d.ID == 0 {
			continue
		}
		row, ok := states[d.ID]
		if !ok {
			// Gone between the two commands.
			h.log.V(4).Info("Domain vanished while listing", "domid", d.ID, "name", d.Name)
			continue
		}
		d.State = row.State
		d.CPUTime = row.CPUTime
		if d.Name == "" {
			d.Name = row.Name
		}
		d.Name, d.State = migrationName(d.Name, d.State)
		if d.VCPUs == 0 {
			d.VCPUs = row.VCPUs
		}
		if d.MemoryBytes == 0 {
			d.MemoryBytes = row.MemoryBytes
		}
		out = append(out, d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// migrationName undoes xl's renaming of a domain during `xl migrate`: the
// source domain is "NAME--migratedaway", the incoming one "NAME--incoming".
func migrationName(name string, st xenmem.State) (string, xenmem.State) {
	if n, ok := strings.CutSuffix(name, "--incoming"); ok {
		return n, xenmem.StateIncoming
	}
	if n, ok := strings.CutSuffix(name, "--migratedaway"); ok {
		return n, xenmem.StateMigrating
	}
	return name, st
}

// OpenSource is not implemented: on Xen the data path is `xl migrate -s
// "node-agent xl-send"`.
func (h *Host) OpenSource(_ context.Context, name string) (xenmem.SourceDomain, error) {
	return nil, fmt.Errorf("xen: migrate %s with `xl migrate -s \"node-agent xl-send\" %s HOST`; the engine's own data path on Xen: %w",
		name, name, xenmem.ErrNotSupported)
}

// CreateTarget is not implemented: on Xen, `node-agent xl-recv` runs
// `xl migrate-receive`, which creates the domain.
func (h *Host) CreateTarget(_ context.Context, info xenmem.DomainInfo) (xenmem.TargetDomain, error) {
	return nil, fmt.Errorf("xen: receive %s with `node-agent xl-recv`; the engine's own data path on Xen: %w", info.Name, xenmem.ErrNotSupported)
}

// Close releases nothing: the backend holds no handle between calls.
func (h *Host) Close() error { return nil }

// Capabilities of a stock Xen host: pre-copy only, since no released Xen
// can run a domain whose memory has not all arrived (docs/xen-postcopy.md),
// with dedup and adaptive zstd by xenferry's xl transport.
var Capabilities = xenmem.Capabilities{Transport: xenmem.TransportXL, Strategies: []string{"precopy"}, Dedup: true,
	Compression: []string{"zstd"}}

// EarlyResumeCapabilities are those of a host whose hypervisor can page
// domain memory (built with CONFIG_MEM_PAGING): xl-send holds an HVM/PVH
// domain's RAM back and this host's pager serves it after the resume (a PV
// domain still migrates pre-copy).
var EarlyResumeCapabilities = xenmem.Capabilities{Transport: xenmem.TransportXL,
	Strategies: []string{"precopy", "postcopy", "hybrid"}, Dedup: true, EarlyResume: true, Compression: []string{"zstd"}}

// ParseInfo reads the "key : value" lines of `xl info`.
func ParseInfo(out []byte) (xenmem.HostInfo, error) {
	kv := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		kv[strings.TrimSpace(k)] = strings.TrimSpace(v)
	}
	if err := sc.Err(); err != nil {
		return xenmem.HostInfo{}, fmt.Errorf("xen: read xl info: %w", err)
	}
	info := xenmem.HostInfo{Name: kv["host"], Backend: "xen", Version: kv["xen_version"], Capabilities: Capabilities}
	if info.Version == "" && kv["xen_major"] != "" {
		info.Version = kv["xen_major"] + "." + kv["xen_minor"] + kv["xen_extra"]
	}
	if info.Name == "" || info.Version == "" {
		return xenmem.HostInfo{}, fmt.Errorf("xen: xl info has no host or xen_version line (got %d lines): %w", len(kv), ErrBadOutput)
	}
	var err error
	if info.TotalMemoryBytes, err = mib(kv, "total_memory"); err != nil {
		return xenmem.HostInfo{}, err
	}
	if info.FreeMemoryBytes, err = mib(kv, "free_memory"); err != nil {
		return xenmem.HostInfo{}, err
	}
	if n, err := strconv.Atoi(kv["nr_cpus"]); err == nil {
		info.CPUs = n
	} else {
		return xenmem.HostInfo{}, fmt.Errorf("xen: xl info nr_cpus %q: %w", kv["nr_cpus"], ErrBadOutput)
	}
	return info, nil
}

func mib(kv map[string]string, key string) (uint64, error) {
	n, err := strconv.ParseUint(kv[key], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("xen: xl info %s %q is not a number of MiB: %w", key, kv[key], ErrBadOutput)
	}
	return n << 20, nil
}

// ErrBadOutput is returned when the toolstack prints something this
// package does not understand (an xl much older or newer than 4.17).
var ErrBadOutput = errors.New("xen: unexpected toolstack output")

// listEntry is one element of `xl list -l`: libxl's domain configuration.
type listEntry struct {
	DomID  *int            `json:"domid"`
	Config json.RawMessage `json:"config"`
}

// domainConfig is the part of libxl_domain_config the inventory needs.
type domainConfig struct {
	CInfo struct {
		Type string `json:"type"`
		Name string `json:"name"`
		UUID string `json:"uuid"`
	} `json:"c_info"`
	BInfo struct {
		MaxVCPUs    int    `json:"max_vcpus"`
		AvailVCPUs  []int  `json:"avail_vcpus"`
		MaxMemKB    uint64 `json:"max_memkb"`
		TargetMemKB uint64 `json:"target_memkb"`
	} `json:"b_info"`
	Disks []struct {
		PdevPath  string `json:"pdev_path"`
		Vdev      string `json:"vdev"`
		Readwrite *int   `json:"readwrite"`
		IsCDROM   *int   `json:"is_cdrom"`
	} `json:"disks"`
}

// ParseListLong reads `xl list -l`: a JSON array of {domid, config}. State
// is left empty (xl list -l does not say it; see ParseList).
func ParseListLong(out []byte) ([]xenmem.DomainInfo, error) {
	out = bytes.TrimSpace(out)
	if len(out) == 0 {
		// xl prints nothing when libxl has no configuration to show.
		return nil, nil
	}
	var entries []listEntry
	if err := json.Unmarshal(out, &entries); err != nil {
		return nil, fmt.Errorf("xen: xl list -l is not libxl's JSON array: %v: %w", err, ErrBadOutput)
	}
	doms := make([]xenmem.DomainInfo, 0, len(entries))
	for i, e := range entries {
		if e.DomID == nil {
			return nil, fmt.Errorf("xen: xl list -l entry %d has no domid: %w", i, ErrBadOutput)
		}
		var c domainConfig
		if len(e.Config) > 0 {
			if err := json.Unmarshal(e.Config, &c); err != nil {
				return nil, fmt.Errorf("xen: configuration of domain %d: %v: %w", *e.DomID, err, ErrBadOutput)
			}
		}
		d := xenmem.DomainInfo{
			ID:          *e.DomID,
			Name:        c.CInfo.Name,
			UUID:        c.CInfo.UUID,
			MemoryBytes: c.BInfo.TargetMemKB << 10,
			VCPUs:       len(c.BInfo.AvailVCPUs),
			Config:      append([]byte(nil), e.Config...),
		}
		if d.MemoryBytes == 0 {
			d.MemoryBytes = c.BInfo.MaxMemKB << 10
		}
		if d.VCPUs == 0 {
			d.VCPUs = c.BInfo.MaxVCPUs
		}
		for _, dk := range c.Disks {
			if dk.IsCDROM != nil && *dk.IsCDROM != 0 {
				continue
			}
			d.Disks = append(d.Disks, xenmem.Disk{
				ID:   dk.Vdev,
				Path: dk.PdevPath,
				// libxl's default is read-write when the field is absent.
				ReadOnly: dk.Readwrite != nil && *dk.Readwrite == 0,
			})
		}
		doms = append(doms, d)
	}
	return doms, nil
}

// listRow is one line of `xl list`.
type listRow struct {
	Name        string
	MemoryBytes uint64
	VCPUs       int
	State       xenmem.State
	// CPUTime is the Time(s) column: the CPU seconds the domain's vCPUs
	// used since it was created (on this host), to 0.1 s.
	CPUTime time.Duration
}

// ParseList reads `xl list` (Name ID Mem VCPUs State Time(s)) into rows by
// domain id. Names may contain spaces, so columns are taken from the right.
func ParseList(out []byte) (map[int]listRow, error) {
	rows := map[int]listRow{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	header := false
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		if !header {
			if f[0] != "Name" {
				return nil, fmt.Errorf("xen: xl list header %q: %w", sc.Text(), ErrBadOutput)
			}
			header = true
			continue
		}
		if len(f) < 6 {
			return nil, fmt.Errorf("xen: xl list line %q: %w", sc.Text(), ErrBadOutput)
		}
		n := len(f)
		id, err1 := strconv.Atoi(f[n-5])
		mem, err2 := strconv.ParseUint(f[n-4], 10, 64)
		vcpus, err3 := strconv.Atoi(f[n-3])
		secs, err4 := strconv.ParseFloat(f[n-1], 64)
		if err4 == nil && (secs < 0 || secs > 1e12) {
			err4 = fmt.Errorf("time %v out of range", secs)
		}
		if err := errors.Join(err1, err2, err3, err4); err != nil {
			return nil, fmt.Errorf("xen: xl list line %q: %v: %w", sc.Text(), err, ErrBadOutput)
		}
		rows[id] = listRow{Name: strings.Join(f[:n-5], " "), MemoryBytes: mem << 20, VCPUs: vcpus, State: parseState(f[n-2]),
			CPUTime: time.Duration(secs * float64(time.Second)).Round(time.Millisecond)}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("xen: read xl list: %w", err)
	}
	if !header {
		return nil, fmt.Errorf("xen: xl list printed no header: %w", ErrBadOutput)
	}
	return rows, nil
}

// parseState maps xl's six state flags (r b p s c d, '-' when unset).
func parseState(flags string) xenmem.State {
	switch {
	case strings.ContainsAny(flags, "scd"):
		return xenmem.StateShutdown
	case strings.Contains(flags, "p"):
		return xenmem.StatePaused
	default:
		return xenmem.StateRunning
	}
}
