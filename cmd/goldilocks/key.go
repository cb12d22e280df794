package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"goldilocks/internal/control"
	"goldilocks/internal/volume"
)

func newKeyCmd(a *app) *cobra.Command {
	c := &cobra.Command{
		Use:   "key",
		Short: "Rotate key-encryption keys, rekey volumes, show key state",
		Long: `Key operations run online. When a gateway serves the data dir they run
inside it, through its control socket (DATA_DIR/control.sock), so attached
volumes keep serving; otherwise this command opens the volumes itself.`,
	}
	c.AddCommand(newKeyRotateCmd(a), newKeyRekeyCmd(a), newKeyStatusCmd(a))
	return c
}

// signalContext is cancelled by SIGINT or SIGTERM: a key operation stops
// at a consistent point and can be resumed.
func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

// inProcess is what an operation needs to run in this process: the registry,
// who runs it and a logger naming them.
type inProcess struct {
	reg *volume.Registry
	who string
	log *slog.Logger
}

// gatewayOrLocal returns the control client of a running gateway, or,
// when none runs, what the operation needs to run here.
func (a *app) gatewayOrLocal() (*control.Client, *inProcess, error) {
	if err := a.openAudit(); err != nil {
		return nil, nil, err
	}
	reg, err := a.openExisting()
	if err != nil {
		return nil, nil, err
	}
	c, err := control.Dial(reg.Dir())
	if err == nil {
		return c, nil, nil
	}
	if !errors.Is(err, control.ErrNoGateway) {
		return nil, nil, err
	}
	who := cliIdentity()
	return nil, &inProcess{reg: reg, who: who, log: a.logger().With("identity", who)}, nil // every event of this run names who ran it
}

// keys returns the control client of a running gateway, or the local
// key operations when none runs.
func (a *app) keys() (*control.Client, *volume.Keys, error) {
	c, l, err := a.gatewayOrLocal()
	if err != nil || c != nil {
		return c, nil, err
	}
	return nil, &volume.Keys{Reg: l.reg, Open: volume.LocalOpener{Reg: l.reg, Log: l.log}, Log: l.log, Record: a.alog.Append, Who: l.who}, nil
}

func newKeyRotateCmd(a *app) *cobra.Command {
	var o volume.RotateOptions
	c := &cobra.Command{
		Use:   "rotate (KEY... | --all)",
		Short: "New KEK version; every data key it wraps is rewrapped (no data rewritten)",
		Long: `Makes a new version of each KEY (a Transit key in Vault, or a local
keystore key) and rewraps under it the data key of every volume it wraps.
KEY is a key name as 'volume info' shows it, optionally provider-qualified
(local:default, vault:vms). Each volume's header update is atomic; after a
crash run it again, or with --rewrap-only to make no further version.`,
		RunE: func(cmd *cobra.Command, argv []string) error {
			o.Keys = argv
			if len(argv) == 0 && !o.All {
				return usagef("key rotate: name a key or give --all")
			}
			if len(argv) > 0 && o.All {
				return usagef("key rotate: --all and key names exclude each other")
			}
			remote, local, err := a.keys()
			if err != nil {
				return err
			}
			ctx, cancel := signalContext()
			defer cancel()
			p := newProgress(a, "rewrapping", 0)
			p.count = true
			o.Progress = func(done, total int) { p.total = int64(total); p.update(int64(done)) }
			var res volume.RotateResult
			if remote != nil {
				res, err = remote.Rotate(ctx, o)
			} else {
				res, err = local.Rotate(ctx, o)
			}
			if a.json {
				if perr := a.printJSON(res); err == nil {
					err = perr
				}
				return err
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 8, 2, ' ', 0)
			fmt.Fprintln(tw, "VOLUME\tKEY\tFROM\tTO\tERROR")
			for _, v := range res.Volumes {
				fmt.Fprintf(tw, "%s\t%s:%s\tv%d\tv%d\t%s\n", v.Volume, v.Provider, v.Key, v.From, v.To, v.Error)
			}
			tw.Flush()
			for _, k := range res.Keys {
				fmt.Fprintf(a.stderr, "key %s:%s is at version %d\n", k.Provider, k.Key, k.Version)
			}
			return err
		},
	}
	f := c.Flags()
	f.BoolVar(&o.All, "all", false, "every key that wraps a volume")
	f.BoolVar(&o.RewrapOnly, "rewrap-only", false, "make no new key version: rewrap what is not at the newest (finishes an interrupted rotation)")
	f.Uint32Var(&o.MinVersion, "min-version", 0, "fail unless every selected volume ends wrapped by this key version or newer")
	return c
}

func newKeyRekeyCmd(a *app) *cobra.Command {
	var rate string
	c := &cobra.Command{
		Use:   "rekey VOLUME",
		Short: "New data key; every chunk re-encrypted online; resumable",
		Long: `Gives VOLUME a new data key and re-encrypts every chunk under it while the
volume stays attached and in use; at the end the old data key is destroyed.
Progress is kept in the volume header: if this stops (Ctrl-C, a crash, a
kill), run it again to resume.`,
		Args: args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			var o volume.RekeyOptions
			if rate != "" {
				r, err := parseSize(rate)
				if err != nil || r <= 0 {
					return usagef("--rate %q: want a size per second such as 100MiB", rate)
				}
				o.Rate = r
			}
			remote, local, err := a.keys()
			if err != nil {
				return err
			}
			ctx, cancel := signalContext()
			defer cancel()
			p := newProgress(a, "rekey "+argv[0], 0)
			o.Progress = func(done, total uint64) { p.total = int64(total) * 4096; p.update(int64(done) * 4096) }
			if remote != nil {
				err = remote.Rekey(ctx, argv[0], o)
			} else {
				err = local.Rekey(ctx, argv[0], o)
			}
			if errors.Is(err, context.Canceled) || ctx.Err() != nil && err != nil {
				return fmt.Errorf("volume %s: rekey stopped; run goldilocks key rekey %s to resume", argv[0], argv[0])
			}
			if err != nil {
				return err
			}
			if a.json {
				return a.printJSON(map[string]any{"volume": argv[0], "rekeyed": true})
			}
			fmt.Fprintf(a.stderr, "volume %s: rekeyed; the old data key is destroyed\n", argv[0])
			return nil
		},
	}
	c.Flags().StringVar(&rate, "rate", "", "cap re-encryption at this many bytes per second (e.g. 100MiB), to leave I/O to the VM")
	return c
}

func newKeyStatusCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "status [VOLUME...]",
		Short: "Key state of encrypted volumes: KEK and version, rekey progress, nonce budget",
		RunE: func(cmd *cobra.Command, argv []string) error {
			reg, err := a.openExisting()
			if err != nil {
				return err
			}
			st, err := (&volume.Keys{Reg: reg}).Status(argv...)
			if err != nil {
				return err
			}
			if a.json {
				return a.printJSON(st)
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 8, 2, ' ', 0)
			fmt.Fprintln(tw, "VOLUME\tKEY\tVERSION\tREKEY\tSEAL EPOCH\tSEALS")
			for _, s := range st {
				rk := "-"
				if s.Rekeying {
					rk = fmt.Sprintf("interrupted at %d%% (resume: goldilocks key rekey %s)", s.RekeyCursor*100/max(s.Chunks, 1), s.Volume)
				}
				fmt.Fprintf(tw, "%s\t%s:%s\tv%d\t%s\t%d\t≤ %d\n", s.Volume, s.Provider, s.Key, s.Version, rk, s.SealEpoch, s.Seals)
			}
			return tw.Flush()
		},
	}
}
