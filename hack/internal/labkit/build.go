package labkit

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Binaries built by BuildBinaries, by file name in the bin directory.
const (
	ControllerBin = "xenferry-controller"
	AgentBin      = "node-agent"
)

// BuildBinaries builds the controller and the node agent from the project
// at root into bin, once per run, so that a harness tests the working
// tree's code (go's build cache makes a warm build quick). GOTOOLCHAIN is
// local: the build uses the toolchain at hand, never one it would fetch.
func BuildBinaries(ctx context.Context, root, bin string) error {
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return err
	}
	for _, b := range []struct{ out, pkg string }{{ControllerBin, "."}, {AgentBin, "./node-agent"}} {
		bctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
		cmd := exec.CommandContext(bctx, "go", "build", "-o", filepath.Join(bin, b.out), b.pkg)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "GOTOOLCHAIN=local")
		out, err := cmd.CombinedOutput()
		cancel()
		if err != nil {
			return fmt.Errorf("go build %s: %w: %s", b.pkg, err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}

// ProjectRoot is the directory holding go.mod, at or above the working
// directory (the harnesses run from the project: `go run ./hack/...`).
func ProjectRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("no go.mod above %s: run from the project", dir)
		}
	}
}
