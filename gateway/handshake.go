package gateway

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"goldilocks/audit"
	"io"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"goldilocks/internal/nbdproto"
)

// errHandshakeDone ends option haggling without entering transmission
// (NBD_OPT_ABORT, or a client that went away).
var errHandshakeDone = errors.New("handshake ended")

// protocolError is a violation that the spec says ends the connection.
type protocolError struct{ msg string }

func (e *protocolError) Error() string { return "protocol violation: " + e.msg }

func violation(format string, args ...any) error {
	return &protocolError{msg: fmt.Sprintf(format, args...)}
}

// handshake runs the fixed-newstyle negotiation. On success c.exp is the
// export to serve in transmission.
func (c *conn) handshake() error {
	c.nc.SetDeadline(time.Now().Add(c.srv.cfg.HandshakeTimeout))
	defer func() {
		c.nc.SetDeadline(time.Time{})
		if c.stopping.Load() { // a stop during the handshake must still stop us
			c.nc.SetReadDeadline(time.Now())
		}
	}()

	w := bufio.NewWriter(c.nc)
	var hello [18]byte
	binary.BigEndian.PutUint64(hello[0:], nbdproto.NBDMagic)
	binary.BigEndian.PutUint64(hello[8:], nbdproto.OptMagic)
	binary.BigEndian.PutUint16(hello[16:], nbdproto.HandshakeFixedNewstyle|nbdproto.HandshakeNoZeroes)
	w.Write(hello[:])
	if err := w.Flush(); err != nil {
		return err
	}
	var cf [4]byte
	if _, err := io.ReadFull(c.rd, cf[:]); err != nil {
		return err
	}
	clientFlags := binary.BigEndian.Uint32(cf[:])
	if clientFlags&^(nbdproto.ClientFixed|nbdproto.ClientNoZeroes) != 0 {
		return violation("unknown client flags %#x", clientFlags)
	}
	if clientFlags&nbdproto.ClientFixed == 0 {
		return violation("the client does not speak fixed newstyle negotiation (NBD_FLAG_C_FIXED_NEWSTYLE unset); " +
			"this server speaks only that (oldstyle and plain newstyle clients are refused)")
	}
	c.noZeroes = clientFlags&nbdproto.ClientNoZeroes != 0

	for n := 1; ; n++ {
		if n > maxOptions {
			return violation("more than %d options in one handshake", maxOptions)
		}
		var hdr [16]byte
		if _, err := io.ReadFull(c.rd, hdr[:]); err != nil {
			return err
		}
		if m := binary.BigEndian.Uint64(hdr[0:]); m != nbdproto.OptMagic {
			return violation("bad option magic %#x", m)
		}
		opt := binary.BigEndian.Uint32(hdr[8:])
		length := binary.BigEndian.Uint32(hdr[12:])
		if length > maxOptionLength {
			// Skipped and refused; the handshake deadline bounds the skip.
			if _, err := io.CopyN(io.Discard, c.rd, int64(length)); err != nil {
				return err
			}
			c.log.Warn("option too long; refused", "option", opt, "length", length)
			if err := replyErr(w, opt, nbdproto.RepErrTooBig, "option too long"); err != nil {
				return err
			}
			if err := w.Flush(); err != nil {
				return err
			}
			continue
		}
		data := make([]byte, length)
		if _, err := io.ReadFull(c.rd, data); err != nil {
			return err
		}
		done, err := c.option(w, opt, data)
		if err == nil {
			err = w.Flush()
		}
		if err != nil || done {
			return err
		}
	}
}

