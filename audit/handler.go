package audit

import (
	"context"
	"log/slog"
)

// Handler is a slog.Handler that passes every record to next and, for
// records that carry an "event" attribute (integrity_failure,
// vault_unreachable, tls_failure, policy_reload, rekey_start, …), appends
// an audit record too. Packages that only log (crypto, gateway) so reach the
// audit trail without depending on it. The attributes "identity",
// "volume" (or "export"), "decision" and "reason" (or "err") fill those
// fields; the others become details.
type Handler struct {
	next  slog.Handler
	log   *Log
	attrs []slog.Attr
}

// NewHandler tees next's event records into l.
func NewHandler(next slog.Handler, l *Log) *Handler { return &Handler{next: next, log: l} }

// Enabled: events are logged at Info or above and audited whatever the
// log level.
func (h *Handler) Enabled(ctx context.Context, lv slog.Level) bool {
	return lv >= slog.LevelInfo || h.next.Enabled(ctx, lv)
}

func (h *Handler) Handle(ctx context.Context, r slog.Record) error {
	var err error
	if h.next.Enabled(ctx, r.Level) {
		err = h.next.Handle(ctx, r)
	}
	var e Event
	details := map[string]any{}
	take := func(a slog.Attr) bool {
		v := a.Value.Resolve()
		switch a.Key {
		case "event":
			e.Type = EventType(v.String())
		case "identity":
			e.Identity = v.String()
		case "volume", "export":
			if e.Volume == "" {
				e.Volume = v.String()
			}
		case "decision":
			e.Decision = v.String()
		case "reason", "err":
			if e.Reason == "" {
				e.Reason = v.String()
			}
		default:
			switch v.Kind() {
			case slog.KindInt64:
				details[a.Key] = v.Int64()
			case slog.KindUint64:
				details[a.Key] = v.Uint64()
			case slog.KindBool:
				details[a.Key] = v.Bool()
			default:
				details[a.Key] = v.String()
			}
		}
		return true
	}
	for _, a := range h.attrs {
		take(a)
	}
	r.Attrs(take)
	if e.Type == "" {
		return err
	}
	if e.Reason == "" {
		e.Reason = r.Message
	}
	if len(details) > 0 {
		e.Details = details
	}
	if aerr := h.log.Append(e); aerr != nil && err == nil {
		err = aerr
	}
	return err
}

func (h *Handler) WithAttrs(as []slog.Attr) slog.Handler {
	return &Handler{next: h.next.WithAttrs(as), log: h.log, attrs: append(append([]slog.Attr{}, h.attrs...), as...)}
}

func (h *Handler) WithGroup(name string) slog.Handler {
	return &Handler{next: h.next.WithGroup(name), log: h.log, attrs: h.attrs}
}
