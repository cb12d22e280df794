package policy

import (
	"bytes"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"goldilocks/internal/units"
)

// Version is the policy file version this package reads (FORMAT.md).
const Version = 1

// ErrInvalid is wrapped by every error about a policy file's contents.
var ErrInvalid = errors.New("invalid policy")

// Problem is one thing wrong in a policy file, at a line (0: the file as
// a whole).
type Problem struct {
	File string `json:"file"`
	Line int    `json:"line"`
	Msg  string `json:"message"`
}

func (p Problem) String() string {
	if p.Line == 0 {
		return p.File + ": " + p.Msg
	}
	return fmt.Sprintf("%s:%d: %s", p.File, p.Line, p.Msg)
}

// InvalidError lists every problem found in a policy file (all of them,
// not the first). It wraps ErrInvalid.
type InvalidError struct{ Problems []Problem }

func (e *InvalidError) Error() string {
	lines := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		lines[i] = p.String()
	}
	return ErrInvalid.Error() + ":\n" + strings.Join(lines, "\n")
}

func (e *InvalidError) Unwrap() error { return ErrInvalid }

// Commands is a set of optional NBD commands a grant allows.
type Commands uint8

// The optional commands a rule can allow.
const (
	CmdTrim Commands = 1 << iota
	CmdWriteZeroes
	CmdCache
	CmdBlockStatus

	AllCommands = CmdTrim | CmdWriteZeroes | CmdCache | CmdBlockStatus
)

var commandNames = map[string]Commands{"trim": CmdTrim, "write_zeroes": CmdWriteZeroes, "cache": CmdCache, "block_status": CmdBlockStatus}

// String lists the commands by their policy names.
func (c Commands) String() string {
	var out []string
	for _, n := range []string{"trim", "write_zeroes", "cache", "block_status"} {
		if c&commandNames[n] != 0 {
			out = append(out, n)
		}
	}
	return "[" + strings.Join(out, " ") + "]"
}

// Limit is a rate: IOPS requests and Bandwidth bytes per second (0: no
// limit), each allowed Burst's worth at once.
type Limit struct {
	IOPS      float64
	Bandwidth float64
	Burst     time.Duration
}

// Any reports whether the limit limits anything.
func (l Limit) Any() bool { return l.IOPS > 0 || l.Bandwidth > 0 }

// Identity names connections that match it.
type Identity struct {
	Name string
	// TLS: globs on the verified client certificate; every one given must
	// match. Nil: not a TLS identity.
	TLS *TLSMatch
	// Unix: SO_PEERCRED values; every one given must match.
	Unix *UnixMatch
	Line int
}

// TLSMatch selects client certificates.
type TLSMatch struct{ URISAN, DNSSAN, CN string }

// UnixMatch selects Unix-socket peers.
type UnixMatch struct{ UID, GID, PID *int64 }

// Rule grants an identity some volumes.
type Rule struct {
	Identity    string // a name, or "*"
	Volumes     []string
	Labels      map[string]string
	ReadOnly    bool
	Commands    Commands
	MaxConns    int
	Limit       Limit // per identity
	TLSRequired bool
	Line        int
}

// VolumeLimit rates all connections to some volumes together.
type VolumeLimit struct {
	Volumes []string
	Limit   Limit
	Line    int
}

// Policy is a parsed policy file. It is immutable: a reload makes a new
// one.
type Policy struct {
	File        string
	TLSRequired bool
	Identities  []Identity
	Rules       []Rule
	Volumes     []VolumeLimit
	Quarantine  struct{ Identities, Volumes []string }
}

// Peer is what the gateway knows of a connection's other end.
type Peer struct {
	// Cert is the client certificate verified in the TLS handshake, if any.
	Cert *x509.Certificate
	TLS  bool
	// Unix is set for a Unix-socket connection, with SO_PEERCRED.
	Unix          bool
	UID, GID, PID int64
}

// Volume is what a decision needs of a volume.
type Volume struct {
	Name   string
	Labels map[string]string
}