// option handles one option. done reports that transmission begins.
func (c *conn) option(w *bufio.Writer, opt uint32, data []byte) (done bool, err error) {
	if !c.tls && opt != nbdproto.OptStartTLS && opt != nbdproto.OptAbort && c.tlsRequired() {
		if opt == nbdproto.OptExportName {
			return false, violation("NBD_OPT_EXPORT_NAME before TLS on a TLS-only server")
		}
		return false, replyErr(w, opt, nbdproto.RepErrTLSReqd, "TLS is required on this server")
	}
	switch opt {
	case nbdproto.OptExportName:
		return c.optExportName(w, string(data))
	case nbdproto.OptAbort:
		writeOptReply(w, opt, nbdproto.RepAck, nil)
		w.Flush()
		return false, errHandshakeDone
	case nbdproto.OptList:
		if len(data) != 0 {
			return false, replyErr(w, opt, nbdproto.RepErrInvalid, "NBD_OPT_LIST takes no data")
		}
		return false, c.optList(w)
	case nbdproto.OptStartTLS:
		return false, c.optStartTLS(w, data)
	case nbdproto.OptInfo, nbdproto.OptGo:
		return c.optInfoGo(w, opt, data)
	case nbdproto.OptStructuredReply:
		switch {
		case len(data) != 0:
			return false, replyErr(w, opt, nbdproto.RepErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		case c.extended:
			return false, replyErr(w, opt, nbdproto.RepErrInvalid, "extended headers are already negotiated")
		}
		c.structured = true
		return false, writeOptReply(w, opt, nbdproto.RepAck, nil)
	case nbdproto.OptExtendedHeaders:
		if len(data) != 0 {
			return false, replyErr(w, opt, nbdproto.RepErrInvalid, "NBD_OPT_EXTENDED_HEADERS takes no data")
		}
		c.structured, c.extended = true, true
		return false, writeOptReply(w, opt, nbdproto.RepAck, nil)
	case nbdproto.OptListMetaContext, nbdproto.OptSetMetaContext:
		return false, c.optMetaContext(w, opt, data)
	default:
		return false, replyErr(w, opt, nbdproto.RepErrUnsup, fmt.Sprintf("option %d is not supported", opt))
	}
}

func (c *conn) optExportName(w *bufio.Writer, name string) (bool, error) {
	if c.extended {
		return false, violation("NBD_OPT_EXPORT_NAME after NBD_OPT_EXTENDED_HEADERS")
	}
	if len(name) > nbdproto.MaxStringLength {
		return false, violation("NBD_OPT_EXPORT_NAME of %d bytes", len(name))
	}
	// The spec leaves no way to refuse but to hang up.
	if code, msg := c.attachExport(name, true); code != 0 {
		return false, fmt.Errorf("NBD_OPT_EXPORT_NAME %q: %s", clip(name, 64), msg)
	}
	var b [10 + 124]byte
	binary.BigEndian.PutUint64(b[0:], uint64(c.exp.Device.Size()))
	binary.BigEndian.PutUint16(b[8:], c.flags)
	n := len(b)
	if c.noZeroes {
		n = 10
	}
	w.Write(b[:n])
	return true, nil
}

// attachExport makes export name this connection's, for NBD_OPT_GO and
// EXPORT_NAME (attach: counted against max_connections and put on the
// audit trail before the client hears yes) or NBD_OPT_INFO. A refusal
// returns the option reply code and a short message for the client (the
// detail goes to the log and the audit trail) and leaves nothing open or
// counted. What it did is undone by detach and closeExport, each safe to
// call twice.
func (c *conn) attachExport(name string, attach bool) (code uint32, msg string) {
	m := c.srv.cfg.Metrics
	d := c.decide(name)
	if ok, auditIt, suppressed := c.srv.attaches.allow(c.attachKey(d.identity), time.Now()); !ok {
		m.attachRefused(RefusedRate)
		c.rateRefused(name, d.identity, auditIt, suppressed)
		return repErrPolicy, "too many attaches: try again later"
	}
	if d.code != 0 {
		if d.code == nbdproto.RepErrTLSReqd {
			m.attachRefused(RefusedTLSRequired)
		} else {
			m.attachRefused(RefusedPolicy)
		}
		c.refused(name, d.identity, d.reason)
		return d.code, d.msg
	}
	if err := c.openExport(name, d.g); err != nil {
		// Counted for GO and EXPORT_NAME (an INFO is no attach); a
		// policy refusal is counted for INFO too, as it is audited.
		if errors.Is(err, ErrUnknownExport) {
			if attach {
				m.attachRefused(RefusedUnknown)
			}
			return nbdproto.RepErrUnknown, fmt.Sprintf("no export named %q", clip(name, 64))
		}
		if attach {
			m.attachRefused(RefusedUnavailable)
		}
		c.log.Error("opening export", "volume", name, "err", err)
		if oe := (*OpenError)(nil); errors.As(err, &oe) {
			return nbdproto.RepErrUnknown, oe.Public
		}
		return nbdproto.RepErrUnknown, "the export is unavailable (the gateway's log says why)"
	}
	if !attach {
		return 0, ""
	}
	if reason := c.attach(d.g); reason != "" {
		m.attachRefused(RefusedMaxConns)
		c.closeExport()
		c.refused(name, d.identity, reason)
		return repErrPolicy, reason
	}
	if err := c.recordAttach(d.g); err != nil {
		m.attachRefused(RefusedAudit)
		c.detach()
		c.closeExport()
		c.log.Error("attach refused: the audit log cannot be written (fail closed)", "volume", name, "err", err)
		return nbdproto.RepErrShutdown, "attach refused: the gateway's audit log cannot be written"
	}
	if c.metaExport != name {
		c.metaAlloc, c.metaSince, c.metaExport = false, "", "" // contexts were negotiated for another export
	}
	identity := ""
	if d.g != nil {
		identity = d.g.identity
	}
	c.sm = m.session(name, identity)
	return 0, ""
}

// refused logs, and so audits, an attach the policy refused.
func (c *conn) refused(name, identity, reason string) {
	c.log.Warn("attach refused by policy", "event", audit.EvAttachRefused, "volume", name,
		"identity", identity, "decision", "deny", "reason", reason)
}

// clip keeps s within n bytes (n ≥ 3), cut at a character boundary and
// marked "...": a client's name in a message or a log line (64), an
// error message (256, the length a string SHOULD keep to), a description
// (nbdproto.MaxStringLength, the length it MUST keep to).
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	cut := n - 3
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "..."
}

