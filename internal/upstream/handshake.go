package upstream

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"github.com/pojntfx/go-nbd/pkg/protocol"

	"goldilocks/internal/nbdproto"
	"goldilocks/internal/secretfile"
)

// IsURI reports whether s names an upstream NBD export.
func IsURI(s string) bool {
	for _, p := range []string{"nbd://", "nbd+unix://", "nbds://", "nbds+unix://"} {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

// target is where an NBD URI points.
type target struct {
	network, addr, export string
	tls                   *tls.Config // nbds: STARTTLS with this; nil: none
}

// parse reads an NBD URI: nbd://HOST[:PORT]/EXPORT,
// nbd+unix:///EXPORT?socket=PATH, and with TLS nbds://… and
// nbds+unix://… with tls-certificates=DIR (ca-cert.pem to verify the
// server; client-cert.pem and client-key.pem, if there, as the client's
// identity: QEMU's and libnbd's layout) and tls-hostname=NAME (the name
// the server's certificate must carry: the host by default, localhost
// over a Unix socket).
func parse(uri string) (target, error) {
	u, err := url.Parse(uri)
	if err != nil {
		return target{}, fmt.Errorf("%w: %v", ErrURI, err)
	}
	t := target{export: strings.TrimPrefix(u.Path, "/")}
	q := u.Query()
	hostname := "localhost"
	switch u.Scheme {
	case "nbd", "nbds":
		if u.Host == "" {
			return target{}, fmt.Errorf("%w: %q has no host", ErrURI, uri)
		}
		host, port := u.Hostname(), u.Port()
		if port == "" {
			port = "10809"
		}
		t.network, t.addr, hostname = "tcp", net.JoinHostPort(host, port), host
	case "nbd+unix", "nbds+unix":
		sock := q.Get("socket")
		if sock == "" || u.Host != "" {
			return target{}, fmt.Errorf("%w: %q needs ?socket=PATH and no host", ErrURI, uri)
		}
		t.network, t.addr = "unix", sock
	default:
		return target{}, fmt.Errorf("%w: scheme %q", ErrURI, u.Scheme)
	}
	if !strings.HasPrefix(u.Scheme, "nbds") {
		return t, nil
	}
	if h := q.Get("tls-hostname"); h != "" {
		hostname = h
	}
	dir := q.Get("tls-certificates")
	if dir == "" {
		return target{}, fmt.Errorf("%w: %q: TLS needs tls-certificates=DIR (ca-cert.pem, and client-cert.pem with client-key.pem for a client identity)", ErrURI, uri)
	}
	ca, err := os.ReadFile(filepath.Join(dir, "ca-cert.pem"))
	if err != nil {
		return target{}, fmt.Errorf("upstream %s: %w", uri, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return target{}, fmt.Errorf("upstream %s: %s holds no certificate", uri, filepath.Join(dir, "ca-cert.pem"))
	}
	t.tls = &tls.Config{RootCAs: pool, ServerName: hostname, MinVersion: tls.VersionTLS12}
	if _, err := os.Stat(filepath.Join(dir, "client-cert.pem")); err == nil {
		if err := secretfile.Check(filepath.Join(dir, "client-key.pem")); err != nil {
			return target{}, fmt.Errorf("upstream %s: %w", uri, err)
		}
		cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "client-cert.pem"), filepath.Join(dir, "client-key.pem"))
		if err != nil {
			return target{}, fmt.Errorf("upstream %s: client certificate: %w", uri, err)
		}
		t.tls.Certificates = []tls.Certificate{cert}
	}
	return t, nil
}

// negotiated is what a handshake settled.
type negotiated struct {
	size  int64
	flags uint16
	maxIO int
	// Structured replies; base:allocation with context id meta.
	structured, hasMeta bool
	meta                uint32
}

// handshake: fixed newstyle, NBD_OPT_STARTTLS for nbds (the connection
// it returns is then the TLS one), NBD_OPT_STRUCTURED_REPLY and
// NBD_OPT_SET_META_CONTEXT base:allocation where the server has them,
// NBD_OPT_GO with a block size request.
func handshake(ctx context.Context, nc net.Conn, t target) (conn net.Conn, r *bufio.Reader, neg negotiated, err error) {
	conn, r = nc, bufio.NewReaderSize(nc, 256<<10)
	neg, err = negotiate(ctx, &conn, &r, t)
	return conn, r, neg, err
}

// optReply is one reply to an option.
type optReply struct {
	typ  uint32
	body []byte
}

// option sends option opt with data and reads its replies up to the
// final one (an ACK, or an error, which ends the list).
func option(nc net.Conn, r *bufio.Reader, opt uint32, data []byte) ([]optReply, error) {
	msg := binary.BigEndian.AppendUint64(nil, protocol.NEGOTIATION_MAGIC_OPTION)
	msg = binary.BigEndian.AppendUint32(msg, opt)
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(data)))
	msg = append(msg, data...)
	if _, err := nc.Write(msg); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrHandshake, err)
	}
	var out []optReply
	for len(out) < 1024 {
		var h [20]byte
		if _, err := io.ReadFull(r, h[:]); err != nil {
			return nil, fmt.Errorf("%w: reading an option reply: %v", ErrHandshake, err)
		}
		if binary.BigEndian.Uint64(h[0:]) != protocol.NEGOTIATION_MAGIC_REPLY || binary.BigEndian.Uint32(h[8:]) != opt {
			return nil, fmt.Errorf("%w: bad option reply magic or option", ErrHandshake)
		}
		typ, n := binary.BigEndian.Uint32(h[12:]), binary.BigEndian.Uint32(h[16:])
		if n > 64<<10 {
			return nil, fmt.Errorf("%w: option reply of %d bytes", ErrHandshake, n)
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(r, body); err != nil {
			return nil, fmt.Errorf("%w: %v", ErrHandshake, err)
		}
		out = append(out, optReply{typ, body})
		if typ == protocol.NEGOTIATION_TYPE_REPLY_ACK || typ&nbdproto.RepErrBit != 0 {
			return out, nil
		}
	}
	return nil, fmt.Errorf("%w: too many replies to option %d", ErrHandshake, opt)
}

