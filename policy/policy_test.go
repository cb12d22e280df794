package policy

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"net/url"
	"strings"
	"testing"
	"time"
)

func lab(t *testing.T) *Policy {
	t.Helper()
	p, err := Load("testdata/lab.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func cert(cn string, uris ...string) *x509.Certificate {
	c := &x509.Certificate{Subject: pkix.Name{CommonName: cn}}
	for _, u := range uris {
		pu, _ := url.Parse(u)
		c.URIs = append(c.URIs, pu)
	}
	return c
}

func TestIdentify(t *testing.T) {
	p := lab(t)
	for _, tc := range []struct {
		name string
		peer Peer
		want string
	}{
		{"uri san", Peer{TLS: true, Cert: cert("whatever", "spiffe://lab/vm-a")}, "vm-a"},
		{"uri san of another", Peer{TLS: true, Cert: cert("x", "spiffe://lab/vm-b")}, ""},
		{"cn glob", Peer{TLS: true, Cert: cert("ops-alice")}, "ops"},
		{"tls without cert", Peer{TLS: true}, ""},
		{"unix uid", Peer{Unix: true, UID: 1001, GID: 50, PID: 7}, "vm-b"},
		{"unix uid and gid", Peer{Unix: true, UID: 0, GID: 0}, "root-local"},
		{"unix uid, wrong gid", Peer{Unix: true, UID: 0, GID: 5}, ""},
		{"unmapped uid", Peer{Unix: true, UID: 4242}, ""},
		{"plain tcp", Peer{}, ""},
	} {
		if got := p.Identify(&tc.peer); got != tc.want {
			t.Errorf("%s: identity %q, want %q", tc.name, got, tc.want)
		}
	}
}

func TestDecide(t *testing.T) {
	p := lab(t)
	gold := map[string]string{"tier": "gold"}
	for _, tc := range []struct {
		identity string
		vol      Volume
		allow    bool
		ro       bool
		line     int
		reason   string
	}{
		{"vm-a", Volume{Name: "a-root"}, true, false, 12, "may attach a-root read-write"},
		{"vm-a", Volume{Name: "b-root"}, false, false, 0, "default deny"},
		{"vm-b", Volume{Name: "b-root"}, true, true, 17, "read-only"},
		{"vm-b", Volume{Name: "b-data"}, false, false, 0, "no rule grants identity vm-b volume b-data"},
		{"ops", Volume{Name: "x", Labels: gold}, true, false, 20, ""},
		{"ops", Volume{Name: "x", Labels: map[string]string{"tier": "bronze"}}, false, false, 0, ""},
		{"", Volume{Name: "public"}, true, true, 27, "a connection with no identity may attach public"},
		{"", Volume{Name: "a-root"}, false, false, 0, "a connection with no identity"},
		{"vm-c", Volume{Name: "public"}, false, false, 0, "identity vm-c is quarantined"},
		{"vm-a", Volume{Name: "leaky-1"}, false, false, 0, "volume leaky-1 is quarantined"},
	} {
		d := p.Decide(tc.identity, tc.vol)
		line := 0
		if d.Rule != nil {
			line = d.Rule.Line
		}
		if d.Allow != tc.allow || d.ReadOnly != tc.ro || line != tc.line || !strings.Contains(d.Reason, tc.reason) {
			t.Errorf("%q on %s: allow %v ro %v line %d reason %q; want %v %v %d %q",
				tc.identity, tc.vol.Name, d.Allow, d.ReadOnly, line, d.Reason, tc.allow, tc.ro, tc.line, tc.reason)
		}
	}
	d := p.Decide("vm-a", Volume{Name: "a-db1"})
	if d.Identity.IOPS != 2000 || d.Identity.Bandwidth != 100<<20 || d.Identity.Burst != time.Second ||
		d.Volume.IOPS != 500 || d.Volume.Burst != 200*time.Millisecond || d.Commands != AllCommands {
		t.Errorf("limits of vm-a on a-db1: %+v", d)
	}
	d = p.Decide("ops", Volume{Name: "x", Labels: gold})
	if d.Commands != CmdBlockStatus || d.MaxConns != 2 || !d.TLSRequired {
		t.Errorf("ops grant: %+v", d)
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct {
		file string
		want []string
	}{
		{"testdata/broken.yaml", []string{
			"testdata/broken.yaml:4: identity \"vm-a\" is defined again (first at line 2)",
			"testdata/broken.yaml:7: rule names identity \"vm-z\", which is not defined",
			"testdata/broken.yaml:7: access \"read-wrote\"",
			"testdata/broken.yaml:10: rule for \"vm-a\" names no volumes",
			"testdata/broken.yaml:10: bandwidth: size \"lots\"",
			"testdata/broken.yaml:10: command \"format_disk\"",
		}},
		{"testdata/unknown-field.yaml", []string{"testdata/unknown-field.yaml:7: unknown field acess"}},
		{"testdata/syntax.yaml", []string{"testdata/syntax.yaml:"}},
		// Decoding errors and rule errors together, each at its line, in
		// words: the fields a place has, what a value is and should be.
		{"testdata/many-errors.yaml", []string{
			"testdata/many-errors.yaml:3: unknown field uri_sanx (fields here: uri_san, dns_san, cn)",
			`testdata/many-errors.yaml:5: "abc" is text, where a whole number is wanted`,
			"testdata/many-errors.yaml:9: unknown field acess (fields here: identity, volumes, labels, access, commands, max_connections, tls_required, iops, bandwidth, burst)",
			`testdata/many-errors.yaml:10: rule names identity "vm-c", which is not defined`,
			"testdata/many-errors.yaml:10: iops -5 is negative",
		}},
	} {
		_, err := Load(tc.file)
		if !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", tc.file, err)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error lacks %q:\n%v", tc.file, w, err)
			}
		}
		for _, goWord := range []string{"struct {", "int64", "policy.raw", "!!str", "yaml: line", `yaml:"`} {
			if strings.Contains(err.Error(), goWord) {
				t.Errorf("%s: error speaks Go or YAML internals (%q):\n%v", tc.file, goWord, err)
			}
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"rules: []", "identities: [{name: a, unix: {uid: 1}}]\nrules: [{identity: a, volumes: [x]}]"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := Parse(b, "fuzz.yaml")
		if err == nil {
			p.Decide("a", Volume{Name: "x"})
			p.Identify(&Peer{Unix: true})
		}
	})
}

// A snapshot's export is quarantined with its volume, even where the
// quarantine names the volume exactly.
func TestQuarantineCoversSnapshots(t *testing.T) {
	p, err := Parse([]byte("identities:\n  - {name: ops, unix: {uid: 0}}\nrules:\n  - {identity: ops, volumes: [\"*\"], access: read-only}\nquarantine:\n  volumes: [db]\n"), "p.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for name, allow := range map[string]bool{"db": false, "db@nightly": false, "db2@nightly": true, "dbx": true} {
		if d := p.Decide("ops", Volume{Name: name}); d.Allow != allow {
			t.Errorf("%s: allow %v (%s), want %v", name, d.Allow, d.Reason, allow)
		}
	}
}
