package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
)

// Running under a service manager: readiness and stopping on
// NOTIFY_SOCKET, the watchdog, listeners passed by socket activation,
// the PID file and the data dir's lock. The protocol code is
// go-systemd's (github.com/coreos/go-systemd/v22).

// notify sends state (READY=1, STOPPING=1, …) to the service manager if
// it asked for it (NOTIFY_SOCKET); a failure is logged, never fatal.
func notify(log *slog.Logger, state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		log.Warn("service manager notification failed", "state", state, "err", err)
	}
}

// watchdog sends WATCHDOG=1 at half the interval the service manager
// asked for (WatchdogSec=, WATCHDOG_USEC), while healthy says so, until
// ctx ends. Without a watchdog it returns at once.
func watchdog(ctx context.Context, log *slog.Logger, healthy func() error) {
	every, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		log.Warn("service manager watchdog: ignored", "err", err)
		return
	}
	if every == 0 {
		return
	}
	t := time.NewTicker(every / 2)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := healthy(); err != nil {
				log.Error("not healthy: withholding the watchdog ping", "err", err)
				continue
			}
			notify(log, daemon.SdNotifyWatchdog)
		}
	}
}

// activated returns the listeners the service manager passed
// (LISTEN_FDS: a .socket unit, or systemd-socket-activate), none when
// it passed none. Only stream sockets are taken: TCP for NBD and Unix
// for NBD; anything else is an error naming it.
func activated() ([]net.Listener, error) {
	files := activation.Files(true)
	var ls []net.Listener
	for _, f := range files {
		l, err := net.FileListener(f)
		f.Close()
		if err != nil {
			closeListeners(ls)
			return nil, fmt.Errorf("socket activation: descriptor %q is not a listening stream socket: %w", f.Name(), err)
		}
		ls = append(ls, l)
	}
	return ls, nil
}

func closeListeners(ls []net.Listener) {
	for _, l := range ls {
		l.Close()
	}
}

// lockDataDir takes the data dir's serve lock (an flock on DIR/serve.lock
// holding the PID), so that a second gateway on the same data dir refuses
// before it touches the first one's sockets. The lock ends with the
// process (and with a new gateway an upgrade passed it to); closing the
// file releases it, and removes nothing (a stale file is harmless).
func lockDataDir(dir string) (*os.File, error) {
	path := filepath.Join(dir, "serve.lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("data dir lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		b := make([]byte, 32)
		n, _ := f.ReadAt(b, 0)
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			pid := strings.TrimSpace(string(b[:n]))
			if pid == "" {
				pid = "unknown"
			}
			return nil, fmt.Errorf("data dir %s is already served by another goldilocks serve (pid %s)", dir, pid)
		}
		return nil, fmt.Errorf("data dir lock %s: %w", path, err)
	}
	if err := f.Truncate(0); err == nil {
		f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return f, nil
}

// writePIDFile writes the PID to path (atomically: a reader never sees
// an empty file) and returns its remover.
func writePIDFile(path string) (remove func(), err error) {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
		return nil, fmt.Errorf("--pid-file: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return nil, fmt.Errorf("--pid-file: %w", err)
	}
	return func() { os.Remove(path) }, nil
}

// socketAccess is who may reach the NBD Unix socket: its group and mode.
type socketAccess struct {
	gid  int         // -1: the gateway's own
	mode os.FileMode // permission bits
}

// parseSocketAccess reads --unix-group (a name or number) and --unix-mode
// (octal). The default mode is 0600 (the gateway's user only) without a
// policy and without a group; 0660 with a group; 0666 with a policy and
// no group (SO_PEERCRED and the policy decide who attaches).
func parseSocketAccess(group, mode string, policy bool) (socketAccess, error) {
	sa := socketAccess{gid: -1, mode: 0o600}
	if group != "" {
		gid, err := strconv.Atoi(group)
		if err != nil {
			g, lerr := user.LookupGroup(group)
			if lerr != nil {
				return sa, usagef("--unix-group %q: no such group", group)
			}
			gid, _ = strconv.Atoi(g.Gid)
		}
		sa.gid, sa.mode = gid, 0o660
	} else if policy {
		sa.mode = 0o666
	}
	if mode != "" {
		m, err := strconv.ParseUint(mode, 8, 32)
		if err != nil || m > 0o777 {
			return sa, usagef("--unix-mode %q: want octal permission bits such as 0660", mode)
		}
		sa.mode = os.FileMode(m)
	}
	return sa, nil
}

// apply sets the socket file's group and mode, and warns when its
// directory keeps out the users the mode lets in.
func (sa socketAccess) apply(path string, log *slog.Logger) error {
	if sa.gid >= 0 {
		if err := os.Chown(path, -1, sa.gid); err != nil {
			return err
		}
	}
	if err := os.Chmod(path, sa.mode); err != nil {
		return err
	}
	if sa.mode&0o077 != 0 {
		if st, err := os.Stat(filepath.Dir(path)); err == nil && st.Mode().Perm()&0o011 == 0 {
			log.Warn("the NBD socket's directory lets only its owner in, so other users cannot reach the socket whatever its mode: give --unix a path in a directory they can search, such as /run/goldilocks/nbd.sock",
				"socket", path, "dir_mode", fmt.Sprintf("%04o", st.Mode().Perm()))
		}
	}
	return nil
}
