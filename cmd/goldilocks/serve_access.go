package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"goldilocks/internal/secretfile"
	"log/slog"
	"net"
	"os"
	"sync/atomic"
	"time"

	"goldilocks/audit"
	"goldilocks/gateway"
	"goldilocks/policy"
)

// tlsConfig builds the server's TLS from --tls-cert, --tls-key and
// --tls-ca (client certificates required and verified when a CA is
// given). TLS 1.2 and 1.3 by default (the NBD spec asks for 1.2; Go
// prefers 1.3 when both ends have it).
func tlsConfig(sf serveFlags) (*tls.Config, error) {
	if sf.tlsCert == "" && sf.tlsKey == "" {
		if sf.tlsCA != "" {
			return nil, usagef("--tls-ca needs --tls-cert and --tls-key")
		}
		return nil, nil
	}
	if sf.tlsCert == "" || sf.tlsKey == "" {
		return nil, usagef("--tls-cert and --tls-key go together")
	}
	if err := secretfile.Check(sf.tlsKey); err != nil {
		return nil, fmt.Errorf("--tls-key: %w", err)
	}
	cert, err := tls.LoadX509KeyPair(sf.tlsCert, sf.tlsKey)
	if err != nil {
		return nil, fmt.Errorf("--tls-cert/--tls-key: %w", err)
	}
	cfg := &tls.Config{
		Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12,
		// Full-size records from the first byte: a disk stream is bulk.
		DynamicRecordSizingDisabled: true,
	}
	switch sf.tlsMinVersion {
	case "1.2":
	case "1.3":
		cfg.MinVersion = tls.VersionTLS13
	default:
		return nil, usagef("--tls-min-version %q: want 1.2 or 1.3", sf.tlsMinVersion)
	}
	if sf.tlsCA != "" {
		pem, err := os.ReadFile(sf.tlsCA)
		if err != nil {
			return nil, fmt.Errorf("--tls-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--tls-ca %s: no PEM certificate in it", sf.tlsCA)
		}
		cfg.ClientCAs, cfg.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}

// checkListen refuses to serve every volume to the network: without a
// policy, only loopback.
func checkListen(sf serveFlags) error {
	if sf.policy != "" || sf.listen == "" {
		return nil
	}
	host, _, err := net.SplitHostPort(sf.listen)
	if err != nil {
		return usagef("--listen %q: %v", sf.listen, err)
	}
	if ip := net.ParseIP(host); host == "localhost" || ip != nil && ip.IsLoopback() {
		return nil
	}
	return usagef("--listen %s without --policy would serve every volume to the network: give --policy FILE, or listen on loopback", sf.listen)
}

// policyHolder keeps the policy in force and reloads it on SIGHUP or
// when its file changes.
type policyHolder struct {
	file string
	tls  bool // TLS is configured: a policy may require it
	p    atomic.Pointer[policy.Policy]
	log  *slog.Logger
	st   os.FileInfo
	bad  atomic.Pointer[string] // why the file on disk does not load; nil: it does
}

// loadable says why the policy file does not load now (the previous
// policy is in force meanwhile, but a restart would fail), or nil.
func (h *policyHolder) loadable() error {
	if why := h.bad.Load(); why != nil {
		return errors.New(*why)
	}
	return nil
}

func loadPolicy(file string, tlsConfigured bool, log *slog.Logger) (*policyHolder, error) {
	h := &policyHolder{file: file, tls: tlsConfigured, log: log}
	p, err := h.load()
	if err != nil {
		return nil, err
	}
	h.p.Store(p)
	h.st, _ = os.Stat(file)
	log.Info("policy loaded", "event", audit.EvPolicyLoad, "file", file, "identities", len(p.Identities), "rules", len(p.Rules))
	return h, nil
}

// load reads the policy file; a policy that requires TLS on a gateway
// without a certificate is refused (nothing could attach what it names).
func (h *policyHolder) load() (*policy.Policy, error) {
	p, err := policy.Load(h.file)
	if err != nil {
		return nil, err
	}
	if p.NeedsTLS() && !h.tls {
		return nil, fmt.Errorf("policy %s requires TLS (tls_required), but the gateway has no --tls-cert and --tls-key", h.file)
	}
	return p, nil
}

func (h *policyHolder) get() *policy.Policy { return h.p.Load() }

// watch reloads on SIGHUP and on a change of the file (checked four times
// a second: it also sees editors that replace the file), until ctx ends.
// A policy that does not parse is logged and the old one kept; a good one
// is put in force and every live session decided again.
func (h *policyHolder) watch(ctx context.Context, hup <-chan os.Signal, srv *gateway.Server) {
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		why := ""
		select {
		case <-ctx.Done():
			return
		case <-hup:
			why = "SIGHUP"
		case <-tick.C:
			st, err := os.Stat(h.file)
			if err != nil || h.st != nil && st.ModTime().Equal(h.st.ModTime()) && st.Size() == h.st.Size() && os.SameFile(st, h.st) {
				continue
			}
			why = "file changed"
		}
		h.st, _ = os.Stat(h.file)
		p, err := h.load()
		if err != nil {
			h.log.Error("policy reload failed; the previous policy stays in force", "event", audit.EvPolicyReloadFailed, "file", h.file, "trigger", why, "err", err)
			msg := fmt.Sprintf("policy %s does not load (the previous policy stays in force): %v", h.file, err)
			h.bad.Store(&msg)
			continue
		}
		h.bad.Store(nil)
		h.p.Store(p)
		cut := srv.Reauthorize()
		h.log.Info("policy reloaded", "event", audit.EvPolicyReload, "file", h.file, "trigger", why, "identities", len(p.Identities), "rules", len(p.Rules), "sessions_cut", cut)
	}
}

// ignoreHUP keeps SIGHUP from killing a gateway that has no policy to
// reload.
func ignoreHUP(ctx context.Context, hup <-chan os.Signal, log *slog.Logger) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			log.Info("SIGHUP: no --policy to reload")
		}
	}
}
