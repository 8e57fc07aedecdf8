package paging

import (
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// maxReadBatch bounds one foreign mapping.
const maxReadBatch = 1024

func readPages(h *hypervisor, dom uint16, gfns []uint64, dst []byte, tries int) error {
	if len(dst) != len(gfns)*PageSize {
		return fmt.Errorf("paging: %d bytes for %d pages", len(dst), len(gfns))
	}
	for start := 0; start < len(gfns); start += maxReadBatch {
		end := min(start+maxReadBatch, len(gfns))
		todo := make([]int, 0, end-start)
		for i := start; i < end; i++ {
			todo = append(todo, i)
		}
		for try := 0; len(todo) > 0; try++ {
			if try >= tries {
				return fmt.Errorf("paging: %d gfns of domain %d still unreadable after %d tries (first %#x)", len(todo), dom, tries, gfns[todo[0]])
			}
			if try > 0 {
				time.Sleep(time.Duration(min(try, 50)) * time.Millisecond)
			}
			batch := make([]uint64, len(todo))
			for k, i := range todo {
				batch[k] = gfns[i]
			}
			mem, errs, err := h.mapForeign(dom, batch)
			if err != nil {
				return err
			}
			var again []int
			for k, i := range todo {
				switch e := unix.Errno(-errs[k]); {
				case errs[k] == 0:
					copy(dst[i*PageSize:(i+1)*PageSize], mem[k*PageSize:(k+1)*PageSize])
				case e == unix.ENOENT:
					again = append(again, i) // paged out: Xen asked the pager
				default:
					_ = unix.Munmap(mem)
					return fmt.Errorf("map gfn %#x of domain %d: %w", gfns[i], dom, e)
				}
			}
			_ = unix.Munmap(mem)
			todo = again
		}
	}
	return nil
}

// ReadDomainPages copies the given gfns of dom into dst, retrying paged-out
// ones (a pager must be serving them) up to tries rounds.
func ReadDomainPages(dom uint16, gfns []uint64, dst []byte, tries int) error {
	h, err := openHypervisor()
	if err != nil {
		return err
	}
	defer h.close()
	return readPages(h, dom, gfns, dst, tries)
}

// PauseDomain pauses (on) or unpauses dom; pauses nest.
func PauseDomain(dom uint16, on bool) error {
	h, err := openHypervisor()
	if err != nil {
		return err
	}
	defer h.close()
	return h.pause(dom, on)
}
