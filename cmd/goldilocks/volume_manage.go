package main

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"goldilocks/audit"
	"goldilocks/internal/units"
	"goldilocks/internal/volume"
)

// volume delete, resize and label: registry changes an operator makes
// on a volume that no client has attached.

// targetVolume opens this data dir's registry (which must exist) and the
// named volume: the start of every command that acts on one volume.
func (a *app) targetVolume(name string) (*volume.Registry, volume.Volume, error) {
	reg, err := a.openExisting()
	if err != nil {
		return nil, volume.Volume{}, err
	}
	v, err := reg.Get(name)
	if err != nil {
		return nil, volume.Volume{}, err
	}
	return reg, v, nil
}

func newVolumeDeleteCmd(a *app) *cobra.Command {
	var yes, shred bool
	c := &cobra.Command{
		Use:   "delete NAME [--yes] [--shred]",
		Short: "Remove a volume (an encrypted one is shredded: its key is destroyed)",
		Long: `Removes a volume from the data dir. An encrypted volume is shredded as by
volume shred: its data key is destroyed, then its header copies and its
backing file in the data dir. A plain volume leaves the registry and its
backing store stays as it is, unless --shred: then the backing store is
overwritten with zeros and synced, and removed if it lives in the data dir.
On a terminal it asks you to type the volume's name; without one it
refuses unless --yes is given. The volume must not be attached.`,
		Args: args(cobra.ExactArgs(1)),
		RunE: audited(a, audit.EvVolumeDelete, func(cmd *cobra.Command, argv []string) error {
			reg, v, err := a.targetVolume(argv[0])
			if err != nil {
				return err
			}
			what := "Its backing store stays (" + reg.BackingPath(v) + ")."
			switch {
			case v.Encrypted:
				what = "Its data key is destroyed: its data becomes unreadable for good."
			case shred:
				what = "Its backing store is overwritten with zeros (" + reg.BackingPath(v) + ")."
			}
			if !yes {
				if err := confirm(a, "volume delete", v.Name,
					fmt.Sprintf("Delete volume %s? %s Type the volume name to confirm: ", v.Name, what)); err != nil {
					return err
				}
			}
			pr := newProgress(a, "zeroing "+v.Name, v.Size)
			if err := reg.Delete(v.Name, shred, func(done, _ int64) { pr.update(done) }); err != nil {
				return err
			}
			if a.json {
				return a.printJSON(map[string]any{"volume": v.Name, "deleted": true, "key_destroyed": v.Encrypted, "backing_overwritten": !v.Encrypted && shred})
			}
			fmt.Fprintf(a.stdout, "deleted volume %s: %s\n", v.Name, strings.TrimSuffix(strings.ToLower(what[:1])+what[1:], "."))
			return nil
		}),
	}
	c.Flags().BoolVar(&yes, "yes", false, "do not ask for confirmation (needed without a terminal)")
	c.Flags().BoolVar(&shred, "shred", false, "plain volume: overwrite its backing store with zeros (and remove it if it is in the data dir)")
	return c
}

func newVolumeResizeCmd(a *app) *cobra.Command {
	var sizeStr string
	var allowShrink bool
	c := &cobra.Command{
		Use:   "resize NAME --size SIZE [--allow-shrink]",
		Short: "Grow (or, with --allow-shrink, shrink) a plain volume",
		Long: `Sets a plain volume's size (qemu-img's conventions: 20G, 1.5T). A backing
file grows sparse; a block device must hold the new size. Shrinking cuts
the data past the new end and needs --allow-shrink. The volume must not be
attached. An encrypted volume's size is part of its layout (the second
home of every chunk sits after all first homes): resize refuses it; export,
create a larger volume and import.`,
		Args: args(cobra.ExactArgs(1)),
		RunE: audited(a, audit.EvVolumeResize, func(cmd *cobra.Command, argv []string) error {
			if sizeStr == "" {
				return usagef("volume resize: --size is required")
			}
			size, err := parseSize(sizeStr)
			if err != nil {
				return usageError{err}
			}
			reg, err := a.openExisting()
			if err != nil {
				return err
			}
			old, err := reg.Get(argv[0])
			if err != nil {
				return err
			}
			v, err := reg.Resize(argv[0], size, allowShrink)
			if err != nil {
				return err
			}
			if a.json {
				return a.printJSON(toJSON(reg, v))
			}
			fmt.Fprintf(a.stdout, "resized volume %s: %s to %s\n", v.Name, units.Format(old.Size), units.Format(v.Size))
			return nil
		}),
	}
	c.Flags().StringVar(&sizeStr, "size", "", "new size (bytes, or K, M, G, T, P, E: binary; 1.5G allowed); a multiple of 4 KiB")
	c.Flags().BoolVar(&allowShrink, "allow-shrink", false, "allow a smaller size (the data past it is lost)")
	return c
}

func newVolumeLabelCmd(a *app) *cobra.Command {
	c := &cobra.Command{Use: "label", Short: "Set or remove a volume's labels (matched by the access policy)"}
	set := &cobra.Command{
		Use:   "set NAME KEY=VALUE...",
		Short: "Set labels",
		Args:  args(cobra.MinimumNArgs(2)),
		RunE: audited(a, audit.EvVolumeLabel, func(cmd *cobra.Command, argv []string) error {
			labels := map[string]string{}
			for _, kv := range argv[1:] {
				k, val, ok := strings.Cut(kv, "=")
				if !ok || k == "" {
					return usagef("volume label set: %q: want KEY=VALUE", kv)
				}
				labels[k] = val
			}
			return setLabels(a, argv[0], labels, nil)
		}),
	}
	rm := &cobra.Command{
		Use:   "rm NAME KEY...",
		Short: "Remove labels",
		Args:  args(cobra.MinimumNArgs(2)),
		RunE: audited(a, audit.EvVolumeLabel, func(cmd *cobra.Command, argv []string) error {
			for _, k := range argv[1:] {
				if k == "" || strings.Contains(k, "=") {
					return usagef("volume label rm: %q: want a label's KEY", k)
				}
			}
			return setLabels(a, argv[0], nil, argv[1:])
		}),
	}
	c.AddCommand(set, rm)
	return c
}

func setLabels(a *app, name string, set map[string]string, rm []string) error {
	reg, err := a.openExisting()
	if err != nil {
		return err
	}
	v, err := reg.SetLabels(name, set, rm)
	if err != nil {
		return err
	}
	if a.json {
		return a.printJSON(toJSON(reg, v))
	}
	fmt.Fprintf(a.stdout, "volume %s labels: %s\n", v.Name, labelList(v.Labels, "none"))
	return nil
}
