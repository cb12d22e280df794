package main

// Upgrade in place (SIGUSR2): the running gateway starts the executable
// now at its path and hands it the listening sockets and every live NBD
// connection without TLS (gateway/handover.go), so that a patched build
// takes over under running VMs. The two processes talk over a Unix
// SOCK_SEQPACKET pair, one JSON message per packet, descriptors passed
// with SCM_RIGHTS:
//
//	old → new  hello   the listeners (in the packet's descriptors) and the data dir lock
//	new → old  ready   started: flags, policy, audit, registry all fine
//	old → new  conn    one per handed connection: its state, its socket
//	old → new  end     no more
//	new → old  ok      every connection's volume is open (or fail, why)
//	old → new  commit  the new process serves from here; the old exits 0
//
// Anything else (the new process exits, says fail, or is silent past the
// timeout) rolls back: the new process is killed, the old one resumes its
// connections and its listeners, and the failure is logged and audited.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"goldilocks/audit"
	"goldilocks/gateway"
	"goldilocks/internal/control"
)

// upgradeEnv names the descriptor of the handover socket in the new process.
const upgradeEnv = "GOLDILOCKS_UPGRADE_FD"

// upgradeMsg is one packet on the handover socket.
type upgradeMsg struct {
	Kind      string             `json:"kind"`
	Version   string             `json:"version,omitempty"`
	Listeners []string           `json:"listeners,omitempty"` // hello: each descriptor's role, in order
	OwnSocket string             `json:"own_socket,omitempty"`
	Conn      *gateway.ConnState `json:"conn,omitempty"`
	Reason    string             `json:"reason,omitempty"`
}

// The roles of passed descriptors (upgradeMsg.Listeners): "nbd",
// "metrics", "control" (listeners) or "lock" (the data dir's serve.lock).

const maxUpgradeMsg = 1 << 20

func sendMsg(fd int, m upgradeMsg, files ...*os.File) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		oob = unix.UnixRights(fds...)
	}
	return unix.Sendmsg(fd, b, oob, nil, 0)
}

// recvMsg reads one packet; its descriptors come back as files.
func recvMsg(fd int) (upgradeMsg, []*os.File, error) {
	return recvMsgBuf(fd, make([]byte, maxUpgradeMsg))
}

// recvMsgBuf is recvMsg into b (at least maxUpgradeMsg bytes, reused).
func recvMsgBuf(fd int, b []byte) (upgradeMsg, []*os.File, error) {
	var m upgradeMsg
	oob := make([]byte, unix.CmsgSpace(64*4))
	n, oobn, flags, _, err := unix.Recvmsg(fd, b, oob, unix.MSG_CMSG_CLOEXEC)
	if err != nil {
		return m, nil, err
	}
	if n == 0 {
		return m, nil, errors.New("the other process closed the handover socket")
	}
	var files []*os.File
	if oobn > 0 {
		cms, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return m, nil, err
		}
		for _, cm := range cms {
			fds, err := unix.ParseUnixRights(&cm)
			if err != nil {
				return m, nil, err
			}
			for _, f := range fds {
				files = append(files, os.NewFile(uintptr(f), "passed"))
			}
		}
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		closeFiles(files)
		return m, nil, errors.New("handover message truncated")
	}
	if err := json.Unmarshal(b[:n], &m); err != nil {
		closeFiles(files)
		return m, nil, fmt.Errorf("handover message: %w", err)
	}
	return m, files, nil
}

func closeFiles(fs []*os.File) {
	for _, f := range fs {
		f.Close()
	}
}

// fileOf duplicates a listener's or a file's descriptor.
func fileOf(l any) (*os.File, error) {
	fl, ok := l.(interface{ File() (*os.File, error) })
	if !ok {
		return nil, fmt.Errorf("%T has no descriptor", l)
	}
	return fl.File()
}

