package gateway_test

import (
	"encoding/binary"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"slices"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"goldilocks/gateway"
	"goldilocks/internal/block"
)

// changedDev is a memory device that tracks changes since one snapshot,
// "s1": its first 64 KiB and its last 4 KiB were written since.
type changedDev struct{ *block.Mem }

func (d changedDev) Caps() block.Caps { return block.CanExtents | block.CanChanges }

func (d changedDev) Extents(dst []block.Extent, off, length int64, _ int) ([]block.Extent, error) {
	return append(dst, block.Extent{Length: length}), nil // all data
}

func (d changedDev) ChangedExtents(since string, dst []block.Extent, off, length int64, _ int) ([]block.Extent, error) {
	if since != "s1" {
		return dst, fmt.Errorf("snapshot %s: %w", since, block.ErrNotSupported)
	}
	size := d.Size()
	marks := []block.Extent{{Length: 64 << 10, Flags: block.ExtentDirty}, {Length: size - 68<<10}, {Length: 4 << 10, Flags: block.ExtentDirty}}
	var at int64
	for _, e := range marks {
		lo, hi := max(at, off), min(at+e.Length, off+length)
		if lo < hi {
			dst = append(dst, block.Extent{Length: hi - lo, Flags: e.Flags})
		}
		at += e.Length
	}
	return dst, nil
}

type changedExports struct{ dev block.Device }

func (e changedExports) Open(name string) (*gateway.Export, func(), error) {
	if name != "disk" {
		return nil, nil, gateway.ErrUnknownExport
	}
	return &gateway.Export{Name: "disk", Device: e.dev}, func() {}, nil
}

func (e changedExports) List() ([]gateway.ExportInfo, error) {
	return []gateway.ExportInfo{{Name: "disk", Changed: []string{"s1"}}}, nil
}

// TestChangedContext: the changed-block contexts (goldilocks:changed:SNAP
// and QEMU's name for it, qemu:dirty-bitmap:SNAP) are listed, selected
// beside base:allocation, and answered in the same reply: a chunk of
// context 1 without DONE, then one of context 2 with DONE, whose extents
// are the device's.
func TestChangedContext(t *testing.T) {
	const size = 1 << 20
	srv := gateway.New(gateway.Config{Exports: changedExports{changedDev{block.NewMem(size)}}, Logger: slog.New(slog.DiscardHandler),
		Metrics: gateway.NewMetrics(prometheus.NewRegistry())})
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Shutdown(t.Context()) })
	dial := func() *client {
		c, err := net.Dial("unix", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		cl := newClient(t, c)
		cl.option(8, nil)
		if _, typ, _ := cl.optReply(); typ != 1 {
			t.Fatalf("STRUCTURED_REPLY: %#x", typ)
		}
		return cl
	}

	cl := dial()
	for _, tc := range []struct {
		queries []string
		want    []string
	}{
		{nil, []string{"base:allocation", "goldilocks:changed:s1"}},
		{[]string{"qemu:dirty-bitmap:"}, []string{"qemu:dirty-bitmap:s1"}},
		{[]string{"goldilocks:"}, []string{"goldilocks:changed:s1"}},
		{[]string{"goldilocks:changed:s1", "goldilocks:changed:s2"}, []string{"goldilocks:changed:s1"}},
	} {
		cl.option(9, metaBytes("disk", tc.queries...))
		ids, names, last := cl.metaReplies()
		if last != 1 || !slices.Equal(names, tc.want) || slices.ContainsFunc(ids, func(id uint32) bool { return id != 0 }) {
			t.Fatalf("LIST %q: ids %v names %q reply %#x, want %q", tc.queries, ids, names, last, tc.want)
		}
	}

	for _, name := range []string{"goldilocks:changed:s1", "qemu:dirty-bitmap:s1"} {
		cl := dial()
		cl.option(10, metaBytes("disk", "base:allocation", name))
		ids, names, last := cl.metaReplies()
		if last != 1 || !slices.Equal(names, []string{"base:allocation", name}) || !slices.Equal(ids, []uint32{1, 2}) {
			t.Fatalf("SET %s: ids %v names %q reply %#x", name, ids, names, last)
		}
		cl.option(7, goData("disk"))
		for {
			if _, typ, _ := cl.optReply(); typ == 1 {
				break
			} else if typ&(1<<31) != 0 {
				t.Fatalf("GO: %#x", typ)
			}
		}
		cl.request(0, 7, 9, 0, size, nil)
		flags, typ, cookie, p := cl.structuredChunk()
		if typ != 5 || cookie != 9 || flags&1 != 0 || binary.BigEndian.Uint32(p) != 1 {
			t.Fatalf("first chunk: flags %#x type %d cookie %d context %d; want BLOCK_STATUS of context 1 without DONE", flags, typ, cookie, binary.BigEndian.Uint32(p))
		}
		flags, typ, _, p = cl.structuredChunk()
		if typ != 5 || flags&1 == 0 || binary.BigEndian.Uint32(p) != 2 {
			t.Fatalf("second chunk: flags %#x type %d context %d; want BLOCK_STATUS of context 2 with DONE", flags, typ, binary.BigEndian.Uint32(p))
		}
		var got [][2]uint32
		for b := p[4:]; len(b) >= 8; b = b[8:] {
			got = append(got, [2]uint32{binary.BigEndian.Uint32(b), binary.BigEndian.Uint32(b[4:])})
		}
		want := [][2]uint32{{64 << 10, 1}, {size - 68<<10, 0}, {4 << 10, 1}}
		if !slices.Equal(got, want) {
			t.Fatalf("changed extents %v, want %v", got, want)
		}
	}

	// Only the changed context, of a snapshot that is not there: nothing
	// is selected, and BLOCK_STATUS is refused.
	cl = dial()
	cl.option(10, metaBytes("disk", "qemu:dirty-bitmap:nope"))
	if _, names, last := cl.metaReplies(); len(names) != 0 || last != 1 {
		t.Fatalf("SET of an unknown bitmap: %q %#x", names, last)
	}
	cl.option(7, goData("disk"))
	for {
		if _, typ, _ := cl.optReply(); typ == 1 {
			break
		}
	}
	cl.request(0, 7, 3, 0, 4096, nil)
	if e, _ := cl.errnoOfReply(); e != 22 {
		t.Fatalf("BLOCK_STATUS with no context: errno %d, want EINVAL", e)
	}
}
