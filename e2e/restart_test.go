package e2e

import (
	"fmt"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestRestartUnderQEMU is the promise the README makes: a VM whose NBD
// client has QEMU's reconnect-delay sees no error when the gateway is
// restarted under it, gracefully (SIGTERM) or not (SIGKILL), and what it
// flushed before is there after. qemu-io writes, pauses while the test
// restarts the gateway, then writes and reads again on the same open
// image.
func TestRestartUnderQEMU(t *testing.T) {
	need(t, "qemu-io")
	for _, tc := range []struct {
		name string
		sig  syscall.Signal
		vol  []string
	}{
		{"SIGTERM plain", syscall.SIGTERM, []string{"--plain"}},
		{"SIGKILL plain", syscall.SIGKILL, []string{"--plain"}},
		{"SIGTERM encrypted", syscall.SIGTERM, nil},
		{"SIGKILL encrypted", syscall.SIGKILL, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			goldilocks(t, dir, append([]string{"volume", "create", "vm", "--size", "64M"}, tc.vol...)...)
			g := startGateway(t, dir)
			sock := g.sock
			opts := fmt.Sprintf("driver=nbd,server.type=unix,server.path=%s,export=vm,reconnect-delay=20", sock)
			// Before the pause: written and flushed. After it: written and
			// read back, both through the reconnected client.
			cmd := exec.Command("qemu-io", "--image-opts", opts,
				"-c", "write -P 0x11 0 1M", "-c", "flush",
				"-c", "sleep 3000",
				"-c", "write -P 0x22 1M 1M", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 1M 1M", "-c", "flush")
			var out strings.Builder
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			// Wait for the flushed write, then restart under the sleep.
			deadline := time.Now().Add(20 * time.Second)
			for !strings.Contains(g.logText(), "attached") && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
			time.Sleep(500 * time.Millisecond)
			if tc.sig == syscall.SIGKILL {
				g.cmd.Process.Kill()
				<-g.exited
			} else if err := g.stop(tc.sig); err != nil {
				t.Fatalf("graceful stop: %v\n%s", err, g.logText())
			}
			g2 := startGateway(t, dir)
			if g2.sock != sock {
				t.Fatalf("socket moved: %s, then %s", sock, g2.sock)
			}
			select {
			case err := <-done:
				if err != nil || strings.Contains(out.String(), "error") || strings.Contains(out.String(), "failed") ||
					strings.Count(out.String(), "wrote 1048576/1048576") != 2 || strings.Count(out.String(), "read 1048576/1048576") != 2 {
					t.Fatalf("qemu-io across the restart: %v\n%s\nfirst gateway:\n%s\nsecond:\n%s", err, out.String(), g.logText(), g2.logText())
				}
			case <-time.After(60 * time.Second):
				cmd.Process.Kill()
				t.Fatalf("qemu-io hung across the restart\n%s", out.String())
			}
			// A new client sees both writes.
			run(t, "qemu-io", "-f", "raw", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 1M 1M", g2.unixURI("vm"))
		})
	}
}
