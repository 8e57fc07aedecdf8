package main

import (
	"context"
	"net"
	"time"

	"github.com/xenferry/xenferry/hack/internal/labkit"
)

// cleanEnv is this process's environment for a child: without the
// variables labkit.EnvDrop names (the failpoint variables are set per
// agent), followed by extra.
func cleanEnv(extra ...string) []string { return labkit.CleanEnv(labkit.EnvDrop, extra...) }

// forward relays connections accepted on ln to addr (dialed from this
// program's own namespace): the agents in their namespaces reach the API
// server on loopback through it. It stops when ctx ends.
func forward(ctx context.Context, ln net.Listener, addr string) {
	go func() { <-ctx.Done(); ln.Close() }()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			d := net.Dialer{Timeout: 5 * time.Second}
			u, err := d.DialContext(ctx, "tcp", addr)
			if err != nil {
				return
			}
			defer u.Close()
			pipe(c, u)
		}()
	}
}

// pipe copies both ways until either side ends, then closes both.
func pipe(a, b net.Conn) {
	done := make(chan struct{}, 2)
	cp := func(dst, src net.Conn) {
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			if n > 0 {
				if _, werr := dst.Write(buf[:n]); werr != nil {
					break
				}
			}
			if err != nil {
				break
			}
		}
		done <- struct{}{}
	}
	go cp(a, b)
	go cp(b, a)
	<-done
	a.Close()
	b.Close()
	<-done
}
