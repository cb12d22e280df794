package crypto

// Backup streams (BACKUP.md): a header in the clear, then a DARE 2.0
// stream of records under a key derived from a per-stream backup key and
// the header.

import (
	"bytes"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/minio/sio"
)

// Backup stream constants (BACKUP.md). Part of the format.
const (
	BackupMagic       = "GLBACKUP"
	BackupVersion     = 1
	BackupFull        = 1
	BackupIncremental = 2
	backupInfo        = "goldilocks backup v1"
	backupFixed       = 96
	maxBackupHeader   = 64 << 10
	maxBackupData     = 1 << 20
	recData           = 1
	recZero           = 2
	recEnd            = 0xFF
)

// Errors callers branch on.
var (
	// ErrBackupFormat: not a backup stream of this version, or a damaged
	// header or record.
	ErrBackupFormat = errors.New("not a valid goldilocks backup stream")
	// ErrBackupAuth: the stream failed authentication or ended early:
	// changed, truncated, or its header swapped.
	ErrBackupAuth = errors.New("backup stream truncated or tampered")
)

// BackupHeader is a backup stream's header.
type BackupHeader struct {
	Kind     byte // BackupFull or BackupIncremental
	Suite    byte
	Volume   [16]byte
	Size     uint64
	Snapshot [16]byte // the point in time the stream brings a volume to
	Base     [16]byte // an incremental's starting point
	Created  time.Time
	ID       [16]byte // the stream's own: its backup key is wrapped under it
	SnapName string
	BaseName string
	KEK      KeyRef
	Wrapped  []byte // the backup key, wrapped by KEK
}

// marshal encodes h with its checksum.
func (h *BackupHeader) marshal() ([]byte, error) {
	b := make([]byte, backupFixed, 256)
	copy(b, BackupMagic)
	b[8], b[9], b[10] = BackupVersion, h.Kind, h.Suite
	copy(b[16:], h.Volume[:])
	binary.LittleEndian.PutUint64(b[32:], h.Size)
	copy(b[40:], h.Snapshot[:])
	copy(b[56:], h.Base[:])
	binary.LittleEndian.PutUint64(b[72:], uint64(h.Created.UnixNano()))
	copy(b[80:], h.ID[:])
	for _, s := range []string{h.SnapName, h.BaseName, h.KEK.Provider, h.KEK.Name} {
		if len(s) > 1024 {
			return nil, fmt.Errorf("%w: a name of %d bytes", ErrBackupFormat, len(s))
		}
		b = binary.LittleEndian.AppendUint16(b, uint16(len(s)))
		b = append(b, s...)
	}
	b = binary.LittleEndian.AppendUint32(b, h.KEK.Version)
	if len(h.Wrapped) > 4096 {
		return nil, fmt.Errorf("%w: a wrapped key of %d bytes", ErrBackupFormat, len(h.Wrapped))
	}
	b = binary.LittleEndian.AppendUint16(b, uint16(len(h.Wrapped)))
	b = append(b, h.Wrapped...)
	binary.LittleEndian.PutUint32(b[12:], uint32(len(b)+sha256.Size))
	sum := sha256.Sum256(b)
	return append(b, sum[:]...), nil
}

// readBackupHeader reads and checks a header; it returns the header and
// its checksum (the stream key's salt).
func readBackupHeader(r io.Reader) (*BackupHeader, []byte, error) {
	fixed := make([]byte, backupFixed)
	if _, err := io.ReadFull(r, fixed); err != nil {
		return nil, nil, fmt.Errorf("%w: header: %v", ErrBackupFormat, err)
	}
	if string(fixed[:8]) != BackupMagic {
		return nil, nil, fmt.Errorf("%w: bad magic", ErrBackupFormat)
	}
	if fixed[8] != BackupVersion {
		return nil, nil, fmt.Errorf("%w: version %d, this build reads %d", ErrBackupFormat, fixed[8], BackupVersion)
	}
	n := binary.LittleEndian.Uint32(fixed[12:])
	if n < backupFixed+2*4+4+2+sha256.Size || n > maxBackupHeader {
		return nil, nil, fmt.Errorf("%w: header length %d", ErrBackupFormat, n)
	}
	b := make([]byte, n)
	copy(b, fixed)
	if _, err := io.ReadFull(r, b[backupFixed:]); err != nil {
		return nil, nil, fmt.Errorf("%w: header: %v", ErrBackupFormat, err)
	}
	body, sum := b[:n-sha256.Size], b[n-sha256.Size:]
	if s := sha256.Sum256(body); !bytes.Equal(s[:], sum) {
		return nil, nil, fmt.Errorf("%w: header checksum", ErrBackupFormat)
	}
	h := &BackupHeader{Kind: b[9], Suite: b[10], Size: binary.LittleEndian.Uint64(b[32:]),
		Created: time.Unix(0, int64(binary.LittleEndian.Uint64(b[72:]))).UTC()}
	copy(h.Volume[:], b[16:])
	copy(h.Snapshot[:], b[40:])
	copy(h.Base[:], b[56:])
	copy(h.ID[:], b[80:])
	if b[11] != 0 || (h.Kind != BackupFull && h.Kind != BackupIncremental) || (h.Kind == BackupFull) != (h.Base == [16]byte{}) {
		return nil, nil, fmt.Errorf("%w: kind %d", ErrBackupFormat, h.Kind)
	}
	rest := body[backupFixed:]
	str := func() (string, bool) {
		if len(rest) < 2 {
			return "", false
		}
		l := int(binary.LittleEndian.Uint16(rest))
		if len(rest) < 2+l {
			return "", false
		}
		s := string(rest[2 : 2+l])
		rest = rest[2+l:]
		return s, true
	}
	var ok [5]bool
	h.SnapName, ok[0] = str()
	h.BaseName, ok[1] = str()
	h.KEK.Provider, ok[2] = str()
	h.KEK.Name, ok[3] = str()
	if len(rest) >= 4 {
		h.KEK.Version = binary.LittleEndian.Uint32(rest)
		rest = rest[4:]
		var w string
		w, ok[4] = str()
		h.Wrapped = []byte(w)
	}
	if ok != [5]bool{true, true, true, true, true} || len(rest) != 0 {
		return nil, nil, fmt.Errorf("%w: header fields", ErrBackupFormat)
	}
	return h, sum, nil
}

