package main

import (
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"goldilocks/audit"
	"goldilocks/internal/control"
	"goldilocks/internal/units"
	"goldilocks/internal/volume"
)

func newVolumeSnapshotCmd(a *app) *cobra.Command {
	c := &cobra.Command{
		Use:   "snapshot",
		Short: "Create, list and delete point-in-time snapshots of encrypted volumes",
		Long: `A snapshot NAME@SNAP is the volume as it was at a flush point: every write
acknowledged before 'snapshot create' is in it, none acknowledged after.
It is served read-only as export NAME@SNAP. Snapshots run online: when a
gateway serves the data dir they run inside it, through its control socket,
so the volume keeps serving. See crypto/SNAPSHOTS.md.`,
	}
	c.AddCommand(newSnapshotCreateCmd(a), newSnapshotListCmd(a), newSnapshotDeleteCmd(a))
	return c
}

func newVolumeBackupCmd(a *app) *cobra.Command {
	var to, since string
	c := &cobra.Command{
		Use:   "backup NAME@SNAP [--since OLDSNAP] --to FILE|-",
		Short: "Write a snapshot as an encrypted backup stream: full, or what changed since OLDSNAP",
		Long: `Writes snapshot NAME@SNAP as a backup stream (crypto/BACKUP.md): encrypted
and authenticated under a fresh key wrapped by the volume's KEK, so it is as
safe at rest as the volume. With --since, only the chunks written between
OLDSNAP and SNAP (an incremental). 'volume restore' reads a chain of them.`,
		Args: args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			vol, snap, err := volume.ParseSnapshot(argv[0])
			if err != nil {
				return usagef("volume backup: %v", err)
			}
			if to == "" {
				return usagef("volume backup: --to FILE or --to - is required")
			}
			remote, local, err := a.snapshots()
			if err != nil {
				return err
			}
			out, regular, err := openExportTarget(a, to)
			if err != nil {
				return err
			}
			ctx, cancel := signalContext()
			defer cancel()
			pr := newProgress(a, "backup "+argv[0], 0)
			if remote != nil {
				pr.total = 1 << 62 // the gateway streams; bytes received are shown
				err = remote.Backup(ctx, vol, snap, since, out.w, func(n int64) { pr.update(n) })
			} else {
				var res volume.BackupResult
				res, err = local.Backup(ctx, vol, snap, volume.BackupOptions{Since: since,
					Progress: func(done, total int64) { pr.total = total; pr.update(done) }}, out.w)
				switch {
				case err != nil:
				case a.json && to != "-":
					err = a.printJSON(res)
				default:
					fmt.Fprintf(a.stderr, "%s backup of %s: read %s, wrote %s in %.1f s\n", res.Kind, argv[0],
						units.Format(res.Read), units.Format(res.Written), res.Duration.Seconds())
				}
			}
			if cerr := out.Close(); err == nil {
				err = cerr
			}
			if err != nil && regular {
				os.Remove(to) // no partial stream left to be taken for a backup
			}
			return err
		},
	}
	c.Flags().StringVar(&to, "to", "", "the stream's file, or - for standard output")
	c.Flags().StringVar(&since, "since", "", "an older snapshot of the volume: write only what changed since it")
	return c
}

func newVolumeCloneCmd(a *app) *cobra.Command {
	var labels map[string]string
	c := &cobra.Command{
		Use:   "clone NAME@SNAP NEW",
		Short: "Create a writable volume from a snapshot, at once: it shares what it has not written",
		Long: `Creates encrypted volume NEW, a clone of snapshot NAME@SNAP: it reads as the
snapshot until written, and what it writes goes to its own store, under its
own data key. Nothing is copied. While NEW exists the snapshot cannot be
deleted, and attaching NEW opens NAME as well.`,
		Args: args(cobra.ExactArgs(2)),
		RunE: audited(a, audit.EvVolumeClone, func(cmd *cobra.Command, argv []string) error {
			vol, snap, err := volume.ParseSnapshot(argv[0])
			if err != nil {
				return usagef("volume clone: %v", err)
			}
			reg, err := a.openExisting()
			if err != nil {
				return err
			}
			v, err := (&volume.Snapshots{Reg: reg}).Clone(vol, snap, argv[1], labels)
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "created volume %s: a clone of %s@%s, %s\n", v.Name, vol, snap, units.Format(v.Size))
			return nil
		}),
	}
	c.Flags().StringToStringVar(&labels, "label", nil, "a KEY=VALUE tag of the new volume (repeatable)")
	return c
}