func (c *conn) optList(w *bufio.Writer) error {
	list, err := c.srv.cfg.Exports.List()
	if err != nil {
		c.log.Error("listing exports", "err", err)
		return replyErr(w, nbdproto.OptList, nbdproto.RepErrPlatform, "cannot list exports")
	}
	pol := c.srv.policy()
	var id string
	if pol != nil {
		id = pol.Identify(&c.peer)
	}
	for _, e := range list {
		if !c.visible(pol, id, e) {
			continue // nobody learns the names of volumes they may not attach
		}
		b := make([]byte, 4, 4+len(e.Name)+len(e.Description))
		binary.BigEndian.PutUint32(b, uint32(len(e.Name)))
		b = append(append(b, e.Name...), e.Description...)
		if err := writeOptReply(w, nbdproto.OptList, nbdproto.RepServer, b); err != nil {
			return err
		}
	}
	return writeOptReply(w, nbdproto.OptList, nbdproto.RepAck, nil)
}

func (c *conn) optStartTLS(w *bufio.Writer, data []byte) error {
	switch {
	case len(data) != 0:
		return replyErr(w, nbdproto.OptStartTLS, nbdproto.RepErrInvalid, "NBD_OPT_STARTTLS takes no data")
	case c.tls:
		return replyErr(w, nbdproto.OptStartTLS, nbdproto.RepErrInvalid, "TLS is already active")
	case c.srv.cfg.TLS == nil:
		return replyErr(w, nbdproto.OptStartTLS, nbdproto.RepErrUnsup, "TLS is not configured on this server")
	}
	if err := writeOptReply(w, nbdproto.OptStartTLS, nbdproto.RepAck, nil); err != nil {
		return err
	}
	if err := w.Flush(); err != nil {
		return err
	}
	tc := tls.Server(c.nc, c.srv.cfg.TLS)
	if err := tc.Handshake(); err != nil {
		c.srv.cfg.Metrics.note(tlsFailed)
		c.log.Warn("TLS handshake failed", "event", audit.EvTLSFailure, "err", err)
		return fmt.Errorf("TLS handshake: %w", err)
	}
	c.peerTLS(tc)
	// Option state from before TLS is forgotten (spec: STARTTLS).
	c.nc, c.tls, c.structured, c.extended, c.metaAlloc, c.metaSince, c.metaExport = tc, true, false, false, false, "", ""
	c.log.Debug("TLS is up", "version", tls.VersionName(tc.ConnectionState().Version))
	c.rd.Reset(tc)
	w.Reset(tc)
	return nil
}

