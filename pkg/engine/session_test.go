package engine

import (
	"context"
	"errors"
	"net"
	"testing"

	"github.com/xenferry/xenferry/pkg/wire"
)

// TestSendPrioDuringRecovery: while a post-copy session recovers, a demand
// or fallback request is dropped (nil error) whether the priority
// connection is gone or broken, so the demand path outlives the break;
// outside post-copy a broken connection is an error.
func TestSendPrioDuringRecovery(t *testing.T) {
	ctx := context.Background()
	body := wire.MarshalRequest(nil, wire.ReasonDemand, []uint64{1, 2, 3})

	s := &session{id: "t"}
	s.resumed.Store(true)
	s.lazyOn.Store(true)
	if err := s.sendPrio(ctx, body); err != nil { // no connection at all
		t.Fatalf("no priority connection while recovering: %v", err)
	}

	a, b := net.Pipe()
	b.Close()
	s.prio = newConn(a, nil, true) // broken: the far end is closed
	if err := s.sendPrio(ctx, body); err != nil {
		t.Fatalf("broken priority connection while recoverable: %v", err)
	}

	s.lazyOn.Store(false) // not in post-copy: nothing recovers
	if err := s.sendPrio(ctx, body); !errors.Is(err, errConnLost) {
		t.Fatalf("broken priority connection outside post-copy: %v, want errConnLost", err)
	}
}
