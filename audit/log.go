package audit

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"goldilocks/internal/atomicfile"
	"goldilocks/internal/secretfile"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
)

// File names in the audit directory (FORMAT.md, "Files"). Part of the
// format.
const (
	CurrentFile = "current.jsonl"
	KeyFile     = "signing.key"
	PubFile     = "signing.pub"
	HeadFile    = "head"
	lockFile    = "lock"
	segPrefix   = "segment-"
)

// ErrUnavailable is returned by Append when the record could not be
// written (disk full, permissions, I/O error): the caller fails closed.
var ErrUnavailable = errors.New("audit log unavailable")

// Options tune a Log; zero values take the defaults of FORMAT.md.
type Options struct {
	CheckpointEvery    int           // records; 1000
	CheckpointInterval time.Duration // 60 s
	SegmentSize        int64         // 64 MiB
	SegmentAge         time.Duration // 24 h
	Logger             *slog.Logger
	// Observe, if set, sees every Append: the event and its error (nil:
	// on record). It must not call the Log.
	Observe func(Event, error)
	now     func() time.Time   // tests: the clock
	key     ed25519.PrivateKey // tests: a fixed signing key
}

// Log appends records to the audit directory of a data dir. It is safe for
// concurrent use, and other processes (CLI commands) append to the same
// directory: every append takes the directory's flock.
type Log struct {
	dir string
	o   Options
	key ed25519.PrivateKey
	kid string
	log *slog.Logger

	mu       sync.Mutex // guards everything below
	lock     *os.File
	f        *os.File
	ino      uint64
	size     int64
	seq      uint64
	prev     string
	unsigned int       // records since the last checkpoint
	signedAt time.Time // last checkpoint
	segStart time.Time // first record of current.jsonl
	buf      []byte
	shared   []byte    // the lock file's first page, mapped shared: see sharedState
	gen      uint64    // rotations seen
	pathAt   time.Time // when current.jsonl's path was last checked
	lastErr  error     // of the last Append
	closed   bool
	stop     chan struct{}
	bg       sync.WaitGroup
}

