package xlstream

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestRebuiltStreamsPassXensVerifier runs Xen's own stream checker,
// verify-stream-v2 (from xen-utils), on every rebuilt stream: the streams
// xl-recv hands to `xl migrate-receive` must be valid by Xen's reading of
// the specification, not only by ours. It runs when XEN_VERIFY_STREAM
// names the script (with PYTHONPATH reaching its xen.migration modules);
// `make xenlab-verify-stream` sets both from the lab's dom0 tree.
func TestRebuiltStreamsPassXensVerifier(t *testing.T) {
	script := os.Getenv("XEN_VERIFY_STREAM")
	if script == "" {
		t.Skip("XEN_VERIFY_STREAM not set (make xenlab-verify-stream runs this with the lab's verify-stream-v2)")
	}
	for name, in := range allStreams(t) {
		t.Run(name, func(t *testing.T) {
			d := newTestDisk(t, in, 2)
			var frames, out bytes.Buffer
			if _, _, err := Encode(bytes.NewReader(in), &frames, d); err != nil {
				t.Fatalf("Encode: %v", err)
			}
			if _, err := Decode(bytes.NewReader(frames.Bytes()), &out, d); err != nil {
				t.Fatalf("Decode: %v", err)
			}
			f := filepath.Join(t.TempDir(), "rebuilt.xl")
			if err := os.WriteFile(f, out.Bytes(), 0o644); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command("python3", script, "-f", "xl", "-v", "-i", f)
			msg, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("verify-stream-v2 rejects the rebuilt stream: %v\n%s", err, msg)
			}
			lines := strings.Split(strings.TrimSpace(string(msg)), "\n")
			t.Logf("verify-stream-v2 accepts it: %d summary lines, last: %s", len(lines), lines[len(lines)-1])
		})
	}
}
