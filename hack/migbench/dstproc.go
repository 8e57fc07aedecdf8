package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/go-logr/logr"

	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/xenmem/sim"
)

// The destination side can run in a process of its own, as it does on real
// hosts: its own Go scheduler, network poller and collector, so neither
// side's busy goroutines delay the other's wake-ups. The child is this
// executable with -dst-serve: it prints "ADDR host:port" on stdout, then
// takes one command per line on stdin ("release NAME" frees a migrated
// domain and answers "ok" or "error: ..."), and exits when stdin closes.

// serveDestination is the child's main.
func serveDestination(ctx context.Context, dir string, log logr.Logger) error {
	dst, err := sim.NewHost(sim.Config{Name: "dst", Memory: "64Gi", CPUs: 2, StateDir: filepath.Join(dir, "dst")}, log.WithName("dst"))
	if err != nil {
		return err
	}
	defer dst.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("listen on loopback: %w", err)
	}
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		_ = (&engine.Receiver{Host: dst, Log: log.WithName("receiver")}).Serve(sctx, ln)
	}()
	defer wg.Wait()
	defer cancel()
	fmt.Printf("ADDR %s\n", ln.Addr())
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		name, ok := strings.CutPrefix(sc.Text(), "release ")
		if !ok {
			fmt.Printf("error: unknown command %q\n", sc.Text())
			continue
		}
		if err := releaseDomain(ctx, dst, name); err != nil {
			fmt.Printf("error: %v\n", err)
			continue
		}
		fmt.Println("ok")
	}
	return nil
}

// releaseDomain destroys a migrated domain at the destination, once the
// receiver has let go of it (it closes its handle just after the source
// hears "done"): up to 10 s.
func releaseDomain(ctx context.Context, h *sim.Host, name string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		d, err := h.OpenSource(ctx, name)
		if err != nil {
			if time.Now().After(deadline) {
				return err
			}
			time.Sleep(20 * time.Millisecond)
			continue
		}
		defer d.Close()
		return d.Release()
	}
}

// dstProc is the parent's handle on the child.
type dstProc struct {
	cmd  *exec.Cmd
	in   io.WriteCloser
	out  *bufio.Scanner
	addr string
}

func startDstProc(dir string, verbose bool) (*dstProc, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	args := []string{"-dst-serve", "-workdir", dir}
	if verbose {
		args = append(args, "-v")
	}
	cmd := exec.Command(exe, args...)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	outPipe, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start the destination process: %w", err)
	}
	p := &dstProc{cmd: cmd, in: in, out: bufio.NewScanner(outPipe)}
	if !p.out.Scan() {
		p.close()
		return nil, fmt.Errorf("the destination process exited before listening (see its errors above)")
	}
	addr, ok := strings.CutPrefix(p.out.Text(), "ADDR ")
	if !ok {
		p.close()
		return nil, fmt.Errorf("the destination process said %q, want its address", p.out.Text())
	}
	p.addr = addr
	return p, nil
}

func (p *dstProc) release(name string) error {
	if _, err := fmt.Fprintf(p.in, "release %s\n", name); err != nil {
		return err
	}
	if !p.out.Scan() {
		return fmt.Errorf("the destination process is gone")
	}
	if ans := p.out.Text(); ans != "ok" {
		return fmt.Errorf("release %s at the destination: %s", name, ans)
	}
	return nil
}

func (p *dstProc) close() {
	p.in.Close()
	_ = p.cmd.Wait()
}
