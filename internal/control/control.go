// Package control owns a running gateway's control socket
// (DATA_DIR/control.sock, mode 0600, so root or the gateway's user only):
// the HTTP API through which key commands run inside the gateway, where
// attached volumes are open, instead of beside it, and through which
// `volume release` ends a volume's sessions there. It carries requests and
// streams progress; the work is internal/volume's. It decides nothing about
// who may do what beyond the socket's file mode.
//
// Protocol: POST a JSON body; the answer is JSON Lines, each one
// {"progress":{"done":N,"total":M}}, then one {"result":…} or
// {"error":"…"} last. During an upgrade in place (Gate) a new request is
// answered 503, and a rekey that was running ends with
// {"error":"…","retry":true}: the same request succeeds against the
// gateway that serves the socket next.
package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"goldilocks/internal/volume"
)

// SocketName is the control socket's file name in the data dir.
const SocketName = "control.sock"

// ErrNoGateway is returned by Dial when no gateway answers on the socket.
var ErrNoGateway = errors.New("no gateway is running on this data dir")

type line struct {
	Progress *progress       `json:"progress,omitempty"`
	Result   json.RawMessage `json:"result,omitempty"`
	Error    string          `json:"error,omitempty"`
	Retry    bool            `json:"retry,omitempty"` // ErrUpgrading
}

type progress struct {
	Done  uint64 `json:"done"`
	Total uint64 `json:"total"`
}

type rekeyRequest struct {
	Volume string `json:"volume"`
	volume.RekeyOptions
}

// Releaser ends a volume's sessions in the gateway (`volume release`):
// it returns how many it ended, once the volume is closed.
type Releaser func(ctx context.Context, volume string) (int, error)

type releaseRequest struct {
	Volume string `json:"volume"`
}

// ReleaseResult is what a release did.
type ReleaseResult struct {
	Sessions int `json:"sessions"`
}

type snapshotRequest struct {
	Volume   string `json:"volume"`
	Snapshot string `json:"snapshot"`
	Since    string `json:"since,omitempty"` // backups
}

