package agent

import (
	"bytes"
	"os/exec"
	"strings"
	"testing"

	"github.com/xenferry/xenferry/pkg/xenmem"
	"github.com/xenferry/xenferry/pkg/xlstream"
)

type bufCloser struct{ bytes.Buffer }

func (*bufCloser) Close() error { return nil }

func capturedStream(t *testing.T) []byte {
	t.Helper()
	t.Setenv("FAKE_XL_STREAM", "../../pkg/xlstream/testdata/pv.xl.zst")
	raw, err := fakeStream()
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// Nothing reaches xl migrate-receive before the domain configuration in
// xl's header has been accepted; a refused one reaches it not at all.
func TestHeaderGateHoldsTheStreamUntilChecked(t *testing.T) {
	raw := capturedStream(t)[:256<<10]
	for _, c := range []struct {
		name string
		want xenmem.DomainInfo
		ok   bool
	}{
		{"the granted domain", xenmem.DomainInfo{Name: "fixpv"}, true},
		{"another domain's stream", xenmem.DomainInfo{Name: "web"}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			out := &bufCloser{}
			checked := 0
			tee := &prefixTee{w: out, max: 1 << 20, check: func(h *xlstream.XLHeader) error {
				checked++
				if out.Len() != 0 {
					t.Errorf("%d bytes reached xl before the check", out.Len())
				}
				return checkXLConfig(h, c.want)
			}}
			var werr error
			for off := 0; off < len(raw) && werr == nil; off += 1000 {
				_, werr = tee.Write(raw[off:min(off+1000, len(raw))])
			}
			if checked != 1 {
				t.Fatalf("checked %d times, want once", checked)
			}
			if c.ok {
				if werr != nil || !bytes.Equal(out.Bytes(), raw) {
					t.Fatalf("accepted stream: err %v, %d of %d bytes passed intact", werr, out.Len(), len(raw))
				}
				return
			}
			if werr == nil || out.Len() != 0 {
				t.Fatalf("refused stream: err %v, %d bytes reached xl", werr, out.Len())
			}
		})
	}
}

func TestCheckXLConfigAllowsOnlyTheDomainsDisks(t *testing.T) {
	cfg := []byte(`{"c_info":{"name":"vm"},"disks":[{"pdev_path":"/dev/vg/vm-disk","vdev":"xvda"}]}`)
	h := &xlstream.XLHeader{Config: cfg}
	if err := checkXLConfig(h, xenmem.DomainInfo{Name: "vm", Disks: []xenmem.Disk{{ID: "xvda", Path: "/dev/vg/vm-disk"}}}); err != nil {
		t.Fatalf("the XenDomain's own disk refused: %v", err)
	}
	err := checkXLConfig(&xlstream.XLHeader{Config: []byte(`{"c_info":{"name":"vm"},"disks":[{"pdev_path":"/dev/vda","vdev":"xvda"}]}`)},
		xenmem.DomainInfo{Name: "vm", Disks: []xenmem.Disk{{ID: "xvda", Path: "/dev/vg/vm-disk"}}})
	if err == nil || !strings.Contains(err.Error(), "/dev/vda") {
		t.Fatalf("dom0's disk in the sender's configuration: err %v, want a refusal naming it", err)
	}
	if err := checkXLConfig(&xlstream.XLHeader{Config: []byte(`{`)}, xenmem.DomainInfo{Name: "vm"}); err == nil {
		t.Fatal("a malformed configuration was accepted")
	}
}

// xl runs its transport through sh -c: every word survives as one word.
func TestShellQuote(t *testing.T) {
	words := []string{"/opt/x y/node-agent", "xl-send", "--tls-key", "/var/lib/it's/key", "", "$(reboot)", "a;b"}
	var q []string
	for _, w := range words {
		q = append(q, shellQuote(w))
	}
	got, err := exec.Command("sh", "-c", "printf '%s\\n' "+strings.Join(q, " ")).Output()
	if err != nil {
		t.Fatal(err)
	}
	if want := strings.Join(words, "\n") + "\n"; string(got) != want {
		t.Fatalf("sh -c read %q, want %q", got, want)
	}
}
