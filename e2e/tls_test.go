package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestTLSVersions: TLS 1.2 is accepted by default (the NBD spec says a
// server MUST support it), 1.3 is chosen when the client has it, and
// --tls-min-version 1.3 refuses 1.2.
func TestTLSVersions(t *testing.T) {
	p := newPKI(t)
	dir := newDataDir(t, "disk:1M")
	for _, tc := range []struct {
		name  string
		flags []string
		max   uint16
		want  uint16 // 0: the handshake must fail
	}{
		{"default, a 1.2 client", nil, tls.VersionTLS12, tls.VersionTLS12},
		{"default, a 1.3 client", nil, tls.VersionTLS13, tls.VersionTLS13},
		{"--tls-min-version 1.3, a 1.2 client", []string{"--tls-min-version", "1.3"}, tls.VersionTLS12, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := startGateway(t, dir, append(p.serverFlags(), tc.flags...)...)
			got, err := startTLS(t, g.addr, p.clients["vm-a"], tc.max)
			if tc.want == 0 {
				if err == nil {
					t.Fatalf("TLS %#x accepted under --tls-min-version 1.3", got)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("TLS: version %#x, err %v; want %#x", got, err, tc.want)
			}
		})
	}
}

// startTLS speaks NBD up to STARTTLS and returns the TLS version agreed.
func startTLS(t *testing.T, addr, clientDir string, max uint16) (uint16, error) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(c)
	var hello [18]byte
	if _, err := io.ReadFull(r, hello[:]); err != nil {
		t.Fatal(err)
	}
	b := binary.BigEndian.AppendUint32(nil, 3)
	b = binary.BigEndian.AppendUint64(b, 0x49484156454F5054)
	b = binary.BigEndian.AppendUint32(b, 5) // NBD_OPT_STARTTLS
	b = binary.BigEndian.AppendUint32(b, 0)
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
	var rep [20]byte
	if _, err := io.ReadFull(r, rep[:]); err != nil || binary.BigEndian.Uint32(rep[12:]) != 1 {
		t.Fatalf("STARTTLS reply % x: %v", rep, err)
	}
	cert, err := tls.LoadX509KeyPair(filepath.Join(clientDir, "client-cert.pem"), filepath.Join(clientDir, "client-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(filepath.Join(clientDir, "ca-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	tc := tls.Client(c, &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, ServerName: "localhost", MaxVersion: max, InsecureSkipVerify: true})
	if err := tc.Handshake(); err != nil {
		return 0, err
	}
	// A TLS 1.3 client certificate is checked after the handshake: an
	// option over TLS proves the session works.
	o := binary.BigEndian.AppendUint64(nil, 0x49484156454F5054)
	o = binary.BigEndian.AppendUint32(o, 3) // NBD_OPT_LIST
	o = binary.BigEndian.AppendUint32(o, 0)
	if _, err := tc.Write(o); err != nil {
		return 0, err
	}
	if _, err := io.ReadFull(tc, rep[:]); err != nil {
		return 0, err
	}
	return tc.ConnectionState().Version, nil
}

// TestPolicyNeedsTLSCertificate: a policy that requires TLS on a gateway
// without a certificate is refused at start (nothing could attach what it
// names), and a reload to such a policy keeps the previous one.
func TestPolicyNeedsTLSCertificate(t *testing.T) {
	dir := newDataDir(t, "disk:1M")
	pol := filepath.Join(t.TempDir(), "policy.yaml")
	writePolicy(t, pol, `
identities:
  - {name: root-local, unix: {uid: 0}}
rules:
  - {identity: root-local, volumes: ["disk"], access: read-write, tls_required: true}
`)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	outb, err := exec.CommandContext(ctx, goldilocksBin, "serve", "--data-dir", dir, "--listen", "127.0.0.1:0", "--metrics", "", "--policy", pol).CombinedOutput()
	out := string(outb)
	if ctx.Err() != nil {
		t.Fatalf("serve started with a TLS policy and no certificate:\n%s", out)
	}
	if err == nil || !strings.Contains(out, "requires TLS") || !strings.Contains(out, "--tls-cert") {
		t.Fatalf("serve with a TLS policy and no certificate: %v\n%s", err, out)
	}
}
