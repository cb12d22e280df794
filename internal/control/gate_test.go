package control

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"goldilocks/internal/volume"
)

// An upgrade in place pauses the control socket: a running rekey stops
// and lets go of its volume (another process could open it now), new
// operations are answered ErrUpgrading, and the rekey's client waits and
// calls again, so that the rekey resumes once the gate opens (in the new
// gateway) and ends with every chunk intact.
func TestGatePausesRekey(t *testing.T) {
	dir := t.TempDir()
	reg, err := volume.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	v, err := reg.Create(volume.CreateOptions{Name: "a", Size: 32 << 20, Encrypted: true})
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ex := volume.NewExports(reg, log)
	exp, release, err := ex.Open("a")
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for off := int64(0); off < v.Size; off += int64(len(buf)) {
		buf[0] = byte(off>>20) + 1
		if _, err := exp.Device.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	release() // only the rekey holds the volume from here on

	l, err := Listen(dir)
	if err != nil {
		t.Fatal(err)
	}
	keys := &volume.Keys{Reg: reg, Open: ex, Log: log}
	gate := NewGate(false)
	srv := &http.Server{Handler: Handler(keys, nil, nil, gate, log)}
	go srv.Serve(l)
	defer srv.Close()
	c, err := Dial(dir)
	if err != nil {
		t.Fatal(err)
	}
	var progress atomic.Uint64
	done := make(chan error, 1)
	go func() {
		done <- c.Rekey(context.Background(), "a", volume.RekeyOptions{Rate: 8 << 20, Progress: func(d, _ uint64) { progress.Store(d) }})
	}()
	for deadline := time.Now().Add(20 * time.Second); progress.Load() == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the rekey made no progress")
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	n, err := gate.Pause(ctx)
	if err != nil || n != 1 {
		t.Fatalf("pause: %d interrupted, %v; want 1", n, err)
	}
	// The volume is free: a new gateway could open it.
	dev, err := reg.OpenDevice(v, log)
	if err != nil {
		t.Fatalf("the paused rekey still holds the volume: %v", err)
	}
	dev.Close()
	if st, _ := keys.Status("a"); !st[0].Rekeying {
		t.Fatalf("paused: %+v, want a rekey to resume", st[0])
	}
	if _, err := c.Rotate(ctx, volume.RotateOptions{All: true}); !errors.Is(err, ErrUpgrading) {
		t.Fatalf("rotate while paused: %v, want ErrUpgrading", err)
	}
	time.Sleep(3 * RetryEvery)
	select {
	case err := <-done:
		t.Fatalf("the rekey client gave up while paused: %v", err)
	default:
	}
	gate.Resume()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("resumed rekey: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the rekey did not resume")
	}
	if st, _ := keys.Status("a"); st[0].Rekeying || st[0].RekeyCursor != 0 {
		t.Fatalf("after the resumed rekey: %+v", st[0])
	}
	exp, release, err = ex.Open("a")
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	for off := int64(0); off < v.Size; off += int64(len(buf)) {
		if _, err := exp.Device.ReadAt(buf, off); err != nil || buf[0] != byte(off>>20)+1 {
			t.Fatalf("read at %d after the rekey: %v (byte %d)", off, err, buf[0])
		}
	}
}
