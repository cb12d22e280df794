package main

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"goldilocks/policy"
)

func newPolicyCmd(a *app) *cobra.Command {
	c := &cobra.Command{
		Use:   "policy",
		Short: "Check an access policy file, or explain a decision",
	}
	c.AddCommand(newPolicyCheckCmd(a), newPolicyExplainCmd(a))
	return c
}

func newPolicyCheckCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "check FILE",
		Short: "Check a policy file; every error is reported with its line",
		Args:  args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			p, err := policy.Load(argv[0])
			var inv *policy.InvalidError
			if errors.As(err, &inv) && a.json {
				if jerr := a.printJSON(map[string]any{"file": argv[0], "valid": false, "errors": inv.Problems}); jerr != nil {
					return jerr
				}
				return fmt.Errorf("%s: invalid policy: %d errors (in the JSON above)", argv[0], len(inv.Problems))
			}
			if err != nil {
				if errors.Is(err, policy.ErrInvalid) {
					// One error per line on stderr, as compilers do.
					_, list, _ := strings.Cut(err.Error(), ":\n")
					if list == "" {
						list = strings.TrimPrefix(err.Error(), policy.ErrInvalid.Error()+": ")
					}
					fmt.Fprintln(a.stderr, list)
					return fmt.Errorf("%s: invalid policy (errors above)", argv[0])
				}
				return err
			}
			if a.json {
				return a.printJSON(map[string]any{"file": argv[0], "valid": true, "identities": len(p.Identities), "rules": len(p.Rules)})
			}
			fmt.Fprintf(a.stdout, "%s: ok: %d identities, %d rules, %d volume limits\n", argv[0], len(p.Identities), len(p.Rules), len(p.Volumes))
			return nil
		},
	}
}

func newPolicyExplainCmd(a *app) *cobra.Command {
	var file, identity, vol string
	c := &cobra.Command{
		Use:   "explain --identity ID --volume NAME [--policy FILE]",
		Short: "Print the verdict for an identity and a volume, and the rule that decided it",
		Args:  args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if vol == "" {
				return usagef("policy explain: --volume is required")
			}
			if file == "" {
				return usagef("policy explain: --policy FILE (or GOLDILOCKS_POLICY) is required")
			}
			p, err := policy.Load(file)
			if err != nil {
				return err
			}
			v := policy.Volume{Name: vol}
			if reg, err := a.openExisting(); err == nil { // labels, if the volume is known here
				if rv, err := reg.Get(vol); err == nil {
					v.Labels = rv.Labels
				}
			}
			if identity != "" && identity != "*" && !defined(p, identity) {
				return fmt.Errorf("identity %q is not defined in %s", identity, file)
			}
			d := p.Decide(identity, v)
			if a.json {
				out := map[string]any{"allow": d.Allow, "reason": d.Reason, "quarantined": d.Quarantined}
				if d.Allow {
					out["access"] = access(d.ReadOnly)
					out["line"] = d.Rule.Line
					out["commands"] = strings.Fields(strings.Trim(d.Commands.String(), "[]"))
					out["tls_required"] = d.TLSRequired
					out["max_connections"] = d.MaxConns
					out["identity_limit"] = map[string]any{"iops": d.Identity.IOPS, "bandwidth": d.Identity.Bandwidth}
					out["volume_limit"] = map[string]any{"iops": d.Volume.IOPS, "bandwidth": d.Volume.Bandwidth}
				}
				if err := a.printJSON(out); err != nil {
					return err
				}
				if !d.Allow {
					return exitStatus(1) // a deny, as grep's "no match"
				}
				return nil
			}
			if !d.Allow {
				fmt.Fprintf(a.stdout, "deny: %s\n", d.Reason)
				return exitStatus(1)
			}
			fmt.Fprintf(a.stdout, "allow %s: %s\n", access(d.ReadOnly), d.Reason)
			fmt.Fprintf(a.stdout, "  commands: %s", d.Commands)
			if d.TLSRequired {
				fmt.Fprint(a.stdout, "; TLS required")
			}
			if d.MaxConns > 0 {
				fmt.Fprintf(a.stdout, "; at most %d connections", d.MaxConns)
			}
			fmt.Fprintln(a.stdout)
			for _, l := range []struct {
				what string
				l    policy.Limit
			}{{"identity", d.Identity}, {"volume", d.Volume}} {
				if l.l.Any() {
					fmt.Fprintf(a.stdout, "  %s limit: %.0f IOPS, %.0f bytes/s (0: none), burst %s\n", l.what, l.l.IOPS, l.l.Bandwidth, l.l.Burst)
				}
			}
			return nil
		},
	}
	f := c.Flags()
	f.StringVar(&file, "policy", "", "policy file (env GOLDILOCKS_POLICY)")
	f.StringVar(&identity, "identity", "", "identity name as the policy defines it (empty: a connection with no identity)")
	f.StringVar(&vol, "volume", "", "volume name (its labels are read from the data dir's registry if it is there)")
	return c
}

func defined(p *policy.Policy, id string) bool {
	for _, i := range p.Identities {
		if i.Name == id {
			return true
		}
	}
	return false
}

func access(ro bool) string {
	if ro {
		return "read-only"
	}
	return "read-write"
}
