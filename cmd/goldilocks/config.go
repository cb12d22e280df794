package main

import (
	"fmt"
	"os"
	"sort"
	"strings"
	"text/tabwriter"

	"github.com/knadh/koanf/parsers/yaml"
	"github.com/knadh/koanf/providers/env/v2"
	"github.com/knadh/koanf/providers/file"
	"github.com/knadh/koanf/v2"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// Settings, one way for every command: a flag given on the command line,
// else its environment variable (GOLDILOCKS_ and the flag's name in upper
// case with "_" for "-": --audit-on-failure is GOLDILOCKS_AUDIT_ON_FAILURE),
// else the --config file (YAML: the flag's name with "_" or nesting for
// "-": audit_on_failure, or audit: {on_failure: …}), else the default.
// The environment and the file are read by koanf.

// Where a setting's value came from.
const (
	fromFlag    = "flag"
	fromEnv     = "environment"
	fromFile    = "config file"
	fromDefault = "default"
)

// setting is one flag's effective value and where it came from.
type setting struct {
	Name   string `json:"name"`
	Value  string `json:"value"`
	Source string `json:"source"`
	Origin string `json:"origin,omitempty"` // the variable or the file
}

// envPrefix starts every setting's environment variable.
const envPrefix = "GOLDILOCKS_"

func envName(flag string) string {
	return envPrefix + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// settle sets every flag of cmd that the command line did not set from
// the environment or the config file, and returns each flag's value and
// source. A config file key that is no flag of any command is an error
// naming it; one that is another command's flag is left to that command.
func settle(cmd *cobra.Command) ([]setting, error) {
	flags := cmd.Flags()
	envs := koanf.New(".")
	err := envs.Load(env.Provider("", env.Opt{
		Prefix: envPrefix,
		TransformFunc: func(k, v string) (string, any) {
			return strings.ReplaceAll(strings.ToLower(strings.TrimPrefix(k, envPrefix)), "_", "-"), v
		},
	}), nil)
	if err != nil {
		return nil, fmt.Errorf("environment: %w", err)
	}
	var out []setting
	// The config file's own path: a flag, or GOLDILOCKS_CONFIG.
	path, pathFrom := "", fromDefault
	if f := flags.Lookup("config"); f != nil {
		switch {
		case f.Changed:
			path, pathFrom = f.Value.String(), fromFlag
		case envs.Exists("config"):
			path, pathFrom = envs.String("config"), fromEnv
			if err := f.Value.Set(path); err != nil {
				return nil, err
			}
		}
	}
	fileVals := map[string]string{}
	if path != "" {
		k := koanf.New(".")
		if err := k.Load(file.Provider(path), yaml.Parser()); err != nil {
			return nil, fmt.Errorf("--config %s: %w", path, err)
		}
		known := allFlagNames(cmd.Root())
		keys := k.Keys()
		sort.Strings(keys)
		for _, key := range keys {
			name := strings.NewReplacer("_", "-", ".", "-").Replace(key)
			if !known[name] {
				return nil, usagef("--config %s: unknown setting %q (a setting is a goldilocks flag's name, with _ or nesting for -: audit_on_failure, or audit: {on_failure: …})", path, key)
			}
			fileVals[name] = valueString(k.Get(key))
		}
	}
	var errs []string
	flags.VisitAll(func(f *pflag.Flag) {
		if f.Name == "help" || f.Name == "version" {
			return
		}
		s := setting{Name: f.Name, Source: fromDefault}
		switch {
		case f.Name == "config":
			s.Source = pathFrom
			if pathFrom == fromEnv {
				s.Origin = envName("config")
			}
		case f.Changed:
			s.Source = fromFlag
		case envs.Exists(f.Name):
			s.Source, s.Origin = fromEnv, envName(f.Name)
			if err := f.Value.Set(envs.String(f.Name)); err != nil {
				errs = append(errs, fmt.Sprintf("%s: %v", s.Origin, err))
			}
		case hasKey(fileVals, f.Name):
			s.Source, s.Origin = fromFile, path
			if err := f.Value.Set(fileVals[f.Name]); err != nil {
				errs = append(errs, fmt.Sprintf("--config %s: %s: %v", path, f.Name, err))
			}
		}
		s.Value = f.Value.String()
		out = append(out, s)
	})
	if len(errs) > 0 {
		return nil, usagef("%s", strings.Join(errs, "; "))
	}
	return out, nil
}

func hasKey(m map[string]string, k string) bool { _, ok := m[k]; return ok }

// valueString writes a YAML value as its flag would take it: lists joined
// by commas.
func valueString(v any) string {
	switch x := v.(type) {
	case []any:
		parts := make([]string, len(x))
		for i, e := range x {
			parts[i] = fmt.Sprint(e)
		}
		return strings.Join(parts, ",")
	case nil:
		return ""
	}
	return fmt.Sprint(v)
}

// allFlagNames are the flags of every command under root.
func allFlagNames(root *cobra.Command) map[string]bool {
	names := map[string]bool{}
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		c.Flags().VisitAll(func(f *pflag.Flag) { names[f.Name] = true })
		c.PersistentFlags().VisitAll(func(f *pflag.Flag) { names[f.Name] = true })
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(root)
	return names
}

func newConfigCmd(a *app) *cobra.Command {
	c := &cobra.Command{Use: "config", Short: "Show the effective configuration"}
	show := &cobra.Command{
		Use:   "show [COMMAND...]",
		Short: "Print every setting of a command (default: serve), its value and where it came from",
		Long: `Prints each setting of COMMAND (default serve, the gateway), with the
value it would run with and where that came from: flag, environment
(GOLDILOCKS_…), config file (--config or GOLDILOCKS_CONFIG) or default.
Global flags given here (--data-dir, --config) count as given to COMMAND.`,
		RunE: func(cmd *cobra.Command, argv []string) error {
			if len(argv) == 0 {
				argv = []string{"serve"}
			}
			// A fresh command tree: the target's flags as the command
			// line here set them, then the same settle as a real run.
			var sink strings.Builder
			shadow := newRoot(&app{stdout: &sink, stderr: &sink})
			target, rest, err := shadow.Find(argv)
			if err != nil || len(rest) > 0 || target == shadow || !target.Runnable() {
				return usagef("config show: %q is not a goldilocks command", strings.Join(argv, " "))
			}
			var given []string
			cmd.Flags().Visit(func(f *pflag.Flag) {
				if f.Name != "json" && (target.Flags().Lookup(f.Name) != nil || target.InheritedFlags().Lookup(f.Name) != nil) {
					given = append(given, "--"+f.Name+"="+f.Value.String())
				}
			})
			if err := target.ParseFlags(given); err != nil {
				return usageError{err}
			}
			settings, err := settle(target)
			if err != nil {
				return err
			}
			if a.json {
				return a.printJSON(map[string]any{"command": target.CommandPath(), "settings": settings})
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 8, 2, ' ', 0)
			fmt.Fprintf(tw, "# %s\nSETTING\tVALUE\tSOURCE\n", target.CommandPath())
			for _, s := range settings {
				src := s.Source
				if s.Origin != "" {
					src += " (" + s.Origin + ")"
				}
				v := s.Value
				if v == "" {
					v = `""`
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\n", s.Name, v, src)
			}
			return tw.Flush()
		},
	}
	c.AddCommand(show)
	return c
}

// defaultDataDir is the data dir when no flag, variable or file says.
func defaultDataDir() string {
	if os.Geteuid() == 0 {
		return "/var/lib/goldilocks"
	}
	return "./goldilocks-data"
}