// upgrader runs upgrades in the old process, one at a time.
type upgrader struct {
	log     *slog.Logger
	exe     string // the path the gateway was started from
	srv     *gateway.Server
	timeout time.Duration

	mu        sync.Mutex // guards nbd, running
	nbd       []net.Listener
	running   bool
	metrics   net.Listener // or nil
	control   net.Listener
	lock      *os.File
	ownSocket string             // the Unix socket file this gateway made, or ""
	serveNBD  func(net.Listener) // starts serving a listener again (rollback)
	handoff   func(bool)         // volumes released meanwhile are handed off, not closed (volume.Exports.SetHandoff)
	gate      *control.Gate      // control operations, paused while the volumes go to the new process
	handed    chan struct{}      // closed once the new process has everything
}

// errUpgradeRunning: a SIGUSR2 while an upgrade runs.
var errUpgradeRunning = errors.New("an upgrade is already running")

// upgrade runs one upgrade. nil: the new process has taken over (the
// caller exits); an error: this process goes on serving.
func (u *upgrader) upgrade() (err error) {
	u.mu.Lock()
	if u.running {
		u.mu.Unlock()
		return errUpgradeRunning
	}
	u.running = true
	nbd := u.nbd
	u.mu.Unlock()
	defer func() {
		u.mu.Lock()
		u.running = false
		u.mu.Unlock()
	}()
	t0 := time.Now()
	// Closing a Unix listener here must not remove its socket file,
	// which the new gateway serves (a stop removes it explicitly).
	for _, l := range append([]net.Listener{u.control}, nbd...) {
		if ul, ok := l.(*net.UnixListener); ok {
			ul.SetUnlinkOnClose(false)
		}
	}
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("handover socket: %w", err)
	}
	mine := pair[0]
	defer unix.Close(mine)
	theirs := os.NewFile(uintptr(pair[1]), "handover")
	for _, fd := range pair {
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, 4<<20)
	}

	// The descriptors the new process inherits: duplicates of the
	// listeners (closed here once sent), and the lock.
	var files []*os.File
	var roles []string
	defer func() { closeFiles(files) }()
	add := func(role string, l any) error {
		f, err := fileOf(l)
		if err != nil {
			return fmt.Errorf("%s listener: %w", role, err)
		}
		files = append(files, f)
		roles = append(roles, role)
		return nil
	}
	for _, l := range nbd {
		if err := add("nbd", l); err != nil {
			return err
		}
	}
	if u.metrics != nil {
		if err := add("metrics", u.metrics); err != nil {
			return err
		}
	}
	if err := add("control", u.control); err != nil {
		return err
	}
	passed := append(files[:len(files):len(files)], u.lock) // the lock file stays ours
	roles = append(roles, "lock")

	cmd := exec.Command(u.exe, os.Args[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, os.Stdout, os.Stderr
	cmd.ExtraFiles = []*os.File{theirs}
	cmd.Env = append(os.Environ(), upgradeEnv+"=3")
	u.log.Info("upgrade: starting the new gateway", "path", u.exe)
	if err := cmd.Start(); err != nil {
		theirs.Close()
		return fmt.Errorf("starting %s: %w", u.exe, err)
	}
	theirs.Close()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	kill := func() {
		cmd.Process.Kill()
		<-exited
	}
	// Every read below ends at the deadline or when the child exits.
	unix.SetsockoptTimeval(mine, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: int64(u.timeout / time.Second)})

	if err := sendMsg(mine, upgradeMsg{Kind: "hello", Version: buildVersion(), Listeners: roles, OwnSocket: u.ownSocket}, passed...); err != nil {
		kill()
		return fmt.Errorf("the new gateway did not start: %w (it exited?)", err)
	}
	m, fs, err := recvMsg(mine)
	closeFiles(fs)
	if err != nil || m.Kind != "ready" {
		kill()
		return fmt.Errorf("the new gateway did not start: %s", why(m, err))
	}
	newVersion := m.Version

	// Stop accepting here (the new process accepts on the same sockets
	// from now on), then stop every connection at a request boundary.
	stalled := time.Now()
	var keep []*os.File // our own duplicates, to serve again on rollback
	for _, l := range nbd {
		if f, err := fileOf(l); err == nil {
			keep = append(keep, f)
		}
		u.srv.Release(l)
	}
	defer func() { closeFiles(keep) }()
	// A rollback kills the new process first: the volumes it may have
	// opened are released before the connections here open them again.
	var h *gateway.Handover
	rollback := func(cause error) error {
		kill()
		u.handoff(false)
		if h != nil {
			h.Abort()
		}
		u.gate.Resume()
		var ls []net.Listener
		for _, f := range keep {
			if l, err := net.FileListener(f); err == nil {
				ls = append(ls, l)
				u.serveNBD(l)
			}
		}
		u.mu.Lock()
		u.nbd = ls
		u.mu.Unlock()
		return cause
	}
	ctx, cancel := context.WithTimeout(context.Background(), u.timeout)
	defer cancel()
	u.handoff(true) // the new gateway opens the volumes right after: no checkpoint at close
	// A running rekey holds its volume: it stops at a point it resumes
	// from, and its client calls again (the new gateway answers).
	rekeys, err := u.gate.Pause(ctx)
	if err != nil {
		return rollback(err)
	}
	h, err = u.srv.Handover(ctx)
	if err != nil {
		h = nil // Handover resumed them itself
		return rollback(err)
	}
	stopped := time.Since(stalled) // every connection stopped, its volume handed off
	for _, hc := range h.Conns {
		st := hc.State
		if err := sendMsg(mine, upgradeMsg{Kind: "conn", Conn: &st}, hc.File); err != nil {
			return rollback(fmt.Errorf("handing over a connection: %w", err))
		}
	}
	if err := sendMsg(mine, upgradeMsg{Kind: "end"}); err != nil {
		return rollback(fmt.Errorf("handover: %w", err))
	}
	m, fs, err = recvMsg(mine)
	closeFiles(fs)
	if err != nil || m.Kind != "ok" {
		return rollback(fmt.Errorf("the new gateway did not take the connections: %s", why(m, err)))
	}
	if err := sendMsg(mine, upgradeMsg{Kind: "commit"}); err != nil {
		return rollback(fmt.Errorf("handover: %w", err))
	}
	h.Commit()
	stall := time.Since(stalled)
	notify(u.log, "MAINPID="+strconv.Itoa(cmd.Process.Pid))
	u.log.Info("upgrade: the new gateway serves", "event", audit.EvGatewayUpgrade, "pid", cmd.Process.Pid,
		"old_version", buildVersion(), "new_version", newVersion, "connections", len(h.Conns), "rekeys_resumed", rekeys,
		"stall_ms", stall.Milliseconds(), "stop_ms", stopped.Milliseconds(), "took_ms", time.Since(t0).Milliseconds())
	close(u.handed)
	return nil
}

