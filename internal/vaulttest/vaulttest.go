// Package vaulttest runs a real Vault server for tests: the binary `make
// vault` builds (../shared/VAULT.md), on a free loopback port, stopped by
// its PID when the test ends. It is never a mock: the Transit engine the
// tests use is Vault's own.
//
// It owns nothing but that process and its temporary directory.
package vaulttest

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"
)

// Server is a running Vault.
type Server struct {
	tb         testing.TB
	bin, dir   string
	Addr       string // http://127.0.0.1:PORT, or https:// with TLS
	Token      string // root token
	CACert     string // with TLS: the CA that signed the server's certificate
	persistent bool
	unsealKey  string
	cmd        *exec.Cmd
	exited     chan struct{}
}

// Bin finds the Vault binary: $GOLDILOCKS_VAULT_BIN, the repository's
// bin/vault, or vault on PATH. Without one the test is skipped with a
// message naming `make vault`, except under CI (CI=true), where that is a
// failure: CI installs everything and never skips.
func Bin(tb testing.TB) string {
	tb.Helper()
	if p := os.Getenv("GOLDILOCKS_VAULT_BIN"); p != "" {
		return p
	}
	_, file, _, _ := runtime.Caller(0)
	repo := filepath.Join(filepath.Dir(file), "..", "..")
	if p := filepath.Join(repo, "bin", "vault"); isExec(p) {
		return p
	}
	if p, err := exec.LookPath("vault"); err == nil {
		return p
	}
	msg := "no Vault server binary: run `make vault` (builds bin/vault once, ../shared/VAULT.md)"
	if os.Getenv("CI") != "" {
		tb.Fatal(msg)
	}
	tb.Skip(msg)
	return ""
}

func isExec(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode()&0o111 != 0
}

// Options choose the kind of server.
type Options struct {
	// Persistent runs a non-dev server on file storage (initialised and
	// unsealed here), so that Restart keeps its keys; a dev server keeps
	// them in memory only.
	Persistent bool
	// TLS serves HTTPS with a certificate from a CA of its own (a dev
	// server's -dev-tls); CACert names the CA's file.
	TLS bool
}

// Start starts a Vault with the Transit engine mounted at "transit" and a
// KV version 2 engine at "secret" (a dev server has it already; a
// persistent one gets it here), where the vault provider keeps its DEK
// secrets.
func Start(tb testing.TB, o Options) *Server {
	tb.Helper()
	if o.TLS && o.Persistent {
		tb.Fatal("vaulttest: TLS is for dev servers")
	}
	s := &Server{tb: tb, bin: Bin(tb), dir: tb.TempDir(), persistent: o.Persistent}
	port := freePort(tb)
	s.Addr = "http://127.0.0.1:" + strconv.Itoa(port)
	if o.TLS {
		s.Addr = "https://127.0.0.1:" + strconv.Itoa(port)
		s.CACert = filepath.Join(s.dir, "vault-ca.pem")
	}
	if s.persistent {
		cfg := fmt.Sprintf(`storage "file" { path = %q }
listener "tcp" {
  address = "127.0.0.1:%d"
  tls_disable = true
}
disable_mlock = true
api_addr = %q
`, filepath.Join(s.dir, "data"), port, s.Addr)
		if err := os.WriteFile(filepath.Join(s.dir, "vault.hcl"), []byte(cfg), 0o600); err != nil {
			tb.Fatal(err)
		}
	}
	tb.Cleanup(s.Stop)
	s.start()
	c := s.Client()
	if s.persistent {
		init, err := c.Sys().Init(&vault.InitRequest{SecretShares: 1, SecretThreshold: 1})
		if err != nil {
			tb.Fatalf("vault init: %v", err)
		}
		s.Token, s.unsealKey = init.RootToken, init.KeysB64[0]
		c.SetToken(s.Token)
		s.unseal()
	}
	if err := c.Sys().Mount("transit", &vault.MountInput{Type: "transit"}); err != nil {
		tb.Fatalf("vault: enabling transit: %v", err)
	}
	if s.persistent {
		if err := c.Sys().Mount("secret", &vault.MountInput{Type: "kv", Options: map[string]string{"version": "2"}}); err != nil {
			tb.Fatalf("vault: enabling kv-v2 at secret/: %v", err)
		}
	}
	s.waitKV(c)
	return s
}

