package agent

import (
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/go-logr/logr"

	"github.com/xenferry/xenferry/pkg/dedup"
	"github.com/xenferry/xenferry/pkg/xlstream"
)

// xlHeaderWithDisks returns the start of an xl stream (xl save header and
// its JSON domain configuration) listing the given disks.
func xlHeaderWithDisks(paths ...string) []byte {
	var disks []string
	for i, p := range paths {
		disks = append(disks, `{"pdev_path":"`+p+`","vdev":"xvd`+string(rune('a'+i))+`","backend":"phy"}`)
	}
	cfg := []byte(`{"c_info":{"name":"d"},"disks":[` + strings.Join(disks, ",") + `]}` + "\x00")
	opt := binary.LittleEndian.AppendUint32(nil, uint32(len(cfg)))
	opt = append(opt, cfg...)
	h := []byte("Xen saved domain, xl format\n \x00 \r")
	h = binary.LittleEndian.AppendUint32(h, 0x01020304)
	h = binary.LittleEndian.AppendUint32(h, uint32(xlstream.XLFlagJSON|xlstream.XLFlagStreamV2))
	h = binary.LittleEndian.AppendUint32(h, 0)
	h = binary.LittleEndian.AppendUint32(h, uint32(len(opt)))
	return append(h, opt...)
}

type nopWriteCloser struct{}

func (nopWriteCloser) Write(p []byte) (int, error) { return len(p), nil }
func (nopWriteCloser) Close() error                { return nil }

// The destination opens the domain's disks from xl's header on the first
// reference; a disk that opens and one that does not must both be handled
// (a disk that opened has a nil entry in Unavailable).
func TestLazyResolverOpensTheDisksOfTheXLHeader(t *testing.T) {
	disk := filepath.Join(t.TempDir(), "disk.raw")
	block := make([]byte, 4096)
	for i := range block {
		block[i] = byte(i*7 + 1)
	}
	if err := os.WriteFile(disk, append(make([]byte, 4096), block...), 0o644); err != nil {
		t.Fatal(err)
	}
	tee := &prefixTee{w: nopWriteCloser{}, max: 1 << 20}
	if _, err := tee.Write(xlHeaderWithDisks(disk, filepath.Join(t.TempDir(), "missing.raw"))); err != nil {
		t.Fatal(err)
	}
	res := &lazyResolver{ctx: context.Background(), log: logr.Discard(), header: tee}
	defer res.close()

	dst := make([]byte, 4096)
	ref := xlstream.Ref{Disk: 0, Offset: 4096, Hash: hashOf(block)}
	if err := res.ReadPage(ref, dst); err != nil {
		t.Fatalf("ReadPage from the disk that opened: %v", err)
	}
	if string(dst) != string(block) {
		t.Fatal("ReadPage returned other bytes than the disk block")
	}
	if err := res.ReadPage(xlstream.Ref{Disk: 1, Offset: 0, Hash: hashOf(block)}, dst); err == nil {
		t.Fatal("ReadPage from a disk that is missing here succeeded")
	}
}

func TestLazyResolverWithoutXLHeaderFails(t *testing.T) {
	tee := &prefixTee{w: nopWriteCloser{}, max: 1 << 20}
	res := &lazyResolver{ctx: context.Background(), log: logr.Discard(), header: tee}
	if err := res.ReadPage(xlstream.Ref{}, make([]byte, 4096)); err == nil {
		t.Fatal("ReadPage without any xl header succeeded")
	}
}

func hashOf(p []byte) [16]byte { return dedup.HashPage(p) }