// Open opens (creating) the audit log in dir, recovering a torn last line.
func Open(dir string, o Options) (*Log, error) {
	if o.CheckpointEvery <= 0 {
		o.CheckpointEvery = 1000
	}
	if o.CheckpointInterval <= 0 {
		o.CheckpointInterval = time.Minute
	}
	if o.SegmentSize <= 0 {
		o.SegmentSize = 64 << 20
	}
	if o.SegmentAge <= 0 {
		o.SegmentAge = 24 * time.Hour
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.now == nil {
		o.now = time.Now
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	key := o.key
	if key == nil {
		var err error
		if key, err = loadOrCreateKey(dir); err != nil {
			return nil, err
		}
	}
	kid, err := KeyID(key.Public().(ed25519.PublicKey))
	if err != nil {
		return nil, err
	}
	lf, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	l := &Log{dir: dir, o: o, key: key, kid: kid, log: o.Logger, lock: lf, stop: make(chan struct{}), buf: make([]byte, 0, 1024), signedAt: o.now()}
	if err := l.flock(); err != nil {
		lf.Close()
		return nil, err
	}
	if err := l.mapShared(); err != nil {
		l.funlock()
		lf.Close()
		return nil, err
	}
	cut, err := l.reopenLocked(true)
	if err == nil && cut > 0 {
		l.log.Warn("audit log: a torn last record was cut off at open", "event", EvAuditRecovered, "bytes", cut)
		err = l.appendLocked(Event{Type: EvAuditRecovered, Reason: "a torn last line (a crash mid-append) was cut off", Details: map[string]any{"bytes": cut}})
	}
	l.funlock()
	if err != nil {
		lf.Close()
		return nil, err
	}
	l.compressPending()
	l.bg.Add(1)
	go l.ticker()
	return l, nil
}

func (l *Log) flock() error {
	if err := unix.Flock(int(l.lock.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("audit: lock: %w", err)
	}
	return nil
}

func (l *Log) funlock() { unix.Flock(int(l.lock.Fd()), unix.LOCK_UN) }

// reopenLocked (re)opens current.jsonl and learns the chain's end from it
// (or from the last segment when it is empty). With recover, a torn last
// line is cut off and its length returned.
func (l *Log) reopenLocked(recover bool) (cut int64, err error) {
	if l.f != nil {
		l.f.Close()
		l.f = nil
	}
	path := filepath.Join(l.dir, CurrentFile)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR|os.O_APPEND, 0o600)
	if err != nil {
		return 0, fmt.Errorf("audit: %w: %w", ErrUnavailable, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return 0, fmt.Errorf("audit: %w: %w", ErrUnavailable, err)
	}
	last, first, size, err := tail(f, st.Size)
	if err != nil {
		f.Close()
		return 0, err
	}
	if size < st.Size {
		if !recover {
			// Another process is mid-append? It holds the lock, so no: torn.
			recover = true
		}
		if err := f.Truncate(size); err != nil {
			f.Close()
			return 0, fmt.Errorf("audit: cutting a torn record: %w", err)
		}
		cut = st.Size - size
	}
	l.f, l.ino, l.size = f, st.Ino, size
	l.gen = l.sharedGen()
	l.setSharedSize(size)
	l.seq, l.prev, l.segStart = 0, zeroPrev, l.o.now()
	if first != nil {
		l.segStart = first.Time
	}
	if last == nil {
		if last, err = l.lastOfSegments(); err != nil {
			return cut, err
		}
	}
	if last != nil {
		l.seq, l.prev = last.rec.Seq, Hash(last.line)
	}
	return cut, nil
}

type lastLine struct {
	rec  *Record
	line []byte
}

// maxLine bounds a record line (FORMAT.md records are small).
const maxLine = 1 << 20

// tail reads the first and last complete records of f (size bytes) and
// the length up to the end of the last complete line.
func tail(f *os.File, size int64) (last *lastLine, first *Record, end int64, err error) {
	if size == 0 {
		return nil, nil, 0, nil
	}
	off := max(0, size-2*maxLine)
	buf := make([]byte, size-off)
	if _, err := f.ReadAt(buf, off); err != nil && err != io.EOF {
		return nil, nil, 0, fmt.Errorf("audit: %w", err)
	}
	i := bytes.LastIndexByte(buf, '\n')
	if i < 0 {
		if off > 0 {
			return nil, nil, 0, fmt.Errorf("audit: %s: no line end in its last %d bytes", f.Name(), len(buf))
		}
		return nil, nil, 0, nil // nothing complete: all torn
	}
	end = off + int64(i) + 1
	line := buf[:i]
	if j := bytes.LastIndexByte(line, '\n'); j >= 0 {
		line = line[j+1:]
	}
	rec, err := Parse(line)
	if err != nil {
		return nil, nil, 0, fmt.Errorf("audit: the last record of %s does not parse (run goldilocks audit verify): %w", f.Name(), err)
	}
	last = &lastLine{rec: rec, line: bytes.Clone(line)}
	head := make([]byte, min(end, maxLine))
	f.ReadAt(head, 0)
	if k := bytes.IndexByte(head, '\n'); k >= 0 {
		first, _ = Parse(head[:k])
	}
	return last, first, end, nil
}

// lastOfSegments finds the chain's end in the newest closed segment.
func (l *Log) lastOfSegments() (*lastLine, error) {
	segs, err := Segments(l.dir)
	if err != nil || len(segs) == 0 {
		return nil, err
	}
	r, err := openSegment(segs[len(segs)-1])
	if err != nil {
		return nil, err
	}
	defer r.Close()
	var last []byte
	sc := newLineScanner(r)
	for sc.Scan() {
		last = append(last[:0], sc.Bytes()...)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("audit: %s: %w", segs[len(segs)-1], err)
	}
	if last == nil {
		return nil, nil
	}
	rec, err := Parse(last)
	if err != nil {
		return nil, fmt.Errorf("audit: the last record of %s: %w", segs[len(segs)-1], err)
	}
	return &lastLine{rec: rec, line: last}, nil
}

// Append records e. An error (ErrUnavailable) means it is not on record:
// callers that must not act unrecorded (attach, key operations) refuse.
func (l *Log) Append(e Event) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return fmt.Errorf("audit: %w: closed", ErrUnavailable)
	}
	if err := l.flock(); err != nil {
		l.lastErr = err
		if l.o.Observe != nil {
			l.o.Observe(e, err)
		}
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	defer l.funlock()
	l.lastErr = l.appendLocked(e)
	if l.o.Observe != nil {
		l.o.Observe(e, l.lastErr)
	}
	return l.lastErr
}

// Writable says why a record could not be appended now, or nil: the last
// append failed (until one succeeds), the file at the log's path is not
// a regular file, or its file system is read-only or full. A probe for
// readiness: it writes nothing.
func (l *Log) Writable() error {
	l.mu.Lock()
	last, closed := l.lastErr, l.closed
	l.mu.Unlock()
	if closed {
		return fmt.Errorf("audit: %w: closed", ErrUnavailable)
	}
	if last != nil {
		return fmt.Errorf("audit: %w: the last append failed: %v", ErrUnavailable, last)
	}
	path := filepath.Join(l.dir, CurrentFile)
	if st, err := os.Stat(path); err == nil && !st.Mode().IsRegular() {
		return fmt.Errorf("audit: %w: %s is not a regular file", ErrUnavailable, path)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(l.dir, &fs); err != nil {
		return fmt.Errorf("audit: %w: %v", ErrUnavailable, err)
	}
	if fs.Flags&unix.ST_RDONLY != 0 {
		return fmt.Errorf("audit: %w: %s is on a read-only file system", ErrUnavailable, l.dir)
	}
	if fs.Bavail == 0 {
		return fmt.Errorf("audit: %w: the file system of %s is full", ErrUnavailable, l.dir)
	}
	return nil
}

// appendLocked appends under the flock: it first catches up with what
// other processes appended (or a rotation they did), rotates if due, then
// writes the record and, if due, a checkpoint.
func (l *Log) appendLocked(e Event) error {
	now := l.o.now()
	moved := false
	if now.Sub(l.pathAt) > time.Second { // once a second: was the file moved by hand?
		var st unix.Stat_t
		err := unix.Stat(filepath.Join(l.dir, CurrentFile), &st)
		moved, l.pathAt = err != nil || st.Ino != l.ino, now
	}
	if moved || l.sharedGen() != l.gen || l.sharedSize() != l.size {
		// Another process appended or rotated: learn the end of the chain
		// from the file itself.
		cut, err := l.reopenLocked(false)
		if err != nil {
			return err
		}
		if cut > 0 { // an appender died mid-write
			if err := l.writeLocked(Event{Type: EvAuditRecovered, Reason: "a torn last line (a crash mid-append) was cut off", Details: map[string]any{"bytes": cut}}, l.o.now()); err != nil {
				return err
			}
		}
	}
	if l.size >= l.o.SegmentSize || l.size > 0 && now.Sub(l.segStart) >= l.o.SegmentAge {
		if err := l.rotateLocked(); err != nil {
			return err
		}
	}
	if err := l.writeLocked(e, now); err != nil {
		return err
	}
	if l.unsigned >= l.o.CheckpointEvery || now.Sub(l.signedAt) >= l.o.CheckpointInterval {
		return l.checkpointLocked()
	}
	return nil
}

func (l *Log) writeLocked(e Event, now time.Time) error {
	r := Record{Seq: l.seq + 1, Time: now, Event: e, Prev: l.prev}
	l.buf = r.AppendJSON(l.buf[:0])
	hash := Hash(l.buf)
	l.buf = append(l.buf, '\n')
	// The intent first: if we die mid-write, the next appender sees a size
	// it does not know and reads the file.
	l.setSharedSize(l.size + int64(len(l.buf)))
	n, err := l.f.Write(l.buf)
	if err != nil {
		if n > 0 { // a partial record: take it back so the chain stays whole
			l.f.Truncate(l.size)
		}
		l.setSharedSize(l.size)
		l.pathAt = time.Time{} // look at the path again next time: it may have been fixed
		return fmt.Errorf("audit: %w: %w", ErrUnavailable, err)
	}
	if l.size == 0 {
		l.segStart = now
	}
	l.size += int64(n)
	l.seq, l.prev = r.Seq, hash
	l.unsigned++
	return nil
}

// checkpointLocked appends a signed checkpoint, syncs the file, and
// records it in the head file.
func (l *Log) checkpointLocked() error {
	now := l.o.now()
	seq, prev := l.seq+1, l.prev
	sig := ed25519.Sign(l.key, checkpointMessage(seq, now, prev))
	err := l.writeLocked(Event{Type: EvCheckpoint, Details: map[string]any{"key": l.kid, "sig": base64.StdEncoding.EncodeToString(sig)}}, now)
	if err == nil {
		err = l.f.Sync()
	}
	if err == nil {
		err = atomicfile.Write(filepath.Join(l.dir, HeadFile), []byte(strconv.FormatUint(l.seq, 10)+" "+l.prev+"\n"), 0o600)
	}
	if err != nil {
		return fmt.Errorf("audit: checkpoint: %w: %w", ErrUnavailable, err)
	}
	l.unsigned, l.signedAt = 0, now
	return nil
}

// Checkpoint signs what is unsigned now.
func (l *Log) Checkpoint() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	if err := l.flock(); err != nil {
		return err
	}
	defer l.funlock()
	if l.sharedGen() != l.gen || l.sharedSize() != l.size {
		if _, err := l.reopenLocked(false); err != nil {
			return err
		}
		l.unsigned = 1 // we cannot tell what others left unsigned: sign
	}
	if l.unsigned == 0 {
		return nil
	}
	return l.checkpointLocked()
}

// ticker signs a quiet log's unsigned tail every CheckpointInterval.
func (l *Log) ticker() {
	defer l.bg.Done()
	t := time.NewTicker(l.o.CheckpointInterval)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
			l.mu.Lock()
			due := l.unsigned > 0
			l.mu.Unlock()
			if due {
				if err := l.Checkpoint(); err != nil {
					l.log.Error("audit checkpoint failed", "err", err)
				}
			}
		}
	}
}