// Decision is a verdict and why.
type Decision struct {
	Allow       bool
	ReadOnly    bool
	Commands    Commands
	MaxConns    int
	Identity    Limit // the identity's rate, all its connections together
	Volume      Limit // the volume's rate, all connections together
	TLSRequired bool  // the grant holds over TLS only
	Quarantined bool
	Rule        *Rule // the rule that allowed; nil for a denial
	Reason      string
}

// raw* mirror the YAML for strict decoding (unknown fields are errors).
type rawDoc struct {
	Version     *int          `yaml:"version"`
	TLSRequired bool          `yaml:"tls_required"`
	Identities  []rawIdentity `yaml:"identities"`
	Rules       []rawRule     `yaml:"rules"`
	Volumes     []rawVolume   `yaml:"volumes"`
	Quarantine  struct {
		Identities []string `yaml:"identities"`
		Volumes    []string `yaml:"volumes"`
	} `yaml:"quarantine"`
}

type rawIdentity struct {
	Name string `yaml:"name"`
	TLS  *struct {
		URISAN string `yaml:"uri_san"`
		DNSSAN string `yaml:"dns_san"`
		CN     string `yaml:"cn"`
	} `yaml:"tls"`
	Unix *struct {
		UID *int64 `yaml:"uid"`
		GID *int64 `yaml:"gid"`
		PID *int64 `yaml:"pid"`
	} `yaml:"unix"`
}

type rawLimit struct {
	IOPS      float64 `yaml:"iops"`
	Bandwidth string  `yaml:"bandwidth"`
	Burst     string  `yaml:"burst"`
}

type rawRule struct {
	Identity    string            `yaml:"identity"`
	Volumes     []string          `yaml:"volumes"`
	Labels      map[string]string `yaml:"labels"`
	Access      string            `yaml:"access"`
	Commands    *[]string         `yaml:"commands"`
	MaxConns    int               `yaml:"max_connections"`
	TLSRequired bool              `yaml:"tls_required"`
	rawLimit    `yaml:",inline"`
}

type rawVolume struct {
	Volumes  []string `yaml:"volumes"`
	rawLimit `yaml:",inline"`
}

// Load reads and parses a policy file.
func Load(file string) (*Policy, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	return Parse(b, file)
}

