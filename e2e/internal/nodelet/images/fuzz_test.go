package images

import (
	"strings"
	"testing"
)

// FuzzParse feeds arbitrary bytes to the image table parser and arbitrary
// image references to Lookup: errors are fine, panics and tables that accept
// an entry without a program are not.
func FuzzParse(f *testing.F) {
	f.Add([]byte("images:\n  - image: ambient-mesh/echo-server\n    entrypoint: [echo-server]\n"), "docker.io/ambient-mesh/echo-server:v1")
	f.Add([]byte("images: [{image: busybox, entrypoint: [/bin/sh], args: [-c, true]}]"), "busybox@sha256:abc")
	f.Add([]byte("images: 3"), "")
	f.Add([]byte("{"), ":::")
	f.Fuzz(func(t *testing.T, raw []byte, image string) {
		table, err := Parse(raw)
		if err != nil {
			return
		}
		e, err := table.Lookup(image)
		if err != nil {
			return
		}
		if len(e.Entrypoint) == 0 || strings.TrimSpace(e.Entrypoint[0]) == "" {
			t.Errorf("lookup of %q returned an entry without a program: %+v", image, e)
		}
	})
}
