package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"goldilocks/audit"
	"goldilocks/crypto"
	"goldilocks/internal/control"
	"goldilocks/internal/rbd"
	"goldilocks/internal/units"
	"goldilocks/internal/volume"
)

// volume adopt, release and break-lease: one volume on shared storage
// (Ceph RBD, an upstream NBD export) moving between gateways.

// withCeph folds --ceph-conf and --ceph-id into an rbd: backing.
func withCeph(cmd, backing, conf, id string) (string, error) {
	if !rbd.IsSpec(backing) {
		if conf != "" || id != "" {
			return "", usagef("%s: --ceph-conf and --ceph-id go with --backing rbd:POOL/IMAGE", cmd)
		}
		return backing, nil
	}
	spec, err := rbd.Parse(backing)
	if err != nil {
		return "", usageError{err}
	}
	if conf != "" {
		spec.Conf = conf
	}
	if id != "" {
		spec.ID = id
	}
	if !rbd.Supported {
		return "", rbd.ErrNoCeph
	}
	return spec.String(), nil
}

func cephFlags(f *pflag.FlagSet, conf, id *string) {
	f.StringVar(conf, "ceph-conf", "", "with --backing rbd:…: the cluster's ceph.conf (default CEPH_CONF, else /etc/ceph/ceph.conf)")
	f.StringVar(id, "ceph-id", "", "with --backing rbd:…: the Ceph client id (default admin), whose keyring the conf names")
}

func newVolumeAdoptCmd(a *app) *cobra.Command {
	var (
		backing, cephConf, cephID string
		plain, readOnly           bool
		labels                    map[string]string
	)
	c := &cobra.Command{
		Use:   "adopt NAME --backing rbd:POOL/IMAGE|nbd://…|PATH [--plain]",
		Short: "Take a volume another gateway made (shared storage) into this data dir",
		Long: `Adds to this gateway's registry a volume whose backing store another
gateway created, or one that was released (volume release): a volume on
shared storage moving between hosts. An encrypted volume's header gives
its UUID, size and key; the key must unwrap here, so volumes that move keep
their keys in Vault (the local keystore stays on its host). A store with
no Goldilocks header is adopted only with --plain (on RBD, the image's
metadata gives its UUID and size). Nothing is written to the store.

Adopting does not take the volume: the first attach does. On RBD the
gateway that has a volume open holds the image's exclusive lock (its
lease), so a second gateway cannot attach it until the first releases it
(volume release there) or its lease is broken (volume break-lease here).`,
		Args: args(cobra.ExactArgs(1)),
		RunE: audited(a, audit.EvVolumeAdopt, func(cmd *cobra.Command, argv []string) error {
			if backing == "" {
				return usagef("volume adopt: --backing is required")
			}
			b, err := withCeph("volume adopt", backing, cephConf, cephID)
			if err != nil {
				return err
			}
			reg, err := a.openRegistry()
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), time.Minute)
			defer cancel()
			v, err := reg.Adopt(ctx, volume.AdoptOptions{Name: argv[0], Backing: b, Plain: plain, ReadOnly: readOnly, Labels: labels})
			if err != nil {
				return err
			}
			a.auditDetails = map[string]any{"backing": v.Backing, "uuid": v.UUID, "encrypted": v.Encrypted}
			if a.json {
				return a.printJSON(toJSON(reg, v))
			}
			fmt.Fprintf(a.stdout, "adopted volume %s: %s, %s, backing %s, uuid %s\n", v.Name, units.Format(v.Size), kind(v), reg.BackingPath(v), v.UUID)
			return nil
		}),
	}
	f := c.Flags()
	f.StringVar(&backing, "backing", "", "the volume's store: rbd:POOL/IMAGE, nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH, or a path")
	cephFlags(f, &cephConf, &cephID)
	f.BoolVar(&plain, "plain", false, "adopt a store without a Goldilocks header as a plain volume")
	f.BoolVar(&readOnly, "read-only", false, "serve the volume read-only")
	f.StringToStringVar(&labels, "label", nil, "a KEY=VALUE tag the access policy can match (repeatable)")
	return c
}