// Parse parses a policy. Every problem found is reported (an
// *InvalidError), one per line of the error, as "FILE:LINE: what": the
// fields YAML could not decode and, in what it could, every rule broken.
func Parse(b []byte, file string) (*Policy, error) {
	var raw rawDoc
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	var problems []Problem
	if err := dec.Decode(&raw); err != nil && !errors.Is(err, io.EOF) {
		problems = yamlProblems(file, err)
		if _, typed := err.(*yaml.TypeError); !typed {
			return nil, &InvalidError{problems} // not YAML at all: nothing more to check
		}
	}
	var root yaml.Node
	yaml.Unmarshal(b, &root)
	lines := itemLines(&root)

	bad := func(line int, format string, args ...any) {
		problems = append(problems, Problem{File: file, Line: line, Msg: fmt.Sprintf(format, args...)})
	}
	p := &Policy{File: file, TLSRequired: raw.TLSRequired}
	if raw.Version != nil && *raw.Version != Version {
		bad(lines.version, "version %d: this gateway reads policy version %d", *raw.Version, Version)
	}
	names := map[string]int{}
	for i, ri := range raw.Identities {
		line := lines.at("identities", i)
		id := Identity{Name: ri.Name, Line: line}
		switch {
		case ri.Name == "":
			bad(line, "identity without a name")
		case ri.Name == "*":
			bad(line, `identity name "*" is reserved (it means any connection in a rule)`)
		case names[ri.Name] != 0:
			bad(line, "identity %q is defined again (first at line %d)", ri.Name, names[ri.Name])
		}
		names[ri.Name] = line
		if ri.TLS == nil && ri.Unix == nil {
			bad(line, "identity %q has no tls or unix selector: nothing would match it", ri.Name)
		}
		if t := ri.TLS; t != nil {
			if t.URISAN == "" && t.DNSSAN == "" && t.CN == "" {
				bad(line, "identity %q: tls needs uri_san, dns_san or cn", ri.Name)
			}
			for _, g := range []string{t.URISAN, t.DNSSAN, t.CN} {
				if _, err := path.Match(g, ""); err != nil {
					bad(line, "identity %q: bad glob %q", ri.Name, g)
				}
			}
			id.TLS = &TLSMatch{URISAN: t.URISAN, DNSSAN: t.DNSSAN, CN: t.CN}
		}
		if u := ri.Unix; u != nil {
			if u.UID == nil && u.GID == nil && u.PID == nil {
				bad(line, "identity %q: unix needs uid, gid or pid", ri.Name)
			}
			id.Unix = &UnixMatch{UID: u.UID, GID: u.GID, PID: u.PID}
		}
		p.Identities = append(p.Identities, id)
	}
	for i, rr := range raw.Rules {
		line := lines.at("rules", i)
		r := Rule{Identity: rr.Identity, Volumes: rr.Volumes, Labels: rr.Labels, MaxConns: rr.MaxConns, TLSRequired: rr.TLSRequired, Line: line, Commands: AllCommands}
		switch {
		case rr.Identity == "":
			bad(line, "rule without an identity (a name, or \"*\")")
		case rr.Identity != "*" && names[rr.Identity] == 0:
			bad(line, "rule names identity %q, which is not defined under identities", rr.Identity)
		}
		if len(rr.Volumes) == 0 {
			bad(line, "rule for %q names no volumes", rr.Identity)
		}
		checkGlobs(bad, line, rr.Volumes)
		switch rr.Access {
		case "", "read-only":
			r.ReadOnly = true
		case "read-write":
		default:
			bad(line, "access %q: want read-only or read-write", rr.Access)
		}
		if rr.Commands != nil {
			r.Commands = 0
			for _, c := range *rr.Commands {
				bit, ok := commandNames[c]
				if !ok {
					bad(line, "command %q: want trim, write_zeroes, cache or block_status", c)
				}
				r.Commands |= bit
			}
		}
		if rr.MaxConns < 0 {
			bad(line, "max_connections %d is negative", rr.MaxConns)
		}
		r.Limit = parseLimit(bad, line, rr.rawLimit)
		p.Rules = append(p.Rules, r)
	}
	for i, rv := range raw.Volumes {
		line := lines.at("volumes", i)
		if len(rv.Volumes) == 0 {
			bad(line, "volume limit names no volumes")
		}
		checkGlobs(bad, line, rv.Volumes)
		l := parseLimit(bad, line, rv.rawLimit)
		if !l.Any() {
			bad(line, "volume limit sets neither iops nor bandwidth")
		}
		p.Volumes = append(p.Volumes, VolumeLimit{Volumes: rv.Volumes, Limit: l, Line: line})
	}
	checkGlobs(bad, lines.quarantine, raw.Quarantine.Identities)
	checkGlobs(bad, lines.quarantine, raw.Quarantine.Volumes)
	p.Quarantine.Identities, p.Quarantine.Volumes = raw.Quarantine.Identities, raw.Quarantine.Volumes
	if len(problems) > 0 {
		slices.SortStableFunc(problems, func(a, b Problem) int { return a.Line - b.Line })
		return nil, &InvalidError{problems}
	}
	return p, nil
}

func checkGlobs(bad func(int, string, ...any), line int, globs []string) {
	for _, g := range globs {
		if _, err := path.Match(g, ""); err != nil || g == "" {
			bad(line, "bad name or glob %q", g)
		}
	}
}

func parseLimit(bad func(int, string, ...any), line int, r rawLimit) Limit {
	l := Limit{IOPS: r.IOPS, Burst: time.Second}
	if r.IOPS < 0 {
		bad(line, "iops %v is negative", r.IOPS)
	}
	if r.Bandwidth != "" {
		n, err := units.ParseSize(r.Bandwidth)
		if err != nil {
			bad(line, "bandwidth: %v", err)
		}
		l.Bandwidth = float64(n)
	}
	if r.Burst != "" {
		d, err := time.ParseDuration(r.Burst)
		if err != nil || d <= 0 {
			bad(line, "burst %q: want a duration such as 500ms or 2s", r.Burst)
		} else {
			l.Burst = d
		}
	}
	return l
}

