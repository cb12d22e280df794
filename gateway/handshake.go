package gateway

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"time"
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
	binary.BigEndian.PutUint64(hello[0:], nbdMagic)
	binary.BigEndian.PutUint64(hello[8:], optMagic)
	binary.BigEndian.PutUint16(hello[16:], flagFixedNewstyle|flagNoZeroes)
	w.Write(hello[:])
	if err := w.Flush(); err != nil {
		return err
	}
	var cf [4]byte
	if _, err := io.ReadFull(c.rd, cf[:]); err != nil {
		return err
	}
	clientFlags := binary.BigEndian.Uint32(cf[:])
	if clientFlags&^(clientFixed|clientNoZeroes) != 0 {
		return violation("unknown client flags %#x", clientFlags)
	}
	if clientFlags&clientFixed == 0 {
		return violation("client does not speak fixed newstyle")
	}
	c.noZeroes = clientFlags&clientNoZeroes != 0

	for {
		var hdr [16]byte
		if _, err := io.ReadFull(c.rd, hdr[:]); err != nil {
			return err
		}
		if m := binary.BigEndian.Uint64(hdr[0:]); m != optMagic {
			return violation("bad option magic %#x", m)
		}
		opt := binary.BigEndian.Uint32(hdr[8:])
		length := binary.BigEndian.Uint32(hdr[12:])
		if length > maxOptionLength {
			return violation("option %d of %d bytes is too long", opt, length)
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
	if !c.tls && opt != optStartTLS && opt != optAbort && c.tlsRequired() {
		if opt == optExportName {
			return false, violation("NBD_OPT_EXPORT_NAME before TLS on a TLS-only server")
		}
		return false, replyErr(w, opt, repErrTLSReqd, "TLS is required on this server")
	}
	switch opt {
	case optExportName:
		return c.optExportName(w, string(data))
	case optAbort:
		writeOptReply(w, opt, repAck, nil)
		w.Flush()
		return false, errHandshakeDone
	case optList:
		if len(data) != 0 {
			return false, replyErr(w, opt, repErrInvalid, "NBD_OPT_LIST takes no data")
		}
		return false, c.optList(w)
	case optStartTLS:
		return false, c.optStartTLS(w, data)
	case optInfo, optGo:
		return c.optInfoGo(w, opt, data)
	case optStructuredReply:
		if len(data) != 0 {
			return false, replyErr(w, opt, repErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		}
		c.structured = true
		return false, writeOptReply(w, opt, repAck, nil)
	case optListMetaContext, optSetMetaContext:
		return false, c.optMetaContext(w, opt, data)
	default:
		return false, replyErr(w, opt, repErrUnsup, fmt.Sprintf("option %d is not supported", opt))
	}
}

func (c *conn) optExportName(w *bufio.Writer, name string) (bool, error) {
	// The spec leaves no way to refuse but to hang up.
	g, code, msg := c.decide(name)
	if code != 0 {
		c.log.Warn("attach refused by policy", "event", "attach_refused", "export", name, "reason", msg)
		return false, fmt.Errorf("NBD_OPT_EXPORT_NAME %q: %s", name, msg)
	}
	if err := c.openExport(name, g); err != nil {
		return false, fmt.Errorf("NBD_OPT_EXPORT_NAME %q: %w", name, err)
	}
	if msg := c.attach(g); msg != "" {
		c.closeExport()
		c.log.Warn("attach refused by policy", "event", "attach_refused", "export", name, "reason", msg)
		return false, fmt.Errorf("NBD_OPT_EXPORT_NAME %q: %s", name, msg)
	}
	if err := c.recordAttach(g); err != nil {
		c.detach()
		c.closeExport()
		c.log.Error("attach refused: the audit log cannot be written", "export", name, "err", err)
		return false, fmt.Errorf("NBD_OPT_EXPORT_NAME %q: audit log unavailable: %w", name, err)
	}
	var b [10 + 124]byte
	binary.BigEndian.PutUint64(b[0:], uint64(c.exp.Device.Size()))
	binary.BigEndian.PutUint16(b[8:], c.transmissionFlags())
	n := len(b)
	if c.noZeroes {
		n = 10
	}
	w.Write(b[:n])
	return true, nil
}

func (c *conn) optList(w *bufio.Writer) error {
	list, err := c.srv.cfg.Exports.List()
	if err != nil {
		c.log.Error("listing exports", "err", err)
		return replyErr(w, optList, repErrPlatform, "cannot list exports")
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
		if err := writeOptReply(w, optList, repServer, b); err != nil {
			return err
		}
	}
	return writeOptReply(w, optList, repAck, nil)
}

func (c *conn) optStartTLS(w *bufio.Writer, data []byte) error {
	switch {
	case len(data) != 0:
		return replyErr(w, optStartTLS, repErrInvalid, "NBD_OPT_STARTTLS takes no data")
	case c.tls:
		return replyErr(w, optStartTLS, repErrInvalid, "TLS is already active")
	case c.srv.cfg.TLS == nil:
		return replyErr(w, optStartTLS, repErrUnsup, "TLS is not configured on this server")
	}
	if err := writeOptReply(w, optStartTLS, repAck, nil); err != nil {
		return err
	}
	if err := w.Flush(); err != nil {
		return err
	}
	tc := tls.Server(c.nc, c.srv.cfg.TLS)
	if err := tc.Handshake(); err != nil {
		c.log.Warn("TLS handshake failed", "event", "tls_failure", "err", err)
		return fmt.Errorf("TLS handshake: %w", err)
	}
	c.peerTLS(tc)
	// Option state from before TLS is forgotten (spec: STARTTLS).
	c.nc, c.tls, c.structured, c.metaAlloc, c.metaExport = tc, true, false, false, ""
	c.rd.Reset(tc)
	w.Reset(tc)
	return nil
}

// parseInfoGo splits NBD_OPT_INFO/GO data into the export name and the
// requested info types.
func parseInfoGo(data []byte) (name string, reqs []uint16, ok bool) {
	if len(data) < 4 {
		return "", nil, false
	}
	n := binary.BigEndian.Uint32(data)
	if uint64(n)+6 > uint64(len(data)) || n > maxStringLength {
		return "", nil, false
	}
	name = string(data[4 : 4+n])
	rest := data[4+n:]
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
		return false, replyErr(w, opt, repErrInvalid, "malformed NBD_OPT_INFO/GO")
	}
	if c.srv.shutting.Load() {
		return false, replyErr(w, opt, repErrShutdown, "server is shutting down")
	}
	g, code, msg := c.decide(name)
	if code != 0 {
		c.log.Warn("attach refused by policy", "event", "attach_refused", "export", name, "reason", msg)
		return false, replyErr(w, opt, code, msg)
	}
	if err := c.openExport(name, g); err != nil {
		if errors.Is(err, ErrUnknownExport) {
			return false, replyErr(w, opt, repErrUnknown, fmt.Sprintf("no export named %q", name))
		}
		c.log.Error("opening export", "export", name, "err", err)
		return false, replyErr(w, opt, repErrUnknown, fmt.Sprintf("export %q is unavailable: %v", name, err))
	}
	if opt == optGo { // counted before anything is sent: a refusal must come instead of the ACK
		if msg := c.attach(g); msg != "" {
			c.closeExport()
			c.log.Warn("attach refused by policy", "event", "attach_refused", "export", name, "reason", msg)
			return false, replyErr(w, opt, repErrPolicy, msg)
		}
		if err := c.recordAttach(g); err != nil {
			c.detach()
			c.grant.Store(nil)
			c.closeExport()
			c.log.Error("attach refused: the audit log cannot be written (fail closed)", "export", name, "err", err)
			return false, replyErr(w, opt, repErrShutdown, "attach refused: the gateway's audit log cannot be written: "+err.Error())
		}
	}
	var b [14]byte
	binary.BigEndian.PutUint16(b[0:], infoExport)
	binary.BigEndian.PutUint64(b[2:], uint64(c.exp.Device.Size()))
	binary.BigEndian.PutUint16(b[10:], c.transmissionFlags())
	writeOptReply(w, opt, repInfo, b[:12])
	for _, r := range reqs {
		switch r {
		case infoName:
			writeOptReply(w, opt, repInfo, append(binary.BigEndian.AppendUint16(nil, infoName), c.exp.Name...))
		case infoDescription:
			if c.exp.Description != "" {
				writeOptReply(w, opt, repInfo, append(binary.BigEndian.AppendUint16(nil, infoDescription), c.exp.Description...))
			}
		}
	}
	// Block sizes are always sent: a client that did not ask may ignore them.
	bs := binary.BigEndian.AppendUint16(nil, infoBlockSize)
	bs = binary.BigEndian.AppendUint32(bs, MinBlockSize)
	bs = binary.BigEndian.AppendUint32(bs, PreferredBlockSize)
	bs = binary.BigEndian.AppendUint32(bs, MaxRequestSize)
	writeOptReply(w, opt, repInfo, bs)
	if err := writeOptReply(w, opt, repAck, nil); err != nil {
		return false, err
	}
	if opt == optInfo {
		c.closeExport()
		return false, nil
	}
	if c.metaExport != name {
		c.metaAlloc = false // contexts were negotiated for another export
	}
	return true, nil
}

// parseMetaContext splits LIST/SET_META_CONTEXT data.
func parseMetaContext(data []byte) (name string, queries []string, ok bool) {
	if len(data) < 8 {
		return "", nil, false
	}
	n := binary.BigEndian.Uint32(data)
	if uint64(n)+8 > uint64(len(data)) || n > maxStringLength {
		return "", nil, false
	}
	name = string(data[4 : 4+n])
	rest := data[4+n:]
	count := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	for i := uint32(0); i < count; i++ {
		if len(rest) < 4 {
			return "", nil, false
		}
		l := binary.BigEndian.Uint32(rest)
		if uint64(l)+4 > uint64(len(rest)) || l > maxStringLength {
			return "", nil, false
		}
		queries = append(queries, string(rest[4:4+l]))
		rest = rest[4+l:]
	}
	if len(rest) != 0 {
		return "", nil, false
	}
	return name, queries, true
}

func (c *conn) optMetaContext(w *bufio.Writer, opt uint32, data []byte) error {
	name, queries, ok := parseMetaContext(data)
	if !ok {
		return replyErr(w, opt, repErrInvalid, "malformed meta context request")
	}
	if opt == optSetMetaContext && !c.structured {
		return replyErr(w, opt, repErrInvalid, "NBD_OPT_SET_META_CONTEXT needs structured replies first")
	}
	if _, code, msg := c.decide(name); code != 0 {
		return replyErr(w, opt, code, msg)
	}
	// Existence only: opening a volume (reading its whole chunk map) waits
	// for NBD_OPT_GO.
	list, err := c.srv.cfg.Exports.List()
	if err != nil {
		return replyErr(w, opt, repErrPlatform, "cannot list exports")
	}
	if !slices.ContainsFunc(list, func(e ExportInfo) bool { return e.Name == name }) {
		return replyErr(w, opt, repErrUnknown, fmt.Sprintf("no export named %q", name))
	}
	match := false
	for _, q := range queries {
		switch {
		case q == metaBaseAllocation:
			match = true
		case opt == optListMetaContext && q == "base:":
			match = true
		}
	}
	if opt == optListMetaContext && len(queries) == 0 {
		match = true
	}
	if opt == optSetMetaContext {
		c.metaAlloc, c.metaExport = match, name
	}
	if match {
		b := binary.BigEndian.AppendUint32(nil, metaBaseAllocID)
		if err := writeOptReply(w, opt, repMetaContext, append(b, metaBaseAllocation...)); err != nil {
			return err
		}
	}
	return writeOptReply(w, opt, repAck, nil)
}

func writeOptReply(w *bufio.Writer, opt, typ uint32, data []byte) error {
	var h [20]byte
	binary.BigEndian.PutUint64(h[0:], optReplyMagic)
	binary.BigEndian.PutUint32(h[8:], opt)
	binary.BigEndian.PutUint32(h[12:], typ)
	binary.BigEndian.PutUint32(h[16:], uint32(len(data)))
	w.Write(h[:])
	_, err := w.Write(data)
	return err
}

// replyErr sends an error reply whose payload is a message for humans.
func replyErr(w *bufio.Writer, opt, typ uint32, msg string) error {
	return writeOptReply(w, opt, typ, []byte(msg))
}
