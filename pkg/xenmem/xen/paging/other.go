//go:build !linux

package paging

import "fmt"

// Probe: only Linux dom0s can page domain memory.
func Probe() error { return fmt.Errorf("%w: not Linux", ErrUnsupported) }

// Pager is unavailable off Linux.
type Pager struct{}

// Open fails off Linux.
func Open(dom uint16, maxGFN uint64) (*Pager, error) { return nil, Probe() }
