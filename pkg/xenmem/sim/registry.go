package sim

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/xenferry/xenferry/pkg/xenmem"
)

// The registry is what a real hypervisor keeps about its domains and a
// simulated host otherwise loses with its agent: STATE/sim/host.json,
// replaced atomically (write, fsync, rename, fsync dir) on every
// life-cycle change. Its existence also marks that the host has started
// before, so configured domains are booted only on the first start.
//
// A guest's pid is recorded with its start time (field 22 of
// /proc/PID/stat), so a pid reused by another process is never adopted.
const registryVersion = 1

type registry struct {
	Version int        `json:"version"`
	Host    string     `json:"host"`
	Domains []regEntry `json:"domains"`
}

// Registered states beyond xenmem.State's: a target never resumed is
// "Incoming" (destroyed on adoption).
type regEntry struct {
	Name        string          `json:"name"`
	UUID        string          `json:"uuid"`
	MemoryBytes uint64          `json:"memoryBytes"`
	VCPUs       int             `json:"vcpus"`
	Disks       []xenmem.Disk   `json:"disks,omitempty"`
	Config      json.RawMessage `json:"config"`
	PID         int             `json:"pid"`
	PIDStart    uint64          `json:"pidStart"`
	State       xenmem.State    `json:"state"`
	// Committed: a source handle told the destination to run it and
	// nothing has resolved that (see source.Commit).
	Committed bool `json:"committed,omitempty"`
	// Lazy: the domain runs with pages missing (post-copy) whose only
	// server was an agent process.
	Lazy bool `json:"lazy,omitempty"`
}

func (h *Host) simDir() string       { return filepath.Join(h.stateDir, "sim") }
func (h *Host) registryPath() string { return filepath.Join(h.simDir(), "host.json") }
func (h *Host) guestSock(name string) string {
	return filepath.Join(h.simDir(), "guests", name+".sock")
}
func (h *Host) guestLog(name string) string {
	return filepath.Join(h.simDir(), "guests", name+".log")
}

// maxRegistryBytes bounds what is read back (a registry of thousands of
// domains is far below it).
const maxRegistryBytes = 16 << 20

// loadRegistry reads the registry; ok is false when there is none yet.
func loadRegistry(path string) (reg registry, ok bool, err error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return registry{}, false, nil
	}
	if err != nil {
		return registry{}, false, fmt.Errorf("read registry: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return registry{}, false, fmt.Errorf("read registry: %w", err)
	}
	if st.Size() > maxRegistryBytes {
		return registry{}, false, fmt.Errorf("registry %s has %d bytes, more than %d", path, st.Size(), maxRegistryBytes)
	}
	raw := make([]byte, st.Size())
	if _, err := f.ReadAt(raw, 0); err != nil {
		return registry{}, false, fmt.Errorf("read registry %s: %w", path, err)
	}
	if err := json.Unmarshal(raw, &reg); err != nil {
		return registry{}, false, fmt.Errorf("registry %s is corrupt (move it away only once no guest of it runs): %w", path, err)
	}
	if reg.Version != registryVersion {
		return registry{}, false, fmt.Errorf("registry %s has version %d, want %d", path, reg.Version, registryVersion)
	}
	return reg, true, nil
}

// writeFileAtomic replaces path with data: a crash leaves the old or the
// new content, never a mix.
func writeFileAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, ".host-*.json")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// persist writes the registry from the host's domains. A host without a
// state dir keeps nothing.
func (h *Host) persist() error {
	if h.stateDir == "" {
		return nil
	}
	h.persistMu.Lock()
	defer h.persistMu.Unlock()
	h.mu.Lock()
	ds := make([]*Domain, 0, len(h.domains))
	for _, d := range h.domains {
		ds = append(ds, d)
	}
	h.mu.Unlock()
	reg := registry{Version: registryVersion, Host: h.cfg.Name, Domains: []regEntry{}}
	for _, d := range ds {
		e, ok := d.regEntry()
		if ok {
			reg.Domains = append(reg.Domains, e)
		}
	}
	raw, err := json.MarshalIndent(reg, "", "  ")
	if err != nil {
		return fmt.Errorf("persist host %s: %w", h.cfg.Name, err)
	}
	if err := writeFileAtomic(h.registryPath(), raw); err != nil {
		return fmt.Errorf("persist host %s: %w", h.cfg.Name, err)
	}
	return nil
}

// persistLogged persists and logs a failure: for changes whose loss a
// restart recovers from facts (the guest's control page) or that are
// already undone.
func (h *Host) persistLogged(why string) {
	if err := h.persist(); err != nil {
		h.log.Error(err, "Could not persist the host's domain registry", "after", why)
	}
}

func (d *Domain) regEntry() (regEntry, bool) {
	cfg, _ := json.Marshal(d.spec)
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.destroyed || d.guest == nil {
		return regEntry{}, false
	}
	return regEntry{Name: d.spec.Name, UUID: d.uuid, MemoryBytes: d.npages * xenmem.PageSize, VCPUs: d.spec.VCPUs,
		Disks: append([]xenmem.Disk(nil), d.disks...), Config: cfg, PID: d.guest.pid, PIDStart: d.guest.start,
		State: d.state, Committed: d.committed, Lazy: d.lazyPending}, true
}

// procStartTime is field 22 of /proc/PID/stat (clock ticks since boot).
func procStartTime(pid int) (uint64, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(raw)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state); field 22 is f[19].
	if len(f) < 20 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f)+2)
	}
	if f[0] == "Z" || f[0] == "X" {
		return 0, fmt.Errorf("pid %d has exited", pid)
	}
	return strconv.ParseUint(f[19], 10, 64)
}

// DestroyRegistered kills every guest registered under stateDir that still
// runs as the registered process and removes the registry, so the next
// host on stateDir starts afresh. For tests and for decommissioning a
// host; never while a host is open on stateDir.
func DestroyRegistered(stateDir string) error {
	h := &Host{stateDir: stateDir}
	reg, ok, err := loadRegistry(h.registryPath())
	if err != nil || !ok {
		return err
	}
	var errs []error
	for _, e := range reg.Domains {
		pidfd, err := unix.PidfdOpen(e.PID, 0)
		if err != nil {
			continue // gone
		}
		if st, err := procStartTime(e.PID); err == nil && st == e.PIDStart {
			if err := unix.PidfdSendSignal(pidfd, unix.SIGKILL, nil, 0); err != nil {
				errs = append(errs, fmt.Errorf("kill guest %s (pid %d): %w", e.Name, e.PID, err))
			}
		}
		unix.Close(pidfd)
		_ = os.Remove(h.guestSock(e.Name))
		_ = os.Remove(h.guestLog(e.Name))
	}
	if err := os.Remove(h.registryPath()); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
