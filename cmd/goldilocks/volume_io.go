package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"goldilocks/audit"
	"goldilocks/internal/block"
	"goldilocks/internal/volume"
)

// copyBlock is the unit of import and export.
const copyBlock = 1 << 20

func quietLogger(a *app) *slog.Logger {
	return slog.New(slog.NewTextHandler(a.stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

func newVolumeExportCmd(a *app) *cobra.Command {
	var to string
	c := &cobra.Command{
		Use:   "export NAME --to RAW_FILE",
		Short: "Write a volume's plaintext to a raw image (no gateway needed: the disaster-recovery path)",
		Args:  args(cobra.ExactArgs(1)),
		RunE: audited(a, audit.EvVolumeExport, func(cmd *cobra.Command, argv []string) error {
			if to == "" {
				return usagef("volume export: --to is required")
			}
			reg, v, err := a.targetVolume(argv[0])
			if err != nil {
				return err
			}
			dev, err := reg.OpenDevice(v, quietLogger(a))
			if err != nil {
				return err
			}
			defer dev.Close()
			out, regular, err := openExportTarget(a, to)
			if err != nil {
				return err
			}
			size := dev.Size()
			if regular {
				if err := out.f.Truncate(size); err != nil { // sparse: holes stay holes
					out.Close()
					return err
				}
			}
			ext := block.OptionalOf(dev).Extenter
			buf := make([]byte, copyBlock)
			pr := newProgress(a, "export "+v.Name, size)
			for off := int64(0); off < size; {
				n := min(int64(copyBlock), size-off)
				if ext != nil && regular {
					if e, err := ext.Extents(nil, off, n, 1); err == nil && len(e) == 1 && e[0].Flags&block.ExtentZero != 0 {
						off += e[0].Length
						pr.update(off)
						continue
					}
				}
				if _, err := dev.ReadAt(buf[:n], off); err != nil {
					out.Close()
					return fmt.Errorf("volume %s at offset %d: %w", v.Name, off, err)
				}
				var err error
				switch {
				case !regular: // a pipe, a device, /dev/null: every byte, in order
					_, err = out.w.Write(buf[:n])
				case !isZero(buf[:n]):
					_, err = out.f.WriteAt(buf[:n], off)
				}
				if err != nil {
					out.Close()
					return fmt.Errorf("volume export %s: %w", v.Name, err)
				}
				off += n
				pr.update(off)
			}
			if regular {
				if err := out.f.Sync(); err != nil {
					out.Close()
					return err
				}
			}
			return out.Close()
		}),
	}
	c.Flags().StringVar(&to, "to", "", "raw image to write (\"-\": standard output; a device or pipe is written in order)")
	return c
}

func newVolumeImportCmd(a *app) *cobra.Command {
	var (
		from  string
		plain bool
	)
	c := &cobra.Command{
		Use:   "import NAME --from RAW_FILE",
		Short: "Copy a raw image into a volume (created, encrypted, if it does not exist)",
		Args:  args(cobra.ExactArgs(1)),
		RunE: audited(a, audit.EvVolumeImport, func(cmd *cobra.Command, argv []string) error {
			if from == "" {
				return usagef("volume import: --from is required")
			}
			in, err := os.Open(from)
			if err != nil {
				return err
			}
			defer in.Close()
			st, err := in.Stat()
			if err != nil {
				return err
			}
			size := st.Size()
			reg, err := a.openRegistry()
			if err != nil {
				return err
			}
			v, err := reg.Get(argv[0])
			created := false
			if errors.Is(err, volume.ErrNotFound) {
				v, err = reg.Create(volume.CreateOptions{Name: argv[0], Size: (size + 4095) &^ 4095, Encrypted: !plain})
				created = true
			}
			if err != nil {
				return err
			}
			if v.Size < size {
				return fmt.Errorf("volume %s holds %d bytes, %s has %d", v.Name, v.Size, from, size)
			}
			dev, err := reg.OpenDevice(v, quietLogger(a))
			if err != nil {
				return err
			}
			zeroer := block.OptionalOf(dev).Zeroer
			buf := make([]byte, copyBlock)
			pr := newProgress(a, "import "+v.Name, size)
			for off := int64(0); off < size; {
				n, err := io.ReadFull(in, buf)
				if err == io.ErrUnexpectedEOF || err == io.EOF {
					err = nil
				}
				if err != nil {
					dev.Close()
					return err
				}
				chunk := buf[:n]
				switch {
				case isZero(chunk) && created: // a new volume already reads zeros
				case isZero(chunk) && zeroer != nil:
					err = zeroer.Zero(off, int64(n), true, false)
				default:
					_, err = dev.WriteAt(chunk, off)
				}
				if err != nil {
					dev.Close()
					return fmt.Errorf("volume %s at offset %d: %w", v.Name, off, err)
				}
				off += int64(n)
				pr.update(off)
			}
			if err := dev.Flush(); err != nil {
				dev.Close()
				return err
			}
			return dev.Close()
		}),
	}
	c.Flags().StringVar(&from, "from", "", "raw image to read")
	c.Flags().BoolVar(&plain, "plain", false, "create the volume unencrypted (when it does not exist)")
	return c
}

func newVolumeShredCmd(a *app) *cobra.Command {
	var yes bool
	c := &cobra.Command{
		Use:   "shred NAME [--yes]",
		Short: "Destroy an encrypted volume's data key: its data is unreadable at once",
		Long: `Destroys an encrypted volume's data key: first its secret (in the local
keystore, or in Vault's KV engine for a Vault-keyed volume), so that no
copy of the volume's header (a backup, a snapshot of the storage) opens
either, then both header copies; then removes the volume, its rollback
anchor and its backing file if that lives in the data dir. This cannot be
undone. On a terminal it asks you to type the volume's name; without one
it refuses unless --yes is given. (A Vault-keyed volume wrapped before
destroyable secrets existed has none: it loses its header copies only.)`,
		Args: args(cobra.ExactArgs(1)),
		RunE: audited(a, audit.EvVolumeShred, func(cmd *cobra.Command, argv []string) error {
			reg, v, err := a.targetVolume(argv[0])
			if err != nil {
				return err
			}
			if !yes {
				if err := confirm(a, "volume shred", v.Name,
					fmt.Sprintf("Shred volume %s? Its data becomes unreadable for good. Type the volume name to confirm: ", v.Name)); err != nil {
					return err
				}
			}
			if err := reg.Shred(v.Name); err != nil {
				return err
			}
			if a.json {
				return a.printJSON(map[string]any{"volume": v.Name, "shredded": true})
			}
			fmt.Fprintf(a.stdout, "shredded volume %s: its data key is destroyed\n", v.Name)
			return nil
		}),
	}
	c.Flags().BoolVar(&yes, "yes", false, "do not ask for confirmation (needed without a terminal)")
	return c
}

// confirm asks on the terminal for want to be typed (prompt on stderr,
// answer from stdin). Without a terminal on stdin it refuses: a usage
// error naming --yes.
func confirm(a *app, command, want, prompt string) error {
	if !isTerminal(a.stdin) {
		return usagef("%s %s: refusing without a terminal to confirm on: pass --yes", command, want)
	}
	fmt.Fprint(a.stderr, prompt)
	line, err := bufio.NewReader(a.stdin).ReadString('\n')
	if err != nil && line == "" {
		fmt.Fprintln(a.stderr)
		return fmt.Errorf("%s %s: not confirmed (%v): nothing was done", command, want, err)
	}
	if strings.TrimSpace(line) != want {
		return fmt.Errorf("%s %s: not confirmed (the answer was not %q): nothing was done", command, want, want)
	}
	return nil
}

// isTerminal reports whether r is a terminal.
func isTerminal(r io.Reader) bool {
	f, ok := r.(*os.File)
	if !ok || f == nil {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

func isZero(b []byte) bool {
	var z [4096]byte
	for len(b) > 0 {
		n := min(len(b), len(z))
		if !bytes.Equal(b[:n], z[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// exportTarget is where volume export writes: a regular file (created or
// truncated, written sparse with WriteAt), or a stream written in order:
// standard output for "-", or a pipe, a block device or /dev/null.
type exportTarget struct {
	w io.Writer
	f *os.File // nil for standard output
}

func openExportTarget(a *app, to string) (exportTarget, bool, error) {
	if to == "-" {
		return exportTarget{w: a.stdout}, false, nil
	}
	if st, err := os.Stat(to); err == nil && !st.Mode().IsRegular() {
		f, err := os.OpenFile(to, os.O_WRONLY, 0)
		return exportTarget{w: f, f: f}, false, err
	}
	f, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	return exportTarget{w: f, f: f}, true, err
}

func (t exportTarget) Close() error {
	if t.f == nil {
		return nil
	}
	return t.f.Close()
}