// yamlProblems turns a yaml decoding error into problems: "line 3: field
// x not found in type …" becomes line 3, "unknown field x (fields here:
// a, b, c)"; a type mismatch says what was found and what is wanted in
// words, never in Go types.
func yamlProblems(file string, err error) []Problem {
	var te *yaml.TypeError
	msgs := []string{err.Error()}
	if errors.As(err, &te) {
		msgs = te.Errors
	}
	out := make([]Problem, 0, len(msgs))
	for _, m := range msgs {
		m = strings.TrimPrefix(m, "yaml: ")
		line := 0
		if rest, ok := strings.CutPrefix(m, "line "); ok {
			if n, tail, ok := strings.Cut(rest, ": "); ok {
				line, _ = strconv.Atoi(n)
				m = tail
			}
		}
		out = append(out, Problem{File: file, Line: line, Msg: humanYAML(m)})
	}
	return out
}

var (
	unknownFieldRE = regexp.MustCompile(`^field (\S+) not found in type (.*)$`)
	unmarshalRE    = regexp.MustCompile("^cannot unmarshal (!!\\w+) `(.*)` into (.+)$")
	tagRE          = regexp.MustCompile(`yaml:\\?"([a-z_]+)`)
)

// yamlWords name YAML tags and Go types in an operator's words.
var yamlWords = map[string]string{
	"!!str": "text", "!!int": "a whole number", "!!float": "a number", "!!bool": "true or false",
	"!!map": "a mapping (key: value)", "!!seq": "a list", "!!null": "nothing",
	"string": "text", "int": "a whole number", "int64": "a whole number", "float64": "a number",
	"bool": "true or false", "[]string": "a list", "map[string]string": "a mapping (key: value)",
}

func humanYAML(m string) string {
	if g := unknownFieldRE.FindStringSubmatch(m); g != nil {
		known := knownFields(g[2])
		if len(known) == 0 {
			return "unknown field " + g[1]
		}
		return fmt.Sprintf("unknown field %s (fields here: %s)", g[1], strings.Join(known, ", "))
	}
	if g := unmarshalRE.FindStringSubmatch(m); g != nil {
		found, want := yamlWords[g[1]], yamlWords[strings.TrimPrefix(g[3], "*")]
		if found == "" {
			found = "a value"
		}
		if want == "" {
			want = "a value of another kind"
		}
		return fmt.Sprintf("%q is %s, where %s is wanted", g[2], found, want)
	}
	return m
}

// knownFields lists the YAML fields of the Go type yaml named in an
// error: one of the raw types, or an anonymous struct (its tags).
func knownFields(typ string) []string {
	var names []string
	if t, ok := rawTypes[strings.TrimPrefix(typ, "*")]; ok {
		names = yamlFields(t)
	} else {
		for _, g := range tagRE.FindAllStringSubmatch(typ, -1) {
			names = append(names, g[1])
		}
	}
	return names
}

var rawTypes = map[string]reflect.Type{
	"policy.rawDoc":      reflect.TypeFor[rawDoc](),
	"policy.rawIdentity": reflect.TypeFor[rawIdentity](),
	"policy.rawRule":     reflect.TypeFor[rawRule](),
	"policy.rawVolume":   reflect.TypeFor[rawVolume](),
}

func yamlFields(t reflect.Type) []string {
	var names []string
	for i := range t.NumField() {
		f := t.Field(i)
		name, opts, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if opts == "inline" {
			names = append(names, yamlFields(f.Type)...)
			continue
		}
		if name != "" && name != "-" {
			names = append(names, name)
		}
	}
	return names
}

// docLines holds the line of each list item of the top-level sections.
type docLines struct {
	items               map[string][]int
	version, quarantine int
}

func (d docLines) at(section string, i int) int {
	if ls := d.items[section]; i < len(ls) {
		return ls[i]
	}
	return 0
}

func itemLines(root *yaml.Node) docLines {
	d := docLines{items: map[string][]int{}}
	if root.Kind != yaml.DocumentNode || len(root.Content) == 0 || root.Content[0].Kind != yaml.MappingNode {
		return d
	}
	m := root.Content[0].Content
	for i := 0; i+1 < len(m); i += 2 {
		key, val := m[i].Value, m[i+1]
		switch key {
		case "version":
			d.version = m[i].Line
		case "quarantine":
			d.quarantine = m[i].Line
		}
		if val.Kind == yaml.SequenceNode {
			for _, it := range val.Content {
				d.items[key] = append(d.items[key], it.Line)
			}
		}
	}
	return d
}