func backupStreamKey(key, salt []byte) ([]byte, error) {
	return hkdf.Key(sha256.New, key, salt, backupInfo, 32)
}

func sioConfig(suite byte, key []byte, rand io.Reader) sio.Config {
	return sio.Config{MinVersion: sio.Version20, MaxVersion: sio.Version20, CipherSuites: []byte{suite}, Key: key, Rand: rand}
}

// BackupWriter writes a backup stream.
type BackupWriter struct {
	enc               io.WriteCloser
	size              uint64
	next              uint64 // records are in increasing order
	records, data, zs uint64
	rec               [17]byte
}

// NewBackupWriter writes h (its Wrapped set to key, wrapped) to dst and
// returns the writer of its records, sealed under key (32 bytes). rand
// is the nonce source (nil: crypto/rand; test vectors fix it).
func NewBackupWriter(dst io.Writer, h *BackupHeader, key []byte, rand io.Reader) (*BackupWriter, error) {
	hb, err := h.marshal()
	if err != nil {
		return nil, err
	}
	k, err := backupStreamKey(key, hb[len(hb)-sha256.Size:])
	if err != nil {
		return nil, err
	}
	if _, err := dst.Write(hb); err != nil {
		return nil, err
	}
	enc, err := sio.EncryptWriter(dst, sioConfig(h.Suite, k, rand))
	if err != nil {
		return nil, err
	}
	return &BackupWriter{enc: enc, size: h.Size}, nil
}

func (w *BackupWriter) check(off, n int64) error {
	if off < 0 || n <= 0 || uint64(off) < w.next || uint64(off+n) > w.size || off%ChunkSize != 0 || n%ChunkSize != 0 {
		return fmt.Errorf("backup: record at %d, %d bytes: out of order, out of range or not in 4 KiB chunks", off, n)
	}
	w.next = uint64(off + n)
	return nil
}

// Data records p at off (whole chunks, in increasing order).
func (w *BackupWriter) Data(off int64, p []byte) error {
	if err := w.check(off, int64(len(p))); err != nil {
		return err
	}
	for len(p) > 0 {
		n := min(len(p), maxBackupData)
		w.rec[0] = recData
		binary.LittleEndian.PutUint64(w.rec[1:], uint64(off))
		binary.LittleEndian.PutUint32(w.rec[9:], uint32(n))
		if _, err := w.enc.Write(w.rec[:13]); err != nil {
			return err
		}
		if _, err := w.enc.Write(p[:n]); err != nil {
			return err
		}
		w.records++
		w.data += uint64(n)
		off += int64(n)
		p = p[n:]
	}
	return nil
}

// Zero records that [off, off+n) reads as zeros.
func (w *BackupWriter) Zero(off, n int64) error {
	if err := w.check(off, n); err != nil {
		return err
	}
	w.rec[0] = recZero
	binary.LittleEndian.PutUint64(w.rec[1:], uint64(off))
	binary.LittleEndian.PutUint64(w.rec[9:], uint64(n))
	w.records++
	w.zs += uint64(n)
	_, err := w.enc.Write(w.rec[:17])
	return err
}