// waitKV waits until the KV version 2 engine at secret/ serves: a new
// mount upgrades its storage for a moment first.
func (s *Server) waitKV(c *vault.Client) {
	s.tb.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := c.Logical().Read("secret/config")
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			s.tb.Fatalf("vault: the KV engine at secret/ does not serve after 30 s: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (s *Server) start() {
	s.tb.Helper()
	_, hostport, _ := strings.Cut(s.Addr, "://")
	args := []string{"server", "-dev", "-dev-root-token-id=root", "-dev-listen-address=" + hostport, "-dev-no-store-token"}
	if s.CACert != "" {
		args = append(args, "-dev-tls", "-dev-tls-cert-dir="+s.dir)
	}
	if s.persistent {
		args = []string{"server", "-config=" + filepath.Join(s.dir, "vault.hcl")}
	} else {
		s.Token = "root"
	}
	logf, err := os.OpenFile(filepath.Join(s.dir, "vault.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		s.tb.Fatal(err)
	}
	defer logf.Close()
	s.cmd = exec.Command(s.bin, args...)
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	s.cmd.Env = append(os.Environ(), "VAULT_LOG_LEVEL=warn", "HOME="+s.dir)
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		s.tb.Fatalf("starting vault: %v", err)
	}
	s.exited = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { cmd.Wait(); close(done) }(s.cmd, s.exited)
	deadline := time.Now().Add(60 * time.Second)
	for {
		var err error
		if _, err = os.Stat(s.CACert); s.CACert == "" || err == nil { // -dev-tls writes its CA first
			_, err = s.Client().Sys().Health()
			if err == nil || s.persistent && isHTTPAnswer(err) {
				return
			}
		}
		select {
		case <-s.exited:
			log, _ := os.ReadFile(filepath.Join(s.dir, "vault.log"))
			s.tb.Fatalf("vault exited at start: %s", log)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.tb.Fatalf("vault not healthy after 60 s: %v", err)
		}
	}
}

func isHTTPAnswer(err error) bool {
	_, ok := err.(*vault.ResponseError)
	return ok
}

func (s *Server) unseal() {
	s.tb.Helper()
	if _, err := s.Client().Sys().Unseal(s.unsealKey); err != nil {
		s.tb.Fatalf("vault unseal: %v", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if h, err := s.Client().Sys().Health(); err == nil && !h.Sealed && h.Initialized {
			if _, err := s.Client().Logical().Read("sys/mounts"); err == nil {
				return
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	s.tb.Fatal("vault not active 30 s after unsealing")
}

// Client is an API client with the root token.
func (s *Server) Client() *vault.Client {
	cfg := vault.DefaultConfig()
	cfg.Address = s.Addr
	cfg.MaxRetries = 0
	if s.CACert != "" {
		if err := cfg.ConfigureTLS(&vault.TLSConfig{CACert: s.CACert}); err != nil {
			s.tb.Fatal(err)
		}
	}
	c, err := vault.NewClient(cfg)
	if err != nil {
		s.tb.Fatal(err)
	}
	c.SetToken(s.Token)
	return c
}

// Setenv sets the VAULT_* environment a Goldilocks process needs to use
// this Vault, for the rest of the test.
func (s *Server) Setenv(tb testing.TB) {
	tb.Setenv("VAULT_ADDR", s.Addr)
	tb.Setenv("VAULT_TOKEN", s.Token)
	tb.Setenv("VAULT_CACERT", s.CACert)
}

// Stop stops the server by its PID (SIGTERM, then SIGKILL after 10 s).
func (s *Server) Stop() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	syscall.Kill(-s.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(10 * time.Second):
		syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
		<-s.exited
	}
	s.cmd = nil
}

// Restart starts a stopped persistent server again on the same port and
// unseals it; its keys are the ones it had.
func (s *Server) Restart() {
	s.tb.Helper()
	if !s.persistent {
		s.tb.Fatal("vaulttest: Restart needs Options{Persistent: true}")
	}
	s.start()
	s.unseal()
	s.waitKV(s.Client())
}

func freePort(tb testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