func newVolumeReleaseCmd(a *app) *cobra.Command {
	var timeout time.Duration
	c := &cobra.Command{
		Use:   "release NAME",
		Short: "Hand a volume over: end its sessions here and remove it from this data dir",
		Long: `Removes a volume from this gateway's registry, so that no client can attach
it here again, and, if a gateway serves this data dir, ends every session
attached to it there as a stop does: no new request is read, those in
flight are answered, the volume is flushed and closed, and its lease (RBD;
an encrypted upstream volume with its key in Vault) is released. Then another gateway can attach it (volume adopt there). The
backing store and the key stay; volume adopt here takes it back.`,
		Args: args(cobra.ExactArgs(1)),
		RunE: audited(a, audit.EvVolumeRelease, func(cmd *cobra.Command, argv []string) error {
			reg, v, err := a.targetVolume(argv[0])
			if err != nil {
				return err
			}
			if err := reg.Remove(v.Name); err != nil {
				return err
			}
			sessions := 0
			cl, err := control.Dial(reg.Dir())
			switch {
			case errors.Is(err, control.ErrNoGateway): // nothing holds it open
			case err != nil:
				return err
			default:
				ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
				defer cancel()
				res, err := cl.Release(ctx, v.Name)
				if err != nil {
					return fmt.Errorf("volume %s: left the registry, but the gateway did not end its sessions: %w (it still holds the volume; try again, or stop the gateway)", v.Name, err)
				}
				sessions = res.Sessions
			}
			a.auditDetails = map[string]any{"sessions_ended": sessions, "backing": v.Backing, "uuid": v.UUID}
			if a.json {
				return a.printJSON(map[string]any{"volume": v.Name, "released": true, "sessions_ended": sessions, "backing": v.Backing, "uuid": v.UUID})
			}
			fmt.Fprintf(a.stdout, "released volume %s (%d session(s) ended); another gateway can adopt it: goldilocks volume adopt %s --backing %s\n", v.Name, sessions, v.Name, v.Backing)
			return nil
		}),
	}
	c.Flags().DurationVar(&timeout, "timeout", time.Minute, "how long the sessions have to end")
	return c
}

func newVolumeBreakLeaseCmd(a *app) *cobra.Command {
	var yes bool
	c := &cobra.Command{
		Use:   "break-lease NAME [--yes]",
		Short: "Break the lease a dead gateway holds on a volume (RBD: it is blocklisted)",
		Long: `Breaks the lease another gateway holds on a volume, so that this one can
attach it. For a gateway that died or whose host is lost; a live one
hands a volume over with volume release. On a terminal it asks you to
type the volume's name; without one it refuses unless --yes is given.

On an RBD image, the holder's Ceph client is blocklisted (it can never
write the image again, even if it still runs: its clients get I/O errors)
and its exclusive lock is removed. Without a break, librbd takes over a
dead holder's lock once the cluster has noticed it is gone (its watch
times out: osd_client_watch_timeout, 30 s by default).

An encrypted volume on an upstream export (nbd://…) with its key in Vault
is leased in Vault (crypto/FORMAT.md, "Lease in Vault"): the break marks
the lease broken; a holder that still runs fails its next renewal (within
a third of its --lease-ttl) and fences itself (its clients get I/O
errors), and an attach here takes the lease over once the broken record
has stood for the holder's TTL and a quarter. Without a break, a dead
holder's lease is taken over after the same wait from its last renewal.`,
		Args: args(cobra.ExactArgs(1)),
		RunE: audited(a, audit.EvLeaseBroken, func(cmd *cobra.Command, argv []string) error {
			reg, v, err := a.targetVolume(argv[0])
			if err != nil {
				return err
			}
			if !yes {
				if err := confirm(a, "volume break-lease", v.Name,
					fmt.Sprintf("Break the lease on volume %s? Its holder is fenced off the storage for good. Type the volume name to confirm: ", v.Name)); err != nil {
					return err
				}
			}
			who, err := reg.BreakLease(v)
			a.auditDetails = map[string]any{"holder": who, "backing": v.Backing}
			if errors.Is(err, crypto.ErrAlreadyBroken) {
				// Not written again: the takeover under way keeps its time.
				a.auditDetails["already_broken"] = err.Error()
				if a.json {
					return a.printJSON(map[string]any{"volume": v.Name, "broken": false, "already_broken": err.Error()})
				}
				fmt.Fprintf(a.stdout, "%v; left as it stands: an attach takes the lease over once that record has stood for its holder's TTL and a quarter\n", err)
				return nil
			}
			if err != nil {
				return err
			}
			if a.json {
				return a.printJSON(map[string]any{"volume": v.Name, "broken": who != "", "holder": who})
			}
			if who == "" {
				fmt.Fprintf(a.stdout, "volume %s: nobody held its lease\n", v.Name)
				return nil
			}
			if !rbd.IsSpec(v.Backing) {
				fmt.Fprintf(a.stdout, "volume %s: broke the lease (%s); that holder fences itself at its next renewal\n", v.Name, who)
				return nil
			}
			fmt.Fprintf(a.stdout, "volume %s: broke the lease (%s); that holder is blocklisted\n", v.Name, who)
			return nil
		}),
	}
	c.Flags().BoolVar(&yes, "yes", false, "do not ask for confirmation (needed without a terminal)")
	return c
}
