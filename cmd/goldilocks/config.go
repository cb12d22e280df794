package main

import (
	"bytes"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/spf13/cobra"
	"go.yaml.in/yaml/v3"
)

// applyConfig sets cmd's flags from the --config file (YAML) where the
// command line did not: a key names a flag, with "_" and "." for "-"
// (audit.on_failure is --audit-on-failure, tls: {cert: F} is --tls-cert).
// An unknown key is an error naming it.
func applyConfig(a *app, cmd *cobra.Command) error {
	if a.config == "" {
		return nil
	}
	b, err := os.ReadFile(a.config)
	if err != nil {
		return fmt.Errorf("--config: %w", err)
	}
	var doc map[string]any
	dec := yaml.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&doc); err != nil && err.Error() != "EOF" {
		return fmt.Errorf("--config %s: %w", a.config, err)
	}
	flat := map[string]string{}
	var walk func(prefix string, m map[string]any)
	walk = func(prefix string, m map[string]any) {
		for k, v := range m {
			name := prefix + strings.NewReplacer("_", "-", ".", "-").Replace(k)
			if sub, ok := v.(map[string]any); ok {
				walk(name+"-", sub)
				continue
			}
			flat[name] = fmt.Sprint(v)
		}
	}
	walk("", doc)
	names := make([]string, 0, len(flat))
	for n := range flat {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		f := cmd.Flags().Lookup(n)
		if f == nil {
			return usagef("--config %s: unknown setting %q (settings are the flags of %q)", a.config, n, cmd.Name())
		}
		if f.Changed {
			continue // the command line wins
		}
		if err := f.Value.Set(flat[n]); err != nil {
			return usagef("--config %s: %s: %v", a.config, n, err)
		}
	}
	return nil
}