// Handler serves the control API over keys and snapshots (nil: none), and
// volume releases through release (nil: none). Every operation goes
// through gate (nil: one that never pauses); a rekey is the one it
// interrupts.
func Handler(keys *volume.Keys, snaps *volume.Snapshots, release Releaser, gate *Gate, log *slog.Logger) http.Handler {
	if gate == nil {
		gate = NewGate(false)
	}
	run := func(w http.ResponseWriter, r *http.Request, interruptible bool, fn func(ctx context.Context, p func(done, total uint64)) (any, error)) {
		ctx, end, err := gate.begin(r.Context(), interruptible)
		if err != nil {
			w.Header().Set("Retry-After", "1")
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		defer end()
		stream(w, func(p func(done, total uint64)) (any, error) {
			res, err := fn(ctx, p)
			if err != nil && errors.Is(context.Cause(ctx), ErrUpgrading) {
				log.Info("control: operation stopped for an upgrade in place; the client resumes it", "path", r.URL.Path, "err", err)
				err = ErrUpgrading
			}
			return res, err
		})
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/volumes/release", func(w http.ResponseWriter, r *http.Request) {
		var o releaseRequest
		if err := json.NewDecoder(r.Body).Decode(&o); err != nil || o.Volume == "" || release == nil {
			http.Error(w, "bad request: a volume name is required", http.StatusBadRequest)
			return
		}
		run(w, r, false, func(ctx context.Context, _ func(done, total uint64)) (any, error) {
			log.Info("control: volume release", "volume", o.Volume)
			n, err := release(ctx, o.Volume)
			return ReleaseResult{Sessions: n}, err
		})
	})
	mux.HandleFunc("POST /v1/keys/rotate", func(w http.ResponseWriter, r *http.Request) {
		var o volume.RotateOptions
		if err := json.NewDecoder(r.Body).Decode(&o); err != nil {
			http.Error(w, "bad request: "+err.Error(), http.StatusBadRequest)
			return
		}
		run(w, r, false, func(ctx context.Context, p func(done, total uint64)) (any, error) {
			o.Progress = func(d, t int) { p(uint64(d), uint64(t)) }
			log.Info("control: key rotate", "keys", o.Keys, "all", o.All, "rewrap_only", o.RewrapOnly)
			return keys.Rotate(ctx, o)
		})
	})
	mux.HandleFunc("POST /v1/keys/rekey", func(w http.ResponseWriter, r *http.Request) {
		var o rekeyRequest
		if err := json.NewDecoder(r.Body).Decode(&o); err != nil {
			http.Error(w, "bad request: "+err.Error(), http.StatusBadRequest)
			return
		}
		run(w, r, true, func(ctx context.Context, p func(done, total uint64)) (any, error) {
			o.Progress = p
			log.Info("control: key rekey", "volume", o.Volume, "rate", o.Rate)
			return struct{}{}, keys.Rekey(ctx, o.Volume, o.RekeyOptions)
		})
	})
	snapshot := func(path string, fn func(ctx context.Context, o snapshotRequest) (any, error)) {
		mux.HandleFunc("POST "+path, func(w http.ResponseWriter, r *http.Request) {
			var o snapshotRequest
			if err := json.NewDecoder(r.Body).Decode(&o); err != nil || o.Volume == "" || o.Snapshot == "" || snaps == nil {
				http.Error(w, "bad request: a volume and a snapshot name are required", http.StatusBadRequest)
				return
			}
			run(w, r, false, func(ctx context.Context, _ func(done, total uint64)) (any, error) {
				log.Info("control: "+path, "volume", o.Volume, "snapshot", o.Snapshot)
				return fn(ctx, o)
			})
		})
	}
	snapshot("/v1/snapshots/create", func(ctx context.Context, o snapshotRequest) (any, error) {
		return snaps.Create(ctx, o.Volume, o.Snapshot)
	})
	snapshot("/v1/snapshots/delete", func(ctx context.Context, o snapshotRequest) (any, error) {
		return struct{}{}, snaps.Delete(ctx, o.Volume, o.Snapshot)
	})
	// A backup's stream is the answer's body (not JSON Lines); its error,
	// if any, the trailer X-Goldilocks-Error.
	mux.HandleFunc("POST /v1/snapshots/backup", func(w http.ResponseWriter, r *http.Request) {
		var o snapshotRequest
		if err := json.NewDecoder(r.Body).Decode(&o); err != nil || o.Volume == "" || o.Snapshot == "" || snaps == nil {
			http.Error(w, "bad request: a volume and a snapshot name are required", http.StatusBadRequest)
			return
		}
		ctx, end, err := gate.begin(r.Context(), false)
		if err != nil {
			w.Header().Set("Retry-After", "1")
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		defer end()
		log.Info("control: snapshot backup", "volume", o.Volume, "snapshot", o.Snapshot, "since", o.Since)
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Trailer", backupErrorTrailer)
		if _, err := snaps.Backup(ctx, o.Volume, o.Snapshot, volume.BackupOptions{Since: o.Since}, w); err != nil {
			w.Header().Set(backupErrorTrailer, err.Error())
		}
	})
	return mux
}

// backupErrorTrailer carries a backup's error after its stream.
const backupErrorTrailer = "X-Goldilocks-Error"

// Backup writes a backup stream, made in the gateway, to dst; progress
// gets the stream bytes received so far.
func (c *Client) Backup(ctx context.Context, vol, snap, since string, dst io.Writer, progress func(n int64)) error {
	resp, err := c.post(ctx, "/v1/snapshots/backup", snapshotRequest{Volume: vol, Snapshot: snap, Since: since})
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	buf := make([]byte, 1<<20)
	var n int64
	for {
		k, rerr := resp.Body.Read(buf)
		if k > 0 {
			if _, err := dst.Write(buf[:k]); err != nil {
				return err
			}
			n += int64(k)
			if progress != nil {
				progress(n)
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return fmt.Errorf("gateway control socket: the backup stream broke off: %w", rerr)
		}
	}
	if e := resp.Trailer.Get(backupErrorTrailer); e != "" {
		return errors.New(e)
	}
	return nil
}

// stream runs fn, sending its progress (at most five lines a second) and
// then its result or error as JSON Lines.
func stream(w http.ResponseWriter, fn func(progress func(done, total uint64)) (any, error)) {
	w.Header().Set("Content-Type", "application/jsonl")
	fl, _ := w.(http.Flusher)
	enc := json.NewEncoder(w)
	var (
		mu   sync.Mutex
		last time.Time
	)
	send := func(l line) {
		mu.Lock()
		defer mu.Unlock()
		enc.Encode(l)
		if fl != nil {
			fl.Flush()
		}
	}
	res, err := fn(func(done, total uint64) {
		if time.Since(last) < 200*time.Millisecond && done != total {
			return
		}
		last = time.Now()
		send(line{Progress: &progress{done, total}})
	})
	if err != nil {
		// A partial result (a rotation with failures) goes with the error.
		b, _ := json.Marshal(res)
		send(line{Result: b, Error: err.Error(), Retry: errors.Is(err, ErrUpgrading)})
		return
	}
	b, _ := json.Marshal(res)
	send(line{Result: b})
}

// Listen opens the control socket of dataDir, replacing a stale one.
func Listen(dataDir string) (net.Listener, error) {
	path := filepath.Join(dataDir, SocketName)
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("control socket %s: another gateway is running on this data dir", path)
	}
	os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	return l, nil
}

// Client talks to a running gateway's control socket.
type Client struct {
	hc *http.Client
}

// Dial connects to the gateway serving dataDir, or returns ErrNoGateway.
func Dial(dataDir string) (*Client, error) {
	path := filepath.Join(dataDir, SocketName)
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return nil, ErrNoGateway
	}
	c.Close()
	return &Client{hc: &http.Client{Transport: &http.Transport{
		DisableKeepAlives: true, // a retry after an upgrade reaches the new gateway, not a connection to the old one
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}}, nil
}

// call POSTs body to path and reads the stream, calling p for progress
// and decoding the result into out.
func (c *Client) call(ctx context.Context, path string, body any, p func(done, total uint64), out any) error {
	resp, err := c.post(ctx, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		var l line
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			return fmt.Errorf("gateway control socket: bad answer: %w", err)
		}
		if l.Progress != nil {
			if p != nil {
				p(l.Progress.Done, l.Progress.Total)
			}
			continue
		}
		if len(l.Result) > 0 && out != nil {
			if err := json.Unmarshal(l.Result, out); err != nil {
				return fmt.Errorf("gateway control socket: bad result: %w", err)
			}
		}
		if l.Retry {
			return ErrUpgrading
		}
		if l.Error != "" {
			return errors.New(l.Error)
		}
		return nil
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("gateway control socket: %w", err)
	}
	return errors.New("gateway control socket: the gateway stopped before answering")
}

