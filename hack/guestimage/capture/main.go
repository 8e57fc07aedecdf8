// Command capture boots the guest image built by hack/guestimage/build.sh
// under QEMU (TCG), follows its workload over a control serial port, and saves
// raw dumps of the guest's RAM (QMP pmemsave with the guest paused) plus the
// disk image as it was at that moment. It is a benchmark helper, not a test.
//
// Protocol with the guest (see guest/xf-workload): the guest writes lines
// "XF <event> key=value..." on its ttyS1; after the events "idle" and "done"
// it waits for the line "go". On "idle" this program pauses the guest, dumps
// its RAM to -idle-mem, copies the disk to -idle-disk and lets it go on; on
// "done" it pauses it, dumps RAM to -mem-out and quits QEMU, so the disk file
// is closed and consistent.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

type options struct {
	work, kernel, initrd, disk string
	qemu, cpu, appendArgs      string
	memMiB                     int
	niceness                   int
	timeout                    time.Duration
	idleMem, idleDisk, memOut  string
	settleAfterPause           time.Duration
}

func main() {
	var o options
	flag.StringVar(&o.work, "work", "", "work directory for sockets and logs (required)")
	flag.StringVar(&o.kernel, "kernel", "", "guest kernel (vmlinuz) for direct boot (required)")
	flag.StringVar(&o.initrd, "initrd", "", "guest initramfs (required)")
	flag.StringVar(&o.disk, "disk", "", "raw ext4 disk image, attached as virtio /dev/vda (required)")
	flag.StringVar(&o.qemu, "qemu", "qemu-system-x86_64", "QEMU binary")
	flag.StringVar(&o.cpu, "cpu", "qemu64", "QEMU -cpu model (TCG)")
	flag.StringVar(&o.appendArgs, "append", "", "extra kernel command line arguments")
	flag.IntVar(&o.memMiB, "mem-mib", 1024, "guest RAM in MiB (at most 3072: RAM must be one block below 4 GiB for a flat dump)")
	flag.IntVar(&o.niceness, "nice", 10, "run QEMU under nice -n N")
	flag.DurationVar(&o.timeout, "timeout", 40*time.Minute, "limit for the whole run")
	flag.StringVar(&o.idleMem, "idle-mem", "", "RAM dump taken idle after boot (empty: none)")
	flag.StringVar(&o.idleDisk, "idle-disk", "", "disk copy taken together with -idle-mem (empty: none)")
	flag.StringVar(&o.memOut, "mem-out", "", "RAM dump taken after the workload (required)")
	flag.Parse()
	if o.work == "" || o.kernel == "" || o.initrd == "" || o.disk == "" || o.memOut == "" {
		fmt.Fprintln(os.Stderr, "capture: -work, -kernel, -initrd, -disk and -mem-out are required")
		flag.Usage()
		os.Exit(2)
	}
	if o.memMiB < 64 || o.memMiB > 3072 {
		fmt.Fprintf(os.Stderr, "capture: -mem-mib %d out of range [64, 3072]\n", o.memMiB)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	if err := run(ctx, o); err != nil {
		fmt.Fprintf(os.Stderr, "capture: %v\n", err)
		os.Exit(1)
	}
}

var start = time.Now()

func logf(format string, args ...any) {
	el := time.Since(start).Truncate(time.Second)
	fmt.Fprintf(os.Stderr, "[capture %s +%s] %s\n", time.Now().UTC().Format("15:04:05"), el, fmt.Sprintf(format, args...))
}

// event is one "XF <name> k=v..." line from the guest.
type event struct {
	Name   string            `json:"name"`
	Fields map[string]string `json:"fields,omitempty"`
	At     float64           `json:"atSeconds"`
	Raw    string            `json:"raw"`
}

func parseEvent(line string) (event, bool) {
	line = strings.TrimRight(line, "\r\n")
	rest, ok := strings.CutPrefix(line, "XF ")
	if !ok {
		return event{}, false
	}
	f := strings.Fields(rest)
	if len(f) == 0 {
		return event{}, false
	}
	ev := event{Name: f[0], Fields: map[string]string{}, At: time.Since(start).Seconds(), Raw: line}
	for _, kv := range f[1:] {
		if k, v, ok := strings.Cut(kv, "="); ok {
			ev.Fields[k] = v
		}
	}
	if ev.Name == "error" {
		// The message is the rest of the line.
		if _, msg, ok := strings.Cut(rest, "msg="); ok {
			ev.Fields["msg"] = msg
		}
	}
	return ev, true
}

type summary struct {
	QEMUArgs   []string `json:"qemuArgs"`
	MemMiB     int      `json:"memMiB"`
	Events     []event  `json:"events"`
	IdleMem    string   `json:"idleMem,omitempty"`
	IdleDisk   string   `json:"idleDisk,omitempty"`
	Mem        string   `json:"mem"`
	Disk       string   `json:"disk"`
	Seconds    float64  `json:"seconds"`
	SerialWarn []string `json:"serialWarnings,omitempty"`
}

func run(ctx context.Context, o options) (reterr error) {
	if err := os.MkdirAll(o.work, 0o755); err != nil {
		return fmt.Errorf("create work dir %s: %w", o.work, err)
	}
	for _, f := range []string{o.kernel, o.initrd, o.disk} {
		if _, err := os.Stat(f); err != nil {
			return fmt.Errorf("input %s: %w (run hack/guestimage/build.sh image first)", f, err)
		}
	}
	qmpSock := filepath.Join(o.work, "qmp.sock")
	ctlSock := filepath.Join(o.work, "ctl.sock")
	serialLog := filepath.Join(o.work, "serial.log")
	for _, f := range []string{qmpSock, ctlSock, serialLog} {
		_ = os.Remove(f)
	}
	cmdline := "root=/dev/vda rw console=ttyS0,115200 loglevel=4 systemd.show_status=auto"
	if o.appendArgs != "" {
		cmdline += " " + o.appendArgs
	}
	args := []string{"-n", strconv.Itoa(o.niceness), o.qemu,
		"-nodefaults", "-no-user-config", "-name", "xf-guestimage",
		"-machine", "pc", "-accel", "tcg", "-cpu", o.cpu, "-smp", "1",
		"-m", strconv.Itoa(o.memMiB),
		"-display", "none", "-vga", "none", "-nic", "none",
		"-kernel", o.kernel, "-initrd", o.initrd, "-append", cmdline,
		"-drive", "file=" + o.disk + ",format=raw,if=virtio,cache=writeback",
		"-serial", "file:" + serialLog,
		"-chardev", "socket,id=ctl,path=" + ctlSock + ",server=on,wait=off",
		"-serial", "chardev:ctl",
		"-qmp", "unix:" + qmpSock + ",server=on,wait=off",
	}
	sum := summary{QEMUArgs: append([]string{"nice"}, args...), MemMiB: o.memMiB, IdleMem: o.idleMem, IdleDisk: o.idleDisk, Mem: o.memOut, Disk: o.disk}
	qemuLog, err := os.Create(filepath.Join(o.work, "qemu.log"))
	if err != nil {
		return fmt.Errorf("create qemu log: %w", err)
	}
	defer qemuLog.Close()
	cmd := exec.Command("nice", args...)
	cmd.Stdout, cmd.Stderr = qemuLog, qemuLog
	// Own process group, and QEMU dies with us even if we are killed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	logf("starting QEMU (TCG, %d MiB, cpu %s); serial console: %s", o.memMiB, o.cpu, serialLog)
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w (is qemu-system-x86 installed? build.sh deps installs it)", o.qemu, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	qemuDone := false
	defer func() {
		if qemuDone {
			return
		}
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
		logf("QEMU stopped (pid %d)", cmd.Process.Pid)
	}()

	qmp, err := dialQMP(ctx, qmpSock, exited)
	if err != nil {
		return err
	}
	defer qmp.Close()
	ctl, err := dialRetry(ctx, ctlSock, exited)
	if err != nil {
		return fmt.Errorf("control port: %w", err)
	}
	defer ctl.Close()
	ctlLog, err := os.Create(filepath.Join(o.work, "control.log"))
	if err != nil {
		return fmt.Errorf("create control log: %w", err)
	}
	defer ctlLog.Close()
	events := make(chan event, 64)
	go func() {
		defer close(events)
		sc := bufio.NewScanner(ctl)
		for sc.Scan() {
			fmt.Fprintln(ctlLog, sc.Text())
			if ev, ok := parseEvent(sc.Text()); ok {
				events <- ev
			}
		}
	}()

	wait := func(want string) error {
		tick := time.NewTicker(30 * time.Second)
		defer tick.Stop()
		for {
			select {
			case ev, ok := <-events:
				if !ok {
					return fmt.Errorf("control port closed while waiting for %q; see %s", want, serialLog)
				}
				sum.Events = append(sum.Events, ev)
				logf("guest: %s", strings.TrimPrefix(ev.Raw, "XF "))
				if ev.Name == "error" {
					return fmt.Errorf("guest workload failed: %s; see %s", ev.Fields["msg"], serialLog)
				}
				if ev.Name == want {
					return nil
				}
			case err := <-exited:
				qemuDone = true
				return fmt.Errorf("QEMU exited while waiting for %q: %v; see %s and %s", want, err, serialLog, filepath.Join(o.work, "qemu.log"))
			case <-tick.C:
				logf("waiting for guest event %q; last console line: %s", want, lastLine(serialLog))
				if w := serialWarnings(serialLog); len(w) > 0 && strings.Contains(strings.Join(w, "\n"), "Kernel panic") {
					return fmt.Errorf("guest kernel panicked: %s", w[len(w)-1])
				}
			case <-ctx.Done():
				return fmt.Errorf("waiting for guest event %q: %w; last console line: %s", want, ctx.Err(), lastLine(serialLog))
			}
		}
	}
	dump := func(path string) error {
		if err := qmp.Exec(ctx, "stop", nil); err != nil {
			return err
		}
		t0 := time.Now()
		logf("guest paused; saving %d MiB of RAM to %s", o.memMiB, path)
		_ = os.Remove(path)
		if err := qmp.Exec(ctx, "pmemsave", map[string]any{"val": 0, "size": int64(o.memMiB) << 20, "filename": path}); err != nil {
			return err
		}
		st, err := os.Stat(path)
		if err != nil {
			return fmt.Errorf("pmemsave wrote no file %s: %w", path, err)
		}
		if st.Size() != int64(o.memMiB)<<20 {
			return fmt.Errorf("pmemsave wrote %d bytes to %s, want %d", st.Size(), path, int64(o.memMiB)<<20)
		}
		logf("RAM saved in %.1fs", time.Since(t0).Seconds())
		return nil
	}

	if err := wait("idle"); err != nil {
		return err
	}
	if o.idleMem != "" {
		if err := dump(o.idleMem); err != nil {
			return err
		}
		if o.idleDisk != "" {
			// QEMU drains block I/O when it stops the VM and the guest synced
			// before "idle", so the file is the disk as the guest sees it.
			t0 := time.Now()
			n, err := sparseCopy(o.disk, o.idleDisk)
			if err != nil {
				return err
			}
			logf("disk copied to %s (%d MiB written, sparse) in %.1fs", o.idleDisk, n>>20, time.Since(t0).Seconds())
		}
		if err := qmp.Exec(ctx, "cont", nil); err != nil {
			return err
		}
	}
	if _, err := io.WriteString(ctl, "go\n"); err != nil {
		return fmt.Errorf("send go to guest: %w", err)
	}
	if err := wait("done"); err != nil {
		return err
	}
	if err := dump(o.memOut); err != nil {
		return err
	}
	logf("stopping QEMU")
	if err := qmp.Exec(ctx, "quit", nil); err != nil && !errors.Is(err, io.EOF) {
		logf("quit: %v (killing QEMU)", err)
	}
	select {
	case <-exited:
		qemuDone = true
	case <-time.After(30 * time.Second):
		return fmt.Errorf("QEMU did not exit 30s after quit; the disk image may be inconsistent")
	}
	sum.Seconds = time.Since(start).Seconds()
	sum.SerialWarn = serialWarnings(serialLog)
	for _, w := range sum.SerialWarn {
		logf("WARNING in guest console: %s", w)
	}
	b, _ := json.MarshalIndent(sum, "", "  ")
	if err := os.WriteFile(filepath.Join(o.work, "capture.json"), append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("write capture.json: %w", err)
	}
	logf("finished in %s; summary: %s", time.Since(start).Truncate(time.Second), filepath.Join(o.work, "capture.json"))
	return nil
}

func dialRetry(ctx context.Context, path string, exited <-chan error) (net.Conn, error) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.Dial("unix", path)
		if err == nil {
			return c, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("connect %s: %w (QEMU did not open it within 30s; see qemu.log)", path, err)
		}
		select {
		case err := <-exited:
			return nil, fmt.Errorf("QEMU exited at start: %v (see qemu.log in the work dir)", err)
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// qmpClient is a minimal synchronous QMP client: one command at a time,
// asynchronous events are skipped.
type qmpClient struct {
	c  net.Conn
	sc *bufio.Scanner
}

func dialQMP(ctx context.Context, path string, exited <-chan error) (*qmpClient, error) {
	c, err := dialRetry(ctx, path, exited)
	if err != nil {
		return nil, fmt.Errorf("QMP: %w", err)
	}
	q := &qmpClient{c: c, sc: bufio.NewScanner(c)}
	q.sc.Buffer(make([]byte, 64<<10), 1<<20)
	if !q.sc.Scan() {
		c.Close()
		return nil, fmt.Errorf("QMP %s: no greeting: %v", path, q.sc.Err())
	}
	if err := q.Exec(ctx, "qmp_capabilities", nil); err != nil {
		c.Close()
		return nil, err
	}
	return q, nil
}

func (q *qmpClient) Close() error { return q.c.Close() }

func (q *qmpClient) Exec(ctx context.Context, command string, args map[string]any) error {
	req := map[string]any{"execute": command}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("QMP %s: %w", command, err)
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = q.c.SetDeadline(dl)
	}
	if _, err := q.c.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("QMP %s: send: %w", command, err)
	}
	for q.sc.Scan() {
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := json.Unmarshal(q.sc.Bytes(), &resp); err != nil {
			return fmt.Errorf("QMP %s: bad reply %q: %w", command, q.sc.Text(), err)
		}
		switch {
		case resp.Event != "":
			continue
		case resp.Error != nil:
			return fmt.Errorf("QMP %s: %s: %s", command, resp.Error.Class, resp.Error.Desc)
		case resp.Return != nil:
			return nil
		}
	}
	if err := q.sc.Err(); err != nil {
		return fmt.Errorf("QMP %s: read: %w", command, err)
	}
	return fmt.Errorf("QMP %s: %w", command, io.EOF)
}

