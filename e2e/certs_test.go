package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// pki is a throwaway PKI laid out as QEMU and libnbd want it: a folder per
// endpoint holding ca-cert.pem and server-cert.pem/server-key.pem or
// client-cert.pem/client-key.pem (../shared/PEERS.md).
type pki struct {
	server string // --tls-cert/--tls-key/--tls-ca files live here
	// client folders: vm-a (URI SAN spiffe://lab/vm-a), vm-b (CN vm-b),
	// rogue (spiffe://lab/vm-a, but signed by another CA).
	clients map[string]string
}

type issuer struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newCA(t *testing.T, name string) *issuer {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return &issuer{cert: c, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// leaf writes a certificate and key signed by ca into dir as PREFIX-cert.pem
// and PREFIX-key.pem.
func (ca *issuer) leaf(t *testing.T, dir, prefix, cn string, server bool, uris ...string) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses, tmpl.DNSNames = []net.IP{net.IPv4(127, 0, 0, 1)}, []string{"localhost"}
	}
	for _, u := range uris {
		pu, _ := url.Parse(u)
		tmpl.URIs = append(tmpl.URIs, pu)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalPKCS8PrivateKey(key)
	write(t, filepath.Join(dir, prefix+"-cert.pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	write(t, filepath.Join(dir, prefix+"-key.pem"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kb}))
}

func write(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func newPKI(t *testing.T) *pki {
	t.Helper()
	root := t.TempDir()
	ca, rogueCA := newCA(t, "goldilocks test CA"), newCA(t, "rogue CA")
	p := &pki{server: filepath.Join(root, "server"), clients: map[string]string{}}
	write(t, filepath.Join(p.server, "ca-cert.pem"), ca.pem)
	ca.leaf(t, p.server, "server", "localhost", true)
	for _, c := range []struct {
		name, cn string
		by       *issuer
		uris     []string
	}{
		{"vm-a", "vm-a", ca, []string{"spiffe://lab/vm-a"}},
		{"vm-b", "vm-b", ca, nil},
		{"rogue", "vm-a", rogueCA, []string{"spiffe://lab/vm-a"}},
	} {
		dir := filepath.Join(root, c.name)
		p.clients[c.name] = dir
		c.by.leaf(t, dir, "client", c.cn, false, c.uris...)
		// The client trusts our CA for the server; a rogue client also
		// needs its own CA there, or QEMU refuses its certificate itself.
		cas := ca.pem
		if c.by != ca {
			cas = append(append([]byte{}, ca.pem...), c.by.pem...)
		}
		write(t, filepath.Join(dir, "ca-cert.pem"), cas)
	}
	return p
}

func (p *pki) serverFlags() []string {
	return []string{"--tls-cert", filepath.Join(p.server, "server-cert.pem"), "--tls-key", filepath.Join(p.server, "server-key.pem"),
		"--tls-ca", filepath.Join(p.server, "ca-cert.pem")}
}
