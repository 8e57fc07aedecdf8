package sim

import (
	"encoding/binary"
	"math"
	"sync/atomic"
)

// The control page is a 4 KiB memfd shared by the agent and the guest
// process. All multi-byte fields are native-endian words accessed with
// atomics; the agent writes the parameters before the guest starts.
//
//	off  size  field
//	  0     8  magic "XFSIMCTL"
//	  8     4  vcpus
//	 12     4  pause word (futex): odd = vCPUs must park; bumped by 1 per Pause/Resume
//	 16     8  memory bytes
//	 24     8  write rate, pages/s for the whole domain (float64 bits)
//	 32     8  read rate, pages/s (float64 bits)
//	 40     8  hot set first pfn
//	 48     8  hot set pages (0 = uniform)
//	 56     8  hot share (float64 bits)
//	 64     8  seed
//	 72     4  probe request sequence (agent)
//	 76     4  probe acknowledged sequence (vCPU 0)
//	 80     8  probe pfn
//	 88     8  probe result (FNV-1a of the page as the guest read it)
//	 96     4  park sequence: bumped (and futex-woken) by each vCPU that parks
//	128+64i    vCPU i: write rng, read rng, writes, reads (8 each), parked-at pause word (4)
const (
	ctlSize     = 4096
	offMagic    = 0
	offVCPUs    = 8
	offPause    = 12
	offMemBytes = 16
	offWRate    = 24
	offRRate    = 32
	offHotStart = 40
	offHotPages = 48
	offHotShare = 56
	offSeed     = 64
	offProbeReq = 72
	offProbeAck = 76
	offProbePFN = 80
	offProbeRes = 88
	offParkSeq  = 96
	offVCPU0    = 128
	vcpuStride  = 64

	vcWRNG   = 0
	vcRRNG   = 8
	vcWrites = 16
	vcReads  = 24
	vcParked = 32
)

// controlMagic is "XFSIMCTL" read as a little-endian word.
var controlMagic = binary.LittleEndian.Uint64([]byte("XFSIMCTL"))

type ctlPage []byte

func (c ctlPage) u32(off int) *uint32 { return wordAt32(c, off) }
func (c ctlPage) u64(off int) *uint64 { return wordAt64(c, off) }

func (c ctlPage) load64(off int) uint64     { return atomic.LoadUint64(c.u64(off)) }
func (c ctlPage) store64(off int, v uint64) { atomic.StoreUint64(c.u64(off), v) }
func (c ctlPage) loadF(off int) float64     { return math.Float64frombits(c.load64(off)) }
func (c ctlPage) storeF(off int, v float64) { c.store64(off, math.Float64bits(v)) }
func (c ctlPage) load32(off int) uint32     { return atomic.LoadUint32(c.u32(off)) }
func (c ctlPage) store32(off int, v uint32) { atomic.StoreUint32(c.u32(off), v) }
func vcpuOff(i int, field int) int          { return offVCPU0 + i*vcpuStride + field }

// workload is the pure part of the guest's workload: which page an
// operation touches and what a write stores. The guest runs it; tests replay
// it to predict the guest.
type workload struct {
	pages    uint64
	hotStart uint64
	hotPages uint64
	hotShare float64
	seed     uint64
}

func (c ctlPage) workload() workload {
	return workload{
		pages:    c.load64(offMemBytes) / 4096,
		hotStart: c.load64(offHotStart),
		hotPages: c.load64(offHotPages),
		hotShare: c.loadF(offHotShare),
		seed:     c.load64(offSeed),
	}
}

// splitmix64 advances *s and returns the next pseudo-random word.
func splitmix64(s *uint64) uint64 {
	*s += 0x9e3779b97f4a7c15
	z := *s
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// initialRNG is vCPU i's starting generator state for a seed.
func initialRNG(seed uint64, i int, stream uint64) uint64 {
	s := seed ^ (uint64(i+1) * 0xd1b54a32d192ed03) ^ stream
	return splitmix64(&s)
}

// pick chooses the pfn of the next operation.
func (w *workload) pick(rng *uint64) uint64 {
	r := splitmix64(rng)
	if w.hotPages > 0 && float64(r>>11)/(1<<53) < w.hotShare {
		return w.hotStart + splitmix64(rng)%w.hotPages
	}
	return splitmix64(rng) % w.pages
}

// stampOffset is where write number seq stores its stamp: 64-byte slots
// cycling through the page.
func stampOffset(seq uint64) int { return int(seq%64) * 64 }

// stamp writes a 48-byte stamp into page for write seq of vCPU vcpu: six
// words, none zero, unlike anything on a random disk, so the page becomes
// neither a zero page nor a disk block.
func (w *workload) stamp(page []byte, vcpu int, seq uint64) {
	off := stampOffset(seq)
	s := w.seed ^ seq ^ uint64(vcpu)<<56
	for k := 0; k < 6; k++ {
		binary.LittleEndian.PutUint64(page[off+8*k:], splitmix64(&s)|1)
	}
}

// fnv64 hashes a page (FNV-1a over 8-byte words; cheap and allocation free).
func fnv64(page []byte) uint64 {
	h := uint64(14695981039346656037)
	for i := 0; i+8 <= len(page); i += 8 {
		h ^= binary.LittleEndian.Uint64(page[i:])
		h *= 1099511628211
	}
	return h
}
