package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"goldilocks/audit"
	"goldilocks/crypto"
	"goldilocks/internal/volume"
)

// oldKeyNote is what the upgrade says of the format-1 data key.
const oldKeyNote = "the format-1 data key cannot be destroyed at the keystore; its old ciphertext is gone with the old file, but a copy of the old file plus the KEK still opens it"

// upgradeJSON is what `volume upgrade --json` prints.
type upgradeJSON struct {
	volume.UpgradeResult
	Upgraded bool   `json:"upgraded"`
	Note     string `json:"note,omitempty"`
}

func newVolumeUpgradeCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "upgrade NAME",
		Short: "Rewrite an encrypted volume of an older on-disk format (1) in the current one (2); offline",
		Long: `Rewrites encrypted volume NAME from on-disk format 1 (the previous
release's) into format 2, which this build attaches. Offline: detach the
volume first (stop the gateway or its clients); there is no online upgrade
yet. Every mapped chunk is read, checked and written to a new file beside
the backing file (BACKING.upgrade), under a new data key wrapped by the same
KEK; the new file then replaces the old one by a rename. Until then the
volume is untouched: if this stops (Ctrl-C, a crash), run it again, and it
starts over. The new file needs up to about twice the volume's size of free
space beside the old one, which is sparse. A volume already in format 2 is
left as it is.`,
		Args: args(cobra.ExactArgs(1)),
		RunE: audited(a, audit.EvVolumeUpgrade, func(cmd *cobra.Command, argv []string) error {
			name := argv[0]
			reg, err := a.openExisting()
			if err != nil {
				return err
			}
			ctx, cancel := signalContext()
			defer cancel()
			p := newProgress(a, "upgrade "+name, 0)
			progress := func(done, total uint64) {
				p.total = int64(total) * crypto.ChunkSize
				p.update(int64(done) * crypto.ChunkSize)
			}
			res, err := reg.Upgrade(ctx, name, progress, a.logger())
			switch {
			case errors.Is(err, volume.ErrUpToDate):
				if a.json {
					return a.printJSON(map[string]any{"volume": name, "upgraded": false, "format_version": crypto.HeaderVersion,
						"note": fmt.Sprintf("already format %d", crypto.HeaderVersion)})
				}
				fmt.Fprintf(a.stdout, "volume %s is already format %d: nothing to do\n", name, crypto.HeaderVersion)
				return nil
			case err != nil && (errors.Is(err, context.Canceled) || ctx.Err() != nil):
				return fmt.Errorf("volume %s: upgrade stopped; the volume is unchanged (format %d); run goldilocks volume upgrade %s again", name, res.FromFormat, name)
			case err != nil:
				return err
			}
			note := ""
			if !res.OldKeyDestroyed {
				note = oldKeyNote
			}
			if a.json {
				return a.printJSON(upgradeJSON{UpgradeResult: res, Upgraded: true, Note: note})
			}
			fmt.Fprintf(a.stdout, "upgraded volume %s from format %d to format %d: %d of %d chunks copied (%d bytes), a new data key under %s:%s version %d\n",
				name, res.FromFormat, res.ToFormat, res.Copied, res.Chunks, res.Bytes, res.KEK.Provider, res.KEK.Key, res.KEK.Version)
			if res.Discarded {
				fmt.Fprintf(a.stdout, "a partial copy left by an interrupted upgrade was discarded first\n")
			}
			if note != "" {
				fmt.Fprintf(a.stdout, "note: %s\n", note)
			}
			return nil
		}),
	}
}