// Close signs the tail and closes the log.
func (l *Log) Close() error {
	err := l.Checkpoint()
	l.mu.Lock()
	if !l.closed {
		l.closed = true
		close(l.stop)
	}
	l.mu.Unlock()
	l.bg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f != nil {
		l.f.Close()
	}
	unix.Munmap(l.shared)
	l.lock.Close()
	return err
}

// The lock file's first page is shared state for appenders (a hint,
// checked under the flock; the files are the truth): magic, then the
// rotation count and the size of current.jsonl as the last appender left
// it. An appender whose own idea differs reads the file again. Part of the
// format (FORMAT.md, "Files").
const (
	sharedMagic = "GLDAUDL1"
	sharedLen   = 4096
)

func (l *Log) mapShared() error {
	fd := int(l.lock.Fd())
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("audit: lock: %w", err)
	}
	if st.Size < sharedLen {
		if err := unix.Ftruncate(fd, sharedLen); err != nil {
			return fmt.Errorf("audit: lock: %w", err)
		}
	}
	m, err := unix.Mmap(fd, 0, sharedLen, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("audit: lock: %w", err)
	}
	if string(m[:8]) != sharedMagic {
		clear(m[:24])
		copy(m, sharedMagic)
		binary.LittleEndian.PutUint64(m[16:], ^uint64(0)) // unknown size: read the file
	}
	l.shared = m
	return nil
}