// nbdString splits a string with a 32-bit length off the front of data,
// which must hold at least more bytes after it.
func nbdString(data []byte, more int) (s string, rest []byte, ok bool) {
	if len(data) < 4 {
		return "", nil, false
	}
	n := binary.BigEndian.Uint32(data)
	if uint64(n)+4+uint64(more) > uint64(len(data)) || n > nbdproto.MaxStringLength {
		return "", nil, false
	}
	return string(data[4 : 4+n]), data[4+n:], true
}

// parseInfoGo splits NBD_OPT_INFO/GO data into the export name and the
// requested info types.
func parseInfoGo(data []byte) (name string, reqs []uint16, ok bool) {
	name, rest, ok := nbdString(data, 2)
	if !ok {
		return "", nil, false
	}
	count := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*count {
		return "", nil, false
	}
	for i := 0; i < count; i++ {
		reqs = append(reqs, binary.BigEndian.Uint16(rest[2*i:]))
	}
	return name, reqs, true
}

func (c *conn) optInfoGo(w *bufio.Writer, opt uint32, data []byte) (bool, error) {
	name, reqs, ok := parseInfoGo(data)
	if !ok {
		return false, replyErr(w, opt, nbdproto.RepErrInvalid, "malformed NBD_OPT_INFO/GO")
	}
	if c.srv.shutting.Load() {
		return false, replyErr(w, opt, nbdproto.RepErrShutdown, "server is shutting down")
	}
	if code, msg := c.attachExport(name, opt == nbdproto.OptGo); code != 0 {
		return false, replyErr(w, opt, code, msg)
	}
	var b [14]byte
	binary.BigEndian.PutUint16(b[0:], nbdproto.InfoExport)
	binary.BigEndian.PutUint64(b[2:], uint64(c.exp.Device.Size()))
	binary.BigEndian.PutUint16(b[10:], c.flags)
	writeOptReply(w, opt, nbdproto.RepInfo, b[:12])
	for _, r := range reqs {
		if r == nbdproto.InfoName {
			writeOptReply(w, opt, nbdproto.RepInfo, append(binary.BigEndian.AppendUint16(nil, nbdproto.InfoName), c.exp.Name...))
		}
	}
	// Sent whether asked for or not (a client may ignore them): the
	// description and the block sizes.
	if d := c.exp.Description; d != "" {
		writeOptReply(w, opt, nbdproto.RepInfo, append(binary.BigEndian.AppendUint16(nil, nbdproto.InfoDescription), clip(d, nbdproto.MaxStringLength)...))
	}
	bs := binary.BigEndian.AppendUint16(nil, nbdproto.InfoBlockSize)
	bs = binary.BigEndian.AppendUint32(bs, MinBlockSize)
	bs = binary.BigEndian.AppendUint32(bs, PreferredBlockSize)
	bs = binary.BigEndian.AppendUint32(bs, MaxRequestSize)
	writeOptReply(w, opt, nbdproto.RepInfo, bs)
	if err := writeOptReply(w, opt, nbdproto.RepAck, nil); err != nil {
		return false, err
	}
	if opt == nbdproto.OptInfo {
		c.closeExport()
		return false, nil
	}
	return true, nil
}

// parseMetaContext splits LIST/SET_META_CONTEXT data.
func parseMetaContext(data []byte) (name string, queries []string, ok bool) {
	name, rest, ok := nbdString(data, 4)
	if !ok {
		return "", nil, false
	}
	count := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	for i := uint32(0); i < count; i++ {
		var q string
		if q, rest, ok = nbdString(rest, 0); !ok {
			return "", nil, false
		}
		queries = append(queries, q)
	}
	if len(rest) != 0 {
		return "", nil, false
	}
	return name, queries, true
}

