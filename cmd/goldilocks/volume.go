package main

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"goldilocks/audit"
	"goldilocks/crypto"
	"goldilocks/internal/units"
	"goldilocks/internal/volume"
)

func newVolumeCmd(a *app) *cobra.Command {
	c := &cobra.Command{Use: "volume", Short: "Create, list, inspect, resize, label and delete volumes"}
	c.AddCommand(newVolumeCreateCmd(a), newVolumeListCmd(a), newVolumeInfoCmd(a),
		newVolumeImportCmd(a), newVolumeExportCmd(a), newVolumeShredCmd(a))
	c.AddCommand(newVolumeUpgradeCmd(a), newVolumeDeleteCmd(a), newVolumeResizeCmd(a), newVolumeLabelCmd(a))
	c.AddCommand(newVolumeAdoptCmd(a), newVolumeReleaseCmd(a), newVolumeBreakLeaseCmd(a), newVolumeSnapshotCmd(a))
	c.AddCommand(newVolumeBackupCmd(a), newVolumeRestoreCmd(a), newVolumeCloneCmd(a))
	return c
}

// volumeJSON is what `volume info --json` and `volume list --json` print.
type volumeJSON struct {
	Name      string            `json:"name"`
	UUID      string            `json:"uuid"`
	Size      int64             `json:"size"`
	Encrypted bool              `json:"encrypted"`
	Backing   string            `json:"backing"`
	ReadOnly  bool              `json:"read_only"`
	Labels    map[string]string `json:"labels,omitempty"`
	Created   string            `json:"created"`
	KEK       *volume.KEKRef    `json:"kek"`
	// Encrypted volumes, read from the volume header (never key material).
	Cipher string `json:"cipher,omitempty"`
	// WriteCounter is an upper bound on the chunks sealed with the
	// volume's keys (seal epochs before the current count 2^31 each).
	WriteCounter  *uint64 `json:"write_counter,omitempty"`
	FormatVersion int     `json:"format_version,omitempty"`
	HeaderError   string  `json:"header_error,omitempty"`
	// Warnings (volume info): e.g. the key unsealed beside the data.
	Warnings []string `json:"warnings,omitempty"`
	// Snapshots (volume info), oldest first, with the space each holds.
	Snapshots []volume.SnapshotStatus `json:"snapshots,omitempty"`
	// Base: a clone's snapshot.
	Base *volume.BaseRef `json:"base,omitempty"`
}

func toJSON(reg *volume.Registry, v volume.Volume) volumeJSON {
	j := volumeJSON{
		Name: v.Name, UUID: v.UUID, Size: v.Size, Encrypted: v.Encrypted,
		Backing: reg.BackingPath(v), ReadOnly: v.ReadOnly, Labels: v.Labels,
		Created: v.Created.Format("2006-01-02T15:04:05.000Z07:00"), KEK: v.KEK,
	}
	if v.Encrypted {
		j.FormatVersion, _ = reg.Format(v)
		h, err := reg.Header(v)
		if errors.Is(err, crypto.ErrNeedsUpgrade) {
			j.HeaderError = fmt.Sprintf("format 1, which this build does not attach: run goldilocks volume upgrade %s", v.Name)
			return j
		}
		if err != nil {
			j.HeaderError = err.Error()
			return j
		}
		j.Cipher = cipherName(h.Suite)
		n := h.Seals()
		j.WriteCounter = &n
		j.KEK = &volume.KEKRef{Provider: h.KEK.Provider, Key: h.KEK.Name, Version: int(h.KEK.Version)}
	}
	return j
}

func cipherName(s byte) string {
	switch s {
	case crypto.AES256GCM:
		return "aes-256-gcm"
	case crypto.ChaCha20Poly1305:
		return "chacha20-poly1305"
	}
	return fmt.Sprintf("unknown-%#x", s)
}

