package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The test network: every host is a network namespace of its own, joined by
// a veth pair to a bridge that lives in a hub namespace. Addresses come from
// 198.18.0.0/15 (RFC 2544, for benchmarking) and exist only inside the
// namespaces this program creates, so no packet can leave the machine.
//
//	hub  (xff<pid>-hub)  br0 198.18.0.1/24: API forwarder, fault proxy, hostile peers
//	A    (xff<pid>-a)    eth0 198.18.0.2/24: source agent and its guests
//	B    (xff<pid>-b)    eth0 198.18.0.3/24: target agent and its guests
const (
	hubAddr  = "198.18.0.1"
	netMask  = "/24"
	dataPort = 7000
)

// netnsPrefix names this program's namespaces; the pid keeps concurrent runs
// apart and lets a later run remove what a killed run left behind.
const netnsPrefix = "xff"

var netnsRE = regexp.MustCompile(`^` + netnsPrefix + `(\d+)-`)

// ipCmd runs ip(8) with a timeout.
func ipCmd(ctx context.Context, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// network is the set of namespaces of one run.
type network struct {
	hub   string
	hosts map[string]*netHost // by XenHost name
}

type netHost struct {
	ns      string
	addr    string // eth0 address inside ns
	hubVeth string // the veth end on the bridge, in the hub namespace
}

// removeStaleNamespaces deletes namespaces left by runs whose process is gone.
func removeStaleNamespaces(ctx context.Context) {
	out, err := exec.CommandContext(ctx, "ip", "netns", "list").Output()
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		name := f[0]
		m := netnsRE.FindStringSubmatch(name)
		if m == nil {
			continue
		}
		pid, _ := strconv.Atoi(m[1])
		if pid == os.Getpid() || unix.Kill(pid, 0) == nil {
			continue
		}
		_ = ipCmd(ctx, "netns", "del", name)
	}
}

// setupNetwork creates the hub with its bridge and one namespace per host.
func setupNetwork(ctx context.Context, hosts []string) (*network, error) {
	removeStaleNamespaces(ctx)
	p := fmt.Sprintf("%s%d-", netnsPrefix, os.Getpid())
	n := &network{hub: p + "hub", hosts: map[string]*netHost{}}
	steps := [][]string{
		{"netns", "add", n.hub},
		{"-n", n.hub, "link", "set", "lo", "up"},
		{"-n", n.hub, "link", "add", "br0", "type", "bridge"},
		{"-n", n.hub, "addr", "add", hubAddr + netMask, "dev", "br0"},
		{"-n", n.hub, "link", "set", "br0", "up"},
	}
	for i, h := range hosts {
		nh := &netHost{ns: p + string(rune('a'+i)), addr: fmt.Sprintf("198.18.0.%d", 2+i), hubVeth: "veth-" + string(rune('a'+i))}
		n.hosts[h] = nh
		steps = append(steps,
			[]string{"netns", "add", nh.ns},
			[]string{"-n", nh.ns, "link", "set", "lo", "up"},
			[]string{"-n", n.hub, "link", "add", nh.hubVeth, "type", "veth", "peer", "name", "eth0", "netns", nh.ns},
			[]string{"-n", n.hub, "link", "set", nh.hubVeth, "master", "br0"},
			[]string{"-n", n.hub, "link", "set", nh.hubVeth, "up"},
			[]string{"-n", nh.ns, "addr", "add", nh.addr + netMask, "dev", "eth0"},
			[]string{"-n", nh.ns, "link", "set", "eth0", "up"},
		)
	}
	for _, s := range steps {
		if err := ipCmd(ctx, s...); err != nil {
			n.teardown(context.Background())
			return nil, err
		}
	}
	return n, nil
}

// teardown deletes every namespace of the run (their veths go with them).
func (n *network) teardown(ctx context.Context) {
	if n == nil {
		return
	}
	for _, h := range n.hosts {
		_ = ipCmd(ctx, "netns", "del", h.ns)
	}
	_ = ipCmd(ctx, "netns", "del", n.hub)
}

// partition cuts host h off: its veth's end on the bridge goes down, so
// the bridge drops every frame to and from h (the kernel here has no netem
// qdisc). Inside h the interface stays up with its routes, so h's sockets
// see no error, only silence: a partition, not a reset.
func (n *network) partition(ctx context.Context, h string) error {
	return ipCmd(ctx, "-n", n.hub, "link", "set", n.hosts[h].hubVeth, "down")
}

// heal ends a partition.
func (n *network) heal(ctx context.Context, h string) error {
	return ipCmd(ctx, "-n", n.hub, "link", "set", n.hosts[h].hubVeth, "up")
}

// netnsInode identifies a namespace (the inode /proc/PID/ns/net links to).
func netnsInode(name string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat("/run/netns/"+name, &st); err != nil {
		return 0, fmt.Errorf("netns %s: %w", name, err)
	}
	return st.Ino, nil
}

// inNetns runs fn on an OS thread switched into namespace name, so sockets
// fn creates belong to that namespace (a socket keeps the namespace it was
// created in). The thread switches back before it is released; if it
// cannot, it stays locked and dies with the goroutine rather than serve
// other goroutines from the wrong namespace.
func inNetns(name string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := unix.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- fmt.Errorf("open own netns: %w", err)
			return // thread dies locked
		}
		defer unix.Close(orig)
		target, err := unix.Open("/run/netns/"+name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- fmt.Errorf("open netns %s: %w", name, err)
			runtime.UnlockOSThread()
			return
		}
		defer unix.Close(target)
		if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("enter netns %s: %w", name, err)
			runtime.UnlockOSThread()
			return
		}
		ferr := fn()
		if err := unix.Setns(orig, unix.CLONE_NEWNET); err == nil {
			runtime.UnlockOSThread()
		}
		errc <- ferr
	}()
	return <-errc
}

// listenIn opens a TCP listener inside namespace ns.
func listenIn(ns, addr string) (net.Listener, error) {
	var ln net.Listener
	err := inNetns(ns, func() error {
		var err error
		ln, err = net.Listen("tcp", addr)
		return err
	})
	return ln, err
}

// dialIn connects from inside namespace ns.
func dialIn(ctx context.Context, ns, addr string) (net.Conn, error) {
	var c net.Conn
	err := inNetns(ns, func() error {
		var err error
		d := net.Dialer{Timeout: 5 * time.Second}
		c, err = d.DialContext(ctx, "tcp", addr)
		return err
	})
	return c, err
}

// killQuiet is SIGKILL without an error for a process already gone.
func killQuiet(pid int) { _ = syscall.Kill(pid, syscall.SIGKILL) }