// post POSTs body to path and returns the answer if it is 200 OK
// (ErrUpgrading for 503); the caller closes its body.
func (c *Client) post(ctx context.Context, path string, body any) (*http.Response, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://gateway"+path, bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("gateway control socket: %w", err)
	}
	if resp.StatusCode == http.StatusServiceUnavailable {
		resp.Body.Close()
		return nil, ErrUpgrading
	}
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		return nil, fmt.Errorf("gateway control socket: %s: %s", resp.Status, msg)
	}
	return resp, nil
}

// Rotate runs a rotation in the gateway.
func (c *Client) Rotate(ctx context.Context, o volume.RotateOptions) (volume.RotateResult, error) {
	var res volume.RotateResult
	var p func(done, total uint64)
	if o.Progress != nil {
		p = func(d, t uint64) { o.Progress(int(d), int(t)) }
	}
	err := c.call(ctx, "/v1/keys/rotate", o, p, &res)
	return res, err
}

// Rekey runs a rekey in the gateway; cancelling ctx stops it (resumable).
// An upgrade in place stops it too: Rekey then calls again, every
// RetryEvery for up to RetryFor, and the gateway that serves the socket
// next resumes it.
func (c *Client) Rekey(ctx context.Context, name string, o volume.RekeyOptions) error {
	var waited time.Duration
	for {
		err := c.call(ctx, "/v1/keys/rekey", rekeyRequest{Volume: name, RekeyOptions: o}, o.Progress, nil)
		if !errors.Is(err, ErrUpgrading) || waited >= RetryFor {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(RetryEvery):
			waited += RetryEvery
		}
	}
}

// How Client.Rekey waits out an upgrade in place: longer than serve's
// default --upgrade-timeout (30 s) and the new gateway's start.
const (
	RetryEvery = 200 * time.Millisecond
	RetryFor   = 2 * time.Minute
)

// CreateSnapshot takes a snapshot in the gateway.
func (c *Client) CreateSnapshot(ctx context.Context, vol, snap string) (volume.CreateResult, error) {
	var res volume.CreateResult
	err := c.call(ctx, "/v1/snapshots/create", snapshotRequest{Volume: vol, Snapshot: snap}, nil, &res)
	return res, err
}

// DeleteSnapshot deletes a snapshot in the gateway.
func (c *Client) DeleteSnapshot(ctx context.Context, vol, snap string) error {
	return c.call(ctx, "/v1/snapshots/delete", snapshotRequest{Volume: vol, Snapshot: snap}, nil, nil)
}

// Release ends every session of a volume in the gateway (after the
// volume left the registry) and returns once the volume is closed.
func (c *Client) Release(ctx context.Context, name string) (ReleaseResult, error) {
	var res ReleaseResult
	err := c.call(ctx, "/v1/volumes/release", releaseRequest{Volume: name}, nil, &res)
	return res, err
}
