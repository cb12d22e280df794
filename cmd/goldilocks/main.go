// Command goldilocks is the storage-tier security gateway: an NBD server
// for VM disks and the tools to manage its volumes. This package only
// wires: flags, configuration and output. The work is done in gateway/,
// internal/volume, crypto/, policy/ and audit/.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"golang.org/x/sys/unix"
	"goldilocks/internal/secretfile"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"

	"github.com/spf13/cobra"

	"goldilocks/audit"
	"goldilocks/crypto"
	"goldilocks/internal/volume"
)

// version is set by the Makefile (-ldflags -X main.version=…).
var version = "dev"

// usageError marks a command-line mistake: exit status 2.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// exitStatus ends a command with that status and no message: the
// command's output already said it (policy explain's deny).
type exitStatus int

func (e exitStatus) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

func usagef(format string, args ...any) error {
	return usageError{fmt.Errorf(format, args...)}
}

// app holds the global flags shared by every command.
type app struct {
	dataDir string
	config  string
	json    bool
	stdin   io.Reader // confirmations of destructive commands; nil: none (not a terminal)
	stdout  io.Writer
	stderr  io.Writer
	log     *slog.Logger // set by serve from its flags, else made by logger()
	alog    *audit.Log   // the audit log, once a command opened it
	// auditDetails are added to the record an audited command writes.
	auditDetails map[string]any
	// vaultObserve, if set (serve), sees every request to Vault.
	vaultObserve func(op string, err error)
}

func newRoot(a *app) *cobra.Command {
	root := &cobra.Command{
		Use:           "goldilocks",
		Short:         "Storage-tier security gateway for virtual disks (NBD)",
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       buildVersion(),
	}
	root.SetOut(a.stdout)
	root.SetErr(a.stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	pf := root.PersistentFlags()
	pf.StringVar(&a.dataDir, "data-dir", defaultDataDir(), "volumes, keystore, audit log and state (env GOLDILOCKS_DATA_DIR; /var/lib/goldilocks for root, ./goldilocks-data otherwise)")
	// Every command's flags: the command line, else GOLDILOCKS_… variables,
	// else the --config file (config.go).
	root.PersistentPreRunE = func(cmd *cobra.Command, _ []string) error {
		_, err := settle(cmd)
		return err
	}
	pf.StringVar(&a.config, "config", "", "configuration file, YAML (env GOLDILOCKS_CONFIG): a flag > its GOLDILOCKS_… variable > this file > the default, for every command")
	pf.BoolVar(&a.json, "json", false, "print the result as one JSON document on stdout")
	root.SetVersionTemplate("goldilocks {{.Version}}\n")
	root.AddCommand(newServeCmd(a), newVolumeCmd(a), newKeyCmd(a), newPolicyCmd(a), newAuditCmd(a), newVersionCmd(a), newConfigCmd(a))
	strictGroups(root)
	addCompletions(a, root)
	return root
}

// buildVersion is the version set by the Makefile or, for a plain
// `go build` or `go install`, the module version or VCS revision that Go
// recorded in the binary.
func buildVersion() string {
	if version != "dev" {
		return version
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return version
	}
	rev, dirty := "", false
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	switch {
	case rev != "":
		v := rev[:min(12, len(rev))]
		if dirty {
			v += "-dirty"
		}
		return v
	case bi.Main.Version != "" && bi.Main.Version != "(devel)":
		return bi.Main.Version
	}
	return version
}

func newVersionCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  args(cobra.NoArgs),
		RunE: func(*cobra.Command, []string) error {
			if a.json {
				return a.printJSON(map[string]string{"version": buildVersion(), "go": runtime.Version()})
			}
			fmt.Fprintf(a.stdout, "goldilocks %s (%s)\n", buildVersion(), runtime.Version())
			return nil
		},
	}
}

// strictGroups makes every command group (volume, key, …) refuse an
// unknown subcommand as a usage error (exit 2), as the top level does;
// cobra would print the group's help and exit 0. A group alone prints its
// help.
func strictGroups(c *cobra.Command) {
	for _, sub := range c.Commands() {
		strictGroups(sub)
	}
	if c == c.Root() || !c.HasSubCommands() || c.Runnable() {
		return
	}
	c.Args = cobra.ArbitraryArgs
	c.RunE = func(cmd *cobra.Command, args []string) error {
		if len(args) == 0 {
			return cmd.Help()
		}
		return usagef("unknown command %q for %q (see %s --help)", args[0], cmd.CommandPath(), cmd.CommandPath())
	}
}