func (l *Log) sharedGen() uint64     { return binary.LittleEndian.Uint64(l.shared[8:]) }
func (l *Log) setSharedGen(g uint64) { binary.LittleEndian.PutUint64(l.shared[8:], g) }
func (l *Log) sharedSize() int64     { return int64(binary.LittleEndian.Uint64(l.shared[16:])) }
func (l *Log) setSharedSize(n int64) { binary.LittleEndian.PutUint64(l.shared[16:], uint64(n)) }

// PublicKey is the verifying key.
func (l *Log) PublicKey() ed25519.PublicKey { return l.key.Public().(ed25519.PublicKey) }

// rotateLocked closes current.jsonl as the next segment and starts a new
// one; the segment is compressed in the background.
func (l *Log) rotateLocked() error {
	segs, err := Segments(l.dir)
	if err != nil {
		return err
	}
	n := 1
	if len(segs) > 0 {
		n = segNumber(segs[len(segs)-1]) + 1
	}
	name := filepath.Join(l.dir, fmt.Sprintf("%s%08d.jsonl", segPrefix, n))
	if err := l.f.Sync(); err != nil {
		return fmt.Errorf("audit: %w: %w", ErrUnavailable, err)
	}
	// Never over an existing segment (RENAME_NOREPLACE): that would lose it.
	if err := unix.Renameat2(unix.AT_FDCWD, filepath.Join(l.dir, CurrentFile), unix.AT_FDCWD, name, unix.RENAME_NOREPLACE); err != nil {
		return fmt.Errorf("audit: rotating to %s: %w: %w", filepath.Base(name), ErrUnavailable, err)
	}
	seq, prev := l.seq, l.prev
	l.setSharedGen(l.gen + 1) // other appenders reopen current.jsonl
	if _, err := l.reopenLocked(false); err != nil {
		return err
	}
	l.seq, l.prev = seq, prev // the chain runs on across segments
	l.bg.Add(1)
	go func() {
		defer l.bg.Done()
		if err := l.compress(name); err != nil {
			l.log.Error("audit: compressing a closed segment", "segment", name, "err", err)
		}
	}()
	return nil
}

