package main

import (
	"strings"

	"github.com/spf13/cobra"
)

// Shell completion (cobra's `goldilocks completion bash|zsh|fish`):
// volume names where a command takes one, and the values of flags that
// have a fixed set.

// volumeArgs are the commands whose first argument is a volume name.
var volumeArgs = map[string]bool{
	"goldilocks volume info": true, "goldilocks volume export": true, "goldilocks volume shred": true,
	"goldilocks volume delete": true, "goldilocks volume resize": true, "goldilocks volume upgrade": true,
	"goldilocks volume label set": true, "goldilocks volume label rm": true,
	"goldilocks key rekey": true, "goldilocks key status": true, "goldilocks volume import": true,
}

// flagValues are the fixed values of flags, by flag name.
var flagValues = map[string][]string{
	"log-format":       {"text", "json"},
	"log-level":        {"debug", "info", "warn", "error"},
	"cipher":           {"aes-256-gcm", "chacha20-poly1305"},
	"kek":              {"local", "vault:"},
	"format":           {"jsonl", "cef"},
	"tls-min-version":  {"1.2", "1.3"},
	"audit-on-failure": {"fail", "continue"},
	"unix-mode":        {"0600", "0660", "0666"},
}

func addCompletions(a *app, c *cobra.Command) {
	for _, sub := range c.Commands() {
		addCompletions(a, sub)
	}
	if volumeArgs[c.CommandPath()] {
		many := c.CommandPath() == "goldilocks key status"
		c.ValidArgsFunction = func(cmd *cobra.Command, args []string, prefix string) ([]string, cobra.ShellCompDirective) {
			if len(args) > 0 && !many {
				return nil, cobra.ShellCompDirectiveNoFileComp
			}
			return volumeNames(a, cmd, prefix), cobra.ShellCompDirectiveNoFileComp
		}
	}
	for name, values := range flagValues {
		if c.Flags().Lookup(name) != nil {
			c.RegisterFlagCompletionFunc(name, cobra.FixedCompletions(values, cobra.ShellCompDirectiveNoFileComp))
		}
	}
}

// volumeNames lists the volumes of the data dir the command line (or the
// environment, or the config file) names, that start with prefix.
func volumeNames(a *app, cmd *cobra.Command, prefix string) []string {
	if _, err := settle(cmd); err != nil {
		return nil
	}
	reg, err := a.openExisting()
	if err != nil {
		return nil
	}
	vols, err := reg.List()
	if err != nil {
		return nil
	}
	var out []string
	for _, v := range vols {
		if strings.HasPrefix(v.Name, prefix) {
			out = append(out, v.Name)
		}
	}
	return out
}