func newVolumeRestoreCmd(a *app) *cobra.Command {
	var from []string
	var labels map[string]string
	c := &cobra.Command{
		Use:   "restore NEW --from FULL [--from INCR]...",
		Short: "Create a volume from a full backup and the incrementals after it, verified",
		Long: `Creates encrypted volume NEW (a new UUID and data key) from a chain of backup
streams: a full one, then incrementals, each starting where the one before
ends. Every stream is authenticated as it is read; a changed, truncated or
misordered stream fails the restore, and NEW is removed.`,
		Args: args(cobra.ExactArgs(1)),
		RunE: audited(a, audit.EvVolumeRestore, func(cmd *cobra.Command, argv []string) error {
			if len(from) == 0 {
				return usagef("volume restore: --from FULL is required")
			}
			reg, err := a.openExisting()
			if err != nil {
				return err
			}
			ctx, cancel := signalContext()
			defer cancel()
			who := cliIdentity()
			log := a.logger().With("identity", who)
			s := &volume.Snapshots{Reg: reg, Log: log, Who: who}
			pr := newProgress(a, "restore "+argv[0], 0)
			start := time.Now()
			v, err := s.Restore(ctx, argv[0], from, volume.RestoreOptions{Labels: labels,
				Progress: func(done, total int64) { pr.total = total; pr.update(done) }})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stderr, "restored volume %s (%s) from %d backup(s) in %.1f s\n", v.Name, units.Format(v.Size), len(from), time.Since(start).Seconds())
			return nil
		}),
	}
	c.Flags().StringArrayVar(&from, "from", nil, "a backup stream: the full one first, then each incremental in order")
	c.Flags().StringToStringVar(&labels, "label", nil, "a KEY=VALUE tag of the new volume (repeatable)")
	return c
}

// snapshots returns the control client of a running gateway, or the local
// snapshot operations when none runs.
func (a *app) snapshots() (*control.Client, *volume.Snapshots, error) {
	c, l, err := a.gatewayOrLocal()
	if err != nil || c != nil {
		return c, nil, err
	}
	return nil, &volume.Snapshots{Reg: l.reg, Open: volume.LocalOpener{Reg: l.reg, Log: l.log}, Log: l.log, Record: a.alog.Append, Who: l.who}, nil
}

func newSnapshotCreateCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "create NAME@SNAP",
		Short: "Take a snapshot of a volume, online",
		Args:  args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			vol, snap, err := volume.ParseSnapshot(argv[0])
			if err != nil {
				return usagef("snapshot create: %v", err)
			}
			remote, local, err := a.snapshots()
			if err != nil {
				return err
			}
			ctx, cancel := signalContext()
			defer cancel()
			var res volume.CreateResult
			if remote != nil {
				res, err = remote.CreateSnapshot(ctx, vol, snap)
			} else {
				res, err = local.Create(ctx, vol, snap)
			}
			if err != nil {
				return err
			}
			if a.json {
				return a.printJSON(res)
			}
			fmt.Fprintf(a.stdout, "%s@%s\n", vol, snap)
			fmt.Fprintf(a.stderr, "snapshot %s@%s taken at commit %d; writes waited %.1f ms\n", vol, snap, res.Snapshot.Seq, float64(res.Pause.Microseconds())/1000)
			return nil
		},
	}
}

func newSnapshotDeleteCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "delete NAME@SNAP",
		Short: "Delete a snapshot and free the space only it holds",
		Args:  args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			vol, snap, err := volume.ParseSnapshot(argv[0])
			if err != nil {
				return usagef("snapshot delete: %v", err)
			}
			remote, local, err := a.snapshots()
			if err != nil {
				return err
			}
			ctx, cancel := signalContext()
			defer cancel()
			if remote != nil {
				return remote.DeleteSnapshot(ctx, vol, snap)
			}
			return local.Delete(ctx, vol, snap)
		},
	}
}

func newSnapshotListCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "list [NAME...]",
		Short: "List snapshots, oldest first, with the space each holds",
		RunE: func(cmd *cobra.Command, argv []string) error {
			reg, err := a.openExisting()
			if err != nil {
				return err
			}
			st, err := (&volume.Snapshots{Reg: reg}).List(argv...)
			if err != nil {
				return err
			}
			if a.json {
				return a.printJSON(st)
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 8, 2, ' ', 0)
			fmt.Fprintln(tw, "SNAPSHOT\tCREATED\tCOMMIT\tHOLDS")
			for _, s := range st {
				fmt.Fprintf(tw, "%s@%s\t%s\t%d\t%s\n", s.Volume, s.Name, s.Created.Format(time.RFC3339), s.Seq, units.Format(s.Bytes))
			}
			return tw.Flush()
		},
	}
}
