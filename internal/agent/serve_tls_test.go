package agent

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/xenferry/xenferry/pkg/xenmem/sim"
)

// freeAddr returns a loopback address nobody listens on right now.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// Two standalone agents with lab certificates migrate a domain the way a
// user does (serve, then migrate through the control socket), over mutual
// TLS; a destination that is not the host named is refused and the domain
// stays where it ran.
func TestStandaloneServeMigratesOverMutualTLS(t *testing.T) {
	pkiDir, shared := t.TempDir(), t.TempDir()
	labPKI(t, pkiDir, "host-a", "host-b")
	cfgA := filepath.Join(t.TempDir(), "a.yaml")
	cfgB := filepath.Join(t.TempDir(), "b.yaml")
	write := func(p, s string) {
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(cfgA, fmt.Sprintf(`name: host-a
memory: 512Mi
cpus: 2
stateDir: %s
domains:
- name: web-1
  memory: 16Mi
  vcpus: 1
  disks: [{id: xvda, path: web-1.img, size: 16Mi}]
  profile: {zero: 0.2, disk: 0.4, dirtyMiBps: 2, hotFraction: 0.1, hotWriteShare: 0.9, readMiBps: 8, seed: 5}
`, shared))
	write(cfgB, fmt.Sprintf("name: host-b\nmemory: 512Mi\ncpus: 2\nstateDir: %s\n", shared))
	tlsArgs := func(h string) []string {
		return []string{"--tls-cert", filepath.Join(pkiDir, h+".crt"), "--tls-key", filepath.Join(pkiDir, h+".key"), "--tls-ca", filepath.Join(pkiDir, "ca.crt")}
	}
	ctx, cancel := context.WithCancel(context.Background())
	stateA, stateB := t.TempDir(), t.TempDir()
	addrA, addrB := freeAddr(t), freeAddr(t)
	errs := make(chan error, 2)
	go func() {
		errs <- Serve(ctx, append([]string{"--backend", "sim", "--sim-config", cfgA, "--listen", addrA, "--state-dir", stateA}, tlsArgs("host-a")...))
	}()
	go func() {
		errs <- Serve(ctx, append([]string{"--backend", "sim", "--sim-config", cfgB, "--listen", addrB, "--state-dir", stateB}, tlsArgs("host-b")...))
	}()
	t.Cleanup(func() {
		cancel()
		for range 2 {
			if err := <-errs; err != nil {
				t.Errorf("serve: %v", err)
			}
		}
		// The sim guests outlive serve, as domUs outlive their agent.
		for _, d := range []string{stateA, stateB} {
			if err := sim.DestroyRegistered(d); err != nil {
				t.Errorf("destroy guests of %s: %v", d, err)
			}
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for _, d := range []string{stateA, stateB} {
		for {
			if _, err := os.Stat(defaultControl(d)); err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("serve did not open its control socket in %s", d)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	// Give the data ports a moment after the control sockets.
	time.Sleep(200 * time.Millisecond)

	err := Migrate(ctx, []string{"--state-dir", stateA, "--domain", "web-1", "--to", addrB, "--to-host", "host-c", "--strategy", "precopy"})
	if err == nil || !strings.Contains(err.Error(), "host-c") {
		t.Fatalf("migrating to host-b while expecting host-c: %v, want a refusal naming host-c", err)
	}
	if err := Migrate(ctx, []string{"--state-dir", stateA, "--domain", "web-1", "--to", addrB, "--to-host", "host-b", "--strategy", "precopy"}); err != nil {
		t.Fatalf("migrate over mTLS: %v", err)
	}
}
