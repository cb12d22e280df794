package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// The libvirt domain XML the README gives for a Goldilocks disk (over the
// Unix socket, and over TCP with TLS), validated by libvirt's own schema
// with virt-xml-validate: each <disk> snippet of README.md, put into a
// minimal domain.
func TestReadmeLibvirtXML(t *testing.T) {
	need(t, "virt-xml-validate")
	readme, err := os.ReadFile(filepath.Join("..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	blocks := regexp.MustCompile("(?s)```xml\n(.*?)```").FindAllStringSubmatch(string(readme), -1)
	var disks []string
	for _, b := range blocks {
		if strings.Contains(b[1], "<disk type='network'") {
			disks = append(disks, b[1])
		}
	}
	if len(disks) < 2 {
		t.Fatalf("README.md has %d <disk type='network'> snippets, want the Unix and the TLS one", len(disks))
	}
	var unix, tls bool
	for i, d := range disks {
		unix = unix || strings.Contains(d, "transport='unix'")
		tls = tls || strings.Contains(d, "tls='yes'")
		domain := `<domain type='qemu'>
  <name>goldilocks-snippet</name>
  <memory unit='MiB'>256</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
` + d + `  </devices>
</domain>
`
		path := filepath.Join(t.TempDir(), "domain.xml")
		write(t, path, []byte(domain))
		out, err := exec.Command("virt-xml-validate", path, "domain").CombinedOutput()
		if err != nil || !strings.Contains(string(out), "validates") {
			t.Errorf("README snippet %d does not validate: %v\n%s\n%s", i+1, err, out, d)
		}
	}
	if !unix || !tls {
		t.Errorf("README snippets: unix socket %v, TLS %v; want both", unix, tls)
	}
}