func newVolumeCreateCmd(a *app) *cobra.Command {
	var (
		sizeStr, kek, backing, cipher string
		cephConf, cephID              string
		plain, readOnly, yes          bool
		labels                        map[string]string
	)
	c := &cobra.Command{
		Use:   "create NAME --size SIZE [--plain] [--backing PATH|nbd://HOST:PORT/EXPORT|nbd+unix:///EXPORT?socket=PATH|rbd:POOL/IMAGE]",
		Short: "Create a volume (its NBD export name is NAME)",
		Args:  args(cobra.ExactArgs(1)),
		RunE: audited(a, audit.EvVolumeCreate, func(cmd *cobra.Command, argv []string) error {
			rbdBacking, err := withCeph("volume create", backing, cephConf, cephID)
			if err != nil {
				return err
			}
			var size int64
			if sizeStr != "" {
				s, err := parseSize(sizeStr)
				if err != nil {
					return usageError{err}
				}
				size = s
			} else if backing == "" {
				return usagef("volume create: --size is required unless --backing names an existing store")
			}
			if kek != "" && plain {
				return usagef("volume create: --kek and --plain exclude each other")
			}
			var suite byte
			switch cipher {
			case "aes-256-gcm":
				suite = crypto.AES256GCM
			case "chacha20-poly1305":
				suite = crypto.ChaCha20Poly1305
			default:
				return usagef("volume create: --cipher %q: want aes-256-gcm or chacha20-poly1305", cipher)
			}
			reg, err := a.openRegistry()
			if err != nil {
				return err
			}
			o := volume.CreateOptions{
				Name: argv[0], Size: size, Backing: rbdBacking, Encrypted: !plain, ReadOnly: readOnly, Labels: labels,
				KEK: kek, Suite: suite, Overwrite: yes,
			}
			v, err := reg.Create(o)
			if errors.Is(err, volume.ErrHoldsVolume) && isTerminal(a.stdin) {
				// The store holds a volume: creating over it destroys that
				// volume, so ask, as shred and delete do.
				fmt.Fprintf(a.stderr, "%v\n", err)
				if err := confirm(a, "volume create", o.Name,
					fmt.Sprintf("Create volume %s over it? That volume's data is lost for good. Type %s to confirm: ", o.Name, o.Name)); err != nil {
					return err
				}
				o.Overwrite = true
				v, err = reg.Create(o)
			}
			if errors.Is(err, volume.ErrHoldsVolume) {
				return fmt.Errorf("%w, or pass --yes to destroy it and create a new volume there", err)
			}
			if err != nil {
				return err
			}
			warnKeystore(reg, a.logger(), []volume.Volume{v})
			if a.json {
				return a.printJSON(toJSON(reg, v))
			}
			fmt.Fprintf(a.stdout, "created volume %s: %s, %s, backing %s\n", v.Name, units.Format(v.Size), kind(v), reg.BackingPath(v))
			return nil
		}),
	}
	f := c.Flags()
	f.StringVar(&sizeStr, "size", "", "logical size (bytes, or with K, M, G, T suffix); a multiple of 4 KiB")
	f.BoolVar(&plain, "plain", false, "store the guest's bytes unencrypted")
	f.StringVar(&kek, "kek", "", "key-encryption key: local (default) or vault:KEYNAME")
	f.StringVar(&cipher, "cipher", "aes-256-gcm", "aes-256-gcm or chacha20-poly1305")
	f.StringVar(&backing, "backing", "", "existing file, block device, upstream NBD export (nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH) or Ceph RBD image (rbd:POOL/IMAGE) to hold the volume (default: a sparse file in the data dir)")
	cephFlags(f, &cephConf, &cephID)
	f.BoolVar(&readOnly, "read-only", false, "serve the volume read-only")
	f.StringToStringVar(&labels, "label", nil, "a KEY=VALUE tag the access policy can match (repeatable)")
	f.BoolVar(&yes, "yes", false, "create even over a volume the backing store already holds, destroying it (asked on a terminal)")
	return c
}

// labelList writes labels as k=v,k2=v2 in key order (none: empty).
func labelList(labels map[string]string, none string) string {
	if len(labels) == 0 {
		return none
	}
	keys := make([]string, 0, len(labels))
	for k := range labels {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for i, k := range keys {
		keys[i] = k + "=" + labels[k]
	}
	return strings.Join(keys, ",")
}

func kind(v volume.Volume) string {
	if v.Encrypted {
		return "encrypted"
	}
	return "plain"
}

func newVolumeListCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List volumes",
		Args:  args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			reg, err := a.openExisting()
			if err != nil {
				return err
			}
			vols, err := reg.List()
			if err != nil {
				return err
			}
			if a.json {
				out := make([]volumeJSON, 0, len(vols))
				for _, v := range vols {
					out = append(out, toJSON(reg, v))
				}
				return a.printJSON(out)
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 8, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tSIZE\tKIND\tACCESS\tLABELS\tBACKING")
			for _, v := range vols {
				access := "read-write"
				if v.ReadOnly {
					access = "read-only"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", v.Name, units.Format(v.Size), kind(v), access, labelList(v.Labels, "-"), reg.BackingPath(v))
			}
			return tw.Flush()
		},
	}
}

func newVolumeInfoCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "info NAME",
		Short: "Show a volume (never key material)",
		Args:  args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			reg, v, err := a.targetVolume(argv[0])
			if err != nil {
				return err
			}
			j := toJSON(reg, v)
			j.Warnings = volumeWarnings(reg, v)
			j.Base = v.Base
			if j.Snapshots, err = (&volume.Snapshots{Reg: reg}).List(v.Name); err != nil {
				return err
			}
			if a.json {
				return a.printJSON(j)
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 8, 2, ' ', 0)
			fmt.Fprintf(tw, "name:\t%s\nuuid:\t%s\nsize:\t%s (%d bytes)\nencrypted:\t%v\nbacking:\t%s\nread-only:\t%v\nlabels:\t%s\ncreated:\t%s\n",
				j.Name, j.UUID, units.Format(j.Size), j.Size, j.Encrypted, j.Backing, j.ReadOnly, labelList(j.Labels, "none"), j.Created)
			if j.KEK != nil {
				fmt.Fprintf(tw, "kek:\t%s:%s version %d\n", j.KEK.Provider, j.KEK.Key, j.KEK.Version)
			}
			if j.FormatVersion != 0 {
				fmt.Fprintf(tw, "format:\t%d\n", j.FormatVersion)
			}
			if j.Cipher != "" {
				fmt.Fprintf(tw, "cipher:\t%s\n", j.Cipher)
			}
			if j.WriteCounter != nil {
				fmt.Fprintf(tw, "write counter:\t≤ %d chunks sealed (no limit: a new subkey every 2^31)\n", *j.WriteCounter)
			}
			if j.HeaderError != "" {
				fmt.Fprintf(tw, "header:\t%s\n", j.HeaderError)
			}
			if j.Base != nil {
				fmt.Fprintf(tw, "clone of:\t%s@%s\n", j.Base.Volume, j.Base.Snapshot)
			}
			for _, s := range j.Snapshots {
				fmt.Fprintf(tw, "snapshot:\t%s@%s, %s, holds %s\n", v.Name, s.Name, s.Created.Format(time.RFC3339), units.Format(s.Bytes))
			}
			for _, w := range j.Warnings {
				fmt.Fprintf(tw, "warning:\t%s\n", w)
			}
			return tw.Flush()
		},
	}
}