// args wraps a cobra argument check so that its failure is a usage error.
func args(check cobra.PositionalArgs) cobra.PositionalArgs {
	return func(cmd *cobra.Command, a []string) error {
		if err := check(cmd, a); err != nil {
			return usageError{err}
		}
		return nil
	}
}

// openExisting opens the registry of a data dir that must already exist:
// commands that only read or change volumes do not create an empty one
// where a mistyped --data-dir points.
func (a *app) openExisting() (*volume.Registry, error) {
	if err := a.requireDataDir(); err != nil {
		return nil, err
	}
	return a.openRegistry()
}

// requireDataDir says so when the data dir does not exist.
func (a *app) requireDataDir() error {
	if _, err := os.Stat(a.dataDir); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("data dir %s does not exist (give --data-dir, or create a volume with goldilocks volume create)", a.dataDir)
		}
		return fmt.Errorf("data dir %s: %w", a.dataDir, err)
	}
	return nil
}

// openRegistry opens the data dir's volume registry, with the keystore
// passphrase from GOLDILOCKS_KEYSTORE_PASSPHRASE or the file named by
// GOLDILOCKS_KEYSTORE_PASSPHRASE_FILE, if either is set.
func (a *app) openRegistry() (*volume.Registry, error) {
	reg, err := volume.Open(a.dataDir)
	if err != nil {
		return nil, err
	}
	pass := []byte(os.Getenv("GOLDILOCKS_KEYSTORE_PASSPHRASE"))
	if f := os.Getenv("GOLDILOCKS_KEYSTORE_PASSPHRASE_FILE"); f != "" {
		b, err := secretfile.Read(f)
		if err != nil {
			return nil, fmt.Errorf("GOLDILOCKS_KEYSTORE_PASSPHRASE_FILE: %w", err)
		}
		pass = bytes.TrimRight(b, "\r\n")
	}
	if len(pass) > 0 {
		reg.SetKeystorePassphrase(pass)
	}
	vc := crypto.VaultConfig{
		Mount:        os.Getenv("GOLDILOCKS_VAULT_TRANSIT_MOUNT"),
		KVMount:      os.Getenv("GOLDILOCKS_VAULT_KV_MOUNT"),
		AppRoleMount: os.Getenv("GOLDILOCKS_VAULT_APPROLE_MOUNT"),
		RoleID:       os.Getenv("GOLDILOCKS_VAULT_ROLE_ID"),
		SecretID:     os.Getenv("GOLDILOCKS_VAULT_SECRET_ID"),
		Log:          a.logger(),
		Observe:      a.vaultObserve,
	}
	if f := os.Getenv("GOLDILOCKS_VAULT_SECRET_ID_FILE"); f != "" {
		b, err := secretfile.Read(f)
		if err != nil {
			return nil, fmt.Errorf("GOLDILOCKS_VAULT_SECRET_ID_FILE: %w", err)
		}
		vc.SecretID = string(bytes.TrimSpace(b))
	}
	reg.SetVaultConfig(vc)
	return reg, nil
}

// logger is the process's structured logger: serve's, as its flags say,
// or warnings and errors on stderr for the other commands.
func (a *app) logger() *slog.Logger {
	if a.log == nil {
		var h slog.Handler = slog.NewTextHandler(a.stderr, &slog.HandlerOptions{Level: slog.LevelWarn})
		if a.alog != nil {
			h = audit.NewHandler(h, a.alog) // events reach the audit trail
		}
		a.log = slog.New(h)
	}
	return a.log
}

func (a *app) printJSON(v any) error {
	enc := json.NewEncoder(a.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func main() {
	// Every command may hold keys (a data key unwrapped, what is derived
	// from it for the cipher, in Go's heap): no core file on a crash, and
	// no ptrace by other users (root's still can; README "Secrets").
	unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0)
	a := &app{stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr}
	os.Exit(run(a, os.Args[1:]))
}

func run(a *app, argv []string) int {
	root := newRoot(a)
	root.SetArgs(argv)
	err := root.Execute()
	a.closeAudit()
	if err == nil {
		return 0
	}
	var es exitStatus
	if errors.As(err, &es) {
		return int(es)
	}
	msg := strings.ReplaceAll(err.Error(), "\n", "; ")
	fmt.Fprintf(a.stderr, "%s: %s\n", filepath.Base(os.Args[0]), msg)
	var ue usageError
	if errors.As(err, &ue) || strings.HasPrefix(err.Error(), "unknown command") {
		return 2
	}
	return 1
}
