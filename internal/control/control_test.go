package control

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"goldilocks/internal/volume"
)

// The control API end to end over its Unix socket: rotation with a
// result, rekey with progress, a cancelled rekey that stops and resumes,
// and errors carried back as errors.
func TestControlSocket(t *testing.T) {
	dir := t.TempDir()
	reg, err := volume.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"a", "b"} {
		if _, err := reg.Create(volume.CreateOptions{Name: n, Size: 64 << 20, Encrypted: true}); err != nil {
			t.Fatal(err)
		}
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if _, err := Dial(dir); !errors.Is(err, ErrNoGateway) {
		t.Fatalf("dial with no gateway: %v", err)
	}
	l, err := Listen(dir)
	if err != nil {
		t.Fatal(err)
	}
	ex := volume.NewExports(reg, log)
	keys := &volume.Keys{Reg: reg, Open: ex, Log: log}
	srv := &http.Server{Handler: Handler(keys, nil, nil, nil, log)}
	go srv.Serve(l)
	defer srv.Close()
	if _, err := Listen(dir); err == nil || !strings.Contains(err.Error(), "another gateway") {
		t.Fatalf("second Listen: %v", err)
	}
	c, err := Dial(dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	var ticks int
	res, err := c.Rotate(ctx, volume.RotateOptions{All: true, Progress: func(d, n int) { ticks++ }})
	if err != nil || len(res.Volumes) != 2 || res.Volumes[1].To != 2 || ticks == 0 {
		t.Fatalf("rotate: %+v %v (%d progress lines)", res, err, ticks)
	}
	if _, err := c.Rotate(ctx, volume.RotateOptions{Keys: []string{"nope"}}); err == nil || !strings.Contains(err.Error(), "no volume uses it") {
		t.Fatalf("rotate of an unknown key: %v", err)
	}
	if err := c.Rekey(ctx, "zzz", volume.RekeyOptions{}); err == nil || !strings.Contains(err.Error(), "no such volume") {
		t.Fatalf("rekey of an unknown volume: %v", err)
	}

	// Fill a, then cancel a slow rekey half-way: it stops, resumably.
	exp, release, err := ex.Open("a")
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for off := int64(0); off < 64<<20; off += int64(len(buf)) {
		buf[0] = byte(off >> 20)
		if _, err := exp.Device.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	cctx, cancel := context.WithCancel(ctx)
	var last uint64
	done := make(chan error, 1)
	go func() {
		done <- c.Rekey(cctx, "a", volume.RekeyOptions{Rate: 16 << 20, Progress: func(d, _ uint64) { last = d }})
	}()
	time.Sleep(1500 * time.Millisecond)
	cancel()
	if err := <-done; err == nil {
		t.Fatal("a cancelled rekey reported success")
	}
	st, _ := keys.Status("a")
	time.Sleep(200 * time.Millisecond) // the gateway side notices the cancel
	if !st[0].Rekeying {
		t.Fatalf("after cancel: %+v (progress %d)", st[0], last)
	}
	if err := c.Rekey(ctx, "a", volume.RekeyOptions{}); err != nil {
		t.Fatal(err)
	}
	if st, _ := keys.Status("a"); st[0].Rekeying {
		t.Fatalf("after resume: %+v", st[0])
	}
	got := make([]byte, 1<<20)
	for off := int64(0); off < 64<<20; off += int64(len(got)) {
		if _, err := exp.Device.ReadAt(got, off); err != nil || got[0] != byte(off>>20) {
			t.Fatalf("read at %d after rekey: %v", off, err)
		}
	}
	release()
}