func (c *conn) optMetaContext(w *bufio.Writer, opt uint32, data []byte) error {
	if opt == nbdproto.OptSetMetaContext {
		// A SET that fails leaves nothing selected.
		c.metaAlloc, c.metaSince, c.metaExport = false, "", ""
	}
	name, queries, ok := parseMetaContext(data)
	if !ok {
		return replyErr(w, opt, nbdproto.RepErrInvalid, "malformed meta context request")
	}
	if opt == nbdproto.OptSetMetaContext && !c.structured {
		return replyErr(w, opt, nbdproto.RepErrInvalid, "NBD_OPT_SET_META_CONTEXT needs structured replies first")
	}
	d := c.decide(name)
	if d.code == nbdproto.RepErrTLSReqd {
		// Only INFO, GO and EXPORT_NAME may answer TLS_REQD (proto.md,
		// SELECTIVETLS): here it is a refusal like any other.
		d.code = repErrPolicy
	}
	if d.code != 0 {
		return replyErr(w, opt, d.code, d.msg)
	}
	// Existence only: opening a volume (reading its whole chunk map) waits
	// for NBD_OPT_GO.
	list, err := c.srv.cfg.Exports.List()
	if err != nil {
		c.log.Error("listing exports", "err", err)
		return replyErr(w, opt, nbdproto.RepErrPlatform, "cannot list exports")
	}
	i := slices.IndexFunc(list, func(e ExportInfo) bool { return e.Name == name })
	if i < 0 {
		return replyErr(w, opt, nbdproto.RepErrUnknown, "no such export")
	}
	// A grant without block_status gets no context: a client then does
	// not ask for block status at all (qemu-img map falls back to data).
	if d.g.permits(nbdproto.CmdBlockStatus) != 0 {
		return writeOptReply(w, opt, nbdproto.RepAck, nil)
	}
	list1 := opt == nbdproto.OptListMetaContext
	alloc := list1 && len(queries) == 0
	var changed []string // full context names, in the order found
	since := ""
	for _, q := range queries {
		switch {
		case q == nbdproto.MetaBaseAllocation || (list1 && q == "base:"):
			alloc = true
		case list1 && (q == metaChangedNS || q == metaDirtyNS || q == "goldilocks:" || q == "qemu:"):
			ns := map[string]string{"goldilocks:": metaChangedNS, "qemu:": metaDirtyNS}[q]
			if ns == "" {
				ns = q
			}
			for _, s := range list[i].Changed {
				changed = append(changed, ns+s)
			}
		default:
			for _, ns := range []string{metaChangedNS, metaDirtyNS} {
				if s, ok := strings.CutPrefix(q, ns); ok && slices.Contains(list[i].Changed, s) && (list1 || since == "") {
					changed = append(changed, q)
					since = s
				}
			}
		}
	}
	if list1 && len(queries) == 0 {
		for _, s := range list[i].Changed {
			changed = append(changed, metaChangedNS+s)
		}
	}
	id, cid := uint32(0), uint32(0) // LIST: reserved, zero
	if opt == nbdproto.OptSetMetaContext {
		c.metaAlloc, c.metaSince, c.metaExport = alloc, since, name
		id, cid = metaBaseAllocID, metaChangedID
	}
	if alloc {
		b := binary.BigEndian.AppendUint32(nil, id)
		if err := writeOptReply(w, opt, nbdproto.RepMetaContext, append(b, nbdproto.MetaBaseAllocation...)); err != nil {
			return err
		}
	}
	for _, ctx := range changed {
		b := binary.BigEndian.AppendUint32(nil, cid)
		if err := writeOptReply(w, opt, nbdproto.RepMetaContext, append(b, ctx...)); err != nil {
			return err
		}
	}
	return writeOptReply(w, opt, nbdproto.RepAck, nil)
}

func writeOptReply(w *bufio.Writer, opt, typ uint32, data []byte) error {
	var h [20]byte
	binary.BigEndian.PutUint64(h[0:], nbdproto.OptReplyMagic)
	binary.BigEndian.PutUint32(h[8:], opt)
	binary.BigEndian.PutUint32(h[12:], typ)
	binary.BigEndian.PutUint32(h[16:], uint32(len(data)))
	w.Write(h[:])
	_, err := w.Write(data)
	return err
}

// replyErr sends an error reply whose payload is a short message for
// humans (never internal detail: that goes to the log), cut to the 256
// bytes the spec says a string SHOULD not exceed.
func replyErr(w *bufio.Writer, opt, typ uint32, msg string) error {
	return writeOptReply(w, opt, typ, []byte(clip(msg, 256)))
}