// compressPending compresses closed segments a crash left uncompressed.
func (l *Log) compressPending() {
	segs, _ := Segments(l.dir)
	for _, s := range segs {
		if strings.HasSuffix(s, ".jsonl") {
			l.bg.Add(1)
			go func() {
				defer l.bg.Done()
				if err := l.compress(s); err != nil {
					l.log.Error("audit: compressing a closed segment", "segment", s, "err", err)
				}
			}()
		}
	}
}

// compress writes name.zst and removes name.
// The final rename and removal run under the appenders' lock: every
// change to the directory's list of segments does, so that a listing made
// under the lock (rotation numbering, Snapshot) never misses a segment
// that is being renamed.
func (l *Log) compress(name string) error {
	in, err := os.Open(name)
	if err != nil {
		return err
	}
	defer in.Close()
	tmp := name + ".zst.tmp"
	out, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	zw, err := zstd.NewWriter(out)
	if err == nil {
		_, err = io.Copy(zw, in)
		if cerr := zw.Close(); err == nil {
			err = cerr
		}
	}
	if err == nil {
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		l.mu.Lock()
		if err = l.flock(); err == nil {
			if err = unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, name+".zst", unix.RENAME_NOREPLACE); err == nil {
				err = os.Remove(name)
			}
			l.funlock()
		}
		l.mu.Unlock()
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}

// Segments lists the closed segments of dir in order (a segment both
// compressed and not, after a crash mid-compression, is listed once,
// uncompressed).
func Segments(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	byNum := map[int]string{}
	for _, e := range ents {
		n := segNumber(e.Name())
		if n <= 0 || !(strings.HasSuffix(e.Name(), ".jsonl") || strings.HasSuffix(e.Name(), ".jsonl.zst")) {
			continue
		}
		if prev, ok := byNum[n]; !ok || strings.HasSuffix(prev, ".zst") {
			byNum[n] = filepath.Join(dir, e.Name())
		}
	}
	nums := make([]int, 0, len(byNum))
	for n := range byNum {
		nums = append(nums, n)
	}
	sort.Ints(nums)
	out := make([]string, len(nums))
	for i, n := range nums {
		out[i] = byNum[n]
	}
	return out, nil
}

func segNumber(name string) int {
	base := filepath.Base(name)
	if !strings.HasPrefix(base, segPrefix) {
		return 0
	}
	num, _, _ := strings.Cut(strings.TrimPrefix(base, segPrefix), ".")
	n, err := strconv.Atoi(num)
	if err != nil {
		return 0
	}
	return n
}

// KeyID names a public key in checkpoints: "ed25519:" and the hex SHA-256
// of its PKIX DER.
func KeyID(pub ed25519.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", err
	}
	h := sha256.Sum256(der)
	return "ed25519:" + hex.EncodeToString(h[:]), nil
}

func loadOrCreateKey(dir string) (ed25519.PrivateKey, error) {
	path := filepath.Join(dir, KeyFile)
	b, err := secretfile.Read(path)
	if errors.Is(err, os.ErrNotExist) {
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, err
		}
		der, _ := x509.MarshalPKCS8PrivateKey(priv)
		if err := atomicfile.Write(filepath.Join(dir, PubFile), encodePublic(priv.Public().(ed25519.PublicKey)), 0o600); err != nil {
			return nil, fmt.Errorf("audit: %w", err)
		}
		f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if errors.Is(err, os.ErrExist) { // another process made it first
			return loadOrCreateKey(dir)
		}
		if err != nil {
			return nil, fmt.Errorf("audit: signing key: %w", err)
		}
		_, err = f.Write(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, fmt.Errorf("audit: signing key: %w", err)
		}
		return priv, nil
	}
	if err != nil {
		return nil, fmt.Errorf("audit: signing key: %w", err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, fmt.Errorf("audit: %s: not PEM", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("audit: %s: %w", path, err)
	}
	priv, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("audit: %s: not an Ed25519 key", path)
	}
	return priv, nil
}

// encodePublic is signing.pub's encoding: PEM PUBLIC KEY (PKIX).
func encodePublic(pub ed25519.PublicKey) []byte {
	der, _ := x509.MarshalPKIXPublicKey(pub)
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
}

// LoadPublicKey reads a PEM public key (signing.pub).
func LoadPublicKey(path string) (ed25519.PublicKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, fmt.Errorf("audit: %s: not PEM", path)
	}
	k, err := x509.ParsePKIXPublicKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("audit: %s: %w", path, err)
	}
	pub, ok := k.(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("audit: %s: not an Ed25519 key", path)
	}
	return pub, nil
}