func negotiate(ctx context.Context, nc *net.Conn, rp **bufio.Reader, t target) (neg negotiated, err error) {
	export, r := t.export, *rp
	neg.maxIO = defaultMaxIO
	var hello [18]byte
	if _, err := io.ReadFull(r, hello[:]); err != nil {
		return neg, fmt.Errorf("%w: reading the greeting: %v", ErrHandshake, err)
	}
	if binary.BigEndian.Uint64(hello[0:]) != protocol.NEGOTIATION_MAGIC_OLDSTYLE ||
		binary.BigEndian.Uint64(hello[8:]) != protocol.NEGOTIATION_MAGIC_OPTION {
		return neg, fmt.Errorf("%w: not a newstyle NBD server", ErrHandshake)
	}
	hs := binary.BigEndian.Uint16(hello[16:])
	if hs&protocol.NEGOTIATION_HANDSHAKE_FLAG_FIXED_NEWSTYLE == 0 {
		return neg, fmt.Errorf("%w: the server does not speak fixed newstyle", ErrHandshake)
	}
	cf := nbdproto.ClientFixed
	if hs&nbdproto.HandshakeNoZeroes != 0 {
		cf |= nbdproto.ClientNoZeroes
	}
	if _, err := (*nc).Write(binary.BigEndian.AppendUint32(nil, cf)); err != nil {
		return neg, fmt.Errorf("%w: %v", ErrHandshake, err)
	}
	if t.tls != nil { // NBD_OPT_STARTTLS, then TLS, then the rest inside it
		rs, err := option(*nc, r, nbdproto.OptStartTLS, nil)
		if err != nil {
			return neg, err
		}
		if typ := rs[0].typ; len(rs) != 1 || typ != protocol.NEGOTIATION_TYPE_REPLY_ACK || len(rs[0].body) != 0 {
			return neg, fmt.Errorf("%w: the server refused TLS (reply %#x)", ErrHandshake, typ)
		}
		tc := tls.Client(*nc, t.tls)
		if err := tc.HandshakeContext(ctx); err != nil {
			return neg, fmt.Errorf("%w: TLS: %v", ErrHandshake, err)
		}
		*nc, r = tc, bufio.NewReaderSize(tc, 256<<10)
		*rp = r
	}
	// Structured replies, then base:allocation: block status passed
	// through. A server without them is used without them.
	rs, err := option(*nc, r, nbdproto.OptStructuredReply, nil)
	if err != nil {
		return neg, err
	}
	if rs[len(rs)-1].typ == protocol.NEGOTIATION_TYPE_REPLY_ACK {
		neg.structured = true
		q := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
		q = append(q, export...)
		q = binary.BigEndian.AppendUint32(q, 1)
		q = binary.BigEndian.AppendUint32(q, uint32(len(nbdproto.MetaBaseAllocation)))
		q = append(q, nbdproto.MetaBaseAllocation...)
		if rs, err = option(*nc, r, nbdproto.OptSetMetaContext, q); err != nil {
			return neg, err
		}
		if rs[len(rs)-1].typ == protocol.NEGOTIATION_TYPE_REPLY_ACK {
			for _, x := range rs {
				if x.typ == nbdproto.RepMetaContext && len(x.body) > 4 && string(x.body[4:]) == nbdproto.MetaBaseAllocation {
					neg.meta, neg.hasMeta = binary.BigEndian.Uint32(x.body), true
				}
			}
		}
	}
	// NBD_OPT_GO: name, then one information request (block size).
	data := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	data = append(data, export...)
	data = binary.BigEndian.AppendUint16(data, 1)
	data = binary.BigEndian.AppendUint16(data, protocol.NEGOTIATION_TYPE_INFO_BLOCKSIZE)
	if rs, err = option(*nc, r, protocol.NEGOTIATION_ID_OPTION_GO, data); err != nil {
		return neg, err
	}
	gotExport := false
	for _, x := range rs {
		typ, body, n := x.typ, x.body, len(x.body)
		switch {
		case typ == protocol.NEGOTIATION_TYPE_REPLY_ACK:
			if !gotExport {
				return neg, fmt.Errorf("%w: the server sent no export size", ErrHandshake)
			}
			return neg, nil
		case typ == protocol.NEGOTIATION_TYPE_REPLY_INFO && n >= 2:
			switch binary.BigEndian.Uint16(body) {
			case protocol.NEGOTIATION_TYPE_INFO_EXPORT:
				if n < 12 {
					return neg, fmt.Errorf("%w: short export information", ErrHandshake)
				}
				size := binary.BigEndian.Uint64(body[2:])
				if size > math.MaxInt64 {
					return neg, fmt.Errorf("%w: export size %d is beyond what a device can address", ErrHandshake, size)
				}
				neg.size = int64(size)
				neg.flags = binary.BigEndian.Uint16(body[10:])
				gotExport = true
			case protocol.NEGOTIATION_TYPE_INFO_BLOCKSIZE:
				if n >= 14 {
					if m := int(binary.BigEndian.Uint32(body[10:])); m >= 4096 && m < neg.maxIO {
						neg.maxIO = m
					}
				}
			}
		case typ&nbdproto.RepErrBit != 0:
			text := string(body)
			if typ == protocol.NEGOTIATION_TYPE_REPLY_ERR_UNKNOWN {
				return neg, fmt.Errorf("%w: no export %q (%s)", ErrHandshake, export, text)
			}
			return neg, fmt.Errorf("%w: the server refused export %q: error %d: %s", ErrHandshake, export, typ&^nbdproto.RepErrBit, text)
		}
	}
	return neg, fmt.Errorf("%w: no final reply to NBD_OPT_GO", ErrHandshake)
}
