package volume

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"time"

	"github.com/google/uuid"

	"goldilocks/audit"
	"goldilocks/crypto"
)

// Backups of snapshots as encrypted streams (crypto/BACKUP.md), and
// restores of them into new volumes.

// BackupOptions tune a backup.
type BackupOptions struct {
	// Since names an older snapshot: only what was written between it
	// and the backed-up one goes into the stream (an incremental).
	Since string `json:"since,omitempty"`
	// Progress is called with bytes done and total.
	Progress func(done, total int64) `json:"-"`
}

// BackupResult says what a backup wrote.
type BackupResult struct {
	Kind      string        `json:"kind"` // full or incremental
	Read      int64         `json:"bytes_read"`
	Data      int64         `json:"data_bytes"`
	Zero      int64         `json:"zero_bytes"`
	Written   int64         `json:"stream_bytes"`
	Duration  time.Duration `json:"duration_ns"`
	Snapshot  string        `json:"snapshot"`
	Since     string        `json:"since,omitempty"`
	VolumeLen int64         `json:"volume_bytes"`
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// Backup writes snapshot snap of volume name to dst as a backup stream.
func (s *Snapshots) Backup(ctx context.Context, name, snap string, o BackupOptions, dst io.Writer) (BackupResult, error) {
	res := BackupResult{Kind: "full", Snapshot: snap, Since: o.Since}
	v, err := s.volume(name)
	if err != nil {
		return res, err
	}
	find := func(n string) (SnapshotRecord, int, error) {
		i := slices.IndexFunc(v.Snapshots, func(r SnapshotRecord) bool { return r.Name == n })
		if i < 0 {
			return SnapshotRecord{}, i, fmt.Errorf("volume %s snapshot %s: %w", name, n, crypto.ErrNoSnapshot)
		}
		return v.Snapshots[i], i, nil
	}
	rec, at, err := find(snap)
	if err != nil {
		return res, err
	}
	var base SnapshotRecord
	if o.Since != "" {
		var bi int
		if base, bi, err = find(o.Since); err != nil {
			return res, err
		}
		if bi >= at {
			return res, fmt.Errorf("volume %s: --since %s is not older than %s", name, o.Since, snap)
		}
		res.Kind = "incremental"
	}
	if err := s.record(audit.Event{Type: audit.EvVolumeBackup, Volume: name, Reason: "requested",
		Details: map[string]any{"snapshot": snap, "since": o.Since}}); err != nil {
		return res, err
	}
	cv, release, err := s.Open.OpenVolume(v)
	if err != nil {
		return res, err
	}
	defer release()
	view, err := cv.SnapshotView(snap)
	if err != nil {
		return res, err
	}
	defer view.Close()
	h := cv.Header()
	kek, err := s.Reg.KEK(h.KEK.Provider)
	if err != nil {
		return res, fmt.Errorf("volume %s: %w", name, err)
	}
	key := make([]byte, 32)
	defer clear(key)
	if _, err := rand.Read(key); err != nil {
		return res, err
	}
	id := uuid.New()
	wrapped, version, err := kek.Wrap(ctx, h.KEK.Name, id, key)
	if err != nil {
		return res, fmt.Errorf("volume %s: wrapping the backup key: %w", name, err)
	}
	bh := &crypto.BackupHeader{Kind: crypto.BackupFull, Suite: h.Suite, Volume: h.UUID, Size: uint64(v.Size),
		Snapshot: uuid.MustParse(rec.UUID), Created: time.Now(), ID: id, SnapName: snap,
		KEK: crypto.KeyRef{Provider: h.KEK.Provider, Name: h.KEK.Name, Version: version}, Wrapped: wrapped}
	if o.Since != "" {
		bh.Kind, bh.Base, bh.BaseName = crypto.BackupIncremental, uuid.MustParse(base.UUID), o.Since
	}
	cw := &countWriter{w: dst}
	w, err := crypto.NewBackupWriter(cw, bh, key, nil)
	if err != nil {
		return res, err
	}
	start := time.Now()
	total := v.Size
	var spans [][2]int64 // what the stream covers, in increasing order
	if o.Since == "" {
		spans = append(spans, [2]int64{0, v.Size})
	} else {
		total = 0
		if err := cv.ChangedRuns(o.Since, snap, func(first, n uint64) error {
			spans = append(spans, [2]int64{int64(first * crypto.ChunkSize), int64(n * crypto.ChunkSize)})
			total += int64(n * crypto.ChunkSize)
			return nil
		}); err != nil {
			return res, err
		}
	}
	// Reading (opening the volume's chunks) and writing (sealing the
	// stream) overlap: a reader fills 1 MiB pieces ahead.
	type piece struct {
		off int64
		p   []byte
		err error
	}
	pieces, free, quit := make(chan piece, 2), make(chan []byte, 3), make(chan struct{})
	for range cap(free) {
		free <- make([]byte, 1<<20)
	}
	go func() {
		defer close(pieces)
		for _, sp := range spans {
			for off, n := sp[0], sp[1]; n > 0; {
				var buf []byte
				select {
				case buf = <-free:
				case <-quit:
					return
				}
				l := min(n, int64(len(buf)))
				_, err := view.ReadAt(buf[:l], off)
				pieces <- piece{off, buf[:l], err}
				if err != nil {
					return
				}
				off, n = off+l, n-l
			}
		}
	}()
	defer func() {
		close(quit)
		for range pieces { // the reader's last piece, if any
		}
	}()
	// record writes a piece: runs of zero chunks as zero records, the
	// rest as data.
	record := func(off int64, p []byte) error {
		l := int64(len(p))
		for i := int64(0); i < l; {
			zero := isZero(p[i : i+crypto.ChunkSize])
			j := i + crypto.ChunkSize
			for j < l && isZero(p[j:j+crypto.ChunkSize]) == zero {
				j += crypto.ChunkSize
			}
			var err error
			if zero {
				err = w.Zero(off+i, j-i)
				res.Zero += j - i
			} else {
				err = w.Data(off+i, p[i:j])
				res.Data += j - i
			}
			if err != nil {
				return err
			}
			i = j
		}
		return nil
	}
	for pc := range pieces {
		if err = pc.err; err == nil {
			err = ctx.Err()
		}
		if err == nil {
			err = record(pc.off, pc.p)
		}
		if err != nil {
			break
		}
		res.Read += int64(len(pc.p))
		free <- pc.p[:cap(pc.p)]
		if o.Progress != nil {
			o.Progress(res.Read, total)
		}
	}
	if err == nil {
		err = w.Close()
	}
	res.Duration, res.Written, res.VolumeLen = time.Since(start), cw.n, v.Size
	if err != nil {
		return res, fmt.Errorf("volume %s snapshot %s: backup: %w", name, snap, err)
	}
	s.Log.Info("backup written", "volume", name, "snapshot", snap, "since", o.Since, "bytes_read", res.Read, "stream_bytes", res.Written)
	return res, nil
}

func isZero(b []byte) bool {
	var z [crypto.ChunkSize]byte
	return bytes.Equal(b, z[:len(b)])
}

// RestoreOptions tune a restore.
type RestoreOptions struct {
	Labels   map[string]string
	Progress func(done, total int64)
}

// ErrBackupChain: the streams of a restore do not form one chain.
var ErrBackupChain = errors.New("the backups do not form a chain: a full backup, then incrementals each starting where the one before ends")

// Restore creates volume name from a chain of backup streams (files):
// a full one, then incrementals in order (crypto/BACKUP.md, "Restore").
// A restore that fails leaves no volume behind.
func (s *Snapshots) Restore(ctx context.Context, name string, files []string, o RestoreOptions) (Volume, error) {
	var hs []*crypto.BackupHeader
	var total int64
	for i, f := range files {
		fh, err := os.Open(f)
		if err != nil {
			return Volume{}, err
		}
		h, err := crypto.ReadBackupHeader(fh)
		st, _ := fh.Stat()
		fh.Close()
		if err != nil {
			return Volume{}, fmt.Errorf("%s: %w", f, err)
		}
		switch {
		case i == 0 && h.Kind != crypto.BackupFull:
			return Volume{}, fmt.Errorf("%s: %w (the first is not a full backup)", f, ErrBackupChain)
		case i > 0 && (h.Kind != crypto.BackupIncremental || h.Volume != hs[0].Volume || h.Size != hs[0].Size || h.Base != hs[i-1].Snapshot):
			return Volume{}, fmt.Errorf("%s: %w (it does not start at %s, where %s ends)", f, ErrBackupChain, hs[i-1].SnapName, files[i-1])
		}
		hs = append(hs, h)
		if st != nil {
			total += st.Size()
		}
	}
	if len(hs) == 0 {
		return Volume{}, errors.New("restore: no backup named")
	}
	from := make([]string, len(hs))
	for i, h := range hs {
		from[i] = h.SnapName
	}
	if err := s.record(audit.Event{Type: audit.EvVolumeRestore, Volume: name, Reason: "requested",
		Details: map[string]any{"from": from}}); err != nil {
		return Volume{}, err
	}
	first := hs[0]
	kekName := first.KEK.Provider + ":" + first.KEK.Name
	v, err := s.Reg.Create(CreateOptions{Name: name, Size: int64(first.Size), Encrypted: true, KEK: kekName, Suite: first.Suite, Labels: o.Labels})
	if err != nil {
		return Volume{}, err
	}
	fail := func(err error) (Volume, error) {
		if derr := s.Reg.Delete(name, false, nil); derr != nil {
			s.Log.Error("restore failed; removing the new volume failed too", "volume", name, "err", derr)
		}
		return Volume{}, err
	}
	dev, err := s.Reg.OpenDevice(v, s.Log)
	if err != nil {
		return fail(err)
	}
	cv, ok := dev.(*crypto.Volume)
	if !ok {
		dev.Close()
		return fail(fmt.Errorf("volume %s: not encrypted", name))
	}
	var done int64
	for i, f := range files {
		if err := s.apply(ctx, cv, f, hs[i], &done, total, o.Progress); err != nil {
			cv.Close()
			return fail(err)
		}
	}
	if err := cv.Close(); err != nil {
		return fail(err)
	}
	s.Log.Info("volume restored", "volume", name, "from", from)
	return v, nil
}

type countReader struct {
	r io.Reader
	n *int64
}

func (c countReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	*c.n += int64(n)
	return n, err
}

// apply writes one stream's records into cv.
func (s *Snapshots) apply(ctx context.Context, cv *crypto.Volume, file string, checked *crypto.BackupHeader, done *int64, total int64, progress func(done, total int64)) error {
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	r, err := crypto.OpenBackup(countReader{f, done}, func(h *crypto.BackupHeader) ([]byte, error) {
		kek, err := s.Reg.KEK(h.KEK.Provider)
		if err != nil {
			return nil, err
		}
		return kek.Unwrap(ctx, h.KEK, h.ID, h.Wrapped)
	})
	if err != nil {
		return fmt.Errorf("%s: %w", file, err)
	}
	// The header the stream authenticates is the one the chain was checked
	// on (the file could have been replaced since).
	if h := r.Header(); h.Kind != checked.Kind || h.Volume != checked.Volume || h.Size != checked.Size ||
		h.Snapshot != checked.Snapshot || h.Base != checked.Base || h.ID != checked.ID {
		return fmt.Errorf("%s: %w: it changed since the chain was checked", file, ErrBackupChain)
	}
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		rec, err := r.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("%s: at byte %d: %w", file, *done, err)
		}
		if rec.Data != nil {
			_, err = cv.WriteAt(rec.Data, rec.Off)
		} else {
			err = cv.Zero(rec.Off, rec.Len, true, false)
		}
		if err != nil {
			return err
		}
		if progress != nil {
			progress(*done, total)
		}
	}
}
