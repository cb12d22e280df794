package main

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/schollz/progressbar/v3"
)

// progress shows a long operation's progress on stderr — bytes (or
// items) done, rate and ETA, through github.com/schollz/progressbar —
// only when stderr is a terminal: piped or redirected, it prints nothing.
type progress struct {
	w     io.Writer
	on    bool
	label string
	total int64
	count bool // done/total are items, not bytes
	bar   *progressbar.ProgressBar
}

func newProgress(a *app, label string, total int64) *progress {
	p := &progress{w: a.stderr, label: label, total: total}
	if f, ok := a.stderr.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			p.on = true
		}
	}
	return p
}

// update sets how much is done (of p.total, which may change meanwhile).
func (p *progress) update(done int64) {
	if !p.on || p.total <= 0 {
		return
	}
	if p.bar == nil {
		opts := []progressbar.Option{
			progressbar.OptionSetWriter(p.w),
			progressbar.OptionSetDescription(p.label),
			progressbar.OptionSetWidth(30),
			progressbar.OptionThrottle(200 * time.Millisecond),
			progressbar.OptionShowCount(),
			progressbar.OptionSetPredictTime(true),
			progressbar.OptionOnCompletion(func() { fmt.Fprintln(p.w) }),
		}
		if !p.count {
			opts = append(opts, progressbar.OptionShowBytes(true))
		} else {
			opts = append(opts, progressbar.OptionShowIts(), progressbar.OptionSetItsString("keys"))
		}
		p.bar = progressbar.NewOptions64(p.total, opts...)
	} else if p.bar.GetMax64() != p.total {
		p.bar.ChangeMax64(p.total)
	}
	p.bar.Set64(min(done, p.total))
}