func why(m upgradeMsg, err error) string {
	switch {
	case err != nil:
		if errors.Is(err, syscall.EAGAIN) {
			return "no answer within the upgrade timeout"
		}
		return err.Error()
	case m.Kind == "fail":
		return m.Reason
	}
	return fmt.Sprintf("unexpected message %q", m.Kind)
}

// upgradeChild is the new process's side, from serve's start to its
// first request.
type upgradeChild struct {
	adoptTook time.Duration // opening the handed connections' volumes
	fd        int
	nbd       []net.Listener
	metrics   net.Listener
	control   net.Listener
	lock      *os.File
	ownSocket string
}

// takeUpgrade returns the handover the old process started, or nil when
// this process was not started by an upgrade.
func takeUpgrade() (*upgradeChild, error) {
	v := os.Getenv(upgradeEnv)
	if v == "" {
		return nil, nil
	}
	os.Unsetenv(upgradeEnv)
	// systemd's watchdog names the process it watches: the old one,
	// whose PID this one takes over (MAINPID) once it serves.
	if os.Getenv("WATCHDOG_PID") == strconv.Itoa(os.Getppid()) {
		os.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	}
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return nil, fmt.Errorf("%s=%q: not a descriptor", upgradeEnv, v)
	}
	unix.CloseOnExec(fd)
	m, files, err := recvMsg(fd)
	if err != nil {
		return nil, fmt.Errorf("upgrade: %w", err)
	}
	if m.Kind != "hello" || len(files) != len(m.Listeners) {
		closeFiles(files)
		return nil, fmt.Errorf("upgrade: unexpected message %q with %d descriptors", m.Kind, len(files))
	}
	uc := &upgradeChild{fd: fd, ownSocket: m.OwnSocket}
	for i, f := range files {
		role := m.Listeners[i]
		if role == "lock" {
			uc.lock = f
			continue
		}
		l, err := net.FileListener(f)
		f.Close()
		if err != nil {
			uc.close()
			return nil, fmt.Errorf("upgrade: %s listener: %w", role, err)
		}
		switch role {
		case "nbd":
			uc.nbd = append(uc.nbd, l)
		case "metrics":
			uc.metrics = l
		case "control":
			uc.control = l
		default:
			l.Close()
		}
	}
	if uc.lock == nil || uc.control == nil || len(uc.nbd) == 0 {
		uc.close()
		return nil, errors.New("upgrade: the old gateway passed no lock, control socket or NBD listener")
	}
	return uc, nil
}

