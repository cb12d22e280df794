package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/spf13/cobra"

	"goldilocks/audit"
)

// auditDir is the audit log's directory in the data dir.
func (a *app) auditDir() string { return filepath.Join(a.dataDir, "audit") }

// openAudit opens the audit log for a command that changes something.
// If it cannot be opened the command is refused: fail closed.
func (a *app) openAudit() error {
	if a.alog != nil {
		return nil
	}
	l, err := audit.Open(a.auditDir(), audit.Options{Logger: a.logger()})
	if err != nil {
		return fmt.Errorf("refused: the audit log cannot be opened (%w)", err)
	}
	a.alog, a.log = l, nil // the next logger() tees events into it
	return nil
}

func (a *app) closeAudit() {
	if a.alog != nil {
		if err := a.alog.Close(); err != nil {
			fmt.Fprintf(a.stderr, "%s: audit log: %v\n", filepath.Base(os.Args[0]), err)
		}
		a.alog = nil
	}
}

// cliIdentity names the user of a CLI command on the audit trail.
func cliIdentity() string { return "cli:uid:" + strconv.Itoa(os.Getuid()) }

// audited wraps a command that changes something: the audit log is opened
// first (the command is refused if it cannot be), and the outcome is
// recorded as an event of type typ for the volume named by the first
// argument.
func audited(a *app, typ audit.EventType, run func(*cobra.Command, []string) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, argv []string) error {
		if typ != audit.EvVolumeCreate && typ != audit.EvVolumeImport && typ != audit.EvVolumeAdopt {
			if err := a.requireDataDir(); err != nil {
				return err // before the audit log would create it
			}
		}
		if err := a.openAudit(); err != nil {
			return err
		}
		err := run(cmd, argv)
		ev := audit.Event{Type: typ, Identity: cliIdentity(), Details: map[string]any{"result": "ok"}}
		if len(argv) > 0 {
			ev.Volume = argv[0]
		}
		for k, v := range a.auditDetails {
			ev.Details[k] = v
		}
		if err != nil {
			ev.Reason, ev.Details["result"] = err.Error(), "failed"
		}
		if aerr := a.alog.Append(ev); aerr != nil && err == nil {
			return fmt.Errorf("done, but not on the audit record: %w", aerr)
		}
		return err
	}
}

func newAuditCmd(a *app) *cobra.Command {
	c := &cobra.Command{
		Use:   "audit",
		Short: "Export and verify the tamper-evident audit log",
	}
	c.AddCommand(newAuditExportCmd(a), newAuditVerifyCmd(a))
	return c
}

func parseTime(flag, s string) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	for _, layout := range []string{time.RFC3339Nano, "2006-01-02T15:04:05", "2006-01-02"} {
		if t, err := time.Parse(layout, s); err == nil {
			return t, nil
		}
	}
	if d, err := time.ParseDuration(s); err == nil { // "24h": that long ago
		return time.Now().Add(-d), nil
	}
	return time.Time{}, usagef("%s %q: want RFC 3339 (2026-11-26T10:00:00Z), a date, or a duration ago (24h)", flag, s)
}

func newAuditExportCmd(a *app) *cobra.Command {
	var (
		o            audit.ExportOptions
		since, until string
		out          string
	)
	c := &cobra.Command{
		Use:   "export [--since T] [--until T] [--volume NAME] [--identity ID] [--format jsonl|cef] [--zstd] [-o FILE]",
		Short: "Stream audit records, filtered, as JSON Lines or CEF (for a SIEM)",
		Args:  args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			var err error
			if o.Since, err = parseTime("--since", since); err != nil {
				return err
			}
			if o.Until, err = parseTime("--until", until); err != nil {
				return err
			}
			if o.Format != "jsonl" && o.Format != "cef" {
				return usagef("--format %q: want jsonl or cef", o.Format)
			}
			o.Version = version
			srcs, err := audit.Sources(a.auditDir())
			if err != nil {
				return err
			}
			var w io.Writer = a.stdout
			var f *os.File
			if out != "" && out != "-" {
				if f, err = os.OpenFile(out, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600); err != nil {
					return err
				}
				w = f
			}
			n, err := audit.Export(srcs, w, o)
			if f != nil {
				if cerr := f.Close(); err == nil {
					err = cerr
				}
			}
			if err != nil {
				return err
			}
			if f != nil {
				fmt.Fprintf(a.stderr, "exported %d records to %s\n", n, out)
			}
			return nil
		},
	}
	fl := c.Flags()
	fl.StringVar(&since, "since", "", "only records at or after T (RFC 3339, a date, or a duration ago such as 24h)")
	fl.StringVar(&until, "until", "", "only records before T")
	fl.StringVar(&o.Volume, "volume", "", "only records about this volume")
	fl.StringVar(&o.Identity, "identity", "", "only records of this identity")
	fl.StringVar(&o.Format, "format", "jsonl", "jsonl (the records as written: an unfiltered export verifies) or cef")
	fl.BoolVar(&o.Zstd, "zstd", false, "compress the output with zstd")
	fl.StringVarP(&out, "output", "o", "", "write to FILE instead of stdout")
	return c
}

func newAuditVerifyCmd(a *app) *cobra.Command {
	var keyFile string
	c := &cobra.Command{
		Use:   "verify [FILE...]",
		Short: "Check the hash chain and signatures; name the first bad record (exit 1)",
		Long: `Checks the live log of the data dir, or the files given (an export,
segments), in order: every record canonical, seqs consecutive, each chained
to the one before, every checkpoint signed by the log's key. The first
problem is named with its file, line and seq, and how the log was changed:
modified, deleted, inserted, reordered, segment missing, truncated, forged
checkpoint. Exit status 1 when anything is wrong.`,
		RunE: func(cmd *cobra.Command, files []string) error {
			if keyFile == "" {
				keyFile = filepath.Join(a.auditDir(), audit.PubFile)
			}
			pub, err := audit.LoadPublicKey(keyFile)
			if err != nil {
				return fmt.Errorf("verifying key: %w (give --key signing.pub)", err)
			}
			o := audit.VerifyOptions{Key: pub}
			var srcs []audit.Source
			if len(files) == 0 {
				if srcs, o.Head, err = audit.Snapshot(a.auditDir()); err != nil {
					return err
				}
				o.FromStart = true
			}
			for _, f := range files {
				srcs = append(srcs, audit.Source{Path: f})
			}
			rep, err := audit.Verify(srcs, o)
			if err != nil {
				return err
			}
			if a.json {
				if err := a.printJSON(rep); err != nil {
					return err
				}
			}
			if rep.Problem != nil {
				return rep.Problem
			}
			if !a.json {
				fmt.Fprintf(a.stdout, "ok: %d records (seq %d to %d), %d signed checkpoints; %d records after the last checkpoint are chained but not yet signed\n",
					rep.Records, rep.FirstSeq, rep.LastSeq, rep.Checkpoints, rep.Unsigned)
			}
			return nil
		},
	}
	c.Flags().StringVar(&keyFile, "key", "", "the log's public key (default DATA_DIR/audit/signing.pub)")
	return c
}