// sparseCopy copies src to dst, leaving all-zero 1 MiB chunks as holes. It
// returns the bytes written.
func sparseCopy(src, dst string) (int64, error) {
	in, err := os.Open(src)
	if err != nil {
		return 0, fmt.Errorf("copy disk: %w", err)
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return 0, fmt.Errorf("copy disk: %w", err)
	}
	tmp := dst + ".tmp"
	out, err := os.Create(tmp)
	if err != nil {
		return 0, fmt.Errorf("copy disk: %w", err)
	}
	defer func() { _ = os.Remove(tmp) }()
	defer out.Close()
	buf := make([]byte, 1<<20)
	var off, written int64
	nextReport := int64(1 << 30)
	for off < st.Size() {
		// Skip holes: SEEK_DATA gives the next offset holding data (ENXIO
		// after the last data). Filesystems without hole support return off.
		next, err := in.Seek(off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			return written, fmt.Errorf("copy disk: seek %s: %w", src, err)
		}
		next &^= 1<<20 - 1 // keep chunks 1 MiB-aligned
		for off < next {
			off += 1 << 20
			if off >= nextReport {
				logf("copying disk: %d/%d MiB", off>>20, st.Size()>>20)
				nextReport += 1 << 30
			}
		}
		if _, err := in.Seek(off, io.SeekStart); err != nil {
			return written, fmt.Errorf("copy disk: seek %s: %w", src, err)
		}
		n, err := io.ReadFull(in, buf)
		if n > 0 {
			if !allZero(buf[:n]) {
				if _, err := out.WriteAt(buf[:n], off); err != nil {
					return written, fmt.Errorf("copy disk to %s: %w", tmp, err)
				}
				written += int64(n)
			}
			off += int64(n)
			if off >= nextReport {
				logf("copying disk: %d/%d MiB", off>>20, st.Size()>>20)
				nextReport += 1 << 30
			}
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			break
		}
		if err != nil {
			return written, fmt.Errorf("copy disk: read %s: %w", src, err)
		}
	}
	if err := out.Truncate(st.Size()); err != nil {
		return written, fmt.Errorf("copy disk: %w", err)
	}
	if err := out.Close(); err != nil {
		return written, fmt.Errorf("copy disk: %w", err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		return written, fmt.Errorf("copy disk: %w", err)
	}
	return written, nil
}

var zeroChunk = make([]byte, 1<<20)

func allZero(b []byte) bool { return bytes.Equal(b, zeroChunk[:len(b)]) }

func lastLine(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "(no console output yet)"
	}
	lines := strings.Split(strings.TrimRight(string(b), "\r\n"), "\n")
	l := strings.TrimSpace(lines[len(lines)-1])
	if len(l) > 160 {
		l = l[:160]
	}
	if l == "" {
		return "(empty)"
	}
	return l
}

var warnRE = regexp.MustCompile(`(?i)(segfault|general protection|Kernel panic|Oops:|BUG:|Out of memory)`)

func serialWarnings(path string) []string {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if warnRE.MatchString(l) {
			out = append(out, strings.TrimSpace(l))
		}
	}
	return out
}