// fail tells the old process why this one cannot take over.
func (uc *upgradeChild) fail(err error) {
	sendMsg(uc.fd, upgradeMsg{Kind: "fail", Reason: err.Error()})
}

func (uc *upgradeChild) close() {
	for _, l := range uc.nbd {
		l.Close()
	}
	if uc.metrics != nil {
		uc.metrics.Close()
	}
	if uc.control != nil {
		uc.control.Close()
	}
	if uc.lock != nil {
		uc.lock.Close()
	}
	unix.Close(uc.fd)
}

// takeOver says ready, adopts the connections the old process sends and,
// once all are open, waits for the commit. The returned connections are
// then this process's to start.
func (uc *upgradeChild) takeOver(srv *gateway.Server, log *slog.Logger) ([]*gateway.Adopted, error) {
	if err := sendMsg(uc.fd, upgradeMsg{Kind: "ready", Version: buildVersion()}); err != nil {
		return nil, fmt.Errorf("upgrade: %w", err)
	}
	var adopted []*gateway.Adopted
	giveUp := func(err error) ([]*gateway.Adopted, error) {
		for _, a := range adopted {
			a.Close()
		}
		uc.fail(err)
		return nil, err
	}
	type handed struct {
		f  *os.File
		st gateway.ConnState
	}
	var conns []handed
	buf := make([]byte, maxUpgradeMsg)
	for {
		m, files, err := recvMsgBuf(uc.fd, buf)
		if err != nil {
			for _, h := range conns {
				h.f.Close()
			}
			return giveUp(fmt.Errorf("upgrade: %w", err))
		}
		if m.Kind == "end" {
			closeFiles(files)
			break
		}
		if m.Kind != "conn" || m.Conn == nil || len(files) != 1 {
			closeFiles(files)
			for _, h := range conns {
				h.f.Close()
			}
			return giveUp(fmt.Errorf("upgrade: unexpected message %q with %d descriptors", m.Kind, len(files)))
		}
		conns = append(conns, handed{files[0], *m.Conn})
	}
	// Volumes open in parallel (each open's synced writes wait on the
	// disk, not the CPU): the clients wait meanwhile.
	t0 := time.Now()
	res := make([]*gateway.Adopted, len(conns))
	errs := make([]error, len(conns))
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for i, h := range conns {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			t := time.Now()
			res[i], errs[i] = srv.Adopt(h.f, h.st)
			if errs[i] == nil {
				log.Info("upgrade: volume open for a handed connection", "volume", h.st.Export, "open_ms", time.Since(t).Milliseconds())
			}
		}()
	}
	wg.Wait()
	for _, a := range res {
		if a != nil {
			adopted = append(adopted, a)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return giveUp(err)
	}
	uc.adoptTook = time.Since(t0)
	if err := sendMsg(uc.fd, upgradeMsg{Kind: "ok"}); err != nil {
		return giveUp(err)
	}
	m, files, err := recvMsg(uc.fd)
	closeFiles(files)
	if err != nil || m.Kind != "commit" {
		for _, a := range adopted {
			a.Close()
		}
		return nil, fmt.Errorf("upgrade: the old gateway did not commit: %s", why(m, err))
	}
	unix.Close(uc.fd)
	return adopted, nil
}
