package main

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// faultProxy sits on the data path of the cells that need it: the target
// agent advertises the proxy's address, so every connection of a migration
// (data, priority, recovery) crosses it. It relays bytes unchanged until
// told to flip one byte (corrupt-byte) or to cut every open connection
// (truncate). It listens and dials inside the hub namespace.
type faultProxy struct {
	ns, target string
	ln         net.Listener
	ctx        context.Context
	cancel     context.CancelFunc

	mu    sync.Mutex
	conns map[*proxyConn]struct{} // open relays; bounded by the migration's streams

	flip    atomic.Int32 // flips still to do
	flipped chan struct{}
	relayed atomic.Int64 // bytes relayed since the last reset
}

type proxyConn struct{ a, b net.Conn }

func newFaultProxy(ns, listen, target string) (*faultProxy, error) {
	ln, err := listenIn(ns, listen)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &faultProxy{ns: ns, target: target, ln: ln, ctx: ctx, cancel: cancel, conns: map[*proxyConn]struct{}{}, flipped: make(chan struct{}, 1)}
	go p.serve()
	return p, nil
}

func (p *faultProxy) addr() string { return p.ln.Addr().String() }

func (p *faultProxy) close() {
	p.cancel()
	p.ln.Close()
	p.cut()
}

func (p *faultProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		go p.relay(c)
	}
}

func (p *faultProxy) relay(a net.Conn) {
	ctx, cancel := context.WithTimeout(p.ctx, 5*time.Second)
	b, err := dialIn(ctx, p.ns, p.target)
	cancel()
	if err != nil {
		a.Close()
		return
	}
	pc := &proxyConn{a: a, b: b}
	p.mu.Lock()
	p.conns[pc] = struct{}{}
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.conns, pc)
		p.mu.Unlock()
	}()
	done := make(chan struct{}, 2)
	go p.copy(b, a, done)
	go p.copy(a, b, done)
	<-done
	a.Close()
	b.Close()
	<-done
}

// copy relays src to dst; when a flip is pending it flips one byte in the
// middle of the next chunk of at least 8 bytes (an END record is 16).
func (p *faultProxy) copy(dst, src net.Conn, done chan<- struct{}) {
	defer func() { done <- struct{}{} }()
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if n >= 8 && p.flip.Load() > 0 && p.flip.Add(-1) >= 0 {
				buf[n/2] ^= 0x5a
				select {
				case p.flipped <- struct{}{}:
				default:
				}
			}
			p.relayed.Add(int64(n))
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// corruptNext flips one byte of the next chunk that crosses the proxy (in
// either direction) and reports whether that happened within limit.
func (p *faultProxy) corruptNext(limit time.Duration) bool {
	select {
	case <-p.flipped:
	default:
	}
	p.flip.Store(1)
	select {
	case <-p.flipped:
		return true
	case <-time.After(limit):
		p.flip.Store(0)
		return false
	}
}

// cut resets every open connection (SO_LINGER 0: the peers see a reset,
// as from a middlebox that dropped the flow) and returns how many it cut.
func (p *faultProxy) cut() int {
	p.mu.Lock()
	list := make([]*proxyConn, 0, len(p.conns))
	for pc := range p.conns {
		list = append(list, pc)
	}
	p.mu.Unlock()
	for _, pc := range list {
		for _, c := range []net.Conn{pc.a, pc.b} {
			if tc, ok := c.(*net.TCPConn); ok {
				_ = tc.SetLinger(0)
			}
			c.Close()
		}
	}
	return len(list)
}