// NeedsTLS reports whether the policy requires TLS anywhere: for the
// whole gateway or for one of its rules.
func (p *Policy) NeedsTLS() bool {
	if p.TLSRequired {
		return true
	}
	for _, r := range p.Rules {
		if r.TLSRequired {
			return true
		}
	}
	return false
}

// Identify names a connection: the first identity that matches it, or ""
// when none does.
func (p *Policy) Identify(peer *Peer) string {
	for i := range p.Identities {
		if p.Identities[i].matches(peer) {
			return p.Identities[i].Name
		}
	}
	return ""
}

func (id *Identity) matches(peer *Peer) bool {
	if t := id.TLS; t != nil && peer.Cert != nil {
		c := peer.Cert
		ok := (t.URISAN == "" || slices.ContainsFunc(c.URIs, func(u *url.URL) bool { return glob(t.URISAN, u.String()) })) &&
			(t.DNSSAN == "" || slices.ContainsFunc(c.DNSNames, func(n string) bool { return glob(t.DNSSAN, n) })) &&
			(t.CN == "" || glob(t.CN, c.Subject.CommonName))
		if ok {
			return true
		}
	}
	if u := id.Unix; u != nil && peer.Unix {
		return (u.UID == nil || *u.UID == peer.UID) && (u.GID == nil || *u.GID == peer.GID) && (u.PID == nil || *u.PID == peer.PID)
	}
	return false
}

func glob(pattern, s string) bool {
	ok, _ := path.Match(pattern, s)
	return ok
}

func anyGlob(patterns []string, s string) bool {
	return slices.ContainsFunc(patterns, func(p string) bool { return glob(p, s) })
}

// Decide says whether identity ("" for none) may attach v, how, and why.
func (p *Policy) Decide(identity string, v Volume) Decision {
	who := identity
	if who == "" {
		who = "a connection with no identity"
	} else {
		who = "identity " + who
	}
	if identity != "" && anyGlob(p.Quarantine.Identities, identity) {
		return Decision{Quarantined: true, Reason: who + " is quarantined"}
	}
	if anyGlob(p.Quarantine.Volumes, v.Name) {
		return Decision{Quarantined: true, Reason: "volume " + v.Name + " is quarantined"}
	}
	// A snapshot's export NAME@SNAP holds the volume's data: quarantined
	// with it.
	if base, _, ok := strings.Cut(v.Name, "@"); ok && anyGlob(p.Quarantine.Volumes, base) {
		return Decision{Quarantined: true, Reason: "volume " + base + " is quarantined (and its snapshots with it)"}
	}
	for i := range p.Rules {
		r := &p.Rules[i]
		if r.Identity != "*" && (identity == "" || r.Identity != identity) {
			continue
		}
		if !anyGlob(r.Volumes, v.Name) || !labelsMatch(r.Labels, v.Labels) {
			continue
		}
		access := "read-write"
		if r.ReadOnly {
			access = "read-only"
		}
		d := Decision{
			Allow: true, ReadOnly: r.ReadOnly, Commands: r.Commands, MaxConns: r.MaxConns,
			Identity: r.Limit, TLSRequired: r.TLSRequired || p.TLSRequired, Rule: r,
			Reason: fmt.Sprintf("%s may attach %s %s (rule at %s:%d)", who, v.Name, access, p.File, r.Line),
		}
		for _, vl := range p.Volumes {
			if anyGlob(vl.Volumes, v.Name) {
				d.Volume = vl.Limit
				break
			}
		}
		return d
	}
	return Decision{Reason: fmt.Sprintf("no rule grants %s volume %s (default deny)", who, v.Name)}
}

func labelsMatch(want, have map[string]string) bool {
	for k, v := range want {
		if hv, ok := have[k]; !ok || !glob(v, hv) {
			return false
		}
	}
	return true
}