// Close writes the end record and the stream's final package.
func (w *BackupWriter) Close() error {
	var end [25]byte
	end[0] = recEnd
	binary.LittleEndian.PutUint64(end[1:], w.records)
	binary.LittleEndian.PutUint64(end[9:], w.data)
	binary.LittleEndian.PutUint64(end[17:], w.zs)
	if _, err := w.enc.Write(end[:]); err != nil {
		return err
	}
	return w.enc.Close()
}

// BackupRecord is one record read back: data (Data set, valid until the
// next call) or a zero range.
type BackupRecord struct {
	Off, Len int64
	Data     []byte // nil for a zero range
}

// BackupReader reads a backup stream.
type BackupReader struct {
	h                 *BackupHeader
	dec               io.Reader
	next              uint64
	records, data, zs uint64
	buf               []byte
	done              bool
}

// ReadBackupHeader reads a stream's header (no key needed): for checks
// before a restore, and to know which KEK unwraps its key.
func ReadBackupHeader(src io.Reader) (*BackupHeader, error) {
	h, _, err := readBackupHeader(src)
	return h, err
}

// OpenBackup reads src's header and returns the reader of its records;
// key returns the backup key for the header (unwrapping h.Wrapped).
func OpenBackup(src io.Reader, key func(h *BackupHeader) ([]byte, error)) (*BackupReader, error) {
	h, sum, err := readBackupHeader(src)
	if err != nil {
		return nil, err
	}
	b, err := key(h)
	if err != nil {
		return nil, err
	}
	k, err := backupStreamKey(b, sum)
	clear(b)
	if err != nil {
		return nil, err
	}
	dec, err := sio.DecryptReader(src, sioConfig(h.Suite, k, nil))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBackupFormat, err)
	}
	return &BackupReader{h: h, dec: dec}, nil
}

// Header is the stream's header.
func (r *BackupReader) Header() *BackupHeader { return r.h }

func (r *BackupReader) read(p []byte) error {
	if _, err := io.ReadFull(r.dec, p); err != nil {
		return fmt.Errorf("%w: %v", ErrBackupAuth, err)
	}
	return nil
}

// Next returns the next record, or io.EOF after the end record (whose
// counts it checks, and after which the stream must end).
func (r *BackupReader) Next() (BackupRecord, error) {
	if r.done {
		return BackupRecord{}, io.EOF
	}
	var t [1]byte
	if err := r.read(t[:]); err != nil {
		return BackupRecord{}, err
	}
	switch t[0] {
	case recData, recZero:
		var f [16]byte
		n := 12
		if t[0] == recZero {
			n = 16
		}
		if err := r.read(f[:n]); err != nil {
			return BackupRecord{}, err
		}
		off := binary.LittleEndian.Uint64(f[:])
		var l uint64
		if t[0] == recData {
			l = uint64(binary.LittleEndian.Uint32(f[8:]))
		} else {
			l = binary.LittleEndian.Uint64(f[8:])
		}
		if l == 0 || off < r.next || off+l > r.h.Size || off+l < off || off%ChunkSize != 0 || l%ChunkSize != 0 || (t[0] == recData && l > maxBackupData) {
			return BackupRecord{}, fmt.Errorf("%w: record at %d, %d bytes", ErrBackupFormat, off, l)
		}
		r.next = off + l
		r.records++
		rec := BackupRecord{Off: int64(off), Len: int64(l)}
		if t[0] == recZero {
			r.zs += l
			return rec, nil
		}
		if cap(r.buf) < int(l) {
			r.buf = make([]byte, maxBackupData)
		}
		rec.Data = r.buf[:l]
		if err := r.read(rec.Data); err != nil {
			return BackupRecord{}, err
		}
		r.data += l
		return rec, nil
	case recEnd:
		var f [24]byte
		if err := r.read(f[:]); err != nil {
			return BackupRecord{}, err
		}
		if binary.LittleEndian.Uint64(f[:]) != r.records || binary.LittleEndian.Uint64(f[8:]) != r.data || binary.LittleEndian.Uint64(f[16:]) != r.zs {
			return BackupRecord{}, fmt.Errorf("%w: the end record's counts do not match", ErrBackupFormat)
		}
		if r.h.Kind == BackupFull && r.data+r.zs != r.h.Size {
			return BackupRecord{}, fmt.Errorf("%w: a full stream covers %d of %d bytes", ErrBackupFormat, r.data+r.zs, r.h.Size)
		}
		var extra [1]byte
		if n, err := r.dec.Read(extra[:]); n != 0 || (err != nil && err != io.EOF) {
			return BackupRecord{}, fmt.Errorf("%w: data after the end record", ErrBackupAuth)
		}
		r.done = true
		return BackupRecord{}, io.EOF
	default:
		return BackupRecord{}, fmt.Errorf("%w: record type %#x", ErrBackupFormat, t[0])
	}
}
